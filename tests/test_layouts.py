"""Weight layouts: every method regularizes the matrices a layout names, checked
against float64 ``np.linalg.svd`` of the correctly reshaped matrices.

Layouts covered: flax attention (DenseGeneral) q/k/v/out kernels, a scanned stack
``(layers, in, out)``, equinox Linear ``(out, in)`` and Conv2d ``(out, in, kh, kw)``;
the default mask by name; bad layouts naming the leaf; XLA's cost model for the
fused rank-one term on a stack.
"""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import MuonDimensionNumbers as M

import margin_regs as mr
from margin_regs import _layouts, _tree

COEFF = 0.3


def svd64(matrix):
    return np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)


def rank_one(matrix):
    """σ u vᵀ of a float64 matrix."""
    u, s, vt = svd64(matrix)
    return s[0] * np.outer(u[:, 0], vt[0])


@pytest.fixture(scope="module")
def attention():
    model = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
    x = jnp.ones((1, 3, 6))
    params = model.init(jax.random.key(0), x)["params"]
    layouts = {
        name: {"kernel": M((0,), (1, 2)), "bias": None}
        for name in ("query", "key", "value")
    }
    layouts["out"] = {"kernel": M((0, 1), (2,)), "bias": None}
    return params, layouts


def attention_matrix(name, kernel):
    k = np.asarray(kernel, np.float64)
    # out: (heads, head_dim, out) -> (heads·head_dim, out); q/k/v: (in, heads·head_dim)
    return k.reshape(-1, k.shape[-1]) if name == "out" else k.reshape(k.shape[0], -1)


def stack_params(rng, layers=3):
    return {
        "stack": {
            "kernel": jnp.asarray(rng.standard_normal((layers, 5, 4)), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal((layers, 4)), jnp.float32),
        },
        "head": {"kernel": jnp.asarray(rng.standard_normal((4, 2)), jnp.float32)},
    }


STACK_WDN = {"stack": {"kernel": M(1, 2), "bias": None}, "head": {"kernel": M()}}


def stack_wdn(params):
    return {"stack": {"kernel": M(1, 2), "bias": None}, "head": {"kernel": M()}}


update_step = jax.jit(lambda tx, g, s, p: tx.update(g, s, p), static_argnums=0)


def test_attention_kernels_are_the_dense_general_maps(attention):
    params, layouts = attention
    norms = mr.spectral_norms(params, weight_dimension_numbers=layouts)
    spectra = mr.singular_value_spectra(params, weight_dimension_numbers=layouts)
    assert set(norms) == {f"{n}/kernel" for n in ("query", "key", "value", "out")}
    for name in ("query", "key", "value", "out"):
        s = svd64(attention_matrix(name, params[name]["kernel"]))[1]
        np.testing.assert_allclose(norms[f"{name}/kernel"], s[0], rtol=1e-5)
        np.testing.assert_allclose(spectra[f"{name}/kernel"], s, rtol=1e-5, atol=1e-6)
    tx = mr.spectral_norm_regularization(COEFF, weight_dimension_numbers=layouts)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    for name in ("query", "key", "value", "out"):
        kernel = params[name]["kernel"]
        expected = COEFF * rank_one(attention_matrix(name, kernel))
        np.testing.assert_allclose(
            updates[name]["kernel"], expected.reshape(kernel.shape), atol=1e-5
        )
        np.testing.assert_array_equal(updates[name]["bias"], 0.0)


def test_default_mask_leaves_attention_biases_alone(attention):
    params, _ = attention
    selected = jax.tree_util.tree_flatten_with_path(_tree.default_mask(params))[0]
    # (heads, head_dim) biases are 2-D but named bias: never regularized by default.
    assert {_tree.path_name(p) for p, s in selected if s} == {
        f"{n}/kernel" for n in ("query", "key", "value", "out")
    }


def test_scanned_stack_gets_per_layer_sigma_and_rank_one_terms(rng):
    params = stack_params(rng)
    kernel = np.asarray(params["stack"]["kernel"], np.float64)
    layer_sigmas = [svd64(k)[1][0] for k in kernel]
    norms = mr.spectral_norms(params, weight_dimension_numbers=STACK_WDN)
    assert norms["stack/kernel"].shape == (3,)
    np.testing.assert_allclose(norms["stack/kernel"], layer_sigmas, rtol=1e-5)
    ranks = mr.stable_ranks(params, weight_dimension_numbers=STACK_WDN)
    expected = [np.sum(svd64(k)[1] ** 2) / svd64(k)[1][0] ** 2 for k in kernel]
    np.testing.assert_allclose(ranks["stack/kernel"], expected, rtol=1e-5)
    for factory, term, wdn in (
        (mr.spectral_norm_regularization, rank_one, STACK_WDN),
        # A callable, as optax muon takes it.
        (mr.eigenvalue_decay, lambda k: rank_one(k) / svd64(k)[1][0], stack_wdn),
    ):
        tx = factory(COEFF, weight_dimension_numbers=wdn)
        grads = jax.tree.map(jnp.ones_like, params)
        state = tx.init(params)
        assert state.inner_state.vectors["stack"]["kernel"].shape == (3, 4)
        updates, _ = update_step(tx, grads, state, params)
        added = np.asarray(updates["stack"]["kernel"]) - 1.0
        for layer in range(3):
            np.testing.assert_allclose(
                added[layer], COEFF * term(kernel[layer]), atol=1e-5
            )
        np.testing.assert_array_equal(updates["stack"]["bias"], 1.0)


def test_layouts_are_static_args_under_inject_hyperparams(rng):
    params = stack_params(rng)
    grads = jax.tree.map(jnp.ones_like, params)
    tx = optax.inject_hyperparams(
        mr.spectral_norm_regularization,
        static_args=("n_power_iterations", "key", "mask", "weight_dimension_numbers"),
    )(coeff=COEFF, weight_dimension_numbers=STACK_WDN)
    got, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    plain = mr.spectral_norm_regularization(COEFF, weight_dimension_numbers=STACK_WDN)
    want, _ = update_step(plain, grads, plain.init(params), params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_stack_penalties_agree_with_the_transform_and_the_svd(rng):
    params = stack_params(rng)
    kernel = np.asarray(params["stack"]["kernel"], np.float64)
    wdn = STACK_WDN
    state = mr.init_power_iteration(params, 0, weight_dimension_numbers=wdn)
    value, _ = mr.spectral_norm_penalty(params, state, weight_dimension_numbers=wdn)
    sigmas = [svd64(k)[1][0] for k in kernel] + [svd64(params["head"]["kernel"])[1][0]]
    np.testing.assert_allclose(value, 0.5 * np.sum(np.square(sigmas)), rtol=1e-4)

    def objective(p, s):
        return COEFF * mr.spectral_norm_penalty(p, s, weight_dimension_numbers=wdn)[0]

    grads = jax.grad(objective)(params, state)
    tx = mr.spectral_norm_regularization(COEFF, weight_dimension_numbers=wdn)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(updates), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # Eigenvalue Decay's seed penalty: Σ of per-layer σ once its 9 iterations
    # converge; here with 60, so that the comparison is exact to float32.
    ed = mr.eigenvalue_decay_penalty(
        params, n_power_iterations=60, weight_dimension_numbers=wdn
    )
    np.testing.assert_allclose(ed, np.sum(sigmas), rtol=1e-4)


def test_margin_bounds_multiply_every_layer_of_a_stack(rng):
    params = stack_params(rng)
    matrices = [*np.asarray(params["stack"]["kernel"]), params["head"]["kernel"]]
    spectral = np.prod([svd64(m)[1][0] for m in matrices])
    frobenius = np.prod([np.linalg.norm(np.asarray(m, np.float64)) for m in matrices])
    bounds = mr.margin_lower_bounds(
        jnp.array([1.0, -1.0]), params, weight_dimension_numbers=STACK_WDN
    )
    np.testing.assert_allclose(
        bounds["spectral"], [1 / (np.sqrt(2) * spectral), 0], rtol=1e-5
    )
    np.testing.assert_allclose(
        bounds["frobenius"], [1 / (np.sqrt(2) * frobenius), 0], rtol=1e-5
    )


def test_max_norm_projects_each_layer_and_leaves_biases(rng):
    params = stack_params(rng)
    tx = mr.max_norm_constraint(1.0, weight_dimension_numbers=STACK_WDN)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    norms = np.linalg.norm(np.asarray(new["stack"]["kernel"], np.float64), axis=1)
    old = np.linalg.norm(np.asarray(params["stack"]["kernel"], np.float64), axis=1)
    np.testing.assert_allclose(norms, np.minimum(old, 1.0), rtol=1e-5)
    np.testing.assert_array_equal(new["stack"]["bias"], params["stack"]["bias"])


class EqxNet(eqx.Module):
    embed: eqx.nn.Embedding
    conv: eqx.nn.Conv2d
    linear: eqx.nn.Linear
    norm: eqx.nn.LayerNorm

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.embed = eqx.nn.Embedding(7, 4, key=k1)
        self.conv = eqx.nn.Conv2d(2, 3, 2, key=k2)
        self.linear = eqx.nn.Linear(5, 3, key=k3)
        self.norm = eqx.nn.LayerNorm(3)


def eqx_layouts(params):
    """Equinox keeps fan-out first: Linear (out, in), Conv2d (out, in, kh, kw)."""

    def layout(path, x):
        is_weight = x.ndim >= 2 and path[-1] == jax.tree_util.GetAttrKey("weight")
        return M(tuple(range(1, x.ndim)), 0) if is_weight else None

    return jax.tree_util.tree_map_with_path(layout, params)


@pytest.fixture(scope="module")
def eqx_params():
    params = eqx.filter(EqxNet(jax.random.key(0)), eqx.is_array)
    return eqx.tree_at(lambda n: n.embed, params, replace=None), params


def test_default_mask_skips_equinox_embeddings_and_conv_biases(eqx_params):
    _, params = eqx_params
    assert params.conv.bias.shape == (3, 1, 1)
    selected = jax.tree_util.tree_flatten_with_path(_tree.default_mask(params))[0]
    assert {_tree.path_name(p) for p, s in selected if s} == {
        "conv/weight",
        "linear/weight",
    }


def test_equinox_linear_and_conv_are_their_fan_out_first_matrices(eqx_params):
    params, _ = eqx_params
    norms = mr.spectral_norms(params, weight_dimension_numbers=eqx_layouts)
    for name in ("linear", "conv"):
        weight = np.asarray(getattr(params, name).weight, np.float64)
        matrix = weight.reshape(weight.shape[0], -1).T
        np.testing.assert_allclose(
            norms[f"{name}/weight"], svd64(matrix)[1][0], rtol=1e-5
        )
    state = mr.init_power_iteration(params, 0, weight_dimension_numbers=eqx_layouts)
    grads = jax.grad(
        lambda p: mr.spectral_norm_penalty(
            p, state, weight_dimension_numbers=eqx_layouts
        )[0]
    )(params)
    for name in ("linear", "conv"):
        weight = np.asarray(getattr(params, name).weight, np.float64)
        matrix = weight.reshape(weight.shape[0], -1).T
        expected = rank_one(matrix).T.reshape(weight.shape)
        np.testing.assert_allclose(getattr(grads, name).weight, expected, atol=1e-5)
        np.testing.assert_array_equal(getattr(grads, name).bias, 0.0)


@pytest.mark.parametrize("name", ["bias", "b", "scale", "embedding", "embeddings"])
@pytest.mark.parametrize("shape", [(3,), (3, 4), (2, 3, 4), (3, 1, 1)])
def test_default_mask_never_selects_non_weights_by_name(name, shape):
    params = {"layer": {name: jnp.ones(shape), "kernel": jnp.ones((3, 4))}}
    assert mr.spectral_norms(params).keys() == {"layer/kernel"}
    assert mr.l1_penalty(params) == 12.0
    # An explicit layout still regularizes it, the user's choice.
    if len(shape) >= 2:
        wdn = {"layer": {name: M(), "kernel": None}}
        assert list(mr.spectral_norms(params, weight_dimension_numbers=wdn)) == [
            f"layer/{name}"
        ]


def test_as_matrix_is_optax_muons_reshape():
    kernel = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5)
    layout = M((3, 1), (0,))
    view = mr.as_matrix(kernel, weight_dimension_numbers=layout)
    expected = np.transpose(np.asarray(kernel), (2, 3, 1, 0)).reshape(4, 15, 2)
    np.testing.assert_array_equal(view, expected)
    op = _layouts.make_operator(layout, kernel.shape)
    np.testing.assert_array_equal(op.unview(view), kernel)
    s = mr.singular_values(kernel, weight_dimension_numbers=layout)
    np.testing.assert_allclose(s, [svd64(m)[1] for m in expected], rtol=1e-5)


@pytest.mark.parametrize(
    ("layout", "match"),
    [
        (M(0, 0), "overlap"),
        (M(0, 2), "out of range"),
        (M((0, 1), ()), "no output_axis"),
        (M((), 1), "no reduction_axis"),
        (M((0, 0), 1), "repeats"),
    ],
)
def test_bad_layouts_name_the_leaf(layout, match):
    params = {"dense": {"kernel": jnp.ones((3, 4))}}
    wdn = {"dense": {"kernel": layout}}
    with pytest.raises(ValueError, match=rf"'dense/kernel'.*{match}|{match}.*"):
        mr.init_power_iteration(params, 0, weight_dimension_numbers=wdn)
    with pytest.raises(ValueError, match="dense/kernel"):
        mr.spectral_norms(params, weight_dimension_numbers=wdn)


def test_a_tree_that_does_not_match_names_the_first_mismatch():
    params = {
        "a": jnp.ones((2, 2)),
        "b": {"kernel": jnp.ones((2, 2))},
        "c": jnp.ones(2),
    }
    with pytest.raises(ValueError, match="'b/kernel'"):
        mr.spectral_norms(params, weight_dimension_numbers={"a": M(), "c": None})
    with pytest.raises(ValueError, match="'d'"):
        mr.spectral_norms(
            params, weight_dimension_numbers={"a": M(), "b": None, "c": None, "d": None}
        )
    # A prefix is broadcast: a subtree of None leaves the whole subtree out.
    norms = mr.spectral_norms(
        params, weight_dimension_numbers={"a": M(), "b": None, "c": None}
    )
    assert list(norms) == ["a"]


def test_a_layout_selecting_a_vector_names_it():
    with pytest.raises(ValueError, match=r"'c'.*ndim < 2"):
        mr.spectral_norms({"c": jnp.ones(3)}, weight_dimension_numbers={"c": M()})


def bytes_accessed(fn, *args):
    costs = jax.jit(fn).lower(*args).compile().cost_analysis()
    costs = costs[0] if isinstance(costs, list) else costs
    return float(costs["bytes accessed"])


def test_transform_on_a_stack_reads_each_kernel_twice_and_fuses_the_update():
    """K v and Kᵀ u read each layer once each; σ u vᵀ fuses into the SGD update.

    Big enough layers that the vector work (a few reads of u and v) is noise; a
    batch axis between the matrix axes would cost a transposed copy, a leading
    one (as ``nn.scan`` stacks layers) costs nothing.
    """
    params = {"stack": jnp.ones((4, 256, 256)) / 10}
    wdn = {"stack": M(1, 2)}
    tx = mr.spectral_norm_regularization(0.1, weight_dimension_numbers=wdn)
    state = tx.init(params)

    def plain(p, g):
        return jax.tree.map(lambda a, b: a - 0.1 * b, p, g)

    def regularized(p, g, s):
        updates, s = tx.update(g, s, p)
        return plain(p, updates), s

    kernel_bytes = params["stack"].size * 4
    extra = bytes_accessed(regularized, params, params, state) - bytes_accessed(
        plain, params, params
    )
    assert 1.9 * kernel_bytes < extra < 2.2 * kernel_bytes
