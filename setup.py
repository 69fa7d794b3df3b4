"""Build ntl_fast and its compiled operators (ntl_fast._C) from csrc/.

The extension is compiled against the torch that is already installed, so install torch first
and build without pip's isolated build environment (which would download another torch)::

    pip install --no-build-isolation ntl_fast          # or, in a clone: pip install --no-build-isolation -e .

Without an importable torch, compiling (a wheel, an install) stops with that advice instead of
silently producing a package without its C++ backend; an sdist or metadata needs no torch. The
CUDA kernels (csrc/**/*.cu and csrc/**/*_cuda.cpp) are added where that torch has CUDA and nvcc
is found. Environment switches:

- NTL_FAST_NO_EXTENSION=1: install the pure-Python package (the reference and Triton backends).
- NTL_FAST_AVX2=0: compile the CPU kernels once, for baseline x86-64. By default (on x86-64) they
  are compiled twice, as ntl_fast._C (baseline, any x86-64 CPU) and ntl_fast._avx2._C (AVX2+FMA,
  ATen's vectorised code paths, about 5x faster for CE + NTL); ``import ntl_fast`` loads the AVX2
  one where torch reports an AVX2 or AVX-512 CPU (runtime dispatch, so a wheel runs anywhere).
- TORCH_CUDA_ARCH_LIST: the GPU architectures of the CUDA kernels. Default: sm_75, sm_80, sm_86,
  sm_89 and sm_90 (T4 to H100/H200), plus sm_100 and sm_120 where nvcc supports them, with PTX
  for the newest so later GPUs can JIT-compile it.
"""

import glob
import os
import platform
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# setup.py commands that compile the extension (pip's build_wheel runs bdist_wheel, -e editable_wheel)
_COMPILING = {"build", "build_ext", "bdist", "bdist_wheel", "bdist_egg", "install", "develop", "editable_wheel"}
_NO_TORCH = (
    "ntl_fast: torch is not importable in the build environment, so the C++ extension cannot be "
    "built against it. Install torch first, then install ntl_fast with pip's build isolation off:\n"
    "    pip install setuptools wheel ninja\n"
    "    pip install --no-build-isolation <this source tree or ntl_fast-*.tar.gz>\n"
    "(or set NTL_FAST_NO_EXTENSION=1 for the pure-Python package: Triton on GPUs, the slower "
    "PyTorch reference on CPUs)."
)


_AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]


def _cpu_variants():
    """``(extension name, extra flags)`` of each CPU build: a baseline one, and one for AVX2+FMA
    (ATen's at::vec::Vectorized code paths) that ntl_fast/_extension.py picks at run time."""
    request = os.environ.get("NTL_FAST_AVX2", "1")
    if request not in ("0", "1"):
        raise SystemExit(f"ntl_fast: NTL_FAST_AVX2 must be 0 or 1, got {request!r}")
    variants = [("ntl_fast._C", [])]
    if request == "1" and platform.machine().lower() in ("x86_64", "amd64"):
        variants.append(("ntl_fast._avx2._C", _AVX2_FLAGS))
    return variants


def _default_cuda_arch_list(cuda_home: str) -> str:
    """sm_75 to sm_90, plus the newer architectures the local nvcc can compile; PTX for the last."""
    archs = ["7.5", "8.0", "8.6", "8.9", "9.0"]
    try:
        listed = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"],
                                capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        listed = []
    archs += [arch for arch in ("10.0", "12.0") if "compute_" + arch.replace(".", "") in listed]
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


def extension_modules():
    csrc = os.path.join(HERE, "csrc")
    if os.environ.get("NTL_FAST_NO_EXTENSION") == "1" or not os.path.isdir(csrc):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        if _COMPILING & set(sys.argv[1:]):
            raise SystemExit(_NO_TORCH) from None
        return [], {}  # an sdist or the metadata: nothing is compiled
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    # -g0 drops the debug info that Python's CFLAGS ask for (a faster build); torch picks -std.
    cxx_flags = ["-O3", "-g0"]
    openmp = sys.platform.startswith("linux")
    if openmp:
        cxx_flags += ["-fopenmp"]
    link_args = ["-fopenmp"] if openmp else []
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and cuda_sources
    extensions = []
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = _default_cuda_arch_list(CUDA_HOME)
        print(f"ntl_fast: CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}",
              file=sys.stderr)
        for name, flags in _cpu_variants():
            extensions.append(CUDAExtension(
                name,
                cpp_sources + cuda_sources,
                extra_compile_args={"cxx": cxx_flags + flags, "nvcc": ["-O3", "-lineinfo"]},
                extra_link_args=link_args,
            ))
    else:
        cpu_sources = [s for s in cpp_sources if not os.path.basename(s).endswith("_cuda.cpp")]
        for name, flags in _cpu_variants():
            extensions.append(CppExtension(
                name, cpu_sources, extra_compile_args={"cxx": cxx_flags + flags}, extra_link_args=link_args
            ))

    class BuildEachExtensionApart(BuildExtension.with_options(use_ninja=True)):
        """The variants compile the same sources with different flags: one object folder each."""

        def build_extension(self, ext):
            build_temp = self.build_temp
            self.build_temp = os.path.join(build_temp, ext.name)
            try:
                super().build_extension(ext)
            finally:
                self.build_temp = build_temp

    return extensions, {"build_ext": BuildEachExtensionApart}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
