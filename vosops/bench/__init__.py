"""Benchmark framework shared by `vosops bench` and the pytest-benchmark suites in benchmarks/.

Each op contributes a module `vosops/bench/<op>.py` with `cases(device) -> list[Case]`; the standard
configurations live there, next to the baseline each is compared with (the PyTorch glue users write today).
"""

from .registry import OPS, Case, cases_for
from .timing import measure_ms, peak_extra_bytes

__all__ = ["OPS", "Case", "cases_for", "measure_ms", "peak_extra_bytes"]
