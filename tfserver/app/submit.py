"""Runs admitted and started: a decided `RunSpec` gets its record, is checked against the
policy's limits and the caller's idempotency key, and is queued; what the run does once it
starts is `job` (terraform through the executor, its events relayed)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..config import Config
from ..errors import Conflict, NotFound, TFServerError
from ..metrics import Metrics
from ..module.discover import Module
from ..names import workspace_tenant
from ..runs.parked import Awaiting
from ..runs.queued import QueuedRuns
from ..runs.registry import Runs
from ..runs.run import Run
from ..runs.specs import KeptRequests
from ..runs.store import RunRecord, RunStore, new_run_id
from ..terraform.output import api_event
from ..terraform.process import RunControl
from .approvals import approval_of, plan_first
from .dependents import Dependents, destroy_ends
from .drift import DriftCheck, reconcile_spec
from .engine import spec_doc, spec_of
from .execute import Applied, Checked, Executor, Outcome, Planned, RunSpec
from .governance import Governance
from .history import History, Idempotency, Submitted
from .versions import instance_version

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Origin:
    """Where a request came from, for the run's record and the audit log."""

    address: str | None = None
    request_id: str | None = None


class Submitter:
    """Admits runs and gives each its job."""

    def __init__(self, config: Config, runs: Runs, history: History, governance: Governance,
                 store: RunStore, executor: Executor, metrics: Metrics, *,
                 modules: Mapping[str, Module], queued: QueuedRuns | None = None,
                 dependents: Dependents | None = None) -> None:
        self.config = config
        self.runs = runs
        self.history = history
        self.governance = governance
        self.store = store
        self.executor = executor
        self.metrics = metrics
        self.modules = modules
        #: The `sqs` engine's queue (None: the local lanes run what this replica accepts).
        self.queued = queued
        self.drift = DriftCheck(executor)
        #: Each run's request, kept for a retry (written off the run's path).
        self.kept = KeptRequests(store.objects)
        #: The reference index kept after each run, and cascades (dependents.py).
        self.dependents = dependents

    def submit(self, spec: RunSpec, asynchronous: bool, idempotency: Idempotency | None,
               *, governed: bool = True, origin: Origin | None = None,
               retry_of: str | None = None) -> Submitted:
        """Admit a decided run (idempotency replay, the policy's limits, the saved plan's
        claim), give it its record and queue it on its instance's lane; raises what
        refused it (then nothing of it is kept)."""
        spec.run_id = new_run_id()
        # A run of the module as served (not of one version) runs the instance's version.
        spec.module = instance_version(self.executor.backend, spec.module, spec.workspace)
        if spec.operation == "destroy" and self.dependents:  # a saved plan's too: 409 now
            self.dependents.check_unused(spec.module.name, spec.workspace, spec.instance)
        # Idempotency keys are the caller's; the run belongs to the instance's tenant.
        tenant = spec.principal.tenant_key
        if idempotency is not None:
            found = self.history.replay(tenant, spec.run_id, idempotency)
            if found is not None:
                return found
        record = _record(spec, idempotency, origin)
        record.retry_of = retry_of
        release: Callable[[], None] = _nothing
        max_queued: int | None = None
        try:
            if governed:
                limits = self.governance.limits(spec.principal, spec.module.name)
                max_queued = limits.max_queued if asynchronous else None
                release = self.governance.reserve(limits, record, queued=asynchronous)
                record.approval = approval_of(spec, limits.require_approval,
                                              limits.separate_approver)
            if spec.plan_of is not None and not self.store.claim_plan(spec.plan_of,
                                                                      spec.run_id):
                raise Conflict("the saved plan was applied already", retry_after=0)
        except TFServerError:
            release()
            self.history.drop_key(tenant, idempotency)
            raise
        run = self._run(spec, record, asynchronous)
        what = f"instance {spec.instance!r} of module {spec.module.name}"
        try:
            if self.queued is not None:
                self.queued.enqueue(run, spec_doc(spec), what=what, max_queued=max_queued)
            else:
                self.runs.submit(run, what=what,
                                 wait=0.0 if asynchronous else self.config.lock_wait)
        except TFServerError as e:
            if isinstance(e, Conflict):
                self.metrics.lock_conflicts.labels(spec.module.name).inc()
            release()
            self.history.drop_key(tenant, idempotency)
            if spec.plan_of is not None:
                self.store.release_plan(spec.plan_of)
            raise
        if spec.plan_of is not None:
            self.history.mark_plan_applied(spec.plan_of, spec.run_id)
        elif asynchronous:  # a saved plan's apply is never retried: it is used up
            self.kept.put(spec.run_id, spec_doc(spec))
        elif self.queued is not None:  # off a synchronous run's path
            self.kept.keep(spec.run_id, spec_doc(spec))
        return Submitted(spec.run_id, run if self.queued is None else None)

    def _run(self, spec: RunSpec, record: RunRecord, asynchronous: bool) -> Run:
        """The run of an admitted spec; a synchronous one here keeps its request (for a
        retry) once terraform runs: written before, it competed with terraform's start."""
        control = RunControl()
        run = Run(record, lambda r: self.job(r, spec, control),
                  lambda text: spec.scrub(text), control, sync=not asynchronous)
        if not asynchronous and self.queued is None and spec.plan_of is None:
            doc = spec_doc(spec)  # a saved plan's apply is never retried: it is used up
            run.on_started.append(lambda: self.kept.put(spec.run_id, doc))
        return run

    def rebuild(self, record: RunRecord, doc: dict[str, Any]) -> Run:
        """A queued run as the worker runs it: its job made from its stored spec."""
        spec = spec_of(self.modules, record, doc)
        control = RunControl()
        return Run(record, lambda r: self.job(r, spec, control),
                   lambda text: spec.scrub(text), control)

    def job(self, run: Run, spec: RunSpec, control: RunControl) -> Outcome | Awaiting:
        """What a run does (`_job`), then what its references need (dependents.py)."""
        if self.dependents is None:
            return self._job(run, spec, control)
        try:
            outcome = self._job(run, spec, control)
        except TFServerError:
            self.dependents.failed(run, spec)
            raise
        finally:
            run.record.references = [{k: r[k] for k in ("variable", "ref", "serial")}
                                     for r in spec.references or []] or None
            if spec.operation == "destroy":
                destroy_ends(self.dependents, spec)
        if not isinstance(outcome, Awaiting):  # its approved apply settles them
            self.dependents.settled(run, spec, outcome, self._cascaded)
        return outcome

    def _cascaded(self, spec: RunSpec) -> str:
        """Start a cascade's apply of a dependent (async, ungoverned); its run id."""
        return self.submit(spec, asynchronous=True, idempotency=None, governed=False).run_id

    def _job(self, run: Run, spec: RunSpec, control: RunControl) -> Outcome | Awaiting:
        """What a run does: terraform through the executor, its events relayed."""
        def relay(raw: dict[str, Any]) -> None:
            event = api_event(raw)
            if event is not None:
                run.emit(event.pop("type"), **event)

        if spec.approval:  # plans, and waits for an approval (approvals.py)
            return plan_first(self.executor, run, spec, control, relay)
        try:
            outcome = (self.drift.check(spec, control, relay) if spec.operation == "drift"
                       else self.executor.execute(spec, control=control, on_event=relay))
        except Conflict as e:
            if "lock" in e.extra:  # the state was locked by a run elsewhere
                self.metrics.lock_conflicts.labels(spec.module.name).inc()
            raise
        except NotFound:
            if spec.operation != "destroy" or run.record.attempt < 2:
                raise
            # A destroy run again after its worker died: that worker's terraform went on
            # and destroyed the instance; what is left is the destroy's own clean-up.
            outcome = self.executor.forget(spec)
        record = run.record
        record.changes = outcome.changes
        if isinstance(outcome, Applied):
            record.outputs, record.created = outcome.public_outputs, outcome.created
            record.warnings = list(outcome.warnings) or None
        elif isinstance(outcome, Planned):
            record.planned = outcome.planned
            record.plan = {"expires_at": time.time() + self.config.plan_ttl,
                           "applied_by": None}
        elif isinstance(outcome, Checked):
            outcome = self._reconcile(spec, outcome)
            record.drift = outcome.drift
        return outcome

    def _reconcile(self, spec: RunSpec, checked: Checked) -> Checked:
        """Start the apply of a drifted instance asked to be reconciled (queued behind
        this check on its lane); the check, linked to it."""
        if not spec.reconcile or checked.drift.get("status") != "drifted":
            return checked
        try:
            apply = self.submit(reconcile_spec(spec), asynchronous=True, idempotency=None,
                                governed=False)
        except TFServerError as e:  # the check stands; its report says it was not applied
            logger.warning("drift of %s/%s not reconciled: %s", spec.module.name,
                           spec.instance, e.detail, extra={"run_id": spec.run_id})
            return checked
        return self.drift.reconciled(checked, spec, apply.run_id)


def _record(spec: RunSpec, idempotency: Idempotency | None, origin: Origin | None
            ) -> RunRecord:
    """A new run's record: it belongs to the instance's tenant."""
    return RunRecord(id=spec.run_id, module=spec.module.name, instance=spec.instance,
                     workspace=spec.workspace, tenant=workspace_tenant(spec.workspace),
                     subject=spec.principal.subject, operation=spec.operation,
                     plan_of=spec.plan_of, triggered_by=spec.triggered_by,
                     version=spec.module.version, moved=spec.moved,
                     idempotency_key=idempotency.key if idempotency else None,
                     client_id=spec.principal.client_id,
                     client_address=origin.address if origin else None,
                     request_id=origin.request_id if origin else None)


def _nothing() -> None:
    """No slot was taken: nothing to give back."""
