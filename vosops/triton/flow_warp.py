"""flow_warp in Triton: one program per block of output pixels; taps computed once, then a loop over channels.

Backward: d(flow) is reduced over channels in the program; d(x) is scattered with fp32 atomics. Accumulation is
fp32; the triton backend takes float32, float16 and bfloat16 (bfloat16 on GPU only: the interpreter lacks it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _alloc
from .._device import on_input_device
from ..ops import flow_warp as _ops
from .._determinism import alert_atomic_backward
from ..ops.flow_warp import autograd_rules

_BLOCK = 256


@triton.jit
def _round_half_even(p):
    r = tl.floor(p + 0.5)
    tie = (r - p) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _clip(p, size):
    """Border padding: clamp into [0, size-1]; returns the clamped point and the gradient multiplier."""
    hi = (size - 1).to(tl.float32)
    mult = ((p > 0.0) & (p < hi)).to(tl.float32)
    # NaN stays NaN (and then samples nothing): tl.maximum / tl.minimum would drop it and sample pixel 0
    return tl.where(p != p, p, tl.minimum(tl.maximum(p, 0.0), hi)), mult


@triton.jit
def _pixels(flow_ptr, B, H, W, sfb, sfc, sfh, sfw, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = offs < B * H * W
    j = offs % W
    t = offs // W
    i = t % H
    b = t // H
    fo = b * sfb + i * sfh + j * sfw
    px = j.to(tl.float32) + tl.load(flow_ptr + fo, mask=m, other=0.0).to(tl.float32)
    py = i.to(tl.float32) + tl.load(flow_ptr + fo + sfc, mask=m, other=0.0).to(tl.float32)
    return m, b, i, j, px, py


@triton.jit
def _bilinear_taps(px, py, H, W):
    """Corner (x0, y0), fractions and the validity of the four taps; NaN or far points are invalid everywhere."""
    # a point at -1 exactly keeps its in-frame tap at 0 (weight 0), through which the flow gradient passes
    inside = (px >= -1.0) & (px < W.to(tl.float32)) & (py >= -1.0) & (py < H.to(tl.float32))
    x0f = tl.floor(tl.where(inside, px, 0.0))
    y0f = tl.floor(tl.where(inside, py, 0.0))
    fx = tl.where(inside, px - x0f, 0.0)
    fy = tl.where(inside, py - y0f, 0.0)
    x0 = x0f.to(tl.int64)
    y0 = y0f.to(tl.int64)
    vx0 = inside & (x0 >= 0)
    vx1 = inside & (x0 + 1 < W)
    vy0 = y0 >= 0
    vy1 = y0 + 1 < H
    return x0, y0, fx, fy, vx0 & vy0, vx1 & vy0, vx0 & vy1, vx1 & vy1


# Sizes are never specialised: Triton would compile an int argument equal to 1 as the constant 1, on which the
# tensor methods these kernels call (.to) do not exist.
_SIZES = ["B", "C", "H", "W"]


@triton.jit(do_not_specialize=_SIZES)
def _forward_kernel(x_ptr, flow_ptr, out_ptr, B, C, H, W, sxb, sxc, sxh, sxw, sfb, sfc, sfh, sfw,
                    BILINEAR: tl.constexpr, BORDER: tl.constexpr, BLOCK: tl.constexpr):
    m, b, i, j, px, py = _pixels(flow_ptr, B, H, W, sfb, sfc, sfh, sfw, BLOCK)
    if BORDER:
        px, _ = _clip(px, W)
        py, _ = _clip(py, H)
    out_base = b * C * H * W + i * W + j
    x_base = b * sxb
    if BILINEAR:
        x0, y0, fx, fy, v00, v01, v10, v11 = _bilinear_taps(px, py, H, W)
        w00 = (1.0 - fx) * (1.0 - fy)
        w01 = fx * (1.0 - fy)
        w10 = (1.0 - fx) * fy
        w11 = fx * fy
        o00 = y0 * sxh + x0 * sxw
        for c32 in range(C):
            c = c32 + tl.zeros([1], tl.int64)  # int64: channel offsets can pass 2^31 elements
            p = x_ptr + x_base + c * sxc + o00
            acc = w00 * tl.load(p, mask=m & v00, other=0.0).to(tl.float32)
            acc += w01 * tl.load(p + sxw, mask=m & v01, other=0.0).to(tl.float32)
            acc += w10 * tl.load(p + sxh, mask=m & v10, other=0.0).to(tl.float32)
            acc += w11 * tl.load(p + sxh + sxw, mask=m & v11, other=0.0).to(tl.float32)
            tl.store(out_ptr + out_base + c * H * W, acc.to(out_ptr.dtype.element_ty), mask=m)
    else:
        rx = _round_half_even(px)
        ry = _round_half_even(py)
        valid = (rx >= 0.0) & (rx <= (W - 1).to(tl.float32)) & (ry >= 0.0) & (ry <= (H - 1).to(tl.float32))
        off = tl.where(valid, ry, 0.0).to(tl.int64) * sxh + tl.where(valid, rx, 0.0).to(tl.int64) * sxw
        for c32 in range(C):
            c = c32 + tl.zeros([1], tl.int64)
            v = tl.load(x_ptr + x_base + c * sxc + off, mask=m & valid, other=0.0)
            tl.store(out_ptr + out_base + c * H * W, v.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=_SIZES)
def _backward_kernel(g_ptr, x_ptr, flow_ptr, gx_ptr, gf_ptr, B, C, H, W, sgb, sgc, sgh, sgw,
                     sxb, sxc, sxh, sxw, sfb, sfc, sfh, sfw,
                     BILINEAR: tl.constexpr, BORDER: tl.constexpr, NEED_GX: tl.constexpr, NEED_GF: tl.constexpr,
                     BLOCK: tl.constexpr):
    m, b, i, j, px, py = _pixels(flow_ptr, B, H, W, sfb, sfc, sfh, sfw, BLOCK)
    gxm = tl.full(px.shape, 1.0, tl.float32)
    gym = tl.full(px.shape, 1.0, tl.float32)
    if BORDER:
        px, gxm = _clip(px, W)
        py, gym = _clip(py, H)
    g_base = b * sgb + i * sgh + j * sgw
    acc_base = b * C * H * W  # the d(x) accumulator is contiguous fp32
    if BILINEAR:
        x0, y0, fx, fy, v00, v01, v10, v11 = _bilinear_taps(px, py, H, W)
        a00 = acc_base + y0 * W + x0
        x00 = b * sxb + y0 * sxh + x0 * sxw
        dx = tl.zeros(px.shape, tl.float32)
        dy = tl.zeros(px.shape, tl.float32)
        for c32 in range(C):
            c = c32 + tl.zeros([1], tl.int64)
            g = tl.load(g_ptr + g_base + c * sgc, mask=m, other=0.0).to(tl.float32)
            if NEED_GX:
                a = gx_ptr + a00 + c * H * W
                tl.atomic_add(a, (1.0 - fx) * (1.0 - fy) * g, mask=m & v00)
                tl.atomic_add(a + 1, fx * (1.0 - fy) * g, mask=m & v01)
                tl.atomic_add(a + W, (1.0 - fx) * fy * g, mask=m & v10)
                tl.atomic_add(a + W + 1, fx * fy * g, mask=m & v11)
            if NEED_GF:
                p = x_ptr + x00 + c * sxc
                q00 = tl.load(p, mask=m & v00, other=0.0).to(tl.float32)
                q01 = tl.load(p + sxw, mask=m & v01, other=0.0).to(tl.float32)
                q10 = tl.load(p + sxh, mask=m & v10, other=0.0).to(tl.float32)
                q11 = tl.load(p + sxh + sxw, mask=m & v11, other=0.0).to(tl.float32)
                dx += g * ((q01 - q00) * (1.0 - fy) + (q11 - q10) * fy)
                dy += g * ((q10 - q00) * (1.0 - fx) + (q11 - q01) * fx)
        if NEED_GF:
            f_out = b * 2 * H * W + i * W + j
            tl.store(gf_ptr + f_out, (dx * gxm).to(gf_ptr.dtype.element_ty), mask=m)
            tl.store(gf_ptr + f_out + H * W, (dy * gym).to(gf_ptr.dtype.element_ty), mask=m)
    else:
        rx = _round_half_even(px)
        ry = _round_half_even(py)
        valid = (rx >= 0.0) & (rx <= (W - 1).to(tl.float32)) & (ry >= 0.0) & (ry <= (H - 1).to(tl.float32))
        a = acc_base + tl.where(valid, ry, 0.0).to(tl.int64) * W + tl.where(valid, rx, 0.0).to(tl.int64)
        for c32 in range(C):
            c = c32 + tl.zeros([1], tl.int64)
            g = tl.load(g_ptr + g_base + c * sgc, mask=m, other=0.0).to(tl.float32)
            tl.atomic_add(gx_ptr + a + c * H * W, g, mask=m & valid)


def _grid(x: torch.Tensor):
    B, _, H, W = x.shape
    return (triton.cdiv(B * H * W, _BLOCK),)


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"flow_warp: the triton backend takes float32, float16 or bfloat16, got {x.dtype}")


@torch.library.custom_op("vosops::flow_warp_triton", mutates_args=())
@on_input_device
def flow_warp_triton(x: torch.Tensor, flow: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    _ops.check_args(x, flow, mode, padding_mode)
    _check_dtype(x)
    B, C, H, W = x.shape
    out = _alloc.empty(B, C, H, W, dtype=x.dtype, device=x.device)
    _forward_kernel[_grid(x)](
        x, flow, out, B, C, H, W, *x.stride(), *flow.stride(),
        BILINEAR=mode == "bilinear", BORDER=padding_mode == "border", BLOCK=_BLOCK,
    )
    return out


@flow_warp_triton.register_fake
def _(x, flow, mode, padding_mode):
    return x.new_empty(x.shape)


@torch.library.custom_op("vosops::flow_warp_triton_backward", mutates_args=())
@on_input_device
def flow_warp_triton_backward(
    grad_out: torch.Tensor, x: torch.Tensor, flow: torch.Tensor, mode: str, padding_mode: str,
    need_x_grad: bool, need_flow_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    _ops.check_backward_args(grad_out, x, flow, mode, padding_mode)
    _check_dtype(x)
    B, C, H, W = x.shape
    bilinear = mode == "bilinear"
    if need_x_grad:
        alert_atomic_backward("vosops flow_warp backward (triton: the gradient of x)")
    gx_acc = torch.zeros(B, C, H, W, dtype=torch.float32, device=x.device) if need_x_grad else None
    if need_flow_grad and bilinear:
        gflow = _alloc.empty(B, 2, H, W, dtype=flow.dtype, device=flow.device)
    elif need_flow_grad:  # nearest sampling is piecewise constant in the flow
        gflow = torch.zeros(B, 2, H, W, dtype=flow.dtype, device=flow.device)
    else:
        gflow = flow.new_empty(0)
    if need_x_grad or (need_flow_grad and bilinear):
        dummy = x.new_empty(1, dtype=torch.float32)
        _backward_kernel[_grid(x)](
            grad_out, x, flow, gx_acc if need_x_grad else dummy, gflow if gflow.numel() else dummy,
            B, C, H, W, *grad_out.stride(), *x.stride(), *flow.stride(),
            BILINEAR=bilinear, BORDER=padding_mode == "border", NEED_GX=need_x_grad,
            NEED_GF=need_flow_grad and bilinear, BLOCK=_BLOCK,
        )
    gx = gx_acc.to(x.dtype) if need_x_grad else x.new_empty(0)
    return gx, gflow


@flow_warp_triton_backward.register_fake
def _(grad_out, x, flow, mode, padding_mode, need_x_grad, need_flow_grad):
    gx = x.new_empty(x.shape) if need_x_grad else x.new_empty(0)
    gf = flow.new_empty(flow.shape) if need_flow_grad else flow.new_empty(0)
    return gx, gf


_backward, _setup_context = autograd_rules(flow_warp_triton_backward)
flow_warp_triton.register_autograd(_backward, setup_context=_setup_context)


def flow_warp(x, flow, mode, padding_mode):
    return flow_warp_triton(x, flow, mode, padding_mode)
