"""CE + NTL straight from the LM head's input: ``hidden @ weight.T (+ bias)`` is never materialised.

For a large vocabulary the logits dominate training memory: M x V values, and as much again for
their gradient (M = 16,384 tokens, V = 128,256: 4.2 GB each in bfloat16). Here they exist one
chunk of rows at a time, and each chunk's gradient is folded into the gradients of ``hidden``,
``weight`` and ``bias`` before the next; :mod:`ntl_fast.chunked` holds that loop, its memory
bound and where it rounds. This module checks the inputs, works out each row's share of the
reduction, picks the chunk size and the backend, and shapes the result.

Any backend serves the chunks (through ``ce_ntl_loss_and_grad`` where it fuses the loss and its
gradient, else ``ce_ntl_rows`` and autograd), so the results equal
``cross_entropy_with_ntl(hidden @ weight.T + bias, labels, ...)``. With ``shift_labels`` the
labels are shifted (:func:`ntl_fast.labels.causal_shift`), never the hidden states: every row
goes through the head, the last position of each sequence as an ignored one.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .chunked import LinearCrossEntropyWithNTLFunction, chunk_rows, device_chunk_plan
from .config import LossConfig, accumulation_dtype, check_reduction
from .functional import _FLOAT_DTYPES, NTLOutput, Normalizer, _row_scale, _rows, _scored
from .labels import label_positions
from .table import NumberTokenTable

__all__ = ["linear_cross_entropy_with_ntl", "default_chunk_size", "check_chunk_size"]


def default_chunk_size(num_rows: int, vocab_size: int, dtype: torch.dtype = torch.float32,
                       device: Union[torch.device, str] = "cpu") -> int:
    """Rows per chunk of ``num_rows`` rows of ``vocab_size`` logits of ``dtype`` on ``device``.

    As many rows as a memory budget holds, kept above a minimum that fills the device
    (:func:`ntl_fast.chunked.chunk_plan`): on CUDA ``min(device memory / 64, 512 MiB)`` of logits and
    at least 4 waves of rows over the SMs (e.g. 2,048 rows of bfloat16 logits at V = 128,256 on an
    80 GB, 132-SM GPU); on the CPU 32 MiB and at least 64 rows (256 rows of float32 at V = 32,128).
    """
    element_size = torch.empty((), dtype=dtype).element_size()
    return chunk_rows(num_rows, vocab_size, element_size, device_chunk_plan(device))


def check_chunk_size(chunk_size: Optional[int]) -> None:
    """``chunk_size`` is None (the default) or an int >= 1; ``ValueError`` otherwise."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")


def _check_linear(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    for name, tensor in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if not isinstance(tensor, Tensor) and not (name == "bias" and tensor is None):
            kind = "a Tensor or None" if name == "bias" else "a Tensor"
            raise TypeError(f"{name} must be {kind}, got {type(tensor).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16, float16 or float64, got {hidden.dtype}")
    if hidden.dim() < 1 or hidden.numel() == 0:
        raise ValueError(f"hidden must be a non-empty (..., H) tensor, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight is {weight.dtype} but hidden {hidden.dtype}: cast one (or use autocast)")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden on {hidden.device}")
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise ValueError(f"bias must be {hidden.dtype} on {hidden.device}, got {bias.dtype} on {bias.device}")


def linear_cross_entropy_with_ntl(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    table: NumberTokenTable,
    *,
    bias: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    ntl_weight: Union[float, Tensor] = 0.3,
    loss: str = "was",
    gaussian_sigma: Optional[float] = None,
    ce_normalizer: Normalizer = None,
    ntl_normalizer: Normalizer = None,
    squash_factor: Optional[float] = None,
    reweigh: bool = False,
    reduction: str = "mean",
    weights: Optional[Tensor] = None,
    ignore_index: int = -100,
    shift_labels: bool = False,
    validate: bool = True,
    backend: str = "auto",
) -> NTLOutput:
    """:func:`ntl_fast.cross_entropy_with_ntl` of ``hidden @ weight.T + bias``, without the logits.

    ``hidden (..., H)`` is the LM head's input, ``weight (V, H)`` (and ``bias (V,)``) its
    parameters, ``labels (...)``. The rows are processed ``chunk_size`` at a time, so peak memory
    holds one chunk of logits instead of all M x V of them and their gradient. Gradients flow to
    ``hidden``, ``weight`` and ``bias``; ``grad_weight`` is a running sum in the weight's dtype,
    rounded once per chunk (:mod:`ntl_fast.chunked` lists every rounding). Under
    ``torch.autocast`` the three are cast to the autocast dtype first, as ``F.linear`` would.
    Every other option means what it means in :func:`ntl_fast.cross_entropy_with_ntl`.

    Args:
        hidden (Tensor): ``(..., H)`` float32, bfloat16, float16 or float64.
        weight (Tensor): ``(V, H)``, the LM head's weight, same dtype and device as ``hidden``.
        labels (Tensor): ``(...)`` int64 or int32 token ids in ``[0, V)``, or ``ignore_index``.
        table (NumberTokenTable): on the device of ``hidden``; ``V >= table.vocab_size``.
        bias (Tensor, optional): ``(V,)``, the LM head's bias. Default None.
        chunk_size (int, optional): rows per chunk, >= 1. Default: from a memory budget and the
            device (:func:`default_chunk_size`).
        ntl_weight, loss, gaussian_sigma, ce_normalizer, ntl_normalizer, squash_factor, reweigh,
        reduction, weights, ignore_index, shift_labels, validate, backend: as
            :func:`ntl_fast.cross_entropy_with_ntl` (defaults 0.3, ``"was"``, None, None, None,
            None, False, ``"mean"``, None, -100, False, True, ``"auto"``).

    Returns:
        NTLOutput: ``(loss, ce, ntl)`` as :func:`ntl_fast.cross_entropy_with_ntl`. With
        ``"mean"``/``"sum"`` the gradients are computed during the forward and only scaled in the
        backward, so a second backward through the same loss raises ``RuntimeError``.

    Raises:
        TypeError: non-tensor or mismatched dtypes of ``hidden``, ``weight``, ``bias``; a
            non-numeric ``ntl_weight``; and the errors of :func:`ntl_fast.cross_entropy_with_ntl`.
        ValueError: ``weight`` not ``(V, H)``, ``bias`` not ``(V,)``, devices that differ, an
            invalid ``chunk_size``, and the errors of :func:`ntl_fast.cross_entropy_with_ntl`.
    """
    if isinstance(ntl_weight, bool) or not isinstance(ntl_weight, (int, float, Tensor)):
        raise TypeError(f"ntl_weight must be a number, got {ntl_weight!r}")
    if isinstance(ntl_weight, Tensor):
        ntl_weight = ntl_weight.detach()
    check_chunk_size(chunk_size)
    config = LossConfig(loss, squash_factor, reweigh, gaussian_sigma, ignore_index)
    check_reduction(reduction)
    if isinstance(hidden, Tensor) and torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    _check_linear(hidden, weight, bias)
    if shift_labels and (hidden.dim() < 2 or hidden.shape[-2] < 2):
        raise ValueError(f"shift_labels=True needs hidden of shape (..., T, H) with T >= 2, got {tuple(hidden.shape)}")
    vocab_size = weight.shape[0]
    # the shared checks, the causal label shift (labels move, the hidden states stay: the last
    # position of each sequence gets ignore_index, hence a zero row of the logits gradient) and
    # the backend choice, on a stand-in for the logits that allocates one row
    logits_stand_in = hidden.new_empty(vocab_size).expand(*hidden.shape[:-1], vocab_size)
    rows = _rows(logits_stand_in, labels, table, weights, shift_labels, validate, ignore_index, backend)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    acc = accumulation_dtype(hidden.dtype)
    in_range, _, number_index = label_positions(rows.labels, rows.table, ignore_index)
    # each row's share of the loss: weights over the means' counts ("none": the weights alone)
    scale_reduction = "sum" if reduction == "none" else reduction
    ce_factor = _row_scale(in_range, rows.weights, scale_reduction, ce_normalizer, acc)
    ntl_factor = _row_scale(number_index >= 0, rows.weights, scale_reduction, ntl_normalizer, acc)
    chunk = chunk_size or default_chunk_size(hidden2d.shape[0], vocab_size, hidden2d.dtype, hidden2d.device)
    total, ce, ntl = LinearCrossEntropyWithNTLFunction.apply(
        hidden2d, weight, bias, rows.labels, ce_factor, ntl_factor, ntl_weight, rows.table, config,
        rows.backend, chunk, reduction == "none",
    )
    if reduction == "none":  # the labels' shape; after a shift, a view without the last position
        total, ce, ntl = (_scored(value.view(rows.shape), reduction, shift_labels) for value in (total, ce, ntl))
    return NTLOutput(total, ce, ntl)
