"""Summaries over seeds and interleaved epoch timings."""

import time

import jax.numpy as jnp
import numpy as np
import pytest
from _digits_runs import CONFIG

from margin_regs.experiments import report
from margin_regs.experiments import training as tr


def test_summary_is_the_mean_over_seeds(ds, vanilla):
    other = tr.run("vanilla", ds, seed=1, config=CONFIG)
    summary = report.summarize([vanilla, other])["vanilla"]
    accs = [vanilla.final["test_acc"], other.final["test_acc"]]
    assert summary["test_acc_mean"] == pytest.approx(np.mean(accs))
    assert summary["test_acc_std"] == pytest.approx(np.std(accs))
    assert summary["median_input_margin"] == pytest.approx(
        np.mean([np.median(vanilla.input_margins), np.median(other.input_margins)])
    )
    assert summary["relative_time"] == 1.0


class _Sleeper:
    """Stands in for a Trainer whose epoch takes a known time."""

    def __init__(self, seconds):
        self.seconds = seconds

    def init(self, key, x):
        return 0

    def train_epoch(self, state, x, y, key):
        time.sleep(self.seconds)
        return state, jnp.zeros(())


def test_time_epochs_measures_each_trainer_interleaved(ds):
    times = report.time_epochs(
        {"fast": (_Sleeper(0.002), ds), "slow": (_Sleeper(0.02), ds)},
        budget_seconds=0.2,
        max_rounds=8,
    )
    assert 0.002 <= times["fast"] < 0.015
    assert 0.02 <= times["slow"] < 0.05
