"""Readouts: given the query frame's features and the memory (features + label maps), the query's soft labels.

A readout is called as `readout(q, k, v, offsets=None, is_global=None)`:
  q (1, C, h, w) query features; k (1, N, C, h, w) memory features; v (1, N, K, h, w) memory label maps;
  offsets (1, N, 2, h, w) integer flow displacements (dx, dy) from the query to each memory frame, or None;
  is_global: list of N bools, memory frames searched over the whole frame (CRW's first frame).
It returns (1, K, h, w). Each is one of vosops's fused ops, so the per-frame work is a few kernel launches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import vosops
from vosops.ops.local_attention import window_size


def _l2n(x: torch.Tensor, dim: int) -> torch.Tensor:
    return F.normalize(x, dim=dim)


def _need(op: str):
    fn = getattr(vosops, op, None)
    if fn is None:
        raise RuntimeError(f"this readout needs vosops.{op}, which this build of vosops does not provide")
    return fn


class LocalReadout:
    """`vosops.local_attention` over all memory frames jointly: windows of `radius` (optionally flow-displaced),
    top-k or threshold selection over the union of candidates, one normalisation.
    scale=None means 1/sqrt(C) (MAMP's correlation / sqrt(c))."""

    def __init__(self, radius: int, topk: int | None = None, scale: float | None = None, normalize: str = "softmax",
                 window: str = "square", dilation: int = 1, border: str = "mask", l2_normalize: bool = False,
                 backend: str | None = None):
        self.radius, self.topk, self.scale = radius, topk, scale
        self.normalize, self.window, self.dilation, self.border = normalize, window, dilation, border
        self.l2_normalize, self.backend = l2_normalize, backend
        self.uses_offsets = True

    def __call__(self, q, k, v, offsets=None, is_global=None):
        if self.l2_normalize:
            q, k = _l2n(q, 1), _l2n(k, 2)
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(q.shape[1])
        N = k.shape[1]
        topk = self.topk
        if topk is not None:
            topk = min(topk, N * window_size(self.radius, self.window))
        return vosops.local_attention(q, k, v, radius=self.radius, scale=scale, topk=topk,
                                      normalize=self.normalize, window=self.window, dilation=self.dilation,
                                      offsets=offsets, border=self.border, backend=self.backend)

    def __repr__(self):
        return (f"LocalReadout(radius={self.radius}, topk={self.topk}, scale={self.scale}, normalize={self.normalize!r},"
                f" window={self.window!r}, border={self.border!r}, l2_normalize={self.l2_normalize})")


def local_candidates_to_memory_index(cand, radius, dilation, h, w, offsets=None, base=0):
    """Candidate indices of local_attention(return_topk=True), (1, h, w, k) = n·P + (dy+r)(2r+1) + (dx+r), as
    indices into a flat memory whose frame n occupies [base + n·h·w, base + (n+1)·h·w) (row-major).
    Out-of-frame positions are clamped into the frame; their logits are -inf under border="mask"."""
    D = 2 * radius + 1
    P = D * D
    n = cand // P
    rem = cand % P
    dy = (rem // D - radius) * dilation
    dx = (rem % D - radius) * dilation
    ii = torch.arange(h, device=cand.device).view(1, h, 1, 1)
    jj = torch.arange(w, device=cand.device).view(1, 1, w, 1)
    y, x = ii + dy, jj + dx
    if offsets is not None:
        from ..reference.local_attention import round_offsets

        off = round_offsets(offsets, radius, dilation)  # (1, N, 2, h, w)
        ox = torch.gather(off[:, :, 0].permute(0, 2, 3, 1), 3, n)  # per candidate's frame
        oy = torch.gather(off[:, :, 1].permute(0, 2, 3, 1), 3, n)
        x, y = x + ox, y + oy
    y = y.clamp(0, h - 1)
    x = x.clamp(0, w - 1)
    return base + n * (h * w) + y * w + x


class CRWReadout:
    """CRW / Mask-VOS: the global frames (the first frame) searched over the whole frame with `vosops.global_topk`,
    the other memory frames inside a circle of `radius` with `vosops.local_attention(return_topk=True)`; the two
    candidate sets merged by `vosops.merge_topk` into one top-k, then one softmax (`vosops.topk_aggregate`).
    CRW: L2-normalised features, scale 1/0.05, top-10, circle r=12."""

    def __init__(self, radius: int = 12, topk: int = 10, scale: float = 1 / 0.05, window: str = "circle",
                 l2_normalize: bool = True, backend: str | None = None):
        self.radius, self.topk, self.scale, self.window = radius, topk, scale, window
        self.l2_normalize, self.backend = l2_normalize, backend
        self.uses_offsets = False

    def __call__(self, q, k, v, offsets=None, is_global=None):
        global_topk, merge_topk, topk_aggregate = (_need("global_topk"), _need("merge_topk"),
                                                   _need("topk_aggregate"))
        if self.l2_normalize:
            q, k = _l2n(q, 1), _l2n(k, 2)
        _, N, C, h, w = k.shape
        K = v.shape[2]
        is_global = list(is_global) if is_global is not None else [i == 0 for i in range(N)]
        g = [i for i in range(N) if is_global[i]]
        loc = [i for i in range(N) if not is_global[i]]
        qf = q.flatten(2).transpose(1, 2)  # (1, hw, C)

        def pick(x, which):  # slices, not a list index: no index tensor copied to the device per frame
            return torch.cat([x[:, i:i + 1] for i in which], 1)

        cands, values = [], []
        base = 0
        if g:
            kg = pick(k, g).permute(0, 1, 3, 4, 2).reshape(1, len(g) * h * w, C)
            kk = min(self.topk, kg.shape[1])
            cands.append(global_topk(qf, kg, topk=kk, scale=self.scale, backend=self.backend))
            values.append(pick(v, g).permute(0, 1, 3, 4, 2).reshape(1, len(g) * h * w, K))
            base = len(g) * h * w
        if loc:
            kl, vl = pick(k, loc), pick(v, loc)
            kk = min(self.topk, len(loc) * window_size(self.radius, self.window))
            _, (logits, cand) = vosops.local_attention(
                q, kl, vl, radius=self.radius, scale=self.scale, topk=kk, window=self.window, border="mask",
                return_topk=True, backend=self.backend)
            idx = local_candidates_to_memory_index(cand, self.radius, 1, h, w, base=base)
            idx = torch.where(torch.isfinite(logits), idx, torch.full_like(idx, -1))  # excluded slots: index -1
            cands.append((logits.reshape(1, h * w, kk), idx.reshape(1, h * w, kk)))
            values.append(vl.permute(0, 1, 3, 4, 2).reshape(1, len(loc) * h * w, K))
        logits, index = merge_topk(cands, min(self.topk, sum(c[0].shape[-1] for c in cands)), backend=self.backend)
        # the indices come from global_topk / merge_topk: in range by construction, and a check would
        # synchronise with the host every frame
        out = topk_aggregate(logits, index, torch.cat(values, 1), normalize="softmax", check_index=False,
                             backend=self.backend)  # (1, hw, K)
        return out.transpose(1, 2).reshape(1, K, h, w)

    def __repr__(self):
        return f"CRWReadout(radius={self.radius}, topk={self.topk}, scale={self.scale}, window={self.window!r})"


class TopKAttentionReadout:
    """XMem / JointFormer memory readout with `vosops.topk_attention`: `heads` heads of C/heads channels, each query
    token keeps the top-k memory tokens, one softmax; label maps are read per head and averaged over heads.
    JointFormer: 12 heads of D = 64, scale 1/sqrt(D), top-60 on DAVIS (120 on YouTube-VOS)."""

    def __init__(self, topk: int = 60, heads: int = 1, scale: float | None = None, l2_normalize: bool = False):
        self.topk, self.heads, self.scale, self.l2_normalize = topk, heads, scale, l2_normalize
        self.uses_offsets = False

    def __call__(self, q, k, v, offsets=None, is_global=None):
        topk_attention = _need("topk_attention")
        _, N, C, h, w = k.shape
        K = v.shape[2]
        H = self.heads
        if C % H:
            raise ValueError(f"feature channels ({C}) must be divisible by heads ({H})")
        if self.l2_normalize:
            q, k = _l2n(q, 1), _l2n(k, 2)
        D = C // H
        qh = q.reshape(1, H, D, h * w).transpose(2, 3)  # (1, H, M, D)
        kh = k.permute(0, 2, 1, 3, 4).reshape(1, H, D, N * h * w).transpose(2, 3)  # (1, H, L, D)
        vh = v.permute(0, 1, 3, 4, 2).reshape(1, 1, N * h * w, K).expand(1, H, N * h * w, K).contiguous()
        out = topk_attention(qh, kh, vh, topk=min(self.topk, N * h * w), scale=self.scale)  # (1, H, M, K)
        return out.mean(1).transpose(1, 2).reshape(1, K, h, w)

    def __repr__(self):
        return f"TopKAttentionReadout(topk={self.topk}, heads={self.heads}, scale={self.scale})"
