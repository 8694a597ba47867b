"""Runs as resources: records, events, the per-instance queue, cancel, heartbeats.

Every apply, destroy and plan is a `Run`. The replica that runs it keeps it in memory
(events reach followers on this replica at once) and writes its record (when it changed)
and event log to the backend's object store, and a heartbeat of its runs every
`heartbeat` seconds, so any replica can read, follow and cancel it. A stored active run
its replica stopped holding for `lost_after` seconds shows as `lost` (see `liveness`).
What a run does is the service's job (a callable); this module knows no HTTP and no
terraform.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from ..errors import Conflict, NotFound, TFServerError
from .keeper import Keeper
from .lanes import Scheduler
from .liveness import Liveness
from .parked import Awaiting, Parking
from .run import Run, tell
from .store import AWAITING, ENDED, RunRecord, RunStore, is_run_id
from .workers import Workers

logger = logging.getLogger(__name__)

#: How long a follower waits for news before it yields an empty batch (a keep-alive).
FOLLOW_IDLE = 15.0
#: How often a follower on another replica reads the stored event log (the keeper stores
#: new events about as often: keeper.EVENTS_EVERY).
FOLLOW_POLL = 0.25
#: How long a follower on another replica reads for the `finished` event of a run whose
#: record says it ended (the events are stored just after the record).
FINAL_EVENTS = 2.0
#: How long a synchronous run's final record waits for its caller to take the outcome.
_ANSWER_FIRST = 0.05

#: What is told of a run's record (its end, its loss, its parking).
Tell = Callable[[RunRecord], None]


class Runs(Parking):
    """The runs of this replica, and the door to every replica's runs."""

    def __init__(self, store: RunStore, scheduler: Scheduler, *, replica: str,
                 kill_grace: float, heartbeat: float = 2.0, lost_after: float = 10.0,
                 retention: float = 30 * 86400.0, clock: Callable[[], float] = time.time,
                 on_finish: Tell | None = None, on_ended: Tell | None = None,
                 on_lost: Tell | None = None, on_parked: Tell | None = None,
                 resume_lost: int = 0, run_thread: Callable[[], None] | None = None) -> None:
        self.store = store
        self.scheduler = scheduler
        self.replica = replica
        self.kill_grace = kill_grace
        self.clock = clock
        #: Told of every run that ends here, before anyone sees it ended (metrics), and
        #: once its synchronous caller has its answer (the audit line).
        self.on_finish, self.on_ended, self.on_parked = on_finish, on_ended, on_parked
        self._mutex = threading.Lock()
        self._live: dict[str, Run] = {}
        # `run_thread` starts each thread that runs terraform or keeps the runs' records.
        self._workers = Workers("run", on_start=run_thread)
        self.liveness = Liveness(store, lost_after=lost_after, clock=clock,
                                 resume_lost=resume_lost)
        self.keeper = Keeper(store, replica=replica, heartbeat=heartbeat, retention=retention,
                             clock=clock, position=scheduler.position,
                             cancel=self.cancel_local, on_lost=on_lost, on_start=run_thread)

    # -- start and stop ---------------------------------------------------------------

    def start(self, *, leftovers: str = "mine") -> None:
        """Mark leftover runs lost (`mine`, `all`: the store is this server's alone, `none`:
        the `sqs` queue brings them back); then keep the store up to date."""
        self.keeper.leftovers = leftovers
        self.keeper.mark_leftovers()
        self.keeper.start()

    def stop(self) -> None:
        """Stop the heartbeat (after the last run ended) and store what is left."""
        self.keeper.stop()
        if self.keeper.is_alive():
            self.keeper.join(5)
        self.keeper.flush_all()

    def close_queues(self) -> int:
        """Refuse new runs and cancel every queued one (the server is stopping)."""
        dropped = self.scheduler.close()
        for run in self.live():
            if run.ticket is not None and any(run.ticket is t for t in dropped):
                self.stop_waiting(run)
        return len(dropped)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no run of this replica runs or is being ended (its audit line, final
        record; one awaiting approval stays stored); False on timeout."""
        return _wait_idle(lambda: [r for r in self.live() if r.record.status != AWAITING],
                          timeout)

    # -- submitting -------------------------------------------------------------------

    def submit(self, run: Run, *, what: str, wait: float = 0.0) -> Run:
        """Queue the run on its instance's lane (once admitted, its job runs in a thread of
        its own); a synchronous run waits up to `wait` for the instance. Raises `Conflict`
        or `Unavailable` when the run is refused (then nothing is stored)."""
        record = run.record
        record.replica = self.replica
        run.ticket = self._ticket(run, what)
        with self._mutex:
            self._live[record.id] = run
        self.keeper.track(run)
        try:
            if not run.sync:
                run.emit("queued")
                self.keeper.create(run)
            self.scheduler.enqueue(run.ticket, wait=wait)
        except TFServerError:
            self.keeper.forget(run)
            with self._mutex:
                self._live.pop(record.id, None)
            if not run.sync:
                self.store.delete(record)
            raise
        if not run.sync and record.started_at is None:
            record.queue_position = self.scheduler.position(run.ticket)
        return run

    def adopt(self, run: Run) -> None:
        """Run here, in the calling thread and to its end, a run another replica queued
        and stored (the `sqs` engine's worker)."""
        run.record.replica, run.ticket = self.replica, None
        run.events[:0] = self.store.get_events(run.record.id)  # its seq numbers go on
        with self._mutex:
            self._live[run.record.id] = run
        self.keeper.track(run, stored=True)
        self._execute(run)

    def _execute(self, run: Run) -> None:
        record = run.record
        record.status, record.started_at, record.queue_position = "running", self.clock(), None
        run.emit("started")
        # A synchronous run's record (and its other `on_started` work) is stored as
        # terraform starts: written before, it held the GIL from the run's way to terraform.
        when = run.control.when_started if run.sync else (lambda fn: fn())
        when(lambda: self.keeper.soon(run))
        status = "failed"
        try:
            run.result = run.job(run)
            status = AWAITING if isinstance(run.result, Awaiting) else "succeeded"
        except TFServerError as e:
            run.error = e
            status = "canceled" if run.control.reason == "cancel" else "failed"
        except Exception:
            logger.exception("run %s failed unexpectedly", record.id)
            run.error = TFServerError(f"the run failed unexpectedly; see the server log for "
                                      f"run {record.id}")
        finally:
            if status == AWAITING:
                self._park(run)
            else:
                self._finish(run, status)

    def _finish(self, run: Run, status: str) -> None:
        """End the run: free its lane first (whoever sees it ended may use the instance at
        once), then its record, its `finished` event, the store, the listeners."""
        record = run.record
        record.finished_at = self.clock()
        if run.ticket is not None:
            self.scheduler.finish(run.ticket)
        if run.error is not None:
            record.problem = run.error.problem()
        if run.control.killed:
            record.cancel, record.state_may_be_locked = "forced", True
        record.status = status
        run.emit("finished", status=status, changes=record.changes, problem=record.problem)
        tell(self.on_finish, record, "end")
        # The caller waiting on the run answers now; the store follows. Until the record
        # is stored the run stays this replica's, so `record` and `page` still show it.
        run.done.set()
        run.wake()
        if run.sync and record.started_at is not None:
            # Written at once, the record took the GIL from the waking caller: it waits.
            run.answered.wait(_ANSWER_FIRST)
        try:
            run.started()  # what waited for a terraform that never ran
            tell(self.on_ended, record, "end")
            self.keeper.flush(run, final=True)
        except TFServerError as e:
            logger.error("run %s: its final record could not be stored: %s", record.id, e)
        finally:
            self.keeper.forget(run)
            with self._mutex:  # a shutdown waits for this (`wait_idle`)
                self._live.pop(record.id, None)

    # -- reading ----------------------------------------------------------------------

    def local(self, run_id: str) -> Run | None:
        """The run, if this replica holds it."""
        with self._mutex:
            return self._live.get(run_id)

    def record(self, run_id: str) -> RunRecord:
        """The run's record as any replica would show it (`NotFound` if none)."""
        run = self.local(run_id) if is_run_id(run_id) else None
        if run is not None:
            shown = replace(run.record)
            if run.ticket is not None and shown.status == "queued":
                shown.queue_position = self.scheduler.position(run.ticket)
            return shown
        record = self.store.get(run_id) if is_run_id(run_id) else None
        if record is None:
            raise NotFound(f"no run {run_id[:40]!r}")
        if record.active and self.liveness.lost(record):
            record.state_may_be_locked = record.started_at is not None
            record.status = "queued" if self.liveness.resumable(record) else "lost"
        return record

    def unstored(self) -> list[RunRecord]:
        """Copies of the records this replica holds that are not stored yet (a synchronous
        run is stored at its first heartbeat, or just after its answer)."""
        return [replace(r.record) for r in self.live() if not self.keeper.stored(r)]

    def amend(self, run_id: str, change: Callable[[RunRecord], None]) -> bool:
        """Change the record of a run this replica holds; True when its last store write
        is still to come (and will carry the change), False when the store must be
        changed instead."""
        run = self.local(run_id)
        return run is not None and self.keeper.amend(run, change)

    def in_flight(self, tenant: str, module: str) -> list[RunRecord]:
        """The tenant's runs of the module that are queued or running on any replica
        (runs whose replica stopped beating are not counted)."""
        ids = [r for t, m, r in self.store.active() if t == tenant and m == module]
        return [record for record in self.records(ids) if record.active]

    def records(self, ids: list[str]) -> list[RunRecord]:
        """Records of several runs, skipping any that vanished meanwhile."""
        found = []
        for run_id in ids:
            try:
                found.append(self.record(run_id))
            except NotFound:
                continue
        return found

    # -- cancel -----------------------------------------------------------------------

    def cancel(self, run_id: str, *, force: bool) -> RunRecord:
        """Cancel a queued run at once, interrupt a running one (kill it when forced, or
        on a second cancel after the kill grace); `Conflict` when it already ended."""
        run = self.local(run_id)
        if run is None:
            record = self.record(run_id)
            if not record.active:
                raise Conflict(f"run {run_id} already ended ({record.status})", retry_after=0)
            self.store.request_cancel(run_id, force=force)
            record.cancel = record.cancel or "requested"
            return record
        self.cancel_local(run, force)
        return self.record(run_id)

    def follow(self, run_id: str, after: int = 0) -> Iterator[list[dict[str, Any]]]:
        """Batches of events after `after`: the stored ones, then live ones as they
        come, until the run's `finished` event; an empty batch means "still waiting"."""
        run = self.local(run_id)
        if run is not None:
            return _follow_local(run, after)
        return _follow_stored(self, run_id, after)

    def live(self) -> list[Run]:
        """The runs this replica holds now."""
        with self._mutex:
            return list(self._live.values())

    def cancel_local(self, run: Run, force: bool) -> None:
        """Cancel a run this replica holds (see `cancel`)."""
        if run.done.is_set():
            raise Conflict(f"run {run.record.id} already ended ({run.record.status})",
                           retry_after=0)
        if run.ticket is not None and self.scheduler.withdraw(run.ticket):
            self.end_waiting(run, "canceled", "the run was canceled before it began")
            return
        now = time.monotonic()
        second = run.cancel_asked_at is not None and now - run.cancel_asked_at >= self.kill_grace
        run.record.cancel = run.record.cancel or "requested"
        if force or second:
            run.control.kill("cancel")
            run.record.cancel, run.record.state_may_be_locked = "forced", True
        elif run.control.interrupt("cancel"):
            run.cancel_asked_at = now
        run.emit("canceling", force=force or second)


def _follow_local(run: Run, after: int) -> Iterator[list[dict[str, Any]]]:
    """A run of this replica: events as they are emitted (no polling)."""
    seq = after
    while True:
        batch = run.events_after(seq, FOLLOW_IDLE)
        if batch:
            seq = batch[-1]["seq"]
            yield batch
        if any(e["type"] == "finished" for e in batch):
            return
        if run.done.is_set() and len(run.events) <= seq:
            return
        if not batch:
            yield []  # still waiting: the follower's reader may look up (keep-alive, bound)


def _follow_stored(runs: Runs, run_id: str, after: int) -> Iterator[list[dict[str, Any]]]:
    """A run of another replica: its stored event log, read every FOLLOW_POLL seconds."""
    seq = after
    idle = 0.0
    ended: float | None = None
    while True:
        events = [e for e in runs.store.get_events(run_id) if e.get("seq", 0) > seq]
        if events:
            seq = events[-1]["seq"]
            idle = 0.0
            yield events
            if any(e.get("type") == "finished" for e in events):
                return
        record = runs.record(run_id)
        if record.status == "lost":
            return
        if record.status in ENDED and not events:
            # The final record is stored just before the final events (keeper.py): its
            # `finished` may be a moment behind it, and is read for up to FINAL_EVENTS.
            ended = time.monotonic() if ended is None else ended
            if time.monotonic() - ended >= FINAL_EVENTS:
                return
        time.sleep(FOLLOW_POLL)
        idle += FOLLOW_POLL
        if idle >= FOLLOW_IDLE:
            idle = 0.0
            yield []


def _wait_idle(live: Callable[[], list[Run]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        runs = live()
        if not runs:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if runs[0].done.is_set():
            time.sleep(min(left, 0.01))  # ended: its record is being stored
        else:
            runs[0].done.wait(min(left, 0.5))
