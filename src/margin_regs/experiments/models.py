"""Reference models from the papers, small enough for a CPU, as Flax linen modules.

Linen: ``model.init(key, x)["params"]`` is a plain dict every transform and penalty
takes as it is, and ``model.apply`` a pure function of ``(params, x)`` to jit, scan and
differentiate with respect to the input. Every model takes channels-last inputs
``(n, *spatial, channels)`` with one or two spatial axes and returns logits ``(n,
num_classes)``; its last layer is ``classifier`` (:data:`CLASSIFIER_PATH`: the ``v`` of
Sokolić et al.'s Jacobian penalty, AdaReg's default matrix). Attributes shared by all:
``num_classes`` (outputs) and ``dropout_rate`` (0: none; only with ``train=True``).
Hidden representations are sown as ``intermediates/activations`` for a
representation penalty (``mutable=["intermediates"]``; Goodfellow et al. §7.10).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

import margin_regs as mr

__all__ = [
    "CLASSIFIER_PATH",
    "MODELS",
    "AdaRegCNN",
    "CoveringConv",
    "KerasMLP",
    "SokolicCNN",
    "SokolicCNN3",
    "SokolicMLP",
    "SokolicMLP1",
    "SokolicMLP3",
    "classifier_kernel",
    "classifier_mask",
    "has_convolutions",
    "kernel_mask",
    "kernel_shapes",
    "logits_fn",
    "make_model",
    "weight_layouts",
]

CLASSIFIER_PATH: tuple[str, str] = ("classifier", "kernel")


class SokolicMLP(nn.Module):
    """ReLU MLP with ``num_hidden`` layers of ``max(input_size // 2, min_width)`` units.

    784 → 392 → 392 → 10 on MNIST, as Sokolić et al.'s networks; dropout after each
    hidden layer.

    Example:
      >>> from margin_regs.experiments.models import SokolicMLP, kernel_shapes
      >>> kernel_shapes(SokolicMLP(10), (8, 8, 1))
      {'classifier': (32, 10), 'hidden_0': (64, 32), 'hidden_1': (32, 32)}

    References:
      Sokolić, Giryes, Sapiro, Rodrigues, "Robust Large Margin Deep Neural Networks",
      IEEE TSP 2017, §V and Appendix.
    """

    num_classes: int
    num_hidden: int = 2
    min_width: int = 16
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        width = max(x.shape[-1] // 2, self.min_width)
        for i in range(self.num_hidden):
            x = nn.relu(nn.Dense(width, name=f"hidden_{i}")(x))
            self.sow("intermediates", "activations", x)
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="classifier")(x)


def _window(x: jax.Array, size: int) -> tuple[int, ...]:
    return (size,) * (x.ndim - 2)


def _pool(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, _window(x, 2), strides=_window(x, 2), padding="SAME")


class CoveringConv(nn.Module):
    """``nn.Conv(features, kernel_size, padding="SAME")`` as a dense operator.

    ``out[n, i, d] = Σ_{i', c} x[n, i', c] K[i' - i + k // 2, c, d]`` over the taps
    inside the kernel: ``nn.Conv``'s parameters, initialization and outputs, 6× faster
    on XLA's CPU for inputs no larger than the window (Table I CNN's third conv).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from margin_regs.experiments.models import CoveringConv
      >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
      >>> p = nn.Conv(8, (5, 5), padding="SAME").init(jax.random.key(1), x)
      >>> y = CoveringConv(8, (5, 5)).apply(p, x)
      >>> bool(jnp.allclose(y, nn.Conv(8, (5, 5), padding="SAME").apply(p, x), atol=1e-5))
      True
    """

    features: int
    kernel_size: tuple[int, ...]
    padding: str = "SAME"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding != "SAME" or any(k % 2 == 0 for k in self.kernel_size):
            raise ValueError("CoveringConv: SAME padding and odd windows only")
        spatial = x.shape[1:-1]
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        taps, inside = [], True
        for a, (s, k) in enumerate(zip(spatial, self.kernel_size, strict=True)):
            tap = np.arange(s)[None, :] - np.arange(s)[:, None] + k // 2  # [out, in]
            at = [1] * (2 * len(spatial))
            at[2 * a : 2 * a + 2] = [s, s]
            taps.append(np.clip(tap, 0, k - 1).reshape(at))
            inside = inside & ((tap >= 0) & (tap < k)).reshape(at)
        operator = kernel[tuple(taps)] * inside[..., None, None]  # (o, i, o, i.., c, d)
        letters = "abcdefgh"[: len(spatial)]
        outs, ins = letters.upper(), letters
        pairs = "".join(o + i for o, i in zip(outs, ins, strict=True))
        y = jnp.einsum(f"n{ins}y,{pairs}yz->n{outs}z", x, operator)
        return y + bias


class SokolicCNN(nn.Module):
    """Sokolić et al.'s CNN of Table I: ``num_conv`` ReLU ``(features, 5, 5)``-convs.

    ``conv-pool-conv-pool[-conv]`` (2×2 max-pools after the first two, ``SAME``
    padding: 8×8 digits go 8 → 4 → 2; windows 5 and 2 on 1-D inputs), dropout, a
    linear classifier. ``covering``: a conv whose input is no larger than its window
    runs as a :class:`CoveringConv` (:func:`weight_layouts` traces the ``nn.Conv``).

    Example:
      >>> from margin_regs.experiments.models import SokolicCNN, kernel_shapes
      >>> kernel_shapes(SokolicCNN(10), (28, 28, 1))
      {'classifier': (1568, 10), 'conv_0': (5, 5, 1, 32), 'conv_1': (5, 5, 32, 32)}

    References:
      Sokolić et al., "Robust Large Margin Deep Neural Networks", 2017, Table I.
    """

    num_classes: int
    features: int = 32
    dropout_rate: float = 0.0
    num_conv: int = 2
    covering: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        for i in range(self.num_conv):
            small = x[0, ..., 0].size <= 5 ** (x.ndim - 2)
            conv = CoveringConv if self.covering and small else nn.Conv
            x = conv(self.features, _window(x, 5), padding="SAME", name=f"conv_{i}")(x)
            x = nn.relu(x)
            x = _pool(x) if i < 2 else x
            self.sow("intermediates", "activations", x)
        x = x.reshape(x.shape[0], -1)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="classifier")(x)


class AdaRegCNN(nn.Module):
    """AdaReg's MNIST CNN: ``CONV5×5×1×10 - CONV5×5×10×20 - FC320×50 - FC50×10``.

    Each conv followed by a 2×2 max-pool and ReLU. ``padding``: ``"VALID"``,
    ``"SAME"``, or ``None``: ``VALID`` from 16 pixels per axis on, else ``SAME``
    (8×8 digits cannot take two unpadded 5×5 convs with pooling).

    Example:
      >>> from margin_regs.experiments.models import AdaRegCNN, kernel_shapes
      >>> kernel_shapes(AdaRegCNN(10), (28, 28, 1))["fc"]
      (320, 50)

    References:
      Zhao, Tsai, Salakhutdinov, Gordon, "Learning Neural Networks with Adaptive
      Regularization", NeurIPS 2019, Appendix B.1.
    """

    num_classes: int
    padding: str | None = None
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        padding = self.padding
        if padding is None:
            padding = "VALID" if min(x.shape[1:-1]) >= 16 else "SAME"
        for i, features in enumerate((10, 20)):
            x = nn.Conv(features, _window(x, 5), padding=padding, name=f"conv_{i}")(x)
            x = nn.relu(_pool(x))
            self.sow("intermediates", "activations", x)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(50, name="fc")(x))
        self.sow("intermediates", "activations", x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="classifier")(x)


def make_model(name: str, num_classes: int, *, dropout_rate: float = 0.0) -> nn.Module:
    """The reference model ``name`` of :data:`MODELS` (a ``ValueError`` if unknown).

    Example:
      >>> from margin_regs.experiments.models import make_model
      >>> make_model("cnn", 10).features
      32
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name][0](num_classes=num_classes, dropout_rate=dropout_rate)


def kernel_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple]:
    """Each layer's kernel shape on samples of ``input_shape`` (traced, not computed).

    Example:
      >>> from margin_regs.experiments.models import SokolicMLP, kernel_shapes
      >>> kernel_shapes(SokolicMLP(3), (40, 1))
      {'classifier': (20, 3), 'hidden_0': (40, 20), 'hidden_1': (20, 20)}
    """
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    flat = traverse_util.flatten_dict(params, sep="/")
    return {
        k.rsplit("/", 1)[0]: v.shape for k, v in flat.items() if k.endswith("/kernel")
    }


def classifier_kernel(params: Any) -> jax.Array:
    """The classifier's kernel ``(fan_in, num_classes)`` in a reference model's params.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from margin_regs.experiments.models import SokolicMLP, classifier_kernel
      >>> params = SokolicMLP(3).init(jax.random.key(0), jnp.zeros((1, 40, 1)))["params"]
      >>> classifier_kernel(params).shape
      (20, 3)
    """
    layer, name = CLASSIFIER_PATH
    return params[layer][name]


_CLASSIFIER_MASK = mr.mask_by_path("(^|/)" + "/".join(CLASSIFIER_PATH) + "$")
_KERNEL_MASK = mr.mask_by_path("(^|/)kernel$")


def classifier_mask(params: Any) -> Any:
    """A mask selecting only the classifier's kernel: AdaReg's default (App. B.3).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from margin_regs.experiments.models import SokolicMLP, classifier_mask
      >>> params = SokolicMLP(3).init(jax.random.key(0), jnp.zeros((1, 40, 1)))["params"]
      >>> sorted(k for k, v in classifier_mask(params).items() if v["kernel"])
      ['classifier']
    """
    return _CLASSIFIER_MASK(params)


def kernel_mask(params: Any) -> Any:
    """A mask selecting every layer's kernel (no biases): what weight decay decays.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from margin_regs.experiments.models import SokolicMLP, kernel_mask
      >>> params = SokolicMLP(3).init(jax.random.key(0), jnp.zeros((1, 40, 1)))["params"]
      >>> kernel_mask(params)["hidden_0"]
      {'bias': False, 'kernel': True}
    """
    return _KERNEL_MASK(params)


def logits_fn(model: nn.Module, params: Any) -> Callable[[jax.Array], jax.Array]:
    """``x -> logits`` with ``params`` bound (evaluation mode, no dropout).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from margin_regs.experiments.models import SokolicMLP, logits_fn
      >>> model = SokolicMLP(3)
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 40, 1)))["params"]
      >>> logits_fn(model, params)(jnp.zeros((5, 40, 1))).shape
      (5, 3)
    """
    return lambda x: model.apply({"params": params}, x)


def weight_layouts(
    model: nn.Module, input_shape: tuple[int, ...], conv: str = "matrix"
) -> Any:
    """The ``weight_dimension_numbers`` of ``model`` on samples of ``input_shape``.

    ``conv="matrix"``: ``None`` (the default layouts: a conv kernel is its reshaped
    ``(kh·kw·in, out)`` matrix). ``conv="operator"``:
    :func:`margin_regs.infer_weight_dimension_numbers` of the model traced on shapes,
    each conv kernel the :class:`margin_regs.ConvOperator` on its input.

    Example:
      >>> from margin_regs.experiments.models import SokolicCNN, weight_layouts
      >>> layouts = weight_layouts(SokolicCNN(10), (8, 8, 1), "operator")
      >>> layouts["conv_1"]["kernel"].input_shape
      (4, 4, 32)
    """
    if conv not in ("matrix", "operator"):
        raise ValueError(f"conv must be 'matrix' or 'operator', got {conv!r}")
    if conv == "matrix":
        return None
    if getattr(model, "covering", False):  # a CoveringConv's kernel is a conv's
        model = model.clone(covering=False)
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    return mr.infer_weight_dimension_numbers(
        lambda p, b: model.apply({"params": p}, b), params, x, conv="operator"
    )


def has_convolutions(layouts: Any) -> bool:
    """Whether a :func:`weight_layouts` pytree holds a :class:`margin_regs.ConvOperator`."""
    leaves = jax.tree.leaves(layouts, is_leaf=lambda x: isinstance(x, mr.ConvOperator))
    return any(isinstance(leaf, mr.ConvOperator) for leaf in leaves)


# Benchmark models for `margin-regs bench`, not in MODELS: CIFAR-10 and sequence sizes.


class VGG11(nn.Module):
    """A VGG-11-style CNN for 32×32 inputs: eight 3×3 ReLU convs, five max-pools.

    Channels ``w, M, 2w, M, 4w, 4w, M, 8w, 8w, M, 8w, 8w, M`` (``M`` a 2×2 max-pool,
    ``w = width``: 64 is configuration A), no normalisation, a linear classifier.

    Example:
      >>> from margin_regs.experiments.models import VGG11, kernel_shapes
      >>> kernel_shapes(VGG11(10), (32, 32, 3))["conv_7"]
      (3, 3, 512, 512)

    References:
      Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
      Recognition", ICLR 2015, Table 1 (A).
    """

    num_classes: int
    width: int = 64

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        stages = ((1,), (2,), (4, 4), (8, 8), (8, 8))
        i = 0
        for stage in stages:
            for multiple in stage:
                conv = nn.Conv(self.width * multiple, (3, 3), name=f"conv_{i}")
                x = nn.relu(conv(x))
                i += 1
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        return nn.Dense(self.num_classes, name="classifier")(x.reshape(len(x), -1))


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(32, channels))


class _BasicBlock(nn.Module):
    """Two 3×3 convolutions with a (projected when the shape changes) shortcut."""

    features: int
    strides: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = (self.strides, self.strides)
        y = nn.Conv(self.features, (3, 3), s, use_bias=False)(x)
        y = nn.relu(_group_norm(self.features)(y))
        y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
        y = _group_norm(self.features)(y)
        if x.shape != y.shape:
            x = nn.Conv(self.features, (1, 1), s, use_bias=False, name="shortcut")(x)
            x = _group_norm(self.features)(x)
        return nn.relu(x + y)


class ResNet18(nn.Module):
    """A ResNet-18-style CNN for 32×32 inputs (the CIFAR-10 form).

    A 3×3 stem of ``w = width`` channels, four stages of two basic blocks of ``w, 2w,
    4w, 8w`` channels (stride 2 opening stages 2–4), global average pooling, a linear
    classifier; GroupNorm for BatchNorm (per sample: no batch statistics).

    Example:
      >>> from margin_regs.experiments.models import ResNet18, kernel_shapes
      >>> kernel_shapes(ResNet18(10), (32, 32, 3))["stage_3_block_1/Conv_1"]
      (3, 3, 512, 512)

    References:
      He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition", CVPR
      2016, Table 1 (18-layer); Wu & He, "Group Normalization", ECCV 2018.
    """

    num_classes: int
    width: int = 64

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(self.width, (3, 3), use_bias=False, name="stem")(x)
        x = nn.relu(_group_norm(self.width)(x))
        for stage in range(4):
            for block in range(2):
                strides = 2 if stage > 0 and block == 0 else 1
                name = f"stage_{stage}_block_{block}"
                x = _BasicBlock(self.width * 2**stage, strides, name=name)(x)
        return nn.Dense(self.num_classes, name="classifier")(x.mean(axis=(1, 2)))


class _EncoderBlock(nn.Module):
    """Pre-LayerNorm self-attention and MLP, each with a residual connection."""

    num_heads: int
    mlp_ratio: int

    @nn.compact
    def __call__(self, x: jax.Array, _: None) -> tuple[jax.Array, None]:
        y = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(self.num_heads, name="attention")(y)
        y = nn.LayerNorm()(x)
        y = nn.gelu(nn.Dense(self.mlp_ratio * x.shape[-1], name="mlp_in")(y))
        return x + nn.Dense(x.shape[-1], name="mlp_out")(y), None


class TransformerEncoder(nn.Module):
    """A transformer encoder classifier whose ``num_blocks`` blocks are one ``nn.scan``.

    Tokens ``(n, tokens, features)`` (spatial axes flattened) are embedded to
    ``d_model`` with learned positions, pass pre-LayerNorm blocks (``num_heads``-head
    self-attention, a GELU MLP of ``mlp_ratio · d_model``), a LayerNorm and a mean over
    tokens. Parameters are stacked on a leading block axis (batched layouts);
    ``unroll=num_blocks`` makes XLA's cost model count every block.

    Example:
      >>> from margin_regs.experiments.models import TransformerEncoder, kernel_shapes
      >>> kernel_shapes(TransformerEncoder(10), (128, 64))["blocks/attention/query"]
      (4, 256, 4, 64)

    References:
      Vaswani et al., "Attention Is All You Need", NeurIPS 2017; the pre-LN order of
      Xiong et al., "On Layer Normalization in the Transformer Architecture", 2020.
    """

    num_classes: int
    d_model: int = 256
    num_heads: int = 4
    num_blocks: int = 4
    mlp_ratio: int = 4
    unroll: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(len(x), -1, x.shape[-1])
        x = nn.Dense(self.d_model, name="embed")(x)
        position = nn.Embed(x.shape[1], self.d_model, name="position")
        x = x + position(jax.numpy.arange(x.shape[1]))
        blocks = nn.scan(
            _EncoderBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.num_blocks,
            unroll=self.unroll,
        )
        x, _ = blocks(self.num_heads, self.mlp_ratio, name="blocks")(x, None)
        x = nn.LayerNorm(name="final_norm")(x).mean(axis=1)
        return nn.Dense(self.num_classes, name="classifier")(x)


# The papers' other architectures, for `margin-regs reproduce`.


class SokolicCNN3(SokolicCNN):
    """Sokolić et al.'s 3-layer CNN of Table I: :class:`SokolicCNN`, ``num_conv=3``.

    Example:
      >>> from margin_regs.experiments.models import SokolicCNN3, kernel_shapes
      >>> kernel_shapes(SokolicCNN3(10), (28, 28, 1))["conv_2"]
      (5, 5, 32, 32)

    References:
      Sokolić et al., "Robust Large Margin Deep Neural Networks", 2017, Table I.
    """

    num_conv: int = 3
    covering: bool = True


class SokolicMLP1(SokolicMLP):
    """:class:`SokolicMLP` with one hidden layer (784 → 392 → 10 on MNIST)."""

    num_hidden: int = 1


class SokolicMLP3(SokolicMLP):
    """:class:`SokolicMLP` with three hidden layers (784 → 392 ×3 → 10 on MNIST)."""

    num_hidden: int = 3


class KerasMLP(nn.Module):
    """The Keras ``mnist_mlp`` example Ludwig et al. regularize: 512-512, dropout 0.2.

    ``Dense(width) - ReLU - Dropout`` twice, then the classifier; the dropout, part of
    the architecture in every column of Table 2, is ``dropout_rate or keras_dropout``.

    Example:
      >>> from margin_regs.experiments.models import KerasMLP, kernel_shapes
      >>> kernel_shapes(KerasMLP(10), (28, 28, 1))["hidden_1"]
      (512, 512)

    References:
      Ludwig et al., "Eigenvalue Decay: A New Method for Neural Network
      Regularization", §5 and Table 2 (MNIST row).
    """

    num_classes: int
    width: int = 512
    keras_dropout: float = 0.2
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        rate = self.dropout_rate or self.keras_dropout
        x = x.reshape(x.shape[0], -1)
        for i in range(2):
            x = nn.relu(nn.Dense(self.width, name=f"hidden_{i}")(x))
            self.sow("intermediates", "activations", x)
            x = nn.Dropout(rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="classifier")(x)


MODELS: dict[str, tuple[type[nn.Module], str]] = {
    "mlp": (SokolicMLP, "Sokolić et al. §V: 2 hidden layers of half the input"),
    "cnn": (SokolicCNN, "Sokolić et al. Table I: ((32,5,5)-conv, 2×2 pool) ×2"),
    "adareg_cnn": (AdaRegCNN, "Zhao et al. App. B.1: CONV10-CONV20-FC50-FC10"),
    "cnn3": (SokolicCNN3, "Sokolić et al. Table I: the CNN plus a (32,5,5)-conv"),
    "mlp1": (SokolicMLP1, "Sokolić et al. Fig. 2: 1 hidden layer of half the input"),
    "mlp3": (SokolicMLP3, "Sokolić et al. Fig. 2: 3 hidden layers of half the input"),
    "keras_mlp": (KerasMLP, "Ludwig et al. Table 2: Keras mnist_mlp, 512-512"),
}
"""The reference models by name: ``(class, one-line description)``."""
