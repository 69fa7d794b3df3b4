"""NumberTokenTable (docs/math.md §1) on tokenizers built here with `tokenizers`."""

import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ntl_fast import NumberTokenTable


def make_tokenizer(tokens):
    """A WordLevel tokenizer with exactly these tokens (id = position), wrapped for HF."""
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


TEXT = ["[PAD]", "[UNK]", "the", "sum", "is", ".", "+", "="]
DIGITS = [str(d) for d in range(10)]


def test_digit_level_values_and_ids():
    tokenizer = make_tokenizer(TEXT + DIGITS + ["12", "\u25815", "\u01207"])
    table = NumberTokenTable.from_tokenizer(tokenizer)
    assert table.vocab_size == len(tokenizer)
    assert table.num_numbers == 10
    ids = [tokenizer.convert_tokens_to_ids(d) for d in DIGITS]
    assert table.number_ids.tolist() == sorted(ids)
    for digit, token_id in zip(range(10), ids):
        assert table.values[token_id].item() == digit
        assert table.number_index[token_id].item() == table.number_ids.tolist().index(token_id)
    assert torch.isnan(table.values[tokenizer.convert_tokens_to_ids("12")])
    assert table.is_number.sum().item() == 10
    assert table.dot_id == tokenizer.convert_tokens_to_ids(".")
    assert (table.min_value, table.max_value) == (0.0, 9.0)
    assert (table.min_distance, table.max_distance) == (1.0, 9.0)


def test_marked_digits_included_on_request():
    tokenizer = make_tokenizer(TEXT + DIGITS + ["\u25815", "\u01207", " 3", "\u2581\u25814"])
    plain = NumberTokenTable.from_tokenizer(tokenizer)
    marked = NumberTokenTable.from_tokenizer(tokenizer, include_marked=True)
    assert plain.num_numbers == 10
    assert marked.num_numbers == 13  # one marker only: "▁▁4" is not a number token
    assert marked.values[tokenizer.convert_tokens_to_ids("\u25815")].item() == 5.0
    assert marked.values[tokenizer.convert_tokens_to_ids("\u01207")].item() == 7.0
    assert marked.values[tokenizer.convert_tokens_to_ids(" 3")].item() == 3.0
    # duplicates of a value are at distance 0, which squash keeps at 0
    distance = marked.distance_matrix(squash_factor=3.0)
    i = marked.number_index[tokenizer.convert_tokens_to_ids("5")]
    j = marked.number_index[tokenizer.convert_tokens_to_ids("\u25815")]
    assert distance[i, j].item() == 0.0


def test_multi_digit_mode_accepts_ascii_decimals_only():
    extra = ["12", "2019", "1.5", "-3", "+4", ".5", "7.", "1e5", "1_0", "\u0663", "inf", "nan", "--1", "\u258142"]
    tokenizer = make_tokenizer(TEXT + DIGITS + extra)
    table = NumberTokenTable.from_tokenizer(tokenizer, digit_level=False)
    value = {token: table.values[tokenizer.convert_tokens_to_ids(token)].item() for token in extra}
    assert value["12"] == 12 and value["2019"] == 2019 and value["1.5"] == 1.5
    assert value["-3"] == -3 and value["+4"] == 4 and value[".5"] == 0.5 and value["7."] == 7
    for rejected in ["1e5", "1_0", "\u0663", "inf", "nan", "--1", "\u258142"]:
        assert math.isnan(value[rejected]), rejected
    marked = NumberTokenTable.from_tokenizer(tokenizer, digit_level=False, include_marked=True)
    assert marked.values[tokenizer.convert_tokens_to_ids("\u258142")].item() == 42


def test_padded_vocabulary_and_too_small_vocab_size():
    tokenizer = make_tokenizer(TEXT + DIGITS)
    table = NumberTokenTable.from_tokenizer(tokenizer, vocab_size=64)
    assert table.vocab_size == 64 and table.values.numel() == 64
    assert not table.is_number[len(tokenizer):].any()
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        NumberTokenTable.from_tokenizer(tokenizer, vocab_size=len(tokenizer) - 1)


def test_missing_digits_named():
    tokenizer = make_tokenizer(TEXT + ["0", "1", "2", "4", "5", "6", "8", "9"])
    with pytest.raises(ValueError, match=r"\['3', '7'\]"):
        NumberTokenTable.from_tokenizer(tokenizer)


def test_no_numbers_or_only_numbers_is_an_error():
    with pytest.raises(ValueError, match="no number tokens"):
        NumberTokenTable.from_tokenizer(make_tokenizer(TEXT), digit_level=False)
    with pytest.raises(ValueError, match="every token"):
        NumberTokenTable.from_values([0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="no number tokens"):
        NumberTokenTable.from_values([float("nan")] * 4)


def test_tokenizer_is_never_mutated():
    tokenizer = make_tokenizer(TEXT + DIGITS[:5])
    before = (len(tokenizer), dict(tokenizer.get_vocab()))
    with pytest.raises(ValueError):
        NumberTokenTable.from_tokenizer(tokenizer)
    complete = make_tokenizer(TEXT + DIGITS)
    complete_before = (len(complete), dict(complete.get_vocab()))
    NumberTokenTable.from_tokenizer(complete, vocab_size=32, include_marked=True)
    assert (len(tokenizer), dict(tokenizer.get_vocab())) == before
    assert (len(complete), dict(complete.get_vocab())) == complete_before


def test_raw_tokenizers_object_is_accepted():
    tokenizer = make_tokenizer(TEXT + DIGITS)
    raw = tokenizer.backend_tokenizer
    assert NumberTokenTable.from_tokenizer(raw).number_ids.tolist() == (
        NumberTokenTable.from_tokenizer(tokenizer).number_ids.tolist()
    )
    with pytest.raises(TypeError, match="get_vocab"):
        NumberTokenTable.from_tokenizer(object())


def test_from_values_mapping_dense_and_errors():
    table = NumberTokenTable.from_values({2: 0.0, 5: 10.0, 6: 20.0}, vocab_size=8)
    assert table.number_ids.tolist() == [2, 5, 6]
    assert table.number_values.tolist() == [0.0, 10.0, 20.0]
    dense = NumberTokenTable.from_values(table.values, vocab_size=12)
    assert dense.vocab_size == 12 and dense.number_ids.tolist() == [2, 5, 6]
    with pytest.raises(ValueError, match="vocab_size is required"):
        NumberTokenTable.from_values({1: 1.0})
    with pytest.raises(ValueError, match="outside"):
        NumberTokenTable.from_values({9: 1.0}, vocab_size=8)
    with pytest.raises(ValueError, match="non-finite"):
        NumberTokenTable.from_values({1: float("inf")}, vocab_size=8)
    with pytest.raises(ValueError, match="finite"):
        NumberTokenTable.from_values([float("nan"), float("inf"), 1.0])


def test_sorted_order_gaps_and_ranks():
    table = NumberTokenTable.from_values({0: 9.0, 3: -3.0, 4: 2.5, 7: 100.0}, vocab_size=9)
    values = table.number_values
    assert values[table.value_order].tolist() == [-3.0, 2.5, 9.0, 100.0]
    assert table.sorted_gaps.tolist() == [5.5, 6.5, 91.0]
    assert table.value_rank[table.value_order].tolist() == [0, 1, 2, 3]


def test_squash_maps_nonzero_distances_onto_one_to_s():
    table = NumberTokenTable.from_values({i: v for i, v in enumerate([0.0, 1.0, 3.0, 10.0, 10.0])}, vocab_size=7)
    squashed = table.distance_matrix(squash_factor=4.0)
    raw = table.distance_matrix()
    nonzero = raw > 0
    assert torch.all(squashed[~nonzero] == 0)
    assert squashed[nonzero].min().item() == pytest.approx(1.0)
    assert squashed[nonzero].max().item() == pytest.approx(4.0)
    expected = 1 + (raw - 1.0) * 3.0 / (10.0 - 1.0)
    torch.testing.assert_close(squashed[nonzero], expected[nonzero])
    # order is preserved (a linear map)
    flat_raw, flat_sq = raw[nonzero], squashed[nonzero]
    assert torch.equal(torch.argsort(flat_raw, stable=True), torch.argsort(flat_sq, stable=True))
    # K = 2: d_max == d_min, every non-zero distance maps to 1
    two = NumberTokenTable.from_values({0: 0.0, 1: 5.0}, vocab_size=3)
    assert two.distance_matrix(squash_factor=9.0).tolist() == [[0.0, 1.0], [1.0, 0.0]]
    for bad in (1.0, 0.5, -2.0):
        with pytest.raises(ValueError, match="squash_factor"):
            table.distance_matrix(squash_factor=bad)


def test_reweigh_constants():
    table = NumberTokenTable.from_values({i: float(i) for i in range(10)}, vocab_size=12)
    assert table.reweigh_constant("was") == pytest.approx(1.01 * 9)
    assert table.reweigh_constant("was", squash_factor=3.0) == pytest.approx(1.01 * 3)
    assert table.reweigh_constant("mse") == pytest.approx(1.01 * 81)
    assert table.reweigh_constant("mae") == pytest.approx(1.01 * 9)
    assert table.reweigh_constant("huber") == pytest.approx(1.01 * 8.5)
    assert table.reweigh_constant("was_cdf") == pytest.approx(1.01 * 9)


def test_to_device_is_cached_and_does_not_change_the_table():
    table = NumberTokenTable.from_values({1: 1.0, 2: 2.0}, vocab_size=4)
    assert table.to("cpu") is table
    assert table.resized(6).vocab_size == 6 and table.resized(6) is table.resized(6)
    assert table.vocab_size == 4
    with pytest.raises(ValueError, match="shrink"):
        table.resized(3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_cuda():
    table = NumberTokenTable.from_values({1: 1.0, 2: 2.0}, vocab_size=4)
    moved = table.to("cuda")
    assert moved.values.is_cuda and moved.number_ids.is_cuda and not table.values.is_cuda
    assert moved.to("cpu") is table


def test_table_contents_are_checked_when_built():
    """Values whose spread overflows float32 (distances inf), and non-integer ids, are refused
    when the table is built, not when a kernel indexes with them."""
    with pytest.raises(ValueError, match="overflows float32"):
        NumberTokenTable.from_values({1: -3e38, 2: 3e38}, vocab_size=4)
    with pytest.raises(ValueError, match="token ids must be integers"):
        NumberTokenTable.from_values({1.5: 2.0, 2: 3.0}, vocab_size=4)
    with pytest.raises(ValueError, match="finite"):
        NumberTokenTable.from_values(torch.tensor([1e39, 0.0, float("nan")], dtype=torch.float64))
    table = NumberTokenTable.from_values({3: 2.0, 0: 2.0, 7: -1.0}, vocab_size=9)  # a duplicate value
    assert table.value_order.tolist() == [2, 0, 1] and table.value_rank.tolist() == [1, 2, 0]


def test_table_checks_what_kernels_index_with():
    table = NumberTokenTable.from_values({1: 0.0, 4: 1.0, 6: 2.0}, vocab_size=8)
    cases = {
        "number_ids": (torch.tensor([1, 4, 4]), "unique"),
        "value_order": (torch.tensor([0, 0, 2]), "permutation"),
        "value_rank": (torch.tensor([2, 1, 0]), "inverse"),
        "number_index": (torch.full((8,), -1), "number_index"),
    }
    for name, (bad, message) in cases.items():
        broken = object.__new__(NumberTokenTable)
        broken.__dict__.update(table.__dict__)
        setattr(broken, name, bad)
        with pytest.raises(ValueError, match=message):
            broken._check_contents()
