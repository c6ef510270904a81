"""Draw speed-up per backend and configuration from a pytest-benchmark JSON file.

    python benchmarks/plot.py bench.json speedup.png
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vosops.bench.runner import _add_speedups, plot_speedups  # noqa: E402


def rows_from_pytest_benchmark(path: str) -> list[dict]:
    with open(path) as f:
        data = json.load(f)
    rows = []
    for b in data["benchmarks"]:
        info = b["extra_info"]
        ms = info.get("cuda_ms") or b["stats"]["median"] * 1e3
        rows.append({**{k: info[k] for k in ("op", "config", "device", "direction", "impl", "baseline", "dtype")},
                     "ms": ms})
    _add_speedups(rows)
    return rows


def main(argv):
    if len(argv) != 3:
        print(__doc__)
        return 2
    rows = rows_from_pytest_benchmark(argv[1])
    data = json.load(open(argv[1]))
    # the device the cases ran on (a GPU's name when they ran there), else pytest-benchmark's CPU brand
    names = sorted({b["extra_info"].get("device_name", "") for b in data["benchmarks"]} - {""})
    machine = ", ".join(names) or data["machine_info"].get("cpu", {}).get("brand_raw", "")
    plot_speedups(rows, argv[2], title=f"vosops speed-up over the PyTorch baseline ({machine})")
    for r in rows:
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        group = "/".join(r[k] for k in ("op", "config", "device", "dtype", "direction", "impl"))
        print(f"{group}: {r['ms']:.3f} ms  {sp}")
    print(f"wrote {argv[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
