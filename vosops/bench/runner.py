"""Run benchmark cases and report: a printed table, a JSON file and a speed-up plot."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from typing import Iterable

import torch

from .._precision import fp32_dot_precision
from .registry import Case
from .timing import measure_ms, peak_extra_bytes, peak_fp32_gflops, quantile


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, where platform.processor() is empty), else the machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def run_cases(cases: Iterable[Case], *, budget_s: float = 1.0, rounds: int = 1, memory: bool = True, log=print,
              on_row=None) -> list[dict]:
    """Time each case; `on_row(rows)` after each finished comparison group (to save partial results: a run stopped
    by a time limit keeps what it measured).

    A comparison group is the cases of one (op, config, device, dtype, direction): the baseline and the
    implementations compared with it. With `rounds` > 1 a group's cases are timed in turn, `rounds` times over,
    each for `budget_s` a round; a case's `ms` is the median of its round medians and its speed-up the median of its
    per-round ratios to the baseline. A machine whose speed drifts over seconds (a shared 2-core VM: one case's round
    medians 2.3x apart within one run) then moves both sides of each ratio together instead of skewing it.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    rows = []
    for group in _comparison_groups(cases):
        timed = {}  # case name -> (case, the callable timed, one timing summary per round)
        for case in group:
            try:
                timed[case.name] = (case, case.setup(), [])
            except Exception as exc:  # one broken case must not lose the others' numbers; it is reported, not timed
                _log_failure(log, case, exc)
        for _ in range(rounds):
            for name, (case, fn, summaries) in list(timed.items()):
                try:
                    summaries.append(measure_ms(fn, case.device, budget_s=budget_s))
                except Exception as exc:
                    _log_failure(log, case, exc)
                    del timed[name]
        for case, fn, summaries in timed.values():
            rows.append(_row(case, fn, summaries, memory))
            log(f"  {case.name}: {rows[-1]['ms']:.3f} ms")
        del timed
        if on_row is not None:
            _add_speedups(rows)
            on_row(rows)
    _add_speedups(rows)
    return rows


def _comparison_groups(cases: Iterable[Case]) -> list[list[Case]]:
    groups: dict[str, list[Case]] = {}
    for case in cases:
        groups.setdefault(case.group, []).append(case)
    return list(groups.values())


def _log_failure(log, case: Case, exc: Exception) -> None:
    log(f"  {case.name}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def _row(case: Case, fn, summaries: list[dict], memory: bool) -> dict:
    if len(summaries) == 1:
        t = summaries[0]
    else:
        median_of = lambda key: statistics.median(s[key] for s in summaries)  # noqa: E731
        t = {"ms": median_of("ms"), "p20_ms": median_of("p20_ms"), "p80_ms": median_of("p80_ms"),
             "reps": sum(s["reps"] for s in summaries), "round_ms": [s["ms"] for s in summaries]}
    row = {
        "op": case.op, "config": case.config, "device": case.device, "device_name": device_name(case.device),
        "dtype": case.dtype, "direction": case.direction, "impl": case.impl, "baseline": case.baseline,
        **t,
    }
    if case.flops:
        row["gflops"] = case.flops / (t["ms"] * 1e6)
        # the fp32 FMA floor: the case's FLOPs at the device's measured fp32 peak; x_floor = time / floor
        row["peak_fp32_gflops"] = peak_fp32_gflops(case.device)
        row["floor_ms"] = case.flops / (row["peak_fp32_gflops"] * 1e6)
        row["x_floor"] = t["ms"] / row["floor_ms"]
    if case.bytes:
        row["gbps"] = case.bytes / (t["ms"] * 1e6)
    if memory:
        row["peak_extra_mb"] = peak_extra_bytes(fn, case.device) / 2**20
    row.update(case.extra)
    return row


def _add_speedups(rows: list[dict]) -> None:
    """Speed-up over the group's baseline: the median of per-round ratios where both sides have the same rounds."""
    key = lambda r: (r["op"], r["config"], r["device"], r["dtype"], r["direction"])  # noqa: E731
    base = {key(r): r for r in rows if r["baseline"]}
    for r in rows:
        b = base.get(key(r))
        if b is None:
            r["speedup"] = None
        elif "round_ms" in r and len(r["round_ms"]) == len(b.get("round_ms", ())):
            r["round_speedups"] = [x / y for x, y in zip(b["round_ms"], r["round_ms"])]
            r["speedup"] = statistics.median(r["round_speedups"])
        else:
            r["speedup"] = b["ms"] / r["ms"]


def short_dtype(dtype: str) -> str:
    """"float16" -> "fp16", "bfloat16" -> "bf16": the dtype column of tables and plot labels."""
    return {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}.get(dtype, dtype)


def format_table(rows: list[dict]) -> str:
    """One line per row; with rounds, a last column gives the spread of the per-round speed-ups (p20-p80)."""
    name = lambda r: f"{r['op']}/{r['config']}"  # noqa: E731
    w_name = max([len("op/config")] + [len(name(r)) for r in rows]) + 2
    w_impl = max([len("impl")] + [len(r["impl"]) for r in rows]) + 2
    w_dir = max([len("dir")] + [len(r["direction"]) for r in rows]) + 2
    spread = any("round_speedups" in r for r in rows)
    head = (f"{'op/config':<{w_name}}{'dev':<5}{'dtype':<6}{'dir':<{w_dir}}{'impl':<{w_impl}}{'ms':>10}{'GB/s':>9}"
            f"{'GFLOP/s':>9}{'x floor':>9}{'speedup':>9}{'peak MB':>9}" + (f"{'rounds p20-p80':>17}" if spread else ""))
    lines = [head, "-" * len(head)]
    fmt = lambda v, f: (f.format(v) if v is not None else "-")  # noqa: E731
    for r in rows:
        lines.append(
            f"{name(r):<{w_name}}{r['device']:<5}{short_dtype(r['dtype']):<6}{r['direction']:<{w_dir}}"
            f"{r['impl']:<{w_impl}}"
            f"{r['ms']:>10.3f}{fmt(r.get('gbps'), '{:.1f}'):>9}{fmt(r.get('gflops'), '{:.1f}'):>9}"
            f"{fmt(r.get('x_floor'), '{:.1f}'):>9}"
            f"{fmt(r.get('speedup'), '{:.2f}x'):>9}{fmt(r.get('peak_extra_mb'), '{:.1f}'):>9}"
            + (f"{_round_spread(r.get('round_speedups')):>17}" if spread else "")
        )
    return "\n".join(lines)


def _round_spread(ratios: list[float] | None) -> str:
    if not ratios:
        return "-"
    return f"{quantile(ratios, 0.2):.2f}-{quantile(ratios, 0.8):.2f}x"


def environment() -> dict:
    import vosops

    env = {
        "vosops": vosops.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
        "cpu_threads": torch.get_num_threads(), "command": " ".join(sys.argv),
        "platform": platform.platform(),
        # float32 products of the Triton kernels and of the baselines' matmuls: "ieee" (exact) or "tf32"
        "fp32_products": fp32_dot_precision(),
    }
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name()
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def write_json(rows: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": environment(), "results": rows}, f, indent=1)


def plot_speedups(rows: list[dict], path: str, title: str = "vosops speed-up over the PyTorch baseline") -> None:
    """One panel per op; in each, grouped bars per (config, device, dtype, direction), the comparison groups of
    _add_speedups, one bar per non-baseline implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op in dict.fromkeys(r["op"] for r in rows)
           if any(r.get("speedup") and not r["baseline"] for r in rows if r["op"] == op)]
    if not ops:
        ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(len(ops), 1, figsize=(10, 3.2 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        mine = [r for r in rows if r["op"] == op]
        group = lambda r: (r["config"], r["device"], r["dtype"], r["direction"])  # noqa: E731
        groups = list(dict.fromkeys(group(r) for r in mine))
        impls = list(dict.fromkeys(r["impl"] for r in mine if not r["baseline"] and r.get("speedup")))
        width = 0.8 / max(1, len(impls))
        for k, impl in enumerate(impls):
            vals = []
            for g in groups:
                match = [r for r in mine if group(r) == g and r["impl"] == impl]
                vals.append(match[0]["speedup"] if match and match[0].get("speedup") else 0.0)
            bars = ax.bar([i + k * width for i in range(len(groups))], vals, width, label=impl)
            ax.bar_label(bars, fmt="%.2g", fontsize=6)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(groups))])
        crowded = len(groups) > 6  # long configuration names would overlap: slant them
        ax.set_xticklabels([f"{c}\n{d} {short_dtype(t)} {dr}" for c, d, t, dr in groups], fontsize=7,
                           rotation=20 if crowded else 0, ha="right" if crowded else "center")
        ax.set_ylabel("speed-up vs baseline (x)", fontsize=8)
        base = sorted({r["impl"] for r in mine if r["baseline"]})
        ax.set_title(f"{op} (baseline: {', '.join(base) or 'none'})", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.25 / (3.2 * len(ops))))  # room for the title above the first panel
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
