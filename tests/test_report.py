"""Summaries over seeds, the table's edge flags and its wrapped note."""

import os
import subprocess

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
    # The clocks are per run and epoch, over the same spans: positive, and the
    # process can use at most every core (no absolute bound: the machine is shared).
    wall, cpu = summary["seconds_per_epoch"], summary["cpu_seconds_per_epoch"]
    assert wall > 0 and 0 < cpu <= 1.5 * wall * os.cpu_count()
    assert len(vanilla.history["seconds"]) == CONFIG.epochs


@pytest.mark.parametrize(
    ("grid", "index", "edge"),
    [
        ([0.01, 0.1, 1.0], 0, "lowest"),
        ([0.01, 0.1, 1.0], 2, "highest"),
        ([0.01, 0.1, 1.0], 1, None),
        ([1.0, 0.01, 0.1], 0, "highest"),  # by value, whatever the order
        ([0.01, 0.1], 0, None),  # two values: no interior to compare with
        ([np.nan], 0, None),  # no hyperparameter
    ],
)
def test_grid_edge(grid, index, edge):
    assert report.grid_edge(grid, index) == edge


def _row(**changes):
    row = dict(
        test_acc_mean=0.9,
        test_acc_std=0.01,
        yoshida_gap=0.05,
        yoshida_threshold=0.8,
        sigma_max={"a/kernel": 2.0},
        seeds=3,
        stable_rank={"a/kernel": 3.0},
        median_output_margin=1.5,
        median_input_margin=0.2,
        seconds_per_epoch=0.01,
        coeff=None,
    )
    return row | changes


def test_table_flags_edge_coefficients_and_wraps_its_note():
    table = report.format_table(
        {
            "vanilla": _row(),
            "spectral": _row(coeff=0.1, coeff_edge="highest"),
            "jacobian": _row(coeff=0.3, coeff_edge=None),
        }
    )
    rows = {line.split()[0]: line for line in table.splitlines() if line.strip()}
    assert rows["spectral"].split()[1:3] == ["0.1", "(max)"]
    assert rows["jacobian"].split()[1:3] == ["0.3", "90.0"]
    assert "(min)/(max): the lowest/highest value of its grid" in " ".join(
        table.split()
    )
    note = table.split("\n\n", 1)[1].splitlines()
    assert len(note) > 5 and max(map(len, note)) <= 88
    unflagged = report.format_table({"vanilla": _row()})
    assert "(min)/(max)" not in unflagged


def test_git_commit_is_the_checkouts_head():
    here = os.path.dirname(report.__file__)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True
    ).stdout.strip()
    commit = report._git_commit()
    if not head:  # an installed wheel: no checkout
        assert commit is None
    else:
        assert commit.removesuffix("+dirty") == head
