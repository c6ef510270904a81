"""The torch-free CUDA sources compile with nvcc for sm_80 and sm_90 (the CMake compile-check target)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("cmake") is None, reason="needs nvcc and cmake")
def test_cuda_sources_compile_without_torch():
    assert list((ROOT / "csrc").rglob("*.cu")), "no CUDA sources found"
    build = ROOT / "build" / "cuda-check"
    env = dict(os.environ)
    cfg = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), "-DVOSOPS_CUDA_CHECK=ON"],
                         capture_output=True, text=True, env=env)
    assert cfg.returncode == 0, cfg.stdout[-4000:] + cfg.stderr[-4000:]
    res = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-6000:]
    assert "spill" not in res.stdout.replace("0 bytes spill", ""), "register spills in a CUDA kernel"
