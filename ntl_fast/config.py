"""The options of one loss call, validated once and shared by every backend."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

import torch

from .table import check_squash_factor

__all__ = ["LOSSES", "REDUCTIONS", "LossConfig", "LossKind", "accumulation_dtype"]


class LossKind(enum.IntEnum):
    """The NTL variants and the integer code each kernel receives for them: the one definition.

    The Triton kernels take ``LossKind.X.value`` as named ``tl.constexpr`` values; the C++ enum
    ``ntl::LossKind`` of ``csrc/ntl_math.h`` is checked against this class by the test suite.
    The public API names a variant by ``name.lower()`` (``"was"``, ``"mse"``, ...).
    """

    WAS = 0  # Wasserstein-1 over the values, docs/math.md §2.2
    MSE = 1  # squared error of the expected value, §2.1
    MAE = 2  # absolute error of the expected value, §2.1
    HUBER = 3  # Huber (delta = 1) of the expected value, §2.1
    WAS_CDF = 4  # Wasserstein-1 in CDF form, §2.3

    @classmethod
    def of(cls, loss: str) -> "LossKind":
        """The kind named ``loss`` (``"was"``, ...); ValueError for an unknown name."""
        if not isinstance(loss, str) or loss.upper() not in cls.__members__ or loss != loss.lower():
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        return cls[loss.upper()]


LOSSES = tuple(kind.name.lower() for kind in LossKind)
REDUCTIONS = ("mean", "sum", "none")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 logits (gradcheck), float32 for everything else (docs/math.md §4): the
    dtype of every loss, saved statistic and internal sum."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class LossConfig:
    """Per-call switches of docs/math.md §2 (hashable: kernels specialise on them).

    loss: ``"was"`` (§2.2), ``"mse"`` / ``"mae"`` / ``"huber"`` (§2.1), ``"was_cdf"`` (§2.3).
    squash_factor: WAS only; maps non-zero distances onto ``[1, s]``.
    reweigh: scale by number mass, ``m L + c (1 - m)`` (§2.4).
    gaussian_sigma: Gaussian-CE targets over the number tokens (§2.5); ``was_cdf`` then scores
        W1 against the same targets (§3); None = ordinary one-hot CE targets.
    ignore_index: label value of positions that count for nothing.
    """

    loss: str = "was"
    squash_factor: Optional[float] = None
    reweigh: bool = False
    gaussian_sigma: Optional[float] = None
    ignore_index: int = -100

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.squash_factor is not None:
            if self.loss != "was":
                raise ValueError(
                    f"squash_factor applies to loss='was' only, got loss={self.loss!r}"
                )
            check_squash_factor(self.squash_factor)
            object.__setattr__(self, "squash_factor", float(self.squash_factor))
        if not isinstance(self.reweigh, bool):
            raise TypeError(f"reweigh must be a bool, got {self.reweigh!r}")
        if self.gaussian_sigma is not None:
            if isinstance(self.gaussian_sigma, bool) or not isinstance(self.gaussian_sigma, (int, float)):
                raise TypeError(f"gaussian_sigma must be a number > 0 or None, got {self.gaussian_sigma!r}")
            if not self.gaussian_sigma > 0:
                raise ValueError(f"gaussian_sigma must be > 0, got {self.gaussian_sigma}")
            object.__setattr__(self, "gaussian_sigma", float(self.gaussian_sigma))
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
