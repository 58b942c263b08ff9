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

import margin_regs as mr
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


# Penalties, inv_threshold and transforms: one params tree holds a kernel of every
# shape, each with its own rank and scale, so each dtype compiles once.

# Tall is covered by the conv kernel's (18, 5) view; square by the tests above.
KERNEL_SHAPES = {"row": (1, 7), "column": (7, 1), "wide": (4, 9), "conv": (3, 3, 2, 5)}
# bfloat16 stands for both half-precision dtypes here: each dtype compiles again,
# and both are cast to float32 on the same line.
HALF_DTYPES = (jnp.float32, jnp.bfloat16)


@st.composite
def param_trees(draw, dtypes=HALF_DTYPES, top=None, ranks=("zero", "one", "full")):
    """``(params, ranks)``: a kernel and a bias per shape in ``KERNEL_SHAPES``."""
    dtype = draw(st.sampled_from(dtypes))
    bound = EXPONENTS[dtype] if top is None else min(top, EXPONENTS[dtype])
    params, kinds = {}, {}
    for name, shape in KERNEL_SHAPES.items():
        kinds[name] = draw(st.sampled_from(ranks))
        exponent = draw(st.integers(-bound, bound))
        params[name] = {
            "kernel": _draw_matrix(draw, shape, dtype, kinds[name], exponent),
            "bias": jnp.full(shape[-1:], 0.5, dtype),
        }
    return params, kinds


def _kernels(params):
    return {name: {"kernel": layer["kernel"]} for name, layer in params.items()}


@jax.jit
def _penalties_and_gradients(params):
    """Per kernel: (value, gradient) of the ED and spectral penalties.

    ED runs 3 iterations, not its default 9: compiling the gradient through them
    costs ~0.4 s an iteration and kernel, and overflow does not depend on their
    number. The spectral state is a fixed unit vector: any one gives ½σ̂² ≤ ½σ².
    """
    out = {}
    for name, single in _kernels(params).items():
        ed = jax.value_and_grad(
            lambda p: mr.eigenvalue_decay_penalty(p, n_power_iterations=3)
        )(single)
        fan_out = single["kernel"].shape[-1]
        state = {"kernel": jnp.full((fan_out,), fan_out**-0.5, jnp.float32)}
        sn = jax.value_and_grad(lambda p, s=state: mr.spectral_norm_penalty(p, s)[0])(
            single
        )
        out[name] = (ed, sn)
    return out


def _check_penalties(params, kinds, spectral_range):
    out = _penalties_and_gradients(params)
    for name, ((ed, ed_grad), (sn, sn_grad)) in out.items():
        kernel = params[name]["kernel"]
        exact = _svd64(kernel)[0]
        for grad in (ed_grad, sn_grad):
            assert grad["kernel"].dtype == kernel.dtype, name
        assert bool(jnp.all(jnp.isfinite(sn_grad["kernel"]))), name
        assert bool(jnp.all(jnp.isfinite(ed_grad["kernel"]))), name
        assert bool(jnp.isfinite(ed)) and 0 <= float(ed) <= exact * (1 + 1e-5), name
        if kinds[name] == "zero":
            assert float(ed) == 0.0 and float(sn) == 0.0, name
        if kinds[name] == "one":
            np.testing.assert_allclose(float(ed), exact, rtol=1e-5, err_msg=name)
        if spectral_range:
            assert bool(jnp.isfinite(sn)), name
            assert 0 <= float(sn) <= 0.5 * exact**2 * (1 + 1e-5), name


@SETTINGS
@given(tree=param_trees())
def test_penalties_are_finite_with_finite_gradients_at_any_scale(tree):
    # ½σ² of a kernel of scale 2⁶⁶ exceeds float32's range: its value is inf,
    # honestly; its gradient σ u vᵀ must still be finite.
    _check_penalties(*tree, spectral_range=False)


@SETTINGS
@given(tree=param_trees(top=60))
def test_spectral_penalty_is_finite_where_half_sigma_squared_is(tree):
    _check_penalties(*tree, spectral_range=True)


@SETTINGS
@given(
    tree=param_trees(ranks=("one", "full"), top=54),
    shift=st.integers(-6, 6),
    negative=st.booleans(),
)
def test_penalties_are_homogeneous(tree, shift, negative):
    params, _ = tree
    c = (-1.0 if negative else 1.0) * 2.0**shift
    scaled = jax.tree.map(lambda p: (p * c).astype(p.dtype), params)
    base, other = _penalties_and_gradients(params), _penalties_and_gradients(scaled)
    for name in KERNEL_SHAPES:
        (ed, _), (sn, _) = base[name]
        (ed_c, _), (sn_c, _) = other[name]
        # Exact here: scaling by a power of two is exact in every dtype.
        np.testing.assert_allclose(float(ed_c), abs(c) * float(ed), rtol=1e-5)
        np.testing.assert_allclose(float(sn_c), c**2 * float(sn), rtol=1e-5)


@st.composite
def psd_matrices(draw):
    """``Δ = Q diag(r) Qᵀ`` of size 1…6, rank zero/one/full, scale 2⁻⁶⁰…2⁶⁰."""
    n = draw(st.sampled_from([1, 3, 6]))
    rank = draw(st.sampled_from([0, 1, n]))
    exponent = draw(st.integers(-60, 60))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    r = np.zeros(n)
    r[:rank] = np.ldexp(rng.uniform(0.1, 1.0, rank), exponent)
    return (q * r) @ q.T, n


_inv_threshold = jax.jit(mr.inv_threshold)


@SETTINGS
@given(delta_n=psd_matrices(), m_factor=st.sampled_from([0.5, 1.0, 4.0]))
def test_inv_threshold_matches_float64_and_respects_its_bounds(delta_n, m_factor):
    delta, n = delta_n
    m, lower, upper = m_factor * n, 1e-3, 1e3
    omega = np.asarray(_inv_threshold(jnp.asarray(delta, jnp.float32), m, lower, upper))
    assert omega.dtype == np.float32 and np.all(np.isfinite(omega))
    np.testing.assert_allclose(omega, omega.T, atol=1e-6 * upper)
    eig = np.linalg.eigvalsh(omega.astype(np.float64))
    # Rebuilding Q diag(ω) Qᵀ in float32 errs by ~eps·upper on every eigenvalue.
    slack = 1e-5 * upper
    assert eig.min() >= lower - slack and eig.max() <= upper + slack

    r, q = np.linalg.eigh(delta)
    # Eigenvalues that float32 cannot tell from 0 count as 0 (documented).
    positive = r > n * np.finfo(np.float32).eps * max(r.max(), 0.0)
    expected = np.clip(
        np.where(positive, m / np.where(positive, r, 1.0), upper), lower, upper
    )
    np.testing.assert_allclose(omega, (q * expected) @ q.T, atol=1e-4 * upper)


TRANSFORMS = {
    "spectral_norm_regularization": mr.spectral_norm_regularization(0.1),
    "eigenvalue_decay": mr.eigenvalue_decay(0.1),
    # Re-solved on the second update, so both kinds of step run.
    "adareg": mr.adareg(0.1, update_every=1),
}
_UPDATES = {name: jax.jit(tx.update) for name, tx in TRANSFORMS.items()}
# Any valid state will do (unit vectors, identity precisions): one per transform,
# float32 whatever the params' dtype, built once so that each example compiles
# nothing but a new dtype's update.
_ONES = {
    name: {"kernel": jnp.ones(shape), "bias": jnp.ones(shape[-1:])}
    for name, shape in KERNEL_SHAPES.items()
}
_INITIAL_STATES = {name: tx.init(_ONES) for name, tx in TRANSFORMS.items()}


def _kinds(tree):
    return jax.tree.map(lambda a: (a.dtype, a.shape), tree)


@settings(SETTINGS, max_examples=20)
@given(tree=param_trees(dtypes=tuple(DTYPES)), name=st.sampled_from(list(TRANSFORMS)))
def test_transforms_keep_dtypes_and_stay_finite_at_any_scale(tree, name):
    params, _ = tree
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.25, p.dtype), params)
    state = _INITIAL_STATES[name]
    kinds = _kinds(state)
    for _ in range(2):
        updates, state = _UPDATES[name](grads, state, params)
        assert _kinds(state) == kinds
        assert _kinds(updates) == _kinds(params)
        for leaf in jax.tree.leaves((updates, state)):
            assert bool(jnp.all(jnp.isfinite(leaf)))


def _inv_threshold64(delta, m, lower, upper):
    r, q = np.linalg.eigh(delta)
    n = delta.shape[0]
    positive = r > n * np.finfo(np.float32).eps * max(r.max(), 0.0)
    omega = np.where(positive, m / np.where(positive, r, 1.0), upper)
    return (q * np.clip(omega, lower, upper)) @ q.T


_update_precisions = jax.jit(
    lambda p, prec: mr.adareg_update_precisions(p, prec, lower=1e-3, upper=1e3)
)


@SETTINGS
@given(tree=param_trees(top=60))
def test_adareg_precisions_match_a_float64_sweep_at_any_scale(tree):
    """One sweep from identities, against Alg. 1, lines 3–4, in float64.

    Scales up to 2⁶⁰ (σ ≈ 1e19): beyond, ``KᵀK`` overflows float32 (reported).
    """
    params, _ = tree
    precisions = _update_precisions(params, mr.init_adareg_precisions(params))
    for name in KERNEL_SHAPES:
        k = np.asarray(
            linalg.as_matrix(params[name]["kernel"]).astype(jnp.float32), np.float64
        )
        d, p = k.shape
        omega_out = _inv_threshold64(k.T @ k, d, 1e-3, 1e3)
        omega_in = _inv_threshold64(k @ omega_out @ k.T, p, 1e-3, 1e3)
        for got, want in [
            (precisions.omega_out[name]["kernel"], omega_out),
            (precisions.omega_in[name]["kernel"], omega_in),
        ]:
            got = np.asarray(got, np.float64)
            assert np.all(np.isfinite(got)), name
            # float32 KᵀΩK leaks upper·eps·σ² from Ω's clipped null space into
            # the next solve: rank-deficient kernels agree to ~2e-3 of max|Ω|.
            np.testing.assert_allclose(
                got, want, atol=1e-2 * np.abs(want).max(), err_msg=name
            )
