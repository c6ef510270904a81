"""`vosops info` and `vosops bench` run end to end and write what they promise."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vosops import cli
from vosops.bench import OPS

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "vosops", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def test_no_command_prints_the_commands_and_exits_2(capsys):
    from vosops.cli import main

    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: vosops") and "info" in out and "propagate" in out


def test_info_reports_versions_and_backends():
    res = run_cli("info")
    assert res.returncode == 0, res.stderr
    for needle in ("vosops", "torch", "native extension: loaded", "reference", "cpu", "cuda", "triton"):
        assert needle in res.stdout


def test_bench_config_names_of_the_issues_select_their_variants():
    from vosops.bench import cases_for
    from vosops.commands.bench import select_configs

    topk = cases_for("topk", "cpu")
    assert {c.config for c in select_configs(topk, ["jointformer-davis"])} == {"jointformer-davis-1f-cpu",
                                                                              "jointformer-davis-3f-cpu"}
    local = cases_for("local_attention", "cpu")
    # a size variant only, not another configuration whose name starts the same (mamp-480p-smooth, -train-masked)
    assert {c.config for c in select_configs(local, ["mamp-480p"])} == {"mamp-480p-quarter"}
    assert {c.config for c in select_configs(local, ["mamp-train"])} == {"mamp-train-quarter"}
    assert {c.config for c in select_configs(cases_for("topk", "cpu"), ["maskvos-480p"])} == {"maskvos-480p-cpu"}
    # a configuration of that exact name is taken alone; an unknown name selects nothing
    assert {c.config for c in select_configs(local, ["mamp-train-quarter"])} == {"mamp-train-quarter"}
    assert select_configs(local, ["bogus"]) == []


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
    assert res.returncode == 2 and res.stderr.strip() == (
        f"vosops bench: unknown op(s) ['nope']; choose from {OPS}")


@pytest.mark.parametrize("argv,needle", [
    (["bench", "--op", "flow_warp", "--device", "cpu", "--rounds", "0"], "argument --rounds: expected an int >= 1"),
    (["bench", "--op", "flow_warp", "--device", "cpu", "--threads", "-1"], "argument --threads: expected an int >= 1"),
    (["bench", "--op", "flow_warp", "--device", "cpu", "--threads", "0"], "argument --threads: expected an int >= 1"),
    (["eval", "--pred", ".", "--gt", ".", "--workers", "-1"], "argument --workers: expected an int >= 1"),
])
def test_bad_counts_are_argparse_errors(argv, needle, capsys):
    """A count below 1 is refused by the parser (status 2, usage and one line), not passed on to torch."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_bench_runner_reports_a_failing_case_and_keeps_the_others():
    from vosops.bench.registry import Case
    from vosops.bench.runner import run_cases

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    ok = Case("demo", "tiny", "cpu", "baseline", "fwd", lambda: (lambda: torch.ones(4) * 2), baseline=True)
    bad = Case("demo", "tiny", "cpu", "mine", "fwd", broken)
    lines = []
    rows = run_cases([ok, bad], budget_s=0.01, memory=False, log=lines.append)
    assert [r["impl"] for r in rows] == ["baseline"] and rows[0]["speedup"] == 1.0
    assert any("demo/tiny/cpu/float32/fwd/mine: FAILED RuntimeError: CUDA error" in line for line in lines)


def test_bench_rounds_interleave_a_groups_cases_so_drift_cancels_in_ratios(monkeypatch):
    """With rounds > 1 the baseline and the implementation are timed alternately; a machine whose speed changes
    between rounds (here x1, x3, x1.5) then leaves every per-round ratio, and so the speed-up, at the true 2x."""
    from vosops.bench import runner
    from vosops.bench.registry import Case

    # One value per timing call, in call order: the fwd group's two cases in turn, then the bwd group's one case.
    drift = iter([1.0, 1.0, 3.0, 3.0, 1.5, 1.5] + [1.0, 2.0, 1.0])

    def fake_measure(fn, device, budget_s):
        ms = fn() * next(drift)
        return {"ms": ms, "p20_ms": ms, "p80_ms": ms, "reps": 5}

    monkeypatch.setattr(runner, "measure_ms", fake_measure)
    base = Case("demo", "tiny", "cpu", "baseline", "fwd", lambda: (lambda: 4.0), baseline=True)
    mine = Case("demo", "tiny", "cpu", "mine", "fwd", lambda: (lambda: 2.0))
    other = Case("demo", "tiny", "cpu", "mine", "bwd", lambda: (lambda: 1.0))  # another group: no baseline
    rows = runner.run_cases([base, other, mine], budget_s=0.01, rounds=3, memory=False, log=lambda s: None,
                            on_row=lambda rows: None)
    by = {(r["impl"], r["direction"]): r for r in rows}
    assert by["mine", "fwd"]["round_ms"] == [2.0, 6.0, 3.0] and by["mine", "fwd"]["ms"] == 3.0
    assert by["baseline", "fwd"]["round_ms"] == [4.0, 12.0, 6.0] and by["baseline", "fwd"]["reps"] == 15
    assert by["mine", "fwd"]["speedup"] == 2.0 and by["baseline", "fwd"]["speedup"] == 1.0
    assert by["mine", "fwd"]["round_speedups"] == [2.0, 2.0, 2.0]
    assert by["mine", "bwd"]["round_ms"] == [1.0, 2.0, 1.0] and by["mine", "bwd"]["speedup"] is None


def test_bench_rejects_rounds_below_one():
    from vosops.bench.runner import run_cases

    with pytest.raises(ValueError, match="rounds must be >= 1"):
        run_cases([], rounds=0)


def test_bench_table_shows_the_spread_of_round_ratios_only_with_rounds():
    from vosops.bench.runner import format_table

    row = dict(op="demo", config="tiny", device="cpu", direction="fwd", impl="mine", ms=2.0, speedup=2.0)
    assert "rounds" not in format_table([row])
    table = format_table([dict(row, round_speedups=[3.0, 1.5, 2.0, 2.5, 1.9])])
    assert table.splitlines()[0].endswith("rounds p20-p80") and table.splitlines()[-1].endswith("1.90-3.00x")
