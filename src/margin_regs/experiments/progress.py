"""Progress of a long comparison: a ``rich`` bar on a terminal, a line every few
seconds in a log."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from rich import progress as rp
from rich.console import Console

__all__ = ["Progress"]


class Progress:
    """Run-epochs done out of the total, elapsed time, and an ETA with compilation.

    ETA: the warm rate (seconds per run-epoch after each program's first epoch) times
    the run-epochs left, plus the mean compilation (a first epoch less its warm cost)
    times the programs not yet started.

    Args:
      total: run-epochs of the whole comparison (runs × epochs).
      programs: compiled programs it trains (one per regularizer or dropout rate).
      enabled: ``False`` shows nothing.
      stream: where to write (default ``sys.stderr``).
      every: seconds between lines when ``stream`` is not a terminal.

    Example:
      >>> import io
      >>> from margin_regs.experiments.progress import Progress
      >>> p = Progress(total=12, programs=2, stream=io.StringIO(), every=0.0)
      >>> p.begin("spectral")
      >>> p.epoch(0, 5.0, runs=4)  # compiles
      >>> p.epoch(1, 0.5, runs=4)  # warm: 0.125 s per run-epoch
      >>> p.eta()  # 4 run-epochs, then the next program's 4.5 s of compilation
      5.0
    """

    def __init__(
        self,
        total: int,
        programs: int = 1,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        every: float = 5.0,
    ):
        self.total, self.programs, self.enabled = total, programs, enabled
        self.every = every
        self.console = Console(file=sys.stderr if stream is None else stream)
        self.live = enabled and self.console.is_terminal
        self.bar = rp.Progress(
            rp.TextColumn("{task.description}"),
            rp.BarColumn(),
            rp.MofNCompleteColumn(),
            rp.TextColumn("run-epochs"),
            rp.TimeElapsedColumn(),
            rp.TextColumn("{task.fields[eta]}"),
            console=self.console,
            auto_refresh=False,
            disable=not self.live,
        )
        self.task = self.bar.add_task("", total=total, eta="")
        if self.live:
            self.bar.start()
        self.done, self.name = 0, ""
        self._warm = [0.0, 0]  # seconds, run-epochs
        self._first: list[tuple[float, int]] = []  # each program's first epoch
        self._start, self._last = time.perf_counter(), float("-inf")

    def begin(self, name: str) -> None:
        """A new regularizer starts."""
        self.name = name

    def epoch(self, epoch: int, seconds: float, runs: int) -> None:
        """Epoch ``epoch`` of a program holding ``runs`` runs took ``seconds``."""
        self.done += runs
        if epoch == 0:
            self._first.append((seconds, runs))
        else:
            self._warm = [self._warm[0] + seconds, self._warm[1] + runs]
        self._show()

    def eta(self) -> float | None:
        """Seconds left (``None`` before any warm epoch)."""
        seconds, run_epochs = self._warm
        if not run_epochs:
            return None
        rate = seconds / run_epochs
        compile_ = [max(0.0, s - rate * r) for s, r in self._first]
        left = max(0, self.programs - len(self._first))
        return rate * (self.total - self.done) + left * sum(compile_) / len(compile_)

    def line(self) -> str:
        """The current status, one line."""
        eta = self.eta()
        left = "ETA after the first warm epoch" if eta is None else f"ETA {eta:.0f} s"
        return (
            f"{self.name}: {self.done}/{self.total} run-epochs "
            f"({100 * self.done / max(self.total, 1):.0f}%), "
            f"{time.perf_counter() - self._start:.0f} s elapsed, {left}"
        )

    def _show(self) -> None:
        if self.live:
            eta = "ETA …" if self.eta() is None else f"ETA {self.eta():.0f} s"
            bar = {"completed": self.done, "description": self.name, "eta": eta}
            self.bar.update(self.task, refresh=True, **bar)
            return
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.every or self.done >= self.total):
            self._last = now
            self.console.print(self.line(), highlight=False, soft_wrap=True)

    def close(self) -> None:
        """Stop the terminal display."""
        if self.live:
            self.bar.stop()
            self.live = False
