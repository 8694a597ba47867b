"""Typed results as the JSON bodies of the API (pure functions; hrefs live here)."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlencode

from ..app.catalog import InstanceView, ModuleView
from ..app.execute import Applied, Checked, Destroyed, Planned
from ..app.history import RunPage
from ..app.orphan import Orphaned
from ..app.service import Readiness, Unlocked
from ..runs.store import AWAITING, RunRecord, rfc3339

Result = (Applied | Planned | Destroyed | Checked | InstanceView | ModuleView | Unlocked
          | Orphaned)


def render(result: Result) -> dict[str, Any]:
    """The JSON body of a service result."""
    if isinstance(result, Applied):
        applied: dict[str, Any] = {
            "module": result.module, "instance": result.instance, "outputs": result.outputs,
            "changes": result.changes, "run_id": result.run_id}
        if result.expires_at is not None:
            applied["expires_at"] = rfc3339(result.expires_at)
        return applied
    if isinstance(result, Planned):
        return {"module": result.module, "instance": result.instance, "dry_run": True,
                "changes": result.changes, "planned": result.planned,
                "run_id": result.run_id} | versioned(result.version)
    if isinstance(result, Destroyed):
        return {"module": result.module, "instance": result.instance, "destroyed": True,
                "changes": result.changes, "run_id": result.run_id}
    if isinstance(result, Checked):
        return {"module": result.module, "instance": result.instance,
                "drift": drift(result.drift), "run_id": result.run_id}
    if isinstance(result, InstanceView):
        body: dict[str, Any] = {
            "module": result.module, "instance": result.instance, "outputs": result.outputs,
            "resources": result.resources, "serial": result.serial,
            "terraform_version": result.terraform_version,
            "status": "busy" if result.busy else "idle",
            "expires_at": rfc3339(result.expires_at),
            "drift": drift(result.drift),
        }
        if result.latest is not None:
            body.update(version=result.version, latest=result.latest,
                        upgrade_available=result.upgrade_available)
        if result.lock:
            body["lock"] = result.lock
            body["status"] = "locked"
        if result.stale:
            body["stale"] = True
        if result.used_by is not None:
            body["used_by"], body["outdated"] = result.used_by, result.outdated or []
        return body
    if isinstance(result, ModuleView):
        m = result.module
        return {
            "module": m.name,
            "description": m.description,
            "variables": m.schema,
            **({"version": m.version, "default_version": result.default_version,
                "versions": result.versions} if result.versions else {}),
            "outputs": {o.name: {"description": o.description, "sensitive": o.sensitive}
                        | ({"referenced_by": result.referenced[o.name]}
                           if result.referenced and o.name in result.referenced else {})
                        for o in m.outputs.values()},
            "instances": [{"instance": i.instance, "tenant": i.tenant} if i.tenant
                          else {"instance": i.instance, "href": f"/{m.name}/{i.instance}"}
                          for i in result.instances],
        }
    if isinstance(result, Orphaned):
        return {"module": result.module, "instance": result.instance, "orphaned": True,
                "archived_until": rfc3339(result.archived_until)}
    return {"module": result.module, "instance": result.instance, "unlocked": result.lock_id}


def versioned(moved: dict[str, Any] | None) -> dict[str, Any]:
    """What a plan says of its module version: the version, and when the plan moves the
    instance to it, the version it leaves and the variables that differ."""
    if not moved or moved.get("to") is None:
        return {}
    if "from" not in moved:
        return {"version": moved["to"]}
    return {"version": moved["to"], "from_version": moved.get("from"),
            "dropped": moved.get("dropped", []), "added": moved.get("added", []),
            "retyped": moved.get("retyped", [])}


def upgrade(doc: dict[str, Any]) -> dict[str, Any]:
    """A fleet upgrade's record as `GET /upgrades/{id}` shows it (times in RFC 3339)."""
    links = {"self": f"/upgrades/{doc['id']}"}
    if doc.get("status") == "planned":
        links["apply"] = f"/upgrades/{doc['id']}/apply"
    return {**{k: v for k, v in doc.items() if k not in ("created_at", "updated_at",
                                                          "events")},
            "created_at": rfc3339(doc.get("created_at")),
            "updated_at": rfc3339(doc.get("updated_at")),
            "events": [event(e) for e in doc.get("events", [])], "links": links}


def drift(report: dict[str, Any] | None) -> dict[str, Any]:
    """An instance's last drift check (`unknown` before any): names, never values."""
    if not report:
        return {"status": "unknown", "checked_at": None, "run_id": None, "changes": []}
    shown = {"status": report.get("status"),
             "checked_at": rfc3339(report.get("checked_at")), "run_id": report.get("run_id"),
             "changes": [{"address": c.get("address"), "action": c.get("action"),
                          "attributes": list(c.get("attributes") or [])}
                         for c in report.get("changes") or [] if isinstance(c, dict)]}
    if report.get("reconciled_by"):
        shown["reconciled_by"] = report["reconciled_by"]
    return shown


def readiness(report: Readiness) -> dict[str, Any]:
    """The parts of a readiness report."""
    return {"terraform": report.terraform, "modules": report.modules,
            "backend": report.backend}


def instance_href(module: str, instance: str, tenant: str, viewer_tenant: str) -> str:
    """The instance's URL as the viewer reaches it (`?tenant=` for another tenant's)."""
    href = f"/{module}/{instance}"
    return href if tenant == viewer_tenant else f"{href}?tenant={tenant}"


def run(record: RunRecord, viewer_tenant: str) -> dict[str, Any]:
    """A run record as `GET /runs/{id}` shows it."""
    links = {"self": f"/runs/{record.id}", "events": f"/runs/{record.id}/events",
             "instance": instance_href(record.module, record.instance, record.tenant,
                                       viewer_tenant)}
    plan = record.plan
    if plan is not None and record.status == "succeeded" and not plan.get("applied_by") \
            and float(plan.get("expires_at", 0)) > time.time():
        links["apply"] = f"/runs/{record.id}/apply"
    body: dict[str, Any] = {
        "id": record.id,
        "module": record.module,
        "instance": record.instance,
        "operation": record.operation,
        "status": record.status,
        "queue_position": record.queue_position if record.status == "queued" else None,
        "created_at": rfc3339(record.created_at),
        "started_at": rfc3339(record.started_at),
        "finished_at": rfc3339(record.finished_at),
        "who": {"subject": record.subject, "tenant": record.tenant},
        "changes": record.changes,
        "outputs": record.outputs,
        "planned": record.planned,
        "problem": record.problem,
        "attempt": record.attempt,
        "links": links,
    }
    if plan is not None:
        body["plan"] = {"expires_at": rfc3339(float(plan.get("expires_at", 0))),
                        "applied_by": plan.get("applied_by")}
    if record.plan_of:
        body["plan_of"] = record.plan_of
    if record.retry_of:
        body["retry_of"] = record.retry_of
    body.update(versioned(record.moved or {"to": record.version}))
    if record.idempotency_key:
        body["idempotency_key"] = record.idempotency_key
    if record.cancel:
        body["cancel"] = record.cancel
    if record.state_may_be_locked:
        body["state_may_be_locked"] = True
    if record.warnings:
        body["warnings"] = record.warnings
    if record.drift is not None:
        body["drift"] = drift(record.drift)
    if record.references is not None:
        body["references"] = record.references
    if record.triggered_by:
        body["triggered_by"] = record.triggered_by
    if record.approval is not None:
        body["approval"] = approval(record.approval)
        if record.status == AWAITING:
            links |= {"approve": f"/runs/{record.id}/approve",
                      "reject": f"/runs/{record.id}/reject"}
    return body


def approval(kept: dict[str, Any]) -> dict[str, Any]:
    """A run's approval as its record shows it: who planned, who answered, and when."""
    expires, answered = kept.get("expires_at"), kept.get("answered_at")
    return {"separate_approver": bool(kept.get("separate_approver")),
            "planned_by": kept.get("planned_by"),
            "expires_at": rfc3339(float(expires)) if expires is not None else None,
            "answer": kept.get("answer"), "answered_by": kept.get("answered_by"),
            "answered_at": rfc3339(float(answered)) if answered is not None else None}


def run_page(page: RunPage, base: str, query: dict[str, str]) -> dict[str, Any]:
    """A page of runs with the href of the next one."""
    nxt = None
    if page.next_after:
        params = {**query, "before": page.next_after}
        nxt = base + "?" + urlencode(sorted(params.items()))
    return {"runs": [run(r, page.viewer_tenant) for r in page.runs], "next": nxt}


def event(data: dict[str, Any]) -> dict[str, Any]:
    """An event as the stream shows it (its time in RFC 3339)."""
    return {**data, "time": rfc3339(float(data.get("time", 0)))}
