"""The OpenAPI schemas of drift checks: an instance's `drift` field and a check's answer
(pure; `schemas.py` and `openapi.py` take them in)."""

from __future__ import annotations

from typing import Any

from .schemas import RUN_ID, STRING, TIME, obj, param

#: `?reconcile=true` of a drift check.
RECONCILE = param("reconcile", "query", {"type": "boolean", "default": False},
                  "When the check finds drift, apply the instance's kept inputs (a run "
                  "by `tfserver:drift`, named in `drift.reconciled_by`).")


def drift_schemas() -> dict[str, Any]:
    """`Drift` (an instance's last check) and `Checked` (a check's answer)."""
    run_id = {"type": "string", "pattern": RUN_ID}
    change = obj({"address": STRING, "action": STRING,
                  "attributes": {"type": "array", "items": STRING,
                                 "description": "The names of the attributes that differ; "
                                                "never their values."}},
                 ("address", "action", "attributes"))
    drift = obj({
        "status": {"enum": ["in_sync", "drifted", "unknown"]},
        "checked_at": TIME,
        "run_id": {"type": ["string", "null"], "pattern": RUN_ID},
        "changes": {"type": "array", "items": change},
        "reconciled_by": {**run_id, "description": "The apply that reconciles the drift."},
    }, ("status", "checked_at", "run_id", "changes"),
        "The instance's last drift check (`unknown` before any): what changed outside "
        "terraform, as addresses, actions and attribute names only.")
    checked = obj({"module": STRING, "instance": STRING, "drift": drift, "run_id": run_id},
                  ("module", "instance", "drift", "run_id"), "A drift check that ran.")
    return {"Drift": drift, "Checked": checked}
