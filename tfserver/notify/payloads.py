"""The bodies of webhooks: Standard Webhooks' envelope `{"type", "timestamp", "data"}`,
with ids, statuses, change counts and links only. Never a variable's or an output's value:
a receiver that wants them reads the run with a token of its own."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import quote


class FinishedRun(Protocol):
    """What `run.finished` tells of a run (a run record has it: runs/store.py); notify
    imports no `runs`, so the record is described here."""

    id: str
    module: str
    instance: str
    tenant: str
    operation: str
    status: str
    changes: dict[str, int] | None
    client_id: str | None
    finished_at: float | None


def envelope(event: str, data: dict[str, Any], at: float) -> dict[str, Any]:
    """The envelope of an event that happened at `at` (epoch seconds)."""
    stamp = datetime.fromtimestamp(at, tz=UTC).isoformat(timespec="milliseconds")
    return {"type": event, "timestamp": stamp.replace("+00:00", "Z"), "data": data}


def links(module: str, instance: str, run_id: str | None = None) -> dict[str, str]:
    """Paths (on the server's own origin) of the instance, and of the run if any."""
    found = {"instance": f"/{quote(module, safe='')}/{quote(instance, safe='')}"}
    if run_id is not None:
        found["run"] = f"/runs/{quote(run_id, safe='')}"
    return found


def run_finished(run: FinishedRun, at: float) -> dict[str, Any]:
    """The `run.finished` payload of a run that ended at `at`."""
    changes = run.changes or {}
    return envelope("run.finished", {
        "run_id": run.id, "module": run.module, "instance": run.instance,
        "tenant": run.tenant, "operation": run.operation, "status": run.status,
        "changes": {k: int(changes.get(k, 0)) for k in ("add", "change", "remove")},
        "links": links(run.module, run.instance, run.id)}, at)


def instance_event(event: str, module: str, instance: str, tenant: str, *, at: float,
                   run_id: str | None = None, status: str | None = None) -> dict[str, Any]:
    """The payload of an `instance.*` event (drifted, expired, destroyed) or of
    `run.awaiting_approval`: the instance, the run that found or made it, its status."""
    data: dict[str, Any] = {"module": module, "instance": instance, "tenant": tenant,
                            "run_id": run_id, "links": links(module, instance, run_id)}
    if status is not None:
        data["status"] = status
    return envelope(event, data, at)


def instance_events(operation: str, status: str, drift: str | None, *,
                    expired: bool) -> list[tuple[str, str]]:
    """The `instance.*` events a run's end makes, each with the status it carries: a drift
    check that found drift (`instance.drifted`); the reaper's destroy of an instance that
    did expire (`instance.expired`, whatever its end: the run's status says); a destroy
    that succeeded (`instance.destroyed`)."""
    found = []
    if operation == "drift" and drift == "drifted":
        found.append(("instance.drifted", "drifted"))
    if operation == "destroy" and expired:
        found.append(("instance.expired", status))
    if operation == "destroy" and status == "succeeded":
        found.append(("instance.destroyed", "destroyed"))
    return found
