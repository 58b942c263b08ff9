"""The train/evaluate loop shared by ``margin-regs compare`` and the notebooks.

A regularizer is a :class:`Recipe`: an optax transform chained before the optimizer,
a projection chained after it, a penalty added to the loss, a loss that replaces the
cross-entropy, a perturbation of each training batch or of the weights of the forward
pass, dropout, or early stopping. Each takes the recipe's one hyperparameter
``coeff``. Adding a method to the comparison is one entry in :data:`RECIPES`.

One :class:`Trainer` per (recipe, coefficient, model, schedule) holds the jitted
functions: an epoch is one ``lax.scan`` over its minibatches (compiled once, no host
round trip inside the epoch), evaluation is one chunked pass. Everything random comes
from the run's seed, so a seed reproduces a run bit for bit on the same machine.

The optimizer is the papers' common one: SGD with Nesterov momentum 0.9, the learning
rate divided by 10 after half and after three quarters of the epochs (Yoshida &
Miyato §4.1; Sokolić et al. use SGD with momentum 0.9 and a similar step schedule).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from margin_regs import _tree, diagnostics, models
from margin_regs._adareg import adareg
from margin_regs.baselines import (
    activation_l1_penalty,
    add_input_noise,
    add_l1_penalty,
    max_norm_constraint,
    perturb_weights,
)
from margin_regs.data import Dataset
from margin_regs.jacobian import adversarial_loss, jacobian_margin_penalty
from margin_regs.penalties import eigenvalue_decay_penalty
from margin_regs.transforms import spectral_norm_regularization

__all__ = [
    "RECIPES",
    "Evaluator",
    "Recipe",
    "RunResult",
    "Setup",
    "StepContext",
    "TrainConfig",
    "Trainer",
    "get_evaluator",
    "get_trainer",
    "run",
    "summarize",
    "time_epochs",
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
    """

    params: Any
    x: jax.Array
    y: jax.Array
    key: jax.Array
    apply: Callable[[Any, jax.Array], jax.Array]
    num_classes: int
    apply_with_activations: Callable[[Any, jax.Array], tuple[jax.Array, Any]]

    def logits_fn(self) -> Callable[[jax.Array], jax.Array]:
        """``x -> logits`` at this step's params."""
        return lambda x: self.apply(self.params, x)

    def per_sample_loss(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """Softmax cross-entropy ``(b,)`` at this step's params."""
        return optax.softmax_cross_entropy_with_integer_labels(
            self.apply(self.params, x), y
        )


class Setup(NamedTuple):
    """What a recipe's transform factory may need to know about the run."""

    model: nn.Module
    steps_per_epoch: int
    epochs: int


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One regularizer as the experiment loop applies it; every part is optional.

    Attributes:
      description: one line for ``--help`` and the README.
      reference: where the method and its default hyperparameter come from.
      coeff: the default value of the recipe's one hyperparameter (``None``: none).
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
    coeff_name: str = "coeff"
    transform: Callable[[float, Setup], optax.GradientTransformation] | None = None
    projection: Callable[[float, Setup], optax.GradientTransformation] | None = None
    penalty: Callable[[StepContext, float], jax.Array] | None = None
    loss: Callable[[StepContext, float], jax.Array] | None = None
    perturb_inputs: Callable[[jax.Array, jax.Array, float], jax.Array] | None = None
    perturb_params: Callable[[Any, jax.Array, float], Any] | None = None
    dropout: bool = False
    early_stopping: bool = False


def _cross_entropy(ctx: StepContext, smoothing: float = 0.0) -> jax.Array:
    logits = ctx.apply(ctx.params, ctx.x)
    if smoothing == 0.0:
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, ctx.y))
    targets = optax.smooth_labels(jax.nn.one_hot(ctx.y, ctx.num_classes), smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def _jacobian_penalty(ctx: StepContext, coeff: float) -> jax.Array:
    value = jacobian_margin_penalty(
        ctx.logits_fn(),
        ctx.x,
        classes="random",
        key=ctx.key,
        classifier=models.classifier_kernel(ctx.params),
    )
    return coeff * value


def _adversarial(ctx: StepContext, coeff: float) -> jax.Array:
    return adversarial_loss(ctx.per_sample_loss, ctx.x, ctx.y, epsilon=coeff, alpha=0.5)


def _sparse_representation(ctx: StepContext, coeff: float) -> jax.Array:
    logits, activations = ctx.apply_with_activations(ctx.params, ctx.x)
    data = optax.softmax_cross_entropy_with_integer_labels(logits, ctx.y)
    penalty = activation_l1_penalty(activations)
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
        coeff_name="λ",
        transform=lambda c, s: optax.add_decayed_weights(c, mask=_tree.default_mask),
    ),
    "spectral": Recipe(
        "spectral norm regularization: adds λ σ u vᵀ per kernel (1 power iteration/step)",
        "Yoshida & Miyato 2017, Alg. 1 (λ=0.01, §4.1)",
        coeff=0.01,
        coeff_name="λ",
        transform=lambda c, s: spectral_norm_regularization(c),
    ),
    "eigenvalue_decay": Recipe(
        "Eigenvalue Decay: C·Σ sqrt(λ_dom(KᵀK)) by 9 power iterations, autodiff (the seed's form)",
        "Ludwig et al. (C chosen by 5-fold CV there, not reported; default 1e-3 here)",
        coeff=1e-3,
        coeff_name="C",
        penalty=lambda ctx, c: c * eigenvalue_decay_penalty(ctx.params),
    ),
    "jacobian": Recipe(
        "Jacobian large-margin penalty ‖∇ₓ z_c‖/‖v_c‖, one random class per sample",
        "Sokolić et al. 2017 eq. (26), DNN setup (λ from their grid {0.01,0.1,1,2}; 0.1 here)",
        coeff=0.1,
        coeff_name="λ",
        penalty=_jacobian_penalty,
    ),
    "adareg": Recipe(
        "AdaReg matrix-normal prior on the classifier's kernel, precisions re-solved "
        "each epoch, eigenvalues clipped to [1e-2, 1e2]",
        "Zhao et al. 2019 Alg. 1, last layer only (App. B.3); λ=1e-4 (the authors' rho)",
        coeff=1e-4,
        coeff_name="λ",
        # Bounds [1e-2, 1e2], not the library's [1e-3, 1e3]: the added gradient can
        # reach 2·λ·upper² times K, and lr·2·1e-4·1e6 = 2 at lr 0.01 makes SGD
        # diverge on the classifier (measured on digits); 1e2 keeps it at 0.02.
        transform=lambda c, s: adareg(
            c,
            lower=1e-2,
            upper=1e2,
            update_every=s.steps_per_epoch,
            mask=models.classifier_mask,
        ),
    ),
    "adversarial": Recipe(
        "l2 fast-gradient adversarial training, α=0.5",
        "Yoshida & Miyato 2017 eq. (3), α=0.5, ε=1 (after Goodfellow et al. 2015)",
        coeff=1.0,
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
        coeff_name="α",
        loss=lambda ctx, c: _cross_entropy(ctx, c),
    ),
    "dropout": Recipe(
        "dropout on hidden units (flax.linen.Dropout)",
        "Goodfellow et al. §7.12; rate 0.25 here (Srivastava et al. use 0.5 on wide layers)",
        coeff=0.25,
        coeff_name="rate",
        dropout=True,
    ),
    "l1": Recipe(
        "L1 penalty on kernels: adds coeff·sign(w)",
        "Goodfellow et al. §7.1; Ludwig et al. compare L1 (CV-chosen); 1e-5 here",
        coeff=1e-5,
        coeff_name="λ",
        transform=lambda c, s: add_l1_penalty(c),
    ),
    "max_norm": Recipe(
        "max-norm constraint: each unit's incoming weights projected onto ‖w‖ ≤ c",
        "Goodfellow et al. §7.2; c=3 (Srivastava et al. 2014 use 3 to 4)",
        coeff=3.0,
        coeff_name="c",
        projection=lambda c, s: max_norm_constraint(c),
    ),
    "weight_noise": Recipe(
        "Gaussian noise on the kernels of each training forward pass",
        "Goodfellow et al. §7.5 (σ=0.01 here)",
        coeff=0.01,
        coeff_name="σ",
        perturb_params=perturb_weights,
    ),
    "input_noise": Recipe(
        "Gaussian noise on each training batch's inputs",
        "Goodfellow et al. §7.4 (σ=0.1 here, inputs in [0, 1])",
        coeff=0.1,
        coeff_name="σ",
        perturb_inputs=add_input_noise,
    ),
    "activation_l1": Recipe(
        "L1 penalty on the hidden representations (sparse activations)",
        "Goodfellow et al. §7.10 (α=1e-4 here)",
        coeff=1e-4,
        coeff_name="α",
        loss=_sparse_representation,
    ),
    "early_stopping": Recipe(
        "early stopping on validation accuracy, restoring the best epoch's params",
        "Goodfellow et al. §7.8 (patience 5 epochs here)",
        coeff=5,
        coeff_name="patience",
        early_stopping=True,
    ),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The schedule every recipe of a comparison shares.

    Attributes:
      model: a name in :data:`margin_regs.models.MODELS`.
      epochs: passes over the training set (Sokolić et al.'s CNN setup: 100).
      batch_size: minibatch size (Sokolić et al.'s CNN setup: 32).
      learning_rate: initial SGD step (Sokolić et al. and Yoshida & Miyato: 0.01).
      momentum: Nesterov momentum (0.9 in both papers).
      patience: early stopping for every recipe (``None``: only the
        ``early_stopping`` recipe stops early).
      margin_samples: test samples whose input margins are estimated.
    """

    model: str = "mlp"
    epochs: int = 100
    batch_size: int = 32
    learning_rate: float = 0.01
    momentum: float = 0.9
    patience: int | None = None
    margin_samples: int = 1000


class TrainState(NamedTuple):
    params: Any
    opt_state: Any


class Trainer:
    """Jitted training and evaluation for one recipe, coefficient and schedule.

    Build it through :func:`get_trainer`, which caches it, so that every seed and
    every caller with the same settings reuses the compiled functions.
    """

    def __init__(
        self,
        recipe: Recipe,
        coeff: float | None,
        config: TrainConfig,
        num_classes: int,
        train_size: int,
    ):
        self.recipe = recipe
        self.coeff = coeff
        self.config = config
        self.num_classes = num_classes
        self.batch_size = min(config.batch_size, train_size)
        self.steps_per_epoch = train_size // self.batch_size
        self.model = models.make_model(
            config.model, num_classes, dropout_rate=coeff if recipe.dropout else 0.0
        )
        setup = Setup(self.model, self.steps_per_epoch, config.epochs)
        total = self.steps_per_epoch * config.epochs
        schedule = optax.piecewise_constant_schedule(
            config.learning_rate, {total // 2: 0.1, (3 * total) // 4: 0.1}
        )
        parts = []
        if recipe.transform is not None:
            parts.append(recipe.transform(coeff, setup))
        parts.append(optax.sgd(schedule, momentum=config.momentum, nesterov=True))
        if recipe.projection is not None:
            parts.append(recipe.projection(coeff, setup))
        self.optimizer = optax.chain(*parts)
        self.train_epoch = jax.jit(self._train_epoch)
        self.eval = get_evaluator(config.model, num_classes)

    def init(self, key: jax.Array, sample: jax.Array) -> TrainState:
        params = self.eval.init(key, sample[:1])["params"]
        return TrainState(params, self.optimizer.init(params))

    def _objective(self, params, x, y, key):
        recipe, coeff = self.recipe, self.coeff
        k_input, k_weights, k_dropout, k_penalty = jax.random.split(key, 4)
        if recipe.perturb_inputs is not None:
            x = recipe.perturb_inputs(x, k_input, coeff)
        if recipe.perturb_params is not None:
            params = recipe.perturb_params(params, k_weights, coeff)

        def apply(p, inputs):
            return self.model.apply(
                {"params": p}, inputs, train=True, rngs={"dropout": k_dropout}
            )

        def apply_with_activations(p, inputs):
            logits, state = self.model.apply(
                {"params": p},
                inputs,
                train=True,
                rngs={"dropout": k_dropout},
                mutable=["intermediates"],
            )
            return logits, state["intermediates"]

        ctx = StepContext(
            params, x, y, k_penalty, apply, self.num_classes, apply_with_activations
        )
        loss = (
            recipe.loss(ctx, coeff) if recipe.loss is not None else _cross_entropy(ctx)
        )
        if recipe.penalty is not None:
            loss = loss + recipe.penalty(ctx, coeff)
        return loss

    def _train_epoch(
        self, state: TrainState, x, y, key
    ) -> tuple[TrainState, jax.Array]:
        k_order, k_steps = jax.random.split(key)
        b, steps = self.batch_size, self.steps_per_epoch
        order = jax.random.permutation(k_order, x.shape[0])[: steps * b].reshape(
            steps, b
        )

        def step(state, inputs):
            idx, k = inputs
            loss, grads = jax.value_and_grad(self._objective)(
                state.params, x[idx], y[idx], k
            )
            updates, opt_state = self.optimizer.update(
                grads, state.opt_state, state.params
            )
            return TrainState(
                optax.apply_updates(state.params, updates), opt_state
            ), loss

        state, losses = jax.lax.scan(
            step, state, (order, jax.random.split(k_steps, steps))
        )
        return state, jnp.mean(losses)


EVAL_CHUNK = 256


class Evaluator:
    """Jitted measurements of one model architecture, shared by all its recipes.

    Evaluation runs the model without dropout, so the measurements do not depend on
    the recipe. Data pass through in chunks of :data:`EVAL_CHUNK` samples (the last
    one padded), so every function compiles once per (model, number of classes),
    whatever the sizes of the splits.
    """

    def __init__(self, model_name: str, num_classes: int):
        self.model = models.make_model(model_name, num_classes)
        # Dropout adds no parameters: one jitted init serves every recipe.
        self.init = jax.jit(self.model.init)
        self._per_sample = jax.jit(self._per_sample_fn)
        self._input_margins = jax.jit(self._input_margins_fn)
        self.layer_stats = jax.jit(
            lambda p: (diagnostics.spectral_norms(p), diagnostics.stable_ranks(p))
        )
        self.spectra = jax.jit(diagnostics.singular_value_spectra)

    def _per_sample_fn(self, params, x, y):
        logits = self.model.apply({"params": params}, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = jnp.argmax(logits, axis=-1) == y
        return loss, correct, diagnostics.output_margins(logits, y)

    def _input_margins_fn(self, params, x, y):
        return diagnostics.input_margin_estimates(
            lambda b: self.model.apply({"params": params}, b), x, y
        )

    def per_sample(self, params, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        """Cross-entropy, correctness and logit margin of every sample."""
        loss, correct, margin = _chunked(self._per_sample, params, x, y)
        return {"loss": loss, "correct": correct, "output_margin": margin}

    def evaluate(self, params, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """Mean cross-entropy and accuracy."""
        out = self.per_sample(params, x, y)
        return float(np.mean(out["loss"])), float(np.mean(out["correct"]))

    def input_margins(self, params, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """First-order input-margin estimate of every sample."""
        return _chunked(self._input_margins, params, x, y)[0]


def _chunked(fn, params, x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    outs = []
    for start in range(0, len(x), EVAL_CHUNK):
        xs, ys = x[start : start + EVAL_CHUNK], y[start : start + EVAL_CHUNK]
        n = len(xs)
        if n < EVAL_CHUNK:
            # Repeat the last sample up to the chunk size: one compiled shape.
            xs = np.concatenate([xs, np.repeat(xs[-1:], EVAL_CHUNK - n, 0)])
            ys = np.concatenate([ys, np.repeat(ys[-1:], EVAL_CHUNK - n, 0)])
        out = fn(params, xs, ys)
        outs.append(
            [np.asarray(o)[:n] for o in (out if isinstance(out, tuple) else (out,))]
        )
    return [np.concatenate(parts) for parts in zip(*outs, strict=True)]


_EVALUATORS: dict[tuple[str, int], Evaluator] = {}


def get_evaluator(model_name: str, num_classes: int) -> Evaluator:
    """The cached :class:`Evaluator` for a model architecture."""
    key = (model_name, num_classes)
    if key not in _EVALUATORS:
        _EVALUATORS[key] = Evaluator(model_name, num_classes)
    return _EVALUATORS[key]


_TRAINERS: dict[tuple, Trainer] = {}


def get_trainer(
    recipe: Recipe | str,
    coeff: float | None,
    config: TrainConfig,
    num_classes: int,
    train_size: int,
) -> Trainer:
    """The cached :class:`Trainer` for these settings (compiled functions shared).

    Example:
      >>> from margin_regs.experiment import TrainConfig, get_trainer
      >>> t = get_trainer("vanilla", None, TrainConfig(), 10, 100)
      >>> t is get_trainer("vanilla", None, TrainConfig(), 10, 100), t.steps_per_epoch
      (True, 3)
    """
    if isinstance(recipe, str):
        recipe = RECIPES[recipe]
    key = (recipe, coeff, config, num_classes, train_size)
    if key not in _TRAINERS:
        _TRAINERS[key] = Trainer(recipe, coeff, config, num_classes, train_size)
    return _TRAINERS[key]


@dataclasses.dataclass
class RunResult:
    """Everything one (recipe, seed) run measured; ``dataclasses.asdict`` is JSON-ready.

    ``history`` holds per-epoch lists: ``train_loss``/``train_acc`` (full training
    set, evaluation mode), ``val_acc``, ``test_loss``/``test_acc``, ``objective``
    (the mean regularized training loss over the epoch's steps), ``sigma_max`` and
    ``stable_rank`` (``{layer: [...]}``) and ``seconds`` (the epoch's training time).
    ``final`` is measured on the returned params (the best epoch's when early
    stopping restored them).
    """

    regularizer: str
    coeff: float | None
    seed: int
    history: dict[str, Any]
    final: dict[str, Any]
    early_stopping: dict[str, Any]
    seconds_per_epoch: float
    cpu_seconds_per_epoch: float
    singular_values: dict[str, list[float]]
    input_margins: list[float]
    output_margins: list[float]
    params: Any = dataclasses.field(default=None, repr=False)


def _floats(tree: dict[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in tree.items()}


def run(
    regularizer: str,
    dataset: Dataset,
    *,
    seed: int = 0,
    config: TrainConfig | None = None,
    coeff: float | None = None,
    recipes: dict[str, Recipe] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> RunResult:
    """Train one reference model with one regularizer and measure it.

    Args:
      regularizer: a name in ``recipes``.
      dataset: a prepared :class:`~margin_regs.data.Dataset` (with a validation set).
      seed: seeds the initialization, the minibatch order and every noise draw.
      config: the shared schedule.
      coeff: the recipe's hyperparameter (``None``: the recipe's default).
      recipes: the registry (default :data:`RECIPES`).
      on_epoch: called after each epoch with ``(epoch, metrics)`` (progress bars).

    Returns:
      A :class:`RunResult`; ``params`` holds the final (or restored) params.

    Example:
      >>> from margin_regs.data import load_digits, prepare
      >>> from margin_regs.experiment import TrainConfig, run
      >>> ds = prepare(load_digits(), train_size=64)
      >>> r = run("vanilla", ds, config=TrainConfig(epochs=2))
      >>> len(r.history["test_acc"]), 0.0 <= r.final["test_acc"] <= 1.0
      (2, True)
    """
    recipes = RECIPES if recipes is None else recipes
    config = TrainConfig() if config is None else config
    if regularizer not in recipes:
        raise ValueError(
            f"unknown regularizer {regularizer!r}; choose from {sorted(recipes)}"
        )
    if dataset.x_val is None or len(dataset.x_val) == 0:
        raise ValueError(
            "run needs a validation set: pass the data through data.prepare"
        )
    recipe = recipes[regularizer]
    coeff = recipe.coeff if coeff is None else coeff
    trainer = get_trainer(
        recipe, coeff, config, dataset.num_classes, len(dataset.x_train)
    )
    patience = int(coeff) if recipe.early_stopping else config.patience

    k_init, k_train = jax.random.split(jax.random.key(seed))
    x_train, y_train = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)
    splits = {
        "train": (dataset.x_train, dataset.y_train),
        "val": (dataset.x_val, dataset.y_val),
        "test": (dataset.x_test, dataset.y_test),
    }
    evaluator = trainer.eval
    state = trainer.init(k_init, x_train)
    names = ("train_loss", "train_acc", "val_acc", "test_loss", "test_acc", "objective")
    history: dict[str, Any] = {k: [] for k in (*names, "seconds", "cpu_seconds")}
    history["sigma_max"], history["stable_rank"] = {}, {}
    best = (-1.0, 0, state.params)
    stopped = config.epochs
    for epoch in range(config.epochs):
        start, cpu_start = time.perf_counter(), time.process_time()
        state, objective = trainer.train_epoch(
            state, x_train, y_train, jax.random.fold_in(k_train, epoch)
        )
        metrics = {"objective": float(objective)}
        history["seconds"].append(time.perf_counter() - start)
        history["cpu_seconds"].append(time.process_time() - cpu_start)
        for split, (x, y) in splits.items():
            loss, acc = evaluator.evaluate(state.params, x, y)
            metrics[f"{split}_acc"] = acc
            if split != "val":
                metrics[f"{split}_loss"] = loss
        for k, v in metrics.items():
            history[k].append(v)
        sigmas, ranks = evaluator.layer_stats(state.params)
        for name, value in _floats(sigmas).items():
            history["sigma_max"].setdefault(name, []).append(value)
        for name, value in _floats(ranks).items():
            history["stable_rank"].setdefault(name, []).append(value)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if metrics["val_acc"] > best[0]:
            best = (metrics["val_acc"], epoch, state.params)
        elif patience is not None and epoch - best[1] >= patience:
            stopped = epoch + 1
            break

    params = best[2] if patience is not None else state.params
    final: dict[str, Any] = {}
    for split, (x, y) in splits.items():
        final[f"{split}_loss"], final[f"{split}_acc"] = evaluator.evaluate(params, x, y)
    sigmas, ranks = evaluator.layer_stats(params)
    final["sigma_max"], final["stable_rank"] = _floats(sigmas), _floats(ranks)
    n_margin = config.margin_samples
    return RunResult(
        regularizer=regularizer,
        coeff=coeff,
        seed=seed,
        history=history,
        final=final,
        early_stopping={
            "enabled": patience is not None,
            "patience": patience,
            "best_epoch": best[1] + 1,
            "best_val_acc": best[0],
            "stopped_epoch": stopped,
            "restored": patience is not None,
        },
        seconds_per_epoch=_per_epoch(history["seconds"]),
        cpu_seconds_per_epoch=_per_epoch(history["cpu_seconds"]),
        singular_values={
            k: np.asarray(v).tolist() for k, v in evaluator.spectra(params).items()
        },
        input_margins=evaluator.input_margins(
            params, dataset.x_test[:n_margin], dataset.y_test[:n_margin]
        ).tolist(),
        output_margins=evaluator.per_sample(params, dataset.x_test, dataset.y_test)[
            "output_margin"
        ].tolist(),
        params=params,
    )


def _per_epoch(seconds: Sequence[float]) -> float:
    # The first epoch of a fresh Trainer includes compilation; the median of the
    # rest is robust to other processes sharing the CPU.
    warm = seconds[1:] if len(seconds) > 1 else seconds
    return float(np.median(warm))


def summarize(
    results: Sequence[RunResult], epoch_seconds: dict[str, float] | None = None
) -> dict[str, dict[str, Any]]:
    """Per-regularizer means over seeds, in the order the results come.

    Fields: ``test_acc_mean``/``test_acc_std`` (population std over seeds),
    ``train_acc``, ``gap`` (final train − test accuracy), ``yoshida_gap`` (Yoshida &
    Miyato's gap at one threshold ``α`` for all: the lowest best test accuracy of
    any run, minus one point, so every method exceeds it), ``sigma_max`` and
    ``stable_rank`` per layer, ``median_output_margin``, ``median_input_margin``,
    ``seconds_per_epoch`` (wall), ``cpu_seconds_per_epoch`` (process time) and
    ``relative_time`` (to ``vanilla`` when present): from ``epoch_seconds`` when
    given (e.g. :func:`time_epochs`' interleaved timings), else from the runs' CPU
    time on the CPU backend (wall time on a shared machine mostly measures other
    processes) and wall time elsewhere.

    Args:
      results: the runs, any regularizers and seeds.
      epoch_seconds: optional ``{regularizer: seconds per epoch}`` for the
        ``relative_time`` column.

    Returns:
      ``{regularizer: fields}``.

    Example:
      >>> from margin_regs.data import load_digits, prepare
      >>> from margin_regs.experiment import TrainConfig, run, summarize
      >>> ds = prepare(load_digits(), train_size=64)
      >>> s = summarize([run("vanilla", ds, seed=s, config=TrainConfig(epochs=2)) for s in (0, 1)])
      >>> s["vanilla"]["seeds"], s["vanilla"]["relative_time"]
      (2, 1.0)
    """
    threshold = max(0.0, min(max(r.history["test_acc"]) for r in results) - 0.01)
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        groups.setdefault(r.regularizer, []).append(r)
    out = {}
    for name, runs in groups.items():
        test = np.array([r.final["test_acc"] for r in runs])
        train = np.array([r.final["train_acc"] for r in runs])
        gaps = [
            float(
                diagnostics.generalization_gap(
                    r.history["train_acc"], r.history["test_acc"], threshold
                )
            )
            for r in runs
        ]
        layers = runs[0].final["sigma_max"]
        out[name] = {
            "coeff": runs[0].coeff,
            "seeds": len(runs),
            "test_acc_mean": float(test.mean()),
            "test_acc_std": float(test.std()),
            "train_acc": float(train.mean()),
            "gap": float((train - test).mean()),
            "yoshida_gap": float(np.nanmean(gaps))
            if not np.all(np.isnan(gaps))
            else None,
            "yoshida_threshold": threshold,
            "sigma_max": {
                k: float(np.mean([r.final["sigma_max"][k] for r in runs]))
                for k in layers
            },
            "stable_rank": {
                k: float(np.mean([r.final["stable_rank"][k] for r in runs]))
                for k in layers
            },
            "median_output_margin": float(
                np.mean([np.median(r.output_margins) for r in runs])
            ),
            "median_input_margin": float(
                np.mean([np.median(r.input_margins) for r in runs])
            ),
            "seconds_per_epoch": float(np.mean([r.seconds_per_epoch for r in runs])),
            "cpu_seconds_per_epoch": float(
                np.mean([r.cpu_seconds_per_epoch for r in runs])
            ),
            "stopped_epoch": float(
                np.mean([r.early_stopping["stopped_epoch"] for r in runs])
            ),
        }
    if epoch_seconds is not None:
        clock = "interleaved_seconds_per_epoch"
        for name, s in out.items():
            s[clock] = epoch_seconds[name]
    else:
        # On the CPU backend the process's CPU time is the cost measure: wall time
        # on a shared machine mostly measures the other processes.
        cpu = jax.default_backend() == "cpu"
        clock = "cpu_seconds_per_epoch" if cpu else "seconds_per_epoch"
    base = out.get("vanilla", {}).get(clock)
    for s in out.values():
        s["relative_time"] = s[clock] / base if base else None
        s["relative_time_clock"] = clock
    return out


def time_epochs(
    trainers: dict[str, tuple[Trainer, Dataset]],
    *,
    budget_seconds: float = 2.0,
    max_rounds: int = 50,
    seed: int = 0,
) -> dict[str, float]:
    """Median wall seconds per training epoch of each trainer, in interleaved rounds.

    Each round times one epoch of every trainer in turn, so slow drifts of a shared
    machine's load hit all of them alike; rounds go on until ``budget_seconds`` or
    ``max_rounds`` (at least 3). The trainers are already compiled by their runs;
    one warm-up epoch each comes first.

    Args:
      trainers: ``{name: (trainer, prepared dataset)}``.
      budget_seconds: time to spend on the timed rounds.
      max_rounds: most rounds.
      seed: seeds the parameters being trained (timings do not depend on them).

    Returns:
      ``{name: median seconds per epoch}``.

    Example:
      >>> from margin_regs.data import load_digits, prepare
      >>> from margin_regs.experiment import TrainConfig, get_trainer, time_epochs
      >>> ds = prepare(load_digits(), train_size=64)
      >>> t = get_trainer("vanilla", None, TrainConfig(epochs=2), 10, 64)
      >>> times = time_epochs({"vanilla": (t, ds)}, budget_seconds=0.1)
      >>> times["vanilla"] > 0
      True
    """
    key = jax.random.key(seed)
    states = {}
    for name, (trainer, ds) in trainers.items():
        x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
        state, loss = trainer.train_epoch(trainer.init(key, x), x, y, key)
        loss.block_until_ready()
        states[name] = (trainer, state, x, y)
    times: dict[str, list[float]] = {name: [] for name in trainers}
    start = time.perf_counter()
    for r in range(max_rounds):
        if r >= 3 and time.perf_counter() - start > budget_seconds:
            break
        for name, (trainer, state, x, y) in states.items():
            tick = time.perf_counter()
            trainer.train_epoch(state, x, y, key)[1].block_until_ready()
            times[name].append(time.perf_counter() - tick)
    return {name: float(np.median(t)) for name, t in times.items()}
