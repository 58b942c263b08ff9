"""Matrix views, power iteration and exact spectra against ``np.linalg.svd``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import margin_regs as mr
from margin_regs.linalg import converged_singular_triple, power_iteration_step

converged = jax.jit(converged_singular_triple)
step = jax.jit(power_iteration_step, static_argnames="n_iterations")


def with_spectrum(rng, shape, sigmas):
    d, p = shape
    u, _ = np.linalg.qr(rng.standard_normal((d, len(sigmas))))
    v, _ = np.linalg.qr(rng.standard_normal((p, len(sigmas))))
    return (u * np.asarray(sigmas)) @ v.T


def test_as_matrix_is_the_papers_conv_reshape_and_takes_a_view():
    kernel = jnp.arange(5 * 5 * 3 * 4.0).reshape(5, 5, 3, 4)
    matrix = mr.as_matrix(kernel)
    assert matrix.shape == (75, 4)
    # Column j holds every weight feeding output channel j.
    np.testing.assert_array_equal(matrix[:, 2], np.asarray(kernel)[..., 2].ravel())
    equinox = jnp.moveaxis(kernel, -1, 0)  # (out, kh, kw, in)
    view = mr.as_matrix(equinox, lambda w: w.reshape(w.shape[0], -1).T)
    np.testing.assert_array_equal(view, matrix)
    with pytest.raises(ValueError, match="ndim >= 2"):
        mr.as_matrix(jnp.ones(3))
    with pytest.raises(ValueError, match="2-D"):
        mr.as_matrix(kernel, lambda w: w)


@pytest.mark.parametrize(
    "kind", ["gaussian", "power_law", "near_degenerate", "rank_one"]
)
def test_converged_triple_matches_the_svd(rng, kind):
    shape = (30, 18)
    spectra = {
        "power_law": 1.0 / np.arange(1, 19),
        "near_degenerate": [1.0, 0.999, 0.998, *np.linspace(0.5, 0.1, 15)],
        "rank_one": [2.5],
    }
    k = (
        rng.standard_normal(shape) / np.sqrt(30)
        if kind == "gaussian"
        else with_spectrum(rng, shape, spectra[kind])
    )
    k = k.astype(np.float32)
    t = converged(jnp.asarray(k), jnp.asarray(rng.standard_normal(18), jnp.float32))
    _, s, vt = np.linalg.svd(k.astype(np.float64))
    # Stopped at a 1e-6 entry change, σ errs by ≤ (π²/8)·n·1e-12/((1−r²)²c₁²) with
    # r = σ₂/σ₁: float32 rounding (~1e-7) dominates. At r = 0.999 the 1000-iteration
    # cap stops first, leaving ½(1−r²)r⁴⁰⁰⁰tan²θ₀ ≈ 2e-5·tan²θ₀ (up to 8e-4 measured).
    rtol = 1e-3 if kind == "near_degenerate" else 1e-6
    np.testing.assert_allclose(float(t.sigma), s[0], rtol=rtol)
    # The triple is self-consistent: K v = σ u up to the convergence error.
    np.testing.assert_allclose(
        k @ np.asarray(t.v), float(t.sigma) * np.asarray(t.u), atol=2e-3
    )
    # v lies in the top singular subspace: one vector, or the three near-equal ones.
    top = 3 if kind == "near_degenerate" else 1
    assert np.linalg.norm(vt[:top] @ np.asarray(t.v)) > 1 - 1e-4


def test_one_step_from_the_exact_vector_is_the_exact_triple(rng):
    k = with_spectrum(rng, (30, 18), 1.0 / np.arange(1, 19)).astype(np.float32)
    u, s, vt = np.linalg.svd(k.astype(np.float64))
    t = step(jnp.asarray(k), jnp.asarray(vt[0], jnp.float32))
    np.testing.assert_allclose(float(t.sigma), s[0], rtol=1e-5)
    np.testing.assert_allclose(np.abs(t.u), np.abs(u[:, 0]), atol=1e-5)
    # σ is exactly uᵀ K v, the quantity whose gradient is u vᵀ.
    np.testing.assert_allclose(float(t.u @ k @ t.v), float(t.sigma), rtol=1e-5)


def test_stacked_matrices_iterate_independently(rng):
    ks = rng.standard_normal((3, 30, 18)).astype(np.float32)
    vs = rng.standard_normal((3, 18)).astype(np.float32)
    vs /= np.linalg.norm(vs, axis=-1, keepdims=True)
    stacked = step(jnp.asarray(ks), jnp.asarray(vs), n_iterations=2)
    # A list of kernels is iterated the same way, without copying them into a stack.
    listed = step([jnp.asarray(k) for k in ks], jnp.asarray(vs), n_iterations=2)
    np.testing.assert_allclose(listed.u, stacked.u, atol=1e-6)
    np.testing.assert_allclose(listed.v, stacked.v, atol=1e-6)
    for i in range(3):
        alone = step(jnp.asarray(ks[i]), jnp.asarray(vs[i]), n_iterations=2)
        np.testing.assert_allclose(stacked.sigma[i], alone.sigma, rtol=1e-6)
        np.testing.assert_allclose(stacked.v[i], alone.v, atol=1e-6)


def test_zero_and_bfloat16_matrices(rng):
    v = jnp.ones(18) / np.sqrt(18)
    zero = step(jnp.zeros((30, 18)), v)
    assert float(zero.sigma) == 0.0
    np.testing.assert_array_equal(zero.v, v)
    assert bool(jnp.all(jnp.isfinite(zero.u)))
    k = jnp.asarray(rng.standard_normal((30, 18)), jnp.bfloat16)
    t = converged(k, v)
    assert t.sigma.dtype == t.u.dtype == t.v.dtype == jnp.float32
    exact = np.linalg.svd(np.asarray(k, np.float64), compute_uv=False)[0]
    np.testing.assert_allclose(float(t.sigma), exact, rtol=1e-3)


def test_exact_spectra_and_stable_rank(rng):
    kernel = jnp.asarray(rng.standard_normal((3, 3, 2, 5)), jnp.float32)
    s = np.linalg.svd(np.asarray(kernel, np.float64).reshape(18, 5), compute_uv=False)
    np.testing.assert_allclose(mr.singular_values(kernel), s, rtol=1e-5)
    np.testing.assert_allclose(float(mr.spectral_norm(kernel)), s[0], rtol=1e-5)
    np.testing.assert_allclose(
        float(mr.stable_rank(kernel)), np.sum(s**2) / s[0] ** 2, rtol=1e-5
    )
    assert float(mr.stable_rank(jnp.zeros((4, 3)))) == 0.0
