"""Tile sweeps for the Triton kernels whose launch parameters live in a config dict, for a GPU session.

Each tunable names a config dict in vosops, the values each entry may take, and the benchmark cases to time. The
search is coordinate descent from the shipped defaults: vary one entry over its values with the others fixed, keep
the fastest, go to the next entry; `--rounds` passes. Every candidate's output is checked against the shipped
default's output on the same inputs before it is timed (a tile that compiles but computes something else is
reported, never picked). Times are CUDA-event medians (vosops.bench.timing). Nothing here changes the shipped
defaults: read the table, then edit the dict in the source.

Run:  python benchmarks/tune_triton.py [--op global_topk] [--case mamp-480p] [--key num_warps] [--rounds 1]
      [--budget 0.1] [--out tune.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import time

import torch
import torch.nn.functional as F


def _global_topk_tunable():
    from vosops.bench.topk import GLOBAL
    from vosops.triton import topk as ttk

    import vosops

    def make_case(spec):
        M, C, k = spec["M"], spec["C"], spec["k"]
        L = M * spec["frames"]
        g = torch.Generator(device="cuda").manual_seed(0)
        q = F.normalize(torch.randn(1, M, C, device="cuda", generator=g), dim=-1)
        keys = F.normalize(torch.randn(1, L, C, device="cuda", generator=g), dim=-1)
        run = lambda: vosops.global_topk(q, keys, topk=k, scale=20.0, backend="triton")  # noqa: E731

        def agree(got, exp):
            # selection can differ only between logits equal to rounding (summation order depends on the tile)
            return torch.allclose(got[0].float(), exp[0].float(), atol=1e-4, rtol=1e-5)

        return run, agree

    return {
        "config": ttk.GLOBAL_TOPK_CONFIG,
        "values": {"block_m": [32, 64, 128], "block_n": [32, 64, 128], "block_c": [16, 32, 64],
                   "num_warps": [4, 8], "num_stages": [1, 2, 3], "programs_per_sm": [1, 2, 4, 8]},
        "cases": {name: (lambda s=spec: make_case(s)) for name, spec in GLOBAL.items() if "cuda" in spec["devices"]},
    }


def _flatten(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flatten(o)] if isinstance(out, (tuple, list)) else []


def _close_on_average(got, exp) -> bool:
    """Mean absolute difference within 1e-3 of the mean magnitude for every output tensor: a different tile changes
    the summation order, which may flip a near-tie of a top-k selection (a local difference of one weight), but a
    wrong kernel differs everywhere."""
    g, e = _flatten(got), _flatten(exp)
    if len(g) != len(e):
        return False
    for a, b in zip(g, e):
        if a.shape != b.shape or not torch.isfinite(a.float()).all():
            return False
        a, b = a.double(), b.double()
        if (a - b).abs().mean() > 1e-3 * b.abs().mean() + 1e-6:
            return False
    return True


def _bench_case_tunable(op: str, module: str, config_name: str, values: dict, configs: tuple, directions: tuple):
    """A tunable whose cases are the `vosops bench` cases of `op` timed for the triton implementation."""
    import importlib

    from vosops.bench import cases_for

    config = getattr(importlib.import_module(module), config_name)
    cases = {f"{c.config} {c.dtype} {c.direction}": c for c in cases_for(op, "cuda")
             if c.impl == "triton" and c.config in configs and c.direction in directions}
    return {"config": config, "values": values,
            "cases": {name: (lambda c=c: (c.setup(), _close_on_average)) for name, c in cases.items()}}


def _local_attention_tunable():
    return _bench_case_tunable(
        "local_attention", "vosops.triton.local_attention", "LOCAL_ATTENTION_CONFIG",
        {"tile_elements": [1024, 2048, 4096, 8192], "max_bq": [4, 8, 16, 32, 64], "num_warps": [1, 2, 4, 8],
         "num_stages": [1, 2, 3], "tiled": [True, False]},
        ("mamp-480p", "crw-480p", "mamp-train"), ("fwd", "fwd+bwd"))


def _local_attention_tiles_tunable():
    """The query-tile kernels (LOCAL_ATTENTION_CONFIG["tiled"], the default); tile_h * tile_w < 16 is refused by
    the wrapper and reported as an error row."""
    return _bench_case_tunable(
        "local_attention", "vosops.triton.local_attention_tiled", "TILED_CONFIG",
        {"tile_h": [2, 4, 8, 16], "tile_w": [4, 8, 16, 32], "block_k": [32, 64, 128], "block_c": [16, 32, 64],
         "num_warps": [4, 8], "num_stages": [1, 2, 3], "sort_min": [0, 2, 8, 32, 1 << 20],
         "channels_last": [False, True]},
        ("mamp-480p", "crw-480p", "ino-480p", "mamp-train"), ("fwd", "fwd+bwd"))


def _topk_attention_tunable():
    return _bench_case_tunable(
        "topk", "vosops.triton.topk", "TOPK_ATTENTION_CONFIG",
        {"block_m": [16, 32, 64], "num_warps": [2, 4, 8], "num_stages": [1, 2, 3],
         "sort_min": [0, 2, 8, 32, 1 << 20], "bwd_block_m": [16, 32, 64],
         "bwd_block_n": [16, 32, 64], "bwd_num_warps": [2, 4, 8], "kv_block_m": [16, 32, 64],
         "kv_block_n": [32, 64, 128], "kv_num_warps": [4, 8], "sparse_block_r": [16, 32, 64],
         "sparse_num_warps": [2, 4, 8]},
        ("jointformer-davis-1f", "jointformer-davis-3f"), ("fwd", "bwd"))


TUNABLES = {"global_topk": _global_topk_tunable, "local_attention": _local_attention_tunable,
            "local_attention_tiles": _local_attention_tiles_tunable, "topk_attention": _topk_attention_tunable}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _try(run, agree, expected, budget, device):
    from vosops.bench.timing import measure_ms

    try:
        got = run()
        _sync(device)
    except Exception as e:  # a tile the compiler or the device refuses (shared memory, registers)
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    if not agree(got, expected):
        return {"error": "output differs from the default tile's"}
    return {"ms": measure_ms(run, device, budget_s=budget)["ms"]}


def tune(op: str, spec: dict, rounds: int, budget: float, device: str = "cuda", log=print, case_regex: str = "",
         keys: list | None = None) -> list[dict]:
    """Coordinate descent over spec["values"] (only `keys`, if given) for each of spec["cases"] whose name matches
    case_regex; returns every timed row, then one row per case with "best": True. The config dict is restored to
    its defaults afterwards."""
    config = spec["config"]
    values = {k: v for k, v in spec["values"].items() if not keys or k in keys}
    default = dict(config)
    rows = []
    for case_name, make in spec["cases"].items():
        if not re.search(case_regex, case_name):
            continue
        run, agree = make()
        config.clear()
        config.update(default)
        expected = run()
        _sync(device)
        best = dict(default)
        best_ms = _try(run, agree, expected, budget, device).get("ms", float("inf"))
        tried = [default]  # a later round passes configs it has timed: device time is scarce
        rows.append({"op": op, "case": case_name, "config": dict(default), "ms": best_ms, "default": True})
        log(f"{op} {case_name} default {default}: {best_ms:.3f} ms")
        for _, key in itertools.product(range(rounds), values):
            for value in values[key]:
                trial = {**best, key: value}
                if trial in tried:
                    continue
                tried.append(trial)
                config.clear()
                config.update(trial)
                res = _try(run, agree, expected, budget, device)
                rows.append({"op": op, "case": case_name, "config": trial, **res, "default": False})
                log(f"  {key}={value}: " + (f"{res['ms']:.3f} ms" if "ms" in res else res["error"]))
                if res.get("ms", float("inf")) < best_ms:
                    best, best_ms = trial, res["ms"]
        log(f"{op} {case_name} best {best}: {best_ms:.3f} ms")
        rows.append({"op": op, "case": case_name, "config": best, "ms": best_ms, "best": True})
    config.clear()
    config.update(default)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", action="append", choices=sorted(TUNABLES), help="default: every tunable")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--budget", type=float, default=0.1, help="seconds of timing per candidate")
    parser.add_argument("--case", default="", help="only cases whose name ('config dtype direction') matches")
    parser.add_argument("--key", action="append", help="only sweep these config entries")
    parser.add_argument("--out", help="write every row as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_triton: needs a CUDA GPU", file=sys.stderr)
        return 2
    t0 = time.time()
    rows = []
    for op in args.op or sorted(TUNABLES):
        rows += tune(op, TUNABLES[op](), args.rounds, args.budget, log=lambda s: print(s, flush=True),
                     case_regex=args.case, keys=args.key)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"tuned in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
