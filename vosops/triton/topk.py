"""topk_attention in Triton: flash-style forward and backward with a running top-k per query row.

Forward, one program per (block of queries, batch*head): the dense keys [0, dense) go through the usual online
softmax (tl.dot tiles); the sparse keys are swept tile by tile keeping each row's best `kk` candidates as packed
int64 keys (orderable logit bits << 32 | inverted index, so "larger key" = larger logit, ties to the lower
index), each tile merged by rounds of "largest entrant replaces the list's minimum", or by one sort of list and
tile when the tile brings many entrants (_select.merge_tile). After the sweep the list is sorted (the saved
indices), and a second sweep recomputes each tile and folds the keys at or above the row's kk-th best into the
same online softmax, with a tile product for their values. Saved for backward: the log-sum-exp per query and the
kept sparse indices (no M x L tensor).
Backward, without atomics (so deterministic): a query-major kernel recomputes the dense scores tile by tile and
the sparse ones from the saved indices for dq; a key-major kernel gives the dense keys' dk, dv (flash-attention 2
style, each key block summing over every query block in registers); the kept pairs, grouped by key on the device
(a stable sort of the saved indices), give each sparse key's dk, dv in one program that gathers its queries.
Accumulation is fp32; the backend takes float32 and float16 (and bfloat16 on GPU).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import _alloc
from .._device import on_input_device
from .._precision import check_precision, fp32_dot_precision
from ._select import MAXKEY, insert_entrants, merge_tile
from ._softmax import online_softmax_step
from ..ops import topk as _ops
from ..ops.topk import attention_autograd_rules, attention_fake, global_topk_fake, gt_backward, gt_setup, kept_sparse

# Below every packed key: an empty slot. A tl.constexpr, as compiled kernels may read no other kind of global.
_SENTINEL = tl.constexpr(-(2**63))


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """a @ b with fp32 accumulation; PREC ("ieee" or "tf32", vosops._precision) matters for float32 operands only."""
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _pack(s, idx):
    """int64 keys ordered like (logit desc, index asc): orderable float bits in the high word, ~index low."""
    s = s + 0.0  # -0.0 -> +0.0, so equal logits pack equally
    bits = s.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) + (4294967295 - idx.to(tl.int64))


@triton.jit
def _unpack(key):
    hi = (key >> 32).to(tl.int32)
    bits = tl.where(hi >= 0, hi, hi ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), 4294967295 - (key & 4294967295)


@triton.jit
def _sparse_tile(q, kt, offs_n, n_ok, scale, PREC: tl.constexpr):
    """A sparse key tile's logits and packed keys (_SENTINEL where invalid). Both forward sweeps call this, so a
    key's logit comes out bit-identical in each."""
    s = _dot(q, tl.trans(kt), PREC) * scale
    keys = tl.where(n_ok[None, :] & (s > float("-inf")), _pack(s, offs_n[None, :]), _SENTINEL)
    return s, keys


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, idx_ptr,
                sqb, sqh, sqm, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
                H, M, L, D, DV, DENSE, KK, scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                SPARSE: tl.constexpr, PREC: tl.constexpr, SORT_MIN: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < M
    q_base = q_ptr + b * sqb + h * sqh
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * sqm + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    for start in range(0, DENSE, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < DENSE
        kt = tl.load(k_base + offs_n[:, None].to(tl.int64) * skl + offs_d[None, :] * skd,
                     mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        vt = tl.load(v_base + offs_n[:, None].to(tl.int64) * svl + offs_dv[None, :] * svd,
                     mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        s = _dot(q, tl.trans(kt), PREC) * scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_i, l_i, alpha, p = online_softmax_step(m_i, l_i, s)
        acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, PREC)
    if SPARSE:
        col = tl.arange(0, BLOCK_N)
        best = tl.where(col[None, :] < KK, tl.full((BLOCK_M, BLOCK_N), _SENTINEL, tl.int64), MAXKEY)
        for start in range(DENSE, L, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < L
            kt = tl.load(k_base + offs_n[:, None].to(tl.int64) * skl + offs_d[None, :] * skd,
                         mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            s, keys = _sparse_tile(q, kt, offs_n, n_ok, scale, PREC)
            best = merge_tile(best, keys, col, KK, _SENTINEL, SORT_MIN)
        # The row's kk-th best key (its list's minimum; _SENTINEL while fewer than kk keys are valid): a key is
        # kept exactly when it is >= this one.
        kth = tl.min(best, 1)
        best = tl.sort(tl.where(col[None, :] < KK, best, _SENTINEL), dim=1, descending=True)  # best-first
        sv, si = _unpack(best)
        keep = (col[None, :] < KK) & (best != _SENTINEL)
        m_new = tl.maximum(m_i, tl.max(tl.where(keep, sv, float("-inf")), 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha
        acc = acc * alpha[:, None]
        m_i = m_new
        row = (bh * M + offs_m).to(tl.int64)
        tl.store(idx_ptr + row[:, None] * KK + col[None, :], tl.where(keep, si, -1),
                 mask=m_ok[:, None] & (col[None, :] < KK))
        # The kept keys' softmax terms and values: a second sweep recomputes each tile's keys with the same code
        # (so the same bits) and multiplies the kept ones' weights into the value tile. Coalesced tile loads and
        # a tensor-core product instead of kk dependent gathers of single value rows.
        for start in range(DENSE, L, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < L
            kt = tl.load(k_base + offs_n[:, None].to(tl.int64) * skl + offs_d[None, :] * skd,
                         mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            vt = tl.load(v_base + offs_n[:, None].to(tl.int64) * svl + offs_dv[None, :] * svd,
                         mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
            s, keys = _sparse_tile(q, kt, offs_n, n_ok, scale, PREC)
            kept = (keys >= kth[:, None]) & (keys != _SENTINEL)
            p = tl.where(kept, tl.exp(s - m_safe[:, None]), 0.0)
            l_i += tl.sum(p, 1)
            acc += _dot(p.to(vt.dtype), vt, PREC)
    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    row = (bh * M + offs_m).to(tl.int64)
    tl.store(o_ptr + row[:, None] * DV + offs_dv[None, :], out.to(o_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (offs_dv[None, :] < DV))
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(lse_ptr + row, lse, mask=m_ok)


@triton.jit
def _bwd_dq_kernel(g_ptr, q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, idx_ptr, dq_ptr, di_ptr,
                   sgb, sgh, sgm, sgd, sqb, sqh, sqm, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
                   H, M, L, D, DV, DENSE, KK, scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   SPARSE: tl.constexpr, PREC: tl.constexpr):
    """Query-major: dq of a block of queries, from the dense keys by tiles and the kept sparse keys by gathers.
    Also writes di = dO . O per query for the key-major kernels."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < M
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    row = (bh * M + offs_m).to(tl.int64)
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqm + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    g = tl.load(g_ptr + b * sgb + h * sgh + offs_m[:, None].to(tl.int64) * sgm + offs_dv[None, :] * sgd,
                mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
    o = tl.load(o_ptr + row[:, None] * DV + offs_dv[None, :], mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
    lse = tl.load(lse_ptr + row, mask=m_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # nothing kept: every P is 0
    di = tl.sum(g.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(di_ptr + row, di, mask=m_ok)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, DENSE, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < DENSE
        kt = tl.load(k_base + offs_n[:, None].to(tl.int64) * skl + offs_d[None, :] * skd,
                     mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        vt = tl.load(v_base + offs_n[:, None].to(tl.int64) * svl + offs_dv[None, :] * svd,
                     mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        s = _dot(q, tl.trans(kt), PREC) * scale
        p = tl.where(n_ok[None, :] & m_ok[:, None], tl.exp(s - lse[:, None]), 0.0)
        dp = _dot(g, tl.trans(vt), PREC)
        ds = p * (dp - di[:, None])
        dq += _dot(ds.to(kt.dtype), kt, PREC) * scale
    if SPARSE:
        # one kept column at a time: (BLOCK_M, BLOCK_D) gathers, so registers do not grow with topk
        qf = q.to(tl.float32)
        gf = g.to(tl.float32)
        for j in range(0, KK):
            ij = tl.load(idx_ptr + row * KK + j, mask=m_ok, other=-1)
            # -1: an empty slot; a key outside [DENSE, L) only a directly passed index holds: skipped as empty
            okj = (ij >= DENSE) & (ij < L)
            safe = tl.where(okj, ij, 0)
            kg = tl.load(k_base + safe[:, None] * skl + offs_d[None, :] * skd,
                         mask=okj[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            vg = tl.load(v_base + safe[:, None] * svl + offs_dv[None, :] * svd,
                         mask=okj[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)
            s = tl.sum(qf * kg, 1) * scale
            p = tl.where(okj, tl.exp(s - lse), 0.0)
            dp = tl.sum(gf * vg, 1)
            dq += (p * (dp - di))[:, None] * kg * scale
    tl.store(dq_ptr + row[:, None] * D + offs_d[None, :], dq, mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_dense_kv_kernel(g_ptr, q_ptr, k_ptr, v_ptr, lse_ptr, di_ptr, dk_ptr, dv_ptr,
                         sgb, sgh, sgm, sgd, sqb, sqh, sqm, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
                         H, M, L, D, DV, DENSE, scale,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    """Key-major (flash-attention 2 style): dk, dv of a block of dense keys, summed over every query block in
    registers and stored once: no atomics, and a fixed summation order."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < DENSE
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    kt = tl.load(k_ptr + b * skb + h * skh + offs_n[:, None].to(tl.int64) * skl + offs_d[None, :] * skd,
                 mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    vt = tl.load(v_ptr + b * svb + h * svh + offs_n[:, None].to(tl.int64) * svl + offs_dv[None, :] * svd,
                 mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
    q_base = q_ptr + b * sqb + h * sqh
    g_base = g_ptr + b * sgb + h * sgh
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), tl.float32)
    # Scores are formed transposed, (keys, queries), from q and dO loaded both ways: the products then need no
    # transpose of a computed tile (which made the fp32 FMA path spill kilobytes).
    for start in range(0, M, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        row = (bh * M + offs_m).to(tl.int64)
        q = tl.load(q_base + offs_m[:, None].to(tl.int64) * sqm + offs_d[None, :] * sqd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        qT = tl.load(q_base + offs_m[None, :].to(tl.int64) * sqm + offs_d[:, None] * sqd,
                     mask=m_ok[None, :] & d_ok[:, None], other=0.0)
        g = tl.load(g_base + offs_m[:, None].to(tl.int64) * sgm + offs_dv[None, :] * sgd,
                    mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
        gT = tl.load(g_base + offs_m[None, :].to(tl.int64) * sgm + offs_dv[:, None] * sgd,
                     mask=m_ok[None, :] & dv_ok[:, None], other=0.0)
        lse = tl.load(lse_ptr + row, mask=m_ok, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)  # nothing kept: every P is 0
        di = tl.load(di_ptr + row, mask=m_ok, other=0.0)
        sT = _dot(kt, qT, PREC) * scale
        pT = tl.where(n_ok[:, None] & m_ok[None, :], tl.exp(sT - lse[None, :]), 0.0)
        dpT = _dot(vt, gT, PREC)
        dsT = pT * (dpT - di[None, :])
        dv += _dot(pT.to(g.dtype), g, PREC)
        dk += _dot(dsT.to(q.dtype), q, PREC)
    rows_n = (bh * L + offs_n).to(tl.int64)  # dk, dv are contiguous fp32 (B*H, L, D|DV)
    tl.store(dk_ptr + rows_n[:, None] * D + offs_d[None, :], dk * scale, mask=n_ok[:, None] & d_ok[None, :])
    tl.store(dv_ptr + rows_n[:, None] * DV + offs_dv[None, :], dv, mask=n_ok[:, None] & dv_ok[None, :])


@triton.jit
def _bwd_sparse_kv_kernel(g_ptr, q_ptr, k_ptr, v_ptr, lse_ptr, di_ptr, rows_ptr, starts_ptr, dk_ptr, dv_ptr,
                          sgb, sgh, sgm, sgd, sqb, sqh, sqm, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
                          H, M, L, D, DV, DENSE, NPAIRS, scale,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Key-major over the sparse keys: one key per program walks the queries that kept it (rows_ptr, grouped by
    key, starts_ptr[key - DENSE] .. starts_ptr[key - DENSE + 1]), gathering their q and dO rows. No atomics."""
    key = DENSE + tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    kj = tl.load(k_ptr + b * skb + h * skh + key.to(tl.int64) * skl + offs_d * skd, mask=d_ok, other=0.0)
    vj = tl.load(v_ptr + b * svb + h * svh + key.to(tl.int64) * svl + offs_dv * svd, mask=dv_ok, other=0.0)
    kj = kj.to(tl.float32)
    vj = vj.to(tl.float32)
    q_base = q_ptr + b * sqb + h * sqh
    g_base = g_ptr + b * sgb + h * sgh
    first = tl.load(starts_ptr + bh * (L - DENSE + 1) + (key - DENSE))
    last = tl.load(starts_ptr + bh * (L - DENSE + 1) + (key - DENSE) + 1)
    dk = tl.zeros((BLOCK_D,), tl.float32)
    dv = tl.zeros((BLOCK_DV,), tl.float32)
    for r0 in range(first, last, BLOCK_R):
        r_ok = r0 + offs_r < last
        i = tl.load(rows_ptr + bh * NPAIRS + r0 + offs_r, mask=r_ok, other=0).to(tl.int64)
        qi = tl.load(q_base + i[:, None] * sqm + offs_d[None, :] * sqd, mask=r_ok[:, None] & d_ok[None, :],
                     other=0.0).to(tl.float32)
        gi = tl.load(g_base + i[:, None] * sgm + offs_dv[None, :] * sgd, mask=r_ok[:, None] & dv_ok[None, :],
                     other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + bh * M + i, mask=r_ok, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        di = tl.load(di_ptr + bh * M + i, mask=r_ok, other=0.0)
        s = tl.sum(qi * kj[None, :], 1) * scale
        p = tl.where(r_ok, tl.exp(s - lse), 0.0)
        ds = p * (tl.sum(gi * vj[None, :], 1) - di)
        dk += tl.sum(ds[:, None] * qi, 0)
        dv += tl.sum(p[:, None] * gi, 0)
    rows_k = bh * L + key.to(tl.int64)
    tl.store(dk_ptr + rows_k * D + offs_d, dk * scale, mask=d_ok)
    tl.store(dv_ptr + rows_k * DV + offs_dv, dv, mask=dv_ok)


def _queries_by_key(index: torch.Tensor, dense: int, L: int):
    """The kept (query, key) pairs grouped by key, without leaving the device: per batch x head, the query numbers
    in key order (ascending query within a key) and each sparse key's [start, end) into them. Empty slots (-1)
    sort first and fall before every sparse key's range."""
    B, H, M, kk = index.shape
    flat = index.reshape(B * H, M * kk)
    keys, order = torch.sort(flat, dim=1, stable=True)
    rows = torch.div(order, kk, rounding_mode="floor").to(torch.int32)
    bounds = torch.arange(dense, L + 1, device=index.device, dtype=index.dtype).expand(B * H, -1).contiguous()
    starts = torch.searchsorted(keys, bounds)  # int64: positions run to M * kk, which may pass 2^31
    return rows, starts


# Launch parameters of topk_attention's kernels (forward and backward); benchmarks/tune_triton.py sweeps them.
# bwd_*: the query-major dq kernel; kv_*: the key-major dense dk/dv kernel; sparse_*: the per-key sparse one.
# sort_min: a sparse tile that some row admits this many keys of is merged by a sort instead of insertion rounds.
TOPK_ATTENTION_CONFIG = {"block_m": 16, "num_warps": 8, "num_stages": 3, "sort_min": 8,
                         "bwd_block_m": 16, "bwd_block_n": 32, "bwd_num_warps": 4,
                         "kv_block_m": 32, "kv_block_n": 64, "kv_num_warps": 8,
                         "sparse_block_r": 32, "sparse_num_warps": 4}


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _check_grid_rows(op: str, rows: int, what: str) -> None:
    """The kernels put batch (x heads) on the grid's second axis, which CUDA caps at 65535."""
    if rows > 65535:
        raise ValueError(f"{op}: the triton backend takes at most 65535 {what} per call, got {rows}")


def _check_dtype(q: torch.Tensor) -> None:
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"topk_attention: the triton backend takes float32, float16 or bfloat16, got {q.dtype}")


def _split(topk: int, L: int, dense_keys: int):
    kk = kept_sparse(topk, L, dense_keys)
    return (L if kk == 0 else dense_keys), kk


@torch.library.custom_op("vosops::topk_attention_triton", mutates_args=())
@on_input_device
def topk_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: int, scale: float,
                          dense_keys: int, precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """precision: the float32 products' input_precision (vosops._precision), read by the caller so that the
    backward, which receives it through the autograd context, recomputes the forward's scores."""
    _ops.check_attention_args(q, k, v, topk, scale, dense_keys)
    _check_dtype(q)
    check_precision(precision)
    B, H, M, D = q.shape
    L, DV = k.shape[2], v.shape[3]
    dense, kk = _split(topk, L, dense_keys)
    _check_grid_rows("topk_attention", B * H, "batch x heads")
    out = _alloc.empty(B, H, M, DV, dtype=q.dtype, device=q.device)
    lse = _alloc.empty(B, H, M, dtype=torch.float32, device=q.device)
    index = _alloc.empty(B, H, M, kk, dtype=torch.int64, device=q.device)
    cfg = dict(TOPK_ATTENTION_CONFIG)  # one snapshot: grid and block sizes read below must agree
    block_m = cfg["block_m"]
    block_n = _pow2(kk) if kk else 32
    _fwd_kernel[(triton.cdiv(M, block_m), B * H)](
        q, k, v, out, lse, index if kk else lse, *q.stride(), *k.stride(), *v.stride(),
        H, M, L, D, DV, dense, kk, float(scale),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV), SPARSE=kk > 0,
        PREC=precision, SORT_MIN=cfg["sort_min"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out, lse, index


topk_attention_triton.register_fake(attention_fake)


@torch.library.custom_op("vosops::topk_attention_triton_backward", mutates_args=())
@on_input_device
def topk_attention_triton_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   out: torch.Tensor, lse: torch.Tensor, index: torch.Tensor, scale: float,
                                   dense_keys: int, precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _ops.check_attention_backward_args(grad_out, q, k, v, out, lse, index, scale, dense_keys)
    _check_dtype(q)
    check_precision(precision)
    B, H, M, D = q.shape
    L, DV = k.shape[2], v.shape[3]
    kk = index.shape[3]
    dense = L if kk == 0 else dense_keys
    # Every row of dq, dk and dv is written exactly once: dk/dv rows [0, dense) by the dense kernel, the rest by
    # the sparse one (a key no query kept writes zeros there).
    dq = _alloc.empty(B, H, M, D, dtype=torch.float32, device=q.device)
    dk = _alloc.empty(B, H, L, D, dtype=torch.float32, device=q.device)
    dv = _alloc.empty(B, H, L, DV, dtype=torch.float32, device=q.device)
    di = torch.empty(B, H, M, dtype=torch.float32, device=q.device)
    out = out.contiguous()
    lse = lse.contiguous()
    index = index.contiguous()
    cfg = dict(TOPK_ATTENTION_CONFIG)  # one snapshot: grid and block sizes read below must agree
    strides = (*grad_out.stride(), *q.stride(), *k.stride(), *v.stride())
    block_d, block_dv = _pow2(D), _pow2(DV)
    _bwd_dq_kernel[(triton.cdiv(M, cfg["bwd_block_m"]), B * H)](
        grad_out, q, k, v, out, lse, index if kk else lse, dq, di, *strides,
        H, M, L, D, DV, dense, kk, float(scale),
        BLOCK_M=cfg["bwd_block_m"], BLOCK_N=cfg["bwd_block_n"], BLOCK_D=block_d, BLOCK_DV=block_dv,
        SPARSE=kk > 0, PREC=precision, num_warps=cfg["bwd_num_warps"], num_stages=cfg["num_stages"],
    )
    if dense > 0:
        _bwd_dense_kv_kernel[(triton.cdiv(dense, cfg["kv_block_n"]), B * H)](
            grad_out, q, k, v, lse, di, dk, dv, *strides, H, M, L, D, DV, dense, float(scale),
            BLOCK_M=cfg["kv_block_m"], BLOCK_N=cfg["kv_block_n"], BLOCK_D=block_d, BLOCK_DV=block_dv, PREC=precision,
            num_warps=cfg["kv_num_warps"], num_stages=cfg["num_stages"],
        )
    if L > dense:
        rows, starts = _queries_by_key(index, dense, L)
        _bwd_sparse_kv_kernel[(L - dense, B * H)](
            grad_out, q, k, v, lse, di, rows, starts, dk, dv, *strides, H, M, L, D, DV, dense, M * kk,
            float(scale), BLOCK_R=cfg["sparse_block_r"], BLOCK_D=block_d, BLOCK_DV=block_dv,
            num_warps=cfg["sparse_num_warps"],
        )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@topk_attention_triton_backward.register_fake
def _(grad_out, q, k, v, out, lse, index, scale, dense_keys, precision):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_backward, _setup_context = attention_autograd_rules(topk_attention_triton_backward)
topk_attention_triton.register_autograd(_backward, setup_context=_setup_context)


def topk_attention(q, k, v, topk, scale, dense_keys):
    return topk_attention_triton(q, k, v, topk, scale, dense_keys, fp32_dot_precision())[0]


# --- global_topk -------------------------------------------------------------------------------------------------

@triton.jit
def _global_topk_split_kernel(q_ptr, k_ptr, mask_ptr, part_ptr, sqb, sqm, sqc, skb, skl, skc,
                              M, L, C, TOPK, SPLIT, CHUNK, scale,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                              KPAD: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr):
    """One program per (block of queries, batch x key split): scores a (BLOCK_M, BLOCK_N) tile at a time (tl.dot
    over BLOCK_C-channel chunks) over its CHUNK keys and keeps each row's best TOPK as packed keys; writes them,
    unsorted, to part[(b*M + m)*SPLIT + split, :KPAD] (_SENTINEL where empty). The key splits give the grid enough
    programs when B*M is small; the finishing kernel takes the top TOPK of a row's SPLIT lists."""
    pid_m = tl.program_id(0)
    pid_bs = tl.program_id(1)
    b = (pid_bs // SPLIT).to(tl.int64)
    sp = pid_bs % SPLIT
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    col = tl.arange(0, KPAD)
    m_ok = offs_m < M
    q_rows = q_ptr + b * sqb + offs_m[:, None].to(tl.int64) * sqm
    best = tl.where(col[None, :] < TOPK, tl.full((BLOCK_M, KPAD), _SENTINEL, tl.int64), MAXKEY)
    lo = sp * CHUNK
    hi = tl.minimum(lo + CHUNK, L)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        k_rows = k_ptr + b * skb + offs_n[:, None].to(tl.int64) * skl
        s = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c_ok = (c0 + offs_c) < C
            qt = tl.load(q_rows + (c0 + offs_c)[None, :] * sqc, mask=m_ok[:, None] & c_ok[None, :], other=0.0)
            kt = tl.load(k_rows + (c0 + offs_c)[None, :] * skc, mask=n_ok[:, None] & c_ok[None, :], other=0.0)
            s += _dot(qt, tl.trans(kt), PREC)
        s = s * scale
        valid = n_ok
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + b * L + offs_n, mask=n_ok, other=0) != 0)
        keys = tl.where(valid[None, :] & (s > float("-inf")), _pack(s, offs_n[None, :]), _SENTINEL)  # NaN fails too
        best = insert_entrants(best, keys, col, _SENTINEL)
    best = tl.where(col[None, :] < TOPK, best, _SENTINEL)
    row = (b * M + offs_m).to(tl.int64) * SPLIT + sp
    tl.store(part_ptr + row[:, None] * KPAD + col[None, :], best, mask=m_ok[:, None])


@triton.jit
def _global_topk_finish_kernel(part_ptr, ol_ptr, oi_ptr, R, TOPK, SPLIT,
                               BLOCK_R: tl.constexpr, KPAD: tl.constexpr, WIDTH: tl.constexpr):
    """Row r's SPLIT partial lists (SPLIT*KPAD packed keys, padded to WIDTH) -> its TOPK best, sorted."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    w = tl.arange(0, WIDTH)
    rows = offs_r.to(tl.int64)
    parts = tl.load(part_ptr + rows[:, None] * (SPLIT * KPAD) + w[None, :],
                    mask=r_ok[:, None] & (w[None, :] < SPLIT * KPAD), other=_SENTINEL)
    best = tl.topk(parts, KPAD, dim=1)  # sorted best-first
    sv, si = _unpack(best)
    col = tl.arange(0, KPAD)
    have = best != _SENTINEL
    out_mask = r_ok[:, None] & (col[None, :] < TOPK)
    tl.store(ol_ptr + rows[:, None] * TOPK + col[None, :],
             tl.where(have, sv, float("-inf")).to(ol_ptr.dtype.element_ty), mask=out_mask)
    tl.store(oi_ptr + rows[:, None] * TOPK + col[None, :], tl.where(have, si, -1), mask=out_mask)


# Tiles of global_topk's split kernel. Benchmarks and tests may replace entries (block sizes are powers of two >= 16;
# `split` None = enough key splits for `programs_per_sm` programs per SM; `num_warps`/`num_stages` as in Triton).
GLOBAL_TOPK_CONFIG = {"block_m": 64, "block_n": 64, "block_c": 32, "split": None, "programs_per_sm": 4,
                      "num_warps": 8, "num_stages": 2}
_DEFAULT_SMS = 132  # an H100/H200: used to size the grid when no GPU is there to ask (AOT compile checks)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_SMS


def global_topk_plan(B: int, M: int, L: int, topk: int, device: torch.device) -> dict:
    """Tile sizes, key splits and keys per split for one call."""
    cfg = dict(GLOBAL_TOPK_CONFIG)
    kpad = _pow2(topk)
    block_m = min(cfg["block_m"], max(16, _pow2(4096 // kpad)))  # the running lists live in registers
    tiles = max(1, triton.cdiv(L, cfg["block_n"]))
    split = cfg["split"]
    if split is None:
        row_programs = triton.cdiv(M, block_m) * B
        split = triton.cdiv(cfg["programs_per_sm"] * _sm_count(device), row_programs)
    split = max(1, min(split, tiles, 65535 // max(B, 1)))
    chunk = triton.cdiv(tiles, split) * cfg["block_n"]
    split = triton.cdiv(max(L, 1), chunk)
    return {**cfg, "block_m": block_m, "kpad": kpad, "split": split, "chunk": chunk}


@torch.library.custom_op("vosops::global_topk_triton", mutates_args=())
@on_input_device
def global_topk_triton(q: torch.Tensor, k: torch.Tensor, topk: int, scale: float,
                       key_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    _ops.check_global_topk_args(q, k, topk, scale, key_mask)
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"global_topk: the triton backend takes float32, float16 or bfloat16, got {q.dtype}")
    B, M, C = q.shape
    L = k.shape[1]
    _check_grid_rows("global_topk", B, "batch entries")
    plan = global_topk_plan(B, M, L, topk, q.device)
    split, kpad = plan["split"], plan["kpad"]
    out_l = _alloc.empty(B, M, topk, dtype=q.dtype, device=q.device)
    out_i = _alloc.empty(B, M, topk, dtype=torch.int64, device=q.device)
    parts = torch.empty(B * M * split, kpad, dtype=torch.int64, device=q.device)  # O(M * k) scratch
    mask = key_mask.contiguous() if key_mask is not None else out_i
    _global_topk_split_kernel[(triton.cdiv(M, plan["block_m"]), B * split)](
        q, k, mask, parts, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        M, L, C, topk, split, plan["chunk"], float(scale),
        BLOCK_M=plan["block_m"], BLOCK_N=plan["block_n"], BLOCK_C=min(plan["block_c"], _pow2(C)), KPAD=kpad,
        HAS_MASK=key_mask is not None, PREC=fp32_dot_precision(),
        num_warps=plan["num_warps"], num_stages=plan["num_stages"],
    )
    width = _pow2(split * kpad)
    block_r = max(1, min(64, 8192 // width))
    _global_topk_finish_kernel[(triton.cdiv(B * M, block_r),)](
        parts, out_l, out_i, B * M, topk, split, BLOCK_R=block_r, KPAD=kpad, WIDTH=width,
    )
    return out_l, out_i


global_topk_triton.register_fake(global_topk_fake)
global_topk_triton.register_autograd(gt_backward, setup_context=gt_setup)
