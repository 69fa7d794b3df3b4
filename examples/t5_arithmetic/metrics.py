"""The paper's evaluation: the last number of each generated answer against the true value.

Accuracy and the shares of answers within ±1 and within 10% of the truth count every example (an
output without a number is wrong). MAE, median absolute error and R² are over the outputs that
hold a number; how many do not is reported beside them, and so is the count of *runaway*
outputs (generation that never emitted end-of-sequence before its length cap). A few runaway
digit strings would dominate MAE and R²: the caller caps generation at the answers' plausible
length, so a runaway's error stays of the answers' own order.
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
    """Accuracy, within-±1 and within-10% shares, MAE, median absolute error and R² of the last
    numbers of ``predictions`` (within 10%: ``|guess - truth| <= 0.1·|truth|``, exact for 0)."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    if not targets:
        raise ValueError("no examples to score")
    truths: List[float] = []
    guesses: List[float] = []
    correct = within_one = within_tenth = 0
    for prediction, target in zip(predictions, targets):
        truth = last_number(target)
        if truth is None:
            raise ValueError(f"target {target!r} holds no number")
        guess = last_number(prediction)
        if guess is None:
            continue
        truths.append(truth)
        guesses.append(guess)
        error = abs(guess - truth)
        correct += error <= 1e-9
        within_one += error <= 1.0 + 1e-9
        within_tenth += error <= 0.1 * abs(truth) + 1e-9
    errors = sorted(abs(g - t) for g, t in zip(guesses, truths))
    count = len(errors)
    metrics = {
        "n": len(targets),
        "accuracy": correct / len(targets),
        "within_1": within_one / len(targets),
        "within_10pct": within_tenth / len(targets),
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
