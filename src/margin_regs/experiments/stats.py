"""Statistics of a comparison over seeds: paired differences and t-intervals.

Every regularizer of a comparison trains on the same per-seed data split and
initialization as vanilla, so its effect on seed ``s`` is the paired difference
``d_s = acc_reg(s) - acc_vanilla(s)``; the seed-to-seed spread that both runs share
cancels. The mean difference carries Student's two-sided t-interval with ``S - 1``
degrees of freedom (``scipy.stats.t``); with one seed there is no interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import scipy.stats

__all__ = ["Interval", "gap_threshold", "paired_difference", "t_quantile"]


def t_quantile(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom.

    ``scipy.stats.t.ppf(0.975, df)``.

    Args:
      df: degrees of freedom, ≥ 1.

    Returns:
      ``t`` with ``P(|T| ≤ t) = 0.95``.

    Raises:
      ValueError: if ``df < 1``.

    Example:
      >>> from margin_regs.experiments.stats import t_quantile
      >>> round(t_quantile(2), 4), round(t_quantile(1000), 3)
      (4.3027, 1.962)
    """
    if not df >= 1:
        raise ValueError(f"df must be ≥ 1, got {df}")
    return float(scipy.stats.t.ppf(0.975, df))


class Interval(NamedTuple):
    """A mean paired difference and its 95% t-interval (``None`` with one seed).

    Attributes:
      mean: the mean of the differences.
      low: the interval's lower end, or ``None``.
      high: its upper end, or ``None``.
      n: the number of pairs.
    """

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

    ``mean ± t_{0.975, n-1} · sd / √n`` with ``sd`` the sample standard deviation
    (``ddof=1``) of the differences.

    Args:
      treated: one value per seed (e.g. a regularizer's test accuracies).
      control: the same seeds' values of the baseline.

    Returns:
      An :class:`Interval`; ``low``/``high`` are ``None`` for a single pair.

    Raises:
      ValueError: if the lengths differ or are zero.

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
    """Yoshida & Miyato's threshold ``α`` for comparing generalization gaps.

    One ``α`` that every run's test accuracy exceeds at some point: the lowest best
    test accuracy over the runs, minus one point (floored at 0), so that no method
    looks good by barely fitting (:func:`margin_regs.generalization_gap`).

    Args:
      test_curves: each run's test accuracies over training.

    Returns:
      ``α`` in [0, 1].

    Example:
      >>> from margin_regs.experiments.stats import gap_threshold
      >>> round(gap_threshold([[0.5, 0.9, 0.88], [0.7, 0.86]]), 4)
      0.85
    """
    return max(0.0, min(float(np.max(c)) for c in test_curves) - 0.01)
