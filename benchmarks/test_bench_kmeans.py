"""pytest-benchmark suite for kmeans: the cases of vosops/bench/kmeans.py (`pytest benchmarks/test_bench_kmeans.py`).

Not part of the default test run (testpaths = tests). Each row records the iterations run and the mean inertia,
so equal work across implementations can be checked in the saved JSON.
"""

import pytest
import torch

from vosops.bench import cases_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = cases_for("kmeans", DEVICE)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kmeans(benchmark, case):
    fn = case.setup()
    benchmark.extra_info.update({k: v for k, v in case.extra.items()})
    benchmark.extra_info["baseline"] = case.baseline
    if DEVICE == "cuda":
        def run():
            fn()
            torch.cuda.synchronize()
    else:
        run = fn
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
