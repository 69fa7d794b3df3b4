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

import copy
import itertools
from typing import List, Optional, Tuple

import torch

from ntl_fast.config import LossConfig
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
    if kind == "wide":  # K = 4,096 (the most the kernels serve): 0..4095 at scattered ids
        ids = torch.randperm(V, generator=torch.Generator().manual_seed(V))[:4096].tolist()
        return NumberTokenTable.from_values({i: float(v) for v, i in enumerate(ids)}, vocab_size=V)
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


def _chunk(kernel: str, M: int, turn: int) -> Optional[int]:
    """Every fifth backward or one-pass case of several rows gets a workspace of 1 or 2 rows: its
    rows go through the number-terms kernel and the dense kernel in several chunks."""
    if kernel == "forward" or M < 2 or turn % 5 != 1:
        return None
    return 1 + (turn // 10) % 2


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
            chunk = _chunk(kernel, M, turn)
            cases.append(Case(
                name=f"{table_kind}-V{V}-M{M}-{kernel}{'' if with_ce else '-ntl_only'}-{_config_name(config)}"
                     f"-{str(dtype).split('.')[-1]}-{special}-{labels.dtype}".replace("torch.", "")
                     + ("-misaligned" if turn % 3 == 0 else "") + (f"-chunks{chunk}" if chunk else ""),
                kernel=kernel, logits=_logits(table, M, dtype, special, g), labels=labels,
                table=table, config=config, with_ce=with_ce,
                grad_ce=grad_ce, grad_ntl=torch.rand(M, generator=g) - 0.25, misaligned=turn % 3 == 0,
                workspace_rows=chunk,
            ))
            turn += 1
    return cases


ONE_PASS_KERNELS = ("loss_and_grad", "loss_and_grad_inplace")


def loss_and_grad_cases(seed: int = 1) -> List[Case]:
    """The one-pass kernels (fresh gradient and in place) on every shape of SHAPES, one loss
    variant after another, the dtype, special values, labels and alignment rotated as in
    ci_cases(); the per-row scales (the fields grad_ce / grad_ntl) hold rows whose two scales are
    both 0 (they count for nothing: no gradient pass) and a zero CE scale."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    turn = 0
    for (table_kind, V, M) in SHAPES:
        table = _table(table_kind, V)
        ignore_index = -100 if V < 1000 else 5
        if table_kind == "multi_digit":
            ignore_index = -100 if V == 8191 else int(table.number_ids[3])
        for config in _variants(ignore_index):
            if V >= 8191 and turn % 3:
                turn += 1
                continue
            kernel = ONE_PASS_KERNELS[turn % 2]
            dtype = DTYPES[turn % len(DTYPES)]
            special = SPECIALS[(turn + 1) % len(SPECIALS)]
            labels = _labels(table, M, ignore_index, turn + 1, g)
            ce_scale = torch.rand(M, generator=g) + 0.5
            ntl_scale = torch.rand(M, generator=g) - 0.25
            if turn % 4 == 1:
                ce_scale[0] = ntl_scale[0] = 0.0
            if turn % 4 == 3:
                ce_scale[M - 1] = 0.0
            chunk = _chunk(kernel, M, turn)
            cases.append(Case(
                name=f"{table_kind}-V{V}-M{M}-{kernel}-{_config_name(config)}-{str(dtype).split('.')[-1]}"
                     f"-{special}-{labels.dtype}".replace("torch.", "") + ("-misaligned" if turn % 3 == 0 else "")
                     + (f"-chunks{chunk}" if chunk else ""),
                kernel=kernel, logits=_logits(table, M, dtype, special, g), labels=labels, table=table,
                config=config, grad_ce=ce_scale, grad_ntl=ntl_scale, misaligned=turn % 3 == 0,
                workspace_rows=chunk,
            ))
            turn += 1
    return cases


# (table, V, M, dtype) of the one-pass launch cases: V tails, M = 1, K = 1,110, and a float32 row of
# 12,300 columns (49.2 KB staged: over the 48 KiB a launch gets without opting in).
LAUNCH_SHAPES = (("digits", 40, 6, torch.float32), ("single", 2, 1, torch.bfloat16),
                 ("irregular", 517, 5, torch.bfloat16), ("digits", 4099, 3, torch.float64),
                 ("multi_digit", 1500, 4, torch.float32), ("multi_digit", 8203, 2, torch.bfloat16),
                 ("digits", 12300, 2, torch.float32), ("irregular", 131, 4, torch.float16))
# How the one-pass launch runs them (harness.Case.launch): the plan of an H100-like device (rows
# staged in shared memory, one block per row), one block looping over every row (staged), the
# rows read twice from global memory one block per row (unbounded), and the L2-bounded grid of a
# device whose shared memory holds no row, at most 3 blocks (one SM) or 1 (an L2 of one byte);
# and a device with 4 KiB of shared memory per block, which holds the rows of 517 bfloat16
# columns and narrower but not the wider ones.
LAUNCHES = {
    "planned": {},
    "staged-grid1": {"rows_in_flight": 1},
    "unstaged-unbounded": {"row_in_smem": 0, "rows_in_flight": 0},
    "unstaged-l2-sm1": {"device_smem_optin": 1024, "device_sms": 1},
    "unstaged-l2-tiny": {"device_smem_optin": 1024, "device_l2": 1},
    "optin-4k": {"device_smem_optin": 4096, "device_sms": 1},  # the narrow rows fit, the wide ones do not
}


def one_pass_launch_cases(launch: str, seed: int = 3) -> List[Case]:
    """The one-pass kernels on LAUNCH_SHAPES under one of LAUNCHES: the same inputs whatever the
    launch, so that the outputs of every launch can be compared bit for bit (and each with the CPU
    operator). Labels mix number tokens, other tokens, ignore_index and bad labels."""
    g = torch.Generator().manual_seed(seed)
    variants = _variants(-100)
    cases = []
    for turn, (table_kind, V, M, dtype) in enumerate(LAUNCH_SHAPES):
        table = _table(table_kind, V)
        config = variants[turn % len(variants)] if table_kind != "multi_digit" else variants[6 - turn % 2]
        kernel = ONE_PASS_KERNELS[turn % 2]
        labels = _labels(table, M, -100, turn + 3, g)
        ce_scale, ntl_scale = torch.rand(M, generator=g) + 0.5, torch.rand(M, generator=g) - 0.25
        chunk = 2 if turn % 3 == 2 and M > 2 else None
        cases.append(Case(
            name=f"{table_kind}-V{V}-M{M}-{kernel}-{_config_name(config)}-{str(dtype).split('.')[-1]}"
                 f"-{launch}".replace("torch.", "") + ("-misaligned" if turn % 3 == 1 else "")
                 + (f"-chunks{chunk}" if chunk else ""),
            kernel=kernel, logits=_logits(table, M, dtype, SPECIALS[turn % len(SPECIALS)], g), labels=labels,
            table=table, config=config, grad_ce=ce_scale, grad_ntl=ntl_scale, misaligned=turn % 3 == 1,
            workspace_rows=chunk, launch=dict(LAUNCHES[launch]),
        ))
    return cases


def wide_table_cases() -> List[Case]:
    """K = 4,096 number tokens (the most the kernels serve; their fixes fill 32 KiB of shared
    memory in float64): every entry point, a few loss variants."""
    g = torch.Generator().manual_seed(11)
    V, M = 4101, 2
    table = _table("wide", V)
    numbers = table.number_ids
    labels = torch.tensor([int(numbers[17]), int(numbers[4000])])
    cases = []
    modes = (("forward", True), ("forward", False), ("backward", True), ("backward", False), ("backward_inplace", True),
             ("loss_and_grad", True), ("loss_and_grad_inplace", True))
    configs = (LossConfig("was"), LossConfig("was_cdf"), LossConfig("mse", reweigh=True))
    for turn, ((kernel, with_ce), config) in enumerate(itertools.product(modes, configs)):
        dtype = (torch.float32, torch.bfloat16, torch.float64)[turn % 3]
        cases.append(Case(
            name=f"wide-V{V}-M{M}-{kernel}{'' if with_ce else '-ntl_only'}-{_config_name(config)}"
                 f"-{str(dtype).split('.')[-1]}".replace("torch.", ""),
            kernel=kernel, logits=(torch.randn(M, V, generator=g, dtype=torch.float64) * 3).to(dtype), labels=labels,
            table=table, config=config, with_ce=with_ce, grad_ce=torch.rand(M, generator=g) + 0.5,
            grad_ntl=torch.rand(M, generator=g) - 0.25, misaligned=turn % 2 == 1,
        ))
    return cases


def scale_gradient_cases() -> List[Case]:
    """grad *= grad_output in place: every dtype, sizes with and without 16-byte packs and tails,
    aligned and not, grad_output 1 (nothing to do), other finite values, 0 and NaN."""
    g = torch.Generator().manual_seed(5)
    table = _table("digits", 40)
    cases = []
    shapes = ((1, 1), (1, 7), (3, 13), (4, 40), (2, 1023), (9, 1111))
    scales = (1.0, 0.5, -3.0, 0.0, float("nan"), 1.0 + 2 ** -20)
    for turn, ((M, V), scale) in enumerate(itertools.product(shapes, scales)):
        dtype = DTYPES[turn % len(DTYPES)]
        logits = torch.randn(M, V, generator=g, dtype=torch.float64) * 3
        if turn % 5 == 2:
            logits[0, 0] = float("inf")
        cases.append(Case(
            name=f"scale_gradient-M{M}-V{V}-{scale}-{str(dtype).split('.')[-1]}".replace("torch.", "")
                 + ("-misaligned" if turn % 2 else ""),
            kernel="scale_gradient", logits=logits.to(dtype), labels=torch.zeros(M, dtype=torch.int64),
            table=table, config=LossConfig("was"),  # the table is not read
            grad_output=torch.tensor(scale, dtype=torch.float64), misaligned=turn % 2 == 1,
        ))
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
    """The CI cases of the first shape: every kernel and variant, so every block barrier (the
    one-pass kernels' among them), and that shape's one-pass case with blocks that loop over
    several rows (staged, and L2-bounded)."""
    table_kind, V, M = SHAPES[0]
    loops = [case for launch in ("staged-grid1", "unstaged-l2-tiny") for case in one_pass_launch_cases(launch)[:1]]
    return [case for case in ci_cases() + loss_and_grad_cases()
            if case.name.startswith(f"{table_kind}-V{V}-M{M}-")] + loops


def _corrupted(table: NumberTokenTable, **tensors: torch.Tensor) -> NumberTokenTable:
    """A copy of ``table`` holding ``tensors`` in place of its own, unchecked (the constructor
    would refuse them)."""
    broken = copy.copy(table)
    for name, tensor in tensors.items():
        setattr(broken, name, tensor)
    broken._device_cache = {torch.device("cpu"): broken}
    broken._resized_cache = {}
    broken._distance_cache = {}
    return broken


def corrupt_table_cases() -> List[Case]:
    """Backwards over table tensors that break the table's invariants; their saved rows come from
    the valid table (the CPU forward refuses the corrupt one)."""
    g = torch.Generator().manual_seed(7)
    table = _table("digits", 40)
    M = 3
    ids, index, order = table.number_ids, table.number_index, table.value_order
    number_labels = ids[torch.tensor([0, 4, 9])]

    def make(name, kernel, labels, broken, config):
        return Case(name=name, kernel=kernel, logits=torch.randn(M, 40, generator=g), labels=labels,
                    table=broken, config=config, saved_table=table,
                    grad_ce=torch.rand(M, generator=g) + 0.5, grad_ntl=torch.rand(M, generator=g) + 0.5)

    # The same id twice in number_ids: two entries of the fix-up loop name one gradient column.
    dup_ids, dup_index = ids.clone(), index.clone()
    dup_ids[1] = dup_ids[0]
    dup_index[ids[1]] = -1
    # A value_order that is not a permutation: was_cdf would skip the entries out of range.
    bad_order = order.clone()
    bad_order[3] = 99
    bad_order[5] = bad_order[4]
    duplicate = _corrupted(table, number_ids=dup_ids, number_index=dup_index)
    non_permutation = _corrupted(table, value_order=bad_order)
    cases = []
    for kernel in ("backward", "backward_inplace", "loss_and_grad", "loss_and_grad_inplace"):
        for loss in ("was", "mse"):
            cases.append(make(f"duplicate_number_ids-{kernel}-{loss}", kernel, number_labels[[0, 2, 2]],
                              duplicate, LossConfig(loss)))
        cases.append(make(f"non_permutation_value_order-{kernel}", kernel, number_labels,
                          non_permutation, LossConfig("was_cdf")))
    return cases
