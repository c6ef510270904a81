"""`vosops bench`: run the standard configurations, print a table, write JSON and a speed-up PNG."""

from __future__ import annotations

import os

from ._args import positive_int


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark the standard configurations against the PyTorch baselines")
    p.add_argument("--op", action="append", help="op to benchmark (repeatable; default: all)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when a GPU is present, else cpu")
    p.add_argument("--config", action="append", help="only these configurations (repeatable); a name with no "
                   "configuration of its own selects its sizes (e.g. jointformer-davis: -1f and -3f; on the CPU, -quarter "
                   "or -cpu)")
    p.add_argument("--impl", action="append", help="only these implementations (repeatable; baseline always kept)")
    p.add_argument("--out", default="bench-out", help="folder for results.json and speedup.png")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timing per case and round (default 1)")
    p.add_argument("--rounds", type=positive_int, default=1,
                   help="time each comparison group's cases in turn this many times over; speed-ups are the median "
                        "of per-round ratios (default 1; use 3-5 on a machine whose speed drifts)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--all", action="store_true",
                   help="also run the cases marked slow (baselines that take many seconds a call)")
    p.add_argument("--tf32", action="store_true",
                   help="allow TF32 for float32 products, as torch.backends.cuda.matmul.fp32_precision = 'tf32' "
                        "does: in the Triton kernels and in the baselines' matmuls alike (default: exact)")
    p.set_defaults(func=run)


# How the configurations' names extend the issues' names: a memory size, and the CPU's smaller sizes.
VARIANT_SUFFIXES = ("-1f", "-3f", "-quarter", "-cpu", "-1f-cpu", "-3f-cpu")


def select_configs(cases, wanted):
    """The cases of each wanted configuration: the one of that exact name, or else its variants NAME + one of
    VARIANT_SUFFIXES (the issues' names: `jointformer-davis` runs -1f and -3f, `mamp-480p` on the CPU its
    -quarter size), never another configuration that merely starts with NAME (`mamp-480p-smooth`)."""
    chosen = set()
    for name in wanted:
        exact = {c.config for c in cases if c.config == name}
        chosen |= exact or {c.config for c in cases if c.config in {name + s for s in VARIANT_SUFFIXES}}
    return [c for c in cases if c.config in chosen]


def run(args) -> int:
    import torch

    from vosops.bench import OPS, cases_for
    from vosops.bench.runner import format_table, plot_speedups, write_json

    # a bad argument is a ValueError: cli.main prints it as one line (exit 2), or re-raises under VOSOPS_DEBUG
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32:
        from vosops._precision import allow_tf32

        allow_tf32()
    ops = args.op or OPS
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; choose from {OPS}")
    cases = [c for op in ops for c in cases_for(op, device)]
    if args.config:
        cases = select_configs(cases, args.config)
    if args.impl:
        cases = [c for c in cases if c.baseline or c.impl in args.impl]
    slow = [c for c in cases if c.slow and not args.all]
    if slow:
        cases = [c for c in cases if not c.slow or args.all]
        print(f"vosops bench: skipping {len(slow)} slow cases (--all runs them): "
              + ", ".join(sorted({f'{c.config}/{c.impl}' for c in slow})))
    if not cases:
        raise ValueError("nothing to run for this selection")
    from vosops._precision import fp32_dot_precision

    print(f"vosops bench: {len(cases)} cases on {device} ({torch.get_num_threads()} CPU threads, float32 products: "
          f"{'exact' if fp32_dot_precision() == 'ieee' else 'TF32'})")
    from vosops.bench.runner import run_cases

    json_path = os.path.join(args.out, "results.json")
    rows = run_cases(cases, budget_s=args.budget, rounds=args.rounds, memory=not args.no_memory,
                     on_row=lambda rows: write_json(rows, json_path))
    if not rows:
        print("vosops bench: every case failed")
        return 1
    print()
    print(format_table(rows))
    png_path = os.path.join(args.out, "speedup.png")
    write_json(rows, json_path)
    plot_speedups(rows, png_path, title=f"vosops speed-up over the PyTorch baseline ({rows[0]['device_name']})")
    print(f"\nwrote {json_path} and {png_path}")
    return 0
