"""Kernels launch on their tensors' device, not on whichever CUDA device is current (vosops/_device.py).

Triton launches on the current device, so each Triton custom op runs under its inputs' device; so does the
CUDA-graph k-means loop, whose capture stream is the current device's. The CUDA C++ glue has its own guards.
Here: the rule (every Triton custom op carries the guard), the guard's choice of tensor, and, on a machine with two
GPUs, every Triton op and the graph loop on cuda:1 while cuda:0 is current."""

import ast
import contextlib
import glob
import os

import pytest
import torch

import vosops
from vosops import _backends, _device

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _decorators(fn: ast.FunctionDef) -> list[str]:
    return [ast.unparse(d) for d in fn.decorator_list]


def test_every_triton_custom_op_runs_on_its_inputs_device():
    ops = []
    for path in sorted(glob.glob(os.path.join(ROOT, "vosops", "triton", "*.py"))):
        for fn in ast.walk(ast.parse(open(path).read())):
            if isinstance(fn, ast.FunctionDef) and any("custom_op(" in d for d in _decorators(fn)):
                ops.append(fn.name)
                # custom_op must see the guarded function: the guard sits below it
                assert _decorators(fn)[1:] == ["on_input_device"], (path, fn.name, _decorators(fn))
    assert len(ops) >= 16, ops


def test_the_cuda_graph_loop_runs_on_its_inputs_device():
    from vosops.ops import _kmeans_graph

    assert _kmeans_graph.lloyd_cuda_graph.__wrapped__ is not None
    tree = ast.parse(open(os.path.join(ROOT, "vosops", "ops", "_kmeans_graph.py")).read())
    fn = next(f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "lloyd_cuda_graph")
    assert "on_input_device" in _decorators(fn)


def test_guard_takes_the_first_tensor_argument_lists_included(monkeypatch):
    given = []

    @contextlib.contextmanager
    def record(tensor):
        given.append(tensor)
        yield

    monkeypatch.setattr(_device, "cuda_device_of", record)
    guarded = _device.on_input_device(lambda *args, **kwargs: (args, kwargs))
    a, b = torch.zeros(1), torch.ones(2)
    assert guarded(3, [a, b], scale=1.0) == ((3, [a, b]), {"scale": 1.0})
    assert guarded(None, x=b)[1]["x"] is b
    guarded(1, "mode")  # no tensor: no guard
    assert given[0] is a and given[1] is b and len(given) == 2


def test_guard_is_nothing_for_cpu_tensors():
    assert isinstance(_device.cuda_device_of(torch.zeros(1)), contextlib.nullcontext)


def test_guarded_op_keeps_its_schema():
    """functools.wraps keeps the signature custom_op infers the schema from."""
    pytest.importorskip("triton")
    if _backends.why_unusable("triton", "flow_warp", "cpu") is not None:
        pytest.skip("triton backend not usable on CPU here")
    import vosops.triton.flow_warp  # noqa: F401  (registers the op)

    schema = str(torch.ops.vosops.flow_warp_triton.default._schema)
    assert schema == "vosops::flow_warp_triton(Tensor x, Tensor flow, str mode, str padding_mode) -> Tensor"


TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2


def _every_triton_op(device):
    """One call of each public op with a Triton backend, forward and backward, on `device`."""
    g = torch.Generator(device="cpu").manual_seed(11)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device).requires_grad_()  # noqa: E731
    T = dict(backend="triton")
    outs = []
    x, flow = rnd(2, 3, 9, 11), rnd(2, 2, 9, 11)
    outs.append(vosops.flow_warp(x, flow, **T))
    q, k, v = rnd(1, 4, 6, 7), rnd(1, 2, 4, 6, 7), rnd(1, 2, 3, 6, 7)
    outs.append(vosops.local_attention(q, k, v, radius=2, topk=5, **T))
    outs.append(vosops.local_affinity(q, k, radius=1, **T))
    w = torch.softmax(outs[-1].detach().nan_to_num(-1e4), 2).requires_grad_()
    outs.append(vosops.local_aggregate(w, v, radius=1, **T))
    qa, ka, va = rnd(1, 2, 20, 16), rnd(1, 2, 52, 16), rnd(1, 2, 52, 8)
    outs.append(vosops.topk_attention(qa, ka, va, topk=5, dense_keys=16, **T))
    qg, kg = rnd(1, 18, 8), rnd(1, 40, 8)
    logits, index = vosops.global_topk(qg, kg, topk=4, **T)
    outs.append(logits)
    outs.append(vosops.topk_aggregate(logits, index, rnd(1, 40, 5), **T))
    merged, _ = vosops.merge_topk([(logits, index), (logits + 0.5, index + 40)], topk=4, **T)
    outs.append(merged)
    for out in outs:
        out.sum().backward(retain_graph=True)
    km = vosops.kmeans(torch.randn(2, 64, 3, generator=g).to(device), 3, iters=5, seed=0, **T)
    return [o.detach().cpu() for o in outs] + [km.centroids.cpu(), km.labels.cpu()]


def test_the_two_gpu_calls_run_on_cpu():
    """The calls the two-GPU test compares, run here (interpreted Triton), so that test can only fail on devices."""
    if any(_backends.why_unusable("triton", op, "cpu") is not None
           for op in ("flow_warp", "local_attention", "topk_attention", "kmeans_step")):
        pytest.skip("the triton backend is not usable on CPU tensors here")
    outs = _every_triton_op("cpu")
    assert len(outs) == 10 and all(o.numel() and not o.isnan().any() for o in outs)


@pytest.mark.cuda
@pytest.mark.skipif(not TWO_GPUS, reason="needs two CUDA devices")
def test_triton_ops_on_a_second_gpu_while_the_first_is_current():
    if _backends.why_unusable("triton", "flow_warp", "cuda") is not None:
        pytest.skip("no usable triton backend on this GPU")
    torch.cuda.set_device(0)
    on_first = _every_triton_op("cuda:0")
    on_second = _every_triton_op("cuda:1")
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0
    for a, b in zip(on_first, on_second):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not TWO_GPUS, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_kmeans_cuda_graph_on_a_second_gpu(backend):
    if _backends.why_unusable(backend, "kmeans_step", "cuda") is not None:
        pytest.skip(f"no usable {backend} backend on this GPU")
    torch.cuda.set_device(0)
    x = torch.randn(3, 500, 8, generator=torch.Generator().manual_seed(2))
    # a capture on cuda:0 first: torch.cuda.graph's default capture stream would then be cuda:0's for good
    vosops.kmeans(x.to("cuda:0"), 4, iters=30, seed=1, backend=backend, cuda_graph=True)
    eager = vosops.kmeans(x.to("cuda:1"), 4, iters=30, seed=1, backend=backend)
    graphed = vosops.kmeans(x.to("cuda:1"), 4, iters=30, seed=1, backend=backend, cuda_graph=True)
    torch.testing.assert_close(graphed.centroids, eager.centroids)
    assert torch.equal(graphed.labels, eager.labels)
