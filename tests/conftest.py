"""Shared test set-up.

Without a CUDA device, Triton kernels run in Triton's interpreter on CPU tensors. The variable
must be set before any ``@triton.jit`` function is defined, i.e. before ntl_fast.triton is
imported, so it is set here, at collection time, for the whole suite.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(params=[0, 1, 2])
def seed(request):
    torch.manual_seed(1000 + request.param)
    return request.param
