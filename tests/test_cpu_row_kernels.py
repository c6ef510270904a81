"""The CPU kernels' row paths (csrc/local_attention/row_kernels.h): calls without offsets work on eight pixels of a
row at a time in float accumulation. local_attention scores eight queries at once (local_attention_rows.h) and,
for a softmax over every candidate, differentiates through local_affinity's row gathers; local_affinity scores
eight queries at once and gathers its dq and dk over eight pixels, and local_aggregate gathers its output and dv
and scores its d/dweights the same way (local_affinity_rows.h). The backend tests in
test_local_attention.py and test_local_affinity.py mostly use frames under eight columns, which take the other
paths; these use rows of one to four blocks (partial last blocks included), windows wider than the frame,
dilation, circles and both borders, against the float64 reference. Each runs on the row path
(VOSOPS_CPU_ROW_KERNELS unset) and, for the comparison of the paths, with it turned off."""

import pytest
import torch

import vosops
from vosops import _backends, testing

pytestmark = pytest.mark.skipif(_backends.why_unusable("cpu", "local_attention", "cpu") is not None,
                                reason="no native CPU kernel in this build")

ROW_CASES = [
    # (B, C, Cv, H, W, N, kwargs)
    (2, 24, 3, 5, 16, 1, dict(radius=3, scale=0.3, border="zero")),  # MAMP training's form: softmax over all
    (1, 40, 7, 4, 13, 2, dict(radius=2, topk=7, window="circle", scale=0.2)),  # CRW's form, a partial 2nd block
    (1, 17, 2, 6, 21, 3, dict(radius=4, topk=5, normalize="threshold", scale=0.4)),  # DINO's form, 3 blocks
    (1, 9, 2, 3, 9, 2, dict(radius=6, border="mask", scale=0.5)),  # window wider and taller than the frame
    (1, 5, 3, 5, 8, 1, dict(radius=2, dilation=3, topk=6, border="zero")),  # dilation: strided column groups
    (2, 3, 1, 4, 11, 2, dict(radius=1, dilation=2, window="circle", border="mask", scale=2.0)),
    (1, 70, 4, 3, 10, 1, dict(radius=7, topk=30, border="zero", scale=0.1)),  # 15-column rows: two groups
]


def make_inputs(B, C, Cv, H, W, N, seed):
    g = torch.Generator().manual_seed(seed)
    return {"q": torch.randn(B, C, H, W, generator=g), "k": torch.randn(B, N, C, H, W, generator=g),
            "v": torch.randn(B, N, Cv, H, W, generator=g)}


@pytest.fixture
def row_path(monkeypatch):
    monkeypatch.delenv("VOSOPS_CPU_ROW_KERNELS", raising=False)


# --- local_attention ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", range(len(ROW_CASES)))
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
def test_row_path_matches_reference(row_path, case, layout):
    B, C, Cv, H, W, N, kw = ROW_CASES[case]
    inputs = make_inputs(B, C, Cv, H, W, N, seed=case)
    ret = kw.get("topk") is not None
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        low = dtype != torch.float32
        testing.check_against_reference(
            lambda **t: vosops.local_attention(**t, **kw, return_topk=ret and not low, backend="cpu"),
            lambda **t: vosops.local_attention(**t, **kw, return_topk=ret and not low, backend="reference"),
            inputs, dtype=dtype, grad_inputs=("q", "k", "v"), layout=layout,
            atol=5e-2 if low and kw.get("topk") else None, grad_atol=2e-1 if low and kw.get("topk") else None)


def _outputs(monkeypatch, rows, inputs, kw):
    """(out, dq, dk, dv) of the cpu backend with the row path on or off."""
    monkeypatch.setenv("VOSOPS_CPU_ROW_KERNELS", "1" if rows else "0")
    t = {n: x.clone().requires_grad_(n != "offsets") for n, x in inputs.items()}
    out = vosops.local_attention(**t, **kw, backend="cpu")
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                [t["q"], t["k"], t["v"]])
    return [out, *grads]


def test_row_path_is_taken_without_offsets(monkeypatch):
    """The two paths sum each score's channels in different orders (one fused multiply-add chain per lane against
    vectorised dot products), so on random inputs their float32 results differ in the last bits: equal results
    would mean the row path never ran. Both stay within float32 rounding of each other."""
    inputs = make_inputs(1, 40, 3, 5, 16, 2, seed=11)
    kw = dict(radius=3, scale=0.3)
    rows, per_query = _outputs(monkeypatch, True, inputs, kw), _outputs(monkeypatch, False, inputs, kw)
    assert not torch.equal(rows[0], per_query[0])
    for a, b in zip(rows, per_query):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("why", ["narrow", "offsets", "float64", "many_candidates", "channels_last_k", "wide"])
def test_per_query_path_where_rows_do_not_apply(monkeypatch, why):
    """Frames under eight columns, offsets, float64, candidate sets whose eight-query scratch would not stay in
    cache (over 21845 candidates), a float channels-last k (read in place there; the row path would copy it) and
    over 256 channels (where the per-query dot products are as fast) keep the per-query path: the switch then
    changes nothing, bit for bit."""
    B, C, Cv, H, W, N, kw = 1, 12, 2, 4, 16, 1, dict(radius=2, scale=0.3)
    if why == "wide":
        C = 257
    if why == "narrow":
        W = 7
    if why == "many_candidates":
        H, W, N, kw = 3, 8, 6, dict(radius=30, topk=5)  # 6 * 61^2 = 22326 candidates
    inputs = make_inputs(B, C, Cv, H, W, N, seed=3)
    if why == "offsets":
        inputs["offsets"] = torch.randn(B, N, 2, H, W) * 2
    if why == "float64":
        inputs = {n: x.double() for n, x in inputs.items()}
    if why == "channels_last_k":
        inputs["k"] = inputs["k"].permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    for a, b in zip(_outputs(monkeypatch, True, inputs, kw), _outputs(monkeypatch, False, inputs, kw)):
        assert torch.equal(a, b)


def test_row_softmax_backward_too_large_for_its_buffers_takes_the_per_query_backward(row_path):
    """Softmax over every candidate differentiates through the affinity-layout buffers of ds and p (64 MiB for a
    chunk of batches); a batch whose buffers would not fit (here 2 x 3721 x 46 x 50 floats = 68 MB) keeps the
    row scores but takes the per-query backward. Both against the reference."""
    inputs = make_inputs(1, 2, 2, 46, 50, 1, seed=9)
    testing.check_against_reference(
        lambda **t: vosops.local_attention(**t, radius=30, scale=0.5, backend="cpu"),
        lambda **t: vosops.local_attention(**t, radius=30, scale=0.5, backend="reference"),
        inputs, dtype=torch.float32, grad_inputs=("q", "k", "v"))


@pytest.mark.parametrize("kw", [dict(topk=4), dict(topk=4, normalize="threshold"), dict()],
                         ids=["topk", "threshold", "softmax"])
def test_row_path_nan_key_makes_its_queries_nan(row_path, kw):
    """A NaN key makes exactly the queries whose windows hold it NaN, as in the reference, also when the scores
    are computed eight at a time (and the softmax's exponentials vectorised)."""
    inputs = make_inputs(1, 10, 2, 6, 12, 2, seed=5)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    k[0, 1, :, 2, 9] = float("nan")
    ret = bool(kw.get("topk"))
    got = vosops.local_attention(q, k, v, radius=1, return_topk=ret, backend="cpu", **kw)
    exp = vosops.local_attention(q.double(), k.double(), v.double(), radius=1, return_topk=ret,
                                 backend="reference", **kw)
    if ret:
        (got, (gl, gi)), (exp, (el, ei)) = got, exp
        assert torch.equal(gi, ei)
        torch.testing.assert_close(gl.double(), el, equal_nan=True, rtol=1e-5, atol=1e-5)
    assert exp.isnan().any(dim=1).sum() == 9
    torch.testing.assert_close(got.double(), exp, equal_nan=True, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_row_path_softmax_exponentials_over_a_wide_range(row_path, scale):
    """Softmax over every candidate takes its exponentials eight at a time (a polynomial within 2 ulp of exp):
    at scale 40 the logits spread over hundreds, so most weights underflow to 0 (arguments below -87), the largest
    is exp(0) = 1. (Much larger scales magnify float32's rounding of the scores past any float32 tolerance on
    either path.)"""
    inputs = make_inputs(1, 16, 3, 5, 12, 2, seed=7)
    testing.check_against_reference(
        lambda **t: vosops.local_attention(**t, radius=2, scale=scale, backend="cpu"),
        lambda **t: vosops.local_attention(**t, radius=2, scale=scale, backend="reference"),
        inputs, dtype=torch.float32, grad_inputs=("q", "k", "v"))


def test_row_path_integer_ties_resolve_as_the_reference(row_path):
    """Integer features make scores exact in float32 on either path, with many ties: the top-k lists (ties to the
    lower candidate index) and the threshold's tied keepers must equal the reference's exactly."""
    g = torch.Generator().manual_seed(2)
    q = torch.randint(-2, 3, (1, 6, 4, 10), generator=g).float()
    k = torch.randint(-2, 3, (1, 2, 6, 4, 10), generator=g).float()
    v = torch.randn(1, 2, 3, 4, 10, generator=g)
    for kw in (dict(topk=6), dict(topk=6, normalize="threshold")):
        out, (lg, idx) = vosops.local_attention(q, k, v, radius=2, return_topk=True, backend="cpu", **kw)
        eout, (elg, eidx) = vosops.local_attention(q.double(), k.double(), v.double(), radius=2, return_topk=True,
                                                  backend="reference", **kw)
        assert torch.equal(idx, eidx)
        assert torch.equal(lg.double(), elg)
        torch.testing.assert_close(out.double(), eout, rtol=1e-5, atol=1e-6)


def test_row_path_opcheck(row_path):
    inputs = make_inputs(1, 5, 2, 3, 9, 2, seed=1)
    for kw in (dict(topk=0, normalize="softmax"), dict(topk=4, normalize="softmax"),
               dict(topk=3, normalize="threshold")):
        args = (inputs["q"].requires_grad_(), inputs["k"].requires_grad_(), inputs["v"].requires_grad_(), None,
                2, 1, 0.5, kw["topk"], kw["normalize"], "square", "zero", kw["topk"] > 0)
        torch.library.opcheck(torch.ops.vosops.local_attention.default, args)


# --- local_affinity ----------------------------------------------------------------------------------------------

AFFINITY_CASES = [
    # (B, C, H, W, N, kwargs)
    (2, 24, 5, 16, 1, dict(radius=3, scale=0.3, border="zero")),  # MAMP training's form
    (1, 70, 4, 13, 2, dict(radius=2, window="circle", scale=0.2)),  # 70 channels: eight-channel blocks and 6 more
    (1, 5, 6, 21, 3, dict(radius=4, border="mask")),  # three blocks, the last partial
    (1, 9, 3, 9, 2, dict(radius=6, border="zero", scale=0.5)),  # window wider and taller than the frame
    (1, 3, 5, 8, 1, dict(radius=2, dilation=3, window="circle", border="zero")),  # dilation: strided columns
    (1, 1, 7, 30, 2, dict(radius=7, dilation=2, border="mask", scale=2.0)),  # one channel, 15-column rows
]


def affinity_inputs(B, C, H, W, N, seed):
    g = torch.Generator().manual_seed(seed)
    return {"q": torch.randn(B, C, H, W, generator=g), "k": torch.randn(B, N, C, H, W, generator=g)}


def split_inf(out):
    """Logits -> (finite part with -inf as 0, -inf mask): -inf must match exactly and a NaN (poison) still fails."""
    inf = torch.isneginf(out)
    return torch.where(inf, torch.zeros_like(out), out), inf.to(torch.int8)


@pytest.mark.parametrize("case", range(len(AFFINITY_CASES)))
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
def test_affinity_row_path_matches_reference(row_path, case, layout):
    B, C, H, W, N, kw = AFFINITY_CASES[case]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        testing.check_against_reference(
            lambda q, k: split_inf(vosops.local_affinity(q, k, **kw, backend="cpu")),
            lambda q, k: split_inf(vosops.local_affinity(q, k, **kw, backend="reference")),
            affinity_inputs(B, C, H, W, N, seed=case), dtype=dtype, grad_inputs=("q", "k"), layout=layout,
            seed=case)


def _affinity_outputs(monkeypatch, rows, q, k, kw, offsets=None):
    """(logits, dq, dk) of the cpu backend with the row kernels on or off."""
    monkeypatch.setenv("VOSOPS_CPU_ROW_KERNELS", "1" if rows else "0")
    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    out = vosops.local_affinity(q, k, offsets=offsets, **kw, backend="cpu")
    weight = torch.linspace(-1, 1, out.numel()).view_as(out)
    dq, dk = torch.autograd.grad(torch.where(out.isinf(), 0, out * weight).sum(), [q, k])
    return [out, dq, dk]


def test_affinity_row_path_is_taken_without_offsets(monkeypatch):
    """Different summation orders on the two paths for the logits (a fused multiply-add chain per lane against the
    channels-last dot products) and for dk (a gather over queries against a scatter): equal float32 results would
    mean the row kernels never ran. (dq sums the same products in the same order on both paths.)"""
    t = affinity_inputs(1, 40, 5, 16, 2, seed=4)
    kw = dict(radius=3, scale=0.3)
    rows, other = (_affinity_outputs(monkeypatch, on, t["q"], t["k"], kw) for on in (True, False))
    assert not torch.equal(rows[0], other[0]) and not torch.equal(rows[2], other[2])
    for a, b in zip(rows, other):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("why", ["narrow", "offsets", "float64", "channels_last"])
def test_affinity_other_paths_where_rows_do_not_apply(monkeypatch, why):
    """Frames under eight columns, offsets, float64, and wide channels-last float inputs (read in place by the
    channels-last dot products, where the row kernels would copy k) keep the other paths: the switch then changes
    nothing in the forward, bit for bit."""
    B, C, H, W, N, kw = 1, 24, 4, 16, 2, dict(radius=2, scale=0.3)
    if why == "narrow":
        W = 7
    t = affinity_inputs(B, C, H, W, N, seed=5)
    q, k, off = t["q"], t["k"], None
    if why == "offsets":
        off = torch.randn(B, N, 2, H, W) * 2
    if why == "float64":
        q, k = q.double(), k.double()
    if why == "channels_last":
        q = q.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        k = k.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    on, off_ = (_affinity_outputs(monkeypatch, rows, q, k, kw, off) for rows in (True, False))
    assert torch.equal(on[0], off_[0])
    if why != "channels_last":  # the backward of channels-last inputs takes the row gathers: checked above
        for a, b in zip(on[1:], off_[1:]):
            assert torch.equal(a, b)


def test_affinity_row_gathers_ignore_gradients_of_constant_logits(row_path):
    """Out-of-frame candidates (border "zero": logit 0) and columns outside a circle (-inf) are constants: a
    gradient given for them, even inf or NaN, must not reach dq or dk (the row gathers mask those lanes)."""
    t = affinity_inputs(1, 10, 6, 12, 2, seed=6)
    q, k = t["q"].requires_grad_(), t["k"].requires_grad_()
    kw = dict(radius=3, window="circle", border="zero", scale=0.5)
    out = vosops.local_affinity(q, k, **kw, backend="cpu")
    ref = vosops.local_affinity(q.double(), k.double(), **kw, backend="reference")
    zero_border = (ref == 0) & (vosops.local_affinity(q.double(), k.double(), radius=3, window="circle",
                                                      backend="reference") == float("-inf"))
    assert zero_border.any() and ref.isneginf().any()
    g = torch.randn_like(out)
    g_poisoned = torch.where(zero_border | ref.isneginf(), torch.tensor(float("nan")), g)
    got = torch.autograd.grad(out, [q, k], g_poisoned, retain_graph=True)
    expected = torch.autograd.grad(out, [q, k], torch.where(zero_border | ref.isneginf(), 0, g))
    for a, b in zip(got, expected):
        assert a.isfinite().all()
        torch.testing.assert_close(a, b)


def test_affinity_row_path_opcheck(row_path):
    t = affinity_inputs(1, 5, 3, 9, 2, seed=1)
    for window, border in (("square", "zero"), ("circle", "mask")):
        args = (t["q"].requires_grad_(), t["k"].requires_grad_(), None, 2, 1, window, 0.5, border)
        torch.library.opcheck(torch.ops.vosops.local_affinity.default, args)


# --- local_aggregate ---------------------------------------------------------------------------------------------

def aggregate_inputs(B, Cv, H, W, N, radius, seed):
    g = torch.Generator().manual_seed(seed)
    P = (2 * radius + 1) ** 2
    return {"weights": torch.randn(B, N, P, H, W, generator=g), "v": torch.randn(B, N, Cv, H, W, generator=g)}


@pytest.mark.parametrize("case", range(len(AFFINITY_CASES)))
@pytest.mark.parametrize("Cv", [1, 3, 10])
def test_aggregate_row_path_matches_reference(row_path, case, Cv):
    B, _, H, W, N, kw = AFFINITY_CASES[case]
    agg_kw = {n: kw[n] for n in ("radius", "dilation") if n in kw}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        testing.check_against_reference(
            lambda weights, v: vosops.local_aggregate(weights, v, **agg_kw, backend="cpu"),
            lambda weights, v: vosops.local_aggregate(weights, v, **agg_kw, backend="reference"),
            aggregate_inputs(B, Cv, H, W, N, agg_kw["radius"], seed=case), dtype=dtype,
            grad_inputs=("weights", "v"), layout="noncontiguous" if case % 2 else "contiguous", seed=case)


def test_aggregate_row_path_is_taken_without_offsets(monkeypatch):
    """dv is gathered over the queries on the row path and scattered on the other: different summation orders, so
    equal float32 results would mean the row kernels never ran (the output and d/dweights sum the same products in
    the same order on both)."""
    t = aggregate_inputs(1, 5, 5, 16, 2, 3, seed=8)
    results = []
    for on in (True, False):
        monkeypatch.setenv("VOSOPS_CPU_ROW_KERNELS", "1" if on else "0")
        w, v = t["weights"].clone().requires_grad_(), t["v"].clone().requires_grad_()
        out = vosops.local_aggregate(w, v, radius=3, backend="cpu")
        results.append([out, *torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                                   [w, v])])
    assert not torch.equal(results[0][2], results[1][2])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_aggregate_row_path_ignores_weights_of_out_of_frame_candidates(row_path):
    """Out-of-frame candidates carry zero values whatever their weight, even inf or NaN, on the row path too."""
    t = aggregate_inputs(1, 3, 4, 12, 2, 2, seed=9)
    w, v = t["weights"], t["v"]
    out_of_frame = vosops.local_affinity(torch.ones(1, 1, 4, 12), torch.ones(1, 2, 1, 4, 12), radius=2,
                                         backend="reference").isneginf()
    assert out_of_frame.any()
    poisoned = torch.where(out_of_frame, torch.tensor(float("nan")), w)
    expected = vosops.local_aggregate(torch.where(out_of_frame, 0, w).double(), v.double(), radius=2,
                                      backend="reference")
    got = vosops.local_aggregate(poisoned, v, radius=2, backend="cpu")
    assert got.isfinite().all()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
