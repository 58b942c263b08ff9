"""The training driver: every (coefficient, seed) of one regularizer as one program.

A :class:`GridTrainer` ``vmap``\\ s a :class:`~margin_regs.experiments.training.Trainer`'s
``lax.scan`` epoch over seeds (own data split and initialization) and coefficients
(traced: one compilation), measures every run after each epoch and early-stops inside
the program (a stopped run is frozen, its best params kept). A dropout rate shapes the
model, so each rate is its own program; ``stepwise=True`` trains each run alone, one
jitted call per step (XLA's CPU convolutions are slow under ``vmap`` and ``scan``).
:func:`select` picks a coefficient on validation accuracy, never on test.
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

from margin_regs.experiments.data import Dataset
from margin_regs.experiments.recipes import Recipe
from margin_regs.experiments.training import (
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
    "GridRun",
    "GridState",
    "GridTrainer",
    "SeedData",
    "get_grid_trainer",
    "select",
    "stack_splits",
    "train_grid",
]

# Per-epoch scalars of every run; spectra only on results unless asked (an SVD of every
# layer of every run each epoch cost 45× the training on 784-392-392-10).
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
    """Stack per-seed :func:`~margin_regs.experiments.data.prepare` results (a
    ``ValueError`` without a validation set or if the shapes differ)."""
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


class GridTrainer:
    """One recipe's runs, every (coefficient, seed), as one jitted vmapped program.

    Args:
      trainer: the :class:`~margin_regs.experiments.training.Trainer` to vmap.
      patience: ``"coeff"`` (the coefficient is the patience), an int, or ``None``.
      stepwise: train one run (a ``(1, 1)`` grid) by one jitted call per step.
    """

    def __init__(self, trainer: Trainer, patience: str | int | None, stepwise: bool):
        self.trainer, self.patience, self.stepwise = trainer, patience, stepwise
        self.eval = trainer.eval
        init = jax.vmap(self._init_one, in_axes=(None, 0))
        self.init = jax.jit(jax.vmap(init, in_axes=(0, None)))
        train = jax.vmap(trainer.epoch, in_axes=(None, 0, 0, 0, 0))
        self._train = jax.jit(jax.vmap(train, in_axes=(0, 0, None, None, None)))
        self._train_own = jax.jit(jax.vmap(train, in_axes=(0, 0, 0, 0, None)))
        track = jax.vmap(self._track_one, in_axes=(None, 0, 0, None, 0))
        self._track = jax.jit(jax.vmap(track, in_axes=(0, 0, 0, None, 0)))

    def _init_one(self, coeff, params) -> GridState:
        state = TrainState(params, self.trainer.make_optimizer(coeff).init(params))
        return GridState(
            state, params, jnp.float32(-1.0), jnp.int32(0), jnp.bool_(False)
        )

    def train(self, coeffs, state: TrainState, data: SeedData, keys, resampled=None):
        """One epoch of every run: the states and mean objectives ``(C, S)``;
        ``resampled``: each run's own training set ``(C, S, n, ...)`` (bagging)."""
        x, y = (data.x_train, data.y_train) if resampled is None else resampled
        if not self.stepwise:
            train = self._train if resampled is None else self._train_own
            return train(coeffs, state, x, y, keys)
        if resampled is not None:
            x, y = x[0], y[0]
        one = jax.tree.map(lambda leaf: leaf[0, 0], state)
        one, loss = self.trainer.stepwise_epoch(coeffs[0], one, x[0], y[0], keys[0])
        return jax.tree.map(lambda leaf: leaf[None, None], (one, loss))

    def epoch(
        self, coeffs, state: GridState, epoch: int, data: SeedData, keys, resampled=None
    ):
        """Train every run one epoch, measure it (``(C, S)`` each), track the best."""
        train, objective = self.train(coeffs, state.train, data, keys, resampled)
        metrics = {"objective": objective}
        if self.patience is None:
            return state._replace(train=train), metrics
        metrics |= self.eval.grid_metrics(train.params, data)
        state = self._track(coeffs, state, train, epoch, metrics["val_acc"])
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


_grid_trainer = functools.cache(GridTrainer)


def get_grid_trainer(
    recipe: Recipe,
    config: TrainConfig,
    num_classes: int,
    train_size: int,
    static_coeff: float | None = None,
    input_shape: tuple[int, ...] | None = None,
    stepwise: bool = False,
) -> GridTrainer:
    """The cached :class:`GridTrainer`; ``static_coeff`` is a dropout rate or ``None``."""
    coeff = recipe.coeff if static_coeff is None else static_coeff
    trainer = get_trainer(recipe, coeff, config, num_classes, train_size, input_shape)
    patience = "coeff" if recipe.early_stopping else config.patience
    return _grid_trainer(trainer, patience, stepwise)


@dataclasses.dataclass
class GridRun:
    """Every (coefficient, seed) run of one regularizer.

    Attributes:
      coeffs: the grid, ``(C,)`` (NaN for a recipe without a hyperparameter).
      history: ``{metric: (C, S, E)}`` of :data:`METRICS` (only ``objective``
        without ``per_epoch``), ``{layer: (C, S, E)}`` of ``sigma_max``/``stable_rank``
        with ``layer_stats``; NaN after a stop.
      final: ``{metric: (C, S)}`` of each run's result (its best epoch's params under
        early stopping, else its last).
      stopped_epoch, best_epoch: ``(C, S)``, 1-based.
      params: the results' params, leading axes ``(C, S)``.
      seconds, cpu_seconds: ``(C, E)`` per run and epoch, measurements included.
    """

    regularizer: str
    coeffs: np.ndarray
    seeds: np.ndarray
    history: dict[str, Any]
    final: dict[str, np.ndarray]
    stopped_epoch: np.ndarray
    best_epoch: np.ndarray
    params: Any
    seconds: np.ndarray
    cpu_seconds: np.ndarray
    patience: str | int | None

    @property
    def val_acc(self) -> np.ndarray:
        """``(C, S)``, each run's result."""
        return self.final["val_acc"]

    @property
    def test_acc(self) -> np.ndarray:
        """``(C, S)``, each run's result."""
        return self.final["test_acc"]

    def seconds_per_run_epoch(self, clock: str = "seconds") -> float:
        """Median seconds per run and epoch, without the first (compilation)."""
        seconds = getattr(self, clock)
        warm = seconds[:, 1:][np.isfinite(seconds[:, 1:])]
        return float(np.median(warm if warm.size else seconds[:, :1]))

    def run_results(
        self, index: int, splits: Sequence[Dataset], config: TrainConfig
    ) -> list[RunResult]:
        """The full :class:`RunResult` of every seed at coefficient ``coeffs[index]``."""
        evaluator = get_evaluator(
            config.model, splits[0].num_classes, config.conv, splits[0].input_shape
        )
        coeff = float(self.coeffs[index])
        patience = int(coeff) if self.patience == "coeff" else self.patience
        return [
            RunResult(
                regularizer=self.regularizer,
                coeff=None if np.isnan(coeff) else coeff,
                seed=int(seed),
                history=self._history(index, s),
                early_stopping={
                    "enabled": patience is not None,
                    "patience": patience,
                    "best_epoch": int(self.best_epoch[index, s]),
                    "best_val_acc": float(self.val_acc[index, s]),
                    "stopped_epoch": int(self.stopped_epoch[index, s]),
                    "restored": patience is not None,
                },
                seconds_per_epoch=self.seconds_per_run_epoch(),
                cpu_seconds_per_epoch=self.seconds_per_run_epoch("cpu_seconds"),
                **measure(
                    evaluator,
                    jax.tree.map(lambda p, s=s: p[index, s], self.params),
                    ds,
                    config.margin_samples,
                ),
            )
            for s, (seed, ds) in enumerate(zip(self.seeds, splits, strict=True))
        ]

    def _history(self, c: int, s: int) -> dict[str, Any]:
        """Run ``(c, s)``'s per-epoch lists, cut where it stopped."""
        stop = int(self.stopped_epoch[c, s])
        history = jax.tree.map(lambda v: v[c, s, :stop].tolist(), self.history)
        clocks = {
            k: getattr(self, k)[c, :stop].tolist() for k in ("seconds", "cpu_seconds")
        }
        return history | clocks


def train_grid(
    regularizer: str,
    recipe: Recipe,
    coeffs: Sequence[float | None],
    splits: Sequence[Dataset],
    config: TrainConfig,
    *,
    seeds: Sequence[int] | None = None,
    on_epoch: Callable[[int, float, int], None] | None = None,
    per_epoch: bool = True,
    layer_stats: bool = False,
    stepwise: bool = False,
    resampled: tuple[jax.Array, jax.Array] | None = None,
) -> GridRun:
    """Train every (coefficient, seed) of one recipe and measure the runs.

    Seed ``s`` trains on ``splits[s]`` from the initialization and minibatch order of
    ``jax.random.key(seeds[s])`` at every coefficient (a paired design).

    Args:
      regularizer: the recipe's name (recorded).
      recipe: the :class:`~margin_regs.experiments.recipes.Recipe`.
      coeffs: the grid (``[None]`` for a recipe without a hyperparameter).
      splits: one prepared data set per seed, all of the same sizes.
      config: the shared schedule.
      seeds: the seeds (default ``0 .. len(splits) - 1``).
      on_epoch: called with ``(epoch, seconds, runs)`` after each program's epoch.
      per_epoch: measure every split every epoch (``False``: only the results).
      layer_stats: also record σ_max and stable rank of every layer every epoch.
      stepwise: one run per program, one jitted call per step.
      resampled: each run's own ``(x, y)``, ``(C, S, n, ...)``; ``None`` with
        ``recipe.bagging``: :func:`~margin_regs.experiments.bagging.train_bagged`.

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
    if recipe.bagging and resampled is None:
        from margin_regs.experiments.bagging import train_bagged

        flags = {"per_epoch": per_epoch, "layer_stats": layer_stats}
        args = (regularizer, recipe, coeffs, splits, config, seeds, on_epoch)
        return train_bagged(*args, stepwise=stepwise, **flags)
    seeds = np.arange(len(splits)) if seeds is None else np.asarray(seeds)
    data, ds = stack_splits(splits), splits[0]
    values = np.asarray([np.nan if c is None else c for c in coeffs], np.float64)
    sizes, parts = (ds.num_classes, len(ds.x_train)), []
    for static, cs, ss in _programs(recipe, values, len(seeds), stepwise):
        gt = get_grid_trainer(recipe, config, *sizes, static, ds.input_shape, stepwise)
        own = resampled and tuple(a[np.ix_(cs, ss)] for a in resampled)
        seed_data = jax.tree.map(lambda a, ss=ss: a[np.asarray(ss)], data)
        program = _Program(gt, np.nan_to_num(values[cs]), seed_data, seeds[ss], own)
        out = program.train(config.epochs, per_epoch, layer_stats, on_epoch)
        parts.append((cs, ss, out))
    return _combine(regularizer, values, seeds, gt.patience, parts)


def _programs(recipe: Recipe, values: np.ndarray, n_seeds: int, stepwise: bool):
    """``(static coefficient, coefficient indices, seed indices)`` per program."""
    cs, ss = range(len(values)), list(range(n_seeds))
    static = values if recipe.dropout else [None] * len(values)
    if stepwise:
        return [(static[c], [c], [s]) for c in cs for s in ss]
    if recipe.dropout:
        return [(static[c], [c], ss) for c in cs]
    return [(None, list(cs), ss)]


@dataclasses.dataclass
class _Program:
    """One compiled program's runs: its coefficients ``(C,)`` and seeds' data."""

    grid: GridTrainer
    coeffs: np.ndarray
    data: SeedData
    seeds: np.ndarray
    resampled: tuple[jax.Array, jax.Array] | None = None

    def train(self, epochs, per_epoch, layer_stats, on_epoch) -> dict[str, Any]:
        """Every epoch (or until every run stopped): what :func:`_combine` reads."""
        grid, coeffs = self.grid, jnp.asarray(self.coeffs, jnp.float32)
        split = jax.vmap(lambda s: jax.random.split(jax.random.key(s)))
        keys = split(jnp.asarray(self.seeds))
        state = grid.init(coeffs, grid.eval.init_seeds(keys[:, 0], self.data.x_train))
        runs = coeffs.size * len(self.seeds)
        history, seconds = [], []
        for epoch in range(epochs):
            start, cpu = time.perf_counter(), time.process_time()
            epoch_keys = jax.vmap(jax.random.fold_in, (0, None))(keys[:, 1], epoch)
            state, metrics = grid.epoch(
                coeffs, state, epoch, self.data, epoch_keys, self.resampled
            )
            metrics |= self._measure(state, metrics, per_epoch, layer_stats)
            history.append(jax.device_get(metrics))
            seconds.append((time.perf_counter() - start, time.process_time() - cpu))
            if on_epoch is not None:
                on_epoch(epoch, seconds[-1][0], runs)
            if np.all(history[-1]["stopped"]):
                break
        history = jax.tree.map(lambda *e: _pad(np.stack(e, -1), epochs), *history)
        out = self._result(state, history)
        return out | {"seconds": _pad(np.asarray(seconds).T / runs, epochs)}

    def _measure(self, state: GridState, metrics, per_epoch, layer_stats):
        """The epoch's measurements that early stopping did not already make."""
        ev, params = self.grid.eval, state.train.params
        out = {"stopped": state.stopped}
        if per_epoch and "val_acc" not in metrics:
            out |= ev.grid_metrics(params, self.data)
        if layer_stats:
            out["sigma_max"], out["stable_rank"] = ev.grid_layer_stats(params)
        return out

    def _result(self, state: GridState, history) -> dict[str, Any]:
        stopped = history.pop("stopped") == 1
        # The epoch (1-based) after which a run stopped: its first True, else the last.
        trained = int(np.sum(np.isfinite(history["objective"][0, 0])))
        stopped_epoch = np.where(stopped.any(-1), stopped.argmax(-1) + 1, trained)
        if self.grid.patience is None:
            params, best_epoch = state.train.params, stopped_epoch
        else:
            params, best_epoch = state.best_params, np.asarray(state.best_epoch) + 1
        if "val_acc" in history:
            c, s = np.indices(best_epoch.shape)
            final = {k: history[k][c, s, best_epoch - 1] for k in METRICS[:-1]}
        else:
            final = jax.device_get(self.grid.eval.grid_metrics(params, self.data))
        return {
            "history": history,
            "final": final,
            "stopped_epoch": stopped_epoch,
            "best_epoch": best_epoch,
            "params": jax.device_get(params),
        }


def _pad(values: np.ndarray, epochs: int) -> np.ndarray:
    """``values`` (..., E) padded with NaN to ``epochs`` on the last axis."""
    width = [(0, 0)] * (values.ndim - 1) + [(0, epochs - values.shape[-1])]
    return np.pad(values.astype(np.float64), width, constant_values=np.nan)


def _combine(regularizer, values, seeds, patience, parts) -> GridRun:
    """One :class:`GridRun` from the programs' ``(cs, ss, output)``."""
    shape = (len(values), len(seeds))

    def scatter(*leaves):
        leaves = [np.asarray(leaf) for leaf in leaves]
        full = np.empty(shape + leaves[0].shape[2:], leaves[0].dtype)
        for (cs, ss, _), leaf in zip(parts, leaves, strict=True):
            full[np.ix_(cs, ss)] = leaf
        return full

    outs = [{k: v for k, v in out.items() if k != "seconds"} for *_, out in parts]
    grid = jax.tree.map(scatter, *outs)
    # A coefficient's seconds: the mean over the programs that trained it.
    seconds = np.stack(
        [
            np.mean([out["seconds"] for cs, _, out in parts if c in cs], axis=0)
            for c in range(len(values))
        ]
    )
    return GridRun(
        regularizer=regularizer,
        coeffs=values,
        seeds=np.asarray(seeds),
        seconds=seconds[:, 0],
        cpu_seconds=seconds[:, 1],
        patience=patience,
        **grid,
    )


def select(val_acc: np.ndarray) -> int:
    """The index of the best mean over seeds of ``val_acc`` ``(C, S)``, the first on
    a tie: only validation accuracies enter, the test split never chooses.

    Example:
      >>> import numpy as np
      >>> from margin_regs.experiments.grid import select
      >>> select(np.array([[0.90, 0.92], [0.93, 0.91], [0.93, 0.91]]))
      1
    """
    return int(np.argmax(np.mean(np.asarray(val_acc), axis=1)))
