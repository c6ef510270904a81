"""Reference local-window affinity, aggregation and attention: explicit gathers, readable, float64-capable.

Candidate (n, dy, dx) of query pixel (i, j) is reference frame n at
    (i + round(offset_y[n, i, j]) + d*dy,  j + round(offset_x[n, i, j]) + d*dx),   |dy|, |dx| <= r,
with offsets rounded half away from zero. "square" windows keep all P = (2r+1)^2 of them, "circle" windows the
ones with dy^2 + dx^2 < r^2. Candidate index n*P + (dy+r)(2r+1) + (dx+r) (the F.unfold order). A non-finite
offset puts every candidate of that reference out of frame. Out-of-frame candidates: border="zero" gives logit 0
and value 0, border="mask" excludes them (logit -inf).

Everything is computed in chunks of query rows, and per reference and block of window positions, so memory
stays bounded; every step is differentiable by autograd
in q, k, v (offsets only choose positions and are not differentiated).
"""

from __future__ import annotations

import torch

from ._dtypes import compute_dtype

# Elements of the largest block the reference materialises at once: a row chunk's (B, N, candidates, rows, W)
# logits, or one reference's gathered (B, C, candidate block, rows, W) keys or values.
_CHUNK_ELEMS = 1 << 24


def offset_limit(H: int, W: int, radius: int, dilation: int) -> int:
    """Offsets are clamped to +-L: beyond it every candidate is out of frame anyway, and it fits int32."""
    return H + W + dilation * radius + 1


def round_offsets(offsets: torch.Tensor, radius: int = 0, dilation: int = 1) -> torch.Tensor:
    """(..., H, W) float -> int64, rounded half away from zero (exactly, with no `x + 0.5` rounding error);
    non-finite or huge offsets are clamped to +-offset_limit, which is out of every frame."""
    H, W = offsets.shape[-2:]
    L = float(offset_limit(H, W, radius, dilation))
    o = torch.nan_to_num(offsets.detach().double(), nan=L, posinf=L, neginf=-L).clamp(-L, L)
    a = o.abs()
    f = a.floor()
    r = f + (a - f >= 0.5).to(a.dtype)
    return torch.where(o < 0, -r, r).long()


def window_columns(radius: int, window: str) -> list[int]:
    """In-window columns p = (dy+r)(2r+1) + (dx+r) of one reference's window, ascending."""
    D = 2 * radius + 1
    cols = []
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if window == "square" or dy * dy + dx * dx < radius * radius:
                cols.append((dy + radius) * D + (dx + radius))
    return cols


def _positions(B, N, H, W, rows, radius, dilation, cols, offsets, device):
    """Flat key position (clamped into the frame) and in-frame mask of every candidate of the query rows `rows`.

    Returns (flat, inside), each (B, N, len(cols), h, W)."""
    D = 2 * radius + 1
    cols_t = torch.tensor(cols, dtype=torch.long, device=device)
    dy = (cols_t // D - radius).view(1, 1, -1, 1, 1) * dilation
    dx = (cols_t % D - radius).view(1, 1, -1, 1, 1) * dilation
    ii = rows.view(1, 1, 1, -1, 1)
    jj = torch.arange(W, device=device).view(1, 1, 1, 1, W)
    if offsets is None:
        oy = ox = torch.zeros(1, 1, 1, 1, 1, dtype=torch.long, device=device)
    else:
        rounded = round_offsets(offsets, radius, dilation)[:, :, :, rows]  # (B, N, 2, h, W): 0 = dx, 1 = dy
        ox, oy = rounded[:, :, 0].unsqueeze(2), rounded[:, :, 1].unsqueeze(2)
    y = ii + oy + dy
    x = jj + ox + dx
    inside = (y >= 0) & (y < H) & (x >= 0) & (x < W)
    flat = y.clamp(0, H - 1) * W + x.clamp(0, W - 1)
    shape = (B, N, len(cols), rows.numel(), W)
    return flat.expand(shape), inside.expand(shape)


def _gather(x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """x (B, N, C, H, W) at flat positions (B, N, Q, h, W) -> (B, N, C, Q, h, W)."""
    B, N, C, H, W = x.shape
    idx = flat.reshape(B, N, 1, -1).expand(B, N, C, flat[0, 0].numel())
    return torch.gather(x.reshape(B, N, C, H * W), 3, idx).view(B, N, C, *flat.shape[2:])


def _row_chunks(H: int, per_row: int):
    step = max(1, _CHUNK_ELEMS // max(1, per_row))
    for i0 in range(0, H, step):
        yield i0, min(H, i0 + step)


def _col_chunks(Q: int, per_col: int):
    """Blocks of window columns so one gathered (B, C, block, h, W) tensor stays within _CHUNK_ELEMS."""
    step = max(1, _CHUNK_ELEMS // max(1, per_col))
    for t0 in range(0, Q, step):
        yield t0, min(Q, t0 + step)


def _chunk_logits(q, k, rows, radius, dilation, cols, offsets, scale, border):
    """Logits (B, N, Q, h, W) of the in-window candidates of rows `rows`, plus positions and in-frame mask."""
    B, N, C, H, W = k.shape
    flat, inside = _positions(B, N, H, W, rows, radius, dilation, cols, offsets, q.device)
    qr = q[:, :, rows].unsqueeze(2)  # (B, C, 1, h, W)
    per_ref = []
    for n in range(N):
        blocks = []
        for t0, t1 in _col_chunks(len(cols), B * C * flat[0, 0, 0].numel()):
            keys = _gather(k[:, n : n + 1], flat[:, n : n + 1, t0:t1])[:, 0]  # (B, C, t, h, W)
            blocks.append((qr * keys).sum(1))
        per_ref.append(torch.cat(blocks, dim=1))
    score = torch.stack(per_ref, dim=1) * scale
    fill = 0.0 if border == "zero" else float("-inf")
    logits = torch.where(inside, score, torch.full_like(score, fill))
    return logits, flat, inside


def _weighted_values(v, flat, inside, weights):
    """sum over candidates of weights (B, N, Q, h, W) times their values (0 out of frame) -> (B, Cv, h, W)."""
    B, N, Cv = v.shape[:3]
    out = 0
    for n in range(N):
        for t0, t1 in _col_chunks(flat.shape[2], B * Cv * flat[0, 0, 0].numel()):
            vals = _gather(v[:, n : n + 1], flat[:, n : n + 1, t0:t1])[:, 0]  # (B, Cv, t, h, W)
            w = weights[:, n, t0:t1] * inside[:, n, t0:t1].to(weights.dtype)
            out = out + (vals * w.unsqueeze(1)).sum(2)
    return out


def local_affinity(q, k, radius, dilation=1, window="square", offsets=None, scale=1.0, border="mask"):
    """Logits (B, N, P, H, W); candidates outside the window (circle) or excluded by border="mask" are -inf."""
    dtype = q.dtype
    q, k = q.to(compute_dtype(dtype)), k.to(compute_dtype(dtype))
    B, N, C, H, W = k.shape
    P = (2 * radius + 1) ** 2
    cols = window_columns(radius, window)
    out = []
    for i0, i1 in _row_chunks(H, B * N * P * W):
        rows = torch.arange(i0, i1, device=q.device)
        logits, _, _ = _chunk_logits(q, k, rows, radius, dilation, cols, offsets, scale, border)
        full = logits.new_full((B, N, P, i1 - i0, W), float("-inf"))
        full = full.index_copy(2, torch.tensor(cols, device=q.device), logits)
        out.append(full)
    return torch.cat(out, dim=3).to(dtype)


def local_aggregate(weights, v, radius, dilation=1, offsets=None):
    """out[b, :, i, j] = sum over n, p of weights[b, n, p, i, j] * (value of candidate (n, p); 0 out of frame)."""
    dtype = v.dtype
    weights, v = weights.to(compute_dtype(dtype)), v.to(compute_dtype(dtype))
    B, N, Cv, H, W = v.shape
    cols = window_columns(radius, "square")
    out = []
    for i0, i1 in _row_chunks(H, B * N * len(cols) * W):
        rows = torch.arange(i0, i1, device=v.device)
        flat, inside = _positions(B, N, H, W, rows, radius, dilation, cols, offsets, v.device)
        out.append(_weighted_values(v, flat, inside, weights[:, :, :, i0:i1]))
    return torch.cat(out, dim=2).to(dtype)


def _normalize(logits, topk, normalize):
    """Dense weights over the candidate axis (last) and the sorted (values, order) when a k is involved.

    softmax: over every candidate, or over the `topk` largest (stable sort: ties go to the lower index).
    threshold: over every candidate >= the k-th largest logit (ties kept). Excluded (-inf) logits weigh 0; a query
    whose kept set is all -inf gets all-zero weights (and so zero gradient). A NaN logit (from a NaN or inf
    feature) ranks first, as torch.sort puts it, so it is always kept and makes its query's weights NaN."""
    sorted_vals = order = None
    if topk is not None:
        sorted_vals, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    if normalize == "threshold":
        kth = sorted_vals[..., topk - 1 : topk]
        # a NaN ranks above every number (as in the sort), so it is kept and the query's output is NaN
        kept = torch.where((logits >= kth) | logits.isnan(), logits, torch.full_like(logits, float("-inf")))
    elif topk is not None:
        kept = torch.full_like(logits, float("-inf")).scatter(-1, order[..., :topk], sorted_vals[..., :topk])
    else:
        kept = logits
    m = kept.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all excluded: avoid -inf - (-inf)
    e = torch.exp(kept - m)
    s = e.sum(dim=-1, keepdim=True)
    weights = e / torch.where(s > 0, s, torch.ones_like(s))
    return weights, sorted_vals, order


def local_attention(q, k, v, radius, scale=1.0, topk=None, normalize="softmax", window="square", dilation=1,
                    offsets=None, border="mask", return_topk=False):
    """Local attention with the fused op's semantics, computed by materialising each row chunk's candidates.

    Returns out (B, Cv, H, W), or (out, (logits, indices)) with the k largest logits of every query and their
    candidate indices n*P + p, each (B, H, W, k), in descending order (ties: lower index first). Scores, the
    selection, the softmax and the value sum are computed in float32 for float16/bfloat16 inputs (as the kernels
    do); out and the logits are returned in the input's dtype."""
    dtype = q.dtype
    q, k, v = q.to(compute_dtype(dtype)), k.to(compute_dtype(dtype)), v.to(compute_dtype(dtype))
    B, N, C, H, W = k.shape
    P = (2 * radius + 1) ** 2
    cols = window_columns(radius, window)
    Q = len(cols)
    # Candidate c = n*Q + t of the packed axis is window column cols[t] of reference n.
    full_index = (torch.arange(N, device=q.device).view(N, 1) * P
                  + torch.tensor(cols, device=q.device).view(1, Q)).reshape(-1)
    outs, top_logits, top_index = [], [], []
    for i0, i1 in _row_chunks(H, B * N * Q * W):
        rows = torch.arange(i0, i1, device=q.device)
        logits, flat, inside = _chunk_logits(q, k, rows, radius, dilation, cols, offsets, scale, border)
        h = i1 - i0
        lg = logits.reshape(B, N * Q, h, W).permute(0, 2, 3, 1)  # candidate axis last: (B, h, W, N*Q)
        weights, sorted_vals, order = _normalize(lg, topk, normalize)
        w = weights.permute(0, 3, 1, 2).reshape(B, N, Q, h, W)
        outs.append(_weighted_values(v, flat, inside, w))
        if return_topk:
            top_logits.append(sorted_vals[..., :topk])
            top_index.append(full_index[order[..., :topk]])
    out = torch.cat(outs, dim=2).to(dtype)
    if return_topk:
        return out, (torch.cat(top_logits, dim=1).to(dtype), torch.cat(top_index, dim=1))
    return out
