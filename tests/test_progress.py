"""Progress: an ETA with the compilation still to come, whole lines in a log, and a
rich bar on a terminal."""

import io

import pytest

from margin_regs.experiments.progress import Progress


def test_eta_adds_the_compilation_of_programs_not_yet_started():
    p = Progress(total=60, programs=3, stream=io.StringIO(), every=0.0)
    p.begin("spectral")
    p.epoch(0, 30.0, runs=10)  # compilation + one epoch
    assert p.eta() is None
    p.epoch(1, 1.0, runs=10)  # 0.1 s per run-epoch; compilation 30 - 1 = 29 s
    assert p.eta() == pytest.approx(0.1 * 40 + 2 * 29.0)
    p.begin("jacobian")
    p.epoch(0, 51.0, runs=10)  # compilation 50 s: the mean of the two is 39.5 s
    assert p.eta() == pytest.approx(0.1 * 30 + 1 * 39.5)
    p.epoch(1, 1.0, runs=10)
    p.begin("adareg")
    p.epoch(0, 10.0, runs=10)  # every program started: only run-epochs remain
    assert p.eta() == pytest.approx(0.1 * 10)


def test_a_log_gets_whole_lines_at_most_every_few_seconds():
    stream = io.StringIO()
    p = Progress(total=1000, stream=stream, every=3600.0)
    p.begin("vanilla")
    for epoch in range(1000):
        p.epoch(epoch, 0.01, runs=1)  # the first and the last print
    p.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 2
    assert lines[-1].startswith("vanilla: 1000/1000 run-epochs (100%)")
    assert lines[-1].endswith("ETA 0 s")


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_rich_bar_and_nothing_when_disabled():
    stream = _Terminal()
    p = Progress(total=4, stream=stream)
    p.begin("spectral")
    p.epoch(0, 1.0, runs=2)
    p.epoch(1, 0.5, runs=2)
    p.close()
    assert "spectral" in stream.getvalue() and "4/4" in stream.getvalue()
    quiet = _Terminal()
    p = Progress(total=4, stream=quiet, enabled=False)
    p.epoch(0, 1.0, runs=4)
    p.close()
    assert quiet.getvalue() == ""
