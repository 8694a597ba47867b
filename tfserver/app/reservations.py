"""Limits that hold under bursts, within one replica and across many: slots.

A tenant's limit of N on a module is N slot objects, `_slots/<kind>/<tenant>/<module>/<n>`
for n < N. A run (or a new instance) is admitted only once it has taken one, and a slot is
taken by creating its object only if there is none (`put_new`: `O_EXCL` in a folder, an S3
`If-None-Match: *` PUT), so two requests, two threads of one replica or two replicas, can
never hold the same slot, and never more than N are held.

A run's slot is given back when the run ends; an instance's when it is destroyed. A slot
whose holder is gone (a run that ended or was lost, an instance with no state and no run
making it) is freed by the next request that finds every slot taken, once the slot is
older than `grace` (a request between taking its slot and storing its run record is not
mistaken for a leftover).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from ..errors import TFServerError
from ..storage.base import ObjectStore

logger = logging.getLogger(__name__)

#: How long a new slot is trusted before its holder is checked.
GRACE = 30.0


@dataclass(frozen=True)
class Held:
    """One taken slot: its key, who holds it (a run id or a workspace), since when."""

    key: str
    holder: str
    since: float


class Slots:
    """The slots of one kind (`runs` or `instances`) over an object store."""

    def __init__(self, objects: ObjectStore, kind: str, *,
                 clock: Callable[[], float] = time.time, grace: float = GRACE) -> None:
        self.objects = objects
        self.kind = kind
        self.clock = clock
        self.grace = grace

    def folder(self, tenant: str, module: str) -> str:
        """Where the tenant's slots of the module are."""
        return f"_slots/{self.kind}/{tenant}/{module}/"

    def held(self, tenant: str, module: str) -> list[Held]:
        """Every taken slot of the tenant's module."""
        folder = self.folder(tenant, module)
        found = []
        for name in self.objects.keys(folder, limit=100_000):
            held = self.read(folder + name)
            if held is not None:
                found.append(held)
        return found

    def take(self, tenant: str, module: str, holder: str, limit: int) -> str | None:
        """Take a free slot of the `limit` for `holder`: its key, None when all are
        taken."""
        folder = self.folder(tenant, module)
        data = json.dumps({"holder": holder, "since": self.clock()}).encode()
        return next((f"{folder}{n}" for n in range(limit)
                     if self.objects.put_new(f"{folder}{n}", data)), None)

    def free(self, tenant: str, module: str, holder: str) -> None:
        """Give back every slot `holder` holds."""
        for held in self.held(tenant, module):
            if held.holder == holder:
                self.objects.delete(held.key)

    def free_stale(self, tenant: str, module: str, alive: Callable[[Held], bool]) -> int:
        """Free the slots older than the grace whose holder is not `alive`; how many."""
        now = self.clock()
        freed = 0
        for held in self.held(tenant, module):
            if now - held.since >= self.grace and not alive(held):
                logger.info("slot %s of %s freed: its holder %s is gone", held.key,
                            self.kind, held.holder)
                self.objects.delete(held.key)
                freed += 1
        return freed

    def read(self, key: str) -> Held | None:
        """The slot at `key` (None when it is free)."""
        data = self.objects.get(key)
        if data is None:
            return None
        try:
            doc = json.loads(data)
            return Held(key, str(doc["holder"]), float(doc["since"]))
        except (ValueError, KeyError, TypeError):
            # A damaged slot holds nothing that can be checked: treat it as old.
            return Held(key, "", 0.0)


class Reservations:
    """Run slots (`max_runs_per_tenant`) and instance slots (`max_instances_per_tenant`)."""

    def __init__(self, objects: ObjectStore, *, run_alive: Callable[[str], bool],
                 clock: Callable[[], float] = time.time, grace: float = GRACE) -> None:
        self.runs = Slots(objects, "runs", clock=clock, grace=grace)
        self.instances = Slots(objects, "instances", clock=clock, grace=grace)
        self.run_alive = run_alive

    def take_run(self, tenant: str, module: str, run_id: str, limit: int) -> str | None:
        """A run slot for `run_id` (its key); None when `limit` runs of the tenant's
        module are in flight (leftovers of ended or lost runs are freed first)."""
        key = self.runs.take(tenant, module, run_id, limit)
        if key is None and self.runs.free_stale(tenant, module,
                                                lambda h: self.run_alive(h.holder)):
            key = self.runs.take(tenant, module, run_id, limit)
        return key

    def free_run(self, tenant: str, module: str, run_id: str) -> None:
        """The run ended (or was refused after it took its slot)."""
        self.runs.free(tenant, module, run_id)

    def free_slot(self, key: str, holder: str) -> None:
        """Give back the one slot `take_run` took as `key`, if `holder` still holds it
        (freed meanwhile, it may be another run's now)."""
        held = self.runs.read(key)
        if held is not None and held.holder == holder:
            self.runs.objects.delete(key)

    def take_instance(self, tenant: str, module: str, workspace: str, limit: int, *,
                      existing: Collection[str], creating: Iterable[str]) -> bool:
        """An instance slot for a new `workspace`; False when the tenant's module has
        `limit` instances. `existing` are the tenant's workspaces with state, `creating`
        those a run in flight makes now: instances made before slots existed are given
        slots first, so every instance counts against the same `limit` slots."""
        held = {h.holder for h in self.instances.held(tenant, module)}
        if workspace in held:
            return True
        for ws in sorted(set(existing) - held):
            if self.instances.take(tenant, module, ws, limit) is None:
                return False  # the instances there are already fill every slot
        if self.instances.take(tenant, module, workspace, limit) is not None:
            return True
        making = set(creating)
        if self.instances.free_stale(
                tenant, module,
                lambda h: h.holder in existing or h.holder in making):
            return self.instances.take(tenant, module, workspace, limit) is not None
        return False

    def free_instance(self, tenant: str, module: str, workspace: str) -> None:
        """The instance is gone (destroyed, or its create left nothing)."""
        try:
            self.instances.free(tenant, module, workspace)
        except TFServerError as e:
            # A slot left behind is freed as stale by the next create that needs it.
            logger.warning("instance slot of %s not freed yet: %s", workspace, e.detail)
