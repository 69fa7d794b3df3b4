"""enable_ntl on tiny random-init Hugging Face causal LMs: fused loss == CE + NTL on the logits."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ntl_fast import NumberTokenTable, cross_entropy_with_ntl  # noqa: E402
from ntl_fast.integrations.causal_lm import disable_ntl, enable_ntl  # noqa: E402
from helpers import assert_spec_close  # noqa: E402

VOCAB = 72  # a padded head: the table below covers 60 ids
TABLE = NumberTokenTable.from_values({20 + d: float(d) for d in range(10)}, vocab_size=60)


def _llama(tie=False):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).float()


def _qwen2():
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config).eval()


def _gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()  # no dropout: both paths see the same network


def _batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 60, (3, 17), generator=generator)
    ids[:, 5:11] = 20 + torch.randint(0, 10, (3, 6), generator=generator)  # a number in every row
    mask = torch.ones_like(ids)
    mask[2, 13:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # an unscored prompt
    return ids, mask, labels


def _manual(model, ids, mask, labels, **options):
    logits = model._ntl_original_forward(input_ids=ids, attention_mask=mask).logits
    return cross_entropy_with_ntl(logits, labels, TABLE, shift_labels=True, backend="reference", **options)


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("make", [_llama, _qwen2, _gpt2, lambda: _llama(tie=True)],
                         ids=["llama", "qwen2", "gpt2", "llama-tied"])
def test_loss_and_gradients_match_materialised(make):
    model = enable_ntl(make(), TABLE, ntl_weight=0.3, loss="was", chunk_size=16, backend="reference")
    ids, mask, labels = _batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    expected = _manual(model, ids, mask, labels, ntl_weight=0.3)
    assert out.logits is None
    assert_spec_close(out.loss, expected.loss, torch.float32, what="loss")
    assert_spec_close(out.ce_loss, expected.ce, torch.float32, what="ce")
    assert_spec_close(out.ntl_loss, expected.ntl, torch.float32, what="ntl")
    for actual, wanted in zip(_grads(model, out.loss), _grads(model, expected.loss)):
        assert_spec_close(actual, wanted, torch.float32, gradient=True, what="grad")


def test_num_items_in_batch_and_shift_labels_kwargs():
    model = enable_ntl(_llama(), TABLE, loss="mse", backend="reference")
    ids, mask, labels = _batch(1)
    out = model(ids, mask, labels=labels, num_items_in_batch=torch.tensor(100), ntl_num_items_in_batch=7)
    expected = _manual(model, ids, mask, labels, loss="mse", ce_normalizer=100.0, ntl_normalizer=7.0)
    assert_spec_close(out.loss, expected.loss, torch.float32)
    # Hugging Face's pre-shifted labels: position t is scored against shift_labels[t]
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    out = model(input_ids=ids, attention_mask=mask, shift_labels=shifted)
    assert_spec_close(out.loss, _manual(model, ids, mask, labels, loss="mse").loss, torch.float32)
    # num_items_in_batch alone: the NTL count is scaled like the CE count
    local_ce = (labels[:, 1:] != -100).sum().item()
    local_ntl = ((labels[:, 1:] >= 20) & (labels[:, 1:] < 30)).sum().item()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=2 * local_ce)
    expected = _manual(model, ids, mask, labels, loss="mse", ce_normalizer=2 * local_ce,
                       ntl_normalizer=2 * local_ntl)
    assert_spec_close(out.loss, expected.loss, torch.float32)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_gradient_checkpointing_matches():
    ids, mask, labels = _batch(2)
    plain = enable_ntl(_llama(), TABLE, backend="reference")
    plain.train()
    expected = plain(input_ids=ids, attention_mask=mask, labels=labels)
    expected_grads = _grads(plain, expected.loss)
    checkpointed = _llama()
    checkpointed.gradient_checkpointing_enable()
    checkpointed.train()
    assert checkpointed.is_gradient_checkpointing
    enable_ntl(checkpointed, TABLE, backend="reference")
    out = checkpointed(input_ids=ids, attention_mask=mask, labels=labels)
    assert_spec_close(out.loss, expected.loss, torch.float32)
    for actual, wanted in zip(_grads(checkpointed, out.loss), expected_grads):
        assert_spec_close(actual, wanted, torch.float32, gradient=True)


def test_bf16_autocast():
    model = enable_ntl(_llama(), TABLE, backend="reference")
    ids, mask, labels = _batch(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        expected = _manual(model, ids, mask, labels)
    assert out.loss.dtype == torch.float32
    assert_spec_close(out.loss, expected.loss, torch.bfloat16)
    for actual, wanted in zip(_grads(model, out.loss), _grads(model, expected.loss)):
        assert actual.dtype == torch.float32
        assert_spec_close(actual, wanted, torch.bfloat16, gradient=True)


def test_without_labels_and_disable():
    model = _llama()
    ids, mask, labels = _batch()
    expected = model(input_ids=ids, attention_mask=mask).logits
    enable_ntl(model, TABLE, backend="reference")
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected)
    generated = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)
    with pytest.raises(RuntimeError, match="already"):
        enable_ntl(model, TABLE)
    disable_ntl(model)
    own = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert own.logits is not None and not hasattr(own, "ntl_loss")


def test_logit_transforming_configs_are_refused():
    model = _llama()
    model.config.final_logit_softcapping = 30.0  # Gemma-2 style: the fused head would skip it
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        enable_ntl(model, TABLE)


def test_table_from_tokenizer_covers_padded_head():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "a", "b"] + [str(d) for d in range(10)]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>")
    model = enable_ntl(_llama(), tokenizer, backend="reference")
    assert model._ntl_table.vocab_size == VOCAB and model._ntl_table.num_numbers == 10


# ------------------------------------------------------------------ the GSM8k example
def _gsm8k_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "gsm8k" / "train.py"
    spec = importlib.util.spec_from_file_location("gsm8k_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FIXTURE = str(__import__("pathlib").Path(__file__).resolve().parent / "fixtures" / "gsm8k_tiny.jsonl")


def test_gsm8k_preprocessing():
    script = _gsm8k_script()
    example = script.preprocess({"question": " Q? ", "answer": "It is 1,200-350=<<1200-350=850>>850.\n"
                                                               "Total 1,234,567 x\n#### 4,000"})
    assert example == {"question": "Q?", "reasoning": "It is 1200-350=850.\nTotal 1234567 x", "final": "4000"}
    assert script.extract_answer(" 3+4=7\n#### 1,007 apples") == "1007"
    assert script.extract_answer("no marker 12") is None
    assert script.same_number("4000", "4000") and not script.same_number(None, "1")
    data = script.load_split(FIXTURE, None, "train")
    assert len(data) == 20 and all("<<" not in e["reasoning"] and e["final"].isdigit() for e in data)


def test_gsm8k_example_trains_ce_and_ntl(tmp_path):
    script = _gsm8k_script()
    results = script.main(["--train_file", FIXTURE, "--compare", "--steps", "3", "--batch_size", "3",
                           "--grad_accum", "2", "--max_new_tokens", "4", "--eval_limit", "2",
                           "--max_length", "96", "--hidden_size", "32", "--layers", "1", "--cpu",
                           "--output_dir", str(tmp_path), "--save_model",
                           "--log_every", "100"])
    ce_run, ntl_run = results
    assert ce_run["ntl_weight"] == 0 and ntl_run["ntl_weight"] == 0.3
    for result in results:
        assert 0.0 <= result["accuracy"] <= 1.0 and result["evaluated"] == 2
        assert all(torch.isfinite(torch.tensor(result["final"][k])) for k in ("loss", "ce", "ntl"))
    assert ce_run["final"]["loss"] == pytest.approx(ce_run["final"]["ce"])
    final = ntl_run["final"]
    assert final["loss"] == pytest.approx(final["ce"] + 0.3 * final["ntl"], rel=1e-5)
    # a saved checkpoint loads back through --model_name_or_path
    again = script.main(["--train_file", FIXTURE, "--model_name_or_path", str(tmp_path / "ce_ntl_0.3" / "model"),
                         "--steps", "1", "--batch_size", "2", "--max_new_tokens", "2", "--eval_limit", "1",
                         "--cpu", "--log_every", "100"])
    assert again[0]["ntl_weight"] == 0.3 and again[0]["evaluated"] == 1
