"""topk_aggregate in Triton: one program per block of candidate rows, forward and backward.

Each program loads its rows' logits and indices (the whole candidate axis, padded to a power of two), computes the
kept set ("threshold": a valid candidate is kept when fewer than min(k, K) valid logits are strictly greater, which
is "logit >= the k-th largest" with ties kept, without a sort), the max-subtracted softmax, then walks the value
channels in blocks gathering values[b, index]. The backward recomputes the weights; d logit_j = w_j (g·v_j -
sum_i w_i g·v_i), and d values is scattered with fp32 atomics. Accumulation is fp32; float32 and float16 (and
bfloat16 on GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _alloc
from .._device import on_input_device
from .._determinism import alert_atomic_backward
from ..ops import _topk_rules
from ..ops import topk as _ops


@triton.jit
def _weights(lg_ptr, ix_ptr, row, row_ok, K, L, KK, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
             BLOCK_J: tl.constexpr, THRESHOLD: tl.constexpr):
    """(normalised weights, safe index) (BLOCK_M, BLOCK_K) of rows `row`; dropped candidates get weight 0."""
    col = tl.arange(0, BLOCK_K)
    inb = row_ok[:, None] & (col[None, :] < K)
    x = tl.load(lg_ptr + row[:, None] * K + col[None, :], mask=inb, other=float("-inf")).to(tl.float32)
    ix = tl.load(ix_ptr + row[:, None] * K + col[None, :], mask=inb, other=-1)
    kept = inb & (ix >= 0) & (ix < L) & (x > float("-inf"))  # NaN fails; out-of-range never read
    if THRESHOLD:
        xv = tl.where(kept, x, float("-inf"))
        greater = tl.zeros((BLOCK_M, BLOCK_K), tl.int32)
        for j0 in range(0, K, BLOCK_J):
            cj = j0 + tl.arange(0, BLOCK_J)
            mj = row_ok[:, None] & (cj[None, :] < K)
            y = tl.load(lg_ptr + row[:, None] * K + cj[None, :], mask=mj, other=float("-inf")).to(tl.float32)
            iy = tl.load(ix_ptr + row[:, None] * K + cj[None, :], mask=mj, other=-1)
            y = tl.where(mj & (iy >= 0) & (iy < L) & (y > float("-inf")), y, float("-inf"))
            greater += tl.sum((y[:, None, :] > xv[:, :, None]).to(tl.int32), 2)
        kept = kept & (greater < KK)
    mx = tl.max(tl.where(kept, x, float("-inf")), 1)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    e = tl.where(kept, tl.exp(x - mx[:, None]), 0.0)
    s = tl.sum(e, 1)
    w = e / tl.where(s > 0.0, s, 1.0)[:, None]  # a row with nothing kept: all-zero weights, output 0
    return w, tl.where(kept, ix, 0)


@triton.jit
def _fwd_kernel(lg_ptr, ix_ptr, v_ptr, o_ptr, svb, svl, svc, ROWS, M, K, L, CV, KK,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
                THRESHOLD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = row < ROWS
    b = row // M
    w, ix = _weights(lg_ptr, ix_ptr, row, row_ok, K, L, KK, BLOCK_M, BLOCK_K, BLOCK_J, THRESHOLD)
    use = w != 0.0
    base = b[:, None, None] * svb + ix[:, :, None] * svl
    for c0 in range(0, CV, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        vg = tl.load(v_ptr + base + cc[None, None, :] * svc, mask=use[:, :, None] & (cc[None, None, :] < CV),
                     other=0.0).to(tl.float32)
        out = tl.sum(w[:, :, None] * vg, 1)
        tl.store(o_ptr + row[:, None] * CV + cc[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (cc[None, :] < CV))


@triton.jit
def _bwd_kernel(g_ptr, lg_ptr, ix_ptr, v_ptr, dl_ptr, dv_ptr, sgb, sgm, sgc, svb, svl, svc, ROWS, M, K, L, CV, KK,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
                THRESHOLD: tl.constexpr, NEED_L: tl.constexpr, NEED_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = row < ROWS
    b = row // M
    m = row % M
    w, ix = _weights(lg_ptr, ix_ptr, row, row_ok, K, L, KK, BLOCK_M, BLOCK_K, BLOCK_J, THRESHOLD)
    use = w != 0.0
    vbase = b[:, None, None] * svb + ix[:, :, None] * svl
    dbase = (b * L)[:, None, None] * CV + ix[:, :, None] * CV  # dv: contiguous fp32 (B, L, CV)
    d = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    for c0 in range(0, CV, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        c_ok = cc < CV
        g = tl.load(g_ptr + b[:, None] * sgb + m[:, None] * sgm + cc[None, :] * sgc,
                    mask=row_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        both = use[:, :, None] & c_ok[None, None, :]
        if NEED_L:
            vg = tl.load(v_ptr + vbase + cc[None, None, :] * svc, mask=both, other=0.0).to(tl.float32)
            d += tl.sum(g[:, None, :] * vg, 2)
        if NEED_V:
            tl.atomic_add(dv_ptr + dbase + cc[None, None, :], w[:, :, None] * g[:, None, :], mask=both)
    if NEED_L:
        col = tl.arange(0, BLOCK_K)
        dl = w * (d - tl.sum(w * d, 1)[:, None])
        tl.store(dl_ptr + row[:, None] * K + col[None, :], dl.to(dl_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (col[None, :] < K))


def _pow2(n: int, lo: int = 4) -> int:
    return max(lo, triton.next_power_of_2(max(n, 1)))


def _blocks(K: int, CV: int):
    """(BLOCK_M, BLOCK_K, BLOCK_J, BLOCK_C): the whole candidate axis per row; rows per program so that the
    (rows x candidates x chunk) temporaries stay around 8K elements."""
    bk = _pow2(K)
    bj = min(bk, 16)
    bc = min(_pow2(CV), 32)
    bm = 1
    while bm < 16 and 2 * bm * bk * max(bj, bc) <= 8192:
        bm *= 2
    return bm, bk, bj, bc


def _check(logits: torch.Tensor, index: torch.Tensor, values: torch.Tensor, normalize: str, k: int,
           grad_out: torch.Tensor | None = None) -> None:
    k_or_none = k if normalize == "threshold" else None  # the op passes 0 for None
    if grad_out is None:
        _ops.check_aggregate_args(logits, index, values, normalize, k_or_none)
    else:
        _ops.check_aggregate_backward_args(grad_out, logits, index, values, normalize, k_or_none)
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"topk_aggregate: the triton backend takes float32, float16 or bfloat16, got {logits.dtype}")
    if index.device.type == "cpu":  # as the native op: on a GPU a check would synchronise (the kernels drop
        _ops._check_index_range(index, values.shape[1])  # out-of-range candidates); vosops.topk_aggregate checks


def _kk(normalize: str, k: int, K: int) -> int:
    return min(k, K) if normalize == "threshold" else K


@torch.library.custom_op("vosops::topk_aggregate_triton", mutates_args=())
@on_input_device
def topk_aggregate_triton(logits: torch.Tensor, index: torch.Tensor, values: torch.Tensor, normalize: str,
                          k: int) -> torch.Tensor:
    _check(logits, index, values, normalize, k)
    B, M, K = logits.shape
    L, CV = values.shape[1], values.shape[2]
    out = _alloc.empty(B, M, CV, dtype=values.dtype, device=values.device)
    if out.numel() == 0:
        return out
    lg, ix = logits.contiguous(), index.contiguous()
    bm, bk, bj, bc = _blocks(K, CV)
    _fwd_kernel[(triton.cdiv(B * M, bm),)](
        lg, ix, values, out, *values.stride(), B * M, M, K, L, CV, _kk(normalize, k, K),
        BLOCK_M=bm, BLOCK_K=bk, BLOCK_J=bj, BLOCK_C=bc, THRESHOLD=normalize == "threshold",
    )
    return out


topk_aggregate_triton.register_fake(_topk_rules.aggregate_fake)


@torch.library.custom_op("vosops::topk_aggregate_triton_backward", mutates_args=())
@on_input_device
def topk_aggregate_triton_backward(grad_out: torch.Tensor, logits: torch.Tensor, index: torch.Tensor,
                                   values: torch.Tensor, normalize: str, k: int, need_logits: bool,
                                   need_values: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check(logits, index, values, normalize, k, grad_out)
    B, M, K = logits.shape
    L, CV = values.shape[1], values.shape[2]
    gl = _alloc.empty(B, M, K, dtype=logits.dtype, device=logits.device) if need_logits \
        else logits.new_empty(0)
    dv = torch.zeros(B, L, CV, dtype=torch.float32, device=values.device) if need_values else None
    if need_values:
        alert_atomic_backward("vosops topk_aggregate backward (triton: the gradient of values)")
    if B * M * K > 0 and (need_logits or need_values):
        g = grad_out.to(values.dtype)
        bm, bk, bj, bc = _blocks(K, CV)
        _bwd_kernel[(triton.cdiv(B * M, bm),)](
            g, logits.contiguous(), index.contiguous(), values, gl if need_logits else g, dv if need_values else g,
            *g.stride(), *values.stride(), B * M, M, K, L, CV, _kk(normalize, k, K),
            BLOCK_M=bm, BLOCK_K=bk, BLOCK_J=bj, BLOCK_C=bc, THRESHOLD=normalize == "threshold",
            NEED_L=need_logits, NEED_V=need_values,
        )
    gv = dv.to(values.dtype) if need_values else values.new_empty(0)
    return gl, gv


topk_aggregate_triton_backward.register_fake(_topk_rules.aggregate_backward_fake)
_backward, _setup_context = _topk_rules.aggregate_autograd_rules(topk_aggregate_triton_backward)
topk_aggregate_triton.register_autograd(_backward, setup_context=_setup_context)
