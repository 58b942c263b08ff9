"""What a reproduction reports: the table beside the paper's numbers, the verdicts,
``<name>.json`` and ``<name>.png``; all from the JSON-ready result of
:func:`~.execute.run_protocol`, so a saved run re-renders the same way."""

from __future__ import annotations

import collections
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from margin_regs.experiments.reproduce.verdicts import MIN_EFFECT, mean_interval

__all__ = ["QUICK_WARNING", "RULE", "format_report", "markdown", "plot", "write"]

RULE = (
    "verdict rule: the per-seed paired difference (methods share data and "
    "initialization per seed), averaged over the claim's testable cells, with its "
    "95% t-interval (scipy.stats.t): 'reproduced' if the interval lies above 0 and "
    f"the mean is at least the minimum effect ({100 * MIN_EFFECT:.1f} points of "
    "accuracy unless stated; for '≥' claims: the interval above −tolerance), 'not "
    "reproduced' if it lies below 0 (mean beyond the minimum effect), 'negligible' if "
    "the effect is smaller than the minimum, 'inconclusive' if the interval contains "
    "0 or has zero spread (flagged), 'not testable here' if the baseline did not "
    "reach the paper's training regime or a precondition failed"
)
QUICK_WARNING = (
    "budget 'quick': a smoke run of tiny sizes and 2 epochs; its verdicts mean "
    "nothing (use --budget cpu)"
)


def _fmt(value: float | None, scale: float) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{scale * value:.2f}" if scale != 1 else f"{value:.3g}"


def _ours(values: list[float] | None, scale: float) -> str:
    if not values:
        return "—"
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "undefined"
    mean, half = mean_interval(values)
    if half is None:
        return _fmt(mean, scale)
    return f"{_fmt(mean, scale)} ± {_fmt(half, scale)}"


def _paper(result: dict[str, Any]) -> dict[tuple[str, str, str], float]:
    """``{(cell, method, metric): the paper's value}``."""
    return {(p["cell"], p["method"], p["metric"]): p["value"] for p in result["paper"]}


def _difference(j: dict[str, Any], scale: float, unit: str = "") -> str:
    """A claim's mean difference and its interval: ``+1.52 [+0.78, +2.26]``."""
    d, spec = j["difference"], "+.2f" if scale == 100 else "+.3g"
    mean = f"{scale * d['mean']:{spec}}{unit}"
    if d["low"] is None:
        return mean
    return f"{mean} [{scale * d['low']:{spec}}, {scale * d['high']:{spec}}]"


def _rows(result: dict[str, Any]) -> list[list[str]]:
    paper = _paper(result)
    labels = result["labels"]
    reported = {metric for _, _, metric in paper}
    rows = []
    for cell, methods in result["results"].items():
        for method, measured in methods.items():
            row = [cell, labels.get(method, method)]
            present = False
            for metric, _, scale in result["metrics"]:
                if metric in reported:
                    row.append(_fmt(paper.get((cell, method, metric)), scale))
                row.append(_ours(measured.get(metric), scale))
                present |= metric in measured
            if present:
                row.append(_ours(measured.get("train_acc"), 100))
                row.append(_ours(measured.get("train_loss"), 1))
                coeff = measured.get("coeff")
                row.append("" if coeff is None else f"{coeff:g}")
                rows.append(row)
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows
    ]
    return "\n".join(lines)


def _claim_line(j: dict[str, Any], scale: float, unit: str) -> str:
    interval = _difference(j, scale, unit)
    if j["difference"]["low"] is None:
        interval += " (one seed: no interval)"
    counts = collections.Counter(c["verdict"] for c in j["cells"].values())
    per_cell = ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
    line = (
        f"  {j['verdict'].upper():<17} {j['text']} ({j['source']}): {interval}; "
        f"cells: {per_cell}"
    )
    return "\n".join([line, *(f"      flag: {f}" for f in j.get("flags", []))])


def _context(result: dict[str, Any]) -> list[str]:
    """Convergence of each setting's baseline and the preconditions, one line each."""
    lines = ["convergence (the unregularized baseline's final training accuracy):"]
    for cell, c in result.get("convergence", {}).items():
        state = "in regime" if c["in_regime"] else "NOT in regime: not testable here"
        lines.append(
            f"  {cell}: {c['baseline']} {100 * c['train_acc']:.2f}% (loss "
            f"{c['train_loss']:.3g}; needs ≥ {100 * c['threshold']:.0f}%): {state}"
        )
    for p in result.get("preconditions", []):
        lines.append(
            f"precondition: {p['text']}: measured {100 * p['measured']:+.2f} points "
            f"(needs ≥ {100 * p['minimum']:+.2f}): {'met' if p['met'] else 'NOT MET'}"
        )
    return lines


def _header(result: dict[str, Any], ours: str) -> list[str]:
    """The results table's columns: the paper's number beside ours where it reports
    one, then convergence and the coefficient."""
    header = ["setting", "method"]
    reported = {p["metric"] for p in result["paper"]}
    for metric, name, _ in result["metrics"]:
        if metric in reported:
            header.append(f"paper {name}")
        header.append(f"ours {name}{ours}")
    return [*header, "train acc [%]", "train loss (CE)", "coeff"]


def format_report(result: dict[str, Any]) -> str:
    """The table (paper vs ours, 95% intervals over seeds) and a verdict per claim.

    Args:
      result: what :func:`~.execute.run_protocol` returned (or its JSON).

    Returns:
      The text to print.
    """
    header = _header(result, " (95% CI)")
    scales = {m: (s, " points" if s == 100 else "") for m, _, s in result["metrics"]}
    lines = [
        f"== {result['name']}: {result['title']} ==",
        f"budget {result.get('budget', 'cpu')!r}; {result['seeds']} seeds; "
        f"{result['seconds'] / 60:.1f} min",
        *([QUICK_WARNING] if result.get("budget") == "quick" else []),
        *(
            [
                "PARTIAL RUN, not trained (claims judged on what was): "
                + ", ".join(result["missing"])
            ]
            if result.get("missing")
            else []
        ),
        "scaled from the paper:",
        *[f"  - {s}" for s in result["scaling"]],
        f"coefficients: {result['coefficients']}",
        f"paper's numbers: {result['paper_note']}",
        "",
        _table(header, _rows(result)),
        "",
        *_context(result),
        "",
        "claims (" + RULE + "):",
    ]
    for j in result["judgements"]:
        lines.append(_claim_line(j, *scales.get(j["metric"], (1, ""))))
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    """One panel per metric: ours (mean and 95% interval per setting and method)
    as filled markers, the paper's numbers as open ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics, paper = result["metrics"], _paper(result)
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False
    )
    for ax, (metric, name, scale) in zip(axes[0], metrics, strict=True):
        cells = [
            c
            for c, ms in result["results"].items()
            if any(metric in m for m in ms.values())
        ]
        methods = list(dict.fromkeys(m for c in cells for m in result["results"][c]))
        width = 0.8 / max(len(methods), 1)
        for k, method in enumerate(methods):
            xs, means, halves, px, pv = [], [], [], [], []
            for i, cell in enumerate(cells):
                values = result["results"][cell].get(method, {}).get(metric)
                x = i + (k - (len(methods) - 1) / 2) * width
                if values and any(math.isfinite(v) for v in values):
                    mean, half = mean_interval([v for v in values if math.isfinite(v)])
                    xs.append(x)
                    means.append(scale * mean)
                    halves.append(0.0 if half is None else scale * half)
                if (cell, method, metric) in paper:
                    px.append(x)
                    pv.append(scale * paper[(cell, method, metric)])
            label = result["labels"].get(method, method)
            bars = ax.errorbar(xs, means, yerr=halves, fmt="o", capsize=3, label=label)
            if pv:
                ax.plot(px, pv, "o", mfc="none", color=bars[0].get_color())
        ax.set_xticks(np.arange(len(cells)), cells, rotation=20)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, title="filled: ours; open: paper", title_fontsize=8)
    fig.suptitle(f"{result['name']}: {result['title']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict[str, Any], out: str) -> list[str]:
    """Write ``<out>/<name>.json`` and ``<out>/<name>.png``; return their paths."""
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, result["name"])
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1, allow_nan=True)
    plot(result, base + ".png")
    return [base + ".json", base + ".png"]


def _paper_difference(result: dict[str, Any], j: dict[str, Any]) -> str:
    """The paper's own difference for a claim (mean over its cells), where the
    paper reports both methods' numbers."""
    paper = _paper(result)
    scale = {m: s for m, _, s in result["metrics"]}.get(j["metric"], 1)
    diffs = [
        paper[(c, j["better"], j["metric"])] - paper[(c, j["worse"], j["metric"])]
        for c in j["cells"]
        if (c, j["better"], j["metric"]) in paper
        and (c, j["worse"], j["metric"]) in paper
    ]
    if not diffs:
        return "curves only" if not result["paper"] else "—"
    sign = (
        1 if j["metric"] not in ("gap", "acc_drop", "stable_rank", "sigma_max") else -1
    )
    return f"{sign * scale * float(np.mean(diffs)):+.2f}"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _md_protocol(result: dict[str, Any]) -> list[str]:
    header = _header(result, "")
    load = result.get("load_average_start", [float("nan")])[0]
    lines = [
        f"## `{result['name']}`: {result['title']}",
        "",
        f"Budget `{result.get('budget')}`, {result['seeds']} seeds, "
        f"{result['seconds'] / 60:.1f} min wall ({result.get('cpu_seconds', 0) / 60:.1f} "
        f"min CPU; load average {load:.1f} at the start, "
        f"{result.get('load_average_end', [float('nan')])[0]:.1f} at the end; "
        f"printed estimate for idle cores {result.get('estimate_seconds', 0) / 60:.1f} "
        f"min), commit `{result.get('commit')}`.",
        "",
        *(
            [
                f"**Partial run**: not trained before the deadline: "
                f"{', '.join(result['missing'])}; the claims are judged on what was "
                "(`margin-regs reproduce NAME --resume` continues it).",
                "",
            ]
            if result.get("missing")
            else []
        ),
        "Scaled from the paper: " + "; ".join(result["scaling"]) + ".",
        "",
        f"Coefficients: {result['coefficients']}. Paper: {result['paper_note']}.",
        "",
        *_md_table(header, _rows(result)),
        "",
        *[f"- {line.strip()}" for line in _context(result)[1:]],
    ]
    for name, value in result.get("diagnostics", {}).items():
        lines.append(
            f"- {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in value.items())
        )
    rows = []
    for j in result["judgements"]:
        scale = {m: s for m, _, s in result["metrics"]}.get(j["metric"], 1)
        ours = _difference(j, scale)
        cells = ", ".join(f"{c}: {v['verdict']}" for c, v in j["cells"].items())
        rows.append(
            [j["text"], j["source"], _paper_difference(result, j), ours,
             f"**{j['verdict']}**", cells]
        )  # fmt: skip
    lines += [
        "",
        *_md_table(
            ["claim", "source", "paper Δ", "ours Δ [95% CI]", "verdict", "per setting"],
            rows,
        ),
        "",
    ]
    return lines


def _md_estimator(v: dict[str, Any]) -> list[str]:
    return [
        "## The one-class LM estimator against the exact all-class penalty",
        "",
        f"{v['what']}. Relative gradient variance {v['variance']:.3f} (the "
        f"estimator's noise is as large as the gradient itself on one batch of "
        f"{v['batch']}); relative bias {v['bias']:.3f} over {v['draws']} draws (noise "
        f"floor {np.sqrt(v['variance'] / v['draws']):.3f}: no bias detected); one "
        f"gradient {v['seconds_exact']:.2f} s exact against "
        f"{v['seconds_estimator']:.3f} s estimated "
        f"({v['seconds_exact'] / v['seconds_estimator']:.0f}×; load average "
        f"{v['load_average']}), so the exact penalty does not fit the cpu budget.",
        "",
    ]


def markdown(
    results: list[dict[str, Any]],
    machine: str,
    estimator: dict | None = None,
    not_run: Sequence[str] = (),
) -> str:
    """The reproduction tables (markdown) of saved ``margin-regs reproduce`` runs.

    Args:
      results: what :func:`~.execute.run_protocol` returned, one per protocol.
      machine: where they ran (cores, load), one line.

    Returns:
      The text of ``docs/reproductions.md``.
    """
    summary = []
    for r in results:
        counts = collections.Counter(j["verdict"] for j in r["judgements"])
        summary.append(
            [f"`{r['name']}`", r.get("budget", "?"), f"{r['seconds'] / 60:.1f}",
             f"{r.get('cpu_seconds', float('nan')) / 60:.1f}",
             f"{r.get('load_average_start', [float('nan')])[0]:.1f}",
             f"{r.get('estimate_seconds', float('nan')) / 60:.1f}",
             ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))]
        )  # fmt: skip
    total = sum(r["seconds"] for r in results) / 60
    lines = [
        "# Reproductions",
        "",
        "Generated by `python -m margin_regs.experiments.reproduce.tables "
        "benchmarks/results/reproduce docs/reproductions.md` from the committed JSON "
        "of `margin-regs reproduce NAME --budget cpu`; no number here is typed by hand.",
        "",
        f"Machine: {machine}. Total wall time {total:.1f} min.",
        "",
        *(
            [f"Not run at this budget yet (no JSON): {', '.join(not_run)}.", ""]
            if not_run
            else []
        ),
        RULE[0].upper() + RULE[1:] + ".",
        "",
        *_md_table(
            [
                "protocol",
                "budget",
                "wall [min]",
                "CPU [min]",
                "load at start",
                "estimate [min]",
                "verdicts",
            ],
            summary,
        ),
        "",
    ]
    for r in results:
        lines += _md_protocol(r)
    if estimator is not None:
        lines += _md_estimator(estimator)
    return "\n".join(lines).replace("|  |", "| |") + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m margin_regs.experiments.reproduce.tables DIR OUT.md [MACHINE]``."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    folder, out = argv[0], argv[1]
    machine = argv[2] if len(argv) > 2 else f"{os.cpu_count()} CPU cores"
    order = ["sokolic-fig2", "sokolic-table1", "zhao-fig2", "yoshida-gap",
             "ludwig-table2"]  # fmt: skip
    results, not_run = [], []
    for name in order:
        path = os.path.join(folder, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
        else:
            not_run.append(f"`{name}`")
    estimator = None
    path = os.path.join(folder, "lm_estimator_variance.json")
    if os.path.exists(path):
        with open(path) as f:
            estimator = json.load(f)
    with open(out, "w") as f:
        f.write(markdown(results, machine, estimator, not_run))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
