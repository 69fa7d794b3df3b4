"""Fine-tune a causal LM on GSM8k with CE or CE + NTL and report exact-match answer accuracy.

Data: GSM8k's official JSONL ({"question": ..., "answer": "... #### 42"}) from --train_file /
--eval_file, or --dataset_name gsm8k through `datasets` when online. Preprocessed as in the paper:
calculator annotations <<...>> and thousands separators removed; the answer follows "####".

Model: --model_name_or_path (a local checkpoint), or by default a small random-init LLaMA-style
model with a digit-splitting byte-level BPE tokenizer built from the training text, so the
script runs on a CPU. The LM head is fused with the loss (ntl_fast.integrations.causal_lm), and
means are exact across micro-batches and ranks (global counts, ntl_fast.distributed).

    python examples/gsm8k/train.py --train_file tests/fixtures/gsm8k_tiny.jsonl --compare
    accelerate launch --num_processes 8 examples/gsm8k/train.py --model_name_or_path ... (README)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from ntl_fast import NumberTokenTable  # noqa: E402
from ntl_fast.distributed import global_counts  # noqa: E402
from ntl_fast.integrations.causal_lm import enable_ntl  # noqa: E402

IGNORE = -100
_ANNOTATION = re.compile(r"<<[^>]*>>")
_THOUSANDS = re.compile(r"(\d),(\d{3})(?!\d)")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


# ------------------------------------------------------------------------------------ data
def remove_thousands_separators(text: str) -> str:
    previous = None
    while previous != text:  # 1,234,567 needs two passes
        previous, text = text, _THOUSANDS.sub(r"\1\2", text)
    return text


def preprocess(example: Dict[str, str]) -> Dict[str, str]:
    """The paper's GSM8k preprocessing: {"question", "reasoning", "final"}."""
    answer = remove_thousands_separators(_ANNOTATION.sub("", example["answer"]))
    reasoning, _, final = answer.rpartition("####")
    return {"question": example["question"].strip(), "reasoning": reasoning.strip(),
            "final": final.strip()}


def load_jsonl(path: str) -> List[Dict[str, str]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_split(path: Optional[str], dataset_name: Optional[str], split: str) -> List[Dict[str, str]]:
    if path:
        return [preprocess(example) for example in load_jsonl(path)]
    if dataset_name:
        import datasets  # optional, and needs the network

        return [preprocess(example) for example in datasets.load_dataset(dataset_name, "main", split=split)]
    raise SystemExit(f"no {split} data: pass --{split}_file (GSM8k JSONL) or --dataset_name gsm8k")


def prompt_text(example: Dict[str, str]) -> str:
    return f"Question: {example['question']}\nAnswer:"


def target_text(example: Dict[str, str]) -> str:
    reasoning = f" {example['reasoning']}\n" if example["reasoning"] else " "
    return f"{reasoning}#### {example['final']}"


def extract_answer(generated: str) -> Optional[str]:
    """The number after the first "####" of a generation (None when there is none)."""
    _, marker, rest = generated.partition("####")
    match = _NUMBER.search(remove_thousands_separators(rest)) if marker else None
    return match.group(0) if match else None


def same_number(predicted: Optional[str], gold: str) -> bool:
    if predicted is None:
        return False
    try:
        return math.isclose(float(predicted), float(gold), rel_tol=0, abs_tol=1e-9)
    except ValueError:
        return predicted == gold


# ------------------------------------------------------------------------------------ model
def build_tokenizer(texts: Sequence[str], vocab_size: int = 384):
    """Byte-level BPE that splits every digit (digits are never merged, never space-marked)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def build_default_model(tokenizer, hidden_size: int = 128, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    padded_vocab = -(-len(tokenizer) // 64) * 64  # a padded LM head, as real models have
    config = LlamaConfig(vocab_size=padded_vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config)


def load_model_and_tokenizer(args, train: List[Dict[str, str]]):
    if args.model_name_or_path:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, torch_dtype=torch.float32)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer
    texts = [prompt_text(e) + target_text(e) for e in train]
    tokenizer = build_tokenizer(texts)
    return build_default_model(tokenizer, args.hidden_size, args.layers), tokenizer


def encode(example, tokenizer, max_length: int):
    prompt = tokenizer(prompt_text(example), add_special_tokens=False)["input_ids"]
    target = tokenizer(target_text(example), add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = (bos + prompt + target + [tokenizer.eos_token_id])[:max_length]
    labels = ([IGNORE] * (len(bos) + len(prompt)) + target + [tokenizer.eos_token_id])[:max_length]
    return ids, labels


def collate(encoded, pad_id: int):
    length = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), length), pad_id)
    labels = torch.full((len(encoded), length), IGNORE)
    mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(encoded):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(ids)] = torch.tensor(row_labels)
        mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


# ------------------------------------------------------------------------------------ train / eval
@torch.no_grad()
def evaluate(model, tokenizer, examples, max_new_tokens: int, device) -> Dict[str, float]:
    model.eval()
    correct = 0
    for example in examples:
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        prompt = torch.tensor([bos + tokenizer(prompt_text(example), add_special_tokens=False)["input_ids"]],
                              device=device)
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                                   do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(generated[0, prompt.shape[1]:], skip_special_tokens=True)
        correct += same_number(extract_answer(text), example["final"])
    model.train()
    return {"accuracy": correct / max(1, len(examples)), "evaluated": len(examples)}


def run(args, ntl_weight: float) -> Dict[str, float]:
    from accelerate import Accelerator

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    accelerator = Accelerator(mixed_precision="bf16" if args.bf16 else "no", cpu=args.cpu)
    train = load_split(args.train_file, args.dataset_name, "train")
    evaluation = load_split(args.eval_file or args.train_file, args.dataset_name, "test")[: args.eval_limit]
    model, tokenizer = load_model_and_tokenizer(args, train)
    table = NumberTokenTable.from_tokenizer(tokenizer, vocab_size=model.get_output_embeddings().weight.shape[0],
                                            digit_level=not args.multi_digit)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    # CE alone is the same fused head with λ = 0: the two runs differ in λ only
    enable_ntl(model, table, ntl_weight=ntl_weight, loss=args.loss, squash_factor=args.squash_factor,
               validate=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    encoded = [encode(example, tokenizer, args.max_length) for example in train]
    rank, world = accelerator.process_index, accelerator.num_processes
    generator = random.Random(args.seed)
    history = []
    start = time.perf_counter()
    for step in range(args.steps):
        # each rank takes its share of grad_accum micro-batches of batch_size examples
        micro_batches = []
        for _ in range(args.grad_accum):
            picks = [generator.randrange(len(encoded)) for _ in range(args.batch_size * world)]
            mine = picks[rank * args.batch_size:(rank + 1) * args.batch_size]
            batch = collate([encoded[i] for i in mine], tokenizer.pad_token_id)
            micro_batches.append({k: v.to(accelerator.device) for k, v in batch.items()})
        # exact means over the whole optimizer step: global counts over micro-batches and ranks
        ce_count, ntl_count = global_counts([mb["labels"] for mb in micro_batches], table.to(accelerator.device),
                                            shift_labels=True)
        totals = torch.zeros(3, device=accelerator.device)
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            context = accelerator.no_sync(model) if not last else _nullcontext()
            with context, accelerator.autocast():
                out = model(**batch, num_items_in_batch=ce_count, ntl_num_items_in_batch=ntl_count)
                # DDP / FSDP average gradients over ranks; the global mean needs their sum
                accelerator.backward(out.loss * world)
            totals += torch.stack([out.loss.detach(), out.ce_loss, out.ntl_loss]).float()
        if args.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        totals = accelerator.reduce(totals, reduction="sum")
        loss, ce, ntl = totals.tolist()
        history.append({"step": step + 1, "loss": loss, "ce": ce, "ntl": ntl})
        if accelerator.is_main_process and (step + 1) % args.log_every == 0:
            print(json.dumps({"lambda": ntl_weight, **history[-1]}), flush=True)
    seconds = time.perf_counter() - start
    metrics = {"ntl_weight": ntl_weight, "loss": args.loss, "steps": args.steps, "train_seconds": seconds,
               "final": history[-1] if history else {}}
    if accelerator.is_main_process:
        model_for_eval = accelerator.unwrap_model(model)
        metrics.update(evaluate(model_for_eval, tokenizer, evaluation, args.max_new_tokens, accelerator.device))
        if args.output_dir:
            out_dir = Path(args.output_dir) / ("ce" if ntl_weight == 0 else f"ce_ntl_{ntl_weight:g}")
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "metrics.json").write_text(json.dumps({**metrics, "history": history}, indent=2))
            if args.save_model:
                model_for_eval.save_pretrained(out_dir / "model")
                tokenizer.save_pretrained(out_dir / "model")
    accelerator.wait_for_everyone()
    return metrics


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_file", help="GSM8k-format JSONL for training")
    parser.add_argument("--eval_file", help="GSM8k-format JSONL for evaluation (default: the train file)")
    parser.add_argument("--dataset_name", help="e.g. gsm8k, through `datasets` (online only)")
    parser.add_argument("--model_name_or_path", help="a local causal-LM checkpoint (default: tiny random LLaMA)")
    parser.add_argument("--hidden_size", type=int, default=128, help="width of the default random-init model")
    parser.add_argument("--layers", type=int, default=2, help="depth of the default random-init model")
    parser.add_argument("--ntl_weight", type=float, default=0.3, help="λ; 0 trains with CE alone")
    parser.add_argument("--compare", action="store_true", help="train CE and CE + NTL from the same start")
    parser.add_argument("--loss", default="was", help="NTL variant: was, mse, mae, huber, was_cdf")
    parser.add_argument("--multi_digit", action="store_true",
                        help="number tokens = every decimal literal (LLaMA-3, GPT-2), not just digits")
    parser.add_argument("--squash_factor", type=float, default=None,
                        help="WAS only: map distances onto [1, s] (multi-digit tokenizers)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=8, help="per rank and micro-batch")
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--max_length", type=int, default=384)
    parser.add_argument("--max_new_tokens", type=int, default=160)
    parser.add_argument("--eval_limit", type=int, default=None, help="evaluate on the first N examples")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="force the CPU")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--output_dir")
    parser.add_argument("--save_model", action="store_true")
    parser.add_argument("--log_every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, float]]:
    args = parse_args(argv)
    weights = [0.0, args.ntl_weight] if args.compare else [args.ntl_weight]
    results = [run(args, weight) for weight in weights]
    for result in results:
        if "accuracy" in result:
            name = "CE" if result["ntl_weight"] == 0 else f"CE + {result['ntl_weight']:g} NTL-{result['loss']}"
            print(f"{name:>20}: exact match {result['accuracy']:.3f} on {result['evaluated']} problems, "
                  f"final CE {result['final'].get('ce', float('nan')):.4f}, {result['train_seconds']:.1f} s")
    return results


if __name__ == "__main__":
    main()
