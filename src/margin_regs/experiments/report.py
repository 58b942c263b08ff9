"""What a comparison reports: per-regularizer summaries, the table, ``results.json``."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
import textwrap
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

import margin_regs as mr
from margin_regs.experiments import stats
from margin_regs.experiments.training import RunResult, TrainConfig

__all__ = [
    "SIGMA_DEFINITIONS",
    "add_differences",
    "build_payload",
    "format_table",
    "grid_edge",
    "render",
    "summarize",
    "write",
]

SIGMA_DEFINITIONS = {
    "matrix": "σ: reshaped kernel (Yoshida & Miyato), a conv kernel taken as its "
    "(kh·kw·in, out) matrix",
    "operator": "σ: conv operator norm, each conv taken as the linear map x ↦ "
    "conv(x, K) on its input (mr.ConvOperator)",
}
"""The table's note on what σ of a conv kernel is, by ``sigma_definition``."""


def summarize(
    results: Sequence[RunResult], epoch_seconds: dict[str, float] | None = None
) -> dict[str, dict[str, Any]]:
    """Per-regularizer means over seeds, in the order the results come.

    Fields: test accuracy mean and (population) std, final train accuracy, ``gap``
    (train − test), Yoshida & Miyato's ``yoshida_gap`` at one threshold for all
    (:func:`~margin_regs.experiments.stats.gap_threshold`), ``sigma_max`` and
    ``stable_rank`` per layer, median output and input margins, seconds per epoch and
    ``relative_time`` to ``vanilla``.

    Args:
      results: the runs, any regularizers and seeds.
      epoch_seconds: ``{regularizer: seconds per run and epoch}`` for
        ``relative_time``; by default the runs' CPU time on the CPU backend (wall
        time on a shared machine mostly measures other processes), else wall time.

    Example:
      >>> from margin_regs.experiments.data import load_digits, prepare
      >>> from margin_regs.experiments.report import summarize
      >>> from margin_regs.experiments.training import TrainConfig, run
      >>> ds = prepare(load_digits(), train_size=64)
      >>> s = summarize([run("vanilla", ds, seed=s, config=TrainConfig(epochs=2)) for s in (0, 1)])
      >>> s["vanilla"]["seeds"], s["vanilla"]["relative_time"]
      (2, 1.0)
    """
    threshold = stats.gap_threshold([r.history["test_acc"] for r in results])
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        groups.setdefault(r.regularizer, []).append(r)
    out = {name: _group(runs, threshold) for name, runs in groups.items()}
    cpu = jax.default_backend() == "cpu"
    clock = "cpu_seconds_per_epoch" if cpu else "seconds_per_epoch"
    if epoch_seconds is not None:
        clock = "given_seconds_per_epoch"
        for name, s in out.items():
            s[clock] = epoch_seconds[name]
    base = out.get("vanilla", {}).get(clock)
    for s in out.values():
        s["relative_time"] = s[clock] / base if base else None
        s["relative_time_clock"] = clock
    return out


def _group(runs: Sequence[RunResult], threshold: float) -> dict[str, Any]:
    """The summary fields of one regularizer's runs (one per seed)."""

    def mean(values) -> float:
        return float(np.mean(list(values)))

    test = np.array([r.final["test_acc"] for r in runs])
    train = np.array([r.final["train_acc"] for r in runs])
    gaps = [
        mr.generalization_gap(r.history["train_acc"], r.history["test_acc"], threshold)
        for r in runs
    ]
    layers = runs[0].final["sigma_max"]
    return {
        "coeff": runs[0].coeff,
        "seeds": len(runs),
        "test_acc_mean": float(test.mean()),
        "test_acc_std": float(test.std()),
        "train_acc": float(train.mean()),
        "gap": float((train - test).mean()),
        "yoshida_gap": None if np.all(np.isnan(gaps)) else float(np.nanmean(gaps)),
        "yoshida_threshold": threshold,
        "sigma_definition": runs[0].final.get("sigma_definition", "matrix"),
        "sigma_max": {k: mean(r.final["sigma_max"][k] for r in runs) for k in layers},
        "stable_rank": {
            k: mean(r.final["stable_rank"][k] for r in runs) for k in layers
        },
        "median_output_margin": mean(np.median(r.output_margins) for r in runs),
        "median_input_margin": mean(np.median(r.input_margins) for r in runs),
        "seconds_per_epoch": mean(r.seconds_per_epoch for r in runs),
        "cpu_seconds_per_epoch": mean(r.cpu_seconds_per_epoch for r in runs),
        "stopped_epoch": mean(r.early_stopping["stopped_epoch"] for r in runs),
    }


def add_differences(
    summary: dict[str, dict[str, Any]], test_acc: dict[str, Sequence[float]]
) -> None:
    """Add ``summary[name]["diff"] = {mean, low, high, n, excludes_zero}`` in place:
    :func:`~margin_regs.experiments.stats.paired_difference` of each regularizer's
    per-seed test accuracies to vanilla's (none without vanilla)."""
    for name, accs in test_acc.items():
        if name != "vanilla" and "vanilla" in test_acc:
            d = stats.paired_difference(accs, test_acc["vanilla"])
            summary[name]["diff"] = {**d._asdict(), "excludes_zero": d.excludes_zero}


def grid_edge(coeffs: Sequence[float], index: int) -> str | None:
    """``"lowest"``/``"highest"`` when ``coeffs[index]`` is an end of its grid.

    A coefficient selected at an end may be beaten by one beyond it; ``None`` for
    an interior value or a grid of fewer than three values.

    Example:
      >>> from margin_regs.experiments.report import grid_edge
      >>> grid_edge([0.1, 0.01, 1.0], 1), grid_edge([0.1, 0.01, 1.0], 0)
      ('lowest', None)
    """
    values = np.asarray(coeffs, float)
    if len(values) < 3 or np.isnan(values).any():
        return None
    if values[index] == values.min():
        return "lowest"
    return "highest" if values[index] == values.max() else None


def layer_order(layers: Sequence[str]) -> list[str]:
    """Kernel paths input side first (the models name them in module order)."""
    return sorted(layers, key=lambda k: (k.startswith("classifier"), k))


def _row(name: str, s: dict[str, Any], layers: list[str]) -> list[str]:
    """One regularizer's cells: percentages and differences in points."""
    edge = {"lowest": " (min)", "highest": " (max)"}.get(s.get("coeff_edge"), "")
    acc = f"{100 * s['test_acc_mean']:.1f}"
    if s["seeds"] > 1:
        acc += f" ± {100 * s['test_acc_std']:.1f}"
    d = s.get("diff")
    diff = "-" if d is None else f"{100 * d['mean']:+.1f}"
    if d is not None and d["low"] is not None:
        diff += f" [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
        diff += "*" if d["excludes_zero"] else ""
    gap = s["yoshida_gap"]
    seconds = s.get(s.get("relative_time_clock", ""), s["seconds_per_epoch"])
    return [
        name,
        "-" if s["coeff"] is None else f"{s['coeff']:g}{edge}",
        acc,
        diff,
        "n/a" if gap is None or not math.isfinite(gap) else f"{100 * gap:.1f}",
        "/".join(f"{s['sigma_max'][k]:.2f}" for k in layers),
        "/".join(f"{s['stable_rank'][k]:.2f}" for k in layers),
        f"{s['median_output_margin']:.2f}",
        f"{s['median_input_margin']:.3f}",
        f"{1000 * seconds:.2f}",
    ]


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """The comparison as a fixed-width text table (one row per regularizer).

    Example:
      >>> from margin_regs.experiments.report import format_table
      >>> row = dict(test_acc_mean=0.9, test_acc_std=0.01, yoshida_gap=0.05,
      ...            yoshida_threshold=0.8, sigma_max={"a/kernel": 2.0}, seeds=3,
      ...            stable_rank={"a/kernel": 3.0}, median_output_margin=1.5,
      ...            median_input_margin=0.2, seconds_per_epoch=0.01, coeff=None)
      >>> print(format_table({"vanilla": row}))  # doctest: +NORMALIZE_WHITESPACE
      regularizer  coeff  test acc %  Δ vs vanilla  gap %  σ_max a  srank a  out margin  in margin  ms/epoch
      vanilla      -      90.0 ± 1.0  -             5.0    2.00     3.00     1.50        0.200      10.00
      <BLANKLINE>
      coeff: ...
    """
    first = next(iter(summary.values()))
    layers = layer_order(first["sigma_max"])
    short = "/".join(k.removesuffix("/kernel") for k in layers)
    # Results written before the field existed measured reshaped kernels.
    definition = first.get("sigma_definition", "matrix")
    tag = " (conv op)" if definition == "operator" else ""
    head = ["regularizer", "coeff", "test acc %", "Δ vs vanilla", "gap %"]
    head += [f"σ_max{tag} {short}", f"srank{tag} {short}", "out margin", "in margin"]
    rows = [[*head, "ms/epoch"]] + [_row(n, s, layers) for n, s in summary.items()]
    widths = [max(map(len, column)) for column in zip(*rows, strict=True)]
    lines = ["  ".join(map(str.ljust, r, widths)).rstrip() for r in rows]
    return "\n".join([*lines, "", *_footnote(summary, short, definition)])


def _footnote(summary: dict[str, Any], short: str, definition: str) -> list[str]:
    """The table's note, wrapped to 88 columns."""
    first = next(iter(summary.values()))
    seeds, threshold = first["seeds"], first["yoshida_threshold"]
    spread = (
        f"mean ± std over {seeds} seeds; Δ vs vanilla: mean paired difference in test "
        "accuracy (points) with its 95% t-interval over seeds, * where it excludes 0"
        if seeds > 1
        else "one seed: no spread, no interval"
    )
    edge = (
        "; (min)/(max): the lowest/highest value of its grid, so a better one may lie "
        "beyond it (widen the grid with --coeff)"
        if any(s.get("coeff_edge") for s in summary.values())
        else ""
    )
    notes = [
        "coeff: selected by the best mean validation accuracy over the grid (never "
        f"the test set){edge}.",
        f"test acc: {spread}.",
        f"gap: Yoshida & Miyato's generalization gap at α = {100 * threshold:.1f}% "
        "test accuracy.",
        f"σ_max, srank: top singular value and stable rank of each layer ({short}).",
        f"{SIGMA_DEFINITIONS[definition]}.",
        "out margin: median logit margin z_y − max z_j on the test set (logits); in "
        "margin: median first-order l2 distance to the decision boundary in input "
        "space (input units).",
        "ms/epoch: training milliseconds per epoch and run, the runs of a "
        "regularizer batched in one program (a larger grid shares more of each "
        "step's cost; margin-regs bench measures step overheads).",
    ]
    return [line for note in notes for line in textwrap.wrap(note, 88)]


def render(payload: dict[str, Any]) -> str:
    """The headline (data, schedule, wall time, code version) and the table."""
    c, m = payload["config"], payload["machine"]
    commit = (m.get("git_commit") or "no git commit")[:12]
    state = " (PARTIAL: interrupted)" if payload.get("partial") else ""
    return (
        f"{c['dataset_name']}: {c['train_size']} training samples, "
        f"{c['val_size']} validation, {c['test_size']} test, model {c['model']}, "
        f"{c['epochs']} epoch(s), batch {c['batch_size']}, {c['seeds']} seed(s); "
        f"{m['seconds_total']:.0f} s on {m['jax_backend']} ({m['cpu_count']} CPUs); "
        f"margin_regs {m['margin_regs_version']} ({commit}){state}\n"
        + format_table(payload["summary"])
    )


def _git_commit() -> str | None:
    """The checkout's ``HEAD`` (``+dirty`` with uncommitted changes); ``None`` for
    an installed wheel."""
    try:
        described = subprocess.run(
            [
                "git",
                "describe",
                "--always",
                "--abbrev=40",
                "--dirty=+dirty",
                "--exclude=*",
            ],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return described.stdout.strip() or None


def build_payload(
    settings: dict[str, Any],
    config: TrainConfig,
    grids: dict[str, Any],
    results: Sequence[RunResult],
    summary: dict[str, dict[str, Any]],
    seconds: float,
    *,
    partial: bool = False,
) -> dict[str, Any]:
    """The ``results.json`` of a comparison: ``settings`` (data, sizes, seeds) and
    ``config``, the machine, each finished regularizer's ``GridRun`` in ``grids``,
    ``summary`` and the ``results`` at the selected coefficients; ``partial`` marks
    an interrupted comparison."""
    from margin_regs.experiments.recipes import RECIPES

    regularizers = {
        name: {
            "description": RECIPES[name].description,
            "reference": RECIPES[name].reference,
            "coeff_name": RECIPES[name].coeff_name,
            "paper_coeff": RECIPES[name].coeff,
            "grid": [None if np.isnan(c) else float(c) for c in grid.coeffs],
            "selected_coeff": summary[name]["coeff"],
            "selected_at_edge": summary[name].get("coeff_edge"),
            "seeds": grid.seeds.tolist(),
            "val_acc": grid.val_acc.tolist(),
            "test_acc": grid.test_acc.tolist(),
            "seconds_per_run_epoch": grid.seconds_per_run_epoch(),
        }
        for name, grid in grids.items()
    }
    machine = {
        "margin_regs_version": mr.__version__,
        "git_commit": _git_commit(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "seconds_total": seconds,
    }
    return {
        "partial": partial,
        "config": {**settings, **dataclasses.asdict(config)},
        "machine": machine,
        "regularizers": regularizers,
        "summary": summary,
        "runs": [
            {k: v for k, v in dataclasses.asdict(r).items() if k != "params"}
            for r in results
        ],
    }


def _jsonable(value: Any) -> Any:
    """Non-finite floats become ``None`` (strict JSON has no inf or NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def write(out: str, payload: dict[str, Any]) -> list[str]:
    """Write ``results.json`` and the plots into the folder ``out``; their paths."""
    from margin_regs.experiments.plots import plots

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.json")
    with open(path, "w") as f:
        json.dump(_jsonable(payload), f, allow_nan=False)
    return [path, *plots(payload, out)]
