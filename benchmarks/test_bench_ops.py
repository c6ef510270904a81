"""One benchmark per registered case: op x configuration x device x direction x implementation."""

import os

import pytest
import torch

from vosops.bench import OPS, cases_for, measure_ms
from vosops.bench.runner import device_name

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [c for op in OPS for d in DEVICES for c in cases_for(op, d)]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bench(benchmark, case):
    if case.slow and os.environ.get("VOSOPS_BENCH_ALL") != "1":
        pytest.skip("slow case (many seconds a call); VOSOPS_BENCH_ALL=1 runs it")
    benchmark.group = case.group
    benchmark.extra_info.update(
        op=case.op, config=case.config, device=case.device, direction=case.direction, impl=case.impl,
        baseline=case.baseline, dtype=case.dtype, flops=case.flops, bytes=case.bytes,
        device_name=device_name(case.device),
    )
    benchmark.extra_info.update(case.extra)  # per-op facts, e.g. k-means iterations run and inertia
    fn = case.setup()
    if case.device == "cuda":
        # Authoritative GPU time from CUDA events; the host-timed rounds below synchronise after every call.
        benchmark.extra_info["cuda_ms"] = measure_ms(fn, "cuda")["ms"]

        def synced():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(synced, rounds=20, warmup_rounds=3)
    else:
        benchmark.pedantic(fn, rounds=max(3, case.extra.get("rounds", 5)), warmup_rounds=1)
