"""The local_attention CUDA kernels' logic, run on the CPU: tests/cuda_emulation compiles the .cu kernels as host
code (g++ and the CUDA toolkit's host headers; one emulated thread walks the grid-stride loops) and they are
compared with the reference, forward (outputs, top-k lists) and backward (dq, dk, dv, incl. returned-logit grads).
This checks indexing, selection, softmax and gradients; races and the glue need a GPU (the cuda-marked tests)."""

import ctypes

import pytest
import torch

from vosops import reference, testing
from vosops.reference.local_attention import round_offsets, window_columns
from _cuda_emulation import build_emulation, ptr


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build_emulation(tmp_path_factory, "local_attention_emu.cpp")


def _cl(t):
    return (t.permute(0, 2, 3, 1) if t.dim() == 4 else t.permute(0, 1, 3, 4, 2)).float().contiguous()


def run_emulated(emu, q, k, v, offsets, kw, grad_out, grad_logits, edit_index=None):
    B, N, C, H, W = k.shape
    Cv = v.shape[2]
    r, d = kw["radius"], kw.get("dilation", 1)
    cols = torch.tensor(window_columns(r, kw.get("window", "square")), dtype=torch.int32)
    K = kw.get("topk") or 0
    sizes = torch.tensor([B, N, C, Cv, H, W, r, d, (2 * r + 1) ** 2, cols.numel()], dtype=torch.int64)
    qc, kc, vc = _cl(q), _cl(k), _cl(v)
    off = round_offsets(offsets, r, d).to(torch.int32).contiguous() if offsets is not None else None
    common = (ptr(sizes), ctypes.c_float(kw.get("scale", 1.0)), ctypes.c_int64(K),
              ctypes.c_int(kw.get("normalize", "softmax") == "threshold"), ctypes.c_int(kw.get("border") == "zero"),
              ptr(qc), ptr(kc), ptr(vc), ptr(off), ptr(cols))
    out = torch.full((B, Cv, H, W), float("nan"))
    stats = torch.full((B, H, W, 2), float("nan"))
    tl = torch.full((B, H, W, max(K, 1)), float("nan"))
    ti = torch.full((B, H, W, max(K, 1)), -7777, dtype=torch.int64)
    assert emu.emu_forward(*common, ptr(out), ptr(stats), ptr(tl), ptr(ti)) == 0
    if edit_index is not None:  # what the backward is handed instead of the forward's indices
        ti = edit_index(ti.clone())
    dq, dk, dv = torch.zeros(B, H, W, C), torch.zeros(B, N, H, W, C), torch.zeros(B, N, H, W, Cv)
    g = _cl(grad_out)
    gl = grad_logits.float().contiguous() if grad_logits is not None else None
    assert emu.emu_backward(*common, ptr(g), ptr(gl), ptr(stats), ptr(ti), ptr(dq), ptr(dk), ptr(dv)) == 0
    grads = (dq.permute(0, 3, 1, 2), dk.permute(0, 1, 4, 2, 3), dv.permute(0, 1, 4, 2, 3))
    return out, tl[..., :K], ti[..., :K], grads


def rand_offsets(B, N, H, W, g):
    off = torch.randn(B, N, 2, H, W, generator=g) * 3
    far = torch.rand(B, N, 1, H, W, generator=g) < 0.1
    off = torch.where(far, off * 20, off)
    off[..., 0, 0] = 0.5
    off[..., 0, 1] = -1.5
    return off


CASES = [
    # (B, C, Cv, H, W, N, kwargs, offsets)
    (1, 8, 3, 6, 7, 2, dict(radius=2, scale=0.7), False),
    (2, 3, 2, 5, 4, 1, dict(radius=1, topk=4, border="zero"), False),
    (1, 4, 3, 7, 5, 2, dict(radius=2, topk=6, window="circle"), True),
    (1, 3, 2, 6, 6, 3, dict(radius=2, dilation=2, topk=5, normalize="threshold", border="zero"), True),
    (1, 8, 1, 5, 7, 2, dict(radius=3, topk=9, border="mask", scale=2.0), True),
    (1, 2, 2, 3, 4, 1, dict(radius=1, topk=9), False),  # k = candidate count
    (1, 5, 9, 6, 5, 2, dict(radius=2, topk=20, border="zero", scale=0.5), True),  # Cv > 8: two value chunks
    (1, 4, 7, 5, 6, 2, dict(radius=3, topk=36, border="zero", scale=0.5), True),  # MAMP-like: 36 of 98
    (1, 4, 3, 5, 6, 2, dict(radius=4, topk=80, border="zero", scale=0.5), True),  # the 128-slot list: 80 of 162
    (2, 4, 10, 5, 6, 2, dict(radius=2, scale=0.5, border="zero"), True),  # softmax over all, Cv chunks
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_emulated_cuda_kernels_match_reference(emu, case):
    B, C, Cv, H, W, N, kw, with_off = CASES[case]
    g = torch.Generator().manual_seed(case)
    q = torch.randn(B, C, H, W, generator=g).double()
    k = torch.randn(B, N, C, H, W, generator=g).double()
    v = torch.randn(B, N, Cv, H, W, generator=g).double()
    offsets = rand_offsets(B, N, H, W, g).double() if with_off else None
    K = kw.get("topk")
    grad_out = torch.randn(B, Cv, H, W, generator=g).double()
    grad_logits = torch.randn(B, H, W, K, generator=g).double() if K else None
    check_emulated(emu, q.float(), k.float(), v.float(), offsets, kw, grad_out, grad_logits)


def check_emulated(emu, q, k, v, offsets, kw, grad_out, grad_logits):
    """The emulated kernels on float32 q, k, v against the reference in float64 on the same values: outputs, top-k
    lists, and dq/dk/dv of (out * grad_out).sum() plus, with topk, (finite logits * grad_logits).sum()."""
    K = kw.get("topk")
    out, tl, ti, grads = run_emulated(emu, q, k, v, offsets, kw, grad_out, grad_logits)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    if K:
        ref, (rl, ri) = reference.local_attention(qr, kr, vr, offsets=offsets, return_topk=True, **kw)
        assert torch.equal(ti, ri)
        testing.assert_close(tl, rl, torch.float32, "top-k logits")
        loss = (ref * grad_out).sum() + (torch.where(torch.isfinite(rl), rl, 0.0) * grad_logits).sum()
    else:
        ref = reference.local_attention(qr, kr, vr, offsets=offsets, **kw)
        loss = (ref * grad_out).sum()
    testing.assert_close(out, ref, torch.float32, "out")
    want = torch.autograd.grad(loss, (qr, kr, vr), allow_unused=True)
    for name, got, w in zip("qkv", grads, want):
        testing.assert_close(got, torch.zeros_like(got.double()) if w is None else w, torch.float32,
                             f"grad of {name}", grad=True)


def test_emulated_cuda_ties_and_no_valid_candidate(emu):
    """Integer features tie exactly (lower index wins, threshold keeps all ties); a query whose candidates are all
    out of frame outputs 0 with zero gradient."""
    g = torch.Generator().manual_seed(7)
    B, C, H, W, N = 1, 2, 5, 6, 2
    q = torch.randint(-1, 2, (B, C, H, W), generator=g).double()
    k = torch.randint(-1, 2, (B, N, C, H, W), generator=g).double()
    v = torch.randn(B, N, 3, H, W, generator=g).double()
    offsets = torch.zeros(B, N, 2, H, W, dtype=torch.float64)
    offsets[0, :, 1, 1, 2] = -50.0
    grad_out = torch.randn(B, 3, H, W, generator=g).double()
    for kw in (dict(radius=2, topk=7), dict(radius=2, topk=5, normalize="threshold"), dict(radius=2)):
        out, tl, ti, grads = run_emulated(emu, q.float(), k.float(), v.float(), offsets, kw, grad_out, None)
        qr = q.clone().requires_grad_()
        if kw.get("topk"):
            ref, (rl, ri) = reference.local_attention(qr, k, v, offsets=offsets, return_topk=True, **kw)
            assert torch.equal(ti, ri), kw
        else:
            ref = reference.local_attention(qr, k, v, offsets=offsets, **kw)
        testing.assert_close(out, ref, torch.float32, f"out {kw}")
        assert not out[0, :, 1, 2].any() and not grads[0][0, :, 1, 2].any()
        (want,) = torch.autograd.grad((ref * grad_out).sum(), (qr,))
        testing.assert_close(grads[0], want, torch.float32, f"grad of q {kw}", grad=True)


def test_emulated_cuda_nan_feature_makes_its_queries_nan(emu):
    """A NaN key pixel: the queries whose windows hold it output NaN (it ranks first in their lists, as in the
    reference's sort); every other query is unchanged. The kernel used to drop the NaN (fmaxf) or place it
    out of order in the list, giving finite wrong outputs."""
    g = torch.Generator().manual_seed(5)
    B, C, Cv, H, W, N = 1, 3, 2, 6, 7, 2
    q, k, v = torch.randn(B, C, H, W, generator=g), torch.randn(B, N, C, H, W, generator=g), \
        torch.randn(B, N, Cv, H, W, generator=g)
    k[0, 1, :, 2, 3] = float("nan")
    grad_out = torch.randn(B, Cv, H, W, generator=g)
    for kw in (dict(radius=1, topk=4), dict(radius=1, topk=4, normalize="threshold"), dict(radius=1)):
        out, tl, ti, _ = run_emulated(emu, q, k, v, None, kw, grad_out, None)
        if kw.get("topk"):
            ref, (rl, ri) = reference.local_attention(q, k, v, return_topk=True, **kw)
            assert torch.equal(ti, ri), kw
            torch.testing.assert_close(tl, rl, equal_nan=True)
        else:
            ref = reference.local_attention(q, k, v, **kw)
        assert ref.isnan().any(dim=1).sum() == 9, kw  # the 3 x 3 queries around (2, 3)
        torch.testing.assert_close(out, ref, equal_nan=True, atol=2e-5, rtol=2e-5)


def test_emulated_cuda_backward_skips_indices_the_forward_cannot_make(emu):
    """The CUDA backward cannot check a directly passed topk_index without a host sync (the CPU glue raises): it
    skips entries outside [0, N*P) or naming an out-of-circle column, never reading through them. A query whose
    whole list is bad gets a zero dq row; every other query's dq is the one of the forward's own indices."""
    g = torch.Generator().manual_seed(11)
    B, C, Cv, H, W, N = 1, 4, 3, 5, 6, 2
    kw = dict(radius=2, topk=6, window="circle")
    q, k, v = torch.randn(B, C, H, W, generator=g), torch.randn(B, N, C, H, W, generator=g), \
        torch.randn(B, N, Cv, H, W, generator=g)
    offsets = rand_offsets(B, N, H, W, g)
    grad_out, grad_logits = torch.randn(B, Cv, H, W, generator=g), torch.randn(B, H, W, 6, generator=g)
    P = 25
    out_of_circle = 0  # column (dy, dx) = (-2, -2): outside the radius-2 circle
    assert out_of_circle not in window_columns(2, "circle")
    bad_rows = {(1, 1): -7, (2, 3): N * P, (4, 5): 10**12, (3, 0): P + out_of_circle}

    def corrupt(ti):
        for (i, j), bad in bad_rows.items():
            ti[0, i, j, :] = bad
        return ti

    _, _, _, clean = run_emulated(emu, q, k, v, offsets, kw, grad_out, grad_logits)
    _, _, _, skipped = run_emulated(emu, q, k, v, offsets, kw, grad_out, grad_logits, edit_index=corrupt)
    assert all(torch.isfinite(t).all() for t in skipped)
    rows = torch.zeros(H, W, dtype=torch.bool)
    for i, j in bad_rows:
        rows[i, j] = True
    assert not skipped[0][0, :, rows].any()
    assert torch.equal(skipped[0][0, :, ~rows], clean[0][0, :, ~rows])
    assert clean[0][0, :, rows].abs().sum() > 0  # the corrupted queries did have a gradient


@pytest.mark.parametrize("seed", range(30))
def test_emulated_cuda_random_configs(emu, seed):
    """The random configurations of tests/test_random_configs.py (every argument drawn at once, integer features
    for exact ties in half of them) through the emulated kernels: outputs, top-k lists, dq/dk/dv."""
    from test_random_configs import _local_attention_config

    inputs, kw, _ = _local_attention_config(seed)
    q, k, v = (inputs[n].float() for n in "qkv")
    offsets = kw.pop("offsets")
    kw.pop("return_topk")
    K = kw["topk"]
    if K is None:
        del kw["topk"]
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(v.shape[0], v.shape[2], *v.shape[-2:], generator=g).double()
    grad_logits = torch.randn(*q.shape[:1], *q.shape[-2:], K, generator=g).double() if K else None
    check_emulated(emu, q, k, v, offsets, kw, grad_out, grad_logits)
