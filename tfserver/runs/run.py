"""One run on this replica: its record, events, process handle; a stored failure."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from ..errors import TFServerError
from ..terraform.process import RunControl
from .lanes import Ticket
from .store import RunRecord

logger = logging.getLogger(__name__)


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
