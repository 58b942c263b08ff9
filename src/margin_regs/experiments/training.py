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
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import margin_regs as mr
from margin_regs.experiments import models
from margin_regs.experiments.data import Dataset
from margin_regs.experiments.recipes import (
    RECIPES,
    Recipe,
    Setup,
    StepContext,
    cross_entropy,
)

__all__ = [
    "EVAL_CHUNK",
    "Evaluator",
    "RunResult",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "get_evaluator",
    "get_trainer",
    "measure",
    "run",
]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The schedule every recipe of a comparison shares.

    Attributes:
      model: a name in :data:`margin_regs.experiments.models.MODELS`.
      epochs: passes over the training set (Sokolić et al.'s CNN setup: 100).
      batch_size: minibatch size (Sokolić et al.'s CNN setup: 32).
      learning_rate: initial SGD step (Sokolić et al. and Yoshida & Miyato: 0.01).
      momentum: Nesterov momentum (0.9 in both papers).
      patience: early stopping for every recipe (``None``: only the
        ``early_stopping`` recipe stops early).
      margin_samples: test samples whose input margins are estimated.
      conv: what a conv kernel is, for the regularizers that take layouts and for
        every σ reported: ``"matrix"``, the reshaped ``(kh·kw·in, out)`` kernel
        (Yoshida & Miyato's definition), or ``"operator"``, the convolution
        ``x ↦ conv(x, K)`` on the layer's input (:class:`margin_regs.ConvOperator`).
    """

    model: str = "mlp"
    epochs: int = 100
    batch_size: int = 32
    learning_rate: float = 0.01
    momentum: float = 0.9
    patience: int | None = None
    margin_samples: int = 1000
    conv: str = "matrix"


class TrainState(NamedTuple):
    params: Any
    opt_state: Any


class Trainer:
    """Jitted training and evaluation for one recipe, coefficient and schedule.

    Build it through :func:`get_trainer`, which caches it, so that every seed and
    every caller with the same settings reuses the compiled functions.
    ``input_shape`` (one sample's) is needed with ``config.conv == "operator"``: a
    convolution's operator depends on the size of its input.
    """

    def __init__(
        self,
        recipe: Recipe,
        coeff: float | None,
        config: TrainConfig,
        num_classes: int,
        train_size: int,
        input_shape: tuple[int, ...] | None = None,
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
        self.eval = get_evaluator(config.model, num_classes, config.conv, input_shape)
        self.setup = Setup(
            self.model, self.steps_per_epoch, config.epochs, self.eval.layouts
        )
        total = self.steps_per_epoch * config.epochs
        self.schedule = optax.piecewise_constant_schedule(
            config.learning_rate, {total // 2: 0.1, (3 * total) // 4: 0.1}
        )
        self.optimizer = self.make_optimizer(coeff)
        self.train_epoch = jax.jit(functools.partial(self.epoch, coeff))

    def make_optimizer(self, coeff: Any) -> optax.GradientTransformation:
        """The recipe's transform, SGD with the step schedule, then its projection.

        ``coeff`` may be a traced scalar: :class:`GridTrainer` builds the optimizer
        inside the vmapped program, one coefficient per run.
        """
        recipe = self.recipe
        parts = []
        if recipe.transform is not None:
            parts.append(recipe.transform(coeff, self.setup))
        parts.append(
            optax.sgd(self.schedule, momentum=self.config.momentum, nesterov=True)
        )
        if recipe.projection is not None:
            parts.append(recipe.projection(coeff, self.setup))
        return optax.chain(*parts)

    def init(self, key: jax.Array, sample: jax.Array) -> TrainState:
        """Initial params (from ``key``) and optimizer state at this coefficient."""
        params = self.eval.init(key, sample[:1])["params"]
        return TrainState(params, self.optimizer.init(params))

    def objective(self, coeff, params, x, y, key) -> jax.Array:
        """The regularized loss of one minibatch at coefficient ``coeff``."""
        recipe = self.recipe
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
            params,
            x,
            y,
            k_penalty,
            apply,
            self.num_classes,
            apply_with_activations,
            self.setup.layouts,
        )
        loss = (
            recipe.loss(ctx, coeff) if recipe.loss is not None else cross_entropy(ctx)
        )
        if recipe.penalty is not None:
            loss = loss + recipe.penalty(ctx, coeff)
        return loss

    def epoch(
        self, coeff, state: TrainState, x, y, key
    ) -> tuple[TrainState, jax.Array]:
        """One pass over ``(x, y)`` in shuffled minibatches: one ``lax.scan``.

        Pure (``coeff`` may be traced); :attr:`train_epoch` is it jitted at the
        trainer's own coefficient. Returns the new state and the mean objective.
        """
        optimizer = self.make_optimizer(coeff)
        k_order, k_steps = jax.random.split(key)
        b, steps = self.batch_size, self.steps_per_epoch
        order = jax.random.permutation(k_order, x.shape[0])[: steps * b].reshape(
            steps, b
        )

        def step(state, inputs):
            idx, k = inputs
            loss, grads = jax.value_and_grad(self.objective, argnums=1)(
                coeff, state.params, x[idx], y[idx], k
            )
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
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

    ``conv`` says what the σ, stable ranks and spectra of conv kernels are
    (:attr:`TrainConfig.conv`); ``"operator"`` needs one sample's ``input_shape``.
    :attr:`layouts` is the ``weight_dimension_numbers`` they are measured with.
    """

    def __init__(
        self,
        model_name: str,
        num_classes: int,
        conv: str = "matrix",
        input_shape: tuple[int, ...] | None = None,
    ):
        self.model = models.make_model(model_name, num_classes)
        if conv == "operator" and input_shape is None:
            raise ValueError("conv='operator' needs the input_shape of one sample")
        self.conv = conv
        self.layouts = models.weight_layouts(self.model, input_shape, conv)
        # Dropout adds no parameters: one jitted init serves every recipe.
        self.init = jax.jit(self.model.init)
        self._per_sample = jax.jit(self._per_sample_fn)
        self._input_margins = jax.jit(self._input_margins_fn)
        wdn = self.layouts
        self.layer_stats = jax.jit(
            lambda p: (
                mr.spectral_norms(p, weight_dimension_numbers=wdn),
                mr.stable_ranks(p, weight_dimension_numbers=wdn),
            )
        )
        self.spectra = jax.jit(
            lambda p: mr.singular_value_spectra(p, weight_dimension_numbers=wdn)
        )

    def _per_sample_fn(self, params, x, y):
        logits = self.model.apply({"params": params}, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = jnp.argmax(logits, axis=-1) == y
        return loss, correct, mr.output_margins(logits, y)

    def _input_margins_fn(self, params, x, y):
        return mr.input_margin_estimates(
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


_EVALUATORS: dict[tuple, Evaluator] = {}


def get_evaluator(
    model_name: str,
    num_classes: int,
    conv: str = "matrix",
    input_shape: tuple[int, ...] | None = None,
) -> Evaluator:
    """The cached :class:`Evaluator` for a model architecture (and conv definition)."""
    # Matrix layouts do not depend on the input: one evaluator serves every shape.
    shape = None if conv == "matrix" else input_shape and tuple(input_shape)
    key = (model_name, num_classes, conv, shape)
    if key not in _EVALUATORS:
        _EVALUATORS[key] = Evaluator(model_name, num_classes, conv, shape)
    return _EVALUATORS[key]


_TRAINERS: dict[tuple, Trainer] = {}


def get_trainer(
    recipe: Recipe | str,
    coeff: float | None,
    config: TrainConfig,
    num_classes: int,
    train_size: int,
    input_shape: tuple[int, ...] | None = None,
) -> Trainer:
    """The cached :class:`Trainer` for these settings (compiled functions shared).

    ``input_shape`` (one sample's) matters only with ``config.conv == "operator"``.

    Example:
      >>> from margin_regs.experiments.training import TrainConfig, get_trainer
      >>> t = get_trainer("vanilla", None, TrainConfig(), 10, 100)
      >>> t is get_trainer("vanilla", None, TrainConfig(), 10, 100), t.steps_per_epoch
      (True, 3)
    """
    if isinstance(recipe, str):
        recipe = RECIPES[recipe]
    coeff = recipe.coeff if coeff is None else coeff
    shape = None if config.conv == "matrix" else input_shape and tuple(input_shape)
    key = (recipe, coeff, config, num_classes, train_size, shape)
    if key not in _TRAINERS:
        _TRAINERS[key] = Trainer(recipe, coeff, config, num_classes, train_size, shape)
    return _TRAINERS[key]


@dataclasses.dataclass
class RunResult:
    """Everything one (recipe, seed) run measured; ``dataclasses.asdict`` is JSON-ready.

    ``history`` holds per-epoch lists: ``train_loss``/``train_acc`` (full training
    set, evaluation mode), ``val_acc``, ``test_loss``/``test_acc``, ``objective``
    (the mean regularized training loss over the epoch's steps), ``sigma_max`` and
    ``stable_rank`` (``{layer: [...]}``) and ``seconds`` (the epoch's training time).
    ``final`` is measured on the returned params (the best epoch's when early
    stopping restored them); its ``sigma_definition`` says what the σ of a conv
    kernel is (:attr:`TrainConfig.conv`: ``"matrix"`` or ``"operator"``).
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
      dataset: a prepared :class:`~margin_regs.experiments.data.Dataset` (with a validation set).
      seed: seeds the initialization, the minibatch order and every noise draw.
      config: the shared schedule.
      coeff: the recipe's hyperparameter (``None``: the recipe's default).
      recipes: the registry (default :data:`RECIPES`).
      on_epoch: called after each epoch with ``(epoch, metrics)`` (progress bars).

    Returns:
      A :class:`RunResult`; ``params`` holds the final (or restored) params.

    Example:
      >>> from margin_regs.experiments.data import load_digits, prepare
      >>> from margin_regs.experiments.training import TrainConfig, run
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
    if recipe.bagging:
        raise ValueError(f"{regularizer!r} is an ensemble of runs: use grid.train_grid")
    coeff = recipe.coeff if coeff is None else coeff
    trainer = get_trainer(
        recipe,
        coeff,
        config,
        dataset.num_classes,
        len(dataset.x_train),
        dataset.x_train.shape[1:],
    )
    patience = int(coeff) if recipe.early_stopping else config.patience

    k_init, k_train = jax.random.split(jax.random.key(seed))
    state = trainer.init(k_init, jnp.asarray(dataset.x_train))
    history: dict[str, Any] = {k: [] for k in (*_SCALARS, "seconds", "cpu_seconds")}
    history["sigma_max"], history["stable_rank"] = {}, {}
    best = (-1.0, 0, state.params)
    stopped = config.epochs
    for epoch in range(config.epochs):
        state, metrics = _epoch(trainer, state, dataset, k_train, epoch, history)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if metrics["val_acc"] > best[0]:
            best = (metrics["val_acc"], epoch, state.params)
        elif patience is not None and epoch - best[1] >= patience:
            stopped = epoch + 1
            break

    params = best[2] if patience is not None else state.params
    return RunResult(
        regularizer=regularizer,
        coeff=coeff,
        seed=seed,
        history=history,
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
        **measure(trainer.eval, params, dataset, config.margin_samples),
    )


_SCALARS = ("train_loss", "train_acc", "val_acc", "test_loss", "test_acc", "objective")


def _epoch(trainer: Trainer, state, dataset: Dataset, key, epoch: int, history):
    """Train one epoch, measure it, append to ``history``; return the metrics."""
    start, cpu_start = time.perf_counter(), time.process_time()
    state, objective = trainer.train_epoch(
        state,
        jnp.asarray(dataset.x_train),
        jnp.asarray(dataset.y_train),
        jax.random.fold_in(key, epoch),
    )
    metrics = {"objective": float(objective)}
    history["seconds"].append(time.perf_counter() - start)
    history["cpu_seconds"].append(time.process_time() - cpu_start)
    for split in ("train", "val", "test"):
        x, y = getattr(dataset, f"x_{split}"), getattr(dataset, f"y_{split}")
        loss, acc = trainer.eval.evaluate(state.params, x, y)
        metrics[f"{split}_acc"] = acc
        if split != "val":
            metrics[f"{split}_loss"] = loss
    for k, v in metrics.items():
        history[k].append(v)
    sigmas, ranks = trainer.eval.layer_stats(state.params)
    for name, value in _floats(sigmas).items():
        history["sigma_max"].setdefault(name, []).append(value)
    for name, value in _floats(ranks).items():
        history["stable_rank"].setdefault(name, []).append(value)
    return state, metrics


def measure(
    evaluator: Evaluator, params: Any, dataset: Dataset, margin_samples: int
) -> dict[str, Any]:
    """What a :class:`RunResult` records about trained ``params``.

    Args:
      evaluator: the model's :class:`Evaluator`.
      params: the trained params of one run.
      dataset: its prepared data set.
      margin_samples: test samples whose input margins are estimated.

    Returns:
      ``final`` (loss and accuracy per split, ``sigma_max`` and ``stable_rank`` per
      layer), ``singular_values``, ``input_margins``, ``output_margins`` and
      ``params``: the :class:`RunResult` fields of the trained model.
    """
    splits = {
        "train": (dataset.x_train, dataset.y_train),
        "val": (dataset.x_val, dataset.y_val),
        "test": (dataset.x_test, dataset.y_test),
    }
    final: dict[str, Any] = {}
    for split, (x, y) in splits.items():
        final[f"{split}_loss"], final[f"{split}_acc"] = evaluator.evaluate(params, x, y)
    sigmas, ranks = evaluator.layer_stats(params)
    final["sigma_max"], final["stable_rank"] = _floats(sigmas), _floats(ranks)
    final["sigma_definition"] = evaluator.conv
    x_margin = dataset.x_test[:margin_samples]
    return {
        "final": final,
        "singular_values": {
            k: np.asarray(v).tolist() for k, v in evaluator.spectra(params).items()
        },
        "input_margins": evaluator.input_margins(
            params, x_margin, dataset.y_test[:margin_samples]
        ).tolist(),
        "output_margins": evaluator.per_sample(params, dataset.x_test, dataset.y_test)[
            "output_margin"
        ].tolist(),
        "params": params,
    }


def _per_epoch(seconds: Sequence[float]) -> float:
    # The first epoch of a fresh Trainer includes compilation; the median of the
    # rest is robust to other processes sharing the CPU.
    warm = seconds[1:] if len(seconds) > 1 else seconds
    return float(np.median(warm))
