"""Property tests over shape, scale, rank and dtype: finite, non-negative, homogeneous.

Kernels are drawn over the shapes users have (1×n, n×1, square, tall, wide, a 4-D
conv kernel), scales 2⁻⁶⁶ … 2⁶⁶ (≈ 1e-20 … 1e20; powers of two keep low-precision
kernels exact, so the reference computation sees the same numbers), rank zero, one or
full, and dtypes float32, bfloat16 and float16 (whose range stops at 65504, so its
scales stay within 2⁻⁸ … 2⁸). References are float64 NumPy SVDs and norms.

Every jitted function is built once at module level: each new (shape, dtype) compiles
once and the few shapes below are reused by every example.
"""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from margin_regs import linalg

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None)

SHAPES = [(1, 7), (7, 1), (6, 6), (9, 4), (4, 9), (3, 3, 2, 5)]
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
EXPONENTS = {jnp.float32: 66, jnp.bfloat16: 66, jnp.float16: 8}


def _draw_matrix(draw, shape, dtype, rank, exponent):
    """A kernel of ``shape`` and ``rank`` at scale 2**exponent, exact in ``dtype``."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    fan_in, fan_out = int(np.prod(shape[:-1])), shape[-1]
    if rank == "zero":
        m = np.zeros((fan_in, fan_out))
    elif rank == "one":
        # Small integers: their products are exact in bfloat16's 8-bit mantissa, so
        # the rounded kernel is still exactly rank one.
        a = rng.integers(1, 4, fan_in) * rng.choice([-1, 1], fan_in)
        b = rng.integers(1, 4, fan_out) * rng.choice([-1, 1], fan_out)
        m = np.outer(a, b).astype(np.float64)
    else:
        m = rng.standard_normal((fan_in, fan_out))
    return jnp.asarray(np.ldexp(m, exponent).reshape(shape), dtype)


@st.composite
def kernels(draw, dtypes=tuple(DTYPES), ranks=("zero", "one", "full")):
    shape = draw(st.sampled_from(SHAPES))
    dtype = draw(st.sampled_from(dtypes))
    rank = draw(st.sampled_from(ranks))
    top = EXPONENTS[dtype]
    exponent = draw(st.integers(-top, top))
    return _draw_matrix(draw, shape, dtype, rank, exponent), rank


@st.composite
def unit_vectors(draw, n):
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    v = rng.standard_normal(n)
    return jnp.asarray(v / np.linalg.norm(v), jnp.float32)


def _svd64(kernel):
    m = np.asarray(linalg.as_matrix(kernel).astype(jnp.float32), np.float64)
    return np.linalg.svd(m, compute_uv=False)


_power_step = jax.jit(linalg.power_iteration_step, static_argnums=2)
_converged = jax.jit(linalg.converged_singular_triple)
_singular_values = jax.jit(linalg.singular_values)
_stable_rank = jax.jit(linalg.stable_rank)
_safe_norm = jax.jit(linalg.safe_norm)


@SETTINGS
@given(kernel_rank=kernels(), data=st.data(), n=st.sampled_from([1, 3]))
def test_power_iteration_is_finite_and_bracketed_by_the_exact_sigma(
    kernel_rank, data, n
):
    kernel, rank = kernel_rank
    matrix = linalg.as_matrix(kernel)
    v0 = data.draw(unit_vectors(matrix.shape[1]))
    sigma, u, v = _power_step(matrix, v0, n)

    for x in (sigma, u, v):
        assert x.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(x)))
    exact = _svd64(kernel)[0]
    k64 = np.asarray(matrix.astype(jnp.float32), np.float64)
    # ‖K v₀‖ ≤ σ̂ ≤ σ_max: each iteration is a Rayleigh step, monotone from below.
    lower = np.linalg.norm(k64 @ np.asarray(v0, np.float64))
    assert lower * (1 - 1e-5) <= float(sigma) <= exact * (1 + 1e-5)
    if rank == "zero":
        assert float(sigma) == 0.0
        np.testing.assert_array_equal(v, v0)
    else:
        np.testing.assert_allclose(float(jnp.linalg.norm(v)), 1.0, rtol=1e-5)
        np.testing.assert_allclose(float(jnp.linalg.norm(u)), 1.0, rtol=1e-5)
        # σ̂ = uᵀ K v: the triple is consistent, so σ̂ u vᵀ is the gradient of uᵀKv.
        np.testing.assert_allclose(
            float(u @ matrix.astype(jnp.float32) @ v), float(sigma), rtol=1e-4
        )
    if rank == "one":
        # A rank-one K is solved by a single iteration.
        np.testing.assert_allclose(float(sigma), exact, rtol=1e-5)


@SETTINGS
@given(
    kernel_rank=kernels(ranks=("one", "full")),
    data=st.data(),
    target=st.integers(-66, 66),
    mantissa=st.floats(-2.0, 2.0).filter(lambda m: abs(m) >= 1.0),
)
def test_power_iteration_is_absolutely_homogeneous(kernel_rank, data, target, mantissa):
    kernel, _ = kernel_rank
    matrix = linalg.as_matrix(kernel).astype(jnp.float32)
    # c·K lands at scale 2**target whatever K's scale: inside float32's range.
    exponent = int(np.frexp(float(jnp.max(jnp.abs(matrix))))[1])
    c = mantissa * 2.0 ** (target - exponent)
    scaled = jnp.asarray(c * np.asarray(matrix, np.float64), jnp.float32)
    v0 = data.draw(unit_vectors(matrix.shape[1]))

    base = _power_step(matrix, v0, 2)
    other = _power_step(scaled, v0, 2)
    np.testing.assert_allclose(other.sigma, abs(c) * base.sigma, rtol=1e-5)
    np.testing.assert_allclose(other.u, np.sign(c) * base.u, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(other.v, base.v, rtol=1e-4, atol=1e-6)


@SETTINGS
@given(kernel_rank=kernels(), data=st.data())
def test_exact_spectra_match_float64_svd(kernel_rank, data):
    kernel, rank = kernel_rank
    exact = _svd64(kernel)
    s = _singular_values(kernel)
    assert s.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(s))) and bool(jnp.all(s >= 0))
    np.testing.assert_allclose(s, exact, rtol=1e-4, atol=1e-5 * exact[0])

    r = _stable_rank(kernel)
    assert bool(jnp.isfinite(r))
    if rank == "zero":
        assert float(r) == 0.0
    else:
        expected = np.sum(exact**2) / exact[0] ** 2
        np.testing.assert_allclose(float(r), expected, rtol=1e-4)
        assert 1 - 1e-5 <= float(r) <= min(kernel.shape[-1], exact.size) + 1e-4


@SETTINGS
@given(
    kernel_rank=kernels(ranks=("one", "full"), dtypes=(jnp.float32,)), data=st.data()
)
def test_converged_triple_reaches_the_exact_sigma_at_any_scale(kernel_rank, data):
    kernel, _ = kernel_rank
    matrix = linalg.as_matrix(kernel)
    v0 = data.draw(unit_vectors(matrix.shape[1]))
    sigma, u, v = _converged(matrix, v0)
    assert bool(jnp.all(jnp.isfinite(u))) and bool(jnp.all(jnp.isfinite(v)))
    np.testing.assert_allclose(float(sigma), _svd64(kernel)[0], rtol=1e-3)


@SETTINGS
@given(
    exponent=st.integers(-100, 100),
    n=st.sampled_from([1, 5, 64]),
    seed=st.integers(0, 2**31 - 1),
    zero=st.booleans(),
)
def test_safe_norm_matches_float64_norm_and_has_finite_gradients(
    exponent, n, seed, zero
):
    x64 = (
        np.zeros(n)
        if zero
        else np.ldexp(np.random.default_rng(seed).standard_normal(n), exponent)
    )
    x = jnp.asarray(x64, jnp.float32)
    np.testing.assert_allclose(
        float(_safe_norm(x)), np.linalg.norm(np.asarray(x, np.float64)), rtol=1e-6
    )
    g = jax.grad(linalg.safe_norm)(x)
    assert bool(jnp.all(jnp.isfinite(g)))
