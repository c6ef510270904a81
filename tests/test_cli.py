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
    for needle in ("vosops", "torch", "native extension: loaded", "reference", "cpu", "cuda", "triton",
                   "float32 products in the Triton kernels: exact"):
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
    assert data["environment"]["fp32_products"] == "ieee" and "float32 products: exact" in res.stdout
    png = (tmp_path / "speedup.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_bench_tf32_switch_is_recorded(tmp_path):
    """--tf32 sets PyTorch's switch (Triton kernels and baselines' matmuls follow it) and the JSON says so."""
    res = run_cli("bench", "--op", "flow_warp", "--device", "cpu", "--config", "warp-cpu", "--impl", "cpu",
                  "--budget", "0.02", "--no-memory", "--tf32", "--out", str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "float32 products: TF32" in res.stdout
    assert json.loads((tmp_path / "results.json").read_text())["environment"]["fp32_products"] == "tf32"


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

    row = dict(op="demo", config="tiny", device="cpu", dtype="float32", direction="fwd", impl="mine", ms=2.0,
               speedup=2.0)
    assert "rounds" not in format_table([row])
    table = format_table([dict(row, round_speedups=[3.0, 1.5, 2.0, 2.5, 1.9])])
    assert table.splitlines()[0].endswith("rounds p20-p80") and table.splitlines()[-1].endswith("1.90-3.00x")


def _fake_timings(monkeypatch, runner):
    """measure_ms returns what the timed callable returns, as its ms; fixed device peak and peak memory."""
    monkeypatch.setattr(runner, "measure_ms", lambda fn, device, budget_s: {"ms": fn(), "p20_ms": fn(),
                                                                           "p80_ms": fn(), "reps": 7})
    monkeypatch.setattr(runner, "peak_fp32_gflops", lambda device: 100.0)
    monkeypatch.setattr(runner, "peak_extra_bytes", lambda fn, device: 3 * 2**20)


def test_bench_rows_derive_speedup_throughput_floor_and_memory_from_the_timings(monkeypatch):
    """One round: speed-up = baseline ms / ms within the same dtype's group; GFLOP/s, GB/s, the fp32 floor in ms
    (FLOPs at the measured peak) and x floor = ms / floor; peak memory in MiB; a case's extra facts kept; the rows so
    far handed to on_row after each group."""
    from vosops.bench import runner
    from vosops.bench.registry import Case

    _fake_timings(monkeypatch, runner)
    common = dict(flops=2e9, bytes=4e8)
    cases = [Case("demo", "tiny", "cpu", "baseline", "fwd", lambda: (lambda: 8.0), baseline=True, **common),
             Case("demo", "tiny", "cpu", "mine", "fwd", lambda: (lambda: 2.0), extra={"iters": 12}, **common),
             Case("demo", "tiny", "cpu", "baseline", "fwd", lambda: (lambda: 1.0), baseline=True, dtype="float16"),
             Case("demo", "tiny", "cpu", "mine", "fwd", lambda: (lambda: 4.0), dtype="float16")]
    saved = []
    rows = runner.run_cases(cases, budget_s=0.01, log=lambda s: None,
                            on_row=lambda rows: saved.append([(r["dtype"], r["impl"]) for r in rows]))
    assert saved == [[("float32", "baseline"), ("float32", "mine")],
                     [("float32", "baseline"), ("float32", "mine"), ("float16", "baseline"), ("float16", "mine")]]
    mine, half = rows[1], rows[3]
    assert mine["ms"] == 2.0 and mine["reps"] == 7 and mine["speedup"] == 4.0 and half["speedup"] == 0.25
    assert mine["gflops"] == pytest.approx(1000.0) and mine["gbps"] == pytest.approx(200.0)
    assert mine["floor_ms"] == pytest.approx(20.0) and mine["x_floor"] == pytest.approx(0.1)
    assert mine["peak_extra_mb"] == 3.0 and mine["iters"] == 12
    assert mine["device_name"] == runner.device_name("cpu") and "gflops" not in half
    rows = runner.run_cases(cases[:1], budget_s=0.01, memory=False, log=lambda s: None)
    assert "peak_extra_mb" not in rows[0]


def test_bench_round_speedups_only_against_a_baseline_with_as_many_rounds():
    from vosops.bench.runner import _add_speedups

    row = dict(op="demo", config="tiny", device="cpu", dtype="float32", direction="fwd")
    base = dict(row, impl="b", baseline=True, ms=6.0, round_ms=[4.0, 8.0, 6.0])
    mine = dict(row, impl="m", baseline=False, ms=2.0, round_ms=[1.0, 2.0])
    _add_speedups([base, mine])
    assert mine["speedup"] == 3.0 and "round_speedups" not in mine


def test_bench_table_columns_hold_their_values():
    from vosops.bench.runner import format_table

    row = dict(op="demo", config="tiny", device="cpu", dtype="float16", direction="fwd", impl="mine", ms=2.0,
               gbps=200.0, gflops=1000.0, x_floor=0.1, speedup=4.0, peak_extra_mb=3.0)
    head, _, line = format_table([row]).splitlines()
    assert head.split()[:5] == ["op/config", "dev", "dtype", "dir", "impl"]
    assert head.split()[5:] == ["ms", "GB/s", "GFLOP/s", "x", "floor", "speedup", "peak", "MB"]
    assert line.split() == ["demo/tiny", "cpu", "fp16", "fwd", "mine", "2.000", "200.0", "1000.0", "0.1", "4.00x",
                            "3.0"]


def test_bench_device_name_of_a_gpu_is_its_model(monkeypatch):
    from vosops.bench.runner import device_name

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert device_name("cuda") == "NVIDIA H200"


def _record_bars(monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.axes

    bars, bar = [], matplotlib.axes.Axes.bar

    def recording(self, x, height, *args, **kwargs):
        bars.append((kwargs.get("label"), [float(h) for h in height]))
        return bar(self, x, height, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", recording)
    return bars


def test_speedup_plot_draws_each_implementations_speedups(tmp_path, monkeypatch):
    from vosops.bench.runner import plot_speedups

    bars = _record_bars(monkeypatch)
    row = dict(op="demo", device="cpu", dtype="float32", direction="fwd")
    rows = [dict(row, config="a", impl="base", baseline=True, ms=8.0, speedup=1.0),
            dict(row, config="a", impl="mine", baseline=False, ms=2.0, speedup=4.0),
            dict(row, config="b", impl="base", baseline=True, ms=1.0, speedup=1.0),
            dict(row, config="b", impl="mine", baseline=False, ms=4.0, speedup=0.25)]
    plot_speedups(rows, str(tmp_path / "s.png"))
    assert bars == [("mine", [4.0, 0.25])]
    assert (tmp_path / "s.png").read_bytes().startswith(b"\x89PNG")


def test_speedup_plot_draws_every_dtype_of_a_configuration(tmp_path, monkeypatch):
    """fp16 and fp32 rows of one configuration are separate comparison groups, each its own bar: the plot used
    to group by (config, device, direction) and drew only the first dtype's speed-up."""
    from vosops.bench.runner import _add_speedups, plot_speedups

    bars = _record_bars(monkeypatch)
    row = dict(op="topk", config="c", device="cuda", direction="fwd")
    rows = [dict(row, dtype=dt, impl=impl, baseline=impl == "pipeline", ms=ms)
            for dt, impl, ms in [("float16", "pipeline", 10.0), ("float16", "triton", 1.0),
                                 ("float32", "pipeline", 10.0), ("float32", "triton", 5.0)]]
    _add_speedups(rows)
    plot_speedups(rows, str(tmp_path / "s.png"))
    assert bars == [("triton", [10.0, 2.0])]


@pytest.fixture
def bench_calls(monkeypatch):
    """`vosops bench` in process with run_cases replaced: records the cases and options it is given and returns no
    rows (every case failed)."""
    from vosops.bench import runner

    calls = []

    def fake_run_cases(cases, **kwargs):
        calls.append(dict(kwargs, cases=list(cases)))
        return []

    monkeypatch.setattr(runner, "run_cases", fake_run_cases)
    threads = torch.get_num_threads()
    yield calls
    torch.set_num_threads(threads)


def test_bench_options_reach_the_runner(bench_calls, tmp_path, capsys):
    rc = cli.main(["bench", "--op", "flow_warp", "--device", "cpu", "--config", "warp-cpu", "--impl", "cpu",
                   "--budget", "0.25", "--rounds", "3", "--no-memory", "--threads", "1", "--out", str(tmp_path)])
    assert rc == 1 and "every case failed" in capsys.readouterr().out
    (call,) = bench_calls
    assert call["budget_s"] == 0.25 and call["rounds"] == 3 and call["memory"] is False
    assert torch.get_num_threads() == 1
    # --impl keeps the baseline each speed-up is measured against
    assert {(c.config, c.device, c.impl) for c in call["cases"]} == {("warp-cpu", "cpu", "grid_sample"),
                                                                      ("warp-cpu", "cpu", "cpu")}


def test_bench_defaults(bench_calls, tmp_path):
    """The documented defaults: 1 s of timing a case, 1 round, peak memory measured, cuda when a GPU is present."""
    args = cli.build_parser().parse_args(["bench"])
    assert (args.budget, args.rounds, args.no_memory, args.all, args.out) == (1.0, 1, False, False, "bench-out")
    assert cli.main(["bench", "--op", "flow_warp", "--config", "warp-cpu", "--out", str(tmp_path)]) == 1
    (call,) = bench_calls
    assert call["budget_s"] == 1.0 and call["rounds"] == 1 and call["memory"] is True
    assert {c.device for c in call["cases"]} == {"cuda" if torch.cuda.is_available() else "cpu"}


def test_bench_skips_slow_cases_unless_all(bench_calls, tmp_path, capsys):
    argv = ["bench", "--op", "kmeans", "--device", "cpu", "--config", "km-cpu", "--out", str(tmp_path)]
    cli.main(argv)
    assert "skipping" in capsys.readouterr().out and not any(c.slow for c in bench_calls[0]["cases"])
    cli.main(argv + ["--all"])
    assert any(c.slow for c in bench_calls[1]["cases"]) and "reference" in {c.impl for c in bench_calls[1]["cases"]}
    assert "skipping" not in capsys.readouterr().out


def test_bench_selection_errors(capsys):
    assert cli.main(["bench", "--op", "flow_warp", "--device", "cpu", "--config", "bogus"]) == 2
    assert capsys.readouterr().err.strip() == "vosops bench: nothing to run for this selection"
    if not torch.cuda.is_available():
        assert cli.main(["bench", "--op", "flow_warp", "--device", "cuda"]) == 2
        assert capsys.readouterr().err.strip() == ("vosops bench: --device cuda asked for, but no CUDA device is "
                                                   "available")


def test_bench_config_name_of_its_own_is_taken_alone_on_the_gpu():
    """On CUDA both mamp-480p and its -quarter size exist: `--config mamp-480p` means the full size only."""
    from vosops.bench import cases_for
    from vosops.commands.bench import select_configs

    local = cases_for("local_attention", "cuda")
    assert {c.config for c in select_configs(local, ["mamp-480p"])} == {"mamp-480p"}
    assert {c.config for c in select_configs(local, ["mamp-480p-quarter"])} == {"mamp-480p-quarter"}


def _load_script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pytest_benchmark_json(path):
    """A pytest-benchmark JSON as benchmarks/test_bench_ops.py writes it: host stats in seconds; CUDA cases also
    with their CUDA-event median in extra_info["cuda_ms"]."""
    def bench(impl, baseline, median_s, mean_s, device="cpu", **extra):
        info = dict(op="demo", config="tiny", device=device, direction="fwd", impl=impl, baseline=baseline,
                    dtype="float32", device_name=f"Fake {device.upper()}", **extra)
        return {"extra_info": info, "stats": {"median": median_s, "mean": mean_s}}

    data = {"machine_info": {"cpu": {"brand_raw": "Fake CPU brand"}}, "benchmarks": [
        bench("base", True, 0.008, 0.020), bench("mine", False, 0.002, 0.003),
        bench("base", True, 0.009, 0.009, device="cuda", cuda_ms=6.0),
        bench("mine", False, 0.009, 0.009, device="cuda", cuda_ms=1.5)]}
    path.write_text(json.dumps(data))
    return path


def test_plot_script_reads_medians_in_ms_preferring_cuda_events(tmp_path):
    plot = _load_script("plot")
    rows = plot.rows_from_pytest_benchmark(str(_pytest_benchmark_json(tmp_path / "bench.json")))
    got = [(r["device"], r["impl"], round(r["ms"], 6), round(r["speedup"], 6)) for r in rows]
    assert got == [("cpu", "base", 8.0, 1.0), ("cpu", "mine", 2.0, 4.0), ("cuda", "base", 6.0, 1.0),
                   ("cuda", "mine", 1.5, 4.0)]


def test_plot_script_titles_the_plot_with_the_device_names(tmp_path, monkeypatch, capsys):
    plot = _load_script("plot")
    titles = []
    monkeypatch.setattr(plot, "plot_speedups", lambda rows, path, title: titles.append(title))
    assert plot.main(["plot.py", str(_pytest_benchmark_json(tmp_path / "bench.json")), str(tmp_path / "s.png")]) == 0
    assert titles == ["vosops speed-up over the PyTorch baseline (Fake CPU, Fake CUDA)"]
    assert "demo/tiny/cpu/float32/fwd/mine: 2.000 ms  4.00x" in capsys.readouterr().out
    assert plot.main(["plot.py", str(tmp_path / "bench.json")]) == 2


def test_bench_configurations_are_the_issues():
    """flow_warp (issue 2), topk (issue 4) and kmeans (issue 5) configurations and their baselines."""
    from vosops.bench import cases_for
    from vosops.bench import flow_warp as fw
    from vosops.bench import kmeans as km
    from vosops.bench import topk as tk

    assert fw.CONFIGS["warp-cpu"]["shape"] == (5, 64, 60, 107) and fw.CONFIGS["warp-cpu"]["mask_channels"] == 0
    assert fw.CONFIGS["warp-480p"]["shape"] == (5, 64, 120, 214) and fw.CONFIGS["warp-480p"]["mask_channels"] == 7
    assert (tk.HEADS, tk.HEAD_DIM) == (12, 64)
    for name, T, topk in [("jointformer-davis-1f", 1, 60), ("jointformer-davis-3f", 3, 120)]:
        assert tk.ATTENTION[name] == dict(M=1620, T=T, topk=topk, devices=("cuda",), dtypes=("float16", "float32"))
        assert tk.ATTENTION[name + "-cpu"] == dict(M=405, T=T, topk=topk, devices=("cpu",), dtypes=("float32",))
    assert tk.GLOBAL["maskvos-480p"] == dict(M=6420, frames=6, C=128, k=10, devices=("cuda",))
    assert tk.GLOBAL["ino-global"] == dict(M=6360, frames=11, C=384, k=5, devices=("cuda",))
    assert tk.GLOBAL["maskvos-480p-cpu"] == dict(M=1605, frames=6, C=128, k=10, devices=("cpu",))
    assert tk.GLOBAL["ino-global-cpu"] == dict(M=1590, frames=11, C=384, k=5, devices=("cpu",))
    sizes = {name: (s["B"], s["N"], s["D"], s["K"], s["iters"]) for name, s in km.CONFIGS.items()}
    assert sizes == {"km-videos": (64, 8 * 32 * 32, 160, 5, 100), "km-large": (1, 100 * 60 * 107, 128, 7, 100),
                     "km-cpu": (8, 4096, 64, 5, 100)}
    for device in ("cpu", "cuda"):
        baselines = {}
        for op in ("flow_warp", "topk", "kmeans"):
            for c in cases_for(op, device):
                baselines.setdefault((c.op, c.notes, c.config, c.dtype, c.direction), []).extend(
                    [c.impl] if c.baseline else [])
        for (op, notes, *_), impls in baselines.items():
            expected = {"flow_warp": "grid_sample", "topk_attention": "pipeline", "global_topk": "matmul+topk",
                        "kmeans": "sklearn" if device == "cpu" else km._baseline(device, km._impls(device))}
            assert impls == [expected[notes or op]], (device, op, notes, impls)


def test_topk_attention_cases_keep_the_current_frames_tokens_dense(monkeypatch):
    """JointFormer's readout: the M current tokens always attended (dense_keys=M), the top-k over the T memory
    frames' tokens after them."""
    from vosops.bench import topk as tk

    monkeypatch.setattr(tk, "ATTENTION", {"toy": dict(M=8, T=2, topk=3, devices=("cpu",), dtypes=("float32",))})
    calls = []
    monkeypatch.setattr(tk, "jointformer_pipeline", lambda q, k, v, topk, dense: calls.append(
        (q.shape, k.shape, topk, dense)) or q)
    (fwd,) = [c for c in tk._attention_cases("cpu") if c.impl == "pipeline" and c.direction == "fwd"]
    fwd.setup()()
    assert calls == [((1, tk.HEADS, 8, tk.HEAD_DIM), (1, tk.HEADS, 24, tk.HEAD_DIM), 3, 8)]


def test_kmeans_cases_record_iterations_and_inertia(monkeypatch):
    from vosops.bench import kmeans as km

    monkeypatch.setattr(km, "CONFIGS", {"toy": {"B": 2, "N": 64, "D": 4, "K": 3, "iters": 100, "devices": ("cpu",)}})
    (case,) = [c for c in km.cases("cpu") if c.impl == "cpu"]
    case.setup()
    assert 1 <= case.extra["iters"] <= 100 and case.extra["inertia"] > 0
    (ref,) = [c for c in km.cases("cpu") if c.impl == "reference"]
    ref.setup()
    assert ref.extra["iters"] == case.extra["iters"]  # tol=0: both stop when the labels stop changing


def test_info_lists_per_op_the_backends_usable_for_that_op(monkeypatch, capsys):
    """Each op's row asks about that op's own kernel (here the cpu backend made unusable for k-means alone), only
    among the backends the op implements, and only for the devices present."""
    from vosops import _backends
    from vosops.commands.info import _op_table

    why = _backends.why_unusable
    monkeypatch.setattr(_backends, "why_unusable", lambda b, kernel, d: "not built" if (b, kernel) == (
        "cpu", "kmeans_step") else why(b, kernel, d))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "usable backends per op (cpu):" in lines
    rows = {line[:36].strip(): line[36:].strip() for line in lines if line.startswith("  ") and "cpu: " in line}
    expected = {op: "cpu: " + ", ".join(b for b in supported if why(b, kernel, "cpu") is None)
                for op, kernel, supported in _op_table()}
    expected["kmeans, kmeans_predict"] = expected["kmeans, kmeans_predict"].replace(", cpu", "")
    assert rows == expected and expected["flow_warp"].startswith("cpu: reference")


def test_pytest_benchmark_suite_records_what_the_plot_script_reads(tmp_path):
    """benchmarks/test_bench_ops.py on one small case: its JSON names the case and the device that ran it, and the
    plot script reads its median in ms."""
    from vosops.bench.runner import device_name

    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "benchmarks/test_bench_ops.py::test_bench[flow_warp/warp-cpu/cpu/float32/fwd/cpu]",
                          f"--benchmark-json={out}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    (bench,) = json.loads(out.read_text())["benchmarks"]
    info = bench["extra_info"]
    assert {k: info[k] for k in ("op", "config", "device", "direction", "impl", "baseline", "dtype")} == dict(
        op="flow_warp", config="warp-cpu", device="cpu", direction="fwd", impl="cpu", baseline=False,
        dtype="float32")
    assert info["device_name"] == device_name("cpu") and info["bytes"] > 0
    (row,) = _load_script("plot").rows_from_pytest_benchmark(str(out))
    assert row["ms"] == pytest.approx(bench["stats"]["median"] * 1e3)


def test_bench_row_over_rounds_takes_the_median_of_each_statistic():
    from vosops.bench.registry import Case
    from vosops.bench.runner import _row

    case = Case("demo", "tiny", "cpu", "mine", "fwd", lambda: None)
    summaries = [{"ms": 2.0, "p20_ms": 1.0, "p80_ms": 3.0, "reps": 5}, {"ms": 4.0, "p20_ms": 2.0, "p80_ms": 9.0,
                                                                        "reps": 6},
                 {"ms": 3.0, "p20_ms": 1.5, "p80_ms": 4.0, "reps": 7}]
    row = _row(case, None, summaries, memory=False)
    assert (row["ms"], row["p20_ms"], row["p80_ms"], row["reps"]) == (3.0, 1.5, 4.0, 18)
    assert row["round_ms"] == [2.0, 4.0, 3.0]


def test_bench_json_holds_every_row_and_the_environment(tmp_path):
    import vosops
    from vosops.bench.runner import write_json

    rows = [dict(op="demo", config="tiny", impl=impl, ms=ms, device_name="Fake CPU") for impl, ms in
            [("base", 8.0), ("mine", 2.0), ("other", 4.0)]]
    write_json(rows, str(tmp_path / "sub" / "results.json"))
    data = json.loads((tmp_path / "sub" / "results.json").read_text())
    assert data["results"] == rows
    env = data["environment"]
    assert env["vosops"] == vosops.__version__ and env["torch"] == torch.__version__
    assert env["cpu_threads"] == torch.get_num_threads()
