"""The policy's quotas and TTLs applied to one request.

The run limit and the instance quota are slots (reservations.py): a run takes a run slot
and a create an instance slot, each with a create-if-absent write, so neither limit can be
passed by a burst of requests on one replica or on many. The bound on a tenant's queued
runs is counted from the stored records (a bound against flooding, not a quota).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..auth import Principal
from ..errors import Conflict, NotFound, QuotaExceeded, TFServerError, TooManyRuns
from ..module.limits import Limits
from ..module.policy import Policy
from ..names import split_workspace, workspace_name
from ..runs.registry import Runs
from ..runs.store import RunRecord
from ..storage.base import StateBackend
from .reservations import Reservations

logger = logging.getLogger(__name__)


class Governance:
    """Quotas and TTLs of the policy, for the service."""

    def __init__(self, policy: Policy, backend: StateBackend, runs: Runs) -> None:
        self.policy = policy
        self.backend = backend
        self.runs = runs
        self.reservations = Reservations(backend.objects, run_alive=self._run_alive)
        #: The run slot each run that may park took as it was admitted here: it gives
        #: back that one alone (an approval racing the parking holds one of its own).
        #: Entries go as the run parks or ends (runs that cannot park are not kept: on
        #: the sqs engine they end on a worker, and would stay here for ever).
        self._admitted: dict[str, str] = {}
        self._mutex = threading.Lock()

    def limits(self, principal: Principal, module: str) -> Limits:
        """What the policy allows this caller on this module."""
        return self.policy.limits(module, principal.tenant)

    def reserve(self, limits: Limits, record: RunRecord, *, queued: bool
                ) -> Callable[[], None]:
        """Admit the run under the limits (429 past the run limit, 403 past the instance
        quota; an asynchronous run, 409 past the tenant's queued runs); returns what gives
        its slots back if the run is refused later on."""
        tenant, module = record.tenant, record.module
        if queued and limits.max_queued is not None:
            self._check_queued(limits.max_queued, tenant)
        taken: list[Callable[[], None]] = []
        if limits.max_runs is not None:
            key = self.reservations.take_run(tenant, module, record.id, limits.max_runs)
            if key is None:
                raise _too_many(limits.max_runs, module)
            if limits.require_approval:  # it may park here (else it may end elsewhere)
                with self._mutex:
                    self._admitted[record.id] = key
            taken.append(lambda: self._give_back(record))
        if limits.max_instances is not None and record.operation == "apply":
            try:
                if self._reserve_instance(limits.max_instances, record):
                    taken.append(lambda: self.reservations.free_instance(
                        tenant, module, record.workspace))
            except QuotaExceeded:
                for give_back in taken:
                    give_back()
                raise

        def release() -> None:
            for give_back in taken:
                give_back()
        return release

    def parked(self, record: RunRecord) -> None:
        """A run awaits its approval: it is not in flight, so its run slot goes back
        (`resumed` takes one again once it is approved)."""
        with self._mutex:
            key = self._admitted.pop(record.id, None)
        if key is None:
            return
        try:
            self.reservations.free_slot(key, record.id)
        except TFServerError as e:  # not active now: freed as stale by the next take
            logger.warning("run slot of %s not given back yet: %s", record.id, e.detail)

    def resumed(self, record: RunRecord, planner: Principal) -> Callable[[], None]:
        """An approved run goes on: it takes a run slot again, under its planner's
        limits (429 while the tenant's runs of the module fill every slot: the run still
        awaits its approval); returns what gives the slot back if it goes no further."""
        tenant, module = record.tenant, record.module
        limits = self.limits(planner, module)
        if limits.max_runs is None:
            return lambda: None
        key = self.reservations.take_run(tenant, module, record.id, limits.max_runs)
        if key is None:
            raise _too_many(limits.max_runs, module, f": approve run {record.id} once one ended")
        # That slot alone: a second approval racing this one holds another of the run's.
        return lambda: self.reservations.free_slot(key, record.id)

    def readmitted(self, record: RunRecord, planner: Principal) -> None:
        """An approved run taken back at a restart goes on: it takes a run slot again
        unless it still holds one (a slot freed as stale while the server was down). It
        was approved already, so it is never refused: past the limit it is logged."""
        tenant, module = record.tenant, record.module
        limits = self.limits(planner, module)
        if limits.max_runs is None or any(
                h.holder == record.id for h in self.reservations.runs.held(tenant, module)):
            return
        if self.reservations.take_run(tenant, module, record.id, limits.max_runs) is None:
            logger.warning("run %s, approved before the restart, goes on past "
                           "max_runs_per_tenant (%d) of module %s", record.id,
                           limits.max_runs, module)

    def ended(self, record: RunRecord) -> None:
        """A run ended here: its run slot back; the slot back of a destroyed instance, or
        of a create that failed leaving no instance (a phantom is not counted)."""
        if self.policy.limits_runs:
            self._give_back(record)
        if not self.policy.limits_instances:
            return
        if record.operation == "destroy" and record.status == "succeeded":
            self.reservations.free_instance(record.tenant, record.module, record.workspace)
        elif record.operation == "apply" and record.status != "succeeded":
            self._settle_failed_create(record)

    def _give_back(self, record: RunRecord) -> None:
        """Every run slot the run holds (its admission's, an approval's)."""
        with self._mutex:
            self._admitted.pop(record.id, None)
        self.reservations.free_run(record.tenant, record.module, record.id)

    def _settle_failed_create(self, record: RunRecord) -> None:
        """Give the instance slot back when the failed apply left no instance and no other
        apply of the workspace is in flight (it holds the same slot)."""
        tenant, module, ws = record.tenant, record.module, record.workspace
        try:
            if self.backend.exists(module, ws) or any(
                    r.operation == "apply" and r.workspace == ws and r.id != record.id
                    for r in self._in_flight(tenant, module)):
                return
        except TFServerError as e:
            # The slot is freed as stale by the next create that needs it.
            logger.warning("instance slot of %s kept for now: %s", ws, e.detail)
            return
        self.reservations.free_instance(tenant, module, ws)

    def _reserve_instance(self, limit: int, record: RunRecord) -> bool:
        """Take an instance slot for a new instance; False for an existing one (an update
        is never refused); 403 when the quota is reached."""
        tenant, module = record.tenant, record.module
        existing = {ws for ws in self.backend.workspaces(module)
                    if (parts := split_workspace(ws)) is not None and parts[0] == tenant}
        if record.workspace in existing:
            return False
        creating = {workspace_name(tenant, r.instance) for r in self._in_flight(tenant, module)
                    if r.operation == "apply" and r.id != record.id}
        if self.reservations.take_instance(tenant, module, record.workspace, limit,
                                           existing=existing, creating=creating):
            return True
        count = max(limit, len(existing | creating))
        raise QuotaExceeded(
            f"this tenant has {count} instances of module {module} (counting those being "
            f"created); the limit is {limit}", limit=limit, count=count)

    def _check_queued(self, limit: int, tenant: str) -> None:
        ids = [r for t, _, r in self.runs.store.active() if t == tenant]
        queued = sum(1 for r in self.runs.records(ids) if r.status == "queued")
        if queued >= limit:
            raise Conflict(f"this tenant has {queued} runs waiting in queues; the limit is "
                           f"{limit}: wait for some to start", retry_after=5)

    def _in_flight(self, tenant: str, module: str) -> list[RunRecord]:
        """The tenant's runs of the module in flight: stored ones of every replica, and
        this replica's not stored yet (a synchronous run before its first heartbeat)."""
        found = {r.id: r for r in self.runs.in_flight(tenant, module)}
        for record in self.runs.unstored():
            if record.tenant == tenant and record.module == module and record.active:
                found.setdefault(record.id, record)
        return list(found.values())

    def _run_alive(self, run_id: str) -> bool:
        """The run holding a slot is queued or running on some replica."""
        try:
            return self.runs.record(run_id).active
        except NotFound:
            return False

    @staticmethod
    def ttl(limits: Limits, requested: float | None, *, expires: bool) -> float | None:
        """Seconds the instance lives from this apply on, or None to leave its expiry as
        it is: an apply without `?ttl=` of an instance that already expires keeps its
        expiry; any other gets `?ttl=` (400 beyond the maximum) or the default."""
        if requested is None and expires:
            return None
        return limits.ttl(requested)


def _too_many(limit: int, module: str, then: str = "") -> TooManyRuns:
    """The 429 of a tenant whose runs of `module` fill its `limit` (`then`: what to do)."""
    return TooManyRuns(f"this tenant has {limit} runs of module {module} queued or running; "
                       f"the limit is {limit}{then}", limit=limit)
