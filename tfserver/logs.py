"""Logging: JSON lines (or a human format on a terminal), with the request id.

Configured once, by `__main__`. Callers pass context through `extra=`; nothing here ever
formats headers, tokens, variable values or the environment. `tfserver.access` has a line
per request; `tfserver.audit` a line per state-changing request and per run that ends.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
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


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, request id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON line (extras passed with `extra=` included)."""
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
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
        return json.dumps(doc, default=str)


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


def configure(level: str = "INFO", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Send every log record to `stream` (stderr): JSON lines, or text (`fmt` "text", or
    "auto" on a terminal)."""
    out = stream or sys.stderr
    text = fmt == "text" or (fmt == "auto" and out.isatty())
    handler = logging.StreamHandler(out)
    handler.setFormatter(TextFormatter() if text else JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def audit_run(record: EndedRun, seconds: float | None) -> None:
    """The audit line of a run that ended: who, what, and how it went."""
    audit_log.info(
        "run %s %s %s/%s: %s", record.id, record.operation, record.module, record.instance,
        record.status,
        extra={"event": "run",
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
