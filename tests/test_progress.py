"""The plain-text progress lines (logs, CI): marks at tenths of the work and a last line at the end."""

from __future__ import annotations

import pytest
from rich.console import Console

import compeff.progress
from compeff.progress import Tracker


@pytest.fixture(autouse=True)
def plain_console(monkeypatch):
    """Plain lines, as in a log file, even where the environment forces a terminal (FORCE_COLOR)."""
    monkeypatch.setattr(compeff.progress, "console", Console(stderr=True, force_terminal=False))


def test_plain_lines_end_with_the_totals(capsys):
    with Tracker("score", total=25) as tracker:
        for _ in range(12):
            tracker.advance(ok=2)
        tracker.advance(failed=1)
    lines = capsys.readouterr().err.strip().splitlines()
    # a line at every 2 items (a tenth of 25), then one for where the work ended, with its time
    assert lines[0].startswith("score: 2/25 done, 0 failed")
    assert lines[-2].startswith("score: 24/25 done, 0 failed")
    assert lines[-1].startswith("score: 25/25 done, 1 failed") and ", took " in lines[-1]


def test_no_last_line_when_the_last_mark_said_it(capsys):
    with Tracker("eval", total=10) as tracker:
        for _ in range(10):
            tracker.advance(ok=1)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("eval: 10/10 done")


def test_disabled_tracker_prints_nothing(capsys):
    with Tracker("quiet", total=5, enabled=False) as tracker:
        tracker.advance(ok=3)
    assert capsys.readouterr().err == ""


def test_a_run_stopped_by_an_error_adds_no_line_to_its_one_line_error(capsys):
    with pytest.raises(ValueError), Tracker("teach", total=100) as tracker:
        tracker.advance(ok=3)  # between marks: nothing printed yet
        raise ValueError("bad input")
    assert capsys.readouterr().err == ""
