"""Train T5 on arithmetic with cross-entropy and with the Number Token Loss, and compare them.

The paper's arithmetic experiment (Zausinger et al., "Regress, Don't Guess") end to end, offline:
DeepMind's generator makes the data (or ``--data_dir`` reads the released files), a digit-splitting
T5 tokenizer is built and saved, every variant trains a T5 from the same initial weights on the
same batches for the same number of steps (``ntl_fast.integrations.NTLSeq2SeqTrainer``), and each
is scored by generation: the last number of the output against the answer, per split.

    python examples/t5_arithmetic/train.py                  # CPU demo: CE vs NTL-WAS, < 10 min
    python examples/t5_arithmetic/train.py --quick          # smoke test, < 1 min
    python examples/t5_arithmetic/train.py --preset paper --variants ce ntl-mse ntl-was --bf16

The CPU demo trains a 0.9M-parameter T5 on two-operand addition/subtraction with small operands
(a task it can learn in a few minutes); ``--preset paper`` is the paper's ``add_sub_multiple``
with a T5-small-sized model, meant for a GPU. Everything a run writes goes to ``--output_dir``:
the cached data, the tokenizer, one folder per variant (checkpoints, final model, metrics) and
``results.json`` / ``results.md`` / ``results.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

try:
    import ntl_fast  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from data import TASKS, ArithmeticData, load_or_generate  # noqa: E402
from metrics import number_metrics  # noqa: E402
from tokenizer import build_tokenizer  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

from ntl_fast import NumberTokenTable  # noqa: E402
from ntl_fast.integrations import NTLSeq2SeqTrainer  # noqa: E402

# Each variant: (ntl_weight multiplier, NTL loss, Gaussian-CE targets). λ comes from --ntl_weight.
VARIANTS: Dict[str, Tuple[bool, str, bool]] = {
    "ce": (False, "was", False),
    "ntl-mse": (True, "mse", False),
    "ntl-mae": (True, "mae", False),
    "ntl-huber": (True, "huber", False),
    "ntl-was": (True, "was", False),
    "gaussian-ce": (False, "was", True),
    "gce-ntl-was": (True, "was_cdf", True),  # the paper's "Gaussian-CE + NTL-WAS"
}

# Settings that depend on the preset; a flag given on the command line wins.
PRESETS: Dict[str, Dict[str, Any]] = {
    "cpu": dict(
        task="add_or_sub_small", train_size=20000, test_size=400, max_steps=600, batch_size=64,
        learning_rate=2e-3, warmup_steps=20, d_model=128, d_ff=512, d_kv=32, num_heads=4,
        num_layers=2, num_decoder_layers=2, eval_batch_size=200, save_steps=200, threads=1,
    ),
    "quick": dict(
        task="add_or_sub_small", train_size=1000, test_size=40, max_steps=20, batch_size=32,
        learning_rate=2e-3, warmup_steps=2, d_model=32, d_ff=64, d_kv=8, num_heads=2,
        num_layers=1, num_decoder_layers=1, eval_batch_size=40, save_steps=10, threads=1,
    ),
    "paper": dict(
        task="add_sub_multiple", train_size=1_000_000, test_size=10000, max_steps=100_000,
        batch_size=32, learning_rate=1e-4, warmup_steps=1000, d_model=512, d_ff=2048, d_kv=64,
        num_heads=8, num_layers=6, num_decoder_layers=6, eval_batch_size=256, save_steps=5000, threads=0,
    ),
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    run = parser.add_argument_group("run")
    run.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                     help="cpu: the CPU demo (default); paper: add_sub_multiple at T5-small size, for a GPU")
    run.add_argument("--quick", action="store_true", help="smoke test (< 1 minute): the 'quick' preset")
    run.add_argument("--variants", nargs="+", default=["ce", "ntl-was"], choices=sorted(VARIANTS),
                     help="loss variants, trained on the same data, initial weights and budget")
    run.add_argument("--output_dir", default="runs/t5_arithmetic", help="everything a run writes goes here")
    run.add_argument("--resume", action="store_true",
                     help="reuse finished variants and resume the others from their last checkpoint")
    run.add_argument("--seed", type=int, default=42, help="seeds the data, the initial weights and the batch order")
    run.add_argument("--threads", type=int,
                     help="CPU threads for torch (0 = torch's default). The CPU presets use 1: this model's\n"
                          "matmuls are small, and two threads slow to a crawl when anything else runs")
    loss = parser.add_argument_group("loss")
    loss.add_argument("--ntl_weight", type=float, default=0.3, help="λ in CE + λ·NTL (the paper: 0.3)")
    loss.add_argument("--gaussian_sigma", type=float, default=1.0, help="σ of the Gaussian-CE variants")
    loss.add_argument("--backend", default="auto", help="ntl_fast backend (auto, reference, ...)")
    data = parser.add_argument_group("data")
    data.add_argument("--task", choices=TASKS, help="add_or_sub_small (cpu) or add_sub_multiple (paper)")
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
    train.add_argument("--max_steps", type=int)
    train.add_argument("--batch_size", type=int)
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--learning_rate", type=float)
    train.add_argument("--warmup_steps", type=int)
    train.add_argument("--save_steps", type=int)
    train.add_argument("--bf16", action="store_true")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--num_beams", type=int, default=1, help="1 = greedy")
    evaluation.add_argument("--eval_batch_size", type=int)
    args = parser.parse_args(argv)
    if args.quick:
        args.preset = "quick"
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


def load_tokenizer(args: argparse.Namespace, data: ArithmeticData):
    path = os.path.join(args.output_dir, "tokenizer")
    if args.tokenizer_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name_or_path)
    elif args.resume and os.path.exists(os.path.join(path, "tokenizer.json")):
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        tokenizer = build_tokenizer(text for pair in data.train for text in pair)
    tokenizer.save_pretrained(path)
    return tokenizer


def build_model(args: argparse.Namespace, tokenizer) -> torch.nn.Module:
    set_seed(args.seed)  # every variant starts from the same weights
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


# ------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate_split(model, tokenizer, pairs, batch_size: int, num_beams: int, desc: str) -> Dict[str, Any]:
    """Generate answers, score the last numbers, and measure the answers' token perplexity."""
    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    answer_lengths = [len(ids) for ids in tokenizer([a for _, a in pairs])["input_ids"]]
    max_new_tokens = max(answer_lengths) + 8
    predictions: List[str] = []
    runaway: List[bool] = []
    nll, tokens = 0.0, 0
    for start in tqdm(range(0, len(pairs), batch_size), desc=desc, leave=False):
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
        split: number_metrics(["0"] * len(data.split(split)), [a for _, a in data.split(split)], [False] * len(data.split(split)))
        for split in ("interpolate", "extrapolate")
    }


# ------------------------------------------------------------------------------ one variant
def run_variant(args, name: str, tokenizer, table: NumberTokenTable, data: ArithmeticData, train_set) -> Dict[str, Any]:
    folder = os.path.join(args.output_dir, name)
    result_path = os.path.join(folder, "metrics.json")
    if args.resume and os.path.exists(result_path):
        print(f"[{name}] finished before: reusing {result_path}")
        with open(result_path) as handle:
            return json.load(handle)
    uses_ntl, ntl_loss, gaussian = VARIANTS[name]
    model = build_model(args, tokenizer)
    training_args = Seq2SeqTrainingArguments(
        output_dir=folder,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type="linear",
        weight_decay=0.01,
        logging_steps=max(1, args.max_steps // 10),
        save_steps=args.save_steps,
        save_total_limit=1,
        report_to="none",
        seed=args.seed,
        data_seed=args.seed,
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
    )
    trainer = NTLSeq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        processing_class=tokenizer,
        number_token_table=table,
        ntl_weight=args.ntl_weight if uses_ntl else 0.0,
        ntl_loss=ntl_loss,
        gaussian_sigma=args.gaussian_sigma if gaussian else None,
        backend=args.backend,
    )
    checkpoint = get_last_checkpoint(folder) if args.resume and os.path.isdir(folder) else None
    if checkpoint:
        print(f"[{name}] resuming from {checkpoint}")
    started = time.time()
    trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds = time.time() - started
    trainer.save_model(os.path.join(folder, "final"))
    started = time.time()
    splits = {
        split: evaluate_split(trainer.model, tokenizer, data.split(split), args.eval_batch_size, args.num_beams,
                              f"[{name}] generating {split}")
        for split in ("interpolate", "extrapolate")
    }
    result = {
        "variant": name,
        "seed": args.seed,
        "ntl_weight": args.ntl_weight if uses_ntl else 0.0,
        "ntl_loss": ntl_loss if uses_ntl else None,
        "gaussian_sigma": args.gaussian_sigma if gaussian else None,
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(time.time() - started, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "metrics": {split: value["metrics"] for split, value in splits.items()},
        "examples": {split: value["examples"] for split, value in splits.items()},
        "log_history": trainer.state.log_history,
    }
    with open(result_path, "w") as handle:
        json.dump(result, handle, indent=1)
    return result


# ------------------------------------------------------------------------------ reporting
COLUMNS = [("accuracy", "accuracy", "{:.1%}"), ("MAE", "mae", "{:.3g}"), ("median AE", "median_ae", "{:.3g}"),
           ("R²", "r2", "{:.3g}"), ("runaway", "runaway", "{}"), ("no number", "no_number", "{}"),
           ("perplexity", "perplexity", "{:.3f}")]


def results_table(rows: List[Tuple[str, str, Dict[str, float]]]) -> str:
    header = "| split | variant | seed | " + " | ".join(title for title, _, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (3 + len(COLUMNS))]
    for split in ("interpolate", "extrapolate"):
        for variant, seed, metrics in rows:
            if split not in metrics:
                continue
            cells = []
            for _, key, fmt in COLUMNS:
                value = metrics[split].get(key)
                cells.append("-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value))
            lines.append(f"| {split} | {variant} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: List[Tuple[str, str, Dict[str, float]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [variant for variant, _, _ in rows]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for axis, (title, key, log) in zip(axes, [("accuracy", "accuracy", False), ("MAE", "mae", True),
                                              ("median absolute error", "median_ae", True)]):
        width = 0.38
        for offset, split in ((-width / 2, "interpolate"), (width / 2, "extrapolate")):
            values = [metrics[split][key] for _, _, metrics in rows]
            axis.bar([i + offset for i in range(len(rows))], values, width, label=split)
        axis.set_xticks(range(len(rows)), names, rotation=20)
        axis.set_title(title)
        if log:
            axis.set_yscale("log")
    axes[0].legend()
    figure.suptitle("T5 on arithmetic: cross-entropy vs Number Token Loss (seed %s)" % rows[-1][1])
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)  # main() may be called from a longer-lived process (tests)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    started = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    sizes = {"train": args.train_size, "interpolate": args.test_size, "extrapolate": args.test_size}
    print(f"data: {args.task}, sizes {sizes}, seed {args.seed}")
    data = load_or_generate(args.task, sizes, args.seed, args.cache_dir or os.path.join(args.output_dir, "data"),
                            args.data_dir)
    tokenizer = load_tokenizer(args, data)
    table = NumberTokenTable.from_tokenizer(tokenizer)
    train_set = encode(tokenizer, data.train)
    with open(os.path.join(args.output_dir, "run_config.json"), "w") as handle:
        json.dump(vars(args), handle, indent=1)

    results = {name: run_variant(args, name, tokenizer, table, data, train_set) for name in args.variants}
    rows = [("always 0", "-", baseline(data))]
    rows += [(name, str(r["seed"]), r["metrics"]) for name, r in results.items()]
    table_md = results_table(rows)
    params = next(iter(results.values()))["parameters"]
    summary = (
        f"T5 ({params / 1e6:.2f}M parameters), task {args.task}, {args.max_steps} steps x batch "
        f"{args.batch_size * args.gradient_accumulation_steps}, lr {args.learning_rate}, λ {args.ntl_weight}, "
        f"{'greedy' if args.num_beams == 1 else f'{args.num_beams} beams'}, {args.test_size} test examples per split, "
        f"seed {args.seed}; wall time {time.time() - started:.0f} s"
    )
    with open(os.path.join(args.output_dir, "results.md"), "w") as handle:
        handle.write(summary + "\n\n" + table_md + "\n")
    with open(os.path.join(args.output_dir, "results.json"), "w") as handle:
        json.dump({"summary": summary, "baseline": rows[0][2],
                   "variants": {n: {k: v for k, v in r.items() if k != "log_history"} for n, r in results.items()}},
                  handle, indent=1)
    plot(rows, os.path.join(args.output_dir, "results.png"))
    print("\n" + summary + "\n\n" + table_md)
    print(f"\nwritten: {args.output_dir}/results.md, results.json, results.png")
    return results


if __name__ == "__main__":
    main()
