"""Runtime dispatch between the two CPU builds of the compiled operators.

``setup.py`` compiles csrc/ twice on x86-64: ``ntl_fast/_C`` for any x86-64 CPU, and
``ntl_fast/_avx2/_C`` with AVX2 and FMA (ATen's vectorised code paths; about 5x faster for
CE + NTL). :func:`preload` runs before anything imports ``ntl_fast._C`` and, where torch reports
an AVX2 (or AVX-512) CPU, registers the AVX2 library under that name, so ``from . import _C``
gets it; elsewhere the ordinary import finds the baseline one. Only one of the two is ever
loaded, so the operators are registered once. ``ATEN_CPU_CAPABILITY=default`` forces the baseline.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

import torch

__all__ = ["preload"]

_VECTOR_CAPABILITIES = ("AVX2", "AVX512")


def preload() -> None:
    """Load ``ntl_fast._avx2._C`` as ``ntl_fast._C`` where the CPU runs it; otherwise do nothing."""
    if "ntl_fast._C" in sys.modules:
        return
    get_capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    if get_capability is None or get_capability() not in _VECTOR_CAPABILITIES:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    libraries = glob.glob(os.path.join(here, "_avx2", "_C.*"))
    if not libraries:
        return  # built with NTL_FAST_AVX2=0, or not on x86-64
    spec = importlib.util.spec_from_file_location("ntl_fast._C", libraries[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["ntl_fast._C"] = module
