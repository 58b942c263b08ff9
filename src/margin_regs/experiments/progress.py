"""Progress of a long comparison, readable on a terminal and in a log file.

On a terminal one line is redrawn in place; elsewhere (a log, CI) a full line is
printed every few seconds instead of a stream of carriage-return updates. The
estimate of the time left counts only epochs after a program's first: the first
epoch of each program includes its compilation, which says nothing about the rest.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """Run-epochs done out of the total, elapsed time, and an ETA without compilation.

    Args:
      total: run-epochs of the whole comparison (runs × epochs).
      enabled: ``False`` prints nothing.
      stream: where to write (default ``sys.stderr``).
      every: seconds between lines when ``stream`` is not a terminal.

    Example:
      >>> import io
      >>> from margin_regs.experiments.progress import Progress
      >>> p = Progress(total=8, stream=io.StringIO(), every=0.0)
      >>> p.begin("spectral")
      >>> p.epoch(0, 5.0, runs=4)  # compiles: not counted in the rate
      >>> p.epoch(1, 0.5, runs=4)
      >>> p.eta()  # 0 run-epochs left
      0.0
    """

    def __init__(
        self,
        total: int,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        every: float = 5.0,
    ):
        self.total = total
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every if not self.tty else 0.2
        self.done = 0
        self.name = ""
        self._warm_seconds = 0.0
        self._warm_run_epochs = 0
        self._start = time.perf_counter()
        self._last = float("-inf")
        self._drawn = False

    def begin(self, name: str) -> None:
        """A new regularizer's program starts."""
        self.name = name

    def epoch(self, epoch: int, seconds: float, runs: int) -> None:
        """One epoch of a program holding ``runs`` runs took ``seconds``."""
        self.done += runs
        if epoch > 0:
            self._warm_seconds += seconds
            self._warm_run_epochs += runs
        self._show()

    def eta(self) -> float | None:
        """Seconds left at the warm rate so far (``None`` before any warm epoch)."""
        if not self._warm_run_epochs:
            return None
        rate = self._warm_seconds / self._warm_run_epochs
        return rate * (self.total - self.done)

    def line(self) -> str:
        """The current status line."""
        eta = self.eta()
        elapsed = time.perf_counter() - self._start
        left = "ETA after the first epoch" if eta is None else f"ETA {eta:.0f} s"
        percent = 100 * self.done / max(self.total, 1)
        return (
            f"{self.name}: {self.done}/{self.total} run-epochs ({percent:.0f}%), "
            f"{elapsed:.0f} s elapsed, {left} (compilation excluded)"
        )

    def _show(self) -> None:
        now = time.perf_counter()
        if not self.enabled or (
            now - self._last < self.every and self.done < self.total
        ):
            return
        self._last = now
        if self.tty:
            self.stream.write("\r\033[K" + self.line())
            self._drawn = True
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the terminal line (once)."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
