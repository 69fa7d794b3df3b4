"""Exact global means: 2 gloo ranks under DDP, and 4 accumulated micro-batches, equal one batch."""

import gc
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ntl_fast import cross_entropy_with_ntl
from ntl_fast.distributed import global_counts, token_counts
from ntl_fast.linear import linear_cross_entropy_with_ntl
from helpers import digit_table, random_labels

HIDDEN, VOCAB = 8, 45  # the head is padded past the 40-id table
SPLITS = (5, 9)  # uneven shares of the 14 rows (and of their number positions)


def _table():
    return digit_table(vocab_size=40)


def _data(seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(sum(SPLITS), 11, HIDDEN, generator=generator)
    labels = random_labels((sum(SPLITS), 11), _table(), generator=generator)
    weights = torch.rand(sum(SPLITS), 11, generator=generator)
    return hidden, labels, weights


class Head(torch.nn.Module):
    """An LM head whose forward returns CE + NTL, as a causal LM patched by enable_ntl does."""

    def __init__(self, fused: bool):
        super().__init__()
        torch.manual_seed(1)
        self.proj = torch.nn.Linear(HIDDEN, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, VOCAB)
        self.fused = fused

    def forward(self, hidden, labels, weights, ce_count, ntl_count):
        options = dict(ntl_weight=0.3, shift_labels=True, weights=weights, ce_normalizer=ce_count,
                       ntl_normalizer=ntl_count, backend="reference")
        hidden = torch.tanh(self.proj(hidden))
        if self.fused:
            return linear_cross_entropy_with_ntl(hidden, self.head.weight, labels, _table(),
                                                 bias=self.head.bias, chunk_size=6, **options)
        return cross_entropy_with_ntl(self.head(hidden), labels, _table(), **options)


def _single_process(fused):
    hidden, labels, weights = _data()
    model = Head(fused).double()
    ce_count, ntl_count = global_counts(labels, _table(), weights=weights, shift_labels=True)
    out = model(hidden.double(), labels, weights.double(), ce_count.double(), ntl_count.double())
    out.loss.backward()
    return out.loss.detach(), [p.grad for p in model.parameters()]


def _rank(rank, world_size, init_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        hidden, labels, weights = _data()
        start = sum(SPLITS[:rank])
        part = slice(start, start + SPLITS[rank])
        results = {}
        for fused in (False, True):  # one spawn for both paths: starting the processes dominates
            model = torch.nn.parallel.DistributedDataParallel(Head(fused).double())
            ce_count, ntl_count = global_counts(labels[part], _table(), weights=weights[part],
                                                shift_labels=True)
            out = model(hidden[part].double(), labels[part], weights[part].double(), ce_count.double(),
                        ntl_count.double())
            # DDP averages gradients over ranks; the global mean needs their sum
            (out.loss * world_size).backward()
            loss = out.loss.detach().clone()
            dist.all_reduce(loss)
            results[fused] = {"loss": loss, "grads": [p.grad for p in model.module.parameters()]}
            del model, out
        if rank == 0:
            torch.save(results, result_file)
        dist.barrier()
    finally:
        # Release DDP's reducer (and the gloo work it holds) before the group goes: a gloo thread
        # still joinable when the interpreter exits aborts the rank (about 1 run in 20 without this)
        gc.collect()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results():
    with tempfile.TemporaryDirectory() as directory:
        init_file = os.path.join(directory, "init")
        result_file = os.path.join(directory, "result.pt")
        mp.spawn(_rank, args=(2, init_file, result_file), nprocs=2, join=True)
        return torch.load(result_file)


@pytest.mark.parametrize("fused", [False, True], ids=["materialised", "fused-linear"])
def test_two_gloo_ranks_equal_one_process(fused, two_rank_results):
    expected_loss, expected_grads = _single_process(fused)
    result = two_rank_results[fused]
    assert abs(result["loss"].item() - expected_loss.item()) <= 1e-6 * abs(expected_loss.item())
    for actual, wanted in zip(result["grads"], expected_grads):
        assert (actual - wanted).abs().max().item() <= 1e-6 * wanted.abs().max().item() + 1e-12


@pytest.mark.parametrize("fused", [False, True], ids=["materialised", "fused-linear"])
def test_four_micro_batches_equal_one_batch(fused):
    expected_loss, expected_grads = _single_process(fused)
    hidden, labels, weights = _data()
    model = Head(fused).double()
    parts = [slice(0, 2), slice(2, 3), slice(3, 9), slice(9, 14)]
    ce_count, ntl_count = global_counts([labels[p] for p in parts], _table(),
                                        weights=[weights[p] for p in parts], shift_labels=True)
    total = 0.0
    for part in parts:
        out = model(hidden[part].double(), labels[part], weights[part].double(), ce_count.double(),
                    ntl_count.double())
        out.loss.backward()
        total += out.loss.item()
    assert abs(total - expected_loss.item()) <= 1e-6 * abs(expected_loss.item())
    for param, wanted in zip(model.parameters(), expected_grads):
        assert (param.grad - wanted).abs().max().item() <= 1e-6 * wanted.abs().max().item() + 1e-12


def test_token_counts():
    table = _table().resized(VOCAB)  # the head's width: V = 45
    labels = torch.tensor([[7, 8, -100, 30, 42], [16, -100, -100, 1, 9]])  # 42: a padded-head id
    ce_count, ntl_count = token_counts(labels, table)
    assert (ce_count.item(), ntl_count.item()) == (7.0, 4.0)
    # against the 40-id table alone, 42 lies outside [0, V) and counts for nothing
    assert token_counts(labels, _table())[0].item() == 6.0
    ce_count, ntl_count = token_counts([labels[:1], labels[1:]], table, shift_labels=True)
    assert (ce_count.item(), ntl_count.item()) == (5.0, 2.0)
    weights = torch.full((2, 5), 0.5)
    assert token_counts(labels, table, weights=weights)[1].item() == 2.0
