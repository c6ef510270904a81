"""local_attention in Triton: softmax over all candidates, top-k softmax and the threshold rule; forward and backward.

Two kernel families share this file's custom ops: the query-tile kernels of local_attention_tiled.py (the default,
LOCAL_ATTENTION_CONFIG["tiled"]: a tile of queries scores its windows' bounding box by matrix products) and the
per-query kernels below (a block of queries, each gathering its own candidates), which the rest of this docstring
describes; the selection and softmax rules are the same in both (_local_window.py).

Candidates are visited in chunks of KP (a power of two >= topk) of the packed candidate axis c = n*T + t (T
in-window positions per reference, from a small (dy, dx) table, so square and circle windows share the kernels).
`_chunk_scores` computes a chunk's scores for a block of queries; every pass uses it, so the forward's selection and
the backward's recomputation see bit-identical scores.

Selection (topk): each (score, index) is packed into one int64 key that orders by score descending, then index
ascending (the float's bits made monotone in the high word, ~index in the low word). A running list of the k
largest keys takes each chunk's entrants by insertion rounds (_select.insert_entrants) and is sorted once after
the sweep; the k-th key then defines the kept set exactly: `key >= kth` for top-k (exactly k candidates, ties
to the lower index), `key >= kth with its index bits cleared` for threshold (every score >= the k-th score).
Softmax over all candidates keeps everything.

With top-k softmax the list is the kept set: one softmax over its scores and a gather of its values end the
forward. Otherwise forward pass 2 sweeps the window again, folding the kept scores into an online softmax (running
max, sum, Cv accumulator; threshold keeps ties, so its kept set can outgrow the list). The N*P-wide
affinity never exists; per query only the k-long key list and the saved (log-sum-exp, kth key) remain.
Backward (flash-style): p = exp(s - lse) on the kept set, ds = p * (g.v - g.out); dq per query in the program,
dk and dv scattered into fp32 channels-last buffers with atomics, or, for softmax over every candidate without
offsets (MAMP training), gathered per key by a second kernel that visits the queries whose windows hold the key.
Inputs are read through channels-last views (copied once per call when they are not), so a candidate's channel
block is one contiguous load. Gradients of the returned top-k logits add to ds. Element offsets are int32 when
every tensor spans under 2^31 elements, else int64. Offsets are rounded (half away from zero) once on the host
with the reference's rule. The kernels are launched with enable_fp_fusion=False: no FMA contraction, so every pass
rounds a score identically and the kept set of the selection pass is exactly the one the aggregation and the
backward recompute.
Accumulation is fp32; the triton backend takes float32, float16 and bfloat16 (bfloat16 on GPU only).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import _alloc
from .._device import on_input_device
from .._determinism import alert_atomic_backward
from .._precision import check_precision, fp32_dot_precision
from .. import _validate
from ..ops import local_attention as _ops
from . import local_attention_tiled as _tiled
from ..reference.local_attention import round_offsets, window_columns
from ._local_window import NO_KEY as _NO_KEY
from ._local_window import finish_list, kept_list_softmax, store_kept_list, store_rows
from ._local_window import pack as _pack
from ._local_window import unpack_score as _unpack_score
from ._select import MAXKEY, insert_entrants
from ._softmax import online_softmax_step

_MODES = {"all": 0, "topk": 1, "threshold": 2}


# Launch parameters of the compiled kernels (the interpreter ignores them). tile_elements: elements of one (queries,
# candidates, channels) tile a program keeps in registers (32 a thread at 4 warps; each also needs a 64-bit address
# while it is gathered); max_bq: queries per program at most. benchmarks/tune_triton.py sweeps them on a GPU.
# tiled: use the query-tile kernels (local_attention_tiled.py, their own TILED_CONFIG) instead of these.
LOCAL_ATTENTION_CONFIG = {"tile_elements": 4096, "max_bq": 16, "num_warps": 4, "num_stages": 3, "tiled": True}


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _tiles(queries: int, mt: dict) -> tuple[int, int]:
    """(BQ, CB): queries per program and the channel block of the score loop.

    Compiled, the (BQ, KP, CB) key tile and the (BQ, KP, CVP) value tile live in registers, so CB shrinks as the
    candidate chunk KP (the padded topk) grows, and BQ drops below 16 only when even the value tile is too large:
    at KP = 64, CB = 32 the key tile alone would be 256 registers a thread and ptxas takes minutes. Under the
    interpreter one wide block is far cheaper (numpy per op) and registers do not exist."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return min(128, max(16, triton.next_power_of_2(queries))), min(32, max(2, triton.next_power_of_2(mt["C"])))
    kp, cvp = mt["KP"], mt["CVP"]
    tile, max_bq = LOCAL_ATTENTION_CONFIG["tile_elements"], LOCAL_ATTENTION_CONFIG["max_bq"]
    bq = max(1, min(max_bq, _pow2_floor(2 * tile // (kp * cvp))))
    cb = max(2, min(32, triton.next_power_of_2(mt["C"]), _pow2_floor(tile // (bq * kp))))
    return bq, cb


@triton.jit
def _chunk_positions(off_ptr, tab_ptr, cid, b, i, j, NT, T, N, H, W, DIL, HAS_OFF: tl.constexpr,
                     IDX: tl.constexpr):
    """For queries (BQ,) and packed candidates cid (CH,): reference n (CH,), key row/col (BQ, CH), in-frame mask
    (BQ, CH), whether cid is a real candidate (CH,), and the window entry t (CH,)."""
    cvalid = cid < NT
    cc = tl.where(cvalid, cid, 0)
    n = cc // T
    t = cc % T
    dy = tl.load(tab_ptr + 2 * t).to(IDX)
    dx = tl.load(tab_ptr + 2 * t + 1).to(IDX)
    y = i[:, None] + dy[None, :] * DIL
    x = j[:, None] + dx[None, :] * DIL
    if HAS_OFF:
        o = ((b[:, None] * N + n[None, :]) * 2) * H * W + (i * W + j)[:, None]  # contiguous int32 (B, N, 2, H, W)
        x += tl.load(off_ptr + o).to(IDX)
        y += tl.load(off_ptr + o + H * W).to(IDX)
    inside = (y >= 0) & (y < H) & (x >= 0) & (x < W) & cvalid[None, :]
    return n, tl.where(inside, y, 0), tl.where(inside, x, 0), inside, cvalid, t


@triton.jit
def _chunk_scores(q_ptr, k_ptr, qbase, kpix, lm, C, sqc, skc, scale, ZERO_BORDER: tl.constexpr,
                  BQ: tl.constexpr, CH: tl.constexpr, CB: tl.constexpr, inside, cvalid, IDX: tl.constexpr):
    """Scores (BQ, CH) over channel blocks of CB; out-of-frame: 0 (zero border) or -inf; padding columns -inf."""
    s = tl.zeros((BQ, CH), tl.float32)
    for c0 in range(0, C, CB):
        c = c0 + tl.arange(0, CB).to(IDX)
        cm = c < C
        qv = tl.load(q_ptr + qbase[:, None] + c[None, :] * sqc, mask=cm[None, :], other=0.0).to(tl.float32)
        kv = tl.load(k_ptr + kpix[:, :, None] + c[None, None, :] * skc, mask=lm[:, :, None] & cm[None, None, :],
                     other=0.0).to(tl.float32)
        s += tl.sum(qv[:, None, :] * kv, axis=2)
    s = s * scale
    if ZERO_BORDER:
        s = tl.where(inside, s, 0.0)
    else:
        s = tl.where(inside, s, float("-inf"))
    return tl.where(cvalid[None, :], s, float("-inf"))


@triton.jit
def _queries(BQ: tl.constexpr, B, H, W, IDX: tl.constexpr):
    pix = tl.program_id(0).to(IDX) * BQ + tl.arange(0, BQ).to(IDX)
    pm = pix < B * H * W
    pix = tl.where(pm, pix, 0)
    return pix, pm, pix % W, (pix // W) % H, pix // (H * W)


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, off_ptr, tab_ptr, out_ptr, lse_ptr, thr_ptr, lg_ptr, idx_ptr,
                    B, C, CV, H, W, N, T, DIL, P, D, RADIUS, TOPK, scale,
                    sqb, sqc, sqh, sqw, skb, skn, skc, skh, skw, svb, svn, svc, svh, svw,
                    HAS_OFF: tl.constexpr, ZERO_BORDER: tl.constexpr, MODE: tl.constexpr, RET: tl.constexpr,
                    BQ: tl.constexpr, KP: tl.constexpr, CB: tl.constexpr, CVP: tl.constexpr, IDX: tl.constexpr):
    pix, pm, j, i, b = _queries(BQ, B, H, W, IDX)
    NT = N * T
    qbase = b * sqb + i * sqh + j * sqw
    col = tl.arange(0, KP).to(IDX)
    thr = tl.full((BQ,), _NO_KEY, tl.int64)
    if MODE != 0:
        # pass 1: running list of the TOPK largest keys (unsorted; sorted once after the sweep)
        run = tl.where(col[None, :] < TOPK, tl.full((BQ, KP), _NO_KEY, tl.int64), MAXKEY)
        for c0 in range(0, NT, KP):
            cid = c0 + col
            n, y, x, inside, cvalid, t = _chunk_positions(off_ptr, tab_ptr, cid, b, i, j, NT, T, N, H, W, DIL,
                                                          HAS_OFF, IDX)
            lm = inside & pm[:, None]
            kpix = b[:, None] * skb + n[None, :] * skn + y * skh + x * skw
            s = _chunk_scores(q_ptr, k_ptr, qbase, kpix, lm, C, sqc, skc, scale, ZERO_BORDER, BQ, KP, CB,
                              inside, cvalid, IDX)
            key = tl.where(cvalid[None, :], _pack(s, cid[None, :]), _NO_KEY)
            run = insert_entrants(run, key, col, _NO_KEY)
        run, thr = finish_list(run, col, TOPK, MODE == 2)
        if RET:
            store_kept_list(run, col, pix, pm, tab_ptr, lg_ptr, idx_ptr, T, P, D, RADIUS, TOPK)
    cv = tl.arange(0, CVP).to(IDX)
    cvm = cv < CV
    m = tl.full((BQ,), float("-inf"), tl.float32)
    l = tl.zeros((BQ,), tl.float32)
    acc = tl.zeros((BQ, CVP), tl.float32)
    if MODE == 1:
        # top-k softmax: the kept set is the list itself, so one softmax over it and a gather of its values replace
        # a second sweep over the window
        acc, l, m = kept_list_softmax(run, col, b[:, None], i, j, pm, off_ptr, tab_ptr, v_ptr, N, T, H, W, DIL, CV,
                                      TOPK, svb, svn, svc, svh, svw, HAS_OFF, CVP, IDX)
    # pass 2 (softmax over every candidate, or threshold with its ties): online softmax over a second sweep
    if MODE != 1:
        for c0 in range(0, NT, KP):
            cid = c0 + col
            n, y, x, inside, cvalid, t = _chunk_positions(off_ptr, tab_ptr, cid, b, i, j, NT, T, N, H, W, DIL,
                                                          HAS_OFF, IDX)
            lm = inside & pm[:, None]
            kpix = b[:, None] * skb + n[None, :] * skn + y * skh + x * skw
            s = _chunk_scores(q_ptr, k_ptr, qbase, kpix, lm, C, sqc, skc, scale, ZERO_BORDER, BQ, KP, CB, inside,
                              cvalid, IDX)
            if MODE != 0:
                s = tl.where(_pack(s, cid[None, :]) >= thr[:, None], s, float("-inf"))
            m, l, alpha, p = online_softmax_step(m, l, s)
            vpix = b[:, None] * svb + n[None, :] * svn + y * svh + x * svw
            vv = tl.load(v_ptr + vpix[:, :, None] + cv[None, None, :] * svc,
                         mask=lm[:, :, None] & cvm[None, None, :], other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vv, axis=1)
    store_rows(acc, l, m, thr, out_ptr, lse_ptr, thr_ptr, b, i, j, pix, pm, cv, CV, H, W)


@triton.jit
def _backward_kernel(g_ptr, glg_ptr, idx_ptr, q_ptr, k_ptr, v_ptr, off_ptr, tab_ptr, lse_ptr, thr_ptr, dlt_ptr,
                     dq_ptr, dk_ptr, dv_ptr,
                     B, C, CV, H, W, N, T, DIL, P, D, RADIUS, TOPK, scale,
                     sgb, sgc, sgh, sgw, sqb, sqc, sqh, sqw, skb, skn, skc, skh, skw, svb, svn, svc, svh, svw,
                     HAS_OFF: tl.constexpr, ZERO_BORDER: tl.constexpr, MODE: tl.constexpr, HAS_GLG: tl.constexpr,
                     NEED_Q: tl.constexpr, NEED_K: tl.constexpr, NEED_V: tl.constexpr,
                     BQ: tl.constexpr, KP: tl.constexpr, CB: tl.constexpr, CVP: tl.constexpr, IDX: tl.constexpr):
    pix, pm, j, i, b = _queries(BQ, B, H, W, IDX)
    NT = N * T
    qbase = b * sqb + i * sqh + j * sqw
    col = tl.arange(0, KP).to(IDX)
    cv = tl.arange(0, CVP).to(IDX)
    cvm = cv < CV
    g = tl.load(g_ptr + (b * sgb + i * sgh + j * sgw)[:, None] + cv[None, :] * sgc,
                mask=pm[:, None] & cvm[None, :], other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + pix, mask=pm, other=0.0)
    thr = tl.load(thr_ptr + pix, mask=pm, other=0)
    delta = tl.load(dlt_ptr + pix, mask=pm, other=0.0)  # sum_c g * out: the softmax backward's row term
    if HAS_GLG:
        top_idx = tl.load(idx_ptr + pix[:, None] * TOPK + col[None, :], mask=pm[:, None] & (col[None, :] < TOPK),
                          other=-1)
        top_g = tl.load(glg_ptr + pix[:, None] * TOPK + col[None, :], mask=pm[:, None] & (col[None, :] < TOPK),
                        other=0.0).to(tl.float32)
    for c0 in range(0, NT, KP):
        cid = c0 + col
        n, y, x, inside, cvalid, t = _chunk_positions(off_ptr, tab_ptr, cid, b, i, j, NT, T, N, H, W, DIL, HAS_OFF,
                                                      IDX)
        lm = inside & pm[:, None]
        kpix = b[:, None] * skb + n[None, :] * skn + y * skh + x * skw
        s = _chunk_scores(q_ptr, k_ptr, qbase, kpix, lm, C, sqc, skc, scale, ZERO_BORDER, BQ, KP, CB, inside, cvalid,
                          IDX)
        kept = cvalid[None, :] & pm[:, None]
        if MODE != 0:
            kept = kept & (_pack(s, cid[None, :]) >= thr[:, None])
        p = tl.where(kept, tl.exp(s - lse[:, None]), 0.0)
        vpix = b[:, None] * svb + n[None, :] * svn + y * svh + x * svw
        vaddr = vpix[:, :, None] + cv[None, None, :] * svc
        vmask = lm[:, :, None] & cvm[None, None, :]
        vv = tl.load(v_ptr + vaddr, mask=vmask, other=0.0).to(tl.float32)
        ds = p * (tl.sum(g[:, None, :] * vv, axis=2) - delta[:, None])
        if HAS_GLG:
            # gradient of the returned top-k logits: match this chunk's candidates against the saved indices
            dyx = tl.load(tab_ptr + 2 * t).to(tl.int64)
            dxx = tl.load(tab_ptr + 2 * t + 1).to(tl.int64)
            full = n * P + (dyx + RADIUS) * D + (dxx + RADIUS)
            hit = full[None, :, None] == top_idx[:, None, :]
            ds += tl.sum(tl.where(hit, top_g[:, None, :], 0.0), axis=2)
        ds = tl.where(lm, ds, 0.0) * scale  # out-of-frame scores are constants
        if NEED_V:
            # fp32 accumulators are contiguous channels-last (B, N, H, W, C|Cv) / (B, H, W, C)
            vb = (((b[:, None] * N + n[None, :]) * H + y) * W + x) * CV
            tl.atomic_add(dv_ptr + vb[:, :, None] + cv[None, None, :], p[:, :, None] * g[:, None, :],
                          mask=vmask)
        for cc0 in range(0, C, CB):
            c = cc0 + tl.arange(0, CB).to(IDX)
            cm = c < C
            if NEED_Q:
                kv = tl.load(k_ptr + kpix[:, :, None] + c[None, None, :] * skc,
                             mask=lm[:, :, None] & cm[None, None, :], other=0.0).to(tl.float32)
                qa = dq_ptr + (((b * H + i) * W + j) * C)[:, None] + c[None, :]
                qm = pm[:, None] & cm[None, :]
                tl.store(qa, tl.load(qa, mask=qm, other=0.0) + tl.sum(ds[:, :, None] * kv, axis=1), mask=qm)
            if NEED_K:
                qv = tl.load(q_ptr + qbase[:, None] + c[None, :] * sqc, mask=cm[None, :], other=0.0).to(tl.float32)
                kb = (((b[:, None] * N + n[None, :]) * H + y) * W + x) * C
                tl.atomic_add(dk_ptr + kb[:, :, None] + c[None, None, :], ds[:, :, None] * qv[:, None, :],
                              mask=lm[:, :, None] & cm[None, None, :])


@triton.jit
def _backward_kv_kernel(g_ptr, q_ptr, k_ptr, v_ptr, tab_ptr, lse_ptr, dlt_ptr, dk_ptr, dv_ptr,
                        B, C, CV, H, W, N, T, DIL, scale,
                        sgb, sgc, sgh, sgw, sqb, sqc, sqh, sqw, skb, skn, skc, skh, skw, svb, svn, svc, svh, svw,
                        NEED_K: tl.constexpr, NEED_V: tl.constexpr,
                        BQ: tl.constexpr, KP: tl.constexpr, CB: tl.constexpr, CVP: tl.constexpr,
                        IDX: tl.constexpr):
    """dk and dv of softmax over every candidate without offsets, gathered per key instead of scattered per query:
    a program owns BQ key pixels of one (batch, reference) and visits, for each window entry t, the query the entry
    maps onto the key (key - DIL * (dy, dx)_t), recomputing that pair's p and ds from the query's log-sum-exp and
    row term. Every key row is written by one program: no atomics (the query-centric scatter does one atomic per
    (query, candidate, channel))."""
    kid = tl.program_id(0).to(IDX) * BQ + tl.arange(0, BQ).to(IDX)
    km = kid < B * N * H * W
    kid = tl.where(km, kid, 0)
    xk = kid % W
    yk = (kid // W) % H
    n = (kid // (H * W)) % N
    b = kid // (N * H * W)
    kbase = b * skb + n * skn + yk * skh + xk * skw
    col = tl.arange(0, KP).to(IDX)
    cv = tl.arange(0, CVP).to(IDX)
    cvm = cv < CV
    vk = tl.load(v_ptr + (b * svb + n * svn + yk * svh + xk * svw)[:, None] + cv[None, :] * svc,
                 mask=km[:, None] & cvm[None, :], other=0.0).to(tl.float32)
    dv_acc = tl.zeros((BQ, CVP), tl.float32)
    for t0 in range(0, T, KP):
        t = t0 + col
        tvalid = t < T
        tt = tl.where(tvalid, t, 0)
        dy = tl.load(tab_ptr + 2 * tt).to(IDX)
        dx = tl.load(tab_ptr + 2 * tt + 1).to(IDX)
        yq = yk[:, None] - dy[None, :] * DIL
        xq = xk[:, None] - dx[None, :] * DIL
        qin = (yq >= 0) & (yq < H) & (xq >= 0) & (xq < W) & tvalid[None, :] & km[:, None]
        yq = tl.where(qin, yq, 0)
        xq = tl.where(qin, xq, 0)
        qaddr = b[:, None] * sqb + yq * sqh + xq * sqw
        s = tl.zeros((BQ, KP), tl.float32)
        for c0 in range(0, C, CB):
            c = c0 + tl.arange(0, CB).to(IDX)
            cm = c < C
            kv = tl.load(k_ptr + kbase[:, None] + c[None, :] * skc, mask=km[:, None] & cm[None, :],
                         other=0.0).to(tl.float32)
            qv = tl.load(q_ptr + qaddr[:, :, None] + c[None, None, :] * sqc, mask=qin[:, :, None] & cm[None, None, :],
                         other=0.0).to(tl.float32)
            s += tl.sum(qv * kv[:, None, :], axis=2)
        s = s * scale
        qpix = (b[:, None] * H + yq) * W + xq
        lse = tl.load(lse_ptr + qpix, mask=qin, other=0.0)
        delta = tl.load(dlt_ptr + qpix, mask=qin, other=0.0)
        p = tl.where(qin, tl.exp(s - lse), 0.0)
        gq = tl.load(g_ptr + (b[:, None] * sgb + yq * sgh + xq * sgw)[:, :, None] + cv[None, None, :] * sgc,
                     mask=qin[:, :, None] & cvm[None, None, :], other=0.0).to(tl.float32)
        if NEED_V:
            dv_acc += tl.sum(p[:, :, None] * gq, axis=1)
        if NEED_K:
            ds = p * (tl.sum(gq * vk[:, None, :], axis=2) - delta) * scale
            for c0 in range(0, C, CB):
                c = c0 + tl.arange(0, CB).to(IDX)
                cm = c < C
                qv = tl.load(q_ptr + qaddr[:, :, None] + c[None, None, :] * sqc,
                             mask=qin[:, :, None] & cm[None, None, :], other=0.0).to(tl.float32)
                ka = dk_ptr + kid[:, None] * C + c[None, :]  # fp32 channels-last (B, N, H, W, C): this program's rows
                kmask = km[:, None] & cm[None, :]
                tl.store(ka, tl.load(ka, mask=kmask, other=0.0) + tl.sum(ds[:, :, None] * qv, axis=1), mask=kmask)
    if NEED_V:
        tl.store(dv_ptr + kid[:, None] * CV + cv[None, :], dv_acc, mask=km[:, None] & cvm[None, :])


def _index_type(*tensors):
    """tl.int32 for the kernels' element offsets when every tensor they address spans fewer than 2^31 elements
    (the usual case: int64 offsets cost registers, about 60% of the no-top-k forward's spills on sm_90), else
    tl.int64. VOSOPS_TRITON_INT64_INDEX=1 forces int64 (tests run both)."""
    if os.environ.get("VOSOPS_TRITON_INT64_INDEX") == "1":
        return tl.int64
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        if 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) >= 2**31 - 1:
            return tl.int64
    return tl.int32


def _channels_last(x: torch.Tensor, cdim: int) -> torch.Tensor:
    """A view with x's shape whose channel dim `cdim` has stride 1 (copying only when it has not): each candidate's
    channel vector is then one contiguous load, matching the kernels' channel-fastest tiles."""
    if x.stride(cdim) == 1:
        return x
    perm = [d for d in range(x.dim()) if d != cdim] + [cdim]
    inverse = sorted(range(x.dim()), key=perm.__getitem__)
    return x.permute(perm).contiguous().permute(inverse)


def _copy_channels_last(tiled: bool) -> bool:
    """The per-query kernels gather one candidate's channels at a time: they want channel-fastest inputs. The tile
    kernels load (positions, channels) blocks, contiguous along positions in NCHW too, so by default they read the
    inputs as given (no copy: at mamp-480p k alone is 33 MB); TILED_CONFIG["channels_last"] copies anyway."""
    return not tiled or _tiled.TILED_CONFIG["channels_last"]


def _check(q: torch.Tensor) -> None:
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"local_attention: the triton backend takes float32, float16 or bfloat16, got {q.dtype}")


def _check_backward_args(grad_out, grad_logits, out, lse, thr, index, q, k, v, offsets, radius, dilation, scale,
                         topk, normalize, window, border) -> None:
    """The forward's arguments, and the saved tensors as local_attention_triton returns them."""
    _ops.check_attention_args(q, k, v, offsets, radius, dilation, scale, topk or None, normalize, window, border,
                              False)
    _check(q)
    B, _, H, W = q.shape
    rows = (B, v.shape[2], H, W)
    _validate.matches("grad_out", grad_out, rows, q, what="the output's (B, Cv, H, W) = ")
    _validate.matches("out", out, rows, q, what="the forward's (B, Cv, H, W) = ")
    _validate.matches("lse", lse, (B, H, W), q, dtype=torch.float32, what="the forward's (B, H, W) = ")
    _validate.matches("thr", thr, (B, H, W), q, dtype=torch.int64, what="the forward's (B, H, W) = ")
    kept = index.shape[-1] if isinstance(index, torch.Tensor) and index.dim() == 4 else -1
    _validate.matches("index", index, (B, H, W, kept if kept in (0, topk) else topk), q, dtype=torch.int64,
                      what="the forward's (B, H, W, topk or 0) = ")
    if grad_logits is not None:
        _validate.matches("grad_logits", grad_logits, index.shape, q, what="the returned logits' (B, H, W, topk) = ")


_TABLES: dict = {}


def _table(radius: int, window: str, device) -> torch.Tensor:
    """(P, 2) int32 window offsets (dy, dx), cached per device: a host-to-device copy every call would
    synchronise a propagation loop with the host every frame."""
    key = (radius, window, str(device))
    if key not in _TABLES:
        D = 2 * radius + 1
        cols = window_columns(radius, window)
        _TABLES[key] = torch.tensor([[p // D - radius, p % D - radius] for p in cols], dtype=torch.int32,
                                    device=device)
    return _TABLES[key]


def _inverse_table(radius: int, window: str, device) -> torch.Tensor:
    """(P,) int32: the window entry t of column p = (dy+r)*D + (dx+r), -1 outside the window (circles), cached."""
    key = ("inverse", radius, window, str(device))
    if key not in _TABLES:
        inv = [-1] * (2 * radius + 1) ** 2
        for t, p in enumerate(window_columns(radius, window)):
            inv[p] = t
        _TABLES[key] = torch.tensor(inv, dtype=torch.int32, device=device)
    return _TABLES[key]


def _tile_args(q, radius, window, mt, precision) -> dict:
    """Constexprs and the inverse window table of the query-tile kernels."""
    return dict(inv=_inverse_table(radius, window, q.device), SQUARE=window == "square", PREC=precision,
                **_tiled.tiles(mt["C"], mt["CV"]))


def _rounded(offsets, radius, dilation, like):
    if offsets is None:
        return like.new_zeros(1, dtype=torch.int32), False
    return round_offsets(offsets, radius, dilation).to(torch.int32).contiguous(), True


def _meta(q, k, v, radius, window, topk, normalize):
    B, C, H, W = q.shape
    N, CV = k.shape[1], v.shape[2]
    mode = 0 if not topk else (_MODES["topk"] if normalize == "softmax" else _MODES["threshold"])
    return dict(
        B=B, C=C, CV=CV, H=H, W=W, N=N, D=2 * radius + 1, P=(2 * radius + 1) ** 2, mode=mode,
        KP=max(16, triton.next_power_of_2(max(topk, 1))), CVP=max(2, triton.next_power_of_2(CV)),
    )


@torch.library.custom_op("vosops::local_attention_triton", mutates_args=())
@on_input_device
def local_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor | None, radius: int, dilation: int,
    scale: float, topk: int, normalize: str, window: str, border: str, return_topk: bool, tiled: bool,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, lse, kth_key, top_logits, top_index); the last two are (B, H, W, topk) with return_topk, else
    (B, H, W, 0). precision: the query-tile kernels' float32 products (vosops._precision)."""
    _ops.check_attention_args(q, k, v, offsets, radius, dilation, scale, topk or None, normalize, window, border,
                              return_topk)
    _check(q)
    check_precision(precision)
    mt = _meta(q, k, v, radius, window, topk, normalize)
    if _copy_channels_last(tiled):
        q, k, v = _channels_last(q, 1), _channels_last(k, 2), _channels_last(v, 2)
    B, H, W, K = mt["B"], mt["H"], mt["W"], topk if return_topk else 0
    tab = _table(radius, window, q.device)
    off, has_off = _rounded(offsets, radius, dilation, q)
    out = _alloc.empty(B, mt["CV"], H, W, dtype=q.dtype, device=q.device)
    lse = _alloc.empty(B, H, W, dtype=torch.float32, device=q.device)
    thr = _alloc.empty(B, H, W, dtype=torch.int64, device=q.device)
    logits = _alloc.empty(B, H, W, K, dtype=q.dtype, device=q.device)
    index = _alloc.empty(B, H, W, K, dtype=torch.int64, device=q.device)
    idx_type = _index_type(q, k, v, off, out, logits, index)
    if tiled:
        ta = _tile_args(q, radius, window, mt, precision)
        inv = ta.pop("inv")
        _tiled.forward_kernel[_tiled.grid(B, H, W, ta)](
            q, k, v, off, tab, inv, out, lse, thr, logits, index,
            B, mt["C"], mt["CV"], H, W, mt["N"], tab.shape[0], dilation, mt["P"], mt["D"], radius, topk, scale,
            *q.stride(), *k.stride(), *v.stride(),
            HAS_OFF=has_off, ZERO_BORDER=border == "zero", MODE=mt["mode"], RET=bool(K), KP=mt["KP"],
            SORT_MIN=_tiled.TILED_CONFIG["sort_min"], IDX=idx_type,
            enable_fp_fusion=False, **ta, **_tiled.launch_options(),
        )
        return out, lse, thr, logits, index
    bq, cb = _tiles(B * H * W, mt)
    _forward_kernel[(triton.cdiv(B * H * W, bq),)](
        q, k, v, off, tab, out, lse, thr, logits, index,
        B, mt["C"], mt["CV"], H, W, mt["N"], tab.shape[0], dilation, mt["P"], mt["D"], radius, topk, scale,
        *q.stride(), *k.stride(), *v.stride(),
        HAS_OFF=has_off, ZERO_BORDER=border == "zero", MODE=mt["mode"], RET=bool(K),
        BQ=bq, KP=mt["KP"], CB=cb, CVP=mt["CVP"], IDX=idx_type,
        enable_fp_fusion=False, num_warps=LOCAL_ATTENTION_CONFIG["num_warps"],
        num_stages=LOCAL_ATTENTION_CONFIG["num_stages"],
    )
    return out, lse, thr, logits, index


@local_attention_triton.register_fake
def _(q, k, v, offsets, radius, dilation, scale, topk, normalize, window, border, return_topk, tiled, precision):
    B, _, H, W = q.shape
    K = topk if return_topk else 0
    return (q.new_empty(B, v.shape[2], H, W), q.new_empty(B, H, W, dtype=torch.float32),
            q.new_empty(B, H, W, dtype=torch.int64), q.new_empty(B, H, W, K),
            q.new_empty(B, H, W, K, dtype=torch.int64))


@torch.library.custom_op("vosops::local_attention_triton_backward", mutates_args=())
@on_input_device
def local_attention_triton_backward(
    grad_out: torch.Tensor, grad_logits: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor,
    thr: torch.Tensor, index: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    offsets: torch.Tensor | None, radius: int, dilation: int, scale: float, topk: int, normalize: str,
    window: str, border: str, need_q: bool, need_k: bool, need_v: bool, tiled: bool, precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_backward_args(grad_out, grad_logits, out, lse, thr, index, q, k, v, offsets, radius, dilation, scale,
                         topk, normalize, window, border)
    check_precision(precision)
    mt = _meta(q, k, v, radius, window, topk, normalize)
    B, C, CV, H, W, N = mt["B"], mt["C"], mt["CV"], mt["H"], mt["W"], mt["N"]
    dtypes = (q.dtype, k.dtype, v.dtype)
    if _copy_channels_last(tiled):
        q, k, v = _channels_last(q, 1), _channels_last(k, 2), _channels_last(v, 2)
    tab = _table(radius, window, q.device)
    off, has_off = _rounded(offsets, radius, dilation, q)
    delta = (grad_out.float() * out.float()).sum(1).contiguous()
    dq = torch.zeros(B, H, W, C, dtype=torch.float32, device=q.device) if need_q else None
    dk = torch.zeros(B, N, H, W, C, dtype=torch.float32, device=q.device) if need_k else None
    dv = torch.zeros(B, N, H, W, CV, dtype=torch.float32, device=q.device) if need_v else None
    has_glg = grad_logits is not None and index.shape[-1] > 0
    dummy = q.new_empty(1, dtype=torch.float32)
    bq, cb = _tiles(B * H * W, mt)
    idx_type = _index_type(grad_out, grad_logits, index, q, k, v, off, dq, dk, dv)
    launch = dict(enable_fp_fusion=False, num_warps=LOCAL_ATTENTION_CONFIG["num_warps"],
                  num_stages=LOCAL_ATTENTION_CONFIG["num_stages"])
    # Softmax over every candidate without offsets: dk, dv gathered per key (no atomics); else scattered per query.
    gather_kv = mt["mode"] == 0 and not has_off and not has_glg and (need_k or need_v)
    if (need_k or need_v) and not gather_kv:
        alert_atomic_backward("vosops local_attention backward (triton: the gradients of k and v)")
    if tiled and (need_q or ((need_k or need_v) and not gather_kv)):
        # the forward's scores, recomputed by the same tile code: the kept set is the forward's exactly
        ta = _tile_args(q, radius, window, mt, precision)
        inv = ta.pop("inv")
        _tiled.backward_kernel[_tiled.grid(B, H, W, ta)](
            grad_out, grad_logits.contiguous() if has_glg else dummy, index.contiguous() if has_glg else dummy,
            q, k, v, off, inv, lse, thr, delta,
            dq if need_q else dummy, dk if need_k else dummy, dv if need_v else dummy,
            B, C, CV, H, W, N, tab.shape[0], dilation, mt["P"], mt["D"], radius, topk, scale,
            *grad_out.stride(), *q.stride(), *k.stride(), *v.stride(),
            HAS_OFF=has_off, ZERO_BORDER=border == "zero", MODE=mt["mode"], HAS_GLG=has_glg,
            NEED_Q=need_q, NEED_K=need_k and not gather_kv, NEED_V=need_v and not gather_kv, IDX=idx_type,
            enable_fp_fusion=False, **ta, **_tiled.launch_options(),
        )
    elif need_q or ((need_k or need_v) and not gather_kv):
        _backward_kernel[(triton.cdiv(B * H * W, bq),)](
            grad_out, grad_logits.contiguous() if has_glg else dummy, index.contiguous() if has_glg else dummy,
            q, k, v, off, tab, lse, thr, delta,
            dq if need_q else dummy, dk if need_k else dummy, dv if need_v else dummy,
            B, C, CV, H, W, N, tab.shape[0], dilation, mt["P"], mt["D"], radius, topk, scale,
            *grad_out.stride(), *q.stride(), *k.stride(), *v.stride(),
            HAS_OFF=has_off, ZERO_BORDER=border == "zero", MODE=mt["mode"], HAS_GLG=has_glg,
            NEED_Q=need_q, NEED_K=need_k and not gather_kv, NEED_V=need_v and not gather_kv, BQ=bq, KP=mt["KP"],
            CB=cb, CVP=mt["CVP"], IDX=idx_type, **launch,
        )
    if gather_kv and tiled:
        ta = _tile_args(q, radius, window, mt, precision)
        inv = ta.pop("inv")
        _tiled.backward_kv_kernel[(B * N * _tiled.grid(1, H, W, ta)[0],)](
            grad_out, q, k, v, inv, lse, delta, dk if need_k else dummy, dv if need_v else dummy,
            B, C, CV, H, W, N, tab.shape[0], dilation, mt["D"], radius, scale,
            *grad_out.stride(), *q.stride(), *k.stride(), *v.stride(),
            NEED_K=need_k, NEED_V=need_v, IDX=idx_type, enable_fp_fusion=False, **ta, **_tiled.launch_options(),
        )
    elif gather_kv:
        _backward_kv_kernel[(triton.cdiv(B * N * H * W, bq),)](
            grad_out, q, k, v, tab, lse, delta, dk if need_k else dummy, dv if need_v else dummy,
            B, C, CV, H, W, N, tab.shape[0], dilation, scale,
            *grad_out.stride(), *q.stride(), *k.stride(), *v.stride(),
            NEED_K=need_k, NEED_V=need_v, BQ=bq, KP=mt["KP"], CB=cb, CVP=mt["CVP"], IDX=idx_type, **launch,
        )
    # back to (B, [N,] C, H, W), contiguous like the fake kernel's outputs
    dq = dq.permute(0, 3, 1, 2).to(dtypes[0]).contiguous() if need_q else q.new_empty(0)
    dk = dk.permute(0, 1, 4, 2, 3).to(dtypes[1]).contiguous() if need_k else k.new_empty(0)
    dv = dv.permute(0, 1, 4, 2, 3).to(dtypes[2]).contiguous() if need_v else v.new_empty(0)
    return dq, dk, dv


@local_attention_triton_backward.register_fake
def _(grad_out, grad_logits, out, lse, thr, index, q, k, v, offsets, radius, dilation, scale, topk, normalize,
      window, border, need_q, need_k, need_v, tiled, precision):
    return (q.new_empty(q.shape) if need_q else q.new_empty(0), k.new_empty(k.shape) if need_k else k.new_empty(0),
            v.new_empty(v.shape) if need_v else v.new_empty(0))


def _setup_context(ctx, inputs, output):
    q, k, v, offsets, radius, dilation, scale, topk, normalize, window, border, return_topk, tiled, precision = inputs
    out, lse, thr, _, index = output
    ctx.save_for_backward(q, k, v, offsets, out, lse, thr, index)
    ctx.args = (radius, dilation, scale, topk, normalize, window, border)
    # the forward's kernel family and product precision: thr and the kept set are theirs, so the backward must match
    ctx.tiled, ctx.precision = tiled, precision


def _backward(ctx, grad_out, _grad_lse, _grad_thr, grad_logits, _grad_index):
    q, k, v, offsets, out, lse, thr, index = ctx.saved_tensors
    need = ctx.needs_input_grad
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = local_attention_triton_backward(grad_out, grad_logits, out, lse, thr, index, q, k, v, offsets,
                                                 *ctx.args, need[0], need[1], need[2], ctx.tiled, ctx.precision)
    return ((dq if need[0] else None), (dk if need[1] else None), (dv if need[2] else None)) + (None,) * 11


local_attention_triton.register_autograd(_backward, setup_context=_setup_context)


def local_attention(q, k, v, offsets, radius, dilation, scale, topk, normalize, window, border, return_topk):
    """(out, top_logits, top_index) through the custom op."""
    # the kernel family and the product precision are read once here and handed to the forward and, through the
    # autograd context, the backward: a config or TF32 switch changed in between (a tuning thread) cannot pair one
    # family's or precision's saved state with the other
    out, _, _, logits, index = local_attention_triton(q, k, v, offsets, radius, dilation, scale, topk, normalize,
                                                      window, border, return_topk, LOCAL_ATTENTION_CONFIG["tiled"],
                                                      fp32_dot_precision())
    return out, logits, index
