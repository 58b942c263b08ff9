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


def _band(ax, x, values: np.ndarray, color: str, label: str | None, **style) -> None:
    mean, std = values.mean(0), values.std(0)
    ax.plot(x, mean, color=color, label=label, **style)
    if len(values) > 1:
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, lw=0)


def _ragged(series: list[list[float]]) -> np.ndarray:
    """Stack per-seed curves, cut to the shortest (early stopping shortens some)."""
    n = min(len(s) for s in series)
    return np.array([s[:n] for s in series], float)


def _curves(runs, out: str) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4), layout="constrained")
    for i, (name, group) in enumerate(runs.items()):
        color = f"C{i % 10}"
        test = _ragged([r["history"]["test_acc"] for r in group])
        train = _ragged([r["history"]["train_acc"] for r in group])
        epochs = np.arange(1, test.shape[1] + 1)
        _band(ax, epochs, test, color, name)
        _band(ax, epochs, train, color, None, ls="--", lw=0.8)
    ax.set(
        title="Accuracy at the selected coefficient: test solid, train dashed "
        "(mean ± std over seeds)",
        xlabel="epoch",
        ylabel="accuracy",
    )
    fig.legend(loc="outside right center", fontsize=8)
    return _save(fig, out, "accuracy_curves.png")


def _spectra(runs, out: str) -> str:
    import matplotlib.pyplot as plt

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
        for i, (name, group) in enumerate(runs.items()):
            values = _ragged([r["singular_values"][layer] for r in group])
            index = np.arange(1, values.shape[1] + 1)
            _band(ax, index, values, f"C{i % 10}", name if ax is axes[0][0] else None)
        ax.set(title=layer, xlabel="index", ylabel="singular value", yscale="log")
    fig.suptitle(
        "Singular values of each weight matrix (mean ± std over seeds), "
        "as Yoshida & Miyato Fig. 4"
    )
    fig.legend(loc="outside right center", fontsize=8)
    return _save(fig, out, "singular_spectra.png")


def _margins(runs, out: str) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    kinds = (
        ("input_margins", "input margin: first-order l2 distance to the boundary "
         "(input units)"),
        ("output_margins", "output margin z_y − max z_j (logits)"),
    )  # fmt: skip
    for ax, (key, label) in zip(axes, kinds, strict=True):
        for i, (name, group) in enumerate(runs.items()):
            pooled = np.sort(
                [m for r in group for m in r[key] if m is not None and math.isfinite(m)]
            )
            if pooled.size:
                cdf = np.arange(1, pooled.size + 1) / pooled.size
                ax.step(pooled, cdf, where="post", color=f"C{i % 10}",
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
        rows,
        cols,
        figsize=(4 * cols, 3 * rows + 0.6),
        squeeze=False,
        layout="constrained",
    )
    for ax in axes.flat[len(tuned) :]:
        ax.set_visible(False)
    for ax, (name, r) in zip(axes.flat, tuned.items(), strict=False):
        val = np.asarray(r["val_acc"], float)
        grid = np.asarray(r["grid"], float)
        ax.errorbar(grid, val.mean(1), yerr=val.std(1) if val.shape[1] > 1 else None,
                    marker="o", capsize=3, color="C0", label="validation (mean ± std)")  # fmt: skip
        ax.axvline(r["selected_coeff"], color="C3", ls=":", label="selected")
        ax.set(title=name, xscale="log", xlabel=r["coeff_name"], ylabel="val accuracy")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8)
    fig.suptitle(
        "Validation accuracy against the coefficient (selection on validation)"
    )
    return _save(fig, out, "coefficients.png")


def _save(fig, out: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out, name)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
