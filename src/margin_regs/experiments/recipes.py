"""Regularizers as the experiment loop applies them: one :class:`Recipe` each.

Adding a method to the comparison is one entry in :data:`RECIPES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import dm_pix
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import margin_regs as mr
from margin_regs.experiments import models

__all__ = [
    "RECIPES",
    "Recipe",
    "Setup",
    "StepContext",
    "augment_images",
    "cross_entropy",
    "jacobian_penalty",
    "shift_and_rotate",
    "tie_to_init",
]


class StepContext(NamedTuple):
    """What a recipe's loss or penalty sees at one training step.

    Attributes:
      params: the params of the forward pass (weight-noised when the recipe says so).
      x: the batch inputs ``(b, ...)`` (after any input perturbation).
      y: integer labels ``(b,)``.
      key: a fresh key for the penalty's own randomness.
      apply: ``(params, x) -> logits`` in training mode (dropout active).
      num_classes: number of classes.
      apply_with_activations: ``(params, x) -> (logits, activations)``, the hidden
        representations the reference models sow (a pytree, batch first).
      layouts: the run's ``weight_dimension_numbers`` (:attr:`Setup.layouts`).
    """

    params: Any
    x: jax.Array
    y: jax.Array
    key: jax.Array
    apply: Callable[[Any, jax.Array], jax.Array]
    num_classes: int
    apply_with_activations: Callable[[Any, jax.Array], tuple[jax.Array, Any]]
    layouts: Any = None

    def logits_fn(self) -> Callable[[jax.Array], jax.Array]:
        """``x -> logits`` at this step's params."""
        return lambda x: self.apply(self.params, x)

    def per_sample_loss(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """Softmax cross-entropy ``(b,)`` at this step's params."""
        return optax.softmax_cross_entropy_with_integer_labels(
            self.apply(self.params, x), y
        )


class Setup(NamedTuple):
    """What a recipe's transform factory may need to know about the run.

    ``layouts``: ``None`` (conv kernels as reshaped matrices) or, with
    ``--conv-operator``, :func:`~margin_regs.experiments.models.weight_layouts`' pytree
    of :class:`margin_regs.ConvOperator` s, taken by the methods defined on any linear
    operator (spectral, Eigenvalue Decay); AdaReg and max-norm keep matrices.
    """

    model: nn.Module
    steps_per_epoch: int
    epochs: int
    layouts: Any = None


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One regularizer as the experiment loop applies it; every part is optional.

    Attributes:
      description: one line for ``--help`` and the README.
      reference: where the method and its default hyperparameter come from.
      coeff: the paper's value of the recipe's one hyperparameter (``None``: none).
      grid: the values ``margin-regs compare`` tries by default, around ``coeff``.
      coeff_name: what ``coeff`` is (``"λ"``, ``"ε"``, ``"patience"``...).
      transform: ``(coeff, setup) -> GradientTransformation`` chained before SGD.
      projection: ``(coeff, setup) -> GradientTransformation`` chained after SGD
        (constraints that must see the final update, e.g. max-norm).
      penalty: ``(ctx, coeff) -> scalar`` added to the loss.
      loss: ``(ctx, coeff) -> scalar`` replacing the mean cross-entropy.
      perturb_inputs: ``(x, key, coeff) -> x`` applied to each training batch.
      perturb_params: ``(params, key, coeff) -> params`` for the forward pass.
      dropout: if true, the model is built with dropout rate ``coeff``.
      early_stopping: if true, ``coeff`` is the patience in epochs.
      bagging: if true, ``coeff`` members train on bootstrap resamples, averaged
        (:mod:`margin_regs.experiments.bagging`).
      images_only: if true, ``compare`` refuses data that are not ``(n, H, W, C)``.
    """

    description: str
    reference: str
    coeff: float | None = None
    grid: tuple[float, ...] = ()
    coeff_name: str = "λ"
    transform: Callable[[float, Setup], optax.GradientTransformation] | None = None
    projection: Callable[[float, Setup], optax.GradientTransformation] | None = None
    penalty: Callable[[StepContext, float], jax.Array] | None = None
    loss: Callable[[StepContext, float], jax.Array] | None = None
    perturb_inputs: Callable[[jax.Array, jax.Array, float], jax.Array] | None = None
    perturb_params: Callable[[Any, jax.Array, float], Any] | None = None
    dropout: bool = False
    early_stopping: bool = False
    bagging: bool = False
    images_only: bool = False


def cross_entropy(ctx: StepContext, smoothing: float = 0.0) -> jax.Array:
    """Mean softmax cross-entropy of the batch, targets smoothed by ``smoothing``."""
    logits = ctx.apply(ctx.params, ctx.x)
    # A traced smoothing (a grid's coefficient) always takes the smoothed path.
    if not isinstance(smoothing, jax.Array) and smoothing == 0.0:
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, ctx.y))
    targets = optax.smooth_labels(jax.nn.one_hot(ctx.y, ctx.num_classes), smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def jacobian_penalty(ctx: StepContext, coeff: float) -> jax.Array:
    """``coeff`` times Sokolić et al.'s LM penalty for one random class per sample."""
    classifier = models.classifier_kernel(ctx.params)
    return coeff * mr.jacobian_margin_penalty(
        ctx.logits_fn(), ctx.x, classes="random", key=ctx.key, classifier=classifier
    )


def _eigenvalue_decay(ctx: StepContext, coeff: float) -> jax.Array:
    value = mr.eigenvalue_decay_penalty(
        ctx.params, weight_dimension_numbers=ctx.layouts
    )
    return coeff * value


def _sparse_representation(ctx: StepContext, coeff: float) -> jax.Array:
    logits, activations = ctx.apply_with_activations(ctx.params, ctx.x)
    data = optax.softmax_cross_entropy_with_integer_labels(logits, ctx.y)
    return jnp.mean(data) + coeff * mr.activation_l1_penalty(activations)


# Rotation range per pixel of translation range: ±2 pixels come with ±10°.
DEGREES_PER_PIXEL = 5.0


def augment_images(x: jax.Array, key: jax.Array, coeff: float) -> jax.Array:
    """Each image of ``x (n, H, W, C)`` randomly shifted and rotated (dm-pix).

    Shifts uniform in ``[−coeff, coeff]`` pixels along each axis, rotations uniform
    in ``±DEGREES_PER_PIXEL · coeff`` degrees (:func:`shift_and_rotate`).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from margin_regs.experiments.recipes import augment_images
      >>> x = jnp.zeros((2, 8, 8, 1)).at[:, 3:5, 3:5].set(1.0)
      >>> out = augment_images(x, jax.random.key(0), 2.0)
      >>> out.shape, bool(jnp.all(out == x))
      ((2, 8, 8, 1), False)
    """
    k_shift, k_angle = jax.random.split(key)
    shifts = coeff * jax.random.uniform(k_shift, (len(x), 2), minval=-1.0, maxval=1.0)
    limit = jnp.deg2rad(DEGREES_PER_PIXEL) * coeff
    angles = limit * jax.random.uniform(k_angle, (len(x),), minval=-1.0, maxval=1.0)
    return shift_and_rotate(x, shifts, angles)


def shift_and_rotate(x: jax.Array, shifts: jax.Array, angles: jax.Array) -> jax.Array:
    """Image ``i`` of ``x (n, H, W, C)`` rotated by ``angles[i]`` radians about its
    centre (``dm_pix.rotate``'s sense), then moved by ``shifts[i] = (rows, columns)``
    pixels: one bilinear ``dm_pix.affine_transform``, zero fill at the edges.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_regs.experiments.recipes import shift_and_rotate
      >>> x = jnp.zeros((1, 3, 3, 1)).at[0, 1, 1].set(1.0)
      >>> shift_and_rotate(x, jnp.array([[0.0, 1.0]]), jnp.zeros(1))[0, :, :, 0].tolist()
      [[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    """

    def one(image, shift, angle):
        c, s = jnp.cos(angle), jnp.sin(angle)
        # dm_pix pulls: output pixel o reads input M (o − centre) + centre − shift.
        matrix = jnp.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])
        centre = (jnp.asarray(image.shape, image.dtype) - 1) / 2
        offset = centre - matrix @ centre - jnp.append(shift, 0.0)
        return dm_pix.affine_transform(
            image, matrix, offset=offset, order=1, mode="constant"
        )

    # dm_pix's "constant" mode returns 0 for a sample even a rounding error outside
    # the image: a zero frame makes the edge pixels interpolate toward 0 instead
    # (otherwise the slightest rotation blanks half of the border of an 8×8 digit).
    framed = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jax.vmap(one)(framed, shifts, angles)[:, 1:-1, 1:-1]


class TieToInitState(NamedTuple):
    reference: Any


def tie_to_init(coeff: Any) -> optax.GradientTransformation:
    """Adds ``coeff · ∇ parameter_tying_penalty(params, params₀)``, ``params₀`` the
    params the state was initialised with (L2 toward the start point; Li et al. 2018).

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_regs.experiments.recipes import tie_to_init
      >>> tx = tie_to_init(0.5)
      >>> state = tx.init({"kernel": jnp.zeros((1, 2))})
      >>> p = {"kernel": jnp.array([[1.0, -2.0]])}
      >>> tx.update({"kernel": jnp.zeros((1, 2))}, state, p)[0]["kernel"].tolist()
      [[1.0, -2.0]]
    """

    def init(params):
        return TieToInitState(jax.tree.map(jnp.copy, params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("tie_to_init needs params: call update(g, state, params)")
        grads = jax.grad(mr.parameter_tying_penalty)(params, state.reference)
        return jax.tree.map(lambda u, g: u + coeff * g, updates, grads), state

    return optax.GradientTransformation(init, update)


RECIPES: dict[str, Recipe] = {
    "vanilla": Recipe(
        "no regularization: cross-entropy, SGD with Nesterov momentum",
        "the common baseline of every paper",
    ),
    "weight_decay": Recipe(
        "L2 weight decay on kernels (optax.add_decayed_weights, biases masked out)",
        "Yoshida & Miyato 2017 §4.1 (λ=1e-4); Goodfellow et al. §7.1",
        coeff=1e-4,
        grid=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
        transform=lambda c, s: optax.add_decayed_weights(c, mask=models.kernel_mask),
    ),
    "spectral": Recipe(
        "spectral norm regularization: adds λ σ u vᵀ per kernel (1 power iteration/step)",
        "Yoshida & Miyato 2017, Alg. 1 (λ=0.01, §4.1)",
        coeff=0.01,
        grid=(0.003, 0.01, 0.03, 0.1),
        transform=lambda c, s: mr.spectral_norm_regularization(
            c, weight_dimension_numbers=s.layouts
        ),
    ),
    "eigenvalue_decay": Recipe(
        "Eigenvalue Decay: C·Σ sqrt(λ_dom(KᵀK)) by 9 power iterations, autodiff (the seed's form)",
        "Ludwig et al. (C chosen by 5-fold CV there, not reported; default 1e-3 here)",
        coeff=1e-3,
        grid=(3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
        coeff_name="C",
        penalty=_eigenvalue_decay,
    ),
    "jacobian": Recipe(
        "Jacobian large-margin penalty ‖∇ₓ z_c‖/‖v_c‖, one random class per sample",
        "Sokolić et al. 2017 eq. (26), DNN setup (λ from their grid {0.01,0.1,1,2}; 0.1 here)",
        coeff=0.1,
        grid=(0.01, 0.1, 1.0, 2.0),
        penalty=jacobian_penalty,
    ),
    "adareg": Recipe(
        "AdaReg matrix-normal prior on the classifier's kernel, precisions re-solved "
        "each epoch (the library's default eigenvalue bounds)",
        "Zhao et al. 2019 Alg. 1, last layer only (App. B.3); λ=1e-4 (the authors' rho)",
        coeff=1e-4,
        grid=(3e-5, 1e-4, 3e-4, 1e-3),
        transform=lambda c, s: mr.adareg(
            c, update_every=s.steps_per_epoch, mask=models.classifier_mask
        ),
    ),
    "adversarial": Recipe(
        "l2 fast-gradient adversarial training, α=0.5",
        "Yoshida & Miyato 2017 eq. (3), α=0.5, ε=1 (after Goodfellow et al. 2015)",
        coeff=1.0,
        grid=(0.25, 0.5, 1.0, 2.0),
        coeff_name="ε",
        loss=lambda ctx, eps: mr.adversarial_loss(
            ctx.per_sample_loss, ctx.x, ctx.y, epsilon=eps, alpha=0.5
        ),
    ),
    "hinge": Recipe(
        "multi-class hinge loss instead of cross-entropy (optax.losses.multiclass_hinge_loss)",
        "Sokolić et al. 2017 §V, Table I (hinge beats CCE with WD or LM)",
        loss=lambda ctx, _: jnp.mean(
            optax.losses.multiclass_hinge_loss(ctx.apply(ctx.params, ctx.x), ctx.y)
        ),
    ),
    "label_smoothing": Recipe(
        "label smoothing of the cross-entropy targets (optax.smooth_labels)",
        "Goodfellow et al. §7.5; α=0.1 as in Szegedy et al. 2016",
        coeff=0.1,
        grid=(0.03, 0.1, 0.2, 0.3),
        coeff_name="α",
        loss=cross_entropy,
    ),
    "dropout": Recipe(
        "dropout on hidden units (flax.linen.Dropout)",
        "Goodfellow et al. §7.12; rate 0.25 here (Srivastava et al. use 0.5 on wide layers)",
        coeff=0.25,
        grid=(0.1, 0.25, 0.5),
        coeff_name="rate",
        dropout=True,
    ),
    "l1": Recipe(
        "L1 penalty on kernels: adds coeff·sign(w)",
        "Goodfellow et al. §7.1; Ludwig et al. compare L1 (CV-chosen); 1e-5 here",
        coeff=1e-5,
        grid=(1e-6, 1e-5, 1e-4, 1e-3),
        transform=lambda c, s: mr.add_l1_penalty(c),
    ),
    "max_norm": Recipe(
        "max-norm constraint: each unit's incoming weights projected onto ‖w‖ ≤ c",
        "Goodfellow et al. §7.2; c=3 (Srivastava et al. 2014 use 3 to 4)",
        coeff=3.0,
        grid=(1.0, 2.0, 3.0, 4.0),
        coeff_name="c",
        projection=lambda c, s: mr.max_norm_constraint(c),
    ),
    "weight_noise": Recipe(
        "Gaussian noise on the kernels of each training forward pass",
        "Goodfellow et al. §7.5 (σ=0.01 here)",
        coeff=0.01,
        grid=(0.003, 0.01, 0.03, 0.1),
        coeff_name="σ",
        perturb_params=mr.perturb_weights,
    ),
    "input_noise": Recipe(
        "Gaussian noise on each training batch's inputs",
        "Goodfellow et al. §7.4 (σ=0.1 here, inputs in [0, 1])",
        coeff=0.1,
        grid=(0.03, 0.1, 0.3),
        coeff_name="σ",
        perturb_inputs=mr.add_input_noise,
    ),
    "activation_l1": Recipe(
        "L1 penalty on the hidden representations (sparse activations)",
        "Goodfellow et al. §7.10 (α=1e-4 here)",
        coeff=1e-4,
        grid=(1e-5, 1e-4, 1e-3),
        coeff_name="α",
        loss=_sparse_representation,
    ),
    "early_stopping": Recipe(
        "early stopping on validation accuracy, restoring the best epoch's params",
        "Goodfellow et al. §7.8 (patience 5 epochs here)",
        coeff=5,
        grid=(3, 5, 10),
        coeff_name="patience",
        early_stopping=True,
    ),
    "tangent_prop": Recipe(
        "tangent propagation: λ·Σ‖J t‖² along the images' translation, rotation and "
        "scaling tangents (mr.image_tangents), forward mode",
        "Goodfellow et al. §7.14; Simard et al. 1992 (λ=1e-3 here)",
        coeff=1e-3,
        grid=(1e-4, 1e-3, 0.01, 0.1),
        penalty=lambda ctx, c: (
            c
            * mr.tangent_prop_penalty(ctx.logits_fn(), ctx.x, mr.image_tangents(ctx.x))
        ),
        images_only=True,
    ),
    "augmentation": Recipe(
        "each training batch randomly shifted by up to c pixels and rotated by up to "
        "5c degrees (dm_pix.affine_transform)",
        "Goodfellow et al. §7.4 (c=2: ±2 pixels, ±10° here)",
        coeff=2.0,
        grid=(0.25, 0.5, 1.0, 2.0),
        coeff_name="c",
        perturb_inputs=augment_images,
        images_only=True,
    ),
    "bagging": Recipe(
        "bagging: k members, each on its own bootstrap resample of the training set, "
        "averaged probabilities (the row is the ensemble's; ms/epoch: all k members)",
        "Goodfellow et al. §7.11; Breiman 1996 (k=5 here)",
        coeff=5,
        grid=(3, 5, 10),
        coeff_name="k",
        bagging=True,
    ),
    "l2_init": Recipe(
        "L2 toward the initialization: λ·Σ‖w − w₀‖² on kernels "
        "(mr.parameter_tying_penalty)",
        "Goodfellow et al. §7.9; Li et al. 2018 (L2-SP) (λ=1e-3 here)",
        coeff=1e-3,
        grid=(1e-4, 1e-3, 1e-2, 0.1),
        transform=lambda c, s: tie_to_init(c),
    ),
}
