"""The propagate / eval / demo commands, and --dataset sharded over 2 torchrun CPU processes (gloo)."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vosops import cli
from vosops.io import read_mask, write_mask
from vosops.propagation.synthetic import synthetic_video

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The demo's floor. Measured: J&F 0.958 (J 0.935, F 0.981) with the weight-free extractor (`vosops demo`, CPU);
# 0.85 leaves room for platform differences in the float sums while still failing if propagation breaks (copying
# the first mask to every frame scores 0.143, an empty prediction 0.0).
DEMO_FLOOR = 0.85


def test_demo_above_floor(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    jf = float(re.search(r"J&F ([0-9.]+)", out).group(1))
    assert jf >= DEMO_FLOOR, out
    im = Image.open(tmp_path / "contact_sheet.png")
    assert im.size[0] > 600 and im.size[1] > 200


def test_copying_first_mask_is_below_the_demo_floor():
    from vosops import metrics

    _, gts = synthetic_video(T=30)
    s = metrics.summarize(metrics.evaluate_sequence([gts[0]] * 30, gts))
    assert s["J&F-Mean"] < DEMO_FLOOR - 0.2


def _write_video(folder, frames, names, ext=".jpg"):
    os.makedirs(folder, exist_ok=True)
    for f, n in zip(frames, names):
        Image.fromarray(f).save(os.path.join(folder, n + ext), quality=95)


def test_propagate_folder_and_eval(tmp_path, capsys):
    frames, gts = synthetic_video(T=6, H=70, W=90, seed=4)  # sizes not multiples of 4: exact unpadding
    names = [f"{17 + i:05d}" for i in range(6)]
    _write_video(str(tmp_path / "frames"), frames, names)
    write_mask(str(tmp_path / "first.png"), gts[0])
    rc = cli.main(["propagate", str(tmp_path / "frames"), "--mask", str(tmp_path / "first.png"),
                   "--out", str(tmp_path / "out" / "seq")])
    assert rc == 0
    out = capsys.readouterr()
    assert "frames/s" in out.out
    for n in names:
        m = read_mask(str(tmp_path / "out" / "seq" / f"{n}.png"))
        assert m.shape == (70, 90)
    assert Image.open(tmp_path / "out" / "seq" / "00017.png").mode == "P"
    assert os.path.getsize(tmp_path / "out" / "seq" / "overlay.mp4") > 0
    for g, n in zip(gts, names):
        write_mask(str(tmp_path / "gt" / "seq" / f"{n}.png"), g)
    rc = cli.main(["eval", "--pred", str(tmp_path / "out"), "--gt", str(tmp_path / "gt"),
                   "--csv", str(tmp_path / "r.csv")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "seq" in text and "J&F-Mean" in text
    rows = (tmp_path / "r.csv").read_text().splitlines()
    assert rows[-1].startswith("all,global") and any(r.startswith("seq_1,object") for r in rows)
    assert float(rows[-1].split(",")[2]) > 0.5


def test_flow_auto_is_the_presets_protocol():
    from vosops.commands.propagate import build_engine

    engine, desc = build_engine("mamp", "cpu")  # --flow auto: MAMP's motion-aware matching
    assert engine.flow == "dis" and desc.endswith(", dis flow")
    assert build_engine("mamp", "cpu", "none")[0].flow is None
    assert build_engine("mamp", "cpu", "farneback")[0].flow == "farneback"
    assert build_engine("ino", "cpu")[0].flow is None
    assert build_engine(None, "cpu")[0].flow is None and build_engine(None, "cpu", "dis")[0].flow == "dis"


def test_propagate_bad_arguments(tmp_path, capsys):
    assert cli.main(["propagate", "--out", str(tmp_path)]) == 2
    assert cli.main(["propagate", str(tmp_path), "--out", str(tmp_path), "--preset", "nope",
                     "--mask", "x.png"]) == 2
    assert "preset must be one of" in capsys.readouterr().err
    assert cli.main(["eval", "--pred", str(tmp_path / "none"), "--gt", str(tmp_path)]) == 2
    assert cli.main(["propagate", str(tmp_path), "--mask", "x.png", "--out", str(tmp_path), "--backend", "gpu"]) == 2
    assert "--backend must be" in capsys.readouterr().err
    for threads in ("-1", "0", "two"):  # argparse's own error: status 2, usage and one line
        with pytest.raises(SystemExit) as e:
            cli.main(["propagate", str(tmp_path), "--mask", "x.png", "--out", str(tmp_path), "--threads", threads])
        assert e.value.code == 2 and "argument --threads: expected an int >= 1" in capsys.readouterr().err
    assert cli.main(["demo", "--out", str(tmp_path), "--device", "bogus"]) == 2
    assert "vosops demo: --device must be cpu, cuda or cuda:N, got 'bogus'" in capsys.readouterr().err


def test_input_errors_are_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    """Errors a user's input causes deep in the engine or the IO (a missing video, an unreadable mask, a mask with
    no object, a backend the machine lacks, a folder that is no dataset) end the command with status 2 and one line
    naming the command and the cause; VOSOPS_DEBUG=1 gives the traceback instead."""
    monkeypatch.delenv("VOSOPS_DEBUG", raising=False)
    frames, gts = synthetic_video(T=3, H=32, W=40, seed=1)
    _write_video(str(tmp_path / "frames"), frames, ["a", "b", "c"])
    write_mask(str(tmp_path / "first.png"), gts[0])
    write_mask(str(tmp_path / "empty.png"), np.zeros_like(gts[0]))
    (tmp_path / "garbage.png").write_text("not an image")
    (tmp_path / "no_frames").mkdir()
    frames_dir, first, out = str(tmp_path / "frames"), str(tmp_path / "first.png"), str(tmp_path / "out")
    cases = [
        (["propagate", str(tmp_path / "missing"), "--mask", first, "--out", out], "does not exist"),
        (["propagate", str(tmp_path / "no_frames"), "--mask", first, "--out", out], "holds no"),
        (["propagate", frames_dir, "--mask", str(tmp_path / "garbage.png"), "--out", out], "garbage.png"),
        (["propagate", frames_dir, "--mask", str(tmp_path / "empty.png"), "--out", out], "no object"),
        (["propagate", "--dataset", str(tmp_path / "no_frames"), "--out", out], "not a DAVIS-layout dataset"),
        (["propagate", frames_dir, "--mask", first, "--out", out, "--device", "bogus"],
         "--device must be cpu, cuda or cuda:N, got 'bogus'"),
        (["propagate", frames_dir, "--mask", first, "--out", out, "--device", "mps"], "--device must be"),
        (["propagate", frames_dir, "--mask", first, "--out", out, "--device", "cuda:99"], "cuda:99"),
        (["propagate", frames_dir, "--mask", first, "--out", out, "--preset", "maskvos", "--flow", "dis"],
         "--flow dis: preset maskvos's readout takes no flow offsets"),
        (["propagate", frames_dir, "--mask", first, "--out", frames_dir], "is the frames' folder"),
    ]
    if not torch.cuda.is_available():
        cases.append((["propagate", frames_dir, "--mask", first, "--out", out, "--device", "cpu", "--backend",
                       "cuda"], "backend 'cuda' is unavailable"))
        cases.append((["propagate", frames_dir, "--mask", first, "--out", out, "--device", "cuda:0"],
                      "--device cuda:0 asked for, but no CUDA device is available"))
    for argv, needle in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("vosops propagate: ") and needle in err, (argv, err)
    monkeypatch.setenv("VOSOPS_DEBUG", "1")
    with pytest.raises(ValueError, match="no object"):
        cli.main(cases[3][0])
    # also for what a command checks before it starts (a bad preset, device or combination of arguments)
    with pytest.raises(ValueError, match="--device must be"):
        cli.main(cases[5][0])
    with pytest.raises(ValueError, match="give either a video"):
        cli.main(["propagate", frames_dir, "--dataset", frames_dir, "--out", out])
    with pytest.raises(ValueError, match="preset must be one of"):
        cli.main(["propagate", frames_dir, "--mask", first, "--out", out, "--preset", "nope"])
    monkeypatch.setenv("VOSOPS_DEBUG", "0")  # 0 is off
    assert cli.main(cases[3][0]) == 2


def _davis_layout(root, seqs=3, T=4, H=48, W=64):
    for s in range(seqs):
        frames, gts = synthetic_video(T=T, H=H, W=W, seed=10 + s)
        names = [f"{i:05d}" for i in range(T)]
        _write_video(os.path.join(root, "JPEGImages", "480p", f"seq{s}"), frames, names)
        for g, n in zip(gts, names):
            write_mask(os.path.join(root, "Annotations", "480p", f"seq{s}", f"{n}.png"), g)


def test_dataset_error_names_its_sequence(tmp_path, capsys):
    root = str(tmp_path / "davis")
    _davis_layout(root, seqs=2, T=3, H=32, W=40)
    write_mask(os.path.join(root, "Annotations", "480p", "seq1", "00000.png"), np.ones((12, 16), np.uint8))
    assert cli.main(["propagate", "--dataset", root, "--out", str(tmp_path / "out"), "--no-overlay"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("vosops propagate: sequence 'seq1': ") and "(12, 16)" in err, err


def test_dataset_sharded_over_two_gloo_processes(tmp_path):
    root, out = str(tmp_path / "davis"), str(tmp_path / "pred")
    _davis_layout(root)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--module",
           "vosops", "propagate", "--dataset", root, "--out", out, "--no-overlay", "--eval", "--threads", "1"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[rank 0/2] 2 of 3 sequences on cpu: seq0, seq2" in res.stdout
    assert "[rank 1/2] 1 of 3 sequences on cpu: seq1" in res.stdout
    for s in range(3):
        assert sorted(os.listdir(os.path.join(out, f"seq{s}"))) == [f"{i:05d}.png" for i in range(4)]
    assert "all ranks: 12 frames" in res.stdout
    assert os.path.isfile(os.path.join(out, "results.csv"))


def _gt_and_pred(root, seqs=("seqA", "seqB"), T=3, H=32, W=40):
    """Ground truth for two sequences, and the ground truth itself as the predictions (J&F 1)."""
    for s, name in enumerate(seqs):
        _, gts = synthetic_video(T=T, H=H, W=W, seed=20 + s)
        for t, g in enumerate(gts):
            write_mask(os.path.join(root, "gt", name, f"{t:05d}.png"), g)
            write_mask(os.path.join(root, "pred", name, f"{t:05d}.png"), g)


def test_eval_scores_only_the_given_sequences_into_pred_results_csv(tmp_path, capsys):
    _gt_and_pred(str(tmp_path))
    pred, gt = str(tmp_path / "pred"), str(tmp_path / "gt")
    assert cli.main(["eval", "--pred", pred, "--gt", gt, "--sequences", "seqB"]) == 0
    assert "over 2 objects in 1 sequences" in capsys.readouterr().out
    rows = (tmp_path / "pred" / "results.csv").read_text().splitlines()  # the default CSV path: PRED/results.csv
    assert any(r.startswith("seqB_") for r in rows) and not any(r.startswith("seqA") for r in rows)
    assert not (tmp_path / "gt" / "results.csv").exists()


def test_propagate_options_reach_the_run(tmp_path, capsys):
    """--no-overlay for a video; --imageset with --dataset: only its sequences."""
    frames, gts = synthetic_video(T=3, H=32, W=40, seed=2)
    _write_video(str(tmp_path / "frames"), frames, ["a", "b", "c"])
    write_mask(str(tmp_path / "first.png"), gts[0])
    assert cli.main(["propagate", str(tmp_path / "frames"), "--mask", str(tmp_path / "first.png"), "--out",
                     str(tmp_path / "out"), "--no-overlay"]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["a.png", "b.png", "c.png"]
    root = str(tmp_path / "davis")
    _davis_layout(root, seqs=3, T=3, H=32, W=40)
    os.makedirs(os.path.join(root, "ImageSets", "2017"))
    with open(os.path.join(root, "ImageSets", "2017", "val.txt"), "w") as f:
        f.write("seq1\n")
    assert cli.main(["propagate", "--dataset", root, "--imageset", "2017/val.txt", "--out", str(tmp_path / "ds"),
                     "--no-overlay"]) == 0
    assert os.listdir(tmp_path / "ds") == ["seq1"]
    assert cli.build_parser().parse_args(["propagate", "--out", "x"]).flow == "auto"
    capsys.readouterr()


def test_propagate_refuses_a_mask_of_another_size(tmp_path, capsys):
    frames, _ = synthetic_video(T=3, H=32, W=40, seed=2)
    _write_video(str(tmp_path / "frames"), frames, ["a", "b", "c"])
    write_mask(str(tmp_path / "first.png"), np.ones((16, 20), np.uint8))
    assert cli.main(["propagate", str(tmp_path / "frames"), "--mask", str(tmp_path / "first.png"), "--out",
                     str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == "vosops propagate: mask (16, 20) and frames (32, 40) differ in size"


def test_demo_options_reach_the_run(tmp_path, capsys):
    assert cli.main(["demo", "--frames", "4", "--out", str(tmp_path), "--device", "cpu"]) == 0
    assert "synthetic video, 4 frames of" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert cli.main(["demo", "--frames", "3", "--out", str(tmp_path), "--device", "cpu", "--backend",
                         "cuda"]) == 2
        assert "backend 'cuda' is unavailable" in capsys.readouterr().err


def test_device_resolution_on_a_machine_with_two_gpus(monkeypatch):
    """torchrun's ranks: a bare `cuda` (or no --device) means this rank's GPU, cuda:N that GPU, past the last one
    an error."""
    from vosops.commands._args import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda", 1) == "cuda:1" and resolve_device(None, 1) == "cuda:1"
    assert resolve_device("cuda:0", 1) == "cuda:0" and resolve_device("cpu", 1) == "cpu"
    with pytest.raises(ValueError, match="this machine has 2 CUDA device"):
        resolve_device("cuda:2")


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path, capsys, monkeypatch):
    """An OSError (here --out below a regular file) ends the command like any other input error."""
    monkeypatch.delenv("VOSOPS_DEBUG", raising=False)
    frames, gts = synthetic_video(T=3, H=32, W=40, seed=1)
    _write_video(str(tmp_path / "frames"), frames, ["a", "b", "c"])
    write_mask(str(tmp_path / "first.png"), gts[0])
    (tmp_path / "afile").write_text("")
    out = str(tmp_path / "afile" / "out")
    assert cli.main(["propagate", str(tmp_path / "frames"), "--mask", str(tmp_path / "first.png"), "--out", out,
                     "--no-overlay"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vosops propagate: ") and out in err[0]
