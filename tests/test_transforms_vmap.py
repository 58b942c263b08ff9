"""The transforms under jax.vmap (ensembles, seeds): the same numbers as the
members run one by one, periodic work that stays periodic, and no deadlock."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax

import margin_regs as mr
from margin_regs import _batching

_SRC = os.path.join(os.path.dirname(__file__), os.pardir, "src")


def _members(n):
    keys = jax.random.split(jax.random.key(3), n)
    return [
        {
            "a": {"kernel": jax.random.normal(k, (6, 4)), "bias": jnp.zeros(4)},
            "b": {"kernel": jax.random.normal(jax.random.fold_in(k, 1), (4, 3))},
        }
        for k in keys
    ]


def _with_count(state, count):
    inner = state.inner_state
    return optax.MaskedState(inner._replace(count=jnp.asarray(count, jnp.int32)))


def test_periodic_cond_selects_per_member_and_nests():
    def fn(x):
        return 2 * x + 1

    def f(c, x):
        return _batching.periodic_cond(c % 3 == 0, fn, x)

    c = jnp.array([[0, 1, 3, 4], [2, 5, 6, 7]])
    x = jnp.arange(8.0).reshape(2, 4)
    want = np.where(np.asarray(c) % 3 == 0, 2 * np.asarray(x) + 1, x)
    np.testing.assert_array_equal(jax.vmap(jax.vmap(f))(c, x), want)
    np.testing.assert_array_equal(
        jax.vmap(f, in_axes=(None, 0))(jnp.int32(3), x[0]), 2 * x[0] + 1
    )


def _primitives_outside_cond(jaxpr, inside=False):
    """Names of the primitives met outside every ``cond``, recursively."""
    found = set()
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if not inside:
            found.add(name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found |= _primitives_outside_cond(sub, inside or name == "cond")
    return found


_LAPACK = {"svd", "eigh", "qr", "householder_product", "geqrf", "orgqr"}


def _lapack_operands(jaxpr):
    """The shapes of the operands of every decomposition in ``jaxpr``, recursively."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _LAPACK:
            found += [v.aval.shape for v in eqn.invars]
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _lapack_operands(sub)
    return found


def test_vmapped_adareg_equals_one_by_one_across_resolves():
    # Counts 0, 1, 2 with a period of 3: at every step one member re-solves and
    # the others must keep their precisions.
    tx = mr.adareg(0.05, update_every=3)
    members = _members(3)
    grads = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), members[0])
    states = [_with_count(tx.init(p), i) for i, p in enumerate(members)]

    def step(params, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(
            params, jax.tree.map(lambda u: -0.1 * u, updates)
        ), state

    stack = jax.tree.map(lambda *xs: jnp.stack(xs), *members)
    stack_state = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    vstep, one = jax.jit(jax.vmap(step)), jax.jit(step)
    for _ in range(7):
        stack, stack_state = vstep(stack, stack_state)
        pairs = [one(p, s) for p, s in zip(members, states, strict=True)]
        members, states = [p for p, _ in pairs], [s for _, s in pairs]
    want = jax.tree.map(lambda *xs: np.stack(xs), *members)
    want_state = jax.tree.map(lambda *xs: np.stack(xs), *states)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        (stack, stack_state.inner_state.precisions.omega_in),
        (want, want_state.inner_state.precisions.omega_in),
    )
    # every member re-solved twice (counts 3 and 6 fall in each member's window)
    assert not np.allclose(
        want_state.inner_state.precisions.values_out["a"]["kernel"], 1
    )

    jaxpr = jax.make_jaxpr(jax.vmap(step))(stack, stack_state).jaxpr
    outside = _primitives_outside_cond(jaxpr)
    assert "svd" not in outside and "qr" not in outside
    # No decomposition sees a batch: batched CPU LAPACK calls that XLA runs at
    # once block its thread pool (the deadlock below).
    shapes = _lapack_operands(jaxpr)
    assert shapes and all(len(shape) == 2 for shape in shapes)


_ENSEMBLE = """
import jax, jax.numpy as jnp, numpy as np, optax
import margin_regs as mr
sizes = (64, 128, 128, 10)
def init(key):
    ks = jax.random.split(key, 3)
    return [jax.random.normal(k, (a, b)) / a**0.5
            for k, a, b in zip(ks, sizes[:-1], sizes[1:])]
def loss(ws, x, y):
    for w in ws[:-1]:
        x = jax.nn.relu(x @ w)
    return optax.softmax_cross_entropy_with_integer_labels(x @ ws[-1], y).mean()
tx = optax.chain(mr.adareg(1e-3, update_every=1), optax.sgd(0.05))
x = jax.random.normal(jax.random.key(9), (16, 64)); y = jnp.arange(16) % 10
def step(ws, s):
    u, s = tx.update(jax.grad(loss)(ws, x, y), s, ws)
    return optax.apply_updates(ws, u), s
members = [init(k) for k in jax.random.split(jax.random.key(0), 4)]
ws = jax.tree.map(lambda *a: jnp.stack(a), *members)
s = jax.vmap(tx.init)(ws)
vstep, one = jax.jit(jax.vmap(step)), jax.jit(step)
states = [tx.init(m) for m in members]
for _ in range(2):
    ws, s = vstep(ws, s)
    pairs = [one(m, t) for m, t in zip(members, states)]
    members, states = [p for p, _ in pairs], [t for _, t in pairs]
print(max(float(np.abs(np.asarray(a)[i] - b).max())
          for i, m in enumerate(members) for a, b in zip(ws, m)))
"""


def test_vmapped_ensemble_with_adareg_on_every_layer_finishes():
    # Before the fix: two batched SVDs on XLA's CPU pool blocked both of its
    # threads on a 2-core machine, and this hung at 0% CPU.
    env = dict(os.environ, PYTHONPATH=os.path.abspath(_SRC), JAX_PLATFORMS="cpu")
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_ENSEMBLE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout.split()[-1]) < 1e-4


def test_singular_values_stay_differentiable_and_one_matrix_at_a_time():
    # sequential_vmap alone cannot be linearized; per_matrix's custom JVP keeps
    # jax.grad working (d Σσ / dK = U Vᵀ) with every SVD still one matrix at a time.
    kernels = jax.random.normal(jax.random.key(0), (3, 3, 3, 4, 5))  # 3 conv kernels

    def nuclear(k):
        return jnp.sum(mr.singular_values(k))

    grads = jax.jit(jax.vmap(jax.grad(nuclear)))(kernels)
    for k, g in zip(np.asarray(kernels, np.float64), grads, strict=True):
        u, _, vt = np.linalg.svd(k.reshape(-1, 5), full_matrices=False)
        np.testing.assert_allclose(g, (u @ vt).reshape(k.shape), atol=1e-5)
    jaxpr = jax.make_jaxpr(jax.vmap(jax.grad(nuclear)))(kernels).jaxpr
    assert _lapack_operands(jaxpr) and all(len(s) == 2 for s in _lapack_operands(jaxpr))
    # second order: Σσ² = ||K||_F², whose Hessian is 2·I
    hessian = jax.hessian(lambda k: jnp.sum(mr.singular_values(k) ** 2))(
        kernels[0, 0, 0]
    )
    np.testing.assert_allclose(hessian.reshape(20, 20), 2 * np.eye(20), atol=1e-5)
