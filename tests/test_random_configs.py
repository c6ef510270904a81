"""Every backend against the reference on randomly drawn configurations of local_attention, the top-k ops,
flow_warp and kmeans_predict: the other tests pick their cases by hand, these draw every argument at once (shapes
down to 1, radius 0 to 3, dilation, window, border, offsets and flows that leave the frame, top-k from 1 to the
candidate count, normalisation, dense prefixes, masks, empty slots, layouts), so combinations nobody listed are
covered too. Half the draws use integer-valued features, whose scores tie exactly: ties must then resolve as the
reference resolves them. Each seed is one test, reproducible from its id.

The cpu backend runs in float64 (exact agreement up to rounding), Triton in float32 under the interpreter (fewer
seeds: it is slow there)."""

import random

import pytest
import torch

import vosops
from vosops import reference, testing
from vosops.ops.local_attention import candidate_count
from conftest import backend_device_params

# Seeds per (backend, device). On a GPU each Triton draw may compile new kernel specialisations (seconds each),
# and a lent GPU's test stage has minutes: the CUDA kernels, which have never run there, get the most.
SEEDS = {("cpu", "cpu"): 40, ("triton", "cpu"): 10, ("cuda", "cuda"): 20, ("triton", "cuda"): 4}


def _seed_params(op: str, supported=vosops.BACKENDS):
    return [pytest.param(p.values[0], p.values[1], seed, id=f"{p.id}-seed{seed}", marks=p.marks)
            for p in backend_device_params(op, supported) for seed in range(SEEDS[tuple(p.values)])]


def _dtype(backend: str) -> torch.dtype:
    return torch.float64 if backend == "cpu" else torch.float32


def _features(rnd: random.Random, *shape) -> torch.Tensor:
    """Normal features, or (half the draws) integer-valued ones whose dot products tie exactly."""
    x = torch.randn(*shape, dtype=torch.float64)
    return x.round() if rnd.random() < 0.5 else x


def _local_attention_config(seed: int):
    rnd = random.Random(seed)
    torch.manual_seed(seed)
    B, C, Cv = rnd.randint(1, 2), rnd.choice([1, 3, 8, 17]), rnd.choice([1, 2, 5, 9])
    H, W, N = rnd.randint(1, 8), rnd.randint(1, 8), rnd.randint(1, 3)
    radius, dilation = rnd.randint(0, 3), rnd.randint(1, 3)
    window = rnd.choice(["square", "circle"]) if radius >= 2 else "square"
    normalize = rnd.choice(["softmax", "softmax", "threshold"])
    cands = candidate_count(radius, window, N)
    if normalize == "threshold":
        topk = rnd.randint(1, min(cands, 64))
    else:
        topk = rnd.choice([None, 1, rnd.randint(1, min(cands, 64)), min(cands, 64)])
    offsets = None
    if rnd.random() < 0.6:  # up to 12 pixels: often far past the frame of an 8 x 8 video
        offsets = (torch.rand(B, N, 2, H, W, dtype=torch.float64) * 2 - 1) * rnd.choice([1.6, 4.0, 12.0])
    inputs = dict(q=_features(rnd, B, C, H, W), k=_features(rnd, B, N, C, H, W),
                  v=torch.randn(B, N, Cv, H, W, dtype=torch.float64))
    kwargs = dict(radius=radius, dilation=dilation, window=window, normalize=normalize, topk=topk, offsets=offsets,
                  border=rnd.choice(["mask", "zero"]), scale=rnd.choice([1.0, 0.125, 3.0]),
                  return_topk=topk is not None and rnd.random() < 0.5)
    layout = rnd.choice(["contiguous", "noncontiguous"])
    return inputs, kwargs, layout


@pytest.mark.parametrize("backend,device,seed", _seed_params("local_attention"))
def test_local_attention_random_configs(backend, device, seed):
    inputs, kw, layout = _local_attention_config(seed)
    inputs = {n: t.to(device) for n, t in inputs.items()}
    if kw["offsets"] is not None:
        kw["offsets"] = kw["offsets"].to(device=device, dtype=_dtype(backend))
    grads = ("q", "k", "v")

    def flat(out):
        return (out[0], *out[1]) if kw["return_topk"] else out

    testing.check_against_reference(
        lambda q, k, v: flat(vosops.local_attention(q, k, v, **kw, backend=backend)),
        lambda q, k, v: flat(reference.local_attention(
            q, k, v, **{**kw, "offsets": None if kw["offsets"] is None else kw["offsets"].double()})),
        inputs, dtype=_dtype(backend), grad_inputs=grads, layout=layout, seed=seed)


@pytest.mark.parametrize("backend,device,seed", _seed_params("local_affinity"))
def test_local_affinity_and_aggregate_random_configs(backend, device, seed):
    """The unfused pair on local_attention's draws: the affinity (-inf and border zeros included) with q/k
    gradients, then local_aggregate of random weights over the same window, with weights/v gradients."""
    inputs, kw, layout = _local_attention_config(seed)
    geometry = dict(radius=kw["radius"], dilation=kw["dilation"])
    offsets = None if kw["offsets"] is None else kw["offsets"].to(device)
    dtype = _dtype(backend)
    low = None if offsets is None else offsets.to(dtype)
    offsets = None if low is None else low.double()  # the reference sees the offsets the backend sees
    affinity = dict(geometry, window=kw["window"], scale=kw["scale"], border=kw["border"])
    testing.check_against_reference(
        lambda q, k: vosops.local_affinity(q, k, **affinity, offsets=low, backend=backend),
        lambda q, k: reference.local_affinity(q, k, **affinity, offsets=offsets),
        {n: inputs[n].to(device) for n in "qk"}, dtype=dtype, grad_inputs=("q", "k"), layout=layout, seed=seed)

    B, N, _, H, W = inputs["v"].shape
    weights = torch.randn(B, N, (2 * kw["radius"] + 1) ** 2, H, W, dtype=torch.float64, device=device)
    testing.check_against_reference(
        lambda weights, v: vosops.local_aggregate(weights, v, **geometry, offsets=low, backend=backend),
        lambda weights, v: reference.local_aggregate(weights, v, **geometry, offsets=offsets),
        dict(weights=weights, v=inputs["v"].to(device)), dtype=dtype, grad_inputs=("weights", "v"),
        layout=layout, seed=seed)


def _global_topk_case(rnd, B, M, L):
    C = rnd.choice([1, 4, 9, 33])
    inputs = dict(q=_features(rnd, B, M, C), k=_features(rnd, B, L, C))
    key_mask = torch.rand(B, L) < 0.7 if rnd.random() < 0.5 else None
    kw = dict(topk=rnd.randint(1, min(L, 20)), scale=rnd.choice([1.0, 0.3, 20.0]), key_mask=key_mask)
    return "global_topk", inputs, kw, ("q", "k")


def _topk_aggregate_case(rnd, B, M, L):
    K = rnd.randint(1, 12)
    logits = _features(rnd, B, M, K) * rnd.choice([1.0, 10.0])
    if rnd.random() < 0.3:
        logits[torch.rand(B, M, K) < 0.2] = float("-inf")
    normalize = rnd.choice(["softmax", "threshold"])
    kw = dict(index=torch.randint(-1, L, (B, M, K)), normalize=normalize,
              k=rnd.randint(1, K) if normalize == "threshold" else None)
    inputs = dict(logits=logits, values=torch.randn(B, L, rnd.randint(1, 5), dtype=torch.float64))
    return "topk_aggregate", inputs, kw, ("logits", "values")


def _merge_topk_case(rnd, B, M, L):
    inputs, index = {}, []
    for j in range(rnd.randint(1, 3)):
        K = rnd.randint(1, 8)
        logits = _features(rnd, B, M, K)
        if rnd.random() < 0.3:
            logits[torch.rand(B, M, K) < 0.2] = float("-inf")
        inputs[f"logits{j}"] = logits
        index.append(torch.randint(-1, 3 * L, (B, M, K)))  # duplicates and empty slots included
    kw = dict(index=index, topk=rnd.randint(1, sum(i.shape[-1] for i in index)))
    return "merge_topk", inputs, kw, tuple(inputs)


def _topk_attention_case(rnd, B, M, L):
    heads, D, Dv = rnd.randint(1, 3), rnd.choice([1, 8, 16, 33]), rnd.choice([1, 5, 16])
    dense = rnd.randint(0, L - 1)
    inputs = dict(q=_features(rnd, B, heads, M, D), k=_features(rnd, B, heads, L, D),
                  v=torch.randn(B, heads, L, Dv, dtype=torch.float64))
    kw = dict(topk=rnd.randint(1, L - dense), dense_keys=dense, scale=rnd.choice([None, 0.5, 4.0]))
    return "topk_attention", inputs, kw, ("q", "k", "v")


_TOPK_CASES = {"global_topk": _global_topk_case, "topk_aggregate": _topk_aggregate_case,
               "merge_topk": _merge_topk_case, "topk_attention": _topk_attention_case}


def _call(op: str, kw: dict, backend: str):
    """The op as a function of its floating inputs (keyword arguments named as the case names them)."""
    fn = getattr(vosops, op) if backend != "reference" else getattr(reference, op)
    extra = {} if backend == "reference" else {"backend": backend}
    if op == "merge_topk":
        def run(**lg):
            return fn([(lg[f"logits{j}"], i.to(lg["logits0"].device)) for j, i in enumerate(kw["index"])],
                      kw["topk"], **extra)
    elif op == "topk_aggregate":
        def run(logits, values):
            return fn(logits, kw["index"].to(logits.device), values, normalize=kw["normalize"], k=kw["k"], **extra)
    elif op == "global_topk":
        def run(q, k):
            mask = None if kw["key_mask"] is None else kw["key_mask"].to(q.device)
            return fn(q, k, topk=kw["topk"], scale=kw["scale"], key_mask=mask, **extra)
    else:
        def run(q, k, v):
            return fn(q, k, v, **kw, **extra)
    return run


def _topk_params():
    params = []
    for op in _TOPK_CASES:
        params += [pytest.param(op, *p.values, id=f"{op}-{p.id}", marks=p.marks)
                   for p in _seed_params(op, vosops.ops.topk.ATTENTION_BACKENDS if op == "topk_attention"
                                         else vosops.BACKENDS)]
    return params


@pytest.mark.parametrize("op,backend,device,seed", _topk_params())
def test_topk_ops_random_configs(op, backend, device, seed):
    rnd = random.Random(seed)
    torch.manual_seed(seed)
    B, M, L = rnd.randint(1, 2), rnd.randint(1, 13), rnd.randint(1, 40)
    _, inputs, kw, grads = _TOPK_CASES[op](rnd, B, M, L)
    inputs = {n: t.to(device) for n, t in inputs.items()}
    testing.check_against_reference(_call(op, kw, backend), _call(op, kw, "reference"), inputs,
                                    dtype=_dtype(backend), grad_inputs=grads,
                                    layout=rnd.choice(["contiguous", "noncontiguous"]), seed=seed)


@pytest.mark.parametrize("backend,device,seed", _seed_params("flow_warp"))
def test_flow_warp_random_configs(backend, device, seed):
    rnd = random.Random(seed)
    torch.manual_seed(seed)
    B, C, H, W = rnd.randint(1, 2), rnd.choice([1, 3, 8, 17]), rnd.randint(1, 9), rnd.randint(1, 9)
    mode, padding_mode = rnd.choice(["bilinear", "nearest"]), rnd.choice(["zeros", "border"])
    # continuous flows (no point on a pixel boundary, where nearest rounding and the bilinear flow gradient
    # switch), up to a frame's size: many points leave it
    flow = (torch.rand(B, 2, H, W, dtype=torch.float64) * 2 - 1) * rnd.choice([0.7, 3.0, 12.0])
    inputs = dict(x=torch.randn(B, C, H, W, dtype=torch.float64), flow=flow)
    inputs = {n: t.to(device) for n, t in inputs.items()}
    kw = dict(mode=mode, padding_mode=padding_mode)

    def ref(x, flow):
        return reference.flow_warp(x, flow, **kw), reference.flow_warp_valid(flow, **kw)

    testing.check_against_reference(
        lambda x, flow: vosops.flow_warp(x, flow, **kw, return_valid=True, backend=backend), ref, inputs,
        dtype=_dtype(backend), grad_inputs=("x", "flow") if mode == "bilinear" else ("x",),
        layout=rnd.choice(["contiguous", "noncontiguous", "channels_last"]), seed=seed)


@pytest.mark.parametrize("backend,device,seed", _seed_params("kmeans_step"))
def test_kmeans_predict_random_configs(backend, device, seed):
    """Integer points and centres: every squared distance is exact in every dtype, so the labels, ties to the lower
    centre included, must equal the reference's exactly (ragged lengths: -1 past each problem's length)."""
    rnd = random.Random(seed)
    torch.manual_seed(seed)
    B, N, D, K = rnd.randint(1, 4), rnd.randint(1, 70), rnd.choice([1, 2, 3, 8, 17]), rnd.randint(1, 12)
    x = torch.randint(-3, 4, (B, N, D)).double()
    centres = torch.randint(-3, 4, (B, K, D)).double()
    lengths = torch.randint(1, N + 1, (B,))
    dtype = _dtype(backend)
    got = vosops.kmeans_predict(testing.relayout(x.to(device, dtype), rnd.choice(["contiguous", "noncontiguous"])),
                                centres.to(device, dtype), lengths=lengths.to(device), backend=backend)
    want = vosops.kmeans_predict(x, centres, lengths=lengths, backend="reference")
    assert torch.equal(got.cpu(), want)
