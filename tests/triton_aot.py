"""Compile every Triton kernel launch vosops makes, for real GPU targets, on a machine without a GPU.

The Triton interpreter (how the test suite runs the kernels on CPU) is lenient: it has no register file, no shared
memory limit, no bfloat16, and it accepts some shapes and casts the compiler rejects. This script closes that gap
without a GPU:

1. record: with the interpreter off, `JITFunction.run` is replaced by a recorder, and the public ops are called with
   `backend="triton"` on CPU tensors, at the GPU benchmark configurations and at small odd shapes, in float32,
   float16 and bfloat16, forward and backward. Every launch's argument types, constexpr values and launch options
   are recorded (the kernels do not run; their outputs are left unwritten and nothing reads them).
2. compile: each distinct specialization goes through Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX ->
   cubin with ptxas) for sm_90 and sm_80, and its shared memory, registers and spills are read off the cubin.

A failure here is a kernel that would not compile (or not launch: shared memory over the device's limit) on an
H100/A100. Spills are reported (per kernel; --spills lists them), not failed on: they cost speed, not correctness.
Run:  python tests/triton_aot.py [--arch 90] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)  # JITFunctions, and the GPU block sizes in the wrappers

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Largest dynamic shared memory per block (bytes) a kernel may use.
SHARED_LIMIT = {90: 232448, 80: 166912}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")
_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
         torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
         torch.bool: "i1"}


# ----------------------------------------------------------------------------------------------------------------
# 1. record


def _arg_type(value) -> str | None:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPE[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    if value is None:
        return None  # Triton treats a None argument as a constexpr
    raise TypeError(f"unexpected kernel argument {type(value).__name__}")


def _record_launch(records: dict, fn: JITFunction, args, kwargs) -> None:
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in LAUNCH_OPTIONS}
    bound = fn.signature.bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs = {}, {}
    for param in fn.params:
        value = bound.arguments[param.name]
        kind = None if param.is_constexpr else _arg_type(value)
        if (kind in ("i32", "i64") and not isinstance(value, bool) and value == 1
                and not getattr(param, "do_not_specialize", False)):
            kind = None  # as Triton does at launch: an int argument equal to 1 is compiled as the constant 1
        if kind is None:
            signature[param.name] = "constexpr"
            # a dtype constexpr (tl.int32, say) travels through JSON by name
            constexprs[param.name] = {"tl_dtype": value.name} if isinstance(value, tl.dtype) else value
        else:
            signature[param.name] = kind
    key = json.dumps([fn.fn.__module__, fn.fn.__qualname__, signature, constexprs, options], sort_keys=True,
                     default=str)
    records[key] = records.get(key, 0) + 1


def _scenarios():
    """(name, callable) pairs: every public op that has a Triton backend, at GPU sizes and at odd small sizes."""
    import vosops
    from vosops._precision import tf32_matmuls
    from vosops.bench import local_affinity as bench_aff
    from vosops.bench import local_attention as bench_att
    from vosops.bench import topk as bench_topk
    from vosops.bench.flow_warp import CONFIGS as WARP
    from vosops.bench.kmeans import CONFIGS as KMEANS

    T = dict(backend="triton")
    dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def grad_of(out, *inputs):
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True)

    def warp(shape, dtype, **kw):
        B, C, H, W = shape
        x = torch.randn(B, C, H, W, dtype=dtype, requires_grad=True)
        flow = torch.randn(B, 2, H, W, dtype=dtype, requires_grad=True)
        out = vosops.flow_warp(x, flow, **kw, **T)
        if kw.get("mode", "bilinear") == "bilinear":
            grad_of(out, x, flow)

    for dtype in dtypes:
        for shape in (WARP["warp-480p"]["shape"], (2, 3, 7, 9), (1, 5, 1, 6), (3, 1, 13, 1)):
            for mode in ("bilinear", "nearest"):
                for pad in ("zeros", "border"):
                    yield f"flow_warp {shape} {dtype} {mode} {pad}", lambda s=shape, d=dtype, m=mode, p=pad: warp(
                        s, d, mode=m, padding_mode=p)
            yield f"flow_warp valid {shape} {dtype}", lambda s=shape, d=dtype: warp(s, d, return_valid=True)

    def attention(spec, dtype, backward, **over):
        B, C, Cv, H, W, N, kw, use_offsets, _ = spec
        kw = {**kw, **over}
        q = torch.randn(B, C, H, W, dtype=dtype, requires_grad=backward)
        k = torch.randn(B, N, C, H, W, dtype=dtype, requires_grad=backward)
        v = torch.randn(B, N, Cv, H, W, dtype=dtype, requires_grad=backward)
        offsets = torch.randn(B, N, 2, H, W) * 3 if use_offsets else None
        out = vosops.local_attention(q, k, v, offsets=offsets, **kw, **T)
        if backward:
            grad_of(out, q, k, v)

    for name, spec in bench_att.FULL.items():
        for dtype in dtypes:
            yield f"local_attention {name} {dtype}", lambda s=spec, d=dtype, t=name in bench_att.TRAIN: attention(
                s, d, t)
    odd = (2, 3, 1, 7, 9, 2, dict(radius=2, scale=0.5), True, False)
    for dtype in dtypes:
        for over in (dict(), dict(topk=4), dict(normalize="threshold", topk=3), dict(window="circle", dilation=2),
                     dict(border="zero"), dict(return_topk=True, topk=5)):
            yield f"local_attention odd {over} {dtype}", lambda d=dtype, o=over: attention(odd, d, True, **o)

    def affinity(spec, dtype, backward):
        B, C, Cv, H, W, N, radius, scale, use_offsets = spec
        q = torch.randn(B, C, H, W, dtype=dtype, requires_grad=backward)
        k = torch.randn(B, N, C, H, W, dtype=dtype, requires_grad=backward)
        v = torch.randn(B, N, Cv, H, W, dtype=dtype, requires_grad=backward)
        offsets = torch.randn(B, N, 2, H, W) * 3 if use_offsets else None
        a = vosops.local_affinity(q, k, radius=radius, scale=scale, offsets=offsets, **T)
        w = torch.softmax(a.detach().float().nan_to_num(), -1).to(dtype).requires_grad_(backward)
        out = vosops.local_aggregate(w, v, radius=radius, offsets=offsets, **T)
        if backward:
            grad_of(a, q, k)
            grad_of(out, w, v)

    for name, spec in {**bench_aff.FULL, "odd": (2, 3, 1, 7, 9, 2, 2, 0.5, True)}.items():
        for dtype in dtypes:
            yield f"local_affinity {name} {dtype}", lambda s=spec, d=dtype: affinity(s, d, True)

    def topk_attention(M, T_frames, topk, dtype, D=64, heads=12, dense=None):
        dense = M if dense is None else dense
        L = M * (1 + T_frames)
        q = torch.randn(1, heads, M, D, dtype=dtype, requires_grad=True)
        k = torch.randn(1, heads, L, D, dtype=dtype, requires_grad=True)
        v = torch.randn(1, heads, L, D, dtype=dtype, requires_grad=True)
        grad_of(vosops.topk_attention(q, k, v, topk=topk, dense_keys=dense, **T), q, k, v)

    for name, spec in bench_topk.ATTENTION.items():
        if "cuda" in spec["devices"]:
            for dtype in dtypes:
                yield f"topk_attention {name} {dtype}", lambda s=spec, d=dtype: topk_attention(
                    s["M"], s["T"], s["topk"], d)
    for dtype in dtypes:
        yield f"topk_attention odd {dtype}", lambda d=dtype: topk_attention(13, 2, 5, d, D=24, heads=3, dense=0)

    def global_topk(M, L, C, k, dtype, masked):
        q, keys = torch.randn(1, M, C, dtype=dtype), torch.randn(1, L, C, dtype=dtype)
        mask = torch.rand(1, L) > 0.1 if masked else None
        logits, index = vosops.global_topk(q, keys, topk=k, scale=20.0, key_mask=mask, **T)
        values = torch.randn(1, L, 7, dtype=dtype, requires_grad=True)
        lg = torch.randn(1, M, k, dtype=dtype, requires_grad=True)
        idx = torch.randint(0, L, (1, M, k))
        grad_of(vosops.topk_aggregate(lg, idx, values, **T), lg, values)
        grad_of(vosops.topk_aggregate(lg, idx, values, normalize="threshold", k=max(1, k // 2), **T), lg, values)
        vosops.merge_topk([(lg.detach(), idx), (lg.detach(), idx + L)], topk=k, **T)

    for name, spec in bench_topk.GLOBAL.items():
        if "cuda" in spec["devices"]:
            for dtype in dtypes:
                yield f"global_topk {name} {dtype}", lambda s=spec, d=dtype: global_topk(
                    s["M"], s["M"] * s["frames"], s["C"], s["k"], d, True)
    for dtype in dtypes:
        yield f"global_topk odd {dtype}", lambda d=dtype: global_topk(13, 50, 5, 3, d, False)

    def with_tf32(call):
        """call() with PyTorch's TF32 switch on: the float32 products' tf32 specializations (vosops/_precision.py)."""
        with tf32_matmuls(True):
            call()

    f32 = torch.float32
    for name, spec in bench_att.FULL.items():
        yield f"local_attention {name} tf32", lambda s=spec, t=name in bench_att.TRAIN: with_tf32(
            lambda: attention(s, f32, t))
    for name, spec in bench_topk.ATTENTION.items():
        if "cuda" in spec["devices"]:
            yield f"topk_attention {name} tf32", lambda s=spec: with_tf32(
                lambda: topk_attention(s["M"], s["T"], s["topk"], f32))
    for name, spec in bench_topk.GLOBAL.items():
        if "cuda" in spec["devices"]:
            yield f"global_topk {name} tf32", lambda s=spec: with_tf32(
                lambda: global_topk(s["M"], s["M"] * s["frames"], s["C"], s["k"], f32, True))

    def kmeans(B, N, D, K, dtype, **kw):
        x = torch.randn(B, N, D, dtype=dtype)
        vosops.kmeans(x, K, iters=2, **kw, **T)

    for name, spec in KMEANS.items():
        for dtype in dtypes:
            # random init: k-means++ on a CPU at these sizes costs seconds and launches nothing the odd case does not
            yield f"kmeans {name} {dtype}", lambda s=spec, d=dtype: kmeans(s["B"], s["N"], s["D"], s["K"], d,
                                                                             init="random")
            yield f"kmeans minibatch {name} {dtype}", lambda s=spec, d=dtype: kmeans(
                s["B"], s["N"], s["D"], s["K"], d, batch_size=1024, init="random")
    for dtype in dtypes:
        yield f"kmeans odd {dtype}", lambda d=dtype: kmeans(3, 37, 5, 4, d, lengths=torch.tensor([37, 20, 9]))


def record(verbose: bool = False) -> tuple[list[dict], list[str]]:
    import vosops
    from vosops import _backends

    if not _backends.TRITON_INSTALLED:
        raise SystemExit("triton is not installed")
    _backends.TRITON_INTERPRET = True  # let the triton backend take CPU tensors; the recorder launches nothing
    records: dict = {}

    def recorder(self, *args, grid, warmup, **kwargs):
        _record_launch(records, self, args, kwargs)
        # The kernel does not run, so its outputs hold whatever memory held; integer outputs (indices, labels) are
        # zeroed so the wrapper's own indexing between launches stays in range and it reaches its later launches.
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor) and not a.is_floating_point():
                a.zero_()

    JITFunction.run = recorder
    errors = []
    for name, call in _scenarios():
        t0 = time.perf_counter()
        try:
            call()
        except Exception as exc:  # the wrapper itself failed before or between launches
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
        if verbose:
            print(f"  {time.perf_counter() - t0:6.2f} s  {name}", flush=True)
    del vosops
    specs = []
    for key, count in records.items():
        module, qualname, signature, constexprs, options = json.loads(key)
        specs.append(dict(module=module, kernel=qualname, signature=signature, constexprs=constexprs,
                          options=options, launches=count))
    return specs, errors


# ----------------------------------------------------------------------------------------------------------------
# 2. compile


def _resource_usage(cubin: bytes) -> dict:
    """Registers and stack frame of the cubin's kernel (cuobjdump -res-usage). These kernels call no functions and
    keep no local arrays, so a stack frame is register spill space (ptxas -v reports the same bytes as spills)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    usage = {}
    for field, pattern in (("registers", r"REG:(\d+)"), ("stack", r"STACK:(\d+)"), ("local", r"LOCAL:(\d+)")):
        m = re.search(pattern, text)
        usage[field] = int(m.group(1)) if m else None
    return usage


def compile_one(spec: dict, arch: int) -> dict:
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    constexprs = {k: getattr(tl, v["tl_dtype"]) if isinstance(v, dict) else v for k, v in spec["constexprs"].items()}
    result = dict(spec, arch=arch)
    t0 = time.perf_counter()
    try:
        source = ASTSource(fn=fn, signature=spec["signature"], constexprs=constexprs)
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=spec["options"])
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
        return result
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["shared"] = kernel.metadata.shared
    result["num_warps"] = kernel.metadata.num_warps
    result.update(_resource_usage(kernel.asm["cubin"]))
    if kernel.metadata.shared > SHARED_LIMIT[arch]:
        result["error"] = f"shared memory {kernel.metadata.shared} B over sm_{arch}'s {SHARED_LIMIT[arch]} B"
    return result


def _compile_star(job):
    return compile_one(*job)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability x10 (default: 90 and 80)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="write every compiled specialization's report here")
    parser.add_argument("--verbose", action="store_true", help="time each recorded scenario")
    parser.add_argument("--only", help="compile only kernels whose 'module.kernel' matches this regex")
    parser.add_argument("--spills", action="store_true", help="list every specialization that spills")
    args = parser.parse_args(argv)
    arches = args.arch or [90, 80]

    t0 = time.perf_counter()
    specs, errors = record(args.verbose)
    print(f"recorded {len(specs)} distinct kernel specializations ({sum(s['launches'] for s in specs)} launches) "
          f"in {time.perf_counter() - t0:.0f} s")
    for e in errors:
        print("WRAPPER ERROR", e)
    if args.only:
        specs = [s for s in specs if re.search(args.only, f"{s['module']}.{s['kernel']}")]
    jobs = [(s, a) for a in arches for s in specs]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(_compile_star, jobs))
    failed = [r for r in results if "error" in r]
    for r in results:
        if "error" not in r and (r.get("stack") or 0) > 0 and args.spills:
            print(f"spills: sm_{r['arch']} {r['kernel']} {r['signature']} {r['constexprs']} stack={r['stack']} B "
                  f"registers={r['registers']}")
    for r in failed:
        print(f"FAILED sm_{r['arch']} {r['module']}.{r['kernel']} {r['signature']} {r['constexprs']} "
              f"{r['options']}\n  {r['error']}")
    per_kernel: dict = {}
    for r in results:
        if "error" not in r and r["arch"] == arches[0]:
            k = f"{r['module'].rsplit('.', 1)[-1]}.{r['kernel']}"
            per_kernel.setdefault(k, []).append(r)
    print(f"\n{'kernel (sm_%d)' % arches[0]:<40}{'specs':>6}{'max regs':>9}{'max smem':>10}{'spilling':>9}"
          f"{'max spill B':>12}")
    for k, rs in sorted(per_kernel.items()):
        print(f"{k:<40}{len(rs):>6}{max(r['registers'] or 0 for r in rs):>9}{max(r['shared'] for r in rs):>10}"
              f"{sum((r['stack'] or 0) > 0 for r in rs):>9}{max(r['stack'] or 0 for r in rs):>12}")
    elapsed = time.perf_counter() - t0
    print(f"\ncompiled {len(results) - len(failed)}/{len(results)} for sm_{arches} in {elapsed:.0f} s; "
          f"{len(failed)} failed, {len(errors)} wrapper errors")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "results": results, "wrapper_errors": errors}, f, indent=1,
                      default=str)
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
