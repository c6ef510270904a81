"""local_affinity / local_aggregate / local_attention.

1. The reference against small independent implementations written from each paper's algorithm (F.unfold,
   global affinity restricted to a window, explicit per-pixel loops).
2. Every backend against the reference with the shared harness: borders, dilation, circles, offsets out of frame,
   ties, k = candidate count, N = 1, odd sizes, layouts, dtypes, gradients.
3. gradcheck, opcheck, torch.compile, bad input.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import vosops
from vosops import _backends, reference, testing
from vosops.reference.local_attention import round_offsets

from conftest import backend_device_params

BACKENDS = backend_device_params("local_attention")


def assert_same_output_and_grads(out, expected, inputs):
    """out equals expected, and so do their gradients w.r.t. `inputs` for one random output gradient."""
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(expected, inputs, g)):
        torch.testing.assert_close(a, b)


def rand_offsets(B, N, H, W, *, spread=3.0, far=0.1, dtype=torch.float32, device="cpu"):
    """Float flows of a few pixels, some far out of frame, some exactly at .5 (rounding ties)."""
    off = torch.randn(B, N, 2, H, W, dtype=dtype) * spread
    far_mask = torch.rand(B, N, 1, H, W) < far
    off = torch.where(far_mask, off * 20, off)
    off[..., 0, 0] = 0.5  # rounds to +1
    if W > 1:
        off[..., 0, 1] = -1.5  # rounds to -2
    return off.to(device)


# --- 1. the reference against independent implementations -------------------------------------------------------

def unfold_window(x, r, d=1):
    """(B, C, H, W) -> (B, C, P, H, W): zero-padded (2r+1)^2 window of every pixel, candidate p in unfold order."""
    B, C, H, W = x.shape
    cols = F.unfold(x, kernel_size=2 * r + 1, dilation=d, padding=r * d)
    return cols.view(B, C, (2 * r + 1) ** 2, H, W)


def test_round_half_away_from_zero():
    o = torch.tensor([[0.5, -0.5, 1.5, -1.5, 2.4999, -2.5001, 0.0, -0.0, 0.49999999999999994, 1e300,
                       float("nan"), float("inf"), -float("inf")]], dtype=torch.float64)
    r = round_offsets(o, radius=2, dilation=3)  # H=1, W=13: anything beyond 1+13+6+1 = 21 is clamped there
    assert r[0].tolist() == [1, -1, 2, -2, 2, -3, 0, 0, 0, 21, 21, 21, -21]


def test_mamp_training_matches_unfold_softmax():
    """MAMP training: r=6, N=1, softmax over all 169 candidates, zero borders; forward and backward."""
    B, C, H, W, r = 2, 8, 9, 11, 6
    q = torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, 1, C, H, W, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, 1, 3, H, W, dtype=torch.float64, requires_grad=True)
    scale = 1 / math.sqrt(C)
    aff = (q.unsqueeze(2) * unfold_window(k[:, 0], r)).sum(1) * scale  # (B, P, H, W), padding scores 0
    expected = (unfold_window(v[:, 0], r) * aff.softmax(1).unsqueeze(1)).sum(2)
    out = vosops.local_attention(q, k, v, radius=r, scale=scale, border="zero", backend="reference")
    assert_same_output_and_grads(out, expected, (q, k, v))


def mamp_loop(q, k, v, offsets, r, topk, scale):
    """MAMP inference from the paper, per pixel: the ROI of each reference at the rounded flow, zero-padded,
    top-k of all N * P correlations jointly, softmax, weighted sum of the values."""
    B, C, H, W = q.shape
    N, Cv = k.shape[1], v.shape[2]
    pad = r + int(offsets.abs().max().ceil()) + 1
    kp = F.pad(k, (pad, pad, pad, pad))
    vp = F.pad(v, (pad, pad, pad, pad))
    rounded = torch.sign(offsets) * torch.floor(offsets.abs() + 0.5)
    out = torch.zeros(B, Cv, H, W, dtype=q.dtype)
    D = 2 * r + 1
    for b in range(B):
        for i in range(H):
            for j in range(W):
                keys, vals = [], []
                for n in range(N):
                    ox, oy = int(rounded[b, n, 0, i, j]), int(rounded[b, n, 1, i, j])
                    y0, x0 = i + oy - r + pad, j + ox - r + pad
                    keys.append(kp[b, n, :, y0:y0 + D, x0:x0 + D].reshape(C, -1))
                    vals.append(vp[b, n, :, y0:y0 + D, x0:x0 + D].reshape(Cv, -1))
                corr = (q[b, :, i, j, None] * torch.cat(keys, 1)).sum(0) * scale
                top, idx = torch.sort(corr, descending=True, stable=True)
                w = top[:topk].softmax(0)
                out[b, :, i, j] = (torch.cat(vals, 1)[:, idx[:topk]] * w).sum(1)
    return out


def test_mamp_inference_matches_per_pixel_loop():
    """MAMP inference: r=12, N refs, zero borders, top-36 jointly, scale 1/8, one-hot masks, integer flows."""
    B, C, H, W, N, r = 1, 16, 7, 9, 3, 12
    q = torch.randn(B, C, H, W, dtype=torch.float64)
    k = torch.randn(B, N, C, H, W, dtype=torch.float64)
    labels = torch.randint(0, 7, (B, N, H, W))
    v = F.one_hot(labels, 7).permute(0, 1, 4, 2, 3).double()
    offsets = torch.randint(-4, 5, (B, N, 2, H, W)).double()
    out = vosops.local_attention(q, k, v, radius=r, scale=1 / 8, topk=36, offsets=offsets, border="zero",
                                 backend="reference")
    torch.testing.assert_close(out, mamp_loop(q, k, v, offsets, r, 36, 1 / 8))


def test_offsets_round_half_away_like_the_loop():
    B, C, H, W, N, r = 1, 4, 5, 6, 2, 2
    q, k, v = torch.randn(B, C, H, W).double(), torch.randn(B, N, C, H, W).double(), torch.randn(B, N, 2, H, W).double()
    offsets = torch.randint(-3, 4, (B, N, 2, H, W)).double() + 0.5 * torch.randint(-1, 2, (B, N, 2, H, W))
    out = vosops.local_attention(q, k, v, radius=r, topk=7, offsets=offsets, border="zero", backend="reference")
    torch.testing.assert_close(out, mamp_loop(q, k, v, offsets, r, 7, 1.0))


def global_restricted_logits(q, k, scale, allowed):
    """(B, N*HW, HW) global logits with -inf where `allowed` (HW_key x HW_query bool) is False."""
    B, C, H, W = q.shape
    N = k.shape[1]
    qf = q.reshape(B, C, H * W)
    kf = k.reshape(B, N, C, H * W)
    logits = torch.einsum("bnck,bcq->bnkq", kf, qf) * scale
    logits = logits.masked_fill(~allowed, float("-inf"))
    return logits.reshape(B, N * H * W, H * W)


def window_mask(H, W, R, circle=False):
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    dy = yy.reshape(-1, 1) - yy.reshape(1, -1)
    dx = xx.reshape(-1, 1) - xx.reshape(1, -1)
    if circle:
        return dy ** 2 + dx ** 2 < R ** 2
    return (dy.abs() <= R) & (dx.abs() <= R)


@pytest.mark.parametrize("R", [2, 12])
def test_dino_threshold_matches_global_affinity(R):
    """DINO / INO label propagation: L2-normalised features, exp(<q,k>/0.1) restricted to |dy|,|dx| <= R, keep
    every affinity >= the 5th largest over all references jointly, normalise by the sum."""
    B, C, H, W, N = 1, 6, 7, 8, 3
    q = F.normalize(torch.randn(B, C, H, W, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(B, N, C, H, W, dtype=torch.float64), dim=2)
    v = torch.rand(B, N, 4, H, W, dtype=torch.float64)
    aff = torch.exp(global_restricted_logits(q, k, 10.0, window_mask(H, W, R)))[0]  # (N*HW, HW)
    tk_val, _ = torch.topk(aff, dim=0, k=5)
    aff = torch.where(aff < tk_val.min(dim=0).values, torch.zeros_like(aff), aff)
    aff = aff / aff.sum(0, keepdim=True)
    expected = (v[0].permute(1, 0, 2, 3).reshape(4, -1) @ aff).view(1, 4, H, W)
    out = vosops.local_attention(q, k, v, radius=R, scale=10.0, topk=5, normalize="threshold", border="mask",
                                 backend="reference")
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] == "cpu"])  # the reference: 11 s
def test_ino_radius_40_eleven_references(backend, device):
    """INO's configuration: 11 references, R = 40 (6561 candidates each), threshold at the 5th largest, scale 1/0.1,
    on frames the window covers whole: the global affinity's definition, forward and gradients."""
    B, C, H, W, N, R = 1, 32, 9, 10, 11, 40
    q = F.normalize(torch.randn(B, C, H, W, dtype=torch.float64), dim=1).requires_grad_()
    k = F.normalize(torch.randn(B, N, C, H, W, dtype=torch.float64), dim=2).requires_grad_()
    v = torch.rand(B, N, 4, H, W, dtype=torch.float64, requires_grad=True)
    aff = torch.exp(global_restricted_logits(q, k, 10.0, window_mask(H, W, R)))[0]  # (N*HW, HW)
    tk_val, _ = torch.topk(aff.detach(), dim=0, k=5)
    aff = torch.where(aff < tk_val.min(dim=0).values, torch.zeros_like(aff), aff)
    aff = aff / aff.sum(0, keepdim=True)
    expected = (v[0].permute(1, 0, 2, 3).reshape(4, -1) @ aff).view(1, 4, H, W)
    out = vosops.local_attention(q, k, v, radius=R, scale=10.0, topk=5, normalize="threshold", backend=backend)
    assert_same_output_and_grads(out, expected, (q, k, v))


def test_crw_circle_top10_matches_global_affinity():
    """CRW / Mask-VOS local part: circle r=12 (strict), scale 1/0.05, top-10 jointly, softmax."""
    B, C, H, W, N, r = 1, 5, 9, 10, 2, 12
    q = F.normalize(torch.randn(B, C, H, W, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(B, N, C, H, W, dtype=torch.float64), dim=2)
    v = torch.rand(B, N, 3, H, W, dtype=torch.float64)
    logits = global_restricted_logits(q, k, 20.0, window_mask(H, W, r, circle=True))[0]
    top, idx = torch.topk(logits, 10, dim=0)
    w = top.softmax(0)
    vals = v[0].permute(1, 0, 2, 3).reshape(3, -1)[:, idx]  # (3, 10, HW)
    expected = (vals * w).sum(1).view(1, 3, H, W)
    out = vosops.local_attention(q, k, v, radius=r, scale=20.0, topk=10, window="circle", backend="reference")
    torch.testing.assert_close(out, expected)
    # strict inequality: a circle of radius 1 keeps only the centre
    out1 = vosops.local_attention(q, k, v, radius=1, window="circle", backend="reference")
    w1 = ((q.unsqueeze(1) * k).sum(2)).softmax(1)
    torch.testing.assert_close(out1, (w1.unsqueeze(2) * v).sum(1))


def test_affinity_matches_unfold_with_dilation_and_aggregate_inverts_it():
    B, C, H, W, N, r, d = 2, 3, 8, 7, 2, 2, 2
    q = torch.randn(B, C, H, W, dtype=torch.float64)
    k = torch.randn(B, N, C, H, W, dtype=torch.float64)
    v = torch.randn(B, N, 4, H, W, dtype=torch.float64)
    aff = vosops.local_affinity(q, k, radius=r, dilation=d, border="zero", scale=0.5)
    for n in range(N):
        expected = (q.unsqueeze(2) * unfold_window(k[:, n], r, d)).sum(1) * 0.5
        torch.testing.assert_close(aff[:, n], expected)
    # mask border: exactly the padded positions are -inf
    aff_m = vosops.local_affinity(q, k, radius=r, dilation=d, border="mask", scale=0.5)
    inside = unfold_window(torch.ones(1, 1, H, W, dtype=torch.float64), r, d)[:, 0] > 0
    assert torch.equal(torch.isinf(aff_m[0, 0]), ~inside[0])
    weights = torch.rand(B, N, (2 * r + 1) ** 2, H, W, dtype=torch.float64)
    out = vosops.local_aggregate(weights, v, radius=r, dilation=d)
    expected = sum((unfold_window(v[:, n], r, d) * weights[:, n].unsqueeze(1)).sum(2) for n in range(N))
    torch.testing.assert_close(out, expected)


def test_attention_equals_aggregate_of_softmax_affinity():
    B, C, H, W, N, r = 1, 3, 6, 5, 2, 2
    q, k, v = torch.randn(B, C, H, W).double(), torch.randn(B, N, C, H, W).double(), torch.randn(B, N, 2, H, W).double()
    offsets = rand_offsets(B, N, H, W, dtype=torch.float64)
    for border in ("zero", "mask"):
        aff = vosops.local_affinity(q, k, radius=r, offsets=offsets, border=border)
        flat = aff.flatten(1, 2)
        m = flat.amax(1, keepdim=True).clamp_min(-1e300)
        e = torch.exp(flat - torch.where(torch.isinf(m), torch.zeros_like(m), m))
        w = (e / e.sum(1, keepdim=True).clamp_min(1e-300)).view_as(aff)
        out = vosops.local_attention(q, k, v, radius=r, offsets=offsets, border=border, backend="reference")
        torch.testing.assert_close(out, vosops.local_aggregate(w, v, radius=r, offsets=offsets))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_accumulates_half_precision_in_float32(dtype):
    """Scores, selection, softmax and value sums in float32, as the kernels: the reference's half-precision result
    is the float64 one on the same rounded inputs, rounded once (its own fp16 scores picked other top-k sets)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 64, 12, 12, generator=g).to(dtype)
    k = torch.randn(1, 3, 64, 12, 12, generator=g).to(dtype)
    v = torch.randn(1, 3, 7, 12, 12, generator=g).to(dtype)
    kw = dict(radius=12, topk=36, scale=1 / 8, border="zero")
    got = vosops.local_attention(q, k, v, backend="reference", **kw)
    exact = vosops.local_attention(q.double(), k.double(), v.double(), backend="reference", **kw)
    assert got.dtype == dtype
    err = (got.double() - exact).abs().max().item()
    assert err < (2e-3 if dtype == torch.float16 else 1.6e-2), err  # one rounding of |out| < 4: 2e-3 / 1.6e-2
    aff = vosops.local_affinity(q, k, radius=2, scale=1 / 8, backend="reference")
    torch.testing.assert_close(aff, vosops.local_affinity(q.double(), k.double(), radius=2, scale=1 / 8,
                                                          backend="reference").to(dtype))


@pytest.mark.parametrize("kw", [dict(topk=5, border="zero"), dict(topk=3, normalize="threshold"), dict()])
def test_reference_chunking_does_not_change_results(monkeypatch, kw):
    """Tiny chunks (one row, a few window positions per block) give the same outputs and gradients."""
    import importlib

    ref_mod = importlib.import_module("vosops.reference.local_attention")  # the module, not the function

    B, C, H, W, N, r = 1, 3, 5, 6, 2, 2
    q = torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, N, C, H, W, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, N, 2, H, W, dtype=torch.float64, requires_grad=True)
    offsets = rand_offsets(B, N, H, W, dtype=torch.float64)
    args = dict(radius=r, offsets=offsets, **kw)
    whole = vosops.local_attention(q, k, v, backend="reference", return_topk=bool(kw), **args)
    aff = vosops.local_affinity(q, k, radius=r, offsets=offsets)
    agg = vosops.local_aggregate(aff.softmax(2).nan_to_num(), v, radius=r, offsets=offsets)
    monkeypatch.setattr(ref_mod, "_CHUNK_ELEMS", 40)
    small = vosops.local_attention(q, k, v, backend="reference", return_topk=bool(kw), **args)
    for a, b in zip(testing._flatten(small), testing._flatten(whole)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(vosops.local_affinity(q, k, radius=r, offsets=offsets), aff)
    torch.testing.assert_close(vosops.local_aggregate(aff.softmax(2).nan_to_num(), v, radius=r, offsets=offsets), agg)
    out_s = testing._flatten(small)[0]
    out_w = testing._flatten(whole)[0]
    g = torch.randn_like(out_w)
    for a, b in zip(torch.autograd.grad(out_s, (q, k, v), g), torch.autograd.grad(out_w, (q, k, v), g)):
        torch.testing.assert_close(a, b)


def test_zero_border_candidates_win_topk_when_scores_are_negative():
    B, C, H, W, r = 1, 2, 3, 3, 1
    q = torch.ones(B, C, H, W, dtype=torch.float64)
    k = -torch.ones(B, 1, C, H, W, dtype=torch.float64)  # every in-frame logit is -2
    v = torch.ones(B, 1, 1, H, W, dtype=torch.float64)
    out, (lg, idx) = vosops.local_attention(q, k, v, radius=r, topk=3, border="zero", return_topk=True,
                                            backend="reference")
    # corner (0, 0): five out-of-frame candidates score 0; the top 3 are the first three of them, value 0
    assert idx[0, 0, 0].tolist() == [0, 1, 2] and lg[0, 0, 0].tolist() == [0, 0, 0]
    assert out[0, 0, 0, 0] == 0
    # centre: all in frame, all -2: ties go to the lower index
    assert idx[0, 1, 1].tolist() == [0, 1, 2]
    torch.testing.assert_close(out[0, 0, 1, 1], torch.tensor(1.0, dtype=torch.float64))


def test_no_valid_candidate_gives_zero_output_and_zero_gradient():
    B, C, H, W, N, r = 1, 3, 4, 5, 2, 1
    q = torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, N, C, H, W, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, N, 2, H, W, dtype=torch.float64, requires_grad=True)
    offsets = torch.zeros(B, N, 2, H, W, dtype=torch.float64)
    offsets[0, :, 0, 1, 2] = 100.0  # pixel (1, 2): every candidate of both references far out of frame
    offsets[0, 0, 1, 2, 2] = float("nan")  # pixel (2, 2), reference 0: non-finite offset, out of frame
    for kw in ({}, {"topk": 4}, {"topk": 4, "normalize": "threshold"}):
        out = vosops.local_attention(q, k, v, radius=r, offsets=offsets, backend="reference", **kw)
        assert torch.isfinite(out).all() and not out[0, :, 1, 2].any()
        gq, gk, gv = torch.autograd.grad(out.sum(), (q, k, v))
        assert torch.isfinite(gq).all() and torch.isfinite(gk).all() and torch.isfinite(gv).all()
        assert not gq[0, :, 1, 2].any()


def test_threshold_keeps_ties_and_topk_breaks_them_to_the_lower_index():
    # the centre pixel of a 3x3 frame sees all nine keys; q there is 1, so its logits are the key values
    B, C, H, W = 1, 1, 3, 3
    logits = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, 0.0, 3.0, -1.0, 2.0], dtype=torch.float64)
    q = torch.zeros(B, C, H, W, dtype=torch.float64)
    q[0, 0, 1, 1] = 1.0
    k = logits.view(1, 1, 1, 3, 3).clone()
    v = torch.arange(9, dtype=torch.float64).view(1, 1, 1, 3, 3)
    _, (lg, idx) = vosops.local_attention(q, k, v, radius=1, topk=3, return_topk=True, backend="reference")
    assert idx[0, 1, 1].tolist() == [1, 6, 2] and lg[0, 1, 1].tolist() == [3.0, 3.0, 2.0]
    out_t = vosops.local_attention(q, k, v, radius=1, topk=3, normalize="threshold", backend="reference")
    kept = logits >= 2.0  # the 3rd largest is 2: all four 2s are kept
    w = torch.where(kept, logits.exp(), torch.zeros_like(logits))
    torch.testing.assert_close(out_t[0, 0, 1, 1], (w * torch.arange(9.0, dtype=torch.float64)).sum() / w.sum())


# --- 2. every backend against the reference --------------------------------------------------------------------

CASES = [
    # (B, C, Cv, H, W, N, kwargs)
    (1, 5, 3, 6, 7, 2, dict(radius=2, scale=0.7)),
    (2, 3, 2, 5, 4, 1, dict(radius=1, topk=4, border="zero")),
    (1, 4, 3, 7, 5, 2, dict(radius=2, topk=6, window="circle", offsets=True)),
    (1, 3, 2, 6, 6, 3, dict(radius=2, dilation=2, topk=5, normalize="threshold", offsets=True, border="zero")),
    (1, 6, 1, 5, 7, 2, dict(radius=3, topk=9, offsets=True, border="mask", scale=2.0)),
    (1, 2, 2, 3, 4, 1, dict(radius=1, topk=9)),  # k = candidate count
    (2, 4, 3, 5, 6, 2, dict(radius=2, offsets=True, border="zero", scale=0.5)),
    (1, 3, 2, 6, 7, 2, dict(radius=2, dilation=2, window="circle", offsets=True, border="mask")),
    # softmax over every candidate, no offsets: the triton backward gathers dk/dv per key
    (2, 5, 3, 6, 5, 2, dict(radius=2, dilation=2, window="circle", border="zero", scale=0.5)),
    # wide channels: the CPU backward's dq register blocks (32 channels, then a partial block) and value dots >= 8
    (1, 70, 9, 5, 6, 2, dict(radius=1, topk=5, scale=0.15)),
    (2, 40, 8, 4, 5, 1, dict(radius=1, border="zero", scale=0.2)),
]


def make_inputs(B, C, Cv, H, W, N, kw, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "q": torch.randn(B, C, H, W, generator=g).to(device),
        "k": torch.randn(B, N, C, H, W, generator=g).to(device),
        "v": torch.randn(B, N, Cv, H, W, generator=g).to(device),
    }
    kw = dict(kw)
    if kw.pop("offsets", False):
        inputs["offsets"] = rand_offsets(B, N, H, W, device=device)
    return inputs, kw


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
def test_backend_matches_reference(backend, device, case, layout):
    B, C, Cv, H, W, N, kw = CASES[case]
    inputs, kw = make_inputs(B, C, Cv, H, W, N, kw, device, seed=case)
    ret = kw.get("topk") is not None
    for dtype in testing.backend_dtypes(backend, device):
        low = dtype in (torch.float16, torch.bfloat16)
        testing.check_against_reference(
            lambda **t: vosops.local_attention(**t, **kw, return_topk=ret and not low, backend=backend),
            lambda **t: vosops.local_attention(**t, **kw, return_topk=ret and not low, backend="reference"),
            inputs, dtype=dtype, grad_inputs=("q", "k", "v"), layout=layout,
            # low precision can reorder near-tied candidates across the top-k boundary: looser bound there
            atol=5e-2 if low and kw.get("topk") else None,
            grad_atol=2e-1 if low and kw.get("topk") else None,
        )


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kw", [dict(topk=4), dict(topk=4, normalize="threshold"), dict()],
                         ids=["topk", "threshold", "softmax"])
def test_backend_nan_feature_makes_its_queries_nan(backend, device, kw):
    """A NaN key pixel makes exactly the queries whose windows hold it NaN, as in the reference (a NaN ranks first
    in a top-k list, as torch.sort puts it): the cpu kernel used to leave it out of order in its heap, or drop it
    from the max, and return finite wrong outputs. Every other query is unchanged; the lists match."""
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(1, 3, 6, 7, generator=g), torch.randn(1, 2, 3, 6, 7, generator=g), \
        torch.randn(1, 2, 2, 6, 7, generator=g)
    k[0, 1, :, 2, 3] = float("nan")
    k[0, 0, 0, 4, 5] = float("nan")  # a second, in the other frame: its queries overlap the first's at one pixel
    ret = bool(kw.get("topk"))
    got = vosops.local_attention(q.to(device), k.to(device), v.to(device), radius=1, return_topk=ret,
                                 backend=backend, **kw)
    exp = vosops.local_attention(q, k, v, radius=1, return_topk=ret, backend="reference", **kw)
    if ret:
        (got, (gl, gi)), (exp, (el, ei)) = got, exp
        assert torch.equal(gi.cpu(), ei)
        torch.testing.assert_close(gl.cpu(), el, equal_nan=True)
    assert exp.isnan().any(dim=1).sum() == 17  # two 3 x 3 blocks of queries sharing one
    torch.testing.assert_close(got.cpu(), exp, equal_nan=True, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_backend_channels_last_query(backend, device):
    inputs, kw = make_inputs(1, 4, 3, 5, 6, 2, dict(radius=2, topk=5, offsets=True, border="zero"), device, seed=9)
    testing.check_against_reference(
        lambda **t: vosops.local_attention(**t, **kw, backend=backend),
        lambda **t: vosops.local_attention(**t, **kw, backend="reference"),
        inputs, dtype=torch.float32, grad_inputs=("q", "k", "v"), layout="channels_last",
    )


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_backend_ties_indices_exact(backend, device):
    """Integer-valued features make many exact ties; indices and kept sets must match the stable-sort rule."""
    B, C, H, W, N = 1, 2, 5, 6, 2
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-1, 2, (B, C, H, W), generator=g).float().to(device)
    k = torch.randint(-1, 2, (B, N, C, H, W), generator=g).float().to(device)
    v = torch.randn(B, N, 3, H, W, generator=g).to(device)
    offsets = rand_offsets(B, N, H, W, device=device)
    for kw in (dict(topk=7, border="zero"), dict(topk=7, border="mask"), dict(topk=5, normalize="threshold"),
               dict(topk=2 * 25, border="zero")):
        got, (lg, idx) = vosops.local_attention(q, k, v, radius=2, offsets=offsets, return_topk=True,
                                                backend=backend, **kw)
        ref, (rlg, ridx) = vosops.local_attention(q.double(), k.double(), v.double(), radius=2,
                                                  offsets=offsets.double(), return_topk=True, backend="reference", **kw)
        assert torch.equal(idx.cpu(), ridx.cpu()), kw
        torch.testing.assert_close(lg.double().cpu(), rlg.cpu())
        torch.testing.assert_close(got.double().cpu(), ref.cpu(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_backend_no_valid_candidate_is_zero_not_nan(backend, device):
    B, C, H, W, N = 1, 3, 4, 5, 2
    q = torch.randn(B, C, H, W, device=device, requires_grad=True)
    k = torch.randn(B, N, C, H, W, device=device, requires_grad=True)
    v = torch.randn(B, N, 2, H, W, device=device, requires_grad=True)
    offsets = torch.zeros(B, N, 2, H, W, device=device)
    offsets[0, :, 1, 1, 2] = -50.0
    offsets[0, 1, 0, 3, 3] = float("inf")
    for kw in ({}, {"topk": 3}, {"topk": 3, "normalize": "threshold"}):
        out = vosops.local_attention(q, k, v, radius=1, offsets=offsets, backend=backend, **kw)
        assert torch.isfinite(out).all() and not out[0, :, 1, 2].any()
        ref = vosops.local_attention(q, k, v, radius=1, offsets=offsets, backend="reference", **kw)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads)
        assert not grads[0][0, :, 1, 2].any()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_backend_large_logits_do_not_overflow(backend, device):
    """Logits of 20+ (scale 1/0.05): max-subtracted exponentials keep fp16 finite."""
    B, C, H, W = 1, 4, 5, 5
    q = F.normalize(torch.randn(B, C, H, W), dim=1).to(device)
    k = F.normalize(torch.randn(B, 1, C, H, W), dim=2).to(device)
    v = torch.randn(B, 1, 2, H, W).to(device)
    topk = 10
    ref = vosops.local_attention(q.double(), k.double(), v.double(), radius=2, scale=30.0, topk=topk,
                                 backend="reference")
    for dtype in (torch.float32, torch.float16):
        out = vosops.local_attention(q.to(dtype), k.to(dtype), v.to(dtype), radius=2, scale=30.0, topk=topk,
                                     backend=backend)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double().cpu(), ref.cpu(), atol=0.05 if dtype == torch.float16 else 1e-4,
                                   rtol=0.05)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_backend_logits_past_the_float32_exp_range(backend, device):
    """Logits above 88, where exp overflows float32 (each query's centre key in reference 0 is the query itself, at
    scale 120): every normalisation must subtract the row maximum before exp, the online softmax of a window sweep
    and the top-k list's softmax alike; the backward then recomputes p from the saved log-sum-exp."""
    B, C, H, W, N = 1, 4, 4, 5, 2
    g = torch.Generator().manual_seed(21)
    q = F.normalize(torch.randn(B, C, H, W, generator=g), dim=1)
    k = F.normalize(torch.randn(B, N, C, H, W, generator=g), dim=2)
    k[:, 0] = q
    v = torch.randn(B, N, 2, H, W, generator=g)
    for kw in (dict(), dict(topk=5), dict(topk=5, normalize="threshold")):
        qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
        ref = vosops.local_attention(qd, kd, vd, radius=1, scale=120.0, backend="reference", **kw)
        qb, kb, vb = (t.to(device).requires_grad_() for t in (q, k, v))
        out = vosops.local_attention(qb, kb, vb, radius=1, scale=120.0, backend=backend, **kw)
        assert torch.isfinite(out).all(), kw
        torch.testing.assert_close(out.double().cpu(), ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"{kw}: {m}")
        if kw.get("topk"):  # the backward's p = exp(s - lse) needs the saved log-sum-exp of the large logits
            gout = torch.randn(out.shape, generator=g)
            (gv,) = torch.autograd.grad(out, vb, gout.to(device))
            (rgv,) = torch.autograd.grad(ref, vd, gout.double())
            torch.testing.assert_close(gv.double().cpu(), rgv, atol=1e-4, rtol=1e-4, msg=lambda m: f"{kw} dv: {m}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_backend_negative_zero_scores_tie_with_zeros(backend, device):
    """A negative scale turns every zero dot product into -0.0, which ties with the zero border's +0.0 and with
    other zeros: the tie goes to the lower index (torch.sort's stable order; -0.0 == +0.0), so a key must not rank
    -0.0 below +0.0. Integer features make many such zeros; indices, kept sets and outputs must match."""
    B, C, H, W, N = 1, 2, 4, 5, 2
    g = torch.Generator().manual_seed(8)
    q = torch.randint(-1, 2, (B, C, H, W), generator=g).float()
    k = torch.randint(-1, 2, (B, N, C, H, W), generator=g).float()
    v = torch.randn(B, N, 3, H, W, generator=g)
    for kw in (dict(topk=6, border="zero"), dict(topk=4, normalize="threshold", border="zero")):
        got, (lg, idx) = vosops.local_attention(q.to(device), k.to(device), v.to(device), radius=1, scale=-1.0,
                                                return_topk=True, backend=backend, **kw)
        ref, (rlg, ridx) = vosops.local_attention(q.double(), k.double(), v.double(), radius=1, scale=-1.0,
                                                  return_topk=True, backend="reference", **kw)
        assert torch.equal(idx.cpu(), ridx), kw
        torch.testing.assert_close(lg.double().cpu(), rlg)
        torch.testing.assert_close(got.double().cpu(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_backward_keeps_the_forwards_top_k(backend, device):
    """dv of top-k softmax must be exactly the forward's kept set weighted: sum over (query, kept j) of
    softmax(returned logits)_j * g(query) at the kept candidate's key. The backends recompute the scores in the
    backward and keep those >= the saved k-th key, so a recomputation that rounds differently from the forward
    (another summation order, another MMA layout) would drop or add a candidate: an error of about w * g at a
    key, far above the tolerance. In every dtype a backend takes (fp16 goes through tensor cores on a GPU)."""
    B, C, Cv, H, W, N, r, topk = 1, 16, 3, 11, 12, 2, 3, 12
    D, P = 2 * r + 1, (2 * r + 1) ** 2
    for dtype in [d for d in testing.backend_dtypes(backend, device) if d != torch.float64]:
        g = torch.Generator().manual_seed(11)
        q = torch.randn(B, C, H, W, generator=g).to(device, dtype)
        k = torch.randn(B, N, C, H, W, generator=g).to(device, dtype)
        v = torch.randn(B, N, Cv, H, W, generator=g).to(device, dtype).requires_grad_()
        offsets = rand_offsets(B, N, H, W, device=device)
        out, (lg, idx) = vosops.local_attention(q, k, v, radius=r, scale=0.5, topk=topk, offsets=offsets,
                                                border="zero", return_topk=True, backend=backend)
        grad = torch.randn(out.shape, generator=g).to(device, dtype)
        (dv,) = torch.autograd.grad(out, v, grad)
        # expected dv from the forward's returned kept set alone (its logits recomputed in float64: the returned
        # ones are rounded to the input dtype, too coarse in bfloat16)
        idx, gq = idx.cpu(), grad.double().cpu()
        oi = round_offsets(offsets.cpu(), r)  # (B, N, 2, H, W)
        n, p = idx // P, idx % P
        ii = torch.arange(H).view(1, H, 1, 1)
        jj = torch.arange(W).view(1, 1, W, 1)
        bb = torch.zeros_like(n)
        y = ii + oi[bb, n, 1, ii, jj] + (p // D - r)
        x = jj + oi[bb, n, 0, ii, jj] + (p % D - r)
        inside = (y >= 0) & (y < H) & (x >= 0) & (x < W)
        qd, kd = q.double().cpu(), k.double().cpu()
        kk = kd[bb, n, :, y.clamp(0, H - 1), x.clamp(0, W - 1)]  # (B, H, W, k, C)
        logits = 0.5 * (kk * qd.permute(0, 2, 3, 1).unsqueeze(3)).sum(-1) * inside  # zero border: 0 outside
        w = torch.softmax(logits, dim=-1)
        want = torch.zeros(B, N, H, W, Cv, dtype=torch.float64)
        contrib = (w.unsqueeze(-1) * gq.permute(0, 2, 3, 1).unsqueeze(3))[inside]  # (kept in frame, Cv)
        want.index_put_((bb[inside], n[inside], y[inside], x[inside]), contrib, accumulate=True)
        tol = dict(atol=2e-3, rtol=2e-2) if dtype != torch.float32 else dict(atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(dv.double().cpu(), want.permute(0, 1, 4, 2, 3), **tol, msg=str(dtype))


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] == "cpu"])
def test_cpu_paper_configs_small(backend, device):
    """The paper settings (at small frames) through the C++ kernel, forward and backward, in float64."""
    g = torch.Generator().manual_seed(5)
    H, W = 9, 8
    configs = [
        (16, 7, 3, dict(radius=12, scale=1 / 8, topk=36, border="zero"), True),  # MAMP inference
        (8, 3, 1, dict(radius=6, scale=1 / 8, border="zero"), False),  # MAMP training
        (8, 4, 3, dict(radius=12, scale=10.0, topk=5, normalize="threshold"), False),  # DINO / INO
        (8, 3, 2, dict(radius=12, scale=20.0, topk=10, window="circle"), False),  # CRW
    ]
    for C, Cv, N, kw, with_offsets in configs:
        inputs = {
            "q": torch.randn(1, C, H, W, generator=g, dtype=torch.float64),
            "k": torch.randn(1, N, C, H, W, generator=g, dtype=torch.float64),
            "v": torch.randn(1, N, Cv, H, W, generator=g, dtype=torch.float64),
        }
        if with_offsets:
            inputs["offsets"] = torch.randint(-16, 17, (1, N, 2, H, W), generator=g).double()
        testing.check_against_reference(
            lambda **t: vosops.local_attention(**t, **kw, backend=backend),
            lambda **t: vosops.local_attention(**t, **kw, backend="reference"),
            inputs, dtype=torch.float64, grad_inputs=("q", "k", "v"),
        )


# --- 3. gradcheck, opcheck, compile, errors ---------------------------------------------------------------------

GRADCHECK_KW = [
    dict(radius=1, border="zero"),
    dict(radius=1, topk=4, offsets=True, border="mask"),
    dict(radius=2, topk=5, normalize="threshold", window="circle", dilation=2),
]


@pytest.mark.parametrize("kw", GRADCHECK_KW)
def test_reference_gradcheck(kw):
    inputs, kw = make_inputs(1, 2, 2, 3, 4, 2, kw, "cpu")
    off = inputs.get("offsets")
    q, k, v = (inputs[n].double().requires_grad_() for n in ("q", "k", "v"))
    testing.check_gradcheck(
        lambda a, b, c: vosops.local_attention(a, b, c, offsets=off, backend="reference", **kw), (q, k, v))


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] == "cpu"])
@pytest.mark.parametrize("kw", GRADCHECK_KW)
def test_cpu_gradcheck(backend, device, kw):
    inputs, kw = make_inputs(1, 2, 2, 3, 4, 2, kw, "cpu")
    off = inputs.get("offsets")
    q, k, v = (inputs[n].double().requires_grad_() for n in ("q", "k", "v"))
    testing.check_gradcheck(
        lambda a, b, c: vosops.local_attention(a, b, c, offsets=off, backend=backend, **kw), (q, k, v))
    if kw.get("topk"):  # the returned top-k logits are differentiable too
        testing.check_gradcheck(
            lambda a, b: vosops.local_attention(a, b, v.detach(), offsets=off, backend=backend, return_topk=True,
                                                **kw)[1][0].nan_to_num(neginf=0.0), (q, k))


def _native_args(kw, offsets):
    return (offsets, kw["radius"], kw.get("dilation", 1), kw.get("scale", 1.0), kw.get("topk") or 0,
            kw.get("normalize", "softmax"), kw.get("window", "square"), kw.get("border", "mask"),
            kw.get("return_topk", False))


@pytest.mark.parametrize("kw", GRADCHECK_KW + [dict(radius=1, topk=3, return_topk=True)])
def test_opcheck_native(kw):
    if vosops._backends.why_unusable("cpu", "local_attention", "cpu") is not None:
        pytest.skip("no native CPU kernel for local_attention in this build")
    inputs, kw = make_inputs(1, 3, 2, 4, 5, 2, kw, "cpu")
    q, k, v = (inputs[n].requires_grad_() for n in ("q", "k", "v"))
    testing.check_opcheck(torch.ops.vosops.local_attention.default, (q, k, v, *_native_args(kw, inputs.get("offsets"))))


@pytest.mark.parametrize("kw", [dict(radius=1), dict(radius=1, offsets=True, border="zero")])
def test_opcheck_triton(kw):
    pytest.importorskip("triton")
    if vosops._backends.why_unusable("triton", "local_attention", "cpu") is not None:
        pytest.skip("triton backend not usable on CPU here")
    from vosops.triton import local_attention as tla

    inputs, kw = make_inputs(1, 3, 2, 4, 5, 2, kw, "cpu")
    q, k, v = (inputs[n].requires_grad_() for n in ("q", "k", "v"))
    for tiled, precision in ((True, "ieee"), (True, "tf32"), (False, "ieee")):
        testing.check_opcheck(tla.local_attention_triton,
                              (q, k, v, *_native_args(kw, inputs.get("offsets")), tiled, precision))


@pytest.mark.parametrize("backend,device", BACKENDS + [pytest.param("reference", "cpu", id="reference-cpu")])
def test_torch_compile_fullgraph(backend, device):
    inputs, _ = make_inputs(1, 3, 2, 5, 6, 2, {}, device)
    q, k, v = (inputs[n].requires_grad_() for n in ("q", "k", "v"))
    offsets = rand_offsets(1, 2, 5, 6, device=device)
    topk = 4
    testing.check_compile(
        lambda a, b, c: vosops.local_attention(a, b, c, radius=1, topk=topk, offsets=offsets, backend=backend),
        (q, k, v))


def test_auto_backend_choice():
    from vosops.ops.local_attention import _auto_candidates

    assert _auto_candidates(torch.float32, None) == ("reference", "cpu", "cuda", "triton")
    assert "cuda" in _auto_candidates(torch.float32, 128)
    assert "cuda" not in _auto_candidates(torch.float32, 129) and "triton" in _auto_candidates(torch.float32, 129)
    assert _auto_candidates(torch.float64, 5) == ("reference", "cpu")
    # on CPU tensors auto takes the C++ kernel when it is built, and it agrees with an explicit call
    q, k, v = torch.randn(1, 3, 4, 5), torch.randn(1, 2, 3, 4, 5), torch.randn(1, 2, 2, 4, 5)
    expected = "cpu" if vosops._backends.why_unusable("cpu", "local_attention", "cpu") is None else "reference"
    torch.testing.assert_close(vosops.local_attention(q, k, v, radius=1, topk=3),
                               vosops.local_attention(q, k, v, radius=1, topk=3, backend=expected))
    with vosops.use_backend("reference"):
        torch.testing.assert_close(vosops.local_attention(q, k, v, radius=1, topk=3),
                                   vosops.local_attention(q, k, v, radius=1, topk=3, backend="reference"))


Q, K, V = torch.randn(1, 3, 4, 5), torch.randn(1, 2, 3, 4, 5), torch.randn(1, 2, 2, 4, 5)


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((Q[0], K, V), dict(radius=1), ValueError, "q must have 4 dimensions"),
        ((Q, K[:, :0], V[:, :0]), dict(radius=1), ValueError, "N >= 1"),
        ((Q, K[:, :, :2], V), dict(radius=1), ValueError, "k must be .B, N, C, H, W."),
        ((Q, K, V[:, :1]), dict(radius=1), ValueError, "v must be .B, N, Cv, H, W."),
        ((Q, K.double(), V), dict(radius=1), TypeError, "k has dtype"),
        ((Q, K, V.double()), dict(radius=1), TypeError, "v has dtype"),
        ((Q, K, V), dict(radius=-1), ValueError, "radius must be >= 0"),
        ((Q, K, V), dict(radius=1.5), TypeError, "radius must be an int"),
        ((Q, K, V), dict(radius=1, dilation=0), ValueError, "dilation must be >= 1"),
        ((Q, K, V), dict(radius=1, topk=0), ValueError, "topk must be >= 1"),
        ((Q, K, V), dict(radius=1, topk=19), ValueError, "topk must be <= the number of candidates .18"),
        ((Q, K, V), dict(radius=1, window="circle", topk=3), ValueError, "topk must be <= the number of candidates .2"),
        ((Q, K, V), dict(radius=0, window="circle"), ValueError, "no candidates"),
        ((Q, K, V), dict(radius=1, normalize="threshold"), ValueError, "needs topk"),
        ((Q, K, V), dict(radius=1, return_topk=True), ValueError, "return_topk=True needs topk"),
        ((Q, K, V), dict(radius=1, window="diamond"), ValueError, "window must be one of"),
        ((Q, K, V), dict(radius=1, border="reflect"), ValueError, "border must be one of"),
        ((Q, K, V), dict(radius=1, normalize="sparsemax"), ValueError, "normalize must be one of"),
        ((Q, K, V), dict(radius=1, offsets=torch.zeros(1, 2, 2, 4, 4)), ValueError, "offsets must be .B, N, 2, H, W."),
        ((Q, K, V), dict(radius=1, offsets=torch.zeros(1, 2, 4, 5, dtype=torch.long)), TypeError, "offsets must be float"),
        ((Q, K, V), dict(radius=1, offsets=torch.zeros(1, 2, 2, 4, 5, device="meta")), ValueError,
         "offsets is on meta"),
        ((Q, K, V), dict(radius=1, scale="x"), TypeError, "scale must be a float"),
        (([1.0], K, V), dict(radius=1), TypeError, "q must be a torch.Tensor"),
    ],
)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bad_input_raises_clear_errors(args, kwargs, exc, match, backend):
    """On the reference backend too: the Python checks are all that guards the Triton kernels, and on the cpu
    backend the C++ checks would hide a missing one."""
    with vosops.use_backend(backend), pytest.raises(exc, match=match):
        vosops.local_attention(*args, **kwargs)


def test_affinity_and_aggregate_bad_input():
    with pytest.raises(ValueError, match="radius must be >= 0"):
        vosops.local_affinity(Q, K, radius=-2)
    with pytest.raises(ValueError, match="P = .2.radius.1.\\^2 = 9"):
        vosops.local_aggregate(torch.rand(1, 2, 8, 4, 5), V, radius=1)
    with pytest.raises(ValueError, match="v must be"):
        vosops.local_aggregate(torch.rand(1, 2, 9, 4, 5), V[:, :1], radius=1)
    with pytest.raises(vosops._backends.BackendUnavailableError, match="backend 'cuda' is unavailable"):
        vosops.local_affinity(Q, K, radius=1, backend="cuda")


def test_native_op_checks_its_arguments_too():
    if vosops._backends.why_unusable("cpu", "local_attention", "cpu") is not None:
        pytest.skip("no native CPU kernel for local_attention in this build")
    op = torch.ops.vosops.local_attention
    with pytest.raises(ValueError, match="k must be"):
        op(Q, K[:, :, :2], V, None, 1, 1, 1.0, 0, "softmax", "square", "mask", False)
    with pytest.raises(ValueError, match="topk"):
        op(Q, K, V, None, 1, 1, 1.0, 100, "softmax", "square", "mask", False)
    with pytest.raises(ValueError, match="normalize"):
        op(Q, K, V, None, 1, 1, 1.0, 2, "nope", "square", "mask", False)
    with pytest.raises(ValueError, match="offsets"):
        op(Q, K, V, torch.zeros(1, 2, 2, 4, 4), 1, 1, 1.0, 0, "softmax", "square", "mask", False)


@pytest.mark.parametrize("bad", [-1, 2 * 25, 10**12, 0])  # 0 = column (dy, dx) = (-2, -2): not in the circle
def test_native_backward_rejects_indices_the_forward_cannot_make(bad):
    """The CPU kernel looks candidates up by the saved top-k index: one passed directly to the backward op
    that is out of [0, N*P) or names an out-of-window column raises (it used to read out of bounds)."""
    if vosops._backends.why_unusable("cpu", "local_attention", "cpu") is not None:
        pytest.skip("no native CPU kernel for local_attention in this build")
    args = (None, 2, 1, 1.0, 3, "softmax", "circle", "mask")
    out, stats, _, index = torch.ops.vosops.local_attention(Q, K, V, *args, True)
    grad = torch.randn_like(out)
    torch.ops.vosops.local_attention_backward(grad, None, Q, K, V, None, stats, index, *args[1:], True, True, True)
    index = index.clone()
    index[0, 2, 3, 1] = bad
    with pytest.raises(ValueError, match=f"topk_index must hold the forward's candidate indices.*found {bad}"):
        torch.ops.vosops.local_attention_backward(grad, None, Q, K, V, None, stats, index, *args[1:], True, True,
                                                  True)


# --- the Triton kernels as compiled for a GPU: every launch the ops make is compiled to a cubin by
# tests/triton_aot.py (run by CI); here, what can be checked without compiling.

@pytest.mark.skipif(_backends.why_unusable("triton", "local_attention", "cpu") is not None,
                    reason="triton not usable on CPU here")
def test_triton_compiled_tiles_fit_registers(monkeypatch):
    """The compiled kernels keep (BQ, KP, CB) and (BQ, KP, CVP) tiles in registers: their sizes stay bounded
    whatever topk, channels and value channels are (tests/triton_aot.py compiles them)."""
    from vosops.triton import local_attention as tla

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for topk in (0, 5, 36, 64, 100, 256):  # 0: no top-k (the op passes 0 for None)
        for C in (1, 3, 64, 384):
            for CV in (1, 7, 64):
                q, k, v = torch.empty(1, C, 4, 4), torch.empty(1, 1, C, 4, 4), torch.empty(1, 1, CV, 4, 4)
                mt = tla._meta(q, k, v, 12, "square", topk, "softmax")
                bq, cb = tla._tiles(10_000, mt)
                for n in (bq, cb):
                    assert n & (n - 1) == 0
                assert 1 <= bq <= 16 and 2 <= cb <= 32
                assert bq * mt["KP"] * cb <= max(tla.LOCAL_ATTENTION_CONFIG["tile_elements"], bq * mt["KP"] * 2)
                assert bq * mt["KP"] * mt["CVP"] <= max(2 * tla.LOCAL_ATTENTION_CONFIG["tile_elements"], mt["KP"] * mt["CVP"])


@pytest.mark.skipif(_backends.why_unusable("triton", "local_attention", "cpu") is not None,
                    reason="triton not usable on CPU here")
def test_triton_int64_offsets_match(monkeypatch):
    """Tensors under 2^31 elements get int32 offsets in the Triton kernels; the int64 path (larger tensors) must
    compute the same, forward and backward."""
    import triton.language as tl

    from vosops.triton import local_attention as tla

    inputs, kw = make_inputs(1, 4, 3, 7, 5, 2, dict(radius=2, topk=6, offsets=True, border="zero"), "cpu", seed=4)
    assert tla._index_type(*inputs.values()) == tl.int32
    big = torch.empty(2, 2**30, device="meta")  # spans 2^31 elements without allocating them
    assert tla._index_type(inputs["q"], big) == tl.int64
    results = []
    for force in ("0", "1"):
        monkeypatch.setenv("VOSOPS_TRITON_INT64_INDEX", force)
        results.append(_triton_forward_backward(inputs, kw))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def _triton_forward_backward(inputs, kw):
    """(out, top logits, top index, dq, dk, dv) of the triton backend, the loss weighting every output."""
    t = {n: x.clone().requires_grad_(n != "offsets") for n, x in inputs.items()}
    out, (lg, idx) = vosops.local_attention(**t, **kw, return_topk=True, backend="triton")
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + lg.sum(),
                                (t["q"], t["k"], t["v"]))
    return (out, lg, idx, *grads)


# --- the two Triton kernel families: query tiles (default) and one program per query block ---------------------

_TRITON_CPU = pytest.mark.skipif(_backends.why_unusable("triton", "local_attention", "cpu") is not None,
                                 reason="triton not usable on CPU here")


@_TRITON_CPU
@pytest.mark.parametrize("case", range(len(CASES)))
def test_triton_per_query_kernels_match_reference(monkeypatch, case):
    """LOCAL_ATTENTION_CONFIG["tiled"] = False: the per-query kernels (kept as the tunable alternative), forward
    and backward, against the reference."""
    from vosops.triton import local_attention as tla

    monkeypatch.setitem(tla.LOCAL_ATTENTION_CONFIG, "tiled", False)
    B, C, Cv, H, W, N, kw = CASES[case]
    inputs, kw = make_inputs(B, C, Cv, H, W, N, kw, "cpu", seed=case)
    ret = kw.get("topk") is not None
    testing.check_against_reference(
        lambda **t: vosops.local_attention(**t, **kw, return_topk=ret, backend="triton"),
        lambda **t: vosops.local_attention(**t, **kw, return_topk=ret, backend="reference"),
        inputs, dtype=torch.float32, grad_inputs=("q", "k", "v"))


@_TRITON_CPU
@pytest.mark.parametrize("normalize", ["softmax", "threshold"])
def test_triton_backward_uses_the_forwards_kernel_family(monkeypatch, normalize):
    """The kernel family (tiled or per-query) is chosen once per call: a config flipped between the forward and the
    backward (a tuning thread) used to pair one family's saved threshold with the other's backward (wrong grads)."""
    from vosops.triton import local_attention as tla

    inputs, kw = make_inputs(1, 3, 2, 6, 7, 2, dict(radius=1, topk=4, normalize=normalize), "cpu", seed=4)
    g = torch.randn(1, 2, 6, 7)
    exp = [t.grad for t in _grads(inputs, kw, "reference", g)]
    for first in (True, False):
        monkeypatch.setitem(tla.LOCAL_ATTENTION_CONFIG, "tiled", first)
        q, k, v = (inputs[n].clone().requires_grad_() for n in ("q", "k", "v"))
        out = vosops.local_attention(q, k, v, **kw, backend="triton")
        monkeypatch.setitem(tla.LOCAL_ATTENTION_CONFIG, "tiled", not first)  # flipped before the backward
        out.backward(g)
        for got, want in zip((q.grad, k.grad, v.grad), exp):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _grads(inputs, kw, backend, g):
    q, k, v = (inputs[n].clone().requires_grad_() for n in ("q", "k", "v"))
    vosops.local_attention(q, k, v, **kw, backend=backend).backward(g)
    return q, k, v


TILE_CASES = [
    # (B, C, Cv, H, W, N, kwargs): frames several tiles wide and high, halos of many chunks
    (2, 5, 3, 9, 11, 2, dict(radius=2, topk=6, border="zero", scale=0.5)),
    (1, 20, 2, 8, 9, 2, dict(radius=2, dilation=2, window="circle", topk=7, normalize="threshold",
                              offsets=True, border="mask")),
    (1, 3, 4, 7, 13, 3, dict(radius=2, offsets=True, border="zero")),
    (1, 4, 17, 6, 10, 1, dict(radius=1, dilation=3, topk=5, offsets=True, border="zero")),  # Cv > 16
    # softmax over all, no offsets: dk and dv from the key-major tile kernel
    (2, 20, 3, 9, 11, 2, dict(radius=2, dilation=2, window="circle", border="zero", scale=0.3)),
    (1, 3, 2, 7, 6, 1, dict(radius=3, border="mask")),
]


@_TRITON_CPU
@pytest.mark.parametrize("case,sort_min", [(c, 8) for c in range(len(TILE_CASES))] + [(3, 0), (3, 1 << 20)])
def test_triton_tiles_and_chunks(monkeypatch, case, sort_min):
    """Small query tiles (4 x 4) and halo chunks (16 positions): many tiles per frame, partial tiles at the
    right and bottom edges, many chunks per reference, channels over several blocks (C = 20 > 16), offsets that
    spread a tile's windows; forward, backward and the returned top-k (and its gradient) against the reference.
    Chunks as wide as the top-k list merge by sort or by insertion rounds (sort_min 0: always sorted, 1 << 20:
    always rounds)."""
    from vosops.triton import local_attention_tiled as tiled

    monkeypatch.setitem(tiled.TILED_CONFIG, "sort_min", sort_min)
    monkeypatch.setitem(tiled.TILED_CONFIG, "tile_h", 4)
    monkeypatch.setitem(tiled.TILED_CONFIG, "tile_w", 4)
    monkeypatch.setitem(tiled.TILED_CONFIG, "interpret_block_k", 16)
    monkeypatch.setitem(tiled.TILED_CONFIG, "block_c", 16)
    B, C, Cv, H, W, N, kw = TILE_CASES[case]
    inputs, kw = make_inputs(B, C, Cv, H, W, N, kw, "cpu", seed=40 + case)
    if "offsets" in inputs:  # spread, none far out of frame (those make every box frame-sized: slow when interpreted)
        inputs["offsets"] = rand_offsets(B, N, H, W, far=0.0)
    ret = kw.get("topk") is not None
    testing.check_against_reference(
        lambda **t: vosops.local_attention(**t, **kw, return_topk=ret, backend="triton"),
        lambda **t: vosops.local_attention(**t, **kw, return_topk=ret, backend="reference"),
        inputs, dtype=torch.float32, grad_inputs=("q", "k", "v"))


@_TRITON_CPU
def test_triton_tiles_channels_last_copy(monkeypatch):
    """TILED_CONFIG["channels_last"]: the tile kernels on channel-fastest copies compute what they compute on the
    inputs as given (the same sums in the same order: bit-identical), forward and backward."""
    from vosops.triton import local_attention_tiled as tiled

    inputs, kw = make_inputs(1, 5, 3, 6, 9, 2, dict(radius=2, topk=5, offsets=True, border="zero"), "cpu", seed=7)
    results = []
    for copy in (False, True):
        monkeypatch.setitem(tiled.TILED_CONFIG, "channels_last", copy)
        results.append(_triton_forward_backward(inputs, kw))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@_TRITON_CPU
@pytest.mark.parametrize("case", [1, 2, 8])
def test_triton_per_query_kernels_several_query_blocks(monkeypatch, case):
    """Under the interpreter the per-query kernels give every query of these frames to one program (BQ up to 128):
    with the blocks a GPU takes (16 queries, channel blocks of 2) a frame spans several programs, the last one
    partial, batches start mid-block and channels take several blocks; forward, backward (the key-major dk/dv
    kernel in case 8) and the returned top-k against the reference."""
    from vosops.triton import local_attention as tla

    monkeypatch.setitem(tla.LOCAL_ATTENTION_CONFIG, "tiled", False)
    monkeypatch.setattr(tla, "_tiles", lambda queries, mt: (16, 2))
    B, C, Cv, H, W, N, kw = CASES[case]
    inputs, kw = make_inputs(B, C, Cv, H, W, N, kw, "cpu", seed=60 + case)
    ret = kw.get("topk") is not None
    testing.check_against_reference(
        lambda **t: vosops.local_attention(**t, **kw, return_topk=ret, backend="triton"),
        lambda **t: vosops.local_attention(**t, **kw, return_topk=ret, backend="reference"),
        inputs, dtype=torch.float32, grad_inputs=("q", "k", "v"))


@_TRITON_CPU
def test_triton_tile_config_is_checked(monkeypatch):
    from vosops.triton import local_attention_tiled as tiled

    monkeypatch.setitem(tiled.TILED_CONFIG, "tile_w", 3)
    with pytest.raises(ValueError, match="TILED_CONFIG"):
        tiled.tiles(8, 3)


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + BACKENDS)
def test_offsets_are_not_differentiated_on_any_backend(backend, device):
    """An output requires grad through q, k, v, weights only: offsets that require grad neither make it require
    grad (the reference's output never did) nor receive a gradient."""
    B, C, H, W, N = 1, 3, 5, 6, 2
    q, k = torch.randn(B, C, H, W, device=device), torch.randn(B, N, C, H, W, device=device)
    v = torch.randn(B, N, 2, H, W, device=device)
    offsets = rand_offsets(B, N, H, W, device=device).requires_grad_()
    w = torch.rand(B, N, 9, H, W, device=device)
    outs = [vosops.local_attention(q, k, v, radius=1, topk=4, offsets=offsets, backend=backend),
            vosops.local_affinity(q, k, radius=1, offsets=offsets, backend=backend),
            vosops.local_aggregate(w, v, radius=1, offsets=offsets, backend=backend)]
    assert [o.requires_grad for o in outs] == [False, False, False]
    qg = q.clone().requires_grad_()
    vosops.local_attention(qg, k, v, radius=1, topk=4, offsets=offsets, backend=backend).sum().backward()
    assert qg.grad is not None and offsets.grad is None


def test_window_size_counts_the_window_columns():
    from vosops.ops.local_attention import window_size
    from vosops.reference.local_attention import window_columns

    for r in range(0, 41):
        for window in ("square", "circle"):
            assert window_size(r, window) == len(window_columns(r, window)), (r, window)


@pytest.mark.parametrize("kw", [dict(), dict(topk=4), dict(topk=4, normalize="threshold")])
def test_reference_local_attention_large_logits_stay_finite(kw):
    """Catches reference/local_attention.py _normalize without the max subtraction (exp(500) = inf in float32)."""
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(1, 4, 5, 6, generator=g), dim=1)
    k = F.normalize(torch.randn(1, 2, 4, 5, 6, generator=g), dim=2)
    v = torch.randn(1, 2, 3, 5, 6, generator=g)
    out = vosops.local_attention(q, k, v, radius=1, scale=500.0, backend="reference", **kw)
    want = vosops.local_attention(q.double(), k.double(), v.double(), radius=1, scale=500.0, backend="reference",
                                  **kw)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)


def test_auto_keeps_float64_affinity_off_cuda_and_triton(monkeypatch):
    """Catches _unfused_backend's float64 filter being dropped (auto would send float64 to the fp32 cuda kernels)."""
    from vosops.ops.local_attention import _unfused_backend

    monkeypatch.setattr(_backends, "why_unusable", lambda b, op, d: None)
    monkeypatch.setitem(_backends.AUTO_ORDER, "cpu", ("cuda", "triton", "cpu", "reference"))
    for op in ("local_affinity", "local_aggregate"):
        assert _unfused_backend(op, torch.device("cpu"), torch.float64, None) == "cpu"
        assert _unfused_backend(op, torch.device("cpu"), torch.float32, None) == "cuda"
