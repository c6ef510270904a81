"""torch.use_deterministic_algorithms for the GPU backward kernels that add gradients with float atomics (their order,
and so the rounding of the sum, varies from run to run).

PyTorch's rule for its own such ops: with deterministic algorithms on, an error naming the op, or a warning with
warn_only=True. The CUDA glue calls PyTorch's alert (`alert_atomic_backward` in csrc/common/cuda_glue.h); the
Triton launchers call this one. The CPU kernels and the atomic-free GPU paths are deterministic and never alert.
"""

from __future__ import annotations

import warnings

import torch


def alert_atomic_backward(op: str) -> None:
    """Raise (or warn, with warn_only=True) when deterministic algorithms are asked for; `op` names the op and the
    gradient that its kernel adds with atomics."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (f"{op} adds its gradients with atomic operations, so it does not have a deterministic "
               "implementation, but you set 'torch.use_deterministic_algorithms(True)'. Use backend='cpu' or "
               "'reference' for this op, or torch.use_deterministic_algorithms(True, warn_only=True) to allow it.")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, UserWarning, stacklevel=3)
    else:
        raise RuntimeError(message)
