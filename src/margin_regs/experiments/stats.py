"""Statistics of a comparison over seeds: paired differences and t-intervals.

Every regularizer of a comparison trains on the same per-seed data split and
initialization as vanilla, so its effect on seed ``s`` is the paired difference
``d_s = acc_reg(s) - acc_vanilla(s)``; the seed-to-seed spread that both runs share
cancels. The mean difference carries Student's two-sided t-interval with ``S - 1``
degrees of freedom; with one seed there is no interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["Interval", "paired_difference", "t_quantile"]

# Two-sided 95% quantiles t_{0.975, ν} for ν = 1..30 (Student's t table).
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
_Z975 = 1.959964


def t_quantile(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom.

    A table for ``df ≤ 30``; beyond, the Cornish-Fisher expansion around the normal
    quantile (error below 1e-4 there).

    Args:
      df: degrees of freedom, ≥ 1.

    Returns:
      ``t`` with ``P(|T| ≤ t) = 0.95``.

    Raises:
      ValueError: if ``df < 1``.

    Example:
      >>> from margin_regs.experiments.stats import t_quantile
      >>> t_quantile(2), round(t_quantile(1000), 3)
      (4.3027, 1.962)
    """
    if df < 1:
        raise ValueError(f"df must be ≥ 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


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
