"""The keeper: this replica's runs written to the store (records, events, heartbeats),
cancels left by other replicas acted on, leftovers of an earlier start marked lost, and
old records purged.

The keeper is the one owner of what a run's stored form is: whether its record was
created, how many of its events are stored, and whether its final record was written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..errors import Conflict, TFServerError
from .lanes import Ticket
from .run import Run
from .store import RunRecord, RunStore

logger = logging.getLogger(__name__)

#: How often new events of a running run are stored, between heartbeats: a follower on
#: another replica (an API replica following a worker's run) reads them that much later.
EVENTS_EVERY = 0.2


@dataclass(eq=False)
class _Kept:
    """What is stored of one run."""

    run: Run
    #: Held while the run's record is written: the heartbeat never overwrites the final
    #: record with an older one.
    lock: threading.Lock = field(default_factory=threading.Lock)
    created: bool = False
    final: bool = False
    events: int = 0
    #: The record as last written, its heartbeat left out: an unchanged record is not
    #: written again (the replica's heartbeat says it is alive).
    written: bytes = b""


class Keeper(threading.Thread):
    """Keeps this replica's runs in the store: every `heartbeat` seconds it writes one
    heartbeat naming its active runs, each record that changed and new events, acts on
    cancels other replicas left (through `cancel`), and hourly deletes what is past its
    `retention`."""

    def __init__(self, store: RunStore, *, replica: str, heartbeat: float, retention: float,
                 clock: Callable[[], float], position: Callable[[Ticket], int | None],
                 cancel: Callable[[Run, bool], None],
                 on_lost: Callable[[RunRecord], None] | None = None,
                 on_start: Callable[[], None] | None = None) -> None:
        super().__init__(name="runs-heartbeat", daemon=True)
        #: Called first in the keeper's thread (the server's `Affinity.anywhere`).
        self.on_start = on_start
        self.store = store
        self.replica = replica
        self.heartbeat = heartbeat
        self.retention = retention
        self.clock = clock
        self.position = position
        self.cancel = cancel
        #: Told of each leftover run before it is stored `lost`: it may say what terraform
        #: did after the replica died, and whether the state is still locked.
        self.on_lost = on_lost
        self.stop_event = threading.Event()
        #: Runs to store at once (a run that just started), off the run's own path.
        self._soon: list[Run] = []
        self._wake = threading.Event()
        #: Which leftover runs to mark lost: `mine`, `all` or `none` (Runs.start).
        self.leftovers = "mine"
        self._leftovers_done = False
        self._mutex = threading.Lock()
        self._kept: dict[str, _Kept] = {}

    def run(self) -> None:
        """Beat until stopped; store a started run as soon as it is asked to."""
        if self.on_start is not None:
            self.on_start()
        next_purge = 0.0
        next_beat = time.monotonic() + self.heartbeat
        next_events = time.monotonic() + EVENTS_EVERY
        while not self.stop_event.is_set():
            self._wake.wait(max(0.0, min(next_beat, next_events) - time.monotonic()))
            self._wake.clear()
            try:
                self._store_soon()
                if time.monotonic() < next_beat or self.stop_event.is_set():
                    # Every EVENTS_EVERY, not at each wake: a run that just started
                    # wakes the keeper for its record, and its first events can wait.
                    if time.monotonic() >= next_events:
                        next_events = time.monotonic() + EVENTS_EVERY
                        self._store_events()
                    continue
                next_beat = time.monotonic() + self.heartbeat
                if not self._leftovers_done:
                    self.mark_leftovers()
                self.beat()
                if time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + 3600.0
                    now = self.clock()
                    self.store.purge(runs_before=now - self.retention, now=now)
            except TFServerError as e:
                logger.warning("run heartbeat: the backend failed: %s", e.detail)

    def soon(self, run: Run) -> None:
        """Store the run's record now, in the keeper's thread (a run that started: if
        this replica dies, its record says terraform ran), then do its `on_started`."""
        with self._mutex:
            self._soon.append(run)
        self._wake.set()

    def stop(self) -> None:
        """Stop the heartbeat (the thread ends at its next wake)."""
        self.stop_event.set()
        self._wake.set()

    def _store_events(self) -> None:
        """Store the new events of running runs (followers on other replicas read them)."""
        for kept in self._entries():
            run = kept.run
            if run.record.status == "running" and not run.done.is_set() \
                    and len(run.events) != kept.events:
                self.flush(run)

    def _store_soon(self) -> None:
        with self._mutex:
            runs, self._soon = self._soon, []
        for run in runs:
            try:
                if not run.done.is_set():
                    # A synchronous run's record only: its events follow within
                    # EVENTS_EVERY (a crash needs the record to say terraform ran; most
                    # such runs end before that, and their caller is here). An
                    # asynchronous run's events go too: it is followed from anywhere, and
                    # a replica that dies at once must leave them with its record.
                    self.flush(run, events=not run.sync)
            finally:
                run.started()  # the rest of what waited for terraform's start

    # -- the runs kept ----------------------------------------------------------------

    def track(self, run: Run, *, stored: bool = False) -> None:
        """Keep the run from now on (it was submitted here, or `stored` by the replica
        that queued it)."""
        with self._mutex:
            self._kept[run.record.id] = _Kept(run, created=stored,
                                              events=len(run.events) if stored else 0)

    def forget(self, run: Run) -> None:
        """Stop keeping the run (its final record is written, or it was refused)."""
        with self._mutex:
            self._kept.pop(run.record.id, None)

    def _entry(self, run: Run) -> _Kept | None:
        with self._mutex:
            return self._kept.get(run.record.id)

    def _entries(self) -> list[_Kept]:
        with self._mutex:
            return list(self._kept.values())

    def stored(self, run: Run) -> bool:
        """True once the run's record is in the store (a synchronous run is stored at its
        first heartbeat, or just after its answer)."""
        kept = self._entry(run)
        return kept is None or kept.created

    def amend(self, run: Run, change: Callable[[RunRecord], None]) -> bool:
        """Change the run's record; True when its last store write is still to come (and
        will carry the change), False when the store must be changed instead."""
        kept = self._entry(run)
        if kept is None:
            return False
        with kept.lock:  # not between a flush's copy of the record and its write
            change(run.record)
            return not kept.final

    # -- writing ----------------------------------------------------------------------

    def create(self, run: Run) -> None:
        """Store a new run: its record, index entries and active marker (an async run,
        as it is queued; raises when the store cannot take it)."""
        kept = self._entry(run)
        assert kept is not None, "a run is tracked before it is stored"
        with kept.lock:
            run.record.heartbeat_at = self.clock()
            self.store.create(replace(run.record))
            kept.created, kept.written = True, _shape(run.record)

    def flush(self, run: Run, *, final: bool = False, events: bool = True) -> None:
        """Store the run's new events (unless not `events`), and its record (with a fresh
        heartbeat) if it changed, or is the final one. The final record goes before the
        events: a follower on another replica ends at the `finished` event and may read
        the record at once, which must then be the ended one."""
        kept = self._entry(run)
        if kept is None:
            return
        with kept.lock:
            if kept.final:
                return
            kept.final = final
            record = run.record
            if run.ticket is not None and record.status == "queued":
                record.queue_position = self.position(run.ticket)
            if not final:
                self._put_events(run, kept, events)
            # The final record is written whatever it is: only the others are compared
            # with what was written last (a record serialised once less a run).
            shape = b"" if final else _shape(record)
            if kept.created and not final and shape == kept.written:
                return
            try:
                record.heartbeat_at = self.clock()
                if kept.created:
                    self.store.save(replace(record))
                else:
                    # A synchronous run is first stored as terraform starts (`soon`), or
                    # at its end if that came first.
                    self.store.create(replace(record))
                    kept.created = True
                kept.written = shape  # once written: a failed write is tried again
            finally:
                if final:  # even when the record could not be stored: its events are
                    self._put_events(run, kept, events)

    def _put_events(self, run: Run, kept: _Kept, events: bool) -> None:
        count = len(run.events)
        if events and count != kept.events:
            self.store.put_events(run.record.id, run.events[:count])
            kept.events = count

    def flush_all(self) -> None:
        """Store every run this replica holds (at stop)."""
        for kept in self._entries():
            with contextlib.suppress(TFServerError):
                self.flush(kept.run)

    # -- the heartbeat ----------------------------------------------------------------

    def beat(self) -> None:
        """Say this replica holds its active runs (one write), store the records that
        changed and new events, act on cancels left by other replicas (one listing)."""
        active = [k.run for k in self._entries()
                  if not k.run.done.is_set() and k.run.record.active]
        if not active:
            return
        self.store.beat(self.replica, self.clock(), [run.record.id for run in active])
        cancels = self.store.cancel_requests()
        for run in active:
            if run.record.status == "running" or not run.sync:
                self.flush(run)
            forced = self.store.cancel_request(run.record.id) \
                if run.record.id in cancels else None
            if forced is not None:
                with contextlib.suppress(Conflict):  # it ended meanwhile
                    self.cancel(run, forced)

    def mark_leftovers(self) -> None:
        """Mark lost the runs an earlier process of this replica left active (retried by
        the heartbeat while the backend cannot be reached)."""
        if self.leftovers == "none":
            self._leftovers_done = True
            return
        try:
            for tenant, module, run_id in self.store.active():
                if self.leftovers != "all" and self.store.active_replica(
                        tenant, module, run_id) != self.replica:
                    continue
                with self._mutex:
                    if run_id in self._kept:
                        continue
                record = self.store.get(run_id)
                if record is not None and record.active:
                    logger.warning("run %s was left %s by an earlier start; marked lost",
                                   run_id, record.status)
                    record.status, record.finished_at = "lost", self.clock()
                    record.queue_position = None
                    if self.on_lost is not None:
                        self.on_lost(record)
                    self.store.save(record)
            self._leftovers_done = True
        except TFServerError as e:
            logger.warning("leftover runs not checked yet: %s", e.detail)


def _shape(record: RunRecord) -> bytes:
    """The record as stored, but for its heartbeat."""
    shape = dict(vars(record), heartbeat_at=0.0)
    return json.dumps(shape, separators=(",", ":")).encode()
