"""kmeans: the reference against scikit-learn, every backend against the reference, the Mask-VOS pseudo labels."""

import glob
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.datasets import make_blobs

import vosops
from vosops import reference, testing
from vosops.reference import kmeans as R

from conftest import backend_device_params

BACKENDS = backend_device_params("kmeans_step")
DAVIS = os.path.join(os.environ.get("VOSOPS_DAVIS2016_MINI", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "davis2016-mini")),
    "JPEGImages", "480p")  # ../shared beside the checkout, as CI has it


def blobs(n, d, k, *, std=1.0, seed=0, dtype=torch.float64):
    X, y = make_blobs(n, n_features=d, centers=k, cluster_std=std, random_state=seed)
    return torch.from_numpy(X).to(dtype), y


def permutation_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether the two labelings are the same partition (a bijection maps one onto the other)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# --- the reference against scikit-learn -----------------------------------------------------------------------

@pytest.mark.parametrize("tol", [1e-4, 0.0])
def test_reference_lloyd_matches_sklearn_from_the_same_centres(tol):
    X, _ = blobs(400, 5, 6, std=2.5, seed=1)
    init = X[[0, 50, 100, 150, 200, 250]]
    res = vosops.kmeans(X, 6, init=init, iters=300, tol=tol, backend="reference")
    sk = KMeans(6, init=init.numpy(), n_init=1, max_iter=300, tol=tol, algorithm="lloyd").fit(X.numpy())
    assert int(res.n_iter) == sk.n_iter_
    np.testing.assert_array_equal(res.labels.numpy(), sk.labels_)
    np.testing.assert_allclose(res.centroids.numpy(), sk.cluster_centers_, atol=1e-10)
    np.testing.assert_allclose(float(res.inertia), sk.inertia_, rtol=1e-10)


def test_reference_relocates_empty_clusters_like_sklearn():
    X, _ = blobs(300, 4, 4, seed=2)
    init = torch.cat([X[:3], torch.full((2, 4), 1e3, dtype=torch.float64)])  # two centres no point is near
    res = vosops.kmeans(X, 5, init=init, iters=50, backend="reference")
    sk = KMeans(5, init=init.numpy(), n_init=1, max_iter=50, algorithm="lloyd").fit(X.numpy())
    np.testing.assert_array_equal(res.labels.numpy(), sk.labels_)
    np.testing.assert_allclose(res.centroids.numpy(), sk.cluster_centers_, atol=1e-10)
    assert (np.bincount(res.labels.numpy(), minlength=5) > 0).all()


def test_reference_kmeans_plusplus_is_a_valid_greedy_seeding():
    X, y = blobs(200, 3, 5, std=0.2, seed=3)
    c = R.kmeans_plusplus(X[None], torch.tensor([200]), 5, R.Draws(0))[0]
    # every centre is a data point, all distinct, and they spread over the 5 blobs
    d = ((c[:, None] - X[None]) ** 2).sum(-1)
    assert (d.min(1).values == 0).all() and len(set(d.argmin(1).tolist())) == 5
    assert len(set(y[d.argmin(1).numpy()].tolist())) == 5


def test_reference_minibatch_matches_sklearn_on_the_same_batches():
    X, _ = blobs(600, 4, 5, std=2.0, seed=4)
    init = X[:5].clone()
    batches = R.sample_batches(torch.tensor([600]), 20, 64, R.Draws(0))  # (steps, 1, 64)
    res = R.minibatch(X[None], torch.tensor([600]), init[None], batches, tol=torch.zeros(1))
    sk = MiniBatchKMeans(5, init=init.numpy(), n_init=1, batch_size=64, reassignment_ratio=0.0)
    for t in range(batches.shape[0]):
        sk.partial_fit(X[batches[t, 0]].numpy())
    np.testing.assert_allclose(res.centroids[0].numpy(), sk.cluster_centers_, atol=1e-10)
    np.testing.assert_array_equal(res.labels[0].numpy(), sk.predict(X.numpy()))


# --- the fused passes of every backend against the reference ----------------------------------------------------

def _step_inputs(device, B=3, N=37, D=5, K=4):
    # drawn on the CPU: a GPU run sees the numbers the CPU run checked (a device generator draws others)
    x = torch.randn(B, N, D) * 2
    lengths = torch.tensor([N, 11, K][:B] + [N] * max(0, B - 3))
    centers = torch.randn(B, K, D) * 2
    return x.to(device), lengths.to(device), centers.to(device)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
@pytest.mark.parametrize("shape", [(3, 37, 5, 4), (2, 1100, 3, 7), (1, 9, 17, 1), (2, 50, 19, 11)])
def test_step_and_assign_match_reference(backend, device, layout, shape):
    B, N, D, K = shape
    for dtype in testing.backend_dtypes(backend, device):
        x, lengths, centers = _step_inputs(device, B, N, D, K)
        step, assign = vosops.ops.kmeans._steps(backend)
        # centres in the accumulation dtype, as the driver passes them
        acc = R.acc_dtype(dtype)
        for fn, ref in ((step, reference.kmeans_step), (assign, reference.kmeans_assign)):
            testing.check_against_reference(
                lambda x, c: fn(x, lengths, c.to(acc)), lambda x, c: ref(x, lengths, c),
                {"x": x, "c": centers}, dtype=dtype, layout=layout,
                # sums over up to ~1000 points of order 2
                atol=1e-3 if dtype in (torch.float16, torch.bfloat16) else None,
            )


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_step_sums_half_inputs_in_float32(backend, device):
    """float16 points are summed per cluster in float32: two clusters of ~75 points around +-1500, whose sums pass
    float16's range (65504) after 45 points."""
    g = torch.Generator().manual_seed(4)
    B, N, D = 2, 150, 3
    x = 1500.0 + torch.randint(-16, 17, (B, N, D), generator=g).double()
    x[:, 1::2] *= -1
    lengths = torch.tensor([N, 131])
    centers = x[:, :2] + 0.5
    step, _ = vosops.ops.kmeans._steps(backend)
    for dtype in testing.backend_dtypes(backend, device):
        if dtype == torch.float64:
            continue
        testing.check_against_reference(
            lambda x, c: step(x, lengths.to(device), c.to(R.acc_dtype(dtype))),
            lambda x, c: reference.kmeans_step(x, lengths, c),
            {"x": x.to(device), "c": centers.to(device)}, dtype=dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("batch_size", [None, 16])
def test_full_kmeans_matches_reference_from_the_same_centres(backend, device, batch_size):
    dtype = torch.float64 if backend == "cpu" else torch.float32
    X, _ = blobs(3 * 150, 6, 5, std=3.0, seed=5)
    x = X.reshape(3, 150, 6).to(device=device, dtype=dtype)
    lengths = torch.tensor([150, 97, 40], device=device)
    init = x[:, :5].clone()
    kw = dict(init=init, lengths=lengths, batch_size=batch_size, seed=0, iters=100 if batch_size is None else 12)
    ref = vosops.kmeans(x, 5, backend="reference", **kw)
    out = vosops.kmeans(x, 5, backend=backend, **kw)
    torch.testing.assert_close(out.labels, ref.labels, atol=0, rtol=0)
    torch.testing.assert_close(out.n_iter, ref.n_iter)
    torch.testing.assert_close(out.centroids, ref.centroids, **({} if dtype == torch.float64 else
                                                                dict(atol=1e-4, rtol=1e-4)))
    torch.testing.assert_close(out.inertia, ref.inertia, rtol=1e-5, atol=1e-5)
    assert (out.labels[1, 97:] == -1).all() and (out.labels[2, 40:] == -1).all()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("batch_size", [None, 32])
@pytest.mark.parametrize("init", ["given", "k-means++", "random"])
def test_ragged_batch_equals_each_problem_alone(backend, batch_size, init):
    # with a seed, each problem of a ragged batch gets what it gets alone: every problem draws the same numbers
    if backend == "cpu" and vosops._backends.why_unusable("cpu", "kmeans_step", "cpu"):
        pytest.skip("native kernels not built")
    X, _ = blobs(3 * 120, 4, 4, std=2.0, seed=6)
    x = X.reshape(3, 120, 4)
    lengths = torch.tensor([120, 57, 9])
    given = x[:, :4].clone()
    x[1, 57:] = 1e6  # padding must be ignored, whatever it holds
    x[2, 9:] = -3e5
    kw = dict(batch_size=batch_size, iters=40, seed=5, n_init=2, backend=backend)
    batched = vosops.kmeans(x, 4, init=given if init == "given" else init, lengths=lengths, **kw)
    for b in range(3):
        n = int(lengths[b])
        alone = vosops.kmeans(x[b, :n], 4, init=given[b] if init == "given" else init, **kw)
        torch.testing.assert_close(batched.labels[b, :n], alone.labels)
        torch.testing.assert_close(batched.centroids[b], alone.centroids)
        torch.testing.assert_close(batched.inertia[b], alone.inertia)
        torch.testing.assert_close(batched.n_iter[b], alone.n_iter)
    # and a batch's problem does not depend on its neighbours
    other = vosops.kmeans(torch.stack([x[0], torch.randn(120, 4, dtype=x.dtype)]), 4, init=given[:2]
                          if init == "given" else init, **kw)
    torch.testing.assert_close(other.centroids[0], batched.centroids[0])


def test_random_init_picks_distinct_points_uniformly():
    x = torch.arange(10, dtype=torch.float64)[None, :, None]
    picks = torch.stack([R.random_init(x, torch.tensor([7]), 7, R.Draws(s))[0, :, 0] for s in range(300)])
    assert all(sorted(p.tolist()) == list(range(7)) for p in picks)  # 7 of 7 valid points: each once
    first = torch.stack([R.random_init(x, torch.tensor([10]), 3, R.Draws(s))[0, :, 0] for s in range(2000)])
    assert all(len(set(p.tolist())) == 3 for p in first)
    counts = torch.bincount(first.flatten().long(), minlength=10).double()
    assert counts.min() > 0.75 * 600 and counts.max() < 1.25 * 600  # 6000 picks over 10 points


def test_draws_are_a_function_of_seed_restart_purpose_and_index():
    d = R.Draws(3)
    a = d.uniform(5, R.Draws.MINI_BATCH, 2)
    torch.testing.assert_close(d.uniform(3, R.Draws.MINI_BATCH, 2), a[:3])  # the first 3 of 5 are the 3 alone
    assert not torch.equal(d.uniform(5, R.Draws.MINI_BATCH, 3), a)
    assert not torch.equal(d.uniform(5, R.Draws.RANDOM_INIT, 2), a)
    assert not torch.equal(R.Draws(4).uniform(5, R.Draws.MINI_BATCH, 2), a)
    d.restart = 1
    assert not torch.equal(d.uniform(5, R.Draws.MINI_BATCH, 2), a)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_predict_matches_reference(backend, device):
    x = torch.randn(2, 30, 6, device=device)
    c = torch.randn(4, 6, device=device)
    out = vosops.kmeans_predict(x, c, backend=backend)
    ref = reference.kmeans_assign(x.double(), torch.tensor([30, 30], device=device), c.double().expand(2, 4, 6))[0]
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    single = vosops.kmeans_predict(x[0], c, backend=backend)
    torch.testing.assert_close(single, ref[0], atol=0, rtol=0)


# --- quality against scikit-learn --------------------------------------------------------------------------------

def _sklearn_best(X: np.ndarray, k: int) -> float:
    return KMeans(k, n_init=10, random_state=0).fit(X).inertia_


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_inertia_within_one_percent_of_sklearn_on_blobs(backend):
    X, _ = blobs(2 * 300, 8, 6, std=3.0, seed=7)
    x = X.reshape(2, 300, 8).float()
    res = vosops.kmeans(x, 6, n_init=10, seed=0, backend=backend)
    for b in range(2):
        best = _sklearn_best(x[b].double().numpy(), 6)
        assert float(res.inertia[b]) <= 1.01 * best, (b, float(res.inertia[b]), best)


def _real_features():
    """Pixels of a DAVIS frame at 1/16 resolution: Lab colour and scaled position, a real-image distribution."""
    import cv2

    files = sorted(glob.glob(os.path.join(DAVIS, "blackswan", "*.jpg")))[:1]
    feats = []
    for f in files:
        img = cv2.resize(cv2.imread(f), (54, 30), interpolation=cv2.INTER_AREA)
        lab = cv2.cvtColor(img, cv2.COLOR_BGR2LAB).astype(np.float32) / 255.0
        yy, xx = np.mgrid[0:30, 0:54].astype(np.float32) / 54.0
        feats.append(np.concatenate([lab.reshape(-1, 3), yy.reshape(-1, 1), xx.reshape(-1, 1)], 1))
    return torch.from_numpy(np.stack(feats))


@pytest.mark.skipif(not os.path.isdir(DAVIS), reason="DAVIS-2016 mini data not present")
@pytest.mark.parametrize("backend", ["cpu"])
def test_inertia_within_one_percent_of_sklearn_on_real_features(backend):
    x = _real_features()
    res = vosops.kmeans(x, 5, n_init=10, seed=0, backend=backend)
    for b in range(x.shape[0]):
        best = _sklearn_best(x[b].double().numpy(), 5)
        assert float(res.inertia[b]) <= 1.01 * best, (b, float(res.inertia[b]), best)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_labels_equal_up_to_permutation_on_separated_blobs(backend):
    X, y = blobs(500, 3, 4, std=0.3, seed=8)
    res = vosops.kmeans(X.float(), 4, seed=1, n_init=3, backend=backend)
    assert permutation_equal(res.labels.numpy(), y)
    sk = KMeans(4, n_init=10, random_state=0).fit(X.numpy())
    assert permutation_equal(res.labels.numpy(), sk.labels_)


def test_minibatch_reaches_good_inertia():
    X, y = blobs(2000, 4, 5, std=0.5, seed=9)
    res = vosops.kmeans(X.float(), 5, batch_size=128, iters=60, n_init=3, seed=0, tol=0.0)
    assert float(res.inertia) <= 1.05 * _sklearn_best(X.numpy(), 5)
    assert res.labels.shape == (2000,) and int(res.n_iter) == 60  # tol=0: never stops early
    early = vosops.kmeans(X.float(), 5, batch_size=128, iters=60, seed=0, tol=1e-3)
    assert 1 <= int(early.n_iter) < 60


# --- empty clusters, determinism, errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + BACKENDS)
def test_empty_clusters_are_reseeded_at_the_farthest_point(backend, device):
    X, _ = blobs(200, 3, 3, seed=10)
    x = X.float().to(device)
    init = torch.cat([x[:2], torch.full((2, 3), 500.0, device=device)])  # two centres that attract nothing
    res = vosops.kmeans(x, 4, init=init, iters=1, backend=backend)
    d = ((x[:, None] - init[None, :2]) ** 2).sum(-1).min(1).values
    far = d.topk(2).indices
    # after one step the first empty centre sits on the farthest point, the second on the next farthest
    torch.testing.assert_close(res.centroids[2:], x[far])
    assert (torch.bincount(res.labels, minlength=4) > 0).all()


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + BACKENDS)
def test_empty_clusters_take_tied_farthest_points_lowest_index_first(backend, device):
    # three distinct points repeated: five centres, so every iteration re-seeds among exactly tied distances
    x = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]], device=device).repeat(40, 1)
    init = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [9, 9, 9], [8, 8, 8]], device=device)
    res = vosops.kmeans(x, 5, init=init, iters=1, backend=backend)
    # every point lies on a centre (distance 0): the empty clusters take points 0 and 1, in that order
    torch.testing.assert_close(res.centroids[3:].cpu(), x[:2].cpu())
    ref = vosops.kmeans(x.cpu().double(), 5, seed=0, backend="reference")
    out = vosops.kmeans(x, 5, seed=0, backend=backend)
    torch.testing.assert_close(out.centroids.cpu().double(), ref.centroids)
    torch.testing.assert_close(out.labels.cpu(), ref.labels)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_tolerance_of_data_far_from_the_origin(backend):
    if backend == "cpu" and vosops._backends.why_unusable("cpu", "kmeans_step", "cpu"):
        pytest.skip("native kernels not built")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2000, 2, generator=g) + 1000.0  # E[x^2] - E[x]^2 cancels to 0 in float32
    want = float(np.var(x.double().numpy(), axis=0).mean()) * 1e-4
    for xs in (x[None], torch.cat([x, torch.zeros(3, 2)])[None]):  # alone, and padded (the masked path)
        assert float(R.scaled_tol(xs, torch.tensor([2000]), 1e-4)[0]) == pytest.approx(want, rel=1e-3)
    assert float(R.scaled_tol(x[None], torch.tensor([2000]), 1e-4, chunk=7)[0]) == pytest.approx(want, rel=1e-3)
    init = x[:8].clone()
    alone = vosops.kmeans(x, 8, init=init, iters=300, backend=backend)
    padded = vosops.kmeans(torch.cat([x, torch.zeros(1, 2)])[None], 8, init=init[None], iters=300,
                           lengths=torch.tensor([2000]), backend=backend)
    sk = KMeans(8, init=init.double().numpy(), n_init=1, max_iter=300, algorithm="lloyd").fit(x.double().numpy())
    assert int(alone.n_iter) == int(padded.n_iter[0]) == sk.n_iter_
    assert torch.equal(alone.labels, padded.labels[0, :2000])


def test_minibatch_ignores_the_first_step_for_convergence_as_sklearn():
    # every point sits on its centre, so every step's centre shift is 0: scikit-learn still takes a second step
    c = torch.tensor([[0.0, 0], [5, 0], [0, 5]], dtype=torch.float64)
    X = c.repeat_interleave(50, 0)
    res = vosops.kmeans(X, 3, init=c, batch_size=16, iters=100, tol=1e-4, seed=0, backend="reference")
    sk = MiniBatchKMeans(3, init=c.numpy(), n_init=1, batch_size=16, reassignment_ratio=0.0, tol=1e-4,
                         max_iter=100).fit(X.numpy())
    assert int(res.n_iter) == sk.n_steps_ == 2


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_minibatch_batch_size_is_capped_at_each_problems_points(backend):
    if backend == "cpu" and vosops._backends.why_unusable("cpu", "kmeans_step", "cpu"):
        pytest.skip("native kernels not built")
    X, _ = blobs(2 * 40, 3, 3, seed=7)
    x = X.reshape(2, 40, 3)
    lengths = torch.tensor([40, 12])
    init = x[:, :3].clone()
    # a batch size far above N draws N points a step (not 10**6), problem 1 12 of them, as scikit-learn would
    big = vosops.kmeans(x, 3, init=init, lengths=lengths, batch_size=10**6, iters=5, tol=0.0, seed=1,
                        backend=backend)
    batches = R.sample_batches(lengths, 5, 40, R.Draws(1))
    for b in range(2):
        n = int(lengths[b])
        want = R.minibatch(x[b:b + 1, :n], lengths[b:b + 1], init[b:b + 1], batches[:, b:b + 1, :n],
                           tol=torch.zeros(1, dtype=x.dtype))
        torch.testing.assert_close(big.centroids[b], want.centroids[0])
        torch.testing.assert_close(big.labels[b, :n], want.labels[0])


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + BACKENDS)
@pytest.mark.parametrize("batch_size", [None, 16])
def test_same_seed_same_result(backend, device, batch_size):
    x = torch.randn(2, 60, 5, device=device)
    runs = [vosops.kmeans(x, 4, seed=123, n_init=2, iters=6, batch_size=batch_size, backend=backend)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    other = vosops.kmeans(x, 4, seed=124, n_init=2, iters=6, batch_size=batch_size, backend=backend)
    assert not torch.equal(other.centroids, runs[0].centroids)


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((torch.randn(5, 3), 6), {}, ValueError, r"num_clusters \(6\) must be <="),
        ((torch.randn(5, 3), 0), {}, ValueError, "num_clusters must be >= 1"),
        ((torch.randn(5, 3), 2**31), {}, ValueError, r"num_clusters must be <= 2\*\*31 - 1, got 2147483648"),
        # a stride-0 view: the bound is checked before anything the size of the centres is allocated
        ((torch.randn(5, 3), 2), {"init": torch.zeros(1, 3).expand(2**31, 3)}, ValueError,
         r"init has K = 2147483648 centres; at most 2\*\*31 - 1"),
        ((torch.randn(5, 3), 2.0), {}, TypeError, "num_clusters must be an int"),
        ((torch.randn(5, 3), 2), {"seed": 2**70}, ValueError, r"seed must be < 2\*\*63"),
        ((torch.randn(5), 2), {}, ValueError, r"x must be \(N, D\) or \(B, N, D\)"),
        ((torch.randn(1, 2, 5, 3), 2), {}, ValueError, r"x must be \(N, D\) or \(B, N, D\)"),
        ((torch.randint(0, 3, (5, 3)), 2), {}, TypeError, "x must be float32"),
        ((torch.randn(0, 3), 2), {}, ValueError, "x must not be empty"),
        ((torch.tensor([[0.0, 1.0], [float("nan"), 2.0], [1.0, 1.0]]), 2), {}, ValueError, "x must be finite"),
        ((torch.tensor([[0.0, 1.0], [float("inf"), 2.0], [1.0, 1.0]]), 2), {}, ValueError, "x must be finite"),
        ((torch.randn(2, 5, 3), 2), {"lengths": torch.tensor([5, 6])}, ValueError, "lengths must lie in"),
        ((torch.randn(2, 5, 3), 2), {"lengths": torch.tensor([5, 0])}, ValueError, "lengths must lie in"),
        ((torch.randn(2, 5, 3), 2), {"lengths": torch.tensor([5])}, ValueError, "lengths must be an integer"),
        ((torch.randn(2, 5, 3), 2), {"lengths": torch.tensor([5.0, 5.0])}, ValueError, "lengths must be an int"),
        ((torch.randn(2, 5, 3), 3), {"lengths": torch.tensor([5, 2])}, ValueError, r"smallest: 2"),
        ((torch.randn(5, 3), 2), {"init": "kmeans++"}, ValueError, "init must be one of"),
        ((torch.randn(5, 3), 2), {"init": torch.randn(3, 3)}, ValueError, "init has 3 centres"),
        ((torch.randn(5, 3), 2), {"init": torch.randn(2, 4)}, ValueError, r"init must be \(K, 3\)"),
        ((torch.randn(5, 3), 2), {"iters": 0}, ValueError, "iters must be >= 1"),
        ((torch.randn(5, 3), 2), {"n_init": 0}, ValueError, "n_init must be >= 1"),
        ((torch.randn(5, 3), 2), {"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ((torch.randn(5, 3), 2), {"tol": -1.0}, ValueError, "tol must be a number >= 0"),
        (([1.0], 2), {}, TypeError, "x must be a torch.Tensor"),
        ((torch.randn(2, 5, 3), 2), {"lengths": [5, 5]}, TypeError,
         "lengths must be a torch.Tensor of int64 or int32, got list"),
        ((torch.randn(5, 3), 2), {"init": torch.tensor([[0.0, 0, 0], [float("nan"), 0, 0]])}, ValueError,
         "init must be finite"),
        ((torch.randn(5, 3), 2), {"init": torch.zeros(2, 3, device="meta")}, ValueError,
         "init is on meta but x is on cpu"),
        ((torch.randn(5, 3), 2), {"cuda_graph": 1}, TypeError, "cuda_graph must be a bool, got int"),
    ],
)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bad_input_raises_clear_errors(args, kwargs, exc, match, backend):
    """On the reference backend too: the Python checks are all that guards the Triton kernels, and on the cpu
    backend the C++ checks would hide a missing one."""
    with vosops.use_backend(backend), pytest.raises(exc, match=match):
        vosops.kmeans(*args, **kwargs)


def test_predict_bad_input():
    with pytest.raises(ValueError, match=r"centroids must be \(K, 3\)"):
        vosops.kmeans_predict(torch.randn(5, 3), torch.randn(2, 4))
    with pytest.raises(TypeError, match="centroids must be a torch.Tensor"):
        vosops.kmeans_predict(torch.randn(5, 3), [[0.0, 0.0, 0.0]])
    # cluster indices are 32-bit in the kernels; a stride-0 view of 2^31 centres costs no memory
    with pytest.raises(ValueError, match=r"centroids has K = 2147483648 centres; at most 2\*\*31 - 1"):
        vosops.kmeans_predict(torch.randn(5, 3), torch.zeros(1, 3).expand(2**31, 3))


def test_native_ops_check_their_arguments_too():
    if vosops._backends.why_unusable("cpu", "kmeans_step", "cpu"):
        pytest.skip("native kernels not built")
    x, c, L = torch.randn(2, 5, 3), torch.randn(2, 2, 3), torch.tensor([5, 5])
    with pytest.raises(ValueError, match="centers must be"):
        torch.ops.vosops.kmeans_step(x, L, torch.randn(2, 2, 4))
    with pytest.raises(ValueError, match="lengths must lie in"):
        torch.ops.vosops.kmeans_step(x, torch.tensor([5, 9]), c)
    with pytest.raises(TypeError, match="lengths must be int64"):
        torch.ops.vosops.kmeans_assign(x, L.int(), c)
    with pytest.raises(ValueError, match="x must be"):
        torch.ops.vosops.kmeans_assign(torch.randn(5, 3), L, c)
    with pytest.raises(ValueError, match=r"K = 2147483648 centres; at most 2\^31 - 1"):
        torch.ops.vosops.kmeans_assign(x, L, torch.zeros(1, 1, 3).expand(2, 2**31, 3))


# --- registration and compile -------------------------------------------------------------------------------------

def test_opcheck_native():
    if vosops._backends.why_unusable("cpu", "kmeans_step", "cpu"):
        pytest.skip("native kernels not built")
    x, L, c = _step_inputs("cpu")
    testing.check_opcheck(torch.ops.vosops.kmeans_step.default, (x, L, c))
    testing.check_opcheck(torch.ops.vosops.kmeans_assign.default, (x, L, c))


def update_case(dtype=torch.float64, seed=0):
    """Arguments of kmeans_update for four problems after a real step: problem 0 with two empty clusters (their
    centres far away), 1 whose labels did not change, 2 with five of six clusters empty and only K+3 points, 3
    inactive (with an empty cluster: it must be left alone)."""
    g = torch.Generator().manual_seed(seed)
    B, N, D, K = 4, 60, 5, 6
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64).to(dtype)
    lengths = torch.tensor([N, N - 7, K + 3, N])
    centers = torch.randn(B, K, D, generator=g, dtype=torch.float64).to(R.acc_dtype(dtype))
    centers[0, [1, 4]] += 1000.0
    centers[2, 1:] += 1000.0
    centers[3, 2] += 1000.0
    labels, mind, sums, counts = R.kmeans_step(x, lengths, centers)
    assert (counts[0] == 0).sum() == 2 and (counts[2] == 0).sum() == 5 and (counts[3] == 0).sum() == 1
    active = torch.tensor([True, True, True, False])
    n_iter = torch.tensor([3, 3, 0, 9])
    labels_equal = torch.tensor([False, True, False, False])
    tol = torch.full((B,), 1e-3, dtype=R.acc_dtype(dtype))
    return [x, lengths, labels, mind, sums, counts, centers, active, n_iter, labels_equal, tol]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_native_update_matches_reference_update(dtype):
    """kmeans_update (the rest of a Lloyd iteration, one CUDA kernel on a GPU) against the reference's relocation,
    update and flags; the reference keeps the empty clusters' far centres only for inactive problems."""
    if vosops._backends.why_unusable("cpu", "kmeans_step", "cpu"):
        pytest.skip("native kernels not built")
    args = update_case(dtype)
    got = torch.ops.vosops.kmeans_update(*args)
    exp = R.lloyd_update(*args)
    torch.testing.assert_close(got[0], exp[0], atol=1e-12 if dtype == torch.float64 else 1e-6, rtol=1e-6)
    assert torch.equal(got[1], exp[1]) and torch.equal(got[2], exp[2])
    assert got[1].tolist() == [True, False, True, False] and got[2].tolist() == [4, 4, 1, 9]
    assert torch.equal(got[0][3], args[6][3]), "an inactive problem keeps its centres"
    assert (got[0][2] < 100).all(), "every empty cluster took a point"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_native_update_cuda_equals_cpu(dtype):
    """The CUDA kernel against its CPU twin on the same arguments: same centres bit for bit, same flags."""
    if not vosops._native.has_kernel("kmeans_update", "CUDA"):
        pytest.skip("CUDA kernels not built")
    args = update_case(dtype, seed=7)
    exp = torch.ops.vosops.kmeans_update(*args)
    got = torch.ops.vosops.kmeans_update(*(a.cuda() for a in args))
    for g, e in zip(got, exp):
        torch.testing.assert_close(g.cpu(), e, atol=0, rtol=0)


def test_native_update_checks_its_arguments():
    if vosops._backends.why_unusable("cpu", "kmeans_step", "cpu"):
        pytest.skip("native kernels not built")
    args = update_case()
    for i, name, bad, exc in [(2, "labels", args[2][:, :5], ValueError), (5, "counts", args[5].int(), TypeError),
                              (7, "active", args[7].long(), TypeError), (10, "tol", args[10][:2], ValueError)]:
        with pytest.raises(exc, match=name):
            torch.ops.vosops.kmeans_update(*args[:i], bad, *args[i + 1:])


def test_opcheck_native_update():
    if vosops._backends.why_unusable("cpu", "kmeans_step", "cpu"):
        pytest.skip("native kernels not built")
    testing.check_opcheck(torch.ops.vosops.kmeans_update.default, tuple(update_case(torch.float32)))


def test_opcheck_triton():
    pytest.importorskip("triton")
    if vosops._backends.why_unusable("triton", "kmeans_step", "cpu"):
        pytest.skip("triton not usable on CPU here")
    from vosops.triton import kmeans as tk

    x, L, c = _step_inputs("cpu")
    testing.check_opcheck(tk.kmeans_step_triton, (x, L, c))
    testing.check_opcheck(tk.kmeans_assign_triton, (x, L, c))


def test_triton_ops_check_the_cluster_bound_too():
    """As the native ops do: a direct call with 2^31 centres (a stride-0 view: no memory) is refused before the
    centres are copied. The check comes before any launch, so it runs wherever triton imports (CPU tensors)."""
    pytest.importorskip("triton")  # the optional [triton] extra
    from vosops.triton import kmeans as tk

    x, L = torch.randn(2, 5, 3), torch.tensor([5, 5])
    with pytest.raises(ValueError, match=r"K = 2147483648 centres; at most 2\*\*31 - 1"):
        tk.kmeans_assign_triton(x, L, torch.zeros(1, 1, 3).expand(2, 2**31, 3))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    x, L, c = _step_inputs(device)
    step, assign = vosops.ops.kmeans._steps(backend)
    testing.check_compile(lambda a, l, b: step(a, l, b), (x, L, c))
    testing.check_compile(lambda a, l, b: assign(a, l, b), (x, L, c))


# --- position encoding and the Mask-VOS pseudo labels --------------------------------------------------------------

def test_position_encoding_3d():
    pe = vosops.position_encoding_3d(3, 4, 5, 12)
    assert pe.shape == (3, 4, 5, 12) and pe.dtype == torch.float32
    # channels 0..3 encode t: [sin(t), sin(t/100), cos(t), cos(t/100)] (h = 2 frequencies, w_i = 10000^(-i/2))
    t = 2.0
    expected_t = torch.tensor([np.sin(t), np.sin(t / 100), np.cos(t), np.cos(t / 100)], dtype=torch.float32)
    torch.testing.assert_close(pe[2, 1, 3, 0:4], expected_t)
    torch.testing.assert_close(pe[2, 1, 3, 4:8], torch.tensor([np.sin(1.0), np.sin(0.01), np.cos(1.0), np.cos(0.01)],
                                                             dtype=torch.float32))
    torch.testing.assert_close(pe[2, 1, 3, 8:12], torch.tensor([np.sin(3.0), np.sin(0.03), np.cos(3.0), np.cos(0.03)],
                                                              dtype=torch.float32))
    # x varies only along W, t only along T
    assert torch.equal(pe[:, :, 0, 8:], pe[:, :, 0, 8:][0:1, 0:1].expand(3, 4, 4))
    with pytest.raises(ValueError, match="multiple of 6"):
        vosops.position_encoding_3d(2, 2, 2, 8)
    with pytest.raises(ValueError, match="T must be a positive int"):
        vosops.position_encoding_3d(0, 2, 2, 6)


def _toy_video(T=4, H=12, W=16, C=8, seed=0):
    """Three regions with distinct features: background (left 60%), two objects; noisy."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(3, C, generator=g) * 4
    region = torch.zeros(T, H, W, dtype=torch.long)
    region[:, :, int(0.6 * W):] = 1
    region[:, H // 2:, int(0.8 * W):] = 2
    feats = protos[region].permute(0, 3, 1, 2) + 0.1 * torch.randn(T, C, H, W, generator=g)
    return feats, region


def test_pseudo_labels_paper_mode_drops_oversize_clusters():
    feats, region = _toy_video()
    labels = vosops.video_pseudo_labels(feats, num_clusters=3, pos_weight=0.0, seed=0, n_init=3)
    assert labels.shape == region.shape and labels.dtype == torch.int64
    assert (labels[region == 0] == -1).all()  # 60% of the pixels: dropped
    kept = labels[region != 0]
    assert (kept >= 0).all() and permutation_equal(kept.numpy(), region[region != 0].numpy())
    # without the drop every pixel keeps its cluster
    full = vosops.video_pseudo_labels(feats, num_clusters=3, pos_weight=0.0, seed=0, n_init=3,
                                      max_cluster_fraction=1.0)
    assert (full >= 0).all() and permutation_equal(full.flatten().numpy(), region.flatten().numpy())


def test_pseudo_labels_paper_mode_appends_the_position_encoding():
    feats, _ = _toy_video(T=2, H=6, W=8, C=4)
    T, C, H, W = feats.shape
    out = vosops.video_pseudo_labels(feats, num_clusters=3, pos_dim=12, pos_weight=0.5, seed=3,
                                     max_cluster_fraction=1.0, backend="reference")
    x = torch.cat([feats.permute(0, 2, 3, 1).reshape(-1, C),
                   0.5 * vosops.position_encoding_3d(T, H, W, 12).reshape(-1, 12)], 1)
    res = vosops.kmeans(x[None], 3, seed=3, lengths=torch.tensor([T * H * W]), backend="reference")
    torch.testing.assert_close(out, res.labels[0].reshape(T, H, W))


def test_pseudo_labels_paper_mode_without_position_encoding():
    feats, _ = _toy_video(T=2, H=6, W=8, C=4)
    T, C, H, W = feats.shape
    out = vosops.video_pseudo_labels(feats, num_clusters=3, pos_dim=0, seed=3, max_cluster_fraction=1.0,
                                     backend="reference")
    res = vosops.kmeans(feats.permute(0, 2, 3, 1).reshape(1, -1, C), 3, seed=3, lengths=torch.tensor([T * H * W]),
                        backend="reference")
    torch.testing.assert_close(out, res.labels[0].reshape(T, H, W))


def test_pseudo_labels_release_mode():
    feats, _ = _toy_video(T=17, H=6, W=8, C=5)
    out = vosops.video_pseudo_labels(feats, mode="release", num_clusters=3, seed=0)
    normed = torch.nn.functional.normalize(feats, dim=1)
    sampled = normed[::8].permute(0, 2, 3, 1).reshape(-1, 5)  # frames 0, 8, 16
    res = vosops.kmeans(sampled[None], 3, iters=300, seed=0, lengths=torch.tensor([sampled.shape[0]]))
    expected = vosops.kmeans_predict(normed.permute(0, 2, 3, 1).reshape(-1, 5), res.centroids[0])
    torch.testing.assert_close(out, expected.reshape(17, 6, 8))
    assert (out >= 0).all()  # release mode drops nothing


def test_pseudo_labels_list_of_videos():
    v1, r1 = _toy_video(T=3, H=8, W=10, seed=1)
    v2, r2 = _toy_video(T=2, H=6, W=12, seed=2)
    outs = vosops.video_pseudo_labels([v1, v2], num_clusters=3, pos_weight=0.0, seed=0, n_init=3,
                                      max_cluster_fraction=1.0)
    assert [o.shape for o in outs] == [r1.shape, r2.shape]
    for o, r in zip(outs, (r1, r2)):
        assert permutation_equal(o.flatten().numpy(), r.flatten().numpy())
    with pytest.raises(ValueError, match="mode must be"):
        vosops.video_pseudo_labels(v1, mode="sklearn")
    with pytest.raises(ValueError, match="same channel count"):
        vosops.video_pseudo_labels([v1, v2[:, :3]])
    for kw, match in [({"max_cluster_fraction": 0.0}, r"max_cluster_fraction must be a number in \(0, 1\], got 0.0"),
                      ({"max_cluster_fraction": 1.5}, "max_cluster_fraction must be a number in"),
                      ({"max_cluster_fraction": "0.4"}, "max_cluster_fraction must be a number in"),
                      ({"frame_stride": 0, "mode": "release"}, "frame_stride must be a positive int, got 0"),
                      ({"frame_stride": True, "mode": "release"}, "frame_stride must be a positive int, got True"),
                      ({"pos_weight": float("nan")}, "pos_weight must be a finite number, got nan"),
                      ({"pos_weight": "1"}, "pos_weight must be a finite number"),
                      ({"pos_dim": 7}, "pos_dim must be an int >= 0 and a multiple of 6"),
                      ({"pos_dim": -6}, "pos_dim must be an int >= 0"),
                      ({"pos_dim": 6.0}, "pos_dim must be an int")]:
        with pytest.raises(ValueError, match=match):
            vosops.video_pseudo_labels(v1, **kw)
    with pytest.raises(ValueError, match="a non-empty list of them"):
        vosops.video_pseudo_labels([])


# --- the benchmark module -------------------------------------------------------------------------------------------

def test_bench_cases_and_equal_work():
    """Every timed implementation does the same work: same start, same iterations, same inertia (small data)."""
    from vosops.bench import cases_for
    from vosops.bench import kmeans as bk

    cases = cases_for("kmeans", "cpu")
    assert {c.config for c in cases} == {"km-cpu"}
    assert [c.impl for c in cases if c.baseline] == ["sklearn"]
    x, init = bk.make_data(2, 300, 6, 4, "cpu")
    impls = bk._impls("cpu")
    iters, inertia = impls["sklearn"](x, init, 100)
    for name in ("reference", "cpu", "faiss-cpu", "fast-pytorch-kmeans"):
        if name in impls:
            its, inert = impls[name](x, init, 100)
            assert inert == pytest.approx(inertia, rel=1e-4), name
            if name in ("reference", "cpu"):
                assert its == iters


def _lloyd_inputs(B, N=2100, D=11, K=6, seed=11):
    """Overlapping blobs (several iterations), ragged lengths (one far below a chunk), odd N and D (vector tails, a
    partial last chunk), and one centre per problem far from every point, so the first step has an empty cluster.
    (Problems of ~K points are avoided: there float64 sums of float32 points are exact and can stop the float64
    reference an iteration earlier than float32 arithmetic, a dtype effect, not a backend difference.)"""
    X, _ = blobs(B * N, D, K, std=4.0, seed=seed)
    x = X.reshape(B, N, D)
    lengths = torch.tensor([N, 1500, 40, 1025, 977, N][:B])
    init = x[:, :K].clone()
    init[:, -1] = 1e3
    return x, lengths, init


def _native_lloyd_call(lengths, iters, tol):
    def run(x, c):
        centers, labels, mind, n_iter = torch.ops.vosops.kmeans_lloyd(x, lengths, c, iters, tol)
        return centers, labels, mind, n_iter
    return run


def _reference_lloyd_call(lengths, iters, tol):
    def run(x, c):
        res = R.lloyd(x, lengths, c, iters=iters, tol=tol.to(x.dtype))
        return res.centroids, res.labels, R.kmeans_assign(x, lengths, res.centroids)[1], res.n_iter
    return run


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
@pytest.mark.parametrize("B", [1, 6])  # with 2+ threads: B=6 runs whole problems per thread, B=1 shares iterations
def test_native_lloyd_matches_reference_lloyd(dtype, layout, B):
    if vosops._backends.why_unusable("cpu", "kmeans_step", "cpu"):
        pytest.skip("native kernels not built")
    x, lengths, init = _lloyd_inputs(B)
    for tol, iters in ((0.0, 60), (1e-3, 60), (0.0, 4)):  # 4: the iterations run out before convergence
        tol_b = R.scaled_tol(x, lengths, tol)
        testing.check_against_reference(_native_lloyd_call(lengths, iters, tol_b),
                                        _reference_lloyd_call(lengths, iters, tol_b), {"x": x, "c": init},
                                        dtype=dtype, layout=layout, atol=1e-2 if dtype == torch.float16 else None)


def test_native_lloyd_same_result_for_any_thread_count_and_batch():
    """Per-chunk partial sums: bitwise the same with 1 or 2 threads, and for a problem alone or in a batch (the two
    parallel schedules)."""
    if vosops._backends.why_unusable("cpu", "kmeans_step", "cpu"):
        pytest.skip("native kernels not built")
    x, lengths, init = _lloyd_inputs(6)
    x = x.float()
    tol = torch.zeros(6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = torch.ops.vosops.kmeans_lloyd(x, lengths, init, 40, tol)
        torch.set_num_threads(1)
        one = torch.ops.vosops.kmeans_lloyd(x, lengths, init, 40, tol)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    for b in range(6):
        alone = torch.ops.vosops.kmeans_lloyd(x[b:b + 1], lengths[b:b + 1], init[b:b + 1], 40, tol[:1])
        for a, full in zip(alone, two):
            assert torch.equal(a[0], full[b])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("K", [1, 2, 5, 6, 8, 11])  # the cpu kernels sweep the centres in groups of up to 5
def test_exact_ties_go_to_the_lower_index(backend, device, K):
    """Small-integer points and centres (exact distances in every dtype), with repeated centres and points
    equidistant from several: every tie must go to the lowest centre index, as in the reference."""
    g = torch.Generator().manual_seed(K)
    x = torch.randint(-2, 3, (2, 75, 9), generator=g).double()
    c = torch.randint(-2, 3, (2, K, 9), generator=g).double()
    c[:, K // 2] = c[:, 0]  # a repeated centre: its points are tied with centre 0
    x[:, 0] = (c[:, 0] + c[:, -1]) / 2  # midpoints: tied between centres 0 and K-1 (halves are exact)
    x[:, 1] = c[:, -1]
    lengths = torch.tensor([75, 38], device=device)
    step, assign = vosops.ops.kmeans._steps(backend)
    for dtype in testing.backend_dtypes(backend, device):
        acc = R.acc_dtype(dtype)
        for fn, ref in ((step, reference.kmeans_step), (assign, reference.kmeans_assign)):
            testing.check_against_reference(
                lambda x, c: fn(x, lengths, c.to(acc)), lambda x, c: ref(x, lengths, c),
                {"x": x.to(device), "c": c.to(device)}, dtype=dtype, layout="noncontiguous")


def test_native_portable_path_matches_reference():
    """The cpu kernels' baseline-ISA clone, forced by VOSOPS_KMEANS_PORTABLE=1 in a fresh process (the AVX2 one is
    picked on AVX2 machines), against the reference: the Lloyd loop in float32/float64, the passes with K > 5."""
    if vosops._backends.why_unusable("cpu", "kmeans_step", "cpu"):
        pytest.skip("native kernels not built")
    code = textwrap.dedent("""
        import torch
        from sklearn.datasets import make_blobs
        from vosops import reference, testing
        from vosops.reference import kmeans as R
        X, _ = make_blobs(3 * 1100, n_features=11, centers=6, cluster_std=4.0, random_state=11)
        x = torch.from_numpy(X).reshape(3, 1100, 11)
        lengths = torch.tensor([1100, 1030, 37])
        init = x[:, :6].clone()
        init[:, -1] = 1e3  # an empty cluster at the first step
        tol = R.scaled_tol(x, lengths, 0.0)
        def native(x, c):
            return torch.ops.vosops.kmeans_lloyd(x, lengths, c, 50, tol)
        def ref(x, c):
            res = R.lloyd(x, lengths, c, iters=50, tol=tol.to(x.dtype))
            return res.centroids, res.labels, R.kmeans_assign(x, lengths, res.centroids)[1], res.n_iter
        for dtype in (torch.float64, torch.float32):
            testing.check_against_reference(native, ref, {"x": x, "c": init}, dtype=dtype, layout="noncontiguous")
        torch.manual_seed(0)  # small integers: exact distances, many exact ties
        xi, ci = torch.randint(-3, 4, (3, 1100, 11)).double(), torch.randint(-3, 4, (3, 11, 11)).double()
        for fn, rf in ((torch.ops.vosops.kmeans_step, reference.kmeans_step),
                       (torch.ops.vosops.kmeans_assign, reference.kmeans_assign)):
            testing.check_against_reference(lambda x, c: fn(x, lengths, c), lambda x, c: rf(x, lengths, c),
                                            {"x": xi, "c": ci}, dtype=torch.float32)
        print("ok")
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(vosops.__file__)))  # this checkout's vosops
    env = dict(os.environ, VOSOPS_KMEANS_PORTABLE="1",
               PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_native_lloyd_checks_its_arguments():
    if vosops._backends.why_unusable("cpu", "kmeans_step", "cpu"):
        pytest.skip("native kernels not built")
    x, c, L, tol = torch.randn(2, 5, 3), torch.randn(2, 2, 3), torch.tensor([5, 5]), torch.zeros(2)
    with pytest.raises(ValueError, match="iters must be >= 1"):
        torch.ops.vosops.kmeans_lloyd(x, L, c, 0, tol)
    with pytest.raises(ValueError, match=r"lengths must lie in \[2, 5\]"):
        torch.ops.vosops.kmeans_lloyd(x, torch.tensor([5, 1]), c, 3, tol)
    with pytest.raises(ValueError, match="tol must be"):
        torch.ops.vosops.kmeans_lloyd(x, L, c, 3, torch.zeros(3))
    with pytest.raises(ValueError, match="centers must be"):
        torch.ops.vosops.kmeans_lloyd(x, L, torch.randn(2, 2, 4), 3, tol)
    testing.check_opcheck(torch.ops.vosops.kmeans_lloyd.default, (x, L, c, 3, tol))


def test_cuda_sources_compile_for_sm80_and_sm90(tmp_path):
    """The torch-free CUDA kernels compile for Ampere and Hopper (a compile check where there is no GPU)."""
    import shutil

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [nvcc, "-std=c++17", "-O3", "-I", os.path.join(root, "csrc"), "-c",
           os.path.join(root, "csrc", "kmeans", "kmeans_cuda.cu"), "-o", str(tmp_path / "kmeans_cuda.o"),
           "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90", "-Xptxas", "-v"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    spills = [line for line in res.stderr.splitlines() if "spill" in line and not line.strip().startswith("0 bytes")]
    assert all(" 0 bytes spill stores, 0 bytes spill loads" in line for line in spills), spills


@pytest.mark.skipif(not os.path.isdir(DAVIS), reason="DAVIS-2016 mini data not present")
def test_pseudo_labels_on_davis_frames():
    """Paper mode on real frames (Lab colour as the 'embedding'): exactly the pixels of clusters holding more than
    max_cluster_fraction of the video's pixels become -1; the others keep their cluster."""
    import cv2

    files = sorted(glob.glob(os.path.join(DAVIS, "car-shadow", "*.jpg")))[:3]
    frames = [cv2.cvtColor(cv2.resize(cv2.imread(f), (54, 30), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2LAB)
              for f in files]
    feats = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0  # (T, 3, H, W)
    full = vosops.video_pseudo_labels(feats, pos_dim=6, pos_weight=0.1, seed=0, max_cluster_fraction=1.0)
    assert full.shape == (3, 30, 54) and (full >= 0).all() and int(full.max()) == 4
    frac = torch.bincount(full.flatten(), minlength=5).double() / full.numel()
    for limit in (0.4, 0.2):  # at 0.2 some of these clusters go, some stay
        labels = vosops.video_pseudo_labels(feats, pos_dim=6, pos_weight=0.1, seed=0, max_cluster_fraction=limit)
        dropped = frac > limit
        assert torch.equal(labels == -1, dropped[full])
        assert torch.equal(labels[labels >= 0], full[labels >= 0])
    assert dropped.any() and (~dropped).any()


def test_cuda_graph_is_ignored_on_cpu():
    x = torch.randn(3, 50, 4)
    a = vosops.kmeans(x, 3, seed=1, cuda_graph=True)
    b = vosops.kmeans(x, 3, seed=1)
    torch.testing.assert_close(a.centroids, b.centroids, atol=0, rtol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
def test_cuda_graph_loop_equals_the_plain_loop(backend):
    """The graphed Lloyd loop runs the same iterations: ragged problems, one converging within a few iterations
    (well separated blobs) and others running to the limit, an iteration count not a multiple of the chunk."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 400, 8, generator=g)
    x[0, :200] += 20.0  # two far blobs: converges early
    lengths = torch.tensor([400, 333, 57])
    x, lengths = x.cuda(), lengths.cuda()
    for iters in (1, 7, 23):
        kw = dict(iters=iters, tol=0.0, lengths=lengths, seed=5, backend=backend)
        plain = vosops.kmeans(x, 4, **kw)
        graphed = vosops.kmeans(x, 4, cuda_graph=True, **kw)
        torch.testing.assert_close(graphed.labels, plain.labels, atol=0, rtol=0)
        torch.testing.assert_close(graphed.n_iter, plain.n_iter, atol=0, rtol=0)
        torch.testing.assert_close(graphed.centroids, plain.centroids, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(graphed.inertia, plain.inertia, atol=1e-4, rtol=1e-6)


REFERENCE_AND_CPU = ["reference"] + [p.values[0] for p in BACKENDS if p.values == ("cpu", "cpu")]


def _greedy_kmeans_plusplus(X: np.ndarray, K: int, draws: R.Draws) -> np.ndarray:
    """scikit-learn's greedy k-means++ on the Draws stream: first centre floor(u * n); then per centre
    2 + floor(ln K) candidates by inverse-CDF on the D^2 weights, keep the one with the lowest potential."""
    n = len(X)
    trials = 2 + int(np.log(K))
    u0 = float(draws.uniform(1, R.Draws.KMEANS_PLUSPLUS, 0)[0])
    first = min(int(u0 * n), n - 1)
    centres = [X[first]]
    closest = ((X - X[first]) ** 2).sum(1)
    pot = closest.sum()
    for c in range(1, K):
        r = draws.uniform(trials, R.Draws.KMEANS_PLUSPLUS, c).numpy() * pot
        cand = np.minimum(np.searchsorted(np.cumsum(closest), r), n - 1)
        d = np.minimum(closest[None], ((X[None] - X[cand][:, None]) ** 2).sum(-1))
        best = int(np.argmin(d.sum(1)))
        closest, pot = d[best], d[best].sum()
        centres.append(X[cand[best]])
    return np.stack(centres)


@pytest.mark.parametrize("seed", range(4))
def test_kmeans_plusplus_equals_the_greedy_algorithm(seed):
    """Catches: trials 1 + log K; argmax instead of argmin of the candidates' potential; first centre not uniform."""
    g = np.random.default_rng(seed)
    X = np.concatenate([g.normal(size=(40, 3)) * 0.7 + g.normal(size=3) * 4 for _ in range(6)])
    want = _greedy_kmeans_plusplus(X, 6, R.Draws(seed))
    got = R.kmeans_plusplus(torch.from_numpy(X)[None], torch.tensor([len(X)]), 6, R.Draws(seed))[0]
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)


def test_scaled_tol_is_the_population_variance():
    """Catches reference/kmeans.py scaled_tol dividing by n - 1 (sample variance); numpy's var (ddof=0)."""
    x = torch.tensor([[0.0, 1.0], [1.0, 3.0], [2.0, 0.0], [4.0, 7.0]], dtype=torch.float64)
    want = float(np.var(x.numpy(), axis=0).mean()) * 0.5
    assert float(R.scaled_tol(x[None], torch.tensor([4]), 0.5)[0]) == pytest.approx(want, rel=1e-12)
    padded = torch.cat([x, torch.full((3, 2), 9.0, dtype=torch.float64)])[None]
    assert float(R.scaled_tol(padded, torch.tensor([4]), 0.5)[0]) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("backend", REFERENCE_AND_CPU)
def test_zero_centre_shift_converges_with_tol_zero(backend):
    """Catches kmeans_update's `shift <= tol` as `shift < tol`: centres already at their clusters' means stop after one
    iteration with tol=0, as scikit-learn (center_shift_tot <= tol)."""
    # the data's mean is exactly 0, so scikit-learn's centring (X - mean) leaves every number exact
    c = torch.tensor([[-8.0, 0.0], [8.0, 0.0], [0.0, 8.0], [0.0, -8.0]], dtype=torch.float64)
    d = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    X = (c[:, None] + d[None]).reshape(-1, 2)
    res = vosops.kmeans(X, 4, init=c, tol=0.0, iters=50, backend=backend)
    sk = KMeans(4, init=c.numpy(), n_init=1, tol=0.0, max_iter=50, algorithm="lloyd").fit(X.numpy())
    assert int(res.n_iter) == sk.n_iter_ == 1


def test_minibatch_samples_reach_every_valid_point_uniformly():
    """Catches sample_batches mapping u to floor(u * (length - 1)) (the last valid point never drawn)."""
    b = R.sample_batches(torch.tensor([3, 5]), 2, 3000, R.Draws(0))
    for row, n in ((0, 3), (1, 5)):
        counts = np.bincount(b[:, row].flatten().numpy(), minlength=5)
        assert counts[n:].sum() == 0
        np.testing.assert_allclose(counts[:n] / counts.sum(), 1 / n, atol=0.03)


def test_kmeans_seed_bound_is_exclusive():
    """Catches ops/kmeans.py `seed >= 2**63` as `seed > 2**63`."""
    x = torch.randn(6, 2)
    with pytest.raises(ValueError, match=r"seed must be < 2\*\*63"):
        vosops.kmeans(x, 2, seed=2**63)
    vosops.kmeans(x, 2, seed=2**63 - 1)


def test_kmeans_non_finite_valid_point_of_a_ragged_batch_raises():
    """Catches the ragged (lengths < N) branch of _check_finite accepting NaN among the valid points."""
    x = torch.randn(2, 5, 3)
    bad = x.clone()
    bad[1, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="x must be finite"):
        vosops.kmeans(bad, 2, lengths=torch.tensor([5, 3]), seed=0)
    ok = x.clone()
    ok[1, 4, 0] = float("nan")  # padding: ignored
    res = vosops.kmeans(ok, 2, lengths=torch.tensor([5, 3]), seed=0)
    assert torch.isfinite(res.centroids).all()


def test_kmeans_predict_is_not_cast_under_autocast():
    """Catches kmeans_predict's autocast policy "off" as "lower" (bfloat16 rounding moves 1.003 onto centre 0)."""
    x = torch.tensor([[1.003]])
    c = torch.tensor([[1.0], [1.0039]])
    outside = vosops.kmeans_predict(x, c, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = vosops.kmeans_predict(x, c, backend="reference")
    assert outside.tolist() == [1] and inside.tolist() == [1]


def _region_video(sizes, C=3):
    """(1, C, 1, sum(sizes)) video whose pixels form len(sizes) regions of exactly those sizes, far apart."""
    protos = torch.eye(C, dtype=torch.float64)[: len(sizes)] * 10
    region = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    return protos[region].T.reshape(1, C, 1, -1).contiguous(), region


def test_pseudo_labels_drop_clusters_over_40_percent_strictly():
    """Catches `counts > frac * n` as `>=` (a cluster of exactly 40% is kept: "more than 40%") and a default fraction
    other than 0.4 (45% is dropped)."""
    feats, region = _region_video([8, 9, 3])  # 40%, 45%, 15% of 20 pixels
    labels = vosops.video_pseudo_labels(feats, num_clusters=3, pos_dim=0, seed=0, backend="reference").flatten()
    assert (labels[region == 1] == -1).all()
    assert (labels[region == 0] >= 0).all() and (labels[region == 2] >= 0).all()


def test_pseudo_labels_drop_applies_for_any_fraction_below_one():
    """Catches the drop being skipped for max_cluster_fraction in [0.5, 1)."""
    feats, region = _region_video([11, 9])  # 55%, 45%
    labels = vosops.video_pseudo_labels(feats, num_clusters=2, pos_dim=0, seed=0, max_cluster_fraction=0.5,
                                        backend="reference").flatten()
    assert (labels[region == 0] == -1).all() and (labels[region == 1] >= 0).all()


def test_pseudo_labels_paper_default_is_five_clusters():
    """Catches a paper-mode default num_clusters other than 5 (M = 5 in the paper)."""
    feats, _ = _region_video([4] * 7, C=7)  # 7 distinct regions: k-means uses exactly K clusters
    labels = vosops.video_pseudo_labels(feats, pos_dim=0, seed=0, max_cluster_fraction=1.0, backend="reference")
    assert labels.max() == 4
    explicit = vosops.video_pseudo_labels(feats, num_clusters=5, pos_dim=0, seed=0, max_cluster_fraction=1.0,
                                          backend="reference")
    assert torch.equal(labels, explicit)


def test_pseudo_labels_default_iterations(monkeypatch):
    """Catches default iters other than 100 (paper's EM steps) / 300 (scikit-learn's max_iter, release)."""
    from vosops.ops import pseudo_labels as pl

    seen = []
    real = pl.kmeans

    def spy(*args, **kwargs):
        seen.append(kwargs["iters"])
        return real(*args, **kwargs)

    monkeypatch.setattr(pl, "kmeans", spy)
    feats, _ = _region_video([4] * 7, C=7)
    vosops.video_pseudo_labels(feats, pos_dim=0, seed=0, backend="reference")
    vosops.video_pseudo_labels(feats, mode="release", seed=0, backend="reference")
    assert seen == [100, 300]


def test_pseudo_labels_oversize_rule_is_exact_for_long_videos():
    """The drop rule compares cluster sizes with the fraction of a video's pixels exactly at sizes past 2^24 (a 480p
    video of 60 frames has 24.6M pixels): 8,400,001 of 21,000,002 is over 40%, 8,400,000 is not; in float32
    (int64 times a Python float) both were judged not over."""
    from vosops.ops.pseudo_labels import _oversized

    lengths = torch.tensor([21_000_002, 21_000_002])
    counts = torch.tensor([[8_400_001, 1], [8_400_000, 1]])
    assert _oversized(counts, lengths, 0.4).tolist() == [[True, False], [False, False]]
