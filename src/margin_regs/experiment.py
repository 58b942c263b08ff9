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
import importlib
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from margin_regs import _tree, diagnostics, models
from margin_regs.data import Dataset

__all__ = [
    "RECIPES",
    "Evaluator",
    "Recipe",
    "RunResult",
    "Setup",
    "StepContext",
    "TrainConfig",
    "Trainer",
    "available_recipes",
    "get_evaluator",
    "get_trainer",
    "run",
    "summarize",
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
    """

    params: Any
    x: jax.Array
    y: jax.Array
    key: jax.Array
    apply: Callable[[Any, jax.Array], jax.Array]
    num_classes: int

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
      requires: ``"module:function"`` names the recipe needs; a recipe whose
        functions are not importable is left out of :func:`available_recipes`.
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
    requires: tuple[str, ...] = ()


def _fn(spec: str) -> Callable:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _cross_entropy(ctx: StepContext, smoothing: float = 0.0) -> jax.Array:
    logits = ctx.apply(ctx.params, ctx.x)
    if smoothing == 0.0:
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, ctx.y))
    targets = optax.smooth_labels(jax.nn.one_hot(ctx.y, ctx.num_classes), smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def _jacobian_penalty(ctx: StepContext, coeff: float) -> jax.Array:
    value = _fn("margin_regs.jacobian:jacobian_margin_penalty")(
        ctx.logits_fn(),
        ctx.x,
        classes="random",
        key=ctx.key,
        classifier=models.classifier_kernel(ctx.params),
    )
    return coeff * value


def _adversarial(ctx: StepContext, coeff: float) -> jax.Array:
    return _fn("margin_regs.jacobian:adversarial_loss")(
        ctx.per_sample_loss, ctx.x, ctx.y, epsilon=coeff, alpha=0.5
    )


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
        transform=lambda c, s: _fn(
            "margin_regs.transforms:spectral_norm_regularization"
        )(c),
        requires=("margin_regs.transforms:spectral_norm_regularization",),
    ),
    "eigenvalue_decay": Recipe(
        "Eigenvalue Decay: C·Σ sqrt(λ_dom(KᵀK)) by 9 power iterations, autodiff (the seed's form)",
        "Ludwig et al. (C chosen by 5-fold CV there, not reported; default 1e-3 here)",
        coeff=1e-3,
        coeff_name="C",
        penalty=lambda ctx, c: (
            c * _fn("margin_regs.penalties:eigenvalue_decay_penalty")(ctx.params)
        ),
        requires=("margin_regs.penalties:eigenvalue_decay_penalty",),
    ),
    "jacobian": Recipe(
        "Jacobian large-margin penalty ‖∇ₓ z_c‖/‖v_c‖, one random class per sample",
        "Sokolić et al. 2017 eq. (26), DNN setup (λ from their grid {0.01,0.1,1,2}; 0.1 here)",
        coeff=0.1,
        coeff_name="λ",
        penalty=_jacobian_penalty,
        requires=("margin_regs.jacobian:jacobian_margin_penalty",),
    ),
    "adareg": Recipe(
        "AdaReg matrix-normal prior on the classifier's kernel, precisions re-solved each epoch",
        "Zhao et al. 2019 Alg. 1, last layer only (App. B.3); λ=1e-4 (the authors' rho)",
        coeff=1e-4,
        coeff_name="λ",
        transform=lambda c, s: _fn("margin_regs.adareg:adareg")(
            c, update_every=s.steps_per_epoch, mask=models.classifier_mask
        ),
        requires=("margin_regs.adareg:adareg",),
    ),
    "adversarial": Recipe(
        "l2 fast-gradient adversarial training, α=0.5",
        "Yoshida & Miyato 2017 eq. (3), α=0.5, ε=1 (after Goodfellow et al. 2015)",
        coeff=1.0,
        coeff_name="ε",
        loss=_adversarial,
        requires=("margin_regs.jacobian:adversarial_loss",),
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
        transform=lambda c, s: _fn("margin_regs.baselines:add_l1_penalty")(c),
        requires=("margin_regs.baselines:add_l1_penalty",),
    ),
    "max_norm": Recipe(
        "max-norm constraint: each unit's incoming weights projected onto ‖w‖ ≤ c",
        "Goodfellow et al. §7.2; c=3 (Srivastava et al. 2014 use 3 to 4)",
        coeff=3.0,
        coeff_name="c",
        projection=lambda c, s: _fn("margin_regs.baselines:max_norm_constraint")(c),
        requires=("margin_regs.baselines:max_norm_constraint",),
    ),
    "weight_noise": Recipe(
        "Gaussian noise on the kernels of each training forward pass",
        "Goodfellow et al. §7.5 (σ=0.01 here)",
        coeff=0.01,
        coeff_name="σ",
        perturb_params=lambda p, k, c: _fn("margin_regs.baselines:perturb_weights")(
            p, k, c
        ),
        requires=("margin_regs.baselines:perturb_weights",),
    ),
    "input_noise": Recipe(
        "Gaussian noise on each training batch's inputs",
        "Goodfellow et al. §7.4 (σ=0.1 here, inputs in [0, 1])",
        coeff=0.1,
        coeff_name="σ",
        perturb_inputs=lambda x, k, c: _fn("margin_regs.baselines:add_input_noise")(
            x, k, c
        ),
        requires=("margin_regs.baselines:add_input_noise",),
    ),
    "early_stopping": Recipe(
        "early stopping on validation accuracy, restoring the best epoch's params",
        "Goodfellow et al. §7.8 (patience 5 epochs here)",
        coeff=5,
        coeff_name="patience",
        early_stopping=True,
    ),
}


def available_recipes() -> dict[str, Recipe]:
    """The entries of :data:`RECIPES` whose functions can be imported.

    Example:
      >>> from margin_regs.experiment import available_recipes
      >>> "vanilla" in available_recipes() and "weight_decay" in available_recipes()
      True
    """
    out = {}
    for name, recipe in RECIPES.items():
        try:
            for spec in recipe.requires:
                _fn(spec)
        except (ImportError, AttributeError):
            continue
        out[name] = recipe
    return out


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The schedule every recipe of a comparison shares.

    Attributes:
      model: a name in :data:`margin_regs.models.MODELS`.
      epochs: passes over the training set.
      batch_size: minibatch size (Sokolić et al.'s CNN setup: 32).
      learning_rate: initial SGD step (Sokolić et al. and Yoshida & Miyato: 0.01).
      momentum: Nesterov momentum (0.9 in both papers).
      patience: early stopping for every recipe (``None``: only the
        ``early_stopping`` recipe stops early).
      eval_chunk: samples per chunk when evaluating (bounds memory).
      margin_samples: test samples whose input margins are estimated.
    """

    model: str = "mlp"
    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 0.01
    momentum: float = 0.9
    patience: int | None = None
    eval_chunk: int = 1024
    margin_samples: int = 1000


class TrainState(NamedTuple):
    params: Any
    opt_state: Any


def _chunks(x: np.ndarray, y: np.ndarray, size: int) -> tuple[jax.Array, ...]:
    """``(k, size, ...)`` chunks of ``x``/``y``, zero-padded, with a validity mask."""
    n = len(x)
    size = min(size, n)
    k = math.ceil(n / size)
    pad = k * size - n
    xp = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    yp = np.concatenate([y, np.zeros(pad, y.dtype)])
    valid = np.arange(k * size) < n
    return (
        jnp.asarray(xp.reshape(k, size, *x.shape[1:])),
        jnp.asarray(yp.reshape(k, size)),
        jnp.asarray(valid.reshape(k, size)),
    )


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
        params = self.model.init(key, sample[:1])["params"]
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

        ctx = StepContext(params, x, y, k_penalty, apply, self.num_classes)
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


class Evaluator:
    """Jitted measurements of one model architecture, shared by all its recipes.

    Evaluation runs the model without dropout, so the measurements do not depend on
    the recipe and compile once per (model, number of classes).
    """

    def __init__(self, model_name: str, num_classes: int):
        self.model = models.make_model(model_name, num_classes)
        self.evaluate = jax.jit(self._evaluate)
        self.layer_stats = jax.jit(self._layer_stats)
        self.logits = jax.jit(lambda params, x: self.model.apply({"params": params}, x))
        self.input_margins = jax.jit(self._input_margins)

    def _evaluate(self, params, xs, ys, valid) -> tuple[jax.Array, jax.Array]:
        """Mean cross-entropy and accuracy over chunked data (see :func:`_chunks`)."""

        def chunk(inputs):
            x, y, v = inputs
            logits = self.model.apply({"params": params}, x)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            correct = jnp.argmax(logits, axis=-1) == y
            return jnp.sum(jnp.where(v, losses, 0.0)), jnp.sum(v & correct)

        loss, correct = jax.lax.map(chunk, (xs, ys, valid))
        n = jnp.sum(valid)
        return jnp.sum(loss) / n, jnp.sum(correct) / n

    def _layer_stats(self, params):
        return diagnostics.spectral_norms(params), diagnostics.stable_ranks(params)

    def _input_margins(self, params, x, y):
        return diagnostics.input_margin_estimates(
            lambda b: self.model.apply({"params": params}, b), x, y
        )


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
        "train": _chunks(dataset.x_train, dataset.y_train, config.eval_chunk),
        "val": _chunks(dataset.x_val, dataset.y_val, config.eval_chunk),
        "test": _chunks(dataset.x_test, dataset.y_test, config.eval_chunk),
    }
    state = trainer.init(k_init, x_train)
    history: dict[str, Any] = {
        k: []
        for k in (
            *("train_loss", "train_acc", "val_acc", "test_loss", "test_acc"),
            *("objective", "seconds"),
        )
    }
    history["sigma_max"], history["stable_rank"] = {}, {}
    best = (-1.0, 0, state.params)
    stopped = config.epochs
    for epoch in range(config.epochs):
        start = time.perf_counter()
        state, objective = trainer.train_epoch(
            state, x_train, y_train, jax.random.fold_in(k_train, epoch)
        )
        objective = float(objective)
        history["seconds"].append(time.perf_counter() - start)
        metrics = {"objective": objective}
        for split, chunks in splits.items():
            loss, acc = trainer.eval.evaluate(state.params, *chunks)
            metrics[f"{split}_acc"] = float(acc)
            if split != "val":
                metrics[f"{split}_loss"] = float(loss)
        for k, v in metrics.items():
            history[k].append(v)
        sigmas, ranks = trainer.eval.layer_stats(state.params)
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
    early = {
        "enabled": patience is not None,
        "patience": patience,
        "best_epoch": best[1] + 1,
        "best_val_acc": best[0],
        "stopped_epoch": stopped,
        "restored": patience is not None,
    }
    return RunResult(
        regularizer=regularizer,
        coeff=coeff,
        seed=seed,
        history=history,
        final=_final_metrics(trainer, params, dataset, splits, config),
        early_stopping=early,
        seconds_per_epoch=_seconds_per_epoch(history["seconds"]),
        singular_values=_spectra(params),
        input_margins=_margins(trainer, params, dataset, config),
        output_margins=_output_margins(trainer, params, dataset),
        params=params,
    )


def _seconds_per_epoch(seconds: Sequence[float]) -> float:
    # The first epoch of a fresh Trainer includes compilation; the median of the
    # rest is robust to other processes sharing the CPU.
    warm = seconds[1:] if len(seconds) > 1 else seconds
    return float(np.median(warm))


def _final_metrics(trainer, params, dataset, splits, config) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for split, chunks in splits.items():
        loss, acc = trainer.eval.evaluate(params, *chunks)
        out[f"{split}_acc"] = float(acc)
        out[f"{split}_loss"] = float(loss)
    sigmas, ranks = trainer.eval.layer_stats(params)
    out["sigma_max"], out["stable_rank"] = _floats(sigmas), _floats(ranks)
    return out


def _spectra(params) -> dict[str, list[float]]:
    return {
        k: np.asarray(v).tolist()
        for k, v in diagnostics.singular_value_spectra(params).items()
    }


def _margins(
    trainer: Trainer, params, dataset: Dataset, config: TrainConfig
) -> list[float]:
    x = dataset.x_test[: config.margin_samples]
    y = dataset.y_test[: config.margin_samples]
    size = min(256, len(x))
    out = []
    for start in range(0, len(x), size):
        xs, ys = x[start : start + size], y[start : start + size]
        pad = size - len(xs)
        if pad:
            # Pad to the chunk size so every call reuses one compiled shape.
            xs = np.concatenate([xs, np.repeat(xs[-1:], pad, 0)])
            ys = np.concatenate([ys, np.repeat(ys[-1:], pad, 0)])
        out.append(np.asarray(trainer.eval.input_margins(params, xs, ys))[: size - pad])
    return np.concatenate(out).tolist()


def _output_margins(trainer: Trainer, params, dataset: Dataset) -> list[float]:
    logits = trainer.eval.logits(params, jnp.asarray(dataset.x_test))
    return np.asarray(
        diagnostics.output_margins(logits, jnp.asarray(dataset.y_test))
    ).tolist()


def summarize(results: Sequence[RunResult]) -> dict[str, dict[str, Any]]:
    """Per-regularizer means over seeds, in the order the results come.

    Fields: ``test_acc_mean``/``test_acc_std`` (population std over seeds),
    ``train_acc``, ``gap`` (final train − test accuracy), ``yoshida_gap`` (Yoshida &
    Miyato's gap at one threshold ``α`` for all: the lowest best test accuracy of
    any run, minus one point, so every method exceeds it), ``sigma_max`` and
    ``stable_rank`` per layer, ``median_output_margin``, ``median_input_margin``,
    ``seconds_per_epoch`` and ``relative_time`` (to ``vanilla`` when present).

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
            "stopped_epoch": float(
                np.mean([r.early_stopping["stopped_epoch"] for r in runs])
            ),
        }
    base = out.get("vanilla", {}).get("seconds_per_epoch")
    for s in out.values():
        s["relative_time"] = s["seconds_per_epoch"] / base if base else None
    return out
