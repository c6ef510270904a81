"""kmeans' fused passes in Triton: one program per (chunk of points, problem).

A program loads its (BLOCK_N, D) tile of x once, finds each point's nearest centre (squared distance in fp32, ties
to the lower index) and, for kmeans_step, writes its per-cluster partial sums and counts. The partials are reduced
over chunks afterwards in a fixed order (no atomics), so results are deterministic. x: float32, float16 or bfloat16
(bfloat16 on GPU only: the interpreter lacks it); centres and accumulation are fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _alloc
from .._device import on_input_device
from ..ops.kmeans import MAX_CLUSTERS


@triton.jit
def _step_kernel(x_ptr, len_ptr, c_ptr, lab_ptr, md_ptr, psum_ptr, pcnt_ptr, N, D, K, NCHUNK,
                 ACCUM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    chunk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n = chunk.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    length = tl.minimum(tl.load(len_ptr + b), N)
    valid = n < length
    dmask = d < D
    x = tl.load(x_ptr + (b * N + n)[:, None] * D + d[None, :], mask=valid[:, None] & dmask[None, :],
                other=0.0).to(tl.float32)
    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    arg = tl.zeros((BLOCK_N,), tl.int32)
    for k in range(K):
        c = tl.load(c_ptr + (b * K + k) * D + d, mask=dmask, other=0.0)
        diff = tl.where(dmask[None, :], x - c[None, :], 0.0)
        dist = tl.sum(diff * diff, axis=1)
        better = dist < best
        best = tl.where(better, dist, best)
        arg = tl.where(better, k, arg)
    out = b * N + n
    in_range = n < N
    tl.store(lab_ptr + out, tl.where(valid, arg.to(tl.int64), -1), mask=in_range)
    tl.store(md_ptr + out, tl.where(valid, best, 0.0), mask=in_range)
    if ACCUM:
        for k in range(K):
            sel = valid & (arg == k)
            s = tl.sum(tl.where(sel[:, None], x, 0.0), axis=0)
            base = (b * NCHUNK + chunk) * K + k
            tl.store(psum_ptr + base * D + d, s, mask=dmask)
            tl.store(pcnt_ptr + base, tl.sum(sel.to(tl.int64), axis=0))


def _blocks(D: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(max(D, 1))
    block_n = max(16, min(128, 8192 // block_d))
    return block_n, block_d


def _check(x: torch.Tensor, lengths: torch.Tensor, centers: torch.Tensor) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"kmeans: the triton backend takes float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 3 or centers.dim() != 3 or centers.shape[0] != x.shape[0] or centers.shape[2] != x.shape[2]:
        raise ValueError(f"kmeans: x must be (B, N, D) and centers (B, K, D), got {tuple(x.shape)} and "
                         f"{tuple(centers.shape)}")
    if centers.shape[1] > MAX_CLUSTERS:  # cluster indices are int32 in the kernel
        raise ValueError(f"kmeans: centers has K = {centers.shape[1]} centres; at most 2**31 - 1 are supported")
    if x.shape[0] > 65535:  # problems go on the grid's second axis, which CUDA caps at 65535
        raise ValueError(f"kmeans: the triton backend takes at most 65535 problems per call, got {x.shape[0]}")
    if lengths.dtype != torch.int64 or lengths.shape != (x.shape[0],):
        raise ValueError(f"kmeans: lengths must be int64 of shape ({x.shape[0]},), got {lengths.dtype} "
                         f"{tuple(lengths.shape)}")


def _launch(x, lengths, centers, accum: bool):
    _check(x, lengths, centers)
    x = x.contiguous()
    c = centers.to(torch.float32).contiguous()
    lengths = lengths.contiguous()
    B, N, D = x.shape
    K = c.shape[1]
    block_n, block_d = _blocks(D)
    nchunk = triton.cdiv(N, block_n)
    labels = _alloc.empty(B, N, dtype=torch.int64, device=x.device)
    mind = _alloc.empty(B, N, dtype=torch.float32, device=x.device)
    psum = torch.empty(B, nchunk, K, D, dtype=torch.float32, device=x.device) if accum else mind
    pcnt = torch.empty(B, nchunk, K, dtype=torch.int64, device=x.device) if accum else labels
    _step_kernel[(nchunk, B)](x, lengths, c, labels, mind, psum, pcnt, N, D, K, nchunk,
                              ACCUM=accum, BLOCK_N=block_n, BLOCK_D=block_d)
    if not accum:
        return labels, mind
    return labels, mind, psum.sum(1), pcnt.sum(1)


@torch.library.custom_op("vosops::kmeans_step_triton", mutates_args=())
@on_input_device
def kmeans_step_triton(x: torch.Tensor, lengths: torch.Tensor, centers: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch(x, lengths, centers, True)


@kmeans_step_triton.register_fake
def _(x, lengths, centers):
    B, N, D = x.shape
    K = centers.shape[1]
    return (x.new_empty((B, N), dtype=torch.int64), x.new_empty((B, N), dtype=torch.float32),
            x.new_empty((B, K, D), dtype=torch.float32), x.new_empty((B, K), dtype=torch.int64))


@torch.library.custom_op("vosops::kmeans_assign_triton", mutates_args=())
@on_input_device
def kmeans_assign_triton(x: torch.Tensor, lengths: torch.Tensor, centers: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, lengths, centers, False)


@kmeans_assign_triton.register_fake
def _(x, lengths, centers):
    B, N, D = x.shape
    return x.new_empty((B, N), dtype=torch.int64), x.new_empty((B, N), dtype=torch.float32)


def kmeans_step(x, lengths, centers):
    return kmeans_step_triton(x, lengths, centers)


def kmeans_assign(x, lengths, centers):
    return kmeans_assign_triton(x, lengths, centers)
