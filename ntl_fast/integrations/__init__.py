"""Integrations of the Number Token Loss with training frameworks.

``NTLTrainer`` / ``NTLSeq2SeqTrainer`` train any Hugging Face causal or seq2seq model with
:func:`ntl_fast.cross_entropy_with_ntl` through ``transformers.Trainer``;
``count_loss_items`` counts a step's CE and NTL positions. :mod:`ntl_fast.integrations.causal_lm`
(``enable_ntl`` / ``disable_ntl``) makes a causal LM's own forward compute CE + NTL through the
fused LM-head path. Importing these imports ``transformers`` (``pip install "ntl_fast[hf]"``); the
core package does not need it.
"""

from .trainer import NTLSeq2SeqTrainer, NTLTrainer, NTLTrainerMixin, count_loss_items

__all__ = ["NTLSeq2SeqTrainer", "NTLTrainer", "NTLTrainerMixin", "count_loss_items"]
