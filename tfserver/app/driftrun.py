"""The scheduled drift checks' side of the service: how one starts (a background run
in a spare slot of the local lanes, or a queued run of the `sqs` engine), when an instance
is busy, and the `DriftSchedule` built from the policy (driftschedule.py)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

from ..config import Config
from ..errors import NotFound, TFServerError
from ..metrics import Metrics
from ..module.discover import Module
from ..module.policy import Policy
from ..names import split_workspace, workspace_tenant
from ..runs.parked import Awaiting
from ..runs.registry import Runs
from ..runs.run import Run
from ..runs.store import RunRecord, new_run_id
from ..scrub import Scrubber
from ..storage.base import StateBackend
from ..terraform.process import RunControl
from .driftclaims import DriftClaims
from .driftschedule import SCHEDULER, DriftSchedule, Instances, schedules
from .driftstore import DriftReports
from .execute import Outcome, RunSpec
from .submit import Submitter

logger = logging.getLogger(__name__)


class ScheduledChecks:
    """Starts scheduled checks as runs of `tfserver:schedule`, and says when an
    instance is busy."""

    def __init__(self, modules: Mapping[str, Module], runs: Runs, submitter: Submitter,
                 metrics: Metrics, *, queued: bool) -> None:
        self.modules = modules
        self.metrics = metrics
        self.runs = runs
        self.submitter = submitter
        self.queued = queued
        #: The check whose job this thread runs, if any.
        self._own = threading.local()

    def start(self, module: str, workspace: str, reconcile: bool) -> str:
        """Start the check (NotFound for a module or workspace not served here); its
        run id."""
        m = self.modules.get(module)
        parts = split_workspace(workspace)
        if m is None or parts is None:
            raise NotFound(f"module {module} has no instance {workspace!r}")
        spec = RunSpec(m, parts[1], workspace, "drift", {}, SCHEDULER,
                       Scrubber(m.secret_values({})), reconcile=reconcile)
        if self.queued:  # the queue's group keeps it one run of the instance at a time
            return self.submitter.submit(spec, True, None, governed=False).run_id
        spec.run_id = new_run_id()
        record = RunRecord(id=spec.run_id, module=module, instance=parts[1],
                           workspace=workspace, tenant=workspace_tenant(workspace),
                           subject=SCHEDULER.subject, operation="drift")
        control = RunControl()
        run = Run(record, lambda r: self._job(r, spec, control),
                  lambda text: spec.scrub(text), control,
                  background=lambda: self._preempt(run))
        self.runs.submit(run, what=f"instance {parts[1]!r} of module {module}")
        return spec.run_id

    def _job(self, run: Run, spec: RunSpec, control: RunControl) -> Outcome | Awaiting:
        """The check's job, marked as this thread's: the apply it queues to reconcile
        comes to its lane from here, and must not stop it."""
        self._own.run_id = run.record.id
        try:
            return self.submitter.job(run, spec, control)
        finally:
            self._own.run_id = None

    def _preempt(self, run: Run) -> None:
        """A user's run came to the instance: cancel its check (done again next period)."""
        if getattr(self._own, "run_id", None) == run.record.id:
            return  # the check's own reconciling apply
        try:
            self.runs.cancel_local(run, force=False)
        except TFServerError:
            return  # it ended meanwhile
        self.metrics.drift_checks.labels(run.record.module, "preempted").inc()
        logger.info("drift schedule: check of %s/%s stopped for a user's run",
                    run.record.module, run.record.instance, extra={"run_id": run.record.id})

    def busy(self, module: str, workspace: str) -> bool:
        """True while a run is queued or running on the instance, on any replica."""
        if not self.runs.scheduler.idle((module, workspace)):
            return True
        return any(r.workspace == workspace
                   for r in self.runs.in_flight(workspace_tenant(workspace), module))

    def status(self, run_id: str) -> str:
        """A run's status (`lost` when no record of it is found)."""
        try:
            return self.runs.record(run_id).status
        except NotFound:
            return "lost"


def drift_schedule(config: Config, policy: Policy, backend: StateBackend, runs: Runs,
                   submitter: Submitter, metrics: Metrics) -> DriftSchedule | None:
    """The schedule of the policy's `drift_check`s (None when it sets none: nothing then
    runs). Raises ConfigError for a schedule below TFSERVER_DRIFT_CHECK_MIN."""
    plans = schedules(policy, config.drift_check_min)
    if not plans:
        return None
    checks = ScheduledChecks(submitter.modules, runs, submitter, metrics,
                             queued=config.queue.engine == "sqs")
    reports = DriftReports(backend.objects)

    def last_checked(module: str, workspace: str) -> float | None:
        report = reports.get(module, workspace)
        at = report.get("checked_at") if report else None
        return float(at) if isinstance(at, int | float) else None

    claims = DriftClaims(backend.objects, checks.status, slots=config.max_drift_checks,
                         max_age=config.run_timeout * 2 + 60)
    return DriftSchedule(plans, Instances(backend.workspaces, last_checked, checks.busy),
                         claims, checks.start, replica=runs.replica, metrics=metrics)
