"""local_affinity / local_aggregate on every backend (issue 3): forward and backward against the float64 reference
(poisoned outputs, non-contiguous inputs, odd sizes, square/circle windows, dilation, offsets in and out of frame,
mask/zero borders, N = 1 and 3), gradcheck in float64, opcheck, torch.compile, bad input, and the CUDA kernels'
logic run on the CPU through tests/cuda_emulation."""

import ctypes

import pytest
import torch

import vosops
from vosops import testing
from vosops.reference.local_attention import round_offsets

from conftest import backend_device_params
from _cuda_emulation import build_emulation, ptr

BACKENDS = backend_device_params("local_affinity")


def rand_offsets(B, N, H, W, *, seed=0):
    """Flows of a few pixels, some far out of frame, ties at .5, and one NaN (all of that reference out of frame)."""
    g = torch.Generator().manual_seed(seed)
    off = torch.randn(B, N, 2, H, W, generator=g) * 2.5
    far = torch.rand(B, N, 1, H, W, generator=g) < 0.15
    off = torch.where(far, off * 20, off)
    off[..., 0, 0] = 0.5  # rounds to +1
    off[..., 0, 1] = -1.5  # rounds to -2
    off[0, -1, 1, -1, -1] = float("nan")
    return off


# (B, C, H, W, N, kwargs, offsets); odd sizes, windows up to larger than the frame
CASES = [
    (1, 5, 7, 9, 1, dict(radius=2), False),
    (2, 3, 6, 5, 3, dict(radius=1, dilation=2, window="circle", border="zero", scale=0.5), True),
    (1, 4, 5, 7, 3, dict(radius=2, window="circle"), True),
    (1, 3, 4, 3, 2, dict(radius=3, dilation=2, border="zero", scale=2.0), True),
    (1, 2, 5, 6, 3, dict(radius=1, border="mask"), True),
    (1, 4, 6, 19, 2, dict(radius=2, window="circle", border="zero"), "smooth"),  # long runs of equal offsets
    (1, 17, 5, 8, 2, dict(radius=2, dilation=2), False),  # C >= 16: the CPU kernel's channels-last dot products
]
CASE_IDS = [f"case{i}" for i in range(len(CASES))]


def make(case, Cv=3, seed=0):
    B, C, H, W, N, kw, with_off = case
    g = torch.Generator().manual_seed(seed)
    P = (2 * kw["radius"] + 1) ** 2
    t = dict(q=torch.randn(B, C, H, W, generator=g), k=torch.randn(B, N, C, H, W, generator=g),
             v=torch.randn(B, N, Cv, H, W, generator=g), weights=torch.randn(B, N, P, H, W, generator=g))
    off = rand_offsets(B, N, H, W, seed=seed) if with_off else None
    if with_off == "smooth":  # piecewise-constant flows: a step in the middle of every row, one reference shifted
        off = torch.zeros(B, N, 2, H, W)
        off[:, :, 0, :, W // 2:] = 2.4
        off[:, :, 1, :, : W // 3] = -1.5
        off[:, -1] += 1.0
    return t, off, kw


def split_inf(out):
    """Logits -> (finite part with -inf as 0, -inf mask): -inf must match exactly and a NaN (poison) still fails."""
    inf = torch.isneginf(out)
    return torch.where(inf, torch.zeros_like(out), out), inf.to(torch.int8)


def affinity_fn(backend, off, kw):
    def fn(q, k):
        o = None if off is None else off.to(q.device)
        return split_inf(vosops.local_affinity(q, k, offsets=o, backend=backend, **kw))
    return fn


def aggregate_fn(backend, off, kw):
    agg_kw = {n: kw[n] for n in ("radius", "dilation") if n in kw}

    def fn(weights, v):
        o = None if off is None else off.to(v.device)
        return vosops.local_aggregate(weights, v, offsets=o, backend=backend, **agg_kw)
    return fn


def test_reference_semantics():
    """Independent facts the kernels are tested against: the circle rule, the border fills, aggregation of
    out-of-frame candidates as zero values whatever their weight, and the candidate order."""
    B, C, H, W, N, r = 1, 2, 4, 5, 2, 2
    q, k = torch.randn(B, C, H, W, dtype=torch.float64), torch.randn(B, N, C, H, W, dtype=torch.float64)
    circ = vosops.local_affinity(q, k, radius=r, window="circle", border="zero")
    D = 2 * r + 1
    for p in range(D * D):
        dy, dx = p // D - r, p % D - r
        assert bool(torch.isneginf(circ[:, :, p]).all()) == (dy * dy + dx * dx >= r * r)
    # candidate (n, dy=-1, dx=+2) of pixel (2, 1) is k[:, n, :, 1, 3]
    aff = vosops.local_affinity(q, k, radius=r, scale=0.5)
    p = (-1 + r) * D + (2 + r)
    torch.testing.assert_close(aff[0, 1, p, 2, 1], 0.5 * (q[0, :, 2, 1] * k[0, 1, :, 1, 3]).sum())
    assert torch.isneginf(aff[0, 0, 0, 0, 0]) and vosops.local_affinity(q, k, radius=r, border="zero")[0, 0, 0, 0, 0] == 0
    v = torch.randn(B, N, 3, H, W, dtype=torch.float64)
    w = torch.zeros(B, N, D * D, H, W, dtype=torch.float64)
    w[0, 1, p, 2, 1] = 2.0
    w[0, 0, 0, 2, 1] = 5.0  # (dy, dx) = (-2, -2) of (2, 1): out of frame, zero value
    torch.testing.assert_close(vosops.local_aggregate(w, v, radius=r)[0, :, 2, 1], 2.0 * v[0, 1, :, 1, 3])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
def test_affinity_matches_reference(backend, device, case):
    t, off, kw = make(CASES[case], seed=case)
    for dtype in testing.backend_dtypes(backend, device):
        inputs = {"q": t["q"].to(device), "k": t["k"].to(device)}
        testing.check_against_reference(affinity_fn(backend, off, kw), affinity_fn("reference", off, kw), inputs,
                                        dtype=dtype, grad_inputs=("q", "k"), seed=case)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
def test_aggregate_matches_reference(backend, device, case):
    t, off, kw = make(CASES[case], seed=case)
    for dtype in testing.backend_dtypes(backend, device):
        inputs = {"weights": t["weights"].to(device), "v": t["v"].to(device)}
        testing.check_against_reference(aggregate_fn(backend, off, kw), aggregate_fn("reference", off, kw), inputs,
                                        dtype=dtype, grad_inputs=("weights", "v"), seed=case)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", ["noncontiguous", "channels_last"])
def test_layouts(backend, device, layout):
    t, off, kw = make(CASES[1], seed=5)
    testing.check_against_reference(affinity_fn(backend, off, kw), affinity_fn("reference", off, kw),
                                    {"q": t["q"].to(device), "k": t["k"].to(device)}, dtype=torch.float32,
                                    layout=layout, grad_inputs=("q", "k"))
    testing.check_against_reference(aggregate_fn(backend, off, kw), aggregate_fn("reference", off, kw),
                                    {"weights": t["weights"].to(device), "v": t["v"].to(device)},
                                    dtype=torch.float32, layout=layout, grad_inputs=("weights", "v"))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_masked_gradients_are_zero_and_softmax_pipeline(backend, device):
    """Excluded (-inf) and zero-border candidates pass no gradient even when the upstream gradient there is not 0;
    aggregate(softmax(affinity)) equals local_attention (softmax over all candidates)."""
    t, off, kw = make(CASES[2], seed=3)
    q, k, v = (t[n].to(device).requires_grad_() for n in ("q", "k", "v"))
    o = off.to(device)
    for border in ("mask", "zero"):
        logits = vosops.local_affinity(q, k, radius=2, window="circle", offsets=o, border=border, backend=backend)
        const = torch.isneginf(logits) if border == "mask" else (logits == 0)
        assert const.any() and not const.all()
        gq, gk = torch.autograd.grad(logits, (q, k), const.float() * 3.0)  # upstream gradient only on constants
        assert not gq.any() and not gk.any(), border
    logits = vosops.local_affinity(q, k, radius=2, window="circle", offsets=o, backend=backend)
    B, N, P, H, W = logits.shape
    w = logits.flatten(1, 2).softmax(1).nan_to_num().view(B, N, P, H, W)
    out = vosops.local_aggregate(w, v, radius=2, offsets=o, backend=backend)
    want = vosops.local_attention(q, k, v, radius=2, window="circle", offsets=o, backend="reference")
    testing.assert_close(out, want, torch.float32, "aggregate(softmax(affinity))")
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        testing.assert_close(a, b, torch.float32, "pipeline grads", grad=True)


GRADCHECK = [(1, 2, 3, 4, 2, dict(radius=1, border="zero", scale=0.7), True),
             (1, 2, 4, 3, 1, dict(radius=2, dilation=2, window="circle"), True)]


@pytest.mark.parametrize("backend", ["reference"] + [p.values[0] for p in BACKENDS if p.values[0] == "cpu"])
@pytest.mark.parametrize("case", range(len(GRADCHECK)))
def test_gradcheck_float64(backend, case):
    t, off, kw = make(GRADCHECK[case], Cv=2, seed=case)
    q, k, w, v = (t[n].double().requires_grad_() for n in ("q", "k", "weights", "v"))
    testing.check_gradcheck(
        lambda a, b: split_inf(vosops.local_affinity(a, b, offsets=off, backend=backend, **kw))[0], (q, k))
    testing.check_gradcheck(
        lambda a, b: vosops.local_aggregate(a, b, offsets=off, radius=kw["radius"], dilation=kw.get("dilation", 1),
                                            backend=backend), (w, v))


def _needs_native():
    if vosops._backends.why_unusable("cpu", "local_affinity", "cpu") is not None:
        pytest.skip("no native CPU kernel for local_affinity in this build")


@pytest.mark.parametrize("with_offsets", [False, True])
def test_cpu_reads_channels_last_inputs_in_place(with_offsets):
    """Wide channels are scored from channels-last views: channels-last q and k (ViT tokens viewed as images) are
    read where they lie: the call allocates less than one copy of k would take (its output is 1/7 of that)."""
    _needs_native()
    from vosops.bench.timing import peak_extra_bytes

    g = torch.Generator().manual_seed(11)
    B, N, C, H, W = 1, 2, 128, 64, 64
    k = torch.randn(B, N, H, W, C, generator=g).permute(0, 1, 4, 2, 3)
    q = torch.randn(B, H, W, C, generator=g).permute(0, 3, 1, 2)
    off = (torch.rand(B, N, 2, H, W, generator=g) * 6 - 3) if with_offsets else None
    kw = {"radius": 1, "offsets": off, "scale": 0.5}
    out_bytes = B * N * 9 * H * W * 4
    peak = peak_extra_bytes(lambda: vosops.local_affinity(q, k, backend="cpu", **kw), "cpu")
    assert peak < k.numel() * 4, (peak, out_bytes)
    expected = vosops.local_affinity(q.double(), k.double(), backend="reference", **kw)
    torch.testing.assert_close(vosops.local_affinity(q, k, backend="cpu", **kw).double(), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", [0, 1])
def test_opcheck_native(case):
    _needs_native()
    t, off, kw = make(CASES[case], seed=case)
    q, k, w, v = (t[n].requires_grad_() for n in ("q", "k", "weights", "v"))
    testing.check_opcheck(torch.ops.vosops.local_affinity.default,
                          (q, k, off, kw["radius"], kw.get("dilation", 1), kw.get("window", "square"),
                           kw.get("scale", 1.0), kw.get("border", "mask")))
    testing.check_opcheck(torch.ops.vosops.local_aggregate.default, (w, v, off, kw["radius"], kw.get("dilation", 1)))


@pytest.mark.parametrize("case", [0, 1])
def test_opcheck_triton(case):
    pytest.importorskip("triton")
    if vosops._backends.why_unusable("triton", "local_affinity", "cpu") is not None:
        pytest.skip("triton backend not usable on CPU here")
    from vosops.triton import local_affinity as tla

    t, off, kw = make(CASES[case], seed=case)
    q, k, w, v = (t[n].requires_grad_() for n in ("q", "k", "weights", "v"))
    testing.check_opcheck(tla.local_affinity_triton, (q, k, off, kw["radius"], kw.get("dilation", 1),
                                                      kw.get("window", "square"), kw.get("scale", 1.0),
                                                      kw.get("border", "mask")))
    testing.check_opcheck(tla.local_aggregate_triton, (w, v, off, kw["radius"], kw.get("dilation", 1)))


@pytest.mark.parametrize("backend,device", BACKENDS + [pytest.param("reference", "cpu", id="reference-cpu")])
def test_torch_compile_fullgraph(backend, device):
    t, off, kw = make(CASES[1], seed=2)
    q, k, w, v = (t[n].to(device).requires_grad_() for n in ("q", "k", "weights", "v"))
    o = off.to(device)
    testing.check_compile(lambda a, b: split_inf(vosops.local_affinity(a, b, offsets=o, backend=backend, **kw))[0],
                          (q, k))
    testing.check_compile(lambda a, b: vosops.local_aggregate(a, b, radius=1, dilation=2, offsets=o, backend=backend),
                          (w, v))


def test_auto_and_use_backend():
    t, off, kw = make(CASES[0])
    q, k, w, v = t["q"], t["k"], t["weights"], t["v"]
    native = vosops._backends.why_unusable("cpu", "local_affinity", "cpu") is None
    from vosops.ops.local_attention import _unfused_backend

    assert _unfused_backend("local_affinity", q.device, torch.float32, None) == ("cpu" if native else "reference")
    assert _unfused_backend("local_affinity", q.device, torch.float64, None) in ("cpu", "reference")
    with vosops.use_backend("reference"):
        assert _unfused_backend("local_aggregate", q.device, torch.float32, None) == "reference"
        torch.testing.assert_close(vosops.local_aggregate(w, v, radius=2),
                                   vosops.local_aggregate(w, v, radius=2, backend="reference"))
    torch.testing.assert_close(vosops.local_affinity(q, k, radius=2),
                               vosops.local_affinity(q, k, radius=2, backend="reference"))


Q, K = torch.randn(1, 3, 4, 5), torch.randn(1, 2, 3, 4, 5)
WTS, V = torch.rand(1, 2, 9, 4, 5), torch.randn(1, 2, 2, 4, 5)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: vosops.local_affinity(Q, K[0], radius=1), ValueError, "k must have 5 dimensions"),
        (lambda: vosops.local_affinity(Q, K.double(), radius=1), TypeError, "k has dtype"),
        (lambda: vosops.local_affinity(Q, K, radius=1, window="hex"), ValueError, "window must be one of"),
        (lambda: vosops.local_affinity(Q, K, radius=1, border="reflect"), ValueError, "border must be one of"),
        (lambda: vosops.local_affinity(Q, K, radius=0, window="circle"), ValueError, "no candidates"),
        (lambda: vosops.local_affinity(Q, K, radius=1, dilation=0), ValueError, "dilation must be >= 1"),
        (lambda: vosops.local_affinity(Q, K, radius=1.5), TypeError, "radius must be an int"),
        (lambda: vosops.local_affinity(Q, K, radius=1, offsets=torch.zeros(1, 2, 2, 4, 4)), ValueError,
         "offsets must be"),
        (lambda: vosops.local_affinity(Q, K, radius=1, backend="gpu"), ValueError, "backend must be"),
        (lambda: vosops.local_aggregate(WTS.int(), V, radius=1), TypeError, "weights must be float"),
        (lambda: vosops.local_aggregate(WTS, V.half(), radius=1), TypeError, "v has dtype"),
        (lambda: vosops.local_aggregate(WTS, V, radius=2), ValueError, "P = .2.radius.1.\\^2 = 25"),
        (lambda: vosops.local_aggregate(WTS, V[..., :3], radius=1), ValueError, "v must be"),
        (lambda: vosops.local_aggregate(WTS, V, radius=1, offsets=torch.zeros(1, 2, 2, 4, 5, dtype=torch.long)),
         TypeError, "offsets must be float"),
    ],
)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bad_input_raises_clear_errors(call, exc, match, backend):
    """On the reference backend too: the Python checks are all that guards the Triton kernels, and on the cpu
    backend the C++ checks would hide a missing one."""
    with vosops.use_backend(backend), pytest.raises(exc, match=match):
        call()


def test_unsupported_dtype_per_backend():
    if vosops._backends.why_unusable("triton", "local_affinity", "cpu") is None:
        with pytest.raises(TypeError, match="triton backend takes float32"):
            vosops.local_affinity(Q.double(), K.double(), radius=1, backend="triton")
        with pytest.raises(TypeError, match="triton backend takes float32"):
            vosops.local_aggregate(WTS.double(), V.double(), radius=1, backend="triton")
    with pytest.raises(vosops._backends.BackendUnavailableError, match="backend 'cuda' is unavailable"):
        vosops.local_affinity(Q, K, radius=1, backend="cuda")


def test_native_op_checks_its_arguments_too():
    _needs_native()
    aff, agg = torch.ops.vosops.local_affinity, torch.ops.vosops.local_aggregate
    with pytest.raises(ValueError, match="k must be"):
        aff(Q, K[:, :, :2], None, 1, 1, "square", 1.0, "mask")
    with pytest.raises(ValueError, match="window must be"):
        aff(Q, K, None, 1, 1, "hex", 1.0, "mask")
    with pytest.raises(ValueError, match="border must be"):
        aff(Q, K, None, 1, 1, "square", 1.0, "wrap")
    with pytest.raises(ValueError, match="radius must be >= 0"):
        aff(Q, K, None, -1, 1, "square", 1.0, "mask")
    with pytest.raises(ValueError, match="offsets must be"):
        aff(Q, K, torch.zeros(1, 2, 3, 4, 5), 1, 1, "square", 1.0, "mask")
    with pytest.raises(ValueError, match="weights must be"):
        agg(WTS[:, :, :8], V, None, 1, 1)
    with pytest.raises(TypeError, match="v has dtype"):
        agg(WTS, V.double(), None, 1, 1)
    with pytest.raises(ValueError, match="grad must be"):
        torch.ops.vosops.local_affinity_backward(WTS, Q, K, None, 2, 1, "square", 1.0, True, True)
    with pytest.raises(ValueError, match="grad_out must be"):
        torch.ops.vosops.local_aggregate_backward(Q, WTS, V, None, 1, 1, True, True)


def test_empty_inputs():
    """The public ops reject empty features; the native kernels still handle C = 0 (logits 0 in frame)."""
    q, k = torch.randn(1, 0, 3, 4), torch.randn(1, 2, 0, 3, 4)
    with pytest.raises(ValueError, match="q must not be empty"):
        vosops.local_affinity(q, k, radius=1)
    with pytest.raises(ValueError, match="v must have at least one channel"):
        vosops.local_aggregate(WTS, V[:, :, :0], radius=1)
    _needs_native()
    from vosops.reference.local_attention import local_affinity as ref_affinity

    torch.testing.assert_close(torch.ops.vosops.local_affinity(q, k, None, 1, 1, "square", 1.0, "mask"),
                               ref_affinity(q, k, 1, border="mask"))


# --- the CUDA kernels' logic, compiled as host code ----------------------------------------------------------------

@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build_emulation(tmp_path_factory, "local_affinity_emu.cpp")


@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
def test_emulated_cuda_kernels_match_reference(emu, case):
    """The glue's composition, with the kernels run by the emulator: affinity forward, d/dq (gather), d/dk
    (scatter); aggregate forward (gather), d/dweights (scores), d/dv (scatter)."""
    t, off, kw = make(CASES[case], seed=case)
    B, C, H, W = t["q"].shape
    N, Cv = t["k"].shape[1], t["v"].shape[2]
    r, d, scale = kw["radius"], kw.get("dilation", 1), kw.get("scale", 1.0)
    P = (2 * r + 1) ** 2
    circle = kw.get("window") == "circle"
    o32 = round_offsets(off, r, d).to(torch.int32).contiguous() if off is not None else None
    sizes = lambda circ: torch.tensor([B, N, H, W, r, d, int(circ)], dtype=torch.int64)  # noqa: E731
    s_aff, s_agg = sizes(circle), sizes(False)
    q, k, w, v = (t[n].float().contiguous() for n in ("q", "k", "weights", "v"))
    fill = 0.0 if kw.get("border") == "zero" else float("-inf")
    f = ctypes.c_float

    logits = torch.full((B, N, P, H, W), float("nan"))
    emu.emu_scores(ptr(s_aff), ptr(o32), ptr(q), ptr(k), ctypes.c_int64(C), f(scale), f(fill), ptr(logits))
    g = torch.randn(B, N, P, H, W)
    gq = torch.full((B, C, H, W), float("nan"))
    emu.emu_gather(ptr(s_aff), ptr(o32), ptr(g), ptr(k), ctypes.c_int64(C), f(scale), ptr(gq))
    gk = torch.zeros(B, N, C, H, W)
    emu.emu_scatter(ptr(s_aff), ptr(o32), ptr(g), ptr(q), ctypes.c_int64(C), f(scale), ptr(gk))

    qr, kr = (x.double().requires_grad_() for x in (q, k))
    ref = vosops.local_affinity(qr, kr, offsets=off, backend="reference", **kw)
    for got, want, what in zip(split_inf(logits), split_inf(ref), ("logits", "-inf mask")):
        testing.assert_close(got, want, torch.float32, what)
    want = torch.autograd.grad(split_inf(ref)[0], (qr, kr), g.double())
    testing.assert_close(gq, want[0], torch.float32, "affinity grad of q", grad=True)
    testing.assert_close(gk, want[1], torch.float32, "affinity grad of k", grad=True)

    out = torch.full((B, Cv, H, W), float("nan"))
    emu.emu_gather(ptr(s_agg), ptr(o32), ptr(w), ptr(v), ctypes.c_int64(Cv), f(1.0), ptr(out))
    go = torch.randn(B, Cv, H, W)
    gw = torch.full((B, N, P, H, W), float("nan"))
    emu.emu_scores(ptr(s_agg), ptr(o32), ptr(go), ptr(v), ctypes.c_int64(Cv), f(1.0), f(0.0), ptr(gw))
    gv = torch.zeros(B, N, Cv, H, W)
    emu.emu_scatter(ptr(s_agg), ptr(o32), ptr(w), ptr(go), ctypes.c_int64(Cv), f(1.0), ptr(gv))
    wr, vr = (x.double().requires_grad_() for x in (w, v))
    ref = vosops.local_aggregate(wr, vr, radius=r, dilation=d, offsets=off, backend="reference")
    testing.assert_close(out, ref, torch.float32, "aggregate")
    want = torch.autograd.grad(ref, (wr, vr), go.double())
    testing.assert_close(gw, want[0], torch.float32, "aggregate grad of weights", grad=True)
    testing.assert_close(gv, want[1], torch.float32, "aggregate grad of v", grad=True)


# --- the benchmark module -----------------------------------------------------------------------------------------

def test_bench_glue_matches_reference_and_cases_run(monkeypatch):
    """The users'-glue baselines compute the ops (zero border, no offsets), and every implementation of a toy-sized
    configuration runs, forward and forward+backward."""
    from vosops.bench import local_affinity as bench
    from vosops.bench.registry import OPS

    assert "local_affinity" in OPS
    B, C, H, W, N, r = 2, 3, 6, 7, 2, 2
    q, k = torch.randn(B, C, H, W, dtype=torch.float64), torch.randn(B, N, C, H, W, dtype=torch.float64)
    w, v = torch.rand(B, N, (2 * r + 1) ** 2, H, W, dtype=torch.float64), torch.randn(B, N, 4, H, W, dtype=torch.float64)
    torch.testing.assert_close(bench.glue_local_affinity(q, k, radius=r, scale=0.5),
                               vosops.local_affinity(q, k, radius=r, scale=0.5, border="zero", backend="reference"))
    torch.testing.assert_close(bench.glue_local_aggregate(w, v, radius=r),
                               vosops.local_aggregate(w, v, radius=r, backend="reference"))
    monkeypatch.setattr(bench, "CONFIGS", {"toy-train": ((1, 4, 2, 5, 6, 2, 1, 0.5, True), ("cpu",)),
                                           "toy": ((1, 4, 2, 5, 6, 2, 2, 0.5, True), ("cpu",))})
    monkeypatch.setattr(bench, "TRAIN", {"toy-train"})
    cases = bench.cases("cpu")
    assert {c.op for c in cases} == {"local_affinity", "local_aggregate"} and any(c.baseline for c in cases)
    assert any(c.direction == "fwd+bwd" for c in cases)
    for case in cases:
        out = case.setup()()
        assert all(torch.isfinite(o).all() for o in (out if isinstance(out, tuple) else (out,)))
