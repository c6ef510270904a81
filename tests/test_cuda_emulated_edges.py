"""Edge cases of the CUDA kernels through their host emulation (tests/_cuda_emulation.py), each chosen so that a
plausible slip in a kernel fails it: channel counts that fill whole channel groups or give a lane several chunks,
exact ties after a top-k list fills, fewer valid keys than top-k, -inf scores, logits beyond exp's range, k-means
sizes past the reduction's slices and the update's thread stride, convergence at exactly tol, and indices the
kernels must skip."""

import pytest
import torch

import vosops
from vosops import reference, testing
from vosops.reference import kmeans as R
from vosops.reference.local_attention import window_columns
from _cuda_emulation import build_emulation
from test_flow_warp_cuda_emulated import emulated_flow_warp
from test_kmeans_cuda_emulated import emulated_step, emulated_update
from test_local_attention_cuda_emulated import run_emulated
from test_topk_attention_cuda_emulated import emulated_global_topk
from test_topk_cuda_emulated import emulated_aggregate


def _emulation(source):
    """A module-scoped fixture: the host emulation of one kernel family, compiled once for this file."""
    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory):
        return build_emulation(tmp_path_factory, source)
    return fixture


emu_fw = _emulation("flow_warp_emu.cpp")
emu_la = _emulation("local_attention_emu.cpp")
emu_tk = _emulation("topk_emu.cpp")
emu_ta = _emulation("topk_attention_emu.cpp")
emu_km = _emulation("kmeans_emu.cpp")


# --- flow_warp ------------------------------------------------------------------------------------------------------

def _check_bilinear_against_reference(emu, x, flow, padding_mode, grad):
    """Bilinear forward and both gradients of the emulated kernels against the reference; returns d(flow)."""
    out, gx, gf = emulated_flow_warp(emu, x, flow, "bilinear", padding_mode, grad)
    xr, fr = x.clone().requires_grad_(), flow.clone().requires_grad_()
    want = vosops.flow_warp(xr, fr, mode="bilinear", padding_mode=padding_mode, backend="reference")
    want_gx, want_gf = torch.autograd.grad(want, (xr, fr), grad)
    torch.testing.assert_close(out, want.detach())
    torch.testing.assert_close(gx, want_gx)
    torch.testing.assert_close(gf, want_gf)
    return gf

def test_flow_warp_border_clamp_at_exactly_zero_has_zero_flow_grad(emu_fw):
    """Border padding: a sampling coordinate exactly 0 (or exactly W-1) is clamped, so its flow gradient is 0
    (grid_sample's clip_coordinates_set_grad: `in <= 0`). Catches clip_coordinate's `p <= 0` -> `p < 0`."""
    g = torch.Generator().manual_seed(1)
    B, C, H, W = 1, 3, 5, 6
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    flow = torch.randn(B, 2, H, W, generator=g, dtype=torch.float64) * 0.3
    j = torch.arange(W, dtype=torch.float64)
    i = torch.arange(H, dtype=torch.float64)
    flow[0, 0, 2, :] = -j  # px = 0 exactly along row 2
    flow[0, 1, :, 4] = -i  # py = 0 exactly along column 4
    grad = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    gf = _check_bilinear_against_reference(emu_fw, x, flow, "border", grad)
    assert (gf[0, 0, 2, :] == 0).all() and (gf[0, 1, :, 4] == 0).all()


@pytest.mark.parametrize("C", [8, 16])
def test_flow_warp_channel_count_a_multiple_of_the_group(emu_fw, C):
    """C == kForwardChannels (one full group: d(flow) written directly, no workspace) and C == 2 groups exactly.
    Catches `one_group = C <= kForwardChannels` -> `C < kForwardChannels` (that writes partials to a null workspace)."""
    g = torch.Generator().manual_seed(C)
    B, H, W = 1, 4, 5
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    flow = torch.randn(B, 2, H, W, generator=g, dtype=torch.float64) * 2
    grad = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    _check_bilinear_against_reference(emu_fw, x, flow, "zeros", grad)


# --- local_attention ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(radius=2, scale=40.0), dict(radius=2, topk=6, scale=40.0, normalize="threshold"),
                                dict(radius=1, topk=4, scale=40.0)])
def test_local_attention_large_logits_do_not_overflow(emu_la, kw):
    """Scores far above expf's range (~88): the max-subtracted softmax stays finite and matches the reference.
    Catches dropping the max subtraction (w = expf(s), lse = log(sum)) in the second pass."""
    g = torch.Generator().manual_seed(2)
    B, C, Cv, H, W, N = 1, 8, 3, 5, 6, 2
    q = torch.randn(B, C, H, W, generator=g).double()
    k = torch.randn(B, N, C, H, W, generator=g).double()
    v = torch.randn(B, N, Cv, H, W, generator=g).double()
    grad_out = torch.randn(B, Cv, H, W, generator=g).double()
    K = kw.get("topk")
    grad_logits = torch.randn(B, H, W, K, generator=g).double() if K else None
    out, tl, ti, grads = run_emulated(emu_la, q.float(), k.float(), v.float(), None, kw, grad_out, grad_logits)
    assert torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in grads)
    qr, kr, vr = (t.float().double().requires_grad_() for t in (q, k, v))
    if K:
        ref, (rl, ri) = reference.local_attention(qr, kr, vr, return_topk=True, **kw)
        assert torch.equal(ti, ri)
        loss = (ref * grad_out).sum() + (torch.where(torch.isfinite(rl), rl, 0.0) * grad_logits).sum()
    else:
        ref = reference.local_attention(qr, kr, vr, **kw)
        loss = (ref * grad_out).sum()
    # fp32 scores of magnitude ~100: the exponentials amplify their rounding, hence the looser tolerance
    torch.testing.assert_close(out, ref.float(), atol=1e-3, rtol=1e-3)
    for got, want in zip(grads, torch.autograd.grad(loss, (qr, kr, vr))):
        torch.testing.assert_close(got, want.float(), atol=5e-2, rtol=5e-3)


def test_local_attention_backward_skips_out_of_circle_index_of_an_in_frame_query(emu_la):
    """An out-of-circle window column (0 = (dy, dx) = (-r, -r)) in a passed topk_index, at a query in the middle of
    the frame (where the column the binary search lands on is in frame): skipped, the query's dq is zero. Catches
    saved_column without its membership check (`return t`)."""
    g = torch.Generator().manual_seed(4)
    B, C, Cv, H, W, N, P = 1, 4, 3, 5, 6, 2, 25
    kw = dict(radius=2, topk=6, window="circle")
    assert 0 not in window_columns(2, "circle")
    q, k, v = torch.randn(B, C, H, W, generator=g), torch.randn(B, N, C, H, W, generator=g), \
        torch.randn(B, N, Cv, H, W, generator=g)
    grad_out, grad_logits = torch.randn(B, Cv, H, W, generator=g), torch.randn(B, H, W, 6, generator=g)

    def corrupt(ti):
        ti[0, 2, 3, :] = P + 0  # reference 1, out-of-circle column 0
        return ti

    _, _, _, clean = run_emulated(emu_la, q, k, v, None, kw, grad_out, grad_logits)
    _, _, _, skipped = run_emulated(emu_la, q, k, v, None, kw, grad_out, grad_logits, edit_index=corrupt)
    assert clean[0][0, :, 2, 3].abs().sum() > 0
    assert not skipped[0][0, :, 2, 3].any()


# --- topk_aggregate (topk_emu.cpp) ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kth", [0, 3])
def test_topk_aggregate_large_logits(emu_tk, kth):
    """fp32 logits around 200 (exp overflows without the row-max subtraction). Catches `mx = 0`."""
    g = torch.Generator().manual_seed(5)
    B, M, K, L, Cv = 2, 3, 6, 10, 4
    logits = (200 + torch.randn(B, M, K, generator=g) * 3).float()
    index = torch.randint(0, L, (B, M, K), generator=g)
    values = torch.randn(B, L, Cv, generator=g)
    grad = torch.randn(B, M, Cv, generator=g)
    out, gl, gv = emulated_aggregate(emu_tk, logits, index, values, kth, grad)
    rl, rv = logits.double().requires_grad_(), values.double().requires_grad_()
    ref = reference.topk_aggregate(rl, index, rv, **(dict(normalize="threshold", k=kth) if kth else {}))
    d_l, d_v = torch.autograd.grad((ref * grad.double()).sum(), (rl, rv))
    testing.assert_close(out, ref, torch.float32, "out")
    testing.assert_close(gl, d_l, torch.float32, "grad logits", grad=True)
    testing.assert_close(gv, d_v, torch.float32, "grad values", grad=True)


def test_topk_aggregate_skips_index_equal_to_L(emu_tk):
    """An index == L (outside values; the glue's device assert rejects it, the kernels must skip it, never read
    through it) acts as an empty slot (-1). values is a view of a larger buffer, so reading row L is defined memory
    and gives a visibly different result. Catches `index < L` -> `index <= L`."""
    g = torch.Generator().manual_seed(6)
    B, M, K, L, Cv = 2, 3, 5, 8, 3
    big = torch.randn(B, L + 1, Cv, generator=g, dtype=torch.float64)
    big[:, L] = 100.0
    values = big[:, :L]
    logits = torch.randn(B, M, K, generator=g, dtype=torch.float64)
    index = torch.randint(0, L, (B, M, K), generator=g)
    logits[0, 1, 2] = 5.0  # the row's largest logit: a large weight
    bad, empty = index.clone(), index.clone()
    bad[0, 1, 2], empty[0, 1, 2] = L, -1
    grad = torch.randn(B, M, Cv, generator=g, dtype=torch.float64)
    got = emulated_aggregate(emu_tk, logits, bad, values, 0, grad)
    want = emulated_aggregate(emu_tk, logits, empty, values, 0, grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (big[:, L] == 100.0).all()


# --- global_topk (topk_attention_emu.cpp) ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_global_topk_exact_ties_within_one_warp_chunk(emu_ta, dtype):
    """Integer queries and keys: the list fills early and many later keys of the same 32-key chunk tie its k-th
    logit after an insertion; they must lose (ties to the lower index). Catches lane 0's re-check
    `!(x > vals[k-1])` written as `!(x >= vals[k-1])`."""
    g = torch.Generator().manual_seed(7)
    B, M, L, C, topk = 2, 9, 150, 3, 5
    q = torch.randint(-1, 2, (B, M, C), generator=g).to(dtype)
    k = torch.randint(-1, 2, (B, L, C), generator=g).to(dtype)
    out_l, out_i = emulated_global_topk(emu_ta, q, k, None, topk, 1.0)
    want_l, want_i = vosops.global_topk(q.double(), k.double(), topk=topk, scale=1.0, backend="reference")
    torch.testing.assert_close(out_i, want_i, atol=0, rtol=0)
    torch.testing.assert_close(out_l.double(), want_l, atol=0, rtol=0)


def test_global_topk_fewer_valid_keys_than_topk(emu_ta):
    """A key mask leaving fewer than topk keys: the tail is padded with (-inf, -1). Catches `have = j < count[r]`
    -> `have = true` (which writes uninitialised list slots)."""
    g = torch.Generator().manual_seed(8)
    B, M, L, C, topk = 2, 5, 40, 4, 6
    q, k = torch.randn(B, M, C, generator=g), torch.randn(B, L, C, generator=g)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0, [3, 17, 30]] = True  # 3 < topk valid keys
    mask[1, :] = True
    out_l, out_i = emulated_global_topk(emu_ta, q, k, mask, topk, 0.5)
    want_l, want_i = vosops.global_topk(q.double(), k.double(), topk=topk, scale=0.5, key_mask=mask,
                                        backend="reference")
    torch.testing.assert_close(out_i, want_i, atol=0, rtol=0)
    torch.testing.assert_close(out_l.double(), want_l, atol=1e-5, rtol=1e-5)
    assert (out_i[0, :, 3:] == -1).all() and (out_l[0, :, 3:] == float("-inf")).all()


def test_global_topk_minus_inf_scores_never_enter(emu_ta):
    """Scores of -inf (an infinite query feature) are never kept, even while the list is not full: only the two
    +inf keys are listed, the rest is padding. Catches the ballot filter `v > thr` -> `v >= thr`."""
    B, M, L, C, topk = 1, 2, 40, 3, 4
    g = torch.Generator().manual_seed(9)
    q = torch.randn(B, M, C, generator=g, dtype=torch.float64)
    q[..., 0] = float("-inf")
    k = torch.randn(B, L, C, generator=g, dtype=torch.float64)
    k[..., 0] = 1.0
    k[0, [5, 22], 0] = -1.0  # these two keys score +inf, every other -inf
    out_l, out_i = emulated_global_topk(emu_ta, q, k, None, topk, 1.0)
    want_l, want_i = vosops.global_topk(q, k, topk=topk, scale=1.0, backend="reference")
    torch.testing.assert_close(out_i, want_i, atol=0, rtol=0)
    torch.testing.assert_close(out_l, want_l, atol=0, rtol=0)
    assert out_i[0, 0].tolist() == [5, 22, -1, -1]


# --- kmeans ---------------------------------------------------------------------------------------------------------

def test_kmeans_step_reduces_more_than_eight_chunks(emu_km):
    """N > 8 * 1024 points: the reduction's slices hold several chunks and all 8 slice sums are added. Integer
    points: exact sums. Catches dropping the last slice in reduce_kernel."""
    g = torch.Generator().manual_seed(10)
    B, N, D, K = 1, 8 * 1024 + 100, 2, 3
    x = torch.randint(-3, 4, (B, N, D), generator=g).float()
    centers = torch.randint(-2, 3, (B, K, D), generator=g).float()
    lengths = torch.tensor([N - 50])
    labels, mind, sums, counts = emulated_step(emu_km, x, lengths, centers)
    want = R.kmeans_step(x.double(), lengths, centers.double())
    torch.testing.assert_close(labels, want[0], atol=0, rtol=0)
    torch.testing.assert_close(sums.double(), want[2], atol=0, rtol=0)
    torch.testing.assert_close(counts, want[3], atol=0, rtol=0)


def _update_args(N, seed, K=4, D=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, N, D, generator=g, dtype=torch.float64)
    lengths = torch.tensor([N])
    centers = torch.randn(1, K, D, generator=g, dtype=torch.float64)
    centers[0, K - 1] += 1000.0  # an empty cluster
    labels, mind, sums, counts = R.kmeans_step(x, lengths, centers)
    return [x, lengths, labels, mind, sums, counts, centers, torch.tensor([True]), torch.tensor([2]),
            torch.tensor([False]), torch.full((1,), 1e-3, dtype=torch.float64)]


def test_kmeans_update_farthest_point_tie_within_one_thread(emu_km):
    """N > 256: the update's threads scan strides of 256 points; the two farthest points tie at i and i + 256 (the
    same thread), and the lower index must be relocated (as the CPU twin does). Catches `md[i] > bv` -> `>=`."""
    args = _update_args(600, seed=11)
    mind = args[3]
    mind[0, 10] = mind[0, 10 + 256] = mind.max() + 5.0
    exp = torch.ops.vosops.kmeans_update(*args)
    got = emulated_update(emu_km, args)
    torch.testing.assert_close(got[0], exp[0], atol=0, rtol=0)
    assert torch.equal(got[1], exp[1]) and torch.equal(got[2], exp[2])
    torch.testing.assert_close(got[0][0, -1], args[0][0, 10], atol=0, rtol=0)  # the empty cluster took point 10


def test_kmeans_update_shift_equal_to_tol_converges(emu_km):
    """Convergence is `shift <= tol`: centres already at the means with tol = 0 (shift exactly 0) stop the problem.
    Catches `<=` -> `<`."""
    args = _update_args(50, seed=12)
    args[6] = args[0][:, :3].clone()  # centres on three of the points: no empty cluster, K = 3
    args[2], args[3], args[4], args[5] = R.kmeans_step(args[0], args[1], args[6])
    assert (args[5] > 0).all()
    first, _, _ = emulated_update(emu_km, args)
    args[6] = first  # centres = the means of the same assignment
    args[10] = torch.zeros(1, dtype=torch.float64)
    exp = torch.ops.vosops.kmeans_update(*args)
    got = emulated_update(emu_km, args)
    torch.testing.assert_close(got[0], first, atol=0, rtol=0)
    assert got[1].tolist() == [False] and torch.equal(got[1], exp[1]) and torch.equal(got[2], exp[2])


@pytest.mark.parametrize("C", [64, 43, 72])
def test_local_attention_wide_channels(emu_la, C):
    """C > kTeam * kChunk = 32: each lane owns several 4-channel chunks: C = 64 the register-held query (two
    chunks per lane), 43 the scalar memory path, 72 the float4 memory path (both more than one chunk per lane).
    The existing cases have C <= 8. Catches the query-register loop cut to one chunk and the memory path cut to its
    first chunk."""
    g = torch.Generator().manual_seed(C)
    B, Cv, H, W, N = 1, 3, 4, 5, 2
    kw = dict(radius=1, topk=5, scale=C ** -0.5)
    q = torch.randn(B, C, H, W, generator=g).double()
    k = torch.randn(B, N, C, H, W, generator=g).double()
    v = torch.randn(B, N, Cv, H, W, generator=g).double()
    grad_out = torch.randn(B, Cv, H, W, generator=g).double()
    grad_logits = torch.randn(B, H, W, 5, generator=g).double()
    out, tl, ti, grads = run_emulated(emu_la, q.float(), k.float(), v.float(), None, kw, grad_out, grad_logits)
    qr, kr, vr = (t.float().double().requires_grad_() for t in (q, k, v))
    ref, (rl, ri) = reference.local_attention(qr, kr, vr, return_topk=True, **kw)
    assert torch.equal(ti, ri)
    testing.assert_close(tl, rl, torch.float32, "top-k logits")
    testing.assert_close(out, ref, torch.float32, "out")
    loss = (ref * grad_out).sum() + (rl * grad_logits).sum()
    for name, got, want in zip("qkv", grads, torch.autograd.grad(loss, (qr, kr, vr))):
        testing.assert_close(got, want, torch.float32, f"grad of {name}", grad=True)


def test_kmeans_update_with_fewer_points_than_empty_clusters(emu_km):
    """A direct call of the op with fewer valid points than empty clusters (kmeans() itself needs K <= length):
    the CPU kernel and the CUDA update relocate as many clusters as there are points, farthest first, and leave
    the rest empty with their centres, instead of reading past the points (the CPU kernel read past its list)."""
    x = torch.tensor([[[0.0, 0.0], [3.0, 0.0], [50.0, 50.0], [60.0, 60.0]]], dtype=torch.float64)
    lengths = torch.tensor([2])
    centers = torch.tensor([[[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]]], dtype=torch.float64)
    labels, mind, sums, counts = R.kmeans_step(x, lengths, centers)
    assert counts.tolist() == [[2, 0, 0, 0]]
    args = [x, lengths, labels, mind, sums, counts, centers, torch.tensor([True]), torch.tensor([1]),
            torch.tensor([False]), torch.full((1,), 1e-4, dtype=torch.float64)]
    got = emulated_update(emu_km, args)
    # two points for three empty clusters: cluster 1 takes the farther point (3, 0), cluster 2 the other (0, 0);
    # cluster 0, left with no point, keeps its centre, and so does cluster 3
    want = torch.tensor([[[0.0, 0.0], [3.0, 0.0], [0.0, 0.0], [100.0, 100.0]]], dtype=torch.float64)
    torch.testing.assert_close(got[0], want, atol=0, rtol=0)
    if vosops._backends.why_unusable("cpu", "kmeans_update", "cpu") is None:
        native = torch.ops.vosops.kmeans_update(*args)
        torch.testing.assert_close(native[0], want, atol=0, rtol=0)
        assert torch.equal(native[1], got[1]) and torch.equal(native[2], got[2])
