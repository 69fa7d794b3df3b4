"""Mean ± standard deviation over seeds, and paired differences with a Student-t 95% interval.

The t quantile is computed here (no SciPy): the Student-t CDF through the regularized incomplete
beta function (its continued fraction, as in Numerical Recipes §6.4), inverted by bisection.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence

import numpy as np


def mean_sd(values: Sequence[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (ddof 1; NaN for a single value) of ``values``."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("values is empty")
    return {
        "mean": float(array.mean()),
        "sd": float(array.std(ddof=1)) if array.size > 1 else float("nan"),
        "n": int(array.size),
    }


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`t_cdf`, to 1e-10)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if df < 1:
        raise ValueError(f"df must be at least 1, got {df}")
    low, high = -1e4, 1e4
    while high - low > 1e-10:
        middle = (low + high) / 2
        if t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def paired_difference(treated: Sequence[float], control: Sequence[float], level: float = 0.95) -> Dict[str, float]:
    """Mean of ``treated[i] - control[i]`` (the same seed i) and its two-sided t interval."""
    if len(treated) != len(control):
        raise ValueError(f"{len(treated)} treated values for {len(control)} control values")
    differences = np.asarray(treated, dtype=np.float64) - np.asarray(control, dtype=np.float64)
    summary = mean_sd(differences)
    n = summary["n"]
    if n < 2:
        return {**summary, "low": float("nan"), "high": float("nan")}
    half = t_quantile(0.5 + level / 2, n - 1) * summary["sd"] / math.sqrt(n)
    return {**summary, "low": summary["mean"] - half, "high": summary["mean"] + half}
