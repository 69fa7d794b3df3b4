"""Build ntl_fast, and its compiled operators (ntl_fast._C) from csrc/ when csrc/ is present.

The CPU extension is built against the torch that is already installed (use
``pip install --no-build-isolation``); the CUDA kernels are added only where that torch has CUDA.
Set NTL_FAST_NO_EXTENSION=1 to install the pure-Python package (the reference and Triton paths).
"""

import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


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
    cxx_flags = ["-O3", "-std=c++17"]
    if sys.platform.startswith("linux"):
        cxx_flags += ["-fopenmp"]
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and cuda_sources
    if with_cuda:
        cuda_cpp = [s for s in cpp_sources]
        extension = CUDAExtension(
            "ntl_fast._C",
            cuda_cpp + cuda_sources,
            define_macros=[("NTL_FAST_WITH_CUDA", None)],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-std=c++17", "--use_fast_math"],
            },
            extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [],
        )
    else:
        cpu_sources = [s for s in cpp_sources if not os.path.basename(s).endswith("_cuda.cpp")]
        extension = CppExtension(
            "ntl_fast._C",
            cpu_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [],
        )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
