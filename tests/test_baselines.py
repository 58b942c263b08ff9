"""Deep Learning ch. 7 baselines against numpy references and sampling statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import margin_regs as mr


def _params(rng, scale=1.0):
    return {
        "dense": {
            "kernel": jnp.asarray(scale * rng.normal(size=(6, 5)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
        },
        "conv": {
            "kernel": jnp.asarray(scale * rng.normal(size=(3, 3, 2, 4)), jnp.float32)
        },
    }


def _columns(kernel):
    k = np.asarray(kernel, np.float64)
    return k.reshape(-1, k.shape[-1])


# ---------------------------------------------------------------- max-norm (§7.2)


@pytest.mark.parametrize("scale", [1.0, 1e-25, 1e25])
def test_max_norm_projects_outside_columns_and_keeps_inside_ones(rng, scale):
    c = 2.0 * scale
    params = _params(rng)
    # Half of each kernel's columns far inside the ball, half far outside, so both
    # branches are exercised at every scale.
    for layer in ("dense", "conv"):
        k = params[layer]["kernel"]
        norms = np.linalg.norm(_columns(k), axis=0)
        target = np.where(np.arange(k.shape[-1]) % 2 == 0, 0.5, 3.0)
        params[layer]["kernel"] = jnp.asarray(np.asarray(k) * target / norms * scale)
    params = jax.tree.map(lambda w: w.astype(jnp.float32), params)
    grads = jax.tree.map(
        lambda w: jnp.asarray(rng.normal(size=w.shape), w.dtype), params
    )
    sgd = optax.sgd(1e-3 * scale)
    tx = optax.chain(sgd, mr.max_norm_constraint(c))
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    unconstrained = optax.apply_updates(
        params, jax.jit(sgd.update)(grads, sgd.init(params))[0]
    )

    for layer in ("dense", "conv"):
        got = _columns(new[layer]["kernel"])
        free = _columns(unconstrained[layer]["kernel"])
        free_norms = np.linalg.norm(free, axis=0)
        outside = free_norms > c
        assert outside.any() and (~outside).any()
        got_norms = np.linalg.norm(got, axis=0)
        assert np.all(got_norms <= c * (1 + 2e-6))
        np.testing.assert_allclose(got_norms[outside], c, rtol=2e-6)
        # Independent reference in float64 (optax.projections.projection_l2_ball
        # itself over/underflows at the extreme scales).
        expected = free * c / np.maximum(free_norms, c)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * scale)
        # Inside columns: bit for bit what the optimizer alone produces.
        np.testing.assert_array_equal(
            np.asarray(new[layer]["kernel"]).reshape(got.shape)[:, ~outside],
            np.asarray(unconstrained[layer]["kernel"]).reshape(got.shape)[:, ~outside],
        )
    # Biases are not constrained by default.
    np.testing.assert_array_equal(new["dense"]["bias"], unconstrained["dense"]["bias"])


def test_max_norm_constraint_holds_over_training(rng):
    """Many large steps of a momentum optimizer never leave the ball."""
    params = _params(rng)
    tx = optax.chain(optax.sgd(0.5, momentum=0.9), mr.max_norm_constraint(1.5))
    state = tx.init(params)

    @jax.jit
    def step(params, state, key):
        grads = jax.tree.map(
            lambda w: jax.random.normal(key, w.shape, w.dtype) - 0.5 * w, params
        )
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for i in range(20):
        params, state = step(params, state, jax.random.key(i))
        for layer in ("dense", "conv"):
            norms = np.linalg.norm(_columns(params[layer]["kernel"]), axis=0)
            assert np.all(norms <= 1.5 * (1 + 2e-6))


def test_max_norm_keeps_dtype_and_works_in_inject_hyperparams(rng):
    params = jax.tree.map(lambda w: w.astype(jnp.bfloat16), _params(rng, scale=3.0))
    tx = optax.inject_hyperparams(mr.max_norm_constraint)(max_norm=1.0)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    assert jax.tree.map(lambda u: u.dtype, updates) == jax.tree.map(
        lambda p: p.dtype, params
    )
    new = optax.apply_updates(params, updates)
    norms = np.linalg.norm(_columns(new["conv"]["kernel"].astype(jnp.float32)), axis=0)
    # bfloat16 keeps 8 bits of mantissa.
    np.testing.assert_allclose(norms, 1.0, rtol=2e-2)


def test_max_norm_errors(rng):
    params = _params(rng)
    tx = mr.max_norm_constraint(1.0)
    with pytest.raises(ValueError, match="max_norm_constraint needs params"):
        tx.update(params, tx.init(params))
    tx = mr.max_norm_constraint(1.0, mask=lambda p: jax.tree.map(lambda _: True, p))
    with pytest.raises(ValueError, match="dense/bias"):
        tx.update(params, tx.init(params), params)


# ---------------------------------------------------------------- L1 (§7.1)


def test_l1_penalty_matches_numpy(rng):
    params = _params(rng)
    expected = sum(
        np.abs(np.asarray(params[layer]["kernel"], np.float64)).sum()
        for layer in ("dense", "conv")
    )
    np.testing.assert_allclose(mr.l1_penalty(params), expected, rtol=1e-6)
    everything = mr.l1_penalty(params, mask=lambda p: jax.tree.map(lambda _: True, p))
    bias = np.abs(np.asarray(params["dense"]["bias"], np.float64)).sum()
    np.testing.assert_allclose(everything, expected + bias, rtol=1e-6)


def test_add_l1_penalty_is_coeff_sign_and_the_penalty_gradient(rng):
    params = _params(rng)
    # Exact zeros: the subgradient there must be 0, from both forms.
    params["dense"]["kernel"] = params["dense"]["kernel"].at[0, :].set(0.0)
    grads = jax.tree.map(
        lambda w: jnp.asarray(rng.normal(size=w.shape), w.dtype), params
    )
    coeff = 0.3
    tx = mr.add_l1_penalty(coeff)
    updates, _ = tx.update(grads, tx.init(params), params)

    penalty_grad = jax.grad(lambda p: coeff * mr.l1_penalty(p))(params)
    for layer in ("dense", "conv"):
        w = np.asarray(params[layer]["kernel"])
        added = np.asarray(updates[layer]["kernel"] - grads[layer]["kernel"])
        np.testing.assert_allclose(added, coeff * np.sign(w), atol=1e-6)
        np.testing.assert_allclose(added, penalty_grad[layer]["kernel"], atol=1e-6)
    assert np.all(np.asarray(penalty_grad["dense"]["kernel"])[0] == 0)
    np.testing.assert_array_equal(updates["dense"]["bias"], grads["dense"]["bias"])


def test_l1_penalty_gradient_matches_finite_differences(rng):
    w = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    g = jax.grad(lambda k: mr.l1_penalty({"k": k}))(w)
    h = 1e-3
    for i, j in [(0, 0), (2, 1), (3, 2)]:
        e = jnp.zeros_like(w).at[i, j].set(h)
        fd = (mr.l1_penalty({"k": w + e}) - mr.l1_penalty({"k": w - e})) / (2 * h)
        np.testing.assert_allclose(g[i, j], fd, rtol=1e-3)


def test_add_l1_penalty_schedule_and_errors(rng):
    params = _params(rng)
    zero = jax.tree.map(jnp.zeros_like, params)
    tx = mr.add_l1_penalty(lambda step: 0.1 * (step + 1))
    state = tx.init(params)
    sign = np.sign(np.asarray(params["conv"]["kernel"]))
    for step in range(3):
        updates, state = tx.update(zero, state, params)
        np.testing.assert_allclose(
            updates["conv"]["kernel"], 0.1 * (step + 1) * sign, rtol=1e-6
        )
    with pytest.raises(ValueError, match="add_l1_penalty needs params"):
        tx.update(zero, state)


# ---------------------------------------------------------------- noise (§7.4, §7.5)


def _check_gaussian(noise, stddev):
    """Mean and std of n iid N(0, σ²) draws, within 5 standard errors."""
    noise = np.asarray(noise, np.float64).ravel()
    n = noise.size
    assert abs(noise.mean()) < 5 * stddev / np.sqrt(n)
    assert abs(noise.std() - stddev) < 5 * stddev / np.sqrt(2 * n)


def test_perturb_weights_statistics_and_mask():
    params = {
        "a": {"kernel": jnp.full((100, 80), 2.0), "bias": jnp.ones(80)},
        "b": {"kernel": jnp.full((100, 80), 2.0)},
    }
    noisy = jax.jit(mr.perturb_weights)(params, jax.random.key(3), 0.05)
    na = noisy["a"]["kernel"] - 2.0
    nb = noisy["b"]["kernel"] - 2.0
    _check_gaussian(na, 0.05)
    _check_gaussian(nb, 0.05)
    # Each leaf draws its own noise.
    corr = np.corrcoef(np.asarray(na).ravel(), np.asarray(nb).ravel())[0, 1]
    assert abs(corr) < 5 / np.sqrt(na.size)
    np.testing.assert_array_equal(noisy["a"]["bias"], params["a"]["bias"])
    # Same key, same noise; zero stddev is the identity.
    again = mr.perturb_weights(params, jax.random.key(3), 0.05)
    # (jit may fuse the sampling differently: equal up to float32 rounding)
    np.testing.assert_allclose(again["b"]["kernel"], noisy["b"]["kernel"], rtol=1e-6)
    same = mr.perturb_weights(params, 3, 0.0)
    jax.tree.map(np.testing.assert_array_equal, same, params)


def test_perturb_weights_gradient_is_taken_at_the_noisy_weights():
    params = {"kernel": jnp.ones((3, 2))}
    key = jax.random.key(1)

    def loss(p):
        return 0.5 * jnp.sum(mr.perturb_weights(p, key, 0.1)["kernel"] ** 2)

    noisy = mr.perturb_weights(params, key, 0.1)["kernel"]
    np.testing.assert_allclose(jax.grad(loss)(params)["kernel"], noisy, rtol=1e-6)


def test_perturb_weights_keeps_dtype_and_draws_n_0_sigma2_in_it():
    params = {"kernel": jnp.full((100, 100), 2.0, jnp.bfloat16)}
    noisy = mr.perturb_weights(params, 0, 0.1)["kernel"]
    assert noisy.dtype == jnp.bfloat16
    # Rounding to bfloat16's 2⁻⁶ grid at 2 adds variance 2⁻¹²/12 = 2e-5 to σ² = 1e-2,
    # moving σ by 0.1%: well inside _check_gaussian's 5 standard errors (3.5%).
    _check_gaussian(np.asarray(noisy, np.float64) - 2.0, 0.1)


def test_add_input_noise_statistics_identity_and_dtype():
    x = jnp.linspace(-1.0, 1.0, 20_000).reshape(200, 100)
    noisy = jax.jit(mr.add_input_noise)(x, jax.random.key(7), 0.3)
    _check_gaussian(noisy - x, 0.3)
    np.testing.assert_array_equal(mr.add_input_noise(x, 7, 0.0), x)
    assert mr.add_input_noise(x.astype(jnp.float16), 0, 0.1).dtype == jnp.float16
    with pytest.raises(ValueError, match="floating"):
        mr.add_input_noise(jnp.ones((2, 2), jnp.int32), 0, 0.1)


# ---------------------------------------------------------------- sparsity (§7.10)


def test_activation_l1_penalty_matches_numpy(rng):
    acts = {
        "h1": rng.normal(size=(5, 3)).astype(np.float32),
        "h2": [rng.normal(size=(5, 2, 2)).astype(np.float32)],
    }
    expected = (
        np.abs(acts["h1"].astype(np.float64)).sum(axis=1).mean()
        + np.abs(acts["h2"][0].astype(np.float64)).reshape(5, -1).sum(axis=1).mean()
    )
    jacts = jax.tree.map(jnp.asarray, acts)
    np.testing.assert_allclose(mr.activation_l1_penalty(jacts), expected, rtol=1e-6)
    grad = jax.grad(mr.activation_l1_penalty)(jacts)
    np.testing.assert_allclose(grad["h1"], np.sign(acts["h1"]) / 5, rtol=1e-6)


def test_activation_l1_penalty_rejects_missing_batch():
    with pytest.raises(ValueError, match="batch"):
        mr.activation_l1_penalty({"h": jnp.float32(1.0)})
