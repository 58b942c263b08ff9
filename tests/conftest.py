"""Shared fixtures. Tests run on the CPU in float32, like users' default JAX."""

import jax
import numpy as np
import pytest


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# The harness tests' digits setting (tests/_digits_runs.py), imported only when a
# test asks for it, so the core tests never load the experiment harness.
@pytest.fixture(scope="module")
def ds():
    from _digits_runs import digits

    return digits()


@pytest.fixture(scope="module")
def vanilla():
    from _digits_runs import vanilla_run

    return vanilla_run()
