"""vosops.flow_warp: backward warping of a feature map by a per-pixel flow, on every backend."""

from __future__ import annotations

import torch

from .. import _backends, _native, _validate
from .._autocast import autocast_policy
from .. import reference as _reference
from ._double_backward import refuse_double_backward

MODES = ("bilinear", "nearest")
PADDINGS = ("zeros", "border")


@autocast_policy("widest", "x", "flow")
def flow_warp(
    x: torch.Tensor,
    flow: torch.Tensor,
    *,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    return_valid: bool = False,
    backend: str | None = None,
):
    """Sample `x` (B, C, H, W) at each pixel displaced by `flow` (B, 2, H, W), in pixels, channel 0 = dx, 1 = dy.

    out[b, c, i, j] = x[b, c] at (i + flow[b, 1, i, j], j + flow[b, 0, i, j]) with pixel-centre coordinates:
    exactly F.grid_sample(x, grid, mode, padding_mode, align_corners=True) on the grid built from the flow.
    `mode` "bilinear" or "nearest" (ties round half to even, as grid_sample); `padding_mode` "zeros" or "border".
    Differentiable w.r.t. x, and w.r.t. flow for bilinear (border padding passes zero gradient where it clamps).
    A NaN flow samples nothing (output 0); so does an infinite one with zeros padding, while border padding clamps
    it to the edge (as grid_sample). An out-of-frame tap adds nothing even where x is inf or NaN. The output is
    contiguous (B, C, H, W).

    With `return_valid=True` also returns the (B, 1, H, W) bool mask of pixels whose sampling point lies inside the
    frame ([0, W-1] x [0, H-1], the rounded point for nearest), the validity mask MAMP uses.
    """
    check_args(x, flow, mode, padding_mode)
    chosen = _backends.select("flow_warp", x.device, backend, dtype=x.dtype)
    if chosen == "reference":
        out = _reference.flow_warp(x, flow, mode, padding_mode)
    elif chosen == "triton":
        from ..triton import flow_warp as _triton_flow_warp

        out = _triton_flow_warp.flow_warp(x, flow, mode, padding_mode)
    else:
        out = torch.ops.vosops.flow_warp(x, flow, mode, padding_mode)
    if return_valid:
        return out, _reference.flow_warp_valid(flow, mode, padding_mode)
    return out


def check_args(x, flow, mode, padding_mode) -> None:
    """The arguments of flow_warp (and of its Triton op, which may be called directly)."""
    _validate.tensor("x", x, dim=4)
    _validate.tensor("flow", flow, dim=4)
    if flow.shape[1] != 2:
        raise ValueError(f"flow must be (B, 2, H, W) with channel 0 = dx and 1 = dy, got shape {tuple(flow.shape)}")
    if flow.shape[0] != x.shape[0] or flow.shape[2:] != x.shape[2:]:
        raise ValueError(
            f"flow {tuple(flow.shape)} must match x {tuple(x.shape)} in batch and spatial size (B, _, H, W)"
        )
    _validate.same_device_dtype(("x", "flow"), (x, flow))
    _validate.non_empty("x", x)
    _validate.choice("mode", mode, MODES)
    _validate.choice("padding_mode", padding_mode, PADDINGS)


def check_backward_args(grad_out, x, flow, mode, padding_mode) -> None:
    check_args(x, flow, mode, padding_mode)
    _validate.matches("grad_out", grad_out, x.shape, x, what="(B, C, H, W) like x = ")


def autograd_rules(backward_op):
    """(backward, setup_context) for a flow_warp forward op whose backward op has flow_warp_backward's schema."""

    def setup_context(ctx, inputs, output):
        x, flow, mode, padding_mode = inputs
        ctx.save_for_backward(x, flow)
        ctx.mode, ctx.padding_mode = mode, padding_mode

    def backward(ctx, grad_out):
        x, flow = ctx.saved_tensors
        need_x, need_flow = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx, gf = backward_op(grad_out, x, flow, ctx.mode, ctx.padding_mode, need_x, need_flow)
        return (gx if need_x else None), (gf if need_flow else None), None, None

    return backward, setup_context


def _register_native() -> None:
    """Fake (meta) kernels and autograd for the C++/CUDA ops."""

    @torch.library.register_fake("vosops::flow_warp")
    def _(x, flow, mode, padding_mode):
        return x.new_empty(x.shape)

    @torch.library.register_fake("vosops::flow_warp_backward")
    def _(grad_out, x, flow, mode, padding_mode, need_x_grad, need_flow_grad):
        gx = x.new_empty(x.shape) if need_x_grad else x.new_empty(0)
        gf = flow.new_empty(flow.shape) if need_flow_grad else flow.new_empty(0)
        return gx, gf

    refuse_double_backward("vosops::flow_warp_backward")
    backward, setup_context = autograd_rules(torch.ops.vosops.flow_warp_backward)
    torch.library.register_autograd("vosops::flow_warp", backward, setup_context=setup_context)


if _native.LOADED:
    _register_native()
