"""Progress of a long command (`migrate-partitions`, `prune`) on stderr: a bar with rows/s and
the time left on a terminal, one line per batch otherwise (a log, a CI job, a pipe).

A leaf: it imports no other `dataproc` module.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR_WIDTH = 30


class Progress:
    """Call `update(done, total)` after each batch and `finish()` at the end."""

    def __init__(self, label: str, *, stream: TextIO | None = None, unit: str = "rows"):
        self.label, self.unit = label, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.monotonic()
        self.batches = 0
        self._drawn = False

    def update(self, done: int, total: int) -> None:
        """Show that `done` of `total` rows are done (total may grow)."""
        self.batches += 1
        total = max(total, done)  # rows may arrive meanwhile: never past a full bar
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = done / elapsed
        left = (total - done) / rate if rate > 0 and total > done else 0.0
        share = done / total if total else 1.0
        figures = (
            f"{done:,}/{total:,} {self.unit} ({share:.0%}), {rate:,.0f} {self.unit}/s, "
            f"{_duration(left)} left"
        )
        if self.tty:
            filled = round(BAR_WIDTH * min(share, 1.0))
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            self.stream.write(f"\r{self.label} [{bar}] {figures}\x1b[K")
            self._drawn = True
        else:
            self.stream.write(f"{self.label}: batch {self.batches}: {figures}\n")
        self.stream.flush()

    def finish(self) -> None:
        """End the bar's line (a terminal); nothing otherwise."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
