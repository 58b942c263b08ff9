"""No silent defaults (issue 22): integer leaves are never weights, and a layout the
default cannot know is refused with the leaf's path, then accepted with inferred
layouts, checked against float64 ``np.linalg.svd`` of the true matrices."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from optax.contrib import MuonDimensionNumbers as M

import margin_regs as mr
from margin_regs._tree import path_name

COEFF = 0.5


def svd64(matrix):
    return np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)


def zeros_like(tree):
    return jax.tree.map(jnp.zeros_like, tree)


# ----------------------------------------------------------------------------------
# Integer and boolean leaves.

KERNEL = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
WITH_COUNTER = {
    "counter": jnp.array([[7, 0], [0, 2]], jnp.int32),
    "flags": jnp.array([[True, False], [False, True]]),
    "dense": {"kernel": jnp.asarray(KERNEL)},
}
TRANSFORMS = {
    "spectral_norm_regularization": lambda: mr.spectral_norm_regularization(COEFF),
    "eigenvalue_decay": lambda: mr.eigenvalue_decay(COEFF),
    "adareg": lambda: mr.adareg(COEFF),
}


def kernel_term(name):
    """What each transform adds to the kernel's zero gradient (float64 numpy)."""
    u, s, vt = svd64(KERNEL)
    top = np.outer(u[:, 0], vt[0])
    return (
        COEFF
        * {
            "spectral_norm_regularization": s[0] * top,
            "eigenvalue_decay": top,
            "adareg": 2 * KERNEL.astype(np.float64),  # identity precisions at step 0
        }[name]
    )


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transforms_leave_integer_and_boolean_leaves_untouched(name):
    tx = TRANSFORMS[name]()
    grads = zeros_like(WITH_COUNTER)
    updates, _ = jax.jit(tx.update)(grads, tx.init(WITH_COUNTER), WITH_COUNTER)
    for leaf in ("counter", "flags"):
        assert updates[leaf].dtype == WITH_COUNTER[leaf].dtype
        np.testing.assert_array_equal(updates[leaf], grads[leaf])
    np.testing.assert_allclose(
        updates["dense"]["kernel"], kernel_term(name), rtol=1e-5, atol=1e-6
    )


def test_diagnostics_and_penalties_never_see_integer_leaves():
    s = svd64(KERNEL)[1]
    for diagnostic in (mr.spectral_norms, mr.stable_ranks, mr.singular_value_spectra):
        assert list(diagnostic(WITH_COUNTER)) == ["dense/kernel"]
    np.testing.assert_allclose(
        mr.spectral_norms(WITH_COUNTER)["dense/kernel"], s[0], rtol=1e-6
    )
    state = mr.init_power_iteration(WITH_COUNTER, 0)
    assert isinstance(state["counter"], optax.MaskedNode)
    value, _ = mr.spectral_norm_penalty(WITH_COUNTER, state)
    np.testing.assert_allclose(value, 0.5 * s[0] ** 2, rtol=1e-5)
    np.testing.assert_allclose(
        mr.eigenvalue_decay_penalty(WITH_COUNTER), s[0], rtol=1e-4
    )
    precisions = mr.init_adareg_precisions(WITH_COUNTER)
    np.testing.assert_allclose(
        mr.adareg_penalty(WITH_COUNTER, precisions), np.sum(s**2), rtol=1e-5
    )
    np.testing.assert_allclose(
        mr.l1_penalty(WITH_COUNTER), np.abs(KERNEL).sum(), rtol=1e-6
    )
    bounds = mr.margin_lower_bounds(jnp.array([1.0]), WITH_COUNTER)
    np.testing.assert_allclose(bounds["spectral"], 1 / (np.sqrt(2) * s[0]), rtol=1e-5)
    assert mr.mask_by_path("counter|flags|dense")(WITH_COUNTER) == {
        "counter": False,
        "flags": False,
        "dense": {"kernel": True},
    }


def test_a_mask_or_layout_selecting_an_integer_leaf_names_it():
    everything = jax.tree.map(lambda _: True, WITH_COUNTER)
    with pytest.raises(ValueError, match="'counter' of dtype int32 is selected"):
        mr.spectral_norms(WITH_COUNTER, mask=everything)
    layouts = {"counter": None, "flags": M(0, 1), "dense": {"kernel": M(0, 1)}}
    with pytest.raises(ValueError, match="'flags' of dtype bool is selected"):
        mr.spectral_norm_regularization(COEFF, weight_dimension_numbers=layouts).init(
            WITH_COUNTER
        )


# ----------------------------------------------------------------------------------
# Layouts the default cannot know: an nnx attention block, an equinox CNN.


@pytest.fixture(scope="module")
def attention():
    model = nnx.MultiHeadAttention(
        num_heads=2, in_features=6, qkv_features=8, decode=False, rngs=nnx.Rngs(0)
    )
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    x = jnp.ones((1, 3, 6))

    def forward(p, x):
        s = nnx.State(state)
        nnx.replace_by_pure_dict(s, p)
        return nnx.merge(graphdef, s)(x)

    layouts = mr.infer_weight_dimension_numbers(forward, params, x)
    # The true matrices: q/k/v (in, heads, head_dim) -> (in, heads·head_dim), the
    # output projection (heads, head_dim, out) -> (heads·head_dim, out).
    matrices = {
        f"{n}/kernel": np.asarray(params[n]["kernel"]).reshape(6, 8)
        for n in ("query", "key", "value")
    }
    matrices["out/kernel"] = np.asarray(params["out"]["kernel"]).reshape(8, 6)
    return params, layouts, matrices


@pytest.fixture(scope="module")
def equinox_cnn():
    k1, k2 = jax.random.split(jax.random.key(1))
    model = [eqx.nn.Conv2d(2, 3, 2, key=k1), eqx.nn.Linear(3 * 4 * 4, 2, key=k2)]
    params = eqx.filter(model, eqx.is_array)
    x = jnp.ones((2, 5, 5))

    def forward(p, x):
        conv, linear = eqx.combine(p, model)
        return linear(jax.nn.relu(conv(x)).reshape(-1))

    layouts = mr.infer_weight_dimension_numbers(forward, params, x)
    weight = np.asarray(params[0].weight)  # (out, in, kh, kw)
    matrices = {
        "0/weight": weight.reshape(3, -1).T,  # (in·kh·kw, out)
        "1/weight": np.asarray(params[1].weight).T,  # (in, out)
    }
    return params, layouts, matrices


CALLS = {
    "spectral_norm_regularization": lambda p, **kw: mr.spectral_norm_regularization(
        COEFF, **kw
    ).init(p),
    "eigenvalue_decay": lambda p, **kw: mr.eigenvalue_decay(COEFF, **kw).init(p),
    "adareg": lambda p, **kw: mr.adareg(COEFF, **kw).init(p),
    "max_norm_constraint": lambda p, **kw: mr.max_norm_constraint(3.0, **kw).init(p),
    "init_power_iteration": lambda p, **kw: mr.init_power_iteration(p, 0, **kw),
    "eigenvalue_decay_penalty": lambda p, **kw: mr.eigenvalue_decay_penalty(p, **kw),
    "init_adareg_precisions": lambda p, **kw: mr.init_adareg_precisions(p, **kw),
    "spectral_norms": lambda p, **kw: mr.spectral_norms(p, **kw),
    "stable_ranks": lambda p, **kw: mr.stable_ranks(p, **kw),
    "singular_value_spectra": lambda p, **kw: mr.singular_value_spectra(p, **kw),
    "margin_lower_bounds": lambda p, **kw: mr.margin_lower_bounds(
        jnp.ones(1), p, margin_type="geometric", **kw
    ),
}


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize(
    ("model", "path"),
    [
        ("attention", r"'key/kernel' of shape \(6, 2, 4\)"),
        ("equinox_cnn", "'0/weight'"),
    ],
)
def test_a_layout_the_default_cannot_know_is_refused_with_its_path(
    call, model, path, request
):
    params, layouts, _ = request.getfixturevalue(model)
    with pytest.raises(ValueError, match=path) as error:
        CALLS[call](params)
    assert "infer_weight_dimension_numbers(model.apply, params, x)" in str(error.value)
    # The inferred layouts, or a mask that leaves the leaves out, are accepted
    # (the attention block has no other weight, the CNN its Linear).
    CALLS[call](params, weight_dimension_numbers=layouts)
    CALLS[call](params, mask=mr.mask_by_path("^1/"))


def test_the_penalties_refuse_it_too(attention):
    params, layouts, _ = attention
    state = mr.init_power_iteration(params, 0, weight_dimension_numbers=layouts)
    precisions = mr.init_adareg_precisions(params, weight_dimension_numbers=layouts)
    for penalty in (
        lambda: mr.spectral_norm_penalty(params, state),
        lambda: mr.adareg_penalty(params, precisions),
        lambda: mr.adareg_update_precisions(params, precisions, lower=0.1, upper=10),
    ):
        with pytest.raises(ValueError, match="'key/kernel'"):
            penalty()


@pytest.mark.parametrize("model", ["attention", "equinox_cnn"])
def test_inferred_layouts_give_the_true_matrices_sigma_and_rank_one_term(
    model, request
):
    params, layouts, matrices = request.getfixturevalue(model)
    sigmas = mr.spectral_norms(params, weight_dimension_numbers=layouts)
    assert set(sigmas) == set(matrices)
    for name, matrix in matrices.items():
        np.testing.assert_allclose(sigmas[name], svd64(matrix)[1][0], rtol=1e-5)
    tx = mr.spectral_norm_regularization(COEFF, weight_dimension_numbers=layouts)
    updates, _ = tx.update(zeros_like(params), tx.init(params), params)
    flat = {
        path_name(p): u for p, u in jax.tree_util.tree_flatten_with_path(updates)[0]
    }
    for name, matrix in matrices.items():
        u, s, vt = svd64(matrix)
        term = COEFF * s[0] * np.outer(u[:, 0], vt[0])
        if model == "equinox_cnn":  # back to (out, in, ...)
            term = term.T.reshape(flat[name].shape)
        np.testing.assert_allclose(
            flat[name], term.reshape(flat[name].shape), rtol=1e-4, atol=1e-6
        )


# ----------------------------------------------------------------------------------
# The bare-array helpers.


@pytest.mark.parametrize(
    "helper", [mr.as_matrix, mr.spectral_norm, mr.singular_values, mr.stable_rank]
)
def test_bare_helpers_refuse_3d_and_keep_the_2d_and_4d_default(helper):
    rng = np.random.default_rng(3)
    stack = jnp.asarray(rng.standard_normal((2, 4, 3)), jnp.float32)
    with pytest.raises(ValueError, match=r"shape \(2, 4, 3\) has no default layout"):
        helper(stack)
    with pytest.raises(ValueError, match="a 5-D leaf may be a 3-D convolution"):
        helper(jnp.ones((1, 1, 1, 2, 3)))
    per_layer = helper(stack, weight_dimension_numbers=M(1, 2))
    assert per_layer.shape[0] == 2
    conv = jnp.asarray(rng.standard_normal((2, 2, 3, 5)), jnp.float32)
    s = svd64(np.asarray(conv).reshape(-1, 5))[1]
    expected = {
        mr.as_matrix: np.asarray(conv).reshape(-1, 5),
        mr.spectral_norm: s[0],
        mr.singular_values: s,
        mr.stable_rank: np.sum(s**2) / s[0] ** 2,
    }[helper]
    np.testing.assert_allclose(helper(conv), expected, rtol=1e-5)


def test_transforms_take_inferred_layouts_of_partitioned_equinox_params():
    # eqx.partition leaves None where the model holds no array: a node with no leaf
    # in the params and in the inferred layouts, not a layout to line up.
    model = eqx.nn.MLP(4, 3, 8, 2, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)

    def fn(p, x):
        return jax.vmap(eqx.combine(p, static))(x)

    layouts = mr.infer_weight_dimension_numbers(fn, params, jnp.ones((5, 4)))
    tx = mr.spectral_norm_regularization(
        1.0, n_power_iterations=200, weight_dimension_numbers=layouts
    )
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    for layer, update in zip(params.layers, updates.layers, strict=True):
        w = np.asarray(layer.weight, np.float64)
        u, s, vt = np.linalg.svd(w)
        np.testing.assert_allclose(
            update.weight, s[0] * np.outer(u[:, 0], vt[0]), atol=1e-5 * s[0]
        )
        np.testing.assert_array_equal(update.bias, 0.0)
