"""Each recipe does what it claims, on the same seed and batches as vanilla."""

import numpy as np
from _digits_runs import CONFIG, matrices

from margin_regs.experiments import models, recipes
from margin_regs.experiments import training as tr


def test_spectral_lowers_the_top_singular_value(ds, vanilla):
    spectral = tr.run("spectral", ds, seed=0, config=CONFIG, coeff=0.5)
    for name, sigma in vanilla.final["sigma_max"].items():
        assert spectral.final["sigma_max"][name] < sigma, name


def test_weight_decay_shrinks_kernels(ds, vanilla):
    decayed = tr.run("weight_decay", ds, seed=0, config=CONFIG, coeff=5.0)
    norm = lambda p: sum(np.sum(m**2) for m in matrices(p).values())  # noqa: E731
    assert norm(decayed.params) < 0.95 * norm(vanilla.params)


def test_max_norm_keeps_every_column_in_the_ball(ds):
    constrained = tr.run("max_norm", ds, seed=0, config=CONFIG, coeff=0.5)
    for name, matrix in matrices(constrained.params).items():
        assert np.linalg.norm(matrix, axis=0).max() <= 0.5 + 1e-5, name


def test_registry_entries_are_documented():
    assert {"vanilla", "weight_decay", "jacobian", "adversarial"} <= set(
        recipes.RECIPES
    )
    for name, recipe in recipes.RECIPES.items():
        assert recipe.description and recipe.reference, name


def test_activation_l1_sparsifies_the_hidden_representation(ds, vanilla):
    sparse = tr.run("activation_l1", ds, seed=0, config=CONFIG, coeff=0.05)
    model = models.make_model("mlp", 10)

    def mean_l1(params):
        _, state = model.apply(
            {"params": params}, ds.x_train, mutable=["intermediates"]
        )
        hidden = state["intermediates"]["activations"]
        assert len(hidden) == 2  # the MLP sows both hidden layers
        return sum(float(np.abs(np.asarray(h)).sum()) for h in hidden) / len(ds.x_train)

    assert mean_l1(sparse.params) < 0.9 * mean_l1(vanilla.params)
