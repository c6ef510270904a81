"""Batched k-means in plain PyTorch: the semantics every vosops backend is tested against.

B independent problems are solved at once: `x` is (B, N, D) and `lengths` (B,) int64 says how many leading points
of each problem are real (the rest is padding: ignored, labelled -1, distance 0). Everything follows scikit-learn's
KMeans / MiniBatchKMeans so results can be compared with it:

* seeding: greedy k-means++ (2 + floor(log K) local trials per centre, the candidate that lowers the potential most);
* full batch: Lloyd iterations. One step assigns every point to its nearest centre (squared Euclidean distance,
  ties to the lower index) and sums the points of each cluster; the update divides. An empty cluster is re-seeded
  at the point farthest from its own centre (that point leaves its old cluster's sums), as scikit-learn does.
  A problem stops when its labels did not change ("strict" convergence) or when the squared centre shift summed
  over centres is <= tol * mean_d var(x[:, d]) (scikit-learn's relative tolerance). Finished problems keep their
  centres while the others iterate (they are passed to the step with length 0, so it skips their points); no host
  synchronisation is needed inside the loop. After the loop every point is assigned once more to the final
  centres (as scikit-learn does when it stopped on the shift rule); labels and inertia come from that pass.
* mini-batch: scikit-learn's MiniBatchKMeans update with reassignment_ratio=0: per-centre running counts w_k and
  c_k <- (c_k * w_k + sum of the batch points assigned to k) / (w_k + n_k).
* random numbers (`Draws`): every problem of a batch draws the same stream, each number a pure function of (seed,
  restart, purpose, index) computed on the host, so a problem gets the result it gets alone with the same seed,
  whatever else is batched with it, however it is padded, and on whatever device.

The step functions are pluggable (`step=`, `assign=`), so the native, Triton and CUDA backends reuse this driver
and replace only the fused pass over x; the cpu backend replaces the whole Lloyd loop (`full_batch=`, one native call).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import torch

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple]


class KMeansResult(NamedTuple):
    """centroids (B, K, D) (float32 for half inputs, else x's dtype); labels (B, N) int64 (-1 past a problem's
    length); inertia (B,) sum of squared distances of each problem's points to their centre; n_iter (B,) int64
    iterations (Lloyd) or mini-batch steps run by the kept restart."""

    centroids: torch.Tensor
    labels: torch.Tensor
    inertia: torch.Tensor
    n_iter: torch.Tensor


class Draws:
    """The random numbers of one k-means call. `uniform(n, purpose, index)` is n float64 numbers in [0, 1), a pure
    function of (seed, restart, purpose, index): PCG64 seeded by numpy's SeedSequence of those integers. Every
    problem uses the same numbers, so none depends on the batch around it; and the first m of n numbers are the m
    numbers asked for alone, so padding (a longer draw) changes nothing either. `restart` counts n_init restarts."""

    KMEANS_PLUSPLUS, RANDOM_INIT, MINI_BATCH = 0, 1, 2

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.restart = 0

    def uniform(self, n: int, purpose: int, index: int = 0, device=None) -> torch.Tensor:
        ss = np.random.SeedSequence([self.seed, self.restart, purpose, index])
        return torch.from_numpy(np.random.default_rng(ss).random(n)).to(device)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / centroid dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def valid_mask(lengths: torch.Tensor, N: int) -> torch.Tensor:
    return torch.arange(N, device=lengths.device)[None, :] < lengths[:, None]


def sq_distances(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """(B, N, K) squared distances, computed as sum_d (x_d - c_d)^2 in the accumulation dtype, chunked over N so
    no (B, N, K, D) tensor is ever held."""
    acc = acc_dtype(x.dtype)
    c = centers.to(acc)
    B, N, D = x.shape
    chunk = max(1, (1 << 22) // max(1, B * c.shape[1] * D))
    parts = []
    for s in range(0, N, chunk):
        xs = x[:, s:s + chunk].to(acc)
        parts.append(((xs[:, :, None, :] - c[:, None, :, :]) ** 2).sum(-1))
    return torch.cat(parts, dim=1)


def kmeans_assign(x: torch.Tensor, lengths: torch.Tensor, centers: torch.Tensor):
    """Nearest centre of every point: labels (B, N) int64 (-1 past the length) and its squared distance (B, N)
    in the accumulation dtype (0 past the length). Ties go to the lower centre index."""
    d = sq_distances(x, centers)
    mind, lab = d.min(dim=2)
    valid = valid_mask(lengths, x.shape[1])
    return torch.where(valid, lab, -1), torch.where(valid, mind, 0.0)


def kmeans_step(x: torch.Tensor, lengths: torch.Tensor, centers: torch.Tensor):
    """One fused Lloyd pass: (labels, mindist) as kmeans_assign, plus per-cluster sums (B, K, D) and counts (B, K)
    int64 of the valid points, in the accumulation dtype."""
    labels, mind = kmeans_assign(x, lengths, centers)
    B, N, D = x.shape
    K = centers.shape[1]
    acc = acc_dtype(x.dtype)
    valid = labels >= 0
    idx = labels.clamp_min(0)
    sums = torch.zeros(B, K, D, dtype=acc, device=x.device)
    sums.scatter_add_(1, idx[..., None].expand(B, N, D), x.to(acc) * valid[..., None])
    counts = torch.zeros(B, K, dtype=torch.int64, device=x.device)
    counts.scatter_add_(1, idx, valid.long())
    return labels, mind, sums, counts


# ---------------------------------------------------------------------------------------------------------------
# seeding


def kmeans_plusplus(x: torch.Tensor, lengths: torch.Tensor, K: int, draws: Draws,
                    n_local_trials: int | None = None) -> torch.Tensor:
    """Greedy k-means++ as scikit-learn's `_kmeans_plusplus`: the first centre uniformly among the valid points,
    then per centre `2 + floor(log K)` candidates drawn with probability proportional to the squared distance to
    the nearest chosen centre; the candidate giving the lowest potential (sum of squared distances) is kept."""
    B, N, D = x.shape
    acc = acc_dtype(x.dtype)
    dev = x.device
    trials = n_local_trials if n_local_trials is not None else 2 + int(math.log(K))
    valid = valid_mask(lengths, N)
    xa = x.to(acc)
    ar = torch.arange(B, device=dev)
    u = draws.uniform(1, Draws.KMEANS_PLUSPLUS, 0, dev)
    first = (u * lengths).long().clamp(max=lengths - 1)
    centers = torch.empty(B, K, D, dtype=acc, device=dev)
    centers[:, 0] = xa[ar, first]
    closest = torch.where(valid, ((xa - centers[:, :1]) ** 2).sum(-1), 0.0)  # (B, N)
    pot = closest.sum(1)
    for c in range(1, K):
        r = draws.uniform(trials, Draws.KMEANS_PLUSPLUS, c, dev)[None, :] * pot[:, None].double()
        cum = closest.double().cumsum(1)
        cand = torch.searchsorted(cum, r.contiguous()).clamp(max=(lengths - 1)[:, None])  # (B, trials)
        cx = xa.gather(1, cand[..., None].expand(B, trials, D))  # (B, trials, D)
        dist = torch.cat([((xa - cx[:, t:t + 1]) ** 2).sum(-1)[:, None] for t in range(trials)], 1)  # (B, T, N)
        dist = torch.minimum(dist, closest[:, None])
        dist = torch.where(valid[:, None], dist, 0.0)
        cpot = dist.sum(2)  # (B, trials)
        best = cpot.argmin(1)
        pot = cpot[ar, best]
        closest = dist[ar, best]
        centers[:, c] = cx[ar, best]
    return centers


def random_init(x: torch.Tensor, lengths: torch.Tensor, K: int, draws: Draws) -> torch.Tensor:
    """K distinct valid points per problem chosen uniformly (scikit-learn's init="random"): the k-th pick is the
    floor(u_k * (length - k))-th of the points not yet picked."""
    B, N, D = x.shape
    u = draws.uniform(K, Draws.RANDOM_INIT, 0, x.device)
    picked = torch.empty(B, 0, dtype=torch.int64, device=x.device)
    for k in range(K):
        idx = (u[k] * (lengths - k)).long().clamp(max=lengths - k - 1)
        for c in picked.sort(1).values.unbind(1):  # step over the earlier picks, smallest first
            idx = idx + (c <= idx).long()
        picked = torch.cat([picked, idx[:, None]], 1)
    return x.to(acc_dtype(x.dtype)).gather(1, picked[..., None].expand(B, K, D))


def _valid_rows(lengths: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """(B, count, 1) bool: which of the points start .. start+count-1 lie within each problem's length."""
    return (torch.arange(start, start + count, device=lengths.device)[None, :] < lengths[:, None])[..., None]


def scaled_tol(x: torch.Tensor, lengths: torch.Tensor, tol: float, chunk: int = 1 << 14) -> torch.Tensor:
    """scikit-learn's tolerance per problem: tol * mean over features of the (population) variance.

    Two passes, as numpy's var: the mean, then the squared deviations from it (the one-pass E[x^2] - E[x]^2 cancels
    to 0 for data far from the origin, which made a problem stop on labels alone). Chunks of `chunk` points keep the
    temporaries small."""
    acc = acc_dtype(x.dtype)
    B, N, D = x.shape
    if tol == 0:  # no pass over x for a product with 0 (x is finite)
        return torch.zeros(B, dtype=acc, device=x.device)
    padded = not bool((lengths == N).all())
    n = lengths.to(acc)[:, None]
    total = torch.zeros(B, D, dtype=acc, device=x.device)
    for s in range(0, N, chunk):
        xc = x[:, s:s + chunk].to(acc)
        if padded:
            xc = torch.where(_valid_rows(lengths, s, xc.shape[1]), xc, 0.0)
        total += xc.sum(1)
    mean = total / n
    sq = torch.zeros(B, D, dtype=acc, device=x.device)
    for s in range(0, N, chunk):
        dev = x[:, s:s + chunk].to(acc) - mean[:, None]
        if padded:
            dev = torch.where(_valid_rows(lengths, s, dev.shape[1]), dev, 0.0)
        sq += (dev * dev).sum(1)
    return (sq / n).mean(1) * tol


# ---------------------------------------------------------------------------------------------------------------
# the two loops (shared by every backend: `step` and `assign` are the backend's fused passes)


def relocate_empty(x, labels, mindist, sums, counts):
    """scikit-learn's `_relocate_empty_clusters`: the e-th empty cluster of a problem takes the e-th farthest point
    from its centre; the point is removed from its old cluster's sum and count."""
    B, N, D = x.shape
    K = counts.shape[1]
    empty = counts == 0
    # (B, K), farthest first, ties to the lower index (topk does not order ties; a stable sort does)
    far = mindist.masked_fill(labels < 0, -1.0).sort(dim=1, descending=True, stable=True).indices[:, :K]
    rank = (empty.long().cumsum(1) - 1).clamp_min(0)
    pick = far.gather(1, rank)  # (B, K): the point each empty cluster takes
    px = x.gather(1, pick[..., None].expand(B, K, D)).to(sums.dtype)
    old = labels.gather(1, pick).clamp_min(0)
    sums = sums.scatter_add(1, old[..., None].expand(B, K, D), -px * empty[..., None])
    counts = counts.scatter_add(1, old, -empty.long())
    sums = torch.where(empty[..., None], px, sums)
    counts = torch.where(empty, 1, counts)
    return sums, counts


def kmeans_update(centers, sums, counts, labels_equal, active, tol):
    """The Lloyd update: new centre = cluster mean (unchanged when the cluster is empty); a problem has converged
    when its labels did not change (labels_equal) or its squared centre shift is <= tol. Returns (centres, converged)
    with the centres of inactive problems left as they were."""
    new = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None].to(sums.dtype), centers)
    shift = ((new - centers) ** 2).sum((1, 2))
    converged = labels_equal | (shift <= tol)
    return torch.where(active[:, None, None], new, centers), converged


def lloyd_update(x, lengths, labels, mindist, sums, counts, centers, active, n_iter, labels_equal, tol):
    """Everything of a Lloyd iteration after the step: relocation of empty clusters, the update, and the flags.
    Returns (centres, active, n_iter) after it. Same arguments and results as the native op
    torch.ops.vosops.kmeans_update (one CUDA kernel on a GPU: no topk over the points, no launch per tensor op)."""
    if x.device.type != "cpu" or bool(((counts == 0) & active[:, None]).any()):  # free on CPU, a sync on a GPU
        sums, counts = relocate_empty(x, labels, mindist, sums, counts)
    centers, converged = kmeans_update(centers, sums, counts, labels_equal, active, tol)
    return centers, active & ~converged, n_iter + active.long()


def lloyd_iteration(x, lengths, centers, active, n_iter, labels_old, tol, step: Step = kmeans_step,
                    update: Callable = lloyd_update):
    """One Lloyd iteration of every still active problem: (centres, active, n_iter, labels) after it."""
    # finished problems are passed with length 0: the step skips their points (their outputs are discarded)
    labels, mind, sums, counts = step(x, torch.where(active, lengths, 0), centers)
    labels_equal = (labels == labels_old).all(1)
    centers, active, n_iter = update(x, lengths, labels, mind, sums, counts, centers, active, n_iter, labels_equal,
                                     tol)
    return centers, active, n_iter, labels


def lloyd(x: torch.Tensor, lengths: torch.Tensor, centers: torch.Tensor, *, iters: int, tol: torch.Tensor,
          step: Step = kmeans_step, assign: Step = kmeans_assign, check_every: int = 1,
          update: Callable = lloyd_update) -> KMeansResult:
    """Lloyd iterations from `centers` (B, K, D) for every problem; see the module docstring for the rules.
    `check_every`: how often the host looks at the device-side flags to stop early (1 on CPU; on CUDA more, so the
    loop runs without a synchronisation per iteration)."""
    B, N, D = x.shape
    dev = x.device
    centers = centers.to(acc_dtype(x.dtype)).clone()
    active = torch.ones(B, dtype=torch.bool, device=dev)
    n_iter = torch.zeros(B, dtype=torch.int64, device=dev)
    labels_old = torch.full((B, N), -1, dtype=torch.int64, device=dev)
    for it in range(iters):
        centers, active, n_iter, labels_old = lloyd_iteration(x, lengths, centers, active, n_iter, labels_old, tol,
                                                              step, update)
        if (it + 1) % check_every == 0 and not bool(active.any()):
            break
    labels, mind = assign(x, lengths, centers)
    return KMeansResult(centers, labels, mind.sum(1), n_iter)


def sample_batches(lengths: torch.Tensor, steps: int, batch_size: int, draws: Draws) -> torch.Tensor:
    """(steps, B, batch_size) int64 point indices, uniform with replacement over each problem's valid points (as
    scikit-learn draws its mini-batches); step t maps the numbers draws.uniform(batch_size, MINI_BATCH, t)."""
    u = torch.stack([draws.uniform(batch_size, Draws.MINI_BATCH, t) for t in range(steps)]).to(lengths.device)
    return (u[:, None, :] * lengths[None, :, None]).long().clamp(max=(lengths - 1)[None, :, None])


def minibatch(x: torch.Tensor, lengths: torch.Tensor, centers: torch.Tensor, batches: torch.Tensor, *,
              tol: torch.Tensor, step: Step = kmeans_step, assign: Step = kmeans_assign,
              check_every: int = 1) -> KMeansResult:
    """MiniBatchKMeans steps over `batches` (steps, B, b). A problem stops when its squared centre shift is <= tol
    (only when tol > 0 and from the second step on, as scikit-learn); scikit-learn's no-improvement-of-smoothed-
    inertia stop is not used."""
    B, N, D = x.shape
    dev = x.device
    centers = centers.to(acc_dtype(x.dtype)).clone()
    K = centers.shape[1]
    weight = torch.zeros(B, K, dtype=centers.dtype, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    n_iter = torch.zeros(B, dtype=torch.int64, device=dev)
    # a problem with fewer points than the batch size draws as many points as it has (scikit-learn's
    # min(batch_size, n_samples)); the rest of its row of `batches` is not used
    full = lengths.clamp(max=batches.shape[2])
    rows = torch.arange(B, device=dev)[:, None]
    for it in range(batches.shape[0]):
        xb = x[rows, batches[it]]  # (B, bsz, D): row indexing copies whole points (gather would go per element)
        _, _, sums, counts = step(xb, torch.where(active, full, 0), centers)
        counts = counts.to(centers.dtype)
        w_new = weight + counts
        has = counts > 0
        new = torch.where(has[..., None], (centers * weight[..., None] + sums) / w_new.clamp_min(1e-30)[..., None],
                          centers)
        shift = ((new - centers) ** 2).sum((1, 2))
        # scikit-learn's _mini_batch_convergence ignores the first step (its inertia is the initialisation's)
        converged = (tol > 0) & (shift <= tol) & (it > 0)
        centers = torch.where(active[:, None, None], new, centers)
        weight = torch.where(active[:, None], w_new, weight)
        n_iter += active.long()
        active = active & ~converged
        if (it + 1) % check_every == 0 and not bool(active.any()):
            break
    labels, mind = assign(x, lengths, centers)
    return KMeansResult(centers, labels, mind.sum(1), n_iter)


def kmeans(x: torch.Tensor, K: int, *, iters: int = 100, tol: float = 1e-4, init="k-means++", n_init: int = 1,
           batch_size: int | None = None, lengths: torch.Tensor | None = None, draws: Draws,
           step: Step = kmeans_step, assign: Step = kmeans_assign, check_every: int = 1,
           full_batch: Callable | None = None, update: Callable = lloyd_update) -> KMeansResult:
    """The whole algorithm on validated (B, N, D) input; `init` is "k-means++", "random" or (B, K, D) centres.
    With n_init > 1 each problem keeps the restart with the lowest inertia. `full_batch`: a replacement of `lloyd`,
    called as full_batch(x, lengths, centers, iters, tol) (the cpu backend's single native call); `update`: the
    rest of a Lloyd iteration after the step (lloyd_update or an op with its arguments)."""
    B, N, D = x.shape
    if lengths is None:
        lengths = torch.full((B,), N, dtype=torch.int64, device=x.device)
    tol_b = scaled_tol(x, lengths, tol)
    best = None
    for restart in range(n_init):
        draws.restart = restart
        if isinstance(init, torch.Tensor):
            c0 = init
        elif init == "random":
            c0 = random_init(x, lengths, K, draws)
        else:
            c0 = kmeans_plusplus(x, lengths, K, draws)
        if batch_size is None:
            if full_batch is not None:
                res = full_batch(x, lengths, c0, iters, tol_b)
            else:
                res = lloyd(x, lengths, c0, iters=iters, tol=tol_b, step=step, assign=assign, check_every=check_every,
                            update=update)
        else:
            # at most N points a batch: problem i then uses the first min(batch_size, lengths[i]) of its row
            batches = sample_batches(lengths, iters, min(batch_size, N), draws)
            res = minibatch(x, lengths, c0, batches, tol=tol_b, step=step, assign=assign, check_every=check_every)
        if best is None:
            best = res
        else:
            better = res.inertia < best.inertia
            best = KMeansResult(
                torch.where(better[:, None, None], res.centroids, best.centroids),
                torch.where(better[:, None], res.labels, best.labels),
                torch.where(better, res.inertia, best.inertia),
                torch.where(better, res.n_iter, best.n_iter),
            )
    return best


# ---------------------------------------------------------------------------------------------------------------
# position encoding


def position_encoding_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sinusoids of integer positions: [sin(p * w_i), cos(p * w_i)], w_i = 10000^(-i / (dim/2))."""
    half = dim // 2
    omega = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float64, device=pos.device) / half))
    ang = pos.double()[:, None] * omega[None, :]
    return torch.cat([ang.sin(), ang.cos()], dim=1)


def position_encoding_3d(T: int, H: int, W: int, dim: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """(T, H, W, dim): dim/3 channels each encode t, y and x (in that order) with position_encoding_1d."""
    d = dim // 3
    pt = position_encoding_1d(torch.arange(T, device=device), d)
    py = position_encoding_1d(torch.arange(H, device=device), d)
    px = position_encoding_1d(torch.arange(W, device=device), d)
    out = torch.cat([
        pt[:, None, None, :].expand(T, H, W, d),
        py[None, :, None, :].expand(T, H, W, d),
        px[None, None, :, :].expand(T, H, W, d),
    ], dim=-1)
    return out.to(dtype)
