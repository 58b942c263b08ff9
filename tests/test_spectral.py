"""Spectral norm regularization, penalty and transform, against independent maths.

References: ``np.linalg.svd`` in float64, autodiff of the exact ½σ² through
``jnp.linalg.svd``, and the penalty path the transform shares its maths with,
inside optax and flax.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _matrices import loss, make_params, svd_term, top_sigma, with_spectrum
from flax import nnx

import margin_regs as mr

penalty_fn = jax.jit(mr.spectral_norm_penalty, static_argnames="n_power_iterations")
penalty_grad = jax.jit(
    jax.grad(lambda p, s: mr.spectral_norm_penalty(p, s)[0]),
)
ed_fn = jax.jit(mr.eigenvalue_decay_penalty, static_argnames="n_power_iterations")
ed_grad = jax.jit(
    jax.grad(mr.eigenvalue_decay_penalty), static_argnames="n_power_iterations"
)


LR = 0.1


def matrices(rng):
    """Same-shaped on purpose: init stacks them into one batched call."""
    return {
        "gaussian": rng.standard_normal((30, 18)) / np.sqrt(30),
        "power_law": with_spectrum(rng, (30, 18), 1.0 / np.arange(1, 19)),
        "near_degenerate": with_spectrum(
            rng, (30, 18), [1.0, 0.999, 0.998, *np.linspace(0.5, 0.1, 15)]
        ),
    }


def standard_params(rng, scale=1.0):
    """The tree most tests share, so jitted functions compile once."""
    return {
        "dense": jnp.asarray(rng.standard_normal((18, 8)) * scale, jnp.float32),
        "conv": jnp.asarray(rng.standard_normal((3, 3, 2, 8)) * scale, jnp.float32),
        "bias": jnp.ones(8),
    }


def test_init_converges_to_the_exact_sigma(rng):
    params = {
        **{n: jnp.asarray(m, jnp.float32) for n, m in matrices(rng).items()},
        **standard_params(rng),
    }
    state = mr.init_power_iteration(params, jax.random.key(1))
    assert isinstance(state["bias"], optax.MaskedNode)
    for name, kernel in params.items():
        if name == "bias":
            continue
        v = np.asarray(state[name], np.float64)
        assert state[name].dtype == jnp.float32
        np.testing.assert_allclose(np.linalg.norm(v), 1.0, rtol=1e-5)
        k = np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1])
        # Stopped at a 1e-6 change, ‖Kv‖ errs by ≤ (π²/8)·n·1e-12/((1−r²)²c₁²), r =
        # σ₂/σ₁: below float32 rounding. At r = 0.999 the 1000-iteration cap stops
        # first: ½(1−r²)r⁴⁰⁰⁰tan²θ₀ ≈ 2e-5·tan²θ₀ of a random start (5e-4 measured).
        rtol = 1e-3 if name == "near_degenerate" else 1e-6
        np.testing.assert_allclose(
            np.linalg.norm(k @ v), top_sigma(kernel), rtol=rtol, err_msg=name
        )


def test_init_takes_an_int_a_typed_key_or_a_raw_key(rng):
    params = {"w": jnp.asarray(rng.standard_normal((18, 8)), jnp.float32)}
    a = mr.init_power_iteration(params, 3)["w"]
    b = mr.init_power_iteration(params, jax.random.key(3))["w"]
    c = mr.init_power_iteration(params, jax.random.PRNGKey(3))["w"]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_one_iteration_per_step_tracks_a_slowly_changing_matrix(rng):
    k0 = with_spectrum(rng, (18, 8), np.linspace(2.0, 0.2, 8))
    drift = rng.standard_normal((18, 8)) * 1e-3
    params = {"w": jnp.asarray(k0, jnp.float32)}
    state = mr.init_power_iteration(params, 0)
    # Each step moves K by ~0.4% of ‖K‖_F, the order of an SGD step; the top
    # singular vectors turn a little every step and one iteration must follow them.
    for t in range(50):
        k = k0 + t * drift
        value, state = penalty_fn({"w": jnp.asarray(k, jnp.float32)}, state)
        np.testing.assert_allclose(np.sqrt(2 * float(value)), top_sigma(k), rtol=1e-3)


def test_gradient_is_that_of_the_exact_half_sigma_squared(rng):
    params = standard_params(rng)
    state = mr.init_power_iteration(params, 0)
    grads = penalty_grad(params, state)

    def exact(k):
        return 0.5 * jnp.linalg.svd(mr.as_matrix(k), compute_uv=False)[0] ** 2

    for name in ("dense", "conv"):
        expected = jax.grad(exact)(params[name])
        assert grads[name].shape == params[name].shape
        np.testing.assert_allclose(
            grads[name], expected, atol=2e-5 * top_sigma(params[name])
        )
    np.testing.assert_array_equal(grads["bias"], 0.0)


def test_gradient_keeps_a_bfloat16_kernel_dtype(rng):
    params = {"w": jnp.asarray(rng.standard_normal((8, 4)), jnp.bfloat16)}
    state = mr.init_power_iteration(params, 0)
    grad = jax.grad(lambda p: mr.spectral_norm_penalty(p, state)[0])(params)["w"]
    assert grad.dtype == jnp.bfloat16
    k = np.asarray(params["w"], np.float64)
    u, s, vt = np.linalg.svd(k)
    np.testing.assert_allclose(
        np.asarray(grad, np.float64), s[0] * np.outer(u[:, 0], vt[0]), atol=0.02 * s[0]
    )


def test_masks_select_kernels_as_optax_masked_does(rng):
    params = {
        "a": jnp.asarray(rng.standard_normal((5, 4)), jnp.float32),
        "k": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
        "bias": jnp.ones(3),
    }
    only_a = {"a": True, "k": False, "bias": False}
    for mask in (only_a, lambda p: {"a": True, "k": False, "bias": False}):
        state = mr.init_power_iteration(params, 0, mask=mask)
        assert isinstance(state["k"], optax.MaskedNode)
        value, new_state = mr.spectral_norm_penalty(params, state, mask=mask)
        np.testing.assert_allclose(
            np.sqrt(2 * value), top_sigma(params["a"]), rtol=1e-4
        )
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
        np.testing.assert_allclose(
            mr.eigenvalue_decay_penalty(params, mask=mask),
            mr.eigenvalue_decay_penalty({"a": params["a"]}),
        )
    with pytest.raises(ValueError, match="bias"):
        mr.init_power_iteration(params, 0, mask={"a": True, "k": True, "bias": True})
    state = mr.init_power_iteration(params, 0)
    with pytest.raises(ValueError, match="does not match"):
        mr.spectral_norm_penalty(params, state, mask=only_a)


def test_zero_kernels_give_zero_penalties_and_finite_gradients(rng):
    params = standard_params(rng, scale=0.0)
    state = mr.init_power_iteration(params, 0)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(state))
    value, state = penalty_fn(params, state)
    assert float(value) == 0.0
    zero = {"w": jnp.zeros((7, 5))}
    for grads in (penalty_grad(params, state), ed_grad(zero)):
        for g in jax.tree.leaves(grads):
            assert bool(jnp.all(g == 0.0))
    assert float(ed_fn(zero)) == 0.0


def transform_steps(tx, params, n):
    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(n):
        params, state = step(params, state)
    return params, state


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
    # The values: two float64 steps p ← p − LR·(cos p + 0.1·σ u vᵀ) (∇ of the sin
    # loss plus Alg. 1's term, its σ u vᵀ from the SVD: init converged it).
    want = {n: np.asarray(p, np.float64) for n, p in params.items()}
    for _ in range(2):
        want = {
            n: w - LR * (np.cos(w) + (0 if n == "bias" else 0.1 * svd_term(w)[0]))
            for n, w in want.items()
        }
    eps = float(jnp.finfo(jnp.bfloat16).eps)
    for n, w in want.items():
        # bfloat16 rounds g, the term, their sum, LR·u and p + u once a step.
        tol = 2 * eps * (np.abs(w) + LR * (1 + 0.1 * top_sigma(w)))
        assert np.all(np.abs(np.asarray(new_params[n], np.float64) - w) <= tol), n


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
