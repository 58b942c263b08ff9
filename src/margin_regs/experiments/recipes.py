"""Regularizers as the experiment loop applies them: one :class:`Recipe` each.

A regularizer is a :class:`Recipe`: an optax transform chained before the optimizer,
a projection chained after it, a penalty added to the loss, a loss that replaces the
cross-entropy, a perturbation of each training batch or of the weights of the forward
pass, dropout, or early stopping. Each takes the recipe's one hyperparameter
``coeff``. Adding a method to the comparison is one entry in :data:`RECIPES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

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
    "cross_entropy",
    "jacobian_penalty",
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
      apply_with_activations: ``(params, x) -> (logits, activations)``, the
        hidden representations the reference models sow (a pytree, batch first).
      layouts: the ``weight_dimension_numbers`` of the run (``None``: the library's
        default, conv kernels reshaped; see :attr:`Setup.layouts`).
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

    ``layouts`` is the ``weight_dimension_numbers`` of the run's kernels:
    ``None`` (the library's default: a conv kernel is its reshaped matrix) or, with
    ``--conv-operator``, :func:`~margin_regs.experiments.models.weight_layouts`'
    pytree in which each conv kernel is a :class:`margin_regs.ConvOperator`. Only
    the methods defined on any linear operator take it (spectral norm
    regularization, Eigenvalue Decay); AdaReg and max-norm need true matrices and
    keep their matrix layouts.
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
      grid: the values ``margin-regs compare`` tries by default, around ``coeff``
        (the one chosen on validation is reported).
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
    """

    description: str
    reference: str
    coeff: float | None = None
    grid: tuple[float, ...] = ()
    coeff_name: str = "coeff"
    transform: Callable[[float, Setup], optax.GradientTransformation] | None = None
    projection: Callable[[float, Setup], optax.GradientTransformation] | None = None
    penalty: Callable[[StepContext, float], jax.Array] | None = None
    loss: Callable[[StepContext, float], jax.Array] | None = None
    perturb_inputs: Callable[[jax.Array, jax.Array, float], jax.Array] | None = None
    perturb_params: Callable[[Any, jax.Array, float], Any] | None = None
    dropout: bool = False
    early_stopping: bool = False


def cross_entropy(ctx: StepContext, smoothing: float = 0.0) -> jax.Array:
    """Mean softmax cross-entropy of the step's batch, targets smoothed by ``smoothing``.

    The loss of every recipe that does not replace it (label smoothing sets
    ``smoothing``; Szegedy et al. 2016).
    """
    logits = ctx.apply(ctx.params, ctx.x)
    # A traced smoothing (a grid's coefficient) always takes the smoothed path.
    if not isinstance(smoothing, jax.Array) and smoothing == 0.0:
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, ctx.y))
    targets = optax.smooth_labels(jax.nn.one_hot(ctx.y, ctx.num_classes), smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def jacobian_penalty(ctx: StepContext, coeff: float) -> jax.Array:
    """``coeff`` times Sokolić et al.'s LM penalty for one random class per sample."""
    value = mr.jacobian_margin_penalty(
        ctx.logits_fn(),
        ctx.x,
        classes="random",
        key=ctx.key,
        classifier=models.classifier_kernel(ctx.params),
    )
    return coeff * value


def _eigenvalue_decay(ctx: StepContext, coeff: float) -> jax.Array:
    value = mr.eigenvalue_decay_penalty(
        ctx.params, weight_dimension_numbers=ctx.layouts
    )
    return coeff * value


def _adversarial(ctx: StepContext, coeff: float) -> jax.Array:
    return mr.adversarial_loss(
        ctx.per_sample_loss, ctx.x, ctx.y, epsilon=coeff, alpha=0.5
    )


def _sparse_representation(ctx: StepContext, coeff: float) -> jax.Array:
    logits, activations = ctx.apply_with_activations(ctx.params, ctx.x)
    data = optax.softmax_cross_entropy_with_integer_labels(logits, ctx.y)
    penalty = mr.activation_l1_penalty(activations)
    return jnp.mean(data) + coeff * penalty


def _hinge(ctx: StepContext, coeff: float) -> jax.Array:
    del coeff
    logits = ctx.apply(ctx.params, ctx.x)
    return jnp.mean(optax.losses.multiclass_hinge_loss(logits, ctx.y))


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
        coeff_name="λ",
        transform=lambda c, s: optax.add_decayed_weights(c, mask=models.kernel_mask),
    ),
    "spectral": Recipe(
        "spectral norm regularization: adds λ σ u vᵀ per kernel (1 power iteration/step)",
        "Yoshida & Miyato 2017, Alg. 1 (λ=0.01, §4.1)",
        coeff=0.01,
        grid=(0.003, 0.01, 0.03, 0.1),
        coeff_name="λ",
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
        coeff_name="λ",
        penalty=jacobian_penalty,
    ),
    "adareg": Recipe(
        "AdaReg matrix-normal prior on the classifier's kernel, precisions re-solved "
        "each epoch (the library's default eigenvalue bounds)",
        "Zhao et al. 2019 Alg. 1, last layer only (App. B.3); λ=1e-4 (the authors' rho)",
        coeff=1e-4,
        grid=(3e-5, 1e-4, 3e-4, 1e-3),
        coeff_name="λ",
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
        loss=_adversarial,
    ),
    "hinge": Recipe(
        "multi-class hinge loss instead of cross-entropy (optax.losses.multiclass_hinge_loss)",
        "Sokolić et al. 2017 §V, Table I (hinge beats CCE with WD or LM)",
        loss=_hinge,
    ),
    "label_smoothing": Recipe(
        "label smoothing of the cross-entropy targets (optax.smooth_labels)",
        "Goodfellow et al. §7.5; α=0.1 as in Szegedy et al. 2016",
        coeff=0.1,
        grid=(0.03, 0.1, 0.2, 0.3),
        coeff_name="α",
        loss=lambda ctx, c: cross_entropy(ctx, c),
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
        coeff_name="λ",
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
}
