"""Every (coefficient, seed) of one regularizer trained as one program.

A :class:`GridTrainer` ``vmap``s the jitted ``lax.scan`` epoch of a
:class:`~margin_regs.experiments.training.Trainer` over seeds (each with its own
training subset, validation split and initialization) and over the grid of
coefficients (traced, so every value shares one compilation), and measures every
run in the same program after each epoch: the runs of a regularizer compile once
and share each step's dispatch. Early stopping runs inside the program too: a run
that stops is frozen (its state no longer changes) and its best epoch's params kept.

:func:`train_grid` runs the epochs and returns a :class:`GridRun`;
:func:`select` picks the coefficient with the best mean validation accuracy over
seeds (never the test split); :meth:`GridRun.run_results` measures the runs of one
coefficient in full (spectra, margins) as
:class:`~margin_regs.experiments.training.RunResult`\\ s.

Dropout shapes the model rather than the maths (``flax.linen.Dropout`` branches on
its rate), so a dropout grid trains one program per rate, each vmapped over seeds.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from margin_regs.experiments.data import Dataset
from margin_regs.experiments.recipes import Recipe
from margin_regs.experiments.training import (
    EVAL_CHUNK,
    RunResult,
    TrainConfig,
    Trainer,
    TrainState,
    get_evaluator,
    get_trainer,
    measure,
)

__all__ = [
    "METRICS",
    "GridMetrics",
    "GridRun",
    "GridState",
    "GridTrainer",
    "SeedData",
    "get_grid_metrics",
    "get_grid_trainer",
    "select",
    "stack_splits",
    "train_grid",
]

# Per-epoch scalars of every run. Spectra are measured on each run's result only: an
# SVD of every layer of every run after every epoch cost more than the training
# itself on 784-392-392-10 (4.5 s against 0.1 s an epoch for three runs).
METRICS = ("train_loss", "train_acc", "val_acc", "test_loss", "test_acc", "objective")


class SeedData(NamedTuple):
    """The prepared data set of every seed, stacked on a leading seed axis."""

    x_train: jax.Array
    y_train: jax.Array
    x_val: jax.Array
    y_val: jax.Array
    x_test: jax.Array
    y_test: jax.Array


def stack_splits(splits: Sequence[Dataset]) -> SeedData:
    """Stack per-seed :func:`~margin_regs.experiments.data.prepare` results.

    Raises:
      ValueError: if a split has no validation set or the seeds' shapes differ.
    """
    if any(ds.x_val is None or len(ds.x_val) == 0 for ds in splits):
        raise ValueError("every seed needs a validation set: use data.prepare")
    arrays = {}
    for name in SeedData._fields:
        parts = [np.asarray(getattr(ds, name)) for ds in splits]
        if len({p.shape for p in parts}) != 1:
            raise ValueError(f"the seeds' {name} shapes differ")
        arrays[name] = jnp.asarray(np.stack(parts))
    return SeedData(**arrays)


class GridState(NamedTuple):
    """The state of every run, leading axes ``(coefficient, seed)``."""

    train: TrainState
    best_params: Any
    best_val: jax.Array
    best_epoch: jax.Array
    stopped: jax.Array


class GridMetrics:
    """Per-epoch measurements of every run of one model architecture, jitted once.

    Shared by every recipe on the model (it sees only params and data), so a
    comparison compiles it once per grid shape, not once per regularizer.
    """

    def __init__(self, trainer: Trainer):
        model = trainer.eval.model
        self._per_sample = trainer.eval._per_sample_fn
        self.init_params = jax.jit(
            jax.vmap(lambda key, x: model.init(key, x[:1])["params"])
        )
        over_seeds = jax.vmap(self._measure, in_axes=(0, 0))
        self.measure = jax.jit(jax.vmap(over_seeds, in_axes=(0, None)))

    def _split(self, params, x, y) -> tuple[jax.Array, jax.Array]:
        """Mean cross-entropy and accuracy over a split, in chunks (bounded memory)."""
        n = x.shape[0]
        chunk = min(EVAL_CHUNK, n)
        count = -(-n // chunk)
        pad = count * chunk - n
        xs = jnp.concatenate([x, jnp.repeat(x[-1:], pad, 0)])
        ys = jnp.concatenate([y, jnp.repeat(y[-1:], pad, 0)])
        xs = xs.reshape(count, chunk, *x.shape[1:])
        loss, correct, _ = jax.lax.map(
            lambda b: self._per_sample(params, *b), (xs, ys.reshape(count, chunk))
        )
        keep = jnp.arange(count * chunk) < n
        return (
            jnp.sum(jnp.where(keep, loss.reshape(-1), 0.0)) / n,
            jnp.sum(jnp.where(keep, correct.reshape(-1), 0)) / n,
        )

    def _measure(self, params, data: SeedData) -> dict[str, Any]:
        metrics = {}
        for split in ("train", "val", "test"):
            loss, acc = self._split(
                params, getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
            )
            metrics[f"{split}_acc"] = acc
            if split != "val":
                metrics[f"{split}_loss"] = loss
        return metrics


_METRICS: dict[tuple, GridMetrics] = {}


def get_grid_metrics(trainer: Trainer) -> GridMetrics:
    """The cached :class:`GridMetrics` of the trainer's model."""
    key = (trainer.config.model, trainer.num_classes)
    if key not in _METRICS:
        _METRICS[key] = GridMetrics(trainer)
    return _METRICS[key]


class GridTrainer:
    """One recipe's runs, every (coefficient, seed), as one jitted vmapped program.

    Args:
      trainer: the single-run :class:`~margin_regs.experiments.training.Trainer`
        whose pure :meth:`~margin_regs.experiments.training.Trainer.epoch` is
        vmapped (its own coefficient matters only for a dropout recipe's model).
      patience: early stopping: ``"coeff"`` (the coefficient is the patience), an
        int, or ``None`` (off: the last epoch's params are the result).
      resampled: if true, each run of the leading axis trains on its own training
        set (:meth:`epoch`'s ``train_data``; bagging's bootstrap resamples).
    """

    def __init__(
        self, trainer: Trainer, patience: str | int | None, resampled: bool = False
    ):
        self.trainer = trainer
        self.patience = patience
        self.metrics = get_grid_metrics(trainer)
        init = jax.vmap(self._init_one, in_axes=(None, 0))
        self.init = jax.jit(jax.vmap(init, in_axes=(0, None)))
        train = jax.vmap(trainer.epoch, in_axes=(None, 0, 0, 0, 0))
        data = 0 if resampled else None
        self._train = jax.jit(jax.vmap(train, in_axes=(0, 0, data, data, None)))
        self._track = jax.jit(
            jax.vmap(
                jax.vmap(self._track_one, in_axes=(None, 0, 0, None, 0)),
                in_axes=(0, 0, 0, None, 0),
            )
        )

    def _init_one(self, coeff, params) -> GridState:
        state = TrainState(params, self.trainer.make_optimizer(coeff).init(params))
        return GridState(
            state, params, jnp.float32(-1.0), jnp.int32(0), jnp.bool_(False)
        )

    def epoch(
        self,
        coeffs,
        state: GridState,
        epoch: int,
        data: SeedData,
        keys,
        train_data=None,
    ) -> tuple[GridState, dict[str, Any]]:
        """One epoch of every run, then its measurements (``(C, S)`` each).

        ``train_data``: ``(x, y)`` of shape ``(C, S, n, ...)`` for a ``resampled``
        trainer, else ``None`` (every coefficient trains on ``data``'s).
        """
        x, y = (data.x_train, data.y_train) if train_data is None else train_data
        train, objective = self._train(coeffs, state.train, x, y, keys)
        metrics = self.metrics.measure(train.params, data)
        metrics["objective"] = objective
        if self.patience is None:
            state = state._replace(train=train)
        else:
            state = self._track(coeffs, state, train, epoch, metrics["val_acc"])
        metrics["stopped"] = state.stopped
        return state, metrics

    def _track_one(self, coeff, state: GridState, train, epoch, val) -> GridState:
        patience = coeff if self.patience == "coeff" else self.patience
        active = ~state.stopped
        better = active & (val > state.best_val)
        stop = active & ~better & (epoch - state.best_epoch >= patience)

        def pick(flag, new, old):
            return jax.tree.map(lambda a, b: jnp.where(flag, a, b), new, old)

        return GridState(
            pick(active, train, state.train),
            pick(better, train.params, state.best_params),
            jnp.where(better, val, state.best_val).astype(jnp.float32),
            jnp.where(better, epoch, state.best_epoch).astype(jnp.int32),
            state.stopped | stop,
        )


_GRID_TRAINERS: dict[tuple, GridTrainer] = {}


def get_grid_trainer(
    recipe: Recipe,
    config: TrainConfig,
    num_classes: int,
    train_size: int,
    static_coeff: float | None = None,
    input_shape: tuple[int, ...] | None = None,
    resampled: bool = False,
) -> GridTrainer:
    """The cached :class:`GridTrainer` (compiled programs shared across calls).

    ``static_coeff`` is the coefficient the model is built with (a dropout rate);
    ``None`` for every other recipe. ``input_shape`` (one sample's) matters only
    with ``config.conv == "operator"``. ``resampled``: see :class:`GridTrainer`.
    """
    shape = None if config.conv == "matrix" else input_shape and tuple(input_shape)
    key = (recipe, config, num_classes, train_size, static_coeff, shape, resampled)
    if key not in _GRID_TRAINERS:
        coeff = recipe.coeff if static_coeff is None else static_coeff
        trainer = get_trainer(recipe, coeff, config, num_classes, train_size, shape)
        patience = "coeff" if recipe.early_stopping else config.patience
        _GRID_TRAINERS[key] = GridTrainer(trainer, patience, resampled)
    return _GRID_TRAINERS[key]


@dataclasses.dataclass
class GridRun:
    """Every (coefficient, seed) run of one regularizer.

    Attributes:
      regularizer: the recipe's name.
      coeffs: the grid, ``(C,)``.
      seeds: ``(S,)``.
      history: ``{metric: (C, S, E)}`` per-epoch values (:data:`METRICS`).
      stopped_epoch: ``(C, S)`` epochs each run trained (early stopping), 1-based.
      best_epoch: ``(C, S)`` the best validation epoch, 1-based.
      val_acc: ``(C, S)`` validation accuracy of each run's result (the best
        epoch's with early stopping, else the last epoch's).
      test_acc: ``(C, S)`` test accuracy of each run's result.
      params: the result params, leaves with leading axes ``(C, S)``.
      seconds: wall seconds of each epoch of each program, without each
        program's first (which includes its compilation) when it has others.
      runs_per_program: runs each program trains at once (``C × S``; ``S`` for
        dropout, one program per rate).
      patience: the early-stopping setting (``None``: off).
    """

    regularizer: str
    coeffs: np.ndarray
    seeds: np.ndarray
    history: dict[str, Any]
    stopped_epoch: np.ndarray
    best_epoch: np.ndarray
    val_acc: np.ndarray
    test_acc: np.ndarray
    params: Any
    seconds: list[float]
    runs_per_program: int
    patience: str | int | None

    def run_results(
        self, index: int, splits: Sequence[Dataset], config: TrainConfig
    ) -> list[RunResult]:
        """The full :class:`RunResult` of every seed at coefficient ``coeffs[index]``."""
        evaluator = get_evaluator(
            config.model,
            splits[0].num_classes,
            config.conv,
            splits[0].x_train.shape[1:],
        )
        results = []
        per_run = self.seconds_per_run_epoch()
        for s, (seed, ds) in enumerate(zip(self.seeds, splits, strict=True)):
            stop = int(self.stopped_epoch[index, s])
            history = {k: self.history[k][index, s, :stop].tolist() for k in METRICS}
            params = jax.tree.map(lambda p, i=index, j=s: p[i, j], self.params)
            coeff = float(self.coeffs[index])
            patience = self.patience
            if patience == "coeff":
                patience = int(self.coeffs[index])
            results.append(
                RunResult(
                    regularizer=self.regularizer,
                    coeff=None if np.isnan(coeff) else coeff,
                    seed=int(seed),
                    history=history,
                    early_stopping={
                        "enabled": patience is not None,
                        "patience": patience,
                        "best_epoch": int(self.best_epoch[index, s]),
                        "best_val_acc": float(self.val_acc[index, s]),
                        "stopped_epoch": stop,
                        "restored": patience is not None,
                    },
                    seconds_per_epoch=per_run,
                    cpu_seconds_per_epoch=per_run,
                    **measure(evaluator, params, ds, config.margin_samples),
                )
            )
        return results

    def seconds_per_run_epoch(self) -> float:
        """Median epoch time of the programs divided by their number of runs."""
        return float(np.median(self.seconds)) / self.runs_per_program


def train_grid(
    regularizer: str,
    recipe: Recipe,
    coeffs: Sequence[float],
    splits: Sequence[Dataset],
    config: TrainConfig,
    *,
    seeds: Sequence[int] | None = None,
    on_epoch: Callable[[int, float, int], None] | None = None,
) -> GridRun:
    """Train every (coefficient, seed) of one recipe; one program per recipe.

    Seed ``s`` trains on ``splits[s]`` from the initialization and minibatch order
    of ``jax.random.key(seeds[s])``, exactly as
    :func:`~margin_regs.experiments.training.run` does, and every coefficient shares
    them (a paired design: differences between coefficients or recipes are not
    differences of data or initialization).

    Args:
      regularizer: the recipe's name (recorded).
      recipe: the :class:`~margin_regs.experiments.recipes.Recipe`.
      coeffs: the grid (for a recipe without a hyperparameter: ``[None]``).
      splits: one prepared data set per seed, all of the same sizes.
      config: the shared schedule.
      seeds: the seeds (default ``0 .. len(splits) - 1``).
      on_epoch: called after each epoch of a program with ``(epoch, seconds,
        runs)``: the epoch's index, its wall time and the program's run count.

    Returns:
      A :class:`GridRun`.

    Example:
      >>> from margin_regs.experiments.data import load_digits, prepare
      >>> from margin_regs.experiments.grid import train_grid
      >>> from margin_regs.experiments.recipes import RECIPES
      >>> from margin_regs.experiments.training import TrainConfig
      >>> splits = [prepare(load_digits(), train_size=64, seed=s) for s in (0, 1)]
      >>> grid = train_grid("spectral", RECIPES["spectral"], [0.01, 0.1], splits,
      ...                   TrainConfig(epochs=2, batch_size=16))
      >>> grid.val_acc.shape, grid.history["test_acc"].shape
      ((2, 2), (2, 2, 2))
    """
    if recipe.bagging:
        from margin_regs.experiments.bagging import train_bagged

        return train_bagged(
            regularizer, recipe, coeffs, splits, config, seeds=seeds, on_epoch=on_epoch
        )
    seeds = np.arange(len(splits)) if seeds is None else np.asarray(seeds)
    data = stack_splits(splits)
    num_classes, train_size = splits[0].num_classes, len(splits[0].x_train)
    shape = splits[0].x_train.shape[1:]
    values = [0.0 if c is None else float(c) for c in coeffs]
    if recipe.dropout:
        programs = [
            (get_grid_trainer(recipe, config, num_classes, train_size, c, shape), [c])
            for c in values
        ]
    else:
        grid = get_grid_trainer(recipe, config, num_classes, train_size, None, shape)
        programs = [(grid, values)]
    parts = [
        _train_program(g, np.asarray(cs, np.float32), data, seeds, config, on_epoch)
        for g, cs in programs
    ]
    return _combine(regularizer, programs[0][0].patience, coeffs, seeds, parts)


def _train_program(
    grid: GridTrainer,
    coeffs,
    data: SeedData,
    seeds,
    config: TrainConfig,
    on_epoch,
    train_data=None,
) -> dict[str, Any]:
    keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s)))(jnp.asarray(seeds))
    k_init, k_train = keys[:, 0], keys[:, 1]
    params = grid.metrics.init_params(k_init, data.x_train)
    state = grid.init(jnp.asarray(coeffs), params)
    epochs, seconds = [], []
    for epoch in range(config.epochs):
        start = time.perf_counter()
        epoch_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(k_train, epoch)
        state, metrics = grid.epoch(
            jnp.asarray(coeffs), state, epoch, data, epoch_keys, train_data
        )
        epochs.append(jax.device_get(metrics))
        seconds.append(time.perf_counter() - start)
        if on_epoch is not None:
            on_epoch(epoch, seconds[-1], coeffs.size * len(seeds))
    params = state.best_params if grid.patience is not None else state.train.params
    return {
        "epochs": epochs,
        "runs": coeffs.size * len(seeds),
        "params": params,
        "best_epoch": np.asarray(state.best_epoch),
        "seconds": seconds,
    }


def _stack(epochs: list[dict[str, Any]], key: str) -> np.ndarray:
    """A ``(C, S, E)`` array from per-epoch ``(C, S)`` metrics."""
    return np.stack([e[key] for e in epochs], -1)


def _combine(regularizer, patience, coeffs, seeds, parts) -> GridRun:
    history: dict[str, Any] = {}
    for key in METRICS:
        history[key] = np.concatenate([_stack(p["epochs"], key) for p in parts])
    stopped = np.concatenate([_stack(p["epochs"], "stopped") for p in parts])
    epochs = stopped.shape[-1]
    # The epoch (1-based) after which a run stopped: its first True, else the last.
    stopped_epoch = np.where(stopped.any(-1), stopped.argmax(-1) + 1, epochs)
    if patience is None:
        best_epoch = stopped_epoch
    else:
        best_epoch = np.concatenate([p["best_epoch"] for p in parts]) + 1
    at = best_epoch - 1
    c, s = np.indices(at.shape)
    return GridRun(
        regularizer=regularizer,
        coeffs=np.asarray([np.nan if x is None else x for x in coeffs], np.float64),
        seeds=np.asarray(seeds),
        history=history,
        stopped_epoch=stopped_epoch,
        best_epoch=best_epoch,
        val_acc=history["val_acc"][c, s, at],
        test_acc=history["test_acc"][c, s, at],
        params=jax.tree.map(
            lambda *x: np.concatenate(x), *[p["params"] for p in parts]
        ),
        seconds=[t for p in parts for t in p["seconds"][1:] or p["seconds"]],
        runs_per_program=parts[0]["runs"],
        patience=patience,
    )


def select(val_acc: np.ndarray) -> int:
    """The grid index with the best mean validation accuracy over seeds.

    Only validation accuracies enter: the test split never chooses a coefficient.
    Ties go to the first (smallest, for an ascending grid) coefficient.

    Args:
      val_acc: ``(C, S)`` validation accuracy of every coefficient and seed.

    Returns:
      The index of the selected coefficient.

    Example:
      >>> import numpy as np
      >>> from margin_regs.experiments.grid import select
      >>> select(np.array([[0.90, 0.92], [0.93, 0.91], [0.93, 0.91]]))
      1
    """
    return int(np.argmax(np.mean(np.asarray(val_acc), axis=1)))
