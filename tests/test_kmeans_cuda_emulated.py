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
    labels = torch.full((B, N), -7777, dtype=torch.int64)
    mindist = torch.full((B, N), float("nan"), dtype=acc_dtype(dtype))
    sums = torch.full((B, K, D), float("nan"), dtype=acc_dtype(dtype)) if accumulate else None
    counts = torch.full((B, K), -7777, dtype=torch.int64) if accumulate else None
    assert emu.emu_kmeans_step(dtype_code(dtype), ptr(x), ctypes.c_int64(B), ctypes.c_int64(N),
                               ctypes.c_int64(D), ptr(lengths), ptr(centers), ctypes.c_int64(K), ptr(labels),
                               ptr(mindist), ptr(sums), ptr(counts)) == 0
    want_labels, want_mind, want_sums, want_counts = lloyd_step(x.double(), lengths, centers.double())
    torch.testing.assert_close(labels, want_labels, atol=0, rtol=0)
    assert not (labels == 1).any()
    torch.testing.assert_close(mindist.double(), want_mind, atol=0, rtol=0)
    if accumulate:
        torch.testing.assert_close(sums.double(), want_sums, atol=0, rtol=0)
        torch.testing.assert_close(counts, want_counts, atol=0, rtol=0)
