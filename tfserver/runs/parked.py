"""Runs that wait for an approval: the part of the run lifecycle between a plan and its
answer (`Runs` takes it from `Parking`).

A run whose job returns `Awaiting` does not end: it is stored `awaiting_approval`, keeps
its instance's lane (later runs of the instance queue behind it) and gives its run slot
back. It is no longer active: no replica beats for it, so it is never `lost`, and a
restart finds it again in the store (the app's `approvals.py` brings it back with
`hold`). Approved, it `resume`s at the head of its lane with its next job; rejected,
expired or canceled, it ends there (`Runs.end_waiting`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import Conflict, TFServerError
from .keeper import Keeper
from .lanes import Scheduler, Ticket
from .run import Control, Run, tell
from .store import AWAITING, RunRecord, RunStore
from .workers import Workers

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Awaiting:
    """What a job returns instead of an outcome when its run must be approved: the
    fields of its `awaiting_approval` event (the plan summary: addresses and actions)."""

    event: dict[str, Any] = field(default_factory=dict)


class Parking:
    """The awaiting-approval part of `Runs` (its attributes below are `Runs`')."""

    store: RunStore
    scheduler: Scheduler
    keeper: Keeper
    _mutex: threading.Lock
    _live: dict[str, Run]
    #: Told of each run that now awaits its approval (stored already).
    on_parked: Callable[[RunRecord], None] | None

    _workers: Workers

    if TYPE_CHECKING:
        def _execute(self, run: Run) -> None:
            """Run the run's job here, to its end (or its parking)."""

        def _finish(self, run: Run, status: str) -> None:
            """End the run: its lane, record, `finished` event, store, listeners."""

    def _ticket(self, run: Run, what: str) -> Ticket:
        """The run's place in its lane: once admitted, its job runs in a thread of its own."""
        return Ticket((run.record.module, run.record.workspace), what, sync=run.sync,
                      background=run.background,
                      on_start=lambda: self._workers.submit(lambda: self._execute(run)))

    def end_waiting(self, run: Run, status: str, detail: str) -> None:
        """End a run that is not running: canceled while queued, or answered while it
        awaits its approval (rejected, expired, canceled)."""
        run.record.queue_position = None
        run.error = Conflict(detail, retry_after=1)
        self._finish(run, status)

    def stop_waiting(self, run: Run) -> None:
        """The server stops before the queued run began: it ends `canceled`, but for an
        approved apply (queued: it never began), left stored so, its spec kept, for the
        next start to apply (app/approvals.py), as after a crash."""
        if run.record.status == "queued" and (run.record.approval or {}).get(
                "answer") == "approved":
            self.keeper.forget(run)
            with self._mutex:
                self._live.pop(run.record.id, None)
            run.done.set()
            run.wake()
            return
        self.end_waiting(run, "canceled", "the server stopped before the run began")

    def _park(self, run: Run) -> None:
        """The run planned and awaits its approval: stored so, it keeps its lane."""
        record = run.record
        record.status, record.queue_position = AWAITING, None
        if run.ticket is not None:
            self.scheduler.park(run.ticket)
        awaiting = run.result
        run.emit(AWAITING, **(awaiting.event if isinstance(awaiting, Awaiting) else {}))
        try:
            self.keeper.flush(run)  # no longer active: its active marker goes
        except TFServerError as e:  # the next write of it (its answer's) stores it
            logger.error("run %s: its record awaiting approval could not be stored: %s",
                         record.id, e.detail)
        # Told before the caller's 202: its run slot is back by then, so the caller's
        # next run is never refused for the one that parked.
        tell(self.on_parked, record, "parking")
        run.parked.set()
        run.wake()  # its synchronous caller answers now (202)

    def hold(self, run: Run, what: str) -> bool:
        """Hold here a stored run that awaits its approval (found after a restart): its
        lane is taken again (False: another run holds it), its events go on."""
        run.events[:0] = self.store.get_events(run.record.id)  # its seq numbers go on
        run.ticket = self._ticket(run, what)
        with self._mutex:
            self._live[run.record.id] = run
        self.keeper.track(run, stored=True)
        run.parked.set()
        return self.scheduler.park(run.ticket)

    def let_go(self, run: Run) -> None:
        """A run parked here that another replica answered (and took on): its lane here
        is freed and it is forgotten, nothing stored (the other replica ends it)."""
        if run.ticket is not None:
            self.scheduler.finish(run.ticket)
        self.keeper.forget(run)
        with self._mutex:
            self._live.pop(run.record.id, None)
        run.done.set()  # a follower here stops; the record is read from the store now
        run.wake()

    def resume(self, run: Run, job: Callable[[Run], Any], control: Control,
               **event: Any) -> None:
        """An approved run goes on with `job`: queued first on its lane (an `approved`
        event with `event`'s fields), active again."""
        assert run.ticket is not None, "a parked run holds a ticket"
        run.job, run.control, run.sync, run.result = job, control, False, None
        run.record.status = "queued"
        run.parked.clear()
        run.emit("approved", **event)
        self.keeper.create(run)  # active again: its marker back
        self.scheduler.unpark(run.ticket)
