"""The Triton backend: fused kernels for NTL and CE + NTL.

Implements the backend contract of :mod:`ntl_fast.backends` (the same module-level functions as
:mod:`ntl_fast.reference` and :mod:`ntl_fast.cpp`). Runs CUDA tensors, and CPU tensors in Triton's
interpreter (``TRITON_INTERPRET=1`` set before this package is imported).

Layout: ``_common`` (row math, launch settings), ``cross_entropy_with_ntl`` and
``number_token_loss`` (kernels and their launchers), ``ops`` (every ``torch.library`` op, its fake
and its autograd pairing).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton  # noqa: F401  (ImportError here tells the dispatcher Triton is missing)
from torch import Tensor

from ..config import LossConfig
from ..table import NumberTokenTable
from . import ops
from ._common import loss_options
from .ops import ce_ntl_backward, ce_ntl_backward_, ce_ntl_forward, ntl_backward, ntl_forward

__all__ = [
    "unsupported_reason",
    "ntl_rows",
    "ce_ntl_rows",
    "fuses_loss_and_grad",
    "ce_ntl_loss_and_grad",
    "scale_gradient_",
    "ntl_forward",
    "ntl_backward",
    "ce_ntl_forward",
    "ce_ntl_backward",
    "ce_ntl_backward_",
]

# one pass serves these: a float16 gradient stored before the loss scale is applied underflows
ONE_PASS_DTYPES = (torch.float32, torch.bfloat16)


def unsupported_reason(device) -> Optional[str]:
    """None when the kernels can run tensors on ``device``, else why not."""
    device = torch.device(device)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1)"
    if device.type not in ("cuda", "cpu"):
        return f"Triton does not serve {device.type} tensors"
    return None


def _row_table(table: NumberTokenTable, vocab_size: int) -> NumberTokenTable:
    return table if table.vocab_size == vocab_size else table.resized(vocab_size)


def _arguments(logits: Tensor, table: NumberTokenTable, config: LossConfig) -> tuple:
    """The table tensors (the list every kernel backend receives) and the options of an op call."""
    table = _row_table(table, logits.shape[-1])
    return (list(table.kernel_tensors()), *loss_options(config, table))


def ntl_rows(logits: Tensor, labels: Tensor, table: NumberTokenTable, config: LossConfig) -> Tensor:
    """Per-position NTL ``(M,)``: 0 off the NTL-valid positions, NaN at bad labels."""
    ntl, _ = ntl_forward(logits, labels, *_arguments(logits, table, config))
    return ntl


def ce_ntl_rows(
    logits: Tensor, labels: Tensor, table: NumberTokenTable, config: LossConfig,
    inplace: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Per-position CE (Gaussian-CE at number positions with ``gaussian_sigma``) and NTL.

    ``inplace=True``: the backward writes the gradient into the logits' buffer instead of a new
    M x V tensor. Afterwards those logits hold gradients: only use it when nothing else reads
    them after this loss (no second loss on them, no logging after backward).
    """
    ce, ntl, _ = ce_ntl_forward(logits, labels, *_arguments(logits, table, config), inplace)
    return ce, ntl


def fuses_loss_and_grad(logits: Tensor) -> bool:
    """Whether :func:`ce_ntl_loss_and_grad` serves these logits: float32 or bfloat16, on a CUDA
    device, or on the CPU in the interpreter (so that CPU test runs cover the one-pass path)."""
    if not isinstance(logits, Tensor):  # a bare device says nothing of the dtype
        return False
    if logits.dtype not in ONE_PASS_DTYPES:
        return False
    return logits.device.type == "cuda" or (
        logits.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    )


def ce_ntl_loss_and_grad(
    logits: Tensor, labels: Tensor, table: NumberTokenTable, config: LossConfig, ce_scale: Tensor,
    ntl_scale: Tensor, inplace: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-position CE and NTL ``(M,)`` and ``d(Σ ce_scale·ce + Σ ntl_scale·ntl)/d logits`` in the
    logits' dtype, from one kernel (the gradient sweep follows the row statistics in the same
    program). Rows whose two scales are 0 read no logit and report 0 losses.

    ``inplace=True`` writes the gradient over the logits (contiguous ones) and returns their
    buffer as the gradient: afterwards the logits hold gradients. Not differentiable itself.
    """
    arguments = _arguments(logits, table, config)
    if inplace:
        ce, ntl = ops.ce_ntl_loss_and_grad_(logits, labels, ce_scale, ntl_scale, *arguments)
        return ce, ntl, logits
    return ops.ce_ntl_loss_and_grad(logits, labels, ce_scale, ntl_scale, *arguments)


def scale_gradient_(grad: Tensor, grad_output: Tensor) -> Tensor:
    """``grad *= grad_output`` in place and returns ``grad``; ``grad_output`` (0-d, on grad's device)
    is read by the kernel, never by the host, and a factor of 1 costs no pass over ``grad``."""
    ops.scale_gradient_(grad, grad_output)
    return grad
