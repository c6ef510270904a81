"""On the five DAVIS-2016 validation sequences of ../shared/data/davis2016-mini (or $VOSOPS_DAVIS2016_MINI), when
present: the weight-free baseline's J&F held above a measured floor, and every preset runs on every sequence.

To stay fast on a 2-core machine the frames are downscaled 4x (480x854 -> 120x214, masks by nearest) and scored
against equally downscaled ground truth; the full-resolution number comes from
`vosops propagate --dataset ../shared/data/davis2016-mini --out OUT --eval` (see the report); one sequence runs
that way here, through the CLI at full resolution.
"""

import os

import numpy as np
import pytest

from vosops import metrics
from vosops.io import DavisDataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.environ.get("VOSOPS_DAVIS2016_MINI", os.path.join(REPO, "..", "shared", "data", "davis2016-mini"))
HAVE = os.path.isdir(os.path.join(ROOT, "JPEGImages", "480p"))
pytestmark = pytest.mark.skipif(not HAVE, reason=f"DAVIS-2016 mini not found at {ROOT} (set VOSOPS_DAVIS2016_MINI)")

FACTOR = 4
# Measured at FACTOR 4 with the weight-free default (weight_free(): r=12, top-36, scale 40, MAMP memory):
# J&F-Mean 0.371 (J per sequence: blackswan 0.77, car-shadow 0.48, dog 0.62, kite-surf 0.04, motocross-jump 0.02;
# colour features lose the small kite-surfer and the fast motocross jump). Copying the first mask to every frame
# scores 0.290 here, so the floor 0.33 fails if propagation degenerates to that, with ~0.04 of headroom.
WEIGHT_FREE_FLOOR = 0.33


def _load(ds, seq, limit=None):
    import cv2

    frames, gts = [], []
    masks = ds.masks(seq)
    for i, (name, f) in enumerate(zip(ds.frames(seq).names, ds.frames(seq))):
        if limit is not None and i >= limit:
            break
        H, W = f.shape[:2]
        size = (W // FACTOR, H // FACTOR)
        frames.append(cv2.resize(f, size, interpolation=cv2.INTER_AREA))
        gts.append(cv2.resize(masks[name], size, interpolation=cv2.INTER_NEAREST))
    return frames, gts


@pytest.fixture(scope="module")
def dataset():
    return DavisDataset(ROOT)


@pytest.fixture(scope="module")
def clips(dataset):
    return {seq: _load(dataset, seq) for seq in dataset.sequences}


def test_weight_free_baseline_above_floor(dataset, clips):
    from vosops.propagation import weight_free

    assert dataset.sequences == ["blackswan", "car-shadow", "dog", "kite-surf", "motocross-jump"]
    scores = []
    for seq in dataset.sequences:
        frames, gts = clips[seq]
        preds = [ids.numpy() for _, ids in weight_free().propagate(frames, {0: gts[0]})]
        s = metrics.evaluate_sequence(preds, gts, seq)
        print(seq, metrics.summarize(s))
        scores += s
    summary = metrics.summarize(scores)
    print("weight-free, 1/4 resolution:", summary)
    assert summary["J&F-Mean"] >= WEIGHT_FREE_FLOOR, summary


@pytest.mark.parametrize("preset", ["mamp", "maskvos", "ino", "dino", "jointformer-memory"])
def test_every_preset_runs_on_every_sequence(dataset, clips, preset):
    from vosops.commands.propagate import build_engine

    for seq in dataset.sequences:
        frames, gts = clips[seq][0][:7], clips[seq][1][:7]  # 7 frames: every memory schedule fills (MAMP reads 5)
        engine, _ = build_engine(preset, "cpu")
        preds = [ids.numpy() for _, ids in engine.propagate(frames, {0: gts[0]})]
        assert len(preds) == 7 and preds[0].shape == gts[0].shape
        assert set(np.unique(np.concatenate([p.ravel() for p in preds]))) <= {0, 1}


# Measured with `vosops propagate --dataset ../shared/data/davis2016-mini --out OUT --eval` at full resolution
# (480x854): blackswan J&F 0.943 (J 0.934, F 0.952). The floor fails if the pipeline at full resolution (IO, padding,
# the stride-4 readout, upsampling, writing, evaluation) loses the swan anywhere; copying the first mask scores 0.440.
FULL_RES_BLACKSWAN_FLOOR = 0.90


def test_cli_full_resolution_sequence_above_floor(tmp_path, capsys):
    import re

    from vosops import cli

    root = tmp_path / "davis"
    for part in ("JPEGImages", "Annotations"):
        (root / part / "480p").mkdir(parents=True)
        os.symlink(os.path.join(ROOT, part, "480p", "blackswan"), root / part / "480p" / "blackswan")
    out = tmp_path / "out"
    assert cli.main(["propagate", "--dataset", str(root), "--out", str(out), "--eval", "--no-overlay"]) == 0
    text = capsys.readouterr().out
    row = re.search(r"^blackswan\s+([0-9.]+)", text, re.M)
    assert row, text
    assert float(row.group(1)) >= FULL_RES_BLACKSWAN_FLOOR, text
    names = sorted(os.listdir(os.path.join(ROOT, "JPEGImages", "480p", "blackswan")))
    assert sorted(os.listdir(out / "blackswan")) == [n.rsplit(".", 1)[0] + ".png" for n in names]
