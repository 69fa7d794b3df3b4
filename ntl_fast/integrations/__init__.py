"""Integrations of the Number Token Loss with training frameworks.

``NTLTrainer`` / ``NTLSeq2SeqTrainer`` train any Hugging Face causal or seq2seq model with
:func:`ntl_fast.cross_entropy_with_ntl` through ``transformers.Trainer``. Importing this package
imports ``transformers``; the core package does not need it.
"""

from .trainer import NTLSeq2SeqTrainer, NTLTrainer, NTLTrainerMixin, count_loss_items

__all__ = ["NTLSeq2SeqTrainer", "NTLTrainer", "NTLTrainerMixin", "count_loss_items"]
