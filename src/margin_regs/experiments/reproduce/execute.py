"""Running a :class:`~.protocols.Protocol`: data, every cell, the verdicts; a time
estimate before it starts."""

from __future__ import annotations

import dataclasses
import functools
import json
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

# Wall µs per sample and training step on an idle 2-core CPU (convolutional models
# at 14×14 with their runs in flight three at once, batch 32 or 256). Dense models: a
# base cost times (1 + 32 / batch), small batches using the cores less well.
# Calibrated on every cell of a full ``reproduce all --budget cpu`` run on idle cores
# (39.4 min; docs/reproductions.md). Only for the estimate printed before a run; the
# JSON records the wall and CPU time beside it.
_US_PER_SAMPLE = {
    "mlp1": 11.0,
    "mlp": 16.5,
    "mlp3": 26.0,
    "keras_mlp": 27.5,
    "cnn": 54.0,
    "cnn3": 66.0,
    "adareg_cnn": 34.0,
}
_COMPILE_S = {"conv": 8.0, "dense": 5.0}


def _method_factor(description: str) -> float:
    """How much more a step costs than plain SGD (double backprop, two passes)."""
    for marker, factor in (("LM", 2.1), ("Eigenvalue Decay, seed", 1.5),
                           ("adversarial", 1.6)):  # fmt: skip
        if marker in description:
            return factor
    return 1.0


def estimate_seconds(protocol: Protocol) -> float:
    """Seconds the protocol should take on an idle 2-core CPU (compilation included).

    Example:
      >>> from margin_regs.experiments.reproduce.execute import estimate_seconds
      >>> from margin_regs.experiments.reproduce.protocols import PROTOCOLS
      >>> 0 < estimate_seconds(PROTOCOLS["ludwig-table2"]("quick")) < 60
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
            kind = "conv" if config.model in CONV_MODELS else "dense"
            per_sample = _US_PER_SAMPLE[config.model] * 1e-6
            if kind == "dense":
                per_sample *= 1 + 32 / batch
            factor = _method_factor(cell.recipe.description)
            total += runs * steps * batch * per_sample * factor
            # Measuring: a forward pass over train, val and test (half a step's cost
            # a sample: chunked, one program per epoch).
            measured = (n + 1400) * (config.epochs if setting.curves else 1)
            total += runs * measured * per_sample / 2
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


def _train_cells(protocol: Protocol, state: dict, log, mnist, checkpoint) -> None:
    """Train every cell not yet in ``state["results"]`` (a checkpoint's), saving
    ``state`` to ``checkpoint`` after each one."""
    start = time.perf_counter()
    for setting in protocol.settings:
        done = state["results"].setdefault(setting.name, {})
        if all(c.method in done for c in setting.cells):
            continue
        splits = _splits(setting, protocol.seeds, mnist)
        for cell in setting.cells:
            if cell.method in done:
                continue
            r = train_cell(cell, splits, curves=setting.curves)
            done[cell.method] = r.at_selected() | {
                "coeff": float(r.coeffs[r.selected]),
                "grid": r.coeffs.tolist(),
                "grid_val_acc": np.mean(r.acc["val_acc"], axis=1).tolist(),
                "grid_train_acc": np.mean(r.acc["train_acc"], axis=1).tolist(),
                "seconds": r.seconds,
                "cpu_seconds": r.cpu_seconds,
                "load_average": list(os.getloadavg()),
            }
            if checkpoint is not None:
                with open(checkpoint, "w") as f:
                    json.dump(state, f, allow_nan=True)
            if log:
                m = done[cell.method]
                print(
                    f"  {protocol.name}: {setting.name} {cell.method}: test "
                    f"{100 * np.mean(m['test_acc']):.2f}%, train "
                    f"{100 * np.mean(m['train_acc']):.2f}% ({r.seconds:.0f} s, "
                    f"load {os.getloadavg()[0]:.1f}; "
                    f"{time.perf_counter() - start:.0f} s so far)",
                    file=sys.stderr,
                    flush=True,
                )


def _restrict(protocol: Protocol, results: dict) -> Protocol:
    """The protocol cut to what a partial run trained: the settings whose baseline
    trained, their trained cells, the claims whose two methods trained there (and
    derived cells only when every setting is complete)."""
    settings = []
    for s in protocol.settings:
        done = results.get(s.name, {})
        if s.baseline in done:
            cells = tuple(c for c in s.cells if c.method in done)
            settings.append(dataclasses.replace(s, cells=cells))
    if settings == list(protocol.settings):
        return protocol
    trained = {s.name: {c.method for c in s.cells} for s in settings}
    claims = []
    for c in protocol.claims:
        kept = tuple(x for x in c.cells if {c.better, c.worse} <= trained.get(x, set()))
        if kept and all(c.metric in results[x][c.better] for x in kept):
            claims.append(dataclasses.replace(c, cells=kept))
    return dataclasses.replace(
        protocol,
        settings=tuple(settings),
        claims=tuple(claims),
        preconditions=(),
        derive=None,
        diagnostics=None,
    )


def _initial_state(protocol: Protocol, checkpoint: str | None) -> dict[str, Any]:
    """The checkpoint's trained cells where it holds this protocol and budget; else
    an empty state stamped with the load and commit at the start."""
    load_start, commit = list(os.getloadavg()), _commit()
    state = {"name": protocol.name, "budget": protocol.budget, "results": {},
             "load_average_start": load_start, "commit": commit}  # fmt: skip
    if checkpoint is not None and os.path.exists(checkpoint):
        with open(checkpoint) as f:
            saved = json.load(f)
        if (saved["name"], saved["budget"]) == (protocol.name, protocol.budget):
            state = saved
    return state


def run_protocol(
    protocol: Protocol,
    *,
    log: bool = True,
    mnist: str | None = None,
    checkpoint: str | None = None,
    train: bool = True,
) -> dict[str, Any]:
    """Train every cell of a protocol and judge its claims.

    A setting whose baseline did not reach the paper's training regime, and every
    claim when a precondition fails, is judged "not testable here".

    Args:
      protocol: what to run.
      log: print one line per trained cell to stderr.
      mnist: a folder with the full MNIST's IDX files (default: ``mnist5k``).
      checkpoint: a JSON file: the cells it holds (same protocol and budget) are
        not trained again, and every trained cell is saved to it.
      train: ``False``: train nothing, judge the checkpoint's complete settings
        (a partial run: ``"missing"`` lists the rest).

    Returns:
      A JSON-ready dict: ``results[cell][method]`` (per-seed measurements at the
      selected coefficient, the coefficient, the grid's validation accuracies),
      ``convergence``, ``preconditions``, ``judgements``, ``seconds`` and the load.
    """
    state = _initial_state(protocol, checkpoint)
    if train:
        _train_cells(protocol, state, log, mnist, checkpoint)
    full = protocol
    protocol = _restrict(protocol, state["results"])
    results = {s.name: state["results"][s.name] for s in protocol.settings}
    convergence = _convergence(protocol, results)
    diagnostics = {}
    if protocol.diagnostics is not None and train:
        first = protocol.settings[0]
        diagnostics = protocol.diagnostics(_splits(first, 1, mnist)[0])
    if protocol.derive is not None:
        results = protocol.derive(results)
    preconditions = _preconditions(protocol, results)
    judgements = [
        judge(c, results, untestable_cells(c.cells, convergence, preconditions))
        for c in protocol.claims
    ]
    # Summed over the cells, so that a resumed run counts every cell once.
    cells = [m for s in state["results"].values() for m in s.values()]
    seconds = sum(m["seconds"] for m in cells)
    cpu_seconds = sum(m.get("cpu_seconds", float("nan")) for m in cells)
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
        "missing": [
            f"{s.name} {c.method}"
            for s in full.settings
            for c in s.cells
            if c.method not in results.get(s.name, {})
        ],
        "convergence": convergence,
        "preconditions": preconditions,
        "diagnostics": diagnostics,
        "judgements": [j.as_dict() for j in judgements],
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "estimate_seconds": estimate_seconds(full),
        "commit": state.get("commit") or _commit(),
        "data": "mnist5k" if mnist is None else f"MNIST IDX files in {mnist}",
        "load_average_start": state.get("load_average_start", list(os.getloadavg())),
        "load_average_end": list(os.getloadavg()),
        "cpus": os.cpu_count(),
    }
