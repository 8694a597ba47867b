"""The operations of the API, free of HTTP: apply, plan, destroy, read, list, runs.

One operation: authorise → validate → queue → run → a typed result. Runs go through
`Runs` (the instance's lane, records, events); what a run does is `Executor.execute`.
The server turns results into JSON, statuses and headers; this module never speaks HTTP.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from ..auth import Principal
from ..config import Config
from ..errors import NotFound, TFServerError
from ..logs import audit_run
from ..metrics import Metrics
from ..module.discover import Module
from ..module.limits import parse_ttl
from ..module.policy import Policy
from ..module.versions import every_version
from ..names import check_instance_name, workspace_name
from ..runs.expiry import Due, Expiries, Reaper
from ..runs.lanes import Scheduler
from ..runs.queued import QueueWorker
from ..runs.registry import Runs
from ..runs.store import RunRecord, RunStore
from ..scrub import Scrubber
from ..storage.base import StateBackend
from ..storage.local import LocalBackend
from ..terraform.process import Runner
from ..terraform.workdir import VarFiles, WorkingCopies
from .approvals import ApprovalCalls, Approvals
from .catalog import Catalog, InstanceView, ModuleView, target_workspace
from .dependents import Dependents, before_run
from .drift import drift_spec
from .engine import queued_runs
from .execute import Applied, Destroyed, Executor, Outcome, Planned, RunSpec
from .governance import Governance
from .history import History, Idempotency, RunPage, Submitted
from .leftovers import Leftovers
from .orphan import Orphaned, Orphaner
from .reap import expired_destroy
from .references import References
from .rerun import Reruns
from .statedir import spool_dir
from .submit import Origin, Submitter
from .unlock import Unlocked, Unlocker
from .upgrades import UpgradeCalls, Upgrades
from .versions import choose

logger = logging.getLogger(__name__)

__all__ = ["Applied", "Destroyed", "Planned", "Service", "Unlocked"]

@dataclass(frozen=True)
class Readiness:
    """Whether the server can serve, and a report of each part."""

    ok: bool
    terraform: str
    backend: str
    modules: dict[str, str]


class Service(UpgradeCalls, ApprovalCalls):
    """Everything the HTTP layer can ask for, given a `Principal`."""

    def __init__(self, config: Config, modules: Mapping[str, Module], runner: Runner,
                 backend: StateBackend, policy: Policy | None = None, *,
                 metrics: Metrics | None = None,
                 on_run_ended: Callable[[RunRecord], object] | None = None,
                 run_thread: Callable[[], None] | None = None) -> None:
        self.config = config
        self.modules = dict(modules)
        self.runner = runner
        self.backend = backend
        self.terraform_version: str | None = None
        self.copies = WorkingCopies(config.state_dir / "work", every_version(modules), runner,
                                    backend, init_timeout=config.run_timeout)
        self.store = RunStore(backend.objects)
        self.metrics = metrics or Metrics()
        #: Told of every run that ended here, after its audit line, and of every run that
        #: now awaits its approval (the webhooks).
        self.on_run_ended = on_run_ended
        self.leftovers = Leftovers(backend, self.store, spool_dir(config), self.modules)
        self.runs = _runs(self, config, run_thread)
        self.metrics.watch(self.runs.scheduler.counts, self.copies.report, list(modules))
        self.expiries = Expiries(backend.objects)
        self.catalog = Catalog(self.modules, backend, self.runs.scheduler.busy, self.expiries)
        #: The `sqs` engine's queue, and this replica's worker of it (role all or worker).
        self.queued = (queued_runs(config, self.runs, backend, self.copies, runner,
                                   self.metrics)
                       if config.queue.engine == "sqs" else None)
        self.history = History(self.runs, self.catalog, idempotency_ttl=config.idempotency_ttl,
                               queued=self.queued)
        self.governance = Governance(policy or Policy.empty(), backend, self.runs)
        self.references = References(self.modules, backend, self.runs,
                                     wait=config.run_timeout / 2)
        self.dependents = Dependents(self.modules, backend, self.references)
        self.executor = Executor(runner, backend, self.copies, self.store, self.expiries,
                                 run_timeout=config.run_timeout, lock_wait=config.lock_wait,
                                 plan_ttl=config.plan_ttl, max_workers=config.max_runs,
                                 var_files=VarFiles(config.tmp_dir, config.state_dir / "tmp"),
                                 replica=self.runs.replica,
                                 resolve=before_run(self.dependents, self.references.resolve),
                                 run_thread=run_thread)
        self.unlocker = Unlocker(self.catalog, self.copies, self.runs.scheduler, backend,
                                 runner, timeout=min(config.run_timeout, 120))
        self.submitter = Submitter(config, self.runs, self.history, self.governance,
                                   self.store, self.executor, self.metrics,
                                   modules=self.modules, queued=self.queued,
                                   dependents=self.dependents)
        self.worker = (QueueWorker(self.queued, self.submitter.rebuild, slots=config.max_runs,
                                   visibility=config.queue.visibility,
                                   checks=self.queued.checks, run_thread=run_thread)
                       if self.queued is not None and config.queue.role != "api" else None)
        self.approvals = Approvals(self.runs, self.history, self.submitter,
                                   gated=(policy or Policy.empty()).requires_approval)
        self.reruns = Reruns(self.modules, self.catalog, self.history, self.governance,
                             self.expiries, self.submitter)
        self.upgrades = Upgrades(self.catalog, self.submitter, self.history, self.reruns)
        self.orphaner = Orphaner(self.catalog, backend, self.runs,
                                 self.governance.reservations, self.expiries,
                                 retention=config.archive_retention)
        self.reaper = Reaper(self.expiries, partial(_reap, self), partial(_run_status, self.runs),
                             replica=self.runs.replica, interval=config.reap_interval,
                             chore=self.orphaner.purge)

    # -- start-up ---------------------------------------------------------------------

    def prepare(self) -> None:
        """Copy every module's files into its working copy (no terraform; statedir.py)."""
        self.copies.prepare()

    def start(self) -> None:
        """Check terraform, initialise every module (in the background), start the runs."""
        if self.config.queue.runs_terraform:  # an API replica of `sqs` never starts one
            self.terraform_version = self.runner.version()
            if self.terraform_version is None:
                logger.error("terraform (%s) cannot run; runs will fail", self.config.terraform_bin)
            self.copies.start()
        self.dependents.repair()
        _start_runs(self)
        self.reaper.start()
        if self.worker is not None:
            self.worker.start()

    def close(self) -> None:
        """Release threads and remove what only this process used."""
        if self.worker is not None:
            self.worker.stop()
        self.reaper.stop_event.set()
        self.approvals.stop()
        self.runs.stop()
        self.executor.close(idle=self.runs.wait_idle(0))
        self.backend.close()

    def readiness(self) -> Readiness:
        """Whether the server can serve, and a report of each part (see `_readiness`)."""
        return _readiness(self)

    # -- runs -------------------------------------------------------------------------

    def apply(self, principal: Principal, name: str, instance: str, body: Any, *,
              dry_run: bool = False, asynchronous: bool = False,
              idempotency: Idempotency | None = None, ttl: str | None = None,
              origin: Origin | None = None, cascade: bool = False,
              version: str | None = None) -> Submitted:
        """Start an apply (or plan, with `dry_run`) of the caller's instance; `ttl` sets
        when it expires, `version` moves it to that version (`?ttl=`, `?version=`);
        `cascade` applies its dependents after."""
        m = self.catalog.module(name)
        principal.require(name, "write")
        check_instance_name(instance)
        requested = parse_ttl(ttl) if ttl is not None else None
        ws = workspace_name(principal.tenant_key, instance)
        m, inputs, moved = choose(self.backend, m, ws, version, body, principal.tenant,
                                  instance, self.references.validator(principal, instance))
        limits = self.governance.limits(principal, name)
        spec = RunSpec(m, instance, ws, "plan" if dry_run else "apply", inputs, principal,
                       Scrubber(m.secret_values(inputs)), moved=moved,
                       cascade=(cascade or limits.cascade) and not dry_run)
        if dry_run:
            if requested is not None:
                limits.ttl(requested)  # refused as the apply would refuse it
        elif requested is not None or limits.expires:
            spec.expires = self.expiries.get(name, ws)
            spec.ttl = self.governance.ttl(limits, requested, expires=spec.expires is not None)
        return self.submitter.submit(spec, asynchronous, idempotency, origin=origin)

    def destroy(self, principal: Principal, name: str, instance: str, *,
                dry_run: bool = False, tenant: str | None = None,
                asynchronous: bool = False, idempotency: Idempotency | None = None,
                origin: Origin | None = None) -> Submitted:
        """Start a destroy (or its plan); the inputs are read when it runs."""
        m = self.catalog.module(name)
        principal.require(name, "write")
        ws = target_workspace(principal, instance, tenant)
        spec = RunSpec(m, instance, ws, "plan-destroy" if dry_run else "destroy", {},
                       principal, Scrubber(m.secret_values({})))
        return self.submitter.submit(spec, asynchronous, idempotency, origin=origin)

    def apply_plan(self, principal: Principal, plan_id: str, *, asynchronous: bool = False,
                   idempotency: Idempotency | None = None,
                   origin: Origin | None = None) -> Submitted:
        """Apply exactly the plan a dry run saved (see `Reruns.apply_plan`)."""
        return self.reruns.apply_plan(principal, plan_id, asynchronous=asynchronous,
                                      idempotency=idempotency, origin=origin)

    def retry(self, principal: Principal, run_id: str, *, asynchronous: bool = False,
              idempotency: Idempotency | None = None, origin: Origin | None = None
              ) -> Submitted:
        """Run an ended run's kept request again (see `Reruns.retry`)."""
        return self.reruns.retry(principal, run_id, asynchronous=asynchronous,
                                 idempotency=idempotency, origin=origin)

    def orphan(self, principal: Principal, name: str, instance: str, *,
               tenant: str | None = None, address: str | None = None) -> Orphaned:
        """Admin: forget an instance, its state kept aside (see `Dependents.orphan`)."""
        return self.dependents.orphan(self.orphaner, principal, name, instance,
                                      tenant=tenant, address=address)

    def _counted(self, record: RunRecord) -> None:
        """A run ended here: count it, give its slots back, free a saved plan it never used."""
        self.metrics.run(record.module, record.operation, record.status, _seconds(record))
        self.governance.ended(record)
        if record.plan_of is not None and record.started_at is None:
            self.store.release_plan(record.plan_of)
            self.history.mark_plan_applied(record.plan_of, None)

    def _audited(self, record: RunRecord) -> None:
        """A run ended here (its caller answered) or awaits approval: audit line, webhooks."""
        audit_run(record, _seconds(record))
        if self.on_run_ended is not None:
            self.on_run_ended(record)

    def drift(self, principal: Principal, name: str, instance: str, *, reconcile: bool,
              tenant: str | None, asynchronous: bool, idempotency: Idempotency | None,
              origin: Origin | None) -> Submitted:
        """Start a drift check of an instance (`reconcile`: then apply it if drifted)."""
        spec = drift_spec(self.catalog, principal, name, instance, tenant, reconcile)
        return self.submitter.submit(spec, asynchronous, idempotency, origin=origin)

    def force_unlock(self, principal: Principal, name: str, instance: str,
                     lock_id: Any, tenant: str | None = None) -> Unlocked:
        """Admin: clear a backend lock left by a killed run (see `Unlocker`)."""
        return self.unlocker.force_unlock(principal, name, instance, lock_id, tenant)

    # -- the facade the web layer calls (one delegating method per operation) ----------

    def served(self) -> Mapping[str, Module]:
        """The modules served, by name."""
        return self.modules

    def check_module(self, name: str) -> Module:
        """The served module of that name (404 if none)."""
        return self.catalog.module(name)

    def index(self, principal: Principal) -> list[Module]:
        """The modules the caller may read."""
        return self.catalog.index(principal)

    def describe(self, principal: Principal, name: str, version: str | None = None
                 ) -> ModuleView:
        """A module (at `version`, else its default): variables, outputs, the caller's
        instances and who uses them."""
        return self.dependents.describe(self.catalog.describe(principal, name, version),
                                        principal)

    def show(self, principal: Principal, name: str, instance: str,
             tenant: str | None = None) -> InstanceView:
        """One instance, read from its state, with its references (dependents.py)."""
        return self.dependents.annotate(self.catalog.show(principal, name, instance, tenant),
                                        target_workspace(principal, instance, tenant))

    def list_runs(self, principal: Principal, *, module: str | None = None,
                  instance: str | None = None, tenant: str | None = None,
                  status: str | None = None, limit: int = 20, after: str = "") -> RunPage:
        """A page of runs, newest first (see `History.list_runs`)."""
        return self.history.list_runs(principal, module=module, instance=instance,
                                      tenant=tenant, status=status, limit=limit, after=after)

    def run(self, principal: Principal, run_id: str) -> RunRecord:
        """One run's record."""
        return self.history.record(principal, run_id)

    def cancel(self, principal: Principal, run_id: str, *, force: bool) -> RunRecord:
        """Cancel a run."""
        return self.approvals.cancel(principal, run_id, force=force)

    def follow(self, principal: Principal, run_id: str,
               after: int = 0) -> Iterator[list[dict[str, Any]]]:
        """A run's events after `after`, replayed and then live."""
        return self.history.follow(principal, run_id, after)

    def wait(self, submitted: Submitted, timeout: float | None) -> bool:
        """Wait for a submitted run to end (at most `timeout` seconds); True if it did."""
        return self.history.wait(submitted, timeout)

    def result(self, principal: Principal, submitted: Submitted) -> Outcome:
        """An ended run's outcome; raises its error."""
        return self.history.result(principal, submitted)

    def metrics_text(self, principal: Principal) -> bytes:
        """The Prometheus text of the metrics (the admin scope, when auth is on)."""
        if self.config.auth == "jwt":
            principal.require_admin()
        return self.metrics.render()

    def count_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered HTTP request."""
        self.metrics.request(method, route, status, seconds)


def _start_runs(svc: Service) -> None:
    """Take over what an earlier process left (the approvals awaited, the runs it left
    active, lost now, and their output files), then keep the runs' records."""
    leftovers = ("none" if svc.queued is not None else
                 "all" if isinstance(svc.backend, LocalBackend) else "mine")
    svc.approvals.start(every_replica=leftovers == "all")  # before leftovers are lost
    svc.runs.start(leftovers=leftovers)
    # A stopped run's files are in use for up to its timeout and four kill graces.
    svc.leftovers.sweep(idle=svc.config.run_timeout + 5 * svc.config.kill_grace)


def _runs(svc: Service, config: Config, run_thread: Callable[[], None] | None) -> Runs:
    """This replica's runs: its lanes (spare slots for the scheduled drift checks), and
    what it is told of their ends (metrics, audit lines) and of the runs found lost;
    `run_thread` is called first in each of their threads."""
    return Runs(svc.store, Scheduler(config.max_runs, config.queue_depth,
                                     spare=config.max_drift_checks),
                replica=config.replica or socket.gethostname(),
                kill_grace=config.kill_grace, retention=config.run_retention,
                on_finish=svc._counted, on_ended=svc._audited, on_parked=partial(_parked, svc),
                on_lost=svc.leftovers,
                resume_lost=config.queue.resume_lost if config.queue.engine == "sqs" else 0,
                run_thread=run_thread)


def _parked(svc: Service, record: RunRecord) -> None:
    """A run awaits its approval: its run slot back, its audit line and webhooks."""
    svc.governance.parked(record)
    svc._audited(record)


def _reap(svc: Service, due: Due) -> str | None:
    """Start the destroy of an expired instance (None: not now, see `expired_destroy`)."""
    spec = expired_destroy(svc.modules, due, svc.runs.scheduler.busy)
    if spec is None:
        return None
    return svc.submitter.submit(spec, asynchronous=True, idempotency=None,
                                governed=False).run_id


def _run_status(runs: Runs, run_id: str) -> str:
    """A run's status (`lost` when no record of it is found), for the reaper."""
    try:
        return runs.record(run_id).status
    except NotFound:
        return "lost"


def _seconds(record: RunRecord) -> float | None:
    """How long a run ran (None if it never started)."""
    if record.started_at is None or record.finished_at is None:
        return None
    return record.finished_at - record.started_at


def _readiness(svc: Service) -> Readiness:
    """See `Service.readiness`: terraform runs, the backend and the queue answer, no module
    is still initialising (a module that failed to initialise answers 503 itself)."""
    ok = not svc.config.queue.runs_terraform or (
        svc.terraform_version is not None and svc.copies.settled())
    try:
        svc.backend.check()
        if svc.queued is not None:
            svc.queued.queue.depth()  # the queue answers
        backend = f"{svc.backend.name}: ok"
    except TFServerError as e:
        backend, ok = f"{svc.backend.name}: {e.detail}", False
    return Readiness(ok, svc.terraform_version or "not found", backend,
                     svc.copies.report())
