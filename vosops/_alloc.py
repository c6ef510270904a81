"""Output allocation for the Python-launched (Triton) kernels, with the same test-time poisoning as the C++ side."""

from __future__ import annotations

import torch

from . import _native

_POISON = False


def set_poison_outputs(enable: bool) -> None:
    """Fill every freshly allocated op output with NaN (-7777 for integers) so unwritten elements fail tests."""
    global _POISON
    _POISON = bool(enable)
    if _native.LOADED:
        torch.ops.vosops._set_poison_outputs(bool(enable))


def empty(*size, dtype, device) -> torch.Tensor:
    out = torch.empty(*size, dtype=dtype, device=device)
    if _POISON:
        out.fill_(float("nan") if out.is_floating_point() else -7777)
    return out
