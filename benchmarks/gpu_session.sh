#!/usr/bin/env bash
# One call on a lent GPU machine: build, test and benchmark in stages, everything logged under $OUT.
#   bash benchmarks/gpu_session.sh build test bench        (stages run in the order given)
# Stages:
#   env    GPU, driver, torch/triton versions, copy bandwidth
#   build  pip install -e (CUDA for sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise); a stripped copy of the
#          extension goes to $OUT so a later call can carry it instead of rebuilding (stage `carried`)
#   carried  use .gpubuild/_C.abi3.so (a copy fetched from an earlier call) instead of building
#   test   the cuda-marked tests (pytest-xdist), then the rest of the suite when time allows
#   bench  `vosops bench --device cuda` into $OUT/bench (results.json, speedup.png)
# Time limits per stage: TEST_S (default 300), BENCH_S (default 420).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/vosops-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MAX_JOBS="${MAX_JOBS:-16}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
start=$(date +%s)
step() { echo; echo "=== $* ($(( $(date +%s) - start ))s)"; }

# Packages missing from the device image travel as wheels in .whl (fast-pytorch-kmeans: a benchmark baseline).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

for stage in "$@"; do
  case "$stage" in
    env)
      step env
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
      python3 - <<'EOF'
import torch, triton
p = torch.cuda.get_device_properties(0)
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print(p.name, p.multi_processor_count, "SMs", round(p.total_memory / 2**30), "GiB")
x = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
e0.record()
for _ in range(10): y.copy_(x)
e1.record(); torch.cuda.synchronize()
print(f"d2d copy: {2 * x.numel() * 10 / (e0.elapsed_time(e1) * 1e6):.0f} GB/s (read + write)")
EOF
      ;;
    build)
      step "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
      VOSOPS_REQUIRE_NATIVE=1 python3 -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
      rc=$?
      grep -E "error|warning: .*spill|ptxas" "$OUT/build.log" | grep -v "^ *$" | tail -40
      if [ $rc -ne 0 ] || ! ls vosops/_C*.so >/dev/null 2>&1; then
        echo "BUILD FAILED (rc=$rc)"; tail -60 "$OUT/build.log"; exit 1
      fi
      strip --strip-unneeded -o "$OUT/_C.abi3.so" vosops/_C*.so && ls -la "$OUT/_C.abi3.so"
      ;;
    carried)
      step "carried extension"
      cp .gpubuild/_C.abi3.so vosops/_C.abi3.so && ls -la vosops/_C.abi3.so
      ;;
    test)
      step "tests: cuda-marked"
      python3 -m vosops info
      timeout "${TEST_S:-300}" python3 -m pytest -m cuda -n 12 -q -p no:cacheprovider --tb=short -rfE \
        --timeout=240 tests 2>&1 | tee "$OUT/test-cuda.log" | tail -80
      step "tests: the rest"
      timeout "${TEST_REST_S:-150}" python3 -m pytest -m "not cuda" -n 12 -q -p no:cacheprovider --tb=line -rfE \
        --timeout=240 tests 2>&1 | tee "$OUT/test-rest.log" | tail -30
      ;;
    bench)
      # one process per op, each under its own time limit, so a crash or a hang in one loses no other op's rows
      for op in ${BENCH_OPS:-flow_warp local_attention local_affinity topk kmeans propagate}; do
        step "bench $op"
        timeout "${BENCH_OP_S:-150}" python3 -m vosops bench --device cuda --op "$op" --out "/tmp/vosops-bench/$op" \
          ${BENCH_ARGS:-} >> "$OUT/bench.log" 2>&1 || echo "bench $op exited $?"
        grep -E "FAILED|Error" "$OUT/bench.log" | tail -5
      done
      python3 - "$OUT" <<'PYEOF'
import glob, json, os, sys
from vosops.bench.runner import format_table, plot_speedups
out = sys.argv[1]
rows, env = [], None
for path in sorted(glob.glob("/tmp/vosops-bench/*/results.json")):
    d = json.load(open(path))
    env = env or d["environment"]
    rows += d["results"]
if rows:
    env["command"] = "bash benchmarks/gpu_session.sh bench (one `vosops bench --device cuda --op OP` per op)"
    json.dump({"environment": env, "results": rows}, open(os.path.join(out, "results.json"), "w"), indent=1)
    plot_speedups(rows, os.path.join(out, "speedup.png"), title=f"vosops speed-up ({rows[0]['device_name']})")
    print(format_table(rows))
PYEOF
      ;;
    *)
      echo "unknown stage $stage"; exit 2 ;;
  esac
done
step done
