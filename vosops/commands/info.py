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
    print("backends (usable for flow_warp, per device type):")
    for backend, per_device in _backends.status("flow_warp").items():
        cells = ", ".join(f"{d}: {'yes' if why is None else 'no (' + why + ')'}" for d, why in per_device.items())
        print(f"  {backend:<10} {cells}")
    print(f"auto order: {_backends.AUTO_ORDER}")
    return 0
