"""vosops bench --op propagate: the configurations build, and each preset's runner propagates frames."""

import pytest
import torch

from vosops.bench import cases_for
from vosops.bench import propagate as bp


def test_cases_list():
    cpu = cases_for("propagate", "cpu")
    assert {c.config for c in cpu} == {f"{p}-240p-{m}" for p in bp.GIVEN_FEATURES for m in ("given", "weightfree")}
    gpu = cases_for("propagate", "cuda")
    assert any(c.baseline and c.impl == "reference" for c in gpu)


@pytest.mark.parametrize("mode", ["given", "weightfree"])
@pytest.mark.parametrize("preset", sorted(bp.GIVEN_FEATURES))
def test_runner_steps(preset, mode):
    step = bp.make_runner(preset, mode, "cpu", 48, 64)
    ids = step()
    assert ids.shape == (48, 64) and ids.dtype == torch.uint8
    assert set(torch.unique(ids).tolist()) <= {0, 1, 2}


def test_sizes_and_frames_per_second():
    """480p frames on the GPU (issue 6), 240x427 on the CPU; one frame per timed call, so fps = 1000 / ms."""
    assert bp.SIZES == {"cuda": (480, 854, "480p"), "cpu": (240, 427, "240p")}
    assert {c.config for c in cases_for("propagate", "cuda")} == {
        f"{p}-480p-{m}" for p in bp.GIVEN_FEATURES for m in ("given", "weightfree")}
    assert bp.frames_per_s({"ms": 4.0}) == 250.0


def test_runner_starts_timing_with_a_full_memory(monkeypatch):
    """Steady state: the frames needed to fill the preset's memory are propagated before the runner is returned."""
    from vosops.propagation import get_preset

    extracted = []

    class CountingBank(bp._Bank):
        def __call__(self, x):
            extracted.append(self.i)
            return super().__call__(x)

    monkeypatch.setattr(bp, "_Bank", CountingBank)
    step = bp.make_runner("mamp", "given", "cpu", 48, 64)
    warm = len(extracted)
    assert warm >= max(bp.WARM_FRAMES, get_preset("mamp").memory.horizon + 1)
    step()
    assert len(extracted) == warm + 1
