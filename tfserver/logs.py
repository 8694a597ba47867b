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
from typing import Any, TextIO

#: The id of the request the current thread serves ("-" outside a request).
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
#: Who did what, and with what outcome: never a variable's value, a token or a header.
audit_log = logging.getLogger("tfserver.audit")

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}


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
