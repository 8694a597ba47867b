"""One run on this replica: its record, events, process handle; a stored failure."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from ..errors import StoredProblem, TFServerError
from .lanes import Ticket
from .store import RunRecord

logger = logging.getLogger(__name__)


class RunProblem(StoredProblem):
    """A failed run's stored problem document, answered again (for example to an
    idempotent retry): its status and fields are the original answer's."""


class Control(Protocol):
    """The handle on a run's process (the app passes terraform's `RunControl`): stop it
    gently or at once, and say who stopped it first ("cancel" or "shutdown")."""

    @property
    def reason(self) -> str | None:
        """Who stopped the run first, or None."""
        ...

    @property
    def killed(self) -> bool:
        """True once the process group was killed."""
        ...

    def interrupt(self, reason: str) -> bool:
        """Ask the process to stop at a safe point; False if it was asked already."""
        ...

    def kill(self, reason: str) -> None:
        """Kill the process and everything it started."""
        ...

    def when_started(self, fn: Callable[[], None]) -> None:
        """Call `fn` once, as the process starts (at once if it has)."""
        ...


@dataclass(eq=False)
class Run:
    """One run on this replica: its record, events, place in line and process handle."""

    record: RunRecord
    job: Callable[[Run], Any]
    #: Scrubs the run's events; a destroy learns its secrets (the kept inputs) only once
    #: it runs, so this may be a view of a scrubber that changes.
    scrub: Callable[[str], str]
    control: Control
    sync: bool = False
    #: A scheduled drift check: how to stop it for a user's run on its instance (it runs
    #: in a spare slot, never a user's: lanes.py). None for every other run.
    background: Callable[[], object] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    #: Set once a synchronous caller's answer is on the wire: the final record waits
    #: for it (at most `_ANSWER_FIRST`), so the answer does not compete with the store.
    answered: threading.Event = field(default_factory=threading.Event)
    #: What the job returned (a service result), or the error it raised.
    result: Any = None
    error: TFServerError | None = None
    ticket: Ticket | None = None
    cancel_asked_at: float | None = None
    #: Set while the run awaits its approval, once that is stored (runs/parked.py).
    parked: threading.Event = field(default_factory=threading.Event)
    #: What a synchronous run does once terraform runs, or at its end if terraform never
    #: ran (`started`): writes that would slow terraform's start if done before it.
    on_started: list[Callable[[], None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _starting: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: Followers wait on `_cond` (woken by each event); a synchronous caller on
    #: `_settled`, woken only as the run ends or parks: woken by every event, it took the
    #: GIL from the run's thread about 15 times an apply.
    _cond: threading.Condition = field(init=False, repr=False)
    _settled: threading.Condition = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._cond = threading.Condition(self._lock)
        self._settled = threading.Condition(self._lock)

    def started(self) -> None:
        """Do the `on_started` work, once; a second caller waits until it is done (the
        run's end finds it done, so its kept request precedes its final record)."""
        with self._starting:
            todo, self.on_started = self.on_started, []
            for fn in todo:
                try:
                    fn()
                except Exception:  # run by the keeper's thread: a bug must not end it
                    logger.exception("run %s: work after its start failed", self.record.id)

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

    def settle(self, timeout: float | None) -> bool:
        """Wait (at most `timeout` seconds) until the run ended or awaits its approval
        (stored so: a server killed then finds it again); True if it did."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._settled:
            while not (self.done.is_set() or self.parked.is_set()):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._settled.wait(left)
            return True

    def wake(self) -> None:
        """Wake the followers and the caller waiting in `settle` (the run ended or
        parked)."""
        with self._lock:
            self._cond.notify_all()
            self._settled.notify_all()


def _scrubbed(value: Any, scrub: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: _scrubbed(v, scrub) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrubbed(v, scrub) for v in value]
    return value


def tell(listener: Callable[[RunRecord], None] | None, record: RunRecord, what: str) -> None:
    """Tell a listener of a run's `what` (its end, its parking): a copy of its record."""
    if listener is not None:
        try:
            listener(replace(record))
        except Exception:  # a listener's bug must not keep the run from going on
            logger.exception("run %s: a listener of its %s failed", record.id, what)
