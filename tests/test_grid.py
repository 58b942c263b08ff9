"""The vmapped grid program: equal to one-by-one runs, early stopping inside it, and
coefficient selection that only validation accuracy can move."""

import dataclasses

import jax
import numpy as np
import pytest
from _digits_runs import CONFIG, ascent_recipe

from margin_regs.experiments import cli, grid
from margin_regs.experiments import training as tr
from margin_regs.experiments.data import load_digits, prepare
from margin_regs.experiments.recipes import RECIPES

COEFFS = [0.01, 0.5]


@pytest.fixture(scope="module")
def splits():
    full = load_digits()
    return [prepare(full, train_size=64, seed=s) for s in (0, 1)]


@pytest.fixture(scope="module")
def spectral(splits):
    return grid.train_grid("spectral", RECIPES["spectral"], COEFFS, splits, CONFIG)


def test_vmapped_runs_equal_the_runs_trained_one_by_one(splits, spectral):
    for c, coeff in enumerate(COEFFS):
        for s, ds in enumerate(splits):
            alone = tr.run("spectral", ds, seed=s, config=CONFIG, coeff=coeff)
            batched = jax.tree.map(lambda p, c=c, s=s: p[c, s], spectral.params)
            jax.tree.map(
                lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
                alone.params,
                batched,
            )
            for key in ("train_acc", "val_acc", "test_acc"):
                np.testing.assert_allclose(
                    alone.history[key], spectral.history[key][c, s], atol=1e-6
                )
            np.testing.assert_allclose(
                alone.history["train_loss"],
                spectral.history["train_loss"][c, s],
                rtol=1e-5,
            )
            assert spectral.val_acc[c, s] == pytest.approx(alone.final["val_acc"])


def test_full_results_of_the_selected_coefficient(splits, spectral):
    results = spectral.run_results(1, splits, CONFIG)
    assert [(r.coeff, r.seed) for r in results] == [(0.5, 0), (0.5, 1)]
    for s, r in enumerate(results):
        assert r.final["test_acc"] == pytest.approx(spectral.test_acc[1, s])
        assert len(r.history["val_acc"]) == CONFIG.epochs


def test_early_stopping_inside_the_program_matches_the_loop(splits):
    config = dataclasses.replace(CONFIG, epochs=8, learning_rate=0.05)
    recipe = ascent_recipe(len(splits[0].x_train) // config.batch_size)
    batched = grid.train_grid("ascent", recipe, [2], splits[:1], config)
    alone = tr.run(
        "ascent", splits[0], seed=0, config=config, recipes={"ascent": recipe}
    )
    stopped = alone.early_stopping["stopped_epoch"]
    assert stopped < 8
    assert batched.stopped_epoch[0, 0] == stopped
    assert batched.best_epoch[0, 0] == alone.early_stopping["best_epoch"]
    assert batched.val_acc[0, 0] == pytest.approx(alone.final["val_acc"])
    assert batched.test_acc[0, 0] == pytest.approx(alone.final["test_acc"])
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b[0, 0], rtol=2e-5, atol=2e-6),
        alone.params,
        batched.params,
    )


def test_selection_reads_validation_never_test():
    val = np.array([[0.80, 0.82], [0.90, 0.88], [0.85, 0.86]])
    test = np.array([[0.99, 0.99], [0.50, 0.50], [0.70, 0.70]])
    assert grid.select(val) == 1
    assert grid.select(val) != int(np.argmax(test.mean(1)))


def test_the_comparison_selects_on_validation(splits, spectral):
    # Swap the test accuracies so that test favours the other coefficient: the
    # comparison's selection, summary and reported coefficient must not move.
    best_val = int(np.argmax(spectral.val_acc.mean(1)))
    leaky = dataclasses.replace(spectral, test_acc=spectral.test_acc[::-1] + 1.0)
    leaky.history = {
        **spectral.history,
        "test_acc": spectral.history["test_acc"][::-1],
    }
    plan = cli._Plan(["spectral"], None, splits, CONFIG, {"spectral": COEFFS})
    for candidate in (spectral, leaky):
        results, summary = cli._results(plan, {"spectral": candidate})
        assert summary["spectral"]["coeff"] == COEFFS[best_val]
        assert {r.coeff for r in results} == {COEFFS[best_val]}


def test_stack_splits_needs_validation_sets():
    with pytest.raises(ValueError, match="validation"):
        grid.stack_splits([load_digits()])
