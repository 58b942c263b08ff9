"""The shared train/evaluate loop: determinism, what it records, early stopping."""

import dataclasses

import jax
import numpy as np
import pytest
from _digits_runs import CONFIG, ascent_recipe, matrices

from margin_regs.experiments import models
from margin_regs.experiments import training as tr
from margin_regs.experiments.data import load_digits
from margin_regs.experiments.recipes import RECIPES


def test_same_seed_same_run_other_seed_other_run(ds, vanilla):
    again = tr.run("vanilla", ds, seed=0, config=CONFIG)
    clocks = ("seconds", "cpu_seconds")
    history = {k: v for k, v in vanilla.history.items() if k not in clocks}
    assert history == {k: v for k, v in again.history.items() if k not in clocks}
    jax.tree.map(np.testing.assert_array_equal, vanilla.params, again.params)
    other = tr.run("vanilla", ds, seed=1, config=CONFIG)
    assert other.history["train_loss"] != vanilla.history["train_loss"]


def test_recorded_metrics_match_an_independent_evaluation(ds, vanilla):
    model = models.make_model("mlp", 10)
    logits = np.asarray(model.apply({"params": vanilla.params}, ds.x_test))
    acc = float(np.mean(logits.argmax(1) == ds.y_test))
    assert vanilla.final["test_acc"] == pytest.approx(acc, abs=1e-6)
    assert vanilla.history["test_acc"][-1] == pytest.approx(acc, abs=1e-6)
    for name, matrix in matrices(vanilla.params).items():
        s = np.linalg.svd(matrix, compute_uv=False)
        assert vanilla.final["sigma_max"][name] == pytest.approx(s[0], rel=1e-4)
        assert vanilla.final["stable_rank"][name] == pytest.approx(
            np.sum(s**2) / s[0] ** 2, rel=1e-4
        )
        np.testing.assert_allclose(
            vanilla.singular_values[name], s, rtol=1e-4, atol=1e-6
        )
    z_y = logits[np.arange(len(logits)), ds.y_test]
    others = np.where(np.eye(10, dtype=bool)[ds.y_test], -np.inf, logits)
    np.testing.assert_allclose(
        vanilla.output_margins, z_y - others.max(1), rtol=1e-5, atol=1e-5
    )
    assert len(vanilla.input_margins) == len(ds.x_test)
    assert len(vanilla.history["sigma_max"]["classifier/kernel"]) == CONFIG.epochs


def test_early_stopping_restores_the_best_epoch(ds):
    ascent = ascent_recipe(len(ds.x_train) // CONFIG.batch_size)
    config = dataclasses.replace(CONFIG, epochs=8, learning_rate=0.05)
    result = tr.run("ascent", ds, seed=0, config=config, recipes={"ascent": ascent})
    val = result.history["val_acc"]
    best = int(np.argmax(val))
    assert result.early_stopping["best_epoch"] == best + 1
    assert result.early_stopping["stopped_epoch"] == best + 1 + 2 < 8
    assert len(val) == result.early_stopping["stopped_epoch"]
    assert result.final["val_acc"] == pytest.approx(val[best])
    assert val[best] > val[-1]
    assert result.final["test_acc"] == pytest.approx(result.history["test_acc"][best])


def test_unknown_regularizer_and_unprepared_data(ds):
    with pytest.raises(ValueError, match="unknown regularizer 'nope'"):
        tr.run("nope", ds)
    with pytest.raises(ValueError, match="validation set"):
        tr.run("vanilla", load_digits())


def test_get_trainer_fills_in_the_recipe_default_coefficient():
    trainer = tr.get_trainer("spectral", None, CONFIG, 10, 64)
    assert trainer.coeff == RECIPES["spectral"].coeff
    assert trainer is tr.get_trainer(
        "spectral", RECIPES["spectral"].coeff, CONFIG, 10, 64
    )
