"""The `sqs` engine: API replicas queue runs on an SQS FIFO queue, workers take them.

An API replica stores a new run's record (queued, its replica `QUEUED`) and its spec
(`_runs/specs/<id>.json`: what the worker needs to run it, inputs included, kept like the
state), then sends one message (queue.py's group: the instance, so SQS hands out one run of
an instance at a time across the fleet, in order). A worker that receives it claims the
run (`_runs/claims/<id>.<attempt>`, created only if absent) and runs it as its own
(`Runs.adopt`): heartbeats, events and the final record as with the `local` engine. The
message stays invisible while the run lasts (the worker extends it) and is deleted once
the final record is stored.

A queued run is canceled by whoever claims it first: the canceling replica (the run then
never starts) or a worker (the cancel then reaches it as a cancel request). A worker that
died leaves a run `running` with a dead heartbeat; its message comes back after the
visibility timeout, and the next worker runs the operation again (at most `resume_lost`
times, `attempt` counting), once the state's lock is free, or cleared when it is the
dead worker's and older than any run of it could be. A saved plan is never applied twice.
Scheduled drift checks run in spare slots beside a worker's and stand aside for a user's
run of their instance (checks.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ..errors import Conflict, TFServerError, Unavailable
from ..storage.base import ObjectStore, json_object
from .checks import Checks
from .liveness import QUEUED
from .places import Places
from .registry import Runs
from .run import Run
from .sqs import Message, SqsQueue, message_group
from .store import RunRecord, is_run_id

logger = logging.getLogger(__name__)


#: A claim older than this whose run never started: its worker died in between.
STALE_CLAIM = 30.0
#: How often a worker waiting for a lost run's holder or lock looks again (seconds).
_POLL = 1.0

#: What the app gives a worker: the run of a stored record and spec (its job and handle).
Build = Callable[[RunRecord, dict[str, Any]], Run]
#: The state lock an instance holds now ({"id", "created", ...}), if any.
LockOf = Callable[[RunRecord], dict[str, str] | None]
#: Clear that lock (its id); False when it could not be cleared.
Unlock = Callable[[RunRecord, str], bool]


class QueuedRuns:
    """Both sides of the queue: enqueue and cancel (API), take and resume (worker)."""

    def __init__(self, runs: Runs, queue: SqsQueue, *, queue_depth: int, resume_lost: int,
                 lock_of: LockOf, unlock: Unlock, stale_lock_after: float,
                 on_resumed: Callable[[RunRecord], None] | None = None,
                 checks: Checks | None = None) -> None:
        self.runs = runs
        self.store = runs.store
        self.queue = queue
        self.queue_depth = queue_depth
        self.resume_lost = resume_lost
        self.lock_of = lock_of
        self.unlock = unlock
        #: A lost worker's lock older than this is past any deadline of its run.
        self.stale_lock_after = stale_lock_after
        self.on_resumed = on_resumed
        #: Scheduled checks: their spare slots on a worker, stopped by users' runs.
        self.checks = checks
        #: Set when this worker stops: a take that waits hands its message back.
        self.stopping = threading.Event()
        #: Places on the queue: `queue_depth` an instance, `max_queued` a tenant.
        self.places = Places(self.store.objects)

    # -- the API side -------------------------------------------------------------------

    def enqueue(self, run: Run, spec: dict[str, Any], *, what: str,
                max_queued: int | None = None) -> None:
        """Store the run (record, events, spec) and queue its message; `Conflict` when
        the instance already has `queue_depth` runs waiting, or the tenant `max_queued`
        (nothing is kept then)."""
        record = run.record
        # A place taken with a create-if-absent write: two replicas (or two threads)
        # counting the same waiting runs at once never both take the last one.
        if not self.places.take(_instance(record), record.id, self.queue_depth,
                                self._waits):
            raise Conflict(f"{what} has {self.queue_depth} runs waiting; its queue is full",
                           retry_after=5)
        if max_queued is not None and not self.places.take(
                _tenant(record), record.id, max_queued, self._waits):
            self.places.free(_instance(record), record.id)
            raise Conflict(f"this tenant has {max_queued} runs waiting in queues; the limit "
                           f"is {max_queued}: wait for some to start", retry_after=5)
        record.replica, record.queue_position = QUEUED, self.waiting(record) + 1
        run.emit("queued")
        self.store.objects.put(_spec_key(record.id), json.dumps(spec).encode())
        record.heartbeat_at = time.time()
        self.store.create(replace(record))
        self.store.put_events(record.id, run.events)
        try:
            self.queue.send(record.id, message_group(record.module, record.workspace))
        except TFServerError:
            self.store.delete(record)
            self.store.objects.delete(_spec_key(record.id))
            self._leave(record)
            raise
        if self.checks is not None:
            self.checks.preempt(record, self.cancel)

    def _leave(self, record: RunRecord) -> None:
        """The run left the queue: its places are free."""
        self.places.free(_instance(record), record.id)
        self.places.free(_tenant(record), record.id)

    def _waits(self, run_id: str) -> bool | None:
        """Whether the run still waits on the queue (None: it has no record)."""
        record = self.store.get(run_id) if is_run_id(run_id) else None
        return None if record is None else record.status == "queued" and \
            record.replica == QUEUED

    def waiting(self, record: RunRecord) -> int:
        """How many runs of the record's instance wait on the queue before it."""
        ids = [r for t, m, r in self.store.active()
               if t == record.tenant and m == record.module and r != record.id]
        # Run ids sort newest first: an earlier run's id is greater.
        return sum(1 for r in self.runs.records(ids)
                   if r.workspace == record.workspace and r.status == "queued"
                   and r.replica == QUEUED and r.id > record.id)

    def oldest(self) -> float:
        """Seconds the oldest run waiting on the queue has waited (0: none waits)."""
        ids = [r for _, _, r in self.store.active()]
        created = [r.created_at for r in self.runs.records(ids)
                   if r.status == "queued" and r.replica == QUEUED]
        return time.time() - min(created) if created else 0.0

    def cancel(self, run_id: str) -> RunRecord | None:
        """End a run still waiting on the queue, unless a worker took it first (None:
        the caller asks the worker to cancel it instead)."""
        record = self.store.get(run_id)
        if record is None or record.status != "queued" or record.replica != QUEUED:
            return None
        if not self._claim(run_id, 1):
            return self._settled(record)
        record.status, record.finished_at, record.queue_position = "canceled", time.time(), None
        record.cancel = "requested"
        record.problem = Conflict("the run was canceled before it began",
                                  retry_after=1).problem()
        events = self.store.get_events(run_id)
        events.append({"seq": len(events) + 1, "time": record.finished_at, "type": "finished",
                       "status": "canceled", "changes": None, "problem": record.problem})
        self.store.put_events(run_id, events)
        self.store.save(record)
        self.store.objects.delete(_spec_key(run_id))
        self._leave(record)
        return record

    def _settled(self, record: RunRecord) -> RunRecord | None:
        """The record once whoever claimed it first (another cancel, or a worker) stored
        what it did: the ended record (a second cancel sees the first's), or None when a
        worker took it (waited for a few seconds at most)."""
        deadline = time.monotonic() + 5.0
        while record.status == "queued" and record.replica == QUEUED and \
                time.monotonic() < deadline:
            time.sleep(0.05)
            record = self.store.get(record.id) or record
        return record if not record.active else None

    # -- the worker side ------------------------------------------------------------------

    def take(self, message: Message, build: Build) -> bool:
        """Run the message's run here, to its end; True when the message is done with
        (delete it), False to hand it back for later."""
        record = self.store.get(message.run_id) if is_run_id(message.run_id) else None
        if record is None:
            logger.warning("queue: message for run %.64r, which has no record",
                           message.run_id)
            return False  # the dead-letter queue takes it after its last receive
        if not record.active:
            return True  # canceled while queued, or ended: nothing to do
        if self.store.cancel_request(record.id) is not None:
            self._end(record, "canceled", "the run was canceled before a worker began it")
            return True
        if record.status == "queued" and self._claim(record.id, record.attempt):
            self._leave(record)  # first taken: it runs here
        else:
            # Taken before: wait (bounded) until its worker is known dead, then resume it.
            # Handing the message back at once would spend its receives (maxReceiveCount)
            # on a run that only waits, and send it to the dead-letter queue.
            record = self._holder_gone(record)
            if record is None:
                return False  # its worker lives (or this one stops)
            if not record.active:
                return True
            resumed = self._resume(record)
            if resumed is None or not resumed:
                return resumed is None
            if not self._claim(record.id, record.attempt):
                return False
        spec = self._spec(record.id)
        if spec is None:
            self._end(record, "failed", "the run's spec is missing or damaged: it cannot run")
            return True
        self.runs.adopt(build(record, spec))
        self.store.objects.delete(_spec_key(record.id))
        return True

    def _resume(self, record: RunRecord) -> bool | None:
        """Prepare a lost run to run again here: True to run it, False to try later
        (its state is still locked), None when it ends instead (lost for good, or a
        saved plan, which is never applied twice)."""
        lost_on = record.replica
        # Its terraform may still run: wait for it first, so that the instance's next
        # run does not meet its lock.
        lock = self._lock_left(record)
        if record.attempt > self.resume_lost or record.plan_of is not None:
            why = ("a saved plan is never applied twice: plan again" if record.plan_of
                   else f"it was lost {record.attempt} times")
            self._end(record, "lost" if record.plan_of is None else "failed",
                      f"the worker {lost_on} running the run stopped; {why}")
            return None
        if lock is not None:
            created = _epoch(lock.get("created", ""))
            dead_workers = created is not None and record.started_at is not None and \
                created >= record.started_at - 5
            if not dead_workers or time.time() - (created or 0) < self.stale_lock_after:
                return False  # held by someone else (or this worker stops): try later
            if not self.unlock(record, lock.get("id", "")):
                return False
            logger.warning("run %s: cleared the lock %s its lost worker %s left",
                           record.id, lock.get("id"), lost_on)
        record.attempt += 1
        events = self.store.get_events(record.id)
        events.append({"seq": len(events) + 1, "time": time.time(), "type": "resumed",
                       "lost_worker": lost_on, "attempt": record.attempt})
        self.store.put_events(record.id, events)
        if self.on_resumed is not None:
            self.on_resumed(record)
        return True

    def _holder_gone(self, record: RunRecord) -> RunRecord | None:
        """The record once the worker running it is known dead (or the run ended); None
        while that worker may live: after a bounded wait (the message is kept invisible
        meanwhile) for a running one, at once for one claimed a moment ago."""
        deadline = time.monotonic() + self.runs.liveness.lost_after + 2 * _POLL
        while record.active:
            if record.status == "queued":
                # Claimed and never started: its worker died in between, unless just now.
                fresh = _claim_age(self.store.objects, record.id, record.attempt) < STALE_CLAIM
                return None if fresh else record
            if self.runs.liveness.lost(record):
                return record
            if time.monotonic() > deadline or self.stopping.wait(_POLL):
                return None
            found = self.store.get(record.id)
            if found is None:
                return None
            record = found
        return record

    def _lock_left(self, record: RunRecord) -> dict[str, str] | None:
        """The state's lock once the lost run's terraform no longer holds it: a lock it
        took is waited for while younger than `stale_lock_after` (that terraform goes on
        to its end and frees it); any other lock is returned at once."""
        deadline = time.monotonic() + self.stale_lock_after
        while (lock := self.lock_of(record)) is not None:
            created = _epoch(lock.get("created", ""))
            if created is None or record.started_at is None or \
                    created < record.started_at - 5 or \
                    time.time() - created >= self.stale_lock_after or \
                    time.monotonic() > deadline or self.stopping.wait(_POLL):
                return lock
        return None

    def _end(self, record: RunRecord, status: str, detail: str) -> None:
        record.status, record.finished_at = status, time.time()
        record.problem = Unavailable(detail).problem()
        events = self.store.get_events(record.id)
        events.append({"seq": len(events) + 1, "time": record.finished_at, "type": "finished",
                       "status": status, "changes": record.changes, "problem": record.problem})
        self.store.put_events(record.id, events)
        self.store.save(record)
        self.store.objects.delete(_spec_key(record.id))
        self._leave(record)

    def _spec(self, run_id: str) -> dict[str, Any] | None:
        spec = json_object(self.store.objects.get(_spec_key(run_id)))
        if spec is None:
            logger.error("run %s: its spec is missing or damaged; it cannot run", run_id)
            return None
        return spec

    def _claim(self, run_id: str, attempt: int) -> bool:
        """Take the run's attempt (once across the fleet)."""
        return self.store.objects.put_new(f"_runs/claims/{run_id}.{attempt}",
                                          json.dumps({"at": time.time()}).encode())


class QueueWorker:
    """Takes runs from the queue, at most `slots` users' runs at once (scheduled checks
    in spare slots beside them: checks.py), and keeps the messages of the runs it holds
    invisible (its heartbeat to the queue) until they end."""

    def __init__(self, queued: QueuedRuns, build: Build, *, slots: int,
                 visibility: int = 60, wait: int = 20, checks: Checks | None = None,
                 run_thread: Callable[[], None] | None = None) -> None:
        self.queued = queued
        self.run_thread = run_thread  # called first in each thread that runs a run
        self.checks = checks
        self.queue = queued.queue
        self.build = build
        self.slots = slots
        self.visibility = visibility
        self.wait = wait
        self._free = threading.Semaphore(slots)
        self._held: dict[str, Message] = {}
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._receive, name="queue-receive",
                                          daemon=True),
                         threading.Thread(target=self._extend, name="queue-extend",
                                          daemon=True)]

    def start(self) -> None:
        """Start taking runs."""
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Take no more runs (those running finish; the server's stop waits for them)."""
        self._stop.set()
        self.queued.stopping.set()

    def busy(self) -> int:
        """How many runs this worker holds now."""
        with self._mutex:
            return len(self._held)

    def _receive(self) -> None:
        while not self._stop.is_set():
            if not self._free.acquire(timeout=1.0):
                continue
            try:
                messages = self.queue.receive(1, visibility=self.visibility, wait=self.wait)
            except TFServerError as e:
                self._free.release()
                logger.warning("queue: cannot receive: %s", e.detail)
                self._stop.wait(2.0)
                continue
            if not messages:
                self._free.release()
                continue
            message = messages[0]
            if self._stop.is_set():
                self._hand_back(message)
                self._free.release()
                break
            with self._mutex:
                self._held[message.receipt] = message
            threading.Thread(target=self._run, args=(message,), name="queue-run",
                             daemon=True).start()

    def _run(self, message: Message) -> None:
        if self.run_thread is not None:
            self.run_thread()
        done, checks = False, self.checks
        spare: bool | None = False
        try:
            if checks is not None:  # a check gives its user slot back (checks.py)
                spare = checks.slot(message.run_id, self._free, self._stop)
                if spare:
                    checks.own(message.run_id)
            if spare is not None:  # None: this worker stops, the message goes back
                done = self.queued.take(message, self.build)
        except TFServerError as e:
            logger.warning("queue: run %.64s not taken: %s", message.run_id, e.detail)
        except Exception:  # a bug must not cost the slot or the message
            logger.exception("queue: run %.64s failed unexpectedly", message.run_id)
        finally:
            with self._mutex:
                self._held.pop(message.receipt, None)
            try:
                if done:
                    self.queue.delete(message)
                else:
                    self._hand_back(message)
            except TFServerError as e:
                logger.warning("queue: message of run %.64s: %s", message.run_id, e.detail)
            if spare is False:
                self._free.release()
            elif spare and checks is not None:
                checks.free_spare()

    def _hand_back(self, message: Message) -> None:
        """Let the message come back a little later (not at once: it would loop)."""
        try:
            self.queue.extend(message, 5)
        except TFServerError as e:
            logger.warning("queue: message of run %.64s not handed back: %s", message.run_id,
                           e.detail)

    def _extend(self) -> None:
        while not self._stop.wait(self.visibility / 3):
            with self._mutex:
                held = list(self._held.values())
            for message in held:
                try:
                    self.queue.extend(message, self.visibility)
                except TFServerError as e:
                    logger.warning("queue: run %.64s: its message not kept: %s",
                                   message.run_id, e.detail)


def _instance(record: RunRecord) -> str:
    return f"_runs/waiting/instances/{record.workspace}/"


def _tenant(record: RunRecord) -> str:
    return f"_runs/waiting/tenants/{record.tenant}/"


def _spec_key(run_id: str) -> str:
    return f"_runs/specs/{run_id}.json"


def _claim_age(objects: ObjectStore, run_id: str, attempt: int) -> float:
    """Seconds since the run's attempt was claimed (infinite when unreadable)."""
    data = objects.get(f"_runs/claims/{run_id}.{attempt}")
    try:
        return time.time() - float(json.loads(data or b"{}")["at"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _epoch(text: str) -> float | None:
    """A lock's `Created` time (terraform writes RFC 3339 with nanoseconds)."""
    import datetime as dt

    try:
        head = text.strip().split(".")[0].rstrip("Z")
        return dt.datetime.fromisoformat(head).replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        return None
