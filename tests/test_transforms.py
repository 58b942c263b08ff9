"""The spectral norm and Eigenvalue Decay transforms, against np.linalg.svd and
against the penalty path they share their maths with, inside optax and flax."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import margin_regs as mr

LR = 0.1


def make_params(rng, dtype=jnp.float32):
    return {
        "dense": jnp.asarray(rng.standard_normal((18, 8)), dtype),
        "conv": jnp.asarray(rng.standard_normal((3, 3, 2, 8)) / 3, dtype),
        "bias": jnp.asarray(rng.standard_normal(8), dtype),
    }


def loss(params):
    """Any loss touching every leaf, so the incoming gradients are not zero."""
    return sum(jnp.sum(jnp.sin(p.astype(jnp.float32))) for p in jax.tree.leaves(params))


def transform_steps(tx, params, n):
    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(n):
        params, state = step(params, state)
    return params, state


def svd_term(kernel):
    """σ u vᵀ and u vᵀ of the kernel's matrix view, in float64, kernel-shaped."""
    k = np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1])
    u, s, vt = np.linalg.svd(k)
    uv = np.outer(u[:, 0], vt[0]).reshape(kernel.shape)
    return s[0] * uv, uv


@pytest.mark.parametrize(
    ("factory", "index"),
    [(mr.spectral_norm_regularization, 0), (mr.eigenvalue_decay, 1)],
    ids=["spectral", "eigenvalue_decay"],
)
def test_one_update_adds_coeff_times_the_svd_term(rng, factory, index):
    params = make_params(rng)
    grads = jax.grad(loss)(params)
    tx = factory(0.3)
    updates, state = tx.update(grads, tx.init(params), params)
    for name in ("dense", "conv"):
        term = svd_term(params[name])[index]
        np.testing.assert_allclose(
            updates[name] - grads[name], 0.3 * term, atol=1e-5 * np.abs(term).max()
        )
    np.testing.assert_array_equal(updates["bias"], grads["bias"])
    inner = state.inner_state
    assert isinstance(inner, mr.PowerIterationState)
    assert isinstance(inner.vectors["bias"], optax.MaskedNode)
    assert inner.count.dtype == jnp.int32 and int(inner.count) == 1


def test_transform_step_equals_the_penalty_path_step(rng):
    params = make_params(rng)
    coeff = 0.05
    tx_params, tx_state = transform_steps(
        optax.chain(mr.spectral_norm_regularization(coeff), optax.sgd(LR)), params, 3
    )

    @jax.jit
    def penalty_step(params, vectors):
        def objective(p):
            value, new_vectors = mr.spectral_norm_penalty(p, vectors)
            return loss(p) + coeff * value, new_vectors

        grads, vectors = jax.grad(objective, has_aux=True)(params)
        return jax.tree.map(lambda p, g: p - LR * g, params, grads), vectors

    vectors = mr.init_power_iteration(params, 0)
    for _ in range(3):
        params, vectors = penalty_step(params, vectors)
    for a, b in zip(jax.tree.leaves(tx_params), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    tx_vectors = tx_state[0].inner_state.vectors
    for a, b in zip(jax.tree.leaves(tx_vectors), jax.tree.leaves(vectors), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_eigenvalue_decay_transform_is_the_converged_penalty_gradient(rng):
    """Its step is the gradient of C·σ; with a clear spectral gap the seed's nine
    iterations converge too, so the two forms of Eigenvalue Decay agree."""
    u, _ = np.linalg.qr(rng.standard_normal((18, 4)))
    v, _ = np.linalg.qr(rng.standard_normal((8, 4)))
    params = {"w": jnp.asarray((u * [2.0, 0.5, 0.3, 0.1]) @ v.T, jnp.float32)}
    tx = mr.eigenvalue_decay(0.2)
    updates, _ = tx.update({"w": jnp.zeros((18, 8))}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], 0.2 * svd_term(params["w"])[1], atol=1e-5)
    seed = jax.jit(jax.grad(mr.eigenvalue_decay_penalty))(params)["w"]
    np.testing.assert_allclose(updates["w"], 0.2 * seed, atol=1e-5)


def test_masks_pytree_and_callable(rng):
    params = make_params(rng)
    grads = jax.grad(loss)(params)
    pytree = {"dense": False, "conv": True, "bias": False}
    for mask in (pytree, lambda p: pytree):
        tx = mr.spectral_norm_regularization(1.0, mask=mask)
        updates, state = tx.update(grads, tx.init(params), params)
        np.testing.assert_array_equal(updates["dense"], grads["dense"])
        np.testing.assert_array_equal(updates["bias"], grads["bias"])
        np.testing.assert_allclose(
            updates["conv"] - grads["conv"], svd_term(params["conv"])[0], atol=1e-4
        )
        assert isinstance(state.inner_state.vectors["dense"], optax.MaskedNode)
    with pytest.raises(ValueError, match="bias"):
        mr.eigenvalue_decay(1.0, mask={"dense": True, "conv": True, "bias": True}).init(
            params
        )


def test_outer_optax_masked_and_chain(rng):
    params = make_params(rng)
    grads = jax.grad(loss)(params)
    tx = optax.chain(
        optax.masked(
            mr.eigenvalue_decay(1.0), {"dense": True, "conv": False, "bias": False}
        ),
        optax.scale(-1.0),
    )
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(
        -updates["dense"] - grads["dense"], svd_term(params["dense"])[1], atol=1e-5
    )
    np.testing.assert_array_equal(-updates["conv"], grads["conv"])


def test_schedule_is_evaluated_at_the_count(rng):
    params = {"w": jnp.asarray(rng.standard_normal((18, 8)), jnp.float32)}
    zeros = {"w": jnp.zeros((18, 8))}
    schedule = optax.linear_schedule(1.0, 0.0, transition_steps=4)
    tx = mr.spectral_norm_regularization(schedule)
    state = tx.init(params)
    term = svd_term(params["w"])[0]
    for count in range(3):
        updates, state = tx.update(zeros, state, params)
        np.testing.assert_allclose(
            updates["w"], float(schedule(count)) * term, atol=1e-4
        )


def test_inject_hyperparams_with_static_args(rng):
    params = {"w": jnp.asarray(rng.standard_normal((18, 8)), jnp.float32)}
    zeros = {"w": jnp.zeros((18, 8))}
    tx = optax.inject_hyperparams(
        mr.spectral_norm_regularization,
        static_args=("n_power_iterations", "key", "mask"),
    )(coeff=0.5, n_power_iterations=2, key=1, mask=lambda p: {"w": True})
    state = tx.init(params)
    state.hyperparams["coeff"] = jnp.asarray(2.0)
    updates, state = jax.jit(tx.update)(zeros, state, params)
    np.testing.assert_allclose(updates["w"], 2.0 * svd_term(params["w"])[0], atol=1e-4)


def test_update_without_params_names_the_transform(rng):
    params = make_params(rng)
    for factory, name in (
        (mr.spectral_norm_regularization, "spectral_norm_regularization"),
        (mr.eigenvalue_decay, "eigenvalue_decay"),
    ):
        tx = factory(0.1)
        with pytest.raises(ValueError, match=name):
            tx.update(params, tx.init(params))
    with pytest.raises(ValueError, match="n_power_iterations"):
        mr.eigenvalue_decay(0.1, n_power_iterations=0)


def test_dtypes_of_updates_and_state_never_change(rng):
    params = make_params(rng, jnp.bfloat16)
    tx = optax.chain(mr.spectral_norm_regularization(0.1), optax.sgd(LR))
    state0 = tx.init(params)
    new_params, state = transform_steps(tx, params, 2)
    assert jax.tree.map(lambda x: x.dtype, new_params) == jax.tree.map(
        lambda x: x.dtype, params
    )
    assert jax.tree.map(lambda x: x.dtype, state) == jax.tree.map(
        lambda x: x.dtype, state0
    )


def test_flax_linen_param_dict(rng):
    model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
    x = jnp.asarray(rng.standard_normal((4, 18)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    tx = mr.spectral_norm_regularization(1.0)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    for layer in ("layers_0", "layers_2"):
        np.testing.assert_allclose(
            updates[layer]["kernel"], svd_term(params[layer]["kernel"])[0], atol=1e-5
        )
        np.testing.assert_array_equal(updates[layer]["bias"], 0.0)


def test_flax_nnx_optimizer(rng):
    model = nnx.Linear(5, 4, rngs=nnx.Rngs(0))
    kernel = np.asarray(model.kernel[...], np.float64)
    optimizer = nnx.Optimizer(
        model,
        optax.chain(mr.spectral_norm_regularization(0.5), optax.sgd(LR)),
        wrt=nnx.Param,
    )
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 5)))))(model)
    g_kernel = np.asarray(grads.kernel[...], np.float64)
    optimizer.update(model, grads)
    expected = kernel - LR * (g_kernel + 0.5 * svd_term(kernel)[0])
    np.testing.assert_allclose(model.kernel[...], expected, atol=1e-5)
