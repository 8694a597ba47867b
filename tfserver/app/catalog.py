"""Reads of the API, without terraform: the modules, their instances, an instance's state.

Nothing here changes anything: a GET of an instance reads its state (and lock) from the
backend, its expiry from the object store, and whether a run holds it from the lanes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..auth import Principal
from ..errors import NotFound
from ..module.discover import Module
from ..module.versions import recorded, requested
from ..names import check_instance_name, check_tenant_key, split_workspace, workspace_name
from ..runs.expiry import Expiries
from ..scrub import Scrubber, Secret, shown_outputs
from ..storage.base import StateBackend, holds_instance
from .driftstore import DriftReports


@dataclass(frozen=True)
class InstanceRef:
    """One instance in a listing; `tenant` is set for another tenant's (admins see them)."""

    instance: str
    tenant: str | None = None


@dataclass(frozen=True)
class ModuleView:
    """A module and the caller's instances of it."""

    module: Module
    instances: list[InstanceRef]
    #: Per output, the modules whose instances reference it (dependents.py).
    referenced: dict[str, list[str]] | None = None
    #: Every version of the module, oldest first (empty: unversioned), and the default.
    versions: list[str] = field(default_factory=list)
    default_version: str | None = None


@dataclass(frozen=True)
class InstanceView:
    """An instance as its state shows it, read without terraform."""

    module: str
    instance: str
    outputs: dict[str, Any]
    resources: int
    serial: Any
    terraform_version: Any
    busy: bool
    lock: dict[str, str] | None
    #: The state shown is the last complete one; a newer one is being written.
    stale: bool = False
    #: When the instance expires (seconds since the epoch), if it does.
    expires_at: float | None = None
    #: Its last drift check's report (`driftstore.py`), None if never checked.
    drift: dict[str, Any] | None = None
    #: Who references it, and which of its own references moved on (`dependents.py`).
    used_by: list[dict[str, Any]] | None = None
    outdated: list[dict[str, Any]] | None = None
    #: The module version it is on, the newest served, and whether it is older.
    version: str | None = None
    latest: str | None = None
    upgrade_available: bool = False


def target_workspace(principal: Principal, instance: str, tenant: str | None) -> str:
    """The workspace a request names: the caller's own instance, or for an admin that
    passes another tenant's key (as listings show it), that tenant's."""
    check_instance_name(instance)
    if tenant is None or tenant == principal.tenant_key:
        return workspace_name(principal.tenant_key, instance)
    principal.require_admin()
    check_tenant_key(tenant)
    return workspace_name(tenant, instance)


class Catalog:
    """The modules served, and what the backend knows of their instances."""

    def __init__(self, modules: Mapping[str, Module], backend: StateBackend,
                 busy: Callable[[Hashable], bool], expiries: Expiries) -> None:
        self.modules = modules
        self.backend = backend
        self.busy = busy
        self.expiries = expiries
        # A scrubber per set of secrets: GETs of one instance reuse the one they compiled.
        self._scrubbers: dict[tuple[tuple[type, Secret], ...], Scrubber] = {}
        self._scrubbers_lock = threading.Lock()

    def module(self, name: str) -> Module:
        """The module served at `/<name>`, or 404."""
        found = self.modules.get(name)
        if found is None:
            raise NotFound(f"no module named {name!r}")
        return found

    def index(self, principal: Principal) -> list[Module]:
        """The modules the caller may read."""
        return [m for m in self.modules.values() if principal.can(m.name, "read")]

    def instances(self, principal: Principal, module: str) -> list[InstanceRef]:
        """The caller's instances of a module (an admin sees every tenant's); phantoms
        are no instances (`holds_instance`)."""
        found = []
        for ws in self.backend.workspaces(module):
            parts = split_workspace(ws)
            if parts is None:
                continue
            tenant, instance = parts
            if tenant == principal.tenant_key:
                found.append(InstanceRef(instance))
            elif principal.admin:
                found.append(InstanceRef(instance, tenant))
        return found

    def describe(self, principal: Principal, name: str,
                 version: str | None = None) -> ModuleView:
        """A module (at `version`, else its default): its variables schema, outputs and
        the caller's instances."""
        m = self.module(name)
        principal.require(name, "read")
        shown = requested(m, version) or m
        return ModuleView(shown, self.instances(principal, name), versions=list(m.versions),
                          default_version=m.version)

    def show(self, principal: Principal, name: str, instance: str,
             tenant: str | None = None) -> InstanceView:
        """An instance's outputs and status, read from its state without terraform."""
        m = self.module(name)
        principal.require(name, "read")
        ws = target_workspace(principal, instance, tenant)
        snap = self.backend.snapshot(name, ws)
        state, busy = snap.state, self.busy((name, ws))
        # An empty state is a phantom (`holds_instance`), but not while a run here makes
        # or destroys the instance: a 404 then would come before that run ended.
        if state is None or not (busy or holds_instance(state)):
            raise NotFound(f"module {name} has no instance {instance!r}")
        # The kept inputs are read once: they give both the instance's version and the
        # secrets its outputs are scrubbed of (read twice, they were 7% of a GET).
        kept = self.backend.inputs.kept(name, ws) if m.versions or m.sensitive_variables \
            else None
        on = recorded(m, kept.version) if kept is not None else m
        return InstanceView(
            module=name,
            instance=instance,
            outputs=shown_outputs(state.get("outputs") or {}, reveal=principal.admin,
                                  scrub=self._scrubber(on, kept.inputs if kept else {})),
            resources=len(state.get("resources") or []),
            serial=state.get("serial"),
            terraform_version=state.get("terraform_version"),
            busy=busy,
            lock=snap.lock,
            stale=snap.stale,
            expires_at=self.expiries.get(name, ws),
            drift=DriftReports(self.backend.objects).get(name, ws),
            version=on.version, latest=m.latest,
            upgrade_available=on.version is not None and on.version != m.latest,
        )

    def _scrubber(self, m: Module, inputs: Mapping[str, Any]) -> Scrubber | None:
        """What scrubs an instance's outputs: every value of its sensitive variables, as
        its last apply gave them (`inputs`, the kept ones) or their defaults; None without
        any."""
        if not m.sensitive_variables:
            return None
        secrets = tuple(m.secret_values(inputs))
        if not secrets:
            return None
        key = tuple((type(s), s) for s in secrets)  # 1 and 1.0 print differently
        with self._scrubbers_lock:
            found = self._scrubbers.get(key)
        if found is None:
            found = Scrubber(secrets)
            with self._scrubbers_lock:
                if len(self._scrubbers) >= 256:
                    self._scrubbers.clear()  # a bound, not a policy: rebuilt on demand
                self._scrubbers[key] = found
        return found
