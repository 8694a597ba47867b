"""In-process concurrency: one run per instance at a time, in arrival order, and a cap on
all runs.

Every instance has a lane: the run that holds it and a FIFO of runs waiting for it. A run
at the head of an idle lane starts when one of the `slots` is free; a waiting run holds
no slot. Synchronous callers keep the original contract: they wait at most their own
patience for the lane (then `Conflict`) and never for a slot (`Unavailable` at once);
asynchronous runs queue (at most `queue_depth` per lane, then `Conflict`) and wait for a
slot as long as it takes.

Background runs (the scheduled drift checks) take `spare` slots of their own, never one
of the `slots` user runs share: a user run never waits because a check runs elsewhere.
A user's run that comes to a lane a background run holds stops it (the ticket's
`background` callable: the check is canceled, and done again another time) and waits
only for that stop, even when synchronous.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..errors import Conflict, TFServerError, Unavailable


@dataclass(eq=False)
class Ticket:
    """One run's place: waiting in its lane, then holding it."""

    key: Hashable
    what: str
    sync: bool
    #: Called (outside the scheduler's lock) when the run may start.
    on_start: Callable[[], None]
    seq: int = 0
    #: Set once a synchronous caller's wait is over: admitted, refused or withdrawn.
    admitted: threading.Event = field(default_factory=threading.Event)
    #: Why the run could not start (no slot for a synchronous run, shutdown).
    refused: TFServerError | None = None
    #: A background run: how to stop it for a user's run (None: a user's run). It takes
    #: a spare slot, never a user's.
    background: Callable[[], object] | None = None
    #: Holding its lane without a slot: its run awaits an approval (`park`).
    parked: bool = False


@dataclass
class _Lane:
    holder: Ticket | None = None
    waiting: deque[Ticket] = field(default_factory=deque)


class Scheduler:
    """Lanes per instance key, and the run slots they share."""

    def __init__(self, slots: int, queue_depth: int, spare: int = 0) -> None:
        self.slots = slots
        self.spare = spare
        self.queue_depth = queue_depth
        self._used = 0
        self._spare_used = 0
        self._mutex = threading.Lock()
        self._lanes: dict[Hashable, _Lane] = {}
        self._seq = itertools.count(1)
        self._closed = False

    def enqueue(self, ticket: Ticket, *, wait: float = 0.0) -> None:
        """Join the ticket's lane; raise `Conflict` (busy, queue full) or
        `Unavailable` (no slot, closed).

        A synchronous ticket waits here up to `wait` seconds to be admitted; an
        asynchronous one returns at once and is started by `on_start` when its turn comes.
        """
        with self._mutex:
            if self._closed:
                raise Unavailable("the server is shutting down", retry_after=10)
            lane = self._lanes.setdefault(ticket.key, _Lane())
            holder = lane.holder
            preempt = (holder.background if holder is not None and ticket.background is None
                       else None)
            busy = (holder is not None and preempt is None) or bool(lane.waiting)
            if ticket.sync and busy and wait <= 0:
                self._forget_if_idle(ticket.key, lane)
                raise _busy(ticket)
            if not ticket.sync and len(lane.waiting) >= self.queue_depth:
                raise Conflict(f"the queue of {ticket.what} is full "
                               f"({self.queue_depth} runs wait); try again later",
                               retry_after=30)
            ticket.seq = next(self._seq)
            lane.waiting.append(ticket)
            starting = self._dispatch()
        _start(starting)
        if preempt is not None:
            preempt()
        if not ticket.sync:
            return
        if not ticket.admitted.wait(wait if busy else 60.0):
            if self.withdraw(ticket):
                raise _busy(ticket, retry_after=max(1, int(wait)) if busy else 5)
            ticket.admitted.wait()  # admitted, refused or withdrawn in the meantime
        if ticket.refused is not None:
            raise ticket.refused
        # Admitted, or withdrawn by a cancel or a shutdown, which ends the run: either
        # way its caller waits for the run's end.

    def withdraw(self, ticket: Ticket) -> bool:
        """Take a waiting ticket out of its lane (its waiting caller, if any, is let go);
        False if it started (or was never in)."""
        with self._mutex:
            lane = self._lanes.get(ticket.key)
            if lane is None or ticket not in lane.waiting:
                return False
            lane.waiting.remove(ticket)
            self._forget_if_idle(ticket.key, lane)
            _withdrawn([ticket])
            starting = self._dispatch()
        _start(starting)
        return True

    def finish(self, ticket: Ticket) -> None:
        """The ticket's run ended: free its lane and slot, start whoever is next."""
        with self._mutex:
            lane = self._lanes.get(ticket.key)
            if lane is not None and lane.holder is ticket:
                lane.holder = None
                if not ticket.parked:  # a parked ticket gave its slot back already
                    self._release(ticket)
                self._forget_if_idle(ticket.key, lane)
            starting = self._dispatch()
        _start(starting)

    def park(self, ticket: Ticket) -> bool:
        """The holder's run waits (for an approval): it keeps its lane, so later runs of
        the instance queue behind it, and gives its slot back; a ticket new to this
        scheduler (a run found awaiting after a restart) takes its idle lane so, without
        a slot. False when another ticket holds the lane."""
        with self._mutex:
            lane = self._lanes.setdefault(ticket.key, _Lane())
            if lane.holder is None and not lane.waiting:
                lane.holder, ticket.parked = ticket, True
            if lane.holder is not ticket:
                self._forget_if_idle(ticket.key, lane)
                return False
            if not ticket.parked:
                ticket.parked = True
                self._release(ticket)
            starting = self._dispatch()
        _start(starting)
        return True

    def unpark(self, ticket: Ticket) -> None:
        """The parked ticket's run goes on (approved): it leaves its lane's hold and waits
        first in line for a slot, before every run queued behind it."""
        with self._mutex:
            lane = self._lanes.setdefault(ticket.key, _Lane())
            if lane.holder is ticket:
                lane.holder = None
            ticket.parked, ticket.sync = False, False  # it waits for a slot as long as it takes
            ticket.seq = 0  # the oldest head
            lane.waiting.appendleft(ticket)
            starting = self._dispatch()
        _start(starting)

    def position(self, ticket: Ticket) -> int | None:
        """1 for the next run of the lane, 2 after it...; None when not waiting."""
        with self._mutex:
            lane = self._lanes.get(ticket.key)
            if lane is None or ticket not in lane.waiting:
                return None
            return lane.waiting.index(ticket) + 1

    def busy(self, key: Hashable) -> bool:
        """True while a run holds the key's lane."""
        with self._mutex:
            lane = self._lanes.get(key)
            return lane is not None and lane.holder is not None

    def idle(self, key: Hashable) -> bool:
        """True when no run holds the key's lane or waits in it."""
        with self._mutex:
            return key not in self._lanes

    def counts(self) -> tuple[int, int]:
        """(running, queued) runs right now."""
        with self._mutex:
            return (self._used + self._spare_used,
                    sum(len(lane.waiting) for lane in self._lanes.values()))

    @contextmanager
    def hold(self, key: Hashable, what: str) -> Iterator[None]:
        """The lane, exclusively and only if idle (for maintenance such as an unlock);
        takes no slot."""
        ticket = Ticket(key, what, sync=True, on_start=lambda: None)
        with self._mutex:
            lane = self._lanes.setdefault(key, _Lane())
            if lane.holder is not None or lane.waiting:
                raise _busy(ticket)
            lane.holder = ticket
        try:
            yield
        finally:
            with self._mutex:
                lane.holder = None
                self._forget_if_idle(key, lane)
                starting = self._dispatch()
            _start(starting)

    def close(self) -> list[Ticket]:
        """Refuse new tickets; take every waiting one out (their waiting callers are let
        go) and return them."""
        with self._mutex:
            self._closed = True
            dropped = [t for lane in self._lanes.values() for t in lane.waiting]
            for key, lane in list(self._lanes.items()):
                lane.waiting.clear()
                self._forget_if_idle(key, lane)
            _withdrawn(dropped)
        return dropped

    # -- under the mutex ------------------------------------------------------------------

    def _dispatch(self) -> list[Ticket]:
        """Admit the heads of idle lanes, oldest first, while slots last."""
        starting: list[Ticket] = []
        heads = sorted(((lane.waiting[0], lane) for lane in self._lanes.values()
                        if lane.holder is None and lane.waiting), key=lambda h: h[0].seq)
        for head, lane in heads:
            if head.background is not None and self._spare_used < self.spare:
                lane.waiting.popleft()
                lane.holder = head
                self._spare_used += 1
                starting.append(head)
            elif head.background is None and self._used < self.slots:
                lane.waiting.popleft()
                lane.holder = head
                self._used += 1
                starting.append(head)
            elif head.sync:
                # A synchronous caller never waits for a slot: the original refusal.
                lane.waiting.popleft()
                head.refused = Unavailable(f"all {self.slots} run slots are busy; try again "
                                           "later", retry_after=5)
                head.admitted.set()
                self._forget_if_idle(head.key, lane)
        return starting

    def _release(self, ticket: Ticket) -> None:
        """Give back the slot the ticket took: a spare one for a background run."""
        if ticket.background is not None:
            self._spare_used -= 1
        else:
            self._used -= 1

    def _forget_if_idle(self, key: Hashable, lane: _Lane) -> None:
        if lane.holder is None and not lane.waiting:
            self._lanes.pop(key, None)


def _withdrawn(tickets: list[Ticket]) -> None:
    """Let go the callers of tickets taken out of their lanes: whoever took them out
    ends their runs (a cancel, a shutdown)."""
    for ticket in tickets:
        ticket.admitted.set()


def _start(tickets: list[Ticket]) -> None:
    for ticket in tickets:
        ticket.on_start()
        ticket.admitted.set()


def _busy(ticket: Ticket, retry_after: int = 5) -> Conflict:
    return Conflict(f"{ticket.what} is being changed by another run; try again later",
                    retry_after=retry_after)
