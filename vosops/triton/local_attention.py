"""local_attention in Triton: normalize="softmax" over all in-window candidates (no top-k), forward and backward.

Forward: one program per block of query pixels; a loop over references and window positions (a small (dy, dx)
table, so square and circle windows share the kernel) computes each candidate's score with a channel-vector dot
product and folds it into an online softmax (running max, sum and Cv accumulator): the N*P-wide affinity never
exists. The program saves the per-query log-sum-exp for the backward.

Backward (flash-style): recompute every score from q and k and the saved log-sum-exp, p = exp(s - lse);
ds = p * (g.v_cand - g.out). dq is accumulated per query in registers; dk and dv are scatters into fp32
buffers with atomics. Offsets are rounded (half away from zero) once on the host with the reference's rule.
Accumulation is fp32; the triton backend takes float32, float16 and bfloat16 (bfloat16 on GPU only).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import _alloc
from ..reference.local_attention import round_offsets, window_columns



def _block_q() -> int:
    """Queries per program: 32 on a GPU; under the interpreter one wide block is far cheaper (numpy per op)."""
    return 128 if os.environ.get("TRITON_INTERPRET") == "1" else 32


@triton.jit
def _candidate(off_ptr, tab_ptr, t, n, b, i, j, H, W, N, DIL, HAS_OFF: tl.constexpr):
    """Key row/column of window entry t of reference n for the queries (b, i, j), and whether it is in frame."""
    dy = tl.load(tab_ptr + 2 * t)
    dx = tl.load(tab_ptr + 2 * t + 1)
    y = i + dy * DIL
    x = j + dx * DIL
    if HAS_OFF:
        o = ((b * N + n) * 2) * H * W + i * W + j  # rounded offsets: contiguous int32 (B, N, 2, H, W)
        x += tl.load(off_ptr + o).to(tl.int64)
        y += tl.load(off_ptr + o + H * W).to(tl.int64)
    inside = (y >= 0) & (y < H) & (x >= 0) & (x < W)
    return tl.where(inside, y, 0), tl.where(inside, x, 0), inside


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, off_ptr, tab_ptr, out_ptr, lse_ptr,
                    B, C, CV, H, W, N, T, DIL, scale,
                    sqb, sqc, sqh, sqw, skb, skn, skc, skh, skw, svb, svn, svc, svh, svw,
                    HAS_OFF: tl.constexpr, ZERO_BORDER: tl.constexpr,
                    BLOCK_Q: tl.constexpr, CP: tl.constexpr, CVP: tl.constexpr):
    pix = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
    pm = pix < B * H * W
    pix = tl.where(pm, pix, 0)
    j = pix % W
    i = (pix // W) % H
    b = pix // (H * W)
    c = tl.arange(0, CP).to(tl.int64)
    cm = c < C
    cv = tl.arange(0, CVP).to(tl.int64)
    cvm = cv < CV
    qv = tl.load(q_ptr + (b * sqb + i * sqh + j * sqw)[:, None] + c[None, :] * sqc,
                 mask=pm[:, None] & cm[None, :], other=0.0).to(tl.float32)
    m = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_Q,), tl.float32)
    acc = tl.zeros((BLOCK_Q, CVP), tl.float32)
    for n in range(N):
        for t in range(T):
            y, x, inside = _candidate(off_ptr, tab_ptr, t, n, b, i, j, H, W, N, DIL, HAS_OFF)
            lm = pm & inside
            kv = tl.load(k_ptr + (b * skb + n * skn + y * skh + x * skw)[:, None] + c[None, :] * skc,
                         mask=lm[:, None] & cm[None, :], other=0.0).to(tl.float32)
            s = tl.sum(qv * kv, axis=1) * scale
            if ZERO_BORDER:
                s = tl.where(inside, s, 0.0)
            else:
                s = tl.where(inside, s, float("-inf"))
            m_new = tl.maximum(m, s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid yet: avoid -inf - -inf
            alpha = tl.exp(m - m_safe)
            p = tl.exp(s - m_safe)
            vv = tl.load(v_ptr + (b * svb + n * svn + y * svh + x * svw)[:, None] + cv[None, :] * svc,
                         mask=lm[:, None] & cvm[None, :], other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + p[:, None] * vv
            l = l * alpha + p
            m = m_new
    has = l > 0.0
    out = acc / tl.where(has, l, 1.0)[:, None]
    ob = b * CV * H * W + i * W + j
    tl.store(out_ptr + ob[:, None] + cv[None, :] * H * W, out.to(out_ptr.dtype.element_ty),
             mask=pm[:, None] & cvm[None, :])
    # No valid candidate: lse = 0 makes every recomputed p = exp(-inf - 0) = 0 in the backward.
    lse = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), 0.0)
    tl.store(lse_ptr + pix, lse, mask=pm)


@triton.jit
def _backward_kernel(g_ptr, q_ptr, k_ptr, v_ptr, off_ptr, tab_ptr, lse_ptr, dlt_ptr, dq_ptr, dk_ptr, dv_ptr,
                     B, C, CV, H, W, N, T, DIL, scale,
                     sgb, sgc, sgh, sgw, sqb, sqc, sqh, sqw, skb, skn, skc, skh, skw, svb, svn, svc, svh, svw,
                     HAS_OFF: tl.constexpr, ZERO_BORDER: tl.constexpr,
                     NEED_Q: tl.constexpr, NEED_K: tl.constexpr, NEED_V: tl.constexpr,
                     BLOCK_Q: tl.constexpr, CP: tl.constexpr, CVP: tl.constexpr):
    pix = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
    pm = pix < B * H * W
    pix = tl.where(pm, pix, 0)
    j = pix % W
    i = (pix // W) % H
    b = pix // (H * W)
    c = tl.arange(0, CP).to(tl.int64)
    cm = c < C
    cv = tl.arange(0, CVP).to(tl.int64)
    cvm = cv < CV
    qv = tl.load(q_ptr + (b * sqb + i * sqh + j * sqw)[:, None] + c[None, :] * sqc,
                 mask=pm[:, None] & cm[None, :], other=0.0).to(tl.float32)
    g = tl.load(g_ptr + (b * sgb + i * sgh + j * sgw)[:, None] + cv[None, :] * sgc,
                mask=pm[:, None] & cvm[None, :], other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + pix, mask=pm, other=0.0)
    delta = tl.load(dlt_ptr + pix, mask=pm, other=0.0)  # sum_c g * out: the softmax backward's row term
    dq = tl.zeros((BLOCK_Q, CP), tl.float32)
    for n in range(N):
        for t in range(T):
            y, x, inside = _candidate(off_ptr, tab_ptr, t, n, b, i, j, H, W, N, DIL, HAS_OFF)
            lm = pm & inside
            kaddr = (b * skb + n * skn + y * skh + x * skw)[:, None] + c[None, :] * skc
            kv = tl.load(k_ptr + kaddr, mask=lm[:, None] & cm[None, :], other=0.0).to(tl.float32)
            s = tl.sum(qv * kv, axis=1) * scale
            if ZERO_BORDER:
                s = tl.where(inside, s, 0.0)
            else:
                s = tl.where(inside, s, float("-inf"))
            p = tl.where(pm, tl.exp(s - lse), 0.0)
            vv = tl.load(v_ptr + (b * svb + n * svn + y * svh + x * svw)[:, None] + cv[None, :] * svc,
                         mask=lm[:, None] & cvm[None, :], other=0.0).to(tl.float32)
            ds = tl.where(lm, p * (tl.sum(g * vv, axis=1) - delta), 0.0) * scale
            if NEED_Q:
                dq += ds[:, None] * kv
            # fp32 accumulators are contiguous (B, N, C|Cv, H, W)
            if NEED_K:
                kb = (b * N + n) * C * H * W + y * W + x
                tl.atomic_add(dk_ptr + kb[:, None] + c[None, :] * H * W, ds[:, None] * qv,
                              mask=lm[:, None] & cm[None, :])
            if NEED_V:
                vb = (b * N + n) * CV * H * W + y * W + x
                tl.atomic_add(dv_ptr + vb[:, None] + cv[None, :] * H * W, p[:, None] * g,
                              mask=lm[:, None] & cvm[None, :])
    if NEED_Q:
        qb = b * C * H * W + i * W + j
        tl.store(dq_ptr + qb[:, None] + c[None, :] * H * W, dq, mask=pm[:, None] & cm[None, :])


def _check(q: torch.Tensor, topk: int, normalize: str, return_topk: bool) -> None:
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"local_attention: the triton backend takes float32, float16 or bfloat16, got {q.dtype}")
    if topk or normalize != "softmax" or return_topk:
        raise ValueError("local_attention: the triton backend implements normalize='softmax' without topk only")


def _table(radius: int, window: str, device) -> torch.Tensor:
    D = 2 * radius + 1
    cols = window_columns(radius, window)
    return torch.tensor([[p // D - radius, p % D - radius] for p in cols], dtype=torch.int32, device=device)


def _rounded(offsets, radius, dilation, like):
    if offsets is None:
        return like.new_zeros(1, dtype=torch.int32), False
    return round_offsets(offsets, radius, dilation).to(torch.int32).contiguous(), True


def _meta(q, k, v):
    B, C, H, W = q.shape
    N, CV = k.shape[1], v.shape[2]
    return B, C, CV, H, W, N, max(2, triton.next_power_of_2(C)), max(2, triton.next_power_of_2(CV))


@torch.library.custom_op("vosops::local_attention_triton", mutates_args=())
def local_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor | None, radius: int, dilation: int,
    scale: float, topk: int, normalize: str, window: str, border: str, return_topk: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(q, topk, normalize, return_topk)
    B, C, CV, H, W, N, CP, CVP = _meta(q, k, v)
    tab = _table(radius, window, q.device)
    off, has_off = _rounded(offsets, radius, dilation, q)
    out = _alloc.empty(B, CV, H, W, dtype=q.dtype, device=q.device)
    lse = _alloc.empty(B, H, W, dtype=torch.float32, device=q.device)
    bq = _block_q()
    grid = (triton.cdiv(B * H * W, bq),)
    _forward_kernel[grid](
        q, k, v, off, tab, out, lse, B, C, CV, H, W, N, tab.shape[0], dilation, scale,
        *q.stride(), *k.stride(), *v.stride(),
        HAS_OFF=has_off, ZERO_BORDER=border == "zero", BLOCK_Q=bq, CP=CP, CVP=CVP,
    )
    empty_logits = q.new_empty(B, H, W, 0)
    empty_index = torch.empty(B, H, W, 0, dtype=torch.int64, device=q.device)
    return out, lse, empty_logits, empty_index


@local_attention_triton.register_fake
def _(q, k, v, offsets, radius, dilation, scale, topk, normalize, window, border, return_topk):
    B, _, H, W = q.shape
    return (q.new_empty(B, v.shape[2], H, W), q.new_empty(B, H, W, dtype=torch.float32), q.new_empty(B, H, W, 0),
            q.new_empty(B, H, W, 0, dtype=torch.int64))


@torch.library.custom_op("vosops::local_attention_triton_backward", mutates_args=())
def local_attention_triton_backward(
    grad_out: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, offsets: torch.Tensor | None, radius: int, dilation: int, scale: float, window: str,
    border: str, need_q: bool, need_k: bool, need_v: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, C, CV, H, W, N, CP, CVP = _meta(q, k, v)
    tab = _table(radius, window, q.device)
    off, has_off = _rounded(offsets, radius, dilation, q)
    delta = (grad_out.float() * out.float()).sum(1).contiguous()
    dq = torch.zeros(B, C, H, W, dtype=torch.float32, device=q.device) if need_q else None
    dk = torch.zeros(B, N, C, H, W, dtype=torch.float32, device=q.device) if need_k else None
    dv = torch.zeros(B, N, CV, H, W, dtype=torch.float32, device=q.device) if need_v else None
    dummy = q.new_empty(1, dtype=torch.float32)
    bq = _block_q()
    grid = (triton.cdiv(B * H * W, bq),)
    _backward_kernel[grid](
        grad_out, q, k, v, off, tab, lse, delta, dq if need_q else dummy, dk if need_k else dummy,
        dv if need_v else dummy, B, C, CV, H, W, N, tab.shape[0], dilation, scale,
        *grad_out.stride(), *q.stride(), *k.stride(), *v.stride(),
        HAS_OFF=has_off, ZERO_BORDER=border == "zero", NEED_Q=need_q, NEED_K=need_k, NEED_V=need_v,
        BLOCK_Q=bq, CP=CP, CVP=CVP,
    )
    return (dq.to(q.dtype) if need_q else q.new_empty(0), dk.to(k.dtype) if need_k else k.new_empty(0),
            dv.to(v.dtype) if need_v else v.new_empty(0))


@local_attention_triton_backward.register_fake
def _(grad_out, out, lse, q, k, v, offsets, radius, dilation, scale, window, border, need_q, need_k, need_v):
    return (q.new_empty(q.shape) if need_q else q.new_empty(0), k.new_empty(k.shape) if need_k else k.new_empty(0),
            v.new_empty(v.shape) if need_v else v.new_empty(0))


def _setup_context(ctx, inputs, output):
    q, k, v, offsets, radius, dilation, scale, topk, normalize, window, border, return_topk = inputs
    out, lse, _, _ = output
    ctx.save_for_backward(q, k, v, offsets, out, lse)
    ctx.args = (radius, dilation, scale, window, border)


def _backward(ctx, grad_out, _grad_lse, _grad_logits, _grad_index):
    q, k, v, offsets, out, lse = ctx.saved_tensors
    need = ctx.needs_input_grad
    radius, dilation, scale, window, border = ctx.args
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = local_attention_triton_backward(grad_out, out, lse, q, k, v, offsets, radius, dilation, scale,
                                                 window, border, need[0], need[1], need[2])
    return ((dq if need[0] else None), (dk if need[1] else None), (dv if need[2] else None)) + (None,) * 9


local_attention_triton.register_autograd(_backward, setup_context=_setup_context)


def local_attention(q, k, v, offsets, radius, dilation, scale, topk, normalize, window, border, return_topk):
    return local_attention_triton(q, k, v, offsets, radius, dilation, scale, topk, normalize, window, border,
                                  return_topk)
