"""Timers. GPU: CUDA events around each repetition, warm-up first, L2 flushed in between, median (the method of
triton.testing.do_bench). CPU: wall clock around synchronous work, warm-up first, median. Peak extra memory:
CUDA allocator statistics on GPU, the profiler's allocation events on CPU."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from typing import Callable

import torch

from .._precision import tf32_matmuls

_L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than any current GPU's L2


def measure_ms(fn: Callable[[], object], device: str, *, min_reps: int = 5, max_reps: int = 200,
               budget_s: float = 1.0, warmup: int = 2) -> dict:
    """Median milliseconds of `fn()` plus spread; repetitions adapt to a time budget."""
    if device == "cuda":
        return _cuda_ms(fn, min_reps=min_reps, max_reps=max_reps, budget_s=budget_s, warmup=warmup)
    t0 = time.perf_counter()
    fn()
    first_s = time.perf_counter() - t0
    if first_s > budget_s / 2:  # a call of seconds: one warm-up is enough, and three timed calls
        warmup, min_reps, max_reps = 0, min(min_reps, 3), min(max_reps, 3)
    for _ in range(warmup - 1):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times)


def _cuda_ms(fn, *, min_reps, max_reps, budget_s, warmup) -> dict:
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    # estimate one call to choose the repetition count
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    fn()
    e1.record()
    torch.cuda.synchronize()
    est_ms = max(e0.elapsed_time(e1), 1e-3)
    reps = int(min(max_reps, max(min_reps, budget_s * 1e3 / est_ms)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return _summary([s.elapsed_time(e) for s, e in zip(starts, ends)])


_PEAK_CACHE: dict = {}


def peak_fp32_gflops(device: str) -> float:
    """Measured fp32 multiply-add throughput of the device, the denominator of every FMA floor: the best of a few
    large fp32 matrix products (TF32 off on GPU, so it is the plain-FMA peak), in GFLOP/s counting a multiply-add
    as 2. Measured once per process and device."""
    if device in _PEAK_CACHE:
        return _PEAK_CACHE[device]
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    if device == "cuda":
        with tf32_matmuls(False):  # the plain-FMA peak, whatever the user allowed
            ms = _cuda_ms(lambda: a @ b, min_reps=5, max_reps=20, budget_s=0.5, warmup=2)["p20_ms"]
    else:
        ms = measure_ms(lambda: a @ b, device, min_reps=5, max_reps=20, budget_s=0.5)["p20_ms"]
    _PEAK_CACHE[device] = 2.0 * n**3 / (ms * 1e6)
    return _PEAK_CACHE[device]


def quantile(values: list[float], f: float) -> float:
    """The f-quantile of `values` as the element at index floor(f * n) of the sorted list (no interpolation)."""
    values = sorted(values)
    return values[min(len(values) - 1, int(f * len(values)))]


def _summary(times: list[float]) -> dict:
    return {"ms": statistics.median(times), "p20_ms": quantile(times, 0.2), "p80_ms": quantile(times, 0.8),
            "reps": len(times)}


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's native layer prints a line at every start and stop, straight to file descriptor 2; the call
    profiled has already run cleanly once (timing), so silencing it here hides nothing."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_extra_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak bytes allocated by one call of `fn` beyond what was allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return int(peak)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    # An op's cpu_memory_usage includes its children's (clone -> empty_like -> empty would count one buffer three
    # times): take each op's own allocations (self_cpu_memory_usage) alone. The profiler nets them per op, so a
    # net allocation is placed at the op's start and a net release at its end: transients inside one op are
    # over- rather than under-counted.
    steps = []
    for e in prof.events():
        own = getattr(e, "self_cpu_memory_usage", 0)
        if own:
            steps.append((e.time_range.start if own > 0 else e.time_range.end, own))
    running = peak = 0
    for _, own in sorted(steps, key=lambda s: (s[0], -s[1])):
        running += own
        peak = max(peak, running)
    return int(peak)
