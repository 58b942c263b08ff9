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


def _converged_sigma_rtol(matrix, v0):
    """The relative σ error that power iteration from ``v0`` stopped at a 1e-6 entry
    change or after 1000 iterations (``converged_power_iteration``) can leave.

    With ``v = c₁v₁ + s w`` and ``r = σ₂/σ₁``, one step shrinks ``tan θ`` by ``r²``, so
    the angle falls by ≥ ``(1−r²) s c₁`` while ``v`` moves by ≤ ``√n·1e-6``: at the stop
    ``s ≤ (π/2)√n·1e-6 / ((1−r²) c₁)`` and σ errs by ≤ ``s²/2`` (``c₁`` only grows).
    At the cap, component ``i`` has shrunk by ``ρᵢ²⁰⁰⁰`` (``ρᵢ = σᵢ/σ₁``), leaving
    ``½ Σᵢ (1−ρᵢ²) ρᵢ⁴⁰⁰⁰ (cᵢ/c₁)²``. Plus 1e-6 (8 eps) of float32 rounding.
    """
    m = np.asarray(matrix.astype(jnp.float32), np.float64)
    _, s, vt = np.linalg.svd(m)
    c = vt @ np.asarray(v0, np.float64)
    rho, ratio = s[1:] / s[0], c[1 : len(s)] / c[0]
    r = rho[0] if rho.size else 0.0
    stop = np.pi**2 / 8 * len(c) * 1e-12 / ((1 - r**2) ** 2 * c[0] ** 2)
    cap = 0.5 * np.sum((1 - rho**2) * rho**4000 * ratio**2)
    return 1e-6 + max(stop, cap)


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
    rtol = _converged_sigma_rtol(matrix, v0)
    np.testing.assert_allclose(float(sigma), _svd64(kernel)[0], rtol=rtol)


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


def _state_vector(fan_out):
    """A fixed generic unit vector: an integer rank-one ``K = a bᵀ`` can have
    ``bᵀ1 = 0`` exactly, where the all-ones start would leave ``Kv`` pure rounding."""
    v = np.random.default_rng(fan_out).standard_normal(fan_out)
    return (v / np.linalg.norm(v)).astype(np.float32)


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
        state = {"kernel": jnp.asarray(_state_vector(fan_out))}
        sn = jax.value_and_grad(lambda p, s=state: mr.spectral_norm_penalty(p, s)[0])(
            single
        )
        out[name] = (ed, sn)
    return out


def _seed_ed64(k):
    """The seed's ``sqrt((Mv·v)/(v·v))``, ``v = M³1``, ``M = KᵀK``, in float64."""
    v = jnp.ones(k.shape[1], jnp.float64)
    for _ in range(3):
        v = k.T @ (k @ v)
        v = v / jnp.linalg.norm(v)
    return jnp.sqrt(jnp.sum((k @ v) ** 2) / jnp.sum(v**2))


def _references64(kernel):
    """Float64 ``(ed, ∇ed, ½σ̂², ∇½σ̂²)`` of a kernel's matrix K, as ``_penalties_and_
    gradients`` defines them: ED by autodiff of the seed's formula; the spectral
    penalty from one step off the fixed unit ``v``: ``u = Kv/‖Kv‖``, ``σ̂ = ‖Kᵀu‖``,
    gradient ``σ̂ u v'ᵀ = u uᵀ K`` (Yoshida & Miyato, Alg. 1)."""
    k = np.asarray(linalg.as_matrix(kernel).astype(jnp.float32), np.float64)
    with jax.enable_x64(True):
        ed, ed_grad = jax.value_and_grad(_seed_ed64)(jnp.asarray(k))
        ed, ed_grad = float(ed), np.asarray(ed_grad)
    kv = k @ _state_vector(k.shape[1]).astype(np.float64)
    u = kv / np.linalg.norm(kv)
    sigma = np.linalg.norm(k.T @ u)
    return ed, ed_grad, 0.5 * sigma**2, np.outer(u, u @ k)


def _assert_close_in(dtype, got, want, err_msg, size=None):
    """``got`` (float32 maths rounded to ``dtype`` once per term of magnitude
    ``size``, default ``|want|``) against float64: eps·size + 1e-5 of the largest."""
    want = np.asarray(want, np.float64).reshape(np.shape(got))
    size = np.abs(want) if size is None else np.reshape(size, np.shape(got))
    tol = jnp.finfo(dtype).eps * size + 1e-5 * size.max()
    assert np.all(np.abs(np.asarray(got, np.float64) - want) <= tol), err_msg


def _check_penalties(params, kinds, spectral_range):
    out = _penalties_and_gradients(params)
    top = float(jnp.finfo(jnp.float32).max)
    for name, ((ed, ed_grad), (sn, sn_grad)) in out.items():
        kernel = params[name]["kernel"]
        for grad in (ed_grad, sn_grad):
            assert grad["kernel"].dtype == kernel.dtype, name
        if kinds[name] == "zero":
            assert float(ed) == 0.0 and float(sn) == 0.0, name
            for grad in (ed_grad, sn_grad):
                assert not np.any(np.asarray(grad["kernel"])), name
            continue
        ed64, ed_grad64, sn64, sn_grad64 = _references64(kernel)
        if np.isnan(ed64):
            # K1 = 0 exactly (a rank-one K with bᵀ1 = 0): the seed's M³1 is 0 and its
            # formula 0/0; float32 rounding of K/max|K| restarts the iteration.
            assert 0 <= float(ed) <= _svd64(kernel)[0] * (1 + 1e-5), name
            assert bool(jnp.all(jnp.isfinite(ed_grad["kernel"]))), name
        else:
            np.testing.assert_allclose(float(ed), ed64, rtol=1e-5, err_msg=name)
            # ED's gradient goes through three iterations: it is not σ's u vᵀ.
            _assert_close_in(kernel.dtype, ed_grad["kernel"], ed_grad64, name)
        _assert_close_in(kernel.dtype, sn_grad["kernel"], sn_grad64, name)
        # ½σ̂² beyond float32's range is inf, honestly; where it fits, it is exact.
        if sn64 < top * (1 - 1e-5):
            np.testing.assert_allclose(float(sn), sn64, rtol=1e-5, err_msg=name)
        else:
            assert sn64 <= top * (1 + 1e-5) or float(sn) == np.inf, name
        assert not spectral_range or sn64 < top, name


@SETTINGS
@given(tree=param_trees())
def test_penalties_and_gradients_match_float64_at_any_scale(tree):
    # ½σ² of a kernel of scale 2⁶⁶ exceeds float32's range: its value is inf,
    # honestly; its gradient σ u vᵀ must still be the float64 one.
    _check_penalties(*tree, spectral_range=False)


@SETTINGS
@given(tree=param_trees(top=60))
def test_spectral_penalty_matches_float64_where_half_sigma_squared_fits(tree):
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
    want = (q * expected) @ q.T
    # float32 Δ and eigh err by ~n·eps·r_max per eigenvalue; the draws' r ≥ r_max/10,
    # so ω = m/r errs by ≤ n·10·eps ≈ 7e-6 of max|ω| (1.1e-6 measured).
    np.testing.assert_allclose(omega, want, rtol=0, atol=1e-5 * np.abs(want).max())


TRANSFORMS = {
    "spectral_norm_regularization": mr.spectral_norm_regularization(0.1),
    "eigenvalue_decay": mr.eigenvalue_decay(0.1),
    # Re-solved on the second update, so both kinds of step run.
    "adareg": mr.adareg(0.1, update_every=1),
}
_UPDATES = {name: jax.jit(tx.update) for name, tx in TRANSFORMS.items()}
# Any valid state will do (unit vectors, identity precisions): one per transform,
# float32 whatever the params' dtype, built once so that each example compiles
# nothing but a new dtype's update. Rank-one kernels 1 vᵀ converge to the generic
# v = _state_vector (not the all-ones v, orthogonal to many integer kernels).
_RANK_ONE = {
    name: {
        "kernel": jnp.asarray(
            np.outer(np.ones(int(np.prod(shape[:-1]))), _state_vector(shape[-1]))
        ).reshape(shape),
        "bias": jnp.ones(shape[-1:]),
    }
    for name, shape in KERNEL_SHAPES.items()
}
_INITIAL_STATES = {name: tx.init(_RANK_ONE) for name, tx in TRANSFORMS.items()}


def _kinds(tree):
    return jax.tree.map(lambda a: (a.dtype, a.shape), tree)


def _power_term64(k, v, weight_by_sigma):
    """``σ u v'ᵀ = u uᵀ K`` (spectral) or ``u v'ᵀ`` (ED) after one step from ``v``."""
    kv = k @ np.asarray(v, np.float64)
    if not np.any(kv):  # a zero kernel: nothing to add
        return np.zeros_like(k)
    u = kv / np.linalg.norm(kv)
    term = np.outer(u, u @ k)
    return term if weight_by_sigma else term / np.linalg.norm(u @ k)


def _added_terms64(name, params, state, step):
    """Per kernel, what the transform adds at ``step`` (0 or 1), in float64."""
    out = {}
    for layer in KERNEL_SHAPES:
        k = np.asarray(
            linalg.as_matrix(params[layer]["kernel"]).astype(jnp.float32), np.float64
        )
        if name == "adareg":
            # Identities at count 0, one Alg. 1 sweep from them at count 1.
            d, p = k.shape
            o_in, o_out = np.eye(d), np.eye(p)
            if step:
                o_out = _inv_threshold64(k.T @ k, d, 0.1, 10.0)
                o_in = _inv_threshold64(k @ o_out @ k.T, p, 0.1, 10.0)
            out[layer] = 2 * 0.1 * o_in @ k @ o_out
        else:
            v = state.inner_state.vectors[layer]["kernel"]
            weighted = name == "spectral_norm_regularization"
            out[layer] = 0.1 * _power_term64(k, v, weighted)
    return out


@settings(SETTINGS, max_examples=20)
@given(tree=param_trees(dtypes=tuple(DTYPES)), name=st.sampled_from(list(TRANSFORMS)))
def test_transforms_add_the_float64_term_in_the_params_dtype_at_any_scale(tree, name):
    params, _ = tree
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.25, p.dtype), params)
    state = _INITIAL_STATES[name]
    kinds = _kinds(state)
    for step in range(2):
        terms = _added_terms64(name, params, state, step)
        updates, state = _UPDATES[name](grads, state, params)
        assert _kinds(state) == kinds
        assert _kinds(updates) == _kinds(params)
        for leaf in jax.tree.leaves(state):
            assert bool(jnp.all(jnp.isfinite(leaf)))
        for layer, term in terms.items():
            got = updates[layer]["kernel"]
            # g + term: the term and the sum each rounded once to the params' dtype.
            term = term.reshape(got.shape)
            _assert_close_in(got.dtype, got, 0.25 + term, layer, 0.25 + np.abs(term))
            np.testing.assert_array_equal(updates[layer]["bias"], grads[layer]["bias"])


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
            # The factored precisions never form float32 KᵀΩK (test_adareg holds
            # the same sweep to 1e-5): ≤ 1e-6 of max|Ω| measured, rank-deficient too.
            np.testing.assert_allclose(
                got, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=name
            )
