"""merge_topk in Triton: the top-k of the concatenated candidate lists, one program per block of rows.

No sort: each candidate's output slot is its rank, the number of valid candidates of its row that come before it
(logit desc, index asc, position asc: the reference's stable sorts), counted over the row in chunks; the program
scatters every candidate with rank < topk to its slot and writes the padding (-inf / -1) after the valid ones.
Returns (logits, index, source) like the native op; the backward is the shared scatter in vosops.ops._topk_rules.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _alloc
from .._device import on_input_device
from ..ops import _topk_rules
from ..ops import topk as _ops


@triton.jit
def _merge_kernel(lg_ptr, ix_ptr, ol_ptr, oi_ptr, os_ptr, ROWS, N, TOPK,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = row < ROWS
    col = tl.arange(0, BLOCK_N)
    inb = row_ok[:, None] & (col[None, :] < N)
    raw = tl.load(lg_ptr + row[:, None] * N + col[None, :], mask=inb, other=float("-inf"))
    x = raw.to(tl.float32)  # exact for float16/bfloat16: the order is the inputs'
    ix = tl.load(ix_ptr + row[:, None] * N + col[None, :], mask=inb, other=-1)
    valid = inb & (ix >= 0) & (x > float("-inf"))  # NaN fails the comparison
    rank = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    nvalid = tl.zeros((BLOCK_M,), tl.int32)
    for j0 in range(0, N, BLOCK_J):
        cj = j0 + tl.arange(0, BLOCK_J)
        mj = row_ok[:, None] & (cj[None, :] < N)
        y = tl.load(lg_ptr + row[:, None] * N + cj[None, :], mask=mj, other=float("-inf")).to(tl.float32)
        iy = tl.load(ix_ptr + row[:, None] * N + cj[None, :], mask=mj, other=-1)
        vy = mj & (iy >= 0) & (y > float("-inf"))
        y3, iy3, x3, ix3 = y[:, None, :], iy[:, None, :], x[:, :, None], ix[:, :, None]
        tie_ix = (iy3 == ix3) & (cj[None, None, :] < col[None, :, None])
        before = vy[:, None, :] & ((y3 > x3) | ((y3 == x3) & ((iy3 < ix3) | tie_ix)))
        rank += tl.sum(before.to(tl.int32), 2)
        nvalid += tl.sum(vy.to(tl.int32), 1)
    sel = valid & (rank < TOPK)
    at = row[:, None] * TOPK + rank
    tl.store(ol_ptr + at, raw, mask=sel)
    tl.store(oi_ptr + at, ix, mask=sel)
    tl.store(os_ptr + at, col[None, :].to(tl.int64) + tl.zeros_like(ix), mask=sel)
    pad = row_ok[:, None] & (col[None, :] >= nvalid[:, None]) & (col[None, :] < TOPK)
    slot = row[:, None] * TOPK + col[None, :]
    tl.store(ol_ptr + slot, tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32).to(ol_ptr.dtype.element_ty),
             mask=pad)
    tl.store(oi_ptr + slot, tl.full((BLOCK_M, BLOCK_N), -1, tl.int64), mask=pad)
    tl.store(os_ptr + slot, tl.full((BLOCK_M, BLOCK_N), -1, tl.int64), mask=pad)


def _pow2(n: int, lo: int = 4) -> int:
    return max(lo, triton.next_power_of_2(max(n, 1)))


@torch.library.custom_op("vosops::merge_topk_triton", mutates_args=())
@on_input_device
def merge_topk_triton(logits: torch.Tensor, index: torch.Tensor,
                      topk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _ops.check_merge_args(logits, index, topk)
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"merge_topk: the triton backend takes float32, float16 or bfloat16, got {logits.dtype}")
    B, M, N = logits.shape
    out_l = _alloc.empty(B, M, topk, dtype=logits.dtype, device=logits.device)
    out_i = _alloc.empty(B, M, topk, dtype=torch.int64, device=logits.device)
    out_s = _alloc.empty(B, M, topk, dtype=torch.int64, device=logits.device)
    if B * M == 0:
        return out_l, out_i, out_s
    bn = _pow2(N)
    bj = min(bn, 16)
    bm = 1
    while bm < 16 and 2 * bm * bn * bj <= 8192:  # (rows x candidates x chunk) temporaries around 8K elements
        bm *= 2
    _merge_kernel[(triton.cdiv(B * M, bm),)](
        logits.contiguous(), index.contiguous(), out_l, out_i, out_s, B * M, N, topk,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_J=bj,
    )
    return out_l, out_i, out_s


merge_topk_triton.register_fake(_topk_rules.merge_fake)
merge_topk_triton.register_autograd(_topk_rules.merge_backward, setup_context=_topk_rules.merge_setup)
