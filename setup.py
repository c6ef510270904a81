"""Build vosops' native extension `vosops._C`.

The C++ CPU kernels are always built. The CUDA kernels are added when the installed PyTorch was built with CUDA and
`nvcc` is found (arch list: TORCH_CUDA_ARCH_LIST, default "8.0;9.0"). If the CUDA part fails to compile, the CPU
kernels are built alone; if they fail too, the package still installs, and `import vosops` warns once and uses the
other backends.

Environment:
  VOSOPS_NO_NATIVE=1   skip the extension entirely (pure Python install)
  VOSOPS_NO_CUDA=1     build the CPU kernels only, even with a CUDA PyTorch
  VOSOPS_REQUIRE_NATIVE=1  fail the install when any part asked for (CUDA included) fails to compile
  MAX_JOBS=N           parallel compile jobs (ninja)
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _native_extensions():
    if os.environ.get("VOSOPS_NO_NATIVE") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except Exception as exc:  # torch missing: pure-Python install, the reference backend still works
        print(f"vosops: PyTorch not importable ({exc}); installing without native kernels", file=sys.stderr)
        return [], {}

    cpu_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True))
    cuda_glue = [s for s in cpu_sources if s.endswith("_cuda_glue.cpp")]
    cpu_sources = [s for s in cpu_sources if s not in cuda_glue]
    cu_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))

    with_cuda = (
        torch.version.cuda is not None
        and ce.CUDA_HOME is not None
        and os.environ.get("VOSOPS_NO_CUDA") != "1"
    )
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx_flags = ["-O3", "-std=c++20", "-fvisibility=hidden", *openmp]

    def common():  # fresh lists for each extension: torch's constructors append to them
        return dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=list(openmp), py_limited_api=True)

    limited_api = ("Py_LIMITED_API", "0x030A0000")
    cpu_ext = ce.CppExtension("vosops._C", cpu_sources, define_macros=[limited_api],
                              extra_compile_args={"cxx": list(cxx_flags)}, **common())
    ext = cpu_ext
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = ce.CUDAExtension(
            "vosops._C",
            cpu_sources + cuda_glue + cu_sources,
            define_macros=[("VOSOPS_WITH_CUDA", "1"), limited_api],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"],
            },
            **common(),
        )

    require = os.environ.get("VOSOPS_REQUIRE_NATIVE") == "1"

    def has_cuda(extension) -> bool:
        return any(src.endswith(".cu") for src in extension.sources)

    def give_up(exc) -> None:
        print(f"vosops: native build failed ({exc}); installing without native kernels", file=sys.stderr)

    class TolerantBuildExtension(ce.BuildExtension):
        """Build what compiles: the CUDA and CPU kernels, else the CPU kernels alone, else nothing (vosops then warns
        at import and uses the other backends), instead of failing the whole install."""

        def build_extensions(self):
            # torch checks the CUDA toolchain (nvcc present, its version against torch's, the host compiler) here,
            # before any compile: a refusal leaves the CPU kernels to build
            try:
                super().build_extensions()
                return
            except Exception as exc:
                if require:
                    raise
                if not any(has_cuda(e) for e in self.extensions):
                    give_up(exc)
                    return
                print(f"vosops: CUDA toolchain refused ({exc}); building the CPU kernels alone", file=sys.stderr)
            self.extensions = [cpu_ext]
            try:
                super().build_extensions()
            except Exception as exc:
                give_up(exc)

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
                return
            except Exception as exc:
                if require:
                    raise
                if not has_cuda(extension):
                    give_up(exc)
                    return
                print(f"vosops: CUDA build failed ({exc}); building the CPU kernels alone", file=sys.stderr)
            # the same extension object, which build_extensions has given torch's compile flags, made the CPU one
            for attr in ("sources", "define_macros", "libraries", "library_dirs"):
                setattr(extension, attr, getattr(cpu_ext, attr))
            try:
                super().build_extension(extension)
            except Exception as exc:
                give_up(exc)

    return [ext], {"build_ext": TolerantBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass, options={"bdist_wheel": {"py_limited_api": "cp310"}})
