"""Reference models: the papers' layer sizes, the classifier path, dropout."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
    assert models.logits_fn(model, params)(x).shape == logits.shape
    mask = models.classifier_mask(params)
    selected = [
        p
        for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True)
        if m
    ]
    assert len(selected) == 1 and selected[0] is kernel


def test_dropout_only_in_training():
    model, params, x = _init("mlp", SHAPES["digits"], dropout_rate=0.5)
    clean = model.apply({"params": params}, x)
    np.testing.assert_array_equal(
        clean, models.make_model("mlp", 10).apply({"params": params}, x)
    )
    a = model.apply(
        {"params": params}, x, train=True, rngs={"dropout": jax.random.key(0)}
    )
    b = model.apply(
        {"params": params}, x, train=True, rngs={"dropout": jax.random.key(1)}
    )
    assert not jnp.allclose(a, clean) and not jnp.allclose(a, b)


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        models.make_model("vgg", 10)
