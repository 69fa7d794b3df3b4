"""ntl_fast.integrations: the Trainer subclasses compute, normalise, shift and log like the API."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import digit_table  # noqa: E402
from ntl_fast import cross_entropy_with_ntl  # noqa: E402
from ntl_fast.integrations import NTLSeq2SeqTrainer, NTLTrainer, count_loss_items  # noqa: E402

VOCAB = 40
TABLE = digit_table(vocab_size=VOCAB, first_id=7)  # digits at ids 7..16
PAD = 0


def tiny_model(kind: str, dtype=torch.float32):
    torch.manual_seed(0)
    if kind == "seq2seq":
        config = transformers.T5Config(
            vocab_size=VOCAB, d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=1,
            num_decoder_layers=1, dropout_rate=0.0, pad_token_id=PAD, eos_token_id=1,
            decoder_start_token_id=PAD,
        )
        model = transformers.T5ForConditionalGeneration(config)
    else:
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD,
        )
        model = transformers.GPT2LMHeadModel(config)
    return model.to(dtype)


def samples(count: int, length: int = 6, seed: int = 0):
    """Equal-length samples whose labels mix digits, other tokens and a varying number of -100s."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(count):
        input_ids = torch.randint(2, VOCAB, (length,), generator=generator)
        labels = torch.randint(2, VOCAB, (length,), generator=generator)
        digits = torch.rand(length, generator=generator) < 0.5
        labels = torch.where(digits, torch.randint(7, 17, (length,), generator=generator), labels)
        labels[length - (index % 4):] = -100  # 0-3 ignored positions: the counts differ by micro-batch
        rows.append({"input_ids": input_ids, "attention_mask": torch.ones(length, dtype=torch.int64),
                     "labels": labels})
    return rows


def make_trainer(kind, model, tmp_path, **kwargs):
    options = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=True,
                   save_strategy="no", remove_unused_columns=False)
    options.update(kwargs.pop("args", {}))
    trainer_class = NTLSeq2SeqTrainer if kind == "seq2seq" else NTLTrainer
    args_class = transformers.Seq2SeqTrainingArguments if kind == "seq2seq" else transformers.TrainingArguments
    return trainer_class(model=model, args=args_class(**options), number_token_table=TABLE,
                         data_collator=transformers.default_data_collator, **kwargs)


def batch(rows):
    return transformers.default_data_collator(rows)


@pytest.mark.parametrize("loss", ["was", "mse", "was_cdf"])
def test_seq2seq_loss_equals_the_api(tmp_path, loss):
    model = tiny_model("seq2seq").eval()
    sigma = 1.0 if loss == "was_cdf" else None
    trainer = make_trainer("seq2seq", model, tmp_path, ntl_weight=0.3, ntl_loss=loss, gaussian_sigma=sigma)
    assert trainer.ntl_shift_labels is False
    inputs = batch(samples(4))
    with torch.no_grad():
        got = trainer.compute_loss(model, dict(inputs))
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=inputs["labels"])).logits
        expected = cross_entropy_with_ntl(logits, inputs["labels"], TABLE, ntl_weight=0.3, loss=loss,
                                          gaussian_sigma=sigma)
    torch.testing.assert_close(got, expected.loss, rtol=1e-6, atol=1e-7)


def test_causal_model_is_shifted(tmp_path):
    model = tiny_model("causal").eval()
    trainer = make_trainer("causal", model, tmp_path, ntl_weight=0.3)
    assert trainer.ntl_shift_labels is True
    inputs = batch(samples(4))
    with torch.no_grad():
        got = trainer.compute_loss(model, dict(inputs))
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        shifted = cross_entropy_with_ntl(logits[:, :-1], inputs["labels"][:, 1:], TABLE, ntl_weight=0.3)
        unshifted = cross_entropy_with_ntl(logits, inputs["labels"], TABLE, ntl_weight=0.3)
    torch.testing.assert_close(got, shifted.loss, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(got, unshifted.loss)


def test_counts_follow_the_shift():
    labels = torch.tensor([[7, 3, -100, 16], [20, 8, 9, -100]])
    assert [int(c) for c in count_loss_items([labels], TABLE, shift_labels=False)] == [6, 4]
    assert [int(c) for c in count_loss_items([labels], TABLE, shift_labels=True)] == [4, 3]


def test_counts_agree_with_token_counts_on_labels_outside_the_vocabulary():
    """Both counters follow one rule (ntl_fast.labels): a negative label other than ignore_index and
    a label >= V count for nothing; an ignore_index inside [0, V) is ignored."""
    from ntl_fast.distributed import token_counts

    labels = torch.tensor([[7, -3, 8, VOCAB, 16, 5], [-100, 9, 40, 0, -1, 10]])
    for ignore_index in (-100, 9):
        for shift_labels in (False, True):
            mine = count_loss_items([labels[:1], labels[1:]], TABLE, shift_labels=shift_labels,
                                    ignore_index=ignore_index)
            theirs = token_counts(labels, TABLE, ignore_index, shift_labels=shift_labels)
            assert mine[0].dtype == torch.int64
            assert [int(c) for c in mine] == [int(c) for c in theirs]
    assert [int(c) for c in count_loss_items([labels], TABLE, shift_labels=False)] == [7, 5]


def test_ce_and_ntl_are_logged(tmp_path):
    model = tiny_model("seq2seq")
    trainer = make_trainer("seq2seq", model, tmp_path, ntl_weight=0.3, train_dataset=samples(16),
                           args=dict(max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                     logging_steps=2, learning_rate=1e-3))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert entry["ntl"] > 0 and entry["ce"] > 0
        assert entry["loss"] == pytest.approx(entry["ce"] + 0.3 * entry["ntl"], rel=1e-5)


@pytest.mark.parametrize("kind", ["seq2seq", "causal"])
@pytest.mark.parametrize("loss", ["was", "mse"])
def test_gradient_accumulation_equals_one_batch(tmp_path, kind, loss):
    """One SGD step (lr 1, no clipping, no decay) of 4 micro-batches of 2 vs one batch of 8:
    the parameter updates are the gradients, and must agree."""
    data = samples(8, seed=1)
    counts = [count_loss_items([batch(data[i:i + 2])["labels"]], TABLE, shift_labels=kind == "causal")
              for i in range(0, 8, 2)]
    assert len({int(c[1]) for c in counts}) > 1, "micro-batches must hold different NTL counts"

    updates = []
    for batch_size, accumulation in ((8, 1), (2, 4)):
        model = tiny_model(kind, torch.float64)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = make_trainer(
            kind, model, tmp_path / f"{batch_size}", ntl_weight=0.3, ntl_loss=loss, train_dataset=data,
            args=dict(max_steps=1, per_device_train_batch_size=batch_size,
                      gradient_accumulation_steps=accumulation, learning_rate=1.0, optim="sgd",
                      lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, logging_steps=1),
        )
        trainer.train()
        updates.append({n: before[n] - p.detach() for n, p in model.named_parameters()})
        assert trainer.state.global_step == 1
    one_batch, accumulated = updates
    scale = max(u.abs().max().item() for u in one_batch.values())
    assert scale > 0
    for name in one_batch:
        torch.testing.assert_close(accumulated[name], one_batch[name], rtol=0, atol=1e-10 * scale,
                                   msg=lambda m: f"{name}: {m}")
