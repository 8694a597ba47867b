"""Runs as resources: records, events, the per-instance queue, cancel, heartbeats.

Every apply, destroy and plan is a `Run`. The replica that runs it keeps it in memory
(events reach followers on this replica at once) and writes its record and event log to
the backend's object store at least every `heartbeat` seconds, so any replica can read,
follow and cancel it. A stored record whose heartbeat is older than `lost_after` shows as
`lost`. What a run does is the service's job (a callable); this module knows no HTTP and
no terraform.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import Any

from .errors import Conflict, NotFound, TFServerError
from .locks import Scheduler, Ticket
from .runstore import ENDED, RunRecord, RunStore, is_run_id
from .terraform import RunControl

logger = logging.getLogger(__name__)

#: How long a follower waits for news before it yields an empty batch (a keep-alive).
FOLLOW_IDLE = 15.0
#: How often a follower on another replica reads the stored event log.
FOLLOW_POLL = 1.0
#: How long a synchronous run's final record waits for its caller to take the outcome.
_ANSWER_FIRST = 0.05


class RunProblem(TFServerError):
    """A failed run's stored problem document, answered again (for example to an
    idempotent retry): its status and fields are the original answer's."""

    def __init__(self, problem: dict[str, Any]) -> None:
        super().__init__(str(problem.get("detail", "")),
                         extra={k: v for k, v in problem.items()
                                if k not in ("type", "title", "status", "detail")})
        self.stored = problem
        try:
            self.status = HTTPStatus(int(problem.get("status", 500)))
        except ValueError:
            self.status = HTTPStatus.INTERNAL_SERVER_ERROR

    def problem(self) -> dict[str, Any]:
        """The stored document as it was."""
        return dict(self.stored)


@dataclass(eq=False)
class Run:
    """One run on this replica: its record, events, place in line and process handle."""

    record: RunRecord
    job: Callable[[Run], Any]
    #: Scrubs the run's events; a destroy learns its secrets (the kept inputs) only once
    #: it runs, so this may be a view of a scrubber that changes.
    scrub: Callable[[str], str]
    sync: bool = False
    events: list[dict[str, Any]] = field(default_factory=list)
    control: RunControl = field(default_factory=RunControl)
    done: threading.Event = field(default_factory=threading.Event)
    #: Set once a synchronous caller's answer is on the wire: the final record waits
    #: for it (at most `_ANSWER_FIRST`), so the answer does not compete with the store.
    answered: threading.Event = field(default_factory=threading.Event)
    #: What the job returned (a service result), or the error it raised.
    result: Any = None
    error: TFServerError | None = None
    ticket: Ticket | None = None
    cancel_asked_at: float | None = None
    _cond: threading.Condition = field(default_factory=threading.Condition)
    #: Held while the run's record is written: the heartbeat never overwrites the final
    #: record with an older one.
    _store_lock: threading.Lock = field(default_factory=threading.Lock)
    _flushed: int = 0
    _final: bool = False
    _created: bool = False

    def emit(self, kind: str, **fields: Any) -> None:
        """Add an event (every string scrubbed) and wake the followers."""
        with self._cond:
            event = {"seq": len(self.events) + 1, "time": time.time(), "type": kind,
                     **_scrubbed(fields, self.scrub)}
            self.events.append(event)
            self._cond.notify_all()

    def events_after(self, seq: int, timeout: float) -> list[dict[str, Any]]:
        """Events after `seq`, waiting up to `timeout` for the first one."""
        with self._cond:
            if len(self.events) <= seq and not self.done.is_set():
                self._cond.wait(timeout)
            return self.events[seq:]

    def wake(self) -> None:
        """Wake the followers (the run ended)."""
        with self._cond:
            self._cond.notify_all()


def _scrubbed(value: Any, scrub: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: _scrubbed(v, scrub) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrubbed(v, scrub) for v in value]
    return value


class Runs:
    """The runs of this replica, and the door to every replica's runs."""

    def __init__(self, store: RunStore, scheduler: Scheduler, *, replica: str,
                 kill_grace: float, heartbeat: float = 2.0, lost_after: float = 10.0,
                 retention: float = 30 * 86400.0,
                 clock: Callable[[], float] = time.time,
                 on_finish: Callable[[RunRecord], None] | None = None,
                 on_ended: Callable[[RunRecord], None] | None = None) -> None:
        self.store = store
        self.scheduler = scheduler
        self.replica = replica
        self.kill_grace = kill_grace
        self.heartbeat = heartbeat
        self.lost_after = lost_after
        self.retention = retention
        self.clock = clock
        #: Told of every run that ends here, before anyone sees it ended (metrics), and
        #: once its synchronous caller has its answer (the audit line).
        self.on_finish, self.on_ended = on_finish, on_ended
        self._mutex = threading.Lock()
        self._live: dict[str, Run] = {}
        self._workers = Workers("run")
        self.keeper = Keeper(self)

    # -- start and stop ---------------------------------------------------------------

    def start(self, *, all_leftovers: bool = False) -> None:
        """Mark this replica's leftover runs lost (every leftover, when the store is this
        server's alone), then keep the store up to date in the background."""
        self.keeper.all_leftovers = all_leftovers
        self.keeper.mark_leftovers()
        self.keeper.start()

    def stop(self) -> None:
        """Stop the heartbeat (after the last run ended) and store what is left."""
        self.keeper.stop_event.set()
        if self.keeper.is_alive():
            self.keeper.join(5)
        self.keeper.flush_all()

    def close_queues(self) -> int:
        """Refuse new runs and cancel every queued one (the server is stopping)."""
        dropped = self.scheduler.close()
        for ticket in dropped:
            run = self._run_of(ticket)
            if run is not None:
                self._end_unstarted(run, "canceled", "the server stopped before the run began")
        return len(dropped)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no run of this replica is running, nor still being ended (its audit
        line, its final record); False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            with self._mutex:
                live = list(self._live.values())
            if not live:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if live[0].done.is_set():
                time.sleep(min(left, 0.01))  # ended: its record is being stored
            else:
                live[0].done.wait(min(left, 0.5))

    # -- submitting -------------------------------------------------------------------

    def submit(self, run: Run, *, what: str, wait: float = 0.0) -> Run:
        """Queue the run on its instance's lane; a synchronous run waits up to `wait` for
        the instance. Raises 409/503 when the run is refused (then nothing is stored)."""
        record = run.record
        record.replica = self.replica
        run.ticket = Ticket((record.module, record.workspace), what, sync=run.sync,
                            on_start=lambda: self._start(run))
        with self._mutex:
            self._live[record.id] = run
        try:
            if not run.sync:
                run.emit("queued")
                self.keeper.create(run)
            self.scheduler.enqueue(run.ticket, wait=wait)
        except TFServerError:
            with self._mutex:
                self._live.pop(record.id, None)
            if not run.sync:
                self.store.delete(record)
            raise
        if not run.sync and record.started_at is None:
            record.queue_position = self.scheduler.position(run.ticket)
        return run

    def _start(self, run: Run) -> None:
        """The scheduler admitted the run: run its job in a thread of its own."""
        self._workers.submit(lambda: self._execute(run))

    def _execute(self, run: Run) -> None:
        record = run.record
        record.status, record.started_at, record.queue_position = "running", self.clock(), None
        run.emit("started")
        status = "failed"
        try:
            run.result = run.job(run)
            status = "succeeded"
        except TFServerError as e:
            run.error = e
            status = "canceled" if run.control.reason == "cancel" else "failed"
        except Exception:
            logger.exception("run %s failed unexpectedly", record.id)
            run.error = TFServerError(f"the run failed unexpectedly; see the server log for "
                                      f"run {record.id}")
        finally:
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
        self._tell(self.on_finish, record)
        # The caller waiting on the run answers now; the store follows. Until the record
        # is stored the run stays this replica's, so `record` and `page` still show it.
        run.done.set()
        run.wake()
        if run.sync and record.started_at is not None:
            # Writing the record at once took the GIL from the waking caller (about 1 ms
            # of its answer); the record waits until the answer is out.
            run.answered.wait(_ANSWER_FIRST)
        try:
            self._tell(self.on_ended, record)
            self.keeper.flush(run, final=True)
        except TFServerError as e:
            logger.error("run %s: its final record could not be stored: %s", record.id, e)
        finally:
            with self._mutex:  # a shutdown waits for this (`wait_idle`)
                self._live.pop(record.id, None)

    @staticmethod
    def _tell(listener: Callable[[RunRecord], None] | None, record: RunRecord) -> None:
        if listener is not None:
            try:
                listener(replace(record))
            except Exception:  # a listener's bug must not keep the run from ending
                logger.exception("run %s: a listener of its end failed", record.id)

    def _end_unstarted(self, run: Run, status: str, detail: str) -> None:
        """End a run that never started (canceled while queued)."""
        run.record.queue_position = None
        run.error = Conflict(detail, retry_after=1)
        self._finish(run, status)

    # -- reading ----------------------------------------------------------------------

    def local(self, run_id: str) -> Run | None:
        """The run, if this replica holds it."""
        with self._mutex:
            return self._live.get(run_id)

    def record(self, run_id: str) -> RunRecord:
        """The run's record as any replica would show it (404 if none)."""
        run = self.local(run_id) if is_run_id(run_id) else None
        if run is not None:
            shown = replace(run.record)
            if run.ticket is not None and shown.status == "queued":
                shown.queue_position = self.scheduler.position(run.ticket)
            return shown
        record = self.store.get(run_id) if is_run_id(run_id) else None
        if record is None:
            raise NotFound(f"no run {run_id[:40]!r}")
        if record.active and self.clock() - record.heartbeat_at > self.lost_after:
            record.status = "lost"
            record.state_may_be_locked = record.started_at is not None
        return record

    def unstored(self) -> list[RunRecord]:
        """Copies of the records this replica holds that are not stored yet (a synchronous
        run is stored at its first heartbeat, or just after its answer)."""
        return [replace(r.record) for r in self.live() if not r._created]

    def amend(self, run_id: str, change: Callable[[RunRecord], None]) -> bool:
        """Change the record of a run this replica holds; True when its last store write
        is still to come (and will carry the change), False when the store must be
        changed instead."""
        run = self.local(run_id)
        if run is None:
            return False
        with run._store_lock:  # not between a flush's copy of the record and its write
            change(run.record)
            return not run._final

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
        on a second cancel after the kill grace). 409 when it already ended."""
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
            self._end_unstarted(run, "canceled", "the run was canceled before it began")
            return
        now = time.monotonic()
        second = run.cancel_asked_at is not None and now - run.cancel_asked_at >= \
            self.kill_grace
        run.record.cancel = run.record.cancel or "requested"
        if force or second:
            run.control.kill("cancel")
            run.record.cancel, run.record.state_may_be_locked = "forced", True
        elif run.control.interrupt("cancel"):
            run.cancel_asked_at = now
        run.emit("canceling", force=force or second)

    def _run_of(self, ticket: Ticket) -> Run | None:
        with self._mutex:
            return next((r for r in self._live.values() if r.ticket is ticket), None)


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


def _follow_stored(runs: Runs, run_id: str, after: int) -> Iterator[list[dict[str, Any]]]:
    """A run of another replica: its stored event log, read every FOLLOW_POLL seconds."""
    seq = after
    idle = 0.0
    while True:
        events = [e for e in runs.store.get_events(run_id) if e.get("seq", 0) > seq]
        if events:
            seq = events[-1]["seq"]
            idle = 0.0
            yield events
            if any(e.get("type") == "finished" for e in events):
                return
        record = runs.record(run_id)
        if record.status == "lost" or (record.status in ENDED and not events):
            return
        time.sleep(FOLLOW_POLL)
        idle += FOLLOW_POLL
        if idle >= FOLLOW_IDLE:
            idle = 0.0
            yield []


class Workers:
    """Threads for runs: an idle one takes the next job, else a new one starts; a thread
    idle for `idle_for` seconds ends. Starting a thread for every run cost about 0.2 ms
    before terraform could start. Each job runs in a fresh context (nothing of the one
    before it, such as a request id, carries over)."""

    def __init__(self, name: str, idle_for: float = 60.0) -> None:
        self.name = name
        self.idle_for = idle_for
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._mutex = threading.Lock()
        self._idle = 0
        self._started = 0

    def submit(self, job: Callable[[], None]) -> None:
        """Run `job` in a thread of the pool (at once: the pool has no limit of its own,
        the scheduler's run slots are the limit)."""
        with self._mutex:
            if self._idle:
                self._idle -= 1
                self._jobs.put(job)
                return
            self._started += 1
            name = f"{self.name}-{self._started}"
        threading.Thread(target=self._work, args=(job,), name=name, daemon=True).start()

    def _work(self, job: Callable[[], None]) -> None:
        while True:
            try:
                contextvars.Context().run(job)
            except Exception:  # a job's bug must not take the thread's next jobs with it
                logger.exception("a job of the %s threads failed", self.name)
            with self._mutex:
                self._idle += 1
            try:
                job = self._jobs.get(timeout=self.idle_for)
                continue
            except queue.Empty:
                pass
            with self._mutex:
                # A job may have been handed to this thread just as it timed out.
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    self._idle -= 1
                    return


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
