"""Training one cell of a reproduction: a method, its coefficient(s), every seed.

Built on the harness's pure :meth:`~margin_regs.experiments.training.Trainer.epoch`
(the coefficient may be traced): for dense models every (coefficient, seed) trains in
one ``vmap``-ed program, as ``margin-regs compare`` does; for convolutional models
the seeds run one after the other through the same compiled program, because on
XLA's CPU backend a ``vmap`` over per-seed conv kernels becomes a grouped
convolution whose gradient is several times slower than the runs one by one
(measured here: 3 seeds of the Table I CNN, 7× one seed's epoch time).

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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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


def _train(cell: Cell, splits: Sequence[Dataset], seeds, measure_epoch) -> Any:
    """Params ``(C, S, ...)`` after training; ``measure_epoch(epoch, params)``."""
    num_classes, n = splits[0].num_classes, len(splits[0].x_train)
    trainer = training.get_trainer(
        cell.recipe, cell.coeffs[0], cell.config, num_classes, n
    )
    init, epoch = _programs(trainer)
    coeffs = jnp.asarray(cell.coeffs, jnp.float32)
    keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s)))(jnp.asarray(seeds))
    x, y = _stack(splits, "x_train"), _stack(splits, "y_train")
    state = init(coeffs, keys[:, 0], x)
    for e in range(cell.config.epochs):
        epoch_keys = jax.vmap(jax.random.fold_in, (0, None))(keys[:, 1], e)
        state, _ = epoch(coeffs, state, x, y, epoch_keys)
        measure_epoch(e, state.params)
    return state.params


def _runs(splits: Sequence[Dataset], seeds: Sequence[int], model: str):
    """``(seed indices, splits, seeds)`` per program: all at once, or one seed each."""
    if model in CONV_MODELS:
        return [
            ([i], [ds], [s])
            for i, (ds, s) in enumerate(zip(splits, seeds, strict=True))
        ]
    return [(list(range(len(seeds))), list(splits), list(seeds))]


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
    for index, part, part_seeds in _runs(splits, seeds, cell.config.model):

        def measure_epoch(e, params, index=index, part=part):
            if curves:
                for c, i, p in _each_run(params, index):
                    for split in history:
                        history[split][c, i, e] = _accuracy(
                            evaluator, p, part, i, split
                        )
            if on_epoch is not None:
                on_epoch()

        params = _train(cell, part, part_seeds, measure_epoch)
        for c, i, p in _each_run(params, index):
            for split in ("train", "val", "test"):
                out[f"{split}_acc"][c, i] = _accuracy(evaluator, p, part, i, split)
            sigmas, ranks = evaluator.layer_stats(p)
            out["sigma_max"][c, i] = _classifier_value(sigmas)
            out["stable_rank"][c, i] = _classifier_value(ranks)
    return CellResult(
        method=cell.method,
        coeffs=np.asarray(cell.coeffs, float),
        selected=grid.select(out["val_acc"]),
        acc={k: out[k] for k in ("train_acc", "val_acc", "test_acc")},
        classifier={k: out[k] for k in ("sigma_max", "stable_rank")},
        curves={f"{k}_acc_curve": v for k, v in history.items()} if curves else {},
        seconds=time.perf_counter() - start,
    )


def _each_run(params: Any, index: Sequence[int]):
    """``(coefficient index, seed index, params)`` of every run of a program."""
    num_coeffs = jax.tree.leaves(params)[0].shape[0]
    for c in range(num_coeffs):
        for j, i in enumerate(index):
            yield c, i, jax.tree.map(lambda leaf, c=c, j=j: leaf[c, j], params)


def _accuracy(evaluator, params, part: Sequence[Dataset], i: int, split: str) -> float:
    ds = part[0] if len(part) == 1 else part[i]
    x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
    return evaluator.evaluate(params, x, y)[1]


def _classifier_value(per_layer: dict[str, jax.Array]) -> float:
    (value,) = [float(v) for k, v in per_layer.items() if "classifier" in k]
    return value
