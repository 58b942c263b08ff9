"""The ``margin-regs`` command line: ``compare`` regularizers side by side, ``bench``.

``margin-regs compare`` trains one reference model per regularizer on the same data,
seeds and schedule (:mod:`margin_regs.experiment`), prints one table and writes
``results.json`` and PNG plots to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import Any

DEFAULT_REGULARIZERS = (
    "vanilla",
    "weight_decay",
    "spectral",
    "eigenvalue_decay",
    "jacobian",
    "adareg",
    "adversarial",
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive number, got {text!r}"
        ) from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _coeff(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected NAME=VALUE (e.g. spectral=0.03), got {text!r}"
        ) from None


def _recipes_epilog() -> str:
    from margin_regs.experiment import RECIPES

    lines = ["regularizers (name: what it does [default hyperparameter] — source):"]
    for name, recipe in RECIPES.items():
        default = (
            "" if recipe.coeff is None else f" [{recipe.coeff_name}={recipe.coeff:g}]"
        )
        lines.append(f"  {name}{default}: {recipe.description} — {recipe.reference}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The ``margin-regs`` argument parser (subcommands ``compare`` and ``bench``).

    Example:
      >>> from margin_regs.cli import build_parser
      >>> args = build_parser().parse_args(["compare", "--epochs", "3"])
      >>> args.dataset, args.model, args.epochs, args.train_size
      ('digits', 'mlp', 3, 512)
    """
    return _parsers()[0]


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    from margin_regs.models import MODELS

    parser = argparse.ArgumentParser(
        prog="margin-regs",
        description="Large-margin regularizers for JAX: compare them side by side.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    compare = sub.add_parser(
        "compare",
        help="train one reference model per regularizer and print one table",
        description=textwrap.fill(
            "Train one reference model per regularizer on the same data, seeds and "
            "schedule (SGD, Nesterov momentum 0.9, learning rate /10 after 1/2 and 3/4 "
            "of the epochs, as in Yoshida & Miyato §4.1), print one table and write "
            "results.json and PNG plots. The defaults run in a few minutes on 2 CPU "
            "cores.",
            88,
        ),
        epilog=_recipes_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument(
        "--dataset",
        default="digits",
        metavar="digits|mnist1d|PATH",
        help=(
            "embedded 'digits' (scikit-learn 8×8, 1,797 samples; default) or 'mnist1d' "
            "(generated locally, 4,000/1,000), or a path: an .npz with x/y (and "
            "optionally x_test/y_test), a folder of MNIST/Fashion-MNIST IDX files "
            "(gzipped or not), or a CIFAR-10 python-batch folder"
        ),
    )
    compare.add_argument(
        "--model",
        default="mlp",
        choices=sorted(MODELS),
        help="reference model: "
        + "; ".join(f"{k}: {v[1]}" for k, v in MODELS.items())
        + " (default: mlp)",
    )
    compare.add_argument(
        "--train-size",
        type=_positive_int,
        default=512,
        metavar="N",
        help=(
            "training samples drawn (per seed, reproducibly) from the training pool "
            "after 10%% is held out for validation; small sets are where regularizers "
            "matter (default 512, a column of Sokolić et al. Table I)"
        ),
    )
    compare.add_argument(
        "--epochs",
        type=_positive_int,
        default=100,
        metavar="E",
        help="epochs per run (default 100, Sokolić et al.'s CNN setup)",
    )
    compare.add_argument(
        "--batch-size",
        type=_positive_int,
        default=32,
        metavar="B",
        help="minibatch size (default 32, Sokolić et al.'s CNN setup)",
    )
    compare.add_argument(
        "--lr",
        type=_positive_float,
        default=0.01,
        help="initial learning rate (default 0.01, Sokolić et al. and Yoshida & Miyato)",
    )
    compare.add_argument(
        "--seeds",
        type=_positive_int,
        default=3,
        metavar="S",
        help="seeds 0..S-1 per regularizer; each seed draws its own training subset "
        "and initialization, shared by all regularizers (default 3)",
    )
    compare.add_argument(
        "--regularizers",
        default=",".join(DEFAULT_REGULARIZERS),
        metavar="NAME,...",
        help=f"comma-separated names, listed below (default: {','.join(DEFAULT_REGULARIZERS)})",
    )
    compare.add_argument(
        "--coeff",
        type=_coeff,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a regularizer's hyperparameter, e.g. --coeff spectral=0.03 "
        "(repeatable)",
    )
    compare.add_argument(
        "--patience",
        type=_positive_int,
        default=None,
        metavar="P",
        help="early stopping for every regularizer: stop after P epochs without a "
        "better validation accuracy and restore the best epoch (default: off)",
    )
    compare.add_argument(
        "--out",
        default="margin_regs_out",
        metavar="DIR",
        help="folder for results.json and the PNG plots (default: margin_regs_out)",
    )
    compare.add_argument(
        "--no-progress", action="store_true", help="no progress bar (e.g. in logs)"
    )
    sub.add_parser(
        "bench",
        help="overhead benchmarks: step-time ratios against an unregularized step "
        "(options: margin-regs bench --help)",
        add_help=False,
        prefix_chars="\0",
    ).add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser, compare


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    from margin_regs.experiment import RECIPES

    names = [n.strip() for n in args.regularizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if not names:
        parser.error("--regularizers: give at least one name")
    if unknown:
        parser.error(
            f"--regularizers: unknown {', '.join(map(repr, unknown))}; choose from "
            f"{', '.join(RECIPES)}"
        )
    if len(set(names)) != len(names):
        parser.error("--regularizers: a name is repeated")
    for name, _ in args.coeff:
        if name not in names:
            parser.error(f"--coeff {name}=...: {name!r} is not among --regularizers")
        if RECIPES[name].coeff is None:
            parser.error(f"--coeff {name}=...: {name!r} has no hyperparameter")
    for name, value in args.coeff:
        recipe = RECIPES[name]
        if recipe.dropout and not 0 <= value < 1:
            parser.error(f"--coeff {name}={value:g}: a dropout rate must be in [0, 1)")
        if recipe.early_stopping and (value < 1 or value != int(value)):
            parser.error(
                f"--coeff {name}={value:g}: patience must be a whole number ≥ 1"
            )
        if not math.isfinite(value) or value < 0:
            parser.error(f"--coeff {name}={value:g}: must be a finite number ≥ 0")
    return names


def _jsonable(value: Any) -> Any:
    """Non-finite floats become ``None`` (strict JSON has no inf or NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _layers(summary: dict[str, Any]) -> list[str]:
    first = next(iter(summary.values()))
    # Input side first: kernels named by the models' module order.
    return sorted(first["sigma_max"], key=lambda k: (k.startswith("classifier"), k))


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """The comparison as a fixed-width text table (one row per regularizer).

    Example:
      >>> from margin_regs.cli import format_table
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


def _plots(results, summary, out: str) -> list[str]:
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


def compare(
    parser: argparse.ArgumentParser, args: argparse.Namespace, names: Sequence[str]
) -> int:
    """Run the comparison ``args`` describe; print the table, write the files."""
    import dataclasses

    import jax
    from tqdm import tqdm

    from margin_regs import data, experiment

    try:
        full = data.load(args.dataset)
    except data.DatasetError as e:
        parser.error(f"--dataset: {e}")
    config = experiment.TrainConfig(
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        patience=args.patience,
    )
    coeffs = dict(args.coeff)
    try:
        splits = [
            data.prepare(full, train_size=args.train_size, seed=s)
            for s in range(args.seeds)
        ]
    except ValueError as e:
        parser.error(f"--train-size: {e}")
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    results = []
    with tqdm(
        total=len(names) * args.seeds * args.epochs,
        disable=args.no_progress,
        unit="epoch",
        file=sys.stderr,
    ) as bar:
        for name in names:
            for seed, ds in enumerate(splits):
                done = 0

                def tick(epoch, metrics, name=name, seed=seed):
                    nonlocal done
                    done += 1
                    bar.update(1)
                    bar.set_postfix_str(
                        f"{name} seed {seed} test {metrics['test_acc']:.3f}"
                    )

                r = experiment.run(
                    name,
                    ds,
                    seed=seed,
                    config=config,
                    coeff=coeffs.get(name),
                    on_epoch=tick,
                )
                bar.update(args.epochs - done)  # epochs early stopping skipped
                results.append(r)
    # Per-epoch cost, timed again in interleaved rounds of the compiled trainers:
    # the epochs above ran minutes apart on a machine whose load drifts.
    epoch_seconds = experiment.time_epochs(
        {
            name: (
                experiment.get_trainer(
                    name,
                    coeffs.get(name, experiment.RECIPES[name].coeff),
                    config,
                    full.num_classes,
                    args.train_size,
                ),
                splits[0],
            )
            for name in names
        }
    )
    elapsed = time.perf_counter() - start
    summary = experiment.summarize(results, epoch_seconds)
    print(
        f"{full.name}: {args.train_size} training samples, {len(full.x_test)} test, "
        f"model {args.model}, {args.epochs} epoch(s), batch {args.batch_size}, "
        f"{args.seeds} seed(s); {elapsed:.0f} s on {jax.devices()[0].platform} "
        f"({os.cpu_count()} CPUs)"
    )
    print(format_table(summary))
    recipes = experiment.RECIPES
    payload = {
        "config": {
            "dataset": args.dataset,
            "dataset_name": full.name,
            "train_size": args.train_size,
            "val_size": len(splits[0].x_val),
            "test_size": len(full.x_test),
            "seeds": args.seeds,
            "regularizers": list(names),
            **dataclasses.asdict(config),
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "jax_backend": jax.default_backend(),
            "jax_version": jax.__version__,
            "seconds_total": elapsed,
        },
        "regularizers": {
            n: {
                "description": recipes[n].description,
                "reference": recipes[n].reference,
                "coeff_name": recipes[n].coeff_name,
                "coeff": summary[n]["coeff"],
            }
            for n in names
        },
        "summary": summary,
        "runs": [
            {k: v for k, v in dataclasses.asdict(r).items() if k != "params"}
            for r in results
        ],
    }
    path = os.path.join(args.out, "results.json")
    with open(path, "w") as f:
        json.dump(_jsonable(payload), f, allow_nan=False)
    pngs = _plots(results, summary, args.out)
    print(f"\nwrote {path}, " + ", ".join(pngs))
    return 0


def bench(argv: Sequence[str]) -> int:
    """Hand ``argv`` to the benchmark harness, :func:`margin_regs.bench.main`."""
    from margin_regs import bench as harness

    return harness.main(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``margin-regs`` console script.

    Example:
      >>> from margin_regs.cli import main
      >>> main(["compare", "--regularizers", "nope"])  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      SystemExit: 2
    """
    parser, compare_parser = _parsers()
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench(args.bench_args)
    names = _check(compare_parser, args)
    return compare(compare_parser, args, names)
