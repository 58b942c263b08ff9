"""The Deep Learning ch. 7 baselines' recipes, trained end to end by the harness.

Split from tests/test_baselines.py, which tests the core functions and must not
import the harness.
"""

import numpy as np
import pytest

import margin_regs as mr
from margin_regs.experiments import training as ex
from margin_regs.experiments.data import load_digits, prepare

# ---------------------------------------------------------------- recipes end to end
# The setting of tests/test_training.py, so that in one pytest process the cached
# vanilla Trainer and the Evaluator compile once for both modules. max_norm and
# early_stopping are tested there, every recipe's run through `compare` in test_cli.

RECIPE_CONFIG = ex.TrainConfig(
    epochs=4, batch_size=16, learning_rate=0.05, margin_samples=64
)


@pytest.fixture(scope="module")
def tiny():
    return prepare(load_digits(), train_size=64, seed=0)


@pytest.fixture(scope="module")
def vanilla_run(tiny):
    return ex.run("vanilla", tiny, seed=0, config=RECIPE_CONFIG)


@pytest.mark.parametrize(
    "name", ["weight_noise", "input_noise", "label_smoothing", "dropout"]
)
def test_recipe_runs_with_its_default_and_changes_training(tiny, vanilla_run, name):
    """Same seed, same batches and init: only the recipe differs from vanilla."""
    recipe = ex.RECIPES[name]
    assert recipe.coeff is not None and "Goodfellow" in recipe.reference
    result = ex.run(name, tiny, seed=0, config=RECIPE_CONFIG)
    assert result.coeff == recipe.coeff
    assert np.all(np.isfinite(result.history["objective"]))
    assert 0.0 <= result.final["test_acc"] <= 1.0
    assert result.history["objective"] != vanilla_run.history["objective"]


def test_l1_recipe_shrinks_the_kernels_l1_norm(tiny, vanilla_run):
    # Kernel entries start at |w| ≈ 0.1 (fan_in 64); each of the 16 steps pushes
    # them ≈ lr·λ = 1e-3 towards 0 (more with momentum): several percent in all.
    sparse = ex.run("l1", tiny, seed=0, config=RECIPE_CONFIG, coeff=0.02)
    assert np.all(np.isfinite(sparse.history["objective"]))
    assert mr.l1_penalty(sparse.params) < 0.97 * mr.l1_penalty(vanilla_run.params)
