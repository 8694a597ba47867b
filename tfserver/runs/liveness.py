"""Whether a stored run that says it is queued or running still is.

A replica proves its runs alive with one heartbeat for all of them (`RunStore.beat`: when,
and the ids it holds), so a record that did not change is not rewritten. A stored active
run is lost once neither its record's heartbeat nor a heartbeat of its replica that lists
it is younger than `lost_after`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .store import RunRecord, RunStore

#: The replica of a run that waits on the `sqs` engine's queue (runs/queued.py).
QUEUED = "queue"

#: How long a replica's heartbeat read once answers for it (a page of runs reads it once).
_CACHE_FOR = 1.0
#: Replicas whose heartbeat is remembered at most (there are a few; a damaged store could
#: name many).
_CACHE_MAX = 64


class Liveness:
    """Judges stored active runs by their replica's heartbeat."""

    def __init__(self, store: RunStore, *, lost_after: float,
                 clock: Callable[[], float], resume_lost: int = 0) -> None:
        self.store = store
        self.lost_after = lost_after
        #: With the `sqs` engine: how many times a lost run is run again (runs/queued.py).
        self.resume_lost = resume_lost
        self.clock = clock
        self._mutex = threading.Lock()
        self._beats: dict[str, tuple[float, tuple[float, frozenset[str]] | None]] = {}

    def lost(self, record: RunRecord) -> bool:
        """True when the active run's replica no longer holds it (or stopped beating)."""
        now = self.clock()
        if now - record.heartbeat_at <= self.lost_after:
            return False
        if record.status == "queued" and record.replica == QUEUED:
            return False  # it waits on the queue (runs/queued.py), which keeps it

        beat = self._beat(record.replica)
        return beat is None or now - beat[0] > self.lost_after or record.id not in beat[1]

    def resumable(self, record: RunRecord) -> bool:
        """A lost run the queue brings back to another worker: it shows as queued until
        that worker runs it again (or ends it: a saved plan is never applied twice), so
        `lost` is only ever final."""
        return record.attempt <= self.resume_lost

    def _beat(self, replica: str) -> tuple[float, frozenset[str]] | None:
        with self._mutex:
            cached = self._beats.get(replica)
        if cached is not None and time.monotonic() - cached[0] < _CACHE_FOR:
            return cached[1]
        beat = self.store.beat_of(replica)
        with self._mutex:
            if len(self._beats) >= _CACHE_MAX:
                self._beats.clear()
            self._beats[replica] = (time.monotonic(), beat)
        return beat
