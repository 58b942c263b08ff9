"""AdaReg: INVTHRESHOLD against a convex solver, the block-coordinate sweep against
float64 numpy, and the transform against the penalty's autodiff gradient."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import margin_regs as mr

# ---------------------------------------------------------------- float64 references


def _objective(omega, a, m):
    """tr(ΩA) − m log det Ω in float64."""
    omega = np.asarray(omega, np.float64)
    sign, logdet = np.linalg.slogdet(omega)
    assert sign > 0
    return float(np.trace(omega @ a) - m * logdet)


def _project(x, lower, upper):
    """Euclidean projection onto {lower·I ⪯ Ω ⪯ upper·I} (Zhao et al., Thm. 1)."""
    w, q = np.linalg.eigh(0.5 * (x + x.T))
    return (q * np.clip(w, lower, upper)) @ q.T


def _pgd(a, m, lower, upper, n_steps=20000):
    """Accelerated projected gradient descent on tr(ΩA) − m log det Ω, float64.

    The gradient A − mΩ⁻¹ is (m / lower²)-Lipschitz on the feasible set; FISTA
    momentum with restarts converges in a few thousand steps at (upper/lower)² = 1e4.
    """
    omega = np.eye(a.shape[0]) * np.sqrt(lower * upper)
    y, t, step = omega, 1.0, lower**2 / m
    for _ in range(n_steps):
        new = _project(y - step * (a - m * np.linalg.inv(y)), lower, upper)
        t_new = 0.5 * (1 + np.sqrt(1 + 4 * t * t))
        if np.sum((y - new) * (new - omega)) > 0:  # restart when momentum overshoots
            t_new, y = 1.0, new
        else:
            y = new + (t - 1) / t_new * (new - omega)
        omega, t = new, t_new
    return omega


def _assert_optimal(omega, a, m, lower, upper, rtol=1e-4):
    """First-order optimality over the spectrahedron, checked by brute force.

    Ω* minimises the convex objective iff tr(G Ω*) ≤ tr(G Z) for every feasible Z,
    with G = A − m Ω*⁻¹; the minimum of tr(G Z) over feasible Z is
    Σᵢ min(lower·gᵢ, upper·gᵢ) over the eigenvalues gᵢ of G. By convexity the
    excess tr(G Ω) − min_Z tr(G Z) bounds f(Ω) − f*, which must be at rounding level.
    """
    omega = np.asarray(omega, np.float64)
    # A float32 matrix with eigenvalues spread over [lower, upper] holds its small
    # eigenvalues only to about n·eps·upper; check that it is that close to a
    # feasible matrix, and that this matrix is optimal.
    feasible = _project(omega, lower, upper)
    assert (
        np.abs(omega - feasible).max() <= 8 * len(a) * np.finfo(np.float32).eps * upper
    )
    omega = feasible
    g = a - m * np.linalg.inv(omega)
    gw = np.linalg.eigvalsh(0.5 * (g + g.T))
    best = np.sum(np.minimum(lower * gw, upper * gw))
    scale = abs(_objective(omega, a, m)) + m * len(a)
    assert np.trace(g @ omega) - best <= rtol * scale


def _psd(rng, eigenvalues):
    q, _ = np.linalg.qr(rng.normal(size=(len(eigenvalues), len(eigenvalues))))
    return (q * np.asarray(eigenvalues, np.float64)) @ q.T


def _random_precision(rng, d, p, low, high, lower, upper):
    """A feasible (Ω_in, Ω_out) with eigenvalues drawn from [low, high], float32."""

    def draw(n):
        omega = _project(_psd(rng, rng.uniform(low, high, n)), lower, upper)
        return jnp.asarray(omega, jnp.float32)

    return draw(d), draw(p)


def _at(precisions, *path):
    """The dense (Ω_in, Ω_out) of the kernel at ``path``."""
    o_in, o_out = precisions.omega_in, precisions.omega_out
    for key in path:
        o_in, o_out = o_in[key], o_out[key]
    return o_in, o_out


def _sweep64(k, omega_in, omega_out, lower, upper):
    """Alg. 1, lines 3–4, in float64 numpy with the paper's m (d for Ω_out).

    Dense Gram matrices and ``eigh``, as the paper writes it; a zero eigenvalue
    (float64 noise) maps to ``upper``.
    """
    d, p = k.shape

    def inv_threshold(delta, m):
        r, q = np.linalg.eigh(0.5 * (delta + delta.T))
        r = np.maximum(r, 0.0)
        zero = r <= len(r) * np.finfo(np.float64).eps * r.max()
        w = np.clip(np.where(zero, upper, m / np.where(zero, 1.0, r)), lower, upper)
        return (q * w) @ q.T

    omega_out = inv_threshold(k.T @ omega_in @ k, d)
    omega_in = inv_threshold(k @ omega_out @ k.T, p)
    return omega_in, omega_out


def _full_objective(k, omega_in, omega_out):
    d, p = k.shape
    k = np.asarray(k, np.float64)
    omega_in = np.asarray(omega_in, np.float64)
    omega_out = np.asarray(omega_out, np.float64)
    return (
        np.trace(omega_in @ k @ omega_out @ k.T)
        - d * np.linalg.slogdet(omega_out)[1]
        - p * np.linalg.slogdet(omega_in)[1]
    )


def _relative_error(got, want):
    """max |got − want| / max |want|, in float64."""
    want = np.asarray(want, np.float64)
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def _assert_added_term(added, kernel, precision, coeff, slack=0.0):
    """``added`` is 2·coeff·Ω_in K Ω_out, as float64 computes it, within the
    rounding bound of a float32 triple product, γ·|Ω_in||K||Ω_out| with γ = 4n·eps
    (Ω_in holds entries up to ``upper`` that cancel in Ω_in K), plus ``slack``."""
    k = np.asarray(mr.as_matrix(kernel), np.float64)
    o_in, o_out = (np.asarray(x, np.float64) for x in precision)
    exact = 2 * coeff * o_in @ k @ o_out
    tol = 2 * abs(coeff) * np.abs(o_in) @ np.abs(k) @ np.abs(o_out)
    tol *= 4 * len(o_in) * np.finfo(np.float32).eps
    tol += 2 * np.finfo(np.float32).eps * np.abs(exact) + slack
    err = np.abs(np.asarray(added, np.float64).reshape(k.shape) - exact)
    assert np.all(err <= tol), float(np.max(err / tol))


inv_threshold = jax.jit(mr.inv_threshold, static_argnums=(1, 2, 3))

# mr.adareg's default box
LOWER, UPPER = 0.1, 10.0

# ------------------------------------------------------------------- INVTHRESHOLD


SPECTRA = {
    # m / r = 4 / r crosses both bounds [0.1, 10]: 1000, 20 above, 0.07, 0.01 below
    "beyond_both_bounds": [4e-3, 0.2, 0.5, 2.0, 60.0, 400.0],
    "singular": [0.0, 0.0, 0.3, 1.0, 5.0, 20.0],
    "inside_bounds": [0.7, 1.0, 1.5, 2.0, 3.0, 5.0],
    "zero": [0.0] * 6,
}


@pytest.mark.parametrize("name", sorted(SPECTRA))
def test_inv_threshold_solves_the_convex_subproblem(name, rng):
    m, lower, upper = 4.0, 0.1, 10.0
    a = _psd(rng, SPECTRA[name])
    omega = np.asarray(inv_threshold(jnp.asarray(a, jnp.float32), m, lower, upper))
    _assert_optimal(omega, a, m, lower, upper)
    # the float64 projected-gradient solution is the same matrix
    np.testing.assert_allclose(omega, _pgd(a, m, lower, upper), atol=2e-4 * upper)
    # and no random feasible point does better
    best = _objective(omega, a, m)
    for _ in range(50):
        z = _project(rng.normal(size=a.shape) * upper, lower, upper)
        assert best <= _objective(z, a, m) + 1e-5 * abs(best)


def test_inv_threshold_extreme_bounds_and_scales(rng):
    # The paper's default bounds [1e-3, 1e3] on a rank-4 Gram matrix A = K Kᵀ of a
    # (30, 4) kernel, as K Ω_out Kᵀ of a softmax layer is; m / s² = 4 / s² is below
    # the lower bound, inside (twice) and above the upper bound, and the 26-dim null
    # space of A must get the upper bound.
    m, lower, upper = 4.0, 1e-3, 1e3
    u, _ = np.linalg.qr(rng.normal(size=(30, 4)))
    v, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    s = np.array([100.0, 10.0, 1.0, 0.01])
    k = (u * s) @ v.T
    a = k @ k.T
    # the optimum built from the SVD of K in float64, certified by the KKT check
    want = (u * np.clip(m / s**2, lower, upper)) @ u.T + upper * (np.eye(30) - u @ u.T)
    _assert_optimal(want, a, m, lower, upper, rtol=1e-9)
    omega = np.asarray(inv_threshold(jnp.asarray(a, jnp.float32), m, lower, upper))
    assert np.all(np.isfinite(omega))
    # float32 eigh of a Gram matrix of condition 1e4 and a dense Ω spanning 1e-3 …
    # 1e3: small relative error overall, a few % on the lower-bound direction
    assert np.linalg.norm(omega - want) <= 2e-4 * np.linalg.norm(want)
    for i, rtol in enumerate([5e-2, 1e-3, 1e-3, 1e-5]):
        np.testing.assert_allclose(
            u[:, i] @ omega @ u[:, i], u[:, i] @ want @ u[:, i], rtol=rtol
        )
    null = (np.eye(30) - u @ u.T) @ rng.normal(size=30)
    null /= np.linalg.norm(null)
    np.testing.assert_allclose(null @ omega @ null, upper, rtol=1e-5)


def test_inv_threshold_zero_threshold_is_the_eigh_noise_floor():
    # 0.05 next to 1e4 is 5e-6 · max r: far above float32 eigh's noise (≤ 2 eps ·
    # max r), so it is a real eigenvalue, m / r = 200, not a zero mapped to upper.
    delta = np.zeros((64, 64))
    delta[0, 0], delta[1, 1] = 1e4, 0.05
    omega = np.asarray(mr.inv_threshold(jnp.asarray(delta, jnp.float32), 10, 1e-3, 1e3))
    np.testing.assert_allclose(np.diag(omega)[:3], [1e-3, 200.0, 1e3], rtol=1e-5)
    np.testing.assert_allclose(np.diag(omega)[2:], 1e3, rtol=1e-6)
    np.testing.assert_allclose(omega - np.diag(np.diag(omega)), 0, atol=1e-4)


def test_inv_threshold_batches_and_symmetrises(rng):
    a = np.stack([_psd(rng, rng.uniform(0, 5, size=5)) for _ in range(3)])
    skewed = a + np.triu(rng.normal(size=(5, 5)), 1) * 1e-3  # not quite symmetric
    batched = np.asarray(
        inv_threshold(jnp.asarray(skewed, jnp.float32), 2.0, 0.1, 10.0)
    )
    for b in range(3):
        single = inv_threshold(jnp.asarray(skewed[b], jnp.float32), 2.0, 0.1, 10.0)
        np.testing.assert_allclose(batched[b], single, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(batched[b], batched[b].T, atol=1e-5)
    assert batched.dtype == np.float32


@pytest.mark.parametrize(
    "args",
    [
        (np.ones((3, 4)), 1.0, 0.1, 1.0),
        (np.eye(3), 0.0, 0.1, 1.0),
        (np.eye(3), 1.0, 2.0, 1.0),
    ],
)
def test_inv_threshold_rejects_bad_input(args):
    with pytest.raises(ValueError, match="inv_threshold"):
        mr.inv_threshold(*args)


# ------------------------------------------------------- precisions and penalty


@pytest.fixture(scope="module")
def params():
    rng = np.random.default_rng(1)
    return {
        "a": {"kernel": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)},
        "b": {"kernel": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)},
        "conv": {
            "kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 5)) * 0.3, jnp.float32)
        },
        "bias": jnp.asarray(rng.normal(size=4), jnp.float32),
    }


update_precisions = jax.jit(
    mr.adareg_update_precisions, static_argnames=("lower", "upper", "mask")
)


def test_init_is_identity_and_penalty_is_l2(params):
    prec = mr.init_adareg_precisions(params)
    assert isinstance(prec.omega_in["bias"], optax.MaskedNode)
    assert isinstance(prec.omega_out["bias"], optax.MaskedNode)
    assert _at(prec, "conv", "kernel")[0].shape == (18, 18)
    assert _at(prec, "conv", "kernel")[1].shape == (5, 5)
    l2 = sum(float(np.sum(np.square(params[n]["kernel"]))) for n in ("a", "b", "conv"))
    np.testing.assert_allclose(mr.adareg_penalty(params, prec), l2, rtol=1e-5)


def test_sweep_matches_float64_alg1_with_papers_m(params, rng):
    lower, upper = 1e-2, 1e2
    # start from random feasible precisions, not identities, to test the order
    draws = {
        n: _random_precision(
            rng, *mr.as_matrix(params[n]["kernel"]).shape, 0.1, 5.0, lower, upper
        )
        for n in ("a", "b", "conv")
    }
    init = mr.init_adareg_precisions(params)
    prec = mr.AdaRegPrecisions.from_dense(
        {**init.omega_in, **{n: {"kernel": d[0]} for n, d in draws.items()}},
        {**init.omega_out, **{n: {"kernel": d[1]} for n, d in draws.items()}},
    )
    new = update_precisions(params, prec, lower=lower, upper=upper)
    for name in ("a", "b", "conv"):
        k = np.asarray(mr.as_matrix(params[name]["kernel"]), np.float64)
        old_in, old_out = (np.asarray(x, np.float64) for x in draws[name])
        want_in, want_out = _sweep64(k, old_in, old_out, lower, upper)
        got_in, got_out = _at(new, name, "kernel")
        np.testing.assert_allclose(got_out, want_out, rtol=2e-4, atol=2e-4 * upper)
        np.testing.assert_allclose(got_in, want_in, rtol=2e-4, atol=2e-4 * upper)
        # each block is the exact minimiser given the other (the paper's m)
        _assert_optimal(got_out, k.T @ old_in @ k, k.shape[0], lower, upper)
        got_out = np.asarray(got_out, np.float64)
        _assert_optimal(got_in, k @ got_out @ k.T, k.shape[1], lower, upper)
    assert isinstance(new.omega_in["bias"], optax.MaskedNode)


@pytest.mark.parametrize("shape", [(7, 3), (3, 7), (5, 5)])
def test_block_coordinate_sweeps_never_increase_the_objective(shape, rng):
    lower, upper = 1e-3, 1e3
    k = jnp.asarray(rng.normal(size=shape), jnp.float32)
    params = {"k": k}
    o_in, o_out = _random_precision(rng, *shape, 0.01, 50.0, lower, upper)
    prec = mr.AdaRegPrecisions.from_dense({"k": o_in}, {"k": o_out})
    values = [_full_objective(np.asarray(k), *_at(prec, "k"))]
    for _ in range(4):
        prec = update_precisions(params, prec, lower=lower, upper=upper)
        values.append(_full_objective(np.asarray(k), *_at(prec, "k")))
    for before, after in itertools.pairwise(values):
        assert after <= before + 1e-5 * abs(before)
    assert values[1] < values[0]


def test_nonfinite_kernel_keeps_old_precisions(params):
    prec = mr.init_adareg_precisions(params)
    bad = {**params, "a": {"kernel": params["a"]["kernel"].at[0, 0].set(jnp.nan)}}
    new = update_precisions(bad, prec, lower=1e-3, upper=1e3)
    np.testing.assert_array_equal(new.omega_in["a"]["kernel"], np.eye(6))
    assert not np.allclose(new.omega_in["b"]["kernel"], np.eye(6))


# -------------------------------------------------------------------- transform


def _zero_like(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def test_transform_adds_the_penalty_gradient(params):
    coeff = 0.3
    tx = mr.adareg(coeff, update_every=1)
    step = jax.jit(tx.update)
    state = tx.init(params)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
    precisions = mr.init_adareg_precisions(params)
    penalty_grad = jax.jit(jax.grad(lambda p, pr: coeff * mr.adareg_penalty(p, pr)))
    for _ in range(3):
        # from step 1 on the precisions are re-solved before the gradient term
        if int(state.inner_state.count) > 0:
            precisions = update_precisions(params, precisions, lower=LOWER, upper=UPPER)
        updates, state = step(grads, state, params)
        used = state.inner_state.precisions
        want = penalty_grad(params, used)
        for name in ("a", "b", "conv"):
            added = updates[name]["kernel"] - grads[name]["kernel"]
            # g + term − g rounds to eps·|g| = eps·0.5
            eps = float(np.finfo(np.float32).eps)
            pair = _at(used, name, "kernel")
            _assert_added_term(added, params[name]["kernel"], pair, coeff, eps)
            _assert_added_term(
                want[name]["kernel"], params[name]["kernel"], pair, coeff
            )
            # The same re-solve on the same inputs (bit-equal here): only XLA's
            # fusion may differ, by float32 rounding.
            assert _relative_error(pair[0], _at(precisions, name, "kernel")[0]) <= 1e-6
        np.testing.assert_array_equal(updates["bias"], grads["bias"])


def test_precisions_change_only_on_update_steps(params):
    tx = optax.chain(mr.adareg(0.1, update_every=3), optax.sgd(0.05))
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    current = params
    grads = jax.tree.map(lambda x: jnp.ones_like(x) * 0.2, params)
    history = []
    for t in range(8):
        before = state[0].inner_state.precisions
        updates, state = step(grads, state, current)
        after = state[0].inner_state.precisions
        if t in (3, 6):
            want = update_precisions(current, before, lower=LOWER, upper=UPPER)
            np.testing.assert_allclose(
                after.omega_out["a"]["kernel"], want.omega_out["a"]["kernel"], rtol=1e-5
            )
            assert not np.allclose(
                after.omega_out["a"]["kernel"], before.omega_out["a"]["kernel"]
            )
        else:
            jax.tree.map(np.testing.assert_array_equal, after, before)
        history.append(int(state[0].inner_state.count))
        current = optax.apply_updates(current, updates)
    assert history == list(range(1, 9))


def test_schedule_coeff_and_errors(params):
    tx = mr.adareg(lambda count: 0.1 * (count + 1), update_every=100)
    state = tx.init(params)
    zeros = _zero_like(params)
    first, state = tx.update(zeros, state, params)
    second, _ = tx.update(zeros, state, params)
    k = params["a"]["kernel"]
    np.testing.assert_allclose(first["a"]["kernel"], 2 * 0.1 * k, rtol=1e-6)
    np.testing.assert_allclose(second["a"]["kernel"], 2 * 0.2 * k, rtol=1e-6)
    with pytest.raises(ValueError, match="adareg"):
        tx.update(zeros, state)
    for bad in (0, 2.5, True):
        with pytest.raises((TypeError, ValueError), match="update_every"):
            mr.adareg(0.1, update_every=bad)
    with pytest.raises(ValueError, match="lower"):
        mr.adareg(0.1, lower=2.0, upper=1.0)
    with pytest.raises(ValueError, match="same mask"):
        mr.adareg_penalty(
            params, mr.init_adareg_precisions(params, mask=mr.mask_by_path("^a/"))
        )
    with pytest.raises(ValueError, match="bias"):
        mr.adareg(0.1, mask=lambda p: jax.tree.map(lambda _: True, p)).init(params)


def test_bfloat16_conv_kernel_keeps_dtype_and_shape():
    params = {"conv": jnp.ones((3, 3, 2, 4), jnp.bfloat16) * 0.1}
    tx = mr.adareg(0.1, update_every=1)
    step = jax.jit(tx.update)
    state = tx.init(params)
    for _ in range(2):  # the second step takes the re-solve branch of lax.cond
        updates, state = step(_zero_like(params), state, params)
    assert updates["conv"].dtype == jnp.bfloat16 and updates["conv"].shape == (
        3,
        3,
        2,
        4,
    )
    o_in, _ = _at(state.inner_state.precisions, "conv")
    assert o_in.dtype == jnp.float32 and o_in.shape == (18, 18)
    want = update_precisions(
        params, mr.init_adareg_precisions(params), lower=LOWER, upper=UPPER
    )
    term = 0.2 * mr.as_matrix(params["conv"]).astype(jnp.float32)
    term = want.omega_in["conv"] @ term @ want.omega_out["conv"]
    np.testing.assert_allclose(
        np.asarray(updates["conv"], np.float32).reshape(18, 4),
        term,
        rtol=2e-2,
        atol=1e-3,
    )


def test_inject_hyperparams_with_static_args(params):
    mask = mr.mask_by_path(r"^a/")
    tx = optax.inject_hyperparams(mr.adareg, static_args=("update_every", "mask"))(
        coeff=0.1, lower=1e-3, upper=1e3, update_every=2, mask=mask
    )
    step = jax.jit(tx.update)
    state = tx.init(params)
    zeros = _zero_like(params)
    u0, state = step(zeros, state, params)
    np.testing.assert_allclose(
        u0["a"]["kernel"], 0.2 * params["a"]["kernel"], rtol=1e-6
    )
    np.testing.assert_array_equal(u0["b"]["kernel"], 0.0)
    state.hyperparams["coeff"] = jnp.asarray(1.0)
    u1, state = step(zeros, state, params)
    np.testing.assert_allclose(
        u1["a"]["kernel"], 2.0 * params["a"]["kernel"], rtol=1e-6
    )
    u2, state = step(zeros, state, params)  # count 2: re-solved
    prec = update_precisions(
        params,
        mr.init_adareg_precisions(params, mask=mask),
        lower=1e-3,
        upper=1e3,
        mask=mask,
    )
    used = _at(state.inner_state.inner_state.precisions, "a", "kernel")
    # The same re-solve on the same inputs: equal to float32 rounding (bit-equal here).
    assert _relative_error(used[0], prec.omega_in["a"]["kernel"]) <= 1e-6
    _assert_added_term(u2["a"]["kernel"], params["a"]["kernel"], used, 1.0)


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        hidden = nn.relu(nn.Dense(5)(x))  # Dense_0
        return nn.Dense(3)(hidden)  # Dense_1, the softmax layer


def test_flax_linen_last_layer(rng):
    model = _MLP()
    x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, size=8))
    variables = model.init(jax.random.key(0), x)
    mask = mr.mask_by_path(r"Dense_1/kernel$")
    tx = optax.chain(mr.adareg(0.01, update_every=2, mask=mask), optax.sgd(0.1))
    state = tx.init(variables)

    def loss(v):
        return optax.softmax_cross_entropy_with_integer_labels(
            model.apply(v, x), y
        ).mean()

    @jax.jit
    def train_step(v, s):
        g = jax.grad(loss)(v)
        u, s = tx.update(g, s, v)
        return optax.apply_updates(v, u), s, g, u

    for _ in range(3):
        old = variables
        variables, state, grads, updates = train_step(variables, state)
    prec = state[0].inner_state.precisions
    assert isinstance(prec.omega_in["params"]["Dense_0"]["kernel"], optax.MaskedNode)
    assert _at(prec, "params", "Dense_1", "kernel")[0].shape == (5, 5)
    # step 2 re-solved from `old` and added the penalty gradient to Dense_1 only
    want_prec = update_precisions(
        old,
        mr.init_adareg_precisions(old, mask=mask),
        lower=LOWER,
        upper=UPPER,
        mask=mask,
    )
    pen = jax.grad(lambda v: 0.01 * mr.adareg_penalty(v, want_prec, mask=mask))(old)
    np.testing.assert_allclose(
        updates["params"]["Dense_1"]["kernel"],
        -0.1
        * (grads["params"]["Dense_1"]["kernel"] + pen["params"]["Dense_1"]["kernel"]),
        rtol=1e-4,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        updates["params"]["Dense_0"]["kernel"],
        -0.1 * grads["params"]["Dense_0"]["kernel"],
        rtol=1e-6,
    )


def test_nnx_optimizer(rng):
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    coeff, lr = 0.05, 0.1
    optimizer = nnx.Optimizer(
        model,
        optax.chain(
            mr.adareg(coeff, update_every=1, mask=mr.mask_by_path("kernel$")),
            optax.sgd(lr),
        ),
        wrt=nnx.Param,
    )

    def loss(m):
        return jnp.mean(m(x) ** 2)

    precisions = mr.init_adareg_precisions({"kernel": model.kernel[...]})
    for t in range(2):
        k, b = model.kernel[...], model.bias[...]
        if t > 0:
            precisions = update_precisions(
                {"kernel": k}, precisions, lower=LOWER, upper=UPPER
            )
        grads = nnx.grad(loss)(model)
        g = grads["kernel"][...]
        optimizer.update(model, grads)
        o_in, o_out = _at(precisions, "kernel")
        want = k - lr * (g + 2 * coeff * o_in @ k @ o_out)
        # Ω_in has entries up to 1e3 that cancel in Ω_in K: float32 leaves ~1e-4·lr·coeff
        np.testing.assert_allclose(model.kernel[...], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            model.bias[...], b - lr * grads["bias"][...], rtol=1e-6
        )


def test_after_a_sweep_the_gradient_is_the_log_volume_gradient(rng):
    # For a full-column-rank K (fan_in ≥ fan_out) whose Ω_in is not clipped on the
    # range of K, Ω_in K Ω_out = p·K(KᵀK)⁻¹ after any sweep: the term AdaReg adds is
    # the gradient of coeff·p·log det(KᵀK), whatever Ω_out is (module docstring).
    k = np.linalg.qr(rng.normal(size=(6, 3)))[0] * np.array([2.0, 1.0, 0.5])
    params = {"k": jnp.asarray(k, jnp.float32)}
    coeff, p = 0.1, 3
    tx = mr.adareg(coeff, update_every=1)
    state, step = tx.init(params), jax.jit(tx.update)
    for _ in range(3):
        added, state = step(_zero_like(params), state, params)
    want = 2 * coeff * p * k @ np.linalg.inv(k.T @ k)
    np.testing.assert_allclose(added["k"], want, rtol=1e-3, atol=1e-4)


# ------------------------------------- float32 against float64 Alg. 1 (issue 17)

# The library's default box and the paper's experiments' box.
BOXES = [(LOWER, UPPER), (1e-3, 1e3)]

# Bounds traced, not static: one compilation per kernel shape serves every box.
_traced_sweep = jax.jit(
    lambda p, prec, lower, upper: mr.adareg_update_precisions(
        p, prec, lower=lower, upper=upper
    )
)
_penalty_and_grad = jax.jit(jax.value_and_grad(mr.adareg_penalty))


def _random_start(rng, d, p, lower, upper):
    """Random SPD precisions, as float32 factors, and the same matrices in float64
    (exactly the operators the factors hold, so both sides start at one point).

    Eigenvalues log-uniform over the box's part of [0.1, 10], two decades around
    the identity start. Spread wider (condition 1e3 and more), the first sweeps'
    ``Ω_in^½ K`` is a graded matrix whose small singular vectors a float32 SVD
    resolves only normwise: measured up to 3e-5 on 10 × 64 over [0.03, 30].
    """
    lower, upper = max(lower, 0.1), min(upper, 10.0)

    def factor(n):
        q = np.linalg.qr(rng.normal(size=(n, n)))[0].astype(np.float32)
        c = np.exp(rng.uniform(np.log(lower), np.log(upper), n)).astype(np.float32)
        return q, c, (q.astype(np.float64) * c) @ q.T.astype(np.float64)

    q_in, c_in, dense_in = factor(d)
    q_out, c_out, dense_out = factor(p)
    zeros = np.zeros((d, p), np.float32)
    fields = (q_in, c_in, q_out, c_out, zeros, zeros)
    prec = mr.AdaRegPrecisions(*({"k": jnp.asarray(x)} for x in fields))
    return prec, dense_in, dense_out


@pytest.mark.parametrize("shape", [(392, 10), (500, 10), (128, 32), (10, 64)], ids=str)
def test_float32_sweeps_and_penalty_gradient_match_float64_alg1(shape):
    # The penalty and its jax.grad after each of 5 sweeps, from identities and from
    # random SPD starts, at both boxes: within 1e-5 of float64 Alg. 1. (Dense float32
    # precisions were off by 2e-2 to 0.5 here at [1e-3, 1e3]: Ω_in's upper on the
    # null space of Kᵀ multiplied the rounding noise of (I − P)K.)
    rng = np.random.default_rng(shape[0] + shape[1])
    k = (rng.normal(size=shape) / np.sqrt(shape[0])).astype(np.float32)
    params, k64 = {"k": jnp.asarray(k)}, k.astype(np.float64)
    for lower, upper in BOXES:
        starts = {
            "identity": (mr.init_adareg_precisions(params), *map(np.eye, shape)),
            "spd": _random_start(rng, *shape, lower, upper),
        }
        for start, (prec, o_in, o_out) in starts.items():
            for sweep in range(1, 6):
                o_in, o_out = _sweep64(k64, o_in, o_out, lower, upper)
                prec = _traced_sweep(params, prec, lower, upper)
                value, grad = _penalty_and_grad(params, prec)
                where = f"{start}, [{lower}, {upper}], sweep {sweep}"
                assert _relative_error(grad["k"], 2 * o_in @ k64 @ o_out) <= 1e-5, where
                want = np.trace(o_in @ k64 @ o_out @ k64.T)
                assert abs(float(value) / want - 1) <= 1e-5, where
                assert _relative_error(prec.omega_in["k"], o_in) <= 1e-5, where
                assert _relative_error(prec.omega_out["k"], o_out) <= 1e-5, where


@pytest.mark.parametrize("shape", [(392, 10), (10, 64)], ids=str)
def test_transform_term_after_a_resolve_matches_float64(shape, rng):
    coeff, lower, upper = 0.01, 1e-3, 1e3
    tx = mr.adareg(coeff, lower=lower, upper=upper, update_every=2)
    step = jax.jit(tx.update)
    k = (rng.normal(size=shape) / np.sqrt(shape[0])).astype(np.float32)
    moved = k + (1e-2 * rng.normal(size=shape) / np.sqrt(shape[0])).astype(np.float32)
    state, zeros = tx.init({"k": k}), {"k": jnp.zeros(shape)}
    for _ in range(2):  # counts 0 and 1 use the identities
        _, state = step(zeros, state, {"k": k})
    o_in, o_out = _sweep64(k.astype(np.float64), *map(np.eye, shape), lower, upper)
    # count 2 re-solves at K; count 3 keeps those precisions while K has moved:
    # the change since the re-solve carries Ω's upper on the null space
    for kernel in (k, moved):
        added, state = step(zeros, state, {"k": kernel})
        want = 2 * coeff * o_in @ kernel.astype(np.float64) @ o_out
        assert _relative_error(added["k"], want) <= 1e-5


def test_huge_kernel_gets_the_lower_bound_not_stale_precisions(rng):
    # Entries ~2⁷⁰: KᵀK overflows float32 (it froze the precisions at identities).
    lower, upper = 1e-3, 1e3
    k = (rng.normal(size=(20, 5)) * 2.0**70).astype(np.float32)
    params = {"k": jnp.asarray(k)}
    prec = _traced_sweep(params, mr.init_adareg_precisions(params), lower, upper)
    o_in, o_out = _sweep64(k.astype(np.float64), np.eye(20), np.eye(5), lower, upper)
    for omega_out in (o_out, prec.omega_out["k"]):
        np.testing.assert_allclose(omega_out, lower * np.eye(5), atol=1e-6 * lower)
    assert _relative_error(prec.omega_in["k"], o_in) <= 1e-5
    grad = _penalty_and_grad(params, prec)[1]["k"]
    assert np.all(np.isfinite(grad))
    assert _relative_error(grad, 2 * o_in @ k.astype(np.float64) @ o_out) <= 1e-5


def test_float64_factored_path_equals_the_dense_path(rng):
    # In float64 the factored precisions and the dense Alg. 1 (_sweep64, Gram
    # matrices and eigh) are the same maths: they agree to 1e-9, both sides.
    lower, upper = 1e-3, 1e3
    with jax.enable_x64(True):
        sweep = jax.jit(
            lambda p, q: mr.adareg_update_precisions(p, q, lower=lower, upper=upper)
        )
        penalty_and_grad = jax.jit(jax.value_and_grad(mr.adareg_penalty))
        for shape in [(40, 6), (6, 40)]:
            k = rng.normal(size=shape) / np.sqrt(shape[0])
            params = {"k": jnp.asarray(k, jnp.float64)}
            prec = mr.init_adareg_precisions(params)
            o_in, o_out = map(np.eye, shape)
            for _ in range(3):
                o_in, o_out = _sweep64(k, o_in, o_out, lower, upper)
                prec = sweep(params, prec)
                value, grad = penalty_and_grad(params, prec)
                assert grad["k"].dtype == jnp.float64
                assert _relative_error(grad["k"], 2 * o_in @ k @ o_out) <= 1e-9
                assert abs(value / np.trace(o_in @ k @ o_out @ k.T) - 1) <= 1e-9
                assert _relative_error(prec.omega_in["k"], o_in) <= 1e-9
                assert _relative_error(prec.omega_out["k"], o_out) <= 1e-9


def test_default_bounds_train_the_toy_problem_under_scan(rng):
    # Issue 17's toy problem: a 2×3 least-squares kernel, adareg(0.01) chained
    # with sgd(0.05), 3000 steps. The old box [1e-3, 1e3] reached NaN; the default
    # box keeps coeff·lr·upper² = 0.05 < 1 (the stability condition).
    coeff, lr = 0.01, 0.05
    x = jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)
    target = jnp.asarray([[1.0, -0.5, 0.3], [0.2, 0.8, -1.0]], jnp.float32)

    def loss(p):
        return 0.5 * jnp.mean(jnp.sum((x @ p["k"] - x @ target) ** 2, -1))

    tx = optax.chain(mr.adareg(coeff), optax.sgd(lr))

    def step(carry, _):
        p, s = carry
        u, s = tx.update(jax.grad(loss)(p), s, p)
        p = optax.apply_updates(p, u)
        return (p, s), loss(p)

    p0 = {"k": jnp.full((2, 3), 0.1)}
    (p, state), losses = jax.jit(lambda c: jax.lax.scan(step, c, length=3000))(
        (p0, tx.init(p0))
    )
    assert np.all(np.isfinite(np.asarray(losses)))
    # The last 500 steps ran at fixed precisions (re-solved at step 2500): SGD has
    # converged to the minimiser of loss + coeff·tr(Ω_in K Ω_out Kᵀ) for them,
    # a linear system in float64.
    o_in, o_out = _at(state[0].inner_state.precisions, "k")
    o_in, o_out = np.asarray(o_in, np.float64), np.asarray(o_out, np.float64)
    xtx = np.asarray(x.T @ x, np.float64) / len(x)
    hessian = np.kron(xtx, np.eye(3)) + 2 * coeff * np.kron(o_in, o_out)
    rhs = (xtx @ np.asarray(target, np.float64)).ravel()
    optimum = np.linalg.solve(hessian, rhs).reshape(2, 3)
    np.testing.assert_allclose(p["k"], optimum, rtol=1e-4, atol=1e-5)
    # and the prior moves the kernel only a little from the data's optimum
    assert np.linalg.norm(p["k"] - target) <= 0.15 * np.linalg.norm(target)


def _train_last_layer(rng, lower, upper, epochs):
    """zhao-fig2's classifier alone: a 50 x 10 softmax layer on ReLU features,
    AdaReg (λ = 1e-4, re-solved every epoch of 14 steps) before Nesterov SGD
    (rate 0.05, momentum 0.9), one lax.scan. Returns (params, state, max |K| per
    step)."""
    d, p, batch, steps = 50, 10, 32, 14
    features = np.maximum(rng.normal(size=(steps * batch, d)), 0).astype(np.float32)
    logits = features @ rng.normal(size=(d, p)) + rng.gumbel(size=(steps * batch, p))
    x = jnp.asarray(features).reshape(steps, batch, d)
    y = jnp.asarray(np.argmax(logits, -1)).reshape(steps, batch)
    params = {
        "kernel": jnp.asarray(rng.normal(size=(d, p)) / np.sqrt(d), jnp.float32),
        "bias": jnp.zeros(p, jnp.float32),
    }
    ada = mr.adareg(1e-4, lower=lower, upper=upper, update_every=steps)
    tx = optax.chain(ada, optax.sgd(0.05, momentum=0.9, nesterov=True))

    def loss(q, xb, yb):
        z = xb @ q["kernel"] + q["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(z, yb).mean()

    def step(carry, batch_xy):
        q, state = carry
        updates, state = tx.update(jax.grad(loss)(q, *batch_xy), state, q)
        q = optax.apply_updates(q, updates)
        return (q, state), jnp.max(jnp.abs(q["kernel"]))

    data = (jnp.tile(x, (epochs, 1, 1)), jnp.tile(y, (epochs, 1)))
    (q, state), top = jax.jit(lambda c: jax.lax.scan(step, c, data))(
        (params, tx.init(params))
    )
    return q, state, ada, np.asarray(top)


def test_default_bounds_keep_zhao_fig2s_last_layer_finite():
    # `reproduce zhao-fig2` at n = 3600 (14 steps an epoch) ended with NaN weights
    # in every seed: it ran on the library from before the default box became
    # [0.1, 10], i.e. at [1e-3, 1e3], where the added term's curvature reaches
    # 2·λ·upper² = 200, while Nesterov SGD (rate 0.05, β = 0.9) is stable only
    # below 2(1 + β)/((1 + 2β)·0.05) = 27. Once a mode grows, each re-solve gives
    # `upper` again to the directions where the kernel is small (Ω = m / σ², and
    # Ω_in on the d − p directions K does not reach), so it keeps growing. With the
    # same layer, rates and period, [1e-3, 1e3] passes 1e9 within 6 epochs; the
    # default box (curvature ≤ 0.02) stays at the data's scale.
    _, _, _, top = _train_last_layer(np.random.default_rng(0), 1e-3, 1e3, 6)
    assert not np.all(np.isfinite(top)) or top.max() > 1e9
    params, state, ada, top = _train_last_layer(
        np.random.default_rng(0), LOWER, UPPER, 6
    )
    assert np.all(np.isfinite(top)) and top.max() < 2.0
    # the next step (count 84) re-solves: its precisions and added term are float64
    # Alg. 1 from the stored precisions at the trained kernel
    adastate = state[0]
    o_in, o_out = (
        np.asarray(x, np.float64)
        for x in _at(adastate.inner_state.precisions, "kernel")
    )
    k = np.asarray(params["kernel"], np.float64)
    zeros = jax.tree.map(jnp.zeros_like, params)
    added, new = jax.jit(ada.update)(zeros, adastate, params)
    want_in, want_out = _sweep64(k, o_in, o_out, LOWER, UPPER)
    got_in, got_out = _at(new.inner_state.precisions, "kernel")
    assert _relative_error(got_in, want_in) <= 1e-5
    assert _relative_error(got_out, want_out) <= 1e-5
    assert _relative_error(added["kernel"], 2e-4 * want_in @ k @ want_out) <= 1e-5
    assert not np.any(added["bias"])


def test_weight_dimension_numbers_give_each_matrix_its_precisions(rng):
    # A scanned stack (layers, in, out): three separate 6 × 4 matrices; an equinox
    # Linear weight (out, in): the matrix is its transpose; a stacked bias: none.
    from optax.contrib import MuonDimensionNumbers as M

    lower, upper, coeff = 1e-3, 1e3, 0.1
    params = {
        "stack": jnp.asarray(rng.normal(size=(3, 6, 4)), jnp.float32),
        "eqx": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
    }
    wdn = {"stack": M(1, 2), "eqx": M(1, 0), "bias": None}
    matrices = {
        ("stack", b): np.asarray(params["stack"][b], np.float64) for b in range(3)
    }
    matrices["eqx", None] = np.asarray(params["eqx"], np.float64).T

    def pick(tree, name, b):
        x = np.asarray(tree[name])
        return x if b is None else x[b]

    sweep = jax.jit(
        lambda p, q: mr.adareg_update_precisions(
            p, q, lower=lower, upper=upper, weight_dimension_numbers=wdn
        )
    )
    grad = jax.jit(
        jax.grad(lambda p, q: mr.adareg_penalty(p, q, weight_dimension_numbers=wdn))
    )
    prec = mr.init_adareg_precisions(params, weight_dimension_numbers=wdn)
    assert isinstance(prec.basis_in["bias"], optax.MaskedNode)
    assert prec.omega_in["stack"].shape == (3, 6, 6)
    prec = sweep(params, prec)
    g = grad(params, prec)
    for (name, b), k in matrices.items():
        o_in, o_out = _sweep64(k, *map(np.eye, k.shape), lower, upper)
        assert _relative_error(pick(prec.omega_in, name, b), o_in) <= 1e-5
        assert _relative_error(pick(prec.omega_out, name, b), o_out) <= 1e-5
        want = 2 * o_in @ k @ o_out
        got = pick(g, name, b)
        assert _relative_error(got if b is not None else got.T, want) <= 1e-5
    # the transform re-solves the same way and adds coeff times that gradient
    tx = mr.adareg(coeff, update_every=1, weight_dimension_numbers=wdn)
    state, zeros = tx.init(params), _zero_like(params)
    for _ in range(2):
        added, state = tx.update(zeros, state, params)
    for name in ("stack", "eqx"):
        np.testing.assert_allclose(
            added[name], coeff * g[name], rtol=1e-5, atol=1e-6 * coeff
        )
    np.testing.assert_array_equal(added["bias"], 0.0)


def test_a_conv_operator_layout_is_an_error_naming_the_leaf():
    # Kronecker precisions need the kernel as a matrix, not as a convolution.
    params = {"conv": jnp.ones((3, 3, 2, 4)), "dense": jnp.ones((4, 2))}
    wdn = {"conv": mr.ConvOperator((8, 8, 2)), "dense": None}
    calls = [
        lambda: mr.init_adareg_precisions(params, weight_dimension_numbers=wdn),
        lambda: mr.adareg(0.1, weight_dimension_numbers=wdn).init(params),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="'conv'"):
            call()


def test_state_leaves_are_distinct_buffers_so_it_can_be_donated(params):
    # jit(..., donate_argnums) rejects a buffer donated twice; AdaReg's initial
    # state once held one zeros array as both anchor and rotated.
    for state in (
        mr.adareg(0.1).init(params),
        mr.AdaRegPrecisions.from_dense({"w": jnp.eye(3)}, {"w": jnp.eye(2)}),
    ):
        leaves = jax.tree.leaves(state)
        assert len({id(x) for x in leaves}) == len(leaves)
