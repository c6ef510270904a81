"""local_affinity / local_aggregate in Triton: forward and backward from three kernels.

  _scores_kernel : out[b, n, p, i, j] = scale * <a[b, :, i, j], x[b, n, :, pos]>   (affinity; d aggregate/d weights)
  _gather_kernel : out[b, c, i, j] = scale * sum_{n,p} w[b, n, p, i, j] x[b, n, c, pos]  (aggregate; d affinity/d q)
  _scatter_kernel: out[b, n, c, pos] += scale * w[b, n, p, i, j] a[b, c, i, j]      (d affinity/d k; d aggregate/d v)

Each program takes a block of flat output (or candidate) elements with j fastest, so loads of the query-side
tensors and of the weights coalesce; out-of-frame candidates and columns outside a circle window are skipped
(constant logits, zero values). Inputs are read through their strides (no copies); the scatter accumulates in a
zero-filled fp32 buffer with atomics. Offsets are rounded on the host with the reference's rule. Accumulation is
fp32; float32, float16 and bfloat16 (bfloat16 on GPU only; the interpreter's is wrong).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _alloc
from .._device import on_input_device
from .._determinism import alert_atomic_backward
from ..ops import local_attention as _ops
from ..ops._local_affinity_native import (affinity_autograd_rules, aggregate_autograd_rules, fake_affinity,
                                          fake_affinity_backward, fake_aggregate, fake_aggregate_backward)
from .local_attention import _rounded

_BLOCK = 256


@triton.jit
def _position(off_ptr, b, n, p, i, j, N, H, W, R, DIL, HAS_OFF: tl.constexpr):
    """Key row/col (clamped into the frame) and in-frame mask of window column p for query (b, i, j), reference n."""
    D = 2 * R + 1
    y = i + (p // D - R) * DIL
    x = j + (p % D - R) * DIL
    if HAS_OFF:
        o = ((b * N + n) * 2 * H + i) * W + j  # contiguous int32 (B, N, 2, H, W), channel 0 = dx
        x += tl.load(off_ptr + o).to(tl.int64)
        y += tl.load(off_ptr + o + H * W).to(tl.int64)
    inside = (y >= 0) & (y < H) & (x >= 0) & (x < W)
    return tl.where(inside, y, 0), tl.where(inside, x, 0), inside


@triton.jit
def _split(TOTAL, W, H, D2, D3, BLOCK: tl.constexpr):
    """This program's flat element indices e < TOTAL of a (D3, D2, H, W)-ordered space (with a leading batch), split
    by successive int64 divisions (no int32 products of sizes): (e, mask, j, i, index2, index3, batch)."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    em = e < TOTAL
    e = tl.where(em, e, 0)
    j = e % W
    t = e // W
    i = t % H
    t = t // H
    d2 = t % D2
    t = t // D2
    return e, em, j, i, d2, t % D3, t // D3


@triton.jit
def _in_window(p, R, CIRCLE: tl.constexpr):
    if CIRCLE:
        D = 2 * R + 1
        dy = p // D - R
        dx = p % D - R
        return dy * dy + dx * dx < R * R
    else:
        return p >= 0


# Sizes are never specialised: Triton would compile an int argument equal to 1 as the constant 1, on which the
# tensor methods these kernels call (.to) do not exist.
_SIZES = ["TOTAL", "N", "C", "H", "W", "R", "DIL", "P"]


@triton.jit(do_not_specialize=_SIZES)
def _scores_kernel(a_ptr, x_ptr, off_ptr, out_ptr, TOTAL, N, C, H, W, R, DIL, P, scale, fill,
                   sab, sac, sah, saw, sxb, sxn, sxc, sxh, sxw,
                   HAS_OFF: tl.constexpr, CIRCLE: tl.constexpr, BLOCK: tl.constexpr):
    e, em, j, i, p, n, b = _split(TOTAL, W, H, P, N, BLOCK)
    y, x, inside = _position(off_ptr, b, n, p, i, j, N, H, W, R, DIL, HAS_OFF)
    win = _in_window(p, R, CIRCLE)
    lm = em & inside & win
    # channel steps advance int64 pointers (no int32 products of loop counters and strides)
    ap = a_ptr + (b * sab + i * sah + j * saw)
    xp = x_ptr + (b * sxb + n * sxn + y * sxh + x * sxw)
    s = tl.zeros((BLOCK,), tl.float32)
    for _ in range(0, C):
        s += tl.load(ap, mask=lm, other=0.0).to(tl.float32) * tl.load(xp, mask=lm, other=0.0).to(tl.float32)
        ap += sac
        xp += sxc
    s = tl.where(inside, s * scale, fill)
    s = tl.where(win, s, float("-inf"))
    tl.store(out_ptr + e, s.to(out_ptr.dtype.element_ty), mask=em)


@triton.jit(do_not_specialize=_SIZES)
def _gather_kernel(w_ptr, x_ptr, off_ptr, out_ptr, TOTAL, N, C, H, W, R, DIL, P, scale,
                   swb, swn, swp, swh, sww, sxb, sxn, sxc, sxh, sxw,
                   HAS_OFF: tl.constexpr, CIRCLE: tl.constexpr, BLOCK: tl.constexpr):
    e, em, j, i, c, _, b = _split(TOTAL, W, H, C, 1, BLOCK)
    s = tl.zeros((BLOCK,), tl.float32)
    zero = b * 0  # int64 block: promotes the loop counters before they meet a stride
    for n0 in range(0, N):
        n = zero + n0
        for p0 in range(0, P):
            p = zero + p0
            y, x, inside = _position(off_ptr, b, n, p, i, j, N, H, W, R, DIL, HAS_OFF)
            lm = em & inside & _in_window(p, R, CIRCLE)
            wv = tl.load(w_ptr + b * swb + n * swn + p * swp + i * swh + j * sww, mask=lm, other=0.0).to(tl.float32)
            xv = tl.load(x_ptr + b * sxb + n * sxn + c * sxc + y * sxh + x * sxw, mask=lm, other=0.0).to(tl.float32)
            s += wv * xv
    tl.store(out_ptr + e, (s * scale).to(out_ptr.dtype.element_ty), mask=em)


@triton.jit(do_not_specialize=_SIZES)
def _scatter_kernel(w_ptr, a_ptr, off_ptr, out_ptr, TOTAL, N, C, H, W, R, DIL, P, scale,
                    swb, swn, swp, swh, sww, sab, sac, sah, saw,
                    HAS_OFF: tl.constexpr, CIRCLE: tl.constexpr, BLOCK: tl.constexpr):
    e, em, j, i, p, n, b = _split(TOTAL, W, H, P, N, BLOCK)
    y, x, inside = _position(off_ptr, b, n, p, i, j, N, H, W, R, DIL, HAS_OFF)
    lm = em & inside & _in_window(p, R, CIRCLE)
    wv = tl.load(w_ptr + b * swb + n * swn + p * swp + i * swh + j * sww, mask=lm, other=0.0).to(tl.float32)
    wv = wv * scale
    ap = a_ptr + (b * sab + i * sah + j * saw)
    op = out_ptr + (((b * N + n) * C * H + y) * W + x)  # contiguous fp32 (B, N, C, H, W)
    HW = H.to(tl.int64) * W
    for _ in range(0, C):
        tl.atomic_add(op, wv * tl.load(ap, mask=lm, other=0.0).to(tl.float32), mask=lm)
        ap += sac
        op += HW


def _check(name: str, t: torch.Tensor, op: str) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: the triton backend takes float32, float16 or bfloat16 {name}, got {t.dtype}")


def _grid(total: int):
    return (max(1, triton.cdiv(total, _BLOCK)),)


def _scores(a, x, off, has_off, radius, dilation, circle, scale, fill, out):
    B, C, H, W = a.shape
    N, P = x.shape[1], out.shape[2]
    if out.numel():
        _scores_kernel[_grid(out.numel())](a, x, off, out, out.numel(), N, C, H, W, radius, dilation, P, scale, fill,
                                           *a.stride(), *x.stride(), HAS_OFF=has_off, CIRCLE=circle,
                                           BLOCK=_BLOCK)
    return out


def _gather(w, x, off, has_off, radius, dilation, circle, scale, out):
    B, N, P, H, W = w.shape
    C = x.shape[2]
    if out.numel():
        _gather_kernel[_grid(out.numel())](w, x, off, out, out.numel(), N, C, H, W, radius, dilation, P, scale,
                                           *w.stride(), *x.stride(), HAS_OFF=has_off, CIRCLE=circle, BLOCK=_BLOCK)
    return out


def _scatter(w, a, off, has_off, radius, dilation, circle, scale, op):
    """fp32 (B, N, C, H, W) accumulator of the scatter; `op` names it for the determinism alert."""
    alert_atomic_backward(op)
    B, N, P, H, W = w.shape
    C = a.shape[1]
    out = torch.zeros(B, N, C, H, W, dtype=torch.float32, device=a.device)
    if w.numel() and C:
        _scatter_kernel[_grid(w.numel())](w, a, off, out, w.numel(), N, C, H, W, radius, dilation, P, scale,
                                          *w.stride(), *a.stride(), HAS_OFF=has_off, CIRCLE=circle, BLOCK=_BLOCK)
    return out


@torch.library.custom_op("vosops::local_affinity_triton", mutates_args=())
@on_input_device
def local_affinity_triton(q: torch.Tensor, k: torch.Tensor, offsets: torch.Tensor | None, radius: int,
                          dilation: int, window: str, scale: float, border: str) -> torch.Tensor:
    _ops.check_affinity_args(q, k, offsets, radius, dilation, window, scale, border)
    _check("q", q, "local_affinity")
    B, C, H, W = q.shape
    N, P = k.shape[1], (2 * radius + 1) ** 2
    off, has_off = _rounded(offsets, radius, dilation, q)
    out = _alloc.empty(B, N, P, H, W, dtype=q.dtype, device=q.device)
    fill = 0.0 if border == "zero" else float("-inf")
    return _scores(q, k, off, has_off, radius, dilation, window == "circle", scale, fill, out)


local_affinity_triton.register_fake(fake_affinity)


@torch.library.custom_op("vosops::local_affinity_triton_backward", mutates_args=())
@on_input_device
def local_affinity_triton_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                   offsets: torch.Tensor | None, radius: int, dilation: int, window: str,
                                   scale: float, need_q: bool, need_k: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _ops.check_affinity_backward_args(grad, q, k, offsets, radius, dilation, window, scale)
    _check("q", q, "local_affinity")
    off, has_off = _rounded(offsets, radius, dilation, q)
    circle = window == "circle"
    gq = gk = None
    if need_q:
        gq = _gather(grad, k, off, has_off, radius, dilation, circle, scale,
                     _alloc.empty(*q.shape, dtype=q.dtype, device=q.device))
    if need_k:
        gk = _scatter(grad, q, off, has_off, radius, dilation, circle, scale,
                      "vosops local_affinity backward (triton: the gradient of k)").to(k.dtype)
    return (gq if need_q else q.new_empty(0)), (gk if need_k else k.new_empty(0))


local_affinity_triton_backward.register_fake(fake_affinity_backward)


_backward, _setup = affinity_autograd_rules(local_affinity_triton_backward)
local_affinity_triton.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("vosops::local_aggregate_triton", mutates_args=())
@on_input_device
def local_aggregate_triton(weights: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor | None, radius: int,
                           dilation: int) -> torch.Tensor:
    _ops.check_aggregate_args(weights, v, offsets, radius, dilation)
    _check("weights", weights, "local_aggregate")
    B, N, P, H, W = weights.shape
    off, has_off = _rounded(offsets, radius, dilation, v)
    out = _alloc.empty(B, v.shape[2], H, W, dtype=v.dtype, device=v.device)
    return _gather(weights, v, off, has_off, radius, dilation, False, 1.0, out)


local_aggregate_triton.register_fake(fake_aggregate)


@torch.library.custom_op("vosops::local_aggregate_triton_backward", mutates_args=())
@on_input_device
def local_aggregate_triton_backward(grad_out: torch.Tensor, weights: torch.Tensor, v: torch.Tensor,
                                    offsets: torch.Tensor | None, radius: int, dilation: int, need_weights: bool,
                                    need_v: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _ops.check_aggregate_backward_args(grad_out, weights, v, offsets, radius, dilation)
    _check("weights", weights, "local_aggregate")
    off, has_off = _rounded(offsets, radius, dilation, v)
    gw = gv = None
    if need_weights:  # an unscaled affinity of grad_out against v, 0 out of frame (every window column)
        gw = _scores(grad_out, v, off, has_off, radius, dilation, False, 1.0, 0.0,
                     _alloc.empty(*weights.shape, dtype=weights.dtype, device=v.device))
    if need_v:
        gv = _scatter(weights, grad_out, off, has_off, radius, dilation, False, 1.0,
                      "vosops local_aggregate backward (triton: the gradient of v)").to(v.dtype)
    return (gw if need_weights else weights.new_empty(0)), (gv if need_v else v.new_empty(0))


local_aggregate_triton_backward.register_fake(fake_aggregate_backward)


_backward, _setup = aggregate_autograd_rules(local_aggregate_triton_backward)
local_aggregate_triton.register_autograd(_backward, setup_context=_setup)
