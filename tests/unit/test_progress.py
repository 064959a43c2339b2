"""The progress of long commands: a bar with rows/s and time left on a terminal, one line per
batch otherwise."""

from __future__ import annotations

import io

from dataproc.progress import Progress


class Terminal(io.StringIO):
    """A text stream that says it is a terminal, as stderr does on one."""

    def isatty(self) -> bool:
        return True


def test_off_a_terminal_each_batch_is_one_line():
    stream = io.StringIO()
    progress = Progress("prune", stream=stream)
    progress.update(10_000, 30_000)
    progress.update(20_000, 30_000)
    progress.finish()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in stream.getvalue()
    assert lines[0].startswith("prune: batch 1: 10,000/30,000 rows (33%), ")
    assert "rows/s" in lines[1] and lines[1].endswith(" left")


def test_on_a_terminal_one_bar_is_redrawn_then_ended():
    stream = Terminal()
    progress = Progress("migrate-partitions", stream=stream)
    progress.update(5, 10)
    progress.update(10, 10)
    progress.finish()
    text = stream.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1
    last = text.rsplit("\r", 1)[1]
    assert "[" + "#" * 30 + "]" in last and "10/10 rows (100%)" in last and "0 s left" in last


def test_a_total_that_grows_never_shows_more_than_a_full_bar():
    stream = Terminal()
    progress = Progress("prune", stream=stream)
    progress.update(15, 10)
    assert "#" * 30 + "]" in stream.getvalue() and "15/15 rows (100%)" in stream.getvalue()
