"""Each transform compiles once per shape, and composes with vmap and lax.scan.

A jitted step is retraced whenever its input types change: a state leaf whose dtype,
weak type, shape or tree structure differs after a step than after ``init`` costs a
recompilation on every step. The trace counter below is a Python side effect, which
runs only while JAX traces.

``jax.vmap`` over a stack of models and ``lax.scan`` over steps must give what the
plain per-model Python loop gives.
"""

import collections

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _states import canonical
from _tiny_mlp import init_params, logits_fn, loss_fn

import margin_regs as mr

rng = np.random.default_rng(0)
X = jnp.asarray(rng.standard_normal((12, 5)), jnp.float32)
Y = jnp.asarray(rng.integers(0, 3, 12), jnp.int32)


def jacobian_loss_fn(params, x, y):
    penalty = mr.jacobian_margin_penalty(
        lambda b: logits_fn(params, b),
        x,
        classes=y,
        classifier=params["dense1"]["kernel"],
    )
    return loss_fn(params, x, y) + 0.1 * penalty


SGD = optax.sgd(0.1, momentum=0.9)
CASES = {
    "spectral_norm_regularization": (
        loss_fn,
        optax.chain(mr.spectral_norm_regularization(0.05), SGD),
    ),
    "eigenvalue_decay": (loss_fn, optax.chain(mr.eigenvalue_decay(0.05), SGD)),
    # update_every=2: steps with and without the re-solve both run.
    "adareg": (loss_fn, optax.chain(mr.adareg(0.01, update_every=2), SGD)),
    "jacobian_margin_penalty": (jacobian_loss_fn, SGD),
    # The three transforms in one step, for vmap and scan: one compilation covers
    # them all (the Jacobian penalty is stateless: nothing to batch or carry).
    "all": (
        loss_fn,
        optax.chain(
            mr.spectral_norm_regularization(0.05),
            mr.eigenvalue_decay(0.05),
            mr.adareg(0.01, update_every=2),
            SGD,
        ),
    ),
}


def make_step(loss, tx, name):
    def step(params, state, x, y):
        TRACES[name] += 1
        grads = jax.grad(loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


# One jitted step per case, shared by every test: compiling dominates their time.
TRACES = collections.Counter()
STEPS = {name: jax.jit(make_step(*CASES[name], name)) for name in CASES}


def assert_close(a_tree, b_tree):
    """Equal to float32 rounding, relative to each leaf's largest magnitude.

    Batched and unbatched matmuls sum in different orders; AdaReg's re-solve
    inverts ``KᵀΩK``, which scales that rounding by up to ``κ(K)²``, hence 1e-4.
    """
    a_tree, b_tree = canonical(a_tree), canonical(b_tree)
    a_leaves, b_leaves = jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)
    assert jax.tree.structure(a_tree) == jax.tree.structure(b_tree)
    for a, b in zip(a_leaves, b_leaves, strict=True):
        assert a.dtype == b.dtype
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(1.0, float(np.max(np.abs(b64), initial=0.0)))
        assert float(np.max(np.abs(a64 - b64), initial=0.0)) <= 1e-4 * scale


def kinds(tree):
    return jax.tree.map(lambda a: (a.dtype, a.shape, a.weak_type), tree)


@pytest.mark.parametrize("name", [n for n in CASES if n != "all"])
def test_one_compilation_per_shape(name):
    _, tx = CASES[name]
    step = STEPS[name]
    for sizes in [(5, 7, 3), (5, 4, 3)]:
        params = init_params(jax.random.key(1), sizes)
        # Users call init eagerly, outside jit: its output must already have the
        # types the step returns, or the second step compiles again.
        state = tx.init(params)
        expected = kinds((params, state))
        params, state = step(params, state, X, Y)
        traced = TRACES[name]
        for _ in range(3):
            params, state = step(params, state, X, Y)
        assert TRACES[name] == traced
        assert kinds((params, state)) == expected
    # The second shape compiled exactly once more.
    assert step._cache_size() == 2


def test_vmap_over_a_batch_of_models_matches_each_model_alone():
    name = "all"
    loss, tx = CASES[name]
    models = [init_params(jax.random.key(i)) for i in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *models)

    batched_step = jax.jit(
        jax.vmap(make_step(loss, tx, name), in_axes=(0, 0, None, None))
    )
    params, state = stacked, jax.vmap(tx.init)(stacked)
    singles = [(m, tx.init(m)) for m in models]
    for _ in range(3):
        params, state = batched_step(params, state, X, Y)
        singles = [STEPS[name](p, s, X, Y) for p, s in singles]

    for i, single in enumerate(singles):
        assert_close(jax.tree.map(lambda a, i=i: a[i], (params, state)), single)


def test_lax_scan_over_steps_matches_the_python_loop():
    name = "all"
    loss, tx = CASES[name]
    n_steps = 4
    xs = jnp.stack([X * (1 + 0.1 * i) for i in range(n_steps)])
    ys = jnp.stack([jnp.roll(Y, i) for i in range(n_steps)])
    params = init_params(jax.random.key(2))
    state = tx.init(params)
    step = make_step(loss, tx, name)

    @jax.jit
    def scanned(params, state):
        def body(carry, batch):
            return step(*carry, *batch), None

        return jax.lax.scan(body, (params, state), (xs, ys))[0]

    final = scanned(params, state)
    for i in range(n_steps):
        params, state = STEPS[name](params, state, xs[i], ys[i])
    assert_close(final, (params, state))


# ------------------------------------------- iteration counts are loops, not unrolled


def _sub_jaxprs(params):
    """The jaxprs in an equation's params (loop bodies, branches, calls); written
    here since ``jax.extend.core.jaxprs_in_params`` is newer than the jax floor."""
    for value in params.values():
        for v in value if isinstance(value, tuple | list) else (value,):
            if hasattr(v, "eqns"):
                yield v
            elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
                yield v.jaxpr


def _n_eqns(jaxpr):
    """Equations of a jaxpr, those of its sub-jaxprs (loop bodies, branches) included."""
    return sum(
        1 + sum(_n_eqns(sub) for sub in _sub_jaxprs(e.params)) for e in jaxpr.eqns
    )


KERNELS = {
    "conv": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.float32)},
    "dense": {
        "kernel": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32),
        "bias": jnp.zeros(4),
    },
}
VECTORS = mr.init_power_iteration(KERNELS, 0)
CONV_LAYOUT = {"conv": {"kernel": mr.ConvOperator((5, 5, 2))}, "dense": None}
CONV_VECTORS = mr.init_power_iteration(KERNELS, 0, weight_dimension_numbers=CONV_LAYOUT)
PENALTIES = {
    "eigenvalue_decay_penalty": lambda p, n: mr.eigenvalue_decay_penalty(
        p, n_power_iterations=n
    ),
    "spectral_norm_penalty": lambda p, n: mr.spectral_norm_penalty(
        p, VECTORS, n_power_iterations=n
    )[0],
    "spectral_norm_penalty_conv_operator": lambda p, n: mr.spectral_norm_penalty(
        p, CONV_VECTORS, n_power_iterations=n, weight_dimension_numbers=CONV_LAYOUT
    )[0],
}


@pytest.mark.parametrize("name", sorted(PENALTIES))
def test_the_gradients_program_does_not_grow_with_the_iteration_count(name):
    penalty = PENALTIES[name]
    sizes = [
        _n_eqns(jax.make_jaxpr(jax.grad(lambda p, n=n: penalty(p, n)))(KERNELS).jaxpr)
        for n in (1, 30)
    ]
    assert sizes[0] == sizes[1]


def _seed_sigma64(k, p):
    """The seed's σ in float64 numpy: v = (KᵀK)^p 1, sqrt((Mv·v)/(v·v))."""
    m = k.T @ k
    v = np.ones(len(m))
    for _ in range(p):
        v = m @ v
        v = v / np.linalg.norm(v)
    return np.sqrt((m @ v) @ v / (v @ v))


def test_seed_penalty_differentiates_through_30_iterations():
    # Value and gradient against float64 central differences of the numpy seed.
    k = np.asarray(KERNELS["dense"]["kernel"], np.float64)
    params = {"w": KERNELS["dense"]["kernel"]}
    value, grad = jax.value_and_grad(
        lambda q: mr.eigenvalue_decay_penalty(q, n_power_iterations=30)
    )(params)
    np.testing.assert_allclose(value, _seed_sigma64(k, 30), rtol=1e-5)
    h, want = 1e-6, np.zeros_like(k)
    for i, j in np.ndindex(*k.shape):
        e = np.zeros_like(k)
        e[i, j] = h
        want[i, j] = (_seed_sigma64(k + e, 30) - _seed_sigma64(k - e, 30)) / (2 * h)
    np.testing.assert_allclose(grad["w"], want, rtol=1e-4, atol=1e-5)


def test_spectral_penalty_after_30_iterations_matches_a_numpy_loop():
    mask = {"conv": {"kernel": False}, "dense": {"kernel": True, "bias": False}}
    vectors = mr.init_power_iteration(KERNELS, 0, mask=mask)
    k = np.asarray(KERNELS["dense"]["kernel"], np.float64)
    v = np.asarray(vectors["dense"]["kernel"], np.float64)
    for _ in range(30):
        u = k @ v / np.linalg.norm(k @ v)
        v = k.T @ u / np.linalg.norm(k.T @ u)
    sigma = u @ k @ v

    def penalty(p):
        return mr.spectral_norm_penalty(p, vectors, n_power_iterations=30, mask=mask)

    (value, state), grad = jax.value_and_grad(penalty, has_aux=True)(KERNELS)
    np.testing.assert_allclose(value, 0.5 * sigma**2, rtol=1e-5)
    np.testing.assert_allclose(
        grad["dense"]["kernel"], sigma * np.outer(u, v), atol=1e-5
    )
    np.testing.assert_allclose(state["dense"]["kernel"], v, atol=1e-5)
