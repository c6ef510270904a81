"""Mask-VOS' pseudo-label step: space-time k-means of a video's pixel embeddings (Li et al., CVPR 2022, §3.1, §3.3).

Two variants:
  "paper"   what the paper describes: every pixel of every frame is clustered on its embedding with a 3-D
            sinusoidal position encoding (Transformer/ViT style [64, 65]) appended, M=5 clusters, 100 EM (Lloyd)
            steps; clusters holding more than 40% of the video's pixels ("over-size", typically background) are
            abandoned (label -1).
  "release" what the released code does: scikit-learn KMeans with K=7 on the L2-normalised embeddings of every
            8th frame (frames 0, 8, 16, ...), then every pixel of every frame assigned to its nearest centre.
The paper does not state the size or the weight of the position encoding: `pos_dim` and `pos_weight` are ours.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _validate
from ..reference import kmeans as _ref
from .kmeans import kmeans, kmeans_predict

MODES = ("paper", "release")


def position_encoding_3d(T: int, H: int, W: int, dim: int, *, dtype: torch.dtype = torch.float32,
                         device=None) -> torch.Tensor:
    """(T, H, W, dim) sinusoidal encoding of each pixel's (t, y, x) integer position.

    dim must be a positive multiple of 6: channels [0, dim/3) encode t, [dim/3, 2dim/3) y and the rest x; each
    third is [sin(p w_0..w_{h-1}), cos(p w_0..w_{h-1})] with h = dim/6 and w_i = 10000^(-i/h) (Vaswani et al.; the
    2-D split of MAE/ViT extended to three axes).
    """
    for name, v in (("T", T), ("H", H), ("W", W), ("dim", dim)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if dim % 6:
        raise ValueError(f"dim must be a multiple of 6 (a sin and a cos half for each of t, y, x), got {dim}")
    return _ref.position_encoding_3d(T, H, W, dim, dtype=dtype, device=device)


def _videos(features) -> tuple[list[torch.Tensor], bool]:
    single = isinstance(features, torch.Tensor)
    videos = [features] if single else list(features)
    if not videos:
        raise ValueError("features must be a (T, C, H, W) tensor or a non-empty list of them")
    for i, v in enumerate(videos):
        name = "features" if single else f"features[{i}]"
        _validate.tensor(name, v, dim=4)
        _validate.non_empty(name, v)
        if v.shape[1] != videos[0].shape[1] or v.device != videos[0].device:
            raise ValueError(f"{name}: every video must have the same channel count and device as the first")
    return videos, single


def _pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    N = max(r.shape[0] for r in rows)
    x = rows[0].new_zeros(len(rows), N, rows[0].shape[1])
    for b, r in enumerate(rows):
        x[b, : r.shape[0]] = r
    lengths = torch.tensor([r.shape[0] for r in rows], dtype=torch.int64, device=x.device)
    return x, lengths


def _oversized(counts: torch.Tensor, lengths: torch.Tensor, frac: float) -> torch.Tensor:
    """(B, K) bool: the clusters holding more than `frac` of their video's pixels. In float64: int64 times a
    Python float is float32, whose rounding above ~2^24 pixels misjudges a cluster at the boundary (8,400,001 of
    21,000,002 pixels is over 40%, but not in float32)."""
    return counts.double() > frac * lengths[:, None].double()


def video_pseudo_labels(
    features,
    *,
    num_clusters: int | None = None,
    iters: int | None = None,
    pos_dim: int = 24,
    pos_weight: float = 1.0,
    max_cluster_fraction: float | None = None,
    mode: str = "paper",
    frame_stride: int = 8,
    n_init: int = 1,
    seed: int | None = None,
    backend: str | None = None,
):
    """Cluster ids (T, H, W) int64 for a video's pixel features (T, C, H, W), or a list of them for a list of
    videos (all clustered in one batched k-means, ragged sizes allowed).

    num_clusters: M (paper: 5) or K (release: 7) when None. iters: Lloyd iterations, default 100 (the paper's EM
    steps; scikit-learn's max_iter=300 in release mode). pos_dim / pos_weight: size of the 3-D position encoding (a
    multiple of 6; 0: none) appended to each pixel's features and its scale (paper mode only).
    max_cluster_fraction: clusters with more than this fraction of the video's pixels are dropped (-1); default 0.4
    in paper mode, none in release mode.
    frame_stride: release mode clusters frames 0, s, 2s, ... (s=8). n_init, seed, backend: as vosops.kmeans.
    """
    _validate.choice("mode", mode, MODES)
    videos, single = _videos(features)
    K = num_clusters if num_clusters is not None else (5 if mode == "paper" else 7)
    steps = iters if iters is not None else (100 if mode == "paper" else 300)
    frac = max_cluster_fraction if max_cluster_fraction is not None else (0.4 if mode == "paper" else 1.0)
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 1:
        raise ValueError(f"max_cluster_fraction must be a number in (0, 1], got {frac!r}")
    if isinstance(pos_weight, bool) or not isinstance(pos_weight, (int, float)) or not math.isfinite(pos_weight):
        raise ValueError(f"pos_weight must be a finite number, got {pos_weight!r}")
    if mode == "paper" and (isinstance(pos_dim, bool) or not isinstance(pos_dim, int) or pos_dim < 0
                            or pos_dim % 6):
        raise ValueError(f"pos_dim must be an int >= 0 and a multiple of 6 (a sin and a cos half for each of t, y, x), "
                         f"got {pos_dim!r}")
    if isinstance(frame_stride, bool) or not isinstance(frame_stride, int) or frame_stride < 1:
        raise ValueError(f"frame_stride must be a positive int, got {frame_stride!r}")
    shapes = [(v.shape[0], v.shape[2], v.shape[3]) for v in videos]
    pixels = [v.permute(0, 2, 3, 1).reshape(-1, v.shape[1]) for v in videos]  # (T*H*W, C), t-major
    if mode == "paper":
        rows = []
        for (T, H, W), p in zip(shapes, pixels):
            if pos_dim == 0:  # features alone
                rows.append(p)
                continue
            pe = position_encoding_3d(T, H, W, pos_dim, dtype=p.dtype, device=p.device).reshape(-1, pos_dim)
            rows.append(torch.cat([p, pe * pos_weight], dim=1))
        x, lengths = _pad(rows)
        res = kmeans(x, K, iters=steps, n_init=n_init, lengths=lengths, seed=seed, backend=backend)
        labels = res.labels
    else:
        normed = [F.normalize(v.float() if v.dtype != torch.float64 else v, dim=1) for v in videos]
        sample = [n[::frame_stride].permute(0, 2, 3, 1).reshape(-1, n.shape[1]) for n in normed]
        xs, ls = _pad(sample)
        res = kmeans(xs, K, iters=steps, n_init=n_init, lengths=ls, seed=seed, backend=backend)
        x, lengths = _pad([n.permute(0, 2, 3, 1).reshape(-1, n.shape[1]) for n in normed])
        labels = kmeans_predict(x, res.centroids, lengths=lengths, backend=backend)
    if frac < 1:
        counts = torch.zeros(labels.shape[0], K + 1, dtype=torch.int64, device=labels.device)
        counts.scatter_add_(1, labels + 1, torch.ones_like(labels))  # column 0 collects the padding (-1)
        big = _oversized(counts[:, 1:], lengths, frac)
        labels = torch.where(big.gather(1, labels.clamp_min(0)) & (labels >= 0), -1, labels)
    out = [labels[b, : T * H * W].reshape(T, H, W) for b, (T, H, W) in enumerate(shapes)]
    return out[0] if single else out
