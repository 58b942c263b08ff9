"""Training one cell of a reproduction: a method, its coefficient(s), every seed.

Dense models train every (coefficient, seed) at once on the harness's vmapped grid
program (:class:`~margin_regs.experiments.grid.GridTrainer`: its ``init``, its
vmapped epoch and its :class:`~margin_regs.experiments.grid.GridMetrics`), measured
at the end only (or after every epoch when a protocol needs curves), not after every
epoch as ``margin-regs compare`` does. Convolutional models train one run per thread
(a few in flight), one jitted call per step: on XLA's CPU backend a ``vmap`` over per-seed conv kernels
becomes a grouped convolution whose gradient is several times slower than the runs
one by one, and a convolution inside a ``lax.scan`` body about 10× slower than the
same step jitted alone (1.3 s against 0.14 s for 8 steps of the Table I CNN).

A cell's learning-rate schedule is the paper's: phases of ``(epochs, rate)``
(Sokolić et al.: 30/30/30/20 epochs at 0.01 … 0.00001), else the harness's
/10 after 1/2 and 3/4 of the steps. Seed ``s`` draws its training subset with
:func:`~margin_regs.experiments.data.prepare` and its initialization and minibatch
order from ``jax.random.key(s)``, exactly as
:func:`~margin_regs.experiments.training.run` does, so every method of a cell is
paired with the others seed by seed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from margin_regs.experiments import grid, training
from margin_regs.experiments.data import Dataset
from margin_regs.experiments.recipes import Recipe

__all__ = ["Cell", "CellResult", "downsample", "train_cell"]

CONV_MODELS = frozenset({"cnn", "cnn3", "adareg_cnn"})
# What every run reports at its end (the losses are the cross-entropy of the logits,
# whatever loss trained them).
FINAL = ("train_acc", "train_loss", "val_acc", "test_acc", "test_loss")

Phases = tuple[tuple[int, float], ...]
_IN_FLIGHT = 3  # conv runs trained at once


@dataclasses.dataclass(frozen=True)
class Cell:
    """One method of one setting: a recipe, its coefficient grid and the schedule.

    Attributes:
      method: the method's key in the results (``"lm"``, ``"wd"``...).
      recipe: how the method trains.
      coeffs: the coefficient grid; one value: fixed, several: the one with the best
        mean validation accuracy is reported (never the test set).
      config: the model, epochs, batch size and initial rate.
      phases: ``((epochs, rate), ...)``, the paper's step schedule (their epochs
        sum to ``config.epochs``); ``None``: the harness's.
    """

    method: str
    recipe: Recipe
    coeffs: tuple[float, ...]
    config: training.TrainConfig
    phases: Phases | None = None

    def __post_init__(self):
        if self.phases is not None and (
            sum(e for e, _ in self.phases) != self.config.epochs
        ):
            raise ValueError(
                f"{self.method}: phases {self.phases} do not sum to "
                f"{self.config.epochs} epochs"
            )


@dataclasses.dataclass
class CellResult:
    """Every (coefficient, seed) run of a cell, measured.

    Attributes:
      method: the cell's method.
      coeffs: the grid ``(C,)``.
      selected: index of the coefficient chosen on validation.
      acc: ``{name: (C, S)}`` for every name of :data:`FINAL`, of the final params.
      classifier: ``{"sigma_max"|"stable_rank": (C, S)}`` of the classifier kernel.
      curves: ``{"train_acc_curve"|"test_acc_curve": (C, S, E)}`` (only when asked).
      seconds: wall time of the cell, compilation included.
      cpu_seconds: the process's CPU time over the cell (every thread), which a
        shared machine inflates far less than the wall time.
    """

    method: str
    coeffs: np.ndarray
    selected: int
    acc: dict[str, np.ndarray]
    classifier: dict[str, np.ndarray]
    curves: dict[str, np.ndarray]
    seconds: float
    cpu_seconds: float = float("nan")

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


class _PhasedTrainer(training.Trainer):
    """A :class:`~margin_regs.experiments.training.Trainer` whose SGD follows the
    paper's phases of ``(epochs, rate)`` instead of /10 after 1/2 and 3/4."""

    def __init__(self, recipe, coeff, config, num_classes, train_size, phases):
        super().__init__(recipe, coeff, config, num_classes, train_size)
        boundaries, step, rate = {}, 0, phases[0][1]
        for epochs, new_rate in phases:
            if step:
                boundaries[step] = new_rate / rate
            step, rate = step + epochs * self.steps_per_epoch, new_rate
        self.schedule = optax.piecewise_constant_schedule(phases[0][1], boundaries)
        self.train_epoch = jax.jit(functools.partial(self.epoch, coeff))


@functools.cache
def _grid_trainer(cell: Cell, num_classes: int, n: int) -> grid.GridTrainer:
    # The coefficient is traced in the programs, so every cell of a recipe and
    # schedule shares one program (and its compilation), whatever its grid; only a
    # dropout rate shapes the model.
    static = cell.coeffs[0] if cell.recipe.dropout else cell.recipe.coeff
    if cell.phases is None:
        return grid.get_grid_trainer(cell.recipe, cell.config, num_classes, n, static)
    trainer = _PhasedTrainer(
        cell.recipe, static, cell.config, num_classes, n, cell.phases
    )
    return grid.GridTrainer(trainer, None, stepwise=False)


def _train(gt: grid.GridTrainer, coeffs, data: grid.SeedData, seeds, cell, measure):
    """Train every (coefficient, seed) of ``coeffs × seeds``: one vmapped program
    for dense models, one run per call for conv models; ``measure(e, params)``
    after every epoch. Returns the final params ``(C, S, ...)``."""
    keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s)))(jnp.asarray(seeds))
    params = gt.eval.init_seeds(keys[:, 0], data.x_train)
    state = gt.init(coeffs, params).train
    stepwise = cell.config.model in CONV_MODELS
    if stepwise:  # one run (the caller passes one coefficient and one seed)
        state = jax.tree.map(lambda leaf: leaf[0, 0], state)
        x, y = np.asarray(data.x_train[0]), np.asarray(data.y_train[0])
    for e in range(cell.config.epochs):
        epoch_keys = jax.vmap(jax.random.fold_in, (0, None))(keys[:, 1], e)
        if stepwise:
            state, _ = gt.trainer.stepwise_epoch(coeffs[0], state, x, y, epoch_keys[0])
            params = jax.tree.map(lambda leaf: leaf[None, None], state.params)
        else:
            state, _ = gt._train(coeffs, state, data.x_train, data.y_train, epoch_keys)
            params = state.params
        measure(e, params)
    return params


def _runs(cell: Cell, seeds: Sequence[int]):
    """``(coefficient indices, seed indices)`` trained per call: all of them at
    once for dense models, one by one for conv models."""
    c_all, s_all = list(range(len(cell.coeffs))), list(range(len(seeds)))
    if cell.config.model not in CONV_MODELS:
        return [(c_all, s_all)]
    return [([c], [s]) for c in c_all for s in s_all]


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
    start, cpu_start = time.perf_counter(), time.process_time()
    gt = _grid_trainer(cell, splits[0].num_classes, len(splits[0].x_train))
    evaluator = training.get_evaluator(cell.config.model, splits[0].num_classes)
    shape = (len(cell.coeffs), len(seeds))
    out = {k: np.zeros(shape) for k in (*FINAL, "sigma_max", "stable_rank")}
    history = {k: np.zeros((*shape, cell.config.epochs)) for k in ("train", "test")}

    def run(c_index, s_index):
        data = grid.stack_splits([splits[i] for i in s_index])
        at = np.ix_(c_index, s_index)

        def measure(e, params):
            if curves:
                m = jax.device_get(gt.eval.grid_metrics(params, data))
                for split in history:
                    history[split][(*at, e)] = m[f"{split}_acc"]
            if on_epoch is not None:
                on_epoch()

        coeffs = jnp.asarray([cell.coeffs[c] for c in c_index], jnp.float32)
        params = _train(gt, coeffs, data, [seeds[i] for i in s_index], cell, measure)
        final = jax.device_get(gt.eval.grid_metrics(params, data))
        for k in FINAL:
            out[k][at] = final[k]
        for a, c in enumerate(c_index):
            for b, i in enumerate(s_index):
                p = jax.tree.map(lambda leaf, a=a, b=b: leaf[a, b], params)
                out["sigma_max"][c, i], out["stable_rank"][c, i] = _spectrum(
                    evaluator, p
                )

    runs = _runs(cell, seeds)
    # Conv runs step from Python, and one small conv step leaves a core idle: a few
    # runs in flight at once (threads; XLA releases the GIL) train a cell 1.4× faster.
    with concurrent.futures.ThreadPoolExecutor(min(len(runs), _IN_FLIGHT)) as pool:
        for done in [pool.submit(run, *r) for r in runs]:
            done.result()
    return CellResult(
        method=cell.method,
        coeffs=np.asarray(cell.coeffs, float),
        selected=grid.select(out["val_acc"]),
        acc={k: out[k] for k in FINAL},
        classifier={k: out[k] for k in ("sigma_max", "stable_rank")},
        curves={f"{k}_acc_curve": v for k, v in history.items()} if curves else {},
        seconds=time.perf_counter() - start,
        cpu_seconds=time.process_time() - cpu_start,
    )


def _spectrum(evaluator, params) -> tuple[float, float]:
    """The classifier kernel's σ_max and stable rank; NaN for a diverged run (its
    weights have no spectrum, so no verdict rests on it)."""
    if not all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(params)):
        return np.nan, np.nan
    sigmas, ranks = evaluator.layer_stats(params)
    (sigma,) = [float(v) for k, v in sigmas.items() if "classifier" in k]
    (rank,) = [float(v) for k, v in ranks.items() if "classifier" in k]
    return sigma, rank
