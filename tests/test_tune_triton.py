"""benchmarks/tune_triton.py's search on the CPU with a synthetic tunable: it must pick the fastest candidate that
agrees with the default's output, report refused and wrong tiles without picking them, and restore the defaults."""

import importlib.util
import os
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location("tune_triton", os.path.join(ROOT, "benchmarks", "tune_triton.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_coordinate_descent_picks_the_fastest_correct_tile():
    tune = _load()
    config = {"a": 2, "b": 2}
    x = torch.arange(5.0)

    def run():
        if config["b"] == 3:
            raise RuntimeError("out of resources: shared memory")
        time.sleep(0.004 * config["a"] + 0.002 * config["b"])
        return x + 1 if config["a"] == 0 else x  # a=0 is the fastest, but wrong

    spec = {"config": config, "values": {"a": [0, 1, 2], "b": [1, 2, 3]},
            "cases": {"synthetic": lambda: (run, lambda got, exp: torch.equal(got, exp))}}
    rows = tune.tune("synthetic", spec, rounds=1, budget=0.02, device="cpu", log=lambda s: None)
    assert config == {"a": 2, "b": 2}, "defaults restored"
    errors = {(r["config"]["a"], r["config"]["b"]): r["error"] for r in rows if "error" in r}
    assert "differs" in errors[(0, 2)] and "shared memory" in errors[(1, 3)]
    best = [r for r in rows if r.get("best")]
    assert len(best) == 1 and best[0]["config"] == {"a": 1, "b": 1}
    assert all(r["ms"] > 0 for r in rows if "ms" in r)
    only_b = tune.tune("synthetic", spec, rounds=1, budget=0.01, device="cpu", log=lambda s: None, keys=["b"])
    assert {r["config"]["a"] for r in only_b} == {2}, "keys restricts the sweep"
    assert tune.tune("synthetic", spec, rounds=1, budget=0.01, device="cpu", log=lambda s: None,
                     case_regex="^other") == [], "case_regex selects cases"


def test_every_tunable_sweeps_entries_its_kernels_read():
    """Each tunable's values are entries of its config dict (the wrappers read them by name), and it has cases."""
    tune = _load()
    for op, make in tune.TUNABLES.items():
        spec = make()
        assert spec["values"] and set(spec["values"]) <= set(spec["config"]), op
        assert spec["cases"], op


def test_rounds_repeat_the_descent_from_the_best_so_far(monkeypatch):
    """Each round varies every entry once more, starting from the best found so far: a second round finds a
    better value of `a` that only pays once `b` has moved (times from a fake timer, so the choice is exact)."""
    from vosops.bench import timing

    tune = _load()
    config = {"a": 2, "b": 2}
    times = {(1, 1): 1.0, (2, 1): 3.0, (3, 1): 4.0, (1, 2): 6.0, (2, 2): 5.0, (3, 2): 7.0}
    monkeypatch.setattr(timing, "measure_ms", lambda run, device, budget_s: {"ms": run()})
    run = lambda: times[config["a"], config["b"]]  # noqa: E731
    spec = {"config": config, "values": {"a": [1, 2, 3], "b": [1, 2]},
            "cases": {"synthetic": lambda: (run, lambda got, exp: True)}}
    one = tune.tune("synthetic", spec, rounds=1, budget=0.01, device="cpu", log=lambda s: None)
    assert one[-1]["config"] == {"a": 2, "b": 1} and one[-1]["ms"] == 3.0
    two = tune.tune("synthetic", spec, rounds=2, budget=0.01, device="cpu", log=lambda s: None)
    assert two[-1]["config"] == {"a": 1, "b": 1} and two[-1]["ms"] == 1.0
    # each configuration is timed once: round 2 skips (2, 1), its starting point, and (2, 2), the default
    timed = [(r["config"]["a"], r["config"]["b"]) for r in two if "best" not in r]
    assert sorted(timed) == sorted(set(timed)) and len(timed) == 6
    assert config == {"a": 2, "b": 2}, "defaults restored"


def test_outputs_agree_on_average_but_not_when_wrong_everywhere():
    tune = _load()
    exp = (torch.linspace(1.0, 2.0, 1000), torch.arange(10))
    near_tie = exp[0].clone()
    near_tie[3] += 0.5  # one weight moved: a flipped near-tie of a top-k selection
    assert tune._close_on_average((near_tie, exp[1]), exp)
    assert not tune._close_on_average((exp[0] * 1.01, exp[1]), exp)  # 1% off everywhere
    nan = exp[0].clone()
    nan[0] = float("nan")
    assert not tune._close_on_average((nan, exp[1]), exp)
    assert not tune._close_on_average((exp[0][:-1], exp[1]), exp) and not tune._close_on_average(exp[:1], exp)
