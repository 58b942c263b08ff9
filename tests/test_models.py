"""Reference models: the papers' layer sizes, the classifier path, dropout."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _numpy_nets import conv_layer, dense, max_pool, relu

from margin_regs.experiments import models

SHAPES = {"mnist1d": (40, 1), "digits": (8, 8, 1), "mnist": (28, 28, 1)}


def _init(name, shape, **kw):
    model = models.make_model(name, 10, **kw)
    x = jax.random.normal(jax.random.key(1), (3, *shape))
    return model, jax.jit(model.init)(jax.random.key(0), x)["params"], x


def _shapes(name, shape):
    """Parameter shapes without computing anything (the layer sizes are the test)."""
    model = models.make_model(name, 10)
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


def _kernels(params):
    return {k: v["kernel"].shape for k, v in params.items()}


def test_mlp_hidden_layers_are_half_the_input_width():
    # Sokolić et al.: 784 inputs, hidden layers of 392 units.
    assert _kernels(_shapes("mlp", SHAPES["mnist"])) == {
        "hidden_0": (784, 392),
        "hidden_1": (392, 392),
        "classifier": (392, 10),
    }
    assert _kernels(_shapes("mlp", SHAPES["digits"]))["hidden_1"] == (32, 32)
    assert _kernels(_shapes("mlp", SHAPES["mnist1d"]))["hidden_0"] == (40, 20)


def test_adareg_cnn_has_the_appendix_sizes_on_mnist():
    # CONV5×5×1×10 - CONV5×5×10×20 - FC320×50 - FC50×10 (Zhao et al., App. B.1).
    assert _kernels(_shapes("adareg_cnn", SHAPES["mnist"])) == {
        "conv_0": (5, 5, 1, 10),
        "conv_1": (5, 5, 10, 20),
        "fc": (320, 50),
        "classifier": (50, 10),
    }
    # 8×8 digits fall back to SAME padding: 8 → 4 → 2, so 2·2·20 = 80 features.
    assert _kernels(_shapes("adareg_cnn", SHAPES["digits"]))["fc"] == (80, 50)


@pytest.mark.parametrize(
    ("data", "features"),
    [("mnist", 7 * 7 * 32), ("digits", 2 * 2 * 32), ("mnist1d", 10 * 32)],
)
def test_sokolic_cnn_two_conv_pool_stages(data, features):
    params = _shapes("cnn", SHAPES[data])
    window = (5,) * (len(SHAPES[data]) - 1)
    assert params["conv_0"]["kernel"].shape == (*window, 1, 32)
    assert params["conv_1"]["kernel"].shape == (*window, 32, 32)
    assert params["classifier"]["kernel"].shape == (features, 10)


@pytest.mark.parametrize(
    ("name", "data"), [("mlp", "mnist1d"), ("cnn", "digits"), ("adareg_cnn", "digits")]
)
def test_classifier_kernel_maps_last_features_to_logits(name, data):
    model, params, x = _init(name, SHAPES[data])

    def forward(params, x):
        inputs = []

        def grab(next_fun, args, kwargs, context):
            if context.module.name == "classifier":
                inputs.append(args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(grab):
            logits = model.apply({"params": params}, x)
        return logits, inputs[0]

    logits, features = jax.jit(forward)(params, x)
    kernel = models.classifier_kernel(params)
    expected = np.asarray(features) @ np.asarray(kernel) + np.asarray(
        params["classifier"]["bias"]
    )
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(models.logits_fn(model, params)(x), logits)
    mask = models.classifier_mask(params)
    selected = [
        p
        for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True)
        if m
    ]
    assert len(selected) == 1 and selected[0] is kernel


def _numpy_forward(name, params, x):
    """The papers' architectures in float64 NumPy, from the models' docstrings."""
    p = {
        k: {n: np.asarray(v, np.float64) for n, v in layer.items()}
        for k, layer in params.items()
    }
    h = np.asarray(x, np.float64)
    if name.startswith("mlp") or name == "keras_mlp":  # ReLU hidden layers
        h = h.reshape(len(h), -1)
        for i in range(sum(k.startswith("hidden_") for k in p)):
            h = relu(dense(h, p[f"hidden_{i}"]))
    elif name.startswith("cnn"):  # conv-ReLU, 2×2 max-pool after the first two
        for i in range(sum(k.startswith("conv_") for k in p)):
            h = relu(conv_layer(h, p[f"conv_{i}"]))
            h = max_pool(h) if i < 2 else h
        h = h.reshape(len(h), -1)
    else:  # adareg_cnn: conv, pool, ReLU twice (VALID from 16 on), then FC50-ReLU
        padding = "VALID" if min(h.shape[1:-1]) >= 16 else "SAME"
        for i in range(2):
            h = relu(max_pool(conv_layer(h, p[f"conv_{i}"], padding)))
        h = relu(dense(h.reshape(len(h), -1), p["fc"]))
    return dense(h, p["classifier"])


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("mlp", SHAPES["mnist1d"]),
        ("mlp3", SHAPES["digits"]),
        ("keras_mlp", SHAPES["digits"]),
        ("cnn", SHAPES["digits"]),
        ("cnn", SHAPES["mnist1d"]),
        ("cnn3", (7, 7, 1)),  # odd sizes: SAME pooling pads 7 → 4 → 2
        ("cnn3", (14, 14, 1)),  # Table I: the third conv, on 4×4, a CoveringConv
        ("adareg_cnn", SHAPES["digits"]),
        ("adareg_cnn", (16, 16, 1)),  # unpadded: 16 → 12 → 6 → 2 → 1
    ],
)
def test_logits_match_a_numpy_forward_pass(name, shape):
    model, params, x = _init(name, shape)
    want = _numpy_forward(name, params, x)
    got = jax.jit(models.logits_fn(model, params))(x)
    # float32 sums of up to 800 products: ~1e-6 of the largest logit.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_dropout_only_in_training():
    model, params, x = _init("mlp", SHAPES["digits"], dropout_rate=0.5)
    clean = model.apply({"params": params}, x)
    np.testing.assert_array_equal(
        clean, models.make_model("mlp", 10).apply({"params": params}, x)
    )
    seen = []

    def grab(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Dropout):
            seen.append((np.asarray(args[0]), np.asarray(out)))
        return out

    with nn.intercept_methods(grab):
        model.apply(
            {"params": params}, x, train=True, rngs={"dropout": jax.random.key(0)}
        )
    kept = np.concatenate([out.ravel() != 0 for _, out in seen])
    for inputs, out in seen:  # inverted dropout: 0 or x / (1 − p)
        np.testing.assert_allclose(out, np.where(out != 0, 2 * inputs, 0.0), rtol=1e-6)
    # ReLU outputs that are 0 stay 0 when kept: count only the positive inputs.
    positive = np.concatenate([inputs.ravel() > 0 for inputs, _ in seen])
    rate = 1 - kept[positive].mean()
    assert abs(rate - 0.5) < 5 * np.sqrt(0.25 / positive.sum())


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        models.make_model("vgg", 10)


def test_covering_conv_is_the_conv_it_replaces_value_gradient_and_layout():
    model, params, x = _init("cnn3", (14, 14, 1))
    twin = model.clone(covering=False)

    def loss(m):
        return lambda p: jnp.sum(jnp.sin(m.apply({"params": p}, x)))

    got, want = jax.grad(loss(model))(params), jax.grad(loss(twin))(params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * np.abs(w).max())
    # the same parameters, initialized alike, and the kernel still a conv operator
    mine, theirs = (m.init(jax.random.key(3), x)["params"] for m in (model, twin))
    assert jax.tree.all(jax.tree.map(jnp.array_equal, mine, theirs))
    layouts = models.weight_layouts(model, (14, 14, 1), "operator")
    assert layouts["conv_2"]["kernel"].input_shape == (4, 4, 32)


@pytest.mark.parametrize(
    ("name", "shape"), [("cnn3", (14, 14, 1)), ("keras_mlp", (8, 8, 1))]
)
def test_kernel_shapes_are_the_initialized_kernels(name, shape):
    # traced on shapes only, it must agree with a real init's kernels, layer by layer
    model, params, _ = _init(name, shape)
    want = {k: v["kernel"].shape for k, v in params.items() if "kernel" in v}
    assert models.kernel_shapes(model, shape) == want
