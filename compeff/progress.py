"""One progress display for long work: items done/total, rate, ETA and failures so far.

In a terminal it is a live rich bar on stderr; elsewhere (CI, log files) a plain line every tenth of
the work or every 30 seconds, so long runs still say where they are, and a last line with the totals
and the time taken when the work ends between two marks.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)
_prefix: list[str] = [""]


@contextmanager
def stage_prefix(prefix: str) -> Iterator[None]:
    """Prefix every progress line shown inside the block (``compeff run`` puts "[k/n] " there)."""
    _prefix.append(prefix)
    try:
        yield
    finally:
        _prefix.pop()


class Tracker:
    """Counts finished and failed items of one stage and shows them (context manager)."""

    def __init__(self, description: str, total: int | None, enabled: bool = True, done: int = 0):
        self.description = _prefix[-1] + description
        self.total = total
        self.enabled = enabled
        self.done = done
        self.failed = 0
        self._start = time.monotonic()
        self._last_line = self._start
        self._shown = done  # items counted when the last plain line was printed
        self._next_mark = self._mark_step()
        self._progress: Progress | None = None
        self._task = None

    def _mark_step(self) -> int:
        step = max(1, (self.total or 0) // 10)
        return self.done + step

    def __enter__(self) -> Tracker:
        if self.enabled and console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("[red]{task.fields[failed]} failed"),
                console=console,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                self.description, total=self.total, completed=self.done, failed=0, rate=""
            )
        return self

    def rate(self) -> float:
        """Items per second since the tracker started."""
        elapsed = time.monotonic() - self._start
        return (self.done + self.failed) / elapsed if elapsed > 0 else 0.0

    def advance(self, ok: int = 0, failed: int = 0) -> None:
        """Count ``ok`` finished and ``failed`` failed items."""
        self.done += ok
        self.failed += failed
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.update(
                self._task, advance=ok + failed, failed=self.failed, rate=f"{self.rate():,.1f}/s"
            )
            return
        now = time.monotonic()
        if self.done + self.failed >= self._next_mark or now - self._last_line > 30:
            self._next_mark = self.done + self.failed + max(1, (self.total or 0) // 10)
            self._last_line = now
            self._print_line()

    def _print_line(self, suffix: str = "") -> None:
        self._shown = self.done + self.failed
        total = f"/{self.total}" if self.total else ""
        print(
            f"{self.description}: {self._shown}{total} done, {self.failed} failed, {self.rate():.1f}/s{suffix}",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
        elif self.enabled and exc_type is None and self.done + self.failed != self._shown:
            # the work ended between two marks: say where and how long it took. A run stopped by an
            # error prints nothing more: its error is the one line the user reads
            self._print_line(f", took {time.monotonic() - self._start:.1f} s")
