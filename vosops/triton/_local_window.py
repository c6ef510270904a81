"""Pieces of the Triton local_attention kernels shared by the per-query kernels (local_attention.py) and the
query-tile kernels (local_attention_tiled.py): the packed selection keys and what is done with a finished kept
list, so both kernel families select and aggregate the same way."""

from __future__ import annotations

import triton
import triton.language as tl

# Below every real key (a -inf score packs to about -9.19e18).
NO_KEY = tl.constexpr(-9223000000000000000)


@triton.jit
def pack(s, cid):
    """int64 key ordering by score descending, then candidate index ascending (-0.0 counts as +0.0)."""
    bits = (s + 0.0).to(tl.int32, bitcast=True)
    mono = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (mono.to(tl.int64) << 32) | (4294967295 - cid.to(tl.int64))


@triton.jit
def unpack_score(key):
    hi = (key >> 32).to(tl.int32)
    return tl.where(hi >= 0, hi, hi ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def store_kept_list(run, col, pix, pm, tab_ptr, lg_ptr, idx_ptr, T, P, D, RADIUS, TOPK):
    """return_topk: the sorted list's logits and full candidate indices n*P + (dy+r)*D + (dx+r), (B, H, W, TOPK)."""
    rc = 4294967295 - (run & 4294967295)
    rn = rc // T
    rt = rc % T
    dy = tl.load(tab_ptr + 2 * rt, mask=pm[:, None], other=0).to(tl.int64)
    dx = tl.load(tab_ptr + 2 * rt + 1, mask=pm[:, None], other=0).to(tl.int64)
    full = rn * P + (dy + RADIUS) * D + (dx + RADIUS)
    o = pix[:, None] * TOPK + col[None, :]
    om = pm[:, None] & (col[None, :] < TOPK)
    tl.store(lg_ptr + o, unpack_score(run).to(lg_ptr.dtype.element_ty), mask=om)
    tl.store(idx_ptr + o, full, mask=om)


@triton.jit
def kept_list_softmax(run, col, bb, i, j, pm, off_ptr, tab_ptr, v_ptr, N, T, H, W, DIL, CV, TOPK,
                      svb, svn, svc, svh, svw, HAS_OFF: tl.constexpr, CVP: tl.constexpr, IDX: tl.constexpr):
    """Top-k softmax over each query's kept list (its first TOPK keys, scores in the keys): returns the value
    accumulator (BQ, CVP), the row sums and the row maxima. Values are gathered for the kept candidates only,
    one channel at a time (a (BQ, KP, CVP) gather would spill at KP = 64); out-of-frame ones (zero border) are 0.
    bb: the batch index, (BQ, 1) per query or one scalar for the whole block."""
    cv = tl.arange(0, CVP).to(IDX)
    keep = (col[None, :] < TOPK) & (run != NO_KEY) & pm[:, None]
    s = tl.where(keep, unpack_score(run), float("-inf"))
    rc = tl.where(keep, 4294967295 - (run & 4294967295), 0).to(IDX)
    rn = rc // T
    rt = rc % T
    y = i[:, None] + tl.load(tab_ptr + 2 * rt, mask=keep, other=0).to(IDX) * DIL
    x = j[:, None] + tl.load(tab_ptr + 2 * rt + 1, mask=keep, other=0).to(IDX) * DIL
    if HAS_OFF:
        o = ((bb * N + rn) * 2) * H * W + (i * W + j)[:, None]
        x += tl.load(off_ptr + o, mask=keep, other=0).to(IDX)
        y += tl.load(off_ptr + o + H * W, mask=keep, other=0).to(IDX)
    lm = keep & (y >= 0) & (y < H) & (x >= 0) & (x < W)
    m = tl.max(s, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp(s - m_safe[:, None])
    vp = v_ptr + (bb * svb + rn * svn + tl.where(lm, y, 0) * svh + tl.where(lm, x, 0) * svw)
    acc = tl.zeros((s.shape[0], CVP), tl.float32)
    for c in range(0, CV):
        vc = tl.load(vp + c * svc, mask=lm, other=0.0).to(tl.float32)
        acc += tl.where(cv[None, :] == c, tl.sum(p * vc, axis=1)[:, None], 0.0)
    return acc, tl.sum(p, axis=1), m


@triton.jit
def store_rows(acc, l, m, thr, out_ptr, lse_ptr, thr_ptr, b, i, j, pix, pm, cv, CV, H, W):
    """The forward's outputs for a block of queries: out = acc / l (0 where nothing was kept), the log-sum-exp
    (0 there: every recomputed p = exp(-inf - 0) = 0 in the backward) and the k-th key. b: scalar or (BQ,)."""
    has = l > 0.0
    out = acc / tl.where(has, l, 1.0)[:, None]
    ob = b * CV * H * W + i * W + j
    tl.store(out_ptr + ob[:, None] + cv[None, :] * H * W, out.to(out_ptr.dtype.element_ty),
             mask=pm[:, None] & (cv[None, :] < CV))
    tl.store(lse_ptr + pix, tl.where(has, m + tl.log(tl.where(has, l, 1.0)), 0.0), mask=pm)
    tl.store(thr_ptr + pix, thr, mask=pm)


@triton.jit
def finish_list(run, col, TOPK, THRESHOLD: tl.constexpr):
    """After the selection sweep: the list sorted (best first; slots past TOPK emptied) and the kept-set bound,
    `key >= bound`: the k-th key for top-k (exactly TOPK kept, ties to the lower index), the k-th key with its
    index bits cleared for the threshold rule (every score >= the k-th score)."""
    run = tl.sort(tl.where(col[None, :] < TOPK, run, NO_KEY), dim=1, descending=True)
    kth = tl.sum(tl.where(col[None, :] == TOPK - 1, run, 0), axis=1)
    if THRESHOLD:
        kth = kth & -4294967296
    return run, kth
