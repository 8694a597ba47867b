"""Runs made from what an earlier run kept: the apply of a dry run's saved plan (`POST
/runs/{id}/apply`), and a retry (`POST /runs/{id}/retry`): a run that failed, was
canceled, lost or expired runs again with its kept request (runs/specs.py), as a new run
whose record says `retry_of`.

The new run is the caller's (who retries needs the module's write scope); its module,
instance, operation and inputs are the kept request's. A saved plan's apply is never
retried (its plan is used up or stale: plan again); a run that succeeded, or that is
still queued or running, is a 409.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from ..auth import Principal
from ..errors import Conflict
from ..module.discover import Module
from ..module.versions import recorded
from ..runs.expiry import Expiries
from ..scrub import Scrubber
from .catalog import Catalog
from .engine import spec_of
from .execute import RunSpec
from .governance import Governance
from .history import History, Idempotency, Submitted
from .submit import Origin, Submitter

#: The statuses a retry takes (`expired`: an approval that was never given).
RETRYABLE = frozenset({"failed", "canceled", "lost", "expired"})


class Reruns:
    """New runs from the saved plans and kept requests of earlier ones."""

    def __init__(self, modules: Mapping[str, Module], catalog: Catalog, history: History,
                 governance: Governance, expiries: Expiries, submitter: Submitter) -> None:
        self.modules = modules
        self.catalog = catalog
        self.history = history
        self.governance = governance
        self.expiries = expiries
        self.submitter = submitter

    def apply_plan(self, principal: Principal, plan_id: str, *, asynchronous: bool = False,
                   idempotency: Idempotency | None = None,
                   origin: Origin | None = None) -> Submitted:
        """Apply exactly the plan a dry run saved (409 when expired, used or stale); a
        retry with the Idempotency-Key of an earlier call is answered as that call was."""
        if idempotency is not None:
            found = self.history.replayed(principal.tenant_key, idempotency)
            if found is not None:
                return found
        plan = self.history.record(principal, plan_id)
        if plan.operation not in ("plan", "plan-destroy") or plan.status != "succeeded":
            raise Conflict(f"run {plan_id} is not a plan that succeeded", retry_after=0)
        m = self.catalog.module(plan.module)
        principal.require(m.name, "write")
        meta = self.submitter.store.plan_meta(plan_id)
        if meta is None or float(meta.get("expires_at", 0)) <= time.time():
            raise Conflict("the saved plan expired or was used", retry_after=0)
        inputs = dict(meta.get("inputs") or {})
        m = recorded(m, plan.version)  # the version the plan was made with
        spec = RunSpec(m, plan.instance, plan.workspace,
                       "destroy" if plan.operation == "plan-destroy" else "apply", inputs,
                       principal, Scrubber(m.secret_values(inputs)), plan_of=plan_id)
        limits = self.governance.limits(principal, m.name)
        if limits.require_approval:  # a saved plan of its own is approved (approvals.py)
            raise Conflict(f"module {m.name} applies only approved plans: send the apply "
                           "or destroy itself, which plans and awaits an approval",
                           retry_after=0)
        if spec.operation == "apply" and limits.expires:
            # The policy's expiry holds for a saved plan's apply as for any other.
            spec.expires = self.expiries.get(m.name, plan.workspace)
            spec.ttl = self.governance.ttl(limits, None, expires=spec.expires is not None)
        return self.submitter.submit(spec, asynchronous, idempotency, origin=origin)

    def retry(self, principal: Principal, run_id: str, *, asynchronous: bool = False,
              idempotency: Idempotency | None = None,
              origin: Origin | None = None) -> Submitted:
        """Run `run_id`'s request again (404 for another tenant's run; 409 unless it
        failed, was canceled, lost or expired); a retry with the Idempotency-Key of an
        earlier call is answered as that call was."""
        if idempotency is not None:
            found = self.history.replayed(principal.tenant_key, idempotency)
            if found is not None:
                return found
        old = self.history.record(principal, run_id)
        m = self.catalog.module(old.module)
        principal.require(m.name, "write")
        if old.status not in RETRYABLE:
            raise Conflict(f"run {old.id} is {old.status}: only a run that failed, was "
                           "canceled, lost or expired is retried", retry_after=0)
        if old.plan_of is not None:
            raise Conflict(f"run {old.id} applied the saved plan of run {old.plan_of}, "
                           "which is used up or stale now: plan again (?dry_run=true) and "
                           "apply the new plan", retry_after=0)
        doc = self.submitter.kept.get(old.id)
        if doc is None or doc.get("module") != old.module:
            raise Conflict(f"the request of run {old.id} was not kept (it ran before "
                           "retries existed, or it is damaged): send the request again",
                           retry_after=0)
        kept = spec_of(self.modules, old, doc)
        # The retry is the caller's run: its principal, the kept request's everything else.
        spec = RunSpec(kept.module, old.instance, old.workspace, kept.operation, kept.inputs,
                       principal, Scrubber(kept.module.secret_values(kept.inputs)))
        if spec.operation == "apply":
            limits = self.governance.limits(principal, m.name)
            if kept.ttl is not None or limits.expires:
                spec.expires = self.expiries.get(m.name, old.workspace)
                spec.ttl = self.governance.ttl(limits, kept.ttl,
                                               expires=spec.expires is not None)
        return self.submitter.submit(spec, asynchronous, idempotency, origin=origin,
                                     retry_of=old.id)
