"""Builds a host emulation of CUDA kernels (tests/cuda_emulation/*.cpp: the .cu compiled as host code with g++ and
the CUDA toolkit's host headers) as a ctypes library, for the *_cuda_emulated tests on machines without a GPU."""

import ctypes
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_INCLUDE = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")


def build_emulation(tmp_path_factory, source: str) -> ctypes.CDLL:
    """Compile tests/cuda_emulation/<source> into a shared library and load it; skip without g++ or CUDA headers.
    -ffp-contract=off: no fused multiply-adds the GPU build would not have either way, so results are reproducible."""
    if shutil.which("g++") is None or not os.path.exists(os.path.join(CUDA_INCLUDE, "cuda_runtime_api.h")):
        pytest.skip("needs g++ and the CUDA toolkit headers")
    lib = tmp_path_factory.mktemp("emu") / (os.path.splitext(source)[0] + ".so")
    src = os.path.join(ROOT, "tests", "cuda_emulation", source)
    subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-ffp-contract=off",
                    "-DVOSOPS_CUDA_EMULATION",
                    "-I", os.path.join(ROOT, "csrc"), "-I", CUDA_INCLUDE, src, "-o", str(lib)], check=True)
    return ctypes.CDLL(str(lib))


def ptr(t):
    """The data pointer of a tensor, or NULL for None; a ctypes array passes as itself (ctypes passes it by
    reference and keeps it alive for the call, where a temporary tensor's data_ptr would dangle)."""
    if isinstance(t, ctypes.Array):
        return t
    return ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(0)


def sizes_strides(t) -> ctypes.Array:
    """A tensor's sizes then strides as an int64 ctypes array, how the emulations take a strided tensor's shape
    (emu::shape). An array, not a tensor: `ptr(sizes_strides(x))` inside a call's arguments must stay valid."""
    vals = list(t.shape) + list(t.stride())
    return (ctypes.c_int64 * len(vals))(*vals)


def dtype_code(dtype) -> int:
    """The element-type number of the block emulations' entry points (EMU_DISPATCH)."""
    import torch

    return {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}[dtype]


def acc_dtype(dtype):
    """The CUDA kernels' accumulation type for an element type: float64 for float64, else float32."""
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32
