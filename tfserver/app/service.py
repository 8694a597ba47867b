"""The operations of the API, free of HTTP: apply, plan, destroy, read, list, runs.

One operation: authorise → validate → queue → run → a typed result. Runs go through
`Runs` (the instance's lane, records, events); what a run does is `Executor.execute`.
The server turns results into JSON, statuses and headers; this module never speaks HTTP.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..auth import Principal
from ..config import Config
from ..errors import BadRequest, Conflict, NotFound, TFServerError
from ..files import private_dir, tighten_tree, write_private
from ..logs import audit_run
from ..metrics import Metrics
from ..module.discover import Module
from ..module.limits import parse_ttl
from ..module.policy import Policy
from ..names import check_instance_name, split_workspace, workspace_name
from ..runs.expiry import Due, Expiries, Reaper
from ..runs.lanes import Scheduler
from ..runs.registry import Runs
from ..runs.run import Run
from ..runs.store import RunRecord, RunStore, new_run_id
from ..scrub import Scrubber
from ..storage.base import StateBackend
from ..storage.local import LocalBackend
from ..terraform.args import build_args, cli_config_text
from ..terraform.output import api_event
from ..terraform.process import RunControl, Runner
from ..terraform.workdir import VarFiles, WorkingCopies
from ..web.openapi import ApiDescription, DocSettings
from .catalog import Catalog, target_workspace
from .execute import Applied, Destroyed, Executor, Outcome, Planned, RunSpec, redacted
from .governance import Governance
from .history import History, Idempotency, Submitted

logger = logging.getLogger(__name__)

__all__ = ["Applied", "Destroyed", "Planned", "Service"]

#: Idempotency keys: 1-255 visible ASCII characters.
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


@dataclass(frozen=True)
class Unlocked:
    """A backend lock that an admin cleared."""

    module: str
    instance: str
    lock_id: str


@dataclass(frozen=True)
class Readiness:
    """Whether the server can serve, and a report of each part."""

    ok: bool
    terraform: str
    backend: str
    modules: dict[str, str]


@dataclass(frozen=True)
class Origin:
    """Where a request came from, for the run's record and the audit log."""

    address: str | None = None
    request_id: str | None = None


class Service:
    """Everything the HTTP layer can ask for, given a `Principal`."""

    def __init__(self, config: Config, modules: Mapping[str, Module], runner: Runner,
                 backend: StateBackend, policy: Policy | None = None) -> None:
        self.config = config
        self.modules = dict(modules)
        self.runner = runner
        self.backend = backend
        self.terraform_version: str | None = None
        self.copies = WorkingCopies(config.state_dir / "work", modules, runner, backend,
                                    init_timeout=config.run_timeout)
        self.store = RunStore(backend.objects)
        self.metrics = Metrics()
        self.runs = Runs(self.store, Scheduler(config.max_runs, config.queue_depth),
                         replica=config.replica or socket.gethostname(),
                         kill_grace=config.kill_grace, retention=config.run_retention,
                         on_finish=self._counted, on_ended=self._audited)
        self.metrics.watch(self.runs.scheduler.counts, self.copies.report, list(modules))
        self.expiries = Expiries(backend.objects)
        self.catalog = Catalog(self.modules, backend, self.runs.scheduler.busy, self.expiries)
        self.history = History(self.runs, self.catalog, idempotency_ttl=config.idempotency_ttl)
        self.governance = Governance(policy or Policy.empty(), backend, self.runs)
        self.executor = Executor(runner, backend, self.copies, self.store, self.expiries,
                                 run_timeout=config.run_timeout, lock_wait=config.lock_wait,
                                 plan_ttl=config.plan_ttl, max_workers=config.max_runs)
        self.reaper = Reaper(self.expiries, self._reap, self._run_status,
                             replica=self.runs.replica, interval=config.reap_interval)
        #: The modules' OpenAPI description, each module's part made once (openapi.py).
        self.api = ApiDescription(DocSettings.from_config(config))

    # -- start-up ---------------------------------------------------------------------

    def prepare(self, cli_config_file: Path | None) -> Path:
        """Create the state folder, the CLI config and every working copy (no terraform);
        returns the CLI config file terraform is to use."""
        state = private_dir(self.config.state_dir)
        changed = tighten_tree(state)
        if changed:
            logger.warning("state folder %s: took group and other permissions off %d "
                           "files and folders", state, changed)
        for sub in ("work", "tmp", "plugin-cache"):
            private_dir(state / sub)
        self.executor.var_files = VarFiles(self.config.tmp_dir, state / "tmp")
        if cli_config_file is None:
            cli_config_file = state / "terraformrc"
            write_private(cli_config_file, cli_config_text(
                state / "plugin-cache", self.config.provider_mirror).encode())
        self.copies.prepare()
        return cli_config_file

    def start(self) -> None:
        """Check terraform, initialise every module (in the background, once), and start
        the runs' heartbeat."""
        self.terraform_version = self.runner.version()
        if self.terraform_version is None:
            logger.error("terraform (%s) cannot run; runs will fail", self.config.terraform_bin)
        self.copies.start()
        self.runs.start(all_leftovers=isinstance(self.backend, LocalBackend))
        self.reaper.start()

    def close(self) -> None:
        """Release threads and remove what only this process used."""
        self.reaper.stop_event.set()
        self.runs.stop()
        self.executor.close()
        self.backend.close()

    def readiness(self) -> Readiness:
        """Whether the server can serve (terraform runs, the backend answers, no module is
        still initialising), and a report of each part: a module that failed to
        initialise is named there and answers 503 itself."""
        ok = self.terraform_version is not None and self.copies.settled()
        try:
            self.backend.check()
            backend = f"{self.backend.name}: ok"
        except TFServerError as e:
            backend, ok = f"{self.backend.name}: {e.detail}", False
        return Readiness(ok, self.terraform_version or "not found", backend,
                         self.copies.report())

    # -- runs -------------------------------------------------------------------------

    def apply(self, principal: Principal, name: str, instance: str, body: Any, *,
              dry_run: bool = False, asynchronous: bool = False,
              idempotency: Idempotency | None = None, ttl: str | None = None,
              origin: Origin | None = None) -> Submitted:
        """Start an apply (or plan, with `dry_run`) of the caller's instance; `ttl` (as
        `?ttl=` gives it) sets when the instance expires."""
        m = self.catalog.module(name)
        principal.require(name, "write")
        check_instance_name(instance)
        requested = parse_ttl(ttl) if ttl is not None else None
        inputs = m.fill_reserved(m.validate(body), tenant=principal.tenant,
                                 instance=instance)
        ws = workspace_name(principal.tenant_key, instance)
        spec = RunSpec(m, instance, ws, "plan" if dry_run else "apply", inputs, principal,
                       Scrubber(m.secret_values(inputs)))
        limits = self.governance.limits(principal, name)
        if dry_run:
            if requested is not None:
                limits.ttl(requested)  # refused as the apply would refuse it
        elif requested is not None or limits.expires:
            spec.expires = self.expiries.get(name, ws)
            spec.ttl = self.governance.ttl(limits, requested, expires=spec.expires is not None)
        return self._submit(spec, asynchronous, idempotency, origin=origin)

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
        return self._submit(spec, asynchronous, idempotency, origin=origin)

    def apply_plan(self, principal: Principal, plan_id: str, *, asynchronous: bool = False,
                   idempotency: Idempotency | None = None,
                   origin: Origin | None = None) -> Submitted:
        """Apply exactly the plan a dry run saved (409 when expired, used or stale)."""
        plan = self.history.record(principal, plan_id)
        if plan.operation not in ("plan", "plan-destroy") or plan.status != "succeeded":
            raise Conflict(f"run {plan_id} is not a plan that succeeded", retry_after=0)
        m = self.catalog.module(plan.module)
        principal.require(m.name, "write")
        meta = self.store.plan_meta(plan_id)
        if meta is None or float(meta.get("expires_at", 0)) <= time.time():
            raise Conflict("the saved plan expired or was used", retry_after=0)
        inputs = dict(meta.get("inputs") or {})
        spec = RunSpec(m, plan.instance, plan.workspace,
                       "destroy" if plan.operation == "plan-destroy" else "apply", inputs,
                       principal, Scrubber(m.secret_values(inputs)), plan_of=plan_id)
        limits = self.governance.limits(principal, m.name)
        if spec.operation == "apply" and limits.expires:
            # The policy's expiry holds for a saved plan's apply as for any other.
            spec.expires = self.expiries.get(m.name, plan.workspace)
            spec.ttl = self.governance.ttl(limits, None, expires=spec.expires is not None)
        return self._submit(spec, asynchronous, idempotency, origin=origin)

    def _submit(self, spec: RunSpec, asynchronous: bool, idempotency: Idempotency | None,
                *, governed: bool = True, origin: Origin | None = None) -> Submitted:
        spec.run_id = new_run_id()
        # Idempotency keys are the caller's; the run belongs to the instance's tenant.
        tenant = spec.principal.tenant_key
        owner = spec.workspace.partition(".")[0]
        if idempotency is not None:
            found = self.history.replay(tenant, spec.run_id, idempotency)
            if found is not None:
                return found
        if governed:
            try:
                limits = self.governance.limits(spec.principal, spec.module.name)
                self.governance.check_runs(limits, owner, spec.module.name)
                if spec.operation == "apply":
                    self.governance.check_create(limits, owner, spec.module.name,
                                                 spec.instance)
            except TFServerError:
                self.history.drop_key(tenant, idempotency)
                raise
        if spec.plan_of is not None and not self.store.claim_plan(spec.plan_of, spec.run_id):
            self.history.drop_key(tenant, idempotency)
            raise Conflict("the saved plan was applied already", retry_after=0)
        record = RunRecord(id=spec.run_id, module=spec.module.name, instance=spec.instance,
                           workspace=spec.workspace, tenant=owner,
                           subject=spec.principal.subject, operation=spec.operation,
                           plan_of=spec.plan_of,
                           idempotency_key=idempotency.key if idempotency else None,
                           client_id=spec.principal.client_id,
                           client_address=origin.address if origin else None,
                           request_id=origin.request_id if origin else None)
        control = RunControl()
        run = Run(record, lambda r: self._job(r, spec, control),
                  lambda text: spec.scrub(text), control, sync=not asynchronous)
        what = f"instance {spec.instance!r} of module {spec.module.name}"
        try:
            self.runs.submit(run, what=what,
                             wait=0.0 if asynchronous else self.config.lock_wait)
        except TFServerError as e:
            if isinstance(e, Conflict):
                self.metrics.lock_conflicts.labels(spec.module.name).inc()
            self.history.drop_key(tenant, idempotency)
            if spec.plan_of is not None:
                self.store.objects.delete(f"_plans/{spec.plan_of}.used")
            raise
        if spec.plan_of is not None:
            self.history.mark_plan_applied(spec.plan_of, spec.run_id)
        return Submitted(spec.run_id, run)

    def _reap(self, due: Due) -> str | None:
        """Start the destroy of an expired instance as a run of `tfserver:ttl`; None when
        the instance is being changed here now (the reaper tries again later)."""
        module = self.modules.get(due.module)
        parts = split_workspace(due.workspace)
        if module is None or parts is None:
            return None
        if self.runs.scheduler.busy((due.module, due.workspace)):
            return None
        reaper = Principal(subject="tfserver:ttl", tenant="tfserver:ttl", admin=True)
        spec = RunSpec(module, parts[1], due.workspace, "destroy", {}, reaper,
                       Scrubber(module.secret_values({})), expiry=due.expires_at)
        return self._submit(spec, asynchronous=True, idempotency=None,
                            governed=False).run_id

    def _counted(self, record: RunRecord) -> None:
        """A run ended here: count it."""
        self.metrics.run(record.module, record.operation, record.status, _seconds(record))

    def _audited(self, record: RunRecord) -> None:
        """A run ended here (and its caller has the answer): its audit line."""
        audit_run(record, _seconds(record))

    def _run_status(self, run_id: str) -> str:
        try:
            return self.runs.record(run_id).status
        except NotFound:
            return "lost"

    def _job(self, run: Run, spec: RunSpec, control: RunControl) -> Outcome:
        """What a run does: terraform through the executor, its events relayed."""
        def relay(raw: dict[str, Any]) -> None:
            event = api_event(raw)
            if event is not None:
                run.emit(event.pop("type"), **event)

        try:
            outcome = self.executor.execute(spec, control=control, on_event=relay)
        except Conflict as e:
            if "lock" in e.extra:  # the state was locked by a run elsewhere
                self.metrics.lock_conflicts.labels(spec.module.name).inc()
            raise
        record = run.record
        record.changes = outcome.changes
        if isinstance(outcome, Applied):
            record.outputs, record.created = redacted(spec.module, outcome.outputs), \
                outcome.created
        elif isinstance(outcome, Planned):
            record.planned = outcome.planned
            record.plan = {"expires_at": time.time() + self.config.plan_ttl,
                           "applied_by": None}
        return outcome

    def force_unlock(self, principal: Principal, name: str, instance: str,
                     lock_id: Any, tenant: str | None = None) -> Unlocked:
        """Admin: clear a backend lock left by a killed run (its id must match)."""
        self.catalog.module(name)
        principal.require_admin()
        ws = target_workspace(principal, instance, tenant)
        if not isinstance(lock_id, str) or not lock_id.strip():
            raise BadRequest("send the lock id to clear as {\"lock_id\": \"...\"}",
                             extra={"errors": [{"field": "lock_id", "message": "required"}]})
        wc = self.copies.ready(name)
        # Never while this server runs terraform on the instance: that lock is alive.
        with self.runs.scheduler.hold((name, ws), f"instance {instance!r} of module {name}"):
            held = self.backend.lock_info(name, ws)
            if held is not None and held.get("id") not in (None, lock_id):
                raise Conflict("that is not the id of the lock held now", lock=held)
            result = self.runner.run(
                build_args("force-unlock", extra=[lock_id]),
                cwd=wc.path, workspace=ws, timeout=min(self.config.run_timeout, 120))
            if not result.ok:
                logger.warning("force-unlock of %s/%s failed: %s", name, instance,
                               result.stderr.strip()[-500:])
                raise Conflict("terraform could not clear that lock: the id does not match "
                               "a held lock", lock=held or {})
        logger.warning("lock %s of %s/%s cleared by %s", lock_id, name, instance,
                       principal.subject)
        return Unlocked(name, instance, lock_id)

    # -- helpers ----------------------------------------------------------------------


def _seconds(record: RunRecord) -> float | None:
    """How long a run ran (None if it never started)."""
    if record.started_at is None or record.finished_at is None:
        return None
    return record.finished_at - record.started_at
