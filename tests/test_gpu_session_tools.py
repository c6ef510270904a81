"""The GPU session's tools run on the CPU too, so a lent GPU's few minutes are not lost to a broken script:
benchmarks/gpu_session.sh parses, refuses unknown stages, and its `bench` stage merges per-op results into one
results.json and plot; benchmarks/gpu_profile.py prints the profiler table of a case."""

import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_session.sh")


def _session(tmp_path, *stages, **env):
    full_env = dict(os.environ, OUT=str(tmp_path / "out"), **env)
    return subprocess.run(["bash", SCRIPT, *stages], capture_output=True, text=True, env=full_env, cwd=ROOT,
                          timeout=300)


def test_session_script_parses():
    assert subprocess.run(["bash", "-n", SCRIPT], capture_output=True).returncode == 0


def test_session_refuses_an_unknown_stage(tmp_path):
    done = _session(tmp_path, "bnech")
    assert done.returncode == 2 and "unknown stage bnech" in done.stdout


def test_bench_stage_merges_each_ops_results(tmp_path):
    bench_dir = tmp_path / "bench"
    for op, config in [("flow_warp", "warp-cpu"), ("kmeans", "km-cpu")]:
        subprocess.run([sys.executable, "-m", "vosops", "bench", "--device", "cpu", "--op", op, "--config", config,
                        "--impl", "cpu", "--budget", "0.01", "--no-memory", "--out", str(bench_dir / op)],
                       check=True, capture_output=True, cwd=ROOT, timeout=300)
    # DEADLINE_S=0: no op is timed again here, only the merge runs
    done = _session(tmp_path, "bench", BENCH_DIR=str(bench_dir), DEADLINE_S="0", BENCH_OPS="flow_warp kmeans")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "bench flow_warp skipped: past the deadline" in done.stdout
    merged = json.loads((tmp_path / "out" / "results.json").read_text())
    ops = {row["op"] for row in merged["results"]}
    assert ops == {"flow_warp", "kmeans"}, ops
    assert all(row["device"] == "cpu" and row["ms"] > 0 for row in merged["results"])
    assert "gpu_session.sh bench" in merged["environment"]["command"]
    assert (tmp_path / "out" / "speedup.png").stat().st_size > 0


def test_bench_tf32_stage_merges_into_its_own_folder(tmp_path):
    """bench-tf32 reads its per-op results from BENCH_DIR-tf32 and writes $OUT/tf32, beside the exact run's."""
    bench_dir = tmp_path / "bench"
    subprocess.run([sys.executable, "-m", "vosops", "bench", "--device", "cpu", "--op", "flow_warp", "--config",
                    "warp-cpu", "--impl", "cpu", "--budget", "0.01", "--no-memory", "--tf32",
                    "--out", str(tmp_path / "bench-tf32" / "flow_warp")],
                   check=True, capture_output=True, cwd=ROOT, timeout=300)
    done = _session(tmp_path, "bench-tf32", BENCH_DIR=str(bench_dir), DEADLINE_S="0", BENCH_OPS="flow_warp")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "bench-tf32 flow_warp skipped: past the deadline" in done.stdout
    merged = json.loads((tmp_path / "out" / "tf32" / "results.json").read_text())
    assert {row["op"] for row in merged["results"]} == {"flow_warp"}
    assert merged["environment"]["fp32_products"] == "tf32"
    assert "gpu_session.sh bench-tf32" in merged["environment"]["command"]
    assert not (tmp_path / "out" / "results.json").exists()  # the exact run's file is left alone


def test_profile_prints_the_top_ops_of_a_case(capsys):
    spec = importlib.util.spec_from_file_location("gpu_profile", os.path.join(ROOT, "benchmarks", "gpu_profile.py"))
    profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile)
    assert profile.main(["--device", "cpu", "--op", "flow_warp", "--config", "warp-cpu", "--impl", "cpu",
                         "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "== flow_warp/warp-cpu/cpu/float32/fwd/cpu" in out and "vosops::flow_warp " in out
    assert "vosops::flow_warp_backward" in out and "FAILED" not in out


def test_sanitize_stage_runs_the_selected_tests_under_each_tool(tmp_path):
    """The stage hands pytest to compute-sanitizer once per tool, with the caching allocator off (a stand-in
    sanitizer on PATH records its arguments and runs the command, as the real one does)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "calls.txt"
    fake = bin_dir / "compute-sanitizer"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$PYTORCH_NO_CUDA_MEMORY_CACHING $*" >> {record}\n'
        'while [ "$1" != python3 ]; do shift; done\n'
        'exec "$@"\n')
    fake.chmod(0o755)
    done = _session(tmp_path, "sanitize", PATH=f"{bin_dir}:{os.environ['PATH']}", SANITIZE_TOOLS="memcheck racecheck",
                    SANITIZE_ARGS="-k test_session_script_parses", SANITIZE_S="120")
    assert done.returncode == 0, done.stdout + done.stderr
    calls = record.read_text().splitlines()
    assert len(calls) == 2 and all(c.startswith("1 --tool ") for c in calls), calls
    assert "--tool memcheck" in calls[0] and "--tool racecheck" in calls[1]
    assert "-k test_session_script_parses" in calls[0] and "-m cuda" in calls[0]
    for tool in ("memcheck", "racecheck"):
        assert (tmp_path / "out" / f"sanitize-{tool}.log").exists()
    assert "memcheck exited" in done.stdout and "racecheck exited" in done.stdout


def test_profile_leaves_baselines_out_unless_named(capsys):
    spec = importlib.util.spec_from_file_location("gpu_profile", os.path.join(ROOT, "benchmarks", "gpu_profile.py"))
    profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile)
    assert profile.main(["--device", "cpu", "--op", "flow_warp", "--config", "warp-cpu", "--top", "1"]) == 0
    cases = [line for line in capsys.readouterr().out.splitlines() if line.startswith("== ")]
    assert "== flow_warp/warp-cpu/cpu/float32/fwd/cpu" in cases and not any("grid_sample" in c for c in cases)
