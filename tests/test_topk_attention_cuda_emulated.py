"""The global_topk and topk_attention CUDA kernels' logic, run on the CPU: tests/cuda_emulation/topk_attention_emu.cpp
compiles csrc/topk/topk_cuda.cu as host code with one host thread per CUDA thread (shared memory, __syncthreads, warp
ballots and shuffles emulated; block_emulation.h), in float32, float64, float16 and bfloat16, with the launchers'
geometry. Compared
with the reference, forward and backward. Timing, occupancy and the glue need a GPU (the cuda-marked tests)."""

import ctypes

import pytest
import torch

import vosops
from vosops.ops.topk import kept_sparse
from _cuda_emulation import acc_dtype, build_emulation, dtype_code, ptr, sizes_strides as _shape


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build_emulation(tmp_path_factory, "topk_attention_emu.cpp")


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Tolerances on outputs stored in the element type (inputs already rounded to it; the reference is float64).
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,M,L,C,topk,masked", [
    (2, 9, 300, 5, 4, True),     # three key tiles of 128, a partial query tile
    (1, 8, 40, 3, 40, False),    # topk = L: every key, in order
    (1, 3, 130, 17, 10, True),
    (1, 5, 140, 70, 6, False),   # channels staged in three chunks of 32, the last partial
])
def test_global_topk_kernel(emu, dtype, B, M, L, C, topk, masked):
    g = torch.Generator().manual_seed(L + topk)
    q = torch.randn(B, M, C, generator=g).to(dtype)
    # integer-valued keys: many exact ties, which must go to the lower key index
    k = torch.randint(-2, 3, (B, L, C), generator=g).to(dtype).transpose(1, 2).contiguous().transpose(1, 2)
    mask = (torch.rand(B, L, generator=g) > 0.2) if masked else None
    # integer-valued keys: every score is exact in fp32 too, so the selection must match exactly in every dtype
    check_global_topk(emu, q, k, mask, topk, 0.5)


def check_global_topk(emu, q, k, mask, topk, scale):
    """The emulated global_topk against the reference in float64: indices exactly, logits within the dtype's
    tolerance."""
    out_l, out_i = emulated_global_topk(emu, q, k, mask, topk, scale)
    want_l, want_i = vosops.global_topk(q.double(), k.double(), topk=topk, scale=scale, key_mask=mask,
                                        backend="reference")
    torch.testing.assert_close(out_i, want_i, atol=0, rtol=0)
    torch.testing.assert_close(out_l.double(), want_l, atol=TOL[q.dtype], rtol=TOL[q.dtype])


def emulated_global_topk(emu, q, k, mask, topk, scale):
    """The emulated global_topk: (logits, index), each (B, M, topk), starting as NaN / -7777."""
    B, M, _ = q.shape
    out_l = torch.full((B, M, topk), float("nan"), dtype=q.dtype)
    out_i = torch.full((B, M, topk), -7777, dtype=torch.int64)
    assert emu.emu_global_topk(dtype_code(q.dtype), ptr(q), ptr(_shape(q)), ptr(k), ptr(_shape(k)), ptr(mask),
                               ctypes.c_int64(topk), ctypes.c_double(scale), ptr(out_l), ptr(out_i)) == 0
    return out_l, out_i


ATTENTION_CASES = [  # (B, H, M, L, D, Dv, topk, dense_keys)
    (1, 2, 9, 300, 8, 5, 7, 9),      # JointFormer shape: dense prefix = the queries, sparse memory swept in tiles
    (2, 1, 5, 40, 4, 3, 6, 0),       # XMem readout: no dense keys
    (1, 1, 4, 20, 6, 2, 16, 4),      # topk = the sparse keys: plain attention over all
    (1, 3, 17, 150, 16, 16, 12, 17),
    (1, 1, 6, 140, 40, 3, 5, 6),     # D over one staged chunk of 32 channels
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(ATTENTION_CASES)))
def test_topk_attention_kernels(emu, dtype, case):
    B, H, M, L, D, Dv, topk, dense_keys = ATTENTION_CASES[case]
    g = torch.Generator().manual_seed(case)
    q = torch.randn(B, H, M, D, generator=g).to(dtype)
    k = torch.randn(B, H, L, D, generator=g).to(dtype)
    v = torch.randn(B, H, L, Dv, generator=g).to(dtype).transpose(2, 3).contiguous().transpose(2, 3)  # strided
    grad = torch.randn(B, H, M, Dv, generator=g).to(dtype)
    check_attention(emu, q, k, v, grad, topk, dense_keys, D ** -0.5)


def check_attention(emu, q, k, v, grad, topk, dense_keys, scale):
    """The emulated topk_attention forward and backward against the reference in float64: output, kept sparse keys
    (fp32/fp64) and dq/dk/dv of (out * grad).sum()."""
    B, H, M, D = q.shape
    L, Dv = v.shape[2:]
    dtype = q.dtype
    kk = kept_sparse(topk, L, dense_keys)
    dense = L if kk == 0 else dense_keys
    out = torch.full((B, H, M, Dv), float("nan"), dtype=dtype)
    lse = torch.full((B, H, M), float("nan"), dtype=acc_dtype(dtype))
    index = torch.full((B, H, M, max(kk, 1)), -7777, dtype=torch.int64)
    assert emu.emu_attention_forward(dtype_code(dtype), ptr(q), ptr(_shape(q)), ptr(k), ptr(_shape(k)), ptr(v),
                                     ptr(_shape(v)), ctypes.c_int64(dense), ctypes.c_int64(kk), ctypes.c_double(scale),
                                     ptr(out), ptr(lse), ptr(index)) == 0
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    want = vosops.topk_attention(qr, kr, vr, topk=topk, scale=scale, dense_keys=dense_keys, backend="reference")
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), want.detach(), atol=tol, rtol=tol)
    # the kept sparse keys are the top-kk logits of the sparse part (checked in fp32/fp64: from fp16/bf16 inputs the
    # fp32 scores may order near-ties differently from the float64 reference)
    if kk and dtype in (torch.float32, torch.float64):
        s = torch.einsum("bhmd,bhld->bhml", q.double(), k.double())[..., dense_keys:] * scale
        ref_idx = s.sort(dim=-1, descending=True, stable=True).indices[..., :kk] + dense_keys  # ties: lower index
        torch.testing.assert_close(index.sort(-1).values, ref_idx.sort(-1).values, atol=0, rtol=0)

    dq = torch.full((B, H, M, D), float("nan"), dtype=acc_dtype(dtype))
    dk = torch.zeros(B, H, L, D, dtype=acc_dtype(dtype))  # the glue zero-fills dk, dv: the kernel accumulates into them
    dv = torch.zeros(B, H, L, Dv, dtype=acc_dtype(dtype))
    assert emu.emu_attention_backward(dtype_code(dtype), ptr(grad), ptr(_shape(grad)), ptr(q), ptr(_shape(q)), ptr(k),
                                      ptr(_shape(k)), ptr(v), ptr(_shape(v)), ptr(out), ptr(lse),
                                      ptr(index if kk else None), ctypes.c_int64(dense), ctypes.c_int64(kk),
                                      ctypes.c_double(scale), ptr(dq), ptr(dk), ptr(dv)) == 0
    want_grads = torch.autograd.grad(want, (qr, kr, vr), grad.double())
    # the gradients accumulate in fp32 from inputs rounded to the element type, and out is rounded (it enters
    # through the softmax backward's row term)
    gtol = 10 * tol if dtype in (torch.float32, torch.float64) else 4 * tol
    for got, ref in zip((dq, dk, dv), want_grads):
        torch.testing.assert_close(got.double(), ref, atol=gtol, rtol=gtol)


def test_topk_attention_backward_treats_impossible_indices_as_empty_slots(emu):
    """The CUDA backward cannot check a directly passed index without a host sync (the CPU op raises): an entry
    outside the sparse keys [dense_keys, L) is skipped like an empty slot (-1), never read through."""
    B, H, M, L, D, Dv, kk, dense = 1, 2, 9, 300, 8, 5, 7, 9
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(B, H, M, D, generator=g, dtype=torch.float64), torch.randn(B, H, L, D, generator=g,
                                                                                  dtype=torch.float64)
    v = torch.randn(B, H, L, Dv, generator=g, dtype=torch.float64)
    out, lse = torch.empty(B, H, M, Dv, dtype=torch.float64), torch.empty(B, H, M, dtype=torch.float64)
    index = torch.empty(B, H, M, kk, dtype=torch.int64)
    args = (ctypes.c_int64(dense), ctypes.c_int64(kk), ctypes.c_double(D ** -0.5))
    assert emu.emu_attention_forward(dtype_code(torch.float64), ptr(q), ptr(_shape(q)), ptr(k), ptr(_shape(k)),
                                     ptr(v), ptr(_shape(v)), *args, ptr(out), ptr(lse), ptr(index)) == 0
    grad = torch.randn(B, H, M, Dv, generator=g, dtype=torch.float64)

    def backward(idx):
        dq = torch.full((B, H, M, D), float("nan"), dtype=torch.float64)
        dk, dv = torch.zeros(B, H, L, D, dtype=torch.float64), torch.zeros(B, H, L, Dv, dtype=torch.float64)
        assert emu.emu_attention_backward(dtype_code(torch.float64), ptr(grad), ptr(_shape(grad)), ptr(q),
                                          ptr(_shape(q)), ptr(k), ptr(_shape(k)), ptr(v), ptr(_shape(v)), ptr(out),
                                          ptr(lse), ptr(idx), *args, ptr(dq), ptr(dk), ptr(dv)) == 0
        return dq, dk, dv

    bad = [(0, 1, 0, L), (0, 0, 3, 10**12), (0, 1, 8, dense - 1), (0, 0, 5, -9)]
    corrupted, emptied = index.clone(), index.clone()
    for b, h, m, value in bad:
        corrupted[b, h, m, 2] = value
        emptied[b, h, m, 2] = -1
    got, want, clean = backward(corrupted), backward(emptied), backward(index)
    for name, x, y, z in zip(("dq", "dk", "dv"), got, want, clean):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-12, msg=name)
        assert not torch.allclose(y, z), name  # the emptied slots did carry gradient


@pytest.mark.parametrize("seed", range(12))
def test_emulated_cuda_random_configs(emu, seed):
    """Random draws through the emulated kernels in float32 (integer features, so exact ties, in half of them):
    global_topk with or without a key mask, over one to three key tiles and channel chunks; topk_attention with any
    dense prefix and topk, forward and backward."""
    import random

    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    ints = rnd.random() < 0.5

    def features(*shape):
        x = torch.randn(*shape, generator=g)
        return x.round() if ints else x

    B, M, L, C = rnd.randint(1, 2), rnd.randint(1, 13), rnd.randint(1, 300), rnd.randint(1, 70)
    mask = torch.rand(B, L, generator=g) > 0.3 if rnd.random() < 0.5 else None
    check_global_topk(emu, features(B, M, C), features(B, L, C), mask, rnd.randint(1, min(L, 40)),
                      rnd.choice([1.0, 0.3]))

    H, D, Dv = rnd.randint(1, 2), rnd.randint(1, 40), rnd.randint(1, 9)
    L = rnd.randint(2, 200)
    dense_keys = rnd.randint(0, L - 1)
    check_attention(emu, features(B, H, M, D), features(B, H, L, D), torch.randn(B, H, L, Dv, generator=g),
                    torch.randn(B, H, M, Dv, generator=g), rnd.randint(1, L - dense_keys), dense_keys,
                    rnd.choice([D ** -0.5, 0.25]))
