"""The float32 product precision of the Triton kernels follows PyTorch's TF32 switch (vosops/_precision.py).

The interpreter computes every tl.dot in exact float32 whatever input_precision says, so on CPU these tests hold the
rule and its plumbing: which precision each kernel launch receives, and that a backward takes its forward's. The
cuda-marked test holds the numbers on a GPU."""

import pytest
import torch

import vosops
from vosops import _backends
from vosops._precision import fp32_dot_precision

from conftest import DEVICES

MATMUL = torch.backends.cuda.matmul


@pytest.fixture
def clean_precision():
    """Leaves PyTorch's precision settings as they were found (unset) whatever the test switched, old API or new."""
    assert MATMUL.fp32_precision == "none" and torch.backends.fp32_precision == "none", "a test leaked a setting"
    yield
    torch.set_float32_matmul_precision("highest")  # the legacy getter's state, which the new API does not reset
    MATMUL.fp32_precision = "none"
    torch.backends.fp32_precision = "none"


def _set_new_tf32():
    MATMUL.fp32_precision = "tf32"


def _set_new_ieee():
    MATMUL.fp32_precision = "ieee"


def _set_generic_tf32():
    torch.backends.fp32_precision = "tf32"


def _set_generic_tf32_matmul_ieee():
    torch.backends.fp32_precision = "tf32"
    MATMUL.fp32_precision = "ieee"


def _set_legacy(level):
    return lambda: torch.set_float32_matmul_precision(level)


def _set_legacy_allow_tf32():
    MATMUL.allow_tf32 = True


@pytest.mark.parametrize("switch,expected", [
    (lambda: None, "ieee"),
    (_set_new_tf32, "tf32"),
    (_set_new_ieee, "ieee"),
    (_set_generic_tf32, "tf32"),
    (_set_generic_tf32_matmul_ieee, "ieee"),
    (_set_legacy("high"), "tf32"),
    (_set_legacy("medium"), "tf32"),
    (_set_legacy("highest"), "ieee"),
    (_set_legacy_allow_tf32, "tf32"),
], ids=["default", "new-tf32", "new-ieee", "generic-tf32", "generic-tf32-matmul-ieee", "legacy-high",
        "legacy-medium", "legacy-highest", "legacy-allow-tf32"])
def test_precision_follows_pytorch_tf32_switch(clean_precision, switch, expected):
    switch()
    assert fp32_dot_precision() == expected


def test_precision_is_exact_when_pytorch_refuses_to_answer(monkeypatch):
    """PyTorch raises from its legacy getter once the old and new APIs were mixed: vosops stays exact then."""
    import vosops._precision as precision

    def refuse():
        raise RuntimeError("PyTorch is checking the matmul precision without a specific backend name")

    monkeypatch.setattr(precision, "_matmul_precision_setting", refuse)
    assert precision.fp32_dot_precision() == "ieee"


@pytest.mark.parametrize("user_setting", ["none", "tf32", "ieee"])
def test_bench_fma_peak_measures_with_tf32_off_and_restores_the_users_switch(clean_precision, user_setting):
    """The FMA floor's matmul runs exact whatever the user set, through the new API (reading the legacy allow_tf32
    after the new API was used raises)."""
    from vosops._precision import tf32_matmuls

    MATMUL.fp32_precision = user_setting
    with tf32_matmuls(False):
        assert MATMUL.fp32_precision == "ieee" and fp32_dot_precision() == "ieee"
    assert MATMUL.fp32_precision == user_setting


def test_precision_is_exact_on_rocm(clean_precision, monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2")
    MATMUL.fp32_precision = "tf32"
    assert fp32_dot_precision() == "ieee"


class _LaunchSpy:
    """Stands in for a Triton kernel: records (kernel, PREC) of every launch and runs the kernel."""

    def __init__(self, kernel, name, seen):
        self.kernel, self.name, self.seen = kernel, name, seen
        self.arg_names = kernel.arg_names

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            assert "PREC" in kwargs, f"{self.name}: PREC passed positionally or not at all"
            self.seen.append((self.name, kwargs["PREC"]))
            return launch(*args, **kwargs)

        return run


def _spy_on_precision_kernels(monkeypatch):
    """Every kernel with a PREC constexpr in the Triton modules that have matrix products, replaced by a spy (the
    jit helpers with one, which kernels call, stay)."""
    from vosops.triton import local_attention_tiled, topk

    seen = []
    for module in (topk, local_attention_tiled):
        for name, obj in list(vars(module).items()):
            if name.endswith("_kernel") and "PREC" in getattr(obj, "arg_names", ()):
                monkeypatch.setattr(module, name, _LaunchSpy(obj, name, seen))
    return seen


def _triton_usable(op):
    return _backends.why_unusable("triton", op, "cpu") is None


def _topk_attention(backward_switch=None):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g, requires_grad=True) for n in (20, 52, 52))
    out = vosops.topk_attention(q, k, v, topk=5, dense_keys=16, backend="triton")
    if backward_switch:
        backward_switch()
    out.backward(torch.randn(out.shape, generator=g))


def _global_topk(backward_switch=None):
    g = torch.Generator().manual_seed(4)
    vosops.global_topk(torch.randn(1, 18, 8, generator=g), torch.randn(1, 40, 8, generator=g), topk=3,
                       backend="triton")


def _local_attention(backward_switch=None, **kw):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 5, 6, generator=g, requires_grad=True)
    k = torch.randn(1, 2, 4, 5, 6, generator=g, requires_grad=True)
    v = torch.randn(1, 2, 3, 5, 6, generator=g, requires_grad=True)
    out = vosops.local_attention(q, k, v, radius=1, backend="triton", **kw)
    if backward_switch:
        backward_switch()
    out.backward(torch.randn(out.shape, generator=g))


# (op for usability, the call, the kernels its forward and backward must launch)
CALLS = {
    "topk_attention": ("topk_attention", _topk_attention,
                       {"_fwd_kernel", "_bwd_dq_kernel", "_bwd_dense_kv_kernel"}),
    "global_topk": ("global_topk", _global_topk, {"_global_topk_split_kernel"}),
    # top-k: the query-tile backward kernel; softmax over every candidate without offsets: the key-major one
    "local_attention-topk": ("local_attention", lambda s=None: _local_attention(s, topk=4),
                             {"forward_kernel", "backward_kernel"}),
    "local_attention-softmax": ("local_attention", lambda s=None: _local_attention(s),
                                {"forward_kernel", "backward_kernel", "backward_kv_kernel"}),
}


@pytest.fixture
def tiled_local_attention(monkeypatch):
    from vosops.triton import local_attention

    monkeypatch.setitem(local_attention.LOCAL_ATTENTION_CONFIG, "tiled", True)


@pytest.mark.parametrize("tf32", [False, True], ids=["exact", "tf32"])
@pytest.mark.parametrize("case", list(CALLS))
def test_every_product_kernel_launch_gets_the_switch(case, tf32, clean_precision, tiled_local_attention,
                                                     monkeypatch):
    op, call, kernels = CALLS[case]
    if not _triton_usable(op):
        pytest.skip(f"the triton backend is not usable for {op} on CPU tensors here")
    seen = _spy_on_precision_kernels(monkeypatch)
    if tf32:
        MATMUL.fp32_precision = "tf32"
    call()
    assert {name for name, _ in seen} >= kernels, seen
    assert {prec for _, prec in seen} == {"tf32" if tf32 else "ieee"}, seen


@pytest.mark.parametrize("forward_tf32", [False, True], ids=["exact-then-tf32", "tf32-then-exact"])
@pytest.mark.parametrize("case", ["topk_attention", "local_attention-topk", "local_attention-softmax"])
def test_backward_takes_its_forwards_precision(case, forward_tf32, clean_precision, tiled_local_attention,
                                               monkeypatch):
    """The switch flipped between forward and backward: the backward recomputes the forward's scores (the kept set
    and log-sum-exp it saved are theirs), so it keeps the forward's precision."""
    op, call, _ = CALLS[case]
    if not _triton_usable(op):
        pytest.skip(f"the triton backend is not usable for {op} on CPU tensors here")
    seen = _spy_on_precision_kernels(monkeypatch)
    MATMUL.fp32_precision = "tf32" if forward_tf32 else "ieee"
    call(lambda: setattr(MATMUL, "fp32_precision", "ieee" if forward_tf32 else "tf32"))
    assert len(seen) >= 2 and {prec for _, prec in seen} == {"tf32" if forward_tf32 else "ieee"}, seen


@pytest.mark.cuda
@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device")
def test_tf32_on_a_gpu_is_tf32_accurate_and_not_exact(clean_precision):
    """On a GPU the switch changes the products: TF32 results differ from the exact ones, by TF32's rounding only
    (SDPA form: topk covers every key, so the kept set cannot change)."""
    if _backends.why_unusable("triton", "topk_attention", "cuda") is not None:
        pytest.skip("no usable triton backend on this GPU")
    g = torch.Generator(device="cuda").manual_seed(6)
    q, k, v = (torch.randn(2, 3, n, 64, device="cuda", generator=g) for n in (200, 300, 300))
    expected = vosops.topk_attention(q.double(), k.double(), v.double(), topk=300, backend="reference")
    exact = vosops.topk_attention(q, k, v, topk=300, backend="triton")
    MATMUL.fp32_precision = "tf32"
    tf32 = vosops.topk_attention(q, k, v, topk=300, backend="triton")
    torch.testing.assert_close(exact.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tf32.double(), expected, rtol=2e-2, atol=2e-2)
    assert (tf32 - exact).abs().max() > 1e-6, "TF32 products gave exactly the fp32 ones: the switch did nothing"


def test_compiled_graph_reads_the_switch_when_it_compiles(clean_precision, monkeypatch):
    """torch.compile(fullgraph=True) cannot trace PyTorch's precision getters: the switch is read as a constant when
    the graph is compiled (no graph break), and its launches take it."""
    if not _triton_usable("topk_attention"):
        pytest.skip("the triton backend is not usable for topk_attention on CPU tensors here")
    seen = _spy_on_precision_kernels(monkeypatch)
    MATMUL.fp32_precision = "tf32"
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b, c: vosops.topk_attention(a, b, c, topk=5, dense_keys=16, backend="triton"),
                       fullgraph=True, backend="aot_eager")
    q, k, v = (torch.randn(1, 2, n, 16) for n in (20, 52, 52))
    fn(q, k, v)
    torch._dynamo.reset()
    assert seen and {prec for _, prec in seen} == {"tf32"}, seen


def test_triton_ops_called_directly_reject_an_unknown_precision():
    if not _triton_usable("topk_attention") or not _triton_usable("local_attention"):
        pytest.skip("the triton backend is not usable on CPU tensors here")
    from vosops.triton import local_attention as tla
    from vosops.triton import topk as ttk

    q, k, v = (torch.randn(1, 1, n, 16) for n in (16, 40, 40))
    with pytest.raises(ValueError, match="precision: expected 'ieee' or 'tf32', got 'tf16'"):
        ttk.topk_attention_triton(q, k, v, 5, 0.25, 16, "tf16")
    out, lse, index = ttk.topk_attention_triton(q, k, v, 5, 0.25, 16, "ieee")
    with pytest.raises(ValueError, match="precision: expected 'ieee' or 'tf32', got 'IEEE'"):
        ttk.topk_attention_triton_backward(torch.ones_like(out), q, k, v, out, lse, index, 0.25, 16, "IEEE")
    ql, kl, vl = torch.randn(1, 4, 5, 6), torch.randn(1, 2, 4, 5, 6), torch.randn(1, 2, 3, 5, 6)
    with pytest.raises(ValueError, match="precision: expected 'ieee' or 'tf32', got 'fast'"):
        tla.local_attention_triton(ql, kl, vl, None, 1, 1, 1.0, 0, "softmax", "square", "mask", False, True, "fast")


def _tf32_global_topk_case(device):
    """(exact, tf32, q, k) of global_topk on random floats: scale 1 keeps logits O(10), TF32's error O(1e-2)."""
    g = torch.Generator().manual_seed(8)
    q, k = torch.randn(2, 300, 64, generator=g).to(device), torch.randn(2, 900, 64, generator=g).to(device)
    exact = vosops.global_topk(q, k, topk=10, backend="triton")
    MATMUL.fp32_precision = "tf32"
    tf32 = vosops.global_topk(q, k, topk=10, backend="triton")
    return exact, tf32, q, k


def _tf32_local_attention_case(device):
    """(exact, tf32, float64 reference) of the query-tile local_attention, softmax over every candidate (no
    selection, so no kept set can change), forward and the gradient of q."""
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 32, 12, 20, generator=g).to(device)
    k = torch.randn(2, 2, 32, 12, 20, generator=g).to(device)
    v = torch.randn(2, 2, 5, 12, 20, generator=g).to(device)
    gout = torch.randn(2, 5, 12, 20, generator=g).to(device)

    def run(backend, dtype):
        qq = q.to(dtype).requires_grad_()
        out = vosops.local_attention(qq, k.to(dtype), v.to(dtype), radius=3, scale=0.2, backend=backend)
        (dq,) = torch.autograd.grad(out, qq, gout.to(dtype))
        return out.detach().double(), dq.double()

    reference = run("reference", torch.float64)
    exact = run("triton", torch.float32)
    MATMUL.fp32_precision = "tf32"
    return exact, run("triton", torch.float32), reference


@pytest.mark.cuda
@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device")
def test_tf32_global_topk_on_a_gpu(clean_precision):
    """TF32 scores select the definition's keys except within TF32's rounding of a tie, and differ from exact."""
    if _backends.why_unusable("triton", "global_topk", "cuda") is not None:
        pytest.skip("no usable triton backend on this GPU")
    from test_topk import assert_topk_of_random_floats

    exact, tf32, q, k = _tf32_global_topk_case("cuda")
    assert_topk_of_random_floats(exact, q, k, 10, 1.0)
    assert_topk_of_random_floats(tf32, q, k, 10, 1.0, tol=0.1)
    assert (tf32[0] - exact[0]).abs().max() > 1e-5, "TF32 scores equal the exact ones: the switch did nothing"


@pytest.mark.cuda
@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device")
def test_tf32_local_attention_tiles_on_a_gpu(clean_precision, tiled_local_attention):
    if _backends.why_unusable("triton", "local_attention", "cuda") is not None:
        pytest.skip("no usable triton backend on this GPU")
    exact, tf32, reference = _tf32_local_attention_case("cuda")
    for name, e, t, r in zip(("out", "dq"), exact, tf32, reference):
        torch.testing.assert_close(e.cpu(), r.cpu(), rtol=1e-4, atol=1e-4, msg=name)
        torch.testing.assert_close(t.cpu(), r.cpu(), rtol=2e-2, atol=2e-2, msg=name)
        assert (t - e).abs().max() > 1e-6, f"{name}: TF32 equals exact: the switch did nothing"
