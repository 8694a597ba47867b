"""An admin's force-unlock of a backend lock that a killed run left behind."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..auth import Principal
from ..errors import BadRequest, Conflict
from ..runs.lanes import Scheduler
from ..storage.base import StateBackend
from ..terraform.args import build_args
from ..terraform.process import Runner
from ..terraform.workdir import WorkingCopies
from .catalog import Catalog, target_workspace
from .execute import shown_lock

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unlocked:
    """A backend lock that an admin cleared."""

    module: str
    instance: str
    lock_id: str


class Unlocker:
    """Clears a backend lock by its id, never while this server runs on the instance."""

    def __init__(self, catalog: Catalog, copies: WorkingCopies, scheduler: Scheduler,
                 backend: StateBackend, runner: Runner, *, timeout: float) -> None:
        self.catalog = catalog
        self.copies = copies
        self.scheduler = scheduler
        self.backend = backend
        self.runner = runner
        self.timeout = timeout

    def force_unlock(self, principal: Principal, name: str, instance: str,
                     lock_id: Any, tenant: str | None = None) -> Unlocked:
        """Admin: clear a backend lock left by a killed run (its id must match)."""
        self.catalog.module(name)
        principal.require_admin()
        ws = target_workspace(principal, instance, tenant)
        if not isinstance(lock_id, str) or not lock_id.strip():
            raise BadRequest("send the lock id to clear as {\"lock_id\": \"...\"}",
                             extra={"errors": [{"field": "lock_id", "message": "required"}]})
        wc = self.copies.ready_any(name)  # a versioned module: any version's copy
        # Never while this server runs terraform on the instance: that lock is alive.
        with self.scheduler.hold((name, ws), f"instance {instance!r} of module {name}"):
            held = self.backend.lock_info(name, ws)
            if held is not None and held.get("id") not in (None, lock_id):
                raise Conflict("that is not the id of the lock held now",
                               lock=shown_lock(held))
            result = self.runner.run(
                build_args("force-unlock", extra=[lock_id]),
                cwd=wc.path, workspace=ws, timeout=self.timeout)
            if not result.ok:
                logger.warning("force-unlock of %s/%s failed: %s", name, instance,
                               result.stderr.strip()[-500:])
                raise Conflict("terraform could not clear that lock: the id does not match "
                               "a held lock", lock=shown_lock(held or {}))
        logger.warning("lock %s of %s/%s cleared by %s", lock_id, name, instance,
                       principal.subject)
        return Unlocked(name, instance, lock_id)
