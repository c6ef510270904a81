"""merge_topk and topk_aggregate on every backend (cpu, cuda, triton) against the reference: candidate lists of
different widths with ties, duplicate indices, -1 / -inf / NaN entries and rows with fewer valid candidates than
topk; gradients, gradcheck, opcheck, torch.compile and bad input. (test_topk.py holds the reference's own tests
and the basic topk_aggregate comparison.)"""

import pytest
import torch

import vosops
from vosops import reference, testing
from vosops.ops import topk as topk_ops

from conftest import backend_device_params

NEG_INF = float("-inf")
MERGE_BACKENDS = backend_device_params("merge_topk", topk_ops.MERGE_BACKENDS)
AGG_BACKENDS = backend_device_params("topk_aggregate", topk_ops.AGGREGATE_BACKENDS)
CPU_ONLY = [p for p in MERGE_BACKENDS if p.values[0] == "cpu"]
TRITON = [p for p in MERGE_BACKENDS if p.values[0] == "triton"]


def merge_lists(B, M, widths, *, device="cpu", seed=0):
    """Candidate lists with disjoint index spaces (like frame 0 + local windows), integer-valued logits (exact
    ties in every dtype), invalid entries of every kind, duplicates of list 0's entries in the last list, and a
    row left with fewer valid candidates than any topk."""
    g = torch.Generator().manual_seed(seed)
    lists, base = [], 0
    for w in widths:
        logits = torch.randint(-3, 4, (B, M, w), generator=g).double() * 0.5
        index = base + torch.randint(0, 3 * w, (B, M, w), generator=g)
        drop = torch.rand(B, M, w, generator=g)
        index = torch.where(drop < 0.1, torch.full_like(index, -1), index)
        logits = torch.where((drop >= 0.1) & (drop < 0.2), torch.full_like(logits, NEG_INF), logits)
        logits = torch.where((drop >= 0.2) & (drop < 0.25), torch.full_like(logits, float("nan")), logits)
        lists.append([logits, index])
        base += 3 * w
    if len(widths) > 1:  # the same (logit, index) twice: ties on both, the input position decides
        n = min(widths[0], widths[-1])
        lists[-1][0][..., :n] = lists[0][0][..., :n]
        lists[-1][1][..., :n] = lists[0][1][..., :n]
    for logits, index in lists:  # row (0, 0): all but one candidate invalid
        index[0, 0, 1:] = -1
    lists[0][1][0, 0, 0] = 5
    for n in range(1, len(lists)):
        lists[n][1][0, 0, 0] = -1
    return [(l.to(device), i.to(device)) for l, i in lists]


MERGE_CASES = [  # (B, M, widths, topk)
    (2, 5, (3, 4), 4),
    (1, 7, (10, 10), 10),
    (2, 3, (2, 7, 1, 6), 16),  # topk = every candidate: padding after the valid ones
    (1, 4, (1,), 1),
    (1, 3, (21, 5), 3),        # more candidates than one Triton chunk
]


def _merge_fn(n_lists, topk, backend):
    def fn(**kw):
        return (reference.merge_topk if backend == "reference" else
                lambda c, t: vosops.merge_topk(c, t, backend=backend))(
            [(kw[f"l{n}"], kw[f"i{n}"]) for n in range(n_lists)], topk)
    return fn


@pytest.mark.parametrize("backend,device", MERGE_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
def test_merge_topk_backend_matches_reference(backend, device, layout):
    for dtype in testing.backend_dtypes(backend, device):
        for seed, (B, M, widths, topk) in enumerate(MERGE_CASES):
            lists = merge_lists(B, M, widths, device=device, seed=seed)
            inputs = {}
            for n, (logits, index) in enumerate(lists):
                inputs[f"l{n}"], inputs[f"i{n}"] = logits, index
            testing.check_against_reference(
                _merge_fn(len(lists), topk, backend), _merge_fn(len(lists), topk, "reference"), inputs, dtype=dtype,
                grad_inputs=[f"l{n}" for n in range(len(lists))], layout=layout, seed=seed)


@pytest.mark.parametrize("backend,device", MERGE_BACKENDS)
def test_merge_topk_pads_a_row_with_fewer_valid_candidates(backend, device):
    logits = torch.tensor([[[1.0, NEG_INF, 3.0], [float("nan"), 2.0, 2.0]]], device=device)
    index = torch.tensor([[[4, 1, -1], [0, 9, 7]]], device=device)
    out_l, out_i = vosops.merge_topk([(logits[..., :1], index[..., :1]), (logits[..., 1:], index[..., 1:])], 3,
                                     backend=backend)
    assert out_i.tolist() == [[[4, -1, -1], [7, 9, -1]]]
    assert out_l.tolist() == [[[1.0, NEG_INF, NEG_INF], [2.0, 2.0, NEG_INF]]]


@pytest.mark.parametrize("backend,device", CPU_ONLY)
def test_merge_topk_gradcheck(backend, device):
    a = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    ia, ib = torch.randint(-1, 8, (2, 3, 4)), torch.randint(8, 20, (2, 3, 5))
    testing.check_gradcheck(lambda x, y: vosops.merge_topk([(x, ia), (y, ib)], 6, backend=backend)[0], (a, b))


# --- topk_aggregate: the cases test_topk.py does not reach ----------------------------------------------------------

AGG_CASES = [  # (B, M, K, L, Cv, normalize, k)
    (1, 5, 21, 30, 37, "threshold", 4),  # several candidate chunks and channel blocks
    (2, 3, 6, 9, 2, "threshold", 9),     # k > K: every valid candidate kept
    (1, 4, 7, 12, 5, "threshold", 1),    # ties at the top: all of them kept
    (2, 6, 9, 17, 3, "softmax", None),
    (1, 1, 1, 1, 1, "softmax", None),
]


@pytest.mark.parametrize("backend,device", AGG_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
def test_topk_aggregate_thresholds_and_odd_shapes(backend, device, layout):
    for dtype in testing.backend_dtypes(backend, device):
        for seed, (B, M, K, L, Cv, normalize, k) in enumerate(AGG_CASES):
            g = torch.Generator().manual_seed(seed)
            logits = torch.randint(-2, 3, (B, M, K), generator=g).double() * 1.5  # many exact ties
            index = torch.randint(-1, L, (B, M, K), generator=g)
            logits[0, 0, 0] = float("nan")
            if M > 1:
                index[0, 1] = -1  # nothing valid: output 0, zero gradient
            values = torch.randn(B, L, Cv, generator=g, dtype=torch.float64)
            index = index.to(device)
            testing.check_against_reference(
                lambda logits, values: vosops.topk_aggregate(logits, index, values, normalize=normalize, k=k,
                                                             backend=backend),
                lambda logits, values: reference.topk_aggregate(logits, index, values, normalize=normalize, k=k),
                {"logits": logits.to(device), "values": values.to(device)}, dtype=dtype,
                grad_inputs=("logits", "values"), layout=layout, seed=seed)


@pytest.mark.parametrize("backend,device", AGG_BACKENDS)
@pytest.mark.parametrize("wrt", ["logits", "values"])
def test_topk_aggregate_gradient_of_one_input(backend, device, wrt):
    """Only one input requires grad: the backward computes just that one (need_logits/need_values paths)."""
    logits = torch.randn(2, 3, 4, device=device, requires_grad=wrt == "logits")
    values = torch.randn(2, 5, 3, device=device, requires_grad=wrt == "values")
    index = torch.randint(-1, 5, (2, 3, 4), device=device)
    x = logits if wrt == "logits" else values
    g = torch.randn(2, 3, 3, device=device)
    out = vosops.topk_aggregate(logits, index, values, normalize="threshold", k=2, backend=backend)
    (got,) = torch.autograd.grad((out * g).sum(), x)
    exp = reference.topk_aggregate(logits, index, values, normalize="threshold", k=2)
    (want,) = torch.autograd.grad((exp * g).sum(), x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,device", AGG_BACKENDS)
@pytest.mark.parametrize("normalize,k", [("softmax", None), ("threshold", 3)])
def test_topk_aggregate_large_logits_are_max_subtracted(backend, device, normalize, k):
    """Logits around 400 (exp overflows float32 past ~88): the softmax is max-subtracted, so the output is the
    reference's, not inf/NaN; ties and invalid candidates as usual."""
    g = torch.Generator().manual_seed(11)
    B, M, K, L, Cv = 2, 5, 6, 9, 3
    logits = 400.0 + torch.randint(-4, 5, (B, M, K), generator=g).double() * 0.5
    index = torch.randint(-1, L, (B, M, K), generator=g)
    values = torch.randn(B, L, Cv, generator=g, dtype=torch.float64)
    index = index.to(device)
    for dtype in testing.backend_dtypes(backend, device):
        testing.check_against_reference(
            lambda logits, values: vosops.topk_aggregate(logits, index, values, normalize=normalize, k=k,
                                                         backend=backend),
            lambda logits, values: reference.topk_aggregate(logits, index, values, normalize=normalize, k=k),
            {"logits": logits.to(device), "values": values.to(device)}, dtype=dtype,
            grad_inputs=("logits", "values"))


@pytest.mark.parametrize("backend,device", AGG_BACKENDS)
def test_topk_aggregate_noncontiguous_upstream_gradient(backend, device):
    """The backward reads grad_out through its strides: an upstream gradient that is a strided view (every other
    element of a larger buffer) gives the reference's gradients."""
    g = torch.Generator().manual_seed(12)
    B, M, K, L, Cv = 2, 4, 5, 8, 6
    logits = torch.randn(B, M, K, generator=g).to(device).requires_grad_()
    values = torch.randn(B, L, Cv, generator=g).to(device).requires_grad_()
    index = torch.randint(-1, L, (B, M, K), generator=g).to(device)
    up = testing.relayout(torch.randn(B, M, Cv, generator=g).to(device), "noncontiguous")
    assert not up.is_contiguous()
    for normalize, k in (("softmax", None), ("threshold", 2)):
        out = vosops.topk_aggregate(logits, index, values, normalize=normalize, k=k, backend=backend)
        got = torch.autograd.grad(out, (logits, values), up)
        ref_in = [t.detach().double().requires_grad_() for t in (logits, values)]
        exp = reference.topk_aggregate(ref_in[0], index, ref_in[1], normalize=normalize, k=k)
        want = torch.autograd.grad(exp, ref_in, up.double())
        for name, a, e in zip(("logits", "values"), got, want):
            testing.assert_close(a, e, torch.float32, f"grad of {name} ({normalize})", grad=True)


# --- registration, compile, errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", [p for p in MERGE_BACKENDS if p.values[0] in ("cpu", "cuda")])
def test_opcheck_native(backend, device):
    lists = merge_lists(2, 3, (3, 4), device=device)
    logits = torch.cat([l for l, _ in lists], -1).float().requires_grad_()
    index = torch.cat([i for _, i in lists], -1)
    testing.check_opcheck(torch.ops.vosops.merge_topk.default, (logits, index, 5))
    testing.check_opcheck(torch.ops.vosops.merge_topk.default, (logits, index, 7))
    if device == "cuda":  # the CPU topk_aggregate op is opchecked in test_topk.py
        lg = torch.randn(2, 3, 4, device=device, requires_grad=True)
        values = torch.randn(2, 5, 3, device=device, requires_grad=True)
        ix = torch.randint(-1, 5, (2, 3, 4), device=device)
        testing.check_opcheck(torch.ops.vosops.topk_aggregate.default, (lg, ix, values, "softmax", 0))
        testing.check_opcheck(torch.ops.vosops.topk_aggregate.default, (lg, ix, values, "threshold", 2))


@pytest.mark.parametrize("backend,device", TRITON)
def test_opcheck_triton(backend, device):
    from vosops.triton import merge_topk as tm
    from vosops.triton import topk_aggregate as ta

    lists = merge_lists(1, 3, (3, 4), device=device)
    logits = torch.cat([l for l, _ in lists], -1).float().requires_grad_()
    index = torch.cat([i for _, i in lists], -1)
    testing.check_opcheck(tm.merge_topk_triton, (logits, index, 5))
    lg = torch.randn(1, 3, 4, device=device, requires_grad=True)
    values = torch.randn(1, 5, 3, device=device, requires_grad=True)
    ix = torch.randint(-1, 5, (1, 3, 4), device=device)
    testing.check_opcheck(ta.topk_aggregate_triton, (lg, ix, values, "softmax", 0))
    testing.check_opcheck(ta.topk_aggregate_triton, (lg, ix, values, "threshold", 2))


@pytest.mark.parametrize("backend,device", MERGE_BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    ia = torch.randint(-1, 6, (1, 4, 3), device=device)
    ib = torch.randint(6, 12, (1, 4, 5), device=device)

    def readout(a, b, values):
        logits, index = vosops.merge_topk([(a, ia), (b, ib)], 4, backend=backend)
        return vosops.topk_aggregate(logits, index, values, normalize="threshold", k=2, backend=backend)

    testing.check_compile(readout, (torch.randn(1, 4, 3, device=device, requires_grad=True),
                                    torch.randn(1, 4, 5, device=device, requires_grad=True),
                                    torch.randn(1, 12, 3, device=device, requires_grad=True)))


@pytest.mark.parametrize("backend,device", MERGE_BACKENDS)
def test_bad_input_raises_clear_errors(backend, device):
    lg = torch.randn(1, 4, 3, device=device)
    ix = torch.zeros(1, 4, 3, dtype=torch.int64, device=device)
    with pytest.raises(TypeError, match=r"candidates\[1\] logits has dtype"):
        vosops.merge_topk([(lg, ix), (lg.half(), ix)], 2, backend=backend)
    with pytest.raises(TypeError, match=r"candidates\[0\] index must be int64"):
        vosops.merge_topk([(lg, ix.int())], 2, backend=backend)
    with pytest.raises(ValueError, match="topk must be in"):
        vosops.merge_topk([(lg, ix)], 4, backend=backend)
    vals = torch.randn(1, 6, 2, device=device)
    bad = ix.clone()
    bad[0, 1, 2] = 6
    with pytest.raises(ValueError, match=r"index must be in \[-1, L\)"):
        vosops.topk_aggregate(lg, bad, vals, backend=backend)
    with pytest.raises(TypeError, match="values has dtype"):
        vosops.topk_aggregate(lg, ix, vals.half(), backend=backend)
    if backend == "triton":
        with pytest.raises(TypeError, match="triton backend takes float32"):
            vosops.merge_topk([(lg.double(), ix)], 2, backend=backend)
        with pytest.raises(TypeError, match="triton backend takes float32"):
            vosops.topk_aggregate(lg.double(), ix, vals.double(), backend=backend)


def test_native_op_checks_name_the_argument():
    if "merge_topk" not in vosops._backends._KERNELS["CPU"]:
        pytest.skip("native merge_topk not built")
    lg, ix = torch.randn(1, 4, 3), torch.zeros(1, 4, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="merge_topk: topk must be in"):
        torch.ops.vosops.merge_topk(lg, ix, 0)
    with pytest.raises(TypeError, match="merge_topk: index must be int64"):
        torch.ops.vosops.merge_topk(lg, ix.int(), 2)
    with pytest.raises(ValueError, match="merge_topk: index must have the shape"):
        torch.ops.vosops.merge_topk(lg, ix[..., :2], 2)
    with pytest.raises(TypeError, match="merge_topk: logits must be float"):
        torch.ops.vosops.merge_topk(ix, ix, 2)


def test_crw_readout_passes_its_backend_through(monkeypatch):
    from vosops.propagation import CRWReadout

    seen = []
    for name in ("global_topk", "merge_topk", "topk_aggregate"):
        real = getattr(vosops, name)
        monkeypatch.setattr(vosops, name, lambda *a, _real=real, _name=name, **kw: (
            seen.append((_name, kw.get("backend"))), _real(*a, **kw))[1])
    q, k, v = torch.randn(1, 4, 5, 6), torch.randn(1, 3, 4, 5, 6), torch.rand(1, 3, 2, 5, 6)
    out_ref = CRWReadout(radius=2, topk=4, scale=3.0, backend="reference")(q, k, v)
    assert {b for _, b in seen} == {"reference"} and len(seen) == 3
    out_auto = CRWReadout(radius=2, topk=4, scale=3.0)(q, k, v)
    torch.testing.assert_close(out_auto, out_ref, atol=1e-5, rtol=1e-5)
