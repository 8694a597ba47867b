"""Event streams: how many one tenant may hold open, how long one may last, and the
writing of a run's events as NDJSON or Server-Sent Events.

A stream holds a connection (and its thread) for as long as its run goes on, and a queued
run may wait for long: without a cap, one tenant opening streams of a queued run takes
every connection. Each tenant may hold `per_tenant` streams, and each stream ends after
`max_seconds`, resumably: an NDJSON client asks again with `?after=<last seq>`, an
EventSource reconnects by itself with `Last-Event-ID`.

The follower of a run (`Service.follow`) yields a batch when events come and an empty one
every 15 s of quiet (runs.registry.FOLLOW_IDLE): the deadline and a client that went
away are seen at those moments, so a stream may outlive its bound, and a dropped stream
hold its place, by up to that long.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..errors import TooManyStreams
from ..settings import default
from . import render

#: How soon, at most, an idle follower yields: a place freed by a dropped stream is free
#: again after this long (the Retry-After of a refused stream).
IDLE_TICK = 15
#: What an EventSource is told to wait before it reconnects after the stream's time is up.
SSE_RETRY_MS = 1000

Writer = Callable[[bytes], None]


class StreamLimits:
    """Counts each tenant's open event streams (one per server) and bounds their life."""

    def __init__(self, per_tenant: int = default("TFSERVER_MAX_STREAMS_PER_TENANT"),
                 max_seconds: float = default("TFSERVER_STREAM_MAX")) -> None:
        self.per_tenant = per_tenant
        self.max_seconds = max_seconds
        self._mutex = threading.Lock()
        self._open: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """A place for one stream of `key` (a tenant) while the block runs, however it
        ends; 429 when the tenant holds every place."""
        with self._mutex:
            held = self._open.get(key, 0)
            if held >= self.per_tenant:
                raise TooManyStreams(
                    f"{held} event streams are open for this tenant; the limit is "
                    f"{self.per_tenant} (TFSERVER_MAX_STREAMS_PER_TENANT): close one, or "
                    "poll the run", limit=self.per_tenant, retry_after=IDLE_TICK)
            self._open[key] = held + 1
        try:
            yield
        finally:
            with self._mutex:
                left = self._open.get(key, 1) - 1
                if left > 0:
                    self._open[key] = left
                else:
                    self._open.pop(key, None)

    def open(self, key: str | None = None) -> int:
        """Streams open now: of `key`, or of every tenant."""
        with self._mutex:
            return self._open.get(key, 0) if key is not None else sum(self._open.values())


def relay(batches: Iterable[list[dict[str, Any]]], write: Writer, *, sse: bool,
          seconds: float, gone: Callable[[], bool],
          clock: Callable[[], float]) -> None:
    """Write the batches of a run's events until the run ends, the client goes away, or
    `seconds` pass; then end the body (a client gone gets nothing more)."""
    end = clock() + seconds
    try:
        for batch in batches:
            if batch:
                write(_chunk(batch, sse))
            elif gone():
                return  # nobody reads: give the place back now, not at the deadline
            elif sse:
                write(b": waiting\n\n")  # keeps proxies from timing the stream out
            if clock() >= end and not any(e["type"] == "finished" for e in batch):
                if sse:
                    # No event: only a hint; the EventSource reconnects with Last-Event-ID.
                    write(b": the stream's time is up; reconnect with Last-Event-ID\n"
                          b"retry: %d\n\n" % SSE_RETRY_MS)
                break
        write(b"")
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # the follower lets go of its run now, not when collected


def _chunk(batch: list[dict[str, Any]], sse: bool) -> bytes:
    """One batch of events in the stream's format."""
    lines = []
    for e in batch:
        data = json.dumps(render.event(e), separators=(",", ":"))
        lines.append(f"id: {e['seq']}\nevent: {e['type']}\ndata: {data}\n\n" if sse
                     else data + "\n")
    return "".join(lines).encode()
