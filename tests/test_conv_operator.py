"""ConvOperator: the spec's normalisation and validation, and the operator's maths
against the dense matrix of the convolution (every basis input pushed through)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from optax.contrib import MuonDimensionNumbers

import margin_regs as mr
from margin_regs import _conv_operator


def test_spec_normalises_to_one_canonical_value():
    equinox = mr.ConvOperator((3, 6, 6), dimension_numbers=("NCHW", "OIHW", "NCHW"))
    numbers = lax.conv_dimension_numbers(
        (1, 3, 6, 6), (4, 3, 3, 3), ("NCHW", "OIHW", "NCHW")
    )
    assert mr.ConvOperator((3, 6, 6), dimension_numbers=numbers) == equinox
    assert equinox.in_channels == 3
    renamed = mr.ConvOperator((6, 6, 2), dimension_numbers=("NXYC", "XYIO", "NXYC"))
    assert renamed == mr.ConvOperator((6, 6, 2))
    assert renamed.dimension_numbers == ("NHWC", "HWIO", "NHWC")
    one_d = mr.ConvOperator((6, 2), strides=2, padding=[[1, 2]], rhs_dilation=(3,))
    assert (one_d.strides, one_d.padding, one_d.rhs_dilation) == ((2,), ((1, 2),), (3,))
    assert one_d.dimension_numbers == ("NWC", "WIO", "NWC")
    assert mr.ConvOperator((4, 4, 4, 2)).dimension_numbers[1] == "DHWIO"
    assert mr.ConvOperator((6, 6, 2), padding="same").padding == "SAME"
    # A pytree leaf (not a container), hashable, so usable as a static layout.
    assert jax.tree.leaves({"w": equinox}) == [equinox]
    assert hash(equinox) == hash(
        mr.ConvOperator((3, 6, 6), (1, 1), "SAME", 1, 1, numbers)
    )


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"input_shape": (6,)}, "input_shape"),
        ({"input_shape": (6, 6, 0)}, "input_shape"),
        ({"input_shape": (6, 6, 2), "strides": 0}, "strides"),
        ({"input_shape": (6, 6, 2), "strides": (1, 2, 1)}, "strides"),
        ({"input_shape": (6, 6, 2), "rhs_dilation": 1.5}, "rhs_dilation"),
        ({"input_shape": (6, 6, 2), "padding": "FULL"}, "padding"),
        ({"input_shape": (6, 6, 2), "padding": [(1, 1)]}, "padding"),
        ({"input_shape": (6, 6, 2), "padding": [(1, -1), (0, 0)]}, "padding"),
        ({"input_shape": (6, 6, 3), "feature_group_count": 2}, "feature_group_count"),
        ({"input_shape": (6, 6, 2), "feature_group_count": 0}, "feature_group_count"),
        (
            {"input_shape": (6, 6, 2), "dimension_numbers": ("NWC",) * 3},
            "dimension_numbers",
        ),
        ({"input_shape": (6, 6, 2), "dimension_numbers": "NHWC"}, "dimension_numbers"),
    ],
)
def test_spec_rejects_bad_arguments_by_name(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        mr.ConvOperator(**kwargs)


# (spec kwargs, kernel shape): every layout and convolution option the operator
# must get right, at sizes whose dense operator matrix is tiny.
CASES = {
    "same": ({"input_shape": (6, 6, 2)}, (3, 3, 2, 3)),
    "valid_stride2": (
        {"input_shape": (6, 6, 2), "strides": 2, "padding": "VALID"},
        (3, 3, 2, 3),
    ),
    "same_stride2_even_kernel": (
        {"input_shape": (6, 6, 2), "strides": (2, 1)},
        (2, 2, 2, 3),
    ),
    "dilated_explicit": (
        {"input_shape": (6, 6, 2), "rhs_dilation": 2, "padding": [(2, 1), (0, 2)]},
        (3, 3, 2, 2),
    ),
    "grouped": ({"input_shape": (6, 6, 4), "feature_group_count": 2}, (3, 3, 2, 4)),
    "depthwise": ({"input_shape": (6, 6, 2), "feature_group_count": 2}, (3, 3, 1, 2)),
    "oihw_dilated_grouped": (
        {
            "input_shape": (2, 6, 6),
            "rhs_dilation": 2,
            "feature_group_count": 2,
            "dimension_numbers": ("NCHW", "OIHW", "NCHW"),
        },
        (4, 1, 3, 3),
    ),
    "1d_same": (
        {"input_shape": (12, 2), "dimension_numbers": ("NWC", "WIO", "NWC")},
        (3, 2, 3),
    ),
    "1d_valid_stride2": (
        {"input_shape": (12, 2), "strides": 2, "padding": "VALID"},
        (4, 2, 3),
    ),
    "3d_same": ({"input_shape": (4, 4, 4, 2)}, (2, 3, 2, 2, 2)),
    "3d_ncdhw_stride2": (
        {
            "input_shape": (2, 4, 4, 4),
            "strides": 2,
            "dimension_numbers": ("NCDHW", "OIDHW", "NCDHW"),
        },
        (3, 2, 3, 3, 3),
    ),
}


def _dense_matrix(kwargs, kernel):
    """The ``(m, n)`` operator matrix: lax's convolution of every basis input.

    Built from the user's own arguments (not the spec's normalised ones), so a
    normalisation mistake in ``ConvOperator`` shows up as a mismatch.
    """
    spec = mr.ConvOperator(**kwargs)
    lhs, _, out = kwargs.get("dimension_numbers", spec.dimension_numbers)
    n = int(np.prod(kwargs["input_shape"]))
    basis = jnp.eye(n).reshape(n, *kwargs["input_shape"])
    y = lax.conv_general_dilated(
        jnp.moveaxis(basis, 0, lhs.index("N")),
        kernel,
        window_strides=spec.strides,
        padding=kwargs.get("padding", "SAME"),
        rhs_dilation=spec.rhs_dilation,
        dimension_numbers=kwargs.get("dimension_numbers", spec.dimension_numbers),
        feature_group_count=kwargs.get("feature_group_count", 1),
    )
    return jnp.moveaxis(y, out.index("N"), 0).reshape(n, -1).T


@functools.partial(jax.jit, static_argnums=0)
def _operator_values(spec, kernel):
    op = spec.operator(kernel.shape)
    return op.singular_values(kernel), op.singular_values(kernel, 3, method="krylov")


@functools.partial(jax.jit, static_argnums=0)
def _operator_products(spec, kernel, v, u):
    op = spec.operator(kernel.shape)
    return (
        op.matvec(kernel, v),
        op.rmatvec(kernel, u),
        op.outer(kernel, u, v),
        op.frobenius_norm(kernel),
    )


@pytest.mark.parametrize("name", CASES)
def test_operator_matches_the_dense_convolution_matrix(name, rng):
    kwargs, kernel_shape = CASES[name]
    spec = mr.ConvOperator(**kwargs)
    kernel = jnp.asarray(rng.normal(size=kernel_shape), jnp.float32)
    dense = np.asarray(_dense_matrix(kwargs, kernel), np.float64)
    op = spec.operator(kernel_shape)
    assert dense.shape == (np.prod(op.out_shape), np.prod(op.in_shape))
    expected = np.linalg.svd(dense, compute_uv=False)

    values, top = _operator_values(spec, kernel)
    # float32 SVD of the exact dense matrix: ~eps·√n·σ₁ (≤ 9e-7·σ₁ measured). Krylov
    # stops when no Ritz value (a lower bound, rising superlinearly) moves by
    # 1e-5·σ₁² in a round, i.e. σ by 5e-6·σ₁ (≤ 4e-7 measured).
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-5 * expected[0])
    np.testing.assert_allclose(top, expected[:3], rtol=1e-5)

    v = rng.normal(size=op.in_shape).astype(np.float32)
    u = rng.normal(size=op.out_shape).astype(np.float32)
    av, atu, grad, frobenius = _operator_products(spec, kernel, v, u)
    np.testing.assert_allclose(av.ravel(), dense @ v.ravel(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(atu.ravel(), dense.T @ u.ravel(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(frobenius, np.linalg.norm(dense), rtol=1e-5)
    # outer: d/dK <u, A(K) v>, differentiated through the dense matrix's construction.
    bilinear = lambda k: u.ravel() @ _dense_matrix(kwargs, k) @ v.ravel()  # noqa: E731
    np.testing.assert_allclose(grad, jax.grad(bilinear)(kernel), rtol=1e-4, atol=1e-4)


def test_krylov_top_values_on_a_clustered_spectrum(rng):
    # SAME padding on a larger input: the top singular values sample |K̂(ω)| near its
    # maximum and come in near-equal pairs, where power iteration stalls.
    kwargs = {"input_shape": (16, 16, 2)}
    kernel = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)
    expected = np.linalg.svd(np.asarray(_dense_matrix(kwargs, kernel), np.float64))[1]
    op = mr.ConvOperator(**kwargs).operator(kernel.shape)
    top = jax.jit(lambda k: op.singular_values(k, 4, method="krylov"))(kernel)
    np.testing.assert_allclose(top, expected[:4], rtol=1e-4)


@pytest.mark.parametrize("scale", [0.0, 1e-20, 1e20])
def test_singular_values_are_scale_safe(scale, rng):
    spec, kernel_shape = mr.ConvOperator(**CASES["same"][0]), CASES["same"][1]
    kernel = jnp.asarray(rng.normal(size=kernel_shape), jnp.float32)
    values, top = _operator_values(spec, kernel)
    scaled_values, scaled_top = _operator_values(spec, kernel * scale)
    np.testing.assert_allclose(scaled_values, values * scale, rtol=1e-5)
    np.testing.assert_allclose(scaled_top, top * scale, rtol=1e-5)
    frobenius = spec.operator(kernel_shape).frobenius_norm
    np.testing.assert_allclose(
        frobenius(kernel * scale), frobenius(kernel) * scale, rtol=1e-5
    )


@pytest.mark.parametrize(
    ("kwargs", "kernel_shape", "match"),
    [
        ({"input_shape": (6, 6, 2)}, (3, 3, 3, 4), "input channels"),
        ({"input_shape": (6, 6, 2)}, (3, 3, 2), "axes"),
        (
            {"input_shape": (6, 6, 4), "feature_group_count": 2},
            (3, 3, 4, 4),
            "input channels",
        ),
        (
            {"input_shape": (6, 6, 4), "feature_group_count": 2},
            (3, 3, 2, 3),
            "multiple",
        ),
        ({"input_shape": (6, 6, 2), "padding": "VALID"}, (7, 3, 2, 4), "empty"),
        (
            {"input_shape": (2, 6, 6), "dimension_numbers": ("NCHW", "OIHW", "NCHW")},
            (3, 3, 2, 4),
            "input channels",
        ),
    ],
)
def test_kernel_that_does_not_fit_the_spec_is_rejected(kwargs, kernel_shape, match):
    with pytest.raises(ValueError, match=match):
        mr.ConvOperator(**kwargs).operator(kernel_shape)


def test_bad_operator_arguments_are_rejected():
    op = mr.ConvOperator((6, 6, 2)).operator((3, 3, 2, 3))
    kernel = jnp.ones((3, 3, 2, 3))
    for k in (0, 73, 1.5):
        with pytest.raises(ValueError, match="k must be"):
            op.singular_values(kernel, k)
    large = mr.ConvOperator((128, 128, 16)).operator((3, 3, 16, 16))
    with pytest.raises(ValueError, match="pass k"):
        large.singular_values(jnp.ones((3, 3, 16, 16)))
    with pytest.raises(ValueError, match="method"):
        op.singular_values(kernel, 1, method="lanczos")
    with pytest.raises(ValueError, match="shape"):
        op.matvec(kernel, jnp.ones((6, 6, 3)))


def test_operator_is_the_flax_and_equinox_layer_without_bias(rng):
    import equinox as eqx
    import flax.linen as nn

    x = rng.normal(size=(7, 7, 2)).astype(np.float32)
    layer = nn.Conv(4, (3, 3), strides=2, kernel_dilation=2, feature_group_count=2)
    params = layer.init(jax.random.key(0), x[None])["params"]
    spec = mr.ConvOperator(x.shape, strides=2, rhs_dilation=2, feature_group_count=2)
    op = spec.operator(params["kernel"].shape)
    flax_out = layer.apply({"params": params}, x[None])[0] - params["bias"]
    np.testing.assert_allclose(op.matvec(params["kernel"], x), flax_out, atol=1e-5)

    conv = eqx.nn.Conv2d(
        2, 4, 3, stride=2, padding=1, use_bias=False, key=jax.random.key(1)
    )
    x_chw = np.moveaxis(x, -1, 0)
    numbers = ("NCHW", "OIHW", "NCHW")
    spec = mr.ConvOperator(x_chw.shape, 2, [(1, 1)] * 2, dimension_numbers=numbers)
    op = spec.operator(conv.weight.shape)
    np.testing.assert_allclose(op.matvec(conv.weight, x_chw), conv(x_chw), atol=1e-5)


def test_stable_rank_and_spectrum_beyond_the_dense_svd(rng, monkeypatch):
    # The size limits shrunk so that a small operator (288 inputs x 432 outputs)
    # takes the large-operator path: spectrum() gives the top values by Krylov
    # iteration and stable_rank() uses the exact Frobenius norm.
    monkeypatch.setattr(_conv_operator, "_DENSE_FLOPS", 1000)
    monkeypatch.setattr(_conv_operator, "_SPECTRUM_TOP_K", 8)
    kwargs = {"input_shape": (12, 12, 2)}
    kernel = jnp.asarray(rng.normal(size=(3, 3, 2, 3)), jnp.float32)
    expected = np.linalg.svd(np.asarray(_dense_matrix(kwargs, kernel), np.float64))[1]
    op = mr.ConvOperator(**kwargs).operator(kernel.shape)
    spectrum, rank = jax.jit(lambda k: (op.spectrum(k), op.stable_rank(k)))(kernel)
    np.testing.assert_allclose(spectrum, expected[:8], rtol=1e-4)
    np.testing.assert_allclose(rank, np.sum(expected**2) / expected[0] ** 2, rtol=1e-4)


# Phase 2: the methods and diagnostics on ConvOperator leaves. A small network: a
# strided VALID convolution (its top singular value is well separated, so power
# iteration converges) and a dense layer with its default (matrix) layout.
NET_CONV = CASES["valid_stride2"]
NET_LAYOUTS = {
    "conv": {"kernel": mr.ConvOperator(**NET_CONV[0]), "bias": None},
    "dense": {"kernel": MuonDimensionNumbers(0, 1), "bias": None},
}


def _net_params(rng):
    return {
        "conv": {
            "kernel": jnp.asarray(rng.normal(size=NET_CONV[1]), jnp.float32),
            "bias": jnp.zeros(NET_CONV[1][-1]),
        },
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(12, 5)), jnp.float32),
            "bias": jnp.zeros(5),
        },
    }


def _dense_sigma(kernel):
    return jnp.linalg.svd(_dense_matrix(NET_CONV[0], kernel), compute_uv=False)[0]


def test_net_conv_top_singular_value_is_separated(rng):
    # The precondition of the exact-gradient tests below: σ₁ is simple.
    s = np.linalg.svd(
        np.asarray(_dense_matrix(NET_CONV[0], _net_params(rng)["conv"]["kernel"])),
        compute_uv=False,
    )
    assert s[0] > 1.05 * s[1]


def test_spectral_transform_step_is_the_gradient_of_the_operator_norm(rng):
    params, coeff = _net_params(rng), 0.3
    tx = mr.spectral_norm_regularization(coeff, weight_dimension_numbers=NET_LAYOUTS)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    kernel = params["conv"]["kernel"]
    expected = jax.grad(lambda k: coeff / 2 * _dense_sigma(k) ** 2)(kernel)
    np.testing.assert_allclose(
        updates["conv"]["kernel"],
        expected,
        rtol=1e-4,
        atol=1e-4 * np.abs(expected).max(),
    )
    dense = params["dense"]["kernel"]
    expected = jax.grad(lambda k: coeff / 2 * jnp.linalg.norm(k, 2) ** 2)(dense)
    np.testing.assert_allclose(
        updates["dense"]["kernel"], expected, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_array_equal(updates["conv"]["bias"], 0.0)


def test_spectral_penalty_and_transform_agree(rng):
    params, coeff = _net_params(rng), 0.3
    tx = mr.spectral_norm_regularization(
        coeff, weight_dimension_numbers=NET_LAYOUTS, key=3
    )
    state = mr.init_power_iteration(params, 3, weight_dimension_numbers=NET_LAYOUTS)

    def penalty(p):
        value, new = mr.spectral_norm_penalty(
            p, state, weight_dimension_numbers=NET_LAYOUTS
        )
        return coeff * value, new

    (value, _), grads = jax.jit(jax.value_and_grad(penalty, has_aux=True))(params)
    np.testing.assert_allclose(
        value,
        coeff
        / 2
        * (
            _dense_sigma(params["conv"]["kernel"]) ** 2
            + jnp.linalg.norm(params["dense"]["kernel"], 2) ** 2
        ),
        rtol=1e-4,
    )
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_eigenvalue_decay_on_operators(rng):
    params, coeff = _net_params(rng), 0.2
    # Shifted for a dominant σ₁ (σ₂/σ₁ = 0.82): 30 of the seed's unrolled
    # iterations then converge to float32 precision.
    params["conv"]["kernel"] = kernel = params["conv"]["kernel"] + 1.0
    expected = jax.grad(lambda k: coeff * _dense_sigma(k))(kernel)
    tx = mr.eigenvalue_decay(coeff, weight_dimension_numbers=NET_LAYOUTS)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    np.testing.assert_allclose(
        updates["conv"]["kernel"],
        expected,
        rtol=1e-4,
        atol=1e-4 * np.abs(expected).max(),
    )
    conv_only = {"conv": NET_LAYOUTS["conv"], "dense": None}

    def penalty(p):
        value = mr.eigenvalue_decay_penalty(
            p, n_power_iterations=30, weight_dimension_numbers=conv_only
        )
        return coeff * value

    value, grads = jax.value_and_grad(penalty)(params)
    np.testing.assert_allclose(value, coeff * _dense_sigma(kernel), rtol=1e-5)
    # 30 iterations at (σ₂/σ₁)² = 0.67 leave 0.67³⁰ ≈ 6e-6 of the start's off-top
    # component; the gradient agrees to 2e-7 of its max (measured).
    np.testing.assert_allclose(
        grads["conv"]["kernel"], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max()
    )


def test_diagnostics_on_operators(rng):
    params = _net_params(rng)
    kernel = params["conv"]["kernel"]
    dense = np.asarray(_dense_matrix(NET_CONV[0], kernel), np.float64)
    s = np.linalg.svd(dense, compute_uv=False)
    norms = mr.spectral_norms(params, weight_dimension_numbers=NET_LAYOUTS)
    np.testing.assert_allclose(norms["conv/kernel"], s[0], rtol=1e-4)
    spectra = mr.singular_value_spectra(params, weight_dimension_numbers=NET_LAYOUTS)
    np.testing.assert_allclose(spectra["conv/kernel"], s, rtol=1e-4, atol=1e-4 * s[0])
    ranks = mr.stable_ranks(params, weight_dimension_numbers=NET_LAYOUTS)
    np.testing.assert_allclose(
        ranks["conv/kernel"], np.sum(s**2) / s[0] ** 2, rtol=1e-4
    )


def test_margin_bounds_use_operator_norms_and_warn_about_reshaped_kernels(rng):
    params = _net_params(rng)
    margins = jnp.array([2.0, -1.0, 0.5])
    bounds = mr.margin_lower_bounds(
        margins, params, weight_dimension_numbers=NET_LAYOUTS
    )
    dense = np.asarray(_dense_matrix(NET_CONV[0], params["conv"]["kernel"]), np.float64)
    classifier = np.asarray(params["dense"]["kernel"], np.float64)
    clipped = np.maximum(np.asarray(margins), 0.0) / np.sqrt(2.0)
    spectral = np.linalg.norm(dense, 2) * np.linalg.norm(classifier, 2)
    frobenius = np.linalg.norm(dense) * np.linalg.norm(classifier)
    np.testing.assert_allclose(bounds["spectral"], clipped / spectral, rtol=1e-4)
    np.testing.assert_allclose(bounds["frobenius"], clipped / frobenius, rtol=1e-4)
    with pytest.warns(UserWarning, match="conv/kernel"):
        mr.margin_lower_bounds(margins, params)


def test_matrix_only_methods_reject_operators_by_path(rng):
    params = _net_params(rng)
    with pytest.raises(ValueError, match="conv/kernel"):
        mr.max_norm_constraint(1.0, weight_dimension_numbers=NET_LAYOUTS).init(params)
    with pytest.raises(ValueError, match="ConvOperator"):
        mr.as_matrix(
            params["conv"]["kernel"],
            weight_dimension_numbers=NET_LAYOUTS["conv"]["kernel"],
        )
    wrong = {
        "conv": {"kernel": mr.ConvOperator((6, 6, 3)), "bias": None},
        "dense": None,
    }
    with pytest.raises(ValueError, match=r"conv/kernel.*input channels"):
        mr.spectral_norm_regularization(0.1, weight_dimension_numbers=wrong).init(
            params
        )


def test_inferred_operators_drive_the_methods_end_to_end():
    # flax linen: a strided conv, max-pool and a classifier, layouts read by infer;
    # the conv's update is the gradient of coeff/2 σ² of its dense operator.
    import equinox as eqx
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(3, (3, 3), strides=2, padding="VALID")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            return nn.Dense(4)(x.reshape(x.shape[0], -1))

    x = jnp.ones((1, 9, 9, 2))
    params = Net().init(jax.random.key(0), x)["params"]
    # Shifted so that σ₁ is simple (σ₂/σ₁ = 0.9; at init the top two differ by
    # 0.1%, where σ's gradient is ill-conditioned and power iteration mixes them).
    params["Conv_0"]["kernel"] = params["Conv_0"]["kernel"] + 0.3
    layouts = mr.infer_weight_dimension_numbers(
        lambda p, x: Net().apply({"params": p}, x), params, x, conv="operator"
    )
    spec = layouts["Conv_0"]["kernel"]
    assert spec == mr.ConvOperator((9, 9, 2), 2, ((0, 0), (0, 0)))
    kwargs = {"input_shape": (9, 9, 2), "strides": 2, "padding": "VALID"}
    tx = mr.spectral_norm_regularization(0.5, weight_dimension_numbers=layouts)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    kernel = params["Conv_0"]["kernel"]

    def dense_penalty(k):
        return 0.25 * jnp.linalg.norm(_dense_matrix(kwargs, k), 2) ** 2

    expected = jax.grad(dense_penalty)(kernel)
    np.testing.assert_allclose(
        updates["Conv_0"]["kernel"], expected, atol=1e-4 * np.abs(expected).max()
    )

    # equinox: an OIHW kernel with explicit padding, σ against the dense operator.
    conv = eqx.nn.Conv2d(2, 3, 3, padding=1, key=jax.random.key(1))
    weights, static = eqx.partition(conv, eqx.is_array)
    sample = jnp.ones((2, 5, 5))
    layouts = mr.infer_weight_dimension_numbers(
        lambda p, x: eqx.combine(p, static)(x), weights, sample, conv="operator"
    )
    # Passed through a function: the layouts tree is itself an (callable) equinox
    # module, which weight_dimension_numbers would take for a params -> tree function.
    norms = mr.spectral_norms(weights, weight_dimension_numbers=lambda _: layouts)
    numbers = ("NCHW", "OIHW", "NCHW")
    kwargs = {
        "input_shape": (2, 5, 5),
        "padding": [(1, 1)] * 2,
        "dimension_numbers": numbers,
    }
    dense = np.asarray(_dense_matrix(kwargs, conv.weight), np.float64)
    np.testing.assert_allclose(norms["weight"], np.linalg.norm(dense, 2), rtol=1e-4)


def test_warm_start_is_exact_on_a_clustered_spectrum(rng):
    # σ₂/σ₁ = 0.99999: from a random vector, power iteration mixes the two and ends
    # 6e-6 low in σ; from the top singular vector it starts exact.
    kwargs = {"input_shape": (20, 20, 1)}
    kernel = jnp.asarray(rng.normal(size=(5, 5, 1, 8)), jnp.float32)
    expected = np.linalg.svd(np.asarray(_dense_matrix(kwargs, kernel), np.float64))[1]
    assert expected[1] > (1 - 1e-4) * expected[0]
    params = {"conv": {"kernel": kernel}}
    layouts = {"conv": {"kernel": mr.ConvOperator(**kwargs)}}
    state = mr.init_power_iteration(params, 0, weight_dimension_numbers=layouts)
    value, _ = mr.spectral_norm_penalty(params, state, weight_dimension_numbers=layouts)
    # 4e-6 in ½σ² is 2e-6 in σ: float32 rounding of the operator (2.6e-6 measured at
    # the jax floor), a third of what a random start leaves (1.2e-5 in ½σ²).
    np.testing.assert_allclose(value, expected[0] ** 2 / 2, rtol=4e-6)
