"""Bagging (Deep Learning book §7.11) in ``margin-regs compare``.

Per seed, ``k`` members train on ``k`` bootstrap resamples of its training set from its
initialization and minibatch order, the ``k × S`` members as one grid. The ensemble
predicts the members' averaged probabilities: its accuracy is the regularizer's
result, the members' are kept (``final["member_{train,val,test}_acc"]``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from margin_regs.experiments.data import Dataset
from margin_regs.experiments.grid import GridRun, stack_splits, train_grid
from margin_regs.experiments.recipes import Recipe
from margin_regs.experiments.training import (
    Evaluator,
    RunResult,
    TrainConfig,
    get_evaluator,
    map_chunks,
)

__all__ = [
    "BaggedRun",
    "bootstrap_indices",
    "bootstrap_key",
    "bootstrap_training_sets",
    "ensemble_log_probabilities",
    "ensemble_scores",
    "train_bagged",
]

# Folded into a seed's key for its resamples, apart from its init and batch order.
_BOOTSTRAP_STREAM = 0xB007


def bootstrap_indices(key: jax.Array, members: int, n: int) -> jax.Array:
    """``(members, n)`` indices into ``n`` samples, drawn uniformly with replacement.

    Example:
      >>> import jax
      >>> from margin_regs.experiments.bagging import bootstrap_indices
      >>> idx = bootstrap_indices(jax.random.key(0), 3, 100)
      >>> idx.shape, bool(idx.min() >= 0), bool(idx.max() < 100)
      ((3, 100), True, True)
    """
    return jax.random.randint(key, (members, n), 0, n)


def ensemble_log_probabilities(logits: jax.Array) -> jax.Array:
    """``log((1/k) Σₘ softmax(logitsₘ))`` of member logits ``(k, n, C)``: ``(n, C)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_regs.experiments.bagging import ensemble_log_probabilities
      >>> logits = jnp.log(jnp.array([[[0.9, 0.1]], [[0.3, 0.7]]]))
      >>> print(jnp.exp(ensemble_log_probabilities(logits)).round(3))
      [[0.6 0.4]]
    """
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return jax.nn.logsumexp(log_p, axis=0) - math.log(logits.shape[0])


@functools.cache
def _ensemble_fn(evaluator: Evaluator) -> Callable:
    def fn(stacked, x, y):
        logits = jax.vmap(lambda p: evaluator.model.apply({"params": p}, x))(stacked)
        log_p = ensemble_log_probabilities(logits)
        loss = -jnp.take_along_axis(log_p, y[:, None], axis=1)[:, 0]
        return loss, jnp.argmax(log_p, axis=-1) == y

    return jax.jit(functools.partial(map_chunks, fn))


def ensemble_scores(
    evaluator: Evaluator, stacked: Any, dataset: Dataset
) -> dict[str, float]:
    """The ensemble's loss and accuracy on each split; ``stacked``: members first."""
    fn = _ensemble_fn(evaluator)
    out = {}
    for split in ("train", "val", "test"):
        x, y = getattr(dataset, f"x_{split}"), getattr(dataset, f"y_{split}")
        loss, correct = fn(stacked, x, y)
        out[f"{split}_loss"] = float(loss.mean())
        out[f"{split}_acc"] = float(correct.mean())
    return out


@dataclasses.dataclass
class BaggedRun(GridRun):
    """A bagging :class:`~margin_regs.experiments.grid.GridRun`, one row per ``k``.

    ``final``: the ensembles' ``(K, S)``; ``history``: the members' mean;
    ``members[i]``: the member grid of ``coeffs[i]``; ``seconds``: per ensemble.
    """

    members: list[GridRun] = dataclasses.field(default_factory=list)

    def run_results(
        self, index: int, splits: Sequence[Dataset], config: TrainConfig
    ) -> list[RunResult]:
        """Each seed's ensemble at ``coeffs[index]``: its losses and accuracies, the
        members' mean σ, stable ranks and spectra, pooled margins, accuracies."""
        grid = self.members[index]
        per_member = [
            grid.run_results(m, splits, config) for m in range(len(grid.coeffs))
        ]
        return [
            self._ensemble_result([member[s] for member in per_member], index, s)
            for s in range(len(splits))
        ]

    def _ensemble_result(self, runs: list[RunResult], index: int, s: int) -> RunResult:
        mean = functools.partial(jax.tree.map, lambda *v: np.mean(v, axis=0).tolist())
        final: dict[str, Any] = {k: float(v[index, s]) for k, v in self.final.items()}
        for key in ("sigma_max", "stable_rank"):
            final[key] = mean(*[r.final[key] for r in runs])
        final["sigma_definition"] = runs[0].final["sigma_definition"]
        for split in ("train", "val", "test"):
            final[f"member_{split}_acc"] = [r.final[f"{split}_acc"] for r in runs]
        return dataclasses.replace(
            runs[0],
            coeff=float(len(runs)),
            history=self._history(index, s),
            final=final,
            early_stopping=runs[0].early_stopping
            | {
                "best_epoch": int(self.best_epoch[index, s]),
                "best_val_acc": final["val_acc"],
                "stopped_epoch": int(self.stopped_epoch[index, s]),
            },
            seconds_per_epoch=self.seconds_per_run_epoch(),
            cpu_seconds_per_epoch=self.seconds_per_run_epoch("cpu_seconds"),
            singular_values=mean(*[r.singular_values for r in runs]),
            input_margins=[m for r in runs for m in r.input_margins],
            output_margins=[m for r in runs for m in r.output_margins],
            params=jax.tree.map(lambda *p: jnp.stack(p), *[r.params for r in runs]),
        )


def train_bagged(
    regularizer: str,
    recipe: Recipe,
    coeffs: Sequence[float],
    splits: Sequence[Dataset],
    config: TrainConfig,
    seeds: Sequence[int] | None = None,
    on_epoch: Callable[[int, float, int], None] | None = None,
    **options: Any,
) -> BaggedRun:
    """Train ``k`` bootstrap members per seed for each ``k`` in ``coeffs`` (one grid
    per ``k``) and score their ensembles; arguments as
    :func:`~margin_regs.experiments.grid.train_grid`, which calls this for a recipe
    with ``bagging=True``. ``on_epoch`` counts ensembles, not members."""
    seeds = np.arange(len(splits)) if seeds is None else np.asarray(seeds)
    data, members = stack_splits(splits), []
    for k in (int(c) for c in coeffs):
        own = bootstrap_training_sets(data.x_train, data.y_train, seeds, k)
        count = on_epoch and functools.partial(_per_ensemble, on_epoch, k)
        args = (regularizer, recipe, [k] * k, splits, config)
        grid = train_grid(*args, seeds=seeds, on_epoch=count, resampled=own, **options)
        members.append(grid)
    return _bagged(regularizer, coeffs, members, splits, config)


def bootstrap_key(seed: int) -> jax.Array:
    """The key of a seed's resamples (apart from its init and minibatch order)."""
    return jax.random.fold_in(jax.random.key(int(seed)), _BOOTSTRAP_STREAM)


def bootstrap_training_sets(
    x: jax.Array, y: jax.Array, seeds: Sequence[int], members: int
) -> tuple[jax.Array, jax.Array]:
    """Member ``m``'s training set for seed ``s``: ``x[s][bootstrap_indices(
    bootstrap_key(seeds[s]), members, n)[m]]``, stacked ``(members, S, n, ...)``.

    Args:
      x: the seeds' training inputs ``(S, n, ...)``.
      y: their labels ``(S, n)``.
      seeds: ``(S,)``.
      members: ``k``.
    """
    n = x.shape[1]
    idx = jnp.stack([bootstrap_indices(bootstrap_key(s), members, n) for s in seeds], 1)
    take = jax.vmap(jax.vmap(lambda a, i: a[i]), in_axes=(None, 0))
    return take(x, idx), take(y, idx)


def _per_ensemble(on_epoch, k: int, epoch: int, seconds: float, runs: int) -> None:
    on_epoch(epoch, seconds, runs // k)


def _bagged(regularizer, coeffs, members, splits, config) -> BaggedRun:
    """The ensembles' :class:`BaggedRun` from each ``k``'s member grid."""
    evaluator = get_evaluator(
        config.model, splits[0].num_classes, config.conv, splits[0].input_shape
    )
    scores = [
        [
            ensemble_scores(
                evaluator, jax.tree.map(lambda p, s=s: p[:, s], g.params), ds
            )
            for s, ds in enumerate(splits)
        ]
        for g in members
    ]
    per_k = functools.partial(jax.tree.map, lambda *a: np.stack(a))
    return BaggedRun(
        regularizer=regularizer,
        coeffs=np.asarray(coeffs, np.float64),
        seeds=members[0].seeds,
        history=per_k(*[jax.tree.map(lambda h: h.mean(0), g.history) for g in members]),
        final={
            k: np.array([[sc[k] for sc in row] for row in scores]) for k in scores[0][0]
        },
        stopped_epoch=np.stack([g.stopped_epoch.max(0) for g in members]),
        best_epoch=np.stack([g.best_epoch.max(0) for g in members]),
        params=[g.params for g in members],
        seconds=np.stack([g.seconds.sum(0) for g in members]),
        cpu_seconds=np.stack([g.cpu_seconds.sum(0) for g in members]),
        patience=members[0].patience,
        members=members,
    )
