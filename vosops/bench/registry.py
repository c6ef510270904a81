"""The registry of benchmark cases: one module per op under vosops/bench/."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

# Ops with a benchmark module vosops/bench/<name>.py.
OPS = ["flow_warp", "local_attention", "local_affinity", "topk", "kmeans", "propagate"]


@dataclass
class Case:
    """One timed thing: an implementation of an op at one configuration, device and direction.

    `setup()` builds fresh inputs and returns the zero-argument callable that is timed. `baseline` marks the
    implementation speed-ups are measured against within the same (op, config, device, direction) group.
    """

    op: str
    config: str
    device: str
    impl: str
    direction: str
    setup: Callable[[], Callable[[], object]]
    flops: float | None = None
    bytes: float | None = None
    baseline: bool = False
    # Takes many seconds a call on this kind of machine (the users' glue at large windows, say): `vosops bench`
    # and the pytest-benchmark suite skip it unless asked for everything.
    slow: bool = False
    dtype: str = "float32"
    notes: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def group(self) -> str:
        return f"{self.op}/{self.config}/{self.device}/{self.dtype}/{self.direction}"

    @property
    def name(self) -> str:
        return f"{self.group}/{self.impl}"


def cases_for(op: str, device: str) -> list[Case]:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; benchmarked ops: {OPS}")
    module = importlib.import_module(f"vosops.bench.{op}")
    return module.cases(device)
