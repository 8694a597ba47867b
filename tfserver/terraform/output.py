"""What terraform says, parsed once: the `-json` event stream, diagnostics (with the variable
they are about), the lock holder, and the `Failure` kind of a run that did not succeed."""

from __future__ import annotations

import enum
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..scrub import shown_outputs

logger = logging.getLogger(__name__)


#: How much of stderr a result keeps (the end of it, where the errors are).
STDERR_KEEP = 64 * 1024


_LOCK_SUMMARIES = ("Error acquiring the state lock", "Error locking state")

#: The S3 backend's words when the lock it takes to write a new workspace's first state
#: is held (its operation "init"); the lock's info follows in the summary itself.
_NEW_STATE_LOCKED = "failed to lock s3 state"


#: terraform's words for a saved plan the state moved on from (the second: the state was
#: destroyed and made anew since, another lineage).
_STALE_PLAN = ("Saved plan is stale", "Saved plan does not match the given state")


_RESOURCE_PHASES = {"apply_start": "start", "apply_progress": "progress",
                    "apply_complete": "done", "apply_errored": "errored"}


_LOCK_FIELD = re.compile(r"^\s*(ID|Path|Operation|Who|Version|Created|Info):\s*(.*)$")


_BOX = "╷│╵ "


EventSink = Callable[[dict[str, Any]], None]


class Failure(enum.Enum):
    """Why a run did not succeed, decided from what terraform and the runner saw."""

    LOCKED = "locked"  #: another run holds the state lock
    TIMED_OUT = "timed out"  #: the deadline passed; terraform was interrupted
    INTERRUPTED = "interrupted"  #: the server is stopping; terraform was interrupted
    CANCELED = "canceled"  #: a caller canceled the run
    KILLED = "killed"  #: terraform died by a signal; its lock may be left behind
    STALE_PLAN = "stale plan"  #: the state changed since the saved plan was made
    REJECTED = "rejected"  #: terraform refused the inputs before changing anything
    FAILED = "failed"  #: terraform failed while changing resources (or said nothing)


@dataclass(frozen=True)
class Diagnostic:
    """One error or warning terraform reported, and the variable it is about, if any."""

    severity: str
    summary: str
    detail: str = ""
    address: str = ""
    variable: str = ""

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> Diagnostic:
        """The diagnostic of a `diagnostic` event (a missing severity counts as error)."""
        d = event.get("diagnostic") or {}
        variable = ""
        for value in ((d.get("snippet") or {}).get("values") or []):
            traversal = str(value.get("traversal", "")) if isinstance(value, dict) else ""
            if traversal.startswith("var."):
                variable = re.split(r"[.\[]", traversal[4:], maxsplit=1)[0]
                break
        return cls(
            severity=str(d.get("severity") or "error"),
            summary=str(d.get("summary", "")),
            detail=str(d.get("detail", "")),
            address=str(d.get("address", "")),
            variable=variable,
        )


def parse_lock_info(detail: str) -> dict[str, str]:
    """The `Lock Info:` block of terraform's "Error acquiring the state lock"."""
    info: dict[str, str] = {}
    for line in detail.splitlines():
        m = _LOCK_FIELD.match(line)
        if m and m.group(2).strip():
            info[m.group(1).lower()] = m.group(2).strip()
    return info


def error_text(stderr: str, limit: int = 2000) -> str:
    """Terraform's human error output from its first `Error:` on, without the box drawn
    around it (all of it, not only the first line), at most `limit` characters."""
    lines = [line.strip().lstrip(_BOX).rstrip() for line in stderr.splitlines()]
    start = next((i for i, line in enumerate(lines) if line.startswith("Error:")), None)
    if start is None:
        return "\n".join(line for line in lines if line)[-limit:]
    kept = lines[start:]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()
    return text[:limit]


@dataclass(frozen=True)
class RunResult:
    """What one terraform process did. Any non-zero exit is a failure (see `failure`)."""

    args: tuple[str, ...]
    returncode: int
    events: tuple[dict[str, Any], ...] = ()
    stdout: str = ""
    stderr: str = ""
    duration: float = 0.0
    timed_out: bool = False
    interrupted: bool = False
    canceled: bool = False
    #: Lines of the `-json` stream that could not be read (never silently dropped).
    unreadable: int = 0
    diagnostics: tuple[Diagnostic, ...] = field(init=False)

    def __post_init__(self) -> None:
        found = [Diagnostic.from_event(e) for e in self.events if e.get("type") == "diagnostic"]
        found.sort(key=lambda d: d.severity != "error")
        object.__setattr__(self, "diagnostics", tuple(found))

    @property
    def ok(self) -> bool:
        """True when terraform exited 0 before its deadline (a stop that came later is
        too late to matter)."""
        return self.failure is None

    @property
    def errors(self) -> list[Diagnostic]:
        """Only the diagnostics of severity error."""
        return [d for d in self.diagnostics if d.severity == "error"]

    @property
    def lock(self) -> dict[str, str] | None:
        """Who holds the state lock, when the run failed because it was held."""
        for d in self.errors:
            if d.summary.startswith(_LOCK_SUMMARIES):
                return parse_lock_info(d.detail)
            if _NEW_STATE_LOCKED in d.summary and "Lock Info:" in d.summary:
                return parse_lock_info(d.summary)
        return None

    @property
    def failure(self) -> Failure | None:
        """Why the run did not succeed, or None when it did."""
        if self.returncode == 0 and not self.timed_out:
            return None  # a cancel or shutdown that came after terraform's exit 0 is late
        if self.canceled:
            return Failure.CANCELED
        if self.interrupted:
            return Failure.INTERRUPTED
        if self.timed_out:
            return Failure.TIMED_OUT
        if self.returncode == 0:
            return None
        if self.lock is not None:
            return Failure.LOCKED
        if any(d.summary in _STALE_PLAN for d in self.errors):
            return Failure.STALE_PLAN
        if not self.errors:
            return Failure.KILLED if self.returncode < 0 else Failure.FAILED
        if not self.apply_started and self.args[:1] != ("destroy",):
            return Failure.REJECTED
        return Failure.FAILED

    @property
    def outputs(self) -> dict[str, dict[str, Any]] | None:
        """The last `outputs` event: name to {sensitive, type, value (absent if sensitive)}."""
        for event in reversed(self.events):
            if event.get("type") == "outputs":
                outputs = event.get("outputs")
                return dict(outputs) if isinstance(outputs, dict) else {}
        return None

    @property
    def changes(self) -> dict[str, int]:
        """Resources added, changed and removed (from the last `change_summary` event)."""
        for event in reversed(self.events):
            if event.get("type") == "change_summary":
                c = event.get("changes") or {}
                return {k: int(c.get(k, 0)) for k in ("add", "change", "remove")}
        return {"add": 0, "change": 0, "remove": 0}

    @property
    def planned(self) -> list[dict[str, str]]:
        """The planned changes: resource address and action."""
        found = []
        for event in self.events:
            if event.get("type") == "planned_change":
                change = event.get("change") or {}
                resource = change.get("resource") or {}
                found.append({"address": str(resource.get("addr", "")),
                              "action": str(change.get("action", ""))})
        return found

    @property
    def apply_started(self) -> bool:
        """True once terraform began changing real resources (plan time is over)."""
        return any(e.get("type") in ("apply_start", "apply_errored") for e in self.events)


def last_event(command: str) -> Callable[[Mapping[str, Any]], bool] | None:
    """A test of each event of terraform `command`'s stream, true at the event after which
    the command has nothing left to do but exit 0; None for a command without one.

    `apply` and `destroy` report their result only once the operation is over, its state
    written and its lock released: first the summary of what they changed (a
    `change_summary` whose operation is `apply` or `destroy`, never `plan`), then, for an
    apply, its `outputs`. After them the command returns 0 (terraform 1.11,
    internal/command/apply.go). A stream that lacks them (a failure, an older terraform)
    simply ends at the exit, as every other command's does.
    """
    if command not in ("apply", "destroy"):
        return None
    summarized = False

    def is_last(event: Mapping[str, Any]) -> bool:
        nonlocal summarized
        kind = event.get("type")
        if kind == "change_summary":
            changes = event.get("changes")
            operation = changes.get("operation") if isinstance(changes, dict) else None
            summarized = operation in ("apply", "destroy")
            return summarized and command == "destroy"
        return kind == "outputs" and summarized

    return is_last


def api_event(raw: Mapping[str, Any]) -> dict[str, Any] | None:
    """A terraform `-json` event as an event of tfserver's API (without `seq` and `time`),
    or None for the kinds the API does not show. Sensitive output values are redacted
    (terraform's stream carries none anyway); other text is the caller's to scrub."""
    kind = raw.get("type")
    if kind in _RESOURCE_PHASES:
        hook = raw.get("hook") or {}
        event: dict[str, Any] = {"type": "resource",
                                 "address": str((hook.get("resource") or {}).get("addr", "")),
                                 "action": str(hook.get("action", "")),
                                 "phase": _RESOURCE_PHASES[str(kind)]}
        if isinstance(hook.get("elapsed_seconds"), int | float):
            event["elapsed_s"] = hook["elapsed_seconds"]
        return event
    if kind == "resource_drift":  # names only: the stream carries no attribute values
        change = raw.get("change") or {}
        return {"type": "drift", "address": str((change.get("resource") or {}).get("addr", "")),
                "action": str(change.get("action", ""))}
    if kind == "change_summary":
        changes = raw.get("changes") or {}
        if changes.get("operation") != "plan":
            return None
        return {"type": "planned",
                "changes": {k: int(changes.get(k, 0)) for k in ("add", "change", "remove")}}
    if kind == "diagnostic":
        d = Diagnostic.from_event(raw)
        return {"type": "diagnostic", "severity": d.severity, "summary": d.summary,
                "detail": d.detail, "address": d.address}
    if kind == "outputs":
        outputs = raw.get("outputs") or {}
        if not isinstance(outputs, dict) or any("action" in v for v in outputs.values()):
            return None  # the plan's preview of the outputs, without values
        return {"type": "outputs",
                "outputs": shown_outputs(outputs)}
    return None


def parse_event(line: str) -> dict[str, Any] | None:
    """One line of terraform's `-json` stream as an event, or None for anything else."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None
