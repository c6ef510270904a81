#!/usr/bin/env bash
# One call on a lent GPU machine: build, test and benchmark in stages, everything logged under $OUT.
#   bash benchmarks/gpu_session.sh env build testwarm bench        (stages run in the order given)
# Stages:
#   env       GPU, driver, torch/triton versions, copy bandwidth
#   build     pip install -e (CUDA for sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise); a stripped copy of the
#             extension goes to $OUT so a later call can carry it instead of rebuilding (stage `carried`). If the
#             CUDA build fails, the CPU-only build is installed so that the Triton backend can still be tested.
#   carried   use .gpubuild/_C.abi3.so (a copy fetched from an earlier call) instead of building
#   test      the cuda-marked tests (pytest-xdist); TEST_REST_S=N also runs the rest of the suite
#   testwarm  the cuda-marked tests while a compile pass runs every benchmark case once, several processes side by
#             side: both are mostly Triton compilation (CPU work), and the timed `bench` stage then finds every
#             kernel in Triton's cache
#   bench     `vosops bench --device cuda`, one process per op, into $OUT/results.json and speedup.png
#   bench-tf32  the same with PyTorch's TF32 switch on (`vosops bench --tf32`), into $OUT/tf32/
#   profile   the top kernels of one call of each BENCH_CONFIGS case (benchmarks/gpu_profile.py) into $OUT/profile.txt
#   tune      tile sweeps of the Triton kernels with config dicts (benchmarks/tune_triton.py; TUNE_OPS, TUNE_CASE,
#             TUNE_KEYS, TUNE_S) into
#             $OUT/tune.json; the table in the log says which tile to ship
#   ncu       Nsight Compute counters of the kernels matching NCU_KERNEL in those calls, into $OUT/ncu.txt
#   sanitize  compute-sanitizer (SANITIZE_TOOLS, default memcheck; also racecheck, synccheck, initcheck) over the
#             cuda-marked tests that SANITIZE_ARGS selects (default: the native CUDA backend's, `-k cuda-cuda`), one
#             process, PyTorch's caching allocator off so an out-of-bounds access inside a pooled block is caught;
#             SANITIZE_S limits each tool
#   pack-cache / carried-cache   Triton's cache to $OUT/triton-cache.txz / from .gpubuild/triton-cache.txz
# Settings: TEST_S (test time limit), TEST_ARGS (extra pytest arguments, e.g. -k), WARM_S (each warm-up process),
# BENCH_OPS, BENCH_CONFIGS (restrict the configurations), BENCH_ARGS (extra `vosops bench` arguments), BENCH_OP_S
# (each op's timed bench), DEADLINE_S (no bench op starts past it, counted from the script's start), BENCH_DIR
# (where each op's results go before `bench` merges them).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/vosops-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MAX_JOBS="${MAX_JOBS:-16}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
start=$(date +%s)
step() { echo; echo "=== $* ($(( $(date +%s) - start ))s)"; }
OPS="${BENCH_OPS:-flow_warp local_attention local_affinity topk kmeans propagate}"
BENCH_DIR="${BENCH_DIR:-/tmp/vosops-bench}"  # each op's `vosops bench --out`; `bench` merges them into $OUT

# Packages missing from the device image travel as wheels in .whl (fast-pytorch-kmeans: a benchmark baseline).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

summarize_tests() {
  grep -E "^(FAILED|ERROR)|passed|failed|no tests ran" "$1" | cut -c1-300 | tail -60
}

run_bench() {
  # run_bench DIR DEST STAGE EXTRA: one `vosops bench` process per op into DIR/OP, each under its own time limit
  # (a crash or a hang in one loses no other op's rows), then the rows merged into DEST/results.json and a plot
  local dir="$1" dest="$2" stage="$3" extra="$4" cfgs="" c op left limit
  for c in ${BENCH_CONFIGS:-}; do cfgs="$cfgs --config $c"; done
  mkdir -p "$dest"
  for op in $OPS; do
    left=$(( ${DEADLINE_S:-100000} - ($(date +%s) - start) ))
    limit=$(( left < ${BENCH_OP_S:-150} ? left : ${BENCH_OP_S:-150} ))
    if [ "$limit" -lt 10 ]; then echo "$stage $op skipped: past the deadline"; continue; fi
    step "$stage $op (limit ${limit}s)"
    timeout "$limit" python3 -m vosops bench --device cuda --op "$op" --out "$dir/$op" \
      $cfgs $extra ${BENCH_ARGS:-} >> "$OUT/$stage.log" 2>&1 || echo "$stage $op exited $?"
    grep -E "FAILED|Error" "$OUT/$stage.log" | cut -c1-300 | tail -5
  done
  python3 - "$dest" "$dir" "$stage" <<'PYEOF'
import glob, json, os, sys
from vosops.bench.runner import format_table, plot_speedups
out, bench_dir, stage = sys.argv[1:4]
rows, env = [], None
for path in sorted(glob.glob(os.path.join(bench_dir, "*", "results.json"))):
    d = json.load(open(path))
    env = env or d["environment"]
    rows += d["results"]
if rows:
    env["command"] = f"bash benchmarks/gpu_session.sh {stage} (one `vosops bench --device cuda --op OP` per op)"
    json.dump({"environment": env, "results": rows}, open(os.path.join(out, "results.json"), "w"), indent=1)
    plot_speedups(rows, os.path.join(out, "speedup.png"), title=f"vosops speed-up ({rows[0]['device_name']})")
    print(format_table(rows))
PYEOF
}

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
      grep -E "error|warning: .*spill|ptxas" "$OUT/build.log" | grep -v "^ *$" | cut -c1-300 | tail -40
      if [ $rc -ne 0 ] || ! ls vosops/_C*.so >/dev/null 2>&1; then
        echo "CUDA BUILD FAILED (rc=$rc)"; grep -B2 -A12 -m3 "error" "$OUT/build.log" | cut -c1-300
        step "fallback: CPU-only build"
        VOSOPS_NO_CUDA=1 VOSOPS_REQUIRE_NATIVE=1 python3 -m pip install --no-build-isolation --no-deps -e . \
          > "$OUT/build-cpu.log" 2>&1 || { echo "CPU BUILD FAILED too"; tail -30 "$OUT/build-cpu.log"; }
      else
        strip --strip-unneeded -o "$OUT/_C.abi3.so" vosops/_C*.so && ls -la "$OUT/_C.abi3.so"
      fi
      ;;
    carried)
      step "carried extension"
      cp .gpubuild/_C.abi3.so vosops/_C.abi3.so && ls -la vosops/_C.abi3.so
      ;;
    test)
      step "tests: cuda-marked"
      python3 -m vosops info
      timeout "${TEST_S:-300}" python3 -m pytest -m cuda -n "${TEST_JOBS:-12}" -q -p no:cacheprovider --tb=short \
        -rfE --durations=15 --timeout=240 ${TEST_ARGS:-} tests > "$OUT/test-cuda.log" 2>&1
      echo "pytest exited $?"; summarize_tests "$OUT/test-cuda.log"
      if [ -n "${TEST_REST_S:-}" ]; then
        step "tests: the rest"
        timeout "$TEST_REST_S" python3 -m pytest -m "not cuda" -n 12 -q -p no:cacheprovider --tb=line -rfE \
          --timeout=240 tests > "$OUT/test-rest.log" 2>&1
        summarize_tests "$OUT/test-rest.log"
      fi
      ;;
    testwarm)
      step "cuda-marked tests alongside the benchmark warm-up"
      python3 -m vosops info
      ( timeout "${TEST_S:-300}" python3 -m pytest -m cuda -n "${TEST_JOBS:-8}" -q -p no:cacheprovider --tb=short \
          -rfE --durations=15 --timeout=240 ${TEST_ARGS:-} tests > "$OUT/test-cuda.log" 2>&1
        echo "pytest exited $?" ) &
      tests_pid=$!
      mkdir -p /tmp/vosops-warm
      # one process per (op, configuration) that exists
      python3 -c "
import sys
from vosops.bench import cases_for
want = set(sys.argv[2].split())
for op in sys.argv[1].split():
    for cfg in dict.fromkeys(c.config for c in cases_for(op, 'cuda')):
        if not want or cfg in want:
            print(op, cfg)" "$OPS" "${BENCH_CONFIGS:-}" \
        | xargs -P "${WARM_JOBS:-8}" -L 1 sh -c 'timeout "${WARM_S:-240}" python3 -m vosops bench --device cuda \
            --op "$0" --config "$1" --budget 0.01 --no-memory --out "/tmp/vosops-warm/$0-$1" \
            > "/tmp/vosops-warm/$0-$1.log" 2>&1; rc=$?; [ $rc -eq 2 ] || echo "warm $0 $1: exit $rc"'
      grep -h "FAILED" /tmp/vosops-warm/*.log | cut -c1-300 > "$OUT/warm.log"
      step "warm-up done"; cat "$OUT/warm.log"
      wait "$tests_pid"
      step "tests done"; summarize_tests "$OUT/test-cuda.log"
      ;;
    bench)
      run_bench "$BENCH_DIR" "$OUT" "bench" ""
      ;;
    bench-tf32)
      # the same cases with PyTorch's TF32 switch on (`vosops bench --tf32`: the Triton kernels' and the baselines'
      # float32 products on TF32 tensor cores), beside the exact run: into $OUT/tf32
      run_bench "$BENCH_DIR-tf32" "$OUT/tf32" "bench-tf32" "--tf32"
      ;;
    profile)
      # the top kernels of one call of each BENCH_CONFIGS case (cuda and triton implementations)
      step "profile"
      cfgs=""; for c in ${BENCH_CONFIGS:?BENCH_CONFIGS is needed by profile}; do cfgs="$cfgs --config $c"; done
      timeout "${PROFILE_S:-120}" python3 benchmarks/gpu_profile.py --device cuda $cfgs --impl cuda --impl triton \
        --top "${PROFILE_TOP:-6}" > "$OUT/profile.txt" 2>&1; echo "profile exited $? ($(grep -c '^== ' "$OUT/profile.txt") cases)"
      ;;
    tune)
      step "tune"
      timeout "${TUNE_S:-180}" python3 benchmarks/tune_triton.py $(for o in ${TUNE_OPS:-}; do echo --op "$o"; done) \
        --case "${TUNE_CASE:-}" $(for k in ${TUNE_KEYS:-}; do echo --key "$k"; done) --budget "${TUNE_BUDGET:-0.1}" --out "$OUT/tune.json" > "$OUT/tune.log" 2>&1; echo "tune exited $?"
      grep -E "default|best|Error" "$OUT/tune.log" | cut -c1-300 | tail -20
      ;;
    ncu)
      # hardware counters (occupancy, memory throughput, stall reasons) of the first launches of kernels matching
      # NCU_KERNEL (a regex) in one profiled call of each BENCH_CONFIGS case; clocks left alone (METHOD.md)
      step "ncu ${NCU_KERNEL:?NCU_KERNEL is needed by ncu}"
      cfgs=""; for c in ${BENCH_CONFIGS:?}; do cfgs="$cfgs --config $c"; done
      timeout "${NCU_S:-180}" ncu --clock-control none --set "${NCU_SET:-detailed}" -k "regex:$NCU_KERNEL" \
        --launch-count "${NCU_LAUNCHES:-2}" python3 benchmarks/gpu_profile.py --device cuda $cfgs \
        --impl "${NCU_IMPL:-cuda}" --top 3 > "$OUT/ncu.txt" 2>&1; echo "ncu exited $?"
      grep -E "Duration|Achieved Occupancy|Memory Throughput|Compute \(SM\) Throughput|Registers Per|L1/TEX Hit|L2 Hit" \
        "$OUT/ncu.txt" | head -40
      ;;
    sanitize)
      san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
      if [ -z "$san" ]; then echo "sanitize skipped: compute-sanitizer not found"; continue; fi
      for tool in ${SANITIZE_TOOLS:-memcheck}; do
        step "compute-sanitizer --tool $tool"
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${SANITIZE_S:-240}" "$san" --tool "$tool" --error-exitcode 99 \
          --print-limit 20 python3 -m pytest -m cuda -q -p no:cacheprovider --tb=line -rfE -x \
          ${SANITIZE_ARGS:--k cuda-cuda} tests > "$OUT/sanitize-$tool.log" 2>&1
        echo "$tool exited $? (99: the sanitizer found errors)"
        grep -E "ERROR SUMMARY|========= (Invalid|Race|Barrier|Uninitialized)|passed|failed" \
          "$OUT/sanitize-$tool.log" | cut -c1-300 | head -20
      done
      ;;
    pack-cache)
      step "pack Triton's cache"
      if tar -C "$HOME/.triton" -I "xz -T0 -6" -cf /tmp/triton-cache.txz cache; then
        size=$(stat -c %s /tmp/triton-cache.txz); echo "triton-cache.txz: $size bytes"
        [ "$size" -lt 16000000 ] && cp /tmp/triton-cache.txz "$OUT/"
      fi
      ;;
    carried-cache)
      step "carried Triton cache"
      mkdir -p "$HOME/.triton" && tar -C "$HOME/.triton" -xJf .gpubuild/triton-cache.txz
      ;;
    *)
      echo "unknown stage $stage"; exit 2 ;;
  esac
done
step done
