"""Train Hugging Face models with cross-entropy + Number Token Loss through ``transformers.Trainer``.

    from ntl_fast import NumberTokenTable
    from ntl_fast.integrations import NTLSeq2SeqTrainer

    table = NumberTokenTable.from_tokenizer(tokenizer)
    trainer = NTLSeq2SeqTrainer(model=model, args=args, train_dataset=train, data_collator=collator,
                                processing_class=tokenizer, number_token_table=table,
                                ntl_weight=0.3, ntl_loss="was")
    trainer.train()          # logs "loss", "ce" and "ntl"

What the subclass does that the stock Trainer cannot:

- **Causal models are shifted.** With ``model.config.is_encoder_decoder`` False, position t is
  scored against label t + 1 (``shift_labels=True``); encoder-decoder labels are already aligned.
- **Exact means under gradient accumulation.** CE and NTL are means over two different sets of
  positions (non-ignored labels; number-token labels), so each needs its own global count over
  the micro-batches of one optimizer step. Both are counted in :meth:`get_batch_samples`, which
  the Trainer calls once per optimizer step with all of that step's micro-batches, before any
  forward pass. Every micro-batch then contributes ``sum / global_count`` for each term, and the
  accumulated gradient equals that of one batch holding all the micro-batches. The CE count is
  returned as ``num_items_in_batch`` (so the Trainer does not divide the loss by the number of
  accumulation steps once more); under multi-process data parallelism with
  ``average_tokens_across_devices`` both counts are summed over the processes.
- **CE and NTL are logged separately** (``ce`` and ``ntl`` beside ``loss`` at each logging step:
  the means over the optimizer steps since the last log). NTL is logged for ``ntl_weight=0``
  too, so a plain-CE run can be compared with NTL runs on the same scale.

Evaluation losses (``prediction_step``) are per-batch means. ``n_gpu > 1`` inside one process
(``torch.nn.DataParallel``) is not supported; use one process per device. The exact
accumulation needs ``Trainer.get_batch_samples`` (transformers >= 4.46); ``label_smoothing_factor``
is refused (``gaussian_sigma`` is the number-aware smoothing).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Tuple, Union

import torch
from torch import Tensor
from transformers import Seq2SeqTrainer, Trainer

from ..functional import cross_entropy_with_ntl
from ..labels import count_positions
from ..module import _checked_options
from ..table import NumberTokenTable

__all__ = ["NTLTrainerMixin", "NTLTrainer", "NTLSeq2SeqTrainer", "count_loss_items"]


def count_loss_items(
    labels_list: Iterable[Tensor],
    table: NumberTokenTable,
    *,
    shift_labels: bool,
    ignore_index: int = -100,
) -> Tuple[Tensor, Tensor]:
    """``(ce_count, ntl_count)`` over several label tensors: the positions CE and NTL average over
    (:func:`ntl_fast.labels.count_positions`), after the causal shift.

    Args:
        labels_list (iterable of Tensors): the label tensors of one optimizer step.
        table (NumberTokenTable): the number tokens.
        shift_labels (bool): keyword only; count what the causal shift scores (causal models).
        ignore_index (int): default -100.

    Returns:
        tuple[Tensor, Tensor]: int64 0-d tensors on the labels' device (no host synchronisation);
        zeros on the CPU for no label tensor.
    """
    labels_list = list(labels_list)
    if not labels_list:
        return torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64)
    return count_positions(labels_list, table, ignore_index, shift_labels=shift_labels)


class NTLTrainerMixin:
    """Overrides ``compute_loss``, ``get_batch_samples`` and ``log`` of a ``Trainer`` subclass.

    Keyword arguments (besides the Trainer's own):
        number_token_table: the :class:`NumberTokenTable` of the tokenizer (required).
        ntl_weight: λ in ``CE + λ·NTL`` (the paper: 0.3). 0 trains plain CE (or Gaussian-CE).
        ntl_loss: ``"was"`` (default), ``"mse"``, ``"mae"``, ``"huber"``, ``"was_cdf"``.
        gaussian_sigma: Gaussian-CE targets on number positions (σ); with ``"was_cdf"`` the
            paper's GCE + NTL.
        squash_factor, reweigh, backend: passed to :func:`cross_entropy_with_ntl` (defaults
            None, False, ``"auto"``).
        shift_labels: None (default) decides from ``model.config.is_encoder_decoder``.

    Raises:
        TypeError: ``number_token_table`` is not a :class:`NumberTokenTable`.
        ValueError: ``label_smoothing_factor`` is set in the training arguments (use
            ``gaussian_sigma``).
    """

    def __init__(
        self,
        *args: Any,
        number_token_table: NumberTokenTable,
        ntl_weight: float = 0.3,
        ntl_loss: str = "was",
        gaussian_sigma: Optional[float] = None,
        squash_factor: Optional[float] = None,
        reweigh: bool = False,
        backend: str = "auto",
        shift_labels: Optional[bool] = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(number_token_table, NumberTokenTable):
            raise TypeError(
                f"number_token_table must be a NumberTokenTable, got {type(number_token_table).__name__}"
            )
        self.number_token_table = number_token_table
        self.ntl_options: Dict[str, Any] = _checked_options(
            ntl_weight=ntl_weight, loss=ntl_loss, gaussian_sigma=gaussian_sigma, squash_factor=squash_factor,
            reweigh=reweigh, backend=backend,
        )
        super().__init__(*args, **kwargs)
        if self.label_smoother is not None:
            raise ValueError("label_smoothing_factor is not supported with NTL: use gaussian_sigma instead")
        if shift_labels is None:
            config = getattr(self.model, "config", None)
            shift_labels = not bool(getattr(config, "is_encoder_decoder", False))
        self.ntl_shift_labels = bool(shift_labels)
        # The loss below is normalised over the whole accumulated batch: the Trainer must not divide
        # it by the number of accumulation steps again. transformers >= 5 reads the first flag;
        # 4.46-4.5x skip the division when the second is set and num_items_in_batch is not None.
        self.loss_is_scaled_for_ga = True
        self.model_accepts_loss_kwargs = True
        self._ntl_items_in_batch: Optional[Tensor] = None
        self._logged_sums: Optional[Tensor] = None  # on the device: no sync per micro-batch
        self._logged_steps = 0
        self._ntl_logged_this_step = False

    # ------------------------------------------------------------------ counting
    def _world_sum(self, count: Tensor, device: torch.device) -> Tensor:
        count = count.to(device)
        if getattr(self.args, "average_tokens_across_devices", False) and self.args.world_size > 1:
            count = self.accelerator.gather(count.reshape(1)).sum()
        return count

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, *args: Any, **kwargs: Any):
        """Collect one optimizer step's micro-batches and count CE and NTL positions over all of them.

        Returns the Trainer's ``(batch_samples, num_items_in_batch)`` with the CE count (summed
        over processes under ``average_tokens_across_devices``); keeps the NTL count for
        :meth:`compute_loss`."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, *args, **kwargs)
        labels = [batch["labels"] for batch in batch_samples if "labels" in batch]
        if not labels:
            self._ntl_items_in_batch = None
            return batch_samples, None
        ce_count, ntl_count = count_loss_items(
            labels, self.number_token_table, shift_labels=self.ntl_shift_labels
        )
        device = self.args.device
        self._ntl_items_in_batch = self._world_sum(ntl_count, device)
        self._ntl_logged_this_step = False
        return batch_samples, self._world_sum(ce_count, device)

    # ------------------------------------------------------------------ the loss
    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: Dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Optional[Union[Tensor, int]] = None,
    ):
        """CE + ``ntl_weight`` x NTL of ``model(**inputs)`` against ``inputs["labels"]``.

        In training with the step's global counts, CE is divided by ``num_items_in_batch`` and
        NTL by the NTL count of :meth:`get_batch_samples` (exact means under accumulation), and
        the detached terms are recorded for logging; elsewhere (evaluation) both are per-batch
        means. Returns the loss, or ``(loss, outputs)`` with ``return_outputs=True``.
        """
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        if self.ntl_shift_labels is False and "decoder_input_ids" not in inputs:
            unwrapped = self.accelerator.unwrap_model(model)
            if hasattr(unwrapped, "prepare_decoder_input_ids_from_labels"):
                inputs["decoder_input_ids"] = unwrapped.prepare_decoder_input_ids_from_labels(labels=labels)
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]

        global_counts = model.training and num_items_in_batch is not None and self._ntl_items_in_batch is not None
        table = self.number_token_table.to(logits.device)
        result = cross_entropy_with_ntl(
            logits,
            labels,
            table,
            ce_normalizer=num_items_in_batch if global_counts else None,
            ntl_normalizer=self._ntl_items_in_batch if global_counts else None,
            shift_labels=self.ntl_shift_labels,
            **self.ntl_options,
        )
        loss = result.loss
        if global_counts:
            if getattr(self.args, "average_tokens_across_devices", False) and self.args.world_size > 1:
                # each process divides its sum by the global count; DDP averages over processes
                loss = loss * self.args.world_size
            self._record(result.ce, result.ntl)
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ logging
    def _record(self, ce: Tensor, ntl: Tensor) -> None:
        """Add one micro-batch's share (sum / global count) of this optimizer step's CE and NTL."""
        share = torch.stack([ce, ntl]).double()
        self._logged_sums = share if self._logged_sums is None else self._logged_sums + share
        if not self._ntl_logged_this_step:
            self._logged_steps += 1
            self._ntl_logged_this_step = True

    def log(self, logs: Dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add ``ce`` and ``ntl`` (means over the optimizer steps since the last log) beside
        ``loss``, then log as the Trainer does."""
        if "loss" in logs and self._logged_sums is not None and self._logged_steps > 0:
            sums = self._logged_sums
            if self.args.world_size > 1:
                # shares of a global mean add up over processes; per-process means are averaged
                global_means = getattr(self.args, "average_tokens_across_devices", False)
                sums = self.accelerator.reduce(sums, reduction="sum" if global_means else "mean")
            ce, ntl = sums.tolist()
            logs["ce"] = ce / self._logged_steps
            logs["ntl"] = ntl / self._logged_steps
            self._logged_sums = None
            self._logged_steps = 0
        super().log(logs, *args, **kwargs)


class NTLTrainer(NTLTrainerMixin, Trainer):
    """``transformers.Trainer`` with cross-entropy + Number Token Loss (see the module docstring)."""


class NTLSeq2SeqTrainer(NTLTrainerMixin, Seq2SeqTrainer):
    """``transformers.Seq2SeqTrainer`` with cross-entropy + Number Token Loss (see the module docstring)."""
