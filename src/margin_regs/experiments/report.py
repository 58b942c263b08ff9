"""What a comparison reports: per-regularizer summaries, epoch timings, the table,
the plots and ``results.json``."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import margin_regs as mr
from margin_regs.experiments.data import Dataset
from margin_regs.experiments.training import RunResult, TrainConfig, Trainer

__all__ = [
    "format_table",
    "jsonable",
    "plots",
    "provenance",
    "summarize",
    "time_epochs",
    "write",
]


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
      >>> from margin_regs.experiments.data import load_digits, prepare
      >>> from margin_regs.experiments.report import summarize
      >>> from margin_regs.experiments.training import TrainConfig, run
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
                mr.generalization_gap(
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
      >>> from margin_regs.experiments.data import load_digits, prepare
      >>> from margin_regs.experiments.report import time_epochs
      >>> from margin_regs.experiments.training import TrainConfig, get_trainer
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


def jsonable(value: Any) -> Any:
    """Non-finite floats become ``None`` (strict JSON has no inf or NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def _layers(summary: dict[str, Any]) -> list[str]:
    first = next(iter(summary.values()))
    # Input side first: kernels named by the models' module order.
    return sorted(first["sigma_max"], key=lambda k: (k.startswith("classifier"), k))


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """The comparison as a fixed-width text table (one row per regularizer).

    Example:
      >>> from margin_regs.experiments.report import format_table
      >>> row = dict(test_acc_mean=0.9, test_acc_std=0.01, yoshida_gap=0.05,
      ...            yoshida_threshold=0.8, sigma_max={"a/kernel": 2.0},
      ...            stable_rank={"a/kernel": 3.0}, median_output_margin=1.5,
      ...            median_input_margin=0.2, relative_time=1.0, coeff=None)
      >>> print(format_table({"vanilla": row}))  # doctest: +NORMALIZE_WHITESPACE
      regularizer  coeff  test acc %   gap %  σ_max a      srank a     out margin  in margin  time
      vanilla      -      90.0 ± 1.0   5.0    2.00         3.00        1.50        0.200      1.00×
      <BLANKLINE>
      gap: Yoshida & Miyato's generalization gap at α = 80.0% test accuracy; ...
    """
    layers = _layers(summary)
    short = [k.removesuffix("/kernel") for k in layers]
    head = ["regularizer", "coeff", "test acc %", "gap %", f"σ_max {'/'.join(short)}"]
    head += [f"srank {'/'.join(short)}", "out margin", "in margin", "time"]
    rows = [head]
    for name, s in summary.items():
        gap = s["yoshida_gap"]
        rows.append(
            [
                name,
                "-" if s["coeff"] is None else f"{s['coeff']:g}",
                f"{100 * s['test_acc_mean']:.1f} ± {100 * s['test_acc_std']:.1f}",
                "n/a" if gap is None or not math.isfinite(gap) else f"{100 * gap:.1f}",
                "/".join(f"{s['sigma_max'][k]:.2f}" for k in layers),
                "/".join(f"{s['stable_rank'][k]:.2f}" for k in layers),
                f"{s['median_output_margin']:.2f}",
                f"{s['median_input_margin']:.3f}",
                "-" if s["relative_time"] is None else f"{s['relative_time']:.2f}×",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    ]
    threshold = next(iter(summary.values()))["yoshida_threshold"]
    lines += [
        "",
        f"gap: Yoshida & Miyato's generalization gap at α = {100 * threshold:.1f}% test "
        "accuracy; σ_max, srank: top singular value and stable rank of each layer "
        f"({'/'.join(short)}); out margin: median logit margin z_y − max z_j on the test "
        "set; in margin: median first-order input-space distance to the decision "
        "boundary; time: training time per epoch relative to vanilla (median over "
        "interleaved timing rounds).",
    ]
    return "\n".join(lines)


def plots(results: Sequence[RunResult], summary: dict[str, Any], out: str) -> list[str]:
    """Draw the comparison's PNG plots into the folder ``out``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = {}
    for r in results:
        first.setdefault(r.regularizer, r)
    layers = _layers(summary)
    paths = []

    fig, axes = plt.subplots(
        1, len(layers), figsize=(4 * len(layers), 3.2), squeeze=False
    )
    for ax, layer in zip(axes[0], layers, strict=True):
        for name, r in first.items():
            ax.plot(
                range(1, len(r.singular_values[layer]) + 1),
                r.singular_values[layer],
                label=name,
            )
        ax.set(title=layer, xlabel="index", ylabel="singular value", yscale="log")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(
        "Singular values of each weight matrix (seed 0), as Yoshida & Miyato Fig. 4"
    )
    paths.append(_save(fig, out, "singular_spectra.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    finite = [m for r in first.values() for m in r.input_margins if math.isfinite(m)]
    if finite:
        bins = list(_linspace(min(finite), max(finite), 40))
        for name, r in first.items():
            ax.hist(
                [m for m in r.input_margins if math.isfinite(m)],
                bins=bins,
                histtype="step",
                label=name,
            )
    ax.axvline(0.0, color="k", lw=0.5)
    ax.set(
        title="Input margins on the test set (seed 0; < 0: misclassified)",
        xlabel="first-order distance to the decision boundary",
        ylabel="samples",
    )
    ax.legend(fontsize=7)
    paths.append(_save(fig, out, "input_margins.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, (name, r) in enumerate(first.items()):
        color = f"C{i % 10}"
        epochs = range(1, len(r.history["test_acc"]) + 1)
        ax.plot(epochs, r.history["test_acc"], color=color, label=name)
        ax.plot(epochs, r.history["train_acc"], color=color, ls="--", lw=0.8)
    ax.set(
        title="Accuracy (seed 0): test solid, train dashed",
        xlabel="epoch",
        ylabel="accuracy",
    )
    ax.legend(fontsize=7)
    paths.append(_save(fig, out, "accuracy_curves.png"))
    return paths


def _linspace(lo: float, hi: float, n: int):
    if hi <= lo:
        hi = lo + 1.0
    return (lo + (hi - lo) * i / n for i in range(n + 1))


def _save(fig, out: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def provenance() -> dict[str, Any]:
    """The code and machine a run came from: library version, git commit, JAX, CPU.

    ``git_commit`` is the checkout's ``HEAD`` when the package runs from a git work
    tree (``None`` for an installed wheel), with ``+dirty`` when it has uncommitted
    changes.
    """
    return {
        "margin_regs_version": mr.__version__,
        "git_commit": _git_commit(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "jax_version": jax.__version__,
    }


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=here, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) if commit else None


def write(
    out: str,
    settings: dict[str, Any],
    config: TrainConfig,
    results: Sequence[RunResult],
    summary: dict[str, dict[str, Any]],
    seconds: float,
) -> list[str]:
    """Write ``results.json`` and the plots of a comparison into ``out``.

    Args:
      out: an existing folder.
      settings: what the data and the comparison were (data set, sizes, seeds).
      config: the shared schedule.
      results: every run.
      summary: :func:`summarize` of ``results``.
      seconds: the comparison's wall time.

    Returns:
      The paths written, ``results.json`` first.
    """
    from margin_regs.experiments.recipes import RECIPES

    payload = {
        "config": {**settings, **dataclasses.asdict(config)},
        "machine": {**provenance(), "seconds_total": seconds},
        "regularizers": {
            n: {
                "description": RECIPES[n].description,
                "reference": RECIPES[n].reference,
                "coeff_name": RECIPES[n].coeff_name,
                "coeff": summary[n]["coeff"],
            }
            for n in summary
        },
        "summary": summary,
        "runs": [
            {k: v for k, v in dataclasses.asdict(r).items() if k != "params"}
            for r in results
        ],
    }
    path = os.path.join(out, "results.json")
    with open(path, "w") as f:
        json.dump(jsonable(payload), f, allow_nan=False)
    return [path, *plots(results, summary, out)]
