"""Build ntl_fast, and its compiled operators (ntl_fast._C) from csrc/ when csrc/ is present.

The CPU extension is built against the torch that is already installed (use
``pip install --no-build-isolation -e .``); the CUDA kernels (csrc/**/*.cu and csrc/**/*_cuda.cpp)
are added only where that torch has CUDA. Environment switches:

- NTL_FAST_NO_EXTENSION=1: install the pure-Python package (the reference and Triton paths).
- NTL_FAST_CPU_BASELINE=1: do not compile the CPU kernels for AVX2+FMA even when the build
  machine has them (for a wheel that must run on older x86 CPUs).
"""

import glob
import os
import platform
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cpu_flags():
    """x86 CPUs with AVX2 and FMA get ATen's AVX2 vector code paths (at::vec::Vectorized)."""
    if os.environ.get("NTL_FAST_CPU_BASELINE") == "1":
        return []
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return []
    if {"avx2", "fma"} <= flags:
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return []


def extension_modules():
    csrc = os.path.join(HERE, "csrc")
    if os.environ.get("NTL_FAST_NO_EXTENSION") == "1" or not os.path.isdir(csrc):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("ntl_fast: torch is not importable at build time; skipping the C++ extension "
              "(install torch first and use pip install --no-build-isolation)", file=sys.stderr)
        return [], {}
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    # -g0 drops the debug info that Python's CFLAGS ask for (a faster build); torch picks -std.
    cxx_flags = ["-O3", "-g0"] + _cpu_flags()
    openmp = sys.platform.startswith("linux")
    if openmp:
        cxx_flags += ["-fopenmp"]
    link_args = ["-fopenmp"] if openmp else []
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and cuda_sources
    if with_cuda:
        extension = CUDAExtension(
            "ntl_fast._C",
            cpp_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link_args,
        )
    else:
        cpu_sources = [s for s in cpp_sources if not os.path.basename(s).endswith("_cuda.cpp")]
        extension = CppExtension(
            "ntl_fast._C", cpu_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_args
        )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
