"""A background job: one daemon thread and a stop event, for the work that runs on a schedule
(the poller, the session sweep, partition upkeep and retention).

Owns starting the thread and stopping it (waiting for a run in progress). Each job owns its
loop (`_run`, which returns once `_stop` is set) and what one run does.
"""

from __future__ import annotations

import threading
from typing import Self


class Job:
    """A job's thread; a subclass writes `_run`, which waits on `self._stop` between runs."""

    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Self:
        """Start the job's thread; returns at once."""
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        """Ask the job to stop and wait (at most `timeout_s`) for a run in progress."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        raise NotImplementedError
