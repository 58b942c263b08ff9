"""The comparison's figures, drawn from its ``results.json`` payload.

Curves and spectra are means over seeds with a ± one std band, margins empirical CDFs
pooled over seeds (overlaid histograms of seven methods are unreadable).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure

from margin_regs.experiments.report import grid_edge, layer_order

__all__ = ["plots"]


def plots(payload: dict[str, Any], out: str) -> list[str]:
    """Draw every figure of a comparison's ``payload`` into the existing folder
    ``out``; the PNG paths written."""
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
    """One color per regularizer; vanilla black."""
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
    paired = "vanilla" in runs and len(runs) > 1
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    axes = fig.subplots(1, 2 if paired else 1, squeeze=False)[0]
    colors = _colors(runs)
    for name in ["vanilla"] if paired else runs:
        for key, style in (("test_acc", {}), ("train_acc", {"ls": "--", "lw": 0.8})):
            curves = 100 * _ragged([r["history"][key] for r in runs[name]])
            epochs = np.arange(1, curves.shape[1] + 1)
            label = name if key == "test_acc" else None
            _band(axes[0], epochs, curves, colors[name], label, **style)
    axes[0].set(
        title=("vanilla: " if paired else "") + "test (solid) and train (dashed)",
        xlabel="epoch",
        ylabel="accuracy %",
    )
    if paired:
        _differences(axes[1], runs, colors)
    fig.suptitle(
        "Accuracy over training at each selected coefficient (± std over seeds)"
    )
    fig.legend(loc="outside lower center", ncols=min(len(runs), 8), fontsize=8)
    return _save(fig, out, "accuracy_curves.png")


def _differences(ax, runs, colors) -> None:
    """Each regularizer's test accuracy minus vanilla's, seed by seed, in points."""
    vanilla = {r["seed"]: r["history"]["test_acc"] for r in runs["vanilla"]}
    for name, group in runs.items():
        pairs = [
            (r["history"]["test_acc"], vanilla[r["seed"]])
            for r in group
            if r["seed"] in vanilla
        ]
        if name == "vanilla" or not pairs:
            continue
        n = min(min(len(ours), len(base)) for ours, base in pairs)
        diff = 100 * np.array([np.subtract(ours[:n], base[:n]) for ours, base in pairs])
        _band(ax, np.arange(1, n + 1), diff, colors[name], name)
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set(
        title="test accuracy − vanilla's (paired by seed)",
        xlabel="epoch",
        ylabel="difference, points",
    )


def _spectra(runs, out: str) -> str:
    colors = _colors(runs)
    layers = layer_order(next(iter(runs.values()))[0]["singular_values"])
    fig = Figure(figsize=(4 * len(layers) + 1.5, 3.4), layout="constrained")
    axes = fig.subplots(1, len(layers), squeeze=False)[0]
    for ax, layer in zip(axes, layers, strict=True):
        for name, group in runs.items():
            values = _ragged([r["singular_values"][layer] for r in group])
            index = np.arange(1, values.shape[1] + 1)
            _band(ax, index, values, colors[name], name if ax is axes[0] else None)
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
    colors = _colors(runs)
    fig = Figure(figsize=(12, 4), layout="constrained")
    kinds = {
        "input_margins": "input margin: first-order l2 distance to the boundary "
        "(input units)",
        "output_margins": "output margin z_y − max z_j (logits)",
    }
    for ax, (key, xlabel) in zip(fig.subplots(1, 2), kinds.items(), strict=True):
        for name, group in runs.items():
            pooled = np.array(
                [np.nan if m is None else m for r in group for m in r[key]]
            )
            pooled = np.sort(pooled[np.isfinite(pooled)])
            if pooled.size:
                cdf = np.arange(1, pooled.size + 1) / pooled.size
                lw = 2.2 if name == "vanilla" else 1.2
                label = name if key == "input_margins" else None
                ax.step(
                    pooled, cdf, where="post", color=colors[name], lw=lw, label=label
                )
        ax.axvline(0.0, color="k", lw=0.5)
        ax.set(xlabel=xlabel, ylabel="fraction of test samples ≤ x")
    fig.suptitle(
        "Empirical CDFs of the test-set margins, pooled over seeds "
        "(< 0: misclassified; further right: larger margins)"
    )
    fig.legend(loc="outside right center", fontsize=8)
    return _save(fig, out, "margins.png")


def _coefficients(regularizers: dict[str, Any], out: str) -> str:
    tuned = {
        n: r for n, r in regularizers.items() if len(r["grid"]) > 1 and r["grid"][0]
    }
    cols = max(1, min(3, len(tuned)))
    rows = max(1, math.ceil(len(tuned) / cols))
    fig = Figure(figsize=(4.2 * cols, 3 * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(tuned) :]:
        ax.set_visible(False)
    for ax, (name, r) in zip(axes, tuned.items(), strict=False):
        val, grid = 100 * np.asarray(r["val_acc"], float), np.asarray(r["grid"], float)
        mean, spread = val.mean(1), val.std(1) if val.shape[1] > 1 else None
        ax.errorbar(
            grid, mean, spread, marker="o", capsize=3, label="validation (mean ± std)"
        )
        ax.axvline(r["selected_coeff"], color="C3", ls=":", label="selected")
        ax.set(xscale="log", xlabel=r["coeff_name"], ylabel="val accuracy %")
        # One labelled tick per grid value: log axes' own minor labels overlap.
        ax.set_xticks(grid, [f"{g:g}" for g in grid], rotation=30)
        ax.minorticks_off()
        edge = grid_edge(r["grid"], r["grid"].index(r["selected_coeff"]))
        edge = {"lowest": "low", "highest": "high"}.get(edge)
        title = name + (f" (selected at the {edge} end)" if edge else "")
        ax.set_title(title, color="C3" if edge else "k", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8)
    fig.suptitle(
        "Validation accuracy against the coefficient (selection on validation)"
    )
    return _save(fig, out, "coefficients.png")


def _save(fig: Figure, out: str, name: str) -> str:
    path = os.path.join(out, name)
    fig.savefig(path, dpi=100)
    return path
