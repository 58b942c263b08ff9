"""Verdicts on a paper's claims, by a rule fixed before any number is seen.

A claim compares two methods (or two settings) on one metric, "A beats B", in one
or more *cells* (a training-set size, a depth, a loss). Every method of a cell trains
on the same per-seed data and initialization, so the evidence is the paired
difference ``d_s = A(s) - B(s)`` over seeds ``s`` (signed so that positive favours
the claim: for a smaller-is-better metric, ``B(s) - A(s)``), with its 95%
t-interval (``scipy.stats.t``, :func:`margin_regs.experiments.stats.paired_difference`).

The rule, per cell and for the claim as a whole (the claim's ``d_s`` is the mean of
its testable cells' ``d_s``, i.e. "on average over the settings the paper tested"):

* **not testable here**: the cell's unregularized baseline did not reach the regime
  the paper trains to (e.g. it does not fit the training set), or the phenomenon the
  claim is about did not appear (a failed precondition); a claim none of whose cells
  is testable is not testable;
* **inconclusive**: fewer than two seeds, an undefined measurement, a
  *zero-spread* difference (every seed differs by exactly the same amount: the
  interval is a point, which is no evidence of a definite ordering; flagged), or an
  interval containing 0 that is not inside ``±min_effect``;
* **negligible**: the interval lies inside ``(-min_effect, +min_effect)``, or it
  excludes 0 but the mean difference is smaller in size than ``min_effect``
  (:data:`MIN_EFFECT`: 0.2 points of accuracy);
* a *strict* claim ("A > B") is **reproduced** when the interval lies above 0 and
  the mean is at least ``min_effect``, **not reproduced** when the interval lies
  below 0 and the mean is at most ``-min_effect``;
* an *at least* claim ("A ≥ B") is **reproduced** when the interval lies above
  ``-tolerance``, **not reproduced** when it lies below 0 and reaches below
  ``-tolerance``, **inconclusive** otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from margin_regs.experiments.stats import Interval, paired_difference, t_quantile

__all__ = [
    "INCONCLUSIVE",
    "MIN_EFFECT",
    "NEGLIGIBLE",
    "NOT_REPRODUCED",
    "NOT_TESTABLE",
    "REPRODUCED",
    "VERDICTS",
    "Claim",
    "Judgement",
    "judge",
    "mean_interval",
    "verdict",
]

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive"
NEGLIGIBLE = "negligible"
NOT_TESTABLE = "not testable here"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, NEGLIGIBLE, NOT_TESTABLE)
MIN_EFFECT = 0.002  # 0.2 points of accuracy

Kind = Literal["greater", "at_least"]


def zero_spread(diff: Interval) -> bool:
    """Whether an interval of several seeds has no width (every difference equal)."""
    return diff.low is not None and diff.high - diff.low <= 1e-12


def verdict(
    diff: Interval,
    kind: Kind = "greater",
    tolerance: float = 0.0,
    min_effect: float = MIN_EFFECT,
) -> str:
    """The verdict on "A > B" (or "A ≥ B") from the paired difference ``A - B``.

    Args:
      diff: the mean paired difference, signed so that positive favours the claim,
        with its 95% interval.
      kind: ``"greater"`` (strict) or ``"at_least"`` (non-inferiority).
      tolerance: for ``"at_least"``, how much worse A may be and still count as
        "at least as good" (the metric's units, e.g. 0.005 accuracy).
      min_effect: the smallest difference that counts (the metric's units).

    Returns:
      One of :data:`VERDICTS` other than :data:`NOT_TESTABLE`.

    Raises:
      ValueError: for an unknown ``kind`` or a negative ``tolerance``/``min_effect``.

    Example:
      >>> from margin_regs.experiments.stats import Interval
      >>> from margin_regs.experiments.reproduce.verdicts import verdict
      >>> verdict(Interval(0.02, 0.01, 0.03, 5)), verdict(Interval(0.02, -0.01, 0.05, 5))
      ('reproduced', 'inconclusive')
      >>> verdict(Interval(0.001, 0.0005, 0.0015, 5))
      'negligible'
    """
    if kind not in ("greater", "at_least"):
        raise ValueError(f'kind must be "greater" or "at_least", got {kind!r}')
    if not (tolerance >= 0 and min_effect >= 0):
        raise ValueError(
            f"tolerance and min_effect must be ≥ 0: {tolerance}, {min_effect}"
        )
    if diff.low is None or not (math.isfinite(diff.low) and math.isfinite(diff.high)):
        return INCONCLUSIVE
    if zero_spread(diff):
        return INCONCLUSIVE
    if kind == "at_least":
        if diff.low > -tolerance:
            return REPRODUCED
        if diff.high < 0:
            return NOT_REPRODUCED
        return INCONCLUSIVE
    if -min_effect < diff.low and diff.high < min_effect:
        return NEGLIGIBLE
    if diff.low > 0 or diff.high < 0:
        if abs(diff.mean) < min_effect:
            return NEGLIGIBLE
        return REPRODUCED if diff.low > 0 else NOT_REPRODUCED
    return INCONCLUSIVE


@dataclasses.dataclass(frozen=True)
class Claim:
    """One claim of a paper: ``better`` beats ``worse`` on ``metric`` in ``cells``.

    Attributes:
      text: the claim as the paper states it.
      source: where (``"Table I"``, ``"Fig. 4"``...).
      better: the method (key of the results) the paper finds better.
      worse: the method it finds worse.
      cells: the settings the claim covers (keys of the results).
      metric: the per-seed measurement compared (e.g. ``"test_acc"``).
      higher_is_better: the metric's sense (a generalization gap: ``False``).
      kind: ``"greater"`` or ``"at_least"``.
      tolerance: for ``"at_least"``, see :func:`verdict`.
      min_effect: the smallest difference that counts, in the metric's units.
    """

    text: str
    source: str
    better: str
    worse: str
    cells: tuple[str, ...]
    metric: str = "test_acc"
    higher_is_better: bool = True
    kind: Kind = "greater"
    tolerance: float = 0.0
    min_effect: float = MIN_EFFECT


@dataclasses.dataclass(frozen=True)
class Judgement:
    """A claim's verdict, overall and per cell, with the intervals behind them.

    ``flags`` says why a verdict is not definite (a zero-spread difference, cells
    not testable here and why).
    """

    claim: Claim
    verdict: str
    difference: Interval
    cells: dict[str, tuple[str, Interval]]
    flags: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        """JSON-ready fields."""
        return {
            "text": self.claim.text,
            "source": self.claim.source,
            "better": self.claim.better,
            "worse": self.claim.worse,
            "metric": self.claim.metric,
            "kind": self.claim.kind,
            "tolerance": self.claim.tolerance,
            "min_effect": self.claim.min_effect,
            "verdict": self.verdict,
            "flags": list(self.flags),
            "difference": self.difference._asdict(),
            "cells": {
                c: {"verdict": v, "difference": d._asdict()}
                for c, (v, d) in self.cells.items()
            },
        }


Results = Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]]


def judge(
    claim: Claim, results: Results, untestable: Mapping[str, str] | None = None
) -> Judgement:
    """Apply :func:`verdict` to a claim, per cell and pooled over its testable cells.

    Args:
      claim: the claim.
      results: ``results[cell][method][metric]`` is one value per seed (the same
        seeds, in the same order, for every method of a cell).
      untestable: ``{cell: why}`` for the cells judged :data:`NOT_TESTABLE`.

    Returns:
      A :class:`Judgement`.

    Raises:
      KeyError: naming a cell, method or metric the results lack.

    Example:
      >>> from margin_regs.experiments.reproduce.verdicts import Claim, judge
      >>> results = {"n=256": {"lm": {"test_acc": [0.93, 0.94, 0.95]},
      ...                      "wd": {"test_acc": [0.90, 0.90, 0.92]}}}
      >>> judge(Claim("LM > WD", "Table I", "lm", "wd", ("n=256",)), results).verdict
      'reproduced'
    """
    untestable = dict(untestable or {})
    sign = 1.0 if claim.higher_is_better else -1.0
    per_cell = {}
    for cell in claim.cells:
        try:
            a = results[cell][claim.better][claim.metric]
            b = results[cell][claim.worse][claim.metric]
        except KeyError as e:
            raise KeyError(
                f"claim {claim.text!r}: results lack {e.args[0]!r} in cell {cell!r}"
            ) from None
        per_cell[cell] = sign * (np.asarray(a, float) - np.asarray(b, float))
    rule = (claim.kind, claim.tolerance, claim.min_effect)
    cells, flags = {}, []
    for cell, d in per_cell.items():
        diff = paired_difference(d, np.zeros_like(d))
        if cell in untestable:
            cells[cell] = (NOT_TESTABLE, diff)
            flags.append(f"{cell}: not testable here ({untestable[cell]})")
        else:
            cells[cell] = (verdict(diff, *rule), diff)
            if zero_spread(diff):
                flags.append(f"{cell}: zero spread (every seed differs equally)")
    testable = [d for c, d in per_cell.items() if c not in untestable]
    pooled = paired_difference(
        np.mean(testable or list(per_cell.values()), axis=0), np.zeros(len(d))
    )
    overall = verdict(pooled, *rule) if testable else NOT_TESTABLE
    if testable and zero_spread(pooled):
        flags.append("pooled: zero spread (every seed differs equally)")
    return Judgement(claim, overall, pooled, cells, tuple(flags))


def mean_interval(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean over seeds and the half-width of its 95% t-interval (``None``: one seed).

    Example:
      >>> from margin_regs.experiments.reproduce.verdicts import mean_interval
      >>> m, h = mean_interval([0.90, 0.92, 0.94])
      >>> round(m, 4), round(h, 4)
      (0.92, 0.0497)
    """
    values = np.asarray(values, float)
    mean = float(values.mean())
    if values.size < 2:
        return mean, None
    return mean, t_quantile(values.size - 1) * float(values.std(ddof=1)) / math.sqrt(
        values.size
    )
