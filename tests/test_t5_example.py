"""examples/t5_arithmetic: tokenizer, data, metrics, and a few training steps of every variant."""

import importlib
import json
import math
import os
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("mathematics_dataset")

EXAMPLE_DIR = os.path.join(os.path.dirname(__file__), "..", "examples", "t5_arithmetic")
_MODULES = ("data", "metrics", "tokenizer", "train")


def _load_example():
    """Import the example's modules without leaving their short names in sys.modules/sys.path
    (another example may have a data.py too)."""
    saved = {name: sys.modules.pop(name) for name in _MODULES if name in sys.modules}
    sys.path.insert(0, os.path.abspath(EXAMPLE_DIR))
    try:
        train = importlib.import_module("train")
        loaded = {name: sys.modules[name] for name in _MODULES}
    finally:
        sys.path.remove(os.path.abspath(EXAMPLE_DIR))
        for name in _MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
    assert loaded["train"] is train
    return loaded


EXAMPLE = _load_example()
data, metrics, tokenizer_module, train = (EXAMPLE[name] for name in _MODULES)


@pytest.fixture(scope="module")
def tiny_data():
    return data.generate("add_or_sub_small", {"train": 60, "interpolate": 10, "extrapolate": 10}, seed=3)


@pytest.fixture(scope="module")
def tokenizer(tiny_data):
    return tokenizer_module.build_tokenizer(text for pair in tiny_data.train for text in pair)


# ------------------------------------------------------------------------------ tokenizer
def test_tokenizer_splits_digits_and_round_trips(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from ntl_fast import NumberTokenTable

    texts = ["What is -12 - 11?", "-101.6", "Calculate 0.3 + 7.", "1234567890", "Subtract 8906.68 from 3."]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[-1] == tokenizer.eos_token_id
        pieces = tokenizer.convert_ids_to_tokens(ids)
        digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
        assert all(len(p) == 1 for p in digit_pieces), pieces
        assert "".join(digit_pieces) == "".join(c for c in text if c.isdigit())
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    table = NumberTokenTable.from_tokenizer(reloaded)
    assert table.num_numbers == 10
    assert sorted(table.number_values.tolist()) == [float(d) for d in range(10)]


# ------------------------------------------------------------------------------ data
def test_generation_is_deterministic_by_seed(tiny_data):
    sizes = {"train": 60, "interpolate": 10, "extrapolate": 10}
    again = data.generate("add_or_sub_small", sizes, seed=3)
    other = data.generate("add_or_sub_small", sizes, seed=4)
    assert again == tiny_data
    assert other.train != tiny_data.train
    train_questions = {q for q, _ in tiny_data.train}
    assert not train_questions & {q for q, _ in tiny_data.interpolate + tiny_data.extrapolate}
    digits = lambda pairs: sum(c.isdigit() for _, a in pairs for c in a) / len(pairs)  # noqa: E731
    assert digits(tiny_data.extrapolate) > digits(tiny_data.train)  # longer operands, longer answers


def test_add_sub_multiple_and_cache(tmp_path):
    sizes = {"train": 6, "interpolate": 3, "extrapolate": 3}
    first = data.load_or_generate("add_sub_multiple", sizes, 0, str(tmp_path))
    files = sorted(p for p in os.listdir(tmp_path / os.listdir(tmp_path)[0]) if p.endswith(".txt"))
    assert files == ["extrapolate.txt", "interpolate.txt", "train.txt"]
    assert first == data.load_or_generate("add_sub_multiple", sizes, 0, str(tmp_path))
    assert all(metrics.last_number(a) is not None for _, a in first.train + first.extrapolate)


def test_released_files_are_read(tmp_path):
    layout = {
        "train-easy/arithmetic__add_sub_multiple.txt": [("What is 1 + 2?", "3"), ("4 - 6", "-2")],
        "train-hard/arithmetic__add_sub_multiple.txt": [("Calculate 10 - 3 + 1.", "8")],
        "interpolate/arithmetic__add_sub_multiple.txt": [("5 + 5", "10")],
        "extrapolate/arithmetic__add_sub_multiple_longer.txt": [("1 + 2 + 3 + 4", "10")],
    }
    for name, pairs in layout.items():
        data.write_pairs(str(tmp_path / name), pairs)
    loaded = data.load_or_generate("add_sub_multiple", {"train": 10, "interpolate": 5, "extrapolate": 5}, 0,
                                   str(tmp_path / "cache"), data_dir=str(tmp_path))
    assert sorted(loaded.train) == sorted(layout["train-easy/arithmetic__add_sub_multiple.txt"]
                                          + layout["train-hard/arithmetic__add_sub_multiple.txt"])
    assert loaded.interpolate == [("5 + 5", "10")]
    assert loaded.extrapolate == [("1 + 2 + 3 + 4", "10")]


# ------------------------------------------------------------------------------ metrics
def test_last_number():
    assert metrics.last_number("The answer is -3.5") == -3.5
    assert metrics.last_number("12 then 7") == 7.0
    assert metrics.last_number("-0.25") == -0.25
    assert metrics.last_number("x = .5") == 0.5
    assert metrics.last_number("no digits here") is None
    assert metrics.last_number("") is None


def test_number_metrics_on_hand_made_predictions():
    predictions = ["-3", "it is 2.5", "abc", "12"]
    targets = ["-3", "2.25", "4", "10"]
    result = metrics.number_metrics(predictions, targets, runaway=[False, False, False, True])
    assert result["n"] == 4
    assert result["accuracy"] == 0.25
    assert result["no_number"] == 1
    assert result["runaway"] == 1
    assert result["mae"] == pytest.approx((0 + 0.25 + 2) / 3)
    assert result["median_ae"] == pytest.approx(0.25)
    truths, guesses = [-3, 2.25, 10], [-3, 2.5, 12]
    mean = sum(truths) / 3
    r2 = 1 - sum((g - t) ** 2 for g, t in zip(guesses, truths)) / sum((t - mean) ** 2 for t in truths)
    assert result["r2"] == pytest.approx(r2)
    nothing = metrics.number_metrics(["?"], ["1"])
    assert nothing["accuracy"] == 0 and math.isnan(nothing["mae"])
    with pytest.raises(ValueError, match="targets"):
        metrics.number_metrics(["1"], ["1", "2"])


# ------------------------------------------------------------------------------ end to end
def test_every_variant_trains_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--quick", "--output_dir", str(out), "--train_size", "64", "--test_size", "6", "--seed", "1"]
    variants = sorted(train.VARIANTS)
    results = train.main(common + ["--max_steps", "2", "--save_steps", "2", "--variants", *variants])
    assert sorted(results) == variants
    for name, result in results.items():
        assert result["log_history"][-1]["step"] == 2
        logged = [entry for entry in result["log_history"] if "ce" in entry]
        assert logged and all(math.isfinite(entry["ntl"]) for entry in logged), name
        for split in ("interpolate", "extrapolate"):
            assert result["metrics"][split]["n"] == 6
    summary = json.loads((out / "results.json").read_text())
    assert sorted(summary["variants"]) == variants
    assert (out / "results.png").stat().st_size > 0
    assert "always 0" in (out / "results.md").read_text()
    assert (out / "tokenizer" / "tokenizer.json").exists()

    # a finished variant is reused; an unfinished one continues from its last checkpoint
    os.remove(out / "ntl-was" / "metrics.json")
    capsys.readouterr()
    resumed = train.main(common + ["--max_steps", "4", "--variants", "ce", "ntl-was", "--resume"])
    printed = capsys.readouterr().out
    assert "[ce] finished before" in printed
    assert "[ntl-was] resuming from" in printed and "checkpoint-2" in printed
    assert resumed["ce"]["log_history"] == results["ce"]["log_history"]
    history = resumed["ntl-was"]["log_history"]
    losses = [entry for entry in history if "loss" in entry]
    assert [entry["step"] for entry in losses] == [1, 2, 3, 4]
    # steps 1-2 come from the checkpoint of the 2-step run (its learning-rate schedule), not a rerun
    first_run = [entry for entry in results["ntl-was"]["log_history"] if "loss" in entry]
    assert losses[:2] == first_run
