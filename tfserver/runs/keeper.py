"""The keeper: this replica's runs written to the store (records, events, heartbeats),
cancels left by other replicas acted on, leftovers of an earlier start marked lost, and
old records purged."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from ..errors import Conflict, TFServerError
from .run import Run

if TYPE_CHECKING:
    from .registry import Runs

logger = logging.getLogger(__name__)


class Keeper(threading.Thread):
    """Keeps this replica's runs in the store: every `heartbeat` seconds it writes each
    active run's record (a fresh heartbeat) and new events, acts on cancels other replicas
    left, and hourly deletes what is past its retention."""

    def __init__(self, runs: Runs) -> None:
        super().__init__(name="runs-heartbeat", daemon=True)
        self.runs = runs
        self.store = runs.store
        self.stop_event = threading.Event()
        self.all_leftovers = False
        self._leftovers_done = False

    def run(self) -> None:
        """Beat until stopped."""
        next_purge = 0.0
        while not self.stop_event.wait(self.runs.heartbeat):
            try:
                if not self._leftovers_done:
                    self.mark_leftovers()
                self.beat()
                if time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + 3600.0
                    now = self.runs.clock()
                    self.store.purge(runs_before=now - self.runs.retention, now=now)
            except TFServerError as e:
                logger.warning("run heartbeat: the backend failed: %s", e.detail)

    def mark_leftovers(self) -> None:
        """Mark lost the runs an earlier process of this replica left active (retried by
        the heartbeat while the backend cannot be reached)."""
        try:
            for tenant, module, run_id in self.store.active():
                if not self.all_leftovers and self.store.active_replica(
                        tenant, module, run_id) != self.runs.replica:
                    continue
                if self.runs.local(run_id) is not None:
                    continue
                record = self.store.get(run_id)
                if record is not None and record.active:
                    logger.warning("run %s was left %s by an earlier start; marked lost",
                                   run_id, record.status)
                    record.status, record.finished_at = "lost", self.runs.clock()
                    record.queue_position = None
                    self.store.save(record)
            self._leftovers_done = True
        except TFServerError as e:
            logger.warning("leftover runs not checked yet: %s", e.detail)

    def beat(self) -> None:
        """Write every active run's record and new events; act on cancels left by other
        replicas."""
        for run in self.runs.live():
            if run.done.is_set() or run.record.status not in ("queued", "running"):
                continue
            if run.record.status == "running" or not run.sync:
                self.flush(run)
            forced = self.store.cancel_request(run.record.id)
            if forced is not None:
                with contextlib.suppress(Conflict):  # it ended meanwhile
                    self.runs.cancel_local(run, forced)

    def create(self, run: Run) -> None:
        """Store a new run: its record, index entries and active marker (an async run,
        as it is queued; raises when the store cannot take it)."""
        with run._store_lock:
            run.record.heartbeat_at = self.runs.clock()
            self.store.create(replace(run.record))
            run._created = True

    def flush(self, run: Run, *, final: bool = False) -> None:
        """Store the run's record (with a fresh heartbeat) and its events if new ones came."""
        with run._store_lock:
            if run._final:
                return
            run._final = final
            record = run.record
            record.heartbeat_at = self.runs.clock()
            if run.ticket is not None and record.status == "queued":
                record.queue_position = self.runs.scheduler.position(run.ticket)
            count = len(run.events)
            if count != run._flushed:
                self.store.put_events(record.id, run.events[:count])
                run._flushed = count
            if run._created:
                self.store.save(replace(record))
            else:
                # A synchronous run is stored at its first heartbeat (or its end, if
                # sooner): nothing is written before terraform starts.
                self.store.create(replace(record))
                run._created = True

    def flush_all(self) -> None:
        """Store every run this replica holds (at stop)."""
        for run in self.runs.live():
            with contextlib.suppress(TFServerError):
                self.flush(run)
