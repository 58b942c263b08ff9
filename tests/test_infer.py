"""Layout inference: exact dimension numbers per model family, and proof that the
matrix each inferred layout names is the linear map the model applies.

Every family is checked twice, independently: the inferred
``MuonDimensionNumbers`` equal the hand-derived ones, and the float64 matrix built
from the layout by transpose + reshape (``_matrix``, written here from the layout
semantics, not taken from the library) reproduces the layer's output on random
input. Conv operators are checked by running the convolution they describe.
"""

import math

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax
from optax.contrib import MuonDimensionNumbers as Dims

import margin_regs as mr

infer = mr.infer_weight_dimension_numbers


def _matrix(leaf, dims):
    """The ``(*batch, fan_in, fan_out)`` matrices a normalised layout names."""
    leaf = np.asarray(leaf, np.float64)
    red, out = dims
    batch = [a for a in range(leaf.ndim) if a not in red + out]
    view = leaf.transpose(batch + list(red) + list(out))
    sizes = [math.prod(leaf.shape[a] for a in axes) for axes in (red, out)]
    return view.reshape(*(leaf.shape[a] for a in batch), *sizes)


def _assert_maps(x_rows, leaf, dims, y_rows):
    """``x_rows @ matrix == y_rows`` (rows: one flattened input/output each)."""
    got = np.asarray(x_rows, np.float64) @ _matrix(leaf, dims)
    np.testing.assert_allclose(got, np.asarray(y_rows), rtol=1e-5, atol=2e-5)


def _rank_one(matrix):
    """``σ u vᵀ`` of a matrix, from its float64 SVD."""
    u, s, vt = np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)
    return s[0] * np.outer(u[:, 0], vt[0])


def _normal(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


def _patches(x, kh, kw, channels_last):
    """Stride-1 VALID patches, flattened in the kernel's (reduction) axis order."""
    x = np.asarray(x, np.float64)
    if not channels_last:  # NCHW -> NHWC for slicing, patches flattened (C, kh, kw)
        x = x.transpose(0, 2, 3, 1)
    b, h, w, _ = x.shape
    rows = []
    for i in range(h - kh + 1):
        for j in range(w - kw + 1):
            patch = x[:, i : i + kh, j : j + kw, :]
            if not channels_last:
                patch = patch.transpose(0, 3, 1, 2)
            rows.append(patch.reshape(b, -1))
    return np.stack(rows, axis=1)  # (batch, positions, kh*kw*c)


# A plain function and every wrapper the reader follows.


def test_plain_function_transposed_weight():
    params = {"weight": _normal((3, 4)), "bias": _normal((3,), 1)}
    x = _normal((5, 4), 2)

    def fn(p, x):
        return x @ p["weight"].T + p["bias"]

    dims = infer(fn, params, x)
    assert dims == {"weight": Dims((1,), (0,)), "bias": None}
    _assert_maps(x, params["weight"], dims["weight"], fn(params, x) - params["bias"])


def _wrapped(p, x):
    """One use per leaf, each through a different construct the reader follows."""
    x = jax.jit(lambda w, x: x @ w.astype(jnp.bfloat16).T)(p["jit_cast_t"], x)
    x = x.astype(jnp.float32)

    @jax.custom_vjp
    def vjp_matmul(w, x):
        return x @ w

    vjp_matmul.defvjp(lambda w, x: (x @ w, (w, x)), lambda res, g: (None, None))

    @jax.custom_jvp
    def jvp_matmul(w, x):
        return x @ w

    jvp_matmul.defjvp(lambda primals, tangents: (jvp_matmul(*primals),) * 2)
    x = vjp_matmul(p["custom_vjp"], x)
    x = jvp_matmul(p["custom_jvp"], x)
    x = jax.checkpoint(lambda w, x: x @ w)(p["remat"], x)
    x = jax.lax.fori_loop(0, 2, lambda i, x: x @ p["fori_const"], x)
    x = jax.lax.cond(x.sum() > 0, lambda x: x @ p["cond"], lambda x: x, x)
    x = jax.lax.while_loop(
        lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1] @ p["while"]), (0, x)
    )[1]
    x = jnp.einsum("bhd,hdo->bo", x.reshape(-1, 2, 2), p["einsum"])
    x = x @ p["merged"].reshape(4, 4)  # (2, 2, 4): two axes merged into fan_in
    x = x @ jnp.expand_dims(p["squeezed"], 0)[0]
    x = x @ (2.0 * p["scaled"])  # a matmul reached only through an elementwise op
    return x @ p["bias"]


def test_follows_casts_calls_custom_derivatives_and_loops():
    params = {
        name: _normal(shape, k)
        for k, (name, shape) in enumerate(
            {
                "jit_cast_t": (4, 4),
                "custom_vjp": (4, 4),
                "custom_jvp": (4, 4),
                "remat": (4, 4),
                "fori_const": (4, 4),
                "cond": (4, 4),
                "while": (4, 4),
                "einsum": (2, 2, 4),
                "merged": (2, 2, 4),
                "squeezed": (4, 4),
                "scaled": (4, 4),
                "bias": (4, 4),
            }.items()
        )
    }
    dims = infer(_wrapped, params, jnp.ones((3, 4)))
    matrix = Dims((0,), (1,))
    assert dims == {
        "jit_cast_t": Dims((1,), (0,)),
        "custom_vjp": matrix,
        "custom_jvp": matrix,
        "remat": matrix,
        "fori_const": matrix,
        "cond": matrix,
        "while": matrix,
        "einsum": Dims((0, 1), (2,)),
        "merged": Dims((0, 1), (2,)),
        "squeezed": matrix,
        "scaled": None,  # not followed through `2.0 *` (documented limitation)
        "bias": None,  # excluded by name even though a matmul consumes it
    }


def test_tied_weight_used_the_same_way_twice():
    params = {"tied": _normal((4, 4))}
    dims = infer(lambda p, x: x @ p["tied"] @ p["tied"], params, jnp.ones((2, 4)))
    assert dims == {"tied": Dims((0,), (1,))}


def test_vmap_over_a_weight_stack():
    params = {"w": _normal((3, 4, 5))}
    xs = _normal((3, 2, 4), 1)

    def mapped(p, xs):  # each layer its own input: separate matrices
        return jax.vmap(lambda w, x: x @ w)(p["w"], xs)

    dims = infer(mapped, params, xs)["w"]
    assert dims == Dims((1,), (2,))
    y = mapped(params, xs)
    for b in range(3):
        got = np.asarray(xs[b], np.float64) @ _matrix(params["w"], dims)[b]
        np.testing.assert_allclose(got, y[b], rtol=1e-5, atol=2e-5)

    def shared(p, x):  # one input for all: the stack is one wide (4, 3*5) map
        return jax.vmap(lambda w: x @ w)(p["w"])

    dims = infer(shared, params, xs[0])["w"]
    assert dims == Dims((1,), (0, 2))
    y = shared(params, xs[0])  # (3, 2, 5)
    _assert_maps(xs[0], params["w"], dims, y.transpose(1, 0, 2).reshape(2, -1))


# flax linen.

X = _normal((2, 3, 4), 7)  # (batch, length, features)


def test_linen_dense():
    model = nn.Dense(5, use_bias=False)
    params = model.init(jax.random.key(0), X)
    dims = infer(model.apply, params, X)
    assert dims == {"params": {"kernel": Dims((0,), (1,))}}
    kernel = params["params"]["kernel"]
    y = model.apply(params, X)
    _assert_maps(X.reshape(-1, 4), kernel, dims["params"]["kernel"], y.reshape(-1, 5))


def test_linen_dense_general_multi_axis_and_batch_dims():
    multi = nn.DenseGeneral((2, 5), axis=(-2, -1), use_bias=False)
    params = multi.init(jax.random.key(0), X)
    dims = infer(multi.apply, params, X)["params"]["kernel"]
    assert dims == Dims((0, 1), (2, 3))  # kernel (3, 4, 2, 5)
    y = multi.apply(params, X)
    _assert_maps(X.reshape(2, -1), params["params"]["kernel"], dims, y.reshape(2, -1))

    batched = nn.DenseGeneral(5, axis=-1, batch_dims=(0,), use_bias=False)
    params = batched.init(jax.random.key(0), X)
    dims = infer(batched.apply, params, X)["params"]["kernel"]
    assert dims == Dims((1,), (2,))  # kernel (2, 4, 5): one matrix per X[b]
    y = batched.apply(params, X)
    for b in range(2):
        got = (
            np.asarray(X[b], np.float64) @ _matrix(params["params"]["kernel"], dims)[b]
        )
        np.testing.assert_allclose(got, y[b], rtol=1e-5, atol=2e-5)


def _attention(x, matrices, heads):
    """Multi-head self-attention rebuilt from the layouts' matrices alone."""

    def project(name):
        rows = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
        y = rows @ matrices[name]
        return jnp.asarray(y.reshape(*x.shape[:-1], heads, -1), jnp.float32)

    h = nn.dot_product_attention(project("query"), project("key"), project("value"))
    rows = np.asarray(h, np.float64).reshape(-1, h.shape[-2] * h.shape[-1])
    y = rows @ matrices["out"]
    return y.reshape(*x.shape[:-1], -1)


def test_linen_multi_head_attention():
    model = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=6, out_features=5)
    params = model.init(jax.random.key(0), X)
    dims = infer(model.apply, params, X)["params"]
    qkv = Dims((0,), (1, 2))  # (in, heads, head_dim)
    out = Dims((0, 1), (2,))  # (heads, head_dim, out)
    assert dims == {
        name: {"kernel": layout, "bias": None}
        for name, layout in [("query", qkv), ("key", qkv), ("value", qkv), ("out", out)]
    }
    no_bias = nn.MultiHeadDotProductAttention(
        num_heads=2, qkv_features=6, out_features=5, use_bias=False
    )
    kernels = {n: p["kernel"] for n, p in params["params"].items()}
    y = no_bias.apply({"params": {n: {"kernel": k} for n, k in kernels.items()}}, X)
    layouts = {n: d["kernel"] for n, d in dims.items()}
    matrices = {n: _matrix(kernels[n], layouts[n]) for n in kernels}
    want = _attention(X, matrices, heads=2)
    np.testing.assert_allclose(want, y, rtol=1e-4, atol=1e-5)


IMAGES = _normal((2, 5, 5, 4), 8)  # NHWC


def test_linen_conv_matrix():
    model = nn.Conv(3, (2, 3), padding="VALID", use_bias=False)
    params = model.init(jax.random.key(0), IMAGES)
    dims = infer(model.apply, params, IMAGES)["params"]["kernel"]
    assert dims == Dims((0, 1, 2), (3,))  # HWIO -> (kh*kw*in, out)
    y = model.apply(params, IMAGES)
    rows = _patches(IMAGES, 2, 3, channels_last=True)
    _assert_maps(rows, params["params"]["kernel"], dims, y.reshape(2, -1, 3))


def _assert_operator_applies(op, kernel, x, y):
    """Running the convolution the ConvOperator describes reproduces the layer."""
    assert op.input_shape == x.shape[1:]
    got = lax.conv_general_dilated(
        x,
        kernel,
        op.strides,
        op.padding,
        rhs_dilation=op.rhs_dilation,
        feature_group_count=op.feature_group_count,
        dimension_numbers=op.dimension_numbers,
    )
    np.testing.assert_allclose(got, y, rtol=1e-5, atol=2e-5)


def test_linen_conv_operator():
    model = nn.Conv(
        6, (3, 3), strides=2, kernel_dilation=2, feature_group_count=2, use_bias=False
    )
    params = model.init(jax.random.key(0), IMAGES)
    layouts = infer(model.apply, params, IMAGES, conv="operator")["params"]
    # SAME with a dilated 3x3 (5 wide) window at stride 2 on 5 pixels: pad 2 + 2.
    assert layouts == {
        "kernel": mr.ConvOperator(
            (5, 5, 4),
            strides=2,
            padding=((2, 2), (2, 2)),
            rhs_dilation=2,
            feature_group_count=2,
        )
    }
    kernel = params["params"]["kernel"]
    _assert_operator_applies(
        layouts["kernel"], kernel, IMAGES, model.apply(params, IMAGES)
    )


class _LinearLayer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.Dense(4, use_bias=False)(x), None


class _ScanStack(nn.Module):
    """Three Dense layers stacked by ``nn.scan``: kernel (3, 4, 4)."""

    bias: bool = False

    @nn.compact
    def __call__(self, x):
        layer = _BiasedLayer if self.bias else _LinearLayer
        stack = nn.scan(
            layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        return stack(name="layers")(x, None)[0]


class _BiasedLayer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.LayerNorm()(nn.Dense(4)(x)), None


def test_linen_scan_stack():
    x = _normal((2, 4), 3)
    model = _ScanStack()
    params = model.init(jax.random.key(0), x)
    dims = infer(model.apply, params, x)
    kernel_dims = dims["params"]["layers"]["Dense_0"]["kernel"]
    assert kernel_dims == Dims((1,), (2,))  # axis 0: one matrix per layer
    kernel = params["params"]["layers"]["Dense_0"]["kernel"]
    matrices = _matrix(kernel, kernel_dims)
    want = np.asarray(x, np.float64) @ matrices[0] @ matrices[1] @ matrices[2]
    np.testing.assert_allclose(model.apply(params, x), want, rtol=1e-5, atol=2e-5)

    biased = _ScanStack(bias=True)
    params = biased.init(jax.random.key(0), x)
    layer = infer(biased.apply, params, x)["params"]["layers"]
    assert layer == {
        "Dense_0": {"kernel": Dims((1,), (2,)), "bias": None},
        "LayerNorm_0": {"scale": None, "bias": None},
    }


class _AttentionLayer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.MultiHeadDotProductAttention(num_heads=2, use_bias=False)(x), None


class _Block(nn.Module):
    """A pre-norm transformer block."""

    @nn.compact
    def __call__(self, x, _):
        x = x + nn.MultiHeadDotProductAttention(num_heads=2)(nn.LayerNorm()(x))
        x = x + nn.Dense(4)(nn.gelu(nn.Dense(8)(nn.LayerNorm()(x))))
        return x, None


def _scanned(layer, length=2):
    return nn.scan(
        layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=length
    )(name="layers")


def test_linen_attention_inside_scan():
    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            return _scanned(_AttentionLayer)(x, None)[0]

    model = Stack()
    params = model.init(jax.random.key(0), X)
    layers = infer(model.apply, params, X)["params"]["layers"]
    dims = layers["MultiHeadDotProductAttention_0"]
    layouts = {n: dims[n]["kernel"] for n in ("query", "key", "value", "out")}
    qkv, out = Dims((1,), (2, 3)), Dims((1, 2), (3,))  # axis 0: the layer
    assert layouts == {"query": qkv, "key": qkv, "value": qkv, "out": out}
    kernels = params["params"]["layers"]["MultiHeadDotProductAttention_0"]
    matrices = {n: _matrix(kernels[n]["kernel"], layouts[n]) for n in layouts}
    want = X
    for layer in range(2):
        want = _attention(want, {n: m[layer] for n, m in matrices.items()}, 2)
    np.testing.assert_allclose(want, model.apply(params, X), rtol=1e-4, atol=2e-5)


def test_linen_remat_transformer_blocks_inside_scan_from_shapes_only():
    class Transformer(nn.Module):
        @nn.compact
        def __call__(self, x):
            return _scanned(nn.remat(_Block))(x, None)[0]

    model = Transformer()
    shapes = jax.eval_shape(model.init, jax.random.key(0), X)  # no arrays needed
    layers = infer(model.apply, shapes, X)["params"]["layers"]
    qkv, out = Dims((1,), (2, 3)), Dims((1, 2), (3,))
    dense = {"kernel": Dims((1,), (2,)), "bias": None}
    norm = {"scale": None, "bias": None}
    assert layers == {
        "MultiHeadDotProductAttention_0": {
            name: {"kernel": layout, "bias": None}
            for name, layout in [
                ("query", qkv),
                ("key", qkv),
                ("value", qkv),
                ("out", out),
            ]
        },
        "Dense_0": dense,
        "Dense_1": dense,
        "LayerNorm_0": norm,
        "LayerNorm_1": norm,
    }


def test_result_drives_optax_muon_per_layer():
    """The inferred tree is a weight_dimension_numbers value optax itself accepts:
    muon on the scanned stack orthogonalises each layer's gradient separately."""
    x = _normal((2, 4), 3)
    model = _ScanStack()
    params = model.init(jax.random.key(0), x)
    dims = infer(model.apply, params, x)
    grads = jax.grad(lambda p: jnp.sum(model.apply(p, x) ** 2))(params)
    opt = optax.contrib.muon(0.1, muon_weight_dimension_numbers=dims)
    update = opt.update(grads, opt.init(params), params)[0]
    stacked = update["params"]["layers"]["Dense_0"]["kernel"]
    kernel_grads = grads["params"]["layers"]["Dense_0"]["kernel"]
    per_layer = optax.contrib.muon(0.1)  # a 2-D leaf: the default (0, 1) layout
    for layer in range(3):
        one = {"k": kernel_grads[layer]}
        want = per_layer.update(one, per_layer.init(one), one)[0]["k"]
        np.testing.assert_allclose(stacked[layer], want, rtol=1e-5, atol=1e-6)


# flax nnx: split the model, infer on the state.


def _nnx_infer(model, *args, conv="matrix"):
    return _nnx_infer_fn(model, lambda m, *a: m(*a), *args, conv=conv)


def _nnx_infer_fn(model, call, *args, conv="matrix"):
    """Infer on the model's ``nnx.Param`` state; ``call(model, *args)`` runs it."""
    graphdef, state = nnx.split(model, nnx.Param)

    def fn(s, *a):
        return call(nnx.merge(graphdef, s), *a)

    return infer(fn, state, *args, conv=conv)


def test_nnx_linear_and_linear_general():
    rngs = nnx.Rngs(0)
    linear = nnx.Linear(4, 5, use_bias=False, rngs=rngs)
    dims = _nnx_infer(linear, X)
    assert dims["kernel"].get_value() == Dims((0,), (1,))
    _assert_maps(
        X.reshape(-1, 4),
        linear.kernel[...],
        Dims((0,), (1,)),
        linear(X).reshape(-1, 5),
    )

    general = nnx.LinearGeneral((3, 4), (2, 5), axis=(-2, -1), use_bias=True, rngs=rngs)
    dims = _nnx_infer(general, X)
    assert dims["kernel"].get_value() == Dims((0, 1), (2, 3))
    assert dims["bias"].get_value() is None
    y = general(X) - general.bias[...]
    _assert_maps(
        X.reshape(2, -1),
        general.kernel[...],
        dims["kernel"].get_value(),
        y.reshape(2, -1),
    )


def test_nnx_multi_head_attention():
    model = nnx.MultiHeadAttention(
        num_heads=2,
        in_features=4,
        qkv_features=6,
        out_features=5,
        decode=False,
        use_bias=False,
        rngs=nnx.Rngs(0),
    )
    dims = _nnx_infer(model, X)
    qkv, out = Dims((0,), (1, 2)), Dims((0, 1), (2,))
    layouts = {
        n: dims[n]["kernel"].get_value() for n in ("query", "key", "value", "out")
    }
    assert layouts == {"query": qkv, "key": qkv, "value": qkv, "out": out}
    kernels = {n: getattr(model, n).kernel[...] for n in layouts}
    matrices = {n: _matrix(kernels[n], layouts[n]) for n in kernels}
    np.testing.assert_allclose(
        _attention(X, matrices, 2), model(X), rtol=1e-4, atol=1e-5
    )


def test_nnx_conv():
    model = nnx.Conv(4, 3, (2, 3), padding="VALID", use_bias=False, rngs=nnx.Rngs(0))
    dims = _nnx_infer(model, IMAGES)["kernel"].get_value()
    assert dims == Dims((0, 1, 2), (3,))
    rows = _patches(IMAGES, 2, 3, channels_last=True)
    _assert_maps(rows, model.kernel[...], dims, model(IMAGES).reshape(2, -1, 3))
    op = _nnx_infer(model, IMAGES, conv="operator")["kernel"].get_value()
    assert op == mr.ConvOperator((5, 5, 4), padding=((0, 0), (0, 0)))
    _assert_operator_applies(op, model.kernel[...], IMAGES, model(IMAGES))


def test_nnx_scan_stack():
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return nnx.Linear(4, 4, use_bias=False, rngs=nnx.Rngs(key))

    stack = make(jax.random.split(jax.random.key(0), 3))  # kernel (3, 4, 4)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, layer):
        return layer(x)

    x = _normal((2, 4), 3)
    dims = _nnx_infer_fn(stack, lambda m, x: forward(x, m), x)["kernel"].get_value()
    assert dims == Dims((1,), (2,))
    matrices = _matrix(stack.kernel[...], dims)
    want = np.asarray(x, np.float64) @ matrices[0] @ matrices[1] @ matrices[2]
    np.testing.assert_allclose(forward(x, stack), want, rtol=1e-5, atol=2e-5)


class _NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(4, 3, (2, 3), padding="VALID", rngs=rngs)
        self.linear = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        return self.linear(self.conv(x).mean((1, 2)))


@pytest.mark.parametrize("conv", ["matrix", "operator"])
def test_nnx_optimizer_takes_the_inferred_state(conv):
    """Regression: ``tx.init`` gets the ``Param``-wrapped state and ``tx.update``
    the pure arrays, and the inferred ``Param(layout)`` tree must fit both."""
    coeff, lr = 0.3, 0.5
    model = _NnxNet(nnx.Rngs(0))
    layouts = _nnx_infer(model, IMAGES, conv=conv)
    before = nnx.as_pure(nnx.state(model, nnx.Param))
    tx = mr.spectral_norm_regularization(coeff, weight_dimension_numbers=layouts)
    optimizer = nnx.Optimizer(model, optax.chain(tx, optax.sgd(lr)), wrt=nnx.Param)
    optimizer.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    after = nnx.as_pure(nnx.state(model, nnx.Param))
    kernels = {name: before[name]["kernel"] for name in ("conv", "linear")}
    if conv == "matrix":
        # Kernels (kh, kw, in, out) and (in, out): the reshape(-1, out) matrices.
        added = {
            name: _rank_one(k.reshape(-1, k.shape[-1])).reshape(k.shape)
            for name, k in kernels.items()
        }
    else:
        # The same transform on the raw arrays with the layouts written by hand.
        hand = {
            "conv": {"kernel": mr.ConvOperator((5, 5, 4), padding="VALID")},
            "linear": {"kernel": Dims(0, 1)},
        }
        plain = mr.spectral_norm_regularization(1.0, weight_dimension_numbers=hand)
        raw = {name: {"kernel": k} for name, k in kernels.items()}
        zeros = jax.tree.map(jnp.zeros_like, raw)
        updates = plain.update(zeros, plain.init(raw), raw)[0]
        added = {name: updates[name]["kernel"] for name in kernels}
    for name, kernel in kernels.items():
        np.testing.assert_allclose(
            after[name]["kernel"], kernel - lr * coeff * added[name], atol=2e-6
        )
        np.testing.assert_array_equal(after[name]["bias"], before[name]["bias"])


# equinox: partition, infer on the arrays, vmap over the batch.


def _eqx_infer(model, x, conv="matrix"):
    params, static = eqx.partition(model, eqx.is_array)

    def fn(p, x):
        return jax.vmap(eqx.combine(p, static))(x)

    return infer(fn, params, x, conv=conv), fn(params, x)


def test_equinox_linear():
    model = eqx.nn.Linear(4, 5, key=jax.random.key(0))
    x = X.reshape(-1, 4)
    dims, y = _eqx_infer(model, x)
    assert dims.weight == Dims((1,), (0,))  # (out, in)
    assert dims.bias is None
    _assert_maps(x, model.weight, dims.weight, y - model.bias)


def test_equinox_conv2d():
    model = eqx.nn.Conv2d(4, 3, (2, 3), use_bias=False, key=jax.random.key(0))
    x = IMAGES.transpose(0, 3, 1, 2)  # NCHW
    dims, y = _eqx_infer(model, x)
    assert dims.weight == Dims((1, 2, 3), (0,))  # (out, in, kh, kw)
    rows = _patches(x, 2, 3, channels_last=False)
    _assert_maps(
        rows, model.weight, dims.weight, y.reshape(2, 3, -1).transpose(0, 2, 1)
    )

    ops, _ = _eqx_infer(model, x, conv="operator")
    assert ops.weight == mr.ConvOperator(
        (4, 5, 5), padding=((0, 0), (0, 0)), dimension_numbers=("NCHW", "OIHW", "NCHW")
    )
    _assert_operator_applies(ops.weight, model.weight, x, y)


class _EqxNet(eqx.Module):
    conv: eqx.nn.Conv2d
    linear: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(4, 3, (2, 3), key=k1)
        self.linear = eqx.nn.Linear(3, 2, key=k2)

    def __call__(self, x):
        return self.linear(self.conv(x).mean((1, 2)))


def test_inferred_equinox_module_is_a_tree_not_a_function():
    """Regression: the inferred layouts are an equinox Module, which is callable,
    and must be read as the layouts tree, not called on the params."""
    model = _EqxNet(jax.random.key(0))
    layouts, _ = _eqx_infer(model, IMAGES.transpose(0, 3, 1, 2))
    assert callable(layouts)
    params = eqx.filter(model, eqx.is_array)
    # Fan-out first: (out, in) and (out, in, kh, kw) are reshape(out, -1) transposed.
    matrices = {
        name: np.asarray(getattr(params, name).weight, np.float64)
        for name in ("conv", "linear")
    }
    matrices = {name: w.reshape(w.shape[0], -1).T for name, w in matrices.items()}
    norms = mr.spectral_norms(params, weight_dimension_numbers=layouts)
    assert set(norms) == {"conv/weight", "linear/weight"}
    for name, matrix in matrices.items():
        sigma = np.linalg.svd(matrix, compute_uv=False)[0]
        np.testing.assert_allclose(norms[f"{name}/weight"], sigma, rtol=1e-5)
    tx = mr.spectral_norm_regularization(0.3, weight_dimension_numbers=layouts)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates = tx.update(zeros, tx.init(params), params)[0]
    for name, matrix in matrices.items():
        weight = getattr(updates, name).weight
        expected = 0.3 * _rank_one(matrix).T.reshape(weight.shape)
        np.testing.assert_allclose(weight, expected, atol=2e-6)
        np.testing.assert_array_equal(getattr(updates, name).bias, 0.0)


# Bad input.


def test_incompatible_double_use_names_the_path():
    params = {"layer": {"w": _normal((4, 4))}}
    with pytest.raises(ValueError, match=r"layer/w.*two incompatible ways"):
        infer(lambda p, x: x @ p["layer"]["w"] @ p["layer"]["w"].T, params, X[0])


def test_bad_conv_option():
    with pytest.raises(ValueError, match="conv must be 'matrix' or 'operator'"):
        infer(lambda p, x: x @ p["w"], {"w": jnp.ones((4, 4))}, X[0], conv="bogus")


def test_reshape_into_mixed_roles_names_the_path():
    # (4, 2*3) split into (4, 2, 3), then axis 2 batched: leaf axis 1 in two roles.
    def fn(p, x):
        w = p["w"].reshape(4, 2, 3)
        return lax.dot_general(x, w, (((1,), (0,)), ((2,), (2,))))

    with pytest.raises(ValueError, match="'w' is reshaped so that its axis 1"):
        infer(fn, {"w": jnp.ones((4, 6))}, jnp.ones((3, 4, 3)))


def test_product_of_two_parameters_names_both():
    params = {"a": jnp.ones((4, 2)), "c": jnp.ones((2, 4))}
    with pytest.raises(ValueError, match="'a' is multiplied by 'c'"):
        infer(lambda p, x: x @ (p["a"] @ p["c"]), params, X[0])


@pytest.mark.parametrize(
    ("conv_kwargs", "message"),
    [
        ({"lhs_dilation": (2, 2)}, "transposed"),
        ({"batch_group_count": 2}, "batch_group_count"),
    ],
)
def test_ambiguous_convolutions_name_the_path(conv_kwargs, message):
    kernel = jnp.ones((2, 2, 4, 4))

    def fn(p, x):
        return lax.conv_general_dilated(
            x,
            p["k"],
            (1, 1),
            ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            **conv_kwargs,
        )

    with pytest.raises(ValueError, match=rf"'k' .*{message}"):
        infer(fn, {"k": kernel}, IMAGES)


def test_weight_as_convolution_input_names_the_path():
    def fn(p, x):
        return lax.conv_general_dilated(
            p["image"], x, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    with pytest.raises(ValueError, match="'image' is the input"):
        infer(fn, {"image": IMAGES}, jnp.ones((2, 2, 4, 3)))


def test_scanned_conv_stack_has_no_operator_layout():
    kernels = jnp.ones((3, 3, 3, 4, 4))

    def fn(p, x):
        def layer(x, k):
            y = lax.conv_general_dilated(
                x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            return y, None

        return lax.scan(layer, x, p["stack"])[0]

    assert infer(fn, {"stack": kernels}, IMAGES) == {"stack": Dims((1, 2, 3), (4,))}
    with pytest.raises(ValueError, match="'stack' is scanned over or reshaped"):
        infer(fn, {"stack": kernels}, IMAGES, conv="operator")


def test_integer_leaves_are_never_weights_even_when_a_matmul_reads_them():
    params = {"w": jnp.ones((4, 3)), "table": jnp.ones((4, 3), jnp.int32)}

    def fn(p, x):
        return x @ p["w"] + x @ p["table"].astype(x.dtype)

    dims = infer(fn, params, jnp.ones((2, 4)))
    assert dims == {"w": Dims((0,), (1,)), "table": None}


def test_follows_a_slice_that_keeps_every_element():
    # jax < 0.10 traces ``w[0]`` of a size-1 axis as a whole ``slice`` then a
    # ``squeeze``: the reader must see through it (found at the jax floor).
    params = {"w": jnp.arange(12.0).reshape(1, 3, 4)}

    def fn(p, x):
        return x @ jax.lax.slice(p["w"], (0, 0, 0), (1, 3, 4))[0]

    got = mr.infer_weight_dimension_numbers(fn, params, jnp.ones((2, 3)))
    assert got["w"] == Dims((1,), (2,))

    # A slice that drops elements is no layout op: the leaf is not read as a weight.
    def part(p, x):
        return x @ jax.lax.slice(p["w"], (0, 0, 0), (1, 2, 4))[0]

    assert (
        mr.infer_weight_dimension_numbers(part, params, jnp.ones((2, 2)))["w"] is None
    )
