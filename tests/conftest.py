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

from ntl_fast import NumberTokenTable  # noqa: E402


@pytest.fixture(params=[0, 1, 2])
def seed(request):
    torch.manual_seed(1000 + request.param)
    return request.param


def digit_table(vocab_size: int = 40, first_id: int = 7, dot_id=None) -> NumberTokenTable:
    """Digits 0-9 at ids first_id..first_id+9 of a small vocabulary."""
    return NumberTokenTable.from_values(
        {first_id + d: float(d) for d in range(10)}, vocab_size=vocab_size, dot_id=dot_id
    )


def irregular_table(vocab_size: int = 53) -> NumberTokenTable:
    """K = 7 (not a power of two), ids scattered, values unevenly spaced and unsorted by id."""
    values = {3: 9.0, 4: 0.0, 11: 2.5, 20: 100.0, 31: -3.0, 44: 7.0, vocab_size - 1: 2.5}
    return NumberTokenTable.from_values(values, vocab_size=vocab_size)
