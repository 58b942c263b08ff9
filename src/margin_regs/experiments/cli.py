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
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

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
EXTRA_MODULES = ("flax", "sklearn", "mnist1d", "mlxtend", "matplotlib", "tqdm")
INSTALL_HINT = "pip install 'margin_regs[experiments]'"


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
    from margin_regs.experiments.recipes import RECIPES

    lines = ["regularizers (name: what it does [default hyperparameter] — source):"]
    for name, recipe in RECIPES.items():
        default = (
            "" if recipe.coeff is None else f" [{recipe.coeff_name}={recipe.coeff:g}]"
        )
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

    compare = argparse.ArgumentParser(
        prog="margin-regs compare",
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
    return compare


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


class _Plan(NamedTuple):
    """What ``compare`` runs, read from its arguments."""

    names: list[str]
    full: Any  # data.Dataset
    splits: list[Any]  # one prepared data.Dataset per seed
    config: Any  # training.TrainConfig
    coeffs: dict[str, float]


def _plan(parser: argparse.ArgumentParser, args: argparse.Namespace) -> _Plan:
    from margin_regs.experiments import data, training

    names = _check(parser, args)
    try:
        full = data.load(args.dataset)
    except data.DatasetError as e:
        parser.error(f"--dataset: {e}")
    try:
        splits = [
            data.prepare(full, train_size=args.train_size, seed=s)
            for s in range(args.seeds)
        ]
    except ValueError as e:
        parser.error(f"--train-size: {e}")
    config = training.TrainConfig(
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        patience=args.patience,
    )
    return _Plan(names, full, splits, config, dict(args.coeff))


def _ticker(bar: Any, label: str) -> Callable[[int, dict[str, float]], None]:
    def tick(epoch: int, metrics: dict[str, float]) -> None:
        bar.update(1)
        bar.set_postfix_str(f"{label} test {metrics['test_acc']:.3f}")

    return tick


def _train(plan: _Plan, progress: bool) -> list[Any]:
    from tqdm import tqdm

    from margin_regs.experiments import training

    results = []
    total = len(plan.names) * len(plan.splits) * plan.config.epochs
    with tqdm(total=total, disable=not progress, unit="epoch", file=sys.stderr) as bar:
        for name in plan.names:
            for seed, ds in enumerate(plan.splits):
                result = training.run(
                    name,
                    ds,
                    seed=seed,
                    config=plan.config,
                    coeff=plan.coeffs.get(name),
                    on_epoch=_ticker(bar, f"{name} seed {seed}"),
                )
                # Epochs that early stopping skipped still count as done.
                bar.update(plan.config.epochs - len(result.history["test_acc"]))
                results.append(result)
    return results


def _epoch_seconds(plan: _Plan) -> dict[str, float]:
    # Per-epoch cost, timed again in interleaved rounds of the compiled trainers:
    # the epochs of the runs ran minutes apart on a machine whose load drifts.
    from margin_regs.experiments import report, training

    trainers = {
        name: (
            training.get_trainer(
                name,
                plan.coeffs.get(name),
                plan.config,
                plan.full.num_classes,
                len(plan.splits[0].x_train),
            ),
            plan.splits[0],
        )
        for name in plan.names
    }
    return report.time_epochs(trainers)


def compare(argv: Sequence[str]) -> int:
    """``margin-regs compare``: run the comparison, print the table, write the files."""
    import jax

    from margin_regs.experiments import report

    parser = build_parser()
    args = parser.parse_args(argv)
    plan = _plan(parser, args)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    results = _train(plan, progress=not args.no_progress)
    summary = report.summarize(results, _epoch_seconds(plan))
    elapsed = time.perf_counter() - start
    full = plan.full
    print(
        f"{full.name}: {args.train_size} training samples, {len(full.x_test)} test, "
        f"model {args.model}, {args.epochs} epoch(s), batch {args.batch_size}, "
        f"{args.seeds} seed(s); {elapsed:.0f} s on {jax.devices()[0].platform} "
        f"({os.cpu_count()} CPUs)"
    )
    print(report.format_table(summary))
    settings = {
        "dataset": args.dataset,
        "dataset_name": full.name,
        "train_size": args.train_size,
        "val_size": len(plan.splits[0].x_val),
        "test_size": len(full.x_test),
        "seeds": args.seeds,
        "regularizers": plan.names,
    }
    paths = report.write(args.out, settings, plan.config, results, summary, elapsed)
    print("\nwrote " + ", ".join(paths))
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
