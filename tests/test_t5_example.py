"""examples/t5_arithmetic: tokenizer, data, metrics, statistics over seeds, a few training steps of
every variant, reproducibility (in one process and across worker processes), and the smoke test."""

import importlib
import json
import math
import os
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("mathematics_dataset")

EXAMPLE_DIR = os.path.join(os.path.dirname(__file__), "..", "examples", "t5_arithmetic")
_MODULES = ("data", "metrics", "stats", "tokenizer", "train")


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
data, metrics, stats, tokenizer_module, train = (EXAMPLE[name] for name in _MODULES)


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


def test_integer_task():
    sizes = {"train": 3000, "interpolate": 200, "extrapolate": 200}
    generated = data.generate("add_sub_3by1", sizes, seed=5)
    assert generated == data.generate("add_sub_3by1", sizes, seed=5)
    assert generated.train != data.generate("add_sub_3by1", sizes, seed=6).train
    assert [len(generated.split(name)) for name in data.SPLITS] == [3000, 200, 200]
    assert not {q for q, _ in generated.train} & {q for q, _ in generated.interpolate + generated.extrapolate}
    for name, (low, high) in {"train": (0, 999), "interpolate": (0, 999), "extrapolate": (1000, 9999)}.items():
        for question, answer in generated.split(name):
            first, op, second = question[len("What is "):-1].split(" ")
            assert low <= int(first) <= high and 0 <= int(second) <= 9, question
            assert int(answer) == (int(first) + int(second) if op == "+" else int(first) - int(second))
    operators = {q.split(" ")[3] for q, _ in generated.train}
    assert operators == {"+", "-"}


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
    assert result["within_1"] == 0.5  # -3 and 2.5; "abc" holds no number and counts as wrong
    assert result["within_10pct"] == 0.25  # 2.5 vs 2.25 is 11% off, 12 vs 10 is 20% off
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


def test_within_shares_at_the_edges():
    result = metrics.number_metrics(["0", "1", "110", "-91", "9"], ["0", "0", "100", "-100", "10"])
    assert result["accuracy"] == 0.2
    assert result["within_1"] == 0.6  # 0, 1 and 9
    assert result["within_10pct"] == 0.8  # 0 exact, 110 and 9 exactly 10% off, -91 9% off; 1 for 0 is not


# ------------------------------------------------------------------------------ statistics
def test_t_quantiles_match_published_tables():
    # two-sided 95% critical values of Student's t (any statistics table)
    for df, value in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)]:
        assert stats.t_quantile(0.975, df) == pytest.approx(value, abs=1e-4)
    assert stats.t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-6)
    assert stats.t_quantile(0.025, 4) == pytest.approx(-2.7764, abs=1e-4)
    assert stats.t_cdf(0.0, 7) == pytest.approx(0.5)
    assert stats.t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + arctan(1)/pi
    with pytest.raises(ValueError, match="p must"):
        stats.t_quantile(1.0, 3)


def test_paired_difference():
    control = [0.50, 0.60, 0.55, 0.70]
    treated = [0.55, 0.62, 0.60, 0.71]
    result = stats.paired_difference(treated, control)
    differences = [0.05, 0.02, 0.05, 0.01]
    mean = sum(differences) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / 3)
    half = 3.1824 * sd / 2  # t(0.975, 3) = 3.1824, sqrt(4) = 2
    assert result["mean"] == pytest.approx(mean)
    assert result["sd"] == pytest.approx(sd)
    assert result["low"] == pytest.approx(mean - half, abs=1e-5)
    assert result["high"] == pytest.approx(mean + half, abs=1e-5)
    one = stats.paired_difference([1.0], [0.5])
    assert one["mean"] == 0.5 and math.isnan(one["low"]) and math.isnan(one["sd"])
    with pytest.raises(ValueError, match="control"):
        stats.paired_difference([1.0, 2.0], [1.0])


def _fake_run(label, seed, accuracy, median_ae=2.0):
    split = {"n": 10, "accuracy": accuracy, "within_1": accuracy, "within_10pct": accuracy, "median_ae": median_ae,
             "mae": median_ae, "runaway": 0, "no_number": 0}
    return {"label": label, "seed": seed,
            "metrics": {"interpolate": dict(split), "extrapolate": dict(split, accuracy=0.0)}}


def test_seed_summary_and_verdict():
    baselines = {seed: {name: {"accuracy": 0.0, "within_1": 0.0, "within_10pct": 0.0, "median_ae": 5.0, "mae": 5.0,
                               "no_number": 0} for name in train.SPLITS} for seed in (1, 2, 3)}
    runs = [_fake_run("ce", 1, 0.5), _fake_run("ce", 2, 0.6), _fake_run("ce", 3, 0.7),
            _fake_run("ntl-was", 1, 0.6), _fake_run("ntl-was", 2, 0.72), _fake_run("ntl-was", 3, 0.79)]
    summary = train.summarise(runs, baselines)
    assert summary["labels"] == ["ce", "ntl-was"]
    assert summary["metrics"]["ce"]["interpolate"]["accuracy"]["mean"] == pytest.approx(0.6)
    assert summary["metrics"]["ce"]["interpolate"]["accuracy"]["sd"] == pytest.approx(0.1)
    difference = summary["differences"]["ntl-was"]["interpolate"]["accuracy"]
    assert difference["mean"] == pytest.approx((0.1 + 0.12 + 0.09) / 3)
    assert difference["low"] > 0
    assert summary["learnt"] == {"interpolate": True, "extrapolate": False}
    text = train.report(summary, "ntl-was")
    assert "60.0 ± 10.0%" in text
    assert "no variant learns this split" in text.split("**extrapolate**")[1].splitlines()[0]
    assert "ntl-was was more accurate" in text
    # listed the other way round: the labels keep that order, and CE is still the control
    reordered = train.summarise([runs[3], runs[4], runs[5], runs[0], runs[1], runs[2]], baselines)
    assert reordered["labels"] == ["ntl-was", "ce"] and list(reordered["differences"]) == ["ntl-was"]
    # a difference within the spread, and one below 0
    mixed = [_fake_run("ntl-was", 1, 0.45), _fake_run("ntl-was", 2, 0.7), _fake_run("ntl-was", 3, 0.72)]
    text = train.report(train.summarise(runs[:3] + mixed, baselines), "ntl-was")
    assert "the interval includes 0" in text
    lower = [_fake_run("ntl-was", seed, acc - 0.1) for seed, acc in ((1, 0.5), (2, 0.61), (3, 0.69))]
    assert "ntl-was was less accurate" in train.report(train.summarise(runs[:3] + lower, baselines), "ntl-was")


# ------------------------------------------------------------------------------ end to end
QUICK = ["--quick", "--train_size", "64", "--test_size", "6"]


def _runs_by_key(result):
    return {(r["label"], r["seed"]): r for r in result["runs"]}


def test_every_variant_trains_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    common = QUICK + ["--output_dir", str(out), "--seeds", "1"]
    variants = sorted(train.VARIANTS)
    results = _runs_by_key(train.main(common + ["--max-steps", "2", "--save_steps", "2", "--variants", *variants]))
    assert sorted(label for label, _ in results) == variants
    for (name, _), result in results.items():
        assert result["log_history"][-1]["step"] == 2
        logged = [entry for entry in result["log_history"] if "ce" in entry]
        assert logged and all(math.isfinite(entry["ntl"]) for entry in logged), name
        for split in ("interpolate", "extrapolate"):
            assert result["metrics"][split]["n"] == 6
    summary = json.loads((out / "results.json").read_text())
    assert summary["complete"] and sorted(summary["summary"]["labels"]) == variants
    assert (out / "results.png").stat().st_size > 0
    assert "always 0" in (out / "results.md").read_text()
    assert (out / "tokenizer" / "tokenizer.json").exists()

    # a finished run is reused; an unfinished one continues from its last checkpoint
    os.remove(out / "ntl-was" / "seed1" / "metrics.json")
    capsys.readouterr()
    resumed = _runs_by_key(train.main(common + ["--max-steps", "4", "--variants", "ce", "ntl-was", "--resume"]))
    printed = capsys.readouterr().out
    assert "[ce seed 1] finished before" in printed
    assert "[ntl-was seed 1] resuming from" in printed and "checkpoint-2" in printed
    assert resumed[("ce", 1)]["log_history"] == results[("ce", 1)]["log_history"]
    history = resumed[("ntl-was", 1)]["log_history"]
    losses = [entry for entry in history if "loss" in entry]
    assert [entry["step"] for entry in losses] == [1, 2, 3, 4]
    # steps 1-2 come from the checkpoint of the 2-step run (its learning-rate schedule), not a rerun
    first_run = [entry for entry in results[("ntl-was", 1)]["log_history"] if "loss" in entry]
    assert losses[:2] == first_run

    # --summarise trains nothing and reports what has finished, as partial when runs are missing
    (out / "results.md").unlink()
    summarised = train.main(common[:-1] + ["1", "2", "--variants", "ce", "ntl-was", "--summarise"])
    assert sorted((r["label"], r["seed"]) for r in summarised["runs"]) == [("ce", 1), ("ntl-was", 1)]
    assert not (out / "ce" / "seed2").exists()
    table = (out / "results.md").read_text()
    assert "partial: 2 of 4 runs finished" in table and "seeds 1;" in table


def _comparable(run):
    """What must not change between two runs of the same seed (timings may), as JSON (NaN == NaN)."""
    return json.dumps({"metrics": run["metrics"], "examples": run["examples"],
                       "losses": [(e["step"], e["loss"], e["ce"], e["ntl"])
                                  for e in run["log_history"] if "loss" in e]},
                      sort_keys=True)


def test_same_seed_same_numbers_in_process_and_in_workers(tmp_path):
    """Two seeds and two λ, run in this process and again in two worker processes: the same numbers
    both times, different numbers for different seeds and λ, and the seeds summarised."""
    common = QUICK + ["--seeds", "1", "2", "--max-steps", "4", "--ntl_weight", "0.3", "0.8"]
    here = _runs_by_key(train.main(common + ["--output_dir", str(tmp_path / "a")]))
    workers = _runs_by_key(train.main(common + ["--output_dir", str(tmp_path / "b"), "--workers", "2"]))
    assert sorted(here) == sorted(workers) == [("ce", 1), ("ce", 2), ("ntl-was λ0.3", 1), ("ntl-was λ0.3", 2),
                                               ("ntl-was λ0.8", 1), ("ntl-was λ0.8", 2)]
    for key in here:
        assert _comparable(here[key]) == _comparable(workers[key]), key
    assert _comparable(here[("ce", 1)]) != _comparable(here[("ce", 2)])
    assert _comparable(here[("ntl-was λ0.3", 1)]) != _comparable(here[("ntl-was λ0.8", 1)])
    assert (tmp_path / "a" / "results.md").read_text().split("\n", 1)[1] == \
        (tmp_path / "b" / "results.md").read_text().split("\n", 1)[1]  # all but the wall time
    summary = json.loads((tmp_path / "b" / "results.json").read_text())["summary"]
    assert summary["seeds"] == {"ce": [1, 2], "ntl-was λ0.3": [1, 2], "ntl-was λ0.8": [1, 2]}
    assert summary["differences"]["ntl-was λ0.8"]["interpolate"]["accuracy"]["n"] == 2


def test_smoke_preset_on_cpu(tmp_path):
    out = tmp_path / "smoke"
    result = train.main(["--preset", "paper", "--smoke", "--max-steps", "2", "--out", str(out)])
    saved = json.loads((out / "smoke.json").read_text())
    assert saved == result
    assert saved["steps"] == 2 and saved["steps_per_second"] > 0
    assert saved["parameters"] > 40e6  # the T5-small-sized model of the paper preset
    assert saved["peak_memory_bytes"] > 0 and saved["peak_memory_kind"] == "peak RSS of the process"
    assert math.isfinite(saved["first_loss"]) and math.isfinite(saved["last_loss"])
