"""Every op under `torch.compile`'s default backend (Inductor), inside a graph of other work.

The per-op compile tests trace with `aot_eager`, which runs the traced graph eagerly. Inductor goes further: it
generates code for the pointwise work around each op, fuses it, and lays out the buffers an op reads and writes from
the fake kernels' shapes and strides. A fake kernel whose strides differ from the real kernel's, or a kernel that
mishandles a buffer Inductor hands it (a permuted or offset view), shows up here and not under `aot_eager`.

Each graph feeds an op a permuted view computed inside the graph and consumes its outputs with pointwise work; the
compiled outputs and input gradients must match eager. One Inductor compile takes seconds on CPU, so this file keeps
to one graph per op family and backend.
"""

from __future__ import annotations

import pytest
import torch

import vosops
from vosops import testing
from vosops.ops import topk as topk_ops

from conftest import backend_device_params


def _native(op: str, supported=vosops.BACKENDS):
    """Backends that run compiled code here: the C++/CUDA kernels, and Triton on a GPU (not its interpreter)."""
    return [p for p in backend_device_params(op, supported) if p.values[0] != "triton" or p.values[1] == "cuda"]


def _permuted(shape, perm, device):
    """A tensor of `shape` that is stored in another dimension order (a non-contiguous view), requiring grad."""
    stored = [shape[i] for i in perm]
    inverse = [perm.index(i) for i in range(len(shape))]
    return torch.randn(stored, device=device).permute(inverse).requires_grad_()


@pytest.mark.parametrize("backend,device", _native("flow_warp"))
def test_flow_warp_in_an_inductor_graph(backend, device):
    x = _permuted((2, 3, 7, 9), (0, 2, 3, 1), device)   # channels-last storage
    flow = (torch.randn(2, 2, 7, 9, device=device) * 3).requires_grad_()

    def fn(a, f):
        warped = vosops.flow_warp(a * 2 + 1, f.transpose(2, 3).transpose(2, 3) * 0.5, backend=backend)
        return torch.sigmoid(warped) * a

    testing.check_compile(fn, (x, flow), backend="inductor")


@pytest.mark.parametrize("backend,device", _native("local_attention"))
def test_local_attention_in_an_inductor_graph(backend, device):
    q = _permuted((1, 4, 6, 7), (0, 2, 3, 1), device)
    k = _permuted((1, 2, 4, 6, 7), (0, 1, 3, 4, 2), device)
    v = torch.randn(1, 2, 3, 6, 7, device=device, requires_grad=True)
    offsets = torch.randn(1, 2, 2, 6, 7, device=device) * 2

    def fn(a, b, c):
        out = vosops.local_attention(a.relu() + 0.1, b * 0.5, c.tanh(), radius=1, topk=4, offsets=offsets,
                                     backend=backend)
        return out * 2 - c[:, 0]

    testing.check_compile(fn, (q, k, v), backend="inductor")


@pytest.mark.parametrize("backend,device", _native("local_affinity"))
def test_local_affinity_and_aggregate_in_an_inductor_graph(backend, device):
    q = _permuted((1, 3, 5, 6), (0, 2, 3, 1), device)
    k = torch.randn(1, 2, 3, 5, 6, device=device, requires_grad=True)
    v = _permuted((1, 2, 4, 5, 6), (0, 1, 3, 4, 2), device)
    offsets = torch.randn(1, 2, 2, 5, 6, device=device) * 2

    def fn(a, b, c):
        # masked taps are -inf; the clamp keeps a pixel whose every tap left the frame finite
        logits = vosops.local_affinity(a * 0.7, b, radius=1, offsets=offsets, backend=backend).clamp_min(-30)
        weights = torch.softmax(logits.flatten(1, 2), dim=1).view_as(logits)
        return vosops.local_aggregate(weights, c + 1, radius=1, offsets=offsets, backend=backend).square()

    testing.check_compile(fn, (q, k, v), backend="inductor")


@pytest.mark.parametrize("backend,device", _native("global_topk"))
def test_global_topk_readout_in_an_inductor_graph(backend, device):
    q = _permuted((2, 6, 5), (0, 2, 1), device)
    k = torch.randn(2, 11, 5, device=device, requires_grad=True)
    values = _permuted((2, 11, 3), (0, 2, 1), device)

    def fn(a, b, c):
        logits, index = vosops.global_topk(a * 2, b, topk=4, backend=backend)
        logits, index = vosops.merge_topk([(logits, index)], 3)
        return vosops.topk_aggregate(logits, index, c.exp(), backend=backend) + logits.sum(-1, keepdim=True)

    testing.check_compile(fn, (q, k, values), backend="inductor")


@pytest.mark.parametrize("backend,device", _native("topk_attention", topk_ops.ATTENTION_BACKENDS))
def test_topk_attention_in_an_inductor_graph(backend, device):
    q = _permuted((1, 2, 6, 4), (0, 2, 1, 3), device)   # (B, M, heads, D) storage, as a projection's output
    k = _permuted((1, 2, 13, 4), (0, 2, 1, 3), device)
    v = torch.randn(1, 2, 13, 3, device=device, requires_grad=True)

    def fn(a, b, c):
        out = vosops.topk_attention(a * 0.5, b, c + 1, topk=4, dense_keys=3, backend=backend)
        return out.transpose(1, 2).flatten(2).relu()

    testing.check_compile(fn, (q, k, v), backend="inductor")


@pytest.mark.parametrize("backend,device", _native("kmeans_step"))
def test_kmeans_steps_in_an_inductor_graph(backend, device):
    x = torch.randn(2, 5, 23, device=device).transpose(1, 2)   # (B, N, D) stored as (B, D, N)
    lengths = torch.tensor([23, 9], device=device)
    centers = torch.randn(2, 4, 5, device=device)
    step, assign = vosops.ops.kmeans._steps(backend)

    def fn(a, lens, c):
        labels, distances, new_centers, counts = step(a * 2, lens, c)
        relabels, redistances = assign(a * 2, lens, new_centers)
        return labels, distances.sqrt(), new_centers + 1, counts, relabels, redistances * 0.5

    testing.check_compile(fn, (x, lengths, centers), backend="inductor")
