"""setup.py: when the CUDA part of the extension fails to compile, the CPU kernels are built alone (they are what
the `cpu` backend needs), rather than installing with no native kernels at all."""

import importlib.util
import os

import pytest
import setuptools
import torch
from setuptools.dist import Distribution
from torch.utils import cpp_extension as ce

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_cuda_extension(name, sources, **kw):
    """Stands in for ce.CUDAExtension, which needs a CUDA PyTorch: what the fallback must undo is the sources, the
    CUDA macro and the CUDA libraries."""
    return setuptools.Extension(name, sources, libraries=["cudart", "c10_cuda"], library_dirs=["/cuda/lib64"], **kw)


@pytest.fixture
def setup_module(monkeypatch):
    for var in ("VOSOPS_NO_NATIVE", "VOSOPS_NO_CUDA", "VOSOPS_REQUIRE_NATIVE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)  # loading setup.py must not build anything
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(ce, "CUDA_HOME", "/cuda")
    monkeypatch.setattr(ce, "CUDAExtension", _fake_cuda_extension)
    spec = importlib.util.spec_from_file_location("vosops_setup", os.path.join(REPO, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(setup_module, monkeypatch):
    attempts = []

    def fake_build(self, extension):
        attempts.append((list(extension.sources), dict(extension.define_macros), list(extension.libraries)))
        if any(src.endswith(".cu") for src in extension.sources):
            raise RuntimeError("Error compiling objects for extension")

    monkeypatch.setattr(ce.BuildExtension, "build_extension", fake_build)
    (ext,), cmdclass = setup_module._native_extensions()
    cmdclass["build_ext"](Distribution()).build_extension(ext)
    return attempts


def test_cuda_build_failure_falls_back_to_the_cpu_kernels(setup_module, monkeypatch):
    attempts = _build(setup_module, monkeypatch)
    assert len(attempts) == 2
    (cuda_sources, cuda_macros, cuda_libs), (cpu_sources, cpu_macros, cpu_libs) = attempts
    assert any(s.endswith(".cu") for s in cuda_sources) and "VOSOPS_WITH_CUDA" in cuda_macros
    assert cpu_sources and all(s.endswith(".cpp") and not s.endswith("_cuda_glue.cpp") for s in cpu_sources)
    assert set(cpu_sources) < set(cuda_sources)
    assert "VOSOPS_WITH_CUDA" not in cpu_macros and "Py_LIMITED_API" in cpu_macros
    assert "cudart" not in cpu_libs and "c10_cuda" not in cpu_libs and "torch_cpu" in cpu_libs


def test_a_refused_cuda_toolchain_falls_back_to_the_cpu_kernels(setup_module, monkeypatch):
    """torch checks nvcc and its version in build_extensions, before building anything: a refusal there must leave
    the CPU kernels to build, not fail the install."""
    from setuptools._distutils.ccompiler import new_compiler

    def refuse(*args):
        raise RuntimeError("The detected CUDA version (12.4) mismatches the version that was used to compile PyTorch")

    built = []
    monkeypatch.setattr(ce, "_check_cuda_version", refuse)
    monkeypatch.setattr(ce.BuildExtension, "build_extension", lambda self, ext: built.append(list(ext.sources)))
    (ext,), cmdclass = setup_module._native_extensions()
    cmd = cmdclass["build_ext"](Distribution())
    cmd.ensure_finalized()
    cmd.extensions, cmd.compiler = [ext], new_compiler()
    cmd.build_extensions()
    assert len(built) == 1 and built[0] and all(s.endswith(".cpp") and "_cuda_glue" not in s for s in built[0])
    monkeypatch.setenv("VOSOPS_REQUIRE_NATIVE", "1")
    (ext,), cmdclass = setup_module._native_extensions()
    cmd = cmdclass["build_ext"](Distribution())
    cmd.ensure_finalized()
    cmd.extensions, cmd.compiler = [ext], new_compiler()
    with pytest.raises(RuntimeError, match="mismatches"):
        cmd.build_extensions()


def test_require_native_makes_the_cuda_failure_fatal(setup_module, monkeypatch):
    monkeypatch.setenv("VOSOPS_REQUIRE_NATIVE", "1")
    with pytest.raises(RuntimeError, match="Error compiling objects"):
        _build(setup_module, monkeypatch)
