"""`vosops info`: versions, which backends are built and usable, and the device."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("info", help="print versions, built backends and the device")
    p.set_defaults(func=run)


def run(args) -> int:
    import platform

    import torch

    import vosops
    from vosops import _backends, _native

    print(f"vosops {vosops.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, torch CUDA {torch.version.cuda or 'none'}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton not installed")
    print(f"native extension: {'loaded' if _native.LOADED else 'NOT loaded: ' + str(_native.LOAD_ERROR)}"
          + (f", CUDA kernels built: {_native.built_with_cuda()}" if _native.LOADED else ""))
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda}); "
              f"CPU: {torch.get_num_threads()} threads")
    else:
        print(f"device: CPU only, {torch.get_num_threads()} threads (no CUDA device)")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("usable backends per op (" + ", ".join(devices) + "):")
    for public, kernel, supported in _op_table():
        cells = []
        for d in devices:
            usable = [b for b in supported if _backends.why_unusable(b, kernel, d) is None]
            cells.append(f"{d}: {', '.join(usable)}")
        print(f"  {public:<34} " + "; ".join(cells))
    for backend in _backends.BACKENDS:
        for d in devices:
            why = _backends.why_unusable(backend, "flow_warp", d)
            if why is not None and not (backend, d) in (("cuda", "cpu"), ("cpu", "cuda")):
                print(f"  note: {backend} on {d}: {why}")
    from vosops._precision import fp32_dot_precision

    print("float32 products in the Triton kernels: " + ("exact" if fp32_dot_precision() == "ieee" else
          "TF32 (torch.backends.cuda.matmul.fp32_precision allows it)"))
    print(f"auto order: {_backends.AUTO_ORDER}")
    for op, orders in _backends.AUTO_OVERRIDES.items():
        print(f"  {op}: {orders} (measured faster)")
    return 0


def _op_table():
    """(public name, the kernel name backends are registered under, backends the op implements)."""
    from vosops._backends import BACKENDS
    from vosops.ops import local_attention as la
    from vosops.ops import topk as tk

    return [
        ("flow_warp", "flow_warp", BACKENDS),
        ("local_attention", "local_attention", la.ATTENTION_BACKENDS),
        ("local_affinity, local_aggregate", "local_affinity", la.AFFINITY_BACKENDS),
        ("global_topk", "global_topk", tk.GLOBAL_TOPK_BACKENDS),
        ("topk_aggregate", "topk_aggregate", tk.AGGREGATE_BACKENDS),
        ("merge_topk", "merge_topk", tk.MERGE_BACKENDS),
        ("topk_attention", "topk_attention", tk.ATTENTION_BACKENDS),
        ("kmeans, kmeans_predict", "kmeans_step", BACKENDS),
    ]
