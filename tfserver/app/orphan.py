"""`DELETE /{module}/{instance}?orphan=true` (admin): forget an instance without
destroying what it made, for a destroy that can never succeed.

No terraform runs: the state is moved aside (the backend's `archive`) and kept for
TFSERVER_ARCHIVE_RETENTION, the instance's kept inputs, expiry and instance slot go, its
run records stay. A later apply of the name creates a new instance.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ..auth import Principal
from ..errors import Conflict, NotFound, TFServerError
from ..logs import audit_orphan
from ..names import workspace_tenant
from ..runs.expiry import Expiries
from ..runs.registry import Runs
from ..storage.base import StateBackend
from .catalog import Catalog, target_workspace
from .reservations import Reservations

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Orphaned:
    """An instance forgotten; its state kept aside until `archived_until`."""

    module: str
    instance: str
    archived_until: float


class Orphaner:
    """Forgets instances, never while a run is queued or running on one."""

    def __init__(self, catalog: Catalog, backend: StateBackend, runs: Runs,
                 reservations: Reservations, expiries: Expiries, *,
                 retention: float) -> None:
        self.catalog = catalog
        self.backend = backend
        self.runs = runs
        self.reservations = reservations
        self.expiries = expiries
        self.retention = retention

    def orphan(self, principal: Principal, name: str, instance: str, *,
               tenant: str | None = None, address: str | None = None) -> Orphaned:
        """Admin: forget the instance (404 without state, 409 while a run is on it)."""
        self.catalog.module(name)
        principal.require_admin()
        ws = target_workspace(principal, instance, tenant)
        what = f"instance {instance!r} of module {name}"
        with self.runs.scheduler.hold((name, ws), what):
            if self._active_elsewhere(name, ws):
                raise Conflict(f"a run is queued or running on {what}: cancel it or "
                               "wait for it to end", retry_after=5)
            if not self.backend.exists(name, ws):
                raise NotFound(f"module {name} has no instance {instance!r}")
            now = time.time()
            archive = self.backend.archive(name, ws, now)
            self.backend.inputs.delete(name, ws)
            self.expiries.clear(name, ws)
            self.reservations.free_instance(workspace_tenant(ws), name, ws)
        until = now + self.retention
        audit_orphan(principal, address, module=name, instance=instance, workspace=ws,
                     archive=archive, until=until)
        logger.warning("%s orphaned by %s: its state is kept at %s", what,
                       principal.subject, archive)
        return Orphaned(name, instance, until)

    def _active_elsewhere(self, name: str, ws: str) -> bool:
        """True when a stored run of the instance is queued or running (on any replica,
        or waiting on the `sqs` queue)."""
        tenant = workspace_tenant(ws)
        for run_tenant, module, run_id in self.runs.store.active():
            if run_tenant != tenant or module != name:
                continue
            try:
                record = self.runs.record(run_id)
            except NotFound:
                continue
            if record.workspace == ws and record.active:
                return True
        return False

    def purge(self) -> int:
        """Delete the archives past their retention (the reaper's chore); how many."""
        try:
            return self.backend.purge_archives(time.time() - self.retention)
        except TFServerError as e:
            logger.warning("archived states not purged now: %s", e.detail)
            return 0
