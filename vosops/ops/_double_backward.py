"""The native backward ops are differentiable once: a gradient of their gradient (a gradient penalty through
`create_graph=True`, a Hessian-vector product) raises instead of silently coming back as zero.

Without an autograd kernel PyTorch's fallback only warns and lets the second backward treat the op's outputs as
constants, so `gx.pow(2).sum().backward()` after `torch.autograd.grad(..., create_graph=True)` would give zeros.
The reference backend is plain PyTorch and differentiates any number of times; the Triton ops (custom_op) raise
by themselves.
"""

from __future__ import annotations

import torch


def refuse_double_backward(qualname: str) -> None:
    """Register on the backward op `qualname` ("vosops::x_backward") an autograd rule whose backward raises."""
    forward = qualname.split("::")[-1].removesuffix("_backward")

    def backward(ctx, *grads):
        raise RuntimeError(
            f"{qualname} is not differentiable: the native kernels of vosops.{forward} give first-order gradients "
            "only (a double backward, e.g. through create_graph=True, is not supported); use backend='reference' "
            "for higher-order gradients")

    torch.library.register_autograd(qualname, backward)
