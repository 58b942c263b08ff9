"""The training driver: the vmapped grid equals runs trained one by one, early
stopping inside it follows the rule, the stepwise path equals the scanned epoch, and
coefficient selection that only validation accuracy can move."""

import dataclasses

import jax
import jax.numpy as jnp
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


def _alone(recipe, coeff, ds, seed, config):
    """One run by the single-run jitted epoch in a Python loop (no vmap)."""
    trainer = tr.get_trainer(recipe, coeff, config, 10, len(ds.x_train))
    k_init, k_train = jax.random.split(jax.random.key(seed))
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    state, params, val = trainer.init(k_init, x), [], []
    for epoch in range(config.epochs):
        state, _ = trainer.train_epoch(state, x, y, jax.random.fold_in(k_train, epoch))
        logits = trainer.model.apply({"params": state.params}, ds.x_val)
        val.append(float(np.mean(np.argmax(logits, 1) == ds.y_val)))
        params.append(state.params)
    return params, val


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_vmapped_runs_equal_the_runs_trained_one_by_one(splits, spectral):
    for c, coeff in enumerate(COEFFS):
        for s, ds in enumerate(splits):
            params, val = _alone(RECIPES["spectral"], coeff, ds, s, CONFIG)
            batched = jax.tree.map(lambda p, c=c, s=s: p[c, s], spectral.params)
            jax.tree.map(_close, params[-1], batched)
            np.testing.assert_allclose(
                spectral.history["val_acc"][c, s], val, atol=1e-6
            )
            assert spectral.val_acc[c, s] == pytest.approx(val[-1])


def test_full_results_of_the_selected_coefficient(splits, spectral):
    results = spectral.run_results(1, splits, CONFIG)
    assert [(r.coeff, r.seed) for r in results] == [(0.5, 0), (0.5, 1)]
    for s, r in enumerate(results):
        assert r.final["test_acc"] == pytest.approx(spectral.test_acc[1, s])
        assert len(r.history["val_acc"]) == CONFIG.epochs
        assert len(r.history["seconds"]) == CONFIG.epochs


def _stopping_rule(val, patience):
    """(best epoch, stopped epoch), 1-based, of a validation history (numpy loop)."""
    best = 0
    for epoch in range(1, len(val)):
        if val[epoch] > val[best]:
            best = epoch
        elif epoch - best >= patience:
            return best + 1, epoch + 1
    return best + 1, len(val)


def test_early_stopping_inside_the_program_follows_the_rule(splits):
    config = dataclasses.replace(CONFIG, epochs=8, learning_rate=0.05)
    recipe = ascent_recipe(len(splits[0].x_train) // config.batch_size)
    batched = grid.train_grid("ascent", recipe, [2], splits, config)
    for s, ds in enumerate(splits):
        params, val = _alone(recipe, 2, ds, s, dataclasses.replace(config, epochs=8))
        best, stopped = _stopping_rule(val, 2)
        assert stopped < 8
        assert (batched.best_epoch[0, s], batched.stopped_epoch[0, s]) == (
            best,
            stopped,
        )
        assert batched.val_acc[0, s] == pytest.approx(val[best - 1])
        restored = jax.tree.map(lambda p, s=s: p[0, s], batched.params)
        jax.tree.map(_close, params[best - 1], restored)
        np.testing.assert_allclose(
            batched.history["val_acc"][0, s, :stopped], val[:stopped], atol=1e-6
        )


def test_stepwise_epochs_equal_the_scanned_program():
    config = dataclasses.replace(CONFIG, model="cnn")
    tiny = [prepare(load_digits(), train_size=32, seed=0)]
    args = ("weight_decay", RECIPES["weight_decay"], [1e-4, 1e-2], tiny, config)
    scanned = grid.train_grid(*args)
    stepwise = grid.train_grid(*args, stepwise=True, per_epoch=False)
    jax.tree.map(_close, scanned.params, stepwise.params)
    for key in ("train_acc", "val_acc", "test_acc", "test_loss"):
        np.testing.assert_allclose(scanned.final[key], stepwise.final[key], atol=1e-5)
    np.testing.assert_allclose(
        scanned.history["objective"], stepwise.history["objective"], rtol=1e-5
    )
    assert set(stepwise.history) == {"objective"}


def test_selection_reads_validation_never_test():
    val = np.array([[0.80, 0.82], [0.90, 0.88], [0.85, 0.86]])
    test = np.array([[0.99, 0.99], [0.50, 0.50], [0.70, 0.70]])
    assert grid.select(val) == 1
    assert grid.select(val) != int(np.argmax(test.mean(1)))


def test_the_comparison_selects_on_validation(splits, spectral):
    # Swap the test accuracies so that test favours the other coefficient: the
    # comparison's selection, summary and reported coefficient must not move.
    best_val = int(np.argmax(spectral.val_acc.mean(1)))
    leaky = dataclasses.replace(
        spectral,
        final={**spectral.final, "test_acc": spectral.test_acc[::-1] + 1.0},
        history={**spectral.history, "test_acc": spectral.history["test_acc"][::-1]},
    )
    plan = cli._Plan(["spectral"], None, splits, CONFIG, {"spectral": COEFFS})
    for candidate in (spectral, leaky):
        results, summary = cli._results(plan, {"spectral": candidate})
        assert summary["spectral"]["coeff"] == COEFFS[best_val]
        assert {r.coeff for r in results} == {COEFFS[best_val]}


def test_stack_splits_needs_validation_sets():
    with pytest.raises(ValueError, match="validation"):
        grid.stack_splits([load_digits()])
