"""The OpenAPI parts of approvals: a record's `approval` field and the answers to a run
awaiting approval (pure; `schemas.py` and `openapi.py` take them in)."""

from __future__ import annotations

from typing import Any

from .schemas import (
    APPLIED_PREF,
    LOCATION,
    PREFER,
    RUN_FAILURES,
    STRING,
    TIME,
    DocSettings,
    accepted,
    answers,
    obj,
    ok_answer,
    ref,
)

#: Who may answer a run awaiting approval (a module's scope, by its name).
APPROVE_SCOPE = "Approve or reject the runs of module {name} awaiting approval (and read them)"


def approval_schema() -> dict[str, Any]:
    """A record's `approval`: who planned, the answer, who gave it and when."""
    return obj({
        "separate_approver": {"type": "boolean",
                              "description": "The run's own subject may not approve it."},
        "planned_by": STRING,
        "expires_at": {**TIME, "description": "Unanswered by then, the run ends `expired` "
                                              "(TFSERVER_PLAN_TTL after its plan)."},
        "answer": {"enum": ["approved", "rejected", "expired", "canceled", None]},
        "answered_by": {"type": ["string", "null"]},
        "answered_at": TIME,
    }, ("separate_approver", "planned_by", "expires_at", "answer", "answered_by",
        "answered_at"),
        "A run the policy makes wait for an approval (`require_approval`).")


def approval_operations(settings: DocSettings) -> dict[str, dict[str, Any]]:
    """`approve_run` and `reject_run`, by operation id."""
    runs = ["Runs"]
    who = ("Needs the module's `approve` scope, or admin; with `separate_approver`, never "
           "the run's own subject (403). Another tenant's run is 404; a run that does not "
           "await approval (anymore) is 409.")
    return {
        "approve_run": {
            "summary": "Approve a run awaiting approval: exactly its saved plan is applied",
            "description": who + " A plan gone stale meanwhile fails the run (409). The "
                           "approved run takes a slot of `max_runs_per_tenant` again: 429 "
                           "while the tenant's runs of the module fill them (it still "
                           "awaits).",
            "tags": runs, "parameters": [PREFER],
            "responses": answers(settings, {
                "200": ok_answer("The outcome.", {"oneOf": [ref("Applied"),
                                                            ref("Destroyed")]}, APPLIED_PREF),
                "201": ok_answer("A new instance.", ref("Applied"), {**LOCATION,
                                                                      **APPLIED_PREF}),
                "202": accepted()}, 403, 404, *RUN_FAILURES)},
        "reject_run": {
            "summary": "Reject a run awaiting approval: it ends `rejected`",
            "description": who, "tags": runs,
            "responses": answers(settings, {"200": ok_answer(
                "The run's record.", ref("RunRecord"))}, 403, 404, 409, 411, 413)},
    }
