"""The label rule and the causal shift (ntl_fast.labels): one rule for the losses and every counter.

A position counts for CE iff its label is not ignore_index and lies in [0, V); for NTL iff it
also is a number token.
"""

import pytest
import torch

import ntl_fast
from ntl_fast.distributed import token_counts
from ntl_fast.labels import causal_shift, count_positions, label_positions
from helpers import digit_table

V = 40  # digits 0-9 at ids 7..16


@pytest.mark.parametrize(
    "label,ignore_index,counts_for_ce,counts_for_ntl,bad",
    [
        (8, -100, True, True, False),  # a number token
        (V - 1, -100, True, False, False),  # a text token
        (0, -100, True, False, False),
        (-100, -100, False, False, False),  # ignored
        (-7, -100, False, False, True),  # negative, not ignore_index
        (V, -100, False, False, True),  # one past the vocabulary
        (8, 8, False, False, False),  # ignore_index inside [0, V), a number token
        (3, 3, False, False, False),  # ignore_index inside [0, V), a text token
        (-100, 3, False, False, True),  # -100 is no longer the ignored label
    ],
)
def test_the_rule(label, ignore_index, counts_for_ce, counts_for_ntl, bad):
    table = digit_table(V)
    labels = torch.tensor([label])
    in_range, is_bad, number_index = label_positions(labels, table, ignore_index)
    assert (in_range.item(), (number_index >= 0).item(), is_bad.item()) == (counts_for_ce, counts_for_ntl, bad)
    ce_count, ntl_count = count_positions(labels, table, ignore_index)
    assert (ce_count.item(), ntl_count.item()) == (int(counts_for_ce), int(counts_for_ntl))
    # every counter follows it, whatever it once did with such labels
    assert [c.item() for c in token_counts(labels, table, ignore_index)] == [float(counts_for_ce),
                                                                             float(counts_for_ntl)]


def test_causal_shift_moves_the_labels_and_pads_with_ignore_index():
    labels = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.int32)
    weights = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    shifted, shifted_weights = causal_shift(labels, -100, weights)
    assert shifted.dtype == torch.int32
    assert torch.equal(shifted, torch.tensor([[2, 3, -100], [5, 6, -100]], dtype=torch.int32))
    assert torch.equal(shifted_weights, torch.tensor([[0.2, 0.3, 0.0], [0.5, 0.6, 0.0]]))
    assert causal_shift(labels, 7)[1] is None
    assert torch.equal(labels, torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.int32))  # not modified


def test_counts_over_micro_batches_with_weights_and_the_shift():
    table = digit_table(V)
    labels = torch.tensor([[8, 30, -100, 9, -7], [V, 10, 3, 11, -100]])
    ce_count, ntl_count = count_positions([labels[:1], labels[1:]], table)
    assert ce_count.dtype == torch.int64 and (ce_count.item(), ntl_count.item()) == (6, 4)
    ce_count, ntl_count = count_positions(labels, table, shift_labels=True)  # drops 8 and V
    assert (ce_count.item(), ntl_count.item()) == (5, 3)
    weights = torch.full((2, 5), 0.5)
    ce_count, ntl_count = count_positions(labels, table, weights=weights)
    assert ce_count.dtype == torch.float32 and (ce_count.item(), ntl_count.item()) == (3.0, 2.0)
    with pytest.raises(ValueError, match="weights"):
        count_positions([labels, labels], table, weights=[weights])
    with pytest.raises(ValueError, match="labels"):
        count_positions([], table)


@pytest.mark.parametrize("shift_labels", [False, True])
@pytest.mark.parametrize("ignore_index", [-100, 8])
def test_counts_are_the_denominators_of_the_loss_means(shift_labels, ignore_index):
    table = digit_table(V)
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 6, V, generator=generator)
    labels = torch.randint(0, V, (3, 6), generator=generator)
    labels[0, 2] = labels[1, 4] = ignore_index
    weights = torch.rand(3, 6, generator=generator)
    ce_count, ntl_count = count_positions(labels, table, ignore_index, weights, shift_labels=shift_labels)
    options = dict(ignore_index=ignore_index, shift_labels=shift_labels, weights=weights, backend="reference")
    sums = ntl_fast.cross_entropy_with_ntl(logits, labels, table, reduction="sum", **options)
    means = ntl_fast.cross_entropy_with_ntl(logits, labels, table, **options)
    torch.testing.assert_close(means.ce, sums.ce / ce_count)
    torch.testing.assert_close(means.ntl, sums.ntl / ntl_count)
