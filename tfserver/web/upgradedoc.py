"""The OpenAPI side of module versions: the `version` parameter of a versioned module's
operations (its values listed) and the fleet upgrade's operations and record (pure;
`openapi.py` takes them in)."""

from __future__ import annotations

from typing import Any

from ..module.discover import Module
from .schemas import (
    MAX_PREFER_WAIT,
    RUN_ID,
    STRING,
    TIME,
    DocSettings,
    answers,
    content,
    obj,
    ok_answer,
    param,
    ref,
)


def version_parameters(module: Module) -> list[dict[str, Any]]:
    """`?version=` of a versioned module's applies and reads (none for an unversioned)."""
    if not module.versions:
        return []
    return [param("version", "query", {"type": "string", "enum": list(module.versions),
                                       "default": module.version},
                  f"The module version to use (default {module.version}, or the "
                  "instance's own version for an existing instance). A version other than "
                  "the instance's moves it: its kept inputs are carried over, the body's "
                  "variables on top.")]


def upgrade_schemas() -> dict[str, Any]:
    """`Upgrade`: a fleet upgrade's record."""
    entry = obj({
        "instance": STRING, "tenant": STRING,
        "from": {"type": ["string", "null"]},
        "status": {"enum": ["planning", "planned", "held", "failed", "applying", "applied",
                            "stale", "not_applied"]},
        "plan_run": {"type": "string", "pattern": RUN_ID},
        "apply_run": {"type": "string", "pattern": RUN_ID},
        "changes": {"type": "object"},
        "replaced": {"type": "array", "items": STRING},
        "destroyed": {"type": "array", "items": STRING},
        "dropped": {"type": "array", "items": STRING},
        "added": {"type": "array", "items": STRING},
        "retyped": {"type": "array", "items": STRING},
        "held_back": {**STRING, "description": "Why it is not applied."},
        "problem": STRING}, ("instance", "tenant", "status"))
    upgrade = obj({
        "id": {"type": "string", "pattern": RUN_ID}, "module": STRING, "to": STRING,
        "status": {"enum": ["planning", "planned", "applying", "applied", "failed"]},
        "by": STRING, "batch_size": {"type": "integer"}, "allow_replace": {"type": "boolean"},
        "set": {"type": "array", "items": STRING, "description": "The variables set (names "
                                                                 "only)."},
        "instances": {"type": "array", "items": entry},
        "events": {"type": "array", "items": {"type": "object"}},
        "created_at": TIME, "updated_at": TIME, "links": {"type": "object"}},
        ("id", "module", "to", "status", "instances"),
        "A fleet upgrade: a saved plan per instance, then applied in batches.")
    return {"Upgrade": upgrade}


def upgrade_body(module: Module) -> dict[str, Any]:
    """The body of `POST /{module}/upgrades`."""
    versions = list(module.versions)
    return {"required": True, "content": content(obj({
        "to": {"type": "string", **({"enum": versions} if versions else {}),
               "description": "The version to move to."},
        "instances": {"type": "array", "maxItems": 1000, "items": {"oneOf": [STRING, obj(
            {"instance": STRING, "tenant": STRING}, ("instance",))]},
            "description": "Default: every instance on another version."},
        "set": {"type": "object", "description": "Variables to set on every instance."},
        "batch_size": {"type": "integer", "minimum": 1, "maximum": 100, "default": 5},
        "allow_replace": {"type": "boolean", "default": False,
                          "description": "Apply plans that replace or destroy resources."}},
        ("to",)))}


def module_upgrade_operations(module: Module, settings: DocSettings) -> dict[str, Any]:
    """`upgrade_{module}`: the preview of a fleet upgrade."""
    return {"upgrade_{module}": {
        "summary": f"Admin: preview a fleet upgrade of {module.name} (nothing applied)",
        "tags": [module.name], "requestBody": upgrade_body(module),
        "responses": answers(settings, {"202": ok_answer(
            "The upgrade, planning: follow `Location`.", ref("Upgrade"))},
            400, 403, 411, 413, 415)}}


#: `Prefer: wait=N` on an upgrade's record: no polling while it plans or applies.
WAIT_UPGRADE = param("Prefer", "header", {"type": "string", "examples": ["wait=60"]},
                     "RFC 7240 `wait=N`: answer once the upgrade is no longer planning or "
                     f"applying, or after N seconds (at most {MAX_PREFER_WAIT}), whichever "
                     "comes first.")


def upgrade_operations(settings: DocSettings) -> dict[str, Any]:
    """`get_upgrade` and `apply_upgrade`."""
    tags = ["upgrades"]
    return {
        "get_upgrade": {"summary": "Admin: a fleet upgrade's record (its progress)",
                        "tags": tags, "parameters": [WAIT_UPGRADE],
                        "responses": answers(settings, {"200": ok_answer(
                            "The upgrade.", ref("Upgrade"))}, 403, 404)},
        "apply_upgrade": {"summary": "Admin: apply a previewed upgrade's saved plans in "
                                     "batches (stops at the first failure)",
                          "tags": tags, "responses": answers(settings, {"202": ok_answer(
                              "The upgrade, applying.", ref("Upgrade"))}, 403, 404, 409)},
    }
