"""The policy's quotas and TTLs applied to one request, counted from the backend.

Instances are counted from the backend's workspaces plus the creates in flight (queued
or running on any replica), and runs from the active runs of every replica, so the
limits hold across replicas. What remains is a race window: two requests of one tenant
checked at the same moment on two replicas (or threads) both see the old count; the
window is the time between a request's check and its run record being stored (a few
milliseconds locally, one S3 round trip remotely).
"""

from __future__ import annotations

from ..auth import Principal
from ..errors import QuotaExceeded, TooManyRuns
from ..module.limits import Limits
from ..module.policy import Policy
from ..names import split_workspace
from ..runs.registry import Runs
from ..storage.base import StateBackend


class Governance:
    """Quotas and TTLs of the policy, for the service."""

    def __init__(self, policy: Policy, backend: StateBackend, runs: Runs) -> None:
        self.policy = policy
        self.backend = backend
        self.runs = runs

    def limits(self, principal: Principal, module: str) -> Limits:
        """What the policy allows this caller on this module."""
        return self.policy.limits(module, principal.tenant)

    def check_runs(self, limits: Limits, tenant: str, module: str) -> None:
        """429 when the tenant already has `max_runs` runs of the module in flight."""
        if limits.max_runs is None:
            return
        count = len(self.runs.in_flight(tenant, module))
        if count >= limits.max_runs:
            raise TooManyRuns(f"this tenant has {count} runs of module {module} queued or "
                              f"running; the limit is {limits.max_runs}", limit=limits.max_runs)

    def check_create(self, limits: Limits, tenant: str, module: str, instance: str) -> None:
        """403 when creating `instance` would pass the tenant's instance quota; an update
        of an existing instance is never refused."""
        if limits.max_instances is None:
            return
        existing = {parts[1] for ws in self.backend.workspaces(module)
                    if (parts := split_workspace(ws)) is not None and parts[0] == tenant}
        if instance in existing:
            return
        creating = {r.instance for r in self.runs.in_flight(tenant, module)
                    if r.operation == "apply" and r.instance not in existing}
        creating.discard(instance)
        count = len(existing) + len(creating)
        if count >= limits.max_instances:
            raise QuotaExceeded(
                f"this tenant has {count} instances of module {module} (counting those "
                f"being created); the limit is {limits.max_instances}",
                limit=limits.max_instances, count=count)

    @staticmethod
    def ttl(limits: Limits, requested: float | None, *, expires: bool) -> float | None:
        """Seconds the instance lives from this apply on, or None to leave its expiry as
        it is: an apply without `?ttl=` of an instance that already expires keeps its
        expiry; any other gets `?ttl=` (400 beyond the maximum) or the default."""
        if requested is None and expires:
            return None
        return limits.ttl(requested)

