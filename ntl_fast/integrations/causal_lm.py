"""Train any Hugging Face causal LM with CE + NTL through the fused LM-head path, in one call.

    from ntl_fast.integrations.causal_lm import enable_ntl
    enable_ntl(model, tokenizer, ntl_weight=0.3, loss="was")
    out = model(input_ids=ids, attention_mask=mask, labels=ids)   # labels as for the usual CE
    out.loss.backward()                                           # out.ce_loss, out.ntl_loss: logging

With ``labels`` the patched forward runs the base model (``model.base_model``: the decoder
without its head), then :func:`ntl_fast.linear.linear_cross_entropy_with_ntl` on the final hidden
states and the LM head's weight, shifting the labels as the model's own loss does: the M x V
logits are never materialised. Without labels (generation, evaluation) the model's own forward
runs unchanged. ``num_items_in_batch`` (Hugging Face's global CE count under gradient
accumulation) becomes the CE normaliser; pass ``ntl_num_items_in_batch`` (see
:func:`ntl_fast.distributed.global_counts`) for the exact NTL normaliser too.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..distributed import token_counts
from ..functional import _safe_divide
from ..labels import causal_shift
from ..linear import linear_cross_entropy_with_ntl
from ..table import NumberTokenTable

__all__ = ["CausalLMOutputWithNTL", "enable_ntl", "disable_ntl"]

# keys that belong to the loss, never to the base model
_LOSS_KEYS = ("labels", "shift_labels", "num_items_in_batch", "ntl_num_items_in_batch",
              "logits_to_keep", "return_dict")
# head transformations the fused path does not apply; refuse rather than compute another loss
_UNSUPPORTED_CONFIG = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@dataclass
class CausalLMOutputWithNTL(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus the detached CE and NTL terms of ``loss``, for logging."""

    ce_loss: Optional[Tensor] = None
    ntl_loss: Optional[Tensor] = None


def _build_table(table_or_tokenizer: Any, vocab_size: int,
                 digit_level: bool, include_marked: bool) -> NumberTokenTable:
    if isinstance(table_or_tokenizer, NumberTokenTable):
        return table_or_tokenizer.resized(vocab_size)
    return NumberTokenTable.from_tokenizer(table_or_tokenizer, vocab_size=vocab_size,
                                           digit_level=digit_level, include_marked=include_marked)


def _accepted(function) -> Optional[set]:
    """The keyword names ``function`` accepts, or None when it takes ``**kwargs``."""
    parameters = inspect.signature(function).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters}


def enable_ntl(
    model: torch.nn.Module,
    table_or_tokenizer: Union[NumberTokenTable, Any],
    *,
    ntl_weight: float = 0.3,
    loss: str = "was",
    digit_level: bool = True,
    include_marked: bool = False,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    return_logits: bool = False,
    **loss_options: Any,
) -> torch.nn.Module:
    """Make ``model`` (a Hugging Face ``*ForCausalLM``) compute CE + ``ntl_weight`` x NTL.

    Args:
        model: a causal LM with ``base_model`` and ``get_output_embeddings()`` (Llama, Qwen2,
            GPT-2, Mistral, ...). Patched in place (its instance ``forward``) and returned.
        table_or_tokenizer: a :class:`NumberTokenTable`, or the tokenizer to build one from
            (only read; the table covers every row of the LM head, padded ones included).
        ntl_weight, loss: the paper's λ (0.3) and NTL variant (``"was"``, ``"mse"``, ...).
        digit_level, include_marked: how to build the table from a tokenizer.
        chunk_size: rows per chunk of the fused LM head (default: from a memory budget and the
            device, :func:`ntl_fast.linear.default_chunk_size`: 32 MiB of logits on the CPU, on
            CUDA ``min(device memory / 64, 512 MiB)``).
        return_logits: also compute (materialise) the logits when labels are given.
        loss_options: ``squash_factor``, ``reweigh``, ``gaussian_sigma``, ``ignore_index``,
            ``validate`` of :func:`ntl_fast.cross_entropy_with_ntl`.
        Defaults: ``ntl_weight=0.3``, ``loss="was"``, ``digit_level=True``,
        ``include_marked=False``, ``chunk_size=None``, ``backend="auto"``, ``return_logits=False``.

    Returns:
        torch.nn.Module: ``model`` itself. With labels its forward returns a
        :class:`CausalLMOutputWithNTL` (``loss``, ``ce_loss``, ``ntl_loss``; ``logits`` None
        unless ``return_logits``).

    Raises:
        RuntimeError: ``enable_ntl`` was already called on this model.
        TypeError: no Linear LM head, no ``base_model``, or unknown ``loss_options``.
        ValueError: the config transforms the logits (soft-capping, logit scaling), which the
            fused path does not apply; or the table cannot be built from the tokenizer.
    """
    if getattr(model, "_ntl_original_forward", None) is not None:
        raise RuntimeError("enable_ntl was already called on this model: call disable_ntl(model) first")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"model must have a Linear LM head (get_output_embeddings()), got {type(head).__name__}")
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise TypeError(f"{type(model).__name__} has no base_model (the decoder without its LM head)")
    config = getattr(model, "config", None)
    for name in _UNSUPPORTED_CONFIG:
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise ValueError(f"config.{name} transforms the logits; the fused NTL path does not apply it")
    allowed = {"squash_factor", "reweigh", "gaussian_sigma", "ignore_index", "validate"}
    unknown = set(loss_options) - allowed
    if unknown:
        raise TypeError(f"unknown loss options {sorted(unknown)}; allowed: {sorted(allowed)}")
    table = _build_table(table_or_tokenizer, head.weight.shape[0], digit_level, include_marked)
    ignore_index = loss_options.get("ignore_index", -100)
    original = model.forward
    signature = inspect.signature(original)
    base_accepts = _accepted(base.forward)
    output_fields = {field.name for field in dataclasses.fields(CausalLMOutputWithNTL)}

    def forward(*args: Any, **kwargs: Any):
        arguments = signature.bind_partial(*args, **kwargs).arguments
        for name, parameter in signature.parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
                arguments.update(arguments.pop(name))
        labels, shifted = arguments.get("labels"), arguments.get("shift_labels")
        if labels is None and shifted is None:
            return original(*args, **kwargs)
        loss_inputs = {key: arguments.pop(key, None) for key in _LOSS_KEYS}
        base_inputs = {key: value for key, value in arguments.items()
                       if base_accepts is None or key in base_accepts}
        outputs = base(**base_inputs)
        hidden = outputs[0]
        # Hugging Face's `shift_labels` are labels already aligned with the positions; `labels` are
        # shifted here, the hidden states never (no copy of them)
        if shifted is None:
            target, _ = causal_shift(loss_inputs["labels"].to(hidden.device), ignore_index)
        else:
            target = loss_inputs["shift_labels"].to(hidden.device)
        ce_count = loss_inputs["num_items_in_batch"]
        ntl_count = loss_inputs["ntl_num_items_in_batch"]
        if ce_count is not None and ntl_count is None:
            # no global NTL count given: scale the local one like the CE count was scaled
            local_ce, local_ntl = token_counts(target, table, ignore_index=ignore_index)
            ce_count = torch.as_tensor(ce_count, dtype=torch.float32, device=hidden.device)
            ntl_count = _safe_divide(ce_count * local_ntl, local_ce)
        result = linear_cross_entropy_with_ntl(
            hidden, head.weight, target, table.to(hidden.device), bias=head.bias,
            ntl_weight=ntl_weight, loss=loss, ce_normalizer=ce_count, ntl_normalizer=ntl_count,
            chunk_size=chunk_size, backend=backend, **loss_options,
        )
        extras = {name: getattr(outputs, name, None) for name in ("cache", "past_key_values",
                                                                  "hidden_states", "attentions")
                  if name in output_fields}
        logits = head(hidden) if return_logits else None
        return CausalLMOutputWithNTL(loss=result.loss, logits=logits, ce_loss=result.ce,
                                     ntl_loss=result.ntl, **extras)

    forward.__signature__ = signature
    forward.__doc__ = original.__doc__
    model._ntl_original_forward = original
    model._ntl_table = table
    model.forward = forward
    return model


def disable_ntl(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`enable_ntl`: the model computes its own loss again. Returns ``model``;
    raises ``RuntimeError`` when :func:`enable_ntl` was not called on it."""
    original = getattr(model, "_ntl_original_forward", None)
    if original is None:
        raise RuntimeError("enable_ntl was not called on this model")
    del model.forward
    model._ntl_original_forward = None
    model._ntl_table = None
    return model
