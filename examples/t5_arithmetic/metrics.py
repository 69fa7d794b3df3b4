"""The paper's evaluation: the last number of each generated answer against the true value.

Accuracy counts exact values (an output without a number is wrong). MAE, median absolute error
and R² are over the outputs that hold a number; how many do not is reported beside them, and so
is the count of *runaway* outputs (generation that never emitted end-of-sequence), because a
few runaway digit strings dominate MAE.
"""

from __future__ import annotations

import math
import re
from typing import Dict, List, Optional, Sequence

NUMBER_RE = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")


def last_number(text: str) -> Optional[float]:
    """The value of the last number in ``text`` (``"x = -3.5"`` -> -3.5), None if it has none."""
    matches = NUMBER_RE.findall(text.replace(",", ""))
    if not matches:
        return None
    value = float(matches[-1])
    return value if math.isfinite(value) else None


def number_metrics(
    predictions: Sequence[str],
    targets: Sequence[str],
    runaway: Optional[Sequence[bool]] = None,
) -> Dict[str, float]:
    """Accuracy, MAE, median absolute error and R² of the last numbers of ``predictions``."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    if not targets:
        raise ValueError("no examples to score")
    truths: List[float] = []
    guesses: List[float] = []
    correct = 0
    for prediction, target in zip(predictions, targets):
        truth = last_number(target)
        if truth is None:
            raise ValueError(f"target {target!r} holds no number")
        guess = last_number(prediction)
        if guess is None:
            continue
        truths.append(truth)
        guesses.append(guess)
        correct += math.isclose(guess, truth, rel_tol=0.0, abs_tol=1e-9)
    errors = sorted(abs(g - t) for g, t in zip(guesses, truths))
    count = len(errors)
    metrics = {
        "n": len(targets),
        "accuracy": correct / len(targets),
        "mae": sum(errors) / count if count else float("nan"),
        "median_ae": _median(errors) if count else float("nan"),
        "r2": _r2(guesses, truths) if count else float("nan"),
        "no_number": len(targets) - count,
    }
    if runaway is not None:
        metrics["runaway"] = int(sum(bool(r) for r in runaway))
    return metrics


def _median(sorted_values: List[float]) -> float:
    middle = len(sorted_values) // 2
    if len(sorted_values) % 2:
        return sorted_values[middle]
    return (sorted_values[middle - 1] + sorted_values[middle]) / 2


def _r2(guesses: List[float], truths: List[float]) -> float:
    """``1 - SS_res / SS_tot`` (NaN when the targets do not vary); runaway values make it -inf-ish."""
    mean = sum(truths) / len(truths)
    total = sum((t - mean) * (t - mean) for t in truths)
    residual = sum((g - t) * (g - t) for g, t in zip(guesses, truths))
    if total == 0:
        return float("nan")
    return 1.0 - residual / total
