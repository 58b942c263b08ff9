"""``margin-regs reproduce``: the verdict rule on synthetic results, the estimator and
the runner against independent computations, and every experiment in --quick mode."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import margin_regs as mr
from margin_regs.experiments import data, training
from margin_regs.experiments.recipes import RECIPES, StepContext
from margin_regs.experiments.reproduce import PROTOCOLS, main, protocols
from margin_regs.experiments.reproduce.runner import Cell, downsample, train_cell
from margin_regs.experiments.reproduce.verdicts import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    REPRODUCED,
    Claim,
    judge,
    mean_interval,
    verdict,
)
from margin_regs.experiments.stats import Interval

CELLS = ("n=256", "n=1024")


def _results(better: list[list[float]], worse: list[list[float]]) -> dict:
    return {
        cell: {"a": {"test_acc": b}, "b": {"test_acc": w}}
        for cell, b, w in zip(CELLS, better, worse, strict=True)
    }


def _scipy_interval(d: np.ndarray) -> tuple[float, float]:
    half = scipy.stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size)
    return d.mean() - half, d.mean() + half


CLAIM = Claim("A > B", "Table X", "a", "b", CELLS)


def test_known_ordering_is_reproduced():
    base = np.array([0.90, 0.92, 0.91])
    results = _results([base + 0.02, base + 0.031], [base, base + 0.001])
    j = judge(CLAIM, results)
    assert j.verdict == REPRODUCED
    assert all(v == REPRODUCED for v, _ in j.cells.values())
    assert j.difference.mean == pytest.approx(np.mean([0.02, 0.03]))


def test_reversed_ordering_is_not_reproduced():
    base = np.array([0.90, 0.92, 0.91])
    results = _results(
        [base, base], [base + np.array([0.02, 0.03, 0.025]), base + 0.02]
    )
    j = judge(CLAIM, results)
    assert j.verdict == NOT_REPRODUCED
    d = np.mean([[-0.02, -0.03, -0.025], [-0.02, -0.02, -0.02]], axis=0)
    low, high = _scipy_interval(d)
    assert (j.difference.low, j.difference.high) == pytest.approx((low, high), rel=1e-4)


def test_overlapping_intervals_are_inconclusive():
    results = _results(
        [[0.91, 0.90, 0.93], [0.95, 0.94, 0.96]],
        [[0.90, 0.92, 0.91], [0.96, 0.93, 0.95]],
    )
    j = judge(CLAIM, results)
    low, high = _scipy_interval(np.array([0.0, -0.005, 0.015]))
    assert (j.difference.low, j.difference.high) == pytest.approx((low, high), rel=1e-4)
    assert low < 0 < high and j.verdict == INCONCLUSIVE


def test_smaller_is_better_metric_flips_the_sign():
    claim = Claim("gap: A < B", "Table 1", "a", "b", CELLS[:1], "gap", False)
    results = {
        CELLS[0]: {"a": {"gap": [0.05, 0.06, 0.04]}, "b": {"gap": [0.08, 0.09, 0.08]}}
    }
    assert judge(claim, results).verdict == REPRODUCED
    results[CELLS[0]]["a"]["gap"] = [0.10, 0.12, 0.11]
    assert judge(claim, results).verdict == NOT_REPRODUCED


def test_an_undefined_measurement_gives_no_verdict():
    # A diverged run's spectrum is recorded as NaN: its cell, and the pooled claim,
    # stay inconclusive however clear the other cells are.
    base = np.array([0.90, 0.92, 0.91])
    results = _results([base + 0.05, [np.nan, 0.5, 0.5]], [base, base])
    j = judge(CLAIM, results)
    assert j.cells["n=256"][0] == REPRODUCED
    assert j.cells["n=1024"][0] == INCONCLUSIVE and j.verdict == INCONCLUSIVE


def test_at_least_claim_uses_the_tolerance():
    tie = Interval(-0.001, -0.004, 0.002, 3)
    worse = Interval(-0.02, -0.03, -0.01, 3)
    slightly_worse = Interval(-0.002, -0.003, -0.001, 3)
    assert verdict(tie, "at_least", 0.005) == REPRODUCED
    assert verdict(slightly_worse, "at_least", 0.005) == REPRODUCED
    assert verdict(worse, "at_least", 0.005) == NOT_REPRODUCED
    assert verdict(tie, "greater") == INCONCLUSIVE
    assert verdict(Interval(0.01, None, None, 1)) == INCONCLUSIVE
    with pytest.raises(ValueError, match="kind"):
        verdict(tie, "less")
    with pytest.raises(ValueError, match="tolerance"):
        verdict(tie, "at_least", -1.0)


def test_judge_names_missing_results():
    with pytest.raises(KeyError, match="n=1024"):
        judge(CLAIM, {"n=256": {"a": {"test_acc": [1.0]}, "b": {"test_acc": [0.0]}}})


def test_mean_interval_matches_scipy():
    values = np.array([0.91, 0.93, 0.96, 0.90])
    mean, half = mean_interval(values)
    _, high = _scipy_interval(values)
    assert mean == pytest.approx(values.mean()) and half == pytest.approx(
        high - mean, rel=1e-4
    )
    assert mean_interval([0.5]) == (0.5, None)


def test_all_class_estimator_is_unbiased():
    # E over one uniform class per sample of C · penalty = the sum over all classes.
    w = jax.random.normal(jax.random.key(0), (6, 4))
    x = jax.random.normal(jax.random.key(1), (5, 6))
    params = {"classifier": {"kernel": w}}

    def apply(p, b):
        return jnp.tanh(b) @ p["classifier"]["kernel"]

    def estimate(key):
        ctx = StepContext(params, x, jnp.zeros(5, jnp.int32), key, apply, 4, None)
        return protocols._lm_all_classes(ctx, 1.0)

    draws = jax.vmap(estimate)(jax.random.split(jax.random.key(2), 4000))
    exact = mr.jacobian_margin_penalty(
        lambda b: apply(params, b), x, classes="all", classifier=w
    )
    stderr = float(jnp.std(draws)) / np.sqrt(draws.size)
    assert abs(float(jnp.mean(draws)) - float(exact)) < 4 * stderr


def test_downsample_is_a_mean_over_blocks():
    x = np.random.default_rng(0).random((2, 4, 6, 1)).astype(np.float32)
    ds = data.Dataset("t", x, np.zeros(2, np.int32), x, np.zeros(2, np.int32), 1)
    pooled = downsample(ds, 2).x_train
    expected = np.array(
        [[[x[n, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2, 0].mean() for j in range(3)]
          for i in range(2)] for n in range(2)]
    )  # fmt: skip
    np.testing.assert_allclose(pooled[..., 0], expected, rtol=1e-6)
    with pytest.raises(ValueError, match="divide"):
        downsample(data.Dataset("t", x[:, :3], x[:1, 0, 0, 0].astype(np.int32),
                                x[:, :3], x[:1, 0, 0, 0].astype(np.int32), 1), 2)  # fmt: skip


def test_vmapped_cell_equals_runs_one_by_one():
    full = data.load_digits()
    splits = [data.prepare(full, train_size=64, seed=s) for s in (0, 1)]
    config = training.TrainConfig(epochs=2, batch_size=16)
    cell = Cell("spectral", RECIPES["spectral"], (0.01, 0.1), config)
    result = train_cell(cell, splits)
    for c, coeff in enumerate((0.01, 0.1)):
        for s, ds in enumerate(splits):
            run = training.run("spectral", ds, seed=s, config=config, coeff=coeff)
            assert result.acc["test_acc"][c, s] == pytest.approx(
                run.final["test_acc"], abs=1.5 / len(ds.x_test)
            )
            sigma = run.final["sigma_max"]["classifier/kernel"]
            assert result.classifier["sigma_max"][c, s] == pytest.approx(
                sigma, rel=1e-4
            )
    assert result.selected == int(np.argmax(result.acc["val_acc"].mean(axis=1)))


def test_stepwise_conv_cell_equals_the_scanned_epochs():
    full = data.load_digits()
    splits = [data.prepare(full, train_size=32, seed=s) for s in (0, 1)]
    config = training.TrainConfig(model="cnn", epochs=2, batch_size=16)
    cell = Cell("wd", RECIPES["weight_decay"], (0.0, 1e-3), config)
    result = train_cell(cell, splits)
    for c, coeff in enumerate((0.0, 1e-3)):
        for s, ds in enumerate(splits):
            run = training.run("weight_decay", ds, seed=s, config=config, coeff=coeff)
            sigma = run.final["sigma_max"]["classifier/kernel"]
            assert result.classifier["sigma_max"][c, s] == pytest.approx(
                sigma, rel=1e-4
            )
            assert result.acc["val_acc"][c, s] == pytest.approx(
                run.final["val_acc"], abs=1.5 / len(ds.x_val)
            )


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_quick_experiment(name, tmp_path, capsys):
    assert main([name, "--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    protocol = PROTOCOLS[name](True)
    assert "estimated" in printed and "scaled from the paper" in printed
    for (cell, _, metric), value in protocol.paper.items():
        if metric == "test_acc" and cell in result["results"]:
            assert f"{100 * value:.2f}" in printed
    for j in result["judgements"]:
        claim = next(c for c in protocol.claims if c.text == j["text"])
        recomputed = judge(claim, result["results"])
        assert j["verdict"] == recomputed.verdict
        assert j["verdict"].upper() in printed
    for methods in result["results"].values():
        for m in methods.values():
            for acc in m.get("test_acc", []):
                assert 0.0 <= acc <= 1.0


def test_cli_dispatches_reproduce_and_rejects_unknown_names(capsys):
    from margin_regs.experiments import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["reproduce", "sokolic-table2"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'sokolic-table2'" in capsys.readouterr().err
