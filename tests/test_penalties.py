"""Spectral norm and Eigenvalue Decay penalties against independent maths.

References: ``np.linalg.svd`` in float64, autodiff of the exact ½σ² through
``jnp.linalg.svd``, and the unnormalised Eigenvalue Decay formula of the seed's
Keras code evaluated in float64 numpy (its gradient by central differences).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import margin_regs as mr

penalty_fn = jax.jit(mr.spectral_norm_penalty, static_argnames="n_power_iterations")
penalty_grad = jax.jit(
    jax.grad(lambda p, s: mr.spectral_norm_penalty(p, s)[0]),
)
ed_fn = jax.jit(mr.eigenvalue_decay_penalty, static_argnames="n_power_iterations")
ed_grad = jax.jit(
    jax.grad(mr.eigenvalue_decay_penalty), static_argnames="n_power_iterations"
)


def with_spectrum(rng, shape, sigmas):
    """A matrix of ``shape`` with the given singular values, random singular vectors."""
    d, p = shape
    u, _ = np.linalg.qr(rng.standard_normal((d, len(sigmas))))
    v, _ = np.linalg.qr(rng.standard_normal((p, len(sigmas))))
    return (u * np.asarray(sigmas)) @ v.T


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


def top_sigma(k):
    return np.linalg.svd(np.asarray(k, np.float64).reshape(-1, k.shape[-1]))[1][0]


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
        np.testing.assert_allclose(
            np.linalg.norm(k @ v), top_sigma(kernel), rtol=1e-3, err_msg=name
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
        "b": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
        "bias": jnp.ones(3),
    }
    only_a = {"a": True, "b": False, "bias": False}
    for mask in (only_a, lambda p: {"a": True, "b": False, "bias": False}):
        state = mr.init_power_iteration(params, 0, mask=mask)
        assert isinstance(state["b"], optax.MaskedNode)
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
        mr.init_power_iteration(params, 0, mask={"a": True, "b": True, "bias": True})
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


def seed_formula(k, p=9, dtype=np.float64):
    """The Keras original: v = M^p 1 with M = KᵀK unnormalised, sqrt of (Mv·v)/(v·v)."""
    k = np.asarray(k, dtype)
    m = k.T @ k
    v = np.ones(k.shape[1], dtype)
    for _ in range(p):
        v = m @ v
    return np.sqrt((m @ v) @ v / (v @ v))


def central_differences(f, k, h=1e-6):
    g = np.zeros_like(k)
    for idx in np.ndindex(k.shape):
        e = np.zeros_like(k)
        e[idx] = h
        g[idx] = (f(k + e) - f(k - e)) / (2 * h)
    return g


@pytest.mark.parametrize(
    "sigmas",
    [
        pytest.param([1.0, 0.97, 0.9, 0.5, 0.3], id="unconverged-at-p9"),
        pytest.param([0.02, 0.015, 0.01, 0.005, 0.001], id="sigma-0.02-underflows"),
        pytest.param([18.0, 17.0, 10.0, 5.0, 1.0], id="sigma-18-overflows"),
    ],
)
def test_eigenvalue_decay_penalty_is_the_seed_formula(rng, sigmas):
    k = with_spectrum(rng, (7, 5), sigmas).astype(np.float32).astype(np.float64)
    expected = seed_formula(k)
    assert np.isfinite(expected)
    if sigmas[0] != 1.0:
        with np.errstate(all="ignore"):
            assert not np.isfinite(seed_formula(k, dtype=np.float32))
    kernel = jnp.asarray(k, jnp.float32)
    np.testing.assert_allclose(float(ed_fn({"w": kernel})), expected, rtol=2e-5)
    # The seed differentiates through its 9 iterations; at σ₂/σ₁ = 0.97 they have
    # not converged, so this gradient is not that of the exact σ.
    scale = sigmas[0]
    fd = central_differences(lambda x: seed_formula(x * scale) / scale, k / scale)
    grad = ed_grad({"w": kernel})["w"]
    assert bool(jnp.all(jnp.isfinite(grad)))
    np.testing.assert_allclose(grad, fd, atol=2e-4)


def test_eigenvalue_decay_gradient_is_not_the_exact_one_before_convergence(rng):
    slow = with_spectrum(rng, (7, 5), [1.0, 0.97, 0.9, 0.5, 0.3])
    fast = with_spectrum(rng, (7, 5), [1.0, 0.2, 0.1, 0.05, 0.01])
    for k, far in ((slow, True), (fast, False)):
        u, _, vt = np.linalg.svd(k)
        exact = np.outer(u[:, 0], vt[0])
        grad = ed_grad({"w": jnp.asarray(k, jnp.float32)})["w"]
        assert (np.abs(grad - exact).max() > 1e-2) == far


def test_eigenvalue_decay_batches_same_shaped_kernels_without_mixing_them(rng):
    params = [jnp.asarray(rng.standard_normal((7, 5)), jnp.float32) for _ in range(3)]
    batched = ed_fn(params)
    alone = sum(float(ed_fn([p])) for p in params)
    np.testing.assert_allclose(float(batched), alone, rtol=1e-6)
    np.testing.assert_allclose(
        alone, sum(seed_formula(np.asarray(p, np.float64)) for p in params), rtol=1e-5
    )
