"""Progress lines: periodic in a log, an ETA that ignores compilation."""

import io

import pytest

from margin_regs.experiments.progress import Progress


def test_eta_uses_warm_epochs_only():
    p = Progress(total=40, stream=io.StringIO(), every=0.0)
    p.begin("spectral")
    p.epoch(0, 30.0, runs=10)  # compilation
    assert p.eta() is None
    p.epoch(1, 1.0, runs=10)  # 0.1 s per run-epoch
    assert p.eta() == pytest.approx(0.1 * 20)
    p.begin("jacobian")
    p.epoch(0, 50.0, runs=10)  # another program's compilation
    assert p.eta() == pytest.approx(0.1 * 10)


def test_a_log_gets_whole_lines_at_most_every_few_seconds():
    stream = io.StringIO()
    p = Progress(total=1000, stream=stream, every=3600.0)
    p.begin("vanilla")
    for epoch in range(999):
        p.epoch(epoch, 0.01, runs=1)
    p.epoch(999, 0.01, runs=1)  # the last always prints
    p.close()
    lines = stream.getvalue().split("\n")
    assert "\r" not in stream.getvalue()
    assert len([line for line in lines if line]) == 2
    assert lines[-2].startswith("vanilla: 1000/1000 run-epochs (100%)")
