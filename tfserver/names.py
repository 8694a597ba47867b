"""Names in one place: modules, instances, tenants and the workspaces that join them.

A workspace is `<tenant_key>.<instance>`. Instance names hold no dot and tenant keys have
a fixed shape, so no name a tenant picks can reach another tenant's workspace.
"""

from __future__ import annotations

import hashlib
import re

from .errors import BadRequest

#: Module and instance names (and so URL path segments): lowercase, digits, `_` and `-`.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
#: The tenant of every caller while authentication is off.
LOCAL_TENANT = "local"
#: A tenant key: the first 24 hex digits of sha256(tenant), or `local`.
TENANT_KEY_RE = re.compile(r"^([0-9a-f]{24}|local)$")
#: Top-level routes of the API; a module folder with one of these names is refused.
RESERVED_NAMES = frozenset({"healthz", "readyz", "metrics", "runs", "openapi", "openapi.json",
                            "docs", "jobs", "upgrades"})


def tenant_key(tenant: str) -> str:
    """The fixed-length key of a tenant (a client id or subject) used in workspace names."""
    return hashlib.sha256(tenant.encode()).hexdigest()[:24]


def workspace_name(key: str, instance: str) -> str:
    """The Terraform workspace of a tenant's instance."""
    return f"{key}.{instance}"


def workspace_tenant(workspace: str) -> str:
    """The tenant key of a workspace (what comes before its first dot)."""
    return workspace.partition(".")[0]


def split_workspace(workspace: str) -> tuple[str, str] | None:
    """(tenant key, instance) of a workspace tfserver made, or None for any other name."""
    key, dot, instance = workspace.partition(".")
    if not dot or not TENANT_KEY_RE.match(key) or not NAME_RE.match(instance):
        return None
    return key, instance


def check_instance_name(instance: str) -> None:
    """Raise 400 unless the name is a valid instance name."""
    if not NAME_RE.match(instance):
        raise BadRequest(
            f"instance names match {NAME_RE.pattern}",
            extra={"errors": [{"field": "instance", "message": "invalid name"}]},
        )


def check_tenant_key(key: str) -> None:
    """Raise 400 unless the text is a tenant key as listings show it."""
    if not TENANT_KEY_RE.match(key):
        raise BadRequest("tenant keys are 24 hex digits, as instance listings show them",
                         extra={"errors": [{"field": "tenant", "message": "invalid key"}]})
