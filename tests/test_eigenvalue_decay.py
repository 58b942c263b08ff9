"""Eigenvalue Decay: the seed's penalty against its unnormalised Keras formula in
float64 numpy (gradient by central differences), and the fast transform against
the SVD and the converged penalty gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _matrices import loss, make_params, svd_term, with_spectrum

import margin_regs as mr

ed_fn = jax.jit(mr.eigenvalue_decay_penalty, static_argnames="n_power_iterations")
ed_grad = jax.jit(
    jax.grad(mr.eigenvalue_decay_penalty), static_argnames="n_power_iterations"
)


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
