"""Launch on the device of the tensors: Triton launches a kernel on the *current* CUDA device (and its current
stream), not on the device of its pointer arguments, and a CUDA graph captures on the current device. A call whose
tensors live on cuda:1 while cuda:0 is current (`vosops propagate --device cuda:1`, a model on a second GPU) would
hand device-1 pointers to a device-0 launch. The CUDA C++ glue guards itself (c10::cuda::CUDAGuard); the Triton
ops and the graph-captured k-means loop go through here.
"""

from __future__ import annotations

import contextlib
import functools

import torch


def cuda_device_of(tensor: torch.Tensor):
    """A context with `tensor`'s CUDA device current; nothing for a tensor on another device type."""
    if tensor.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(tensor.device)


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)):
            found = _first_tensor(a, {})
            if found is not None:
                return found
    return None


def on_input_device(fn):
    """Runs `fn` with its first tensor argument's CUDA device current (the ops check that every tensor shares it).
    For the implementations of the Triton custom ops: functools.wraps keeps the signature that custom_op reads."""

    @functools.wraps(fn)
    def run_on_input_device(*args, **kwargs):
        first = _first_tensor(args, kwargs)
        if first is None:
            return fn(*args, **kwargs)
        with cuda_device_of(first):
            return fn(*args, **kwargs)

    return run_on_input_device
