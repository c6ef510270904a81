"""Reference local-window affinity, aggregation and attention: explicit gathers, float64-capable, autograd.

Query pixel (i, j) of q (B, C, H, W) sees, in reference frame n of k (B, N, C, H, W), the candidates
    (y, x) = (i + oy + d*dy, j + ox + d*dx),   |dy|, |dx| <= r,
where (ox, oy) = offsets[b, n, :, i, j] rounded half away from zero (0 without offsets). Candidate index
n*P + (dy+r)(2r+1) + (dx+r), P = (2r+1)^2 (the F.unfold / correlation-sampler order). window="circle" keeps
only dy^2 + dx^2 < r^2. A candidate outside the frame is excluded (border="mask") or scores exactly 0 and
carries value 0 (border="zero"). Work is chunked over query rows to bound memory.
"""

from __future__ import annotations

import math

import torch

_CHUNK_ELEMS = 2**25  # gathered elements per row chunk (~256 MB in float64)


def offset_limit(H: int, W: int, radius: int, dilation: int) -> int:
    """Offsets are clamped to +-L: beyond it every candidate is out of frame anyway, and it fits int32."""
    return H + W + dilation * radius + 1


def round_offsets(offsets: torch.Tensor, radius: int, dilation: int) -> torch.Tensor:
    """(B, N, 2, H, W) float (dx, dy) -> int32, rounded half away from zero; non-finite -> out of frame."""
    H, W = offsets.shape[-2:]
    L = float(offset_limit(H, W, radius, dilation))
    o = torch.nan_to_num(offsets.detach(), nan=L, posinf=L, neginf=-L).clamp(-L, L)
    a = o.abs()
    f = a.floor()
    r = f + (a - f >= 0.5).to(a.dtype)  # exact in any float dtype (no a + 0.5 rounding)
    return torch.where(o < 0, -r, r).to(torch.int32)


def window_mask(radius: int, window: str, device=None) -> torch.Tensor:
    """(P,) bool: which of the (2r+1)^2 window positions a window shape keeps."""
    d = torch.arange(-radius, radius + 1, device=device)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    if window == "square":
        return torch.ones(dy.numel(), dtype=torch.bool, device=device)
    return (dy * dy + dx * dx < radius * radius).reshape(-1)


def _positions(B, N, H, W, i0, i1, radius, dilation, offsets_int, device):
    """Candidate coordinates (B, N, P, h, W) for query rows [i0, i1), and whether each lies in the frame."""
    d = torch.arange(-radius, radius + 1, device=device) * dilation
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    dy = dy.reshape(1, 1, -1, 1, 1)
    dx = dx.reshape(1, 1, -1, 1, 1)
    ii = torch.arange(i0, i1, device=device).view(1, 1, 1, -1, 1)
    jj = torch.arange(W, device=device).view(1, 1, 1, 1, -1)
    y = ii + dy
    x = jj + dx
    if offsets_int is not None:
        y = y + offsets_int[:, :, 1, i0:i1].unsqueeze(2).long()
        x = x + offsets_int[:, :, 0, i0:i1].unsqueeze(2).long()
    y = y.expand(B, N, -1, -1, -1)
    x = x.expand(B, N, -1, -1, -1)
    inside = (y >= 0) & (y < H) & (x >= 0) & (x < W)
    return y, x, inside


def _gather(t: torch.Tensor, y: torch.Tensor, x: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """t (B, N, C, H, W) at (y, x) (B, N, P, h, W) -> (B, N, C, P, h, W); 0 outside the frame."""
    B, N, C, H, W = t.shape
    idx = (y.clamp(0, H - 1) * W + x.clamp(0, W - 1)).reshape(B, N, 1, -1).expand(B, N, C, -1)
    g = torch.gather(t.reshape(B, N, C, H * W), 3, idx).reshape(B, N, C, *y.shape[2:])
    return torch.where(inside.unsqueeze(2), g, torch.zeros((), dtype=g.dtype, device=g.device))


def _row_chunks(H: int, per_row: int):
    rows = max(1, _CHUNK_ELEMS // max(1, per_row))
    for i0 in range(0, H, rows):
        yield i0, min(H, i0 + rows)


def _chunk_logits(q, k, i0, i1, radius, dilation, offsets_int, scale, border, keep):
    """Logits (B, N, P, h, W) of rows [i0, i1) and the mask of candidates that take part."""
    B, N, C, H, W = k.shape
    y, x, inside = _positions(B, N, H, W, i0, i1, radius, dilation, offsets_int, q.device)
    kg = _gather(k, y, x, inside)  # (B, N, C, P, h, W)
    logits = scale * (kg * q[:, None, :, None, i0:i1]).sum(2)
    valid = keep.view(1, 1, -1, 1, 1) & (inside if border == "mask" else torch.ones_like(inside))
    logits = torch.where(valid, logits, torch.full((), -math.inf, dtype=logits.dtype, device=logits.device))
    return logits, valid, y, x, inside


def local_affinity(q, k, radius, dilation=1, window="square", offsets=None, scale=1.0, border="mask"):
    """Logits (B, N, P, H, W): scale * <q, k at the candidate>; excluded candidates -inf, zero-border ones 0."""
    B, N, C, H, W = k.shape
    P = (2 * radius + 1) ** 2
    oi = round_offsets(offsets, radius, dilation) if offsets is not None else None
    keep = window_mask(radius, window, q.device)
    parts = []
    for i0, i1 in _row_chunks(H, B * N * C * P * W):
        parts.append(_chunk_logits(q, k, i0, i1, radius, dilation, oi, scale, border, keep)[0])
    return torch.cat(parts, dim=3)


def local_aggregate(weights, v, radius, dilation=1, offsets=None):
    """out (B, Cv, H, W) = sum over (n, p) of weights[b, n, p] * v at the candidate (0 outside the frame)."""
    B, N, Cv, H, W = v.shape
    P = (2 * radius + 1) ** 2
    oi = round_offsets(offsets, radius, dilation) if offsets is not None else None
    parts = []
    for i0, i1 in _row_chunks(H, B * N * Cv * P * W):
        y, x, inside = _positions(B, N, H, W, i0, i1, radius, dilation, oi, v.device)
        vg = _gather(v, y, x, inside)  # (B, N, Cv, P, h, W)
        w = torch.where(inside, weights[:, :, :, i0:i1], torch.zeros((), dtype=weights.dtype, device=v.device))
        parts.append((vg * w.unsqueeze(2)).sum(dim=(1, 3)))
    return torch.cat(parts, dim=2)


def _select(logits: torch.Tensor, valid: torch.Tensor, topk, normalize):
    """logits/valid (..., NP) -> kept mask, plus the top-k (stable descending) indices when topk is given."""
    if topk is None:
        return valid, None
    order = torch.sort(logits.detach(), dim=-1, descending=True, stable=True)
    idx = order.indices[..., :topk]
    if normalize == "threshold":
        kth = order.values[..., topk - 1 : topk]
        return valid & (logits.detach() >= kth), idx
    kept = torch.zeros_like(valid).scatter_(-1, idx, True) & valid
    return kept, idx


def local_attention(q, k, v, radius, scale=1.0, topk=None, normalize="softmax", window="square", dilation=1,
                    offsets=None, border="mask", return_topk=False):
    """Softmax (over all candidates or the top-k) or threshold attention of q over its local windows."""
    B, N, C, H, W = k.shape
    Cv = v.shape[2]
    P = (2 * radius + 1) ** 2
    oi = round_offsets(offsets, radius, dilation) if offsets is not None else None
    keep = window_mask(radius, window, q.device)
    outs, top_logits, top_index = [], [], []
    for i0, i1 in _row_chunks(H, B * N * max(C, Cv) * P * W):
        logits, valid, y, x, inside = _chunk_logits(q, k, i0, i1, radius, dilation, oi, scale, border, keep)
        h = i1 - i0
        flat = logits.permute(0, 3, 4, 1, 2).reshape(B, h, W, N * P)  # candidate index = n*P + p
        fvalid = valid.permute(0, 3, 4, 1, 2).reshape(B, h, W, N * P)
        kept, idx = _select(flat, fvalid, topk, normalize)
        any_kept = kept.any(-1, keepdim=True)
        zero = torch.zeros((), dtype=flat.dtype, device=flat.device)
        m = torch.where(any_kept, torch.where(kept, flat, -math.inf).amax(-1, keepdim=True).detach(), zero)
        e = torch.where(kept, torch.exp(torch.where(kept, flat - m, zero)), zero)  # max-subtracted
        s = e.sum(-1, keepdim=True)
        w = e / torch.where(any_kept, s, torch.ones_like(s))  # a query with nothing kept: all weights 0
        w = w.reshape(B, h, W, N, P).permute(0, 3, 4, 1, 2)  # (B, N, P, h, W)
        vg = _gather(v, y, x, inside)  # (B, N, Cv, P, h, W)
        outs.append((vg * w.unsqueeze(2)).sum(dim=(1, 3)))
        if return_topk:
            tl_ = torch.gather(flat, -1, idx)
            tvalid = torch.gather(fvalid, -1, idx)
            top_logits.append(torch.where(tvalid, tl_, torch.full((), -math.inf, dtype=flat.dtype,
                                                                   device=flat.device)))
            top_index.append(torch.where(tvalid, idx, torch.full_like(idx, -1)))
    out = torch.cat(outs, dim=2)
    if return_topk:
        return out, (torch.cat(top_logits, dim=1), torch.cat(top_index, dim=1))
    return out
