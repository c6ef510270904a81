"""local_attention in Triton, query-tile form: the scores of a tile of queries against the keys of their windows are
matrix products (`tl.dot`), not one gathered dot product per (query, candidate).

A program owns a TH x TW tile of query pixels of one frame. For each reference n it walks the bounding box of the
tile's windows (the "halo": (TH + 2rd) x (TW + 2rd) positions without offsets, larger where the tile's offsets
spread) in chunks of KW positions; a chunk's keys are loaded once, as a (KW, C) block, for every query of the tile,
and S = Q K^T gives the (TH*TW, KW) scores. Each (query, position) pair is then mapped back to the query's window:
(dy, dx) = (position - centre) / dilation, a candidate when it is on the dilation grid, inside the radius and (circle
windows) in the window table, with the candidate index n*T + t of the per-query kernels. From there the selection
(packed keys, running list, insertion rounds), the kept-set rules and the online softmax are those of
local_attention.py, so both kernel families return the same results up to the order of the score sums.

Compared with the per-query kernels, a key is read once per tile instead of once per query whose window holds it
(the halo at r=12 and a 4 x 8 tile: 896 positions shared by 32 queries, against 32 x 625 gathers), and the dot
products run as block matrix products (fp32: exact products, input_precision="ieee", unless PyTorch allows TF32
for float32 matmuls, vosops._precision; fp16/bf16: tensor cores; fp32 accumulation). Every product of a call, the
probability-value products included, takes the call's one precision PREC. The price is the halo positions outside
a query's window, scored and discarded: ~1.4x at r=12, less at larger radii, more when offsets spread the windows
apart (random offsets in [-16, 16], the mamp-480p benchmark, make the box about 60 x 64 for a 4 x 8 tile).

The backward recomputes each chunk's scores with the same function and tile shapes, so the kept set it derives
(key >= the saved k-th key) is the forward's bit for bit; dq is accumulated per tile (its rows are the program's
own), dk and dv are the tile's (KW, C) products added into fp32 buffers with atomics, one per (halo position,
channel) per tile rather than per (query, candidate, channel). Softmax over every candidate without offsets (MAMP
training) takes dk and dv from backward_kv_kernel instead: key-major tiles over the box of queries that see them,
no atomics.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from ._local_window import NO_KEY, finish_list, kept_list_softmax, pack, store_kept_list, store_rows
from ._select import MAXKEY, insert_entrants, merge_tile
from ._softmax import online_softmax_step

# Launch parameters of the query-tile kernels: the tile of queries (tile_h * tile_w >= 16, a power of two), the
# halo positions per chunk, the channel block of the score products. benchmarks/tune_triton.py sweeps them.
# interpret_block_k: the chunk under TRITON_INTERPRET=1, where a program's cost is its number of numpy calls.
# sort_min: see _select.merge_tile (used when the chunk is as wide as the top-k list). channels_last: copy q, k, v
# channel-fastest first (local_attention._copy_channels_last).
TILED_CONFIG = {"tile_h": 4, "tile_w": 8, "block_k": 64, "block_c": 32, "num_warps": 8, "num_stages": 2,
                "sort_min": 8, "channels_last": False, "interpret_block_k": 256}


def tiles(C: int, CV: int) -> dict:
    """Constexprs of the tile kernels for C key channels and CV value channels."""
    cfg = TILED_CONFIG
    th, tw, kw = cfg["tile_h"], cfg["tile_w"], cfg["block_k"]
    if os.environ.get("TRITON_INTERPRET") == "1":
        kw = cfg["interpret_block_k"]
    if th * tw < 16 or th * tw & (th * tw - 1) or kw < 16 or kw & (kw - 1):
        raise ValueError(f"local_attention: TILED_CONFIG needs tile_h * tile_w and block_k powers of two >= 16, "
                         f"got {cfg}")
    return dict(TH=th, TW=tw, KW=kw, CB=max(16, min(cfg["block_c"], triton.next_power_of_2(C))),
                CVQ=max(16, triton.next_power_of_2(CV)))


def grid(B: int, H: int, W: int, t: dict) -> tuple[int]:
    return (B * triton.cdiv(H, t["TH"]) * triton.cdiv(W, t["TW"]),)


def launch_options() -> dict:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return {}
    return dict(num_warps=TILED_CONFIG["num_warps"], num_stages=TILED_CONFIG["num_stages"])


@triton.jit
def _tile(H, W, TH: tl.constexpr, TW: tl.constexpr, IDX: tl.constexpr):
    """This program's TH x TW tile of an H x W frame, programs ordered frame by frame: the frame index (one
    scalar: a tile never spans two frames), the tile's pixels' rows and columns (TH * TW,; clamped to 0 outside
    the frame), their in-frame mask, and the tile's top-left corner."""
    tiles_x = tl.cdiv(W, TW)
    tiles_y = tl.cdiv(H, TH)
    pid = tl.program_id(0).to(IDX)
    frame = pid // (tiles_x * tiles_y)
    rest = pid % (tiles_x * tiles_y)
    row0 = (rest // tiles_x) * TH
    col0 = (rest % tiles_x) * TW
    a = tl.arange(0, TH * TW).to(IDX)
    i = row0 + a // TW
    j = col0 + a % TW
    inside = (i < H) & (j < W)
    return frame, tl.where(inside, i, 0), tl.where(inside, j, 0), inside, row0, col0


@triton.jit
def _tile_queries(H, W, TH: tl.constexpr, TW: tl.constexpr, IDX: tl.constexpr):
    """This program's TH x TW queries: flat pixel index (BQ,), in-frame mask, column, row, and the batch index."""
    b, i, j, pm, _, _ = _tile(H, W, TH, TW, IDX)
    return (b * H + i) * W + j, pm, j, i, b


@triton.jit
def _window_box(off_ptr, b, n, i, j, pm, N, H, W, RD, HAS_OFF: tl.constexpr, IDX: tl.constexpr):
    """Window centres (BQ,) of the tile's queries in reference n (pixel + rounded offset) and the bounding box of
    their windows: top row, left column, rows, columns. Offsets are clamped on the host (round_offsets), so the box
    is bounded even when an offset points far out of the frame."""
    if HAS_OFF:
        o = ((b * N + n) * 2) * H * W + i * W + j
        cx = j + tl.load(off_ptr + o, mask=pm, other=0).to(IDX)
        cy = i + tl.load(off_ptr + o + H * W, mask=pm, other=0).to(IDX)
    else:
        cx = j
        cy = i
    y0 = tl.min(tl.where(pm, cy, 1 << 30)) - RD
    x0 = tl.min(tl.where(pm, cx, 1 << 30)) - RD
    rows = tl.max(tl.where(pm, cy, -(1 << 30))) + RD - y0 + 1
    cols = tl.max(tl.where(pm, cx, -(1 << 30))) + RD - x0 + 1
    return cy, cx, y0, x0, rows, cols


@triton.jit
def _row_products(a_ptr, abase, am, sac, b_ptr, bbase, bm, sbc, C, CB: tl.constexpr, PREC: tl.constexpr,
                  IDX: tl.constexpr):
    """(len(abase), len(bbase)) fp32 dot products over C channels of the rows at a_ptr + abase and b_ptr + bbase
    (channel strides sac, sbc; masked rows read as 0), CB channels per tl.dot."""
    s = tl.zeros((abase.shape[0], bbase.shape[0]), tl.float32)
    for c0 in range(0, C, CB):
        c = c0 + tl.arange(0, CB).to(IDX)
        cm = c < C
        av = tl.load(a_ptr + abase[:, None] + c[None, :] * sac, mask=am[:, None] & cm[None, :], other=0.0)
        bv = tl.load(b_ptr + bbase[:, None] + c[None, :] * sbc, mask=bm[:, None] & cm[None, :], other=0.0)
        s = tl.dot(av, tl.trans(bv), acc=s, input_precision=PREC)
    return s


@triton.jit
def _window_entry(dy, dx, valid, inv_ptr, DIL, RADIUS, D, SQUARE: tl.constexpr):
    """For key - window centre (dy, dx) in pixels: whether the key is a window entry (valid, on the dilation grid,
    inside the radius, and for circles in the window table), its column p = (dy+r)*D + (dx+r) (0 if not) and its
    entry t in the window table."""
    # divisibility first: then // is exact whatever the rounding convention of negative quotients
    on_grid = (dy % DIL == 0) & (dx % DIL == 0)
    dy = dy // DIL
    dx = dx // DIL
    inwin = valid & on_grid & (dy >= -RADIUS) & (dy <= RADIUS) & (dx >= -RADIUS) & (dx <= RADIUS)
    p = tl.where(inwin, (dy + RADIUS) * D + (dx + RADIUS), 0)
    t = p
    cand = inwin
    if not SQUARE:  # circle: the window table's inverse, -1 outside the circle
        t = tl.load(inv_ptr + p, mask=inwin, other=-1).to(p.dtype)
        cand = inwin & (t >= 0)
    return cand, p, t


@triton.jit
def _halo_scores(q_ptr, k_ptr, inv_ptr, qbase, pm, cy, cx, b, n, y0, x0, cols, npos, h0, C, H, W, T, DIL, RADIUS,
                 D, scale, sqc, skb, skn, skc, skh, skw, ZERO_BORDER: tl.constexpr, SQUARE: tl.constexpr,
                 KW: tl.constexpr, CB: tl.constexpr, PREC: tl.constexpr, IDX: tl.constexpr):
    """Scores (BQ, KW) of the tile's queries against halo positions [h0, h0 + KW) of reference n, with the
    candidate mask, the candidate index n*T + t, the window column p = (dy+r)*D + (dx+r), the positions' in-frame
    mask (KW,) and their rows and columns. Non-candidates score -inf; out-of-frame candidates 0 (zero border) or
    -inf. Every pass (forward selection, forward aggregation, backward) calls this with the same tile shapes:
    the scores are bit-identical across them."""
    hp = h0 + tl.arange(0, KW).to(IDX)
    hvalid = hp < npos
    hy = y0 + hp // cols
    hx = x0 + hp % cols
    inside = hvalid & (hy >= 0) & (hy < H) & (hx >= 0) & (hx < W)
    kaddr = b * skb + n * skn + tl.where(inside, hy, 0) * skh + tl.where(inside, hx, 0) * skw
    s = _row_products(q_ptr, qbase, pm, sqc, k_ptr, kaddr, inside, skc, C, CB, PREC, IDX) * scale
    cand, p, t = _window_entry(hy[None, :] - cy[:, None], hx[None, :] - cx[:, None], pm[:, None] & hvalid[None, :],
                               inv_ptr, DIL, RADIUS, D, SQUARE)
    if ZERO_BORDER:
        s = tl.where(inside[None, :], s, 0.0)
    else:
        s = tl.where(inside[None, :], s, float("-inf"))
    s = tl.where(cand, s, float("-inf"))
    cid = n * T + tl.where(cand, t, 0)
    return s, cand, cid, p, inside, hy, hx


@triton.jit
def forward_kernel(q_ptr, k_ptr, v_ptr, off_ptr, tab_ptr, inv_ptr, out_ptr, lse_ptr, thr_ptr, lg_ptr, idx_ptr,
                   B, C, CV, H, W, N, T, DIL, P, D, RADIUS, TOPK, scale,
                   sqb, sqc, sqh, sqw, skb, skn, skc, skh, skw, svb, svn, svc, svh, svw,
                   HAS_OFF: tl.constexpr, ZERO_BORDER: tl.constexpr, MODE: tl.constexpr, RET: tl.constexpr,
                   SQUARE: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, KW: tl.constexpr, KP: tl.constexpr,
                   CB: tl.constexpr, CVQ: tl.constexpr, PREC: tl.constexpr, SORT_MIN: tl.constexpr,
                   IDX: tl.constexpr):
    """Outputs as local_attention.py's _forward_kernel (out, lse, k-th key, optional kept list)."""
    BQ: tl.constexpr = TH * TW
    pix, pm, j, i, b = _tile_queries(H, W, TH, TW, IDX)
    qbase = b * sqb + i * sqh + j * sqw
    col = tl.arange(0, KP).to(IDX)
    RD = RADIUS * DIL
    thr = tl.full((BQ,), NO_KEY, tl.int64)
    if MODE != 0:
        # pass 1: running list of the TOPK largest keys (unsorted; sorted once after the sweep)
        run = tl.where(col[None, :] < TOPK, tl.full((BQ, KP), NO_KEY, tl.int64), MAXKEY)
        for n in range(0, N):
            cy, cx, y0, x0, rows, cols = _window_box(off_ptr, b, n, i, j, pm, N, H, W, RD, HAS_OFF, IDX)
            for h0 in range(0, rows * cols, KW):
                s, cand, cid, _p, _in, _y, _x = _halo_scores(
                    q_ptr, k_ptr, inv_ptr, qbase, pm, cy, cx, b, n, y0, x0, cols, rows * cols, h0, C, H, W, T, DIL,
                    RADIUS, D, scale, sqc, skb, skn, skc, skh, skw, ZERO_BORDER, SQUARE, KW, CB, PREC, IDX)
                keys = tl.where(cand, pack(s, cid), NO_KEY)
                if KP == KW:  # a chunk with many entrants (a list's first chunks) merges by one sort
                    run = merge_tile(run, keys, col, TOPK, NO_KEY, SORT_MIN)
                else:
                    run = insert_entrants(run, keys, col, NO_KEY)
        run, thr = finish_list(run, col, TOPK, MODE == 2)
        if RET:
            store_kept_list(run, col, pix, pm, tab_ptr, lg_ptr, idx_ptr, T, P, D, RADIUS, TOPK)
    cv = tl.arange(0, CVQ).to(IDX)
    cvm = cv < CV
    m = tl.full((BQ,), float("-inf"), tl.float32)
    l = tl.zeros((BQ,), tl.float32)
    acc = tl.zeros((BQ, CVQ), tl.float32)
    if MODE == 1:
        acc, l, m = kept_list_softmax(run, col, b, i, j, pm, off_ptr, tab_ptr, v_ptr, N, T, H, W, DIL, CV, TOPK,
                                      svb, svn, svc, svh, svw, HAS_OFF, CVQ, IDX)
    else:
        # softmax over every candidate, or threshold with its ties: online softmax over a second sweep, the
        # values of a chunk summed by one (BQ, KW) x (KW, CVQ) product
        for n in range(0, N):
            cy, cx, y0, x0, rows, cols = _window_box(off_ptr, b, n, i, j, pm, N, H, W, RD, HAS_OFF, IDX)
            for h0 in range(0, rows * cols, KW):
                s, cand, cid, _p, inside, hy, hx = _halo_scores(
                    q_ptr, k_ptr, inv_ptr, qbase, pm, cy, cx, b, n, y0, x0, cols, rows * cols, h0, C, H, W, T, DIL,
                    RADIUS, D, scale, sqc, skb, skn, skc, skh, skw, ZERO_BORDER, SQUARE, KW, CB, PREC, IDX)
                if MODE != 0:
                    s = tl.where(cand & (pack(s, cid) >= thr[:, None]), s, float("-inf"))
                m, l, alpha, p = online_softmax_step(m, l, s)
                vaddr = b * svb + n * svn + tl.where(inside, hy, 0) * svh + tl.where(inside, hx, 0) * svw
                vt = tl.load(v_ptr + vaddr[:, None] + cv[None, :] * svc, mask=inside[:, None] & cvm[None, :],
                             other=0.0).to(tl.float32)
                acc = tl.dot(p, vt, acc=acc * alpha[:, None], input_precision=PREC)
    store_rows(acc, l, m, thr, out_ptr, lse_ptr, thr_ptr, b, i, j, pix, pm, cv, CV, H, W)


@triton.jit
def backward_kernel(g_ptr, glg_ptr, idx_ptr, q_ptr, k_ptr, v_ptr, off_ptr, inv_ptr, lse_ptr, thr_ptr, dlt_ptr,
                    dq_ptr, dk_ptr, dv_ptr,
                    B, C, CV, H, W, N, T, DIL, P, D, RADIUS, TOPK, scale,
                    sgb, sgc, sgh, sgw, sqb, sqc, sqh, sqw, skb, skn, skc, skh, skw, svb, svn, svc, svh, svw,
                    HAS_OFF: tl.constexpr, ZERO_BORDER: tl.constexpr, MODE: tl.constexpr, HAS_GLG: tl.constexpr,
                    NEED_Q: tl.constexpr, NEED_K: tl.constexpr, NEED_V: tl.constexpr, SQUARE: tl.constexpr,
                    TH: tl.constexpr, TW: tl.constexpr, KW: tl.constexpr, CB: tl.constexpr, CVQ: tl.constexpr,
                    PREC: tl.constexpr, IDX: tl.constexpr):
    """p = exp(s - lse) on the kept set, ds = p * (g.v - g.out) (+ the returned logits' gradient); dq into the
    program's own fp32 rows (B, H, W, C), dk and dv added with atomics into fp32 (B, N, H, W, C|Cv)."""
    pix, pm, j, i, b = _tile_queries(H, W, TH, TW, IDX)
    qbase = b * sqb + i * sqh + j * sqw
    RD = RADIUS * DIL
    cv = tl.arange(0, CVQ).to(IDX)
    cvm = cv < CV
    g = tl.load(g_ptr + (b * sgb + i * sgh + j * sgw)[:, None] + cv[None, :] * sgc,
                mask=pm[:, None] & cvm[None, :], other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + pix, mask=pm, other=0.0)
    thr = tl.load(thr_ptr + pix, mask=pm, other=0)
    delta = tl.load(dlt_ptr + pix, mask=pm, other=0.0)  # sum_c g * out: the softmax backward's row term
    for n in range(0, N):
        cy, cx, y0, x0, rows, cols = _window_box(off_ptr, b, n, i, j, pm, N, H, W, RD, HAS_OFF, IDX)
        for h0 in range(0, rows * cols, KW):
            s, cand, cid, wp, inside, hy, hx = _halo_scores(
                q_ptr, k_ptr, inv_ptr, qbase, pm, cy, cx, b, n, y0, x0, cols, rows * cols, h0, C, H, W, T, DIL,
                RADIUS, D, scale, sqc, skb, skn, skc, skh, skw, ZERO_BORDER, SQUARE, KW, CB, PREC, IDX)
            kept = cand
            if MODE != 0:
                kept = kept & (pack(s, cid) >= thr[:, None])
            p = tl.where(kept, tl.exp(s - lse[:, None]), 0.0)
            yy = tl.where(inside, hy, 0)
            xx = tl.where(inside, hx, 0)
            vt = tl.load(v_ptr + (b * svb + n * svn + yy * svh + xx * svw)[:, None] + cv[None, :] * svc,
                         mask=inside[:, None] & cvm[None, :], other=0.0).to(tl.float32)
            ds = p * (tl.dot(g, tl.trans(vt), input_precision=PREC) - delta[:, None])
            if HAS_GLG:
                # gradient of the returned top-k logits: each saved index adds its gradient to its candidate
                full = n * P + wp
                for jj in range(0, TOPK):
                    top_idx = tl.load(idx_ptr + pix * TOPK + jj, mask=pm, other=-1)
                    top_g = tl.load(glg_ptr + pix * TOPK + jj, mask=pm, other=0.0).to(tl.float32)
                    ds += tl.where(cand & (full == top_idx[:, None]), top_g[:, None], 0.0)
            ds = tl.where(cand & inside[None, :], ds, 0.0) * scale  # out-of-frame scores are constants
            pos = ((b * N + n) * H + yy) * W + xx  # fp32 channels-last accumulators (B, N, H, W, C|Cv)
            if NEED_V:
                tl.atomic_add(dv_ptr + (pos * CV)[:, None] + cv[None, :],
                              tl.dot(tl.trans(p), g, input_precision=PREC), mask=inside[:, None] & cvm[None, :])
            for c0 in range(0, C, CB):
                c = c0 + tl.arange(0, CB).to(IDX)
                cm = c < C
                if NEED_Q:
                    kv = tl.load(k_ptr + (b * skb + n * skn + yy * skh + xx * skw)[:, None] + c[None, :] * skc,
                                 mask=inside[:, None] & cm[None, :], other=0.0).to(tl.float32)
                    qa = dq_ptr + (pix * C)[:, None] + c[None, :]
                    qm = pm[:, None] & cm[None, :]
                    tl.store(qa, tl.load(qa, mask=qm, other=0.0) + tl.dot(ds, kv, input_precision=PREC), mask=qm)
                if NEED_K:
                    qv = tl.load(q_ptr + qbase[:, None] + c[None, :] * sqc, mask=pm[:, None] & cm[None, :],
                                 other=0.0).to(tl.float32)
                    tl.atomic_add(dk_ptr + (pos * C)[:, None] + c[None, :],
                                  tl.dot(tl.trans(ds), qv, input_precision=PREC),
                                  mask=inside[:, None] & cm[None, :])


@triton.jit
def backward_kv_kernel(g_ptr, q_ptr, k_ptr, v_ptr, inv_ptr, lse_ptr, dlt_ptr, dk_ptr, dv_ptr,
                       B, C, CV, H, W, N, T, DIL, D, RADIUS, scale,
                       sgb, sgc, sgh, sgw, sqb, sqc, sqh, sqw, skb, skn, skc, skh, skw, svb, svn, svc, svh, svw,
                       NEED_K: tl.constexpr, NEED_V: tl.constexpr, SQUARE: tl.constexpr,
                       TH: tl.constexpr, TW: tl.constexpr, KW: tl.constexpr, CB: tl.constexpr, CVQ: tl.constexpr,
                       PREC: tl.constexpr, IDX: tl.constexpr):
    """dk and dv of softmax over every candidate without offsets, key-major: a program owns a TH x TW tile of key
    pixels of one (batch, reference) and walks the box of queries whose windows hold them (the tile +- r*d,
    clipped to the frame) in chunks of KW, scoring S^T = K Q^T by tl.dot; dv += P G, dk += dS Q. Every key row
    is written by its program only: no atomics, deterministic. (The scores are summed in another order than the
    forward's: harmless here, where no selection depends on them.)"""
    bn, ky, kx, km, ty, tx = _tile(H, W, TH, TW, IDX)  # frame bn = b * N + n
    b = bn // N
    n = bn % N
    kbase = b * skb + n * skn + ky * skh + kx * skw
    RD = RADIUS * DIL
    y0 = tl.maximum(ty - RD, 0)
    x0 = tl.maximum(tx - RD, 0)
    rows = tl.minimum(ty + TH - 1 + RD, H - 1) - y0 + 1
    cols = tl.minimum(tx + TW - 1 + RD, W - 1) - x0 + 1
    cv = tl.arange(0, CVQ).to(IDX)
    cvm = cv < CV
    vk = tl.load(v_ptr + (b * svb + n * svn + ky * svh + kx * svw)[:, None] + cv[None, :] * svc,
                 mask=km[:, None] & cvm[None, :], other=0.0).to(tl.float32)
    dv_acc = tl.zeros((TH * TW, CVQ), tl.float32)
    for h0 in range(0, rows * cols, KW):
        hp = h0 + tl.arange(0, KW).to(IDX)
        qin = hp < rows * cols
        qy = tl.where(qin, y0 + hp // cols, 0)
        qx = tl.where(qin, x0 + hp % cols, 0)
        qbase = b * sqb + qy * sqh + qx * sqw
        s = _row_products(k_ptr, kbase, km, skc, q_ptr, qbase, qin, sqc, C, CB, PREC, IDX) * scale
        # key = query + DIL * (dy, dx): the key's entry in the query's window
        cand, _p, _t = _window_entry(ky[:, None] - qy[None, :], kx[:, None] - qx[None, :], km[:, None] & qin[None, :],
                                     inv_ptr, DIL, RADIUS, D, SQUARE)
        qpix = (b * H + qy) * W + qx
        lse = tl.load(lse_ptr + qpix, mask=qin, other=0.0)
        p = tl.where(cand, tl.exp(s - lse[None, :]), 0.0)
        gq = tl.load(g_ptr + (b * sgb + qy * sgh + qx * sgw)[:, None] + cv[None, :] * sgc,
                     mask=qin[:, None] & cvm[None, :], other=0.0).to(tl.float32)
        if NEED_V:
            dv_acc = tl.dot(p, gq, acc=dv_acc, input_precision=PREC)
        if NEED_K:
            delta = tl.load(dlt_ptr + qpix, mask=qin, other=0.0)
            ds = p * (tl.dot(vk, tl.trans(gq), input_precision=PREC) - delta[None, :]) * scale
            for c0 in range(0, C, CB):
                c = c0 + tl.arange(0, CB).to(IDX)
                cm = c < C
                qv = tl.load(q_ptr + qbase[:, None] + c[None, :] * sqc, mask=qin[:, None] & cm[None, :],
                             other=0.0).to(tl.float32)
                ka = dk_ptr + (((bn * H + ky) * W + kx) * C)[:, None] + c[None, :]  # this program's rows
                kmask = km[:, None] & cm[None, :]
                tl.store(ka, tl.load(ka, mask=kmask, other=0.0) + tl.dot(ds, qv, input_precision=PREC),
                         mask=kmask)
    if NEED_V:
        tl.store(dv_ptr + (((bn * H + ky) * W + kx) * CV)[:, None] + cv[None, :], dv_acc,
                 mask=km[:, None] & cvm[None, :])
