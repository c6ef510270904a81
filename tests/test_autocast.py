"""The ops inside torch.autocast (mixed-precision training): inputs cast as PyTorch's own ops of their kind cast
theirs, the op computed with autocast off on every backend, gradients back to the inputs' own dtypes."""

import pytest
import torch

import vosops
from conftest import backend_device_params

BF16 = torch.bfloat16


def _local_inputs(g):
    q = torch.randn(1, 4, 6, 7, generator=g)
    k = torch.randn(1, 2, 4, 6, 7, generator=g)
    v = torch.randn(1, 2, 3, 6, 7, generator=g)
    return q, k, v


# (name, call(backend, *tensors), tensors(g), "lower" or "widest": the dtype the op computes in given a low-precision
# first input and float32 others: the autocast dtype, or float32)
CASES = {
    "local_attention": (lambda b, q, k, v: vosops.local_attention(q, k, v, radius=1, topk=5, backend=b),
                        _local_inputs, "lower"),
    "local_affinity": (lambda b, q, k: vosops.local_affinity(q, k, radius=1, backend=b),
                       lambda g: _local_inputs(g)[:2], "lower"),
    "local_aggregate": (lambda b, w, v: vosops.local_aggregate(w, v, radius=1, backend=b),
                        lambda g: (torch.rand(1, 2, 9, 6, 7, generator=g), _local_inputs(g)[2]), "lower"),
    "topk_attention": (lambda b, q, k, v: vosops.topk_attention(q, k, v, topk=3, dense_keys=2, backend=b),
                       lambda g: (torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 9, 8, generator=g),
                                  torch.randn(1, 2, 9, 3, generator=g)), "lower"),
    "global_topk": (lambda b, q, k: vosops.global_topk(q, k, topk=3, backend=b)[0],
                    lambda g: (torch.randn(1, 5, 8, generator=g), torch.randn(1, 11, 8, generator=g)), "lower"),
    "flow_warp": (lambda b, x, f: vosops.flow_warp(x, f, backend=b),
                  lambda g: (torch.randn(1, 3, 6, 7, generator=g), 2 * torch.randn(1, 2, 6, 7, generator=g)),
                  "widest"),
    "topk_aggregate": (lambda b, lg, v: vosops.topk_aggregate(lg, torch.tensor([[[0, 4, 2]] * 5], device=lg.device),
                                                              v, backend=b),
                       lambda g: (torch.randn(1, 5, 3, generator=g), torch.randn(1, 6, 2, generator=g)),
                       "widest"),
}


@pytest.mark.parametrize("name,backend,device", [
    pytest.param(name, *p.values, id=f"{name}-{p.id}", marks=p.marks)
    for name in sorted(CASES) for p in [pytest.param("reference", "cpu", id="reference-cpu"),
                                        *backend_device_params(name)]])
def test_mixed_dtypes_inside_autocast(name, backend, device):
    """The first input comes out of a low-precision layer, the others are fp32 (a memory, a mask, a flow): inside
    autocast the op runs and equals the op on the inputs cast by hand (autocast off inside: the reference's
    matmuls too); the gradients reach each input in its own dtype."""
    call, make, policy = CASES[name]
    # the Triton interpreter has no bfloat16
    low = torch.float16 if (backend, device) == ("triton", "cpu") else BF16
    g = torch.Generator().manual_seed(len(name))
    tensors = [t.to(device) for t in make(g)]
    tensors[0] = tensors[0].to(low)
    leaves = [t.clone().requires_grad_() for t in tensors]
    with torch.autocast(device, dtype=low):
        out = call(backend, *leaves)
    dtype = low if policy == "lower" else torch.float32
    assert out.dtype == dtype
    expected = call(backend, *[t.to(dtype) for t in tensors])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    if name == "global_topk":
        return  # its logits are differentiable, checked with the others through local/topk attention
    out.float().square().sum().backward()
    for leaf in leaves:
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype and torch.isfinite(leaf.grad).all()


def test_outside_autocast_mixed_dtypes_are_still_an_error():
    q, k, v = _local_inputs(torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="k has dtype torch.float32 but q has torch.bfloat16"):
        vosops.local_attention(q.to(BF16), k, v, radius=1)


def test_float64_is_left_alone_and_kmeans_is_not_cast():
    q, k, v = (t.double() for t in _local_inputs(torch.Generator().manual_seed(1)))
    with torch.autocast("cpu", dtype=BF16):
        assert vosops.local_attention(q, k, v, radius=1, backend="cpu").dtype == torch.float64
        x = torch.randn(2, 40, 3, generator=torch.Generator().manual_seed(2))
        inside = vosops.kmeans(x, 3, seed=0, backend="reference")
    outside = vosops.kmeans(x, 3, seed=0, backend="reference")
    assert inside.centroids.dtype == torch.float32
    torch.testing.assert_close(inside.centroids, outside.centroids, rtol=0, atol=0)


def test_autocast_under_torch_compile_fullgraph():
    q, k, v = CASES["topk_attention"][1](torch.Generator().manual_seed(3))

    def f(q, k, v):
        with torch.autocast("cpu", dtype=BF16):
            return vosops.topk_attention(torch.nn.functional.gelu(q), k, v, topk=3, dense_keys=2, backend="cpu")

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    assert out.dtype == BF16
    torch.testing.assert_close(out, f(q, k, v), rtol=0, atol=0)
