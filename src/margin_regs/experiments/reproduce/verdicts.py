"""Verdicts on a paper's claims, by a rule fixed before any number is seen.

A claim compares two methods (or two settings) on one metric, "A beats B", in one
or more *cells* (a training-set size, a depth, a loss). Every method of a cell trains
on the same per-seed data and initialization, so the evidence is the paired
difference ``d_s = A(s) - B(s)`` over seeds ``s`` (signed so that positive favours
the claim: for a smaller-is-better metric, ``B(s) - A(s)``), with its 95%
t-interval (:func:`margin_regs.experiments.stats.paired_difference`).

The rule, per cell and for the claim as a whole (the claim's ``d_s`` is the mean of
its cells' ``d_s``, i.e. "on average over the settings the paper tested"):

* a *strict* claim ("A > B") is **reproduced** when the interval lies above 0, **not
  reproduced** when it lies below 0 (the ordering is reversed beyond the seed
  noise), and **inconclusive** otherwise (the interval contains 0);
* an *at least* claim ("A ≥ B", e.g. "WD always outperforms or is at least as good
  as no regularization") is **reproduced** when the interval lies above
  ``-tolerance`` (A is not worse by more than the tolerance), **not reproduced**
  when it lies below 0 and reaches below ``-tolerance``, **inconclusive** otherwise.

With one seed there is no interval, and every verdict is inconclusive.
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
    "NOT_REPRODUCED",
    "REPRODUCED",
    "Claim",
    "Judgement",
    "judge",
    "mean_interval",
    "verdict",
]

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive"

Kind = Literal["greater", "at_least"]


def verdict(diff: Interval, kind: Kind = "greater", tolerance: float = 0.0) -> str:
    """The verdict on "A > B" (or "A ≥ B") from the paired difference ``A - B``.

    Args:
      diff: the mean paired difference, signed so that positive favours the claim,
        with its 95% interval.
      kind: ``"greater"`` (strict) or ``"at_least"`` (non-inferiority).
      tolerance: for ``"at_least"``, how much worse A may be and still count as
        "at least as good" (the metric's units, e.g. 0.005 accuracy).

    Returns:
      :data:`REPRODUCED`, :data:`NOT_REPRODUCED` or :data:`INCONCLUSIVE`.

    Raises:
      ValueError: for an unknown ``kind`` or a negative ``tolerance``.

    Example:
      >>> from margin_regs.experiments.stats import Interval
      >>> from margin_regs.experiments.reproduce.verdicts import verdict
      >>> verdict(Interval(0.02, 0.01, 0.03, 3)), verdict(Interval(0.02, -0.01, 0.05, 3))
      ('reproduced', 'inconclusive')
      >>> verdict(Interval(-0.001, -0.003, 0.001, 3), "at_least", tolerance=0.005)
      'reproduced'
    """
    if kind not in ("greater", "at_least"):
        raise ValueError(f'kind must be "greater" or "at_least", got {kind!r}')
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be ≥ 0, got {tolerance}")
    if diff.low is None or diff.high is None:
        return INCONCLUSIVE
    floor = 0.0 if kind == "greater" else -tolerance
    if diff.low > floor:
        return REPRODUCED
    if diff.high < 0 and diff.low < floor:
        return NOT_REPRODUCED
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


@dataclasses.dataclass(frozen=True)
class Judgement:
    """A claim's verdict, overall and per cell, with the intervals behind them."""

    claim: Claim
    verdict: str
    difference: Interval
    cells: dict[str, tuple[str, Interval]]

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
            "verdict": self.verdict,
            "difference": self.difference._asdict(),
            "cells": {
                c: {"verdict": v, "difference": d._asdict()}
                for c, (v, d) in self.cells.items()
            },
        }


Results = Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]]


def judge(claim: Claim, results: Results) -> Judgement:
    """Apply :func:`verdict` to a claim, per cell and pooled over its cells.

    Args:
      claim: the claim.
      results: ``results[cell][method][metric]`` is one value per seed (the same
        seeds, in the same order, for every method of a cell).

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
    cells = {}
    for cell, d in per_cell.items():
        diff = paired_difference(d, np.zeros_like(d))
        cells[cell] = (verdict(diff, claim.kind, claim.tolerance), diff)
    pooled = paired_difference(
        np.mean(list(per_cell.values()), axis=0), np.zeros(len(d))
    )
    return Judgement(claim, verdict(pooled, claim.kind, claim.tolerance), pooled, cells)


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
