"""The OpenAPI document assembled from its parts: the shared one and each module's
(`openapi.py` makes them; pure functions)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .schemas import DocSettings

#: The OpenAPI version the document speaks.
OPENAPI_VERSION = "3.1.0"


@dataclass(frozen=True)
class ModulePart:
    """One module's share of the document: its paths, schemas, scopes and tag."""

    name: str
    paths: dict[str, Any]
    schemas: dict[str, Any]
    scopes: dict[str, str]
    tag: dict[str, Any]


def assemble(base: Mapping[str, Any], parts: Iterable[ModulePart],
             settings: DocSettings) -> dict[str, Any]:
    """The document of the shared part and some modules' parts (pure; nothing is copied
    deeply: the parts are shared, read-only)."""
    parts = list(parts)
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = dict(base["schemas"])
    scopes: dict[str, str] = {}
    for part in parts:
        paths.update(part.paths)
        schemas.update(part.schemas)
        scopes.update(part.scopes)
    paths.update(base["paths"])
    names = ", ".join(f"`{p.name}`" for p in parts) or "none (send a token that may read one)"
    doc: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "tfserver",
            "version": settings.version,
            "description": (
                "Terraform modules as an HTTP API: `POST /{module}` and `PUT "
                "/{module}/{instance}` apply with the body's variables, `DELETE` destroys, "
                "`?dry_run=true` plans. Every apply, destroy and plan is a run under "
                "`/runs`. Errors are RFC 9457 problem documents.\n\nModules shown: "
                + names + "."),
        },
        "tags": [p.tag for p in parts] + [
            # Capitalised: no module can be named so (module names are lowercase).
            {"name": "Runs", "description": "Runs: records, progress, cancel, saved plans."},
            {"name": "Server", "description": "The server: index, health, this document."}],
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if settings.auth:
        scopes[f"{settings.scope_prefix}/admin"] = (
            "Everything: every tenant's instances and runs, sensitive outputs in clear, "
            "unlocking")
        doc["components"]["securitySchemes"] = {
            "oauth2": {"type": "oauth2", "description": "Cognito client credentials.",
                       "flows": {"clientCredentials": {"tokenUrl": settings.token_url,
                                                       "scopes": scopes}}},
            "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                       "description": "An access token, for example from `tfserver token`."},
        }
        doc["security"] = [{"oauth2": []}, {"bearer": []}]
    return doc

