"""Test session setup: Triton runs under its interpreter when there is no GPU (set before anything imports triton)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import vosops  # noqa: E402  (after TRITON_INTERPRET is decided)
from vosops import _backends  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def backend_device_params(op: str, supported=vosops.BACKENDS):
    """pytest params of (backend, device) for every non-reference backend usable here; CUDA ones are marked."""
    params = []
    for device in DEVICES:
        for b in supported:
            if b != "reference" and _backends.why_unusable(b, op, device) is None:
                marks = [pytest.mark.cuda] if device == "cuda" else []
                params.append(pytest.param(b, device, id=f"{b}-{device}", marks=marks))
    return params


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
