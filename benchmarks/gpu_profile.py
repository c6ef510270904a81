"""Where the time of a benchmark case goes: the top kernels (GPU) or ops (CPU) of one call, by the profiler.

    python benchmarks/gpu_profile.py --device cuda --config mamp-480p --config km-large [--impl cuda] [--top 8]

For each selected case (the same cases as `vosops bench`), one warm call, then one profiled call; prints the
profiler's table sorted by device time (self CPU time on CPU). Baseline implementations are left out unless named
with --impl. Meant for a short GPU lease: run it after the timed benchmark, in the same call.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    ap.add_argument("--op", action="append", help="ops (default: all benchmarked ops)")
    ap.add_argument("--config", action="append", required=True, help="configurations to profile (repeatable)")
    ap.add_argument("--impl", action="append", help="implementations (default: every non-baseline one)")
    ap.add_argument("--top", type=int, default=8, help="rows per case")
    args = ap.parse_args(argv)

    from vosops.bench import OPS, cases_for

    cuda = args.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    for op in args.op or OPS:
        for case in cases_for(op, args.device):
            if case.config not in args.config:
                continue
            if (args.impl and case.impl not in args.impl) or (not args.impl and case.baseline):
                continue
            try:
                fn = case.setup()
                fn()  # warm: compilation, caches
                if cuda:
                    torch.cuda.synchronize()
                with profile(activities=activities) as prof:
                    fn()
                    if cuda:
                        torch.cuda.synchronize()
            except Exception as exc:  # one broken case must not hide the others
                print(f"== {case.name}: FAILED {type(exc).__name__}: {exc}")
                continue
            print(f"== {case.name}")
            print(prof.key_averages().table(sort_by=sort_by, row_limit=args.top, max_name_column_width=60))
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
