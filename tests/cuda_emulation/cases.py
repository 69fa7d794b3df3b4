"""The cases the emulated CUDA kernels are checked on (harness.Case lists, deterministic).

ci_cases(): every kernel × every loss variant of the operators (squash, reweigh, Gaussian
targets) over tables and vocabulary sizes chosen for the kernels' edges: K = 1, 7 (irregular
ids and values), 10, ≈1,110 (multi-digit values 0-999 plus extras); V below one block, not a
multiple of the block or of the unrolled stride, on both sides of each launch-size switch
(1,024 and 8,192 columns); M = 1 upward. Rotated through them: every logits dtype, int32 and
int64 labels, ignore_index inside and outside the vocabulary, bad labels, special values
(-inf masks, big negatives, +inf and NaN rows, all number tokens masked), and buffers one element
off 16-byte alignment.

corrupt_table_cases(): table tensors that break the table's invariants (a repeated number id, a
value_order that is no permutation). The CPU operators refuse them; the CUDA kernels read no
device memory on the host to check them, so they must stay free of races and out-of-bounds
accesses and give bitwise-repeatable results whatever they are given.
"""

from __future__ import annotations

import itertools
from typing import List, Tuple

import torch

from ntl_fast.config import LossConfig
from ntl_fast.cpp import _option_args, _table_args
from ntl_fast.table import NumberTokenTable

from .harness import Case

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# (kernel, with_ce): every entry point of the CUDA wrapper.
KERNEL_MODES = (("forward", True), ("forward", False), ("backward", True), ("backward", False),
                ("backward_inplace", True))
SPECIALS = ("plain", "neg_inf_mask", "big_negative", "pos_inf_row", "nan_row", "numbers_masked", "large_offset",
            "numbers_dominate", "plain")


def _variants(ignore_index: int) -> List[LossConfig]:
    return [
        LossConfig("was", ignore_index=ignore_index),
        LossConfig("was", squash_factor=4.0, ignore_index=ignore_index),
        LossConfig("was", reweigh=True, ignore_index=ignore_index),
        LossConfig("mse", ignore_index=ignore_index),
        LossConfig("mae", reweigh=True, ignore_index=ignore_index),
        LossConfig("huber", ignore_index=ignore_index),
        LossConfig("was_cdf", ignore_index=ignore_index),
        LossConfig("was_cdf", gaussian_sigma=1.5, reweigh=True, ignore_index=ignore_index),
        LossConfig("was", gaussian_sigma=0.7, ignore_index=ignore_index),
    ]


def _table(kind: str, V: int) -> NumberTokenTable:
    if kind == "digits":  # K = 10 at ids 7..16
        return NumberTokenTable.from_values({7 + d: float(d) for d in range(10)}, vocab_size=V)
    if kind == "irregular":  # K = 7: ids 0 and V-1, unsorted values, a duplicated value
        return NumberTokenTable.from_values({0: 9.0, 4: 0.0, 11: 2.5, 20: 100.0, 31: -3.0, 44: 7.0, V - 1: 2.5},
                                            vocab_size=V)
    if kind == "single":  # K = 1: no gaps at all
        return NumberTokenTable.from_values({V // 2: 3.0}, vocab_size=V)
    if kind == "multi_digit":  # K = 1,110: 0..999, then halves, negatives and large values, spread over V
        values = [float(v) for v in range(1000)] + [v + 0.5 for v in range(50)] + \
                 [-float(v) for v in range(1, 41)] + [1000.0 * v for v in range(1, 21)]
        ids = torch.randperm(V, generator=torch.Generator().manual_seed(V))[:len(values)].tolist()
        return NumberTokenTable.from_values(dict(zip(ids, values)), vocab_size=V)
    raise ValueError(kind)


# (table, V, M): tails everywhere. V = 2, 40, 53 below one block of 128 threads, 131 just past
# it, 517 past one unrolled stride (4 x 128), 1,023 (128 threads) against 1,024 (256), 1,500 and
# 4,099 (256, tails of the 1,024 stride), 8,191 (256) against 8,203 (512 threads, a tail);
# V = 1,111 with K = 1,110 leaves a single token that is not a number.
SHAPES: Tuple[Tuple[str, int, int], ...] = (
    ("digits", 40, 6), ("single", 2, 4), ("irregular", 53, 6), ("single", 40, 3), ("digits", 131, 5),
    ("irregular", 517, 3), ("digits", 1023, 3), ("irregular", 1024, 2), ("multi_digit", 1500, 3),
    ("multi_digit", 1111, 2), ("digits", 4099, 2), ("multi_digit", 8191, 1), ("multi_digit", 8203, 2),
)


def _labels(table: NumberTokenTable, M: int, ignore_index: int, turn: int, g: torch.Generator) -> torch.Tensor:
    """Number tokens, other tokens, ignore_index and bad labels, mixed differently each turn."""
    V = table.vocab_size
    numbers = table.number_ids
    bad = [V, V + 7, -1 if ignore_index != -1 else -2, -(2 ** 40)]
    pool = []
    for r in range(M):
        pick = (turn + r) % 6
        if pick in (0, 1, 2):
            pool.append(int(numbers[torch.randint(0, numbers.numel(), (1,), generator=g)]))
        elif pick == 3:
            pool.append(int(torch.randint(0, V, (1,), generator=g)))
        elif pick == 4:
            pool.append(ignore_index)
        else:
            pool.append(bad[(turn // 6) % len(bad)])
    labels = torch.tensor(pool, dtype=torch.int64)
    if turn % 3 == 1 and labels.abs().max() < 2 ** 31:
        labels = labels.to(torch.int32)
    return labels


def _logits(table: NumberTokenTable, M: int, dtype: torch.dtype, special: str, g: torch.Generator) -> torch.Tensor:
    V = table.vocab_size
    z = torch.randn(M, V, generator=g, dtype=torch.float64) * 3
    numbers = table.number_ids
    if special == "neg_inf_mask":  # padded vocabulary columns and some number tokens masked
        z[:, torch.rand(V, generator=g) < 0.3] = -float("inf")
        z[:, numbers[0]] = 1.0  # keep one number token finite
    elif special == "big_negative":
        z[:, torch.rand(V, generator=g) < 0.3] = -1e4 if dtype != torch.float16 else -6e4
    elif special == "pos_inf_row":
        z[0, int(torch.randint(0, V, (1,), generator=g))] = float("inf")
    elif special == "nan_row":
        z[M - 1, int(numbers[-1])] = float("nan")
    elif special == "numbers_masked":  # every number token -inf in row 0: LSE_N = -inf
        z[0, numbers] = -float("inf")
    elif special == "large_offset":  # |z| ~ 1e4: LSE of large magnitude
        z += 1e4 if int(numbers[0]) % 2 else -1e4
    elif special == "numbers_dominate":  # the number tokens hold almost all the mass (reweigh: m ~ 1)
        z[:, numbers] += 30.0
    return z.to(dtype)


def ci_cases(seed: int = 0) -> List[Case]:
    """The CI set: every kernel × loss variant on every shape, the other axes rotated."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    turn = 0
    for (table_kind, V, M) in SHAPES:
        table = _table(table_kind, V)
        ignore_index = -100 if V < 1000 else 5  # an id inside the vocabulary (a non-number id)
        if table_kind == "multi_digit":
            ignore_index = -100 if V == 8191 else int(table.number_ids[3])  # or even a number token
        for (kernel, with_ce), config in itertools.product(KERNEL_MODES, _variants(ignore_index)):
            if V >= 8191 and turn % 3:  # the widest blocks cost the most: a third of the product
                turn += 1
                continue
            dtype = DTYPES[turn % len(DTYPES)]
            special = SPECIALS[turn % len(SPECIALS)]
            labels = _labels(table, M, ignore_index, turn, g)
            grad_ce = torch.rand(M, generator=g) + 0.5
            if turn % 5 == 2:
                grad_ce[0] = 0.0  # a zero upstream CE gradient takes its own branch
            cases.append(Case(
                name=f"{table_kind}-V{V}-M{M}-{kernel}{'' if with_ce else '-ntl_only'}-{_config_name(config)}"
                     f"-{str(dtype).split('.')[-1]}-{special}-{labels.dtype}".replace("torch.", "")
                     + ("-misaligned" if turn % 3 == 0 else ""),
                kernel=kernel, logits=_logits(table, M, dtype, special, g), labels=labels,
                table=_table_args(table), options=_option_args(table, config), with_ce=with_ce,
                grad_ce=grad_ce, grad_ntl=torch.rand(M, generator=g) - 0.25, misaligned=turn % 3 == 0,
            ))
            turn += 1
    return cases


def _config_name(config: LossConfig) -> str:
    name = config.loss
    if config.squash_factor is not None:
        name += "+squash"
    if config.reweigh:
        name += "+reweigh"
    if config.gaussian_sigma is not None:
        name += "+gaussian"
    return name


def barrier_cases() -> List[Case]:
    """The CI cases of the first shape: every kernel and variant, so every block barrier."""
    table_kind, V, M = SHAPES[0]
    return [case for case in ci_cases() if case.name.startswith(f"{table_kind}-V{V}-M{M}-")]


def corrupt_table_cases() -> List[Case]:
    """Backwards over table tensors that break the table's invariants; their saved rows come from
    the valid table (the CPU forward refuses the corrupt one)."""
    g = torch.Generator().manual_seed(7)
    table = _table("digits", 40)
    M = 3
    valid = _table_args(table)
    ids, values, index, order, gaps = valid
    number_labels = ids[torch.tensor([0, 4, 9])]

    def make(name, kernel, labels, table_args, config):
        return Case(name=name, kernel=kernel, logits=torch.randn(M, 40, generator=g), labels=labels,
                    table=table_args, options=_option_args(table, config), saved_table=valid,
                    grad_ce=torch.rand(M, generator=g) + 0.5, grad_ntl=torch.rand(M, generator=g) + 0.5)

    # The same id twice in number_ids: two entries of the fix-up loop name one gradient column.
    dup_ids, dup_index = ids.clone(), index.clone()
    dup_ids[1] = dup_ids[0]
    dup_index[ids[1]] = -1
    # A value_order that is not a permutation: was_cdf would skip the entries out of range.
    bad_order = order.clone()
    bad_order[3] = 99
    bad_order[5] = bad_order[4]
    cases = []
    for kernel in ("backward", "backward_inplace"):
        for loss in ("was", "mse"):
            cases.append(make(f"duplicate_number_ids-{kernel}-{loss}", kernel, number_labels[[0, 2, 2]],
                              (dup_ids, values, dup_index, order, gaps), LossConfig(loss)))
        cases.append(make(f"non_permutation_value_order-{kernel}", kernel, number_labels,
                          (ids, values, index, bad_order, gaps), LossConfig("was_cdf")))
    return cases
