"""The full-batch Lloyd loop on a GPU with its iterations replayed from a CUDA graph.

An iteration is a step kernel and a few small ops (with the native CUDA update; some twenty with the reference's
relocation and update): on a GPU each costs a launch from Python, which for most problem sizes is more than its
work. Capturing
`check_every` iterations in one graph and replaying it leaves one launch per chunk of iterations. The iterations
are the reference's (`lloyd_iteration`), with the state in fixed buffers updated in place, so the results equal
the plain loop's (extra iterations after every problem has converged change nothing: finished problems are
skipped); the host looks at the convergence flags once per replay, as the plain loop does every `check_every`.
"""

from __future__ import annotations

import torch

from .._device import on_input_device
from ..reference import kmeans as _ref


@on_input_device  # the capture stream is the current device's: it must be x's
def lloyd_cuda_graph(x: torch.Tensor, lengths: torch.Tensor, centers: torch.Tensor, iters: int, tol: torch.Tensor,
                     *, step, assign, check_every: int, update=_ref.lloyd_update) -> _ref.KMeansResult:
    B, N, _ = x.shape
    dev = x.device
    centers = centers.to(_ref.acc_dtype(x.dtype)).clone()
    active = torch.ones(B, dtype=torch.bool, device=dev)
    n_iter = torch.zeros(B, dtype=torch.int64, device=dev)
    labels_old = torch.full((B, N), -1, dtype=torch.int64, device=dev)

    def iteration():
        c, a, n, labels = _ref.lloyd_iteration(x, lengths, centers, active, n_iter, labels_old, tol, step,
                                                  update)
        centers.copy_(c)
        active.copy_(a)
        n_iter.copy_(n)
        labels_old.copy_(labels)

    # The first iteration runs eagerly on a side stream (warm-up, as graph capture requires: kernels compiled,
    # allocator pools primed); then chunks of `check_every` iterations are captured once and replayed.
    side = torch.cuda.Stream(device=dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        iteration()
    torch.cuda.current_stream(dev).wait_stream(side)
    done = 1
    chunk = min(check_every, iters - done)
    if chunk > 0 and bool(active.any()):
        graph = torch.cuda.CUDAGraph()
        # thread_local: other host threads (a mask writer waiting on an event, a decoder allocating) may go on
        # during the capture; the default "global" mode would make their CUDA calls fail it. The capture stream is
        # ours, on x's device: torch.cuda.graph's default one is created once per process, on whichever device was
        # current then, so a later capture on another device would run on the wrong one.
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            for _ in range(chunk):
                iteration()
        while done + chunk <= iters:
            graph.replay()
            done += chunk
            if not bool(active.any()):
                break
    while done < iters and bool(active.any()):  # the rest, fewer than a chunk
        iteration()
        done += 1
    labels, mind = assign(x, lengths, centers)
    return _ref.KMeansResult(centers, labels, mind.sum(1), n_iter)
