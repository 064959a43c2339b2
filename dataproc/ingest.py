"""One ingestion: fetch a document, parse it, apply the validity rules, store it once.

Owns: the validity rules of API.md (invalid tags; "too old" at ingestion; "non-finite"), the
order of the steps, and what a batch does when one of its fetches fails. Leaves bytes to
`upstream.fetch`, parsing to `upstream.document`, SQL to `store`, and HTTP status codes to
`api` (failures are raised as `IngestFailure` with a kind, never as a status).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from psycopg_pool import ConnectionPool

from . import store
from .config import Config
from .upstream import document, fetch

log = logging.getLogger("dataproc.ingest")

TOO_OLD, NON_FINITE = "too old", "non-finite"


class IngestFailure(Exception):
    """No point could be stored. `kind`: unconfigured, unreachable, timeout or invalid."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


@dataclass
class Batch:
    """What `count` fetches gave: stored points (JSON bytes), duplicates, rejections."""

    stored: list[bytes] = field(default_factory=list)
    duplicates: int = 0
    rejected: list[str] = field(default_factory=list)


def assess(reading: document.Reading, raw: bytes, config: Config, now: float) -> store.NewPoint:
    """Apply the validity rules to a parsed reading: the point as it will be stored."""
    tags = list(reading.tags)
    valid = not any(tag in config.invalid_tags for tag in tags)
    if config.max_age_s and now - reading.time.timestamp() > config.max_age_s:
        valid = False
        tags.append(TOO_OLD)  # as the original service does
    if not math.isfinite(reading.value):
        valid = False
        tags.append(NON_FINITE)
    return store.NewPoint(
        reading.time, reading.value, valid, tags, raw.decode("utf-8"), reading.identity
    )


class Ingestor:
    """Fetch-parse-store against one upstream URL; `on_outcome` counts each result by name."""

    def __init__(
        self,
        config: Config,
        pool: ConnectionPool,
        upstream_url: str | None,
        *,
        clock: Callable[[], float] = time.time,
        on_outcome: Callable[[str], None] | None = None,
    ):
        self.config, self.pool, self.url = config, pool, upstream_url
        self.clock = clock
        self._on_outcome = on_outcome or (lambda outcome: None)

    def one(self) -> tuple[bytes, bool]:
        """Store one point: its JSON and whether it is new (False: the document was known)."""
        raw = self._fetch()
        try:
            reading = document.parse(raw)
        except document.InvalidDocument as error:
            self._reject(f"invalid document: {error.reason}", raw)
            raise IngestFailure(
                "invalid", f"upstream sent an invalid document: {error.reason}"
            ) from None
        point_json, new = store.insert_point(
            self.pool, assess(reading, raw, self.config, self.clock())
        )
        self._on_outcome("stored" if new else "duplicate")
        return point_json, new

    def batch(self, count: int) -> Batch:
        """Up to `count` points. An upstream failure before anything was stored is raised;
        after that it ends the batch and is listed with the rejections (what was stored stays)."""
        result = Batch()
        for _ in range(count):
            try:
                point_json, new = self.one()
            except IngestFailure as failure:
                if failure.kind == "invalid":
                    result.rejected.append(failure.reason)
                    continue
                if not result.stored and not result.duplicates and not result.rejected:
                    raise
                result.rejected.append(failure.reason)
                break
            if new:
                result.stored.append(point_json)
            else:
                result.duplicates += 1
        return result

    def _fetch(self) -> bytes:
        if not self.url:
            self._on_outcome("unconfigured")
            raise IngestFailure("unconfigured", "no upstream configured (set SERVER_URL)")
        config = self.config
        try:
            return fetch.get(
                self.url, timeout_s=config.upstream_timeout_s, max_bytes=config.upstream_max_bytes
            )
        except fetch.UpstreamTimeout as error:
            self._on_outcome("timeout")
            raise IngestFailure("timeout", error.reason) from None
        except fetch.UpstreamError as error:
            self._on_outcome("upstream_error")
            if error.body:  # whatever was received is kept (an oversized answer, a 5xx page)
                self._keep(error.reason, error.body)
            raise IngestFailure("unreachable", error.reason) from None

    def _reject(self, reason: str, body: bytes) -> None:
        self._on_outcome("rejected")
        self._keep(reason, body)

    def _keep(self, reason: str, body: bytes) -> None:
        log.warning("upstream answer rejected: %s (%d bytes kept)", reason, len(body))
        store.insert_reject(self.pool, reason, body)
