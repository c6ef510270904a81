"""A gradient of a gradient through the native kernels raises a clear error; it used to come back as zeros.

The native backward ops have no derivative of their own. Without an autograd rule on them PyTorch only warned and
treated their outputs as constants, so a gradient penalty (`torch.autograd.grad(..., create_graph=True)` and a
backward through the result) silently gave zero second-order terms. The reference backend differentiates twice.
"""

from __future__ import annotations

import pytest
import torch

import vosops
from vosops.ops import topk as topk_ops

from conftest import backend_device_params


def _flow_warp(backend, device):
    x = torch.randn(1, 2, 4, 5, dtype=torch.float32, device=device, requires_grad=True)
    flow = torch.randn(1, 2, 4, 5, device=device, requires_grad=True)
    return vosops.flow_warp(x, flow, backend=backend), (x, flow)


def _local_attention(backend, device):
    q = torch.randn(1, 3, 4, 5, device=device, requires_grad=True)
    k = torch.randn(1, 2, 3, 4, 5, device=device, requires_grad=True)
    v = torch.randn(1, 2, 2, 4, 5, device=device, requires_grad=True)
    return vosops.local_attention(q, k, v, radius=1, topk=4, backend=backend), (q, k, v)


def _local_affinity(backend, device):
    q = torch.randn(1, 3, 4, 5, device=device, requires_grad=True)
    k = torch.randn(1, 2, 3, 4, 5, device=device, requires_grad=True)
    return vosops.local_affinity(q, k, radius=1, border="zero", backend=backend), (q, k)


def _local_aggregate(backend, device):
    w = torch.randn(1, 2, 9, 4, 5, device=device, requires_grad=True)
    v = torch.randn(1, 2, 3, 4, 5, device=device, requires_grad=True)
    return vosops.local_aggregate(w, v, radius=1, backend=backend), (w, v)


def _topk_aggregate(backend, device):
    logits = torch.randn(2, 6, 4, device=device, requires_grad=True)
    index = torch.randint(0, 9, (2, 6, 4), device=device)
    values = torch.randn(2, 9, 3, device=device, requires_grad=True)
    return vosops.topk_aggregate(logits, index, values, backend=backend), (logits, values)


def _topk_attention(backend, device):
    q = torch.randn(1, 2, 5, 4, device=device, requires_grad=True)
    k = torch.randn(1, 2, 9, 4, device=device, requires_grad=True)
    v = torch.randn(1, 2, 9, 3, device=device, requires_grad=True)
    return vosops.topk_attention(q, k, v, topk=3, dense_keys=2, backend=backend), (q, k, v)


CASES = {
    "flow_warp": (_flow_warp, "flow_warp"),
    "local_attention": (_local_attention, "local_attention"),
    "local_affinity": (_local_affinity, "local_affinity"),
    "local_aggregate": (_local_aggregate, "local_affinity"),
    "topk_aggregate": (_topk_aggregate, "topk_aggregate"),
    "topk_attention": (_topk_attention, "topk_attention"),
}
SUPPORTED = {"topk_aggregate": topk_ops.AGGREGATE_BACKENDS, "topk_attention": topk_ops.ATTENTION_BACKENDS}
PARAMS = [pytest.param(name, *p.values, id=f"{name}-{p.id}", marks=p.marks)
          for name, (_, op) in CASES.items()
          for p in backend_device_params(op, SUPPORTED.get(name, vosops.BACKENDS)) if p.values[0] != "triton"]


def _penalty(out, inputs):
    """A gradient penalty: the squared norm of d(sum out^2)/d(inputs), differentiable through create_graph."""
    grads = torch.autograd.grad(out.pow(2).sum(), inputs, create_graph=True)
    return sum(g.pow(2).sum() for g in grads)


@pytest.mark.parametrize("name,backend,device", PARAMS)
def test_native_double_backward_raises(name, backend, device):
    out, inputs = CASES[name][0](backend, device)
    penalty = _penalty(out, inputs)
    with pytest.raises(RuntimeError, match=rf"vosops::{name}_backward is not differentiable.*backend='reference'"):
        penalty.backward()


@pytest.mark.parametrize("name,backend,device", PARAMS)
def test_native_first_order_gradients_are_unchanged_under_create_graph(name, backend, device):
    """create_graph=True on its own (a first-order gradient kept in a graph, never differentiated) still works and
    equals the reference's."""
    torch.manual_seed(3)
    out, inputs = CASES[name][0](backend, device)
    got = torch.autograd.grad(out.pow(2).sum(), inputs, create_graph=True)
    torch.manual_seed(3)
    out_ref, inputs_ref = CASES[name][0]("reference", device)
    exp = torch.autograd.grad(out_ref.pow(2).sum(), inputs_ref)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_reference_differentiates_twice():
    out, inputs = _flow_warp("reference", "cpu")
    _penalty(out, inputs).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in inputs)
