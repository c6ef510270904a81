"""Top-k softmax aggregation: the reference against the dense definitions and the papers' algorithms (CRW,
Mask-VOS, XMem, JointFormer), then every backend against the reference."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import vosops
from vosops import _backends, reference, testing
from vosops.ops import topk as topk_ops

from conftest import backend_device_params

NEG_INF = float("-inf")
GT_BACKENDS = backend_device_params("global_topk", topk_ops.GLOBAL_TOPK_BACKENDS)
# Interpreted Triton takes seconds per call: the large-shape tests run the compiled backends only.
GT_NATIVE = [p for p in GT_BACKENDS if p.values[0] != "triton"]
GT_TRITON = [p for p in GT_BACKENDS if p.values[0] == "triton"]
AGG_BACKENDS = backend_device_params("topk_aggregate", topk_ops.AGGREGATE_BACKENDS)
ATT_BACKENDS = backend_device_params("topk_attention", topk_ops.ATTENTION_BACKENDS)


def small_ints(*shape, lo=-2, hi=3, dtype=torch.float64, device="cpu"):
    """Integer-valued floats: dot products are exact in every dtype, so ties are exact and must break by index."""
    return torch.randint(lo, hi, shape, device=device).to(dtype)


def dense_topk(q, k, topk, scale=1.0, key_mask=None):
    """The definition: all logits, stable descending sort, pad invalid slots with (-inf, -1)."""
    s = scale * q @ k.transpose(1, 2)
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, :], NEG_INF)
    vals, idx = torch.sort(s, dim=-1, descending=True, stable=True)
    vals, idx = vals[..., :topk], idx[..., :topk]
    return vals, torch.where(vals > NEG_INF, idx, torch.full_like(idx, -1))


def assert_topk_of_random_floats(got, q, k, topk, scale, *, tol=1e-4):
    """`got` = (logits, index) of float32 q, k against the float64 definition. A kernel's rounding may swap two keys
    whose exact logits lie within `tol` of each other (a GPU's fused multiply-adds round differently from the CPU's),
    so only a slot whose exact logit is at least `tol` from its neighbours', the first left out included, must hold
    the definition's key; a slot in a near tie must hold a key whose exact logit is that slot's, and no key twice."""
    exp_vals, exp_idx = dense_topk(q.double(), k.double(), topk + 1, scale)
    exp_vals, exp_idx, next_val = exp_vals[..., :topk], exp_idx[..., :topk], exp_vals[..., topk:]
    logits, index = got[0].double().cpu(), got[1].cpu()
    torch.testing.assert_close(logits, exp_vals.cpu(), atol=tol, rtol=1e-5)
    exp_vals, exp_idx = exp_vals.cpu(), exp_idx.cpu()
    gaps = (exp_vals[..., :-1] - exp_vals[..., 1:]).abs()
    gap_above = torch.cat([torch.full_like(exp_vals[..., :1], float("inf")), gaps], -1)
    gap_below = torch.cat([gaps, (exp_vals[..., -1:] - next_val.cpu()).abs()], -1)
    isolated = torch.minimum(gap_above, gap_below) > tol
    assert torch.equal(index[isolated], exp_idx[isolated]), "a key without a near tie is not the definition's"
    kept_keys = k.double().cpu()[torch.arange(k.shape[0])[:, None, None], index]   # (B, M, topk, D)
    exact_of_got = scale * (q.double().cpu()[..., None, :] * kept_keys).sum(-1)
    torch.testing.assert_close(exact_of_got, exp_vals, atol=tol, rtol=1e-5)
    assert (index.sort(-1).values.diff(dim=-1) != 0).all(), "a key is listed twice"


def pipeline_aggregate(logits_full, values, topk):
    """What XMem / CRW code does: topk on the dense affinity, softmax, scatter into zeros, matmul."""
    vals, idx = torch.topk(logits_full, topk, dim=-1)
    w = torch.softmax(vals, dim=-1)
    dense = torch.zeros_like(logits_full).scatter_(-1, idx, w)
    return dense @ values


# --- the reference against its definitions --------------------------------------------------------------------

@pytest.mark.parametrize("tile", [3, 16, 4096])
def test_reference_global_topk_is_the_dense_stable_sort(tile):
    q, k = small_ints(2, 9, 5), small_ints(2, 37, 5)  # many exact ties
    mask = torch.rand(2, 37) > 0.2
    for key_mask in (None, mask):
        got = reference.global_topk(q, k, topk=7, scale=0.5, key_mask=key_mask, key_tile=tile)
        exp = dense_topk(q, k, 7, 0.5, key_mask)
        torch.testing.assert_close(got[0], exp[0], atol=0, rtol=0)
        torch.testing.assert_close(got[1], exp[1], atol=0, rtol=0)


def test_ties_go_to_the_lower_index():
    q = torch.ones(1, 1, 2, dtype=torch.float64)
    k = torch.tensor([[[0.0, 0], [1, 0], [0, 1], [1, 0], [0, 0]]], dtype=torch.float64)
    logits, index = reference.global_topk(q, k, topk=4, key_tile=2)
    assert index.tolist() == [[[1, 2, 3, 0]]]
    assert logits.tolist() == [[[1.0, 1.0, 1.0, 0.0]]]


def test_fewer_valid_keys_than_topk_pads_and_aggregation_ignores_the_padding():
    q, k = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 6, 4, dtype=torch.float64)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, [1, 4]] = True  # batch 0: two valid keys, batch 1: none
    logits, index = reference.global_topk(q, k, topk=4, key_mask=mask)
    assert (index[0, :, 2:] == -1).all() and (logits[0, :, 2:] == NEG_INF).all()
    assert set(index[0, :, :2].flatten().tolist()) <= {1, 4}
    assert (index[1] == -1).all() and (logits[1] == NEG_INF).all()
    values = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    lg = logits.clone().requires_grad_()
    out = reference.topk_aggregate(lg, index, values)
    w = torch.softmax(logits[0, :, :2], -1)
    torch.testing.assert_close(out[0], (w.unsqueeze(-1) * values[0][index[0, :, :2]]).sum(1))
    assert (out[1] == 0).all()
    out.sum().backward()
    assert torch.isfinite(lg.grad).all() and torch.isfinite(values.grad).all()
    assert (lg.grad[1] == 0).all() and (lg.grad[0, :, 2:] == 0).all()


def test_nan_and_inf_logits_are_never_selected():
    q = torch.ones(1, 1, 1, dtype=torch.float64)
    k = torch.tensor([[[1.0], [float("nan")], [float("-inf")], [2.0]]], dtype=torch.float64)
    logits, index = reference.global_topk(q, k, topk=3)
    assert index.tolist() == [[[3, 0, -1]]]


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + GT_BACKENDS)
def test_half_precision_ranks_on_float32_scores(backend, device):
    """fp16 logits are rounded after ranking: keys whose float32 scores differ but round to one fp16 value come
    in float32 order, the same on every backend (scores here are exact in float32, so no summation order matters)."""
    g = torch.Generator().manual_seed(3)
    M, L = 6, 90
    k = torch.zeros(2, L, 3)
    k[..., 0] = torch.randint(1016, 1024, (2, L), generator=g) + torch.randint(0, 2, (2, L), generator=g) / 2
    k[..., 1] = torch.randint(-4, 5, (2, L), generator=g).float()  # scores past 1024, where fp16's spacing is 1
    q = torch.randint(0, 2, (2, M, 3), generator=g).float()
    q[..., 0] = 1.0
    for dtype in (torch.float16, torch.bfloat16):
        if backend == "triton" and dtype == torch.bfloat16 and device == "cpu":
            continue  # the interpreter's bf16 is broken (testing.backend_dtypes)
        qh, kh = q.to(dtype), k.to(dtype)
        exp = dense_topk(qh.double(), kh.double(), 9, 1.0)  # float64 = float32 here: every score is exact
        assert (exp[0].to(dtype)[..., 1:] == exp[0].to(dtype)[..., :-1]).any()  # rounding makes equal logits
        logits, index = vosops.global_topk(qh.to(device), kh.to(device), topk=9, backend=backend)
        torch.testing.assert_close(index.cpu(), exp[1], atol=0, rtol=0)
        torch.testing.assert_close(logits.cpu(), exp[0].to(dtype), atol=0, rtol=0)


@pytest.mark.parametrize("backend,device", ATT_BACKENDS)
def test_topk_attention_huge_logits_keep_the_maximum(backend, device):
    """Logits of 1e9 and more: the row maximum's weight is exp(0) = 1. The cpu kernel's fused multiply-subtract
    left it at exp(-rounding error of the product), which is 0 or inf at these magnitudes (output 0 or inf)."""
    q = torch.ones(1, 1, 1, 1, device=device)
    k = torch.tensor([0.3, -0.5], device=device).view(1, 1, 2, 1)
    v = torch.tensor([1.0, 2.0], device=device).view(1, 1, 2, 1)
    for topk, dense in ((2, 0), (1, 1), (1, 0)):
        out = vosops.topk_attention(q, k, v, topk=topk, dense_keys=dense, scale=1e12, backend=backend)
        assert out.item() == 1.0, (topk, dense, out.item())
    # two dense keys tied to within 1e-10 (equal in float32) and far above the third: the mean of their values
    k = torch.tensor([0.3, 0.3 - 1e-10, -5.0], device=device).view(1, 1, 3, 1)
    v = torch.tensor([1.0, 2.0, 3.0], device=device).view(1, 1, 3, 1)
    out = vosops.topk_attention(q, k, v, topk=1, dense_keys=2, scale=1e10, backend=backend)
    assert out.item() == 1.5


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + ATT_BACKENDS)
def test_topk_attention_never_selects_a_nan_sparse_key(backend, device):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 3)
    k[0, 0, 5] = float("nan")  # a sparse key (dense_keys=2)
    k[0, 1, 6, 0] = float("inf")  # a score of -inf or NaN, by the sign of q
    q[0, 1, :, 0] = -1.0  # head 1: key 6 scores -inf
    args = dict(dense_keys=2, backend=backend)
    out = vosops.topk_attention(q.to(device), k.to(device), v.to(device), topk=3, **args).cpu()
    assert torch.isfinite(out).all()
    for h, bad in ((0, 5), (1, 6)):
        keep = [j for j in range(8) if j != bad]
        exp = reference.topk_attention(q[:, h:h + 1], k[:, h:h + 1, keep], v[:, h:h + 1, keep], topk=3,
                                       dense_keys=2)
        torch.testing.assert_close(out[:, h:h + 1], exp, atol=1e-5, rtol=1e-5)
    # with topk >= the sparse keys nothing is selected: every key is kept, as SDPA, NaN included
    full = vosops.topk_attention(q.to(device), k.to(device), v.to(device), topk=6, **args).cpu()
    assert torch.isnan(full[0, 0]).all()


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + AGG_BACKENDS)
def test_topk_aggregate_of_no_candidates_or_no_queries(backend, device):
    v = torch.randn(2, 6, 3, device=device, requires_grad=True)
    out = vosops.topk_aggregate(torch.randn(2, 4, 0, device=device), torch.zeros(2, 4, 0, dtype=torch.long,
                                device=device), v, backend=backend)
    assert out.shape == (2, 4, 3) and (out == 0).all()
    out.sum().backward()
    assert v.grad is None or (v.grad == 0).all()
    none = vosops.topk_aggregate(torch.randn(2, 0, 5, device=device), torch.zeros(2, 0, 5, dtype=torch.long,
                                 device=device), v.detach(), backend=backend)
    assert none.shape == (2, 0, 3)


def test_reference_merge_topk_is_the_top_of_the_union():
    a_l, a_i = small_ints(2, 5, 4), torch.randint(20, 30, (2, 5, 4))
    b_l, b_i = small_ints(2, 5, 6), torch.randint(0, 10, (2, 5, 6))
    b_i[0, 0, 0] = -1
    b_l[1, 1, 1] = NEG_INF
    got_l, got_i = reference.merge_topk([(a_l, a_i), (b_l, b_i)], 7)
    all_l, all_i = torch.cat([a_l, b_l], -1), torch.cat([a_i, b_i], -1)
    for bb in range(2):
        for m in range(5):
            cand = sorted((-float(l), int(i)) for l, i in zip(all_l[bb, m], all_i[bb, m])
                          if i >= 0 and l > NEG_INF)[:7]
            cand += [(math.inf, -1)] * (7 - len(cand))
            assert got_i[bb, m].tolist() == [i for _, i in cand]
            assert got_l[bb, m].tolist() == [-l for l, _ in cand]


def test_reference_threshold_keeps_ties():
    logits = torch.tensor([[[3.0, 1.0, 2.0, 2.0, 0.5]]], dtype=torch.float64)
    index = torch.tensor([[[0, 1, 2, 3, 4]]])
    values = torch.eye(5, dtype=torch.float64).unsqueeze(0)
    out = reference.topk_aggregate(logits, index, values, normalize="threshold", k=2)
    e = torch.exp(torch.tensor([3.0, 2.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(out[0, 0], torch.stack([e[0], 0 * e[0], e[1], e[2], 0 * e[0]]) / e.sum())
    # without a tie at the k-th place exactly k survive (a k-th largest taken one place off would keep 1 or 3)
    out = reference.topk_aggregate(logits[..., 1:], index[..., 1:], values, normalize="threshold", k=2)
    torch.testing.assert_close(out[0, 0], torch.tensor([0.0, 0.0, 0.5, 0.5, 0.0], dtype=torch.float64))
    out = reference.topk_aggregate(logits[..., :3], index[..., :3], values, normalize="threshold", k=2)
    e = torch.exp(torch.tensor([3.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(out[0, 0], torch.stack([e[0], 0 * e[0], e[1], 0 * e[0], 0 * e[0]]) / e.sum())


def test_reference_topk_attention_is_sdpa_when_everything_is_kept():
    q, k, v = (torch.randn(2, 3, 5, 8, dtype=torch.float64), torch.randn(2, 3, 11, 8, dtype=torch.float64),
               torch.randn(2, 3, 11, 6, dtype=torch.float64))
    for topk, dense in ((11, 0), (7, 4), (4, 7)):
        out = reference.topk_attention(q, k, v, topk=topk, dense_keys=dense)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


def test_reference_topk_attention_ties_go_to_the_lower_key_index():
    """Four sparse keys tie for two top-k places: the two lower indices are kept (written from the definition: a
    masked SDPA over the dense keys and those two), checked on the reference alone, not only against a kernel."""
    g = torch.Generator().manual_seed(0)
    D, dense = 4, 2
    q = torch.randn(1, 1, 3, D, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 9, D, generator=g, dtype=torch.float64)
    k[..., dense:, :] = k[..., dense:, :] * 0.01  # sparse keys score near 0 ...
    tied = [3, 5, 6, 8]
    k[..., tied, :] = q.new_tensor([1.0, 1.0, 1.0, 1.0]) * 3  # ... except four identical keys, far above them
    q = q.abs() + 0.1  # every query scores the tied keys highest among the sparse ones
    v = torch.randn(1, 1, 9, 5, generator=g, dtype=torch.float64)
    keep = torch.zeros(9, dtype=torch.bool)
    keep[:dense] = True
    keep[tied[:2]] = True
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=keep.expand(3, 9))
    torch.testing.assert_close(reference.topk_attention(q, k, v, topk=2, dense_keys=dense), want)


def test_reference_gradcheck():
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 7, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 7, 3, dtype=torch.float64, requires_grad=True)
    testing.check_gradcheck(lambda a, b, c: reference.topk_attention(a, b, c, topk=2, dense_keys=2), (q, k, v))
    logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    index = torch.randint(-1, 5, (2, 3, 4))
    values = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    testing.check_gradcheck(lambda a, b: reference.topk_aggregate(a, index, b), (logits, values))


# --- paper semantics, against implementations written from each algorithm -------------------------------------

def circle_candidates(H, W, r):
    """(HW, P) key positions within dy^2 + dx^2 < r^2 of each query position (-1 pads), in raster order."""
    ii, jj = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    pos = torch.stack([ii.flatten(), jj.flatten()], -1)
    d2 = ((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1)
    inside = d2 < r * r
    P = int(inside.sum(1).max())
    order = torch.sort((~inside).to(torch.int64), dim=1, stable=True).indices[:, :P]
    return torch.where(torch.gather(inside, 1, order), order, torch.full_like(order, -1)), inside


def l2n(x):
    return F.normalize(x, dim=-1)


def crw_memory(H, W, C, n_prev, dtype=torch.float64):
    HW = H * W
    q = l2n(torch.randn(1, HW, C, dtype=dtype))
    frames = [l2n(torch.randn(1, HW, C, dtype=dtype)) for _ in range(1 + n_prev)]
    return q, frames


def local_candidates(q, prev, cand, scale, offset0):
    """Logits and memory indices of the circle candidates of every previous frame, concatenated."""
    HW = q.shape[1]
    ls, idxs = [], []
    for n, f in enumerate(prev):
        safe = cand.clamp(min=0)
        kf = f[0][safe]  # (HW, P, C)
        logit = scale * (q[0].unsqueeze(1) * kf).sum(-1)
        valid = cand >= 0
        ls.append(torch.where(valid, logit, torch.full_like(logit, NEG_INF)))
        idxs.append(torch.where(valid, cand + offset0 + n * HW, torch.full_like(cand, -1)))
    return torch.cat(ls, -1).unsqueeze(0), torch.cat(idxs, -1).unsqueeze(0)


def restricted_readout(q, frames, inside, scale, topk, value_sets):
    """The papers' pipeline: full affinity to [frame 0 | previous frames], previous frames restricted to the
    circle, top-k of the joint row, softmax, scatter into zeros, matmul with each value set."""
    aff = [scale * q[0] @ frames[0][0].T]
    for f in frames[1:]:
        a = scale * q[0] @ f[0].T
        aff.append(a.masked_fill(~inside, NEG_INF))
    aff = torch.cat(aff, -1)
    vals, idx = torch.topk(aff, topk, dim=-1)
    dense = torch.zeros_like(aff).scatter_(-1, idx, torch.softmax(vals, -1))
    return [dense @ v[0] for v in value_sets]


@pytest.mark.parametrize("backend,device,size", [("reference", "cpu", "small")] + [
    pytest.param(*p.values, size, marks=p.marks) for p in GT_NATIVE for size in ("small", "paper")])
def test_crw_label_propagation(backend, device, size):
    """CRW: frame 0 searched globally + previous frames in a circle r=12, merged, top-10, scale 1/0.05. "paper":
    the issue's memory (20 previous frames, 256-d features) at a quarter of the 480p stride-8 grid (15 x 27)."""
    H, W, C, n_prev = (14, 26, 32, 3) if size == "small" else (15, 27, 256, 20)
    r, scale = 12, 1 / 0.05
    q, frames = crw_memory(H, W, C, n_prev)
    HW = H * W
    cand, inside = circle_candidates(H, W, r)
    labels = torch.rand(1, HW * (1 + n_prev), 5, dtype=torch.float64).softmax(-1)
    dtype = torch.float64 if backend in ("reference", "cpu") else torch.float32
    on = lambda t: t.to(device, dtype) if t.is_floating_point() else t.to(device)  # noqa: E731
    g = vosops.global_topk(on(q), on(frames[0]), topk=10, scale=scale, backend=backend)
    loc = local_candidates(q, frames[1:], cand, scale, HW)
    logits, index = vosops.merge_topk([g, tuple(map(on, loc))], 10)
    out = vosops.topk_aggregate(logits, index, on(labels), backend=backend)
    (expected,) = restricted_readout(q, frames, inside, scale, 10, [labels])
    tol = 1e-7 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(out[0].cpu().double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + GT_NATIVE)
def test_maskvos_readout_same_weights_read_two_value_tensors(backend, device):
    """Mask-VOS: frame 0 + 5 FIFO frames (circle), top-10, scale 1/0.05; one selection reads the mask
    embeddings (512-d, the paper's) and the label maps."""
    H, W, C, n_prev, r, scale = 10, 12, 16, 5, 12, 1 / 0.05
    q, frames = crw_memory(H, W, C, n_prev)
    HW = H * W
    cand, inside = circle_candidates(H, W, r)
    emb = torch.randn(1, HW * (1 + n_prev), 512, dtype=torch.float64)
    labels = torch.rand(1, HW * (1 + n_prev), 3, dtype=torch.float64)
    on = lambda t: t.to(device)  # noqa: E731
    logits, index = vosops.merge_topk(
        [vosops.global_topk(on(q), on(frames[0]), topk=10, scale=scale, backend=backend),
         tuple(map(on, local_candidates(q, frames[1:], cand, scale, HW)))], 10, backend=backend)
    out_e = vosops.topk_aggregate(logits, index, on(emb), backend=backend).cpu()
    out_l = vosops.topk_aggregate(logits, index, on(labels), backend=backend).cpu()
    exp_e, exp_l = restricted_readout(q, frames, inside, scale, 10, [emb, labels])
    torch.testing.assert_close(out_e[0], exp_e)
    torch.testing.assert_close(out_l[0], exp_l)


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + ATT_BACKENDS)
def test_xmem_top30_readout(backend, device):
    """XMem: affinity, top-30, exp-normalised (max-subtracted), scatter, matmul; as topk_attention with no dense
    keys and as global_topk + topk_aggregate."""
    B, M, L, C, Cv = 1, 16, 80, 16, 16
    dtype = torch.float64 if backend in ("reference", "cpu") else torch.float32
    q, k, v = (torch.randn(B, M, C, dtype=dtype, device=device), torch.randn(B, L, C, dtype=dtype, device=device),
               torch.randn(B, L, Cv, dtype=dtype, device=device))
    scale = 1 / math.sqrt(C)
    expected = pipeline_aggregate(scale * q @ k.transpose(1, 2), v, 30)
    out = vosops.topk_attention(q[:, None], k[:, None], v[:, None], topk=30, backend=backend)[:, 0]
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    if backend in ("reference", "cpu"):
        logits, index = vosops.global_topk(q, k, topk=30, scale=scale, backend=backend)
        torch.testing.assert_close(vosops.topk_aggregate(logits, index, v, backend=backend), expected)


ATT_NATIVE = [p for p in ATT_BACKENDS if p.values[0] != "triton"]


@pytest.mark.parametrize("backend,device,size", [("reference", "cpu", "small")] + [
    pytest.param(*p.values, "small", marks=p.marks) for p in ATT_BACKENDS] + [
    pytest.param(*p.values, "paper", marks=p.marks) for p in ATT_NATIVE])
def test_jointformer_dense_prefix_plus_topk_memory(backend, device, size):
    """JointFormer: current tokens attend to themselves (all) and to the top-k memory tokens, one softmax. "paper":
    12 heads of 64, 3 memory frames, top-120, at a quarter of the 30 x 54 token grid (M = 405)."""
    B, Hh, M, T, D, topk = (1, 2, 24, 2, 16, 6) if size == "small" else (1, 12, 405, 3, 64, 120)
    dtype = torch.float64 if backend in ("reference", "cpu") else torch.float32
    # q and k on a 1/8 grid: float32 scores are exact in any summation order (a GPU's differs from the CPU's), so
    # the kept sets are exact too; the expected selection is a stable sort (exact ties to the lower index)
    q = (torch.randn(B, Hh, M, D, dtype=torch.float64) * 8).round() / 8
    k = (torch.randn(B, Hh, M * (1 + T), D, dtype=torch.float64) * 8).round() / 8
    v = torch.randn(B, Hh, M * (1 + T), D, dtype=torch.float64)
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    s_cur, s_mem = s[..., :M], s[..., M:]
    vals, idx = torch.sort(s_mem, dim=-1, descending=True, stable=True)
    s_mem_kept = torch.full_like(s_mem, NEG_INF).scatter_(-1, idx[..., :topk], vals[..., :topk])
    expected = torch.softmax(torch.cat([s_cur, s_mem_kept], -1), -1) @ v
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    out = vosops.topk_attention(q, k, v, topk=topk, dense_keys=M, backend=backend).cpu().double()
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


# --- every backend against the reference -----------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", GT_NATIVE)
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
def test_global_topk_backend_matches_reference(backend, device, layout):
    for dtype in testing.backend_dtypes(backend, device):
        for (B, M, L, C, topk) in [(2, 9, 37, 5, 7), (1, 3, 300, 17, 1), (1, 5, 6, 3, 6)]:
            q, k = small_ints(B, M, C, device=device), small_ints(B, L, C, device=device)
            mask = torch.rand(B, L, device=device) > 0.3
            for key_mask in (None, mask):
                testing.check_against_reference(
                    lambda q, k: vosops.global_topk(q, k, topk=topk, scale=0.5, key_mask=key_mask, backend=backend),
                    lambda q, k: reference.global_topk(q, k, topk=topk, scale=0.5, key_mask=key_mask),
                    {"q": q, "k": k}, dtype=dtype, grad_inputs=("q", "k"), layout=layout,
                )


@pytest.mark.parametrize("backend,device", GT_TRITON)
def test_global_topk_triton_matches_reference(backend, device):
    """Small shapes (the interpreter is slow): ties, a key mask with fewer valid keys than topk, several tiles."""
    B, M, L, C, topk = 2, 9, 45, 5, 7
    q, k = small_ints(B, M, C, device=device), small_ints(B, L, C, device=device)
    mask = torch.rand(B, L, device=device) > 0.3
    mask[1, 4:] = False  # batch 1: 4 valid keys < topk
    for dtype in (torch.float32, torch.float16):
        for key_mask in (None, mask):
            testing.check_against_reference(
                lambda q, k: vosops.global_topk(q, k, topk=topk, scale=0.5, key_mask=key_mask, backend=backend),
                lambda q, k: reference.global_topk(q, k, topk=topk, scale=0.5, key_mask=key_mask),
                {"q": q, "k": k}, dtype=dtype, grad_inputs=("q", "k"),
            )


@pytest.mark.parametrize("backend,device", GT_TRITON)
@pytest.mark.parametrize("split", [1, 3, None])
def test_global_topk_triton_key_splits_and_channel_chunks(backend, device, split, monkeypatch):
    """Small tiles so one call covers what the GPU tiles do at scale: several key tiles per split, several key
    splits (a split whose keys are all masked, ties across split boundaries), channels over several chunks, rows
    past M, and a tile where many keys enter a row at once. Selection must be the exact stable top-k."""
    from vosops.triton import topk as ttk
    monkeypatch.setitem(ttk.GLOBAL_TOPK_CONFIG, "block_m", 16)
    monkeypatch.setitem(ttk.GLOBAL_TOPK_CONFIG, "block_n", 16)
    monkeypatch.setitem(ttk.GLOBAL_TOPK_CONFIG, "block_c", 16)
    monkeypatch.setitem(ttk.GLOBAL_TOPK_CONFIG, "split", split)
    B, M, C = 2, 19, 37
    half = small_ints(B, 56, C, dtype=torch.float32, device=device)
    k = torch.cat([half, half], 1)  # L = 112: 7 key tiles, ties between the halves
    q = small_ints(B, M, C, dtype=torch.float32, device=device)
    key_mask = torch.rand(B, 112, device=device) > 0.3
    key_mask[1, 40:80] = False  # batch 1: the middle split masked out
    plan = ttk.global_topk_plan(B, M, 112, 9, torch.device(device))
    assert plan["split"] == (split or plan["split"]) and plan["chunk"] % 16 == 0
    for topk, mask in ((1, None), (9, key_mask), (20, None), (20, key_mask)):
        got = vosops.global_topk(q, k, topk=topk, scale=0.5, key_mask=mask, backend=backend)
        exp = dense_topk(q.double(), k.double(), topk, 0.5, key_mask=mask)
        torch.testing.assert_close(got[1], exp[1], atol=0, rtol=0)
        torch.testing.assert_close(got[0].double(), exp[0], atol=0, rtol=0)
    qf, kf = torch.randn(1, 21, 40, device=device), torch.randn(1, 150, 40, device=device)
    kf[:, 140:] += 3.0  # the last tile beats every earlier pick: all 12 slots replaced in one tile
    got = vosops.global_topk(qf.abs(), kf, topk=12, scale=2.0, backend=backend)
    exp = dense_topk(qf.abs().double(), kf.double(), 12, 2.0)
    torch.testing.assert_close(got[1], exp[1], atol=0, rtol=0)
    torch.testing.assert_close(got[0].double(), exp[0], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend,device", GT_TRITON)
def test_global_topk_triton_noncontiguous_inputs(backend, device, monkeypatch):
    """q and k as strided views (every other element of a buffer whose gaps hold NaN), channels over two chunks of
    16 and keys over three tiles: the kernel must read through the strides and mask the last chunk's channels."""
    from vosops.triton import topk as ttk
    monkeypatch.setitem(ttk.GLOBAL_TOPK_CONFIG, "block_m", 16)
    monkeypatch.setitem(ttk.GLOBAL_TOPK_CONFIG, "block_n", 16)
    monkeypatch.setitem(ttk.GLOBAL_TOPK_CONFIG, "block_c", 16)
    B, M, L, C, topk = 2, 7, 40, 20, 6
    q, k = small_ints(B, M, C, device=device), small_ints(B, L, C, device=device)
    key_mask = torch.rand(B, L, device=device) > 0.3
    testing.check_against_reference(
        lambda q, k: vosops.global_topk(q, k, topk=topk, scale=0.5, key_mask=key_mask, backend=backend),
        lambda q, k: reference.global_topk(q, k, topk=topk, scale=0.5, key_mask=key_mask),
        {"q": q, "k": k}, dtype=torch.float32, grad_inputs=("q", "k"), layout="noncontiguous",
    )


@pytest.mark.parametrize("backend,device", GT_BACKENDS)
def test_global_topk_never_selects_nan_or_inf_logits(backend, device):
    """NaN and -inf logits are never selected, on every backend: batch 0 has NaN keys among valid ones, batch 1
    only 4 keys whose logit is not -inf (fewer than topk: the rest is padded with -inf / -1)."""
    q, k = small_ints(2, 5, 6), small_ints(2, 30, 6)
    q[..., 0] = 1.0  # a key whose first channel is -inf scores -inf
    k[0, [2, 11, 17, 29], 1] = float("nan")
    k[1, :, 0] = float("-inf")
    k[1, [3, 8, 21, 26], 0] = 2.0
    exp = reference.global_topk(q, k, topk=6, scale=0.5)
    assert (exp[1][1, :, 4:] == -1).all()
    for dtype in (torch.float32, torch.float16):
        logits, index = vosops.global_topk(q.to(device, dtype), k.to(device, dtype), topk=6, scale=0.5,
                                           backend=backend)
        torch.testing.assert_close(index.cpu(), exp[1], atol=0, rtol=0)
        torch.testing.assert_close(logits.cpu().double(), exp[0], atol=0, rtol=0)


def test_cpu_kernels_never_hold_an_m_by_l_score_matrix():
    """Memory O(M·k), no (M x L) tensor, forward or backward: the peak of what the cpu ops allocate through
    ATen (their outputs, gradients and scratch tensors; the profiler's count) stays far below one score matrix,
    which the reference allocates several of."""
    from vosops.bench.timing import peak_extra_bytes

    if _backends.why_unusable("cpu", "topk_attention", "cpu"):
        pytest.skip("native kernels not built")
    g = torch.Generator().manual_seed(0)
    M, L = 256, 16384
    q, k = torch.randn(1, M, 16, generator=g), torch.randn(1, L, 16, generator=g)
    scores = M * L * 4
    assert peak_extra_bytes(lambda: vosops.global_topk(q, k, topk=8, backend="cpu"), "cpu") < scores / 16
    assert peak_extra_bytes(lambda: vosops.global_topk(q, k, topk=8, backend="reference"), "cpu") > scores

    H, M, L = 2, 128, 8192
    qa, ka, va = (torch.randn(1, H, n, 8, generator=g).requires_grad_() for n in (M, L, L))

    def forward_backward(backend):
        out = vosops.topk_attention(qa, ka, va, topk=16, dense_keys=128, backend=backend)
        out.sum().backward()
        return out

    forward_backward("cpu")  # the .grad tensors exist: later calls accumulate into them
    scores = H * M * L * 4
    assert peak_extra_bytes(lambda: forward_backward("cpu"), "cpu") < scores / 2  # dk, dv alone: scores / 8
    assert peak_extra_bytes(lambda: forward_backward("reference"), "cpu") > scores


@pytest.mark.parametrize("backend,device", GT_NATIVE)
def test_global_topk_random_floats_many_tiles(backend, device):
    q, k = torch.randn(2, 70, 24, device=device), torch.randn(2, 5000, 24, device=device)
    assert_topk_of_random_floats(vosops.global_topk(q, k, topk=12, scale=3.0, backend=backend), q, k, 12, 3.0)


@pytest.mark.parametrize("backend,device", GT_NATIVE)
def test_selection_exact_when_the_first_key_tile_misleads(backend, device):
    """Kernels may guess a threshold from the first key tile; a memory whose first tile is unlike the rest (here:
    the best keys are concentrated there, so few keys pass the guess) must still give the exact top-k."""
    # on a 1/64 grid: the logits are exact in float32 whatever the order of the sums, so the kept sets are exact too
    q = ((torch.rand(2, 40, 8) + 0.5) * 64).round().div(64).to(device)
    k = (torch.randn(2, 3000, 8) * 64).round().div(64).to(device)
    k[:, :700] += 2.0
    k[:, 700:] -= 2.0
    exp = dense_topk(q.double(), k.double(), 24, 0.5)
    got = vosops.global_topk(q, k, topk=24, scale=0.5, backend=backend)
    torch.testing.assert_close(got[1], exp[1], atol=0, rtol=0)
    v = torch.randn(2, 1, 3000, 5, device=device)
    for dense in (0, 100):
        out = vosops.topk_attention(q[:, None], k[:, None], v, topk=24, scale=0.5, dense_keys=dense, backend=backend)
        ref = reference.topk_attention(q[:, None].double(), k[:, None].double(), v.double(), topk=24, scale=0.5,
                                       dense_keys=dense)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    k2 = k.flip(1).contiguous()  # the best keys last: the guess admits many, pruning does the work
    exp = dense_topk(q.double(), k2.double(), 24, 0.5)
    torch.testing.assert_close(vosops.global_topk(q, k2, topk=24, scale=0.5, backend=backend)[1], exp[1], atol=0, rtol=0)


@pytest.mark.parametrize("backend,device", GT_NATIVE)
def test_global_topk_ties_and_mask_across_key_tiles(backend, device):
    """Integer logits tie everywhere, also between key tiles (the second half repeats the first); the running top-k
    carried across tiles must keep the lower index, and masked keys must stay out, in every tile."""
    q = small_ints(2, 37, 6, dtype=torch.float32, device=device)
    half = small_ints(2, 1300, 6, dtype=torch.float32, device=device)
    k = torch.cat([half, half], 1)
    key_mask = torch.rand(2, 2600, device=device) > 0.3
    for topk in (1, 7, 40):
        for mask in (None, key_mask):
            got = vosops.global_topk(q, k, topk=topk, scale=0.5, key_mask=mask, backend=backend)
            exp = dense_topk(q.double(), k.double(), topk, 0.5, key_mask=mask)
            torch.testing.assert_close(got[1], exp[1], atol=0, rtol=0)
            torch.testing.assert_close(got[0].double(), exp[0], atol=0, rtol=0)


@pytest.mark.parametrize("backend,device", [p for p in ATT_BACKENDS if p.values[0] == "cpu"])
def test_topk_attention_long_rows_match_reference(backend, device):
    """Float logits over ~2000 sparse keys (the threshold search's usual case) and a row set whose sparse logits are
    all equal (no threshold separates them: the lowest indices must win), forward and backward."""
    q = torch.randn(1, 2, 45, 16, dtype=torch.float64, device=device)
    k = torch.randn(1, 2, 2100, 16, dtype=torch.float64, device=device)
    v = torch.randn(1, 2, 2100, 8, dtype=torch.float64, device=device)
    k[:, 1, 100:] = k[:, 1, 100:101]  # head 1: every sparse key the same
    for dtype in (torch.float32, torch.float64):
        args = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = vosops.topk_attention(*args, topk=50, dense_keys=100, backend=backend)
        grads = torch.autograd.grad(out, args, torch.ones_like(out))
        ref_args = [t.detach().double().requires_grad_() for t in args]
        ref = reference.topk_attention(*ref_args, topk=50, dense_keys=100)
        ref_grads = torch.autograd.grad(ref, ref_args, torch.ones_like(ref))
        tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(out.double(), ref, **tol)
        for g, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g.double(), rg, **tol)


def test_cpu_portable_paths_match_reference():
    """The cpu kernels' non-AVX2 paths (candidate compaction, exp), forced by VOSOPS_TOPK_PORTABLE=1 in a fresh
    process, against the reference: selection with ties across tiles, masks, and attention forward/backward."""
    if "topk_attention" not in vosops._backends._KERNELS["CPU"]:
        pytest.skip("no native cpu kernels in this build")
    code = textwrap.dedent("""
        import torch, vosops
        from vosops.reference import topk as ref
        torch.manual_seed(0)
        q = torch.randint(-2, 3, (2, 30, 6)).float(); k = torch.randint(-2, 3, (2, 1500, 6)).float()
        mask = torch.rand(2, 1500) > 0.3
        got = vosops.global_topk(q, k, topk=9, scale=0.5, key_mask=mask, backend="cpu")
        exp = ref.global_topk(q.double(), k.double(), topk=9, scale=0.5, key_mask=mask)
        assert torch.equal(got[1], exp[1]) and torch.equal(got[0].double(), exp[0]), "global_topk"
        args = [torch.randn(1, 2, n, 16, dtype=torch.float64, requires_grad=True) for n in (21, 700, 700)]
        for dtype in (torch.float32, torch.float64):
            a = [t.detach().to(dtype).requires_grad_() for t in args]
            out = vosops.topk_attention(*a, topk=40, dense_keys=60, backend="cpu")
            ref_out = ref.topk_attention(*args, topk=40, dense_keys=60)
            g = torch.autograd.grad(out, a, torch.ones_like(out))
            rg = torch.autograd.grad(ref_out, args, torch.ones_like(ref_out))
            for x, y in zip((out,) + g, (ref_out,) + rg):
                torch.testing.assert_close(x.double(), y.detach(), atol=1e-4, rtol=1e-4)
        print("ok")
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(vosops.__file__)))  # this checkout's vosops
    env = dict(os.environ, VOSOPS_TOPK_PORTABLE="1",
               PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


@pytest.mark.parametrize("backend,device", AGG_BACKENDS)
@pytest.mark.parametrize("normalize", ["softmax", "threshold"])
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
def test_topk_aggregate_backend_matches_reference(backend, device, normalize, layout):
    kk = 3 if normalize == "threshold" else None
    for dtype in testing.backend_dtypes(backend, device):
        for (B, M, K, L, Cv) in [(2, 7, 5, 11, 3), (1, 4, 1, 3, 9), (1, 3, 12, 40, 1)]:
            logits = small_ints(B, M, K, lo=-3, hi=4, device=device) * 1.5 if normalize == "threshold" \
                else torch.randn(B, M, K, device=device) * 3
            index = torch.randint(-1, L, (B, M, K), device=device)
            index[0, 0] = -1  # an empty row
            logits[0, 1, 0] = NEG_INF
            values = torch.randn(B, L, Cv, device=device)
            testing.check_against_reference(
                lambda logits, values: vosops.topk_aggregate(logits, index, values, normalize=normalize, k=kk,
                                                             backend=backend),
                lambda logits, values: reference.topk_aggregate(logits, index, values, normalize=normalize, k=kk),
                {"logits": logits, "values": values}, dtype=dtype, grad_inputs=("logits", "values"), layout=layout,
            )


def attention_inputs(B, Hh, M, L, D, Dv, device="cpu"):
    # Integer-valued q, k and a power-of-two scale: the logits are exact in every dtype, so the kept set is the
    # same for backend and reference (ties, frequent here, break by index).
    return (small_ints(B, Hh, M, D, device=device), small_ints(B, Hh, L, D, device=device),
            torch.randn(B, Hh, L, Dv, device=device, dtype=torch.float64))


@pytest.mark.parametrize("backend,device", ATT_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
def test_topk_attention_backend_matches_reference(backend, device, layout):
    shapes = [(1, 2, 16, 48, 16, 16, 5, 16), (2, 1, 17, 40, 16, 16, 40, 0), (1, 1, 20, 35, 16, 16, 3, 32),
              (1, 1, 20, 40, 16, 16, 5, 32), (1, 1, 9, 24, 16, 16, 3, 24)]  # the last: every key dense
    if backend != "triton":
        shapes += [(1, 3, 7, 13, 5, 3, 4, 2), (1, 1, 1, 1, 2, 1, 1, 0), (1, 1, 3, 9, 4, 2, 2, 9),
                   # rows long enough for the cpu kernel's counted threshold search, with many tied logits
                   (1, 2, 33, 330, 16, 8, 20, 50)]
    for dtype in testing.backend_dtypes(backend, device):
        for (B, Hh, M, L, D, Dv, topk, dense) in shapes:
            q, k, v = attention_inputs(B, Hh, M, L, D, Dv, device)
            testing.check_against_reference(
                lambda q, k, v: vosops.topk_attention(q, k, v, topk=topk, scale=0.25, dense_keys=dense,
                                                      backend=backend),
                lambda q, k, v: reference.topk_attention(q, k, v, topk=topk, scale=0.25, dense_keys=dense),
                {"q": q, "k": k, "v": v}, dtype=dtype, grad_inputs=("q", "k", "v"), layout=layout,
            )


@pytest.mark.parametrize("backend,device", ATT_BACKENDS)
def test_topk_attention_rows_with_few_or_no_valid_keys(backend, device):
    """Sparse keys whose logits are NaN or -inf are never selected, so a row may keep fewer than topk sparse keys, or
    nothing at all (output 0, zero gradient). Per head: (dense 8) 3 valid sparse keys of 32 / no valid sparse key /
    dense logits all -inf and no valid sparse key; (dense 0) 3 valid keys / none / all valid. Forward and dq, dk, dv
    against the reference run on each head's valid keys only (its dq through a NaN or infinite key is NaN), except
    dq of the head whose dense keys are infinite (0 * inf: NaN in SDPA and the reference too)."""
    q, k, v = attention_inputs(1, 3, 6, 40, 16, 8)
    q[..., 0] = 1.0  # a key whose first channel is -inf scores -inf with every query
    few = [j for j in range(40) if j not in (10, 20, 39)]
    for dense in (8, 0):
        kk = k.clone()
        kk[0, 0, few[dense:] if dense else few, 1] = float("nan")
        kk[0, 1, dense:, 0] = float("-inf")
        if dense:
            kk[0, 2, :dense, 0] = float("-inf")
            kk[0, 2, dense:, 1] = float("nan")
        up = torch.randn(1, 3, 6, 8, dtype=torch.float64)
        exp = [torch.zeros(1, 3, 6, 8, dtype=torch.float64), torch.zeros_like(q), torch.zeros_like(kk),
               torch.zeros_like(v)]
        for h in range(3):
            finite = torch.isfinite(q[0, h] @ kk[0, h].T).all(0)
            keep = finite.nonzero().flatten()
            n_dense = int(finite[:dense].sum())
            if n_dense == 0 and int(finite[dense:].sum()) == 0:
                continue  # nothing to keep: all zeros
            args = [q[:, h:h + 1].clone(), kk[:, h:h + 1, keep].clone(), v[:, h:h + 1, keep].clone()]
            args = [t.requires_grad_() for t in args]
            out = reference.topk_attention(*args, topk=6, scale=0.25, dense_keys=n_dense)
            dq, dk, dv = torch.autograd.grad(out, args, up[:, h:h + 1])
            exp[0][:, h:h + 1] = out.detach()
            exp[1][:, h:h + 1] = dq
            exp[2][:, h:h + 1, keep] = dk
            exp[3][:, h:h + 1, keep] = dv
        assert (exp[0][0, 2 if dense else 1] == 0).all() and all(torch.isfinite(e).all() for e in exp)
        args = [t.to(device, torch.float32).requires_grad_() for t in (q, kk, v)]
        with testing.poisoned_outputs():
            out = vosops.topk_attention(*args, topk=6, scale=0.25, dense_keys=dense, backend=backend)
            grads = torch.autograd.grad(out, args, up.to(device, torch.float32))
        testing.assert_close(out, exp[0], torch.float32, f"output (dense {dense})")
        heads = [0, 1] if dense else [0, 1, 2]
        grads, want = (grads[0][:, heads], *grads[1:]), (exp[1][:, heads], *exp[2:])
        for name, g, e in zip("qkv", grads, want):
            testing.assert_close(g, e, torch.float32, f"grad of {name} (dense {dense})", grad=True)


@pytest.mark.parametrize("backend,device", ATT_BACKENDS)
def test_topk_attention_noncontiguous_upstream_gradient(backend, device):
    """The backward reads grad_out through its strides: a strided view as the upstream gradient gives the
    reference's dq, dk, dv."""
    q, k, v = attention_inputs(1, 2, 9, 30, 16, 8)
    up = testing.relayout(torch.randn(1, 2, 9, 8, dtype=torch.float64), "noncontiguous")
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    exp = reference.topk_attention(*ref_in, topk=5, scale=0.25, dense_keys=8)
    exp_grads = torch.autograd.grad(exp, ref_in, up)
    args = [t.to(device, torch.float32).requires_grad_() for t in (q, k, v)]
    out = vosops.topk_attention(*args, topk=5, scale=0.25, dense_keys=8, backend=backend)
    up_d = testing.relayout(up.to(device, torch.float32), "noncontiguous")
    assert not up_d.is_contiguous()
    grads = torch.autograd.grad(out, args, up_d)
    for name, g, e in zip("qkv", grads, exp_grads):
        testing.assert_close(g, e, torch.float32, f"grad of {name}", grad=True)


@pytest.mark.parametrize("backend,device", [p for p in ATT_BACKENDS if p.values[0] == "triton"])
@pytest.mark.parametrize("sort_min", [0, 8, 1 << 20])
def test_triton_forward_tile_merges(backend, device, sort_min, monkeypatch):
    """The forward merges a sparse tile into the running top-k by one sort (sort_min=0: whenever a key enters), by
    insertion rounds (1 << 20: always), or by whichever the tile's entrant count picks; each must keep exactly the
    reference's set, ties included, over many tiles."""
    from vosops.triton import topk as ttk

    monkeypatch.setitem(ttk.TOPK_ATTENTION_CONFIG, "sort_min", sort_min)
    q, k, v = attention_inputs(1, 2, 20, 200, 16, 8, device)
    testing.check_against_reference(
        lambda q, k, v: vosops.topk_attention(q, k, v, topk=30, scale=0.25, dense_keys=40, backend=backend),
        lambda q, k, v: reference.topk_attention(q, k, v, topk=30, scale=0.25, dense_keys=40),
        {"q": q, "k": k, "v": v}, dtype=torch.float32,
    )


@pytest.mark.parametrize("backend,device", [p for p in ATT_BACKENDS if p.values[0] == "triton"])
def test_triton_backward_loops_over_blocks(backend, device, monkeypatch):
    """The Triton backward's loops, with blocks shrunk so small shapes take several of each: the key-major dense
    kernel sums over several query blocks and is launched for several key blocks (the last partial), and the sparse
    keys' programs walk more kept queries than one row block. No gradient element may be left unwritten."""
    from vosops.triton import topk as ttk

    monkeypatch.setitem(ttk.TOPK_ATTENTION_CONFIG, "kv_block_m", 16)
    monkeypatch.setitem(ttk.TOPK_ATTENTION_CONFIG, "kv_block_n", 16)
    monkeypatch.setitem(ttk.TOPK_ATTENTION_CONFIG, "sparse_block_r", 16)
    q, k, v = attention_inputs(1, 2, 45, 120, 16, 8, device)
    k[:, :, 60:63] = 3  # three sparse keys that every query keeps: 45 rows for one key program
    testing.check_against_reference(
        lambda q, k, v: vosops.topk_attention(q, k, v, topk=30, scale=0.25, dense_keys=40, backend=backend),
        lambda q, k, v: reference.topk_attention(q, k, v, topk=30, scale=0.25, dense_keys=40),
        {"q": q, "k": k, "v": v}, dtype=torch.float32, grad_inputs=("q", "k", "v"),
    )


@pytest.mark.parametrize("backend,device", [p for p in ATT_BACKENDS if p.values[0] == "cpu"])
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
def test_cpu_backward_tiles_and_wide_rows(backend, device, layout):
    """The cpu backward's shape edges: more queries than one backward tile (dK, dV summed over tiles), head widths
    that leave a 64-column block, an 8-column chunk and a scalar tail in the vectorised sparse kernel, keys kept by
    more queries than one of its row blocks, and fewer queries than one block."""
    for (M, L, D, Dv, topk, dense) in [(530, 340, 75, 70, 50, 40), (5, 30, 9, 17, 4, 3)]:
        q, k, v = attention_inputs(1, 2, M, L, D, Dv, device)
        for dtype in (torch.float32, torch.float64):
            testing.check_against_reference(
                lambda q, k, v: vosops.topk_attention(q, k, v, topk=topk, scale=0.25, dense_keys=dense,
                                                      backend=backend),
                lambda q, k, v: reference.topk_attention(q, k, v, topk=topk, scale=0.25, dense_keys=dense),
                {"q": q, "k": k, "v": v}, dtype=dtype, grad_inputs=("q", "k", "v"), layout=layout,
            )


@pytest.mark.parametrize("backend,device", [p for p in ATT_BACKENDS if p.values[0] == "cpu"])
def test_cpu_gradcheck(backend, device):
    q = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 9, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 9, 3, dtype=torch.float64, requires_grad=True)
    testing.check_gradcheck(
        lambda a, b, c: vosops.topk_attention(a, b, c, topk=3, dense_keys=2, backend=backend), (q, k, v))
    logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    index = torch.randint(-1, 5, (2, 3, 4))
    values = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    testing.check_gradcheck(lambda a, b: vosops.topk_aggregate(a, index, b, backend=backend), (logits, values))
    qq = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    kk = torch.randn(2, 8, 4, dtype=torch.float64, requires_grad=True)
    testing.check_gradcheck(lambda a, b: vosops.global_topk(a, b, topk=3, backend=backend)[0], (qq, kk))


# --- registration, compile, errors -------------------------------------------------------------------------------

def test_opcheck_native():
    if "topk_attention" not in vosops._backends._KERNELS["CPU"]:
        pytest.skip("native topk kernels not built")
    q, k, v = (torch.randn(1, 2, 5, 4, requires_grad=True), torch.randn(1, 2, 9, 4, requires_grad=True),
               torch.randn(1, 2, 9, 3, requires_grad=True))
    testing.check_opcheck(torch.ops.vosops.topk_attention.default, (q, k, v, 3, 0.5, 2))
    testing.check_opcheck(torch.ops.vosops.topk_attention.default, (q, k, v, 9, 0.5, 0))
    qq, kk = torch.randn(2, 3, 4, requires_grad=True), torch.randn(2, 8, 4, requires_grad=True)
    testing.check_opcheck(torch.ops.vosops.global_topk.default, (qq, kk, 3, 1.0, None))
    testing.check_opcheck(torch.ops.vosops.global_topk.default, (qq, kk, 3, 1.0, torch.rand(2, 8) > 0.5))
    logits, values = torch.randn(2, 3, 4, requires_grad=True), torch.randn(2, 5, 3, requires_grad=True)
    index = torch.randint(-1, 5, (2, 3, 4))
    testing.check_opcheck(torch.ops.vosops.topk_aggregate.default, (logits, index, values, "softmax", 0))
    testing.check_opcheck(torch.ops.vosops.topk_aggregate.default, (logits, index, values, "threshold", 2))


def test_opcheck_triton():
    pytest.importorskip("triton")
    if "triton" not in topk_ops.ATTENTION_BACKENDS:
        pytest.skip("no triton topk_attention in this build")
    if vosops._backends.why_unusable("triton", "topk_attention", "cpu") is not None:
        pytest.skip("triton backend not usable on CPU here")
    from vosops.triton import topk as ttk

    q, k, v = attention_inputs(1, 1, 16, 40, 16, 16)
    q, k, v = (t.float().requires_grad_() for t in (q, k, v))
    testing.check_opcheck(ttk.topk_attention_triton, (q, k, v, 5, 0.25, 16, "ieee"))
    testing.check_opcheck(ttk.topk_attention_triton, (q, k, v, 5, 0.25, 16, "tf32"))
    qq, kk = torch.randn(1, 4, 5, requires_grad=True), torch.randn(1, 20, 5, requires_grad=True)
    testing.check_opcheck(ttk.global_topk_triton, (qq, kk, 3, 0.5, torch.rand(1, 20) > 0.3))


@pytest.mark.parametrize("backend,device", [p for p in ATT_BACKENDS if p.values[0] == "triton"])
def test_torch_compile_fullgraph_triton(backend, device):
    q, k, v = attention_inputs(1, 1, 16, 40, 16, 16, device)
    q, k, v = (t.float().requires_grad_() for t in (q, k, v))
    testing.check_compile(lambda a, b, c: vosops.topk_attention(a, b, c, topk=5, scale=0.25, dense_keys=16,
                                                                backend=backend), (q, k, v))


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + GT_NATIVE)
def test_torch_compile_fullgraph(backend, device):
    q, k, v = (torch.randn(1, 2, 5, 4, device=device, requires_grad=True),
               torch.randn(1, 2, 9, 4, device=device, requires_grad=True),
               torch.randn(1, 2, 9, 3, device=device, requires_grad=True))
    testing.check_compile(lambda a, b, c: vosops.topk_attention(a, b, c, topk=3, dense_keys=2, backend=backend),
                          (q, k, v))

    def readout(qq, kk, values):
        logits, index = vosops.global_topk(qq, kk, topk=3, backend=backend)
        logits, index = vosops.merge_topk([(logits, index)], 2)
        return vosops.topk_aggregate(logits, index, values, backend=backend)

    testing.check_compile(readout, tuple(torch.randn(*s, device=device, requires_grad=True)
                                         for s in ((2, 3, 4), (2, 8, 4), (2, 8, 3))))


def _bad_cases():
    q3, k3 = torch.randn(1, 4, 3), torch.randn(1, 6, 3)
    q4, k4, v4 = torch.randn(1, 2, 4, 3), torch.randn(1, 2, 6, 3), torch.randn(1, 2, 6, 5)
    lg, ix, vals = torch.randn(1, 4, 2), torch.zeros(1, 4, 2, dtype=torch.int64), torch.randn(1, 6, 5)
    gt, att, agg = vosops.global_topk, vosops.topk_attention, vosops.topk_aggregate
    return [
        (lambda: gt(q3, k3, topk=0), ValueError, "topk must be in"),
        (lambda: gt(q3, k3, topk=7), ValueError, "topk must be in"),
        (lambda: gt(q3, k3, topk=2.0), TypeError, "topk must be an int"),
        (lambda: gt(q3, torch.randn(1, 6, 4), topk=2), ValueError, "q's B and C"),
        (lambda: gt(q3, k3.double(), topk=2), TypeError, "k has dtype"),
        (lambda: gt(q3[0], k3, topk=2), ValueError, "q must have 3 dimensions"),
        (lambda: gt(q3, k3, topk=2, key_mask=torch.ones(1, 6)), TypeError, "key_mask must be a bool"),
        (lambda: gt(q3, k3, topk=2, key_mask=torch.ones(1, 5, dtype=torch.bool)), ValueError, "key_mask must be"),
        (lambda: gt(q3, k3, topk=2, scale=float("nan")), ValueError, "scale must be finite"),
        (lambda: gt(q3, k3, topk=2, scale="0.05"), TypeError, "scale must be a float, got str"),
        (lambda: gt(q3, k3, topk=2, key_mask=torch.ones(1, 6, dtype=torch.bool, device="meta")), ValueError,
         "key_mask is on meta but k is on cpu"),
        (lambda: agg(lg, [[0, 1]], vals), TypeError, "index must be a torch.Tensor, got list"),
        (lambda: agg(lg, ix.to("meta"), vals), ValueError, "index is on meta but logits is on cpu"),
        (lambda: vosops.merge_topk([lg, ix], 2), TypeError, r"candidates\[0\] must be a \(logits, index\) pair"),
        (lambda: vosops.merge_topk([(lg, ix.to("meta"))], 2), ValueError,
         r"candidates\[0\] index is on meta but its logits on cpu"),
        (lambda: att(q4, k4, v4, topk=0), ValueError, "topk must be in"),
        (lambda: att(q4, k4, v4, topk=7), ValueError, "topk must be in"),
        (lambda: att(q4, k4, v4, topk=2, dense_keys=7), ValueError, "dense_keys must be in"),
        (lambda: att(q4, k4, v4[:, :, :5], topk=2), ValueError, "v .* must be"),
        (lambda: att(q4, torch.randn(1, 2, 6, 4), v4, topk=2), ValueError, "k .* must be"),
        (lambda: att(q4, k4, v4.half(), topk=2), TypeError, "v has dtype"),
        (lambda: agg(lg, ix, vals, normalize="max"), ValueError, "normalize must be"),
        (lambda: agg(lg, ix, vals, normalize="threshold"), ValueError, "k is required"),
        (lambda: agg(lg, ix, vals, k=3), ValueError, "k is only used"),
        (lambda: agg(lg, ix.int(), vals), TypeError, "index must be int64"),
        (lambda: agg(lg, ix[:, :3], vals), ValueError, "index must have the shape"),
        (lambda: agg(lg, ix, torch.randn(2, 6, 5)), ValueError, "values"),
        (lambda: vosops.merge_topk([], 2), TypeError, "non-empty list"),
        (lambda: vosops.merge_topk([(lg, ix)], 3), ValueError, "topk must be in"),
        (lambda: vosops.merge_topk([(lg, ix), (lg[:, :2], ix[:, :2])], 2), ValueError, "share"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bad_input_raises_clear_errors(case, backend):
    """On the reference backend too: the Python checks are all that guards the Triton kernels, and on the cpu
    backend the C++ checks would hide a missing one."""
    fn, exc, match = _bad_cases()[case]
    with vosops.use_backend(backend), pytest.raises(exc, match=match):
        fn()


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + AGG_BACKENDS)
@pytest.mark.parametrize("bad", [-2, 6, 100])
def test_topk_aggregate_rejects_out_of_range_index(backend, device, bad):
    ix = torch.zeros(1, 4, 2, dtype=torch.int64, device=device)
    ix[0, 2, 1] = bad
    lg, vals = torch.randn(1, 4, 2, device=device), torch.randn(1, 6, 5, device=device)
    with pytest.raises(ValueError, match=r"index must be in \[-1, L\)"):
        vosops.topk_aggregate(lg, ix, vals, backend=backend)
    if device == "cpu" and backend != "reference":
        return  # the kernels on CPU tensors check the range whatever check_index says
    # unchecked (indices from vosops' own top-k ops), an out-of-range candidate is dropped, never read
    ok = ix.clamp(-1, 5)
    ok[0, 2, 1] = -1
    want = vosops.topk_aggregate(lg, ok, vals, backend=backend)
    torch.testing.assert_close(vosops.topk_aggregate(lg, ix, vals, check_index=False, backend=backend), want)


@pytest.mark.skipif(_backends.why_unusable("triton", "global_topk", "cpu") is not None,
                    reason="triton not usable on CPU here")
def test_triton_grid_row_limit_is_a_clear_error():
    """Batch (x heads) is the launch grid's second axis, capped at 65535 by CUDA: past it, an error saying so."""
    with pytest.raises(ValueError, match="65535 batch entries"):
        vosops.global_topk(torch.randn(65536, 1, 2), torch.randn(65536, 3, 2), topk=1, backend="triton")
    with pytest.raises(ValueError, match="65535 batch x heads"):
        vosops.topk_attention(torch.randn(2, 32768, 1, 4), torch.randn(2, 32768, 2, 4), torch.randn(2, 32768, 2, 4),
                              topk=1, backend="triton")
    with pytest.raises(ValueError, match="65535 problems"):
        vosops.kmeans(torch.randn(65536, 2, 2), 1, iters=1, init="random", backend="triton")


def test_reference_topk_softmax_large_logits_stay_finite():
    """Catches reference/topk.py softmax_weights without the max subtraction."""
    logits = torch.tensor([[[1000.0, 999.0, 998.0]]])
    index = torch.tensor([[[0, 1, 2]]])
    values = torch.tensor([[[1.0], [2.0], [3.0]]])
    out = vosops.topk_aggregate(logits, index, values, backend="reference")
    want = (torch.softmax(logits.double(), -1)[..., None] * values.double()[None]).sum(2)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    q = torch.ones(1, 1, 2, 4) * 20
    k = torch.randn(1, 1, 6, 4, generator=torch.Generator().manual_seed(0)) + 20  # logits ~ 800 * scale 0.5
    v = torch.randn(1, 1, 6, 3)
    att = vosops.topk_attention(q, k, v, topk=2, dense_keys=1, backend="reference")
    want = vosops.topk_attention(q.double(), k.double(), v.double(), topk=2, dense_keys=1, backend="reference")
    assert torch.isfinite(att).all()
    torch.testing.assert_close(att.double(), want, atol=1e-4, rtol=1e-4)
