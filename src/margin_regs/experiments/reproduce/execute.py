"""Running a :class:`~.protocols.Protocol`: data, every cell, the verdicts; a time
estimate before it starts."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from margin_regs.experiments import data
from margin_regs.experiments.reproduce.protocols import Protocol, Setting
from margin_regs.experiments.reproduce.runner import CONV_MODELS, downsample, train_cell
from margin_regs.experiments.reproduce.verdicts import judge

__all__ = ["estimate_seconds", "run_protocol"]

# Rough costs on an idle 2-core CPU, measured once per model with plain SGD: ms per
# sample and training step (convolutional models at 14×14), and seconds to compile
# one program. Only for the estimate printed before a run.
_MS_PER_SAMPLE = {
    "cnn": 0.12,
    "cnn3": 0.18,
    "adareg_cnn": 0.05,
    "mlp1": 0.006,
    "mlp": 0.01,
    "mlp3": 0.014,
    "keras_mlp": 0.03,
}
_COMPILE_S = {"conv": 6.0, "dense": 3.0}


def _method_factor(description: str) -> float:
    """How much more a step costs than plain SGD (double backprop, two passes)."""
    if "LM" in description:
        return 3.0
    if "Eigenvalue Decay, seed" in description:
        return 1.5
    return 1.0


def estimate_seconds(protocol: Protocol) -> float:
    """Seconds the protocol should take on an idle 2-core CPU (compilation included).

    Example:
      >>> from margin_regs.experiments.reproduce.execute import estimate_seconds
      >>> from margin_regs.experiments.reproduce.protocols import PROTOCOLS
      >>> 0 < estimate_seconds(PROTOCOLS["ludwig-table2"](True)) < 60
      True
    """
    total, programs = 0.0, set()
    for setting in protocol.settings:
        n = setting.train_size
        for cell in setting.cells:
            config = cell.config
            batch = min(config.batch_size, n)
            steps = (n // batch) * config.epochs
            runs = len(cell.coeffs) * protocol.seeds
            per_sample = _MS_PER_SAMPLE[config.model] / 1000
            factor = _method_factor(cell.recipe.description)
            train = runs * steps * batch * per_sample * factor
            measured = (n + 1400) * (config.epochs if setting.curves else 1)
            kind = "conv" if config.model in CONV_MODELS else "dense"
            total += train + runs * measured * per_sample / 3
            programs.add((cell.recipe, config, n, kind))
    return total + sum(_COMPILE_S[kind] for *_, kind in programs)


@functools.cache
def _digits(mnist: str | None) -> data.Dataset:
    return data.load_mnist5k() if mnist is None else data.load_mnist_idx(mnist)


def _splits(setting: Setting, seeds: int, mnist: str | None) -> list[data.Dataset]:
    pooled = downsample(_digits(mnist), setting.downsample)
    try:
        return [
            data.prepare(pooled, train_size=setting.train_size, seed=s)
            for s in range(seeds)
        ]
    except ValueError as e:
        raise ValueError(
            f"{setting.name}: {e}; the 'paper' budget's sizes need the full MNIST "
            "(--mnist DIR with its four IDX files)"
        ) from None


def _commit() -> str | None:
    """The source tree's git commit (``+dirty`` with uncommitted changes), if any."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        run = functools.partial(
            subprocess.run, cwd=here, capture_output=True, text=True, timeout=10
        )
        head = run(["git", "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = run(["git", "status", "--porcelain", "--", "."]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def _convergence(protocol: Protocol, results: dict) -> dict[str, dict[str, Any]]:
    """Per setting: the baseline's mean final training accuracy and loss, and whether
    it reached the paper's regime (``protocol.min_train_acc``)."""
    out = {}
    for setting in protocol.settings:
        base = results[setting.name][setting.baseline]
        acc = float(np.mean(base["train_acc"]))
        out[setting.name] = {
            "baseline": setting.baseline,
            "train_acc": acc,
            "train_loss": float(np.mean(base["train_loss"])),
            "threshold": protocol.min_train_acc,
            "in_regime": bool(acc >= protocol.min_train_acc),
        }
    return out


def _preconditions(protocol: Protocol, results: dict) -> list[dict[str, Any]]:
    """Each precondition with its measured value and whether it holds."""
    out = []
    for p in protocol.preconditions:
        a = np.mean(results[p.cell_a][p.method][p.metric])
        b = np.mean(results[p.cell_b][p.method][p.metric])
        out.append(
            {
                "text": p.text,
                "measured": float(a - b),
                "minimum": p.minimum,
                "met": bool(a - b >= p.minimum),
            }
        )
    return out


def untestable_cells(
    claim_cells: Sequence[str], convergence: dict, preconditions: list[dict]
) -> dict[str, str]:
    """``{cell: why}`` for the cells of a claim that are not testable here.

    A derived cell (``"small → large"``) is untestable when any setting is.
    """
    failed = [p for p in preconditions if not p["met"]]
    out = {}
    for cell in claim_cells:
        why = []
        for p in failed:
            why.append(
                f"precondition failed: {p['text']}; measured "
                f"{100 * p['measured']:+.2f} points"
            )
        settings = [cell] if cell in convergence else list(convergence)
        for s in settings:
            c = convergence[s]
            if not c["in_regime"]:
                why.append(
                    f"{s}: baseline {c['baseline']} reached {100 * c['train_acc']:.2f}% "
                    f"training accuracy < {100 * c['threshold']:.0f}%"
                )
        if why:
            out[cell] = "; ".join(why)
    return out


def _train_setting(protocol: Protocol, setting: Setting, log, start, mnist) -> dict:
    splits = _splits(setting, protocol.seeds, mnist)
    out = {}
    for cell in setting.cells:
        r = train_cell(cell, splits, curves=setting.curves)
        out[cell.method] = r.at_selected() | {
            "coeff": float(r.coeffs[r.selected]),
            "grid": r.coeffs.tolist(),
            "grid_val_acc": np.mean(r.acc["val_acc"], axis=1).tolist(),
            "grid_train_acc": np.mean(r.acc["train_acc"], axis=1).tolist(),
            "seconds": r.seconds,
            "cpu_seconds": r.cpu_seconds,
        }
        if log:
            m = out[cell.method]
            print(
                f"  {protocol.name}: {setting.name} {cell.method}: test "
                f"{100 * np.mean(m['test_acc']):.2f}%, train "
                f"{100 * np.mean(m['train_acc']):.2f}% ({r.seconds:.0f} s; "
                f"{time.perf_counter() - start:.0f} s so far)",
                file=sys.stderr,
                flush=True,
            )
    return out


def run_protocol(
    protocol: Protocol, *, log: bool = True, mnist: str | None = None
) -> dict[str, Any]:
    """Train every cell of a protocol and judge its claims.

    A setting whose baseline did not reach the paper's training regime, and every
    claim when a precondition fails, is judged "not testable here".

    Args:
      protocol: what to run.
      log: print one line per trained cell to stderr.
      mnist: a folder with the full MNIST's IDX files (default: ``mnist5k``).

    Returns:
      A JSON-ready dict: ``results[cell][method]`` (per-seed measurements at the
      selected coefficient, the coefficient, the grid's validation accuracies),
      ``convergence``, ``preconditions``, ``judgements``, ``seconds`` and the load.
    """
    start, load_start, commit = time.perf_counter(), list(os.getloadavg()), _commit()
    cpu_start = time.process_time()
    results = {
        s.name: _train_setting(protocol, s, log, start, mnist)
        for s in protocol.settings
    }
    convergence = _convergence(protocol, results)
    if protocol.derive is not None:
        results = protocol.derive(results)
    preconditions = _preconditions(protocol, results)
    judgements = [
        judge(c, results, untestable_cells(c.cells, convergence, preconditions))
        for c in protocol.claims
    ]
    return {
        "name": protocol.name,
        "title": protocol.title,
        "budget": protocol.budget,
        "seeds": protocol.seeds,
        "scaling": list(protocol.scaling),
        "coefficients": protocol.coefficients,
        "paper_note": protocol.paper_note,
        "metrics": [list(m) for m in protocol.metrics],
        "labels": protocol.labels,
        "paper": [
            {"cell": c, "method": m, "metric": k, "value": v}
            for (c, m, k), v in protocol.paper.items()
        ],
        "results": results,
        "convergence": convergence,
        "preconditions": preconditions,
        "judgements": [j.as_dict() for j in judgements],
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "estimate_seconds": estimate_seconds(protocol),
        "commit": commit,
        "data": "mnist5k" if mnist is None else f"MNIST IDX files in {mnist}",
        "load_average_start": load_start,
        "load_average_end": list(os.getloadavg()),
        "cpus": os.cpu_count(),
    }
