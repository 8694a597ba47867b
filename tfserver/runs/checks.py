"""Scheduled drift checks on the `sqs` engine: slots of their own on a worker, and a
user's run that stops the check of its instance.

A worker takes a message only while one of its TFSERVER_MAX_RUNS user slots is free (it
cannot choose which message SQS hands it). When the message's run is a scheduled check,
the worker gives the user slot back at once and runs the check in one of `spare` slots
beside them (waiting for one, the message kept invisible, in the rare case all are in
use: the fleet-wide TFSERVER_MAX_DRIFT_CHECKS leases bound the checks anyway). A check
never holds a user slot, so a worker whose user slots are free always takes the next
user's message, however many checks it runs.

A check and a user's run of one instance share the instance's FIFO group: SQS hands out
one of them at a time, in the order they were queued, and a user's run queued behind a
check is not handed out before the check's message is deleted. So when a user's run is
queued, the checks of its instance queued or running anywhere are canceled (a waiting one
never starts; a running one is interrupted by its worker on its next heartbeat) and the
user's run waits only for that stop, as with the `local` engine. A check queued after a
user's run runs after it (the schedule skips a busy instance, but may race with one just
queued). A check's own reconciling apply (queued from the check's job, on its worker's
thread) does not stop it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..errors import TFServerError
from .liveness import QUEUED
from .registry import Runs
from .store import RunRecord, is_run_id

logger = logging.getLogger(__name__)

#: Whether a run's record is a scheduled check's.
IsCheck = Callable[[RunRecord], bool]
#: Cancels a run still waiting on the queue (None: a worker took it first).
CancelQueued = Callable[[str], RunRecord | None]


class Checks:
    """Which queued runs are scheduled checks, the slots a worker runs them in, and the
    cancel of an instance's checks when a user's run comes to it."""

    def __init__(self, runs: Runs, is_check: IsCheck, *, spare: int,
                 on_preempted: Callable[[RunRecord], None] | None = None) -> None:
        self.runs = runs
        self.is_check = is_check
        self.spare = spare
        self.on_preempted = on_preempted
        self._spare = threading.Semaphore(spare)
        #: The check whose job this thread runs, if any (its reconciling apply spares it).
        self._own = threading.local()

    # -- the worker's slots ------------------------------------------------------------

    def slot(self, run_id: str, user: threading.Semaphore, stop: threading.Event
             ) -> bool | None:
        """The slot the message's run takes, its user slot (`user`) held already: False
        to keep it (a user's run), True for a spare one (a check: `user` is given back at
        once), None when `stop` is set while it waits for a spare one."""
        try:
            record = self.runs.store.get(run_id) if is_run_id(run_id) else None
        except TFServerError:
            return False  # `take` reads it again and says what is wrong
        if record is None or not record.active or not self.is_check(record):
            return False
        user.release()
        while not self._spare.acquire(timeout=1.0):
            if stop.is_set():
                return None
        return True

    def free_spare(self) -> None:
        """The check ended: its spare slot is free."""
        self._spare.release()

    def own(self, run_id: str | None) -> None:
        """Mark (or, with None, unmark) the check this thread runs."""
        self._own.run_id = run_id

    # -- a user's run stops the checks of its instance ---------------------------------

    def preempt(self, record: RunRecord, cancel_queued: CancelQueued) -> None:
        """The user's run `record` was queued: cancel the scheduled checks of its
        instance that are queued or running (not the check this thread runs)."""
        if self.is_check(record):
            return
        own = getattr(self._own, "run_id", None)
        try:
            found = self.runs.in_flight(record.tenant, record.module)
        except TFServerError as e:  # the run is queued: its checks just go on
            logger.warning("drift schedule: checks of %s/%s not looked up: %s",
                           record.module, record.instance, e.detail)
            return
        for check in found:
            if check.workspace != record.workspace or check.id in (record.id, own) or \
                    not self.is_check(check):
                continue
            try:
                waiting = check.status == "queued" and check.replica == QUEUED
                if not waiting or cancel_queued(check.id) is None:
                    self.runs.cancel(check.id, force=False)
            except TFServerError:
                continue  # it ended meanwhile
            if self.on_preempted is not None:
                self.on_preempted(check)
            logger.info("drift schedule: check of %s/%s stopped for a user's run",
                        check.module, check.instance, extra={"run_id": check.id})
