"""The small digits setting the harness tests share, so a pytest process builds the
data, compiles the trainer and trains the vanilla run once for all of them."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from margin_regs.experiments import training as tr
from margin_regs.experiments.data import load_digits, prepare
from margin_regs.experiments.recipes import Recipe

# The same schedule as test_cli's end-to-end run, so both share compiled trainers.
CONFIG = tr.TrainConfig(epochs=2, batch_size=16)


@functools.cache
def digits():
    return prepare(load_digits(), train_size=64, seed=0)


@functools.cache
def vanilla_run():
    return tr.run("vanilla", digits(), seed=0, config=CONFIG)


def matrices(params):
    """Each ``ndim >= 2`` leaf as its ``(-1, last)`` matrix, keyed by its path."""
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf).reshape(
            -1, leaf.shape[-1]
        )
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if leaf.ndim >= 2
    }


def ascent_recipe(steps):
    """Plain SGD for two epochs of ``steps``, then gradient ascent: validation accuracy
    peaks early and collapses, so early stopping must keep an early epoch's params."""
    return Recipe(
        "test: descent, then ascent",
        "test",
        coeff=2,
        transform=lambda c, s: optax.scale_by_schedule(
            lambda count: jnp.where(count < 2 * steps, 1.0, -20.0)
        ),
        early_stopping=True,
    )
