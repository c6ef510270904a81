"""Loading of the compiled extension `vosops._C` (C++ CPU kernels, and CUDA kernels when built with CUDA).

Importing vosops never fails because the extension is missing or broken: it warns once and the other backends
(reference, triton) keep working.
"""

from __future__ import annotations

import warnings

import torch

LOAD_ERROR: str | None = None

try:
    from . import _C  # noqa: F401  (loading the shared object registers torch.ops.vosops.*)

    LOADED = True
except Exception as exc:  # ImportError, or an OSError from a .so built against another torch
    LOADED = False
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "vosops: the native extension vosops._C could not be loaded, so the 'cpu' and 'cuda' backends are "
        f"unavailable ({LOAD_ERROR}). Rebuild with `pip install --no-build-isolation -e .` against the installed "
        "PyTorch; the 'reference' and 'triton' backends still work.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the native op `vosops::<op>` has a kernel for `dispatch_key` ("CPU" or "CUDA")."""
    if not LOADED:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"vosops::{op}", dispatch_key)


def built_with_cuda() -> bool:
    return LOADED and bool(torch.ops.vosops._built_with_cuda())
