"""Train T5 on arithmetic with cross-entropy and with the Number Token Loss, and compare them.

The paper's arithmetic experiment (Zausinger et al., "Regress, Don't Guess") end to end, offline:
the data is generated (or ``--data_dir`` reads the released files), a digit-splitting T5
tokenizer is built and saved, every variant trains a T5 from the same initial weights on the
same batches for the same number of steps (``ntl_fast.integrations.NTLSeq2SeqTrainer``) once per
seed, each model is scored by greedy generation (the last number of the output against the
answer), and the seeds are summarised: mean ± standard deviation per metric, and each variant's
paired per-seed difference from CE with its 95% confidence interval.

    python examples/t5_arithmetic/train.py                  # CPU demo: CE vs NTL-WAS, 3 seeds
    python examples/t5_arithmetic/train.py --preset study   # 5 variants, 5 seeds, λ 0.3 and 0.8 (CPU)
    python examples/t5_arithmetic/train.py --quick          # a few seconds, checks the plumbing
    python examples/t5_arithmetic/train.py --preset paper --bf16 --variants ce ntl-mse ntl-was
    python examples/t5_arithmetic/train.py --preset paper --smoke --out DIR   # GPU throughput check

The CPU demo trains a 0.9M-parameter T5 on ``What is 347 - 6?`` (integers, generated directly);
``--preset paper`` is the paper's ``add_sub_multiple`` (DeepMind's generator) with a
T5-small-sized model, meant for a GPU. Same seed, same numbers: runs are single-threaded and
deterministic, and ``--workers`` runs several of them side by side as separate processes.
Everything a run writes goes to ``--output_dir``: the cached data, the tokenizer, one folder per
variant and seed (metrics, training log, example outputs), and ``results.json`` /
``results.md`` / ``results.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

try:
    import ntl_fast  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from data import TASKS, ArithmeticData, load_or_generate  # noqa: E402
from metrics import number_metrics  # noqa: E402
from stats import mean_sd, paired_difference  # noqa: E402
from tokenizer import build_tokenizer  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
    TrainerCallback,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

from ntl_fast import NumberTokenTable  # noqa: E402
from ntl_fast.integrations import NTLSeq2SeqTrainer  # noqa: E402

# Each variant: (uses ntl_weight, NTL loss, Gaussian-CE targets). λ comes from --ntl_weight.
VARIANTS: Dict[str, Tuple[bool, str, bool]] = {
    "ce": (False, "was", False),
    "ntl-mse": (True, "mse", False),
    "ntl-mae": (True, "mae", False),
    "ntl-huber": (True, "huber", False),
    "ntl-was": (True, "was", False),
    "gaussian-ce": (False, "was", True),
    "gce-ntl-was": (True, "was_cdf", True),  # the paper's "Gaussian-CE + NTL-WAS"
}

_CPU = dict(
    task="add_sub_3by1", train_size=20000, test_size=2000, max_steps=1500, batch_size=64,
    learning_rate=1e-3, warmup_steps=75, d_model=128, d_ff=512, d_kv=32, num_heads=4,
    num_layers=2, num_decoder_layers=2, eval_batch_size=500, save_steps=0, threads=1, workers=2,
)
# Settings that depend on the preset; a flag given on the command line wins.
PRESETS: Dict[str, Dict[str, Any]] = {
    "cpu": dict(_CPU, variants=["ce", "ntl-was"], seeds=[1, 2, 3], ntl_weight=[0.3],
                output_dir="runs/t5_arithmetic"),
    "study": dict(_CPU, variants=["ce", "ntl-mse", "ntl-was", "gaussian-ce", "gce-ntl-was"],
                  seeds=[1, 2, 3, 4, 5], ntl_weight=[0.3, 0.8], output_dir="runs/t5_study"),
    "quick": dict(
        task="add_sub_3by1", train_size=1000, test_size=40, max_steps=20, batch_size=32,
        learning_rate=2e-3, warmup_steps=2, d_model=32, d_ff=64, d_kv=8, num_heads=2,
        num_layers=1, num_decoder_layers=1, eval_batch_size=40, save_steps=0, threads=1, workers=1,
        variants=["ce", "ntl-was"], seeds=[1], ntl_weight=[0.3], output_dir="runs/t5_quick",
    ),
    "paper": dict(
        task="add_sub_multiple", train_size=1_000_000, test_size=10000, max_steps=100_000,
        batch_size=32, learning_rate=1e-4, warmup_steps=1000, d_model=512, d_ff=2048, d_kv=64,
        num_heads=8, num_layers=6, num_decoder_layers=6, eval_batch_size=256, save_steps=5000, threads=0,
        workers=1, variants=["ce", "ntl-was"], seeds=[42], ntl_weight=[0.3], output_dir="runs/t5_paper",
    ),
}
SMOKE_SECONDS = 25.0  # --smoke trains this long at most (or --max-steps steps, whichever comes first)
SPLITS = ("interpolate", "extrapolate")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    run = parser.add_argument_group("run")
    run.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                     help="cpu: the CPU demo (default); study: every variant, 5 seeds, λ 0.3 and 0.8 (CPU);\n"
                          "quick: seconds, for tests; paper: add_sub_multiple at T5-small size, for a GPU")
    run.add_argument("--quick", action="store_true", help="the 'quick' preset")
    run.add_argument("--smoke", action="store_true",
                     help=f"throughput and memory check: train {SMOKE_SECONDS:.0f} s (or exactly --max-steps steps),\n"
                          "print steps/s, peak memory and the first and last loss, write OUTPUT_DIR/smoke.json")
    run.add_argument("--variants", nargs="+", choices=sorted(VARIANTS),
                     help="loss variants, trained on the same data, initial weights and budget")
    run.add_argument("--seeds", nargs="+", type=int,
                     help="one run per seed and variant; "
                          "a seed fixes the data, the initial weights and the batch order")
    run.add_argument("--output_dir", "--out", dest="output_dir", help="everything a run writes goes here")
    run.add_argument("--resume", action="store_true",
                     help="reuse finished runs and resume the others from their last checkpoint")
    run.add_argument("--summarise", action="store_true",
                     help="train nothing: write the tables from the runs of OUTPUT_DIR that have finished\n"
                          "(e.g. of a study stopped early), marked as partial when some are missing")
    run.add_argument("--workers", type=int, help="runs trained side by side, each in its own process")
    run.add_argument("--threads", type=int,
                     help="torch threads per run (0 = torch's default). The CPU presets use 1 thread and 2\n"
                          "workers: this model's matmuls are small, and one thread keeps runs reproducible")
    run.add_argument("--job", help=argparse.SUPPRESS)  # a worker process: the run described in this file
    loss = parser.add_argument_group("loss")
    loss.add_argument("--ntl_weight", nargs="+", type=float,
                      help="λ in CE + λ·NTL (the paper: 0.3); several values train each NTL variant once per λ")
    loss.add_argument("--gaussian_sigma", type=float, default=1.0, help="σ of the Gaussian-CE variants")
    loss.add_argument("--backend", default="auto", help="ntl_fast backend (auto, reference, ...)")
    data = parser.add_argument_group("data")
    data.add_argument("--task", choices=TASKS, help="add_sub_3by1 (cpu) or add_sub_multiple (paper); see data.py")
    data.add_argument("--data_dir", help="released mathematics_dataset-v1.0 folder instead of generating")
    data.add_argument("--cache_dir", help="where generated data is cached (default: OUTPUT_DIR/data)")
    data.add_argument("--train_size", type=int)
    data.add_argument("--test_size", type=int, help="examples per test split (interpolate, extrapolate)")
    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", help="a local seq2seq checkpoint instead of a fresh T5")
    model.add_argument("--tokenizer_name_or_path", help="a local tokenizer instead of building one")
    for name in ("d_model", "d_ff", "d_kv", "num_heads", "num_layers", "num_decoder_layers"):
        model.add_argument(f"--{name}", type=int, help="T5Config." + name)
    train = parser.add_argument_group("training")
    train.add_argument("--max-steps", "--max_steps", dest="max_steps", type=int)
    train.add_argument("--batch_size", type=int)
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--learning_rate", type=float, help="peak learning rate (linear warm-up, cosine decay)")
    train.add_argument("--warmup_steps", type=int)
    train.add_argument("--save_steps", type=int, help="checkpoint every N steps (0: only the final model)")
    train.add_argument("--bf16", action="store_true")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--num_beams", type=int, default=1, help="1 = greedy")
    evaluation.add_argument("--eval_batch_size", type=int)
    args = parser.parse_args(argv)
    if args.quick:
        args.preset = "quick"
    args.max_steps_given = args.max_steps is not None
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ------------------------------------------------------------------------------ data and model
def encode(tokenizer, pairs: List[Tuple[str, str]]) -> List[Dict[str, List[int]]]:
    questions = tokenizer([q for q, _ in pairs])
    answers = tokenizer([a for _, a in pairs])
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": labels}
        for ids, mask, labels in zip(questions["input_ids"], questions["attention_mask"], answers["input_ids"])
    ]


def load_data(args: argparse.Namespace, seed: int) -> ArithmeticData:
    sizes = {"train": args.train_size, "interpolate": args.test_size, "extrapolate": args.test_size}
    return load_or_generate(args.task, sizes, seed, args.cache_dir or os.path.join(args.output_dir, "data"),
                            args.data_dir)


def prepare_tokenizer(args: argparse.Namespace, data: ArithmeticData):
    """The tokenizer every run of OUTPUT_DIR reads: built from the first seed's training text."""
    path = os.path.join(args.output_dir, "tokenizer")
    if args.tokenizer_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name_or_path)
    elif args.resume and os.path.exists(os.path.join(path, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(path)
    else:
        tokenizer = build_tokenizer(text for pair in data.train for text in pair)
    tokenizer.save_pretrained(path)
    return tokenizer


def build_model(args: argparse.Namespace, tokenizer, seed: int) -> torch.nn.Module:
    set_seed(seed)  # every variant of a seed starts from the same weights
    if args.model_name_or_path:
        model = AutoModelForSeq2SeqLM.from_pretrained(args.model_name_or_path)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        return model
    config = T5Config(
        vocab_size=len(tokenizer), d_model=args.d_model, d_ff=args.d_ff, d_kv=args.d_kv,
        num_heads=args.num_heads, num_layers=args.num_layers, num_decoder_layers=args.num_decoder_layers,
        dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5ForConditionalGeneration(config)


def training_arguments(args: argparse.Namespace, folder: str, seed: int, max_steps: int, **overrides: Any):
    settings = dict(
        output_dir=folder,
        max_steps=max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=0.01,
        logging_steps=max(1, max_steps // 20),
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or max_steps,
        save_total_limit=1,
        report_to="none",
        seed=seed,
        data_seed=seed,
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return Seq2SeqTrainingArguments(**settings)


def make_trainer(args, variant: str, ntl_weight: float, model, tokenizer, table, train_set, training_args):
    uses_ntl, ntl_loss, gaussian = VARIANTS[variant]
    return NTLSeq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        processing_class=tokenizer,
        number_token_table=table,
        ntl_weight=ntl_weight if uses_ntl else 0.0,
        ntl_loss=ntl_loss,
        gaussian_sigma=args.gaussian_sigma if gaussian else None,
        backend=args.backend,
    )


# ------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate_split(model, tokenizer, pairs, batch_size: int, num_beams: int) -> Dict[str, Any]:
    """Generate answers (capped at the longest answer's length + 2 tokens), score the last numbers,
    and measure the answers' token perplexity."""
    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    answer_lengths = [len(ids) for ids in tokenizer([a for _, a in pairs])["input_ids"]]
    max_new_tokens = max(answer_lengths) + 2  # the cap keeps a runaway's error of the answers' order
    predictions: List[str] = []
    runaway: List[bool] = []
    nll, tokens = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        inputs = tokenizer([q for q, _ in chunk], return_tensors="pt", padding=True).to(device)
        labels = tokenizer([a for _, a in chunk], return_tensors="pt", padding=True)["input_ids"].to(device)
        labels[labels == tokenizer.pad_token_id] = -100
        logits = model(**inputs, labels=labels).logits.float()
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
        tokens += int((labels != -100).sum())
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
        for row in generated[:, 1:].tolist():  # drop the decoder start token
            runaway.append(eos not in row)
            predictions.append(tokenizer.decode(row, skip_special_tokens=True))
    metrics = number_metrics(predictions, [a for _, a in pairs], runaway)
    metrics["perplexity"] = math.exp(nll / max(tokens, 1))
    examples = [
        {"question": q, "answer": a, "prediction": p} for (q, a), p in list(zip(pairs, predictions))[:20]
    ]
    return {"metrics": metrics, "examples": examples}


def baseline(data: ArithmeticData) -> Dict[str, Dict[str, float]]:
    """Always answering 0: the floor every trained model should beat."""
    return {
        split: number_metrics(["0"] * len(data.split(split)), [a for _, a in data.split(split)],
                              [False] * len(data.split(split)))
        for split in SPLITS
    }


# ------------------------------------------------------------------------------ one run
def run_label(args: argparse.Namespace, variant: str, ntl_weight: float) -> str:
    """``ntl-was``, or ``ntl-was λ0.8`` when several λ are compared (CE and Gaussian-CE have none)."""
    return f"{variant} λ{ntl_weight:g}" if VARIANTS[variant][0] and len(args.ntl_weight) > 1 else variant


def run_folder(args: argparse.Namespace, variant: str, ntl_weight: float, seed: int) -> str:
    name = f"{variant}-lambda{ntl_weight:g}" if VARIANTS[variant][0] and len(args.ntl_weight) > 1 else variant
    return os.path.join(args.output_dir, name, f"seed{seed}")


def run_job(args: argparse.Namespace, variant: str, ntl_weight: float, seed: int) -> Dict[str, Any]:
    """Train one variant with one seed and score it; the result is written to its metrics.json."""
    folder = run_folder(args, variant, ntl_weight, seed)
    result_path = os.path.join(folder, "metrics.json")
    if args.resume and os.path.exists(result_path):
        print(f"[{run_label(args, variant, ntl_weight)} seed {seed}] finished before: reusing {result_path}")
        with open(result_path) as handle:
            return json.load(handle)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    data = load_data(args, seed)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(args.output_dir, "tokenizer"))
    table = NumberTokenTable.from_tokenizer(tokenizer)
    uses_ntl = VARIANTS[variant][0]
    model = build_model(args, tokenizer, seed)
    trainer = make_trainer(args, variant, ntl_weight, model, tokenizer, table, encode(tokenizer, data.train),
                           training_arguments(args, folder, seed, args.max_steps))
    checkpoint = get_last_checkpoint(folder) if args.resume and os.path.isdir(folder) else None
    if checkpoint:
        print(f"[{run_label(args, variant, ntl_weight)} seed {seed}] resuming from {checkpoint}")
    started, cpu_started = time.time(), time.process_time()
    trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds, train_cpu_seconds = time.time() - started, time.process_time() - cpu_started
    trainer.save_model(os.path.join(folder, "final"))
    started, cpu_started = time.time(), time.process_time()
    splits = {split: evaluate_split(trainer.model, tokenizer, data.split(split), args.eval_batch_size, args.num_beams)
              for split in SPLITS}
    result = {
        "variant": variant,
        "label": run_label(args, variant, ntl_weight),
        "seed": seed,
        "ntl_weight": ntl_weight if uses_ntl else 0.0,
        "ntl_loss": VARIANTS[variant][1] if uses_ntl else None,
        "gaussian_sigma": args.gaussian_sigma if VARIANTS[variant][2] else None,
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(train_cpu_seconds, 1),
        "eval_seconds": round(time.time() - started, 1),
        "eval_cpu_seconds": round(time.process_time() - cpu_started, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "metrics": {split: value["metrics"] for split, value in splits.items()},
        "examples": {split: value["examples"] for split, value in splits.items()},
        "log_history": trainer.state.log_history,
    }
    with open(result_path, "w") as handle:
        json.dump(result, handle, indent=1)
    return result


def run_all(args: argparse.Namespace, jobs: List[Tuple[str, float, int]], on_result) -> None:
    """Run ``jobs`` in this process (``--workers 1``) or in up to ``--workers`` processes at once,
    calling ``on_result`` on each result as it finishes."""
    if args.workers <= 1:
        for job in jobs:
            on_result(run_job(args, *job))
        return
    pending = list(jobs)
    running: List[Tuple[subprocess.Popen, str, Any]] = []
    while pending or running:
        while pending and len(running) < args.workers:
            variant, ntl_weight, seed = job = pending.pop(0)
            folder = run_folder(args, variant, ntl_weight, seed)
            os.makedirs(folder, exist_ok=True)
            spec = os.path.join(folder, "job.json")
            with open(spec, "w") as handle:
                json.dump({"args": vars(args), "job": job}, handle, indent=1)
            log = open(os.path.join(folder, "log.txt"), "w")
            process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--job", spec],
                                       stdout=log, stderr=subprocess.STDOUT)
            running.append((process, folder, log))
        time.sleep(0.2)
        for entry in list(running):
            process, folder, log = entry
            if process.poll() is None:
                continue
            running.remove(entry)
            log.close()
            if process.returncode != 0:
                for other, _, _ in running:
                    other.terminate()
                with open(os.path.join(folder, "log.txt")) as handle:
                    tail = handle.read()[-3000:]
                raise RuntimeError(f"the run in {folder} failed (exit code {process.returncode}):\n{tail}")
            with open(os.path.join(folder, "metrics.json")) as handle:
                on_result(json.load(handle))


def worker(spec_path: str) -> None:
    with open(spec_path) as handle:
        spec = json.load(handle)
    args = argparse.Namespace(**spec["args"])
    run_job(args, *spec["job"])


# ------------------------------------------------------------------------------ summarising seeds
COLUMNS = [("accuracy", "accuracy", "pct"), ("within ±1", "within_1", "pct"), ("within 10%", "within_10pct", "pct"),
           ("median AE", "median_ae", "num"), ("MAE", "mae", "num"), ("runaway", "runaway", "num"),
           ("no number", "no_number", "num")]
DIFFERENCES = [("accuracy", "accuracy", "pct"), ("within 10%", "within_10pct", "pct"), ("MAE", "mae", "num")]
LEARNT = 0.05  # a split with no variant's mean accuracy above this is reported as not learnt


def _cell(value: Dict[str, float], kind: str) -> str:
    scale, unit = (100.0, "%") if kind == "pct" else (1.0, "")
    mean, sd = value["mean"] * scale, value["sd"] * scale
    if math.isnan(mean):
        return "-"
    if math.isnan(sd):
        return f"{mean:.1f}%" if kind == "pct" else f"{mean:.3g}"
    return f"{mean:.1f} ± {sd:.1f}{unit}" if kind == "pct" else f"{mean:.3g} ± {sd:.2g}"


def summarise(results: List[Dict[str, Any]], baselines: Dict[int, Dict[str, Dict[str, float]]]) -> Dict[str, Any]:
    """Per label and split: mean ± sd of every metric over seeds; per non-CE label: the paired
    difference from CE over the seeds both have."""
    labels: List[str] = []
    for result in results:
        if result["label"] not in labels:
            labels.append(result["label"])
    by_label = {label: sorted((r for r in results if r["label"] == label), key=lambda r: r["seed"]) for label in labels}
    summary: Dict[str, Any] = {"labels": labels, "seeds": {}, "metrics": {}, "differences": {}}
    summary["baseline"] = {
        split: {key: mean_sd([b[split][key] for b in baselines.values()]) for _, key, _ in COLUMNS if key != "runaway"}
        for split in SPLITS
    }
    for label, runs in by_label.items():
        summary["seeds"][label] = [r["seed"] for r in runs]
        summary["metrics"][label] = {
            split: {key: mean_sd([r["metrics"][split][key] for r in runs]) for _, key, _ in COLUMNS} for split in SPLITS
        }
    control = {r["seed"]: r for r in by_label.get("ce", [])}
    for label, runs in by_label.items():
        paired = [r for r in runs if r["seed"] in control] if label != "ce" else []
        if not paired:
            continue
        summary["differences"][label] = {
            split: {key: paired_difference([r["metrics"][split][key] for r in paired],
                                           [control[r["seed"]]["metrics"][split][key] for r in paired])
                    for _, key, _ in DIFFERENCES}
            for split in SPLITS
        }
    summary["learnt"] = {
        split: max(summary["metrics"][label][split]["accuracy"]["mean"] for label in labels) > LEARNT
        for split in SPLITS
    }
    return summary


def _interval(value: Dict[str, float], kind: str) -> str:
    scale, unit = (100.0, " points") if kind == "pct" else (1.0, "")
    if math.isnan(value["mean"]):
        return "-"
    if math.isnan(value["low"]):
        return f"{value['mean'] * scale:+.3g}{unit} (one seed: no interval)"
    return f"{value['mean'] * scale:+.1f}{unit} [{value['low'] * scale:+.1f}, {value['high'] * scale:+.1f}]" \
        if kind == "pct" else f"{value['mean']:+.3g} [{value['low']:+.3g}, {value['high']:+.3g}]"


def verdict(label: str, difference: Dict[str, float], split: str) -> str:
    """One plain sentence on the paired accuracy difference of ``label`` from CE."""
    n = difference["n"]
    text = (f"On the {split} split, {label} − CE accuracy over {n} paired seed{'s' if n > 1 else ''} is "
            f"{_interval(difference, 'pct')}")
    if n < 2:
        return text + "."
    if difference["low"] > 0:
        return text + f" (95% CI): {label} was more accurate, beyond the seed-to-seed spread."
    if difference["high"] < 0:
        return text + f" (95% CI): {label} was less accurate, beyond the seed-to-seed spread."
    return text + " (95% CI): the interval includes 0, so these seeds show no difference either way."


def report(summary: Dict[str, Any], headline: str) -> str:
    lines = []
    for split in SPLITS:
        lines.append(f"**{split}**" + ("" if summary["learnt"][split] else
                                       f" — no variant learns this split (every mean accuracy ≤ {LEARNT:.0%}): "
                                       "its rows show how far off the answers are, not which loss learns better"))
        lines.append("")
        lines.append("| variant | seeds | " + " | ".join(title for title, _, _ in COLUMNS) + " |")
        lines.append("|---|---|" + "---|" * len(COLUMNS))
        base = summary["baseline"][split]
        lines.append("| always 0 | - | " + " | ".join(
            _cell(base[key], kind) if key in base else "-" for _, key, kind in COLUMNS) + " |")
        for label in summary["labels"]:
            values = summary["metrics"][label][split]
            lines.append(f"| {label} | {len(summary['seeds'][label])} | "
                         + " | ".join(_cell(values[key], kind) for _, key, kind in COLUMNS) + " |")
        lines.append("")
    if summary["differences"]:
        lines.append("Paired per-seed differences from CE, mean [95% CI, Student t]:")
        lines.append("")
        lines.append("| variant − CE | split | seeds | "
                     + " | ".join(f"Δ {title}" for title, _, _ in DIFFERENCES) + " |")
        lines.append("|---|---|---|" + "---|" * len(DIFFERENCES))
        for label, per_split in summary["differences"].items():
            for split in SPLITS:
                if split != "interpolate" and not summary["learnt"][split]:
                    continue
                cells = [_interval(per_split[split][key], kind) for _, key, kind in DIFFERENCES]
                lines.append(f"| {label} | {split} | {per_split[split]['accuracy']['n']} | " + " | ".join(cells) + " |")
        lines.append("")
        if headline in summary["differences"]:
            lines.append(verdict(headline, summary["differences"][headline]["interpolate"]["accuracy"], "interpolate"))
    return "\n".join(lines)


def plot(results: List[Dict[str, Any]], summary: Dict[str, Any], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = summary["labels"]
    panels = [("accuracy", "accuracy", 100.0), ("within 10% of the truth", "within_10pct", 100.0),
              ("MAE (generation capped)", "mae", 1.0)]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.9))
    for axis, (name, key, scale) in zip(axes, panels):
        for index, label in enumerate(labels):
            values = [r["metrics"]["interpolate"][key] * scale for r in results if r["label"] == label]
            spread = [index + 0.08 * (i - (len(values) - 1) / 2) for i in range(len(values))]
            axis.scatter(spread, values, s=14, color="tab:gray", zorder=2, label="a seed" if index == 0 else None)
            stat = summary["metrics"][label]["interpolate"][key]
            axis.errorbar([index + 0.3], [stat["mean"] * scale],
                          yerr=[0 if math.isnan(stat["sd"]) else stat["sd"] * scale],
                          fmt="o", color="tab:blue", capsize=4, zorder=3, label="mean ± sd" if index == 0 else None)
        axis.set_xticks(range(len(labels)), labels, rotation=25, ha="right")
        axis.set_title(name + (" (%)" if scale == 100.0 else ", log scale above 1"))
        if scale != 100.0:  # one variant's runaway answers would flatten all the others
            axis.set_yscale("symlog", linthresh=1.0)
    axes[0].legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ------------------------------------------------------------------------------ the smoke test
class _StopAfter(TrainerCallback):
    """Stops training after ``seconds`` and records when each step ended."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.time()
        self.step_ends: List[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_ends.append(time.time())
        if self.step_ends[-1] - self.started >= self.seconds:
            control.should_training_stop = True


def smoke(args: argparse.Namespace) -> Dict[str, Any]:
    """Train the preset's model on a small sample of its task for a short while: steps/s, peak memory
    and the first and last loss, written to OUTPUT_DIR/smoke.json."""
    os.makedirs(args.output_dir, exist_ok=True)
    seed = args.seeds[0]
    steps = args.max_steps if args.max_steps_given else 1_000_000
    args.train_size = args.batch_size * args.gradient_accumulation_steps * min(steps, 64)  # cycled: throughput only
    args.test_size = 1
    data = load_data(args, seed)
    tokenizer = prepare_tokenizer(args, data)
    table = NumberTokenTable.from_tokenizer(tokenizer)
    model = build_model(args, tokenizer, seed)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    variant = args.variants[-1]
    # a short warm-up, so that the loss moves within the few hundred steps of a smoke test
    training_args = training_arguments(args, os.path.join(args.output_dir, "smoke"), seed, steps,
                                       logging_steps=1, save_strategy="no", warmup_steps=min(args.warmup_steps, 10))
    trainer = make_trainer(args, variant, args.ntl_weight[0], model, tokenizer, table, encode(tokenizer, data.train),
                           training_args)
    timer = _StopAfter(math.inf if args.max_steps_given else SMOKE_SECONDS)
    trainer.add_callback(timer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    done = len(timer.step_ends)
    # the first step holds the one-off costs (allocation, kernel compilation): timed from its end
    rate = (done - 1) / (timer.step_ends[-1] - timer.step_ends[0]) if done > 1 else None
    if cuda:
        peak, kind = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS of the process"
    result = {
        "preset": args.preset, "task": args.task, "variant": variant, "ntl_weight": args.ntl_weight[0],
        "device": torch.cuda.get_device_name() if cuda else "cpu", "bf16": args.bf16,
        "parameters": sum(p.numel() for p in model.parameters()), "batch_size": args.batch_size,
        "steps": done, "seconds": round(timer.step_ends[-1] - timer.started, 2) if done else 0.0,
        "steps_per_second": rate, "peak_memory_bytes": int(peak), "peak_memory_kind": kind,
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
    }
    with open(os.path.join(args.output_dir, "smoke.json"), "w") as handle:
        json.dump(result, handle, indent=1)
    print(f"smoke ({args.preset}, {variant}, {result['parameters'] / 1e6:.1f}M parameters, {result['device']}): "
          f"{done} steps in {result['seconds']} s, {rate or float('nan'):.2f} steps/s after the first, peak memory "
          f"{peak / 2**30:.2f} GiB ({kind}), loss {result['first_loss']} -> {result['last_loss']}")
    return result


# ------------------------------------------------------------------------------ main
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.job:
        worker(args.job)
        return {}
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return smoke(args) if args.smoke else run(args)
    finally:  # main() may be called from a longer-lived process (tests)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    started = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    print(f"data: {args.task}, {args.train_size} train / {args.test_size} per test split, seeds {args.seeds}")
    baselines = {seed: baseline(load_data(args, seed)) for seed in args.seeds}  # generates and caches the data
    if args.summarise:
        args.resume = True  # the tokenizer of the runs, not a new one
    tokenizer = prepare_tokenizer(args, load_data(args, args.seeds[0]))
    if not args.summarise:
        with open(os.path.join(args.output_dir, "run_config.json"), "w") as handle:
            json.dump(vars(args), handle, indent=1)
    # seed-major order: whatever has finished when a long study is stopped covers whole seeds
    jobs: List[Tuple[str, float, int]] = []
    for seed in args.seeds:
        for variant in args.variants:
            for weight in (args.ntl_weight if VARIANTS[variant][0] else args.ntl_weight[:1]):
                jobs.append((variant, weight, seed))
    label_order = list(dict.fromkeys(run_label(args, variant, weight) for variant, weight, _ in jobs))
    results: List[Dict[str, Any]] = []
    params = sum(p.numel() for p in build_model(args, tokenizer, args.seeds[0]).parameters())
    describe = (
        f"T5 ({params / 1e6:.2f}M parameters), task {args.task}, {args.max_steps} steps x batch "
        f"{args.batch_size * args.gradient_accumulation_steps}, peak lr {args.learning_rate} (warm-up "
        f"{args.warmup_steps}, cosine), λ {' / '.join(f'{w:g}' for w in args.ntl_weight)}, "
        f"{'greedy' if args.num_beams == 1 else f'{args.num_beams} beams'}, {args.test_size} test examples per split"
    )
    headline = run_label(args, "ntl-was", args.ntl_weight[0]) if "ntl-was" in args.variants else ""

    def write(result: Dict[str, Any]) -> Tuple[List[Dict[str, Any]], Dict[str, Any], str]:
        """Add a finished run and rewrite the tables: a long study stopped early keeps its results."""
        results.append(result)
        print(f"[{result['label']} seed {result['seed']}] interpolate accuracy "
              f"{result['metrics']['interpolate']['accuracy']:.1%} (train {result['train_seconds']} s, "
              f"eval {result['eval_seconds']} s) — {len(results)}/{len(jobs)} runs done", flush=True)
        ordered = sorted(results, key=lambda r: (label_order.index(r["label"]), r["seed"]))
        summary = summarise(ordered, {s: baselines[s] for s in sorted({r["seed"] for r in ordered})})
        text = report(summary, headline)
        complete = len(results) == len(jobs)
        seeds = sorted({r["seed"] for r in ordered})
        status = "" if complete else (f" (partial: {len(results)} of {len(jobs)} runs finished; "
                                      f"runs per variant in the 'seeds' column)")
        timing = "summarised from the finished runs" if args.summarise else f"wall time {time.time() - started:.0f} s"
        heading = f"{describe}; seeds {', '.join(map(str, seeds))}; {timing}{status}"
        with open(os.path.join(args.output_dir, "results.md"), "w") as handle:
            handle.write(heading + "\n\n" + text + "\n")
        with open(os.path.join(args.output_dir, "results.json"), "w") as handle:
            json.dump({"description": heading, "complete": complete, "summary": summary,
                       "runs": [{k: v for k, v in r.items() if k != "log_history"} for r in ordered]},
                      handle, indent=1)
        return ordered, summary, heading + "\n\n" + text

    if args.summarise:
        finished = [job for job in jobs if os.path.exists(os.path.join(run_folder(args, *job), "metrics.json"))]
        if not finished:
            raise FileNotFoundError(f"no finished run under {args.output_dir}")
        for job in finished:
            with open(os.path.join(run_folder(args, *job), "metrics.json")) as handle:
                last = write(json.load(handle))
    else:
        outputs: List[Any] = []
        run_all(args, jobs, lambda result: outputs.append(write(result)))
        last = outputs[-1]
    ordered, summary, text = last
    plot(ordered, summary, os.path.join(args.output_dir, "results.png"),
         f"T5 on {args.task}, interpolate split: every seed and the mean ± sd")
    print("\n" + text)
    print(f"\nwritten: {args.output_dir}/results.md, results.json, results.png")
    return {"runs": results}


if __name__ == "__main__":
    main()
