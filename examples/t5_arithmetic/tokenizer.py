"""The paper's digit-splitting T5-style tokenizer, built offline with `tokenizers`.

Every digit is its own token (``Digits(individual_digits=True)``), words get SentencePiece's
``▁`` marker (``Metaspace``), and the rest is a small BPE learned from the training text.
Special tokens follow T5: ``<pad>`` = 0 (also the decoder start), ``</s>`` = 1, ``<unk>`` = 2;
``</s>`` is appended to every encoded text.
"""

from __future__ import annotations

import string
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]
# Every printable ASCII character is in the vocabulary, whatever the training text held.
ALPHABET = sorted(set(string.digits + string.ascii_letters + string.punctuation + "\u2581"))


def build_tokenizer(texts: Iterable[str], vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """A digit-splitting BPE tokenizer learned from ``texts`` (deterministic for the same texts)."""
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    core.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=ALPHABET,
        show_progress=False,
    )
    core.train_from_iterator(list(texts), trainer=trainer)
    eos_id = core.token_to_id("</s>")
    core.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
    )
