"""Bad input gets a clear error or a documented, tested behaviour; never silent NaN.

What is documented and checked here:

- ``update`` without ``params``, or with params that do not fit the state ``init``
  built, raises a ValueError naming the transform or its state.
- A mask that selects a 1-D leaf raises a ValueError naming the leaf's path.
- A NaN in the incoming gradient stays in that leaf's update (``optax.apply_if_finite``
  can then skip the step); every other leaf's update and the whole state are exactly
  what they would be without it.
- A NaN in a kernel leaves that kernel's state as it was (power-iteration vector,
  AdaReg precisions), so one diverged step cannot poison the state for good, while
  that kernel's update and every penalty over it are NaN, so the NaN is not hidden;
  the other kernels are unaffected.
- Labels outside ``[0, n_classes)`` raise a ValueError when their values are known;
  under ``jit`` they are documented to give NaN, never a finite wrong value.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import margin_regs as mr
from margin_regs.losses import one_vs_all_hinge_loss

PARAMS = {
    "dense": {
        "kernel": jnp.asarray(
            np.random.default_rng(0).standard_normal((3, 4)), jnp.float32
        ),
        "bias": jnp.full((4,), 0.1),
    },
    "out": {
        "kernel": jnp.asarray(
            np.random.default_rng(1).standard_normal((4, 2)), jnp.float32
        ),
        "bias": jnp.zeros(2),
    },
}
GRADS = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), PARAMS)

TRANSFORMS = {
    "spectral_norm_regularization": mr.spectral_norm_regularization,
    "eigenvalue_decay": mr.eigenvalue_decay,
    # update_every=1: the precisions are re-solved from the second step on.
    "adareg": functools.partial(mr.adareg, update_every=1),
}


# One transform, and one jitted init/update, per method: every test reuses them.
TXS = {name: factory(0.1) for name, factory in TRANSFORMS.items()}
INITS = {name: jax.jit(tx.init) for name, tx in TXS.items()}
UPDATES = {name: jax.jit(tx.update) for name, tx in TXS.items()}


def _replace(tree, path, value):
    tree = jax.tree.map(lambda x: x, tree)
    tree[path[0]][path[1]] = value
    return tree


def _equal_trees(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def _leaves_under(tree, key):
    """The leaves of ``tree`` whose path passes through the dict key ``key``."""
    return [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        if jax.tree_util.DictKey(key) in path
    ]


def _all_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", TRANSFORMS)
def test_update_without_params_names_the_transform(name):
    tx = TXS[name]
    state = INITS[name](PARAMS)
    with pytest.raises(ValueError, match=name):
        tx.update(GRADS, state)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_params_with_another_structure_than_init_saw_raise(name):
    tx = TXS[name]
    state = INITS[name](PARAMS)
    fewer = {"dense": PARAMS["dense"]}
    with pytest.raises(ValueError, match=r"(?i)state|init"):
        tx.update({"dense": GRADS["dense"]}, state, fewer)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_params_with_other_shapes_than_init_saw_raise(name):
    tx = TXS[name]
    state = INITS[name](PARAMS)
    wider = {
        "dense": {"kernel": jnp.ones((3, 5)), "bias": jnp.zeros(5)},
        "out": {"kernel": jnp.ones((5, 2)), "bias": jnp.zeros(2)},
    }
    with pytest.raises(ValueError, match=r"(?i)state|init"):
        tx.update(jax.tree.map(jnp.ones_like, wider), state, wider)


MASK_WITH_BIAS = {
    "dense": {"kernel": True, "bias": True},
    "out": {"kernel": True, "bias": False},
}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_a_mask_selecting_a_bias_names_it(name):
    tx = TRANSFORMS[name](0.1, mask=MASK_WITH_BIAS)
    with pytest.raises(ValueError, match="dense/bias"):
        tx.init(PARAMS)


@pytest.mark.parametrize(
    "penalty",
    [
        lambda p, m: mr.init_power_iteration(p, 0, mask=m),
        lambda p, m: mr.spectral_norm_penalty(p, mr.init_power_iteration(p, 0), mask=m),
        lambda p, m: mr.eigenvalue_decay_penalty(p, mask=m),
        lambda p, m: mr.init_adareg_precisions(p, mask=m),
        lambda p, m: mr.adareg_penalty(p, mr.init_adareg_precisions(p), mask=m),
        lambda p, m: mr.adareg_update_precisions(
            p, mr.init_adareg_precisions(p), lower=1e-3, upper=1e3, mask=m
        ),
    ],
    ids=[
        "init_power_iteration",
        "spectral_norm_penalty",
        "eigenvalue_decay_penalty",
        "init_adareg_precisions",
        "adareg_penalty",
        "adareg_update_precisions",
    ],
)
def test_penalties_reject_a_mask_selecting_a_bias(penalty):
    with pytest.raises(ValueError, match="dense/bias"):
        penalty(PARAMS, MASK_WITH_BIAS)


def _two_steps(name, grads2, params2):
    """One clean step, then a second with the given grads and params."""
    state = INITS[name](PARAMS)
    _, state = UPDATES[name](GRADS, state, PARAMS)
    return (state, *UPDATES[name](grads2, state, params2))


@pytest.mark.parametrize("name", TRANSFORMS)
def test_a_nan_gradient_stays_in_its_leaf_and_out_of_the_state(name):
    nan_grads = _replace(
        GRADS, ("dense", "kernel"), GRADS["dense"]["kernel"].at[1, 2].set(jnp.nan)
    )
    _, clean, clean_state = _two_steps(name, GRADS, PARAMS)
    _, updates, state = _two_steps(name, nan_grads, PARAMS)

    assert bool(jnp.isnan(updates["dense"]["kernel"][1, 2]))
    for path in [("dense", "bias"), ("out", "kernel"), ("out", "bias")]:
        np.testing.assert_array_equal(
            updates[path[0]][path[1]], clean[path[0]][path[1]]
        )
    assert _all_finite(state)
    _equal_trees(state, clean_state)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_a_nan_kernel_keeps_its_state_and_spares_the_others(name):
    kernel = PARAMS["dense"]["kernel"].at[0, 0].set(jnp.nan)
    nan_params = _replace(PARAMS, ("dense", "kernel"), kernel)
    before, clean, _ = _two_steps(name, GRADS, PARAMS)
    _, updates, state = _two_steps(name, GRADS, nan_params)

    assert _all_finite(state)
    assert bool(jnp.any(jnp.isnan(updates["dense"]["kernel"]))), "NaN hidden"
    kept = _leaves_under(state, "dense")
    assert kept, "the state holds something for the NaN kernel"
    _equal_trees(kept, _leaves_under(before, "dense"))
    np.testing.assert_array_equal(updates["out"]["kernel"], clean["out"]["kernel"])
    np.testing.assert_array_equal(updates["dense"]["bias"], clean["dense"]["bias"])


def test_apply_if_finite_skips_a_nan_step_and_training_goes_on():
    """The recipe for NaN steps: the skipped step changes nothing.

    Shown on AdaReg, whose count decides when the precisions are re-solved: a
    skipped step must not advance it. (The other transforms' part, a NaN staying in
    the update where apply_if_finite sees it, is tested above.)
    """
    tx = optax.apply_if_finite(
        optax.chain(TRANSFORMS["adareg"](0.1), optax.sgd(0.1, momentum=0.9)),
        max_consecutive_errors=3,
    )
    step = jax.jit(
        lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
            *tx.update(g, s, p)
        )
    )
    grads = [
        jax.tree.map(lambda p, i=i: (0.1 * i + 0.05) * p, PARAMS) for i in range(3)
    ]
    bad = _replace(grads[1], ("out", "kernel"), jnp.full((4, 2), jnp.nan))

    p_skip, s_skip = PARAMS, tx.init(PARAMS)
    for g in (grads[0], bad, grads[2]):
        p_skip, s_skip = step(p_skip, s_skip, g)
    p_ref, s_ref = PARAMS, tx.init(PARAMS)
    for g in (grads[0], grads[2]):
        p_ref, s_ref = step(p_ref, s_ref, g)

    assert int(s_skip.total_notfinite) == 1
    _equal_trees(p_skip, p_ref)
    _equal_trees(s_skip.inner_state, s_ref.inner_state)


# Margin penalties and losses: labels out of range.

W = jnp.asarray(np.random.default_rng(2).standard_normal((3, 4)), jnp.float32)
X = jnp.asarray(np.random.default_rng(3).standard_normal((5, 3)), jnp.float32)


def _logits(b):
    return jnp.tanh(b) @ W


@pytest.mark.parametrize("labels", [[0, 1, 2, 3, 4], [0, -1, 2, 3, 0]])
def test_jacobian_margin_penalty_rejects_known_out_of_range_labels(labels):
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        mr.jacobian_margin_penalty(_logits, X, classes=jnp.array(labels), classifier=W)


def test_jacobian_margin_penalty_rejects_float_labels():
    with pytest.raises(ValueError, match="integer"):
        mr.jacobian_margin_penalty(_logits, X, classes=jnp.zeros(5))


def test_jacobian_margin_penalty_under_jit_is_nan_for_out_of_range_labels():
    """Documented: under jit a label outside [0, C) makes the penalty NaN."""
    penalty = jax.jit(
        lambda x, y: mr.jacobian_margin_penalty(_logits, x, classes=y, classifier=W)
    )
    assert np.isfinite(float(penalty(X, jnp.array([0, 1, 2, 3, 0]))))
    for bad in ([0, 7, 2, 3, 0], [0, 1, 2, 3, -2]):
        assert np.isnan(float(penalty(X, jnp.array(bad))))


def test_one_vs_all_hinge_rejects_known_out_of_range_labels():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        one_vs_all_hinge_loss(_logits(X), jnp.array([0, 1, 2, 3, 4]))


def test_one_vs_all_hinge_under_jit_is_nan_exactly_at_out_of_range_labels():
    """Documented: under jit an out-of-range label gives that sample a NaN loss."""
    z = _logits(X)
    labels = jnp.array([0, 1, 9, 3, -1])
    loss = np.asarray(jax.jit(one_vs_all_hinge_loss)(z, labels))
    np.testing.assert_array_equal(np.isnan(loss), [False, False, True, False, True])
    good = [0, 1, 3]
    np.testing.assert_array_equal(
        loss[good], one_vs_all_hinge_loss(z[np.array(good)], labels[np.array(good)])
    )


@pytest.mark.parametrize(
    "penalty",
    [
        lambda p: mr.spectral_norm_penalty(p, mr.init_power_iteration(PARAMS, 0))[0],
        lambda p: mr.adareg_penalty(p, mr.init_adareg_precisions(p)),
        mr.eigenvalue_decay_penalty,
    ],
    ids=["spectral_norm_penalty", "adareg_penalty", "eigenvalue_decay_penalty"],
)
def test_a_penalty_does_not_hide_a_nan_weight(penalty):
    """A NaN kernel makes the penalty NaN, so the loss shows it; finite stays finite."""
    nan_params = _replace(
        PARAMS, ("out", "kernel"), PARAMS["out"]["kernel"].at[1, 1].set(jnp.nan)
    )
    assert bool(jnp.isnan(penalty(nan_params)))
    assert bool(jnp.isfinite(penalty(PARAMS)))
