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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .auth import Principal
from .backend import LocalBackend, StateBackend
from .config import Config
from .errors import BadRequest, Conflict, NotFound, Rejected, TFServerError
from .execute import (
    Applied,
    Destroyed,
    Executor,
    Operation,
    Outcome,
    Planned,
    RunSpec,
    redacted,
)
from .expiry import Due, Expiries, Reaper
from .files import private_dir, tighten_tree, write_private
from .governance import Governance
from .locks import Scheduler
from .logs import audit_log
from .metrics import Metrics
from .modules import Module
from .names import check_instance_name, check_tenant_key, split_workspace, workspace_name
from .openapi import ApiDescription, DocSettings
from .policy import Policy, parse_ttl
from .runs import Run, RunProblem, Runs
from .runstore import ACTIVE, RunRecord, RunStore, new_run_id
from .scrub import Scrubber
from .terraform import REDACTED, Runner, api_event, build_args, cli_config_text
from .workdir import VarFiles, WorkingCopies

logger = logging.getLogger(__name__)

__all__ = ["Applied", "Destroyed", "Planned", "Service"]

#: Idempotency keys: 1-255 visible ASCII characters.
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


@dataclass(frozen=True)
class InstanceRef:
    """One instance in a listing; `tenant` is set for another tenant's (admins see them)."""

    instance: str
    tenant: str | None = None


@dataclass(frozen=True)
class ModuleView:
    """A module and the caller's instances of it."""

    module: Module
    instances: list[InstanceRef]


@dataclass(frozen=True)
class InstanceView:
    """An instance as its state shows it, read without terraform."""

    module: str
    instance: str
    outputs: dict[str, Any]
    resources: int
    serial: Any
    terraform_version: Any
    busy: bool
    lock: dict[str, str] | None
    #: The state shown is the last complete one; a newer one is being written.
    stale: bool = False
    #: When the instance expires (seconds since the epoch), if it does.
    expires_at: float | None = None


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
class RunPage:
    """Some runs, newest first, and the id to continue after (None at the end)."""

    runs: list[RunRecord]
    next_after: str | None
    #: The caller's own tenant (records of other tenants show theirs).
    viewer_tenant: str


@dataclass(frozen=True)
class Idempotency:
    """An Idempotency-Key and the fingerprint of the request that carried it."""

    key: str
    fingerprint: str


@dataclass(frozen=True)
class Origin:
    """Where a request came from, for the run's record and the audit log."""

    address: str | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class Submitted:
    """A run that a request started (or found again by its idempotency key)."""

    run_id: str
    run: Run | None
    replayed: bool = False


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
                         on_finish=self._finished)
        self.metrics.watch(self.runs.scheduler.counts, self.copies.report, list(modules))
        self.expiries = Expiries(backend.objects)
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

    # -- reads ------------------------------------------------------------------------

    def module(self, name: str) -> Module:
        """The module served at `/<name>`, or 404."""
        found = self.modules.get(name)
        if found is None:
            raise NotFound(f"no module named {name!r}")
        return found

    def index(self, principal: Principal) -> list[Module]:
        """The modules the caller may read."""
        return [m for m in self.modules.values() if principal.can(m.name, "read")]

    def instances(self, principal: Principal, module: str) -> list[InstanceRef]:
        """The caller's instances of a module (an admin sees every tenant's)."""
        found = []
        for ws in self.backend.workspaces(module):
            parts = split_workspace(ws)
            if parts is None:
                continue
            tenant, instance = parts
            if tenant == principal.tenant_key:
                found.append(InstanceRef(instance))
            elif principal.admin:
                found.append(InstanceRef(instance, tenant))
        return found

    def describe(self, principal: Principal, name: str) -> ModuleView:
        """A module: its variables schema, outputs and the caller's instances."""
        m = self.module(name)
        principal.require(name, "read")
        return ModuleView(m, self.instances(principal, name))

    def show(self, principal: Principal, name: str, instance: str,
             tenant: str | None = None) -> InstanceView:
        """An instance's outputs and status, read from its state without terraform."""
        self.module(name)
        principal.require(name, "read")
        ws = self._target(principal, instance, tenant)
        snap = self.backend.snapshot(name, ws)
        state = snap.state
        if state is None:
            raise NotFound(f"module {name} has no instance {instance!r}")
        outputs = {
            k: REDACTED if (v.get("sensitive") and not principal.admin) else v.get("value")
            for k, v in (state.get("outputs") or {}).items()
        }
        return InstanceView(
            module=name,
            instance=instance,
            outputs=outputs,
            resources=len(state.get("resources") or []),
            serial=state.get("serial"),
            terraform_version=state.get("terraform_version"),
            busy=self.runs.scheduler.busy((name, ws)),
            lock=snap.lock,
            stale=snap.stale,
            expires_at=self.expiries.get(name, ws),
        )

    # -- runs -------------------------------------------------------------------------

    def apply(self, principal: Principal, name: str, instance: str, body: Any, *,
              dry_run: bool = False, asynchronous: bool = False,
              idempotency: Idempotency | None = None, ttl: str | None = None,
              origin: Origin | None = None) -> Submitted:
        """Start an apply (or plan, with `dry_run`) of the caller's instance; `ttl` (as
        `?ttl=` gives it) sets when the instance expires."""
        m = self.module(name)
        principal.require(name, "write")
        check_instance_name(instance)
        requested = parse_ttl(ttl) if ttl is not None else None
        inputs = m.fill_reserved(m.validate(body), tenant=principal.tenant,
                                 instance=instance)
        ws = workspace_name(principal.tenant_key, instance)
        spec = RunSpec(m, instance, ws, "plan" if dry_run else "apply", inputs, principal,
                       Scrubber(m.secret_values(inputs)))
        limits = self.governance.limits(principal, name)
        if not dry_run and (requested is not None or limits.expires):
            spec.expires = self.expiries.get(name, ws)
            spec.ttl = self.governance.ttl(limits, requested, expires=spec.expires is not None)
        return self._submit(spec, asynchronous, idempotency)

    def destroy(self, principal: Principal, name: str, instance: str, *,
                dry_run: bool = False, tenant: str | None = None,
                asynchronous: bool = False, idempotency: Idempotency | None = None,
                origin: Origin | None = None) -> Submitted:
        """Start a destroy (or its plan); the inputs are read when it runs."""
        m = self.module(name)
        principal.require(name, "write")
        ws = self._target(principal, instance, tenant)
        spec = RunSpec(m, instance, ws, "plan-destroy" if dry_run else "destroy", {},
                       principal, Scrubber(m.secret_values({})))
        return self._submit(spec, asynchronous, idempotency, origin=origin)

    def apply_plan(self, principal: Principal, plan_id: str, *, asynchronous: bool = False,
                   idempotency: Idempotency | None = None,
                   origin: Origin | None = None) -> Submitted:
        """Apply exactly the plan a dry run saved (409 when expired, used or stale)."""
        plan = self._visible(principal, self.runs.record(plan_id))
        if plan.operation not in ("plan", "plan-destroy") or plan.status != "succeeded":
            raise Conflict(f"run {plan_id} is not a plan that succeeded", retry_after=0)
        m = self.module(plan.module)
        principal.require(m.name, "write")
        meta = self.store.plan_meta(plan_id)
        if meta is None or float(meta.get("expires_at", 0)) <= time.time():
            raise Conflict("the saved plan expired or was used", retry_after=0)
        inputs = dict(meta.get("inputs") or {})
        spec = RunSpec(m, plan.instance, plan.workspace,
                       "destroy" if plan.operation == "plan-destroy" else "apply", inputs,
                       principal, Scrubber(m.secret_values(inputs)), plan_of=plan_id)
        return self._submit(spec, asynchronous, idempotency, origin=origin)

    def _submit(self, spec: RunSpec, asynchronous: bool, idempotency: Idempotency | None,
                *, governed: bool = True, origin: Origin | None = None) -> Submitted:
        spec.run_id = new_run_id()
        # Idempotency keys are the caller's; the run belongs to the instance's tenant.
        tenant = spec.principal.tenant_key
        owner = spec.workspace.partition(".")[0]
        if idempotency is not None:
            found = self._replay(tenant, spec, idempotency)
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
                self._drop_key(tenant, idempotency)
                raise
        if spec.plan_of is not None and not self.store.claim_plan(spec.plan_of, spec.run_id):
            self._drop_key(tenant, idempotency)
            raise Conflict("the saved plan was applied already", retry_after=0)
        record = RunRecord(id=spec.run_id, module=spec.module.name, instance=spec.instance,
                           workspace=spec.workspace, tenant=owner,
                           subject=spec.principal.subject, operation=spec.operation,
                           plan_of=spec.plan_of,
                           idempotency_key=idempotency.key if idempotency else None,
                           client_id=spec.principal.client_id,
                           client_address=origin.address if origin else None,
                           request_id=origin.request_id if origin else None)
        run = Run(record, lambda r: self._job(r, spec), spec.scrub, sync=not asynchronous)
        what = f"instance {spec.instance!r} of module {spec.module.name}"
        try:
            self.runs.submit(run, what=what,
                             wait=0.0 if asynchronous else self.config.lock_wait)
        except TFServerError as e:
            if isinstance(e, Conflict):
                self.metrics.lock_conflicts.labels(spec.module.name).inc()
            self._drop_key(tenant, idempotency)
            if spec.plan_of is not None:
                self.store.objects.delete(f"_plans/{spec.plan_of}.used")
            raise
        if spec.plan_of is not None:
            self._mark_plan_applied(spec.plan_of, spec.run_id)
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

    def _finished(self, record: RunRecord) -> None:
        """A run ended here: count it, and write its audit line."""
        seconds = (record.finished_at - record.started_at
                   if record.started_at is not None and record.finished_at is not None
                   else None)
        self.metrics.run(record.module, record.operation, record.status, seconds)
        audit_log.info(
            "run %s %s %s/%s: %s", record.id, record.operation, record.module,
            record.instance, record.status,
            extra={"event": "run",
                   "who": {"subject": record.subject, "client_id": record.client_id,
                           "tenant": record.tenant, "address": record.client_address},
                   "what": {"module": record.module, "instance": record.instance,
                            "operation": record.operation, "run_id": record.id,
                            "idempotency_key": record.idempotency_key,
                            "request_id": record.request_id},
                   "outcome": {"status": record.status, "changes": record.changes,
                               "problem": (record.problem or {}).get("title"),
                               "seconds": None if seconds is None else round(seconds, 3)}})

    def _run_status(self, run_id: str) -> str:
        try:
            return self.runs.record(run_id).status
        except NotFound:
            return "lost"

    def _replay(self, tenant: str, spec: RunSpec, idem: Idempotency) -> Submitted | None:
        """The run an earlier request with this key started, or None after claiming the
        key for `spec`; 422 when the key came with another request."""
        if not _IDEMPOTENCY_KEY.match(idem.key):
            raise BadRequest("Idempotency-Key must be 1-255 visible ASCII characters",
                             extra={"errors": [{"field": "Idempotency-Key",
                                                "message": "malformed"}]})
        existing = self.store.claim_key(tenant, idem.key, {
            "fingerprint": idem.fingerprint, "run_id": spec.run_id,
            "expires_at": time.time() + self.config.idempotency_ttl}, time.time())
        if existing is None:
            return None
        if existing.get("fingerprint") != idem.fingerprint:
            raise Rejected("this Idempotency-Key was used with another request")
        run_id = str(existing.get("run_id"))
        local = self.runs.local(run_id)
        if local is None:
            try:
                self.runs.record(run_id)
            except NotFound:
                # The first request with this key is still being admitted (or was
                # refused a moment ago): the draft's answer to a concurrent duplicate.
                raise Conflict("a request with this Idempotency-Key is in progress",
                               retry_after=1) from None
        return Submitted(run_id, local, replayed=True)

    def _drop_key(self, tenant: str, idem: Idempotency | None) -> None:
        if idem is not None:
            self.store.drop_key(tenant, idem.key)

    def _mark_plan_applied(self, plan_id: str, run_id: str) -> None:
        """Note on the plan's record that it is used (best effort; the mark is the
        `.used` object)."""
        try:
            record = self.store.get(plan_id)
            if record is not None and record.plan is not None:
                record.plan["applied_by"] = run_id
                self.store.save(record)
        except TFServerError as e:
            logger.warning("plan %s: could not note its use: %s", plan_id, e.detail)

    def _job(self, run: Run, spec: RunSpec) -> Outcome:
        """What a run does: terraform through the executor, its events relayed."""
        def relay(raw: dict[str, Any]) -> None:
            event = api_event(raw)
            if event is not None:
                run.emit(event.pop("type"), **event)

        try:
            outcome = self.executor.execute(spec, control=run.control, on_event=relay)
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

    def wait(self, submitted: Submitted, timeout: float | None) -> bool:
        """Wait for the run to end (at most `timeout` seconds); True if it ended."""
        if submitted.run is not None:
            return submitted.run.done.wait(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.runs.record(submitted.run_id).status not in ACTIVE:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.25)

    def result(self, principal: Principal, submitted: Submitted) -> Outcome:
        """The ended run's outcome as the synchronous call answers it; raises its error."""
        run = submitted.run
        if run is not None and run.done.is_set() and not submitted.replayed:
            if run.error is not None:
                raise run.error
            outcome: Outcome = run.result
            return outcome
        return _outcome_of(self.runs.record(submitted.run_id))

    def record(self, principal: Principal, run_id: str) -> RunRecord:
        """One run's record (404 for another tenant's, unless admin)."""
        return self._visible(principal, self.runs.record(run_id))

    def list_runs(self, principal: Principal, *, module: str | None = None,
                  instance: str | None = None, tenant: str | None = None,
                  status: str | None = None, limit: int = 20,
                  after: str = "") -> RunPage:
        """Runs newest first: the caller's (an admin: everyone's, or one tenant's), of
        one module or instance, of one status."""
        if module is not None:
            self.module(module)
            principal.require(module, "read")
        key = principal.tenant_key
        if instance is not None:
            ws = self._target(principal, instance, tenant)
            key = ws.partition(".")[0]
        scope: str | None = key if (instance is not None or not principal.admin) else None
        found: list[RunRecord] = []
        cursor = after
        scanned = 0
        while len(found) < limit and scanned < 2000:
            ids = self.runs.store.ids(tenant=scope, module=module, instance=instance,
                                      after=cursor, limit=100)
            if not ids:
                cursor = ""
                break
            scanned += len(ids)
            cursor = ids[-1]
            for record in self.runs.records(ids):
                if (module is None or record.module == module) and \
                        (status is None or record.status == status) and \
                        (principal.admin or principal.can(record.module, "read")):
                    found.append(record)
                    if len(found) == limit:
                        cursor = record.id
                        break
            if len(ids) < 100 and len(found) < limit:
                cursor = ""
                break
        return RunPage(found, cursor or None, principal.tenant_key)

    def cancel(self, principal: Principal, run_id: str, *, force: bool) -> RunRecord:
        """Cancel a run (409 when it already ended)."""
        record = self._visible(principal, self.runs.record(run_id))
        principal.require(record.module, "write")
        return self.runs.cancel(run_id, force=force)

    def follow(self, principal: Principal, run_id: str,
               after: int = 0) -> Iterator[list[dict[str, Any]]]:
        """The run's events after `after`, replayed and then live, until it ends."""
        self.record(principal, run_id)
        return self.runs.follow(run_id, after)

    def force_unlock(self, principal: Principal, name: str, instance: str,
                     lock_id: Any, tenant: str | None = None) -> Unlocked:
        """Admin: clear a backend lock left by a killed run (its id must match)."""
        self.module(name)
        principal.require_admin()
        ws = self._target(principal, instance, tenant)
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

    def _target(self, principal: Principal, instance: str, tenant: str | None) -> str:
        """The workspace a request names: the caller's own instance, or for an admin that
        passes another tenant's key (as listings show it), that tenant's."""
        check_instance_name(instance)
        if tenant is None or tenant == principal.tenant_key:
            return workspace_name(principal.tenant_key, instance)
        principal.require_admin()
        check_tenant_key(tenant)
        return workspace_name(tenant, instance)

    def _visible(self, principal: Principal, record: RunRecord) -> RunRecord:
        """The record if the caller may see it; else 404, as if there were none."""
        if record.tenant != principal.tenant_key and not principal.admin:
            raise NotFound(f"no run {record.id!r}")
        if not principal.can(record.module, "read"):
            raise NotFound(f"no run {record.id!r}")
        return record


def _outcome_of(record: RunRecord) -> Outcome:
    """A stored run's outcome, as its synchronous call answered (outputs redacted)."""
    if record.status != "succeeded":
        raise RunProblem(record.problem or {
            "type": "about:blank", "title": "Service Unavailable", "status": 503,
            "detail": f"the run is {record.status}: the replica that ran it stopped"})
    changes = record.changes or {"add": 0, "change": 0, "remove": 0}
    op: Operation = record.operation  # type: ignore[assignment]
    if op in ("plan", "plan-destroy"):
        return Planned(record.module, record.instance, changes, record.planned or [],
                       record.id)
    if op == "destroy":
        return Destroyed(record.module, record.instance, changes, record.id)
    return Applied(record.module, record.instance, record.outputs or {}, changes, record.id,
                   created=bool(record.created))
