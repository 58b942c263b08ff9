"""Training one cell of a reproduction: a method, its coefficient(s), every seed.

Built on the harness's pure :meth:`~margin_regs.experiments.training.Trainer.epoch`
and :meth:`~margin_regs.experiments.training.Trainer.objective` (the coefficient
may be traced). For dense models every (coefficient, seed) trains in one
``vmap``-ed program, as ``margin-regs compare`` does. Convolutional models train one
run at a time, one jitted call per step, through one compiled program per recipe
and schedule: on XLA's CPU backend a ``vmap`` over per-seed conv kernels becomes a
grouped convolution whose gradient is several times slower than the runs one by one
(3 seeds of the Table I CNN: 7× one seed's epoch time), and a convolution inside a
``lax.scan`` body about 10× slower than the same step jitted alone.

Unlike :func:`margin_regs.experiments.grid.train_grid`, a cell measures its runs
only where the protocol needs it (at the end, or after every epoch for
Yoshida & Miyato's generalization gap), which halves the cost of these small runs.
Seed ``s`` draws its training subset with :func:`~margin_regs.experiments.data.prepare`
and its initialization and minibatch order from ``jax.random.key(s)``, exactly as
:func:`~margin_regs.experiments.training.run` does, so every method of a cell is
paired with the others seed by seed.
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

from margin_regs.experiments import grid, training
from margin_regs.experiments.data import Dataset
from margin_regs.experiments.recipes import Recipe

__all__ = ["Cell", "CellResult", "downsample", "train_cell"]

CONV_MODELS = frozenset({"cnn", "cnn3", "adareg_cnn"})


@dataclasses.dataclass(frozen=True)
class Cell:
    """One method of one setting: a recipe, its coefficient grid and the schedule.

    Attributes:
      method: the method's key in the results (``"lm"``, ``"wd"``...).
      recipe: how the method trains.
      coeffs: the coefficient grid; one value: fixed, several: the one with the best
        mean validation accuracy is reported (never the test set).
      config: the schedule (model, epochs, batch size, learning rate).
    """

    method: str
    recipe: Recipe
    coeffs: tuple[float, ...]
    config: training.TrainConfig


@dataclasses.dataclass
class CellResult:
    """Every (coefficient, seed) run of a cell, measured.

    Attributes:
      method: the cell's method.
      coeffs: the grid ``(C,)``.
      selected: index of the coefficient chosen on validation.
      acc: ``{"train_acc"|"val_acc"|"test_acc": (C, S)}`` of the final params.
      classifier: ``{"sigma_max"|"stable_rank": (C, S)}`` of the classifier kernel.
      curves: ``{"train_acc"|"test_acc": (C, S, E)}`` after every epoch (only when
        asked for), else empty.
      seconds: wall time of the cell, compilation included.
    """

    method: str
    coeffs: np.ndarray
    selected: int
    acc: dict[str, np.ndarray]
    classifier: dict[str, np.ndarray]
    curves: dict[str, np.ndarray]
    seconds: float

    def at_selected(self) -> dict[str, list[float]]:
        """Per-seed measurements at the selected coefficient (lists, JSON-ready)."""
        out = {k: v[self.selected].tolist() for k, v in self.acc.items()}
        out |= {k: v[self.selected].tolist() for k, v in self.classifier.items()}
        out |= {k: v[self.selected].tolist() for k, v in self.curves.items()}
        return out


def downsample(dataset: Dataset, factor: int) -> Dataset:
    """Average-pool the images of a data set by ``factor`` per spatial axis.

    ``(n, 28, 28, 1)`` MNIST becomes ``(n, 14, 14, 1)`` with ``factor=2``: a quarter
    of the pixels, and of every convolution's cost.

    Example:
      >>> import numpy as np
      >>> from margin_regs.experiments.data import Dataset
      >>> from margin_regs.experiments.reproduce.runner import downsample
      >>> x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
      >>> ds = Dataset("t", x, np.zeros(1, np.int32), x, np.zeros(1, np.int32), 1)
      >>> downsample(ds, 2).x_train[0, :, :, 0].tolist()
      [[2.5, 4.5], [10.5, 12.5]]
    """
    if factor == 1:
        return dataset

    def pool(x: np.ndarray | None) -> np.ndarray | None:
        if x is None:
            return None
        n, h, w, c = x.shape
        if h % factor or w % factor:
            raise ValueError(f"images of {h}×{w} do not divide by factor {factor}")
        return x.reshape(n, h // factor, factor, w // factor, factor, c).mean((2, 4))

    return dataclasses.replace(
        dataset,
        x_train=pool(dataset.x_train),
        x_test=pool(dataset.x_test),
        x_val=pool(dataset.x_val),
    )


@functools.cache
def _programs(trainer: training.Trainer) -> tuple[Callable, Callable]:
    """``init(coeffs, keys, x)`` and ``epoch(coeffs, state, x, y, keys)``, jitted,
    ``vmap``-ed over coefficients (outer) and seeds (inner)."""

    def init_one(coeff, key, x):
        params = trainer.eval.init(key, x[:1])["params"]
        return training.TrainState(params, trainer.make_optimizer(coeff).init(params))

    init = jax.vmap(jax.vmap(init_one, (None, 0, 0)), (0, None, None))
    epoch = jax.vmap(trainer.epoch, (None, 0, 0, 0, 0))
    epoch = jax.vmap(epoch, (0, 0, None, None, None))
    return jax.jit(init), jax.jit(epoch)


def _stack(splits: Sequence[Dataset], name: str) -> jax.Array:
    return jnp.asarray(np.stack([getattr(ds, name) for ds in splits]))


def _trainer(cell: Cell, num_classes: int, n: int) -> training.Trainer:
    # The coefficient is traced in the programs, so every cell of a recipe and
    # schedule shares one trainer (and its compilation), whatever its grid; "no
    # regularization" as the weight-decay recipe at 0 shares weight decay's. Only a
    # dropout rate shapes the model.
    if cell.recipe.dropout:
        static = cell.coeffs[0]
    else:
        static = 0.0 if cell.recipe.coeff is None else cell.recipe.coeff
    return training.get_trainer(cell.recipe, static, cell.config, num_classes, n)


@functools.cache
def _step_program(trainer: training.Trainer) -> Callable:
    """One jitted SGD step ``(coeff, state, x, y, key) -> state``."""

    def step(coeff, state, x, y, key):
        grads = jax.grad(trainer.objective, argnums=1)(coeff, state.params, x, y, key)
        optimizer = trainer.make_optimizer(coeff)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return training.TrainState(
            optax.apply_updates(state.params, updates), opt_state
        )

    return jax.jit(step)


def _stepwise_epoch(trainer: training.Trainer, coeff, state, x, y, key):
    """:meth:`~margin_regs.experiments.training.Trainer.epoch` (the same minibatch
    order and keys) as one jitted call per step instead of one ``lax.scan``.

    On XLA's CPU backend a convolution inside the scan's loop body runs about 10×
    slower than the same step jitted on its own (measured here on the Table I CNN:
    1.3 s against 0.14 s for 8 steps), so the conv models step from Python.
    """
    step = _step_program(trainer)
    k_order, k_steps = jax.random.split(key)
    b, steps = trainer.batch_size, trainer.steps_per_epoch
    order = np.asarray(jax.random.permutation(k_order, x.shape[0]))
    keys = jax.random.split(k_steps, steps)
    for i in range(steps):
        idx = order[i * b : (i + 1) * b]
        state = step(coeff, state, x[idx], y[idx], keys[i])
    return state


def _train(cell: Cell, coeffs, splits: Sequence[Dataset], seeds, measure_epoch) -> Any:
    """Params ``(C, S, ...)`` after training; ``measure_epoch(epoch, params)``."""
    trainer = _trainer(cell, splits[0].num_classes, len(splits[0].x_train))
    init, epoch = _programs(trainer)
    coeffs = jnp.asarray(coeffs, jnp.float32)
    keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s)))(jnp.asarray(seeds))
    x, y = _stack(splits, "x_train"), _stack(splits, "y_train")
    state = init(coeffs, keys[:, 0], x)
    stepwise = cell.config.model in CONV_MODELS
    if stepwise:  # one run per call (see _programs_of)
        state = jax.tree.map(lambda leaf: leaf[0, 0], state)
        x_np, y_np = splits[0].x_train, splits[0].y_train
    for e in range(cell.config.epochs):
        epoch_keys = jax.vmap(jax.random.fold_in, (0, None))(keys[:, 1], e)
        if stepwise:
            state = _stepwise_epoch(
                trainer, coeffs[0], state, x_np, y_np, epoch_keys[0]
            )
            measure_epoch(e, jax.tree.map(lambda leaf: leaf[None, None], state.params))
        else:
            state, _ = epoch(coeffs, state, x, y, epoch_keys)
            measure_epoch(e, state.params)
    if stepwise:
        return jax.tree.map(lambda leaf: leaf[None, None], state.params)
    return state.params


class _Program(NamedTuple):
    """Which runs one call of the compiled program trains."""

    coeff_index: list[int]
    seed_index: list[int]
    splits: list[Dataset]
    seeds: list[int]


def _programs_of(cell: Cell, splits: Sequence[Dataset], seeds: Sequence[int]):
    """Every (coefficient, seed) at once, or one run per call for conv models."""
    if cell.config.model not in CONV_MODELS:
        return [
            _Program(
                list(range(len(cell.coeffs))),
                list(range(len(seeds))),
                [*splits],
                [*seeds],
            )
        ]
    return [
        _Program([c], [i], [ds], [s])
        for c in range(len(cell.coeffs))
        for i, (ds, s) in enumerate(zip(splits, seeds, strict=True))
    ]


def train_cell(
    cell: Cell,
    splits: Sequence[Dataset],
    *,
    seeds: Sequence[int] | None = None,
    curves: bool = False,
    on_epoch: Callable[[], None] | None = None,
) -> CellResult:
    """Train and measure every (coefficient, seed) run of a cell.

    Args:
      cell: the method, grid and schedule.
      splits: one prepared data set per seed (same sizes).
      seeds: the seeds (default ``0 .. len(splits) - 1``).
      curves: also measure train and test accuracy after every epoch.
      on_epoch: called after every epoch of every program (progress).

    Returns:
      A :class:`CellResult`.

    Raises:
      ValueError: for a dropout recipe with more than one rate (the rate shapes the
        model, so it cannot be a traced coefficient).
    """
    seeds = list(range(len(splits))) if seeds is None else list(seeds)
    if cell.recipe.dropout and len(cell.coeffs) != 1:
        raise ValueError(f"{cell.method}: a dropout rate shapes the model; give one")
    start = time.perf_counter()
    evaluator = training.get_evaluator(cell.config.model, splits[0].num_classes)
    shape = (len(cell.coeffs), len(seeds))
    out = {
        k: np.zeros(shape)
        for k in ("train_acc", "val_acc", "test_acc", "sigma_max", "stable_rank")
    }
    history = {k: np.zeros((*shape, cell.config.epochs)) for k in ("train", "test")}
    for program in _programs_of(cell, splits, seeds):

        def measure_epoch(e, params, program=program):
            if curves:
                for c, i, ds, p in _each_run(params, program):
                    for split in history:
                        history[split][c, i, e] = _accuracy(evaluator, p, ds, split)
            if on_epoch is not None:
                on_epoch()

        coeffs = [cell.coeffs[c] for c in program.coeff_index]
        params = _train(cell, coeffs, program.splits, program.seeds, measure_epoch)
        for c, i, ds, p in _each_run(params, program):
            for split in ("train", "val", "test"):
                out[f"{split}_acc"][c, i] = _accuracy(evaluator, p, ds, split)
            sigmas, ranks = evaluator.layer_stats(p)
            finite = all(
                bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(p)
            )
            # A diverged run's weights have no spectrum (mr.stable_ranks reports 0
            # for a NaN kernel): record it as undefined, so no verdict rests on it.
            out["sigma_max"][c, i] = _classifier_value(sigmas) if finite else np.nan
            out["stable_rank"][c, i] = _classifier_value(ranks) if finite else np.nan
    return CellResult(
        method=cell.method,
        coeffs=np.asarray(cell.coeffs, float),
        selected=grid.select(out["val_acc"]),
        acc={k: out[k] for k in ("train_acc", "val_acc", "test_acc")},
        classifier={k: out[k] for k in ("sigma_max", "stable_rank")},
        curves={f"{k}_acc_curve": v for k, v in history.items()} if curves else {},
        seconds=time.perf_counter() - start,
    )


def _each_run(params: Any, program: _Program):
    """``(coefficient index, seed index, data, params)`` of every run of a call."""
    for a, c in enumerate(program.coeff_index):
        for b, (i, ds) in enumerate(
            zip(program.seed_index, program.splits, strict=True)
        ):
            yield c, i, ds, jax.tree.map(lambda leaf, a=a, b=b: leaf[a, b], params)


def _accuracy(evaluator, params, ds: Dataset, split: str) -> float:
    x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
    return evaluator.evaluate(params, x, y)[1]


def _classifier_value(per_layer: dict[str, jax.Array]) -> float:
    (value,) = [float(v) for k, v in per_layer.items() if "classifier" in k]
    return value
