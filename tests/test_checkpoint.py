"""Optimizer state saves and restores with orbax; training resumes bit for bit.

The recipe the README gives: save ``{"params", "opt_state"}`` with
``ocp.StandardCheckpointer``; restore into the abstract target
``jax.eval_shape(lambda: {"params": params, "opt_state": tx.init(params)})``, which
carries the state's NamedTuple types and ``optax.MaskedNode`` positions (without a
target orbax returns plain dicts and lists). The resumed run must equal the run that
never stopped, exactly: same bits in params and state.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from _tiny_mlp import init_params, loss_fn

import margin_regs as mr

SIZES = (6, 8, 3)
rng = np.random.default_rng(0)
X = jnp.asarray(rng.standard_normal((16, SIZES[0])), jnp.float32)
Y = jnp.asarray(rng.integers(0, SIZES[-1], 16), jnp.int32)


def penalty_loss_fn(params, x, y, pi_state, precisions):
    """The stateful penalty forms: their state is carried next to the optimizer's."""
    spectral, pi_state = mr.spectral_norm_penalty(params, pi_state)
    value = (
        loss_fn(params, x, y)
        + 0.01 * spectral
        + 0.01 * mr.adareg_penalty(params, precisions)
    )
    return value, pi_state


SGD = optax.sgd(0.1, momentum=0.9)
# Each chain holds several transforms, so that one compiled step covers them all.
TRANSFORMS = {
    "spectral_ed_adareg": optax.chain(
        mr.spectral_norm_regularization(0.05),
        mr.eigenvalue_decay(0.05, key=3),
        # update_every=4: the re-solve falls after the restart, mid-period.
        mr.adareg(0.05, update_every=4),
        optax.adam(1e-2),
    ),
    "schedule_mask_inject_hyperparams": optax.chain(
        mr.spectral_norm_regularization(
            optax.linear_schedule(0.0, 0.1, 10),
            mask=mr.mask_by_path("dense1"),
        ),
        optax.inject_hyperparams(
            mr.adareg, static_args=("update_every", "mask", "lower", "upper")
        )(coeff=0.05, update_every=2),
        SGD,
    ),
}


def _save_and_restore(path, tree):
    abstract = jax.eval_shape(lambda: tree)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, tree)
        checkpointer.wait_until_finished()
        return checkpointer.restore(path, abstract)


def _assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


# The wrapped case runs on bfloat16 params: their float32 state and the params'
# bfloat16 must both come back as saved.
CASES = [
    ("spectral_ed_adareg", jnp.float32),
    ("schedule_mask_inject_hyperparams", jnp.bfloat16),
]


@pytest.mark.parametrize(
    ("name", "dtype"), CASES, ids=[f"{n}-{jnp.dtype(d).name}" for n, d in CASES]
)
def test_transform_state_round_trips_and_training_resumes_exactly(
    tmp_path, name, dtype
):
    tx = TRANSFORMS[name]

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss_fn)(params, X, Y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = init_params(jax.random.key(0), SIZES, dtype)
    state = tx.init(params)
    for _ in range(3):
        params, state = step(params, state)
    restored = _save_and_restore(tmp_path / "ckpt", {"params": params, "opt": state})
    _assert_identical(restored, {"params": params, "opt": state})

    resumed_params, resumed_state = restored["params"], restored["opt"]
    for _ in range(3):
        params, state = step(params, state)
        resumed_params, resumed_state = step(resumed_params, resumed_state)
    _assert_identical((resumed_params, resumed_state), (params, state))


def test_penalty_states_round_trip_and_training_resumes_exactly(tmp_path):
    tx = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state, pi_state, precisions):
        grads, pi_state = jax.grad(penalty_loss_fn, has_aux=True)(
            params, X, Y, pi_state, precisions
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        precisions = mr.adareg_update_precisions(
            params, precisions, lower=1e-3, upper=1e3
        )
        return params, opt_state, pi_state, precisions

    params = init_params(jax.random.key(0), SIZES)
    carry = (params, tx.init(params), mr.init_power_iteration(params, 1))
    carry = (*carry, mr.init_adareg_precisions(params))
    for _ in range(2):
        carry = step(*carry)
    restored = _save_and_restore(tmp_path / "ckpt", carry)
    _assert_identical(restored, carry)
    for _ in range(2):
        carry = step(*carry)
        restored = step(*restored)
    _assert_identical(restored, carry)
