"""vosops.kmeans / kmeans_predict: many small independent k-means problems at once, on every backend.

The loop (seeding, update, empty-cluster relocation, convergence flags) is vosops.reference.kmeans; a backend
supplies the fused pass over x: `kmeans_step` (nearest centre, its distance, per-cluster sums and counts) and
`kmeans_assign` (nearest centre and distance). Both are registered ops for the cpu/cuda backends
(torch.ops.vosops.kmeans_step / kmeans_assign) and Triton custom ops for the triton backend. The cpu backend also
runs the whole full-batch Lloyd loop as one native call (torch.ops.vosops.kmeans_lloyd, the reference's `lloyd`).
On a GPU the rest of each Lloyd iteration (empty-cluster relocation, update, convergence flags: the reference's
`lloyd_update`) is one native kernel, torch.ops.vosops.kmeans_update, for the cuda and triton steps alike.
"""

from __future__ import annotations

import torch

from .. import _backends, _native, _validate
from .._autocast import autocast_policy
from ..reference import kmeans as _ref
from ..reference.kmeans import KMeansResult

INITS = ("k-means++", "random")


def _steps(backend: str):
    """(step, assign) of a backend: its fused passes over x."""
    if backend == "reference":
        return _ref.kmeans_step, _ref.kmeans_assign
    if backend == "triton":
        from ..triton import kmeans as _tk

        return _tk.kmeans_step, _tk.kmeans_assign
    return torch.ops.vosops.kmeans_step, torch.ops.vosops.kmeans_assign


# Cluster indices are 32-bit in the native and Triton kernels (csrc/kmeans/kmeans.h checks the same bound).
MAX_CLUSTERS = 2**31 - 1
CUDA_UPDATE_MAX_K = 1024  # csrc/kmeans/kmeans_cuda.cuh kCudaUpdateMaxK: the update kernel's per-cluster lists


def _update(backend: str, device: torch.device, K: int):
    """The rest of a Lloyd iteration after the step: on a GPU the native kernel (torch.ops.vosops.kmeans_update, for
    the cuda and triton steps alike) when it is built, else (and for the reference backend) the reference's ops."""
    if (backend in ("cuda", "triton") and device.type == "cuda" and K <= CUDA_UPDATE_MAX_K
            and _native.has_kernel("kmeans_update", "CUDA")):
        return torch.ops.vosops.kmeans_update
    return _ref.lloyd_update


def _native_lloyd(x, lengths, centers, iters, tol):
    """The reference's lloyd (same arguments, same result) as one native call: the whole loop in C++."""
    c, labels, mind, n_iter = torch.ops.vosops.kmeans_lloyd(x, lengths, centers, iters, tol)
    return KMeansResult(c, labels, mind.sum(1), n_iter)


def _int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return v


def _check_points(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    _validate.tensor("x", x)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be (N, D) or (B, N, D) points, got shape {tuple(x.shape)}")
    _validate.non_empty("x", x)
    single = x.dim() == 2
    return (x[None] if single else x), single


def _check_lengths(lengths, B: int, N: int, device) -> torch.Tensor:
    if lengths is None:
        return torch.full((B,), N, dtype=torch.int64, device=device)
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"lengths must be a torch.Tensor of int64 or int32, got {type(lengths).__name__}")
    if lengths.dtype not in (torch.int64, torch.int32) or lengths.shape != (B,):
        raise ValueError(f"lengths must be an integer tensor of shape ({B},) (one per problem), got "
                         f"{lengths.dtype} {tuple(lengths.shape)}")
    lengths = lengths.to(device=device, dtype=torch.int64)
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 1 or hi > N:
        raise ValueError(f"lengths must lie in [1, {N}] (the number of points per problem), got [{lo}, {hi}]")
    return lengths


def _check_finite(x: torch.Tensor, lengths: torch.Tensor) -> None:
    if bool((lengths == x.shape[1]).all()):
        # one fast reduction: a NaN or inf anywhere makes the sum non-finite (a finite overflow is re-checked)
        finite = bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())
    else:
        finite = bool(torch.where(_ref.valid_mask(lengths, x.shape[1])[..., None], torch.isfinite(x), True).all())
    if not finite:
        raise ValueError("x must be finite: it contains NaN or inf among the valid points")


def _check_centroids(name: str, c, B: int, D: int, device) -> torch.Tensor:
    _validate.tensor(name, c)
    if c.dim() == 2:
        c = c[None].expand(B, *c.shape)
    if c.dim() != 3 or c.shape[0] != B or c.shape[2] != D or c.shape[1] < 1:
        raise ValueError(f"{name} must be (K, {D}) or ({B}, K, {D}), got shape {tuple(c.shape)}")
    if c.shape[1] > MAX_CLUSTERS:
        raise ValueError(f"{name} has K = {c.shape[1]} centres; at most 2**31 - 1 are supported")
    if c.device != device:
        raise ValueError(f"{name} is on {c.device} but x is on {device}; they must match")
    if not bool(torch.isfinite(c).all()):
        raise ValueError(f"{name} must be finite")
    return c


@autocast_policy("off", "x")
def kmeans(
    x: torch.Tensor,
    num_clusters: int,
    *,
    iters: int = 100,
    tol: float = 1e-4,
    init="k-means++",
    n_init: int = 1,
    batch_size: int | None = None,
    lengths: torch.Tensor | None = None,
    seed: int | None = None,
    cuda_graph: bool = False,
    backend: str | None = None,
) -> KMeansResult:
    """k-means on B independent problems at once.

    x: (B, N, D) (or (N, D), one problem) float32/64/16/bf16 points. num_clusters: K >= 1, at most the number of
    points of every problem. iters: maximum Lloyd iterations (full batch) or mini-batch steps. tol: relative
    tolerance; a problem stops when the squared centre shift summed over its centres is <= tol times the mean
    per-feature variance of its points (scikit-learn's rule), or when its labels stop changing.
    init: "k-means++" (greedy, scikit-learn's), "random" (K distinct points) or initial centres (K, D)/(B, K, D).
    n_init: restarts, each problem keeps its lowest inertia. batch_size: None = full-batch Lloyd; b = scikit-learn
    MiniBatchKMeans updates on min(b, points of the problem) points drawn per step and problem (with replacement,
    reassignment_ratio=0).
    lengths: (B,) int, problem b uses only its first lengths[b] points (the rest are ignored and labelled -1).
    seed: the seed of the random numbers of the seeding and the batches (None: drawn from torch's global
    generator). Every problem draws the same numbers (`reference.kmeans.Draws`), so with a seed a problem's result
    is what it gets alone, whatever else is in the batch; and the same on every backend and device up to rounding.
    cuda_graph: on a GPU, replay the full-batch Lloyd iterations from a CUDA graph instead of launching each of an
    iteration's ops from Python (the same results; for problems small enough that launches dominate).

    Returns KMeansResult(centroids (B, K, D), labels (B, N) int64, inertia (B,), n_iter (B,)) with the B axis
    dropped for (N, D) input. Centroids/inertia are float32 for half inputs, else x's dtype. Not differentiable.
    """
    x, single = _check_points(x)
    B, N, D = x.shape
    K = _int("num_clusters", num_clusters, 1)
    if K > MAX_CLUSTERS:
        raise ValueError(f"num_clusters must be <= 2**31 - 1, got {K}")
    _int("iters", iters, 1)
    _int("n_init", n_init, 1)
    if batch_size is not None:
        _int("batch_size", batch_size, 1)
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if seed is not None:
        _int("seed", seed, 0)
        if seed >= 2**63:
            raise ValueError(f"seed must be < 2**63, got {seed}")
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
    lengths = _check_lengths(lengths, B, N, x.device)
    if K > int(lengths.min()):
        raise ValueError(f"num_clusters ({K}) must be <= the number of points of every problem "
                         f"(smallest: {int(lengths.min())})")
    if isinstance(init, torch.Tensor):
        init = _check_centroids("init", init, B, D, x.device)
        if init.shape[1] != K:
            raise ValueError(f"init has {init.shape[1]} centres but num_clusters is {K}")
    else:
        _validate.choice("init", init, INITS)
    x = x.detach()
    _check_finite(x, lengths)
    chosen = _backends.select("kmeans_step", x.device, backend, dtype=x.dtype)
    step, assign = _steps(chosen)
    x = x.contiguous()
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    check_every = 1 if x.device.type == "cpu" else 10
    full_batch = None
    update = _update(chosen, x.device, K)
    if chosen == "cpu":
        full_batch = _native_lloyd
    elif cuda_graph and x.device.type == "cuda":
        from ._kmeans_graph import lloyd_cuda_graph

        def full_batch(x, lengths, centers, iters, tol):
            return lloyd_cuda_graph(x, lengths, centers, iters, tol, step=step, assign=assign,
                                    check_every=check_every, update=update)
    res = _ref.kmeans(x, K, iters=iters, tol=float(tol), init=init, n_init=n_init, batch_size=batch_size,
                      lengths=lengths, draws=_ref.Draws(seed), step=step, assign=assign, check_every=check_every,
                      full_batch=full_batch, update=update)
    if single:
        res = KMeansResult(*(t[0] for t in res))
    return res


@autocast_policy("off", "x")
def kmeans_predict(x: torch.Tensor, centroids: torch.Tensor, *, lengths: torch.Tensor | None = None,
                   backend: str | None = None) -> torch.Tensor:
    """Index of the nearest centroid (squared Euclidean, ties to the lower index) of every point.

    x: (N, D) or (B, N, D); centroids: (K, D) (shared by all problems) or (B, K, D). lengths as in kmeans
    (points past a problem's length get -1). Returns int64 labels (N,) or (B, N).
    """
    x, single = _check_points(x)
    B, N, D = x.shape
    c = _check_centroids("centroids", centroids, B, D, x.device)
    lengths = _check_lengths(lengths, B, N, x.device)
    chosen = _backends.select("kmeans_step", x.device, backend, dtype=x.dtype)
    _, assign = _steps(chosen)
    labels, _ = assign(x.detach().contiguous(), lengths, c.detach().to(_ref.acc_dtype(x.dtype)).contiguous())
    return labels[0] if single else labels


def _register_native() -> None:
    @torch.library.register_fake("vosops::kmeans_step")
    def _(x, lengths, centers):
        B, N, D = x.shape
        K = centers.shape[1]
        acc = _ref.acc_dtype(x.dtype)
        return (x.new_empty((B, N), dtype=torch.int64), x.new_empty((B, N), dtype=acc),
                x.new_empty((B, K, D), dtype=acc), x.new_empty((B, K), dtype=torch.int64))

    @torch.library.register_fake("vosops::kmeans_lloyd")
    def _(x, lengths, centers, iters, tol):
        B, N, D = x.shape
        acc = _ref.acc_dtype(x.dtype)
        return (x.new_empty(centers.shape, dtype=acc), x.new_empty((B, N), dtype=torch.int64),
                x.new_empty((B, N), dtype=acc), x.new_empty((B,), dtype=torch.int64))

    @torch.library.register_fake("vosops::kmeans_update")
    def _(x, lengths, labels, mindist, sums, counts, centers, active, n_iter, labels_equal, tol):
        return (centers.new_empty(centers.shape, dtype=_ref.acc_dtype(x.dtype)), active.new_empty(active.shape),
                n_iter.new_empty(n_iter.shape))

    @torch.library.register_fake("vosops::kmeans_assign")
    def _(x, lengths, centers):
        B, N, D = x.shape
        return x.new_empty((B, N), dtype=torch.int64), x.new_empty((B, N), dtype=_ref.acc_dtype(x.dtype))


if _native.LOADED and _native.has_kernel("kmeans_step", "CPU"):
    _register_native()
