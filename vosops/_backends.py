"""Backend selection: `backend=` per call, `vosops.use_backend(name)` for a block, "auto" otherwise.

Backends:
  reference  plain PyTorch (vosops.reference), any device, float64-capable; the ground truth of the tests.
  cpu        C++ kernels in vosops._C, CPU tensors.
  cuda       CUDA kernels in vosops._C, CUDA tensors (needs a CUDA build of vosops).
  triton     Triton kernels, CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, for testing).

"auto" walks AUTO_ORDER for the tensors' device (or an op's measured override) and takes the first usable backend.
Everything here is decided from facts fixed at import, so selection traces cleanly under torch.compile.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading

import torch

from . import _native

BACKENDS = ("reference", "cpu", "cuda", "triton")

# Preference per device type when "auto" is asked for.
AUTO_ORDER = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}
# Per-op exceptions to AUTO_ORDER, each backed by a benchmark: {op: {device_type: (backend, ...)}}.
# Measured on an H200 side by side (benchmarks/results/nvidia-h200/results.json, fp32 unless noted):
#   local_attention  triton 14.4 ms vs cuda 44.3 ms (crw-480p), 0.68 vs 4.16 ms (mamp-train forward), 6.3 vs
#                    37.9 ms (mamp-train forward + backward), 24.0 vs 23.3 ms (mamp-480p: a tie)
#   topk_attention   triton 3.1 vs cuda 7.2 ms forward, 1.7 vs 17.1 ms backward (jointformer-davis-1f, fp16)
AUTO_OVERRIDES: dict[str, dict[str, tuple[str, ...]]] = {
    "local_attention": {"cuda": ("triton", "cuda", "reference")},
    "topk_attention": {"cuda": ("triton", "cuda", "reference")},
}


class BackendUnavailableError(RuntimeError):
    """The requested backend exists but cannot run here (not built, no GPU, triton missing, ...)."""


def _native_kernels(dispatch_key: str) -> frozenset[str]:
    if not _native.LOADED:
        return frozenset()
    names = torch._C._dispatch_get_registrations_for_dispatch_key(dispatch_key)
    return frozenset(n.split("::", 1)[1] for n in names if n.startswith("vosops::"))


_KERNELS = {"CPU": _native_kernels("CPU"), "CUDA": _native_kernels("CUDA")}
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA_AVAILABLE = torch.cuda.is_available()

# The use_backend settings of each thread (a thread starts at "auto", as torch's grad mode is per thread too): one
# thread's block never changes what another thread's calls use. A thread-local (not a ContextVar, which
# torch.compile cannot trace) read without mutation in current_backend.
_local = threading.local()
_DEFAULT = ("auto",)


def _check_name(name: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Use backend `name` for every vosops call in the block (on this thread) that does not pass `backend=`
    itself. Blocks nest; each thread has its own setting."""
    _check_name(name)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = [_DEFAULT]
    entry = (name,)  # a fresh tuple: this block's own entry, found by identity on exit
    stack.append(entry)
    try:
        yield name
    finally:
        # Remove this block's entry, not whatever is on top: blocks held open in interleaved generators exit out of
        # order, and popping would drop another block's setting while leaving this one's in force.
        for i in range(len(stack) - 1, 0, -1):
            if stack[i] is entry:
                del stack[i]
                break


def current_backend() -> str:
    return getattr(_local, "stack", (_DEFAULT,))[-1][0]


def refresh() -> None:
    """Re-read the facts selection depends on (after loading kernels or changing TRITON_INTERPRET)."""
    global TRITON_INTERPRET, CUDA_AVAILABLE
    _KERNELS["CPU"] = _native_kernels("CPU")
    _KERNELS["CUDA"] = _native_kernels("CUDA")
    TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
    CUDA_AVAILABLE = torch.cuda.is_available()


def why_unusable(backend: str, op: str, device_type: str) -> str | None:
    """None when `backend` can run `op` on tensors of `device_type`, else what is missing and how to get it."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"it runs on CPU tensors, got {device_type} tensors"
        if op not in _KERNELS["CPU"]:
            return "the native extension is not loaded" + (
                f" ({_native.LOAD_ERROR})" if _native.LOAD_ERROR else ""
            ) + "; rebuild with `pip install --no-build-isolation -e .`"
        return None
    if backend == "cuda":
        if device_type != "cuda":
            return f"it runs on CUDA tensors, got {device_type} tensors"
        if op not in _KERNELS["CUDA"]:
            return (
                "vosops was built without CUDA kernels; install a CUDA build of PyTorch, put nvcc on PATH and "
                "rebuild with `pip install --no-build-isolation -e .`"
            )
        return None
    if backend == "triton":
        if not TRITON_INSTALLED:
            return "triton is not installed (`pip install triton`)"
        if device_type == "cuda":
            return None
        if device_type == "cpu" and TRITON_INTERPRET:
            return None
        return f"Triton kernels run on CUDA tensors (or on CPU under TRITON_INTERPRET=1), got {device_type} tensors"
    raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")


def select(op: str, device: torch.device, backend: str | None = None, supported=BACKENDS,
           dtype: torch.dtype | None = None) -> str:
    """The backend that runs `op` for tensors on `device`: `backend`, else the active use_backend, else auto.
    "auto" never picks triton for float64 tensors (every Triton kernel takes fp32/fp16/bf16 only)."""
    name = _check_name(backend if backend is not None else current_backend())
    if name == "auto":
        order = AUTO_OVERRIDES.get(op, {}).get(device.type, AUTO_ORDER.get(device.type, ("reference",)))
        for candidate in order:
            if candidate == "triton" and dtype == torch.float64:
                continue
            if candidate in supported and why_unusable(candidate, op, device.type) is None:
                return candidate
        return "reference"
    if name not in supported:
        raise ValueError(f"{op}: backend {name!r} is not implemented for this op; choose from {tuple(supported)}")
    reason = why_unusable(name, op, device.type)
    if reason is not None:
        raise BackendUnavailableError(f"{op}: backend {name!r} is unavailable: {reason}")
    return name


def status(op: str = "flow_warp") -> dict[str, dict[str, str | None]]:
    """For `vosops info`: per backend and device type, None if usable for `op`, else the reason."""
    devices = ["cpu"] + (["cuda"] if CUDA_AVAILABLE else [])
    return {b: {d: why_unusable(b, op, d) for d in devices} for b in BACKENDS}
