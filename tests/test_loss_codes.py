"""The loss codes are defined once, by ntl_fast.config.LossKind: the C++ enum must say the same, and
the compiled operators receive the code itself (they map no loss names of their own)."""

import re
from pathlib import Path

import pytest
import torch

from ntl_fast import reference
from ntl_fast.config import LOSSES, LossConfig, LossKind

from helpers import assert_spec_close, irregular_table, random_labels

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def _cpp_loss_kinds():
    """{NAME: value} of `enum LossKind` in csrc/ntl_math.h (kWasCdf -> WAS_CDF)."""
    text = (CSRC / "ntl_math.h").read_text()
    match = re.search(r"enum\s+LossKind\s*(?::\s*\w+)?\s*\{([^}]*)\}", text)
    assert match, "enum LossKind not found in csrc/ntl_math.h"
    kinds = {}
    for entry in match.group(1).split(","):
        entry = entry.strip()
        if not entry:
            continue
        name, value = re.fullmatch(r"k(\w+)\s*=\s*(\d+)", entry).groups()
        kinds[re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()] = int(value)
    return kinds


def test_cpp_enum_equals_loss_kind():
    assert _cpp_loss_kinds() == {kind.name: kind.value for kind in LossKind}


def test_loss_names_come_from_loss_kind():
    assert LOSSES == tuple(kind.name.lower() for kind in LossKind)
    for kind in LossKind:
        assert LossKind.of(kind.name.lower()) is kind


def test_cpp_sources_map_no_loss_names():
    """The operators take the integer code (ntl_fast/cpp.py passes LossKind.of(config.loss)), so no
    C++ source spells a loss name as a string to look it up."""
    for path in sorted(CSRC.rglob("*")):
        if path.suffix in (".h", ".cpp", ".cu"):
            text = path.read_text()
            for name in LOSSES:
                assert f'"{name}"' not in text, f"{path.relative_to(CSRC.parent)} spells the loss name {name!r}"


# --------------------------------------------------------------------------------- the operators
@pytest.fixture(scope="module")
def cpp():
    return pytest.importorskip(
        "ntl_fast.cpp", reason="ntl_fast._C is not built (pip install --no-build-isolation -e .)"
    )


@pytest.mark.parametrize("kind", list(LossKind), ids=lambda kind: kind.name)
def test_each_code_runs_its_own_loss(cpp, kind):
    """Code k computes LossKind(k)'s loss: the C++ NTL equals the reference's for that name."""
    table = irregular_table()
    generator = torch.Generator().manual_seed(int(kind))
    logits = torch.randn(16, table.vocab_size, generator=generator, dtype=torch.float64)
    labels = random_labels((16,), table, number_fraction=0.9, ignore_fraction=0.0, generator=generator)
    config = LossConfig(kind.name.lower())
    assert cpp._option_args(table, config)[0] == kind.value
    assert_spec_close(cpp.ntl_rows(logits, labels, table, config), reference.ntl_rows(logits, labels, table, config),
                      torch.float64, what=kind.name)


@pytest.mark.parametrize("code", [min(LossKind) - 1, max(LossKind) + 1])
def test_codes_outside_loss_kind_are_refused(cpp, code):
    table = irregular_table()
    options = list(cpp._option_args(table, LossConfig()))
    options[0] = code
    logits, labels = torch.randn(2, table.vocab_size), torch.zeros(2, dtype=torch.long)
    with pytest.raises(RuntimeError, match="loss must be an ntl_fast.config.LossKind code"):
        torch.ops.ntl_fast.ntl_forward(logits, labels, table.kernel_tensors(), *options)
