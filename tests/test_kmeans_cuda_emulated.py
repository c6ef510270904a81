"""The kmeans CUDA kernels' logic, run on the CPU: tests/cuda_emulation/kmeans_emu.cpp compiles
csrc/kmeans/kmeans_cuda.cu as host code with one host thread per CUDA thread (block_emulation.h) and the launcher's
geometry, in float32, float64, float16 and bfloat16. One Lloyd step (assignment, squared distances, per-cluster
sums and counts) is compared with a direct computation. Timing and the glue need a GPU (the cuda-marked tests in test_kmeans.py)."""

import ctypes

import pytest
import torch

from _cuda_emulation import acc_dtype, build_emulation, dtype_code, ptr


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build_emulation(tmp_path_factory, "kmeans_emu.cpp")


def lloyd_step(x, lengths, centers):
    """labels (-1 past each length; ties to the lower centre), squared distance, per-cluster sums and counts."""
    B, N, _ = x.shape
    d = ((x[:, :, None, :] - centers[:, None, :, :]) ** 2).sum(-1)  # (B, N, K)
    mind, labels = d.min(-1)  # torch.min returns the first minimum
    valid = torch.arange(N)[None, :] < lengths.clamp(0, N)[:, None]
    labels = torch.where(valid, labels, -1)
    mind = torch.where(valid, mind, 0.0)
    K = centers.shape[1]
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), K).to(x.dtype) * valid[..., None]
    return labels, mind, torch.einsum("bnk,bnd->bkd", onehot, x), onehot.sum(1).long()


def emulated_step(emu, x, lengths, centers, accumulate=True):
    """The emulated step kernel: labels, mindist and, with `accumulate`, per-cluster sums and counts (else None);
    outputs start as NaN / -7777."""
    B, N, D = x.shape
    K = centers.shape[1]
    labels = torch.full((B, N), -7777, dtype=torch.int64)
    mindist = torch.full((B, N), float("nan"), dtype=acc_dtype(x.dtype))
    sums = torch.full((B, K, D), float("nan"), dtype=acc_dtype(x.dtype)) if accumulate else None
    counts = torch.full((B, K), -7777, dtype=torch.int64) if accumulate else None
    assert emu.emu_kmeans_step(dtype_code(x.dtype), ptr(x), ctypes.c_int64(B), ctypes.c_int64(N), ctypes.c_int64(D),
                               ptr(lengths), ptr(centers), ctypes.c_int64(K), ptr(labels), ptr(mindist), ptr(sums),
                               ptr(counts)) == 0
    return labels, mindist, sums, counts


def emulated_update(emu, args):
    """The emulated update kernel on kmeans_update's arguments: (centres, active, n_iter) after it."""
    x, lengths, labels, mind, sums, counts, centers, active, n_iter, labels_equal, tol = args
    B, N, D = x.shape
    K = centers.shape[1]
    centers_out = torch.full_like(centers, float("nan"))
    active_out = torch.zeros(B, dtype=torch.bool)
    n_iter_out = torch.full((B,), -7777, dtype=torch.int64)
    assert emu.emu_kmeans_update(dtype_code(x.dtype), ptr(x), ctypes.c_int64(B), ctypes.c_int64(N), ctypes.c_int64(D),
                                 ctypes.c_int64(K), ptr(lengths), ptr(labels), ptr(mind), ptr(sums), ptr(counts),
                                 ptr(centers), ptr(active), ptr(n_iter), ptr(labels_equal), ptr(tol),
                                 ptr(centers_out), ptr(active_out), ptr(n_iter_out)) == 0
    return centers_out, active_out, n_iter_out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,N,D,K,accumulate", [
    (2, 1500, 5, 3, True),    # two chunks of 1024 points, a partial tile
    (3, 70, 33, 4, True),     # D over one 32-column stride
    (1, 40, 2, 7, False),     # assignment only
])
def test_step_kernel(emu, dtype, B, N, D, K, accumulate):
    g = torch.Generator().manual_seed(N + D)
    # integer-valued points and centres: exact distances in every dtype, and ties between centres that must go to
    # the lower index
    x = torch.randint(-3, 4, (B, N, D), generator=g).to(dtype)
    centers = torch.randint(-2, 3, (B, K, D), generator=g).to(acc_dtype(dtype))  # centres: accumulation type
    centers[:, 1] = centers[:, 0]  # a duplicated centre: never chosen over centre 0
    lengths = torch.tensor([N, N // 2, 0][:B], dtype=torch.int64)
    labels, mindist, sums, counts = emulated_step(emu, x, lengths, centers, accumulate)
    want_labels, want_mind, want_sums, want_counts = lloyd_step(x.double(), lengths, centers.double())
    torch.testing.assert_close(labels, want_labels, atol=0, rtol=0)
    assert not (labels == 1).any()
    torch.testing.assert_close(mindist.double(), want_mind, atol=0, rtol=0)
    if accumulate:
        torch.testing.assert_close(sums.double(), want_sums, atol=0, rtol=0)
        torch.testing.assert_close(counts, want_counts, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_update_kernel_equals_the_native_cpu_update(emu, dtype):
    """The update kernel (relocation of empty clusters, centre = mean, flags; one CTA per problem) against the CPU
    implementation of the same op, which the reference tests hold: the same picks, the same centres bit for bit
    (the subtractions and divisions happen in the same order), the same flags. Ties among the farthest points go to
    the lower index: problem 0's distances repeat."""
    from test_kmeans import update_case

    args = update_case(dtype if dtype != torch.bfloat16 else torch.float16, seed=3)
    if dtype == torch.bfloat16:
        args[0] = args[0].to(torch.bfloat16)
    args[3][0, 30:] = args[3][0, :30]  # every distance of problem 0 twice: the lower index must win
    exp = torch.ops.vosops.kmeans_update(*args)
    centers_out, active_out, n_iter_out = emulated_update(emu, args)
    torch.testing.assert_close(centers_out, exp[0], atol=0, rtol=0)
    assert torch.equal(active_out, exp[1]) and torch.equal(n_iter_out, exp[2])
