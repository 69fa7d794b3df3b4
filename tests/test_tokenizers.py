"""Number-token tables of tiny tokenizers built here that reproduce real schemes (no download).

LLaMA-3 splits numbers into chunks of up to three digits, Qwen into single digits, GPT-2 marks
word-initial pieces with ``Ġ`` (byte-level BPE, multi-digit pieces), T5 with ``▁`` (Metaspace).
"""

import math

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ntl_fast import NumberTokenTable

DIGITS = [str(d) for d in range(10)]


def _word_level(words, pre_tokenizer):
    vocab = {word: index for index, word in enumerate(dict.fromkeys(["<unk>", "<pad>"] + words))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizer
    return tokenizer


def llama3_like():
    split = pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated")
    words = ["x", "+", "=", "is"] + DIGITS + ["12", "123", "45", "999", "2019", "1.5"]
    return _word_level(words, pre_tokenizers.Sequence([split, pre_tokenizers.WhitespaceSplit()]))


def qwen_like():
    digits = pre_tokenizers.Digits(individual_digits=True)
    words = ["x", "+", "=", "."] + DIGITS
    return _word_level(words, pre_tokenizers.Sequence([digits, pre_tokenizers.WhitespaceSplit()]))


def gpt2_like():
    words = ["x", "Ġ+", "Ġ=", "Ġx"] + DIGITS + ["12", "Ġ12", "Ġ5", "Ġ3", "Ġ2019", "Ġ-3"]
    return _word_level(words, pre_tokenizers.ByteLevel(add_prefix_space=False))


def t5_like():
    words = ["▁", "▁x", "▁+", "▁="] + DIGITS + ["▁5", "▁7", "▁12"]
    return _word_level(words, pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"))


def _numbers(table, tokenizer):
    """{token: value} of the table's number tokens."""
    inverse = {index: token for token, index in tokenizer.get_vocab().items()}
    return {inverse[int(i)]: float(table.values[i]) for i in table.number_ids}


def _hf(tokenizer):
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>")


def test_llama3_scheme_three_digit_chunks():
    tokenizer = llama3_like()
    assert tokenizer.encode("x = 12345").tokens == ["x", "=", "123", "45"]
    digit = NumberTokenTable.from_tokenizer(tokenizer)
    assert _numbers(digit, tokenizer) == {d: float(d) for d in DIGITS}
    multi = NumberTokenTable.from_tokenizer(tokenizer, digit_level=False)
    assert _numbers(multi, tokenizer) == {**{d: float(d) for d in DIGITS}, "12": 12.0, "123": 123.0,
                                          "45": 45.0, "999": 999.0, "2019": 2019.0, "1.5": 1.5}
    assert multi.max_value == 2019.0 and multi.dot_id is None


def test_qwen_scheme_single_digits():
    tokenizer = _hf(qwen_like())
    assert tokenizer.tokenize("x = 2024.5") == ["x", "=", "2", "0", "2", "4", ".", "5"]
    digit = NumberTokenTable.from_tokenizer(tokenizer)
    multi = NumberTokenTable.from_tokenizer(tokenizer, digit_level=False)
    assert torch.equal(digit.number_ids, multi.number_ids) and digit.num_numbers == 10
    assert digit.dot_id == tokenizer.convert_tokens_to_ids(".")


def test_gpt2_scheme_marked_multi_digit_pieces():
    tokenizer = gpt2_like()
    assert tokenizer.encode("x + 12").tokens == ["x", "Ġ+", "Ġ12"]
    assert _numbers(NumberTokenTable.from_tokenizer(tokenizer), tokenizer) == {d: float(d) for d in DIGITS}
    marked = NumberTokenTable.from_tokenizer(tokenizer, include_marked=True)
    assert _numbers(marked, tokenizer) == {**{d: float(d) for d in DIGITS}, "Ġ5": 5.0, "Ġ3": 3.0}
    multi = NumberTokenTable.from_tokenizer(tokenizer, digit_level=False)
    assert set(_numbers(multi, tokenizer)) == set(DIGITS) | {"12"}
    multi_marked = NumberTokenTable.from_tokenizer(tokenizer, digit_level=False, include_marked=True)
    assert _numbers(multi_marked, tokenizer) == {**{d: float(d) for d in DIGITS}, "12": 12.0, "Ġ12": 12.0,
                                                 "Ġ5": 5.0, "Ġ3": 3.0, "Ġ2019": 2019.0, "Ġ-3": -3.0}


def test_t5_scheme_metaspace():
    tokenizer = _hf(t5_like())
    assert tokenizer.tokenize("x = 5") == ["▁x", "▁=", "▁5"]
    assert NumberTokenTable.from_tokenizer(tokenizer).num_numbers == 10
    marked = NumberTokenTable.from_tokenizer(tokenizer, include_marked=True)
    assert _numbers(marked, tokenizer) == {**{d: float(d) for d in DIGITS}, "▁5": 5.0, "▁7": 7.0}
    assert "▁" not in _numbers(NumberTokenTable.from_tokenizer(tokenizer, digit_level=False, include_marked=True),
                               tokenizer)


@pytest.mark.parametrize("build", [llama3_like, qwen_like, gpt2_like, t5_like])
def test_padded_vocab_and_tokenizer_untouched(build):
    raw = build()
    tokenizer = _hf(raw)
    before = (dict(tokenizer.get_vocab()), len(tokenizer), raw.get_vocab_size(with_added_tokens=True))
    table = NumberTokenTable.from_tokenizer(tokenizer, vocab_size=len(tokenizer) + 37)
    NumberTokenTable.from_tokenizer(raw, digit_level=False, include_marked=True)
    assert table.vocab_size == len(tokenizer) + 37
    assert torch.isnan(table.values[len(tokenizer):]).all()
    assert int(table.number_ids.max()) < len(tokenizer)
    assert (dict(tokenizer.get_vocab()), len(tokenizer), raw.get_vocab_size(with_added_tokens=True)) == before
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        NumberTokenTable.from_tokenizer(tokenizer, vocab_size=len(tokenizer) - 1)


def test_missing_digits_are_named():
    tokenizer = _word_level(["x", "0", "1", "2", "3", "4", "5", "6", "8", "12"], pre_tokenizers.WhitespaceSplit())
    with pytest.raises(ValueError, match=r"lacks digit tokens \['7', '9'\]"):
        NumberTokenTable.from_tokenizer(tokenizer)
    # multi-digit mode does not need every digit
    assert NumberTokenTable.from_tokenizer(tokenizer, digit_level=False).num_numbers == 9
    assert tokenizer.get_vocab_size() == 12  # and the error changed nothing


def test_no_number_tokens_is_an_error():
    tokenizer = _word_level(["x", "y", "Ġ1x", "1e5", "inf", "١"], pre_tokenizers.WhitespaceSplit())
    with pytest.raises(ValueError, match="no number tokens"):
        NumberTokenTable.from_tokenizer(tokenizer, digit_level=False, include_marked=True)


def test_marked_values_are_finite_floats():
    table = NumberTokenTable.from_tokenizer(gpt2_like(), digit_level=False, include_marked=True)
    assert all(math.isfinite(v) for v in table.number_values.tolist())
