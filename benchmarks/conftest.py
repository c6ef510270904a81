"""pytest-benchmark suites over the standard configurations in vosops/bench (the same cases `vosops bench` runs).

    python -m pytest benchmarks --benchmark-json=bench.json       # CPU cases, plus CUDA cases on a GPU machine
    python benchmarks/plot.py bench.json speedup.png              # speed-up per backend and configuration

CPU cases are timed by pytest-benchmark itself (threads pinned to the machine's cores). CUDA cases are timed with
CUDA events (warm-up, L2 flushed, median), recorded in extra_info["cuda_ms"], which plot.py prefers.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(os.cpu_count() or 1)
