"""The shared train/evaluate loop: determinism, recipes doing what they claim,
early stopping, the summary."""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from margin_regs import experiment as ex
from margin_regs import models
from margin_regs.data import load_digits, prepare

# The same schedule as test_cli's end-to-end run, so both share compiled trainers.
CONFIG = ex.TrainConfig(epochs=2, batch_size=16)


@pytest.fixture(scope="module")
def ds():
    return prepare(load_digits(), train_size=64, seed=0)


@pytest.fixture(scope="module")
def vanilla(ds):
    return ex.run("vanilla", ds, seed=0, config=CONFIG)


def _matrices(params):
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf).reshape(
            -1, leaf.shape[-1]
        )
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if leaf.ndim >= 2
    }


def test_same_seed_same_run_other_seed_other_run(ds, vanilla):
    again = ex.run("vanilla", ds, seed=0, config=CONFIG)
    clocks = ("seconds", "cpu_seconds")
    history = {k: v for k, v in vanilla.history.items() if k not in clocks}
    assert history == {k: v for k, v in again.history.items() if k not in clocks}
    jax.tree.map(np.testing.assert_array_equal, vanilla.params, again.params)
    other = ex.run("vanilla", ds, seed=1, config=CONFIG)
    assert other.history["train_loss"] != vanilla.history["train_loss"]


def test_recorded_metrics_match_an_independent_evaluation(ds, vanilla):
    model = models.make_model("mlp", 10)
    logits = np.asarray(model.apply({"params": vanilla.params}, ds.x_test))
    acc = float(np.mean(logits.argmax(1) == ds.y_test))
    assert vanilla.final["test_acc"] == pytest.approx(acc, abs=1e-6)
    assert vanilla.history["test_acc"][-1] == pytest.approx(acc, abs=1e-6)
    for name, matrix in _matrices(vanilla.params).items():
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


def test_spectral_lowers_the_top_singular_value(ds, vanilla):
    spectral = ex.run("spectral", ds, seed=0, config=CONFIG, coeff=0.5)
    for name, sigma in vanilla.final["sigma_max"].items():
        assert spectral.final["sigma_max"][name] < sigma, name


def test_weight_decay_shrinks_kernels(ds, vanilla):
    decayed = ex.run("weight_decay", ds, seed=0, config=CONFIG, coeff=5.0)
    norm = lambda p: sum(np.sum(m**2) for m in _matrices(p).values())  # noqa: E731
    assert norm(decayed.params) < 0.95 * norm(vanilla.params)


def test_max_norm_keeps_every_column_in_the_ball(ds):
    constrained = ex.run("max_norm", ds, seed=0, config=CONFIG, coeff=0.5)
    for name, matrix in _matrices(constrained.params).items():
        assert np.linalg.norm(matrix, axis=0).max() <= 0.5 + 1e-5, name


def test_early_stopping_restores_the_best_epoch(ds):
    # Plain SGD for two epochs, then gradient *ascent*: validation accuracy peaks
    # early and collapses, so early stopping must hand back an early epoch's params.
    steps = len(ds.x_train) // CONFIG.batch_size
    ascent = ex.Recipe(
        "test: descent, then ascent",
        "test",
        coeff=2,
        transform=lambda c, s: optax.scale_by_schedule(
            lambda count: jnp.where(count < 2 * steps, 1.0, -20.0)
        ),
        early_stopping=True,
    )
    config = dataclasses.replace(CONFIG, epochs=8, learning_rate=0.05)
    result = ex.run("ascent", ds, seed=0, config=config, recipes={"ascent": ascent})
    val = result.history["val_acc"]
    best = int(np.argmax(val))
    assert result.early_stopping["best_epoch"] == best + 1
    assert result.early_stopping["stopped_epoch"] == best + 1 + 2 < 8
    assert len(val) == result.early_stopping["stopped_epoch"]
    assert result.final["val_acc"] == val[best] > val[-1]
    assert result.final["test_acc"] == result.history["test_acc"][best]


def test_summary_is_the_mean_over_seeds(ds, vanilla):
    other = ex.run("vanilla", ds, seed=1, config=CONFIG)
    summary = ex.summarize([vanilla, other])["vanilla"]
    accs = [vanilla.final["test_acc"], other.final["test_acc"]]
    assert summary["test_acc_mean"] == pytest.approx(np.mean(accs))
    assert summary["test_acc_std"] == pytest.approx(np.std(accs))
    assert summary["median_input_margin"] == pytest.approx(
        np.mean([np.median(vanilla.input_margins), np.median(other.input_margins)])
    )
    assert summary["relative_time"] == 1.0


def test_registry_entries_are_documented():
    assert {"vanilla", "weight_decay", "jacobian", "adversarial"} <= set(ex.RECIPES)
    for name, recipe in ex.RECIPES.items():
        assert recipe.description and recipe.reference, name


def test_unknown_regularizer_and_unprepared_data(ds):
    with pytest.raises(ValueError, match="unknown regularizer 'nope'"):
        ex.run("nope", ds)
    with pytest.raises(ValueError, match="validation set"):
        ex.run("vanilla", load_digits())


def test_activation_l1_sparsifies_the_hidden_representation(ds, vanilla):
    sparse = ex.run("activation_l1", ds, seed=0, config=CONFIG, coeff=0.05)
    model = models.make_model("mlp", 10)

    def mean_l1(params):
        _, state = model.apply(
            {"params": params}, ds.x_train, mutable=["intermediates"]
        )
        hidden = state["intermediates"]["activations"]
        assert len(hidden) == 2  # the MLP sows both hidden layers
        return sum(float(np.abs(np.asarray(h)).sum()) for h in hidden) / len(ds.x_train)

    assert mean_l1(sparse.params) < 0.9 * mean_l1(vanilla.params)


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
    times = ex.time_epochs(
        {"fast": (_Sleeper(0.002), ds), "slow": (_Sleeper(0.02), ds)},
        budget_seconds=0.2,
        max_rounds=8,
    )
    assert 0.002 <= times["fast"] < 0.015
    assert 0.02 <= times["slow"] < 0.05
