"""kmeans standard configurations (issue 5).

km-videos : B=64 problems, N=8*32*32 points, D=160, K=5, 100 iterations (Mask-VOS pseudo labels, a batch of videos)
km-large  : B=1, N=100*60*107, D=128, K=7, 100 iterations (one long video at 1/8 of 480p)
km-cpu    : B=8, N=4096, D=64, K=5, 100 iterations (the CPU configuration)

Data: Gaussian points (see make_data). Every implementation starts from the same initial centres and runs full-batch Lloyd with tol=0 and at most 100
iterations (scikit-learn still stops when the labels stop changing; so does vosops), so all do the same work; the
iterations actually run and the mean inertia are recorded per row ("iters", "inertia") to check "equal iterations,
equal inertia". Baselines: scikit-learn KMeans (lloyd) per problem on CPU; fast-pytorch-kmeans MultiKMeans on GPU
(the reference when it is not installed). Also timed: scikit-learn MiniBatchKMeans and vosops' mini-batch mode
(MB_STEPS steps of MB_BATCH points; a different algorithm, so compare these two rows with each other), and when
installed faiss-cpu Kmeans and fast-pytorch-kmeans.
"""

from __future__ import annotations

import importlib.util

import torch

import vosops
from vosops import _backends

from .registry import Case

CONFIGS = {
    "km-videos": {"B": 64, "N": 8 * 32 * 32, "D": 160, "K": 5, "iters": 100, "devices": ("cuda",)},
    "km-large": {"B": 1, "N": 100 * 60 * 107, "D": 128, "K": 7, "iters": 100, "devices": ("cuda",)},
    "km-cpu": {"B": 8, "N": 4096, "D": 64, "K": 5, "iters": 100, "devices": ("cpu", "cuda")},
}


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def make_data(B: int, N: int, D: int, K: int, device: str, seed: int = 0):
    """Gaussian points (no cluster structure, so Lloyd runs tens of iterations, most of the 100 allowed: the
    per-iteration cost is what is measured), and the first K points of each problem as the common initial centres."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g)
    return x.to(device), x[:, :K].clone().to(device)


def _vosops(backend, batch_size=None, cuda_graph=False):
    def run(x, init, iters):
        r = vosops.kmeans(x, init.shape[1], init=init, iters=iters, tol=0.0, batch_size=batch_size, seed=0,
                          cuda_graph=cuda_graph, backend=backend)
        return r.n_iter.float().mean().item(), r.inertia.double().mean().item()
    return run


def _sklearn(x, init, iters):
    from sklearn.cluster import KMeans

    X, C = x.cpu().numpy(), init.cpu().numpy()
    its, inert = [], []
    for b in range(X.shape[0]):
        km = KMeans(C.shape[1], init=C[b], n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd").fit(X[b])
        its.append(km.n_iter_)
        inert.append(km.inertia_)
    return sum(its) / len(its), sum(inert) / len(inert)


MB_BATCH, MB_STEPS = 1024, 20  # mini-batch rows: 20 steps of 1024 points per problem (about 5 epochs of km-cpu)


def _sklearn_minibatch(x, init, iters):
    from sklearn.cluster import MiniBatchKMeans

    X, C = x.cpu().numpy(), init.cpu().numpy()
    inert = []
    bs = min(MB_BATCH, X.shape[1])
    for b in range(X.shape[0]):
        # max_iter counts epochs: MB_STEPS steps of bs points
        km = MiniBatchKMeans(C.shape[1], init=C[b], n_init=1, batch_size=bs, reassignment_ratio=0.0, tol=0.0,
                             max_no_improvement=None, max_iter=max(1, MB_STEPS * bs // X.shape[1]))
        km.fit(X[b])
        inert.append(km.inertia_)
    return float(MB_STEPS), sum(inert) / len(inert)


def _vosops_minibatch(backend):
    def run(x, init, iters):
        r = vosops.kmeans(x, init.shape[1], init=init, iters=MB_STEPS, tol=0.0,
                          batch_size=min(MB_BATCH, x.shape[1]), seed=0, backend=backend)
        return r.n_iter.float().mean().item(), r.inertia.double().mean().item()
    return run


def _faiss(x, init, iters):
    import faiss

    X, C = x.cpu().float().numpy(), init.cpu().float().numpy()
    inert = []
    for b in range(X.shape[0]):
        km = faiss.Kmeans(X.shape[2], C.shape[1], niter=iters, max_points_per_centroid=X.shape[1], seed=0)
        km.train(X[b], init_centroids=C[b])
        inert.append(float(km.obj[-1]))
    return float(iters), sum(inert) / len(inert)


def _fast_pytorch_kmeans(x, init, iters):
    from fast_pytorch_kmeans import MultiKMeans

    km = MultiKMeans(init.shape[1], max_iter=iters, tol=0.0, init_method="random")
    labels = km.fit_predict(x, centroids=init.clone())
    d = ((x - km.centroids.gather(1, labels[..., None].expand_as(x))) ** 2).sum(-1)
    return float(iters), d.sum(1).double().mean().item()


def _impls(device: str) -> dict:
    impls = {"reference": _vosops("reference")}
    for b in ("cpu", "cuda", "triton"):
        if _backends.why_unusable(b, "kmeans_step", device) is None and not (b == "triton" and device == "cpu"):
            impls[b] = _vosops(b)
            impls[f"{b}-minibatch"] = _vosops_minibatch(b)
            if device == "cuda":
                impls[f"{b}-graph"] = _vosops(b, cuda_graph=True)
    if device == "cpu":
        impls["sklearn"] = _sklearn
        impls["sklearn-minibatch"] = _sklearn_minibatch
        if _have("faiss"):
            impls["faiss-cpu"] = _faiss
    if _have("fast_pytorch_kmeans") and _have("psutil"):
        impls["fast-pytorch-kmeans"] = _fast_pytorch_kmeans
    return impls


def _baseline(device: str, impls: dict) -> str:
    if device == "cpu":
        return "sklearn"
    return "fast-pytorch-kmeans" if "fast-pytorch-kmeans" in impls else "reference"


def cases(device: str) -> list[Case]:
    out = []
    for config, spec in CONFIGS.items():
        if device not in spec["devices"]:
            continue
        B, N, D, K, iters = spec["B"], spec["N"], spec["D"], spec["K"], spec["iters"]
        impls = _impls(device)
        base = _baseline(device, impls)
        for impl, fn in impls.items():
            extra: dict = {"iters": None, "inertia": None}

            def setup(fn=fn, extra=extra, B=B, N=N, D=D, K=K, iters=iters):
                x, init = make_data(B, N, D, K, device)
                extra["iters"], extra["inertia"] = fn(x, init, iters)  # one run, also the warm-up
                return lambda: fn(x, init, iters)

            out.append(Case(op="kmeans", config=config, device=device, impl=impl, direction="fwd", setup=setup,
                            bytes=iters * B * N * D * 4, flops=iters * B * N * K * D * 3, baseline=impl == base,
                            slow=device == "cpu" and impl in ("reference", "fast-pytorch-kmeans", "faiss-cpu"),
                            extra=extra))
    return out
