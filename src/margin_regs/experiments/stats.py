"""Statistics of a comparison over seeds: paired differences and t-intervals.

Every regularizer trains on vanilla's per-seed split and initialization, so its effect
on seed ``s`` is the paired difference ``d_s = acc_reg(s) - acc_vanilla(s)``, whose
mean carries Student's two-sided t-interval with ``S - 1`` degrees of freedom.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import scipy.stats

__all__ = ["Interval", "gap_threshold", "paired_difference", "t_quantile"]


def t_quantile(df: int) -> float:
    """``t`` with ``P(|T| ≤ t) = 0.95`` for ``df ≥ 1`` degrees of freedom (scipy's).

    Example:
      >>> from margin_regs.experiments.stats import t_quantile
      >>> round(t_quantile(2), 4), round(t_quantile(1000), 3)
      (4.3027, 1.962)
    """
    if not df >= 1:
        raise ValueError(f"df must be ≥ 1, got {df}")
    return float(scipy.stats.t.ppf(0.975, df))


class Interval(NamedTuple):
    """A mean of ``n`` paired differences and its 95% t-interval ``[low, high]``
    (``None`` with one pair)."""

    mean: float
    low: float | None
    high: float | None
    n: int

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely above or below zero."""
        return self.low is not None and (self.low > 0 or self.high < 0)


def paired_difference(treated: Sequence[float], control: Sequence[float]) -> Interval:
    """Mean of ``treated[s] - control[s]`` over seeds with a 95% t-interval.

    ``mean ± t_{0.975, n-1} · sd / √n``, ``sd`` the differences' ``ddof=1`` deviation.

    Args:
      treated: one value per seed (e.g. a regularizer's test accuracies).
      control: the same seeds' values of the baseline (as many, at least one).

    Example:
      >>> from margin_regs.experiments.stats import paired_difference
      >>> d = paired_difference([0.92, 0.95, 0.94], [0.90, 0.92, 0.93])
      >>> round(d.mean, 4), round(d.low, 4), round(d.high, 4), d.excludes_zero
      (0.02, -0.0048, 0.0448, False)
    """
    treated, control = np.asarray(treated, float), np.asarray(control, float)
    if treated.shape != control.shape or treated.size == 0 or treated.ndim != 1:
        raise ValueError(
            f"need one value per seed on each side, got {treated.shape} and "
            f"{control.shape}"
        )
    diff = treated - control
    n = diff.size
    mean = float(diff.mean())
    if n == 1:
        return Interval(mean, None, None, 1)
    half = t_quantile(n - 1) * float(diff.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def gap_threshold(test_curves: Sequence[Sequence[float]]) -> float:
    """Yoshida & Miyato's ``α`` (:func:`margin_regs.generalization_gap`) for runs'
    test accuracy curves: the lowest best accuracy minus one point, at least 0.

    Example:
      >>> from margin_regs.experiments.stats import gap_threshold
      >>> round(gap_threshold([[0.5, 0.9, 0.88], [0.7, 0.86]]), 4)
      0.85
    """
    return max(0.0, min(float(np.max(c)) for c in test_curves) - 0.01)
