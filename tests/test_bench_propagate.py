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
