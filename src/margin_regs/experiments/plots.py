"""The comparison's figures, drawn from its ``results.json`` payload.

Curves and spectra are the mean over seeds with a band (± one standard deviation),
margins are empirical CDFs pooled over seeds (overlaid histograms of seven methods
are unreadable), each figure has one legend, and margin axes carry their units.
Everything comes from the payload, so ``margin-regs report`` redraws a saved run.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

__all__ = ["plots"]


def plots(payload: dict[str, Any], out: str) -> list[str]:
    """Draw every figure of a comparison into the folder ``out``.

    Args:
      payload: the ``results.json`` dict (:func:`~margin_regs.experiments.report.build_payload`).
      out: an existing folder.

    Returns:
      The PNG paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    runs: dict[str, list[dict[str, Any]]] = {}
    for run in payload["runs"]:
        runs.setdefault(run["regularizer"], []).append(run)
    if not runs:
        return []
    return [
        _curves(runs, out),
        _spectra(runs, out),
        _margins(runs, out),
        _coefficients(payload["regularizers"], out),
    ]


def _colors(runs) -> dict[str, str]:
    """One color per regularizer; vanilla black, drawn dashed-free under the others."""
    others = [n for n in runs if n != "vanilla"]
    return {"vanilla": "k"} | {n: f"C{i % 10}" for i, n in enumerate(others)}


def _band(ax, x, values: np.ndarray, color: str, label: str | None, **style) -> None:
    mean, std = values.mean(0), values.std(0)
    if color == "k":  # vanilla, the reference: thicker, under the others
        style = {"lw": 2.2, "zorder": 1.5} | style
    ax.plot(x, mean, color=color, label=label, **style)
    if len(values) > 1:
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, lw=0)


def _ragged(series: list[list[float]]) -> np.ndarray:
    """Stack per-seed curves, cut to the shortest (early stopping shortens some)."""
    n = min(len(s) for s in series)
    return np.array([s[:n] for s in series], float)


def _curves(runs, out: str) -> str:
    import matplotlib.pyplot as plt

    paired = "vanilla" in runs and len(runs) > 1
    fig, axes = plt.subplots(
        1, 2 if paired else 1, figsize=(12, 4.2), squeeze=False, layout="constrained"
    )
    colors = _colors(runs)
    ax = axes[0][0]
    for name in ["vanilla"] if paired else runs:
        test = _ragged([r["history"]["test_acc"] for r in runs[name]])
        train = _ragged([r["history"]["train_acc"] for r in runs[name]])
        epochs = np.arange(1, test.shape[1] + 1)
        _band(ax, epochs, 100 * test, colors[name], name)
        _band(ax, epochs, 100 * train, colors[name], None, ls="--", lw=0.8)
    ax.set(
        title=("vanilla: " if paired else "") + "test (solid) and train (dashed)",
        xlabel="epoch",
        ylabel="accuracy %",
    )
    if paired:
        _differences(axes[0][1], runs, colors)
    fig.suptitle(
        "Accuracy over training at each selected coefficient (± std over seeds)"
    )
    fig.legend(loc="outside lower center", ncols=min(len(runs), 8), fontsize=8)
    return _save(fig, out, "accuracy_curves.png")


def _differences(ax, runs, colors) -> None:
    """Each regularizer's test accuracy minus vanilla's, seed by seed, in points."""
    vanilla = {r["seed"]: r["history"]["test_acc"] for r in runs["vanilla"]}
    for name, group in runs.items():
        if name == "vanilla":
            continue
        diffs = []
        for r in group:
            base = vanilla.get(r["seed"])
            if base is not None:
                n = min(len(base), len(r["history"]["test_acc"]))
                diffs.append(np.subtract(r["history"]["test_acc"][:n], base[:n]))
        if diffs:
            diff = 100 * _ragged([list(d) for d in diffs])
            _band(ax, np.arange(1, diff.shape[1] + 1), diff, colors[name], name)
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set(
        title="test accuracy − vanilla's (paired by seed)",
        xlabel="epoch",
        ylabel="difference, points",
    )


def _spectra(runs, out: str) -> str:
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    colors = _colors(runs)
    first = next(iter(runs.values()))[0]
    layers = sorted(
        first["singular_values"], key=lambda k: (k.startswith("classifier"), k)
    )
    fig, axes = plt.subplots(
        1,
        len(layers),
        figsize=(4 * len(layers) + 1.5, 3.4),
        squeeze=False,
        layout="constrained",
    )
    for ax, layer in zip(axes[0], layers, strict=True):
        for name, group in runs.items():
            values = _ragged([r["singular_values"][layer] for r in group])
            index = np.arange(1, values.shape[1] + 1)
            _band(ax, index, values, colors[name], name if ax is axes[0][0] else None)
        ax.set(title=layer, xlabel="index", ylabel="singular value", yscale="log")
        # Plain labels at 1 and 3 per decade (0.3, 1, 3), not 3×10⁻¹.
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 3.0)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    fig.suptitle(
        "Singular values of each weight matrix (mean ± std over seeds), "
        "as Yoshida & Miyato Fig. 4"
    )
    fig.legend(loc="outside right center", fontsize=8)
    return _save(fig, out, "singular_spectra.png")


def _margins(runs, out: str) -> str:
    import matplotlib.pyplot as plt

    colors = _colors(runs)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    kinds = (
        ("input_margins", "input margin: first-order l2 distance to the boundary "
         "(input units)"),
        ("output_margins", "output margin z_y − max z_j (logits)"),
    )  # fmt: skip
    for ax, (key, label) in zip(axes, kinds, strict=True):
        for name, group in runs.items():
            pooled = np.sort(
                [m for r in group for m in r[key] if m is not None and math.isfinite(m)]
            )
            if pooled.size:
                cdf = np.arange(1, pooled.size + 1) / pooled.size
                ax.step(pooled, cdf, where="post", color=colors[name],
                        lw=2.2 if name == "vanilla" else 1.2,
                        label=name if key == "input_margins" else None)  # fmt: skip
        ax.axvline(0.0, color="k", lw=0.5)
        ax.set(xlabel=label, ylabel="fraction of test samples ≤ x")
    fig.suptitle(
        "Empirical CDFs of the test-set margins, pooled over seeds "
        "(< 0: misclassified; further right: larger margins)"
    )
    fig.legend(loc="outside right center", fontsize=8)
    return _save(fig, out, "margins.png")


def _coefficients(regularizers: dict[str, Any], out: str) -> str:
    import matplotlib.pyplot as plt

    tuned = {
        n: r for n, r in regularizers.items() if len(r["grid"]) > 1 and r["grid"][0]
    }
    cols = max(1, min(3, len(tuned)))
    rows = max(1, math.ceil(len(tuned) / cols))
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols, 3 * rows + 0.8), squeeze=False,
        layout="constrained",
    )  # fmt: skip
    for ax in axes.flat[len(tuned) :]:
        ax.set_visible(False)
    for ax, (name, r) in zip(axes.flat, tuned.items(), strict=False):
        val = 100 * np.asarray(r["val_acc"], float)
        grid = np.asarray(r["grid"], float)
        ax.errorbar(grid, val.mean(1), yerr=val.std(1) if val.shape[1] > 1 else None,
                    marker="o", capsize=3, color="C0", label="validation (mean ± std)")  # fmt: skip
        ax.axvline(r["selected_coeff"], color="C3", ls=":", label="selected")
        ax.set(xscale="log", xlabel=r["coeff_name"], ylabel="val accuracy %")
        # One labelled tick per grid value: log axes' own minor labels overlap.
        ax.set_xticks(grid, [f"{g:g}" for g in grid], rotation=30)
        ax.minorticks_off()
        edge = _edge(r)
        ax.set_title(name + (f" (selected at the {edge} end)" if edge else ""),
                     color="C3" if edge else "k", fontsize=10)  # fmt: skip
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8)
    fig.suptitle(
        "Validation accuracy against the coefficient (selection on validation)"
    )
    return _save(fig, out, "coefficients.png")


def _edge(regularizer: dict[str, Any]) -> str | None:
    """``"low"``/``"high"`` when the selected coefficient is an end of its grid."""
    from margin_regs.experiments.report import grid_edge

    grid = regularizer["grid"]
    edge = grid_edge(grid, grid.index(regularizer["selected_coeff"]))
    return {"lowest": "low", "highest": "high"}.get(edge)


def _save(fig, out: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out, name)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
