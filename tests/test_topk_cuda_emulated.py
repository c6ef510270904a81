"""The merge_topk and topk_aggregate CUDA kernels' logic, run on the CPU: tests/cuda_emulation/topk_emu.cpp compiles
the .cu kernels as host code (g++ and the CUDA toolkit's host headers; one emulated thread walks the grid-stride
loops) in float32 and float64, and they are compared with the reference, forward and backward. Races, atomics'
ordering and the glue need a GPU (the cuda-marked tests in test_topk_native.py)."""

import ctypes

import pytest
import torch

from vosops import reference, testing
from _cuda_emulation import build_emulation, ptr, sizes_strides as _shape

NEG_INF = float("-inf")


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build_emulation(tmp_path_factory, "topk_emu.cpp")


def _i64(n):
    return ctypes.c_int64(n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,M,N,topk", [(2, 5, 7, 4), (1, 3, 20, 20), (1, 6, 1, 1), (2, 4, 13, 5)])
def test_merge_kernel(emu, dtype, B, M, N, topk):
    g = torch.Generator().manual_seed(N)
    logits = (torch.randint(-3, 4, (B, M, N), generator=g).double() * 0.5)
    index = torch.randint(-1, 2 * N, (B, M, N), generator=g)
    drop = torch.rand(B, M, N, generator=g)
    logits[drop < 0.1] = NEG_INF
    logits[(drop >= 0.1) & (drop < 0.15)] = float("nan")
    index[0, 0, 1:] = -1  # fewer valid than topk
    if N > 2:
        index[-1, -1, 1], logits[-1, -1, 1] = index[-1, -1, 0], logits[-1, -1, 0]  # a duplicate: position decides
    lo = logits.to(dtype).contiguous()
    ol = torch.full((B, M, topk), float("nan"), dtype=dtype)
    oi = torch.full((B, M, topk), -7777, dtype=torch.int64)
    os_ = torch.full((B, M, topk), -7777, dtype=torch.int64)
    assert emu.emu_merge(int(dtype == torch.float64), ptr(lo), ptr(index), _i64(B * M), _i64(N), _i64(topk), ptr(ol),
                         ptr(oi), ptr(os_)) == 0
    ref_in = lo.double().requires_grad_()
    rl, ri = reference.merge_topk([(ref_in, index)], topk)
    torch.testing.assert_close(oi, ri, atol=0, rtol=0)
    torch.testing.assert_close(ol.double(), rl.detach(), atol=0, rtol=0)
    # The source positions route the gradient exactly as the reference's gather does.
    w = torch.randn(B, M, topk, dtype=torch.float64)
    (want,) = torch.autograd.grad((torch.where(ri >= 0, rl, 0.0) * w).sum(), ref_in)
    got = torch.zeros(B, M, N, dtype=torch.float64).scatter_add_(
        2, os_.clamp(min=0), torch.where(os_ >= 0, w, 0.0))
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def emulated_aggregate(emu, logits, index, values, kth, grad):
    """The emulated topk_aggregate forward (kth 0: softmax, else threshold at the kth) and the backward of `grad`:
    (out, d(logits), d(values)); outputs start as NaN (d(values) as zeros: the kernel accumulates into it)."""
    dbl = int(logits.dtype == torch.float64)
    B, M, K = logits.shape
    L, Cv = values.shape[1:]
    ws = torch.full((3 * B * M * K,), float("nan"), dtype=logits.dtype)
    out = torch.full((B, M, Cv), float("nan"), dtype=logits.dtype)
    assert emu.emu_aggregate(dbl, ptr(logits), ptr(index), ptr(values), ptr(_shape(values)), _i64(M), _i64(K),
                             _i64(kth), ptr(ws), ptr(out)) == 0
    gl = torch.full((B, M, K), float("nan"), dtype=logits.dtype)
    gv = torch.zeros(B, L, Cv, dtype=logits.dtype)
    assert emu.emu_aggregate_backward(dbl, ptr(grad), ptr(_shape(grad)), ptr(logits), ptr(index), ptr(values),
                                      ptr(_shape(values)), _i64(M), _i64(K), _i64(kth), ptr(ws), ptr(gl), ptr(gv)) == 0
    return out, gl, gv


AGG_CASES = [  # (B, M, K, L, Cv, kth); kth 0 = softmax
    (2, 5, 6, 11, 3, 0),
    (1, 4, 9, 20, 5, 3),
    (2, 3, 4, 6, 1, 7),   # k > K: all kept
    (1, 7, 12, 30, 4, 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", AGG_CASES)
def test_aggregate_kernels(emu, dtype, case):
    B, M, K, L, Cv, kth = case
    g = torch.Generator().manual_seed(K)
    logits = torch.randint(-2, 3, (B, M, K), generator=g).double() * 1.5  # exact ties
    index = torch.randint(-1, L, (B, M, K), generator=g)
    logits[0, 0, 0] = float("nan")
    index[0, 1] = -1  # a row with nothing valid
    logits[-1, -1, -1] = NEG_INF
    values = testing.relayout(torch.randn(B, L, Cv, generator=g, dtype=torch.float64).to(dtype), "noncontiguous")
    grad = testing.relayout(torch.randn(B, M, Cv, generator=g, dtype=torch.float64).to(dtype), "noncontiguous")
    lo = logits.to(dtype).contiguous()
    out, gl, gv = emulated_aggregate(emu, lo, index, values, kth, grad)
    rl, rv = lo.double().requires_grad_(), values.double().requires_grad_()
    kw = dict(normalize="threshold", k=kth) if kth else {}
    ref = reference.topk_aggregate(rl, index, rv, **kw)
    d_l, d_v = torch.autograd.grad((ref * grad.double()).sum(), (rl, rv))
    testing.assert_close(out, ref, dtype, "out")
    testing.assert_close(gl, d_l, dtype, "grad logits", grad=True)
    testing.assert_close(gv, d_v, dtype, "grad values", grad=True)
