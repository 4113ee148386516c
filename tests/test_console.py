"""Tests for aecurves.console: progress that suits a log file."""

import io

from aecurves.console import PlainProgress, progress


def test_progress_to_a_file_is_plain_lines():
    stream = io.StringIO()  # not a terminal, like a log file
    bar = progress(range(5), "epoch 1", unit="batch", stream=stream, interval=0.0)
    assert isinstance(bar, PlainProgress)
    for i in bar:
        bar.set_postfix(loss=f"{i / 10:.1f}")
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 5
    assert lines[0].startswith("epoch 1: 1/5 batch after ") and lines[-1].endswith("(loss=0.4)")


def test_short_loops_and_disabled_progress_stay_silent():
    for enabled, interval in ((True, 3600.0), (False, 0.0)):
        stream = io.StringIO()
        assert list(progress(iter(range(3)), "eval", enabled, stream=stream, interval=interval)) == [0, 1, 2]
        assert stream.getvalue() == ""
