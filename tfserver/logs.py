"""Logging: JSON lines (or a human format on a terminal), with the request id.

Configured once, by `__main__`. Callers pass context through `extra=`; nothing here ever
formats headers, tokens, variable values or the environment. `tfserver.access` has a line
per request; `tfserver.audit` a line per state-changing request and per run that ends.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import queue
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol, TextIO

if TYPE_CHECKING:
    from .auth import Principal

#: The id of the request the current thread serves ("-" outside a request).
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
#: Who did what, and with what outcome: never a variable's value, a token or a header.
audit_log = logging.getLogger("tfserver.audit")
#: A line per request.
access_log = logging.getLogger("tfserver.access")

#: How long the log writer lets lines gather before it writes them (`LineWriter`).
BATCH_WAIT = 0.002

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}


class EndedRun(Protocol):
    """What a run's audit line says of it (a run record has it: runs/store.py); a leaf
    imports no subpackage, so the record is described here, not imported."""

    id: str
    module: str
    instance: str
    tenant: str
    subject: str
    operation: str
    status: str
    changes: dict[str, int] | None
    problem: dict[str, Any] | None
    idempotency_key: str | None
    client_id: str | None
    client_address: str | None
    request_id: str | None
    approval: dict[str, Any] | None


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, request id, extras."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stamp: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON line (extras passed with `extra=` included)."""
        doc: dict[str, Any] = {
            "time": self._second(int(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": request_id.get(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return _ENCODER.encode(doc)


    def _second(self, second: int) -> str:
        """The ISO 8601 UTC time of a second, formatted once for all its lines."""
        stamp = self._stamp
        if stamp[0] != second:
            stamp = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
            self._stamp = stamp  # one assignment: threads see one pair or the other
        return stamp[1]


#: `json.dumps(doc, default=str)`, without making an encoder for every line.
_ENCODER = json.JSONEncoder(default=str)


class TextFormatter(logging.Formatter):
    """One line for a person at a terminal: time, level, logger, message, the extras."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as `HH:MM:SS level logger: message key=value ...`."""
        extras = " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in vars(record).items()
                          if k not in _STANDARD and not k.startswith("_"))
        line = (time.strftime("%H:%M:%S", time.localtime(record.created))
                + f" {record.levelname.lower():7} {record.name}: {record.getMessage()}"
                + (f" [{request_id.get()}]" if request_id.get() != "-" else "")
                + (f"  {extras}" if extras else ""))
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class LineWriter(logging.Handler):
    """Formats a record in the thread that logs it and writes the lines from a thread of
    its own, several at a time.

    A stream handler writes under its lock, and the write gives up the GIL: with a thread
    per connection, every request thread queued on that lock behind a writer waiting to
    get the GIL back: the access line took about 40% of the keep-alive read rate (wrk,
    32 connections). Here a request only formats its line (in its own context: the request
    id) and queues it. `flush` (and so `logging.shutdown` at exit) waits until every line
    queued before it is written.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self._lines: queue.SimpleQueue[str | threading.Event | bool | None] = \
            queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name="log-writer", daemon=True)
        self._writer.start()

    def handle(self, record: logging.LogRecord) -> bool:
        """Filter and format the record, and queue its line (no lock is taken)."""
        if not self.filter(record):
            return False
        try:
            self._lines.put(self.format(record) + "\n")
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - as logging.Handler does: never fail the caller
            self.handleError(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        """Queue the record's line (`handle` does it without the handler's lock)."""
        self.handle(record)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until the lines queued so far are written."""
        if not self._writer.is_alive():
            return
        written = threading.Event()
        self._lines.put(written)
        written.wait(timeout)

    def close(self) -> None:
        """Write what is queued, then stop the writer (waiting for it, bounded)."""
        self._lines.put(None)
        if self._writer.is_alive() and self._writer is not threading.current_thread():
            self._writer.join(5.0)
        super().close()

    def _write(self) -> None:
        while True:
            item = self._lines.get()
            # A moment for more lines to come (a busy server logs several a millisecond):
            # one write, and one wake-up of this thread, for all of them.
            time.sleep(BATCH_WAIT)
            batch: list[str] = []
            # Whatever was queued meanwhile goes out in the same write.
            while isinstance(item, str):
                batch.append(item)
                try:
                    item = self._lines.get_nowait() if len(batch) < 512 else False
                except queue.Empty:
                    item = False
            if batch:
                # A broken stderr has no one to tell: the lines are dropped.
                with contextlib.suppress(OSError, ValueError):
                    self.stream.write("".join(batch))
                    self.stream.flush()
            if isinstance(item, threading.Event):
                item.set()
            elif item is None:
                return


def configure(level: str = "INFO", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Send every log record to `stream` (stderr): JSON lines, or text (`fmt` "text", or
    "auto" on a terminal)."""
    out = stream or sys.stderr
    # Neither format shows a record's source line, thread or process: not worked out
    # for every record (logging's HOWTO, "Optimization"; 3 of the 14 µs of a line here).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    text = fmt == "text" or (fmt == "auto" and out.isatty())
    handler = LineWriter(out)
    handler.setFormatter(TextFormatter() if text else JsonFormatter())
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, LineWriter):
            old.close()  # its lines written, its thread ended
    root.handlers[:] = [handler]
    root.setLevel(level)


def audit_run(record: EndedRun, seconds: float | None) -> None:
    """The audit line of a run that ended (or awaits its approval): who, what, how it went,
    and who planned and answered a run that needed an approval."""
    approval = record.approval or {}
    audit_log.info(
        "run %s %s %s/%s: %s", record.id, record.operation, record.module, record.instance,
        record.status,
        extra={"event": "run",
               **({"approval": {k: approval.get(k) for k in (
                   "planned_by", "answer", "answered_by")}} if approval else {}),
               "who": {"subject": record.subject, "client_id": record.client_id,
                       "tenant": record.tenant, "address": record.client_address},
               "what": {"module": record.module, "instance": record.instance,
                        "operation": record.operation, "run_id": record.id,
                        "idempotency_key": record.idempotency_key,
                        "request_id": record.request_id},
               "outcome": {"status": record.status, "changes": record.changes,
                           "problem": (record.problem or {}).get("title"),
                           "seconds": None if seconds is None else round(seconds, 3)}})


def log_access(method: str, path: str, status: int, seconds: float, client: str,
               tenant: str | None) -> None:
    """The access line of a request (the path without its query: a token could be there)."""
    access_log.info("%s %s %s", method, path[:200], status,
                    extra={"method": method, "path": path[:200], "status": status,
                           "duration_ms": round(seconds * 1000, 1), "client": client,
                           "tenant": tenant})


def audit_request(who: Principal | None, address: str, *, status: int, title: str | None,
                  what: dict[str, Any]) -> None:
    """The audit line of a state-changing request (refused ones too)."""
    audit_log.info(
        "%s %s: %s", what.get("method"), what.get("route"), status,
        extra={"event": "request",
               "who": {"subject": who.subject if who else None,
                       "client_id": who.client_id if who else None,
                       "tenant": who.tenant_key if who else None, "address": address},
               "what": what, "outcome": {"status": status, "title": title}})


def audit_orphan(who: Principal, address: str | None, *, module: str, instance: str,
                 workspace: str, archive: str, until: float) -> None:
    """The audit line of an orphaned instance: who forgot it, and where its state went."""
    audit_log.info(
        "orphan %s/%s: state kept aside until %.0f", module, instance, until,
        extra={"event": "orphan",
               "who": {"subject": who.subject, "client_id": who.client_id,
                       "tenant": who.tenant_key, "address": address},
               "what": {"module": module, "instance": instance, "workspace": workspace,
                        "operation": "orphan"},
               "outcome": {"status": "orphaned", "archive": archive,
                           "archived_until": until}})
