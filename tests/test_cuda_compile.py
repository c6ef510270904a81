"""The torch-free CUDA sources compile with nvcc for sm_80 and sm_90 (the CMake compile-check target)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPILL_BUDGET_BYTES = 64  # per kernel, sm_80 and sm_90


@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("cmake") is None, reason="needs nvcc and cmake")
def test_cuda_sources_compile_without_torch():
    assert list((ROOT / "csrc").rglob("*.cu")), "no CUDA sources found"
    build = ROOT / "build" / "cuda-check"
    env = dict(os.environ)
    cfg = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), "-DVOSOPS_CUDA_CHECK=ON"],
                         capture_output=True, text=True, env=env)
    assert cfg.returncode == 0, cfg.stdout[-4000:] + cfg.stderr[-4000:]
    res = subprocess.run(["cmake", "--build", str(build), "--clean-first", "-j", "2"], capture_output=True, text=True,
                         env=env)
    log = res.stdout + res.stderr  # ptxas -v reports on stderr
    assert res.returncode == 0, log[-6000:]
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log)]
    assert spills, "no ptxas report: the check compiled nothing"
    # A few register spills around 64-bit integer divisions (subroutine calls) are tolerated; a kernel that keeps a
    # large array in registers spills hundreds of bytes and fails here.
    assert max(spills) <= SPILL_BUDGET_BYTES, f"a CUDA kernel spills {max(spills)} bytes:\n" + "\n".join(
        line for line in log.splitlines() if "spill stores" in line and not line.strip().startswith("0 bytes"))


def _cuda_include_dir():
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_runtime_api.h").exists():
            return Path(root) / "include"
    return None


def test_no_two_sources_share_an_object_name():
    """PyTorch's extension build names each object after its source's stem: `x.cpp` and `x.cu` in one folder would
    both write `x.o`, and ninja refuses the build ("multiple rules generate")."""
    stems = {}
    for src in sorted([*(ROOT / "csrc").rglob("*.cpp"), *(ROOT / "csrc").rglob("*.cu")]):
        key = src.with_suffix("")
        assert key not in stems, f"{src.relative_to(ROOT)} and {stems[key].relative_to(ROOT)} compile to one object"
        stems[key] = src


def _torch_nvcc_flags():
    import torch.utils.cpp_extension as ce

    return [f for f in ce.COMMON_NVCC_FLAGS if f.startswith("-D") or f.startswith("--expt")]


def _glue_includes(tmp_path):
    """Include paths for the glue. A CPU wheel lacks one CMake-generated header of c10/cuda; an empty stand-in is
    enough to compile the glue here (it is never run here)."""
    import sysconfig

    import torch.utils.cpp_extension as ce

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    return [ROOT / "csrc", *map(Path, ce.include_paths()), tmp_path, _cuda_include_dir(),
            Path(sysconfig.get_paths()["include"])]


def _symbols(obj: Path, undefined: bool) -> set[str]:
    flag = "--undefined-only" if undefined else "--defined-only"
    res = subprocess.run(["nm", "-C", flag, str(obj)], capture_output=True, text=True, check=True)
    # "ADDRESS TYPE NAME" for defined symbols, "TYPE NAME" for undefined ones; a demangled NAME has spaces
    fields = 1 if undefined else 2
    return {line.split(maxsplit=fields)[fields] for line in res.stdout.splitlines() if line.strip()}


@pytest.mark.skipif(_cuda_include_dir() is None or shutil.which("g++") is None or shutil.which("nvcc") is None
                    or shutil.which("nm") is None, reason="needs g++, nm, nvcc and the CUDA runtime headers")
def test_cuda_glue_compiles_and_links_to_the_kernels(tmp_path):
    """Each *_cuda_glue.cpp compiles against this PyTorch's headers, each .cu compiles with the flags PyTorch's
    CUDAExtension adds, and every launcher a glue object calls is defined by some .cu object: the link
    the CUDA build makes, checked without a CUDA PyTorch."""
    glue = sorted((ROOT / "csrc").rglob("*_cuda_glue.cpp"))
    kernels = sorted((ROOT / "csrc").rglob("*.cu"))
    assert glue and kernels, "no CUDA sources found"
    includes = [f"-I{p}" for p in _glue_includes(tmp_path)]
    defined: set[str] = set()
    for src in kernels:
        obj = tmp_path / (src.stem + ".cu.o")
        cmd = ["nvcc", "-c", "-std=c++17", "-O1", "-arch=sm_90", *_torch_nvcc_flags(), f"-I{ROOT / 'csrc'}",
               "--compiler-options", "-fPIC", str(src), "-o", str(obj)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, f"{src.relative_to(ROOT)}:\n{res.stderr[-4000:]}"
        defined |= _symbols(obj, undefined=False)
    for src in glue:
        obj = tmp_path / (src.stem + ".o")
        cmd = ["g++", "-std=c++20", "-c", "-fPIC", "-DVOSOPS_WITH_CUDA=1", *includes, str(src), "-o", str(obj)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, f"{src.relative_to(ROOT)}:\n{res.stderr[-4000:]}"
        # the launchers (vosops functions taking a cudaStream_t, CUstream_st*) and the kernels' shared memory
        # sizes (*_shared_bytes); the rest live in the CPU sources
        called = {s for s in _symbols(obj, undefined=True) if s.startswith("vosops::")
                  and ("CUstream_st*" in s or "_shared_bytes(" in s)}
        assert called, f"{src.relative_to(ROOT)} calls no vosops launcher: is it still the glue of a .cu?"
        missing = sorted(called - defined)
        assert not missing, f"{src.relative_to(ROOT)} calls functions no .cu defines: {missing}"
