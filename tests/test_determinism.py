"""torch.use_deterministic_algorithms(True): the GPU backward kernels that add gradients with float atomics (CUDA
and Triton) raise, as PyTorch's own such ops do, or warn with warn_only=True; paths without atomics and the CPU
kernels run. The Triton kernels are checked here under the interpreter, the CUDA glue on a GPU."""

import contextlib

import pytest
import torch

import vosops
from conftest import backend_device_params


@contextlib.contextmanager
def deterministic(warn_only=False):
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _local(device, **grads):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 5, 6, generator=g).to(device).requires_grad_(grads.get("q", False))
    k = torch.randn(1, 2, 4, 5, 6, generator=g).to(device).requires_grad_(grads.get("k", False))
    v = torch.randn(1, 2, 3, 5, 6, generator=g).to(device).requires_grad_(grads.get("v", False))
    return q, k, v


# op -> [(what needs a gradient, call(backend, device) -> output, whether that backward adds with atomics on the GPU
# backends: a bool, or a bool per backend)]
CASES = {
    "flow_warp": [
        ("x", lambda b, d: vosops.flow_warp(torch.randn(1, 3, 5, 6, device=d, requires_grad=True),
                                            torch.randn(1, 2, 5, 6, device=d), backend=b), True),
        ("flow", lambda b, d: vosops.flow_warp(torch.randn(1, 3, 5, 6, device=d),
                                               torch.randn(1, 2, 5, 6, device=d, requires_grad=True), backend=b),
         False),
    ],
    "local_affinity": [
        ("k", lambda b, d: vosops.local_affinity(*_local(d, k=True)[:2], radius=1, backend=b), True),
        ("q", lambda b, d: vosops.local_affinity(*_local(d, q=True)[:2], radius=1, backend=b), False),
    ],
    "local_aggregate": [
        ("v", lambda b, d: vosops.local_aggregate(torch.rand(1, 2, 9, 5, 6, device=d), _local(d, v=True)[2],
                                                  radius=1, backend=b), True),
    ],
    "local_attention": [
        ("k, v with top-k", lambda b, d: vosops.local_attention(*_local(d, k=True, v=True), radius=1, topk=4,
                                                                backend=b), True),
        ("q with top-k", lambda b, d: vosops.local_attention(*_local(d, q=True), radius=1, topk=4, backend=b),
         False),
        # softmax over every candidate without offsets (MAMP training): Triton gathers dk, dv per key
        ("k, v, softmax over all", lambda b, d: vosops.local_attention(*_local(d, k=True, v=True), radius=1,
                                                                       backend=b), {"cuda": True, "triton": False}),
    ],
    "topk_aggregate": [
        ("values", lambda b, d: vosops.topk_aggregate(
            torch.randn(1, 4, 3, device=d), torch.tensor([[[0, 2, 1]] * 4], device=d),
            torch.randn(1, 3, 2, device=d, requires_grad=True), backend=b), True),
        ("logits", lambda b, d: vosops.topk_aggregate(
            torch.randn(1, 4, 3, device=d, requires_grad=True), torch.tensor([[[0, 2, 1]] * 4], device=d),
            torch.randn(1, 3, 2, device=d), backend=b), False),
    ],
    "topk_attention": [
        ("q, k, v", lambda b, d: vosops.topk_attention(
            *(torch.randn(1, 2, 6, 4, device=d, requires_grad=True) for _ in range(3)), topk=2, dense_keys=1,
            backend=b), {"cuda": True, "triton": False}),  # the Triton backward has no atomics
    ],
}
ATOMIC_BACKENDS = {"cuda", "triton"}


def _params():
    out = []
    for op, cases in CASES.items():
        for backend, device in [p.values for p in backend_device_params(op)]:  # cpu, triton, cuda where usable
            marks = [pytest.mark.cuda] if device == "cuda" else []
            for i, (what, _, atomic) in enumerate(cases):
                if isinstance(atomic, dict):
                    atomic = atomic.get(backend, False)
                expect = atomic and backend in ATOMIC_BACKENDS
                out.append(pytest.param(op, i, backend, device, expect, marks=marks,
                                        id=f"{op}-{what}-{backend}-{device}"))
    return out


@pytest.mark.parametrize("op,case,backend,device,alerts", _params())
def test_deterministic_algorithms(op, case, backend, device, alerts):
    call = CASES[op][case][1]
    out = call(backend, device)
    out.float().sum().backward()  # outside deterministic mode: runs
    with deterministic():
        out = call(backend, device)
        if alerts:
            with pytest.raises(RuntimeError, match=f"{op}.*does not have a deterministic implementation"):
                out.float().sum().backward()
        else:
            out.float().sum().backward()
    if alerts:
        with deterministic(warn_only=True):
            out = call(backend, device)
            with pytest.warns(UserWarning, match=f"{op}"):
                out.float().sum().backward()
