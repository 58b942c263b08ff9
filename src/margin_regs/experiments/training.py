"""What every run is built from: the schedule, a recipe's pure step and epoch, the
model's jitted measurements, the record of a run.

The driver is :func:`margin_regs.experiments.grid.train_grid`; :func:`run` is a grid of
one. A seed reproduces a run bit for bit. The optimizer is the papers': SGD with
Nesterov momentum 0.9, the rate /10 after 1/2 and 3/4 of the steps (Yoshida & Miyato
§4.1; Sokolić et al.).
"""

from __future__ import annotations

import dataclasses
import functools
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
    """The schedule every recipe of a comparison shares (the papers' defaults).

    Attributes:
      model: a name in :data:`margin_regs.experiments.models.MODELS`.
      patience: early stopping for every recipe (``None``: only ``early_stopping``).
      margin_samples: test samples whose input margins are estimated.
      conv: a conv kernel's σ: ``"matrix"`` (reshaped) or ``"operator"``.
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
    """One recipe's pure training step and epoch on one model and schedule.

    :meth:`step` and :meth:`epoch` take the coefficient (traced: the grid vmaps over
    it); ``coeff`` here only builds a dropout model. Build it with :func:`get_trainer`.
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
        self.recipe, self.coeff, self.config = recipe, coeff, config
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
        self.train_epoch = jax.jit(functools.partial(self.epoch, coeff))
        self.jit_step = jax.jit(self.step)

    def make_optimizer(self, coeff: Any) -> optax.GradientTransformation:
        """The recipe's transform, SGD with the step schedule, then its projection."""
        recipe, config = self.recipe, self.config
        parts = [optax.sgd(self.schedule, momentum=config.momentum, nesterov=True)]
        if recipe.transform is not None:
            parts.insert(0, recipe.transform(coeff, self.setup))
        if recipe.projection is not None:
            parts.append(recipe.projection(coeff, self.setup))
        return optax.chain(*parts)

    def init(self, key: jax.Array, sample: jax.Array, coeff: Any = None) -> TrainState:
        """Initial params (from ``key``) and optimizer state."""
        params = self.eval.init(key, sample[:1])["params"]
        coeff = self.coeff if coeff is None else coeff
        return TrainState(params, self.make_optimizer(coeff).init(params))

    def objective(self, coeff, params, x, y, key) -> jax.Array:
        """The regularized loss of one minibatch at coefficient ``coeff``."""
        recipe = self.recipe
        k_input, k_weights, k_dropout, k_penalty = jax.random.split(key, 4)
        if recipe.perturb_inputs is not None:
            x = recipe.perturb_inputs(x, k_input, coeff)
        if recipe.perturb_params is not None:
            params = recipe.perturb_params(params, k_weights, coeff)

        def apply(p, inputs, **kw):
            rngs = {"dropout": k_dropout}
            return self.model.apply({"params": p}, inputs, train=True, rngs=rngs, **kw)

        def acts(p, inputs):  # the logits and the sown hidden representations
            logits, state = apply(p, inputs, mutable=["intermediates"])
            return logits, state["intermediates"]

        ctx = StepContext(
            params, x, y, k_penalty, apply, self.num_classes, acts, self.setup.layouts
        )
        loss = cross_entropy(ctx) if recipe.loss is None else recipe.loss(ctx, coeff)
        if recipe.penalty is not None:
            loss = loss + recipe.penalty(ctx, coeff)
        return loss

    def step(self, coeff, state: TrainState, x, y, key) -> tuple[TrainState, jax.Array]:
        """One SGD step on the minibatch ``(x, y)``: the new state and the objective."""
        loss, grads = jax.value_and_grad(self.objective, argnums=1)(
            coeff, state.params, x, y, key
        )
        optimizer = self.make_optimizer(coeff)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), opt_state), loss

    def batches(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
        """The epoch's shuffled minibatch indices ``(steps, b)`` and step keys."""
        k_order, k_steps = jax.random.split(key)
        b, steps = self.batch_size, self.steps_per_epoch
        order = jax.random.permutation(k_order, n)[: steps * b].reshape(steps, b)
        return order, jax.random.split(k_steps, steps)

    def epoch(
        self, coeff, state: TrainState, x, y, key
    ) -> tuple[TrainState, jax.Array]:
        """One pass over ``(x, y)`` as one ``lax.scan``; the state and mean objective."""

        def body(state, inputs):
            idx, k = inputs
            return self.step(coeff, state, x[idx], y[idx], k)

        state, losses = jax.lax.scan(body, state, self.batches(key, x.shape[0]))
        return state, jnp.mean(losses)

    def stepwise_epoch(self, coeff, state: TrainState, x, y, key):
        """:meth:`epoch` as one jitted call per step (same minibatches and keys): a
        convolution in a ``lax.scan`` body is ~10× slower on XLA's CPU backend."""
        order, keys = self.batches(key, x.shape[0])
        x, y, losses = np.asarray(x), np.asarray(y), []
        for idx, k in zip(np.asarray(order), keys, strict=True):
            state, loss = self.jit_step(coeff, state, x[idx], y[idx], k)
            losses.append(loss)
        return state, jnp.mean(jnp.stack(losses))


EVAL_CHUNK = 256


def map_chunks(fn, params, x: jax.Array, y: jax.Array) -> Any:
    """``fn(params, x, y)``'s per-sample outputs, ``EVAL_CHUNK`` samples at a time
    (the last chunk padded with the last sample); traceable."""
    n = x.shape[0]
    chunk = min(EVAL_CHUNK, n)
    count = -(-n // chunk)
    pad = count * chunk - n
    xs = jnp.concatenate([x, jnp.repeat(x[-1:], pad, 0)])
    ys = jnp.concatenate([y, jnp.repeat(y[-1:], pad, 0)])
    out = jax.lax.map(
        lambda b: fn(params, *b),
        (xs.reshape(count, chunk, *x.shape[1:]), ys.reshape(count, chunk)),
    )
    return jax.tree.map(lambda o: o.reshape(count * chunk, *o.shape[2:])[:n], out)


class Evaluator:
    """Jitted measurements of one model (no dropout), shared by all its recipes.

    ``conv``: :attr:`TrainConfig.conv` (``"operator"`` needs one sample's
    ``input_shape``). :attr:`grid_metrics` ``(params, data)`` and
    :attr:`grid_layer_stats` ``(params)`` measure every run of a grid (leading axes
    ``(coefficient, seed)``) in one program.
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
        self._wdn = {"weight_dimension_numbers": self.layouts}
        # Dropout adds no parameters: one jitted init serves every recipe.
        self.init = jax.jit(self.model.init)
        self.init_seeds = jax.jit(
            jax.vmap(lambda key, x: self.model.init(key, x[:1])["params"])
        )
        self._per_sample = jax.jit(functools.partial(map_chunks, self.per_sample_fn))
        self._input_margins = jax.jit(functools.partial(map_chunks, self._margins_fn))
        self.layer_stats = jax.jit(self.layer_stats_fn)
        self.spectra = jax.jit(lambda p: mr.singular_value_spectra(p, **self._wdn))
        over_seeds = jax.vmap(self.metrics_fn)  # params (S, ...), data (S, ...)
        self.grid_metrics = jax.jit(jax.vmap(over_seeds, in_axes=(0, None)))
        self.grid_layer_stats = jax.jit(jax.vmap(jax.vmap(self.layer_stats_fn)))

    def per_sample_fn(self, params, x, y):
        logits = self.model.apply({"params": params}, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = jnp.argmax(logits, axis=-1) == y
        return loss, correct, mr.output_margins(logits, y)

    def _margins_fn(self, params, x, y):
        return mr.input_margin_estimates(
            lambda b: self.model.apply({"params": params}, b), x, y
        )

    def layer_stats_fn(self, params) -> tuple[dict, dict]:
        """σ_max and stable rank of every kernel."""
        sigmas = mr.spectral_norms(params, **self._wdn)
        return sigmas, mr.stable_ranks(params, **self._wdn)

    def metrics_fn(self, params, data) -> dict[str, jax.Array]:
        """Mean loss and accuracy on the train, val and test splits of ``data``."""
        metrics = {}
        for split in ("train", "val", "test"):
            x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
            loss, correct, _ = map_chunks(self.per_sample_fn, params, x, y)
            metrics[f"{split}_loss"] = jnp.mean(loss)
            metrics[f"{split}_acc"] = jnp.mean(correct)
        return metrics

    def per_sample(self, params, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        """Cross-entropy, correctness and logit margin of every sample."""
        loss, correct, margin = jax.device_get(self._per_sample(params, x, y))
        return {"loss": loss, "correct": correct, "output_margin": margin}

    def evaluate(self, params, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """Mean cross-entropy and accuracy."""
        out = self.per_sample(params, x, y)
        return float(np.mean(out["loss"])), float(np.mean(out["correct"]))

    def input_margins(self, params, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """First-order input-margin estimate of every sample."""
        return np.asarray(self._input_margins(params, x, y))


def _shape(conv: str, input_shape) -> tuple[int, ...] | None:
    # Matrix layouts do not depend on the input: one object serves every shape.
    return None if conv == "matrix" or input_shape is None else tuple(input_shape)


def get_evaluator(
    model_name: str,
    num_classes: int,
    conv: str = "matrix",
    input_shape: tuple[int, ...] | None = None,
) -> Evaluator:
    """The cached :class:`Evaluator` for a model architecture (and conv definition)."""
    return _evaluator(model_name, num_classes, conv, _shape(conv, input_shape))


_evaluator = functools.cache(Evaluator)
_trainer = functools.cache(Trainer)


def get_trainer(
    recipe: Recipe | str,
    coeff: float | None,
    config: TrainConfig,
    num_classes: int,
    train_size: int,
    input_shape: tuple[int, ...] | None = None,
) -> Trainer:
    """The cached :class:`Trainer` for these settings (compiled functions shared).

    ``coeff=None`` is the recipe's default; ``input_shape`` (one sample's) matters
    only with ``config.conv == "operator"``.

    Example:
      >>> from margin_regs.experiments.training import TrainConfig, get_trainer
      >>> t = get_trainer("vanilla", None, TrainConfig(), 10, 100)
      >>> t is get_trainer("vanilla", None, TrainConfig(), 10, 100), t.steps_per_epoch
      (True, 3)
    """
    recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
    coeff = recipe.coeff if coeff is None else coeff
    shape = _shape(config.conv, input_shape)
    return _trainer(recipe, coeff, config, num_classes, train_size, shape)


@dataclasses.dataclass
class RunResult:
    """Everything one (recipe, seed) run measured; ``dataclasses.asdict`` is JSON-ready.

    ``history``: per-epoch lists of :data:`~margin_regs.experiments.grid.METRICS`
    (``objective``: the mean regularized loss), ``seconds``, ``cpu_seconds`` and, when
    measured, ``{layer: [...]}`` of ``sigma_max``/``stable_rank``. ``final``: the
    result params' (the best epoch's under early stopping), with
    ``sigma_definition`` (:attr:`TrainConfig.conv`).
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
) -> RunResult:
    """Train one reference model with one regularizer and measure it: a grid of one.

    Args:
      regularizer: a name in ``recipes`` (default :data:`RECIPES`).
      dataset: a :func:`~margin_regs.experiments.data.prepare`\\ d data set.
      seed: seeds the initialization, the minibatch order and every noise draw.
      config: the shared schedule.
      coeff: the recipe's hyperparameter (``None``: the recipe's default).
      recipes: the registry.

    Returns:
      A :class:`RunResult`, σ_max and stable rank after every epoch.

    Example:
      >>> from margin_regs.experiments.data import load_digits, prepare
      >>> from margin_regs.experiments.training import TrainConfig, run
      >>> ds = prepare(load_digits(), train_size=64)
      >>> r = run("vanilla", ds, config=TrainConfig(epochs=2))
      >>> len(r.history["test_acc"]), 0.0 <= r.final["test_acc"] <= 1.0
      (2, True)
    """
    from margin_regs.experiments.grid import train_grid

    recipes = RECIPES if recipes is None else recipes
    config = TrainConfig() if config is None else config
    if regularizer not in recipes:
        raise ValueError(
            f"unknown regularizer {regularizer!r}; choose from {sorted(recipes)}"
        )
    recipe = recipes[regularizer]
    if recipe.bagging:
        raise ValueError(f"{regularizer!r} is an ensemble of runs: use grid.train_grid")
    coeff = recipe.coeff if coeff is None else coeff
    grid = train_grid(
        regularizer, recipe, [coeff], [dataset], config, seeds=[seed], layer_stats=True
    )
    return grid.run_results(0, [dataset], config)[0]


def measure(
    evaluator: Evaluator, params: Any, dataset: Dataset, margin_samples: int
) -> dict[str, Any]:
    """The :class:`RunResult` fields of one run's trained ``params``: ``final`` (loss
    and accuracy per split, σ_max and stable rank per layer), ``singular_values``,
    ``input_margins`` (of ``margin_samples`` test samples), ``output_margins``."""
    final: dict[str, Any] = {}
    for split in ("train", "val", "test"):
        x, y = getattr(dataset, f"x_{split}"), getattr(dataset, f"y_{split}")
        final[f"{split}_loss"], final[f"{split}_acc"] = evaluator.evaluate(params, x, y)
    sigmas, ranks = jax.device_get(evaluator.layer_stats(params))
    final["sigma_max"], final["stable_rank"] = _floats(sigmas), _floats(ranks)
    final["sigma_definition"] = evaluator.conv
    x, y, spectra = dataset.x_test, dataset.y_test, evaluator.spectra(params)
    margins = evaluator.input_margins(params, x[:margin_samples], y[:margin_samples])
    return {
        "final": final,
        "singular_values": {k: np.asarray(v).tolist() for k, v in spectra.items()},
        "input_margins": margins.tolist(),
        "output_margins": evaluator.per_sample(params, x, y)["output_margin"].tolist(),
        "params": params,
    }
