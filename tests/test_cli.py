"""`vosops info` and `vosops bench` run end to end and write what they promise."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "vosops", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def test_info_reports_versions_and_backends():
    res = run_cli("info")
    assert res.returncode == 0, res.stderr
    for needle in ("vosops", "torch", "native extension: loaded", "reference", "cpu", "cuda", "triton"):
        assert needle in res.stdout


def test_bench_writes_table_json_and_png(tmp_path):
    res = run_cli("bench", "--op", "flow_warp", "--device", "cpu", "--config", "warp-cpu", "--budget", "0.05",
                  "--no-memory", "--out", str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "speedup" in res.stdout and "grid_sample" in res.stdout
    data = json.loads((tmp_path / "results.json").read_text())
    impls = {r["impl"] for r in data["results"]}
    assert {"grid_sample", "reference", "cpu"} <= impls
    assert all(r["ms"] > 0 for r in data["results"])
    assert all(r["speedup"] is not None for r in data["results"])
    assert "torch" in data["environment"] and data["results"][0]["device_name"]
    png = (tmp_path / "speedup.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_bench_rejects_unknown_op():
    res = run_cli("bench", "--op", "nope", "--device", "cpu")
    assert res.returncode == 2 and "unknown op" in res.stdout
