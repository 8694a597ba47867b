"""The operations of the API, free of HTTP: apply, plan, destroy, read, list.

One operation: authorise → validate → lock → run → a typed result (`Applied`, `Planned`,
`Destroyed`, `InstanceView`, ...). The server turns results into JSON, statuses and
headers; this module never speaks HTTP. Terraform's verdicts become errors of the
package's tree in one function, `problem_for`, and every text in them is scrubbed.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .auth import Principal
from .backend import StateBackend
from .config import Config
from .errors import (
    BadRequest,
    Conflict,
    FieldError,
    NotFound,
    Rejected,
    RunKilled,
    TFServerError,
    Timeout,
    Unavailable,
    UpstreamFailed,
)
from .files import private_dir, write_private
from .locks import InstanceLocks, RunSlots
from .modules import Module
from .names import check_instance_name, check_tenant_key, split_workspace, workspace_name
from .scrub import Scrubber
from .terraform import Failure, RunControl, Runner, RunResult, build_args, cli_config_text
from .workdir import VarFiles, WorkingCopies

logger = logging.getLogger(__name__)

REDACTED = "<sensitive>"

Operation = Literal["apply", "plan", "destroy", "plan-destroy"]


# -- typed results --------------------------------------------------------------------


@dataclass(frozen=True)
class Applied:
    """An apply that succeeded: the outputs (redacted for the caller) and the changes."""

    module: str
    instance: str
    outputs: dict[str, Any]
    changes: dict[str, int]
    run_id: str
    created: bool


@dataclass(frozen=True)
class Planned:
    """A plan (a dry run): what an apply or destroy would change."""

    module: str
    instance: str
    changes: dict[str, int]
    planned: list[dict[str, str]]
    run_id: str


@dataclass(frozen=True)
class Destroyed:
    """A destroy that succeeded; the instance is gone."""

    module: str
    instance: str
    changes: dict[str, int]
    run_id: str


Outcome = Applied | Planned | Destroyed


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


@dataclass
class RunSpec:
    """One run, decided and checked, ready for terraform."""

    module: Module
    instance: str
    workspace: str
    operation: Operation
    inputs: dict[str, Any]
    principal: Principal
    scrub: Scrubber
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)


# -- terraform's verdict as an error ----------------------------------------------------


def problem_for(result: RunResult, scrub: Scrubber, instance: str,
                run_timeout: float) -> TFServerError:
    """The error to answer for a failed run; every text terraform wrote passes `scrub`."""
    kind = result.failure
    if kind is Failure.INTERRUPTED:
        return Unavailable("the server is shutting down; the run was interrupted")
    if kind is Failure.CANCELED:
        return Conflict("the run was canceled", retry_after=1)
    if kind is Failure.TIMED_OUT:
        return Timeout(f"the run passed its deadline of {run_timeout:g}s and was "
                       "interrupted; terraform released its lock")
    if kind is Failure.LOCKED:
        return Conflict(f"the state of instance {instance!r} is locked by another run",
                        lock={k: scrub(v) for k, v in (result.lock or {}).items()})
    if kind is Failure.KILLED:
        return RunKilled(-result.returncode, instance)
    errors = result.errors
    diagnostics = [{"summary": scrub(d.summary), "detail": scrub(d.detail)}
                   | ({"address": d.address} if d.address else {}) for d in errors]
    if not diagnostics:
        return UpstreamFailed(f"terraform exited with status {result.returncode}")
    summary = "; ".join(d["summary"] for d in diagnostics)
    if kind is Failure.REJECTED:
        fields = [FieldError(d.variable, scrub(d.detail or d.summary).splitlines()[0])
                  for d in errors if d.variable]
        return Rejected(
            f"terraform rejected the inputs: {summary}",
            extra={"diagnostics": diagnostics} | (
                {"errors": [{"field": f.field, "message": f.message} for f in fields]}
                if fields else {}),
        )
    return UpstreamFailed(f"terraform failed while applying: {summary}",
                          extra={"diagnostics": diagnostics})


class Service:
    """Everything the HTTP layer can ask for, given a `Principal`."""

    def __init__(
        self,
        config: Config,
        modules: Mapping[str, Module],
        runner: Runner,
        backend: StateBackend,
    ) -> None:
        self.config = config
        self.modules = dict(modules)
        self.runner = runner
        self.backend = backend
        self.locks = InstanceLocks()
        self.slots = RunSlots(config.max_runs)
        self.terraform_version: str | None = None
        self.copies = WorkingCopies(config.state_dir / "work", modules, runner, backend,
                                    init_timeout=config.run_timeout)
        self.var_files: VarFiles | None = None
        # Keeps inputs while terraform runs (off the request's critical path).
        self._background = ThreadPoolExecutor(max_workers=config.max_runs,
                                              thread_name_prefix="keep-inputs")

    # -- start-up ---------------------------------------------------------------------

    def prepare(self, cli_config_file: Path | None) -> Path:
        """Create the state folder, the CLI config and every working copy (no terraform);
        returns the CLI config file terraform is to use."""
        state = private_dir(self.config.state_dir)
        for sub in ("work", "tmp", "plugin-cache"):
            private_dir(state / sub)
        self.var_files = VarFiles(self.config.tmp_dir, state / "tmp")
        if cli_config_file is None:
            cli_config_file = state / "terraformrc"
            write_private(cli_config_file, cli_config_text(
                state / "plugin-cache", self.config.provider_mirror).encode())
        self.copies.prepare()
        return cli_config_file

    def start(self) -> None:
        """Check terraform and initialise every module (in the background, once)."""
        self.terraform_version = self.runner.version()
        if self.terraform_version is None:
            logger.error("terraform (%s) cannot run; runs will fail", self.config.terraform_bin)
        self.copies.start()

    def close(self) -> None:
        """Release threads and remove what only this process used."""
        self._background.shutdown(wait=True)
        if self.var_files is not None:
            self.var_files.close()
        self.backend.close()

    def readiness(self) -> Readiness:
        """Whether every part works, and a report of each."""
        ok = self.terraform_version is not None and self.copies.all_ready()
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
            busy=self.locks.busy((name, ws)),
            lock=snap.lock,
        )

    # -- runs -------------------------------------------------------------------------

    def apply(self, principal: Principal, name: str, instance: str, body: Any,
              *, dry_run: bool = False) -> Applied | Planned:
        """Apply (or plan, with `dry_run`) an instance with the body's variables."""
        spec = self.apply_spec(principal, name, instance, body, dry_run=dry_run)
        with self._exclusive(spec):
            outcome = self.execute(spec)
        assert not isinstance(outcome, Destroyed)
        return outcome

    def destroy(self, principal: Principal, name: str, instance: str, *,
                dry_run: bool = False, tenant: str | None = None) -> Destroyed | Planned:
        """Destroy an instance (or plan its destruction) and forget its workspace."""
        spec = self.destroy_spec(principal, name, instance, dry_run=dry_run, tenant=tenant)
        with self._exclusive(spec):
            outcome = self.execute(spec)
        assert not isinstance(outcome, Applied)
        return outcome

    def apply_spec(self, principal: Principal, name: str, instance: str, body: Any,
                   *, dry_run: bool = False) -> RunSpec:
        """Authorise and validate an apply (or plan) of the caller's instance."""
        m = self.module(name)
        principal.require(name, "write")
        check_instance_name(instance)
        inputs = m.validate(body)
        return RunSpec(m, instance, workspace_name(principal.tenant_key, instance),
                       "plan" if dry_run else "apply", inputs, principal,
                       Scrubber(m.secret_values(inputs)))

    def destroy_spec(self, principal: Principal, name: str, instance: str, *,
                     dry_run: bool = False, tenant: str | None = None) -> RunSpec:
        """Authorise a destroy (or its plan); the inputs are read when it runs."""
        m = self.module(name)
        principal.require(name, "write")
        ws = self._target(principal, instance, tenant)
        return RunSpec(m, instance, ws, "plan-destroy" if dry_run else "destroy", {},
                       principal, Scrubber(m.secret_values({})))

    def execute(self, spec: RunSpec, control: RunControl | None = None) -> Outcome:
        """Run terraform for a spec whose instance this caller holds; the typed outcome,
        or the error of `problem_for`."""
        name, ws = spec.module.name, spec.workspace
        deadline = time.monotonic() + self.config.run_timeout
        wc = self.copies.ready(name)
        existed = self.backend.exists(name, ws)
        if spec.operation in ("destroy", "plan-destroy"):
            if not existed:
                raise NotFound(f"module {name} has no instance {spec.instance!r}")
            spec.inputs = self.backend.load_inputs(name, ws) or {}
            spec.scrub = Scrubber(spec.module.secret_values(spec.inputs))
        # Destroy needs the same variables again, so they are kept durably. The write
        # goes on while terraform runs (a rename on disk, a PUT on S3) and is undone if
        # terraform changed nothing.
        keeping = (self._background.submit(self._keep_inputs, name, ws, spec.inputs)
                   if spec.operation == "apply" else None)
        assert self.var_files is not None, "prepare() first"
        with self.var_files.file(spec.inputs) as var_file:
            result = self.runner.run(
                _args(spec.operation, var_file, self.config.lock_wait),
                cwd=wc.path, workspace=ws, timeout=_remaining(deadline), control=control)
        self._log_run(spec, result)
        if keeping is not None:
            previous = keeping.result()
            if not (result.ok or result.apply_started) and previous != spec.inputs:
                self._restore_inputs(name, ws, previous)
        if not result.ok:
            raise problem_for(result, spec.scrub, spec.instance, self.config.run_timeout)
        if spec.operation in ("plan", "plan-destroy"):
            return Planned(name, spec.instance, result.changes, result.planned, spec.run_id)
        if spec.operation == "destroy":
            self._workspace_delete(spec, wc.path, deadline)
            self.backend.delete_inputs(name, ws)
            return Destroyed(name, spec.instance, result.changes, spec.run_id)
        return Applied(name, spec.instance, self._outputs(spec, result), result.changes,
                       spec.run_id, created=not existed)

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
        with self.locks.hold((name, ws), 0, what=f"instance {instance!r} of module {name}"):
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

    @contextmanager
    def _exclusive(self, spec: RunSpec) -> Iterator[None]:
        """The instance lock, then a run slot (so a waiting run holds no slot)."""
        what = f"instance {spec.instance!r} of module {spec.module.name}"
        with self.locks.hold((spec.module.name, spec.workspace), self.config.lock_wait,
                             what=what), self.slots.take():
            yield

    def _keep_inputs(self, name: str, ws: str,
                     inputs: dict[str, Any]) -> dict[str, Any] | None:
        """Store the inputs unless they are stored already; return what was there."""
        previous = self.backend.load_inputs(name, ws)
        if previous != inputs:
            self.backend.save_inputs(name, ws, inputs)
        return previous

    def _restore_inputs(self, name: str, ws: str, previous: dict[str, Any] | None) -> None:
        """Put back the inputs of the last apply that changed something."""
        if previous is None:
            self.backend.delete_inputs(name, ws)
        else:
            self.backend.save_inputs(name, ws, previous)

    def _workspace_delete(self, spec: RunSpec, cwd: Path, deadline: float) -> None:
        result = self.runner.run(
            build_args("workspace delete", lock_timeout=self.config.lock_wait,
                       extra=[spec.workspace]),
            cwd=cwd, workspace="default", timeout=_remaining(deadline))
        if not result.ok:
            logger.warning("workspace %s of %s not deleted after destroy: %s", spec.workspace,
                           spec.module.name, spec.scrub(result.stderr.strip())[-500:])

    def _outputs(self, spec: RunSpec, result: RunResult) -> dict[str, Any]:
        """The apply's outputs; sensitive ones redacted unless the caller is an admin (who
        gets them from the state: the event stream never carries their values)."""
        admin = spec.principal.admin
        events = result.outputs or {}
        needs_state = admin and any(v.get("sensitive") for v in events.values())
        state = (self.backend.read_state(spec.module.name, spec.workspace)
                 if needs_state else None)
        from_state = (state or {}).get("outputs") or {}
        outputs: dict[str, Any] = {}
        for key, out in events.items():
            if not out.get("sensitive"):
                outputs[key] = out.get("value")
            elif admin and key in from_state:
                outputs[key] = from_state[key].get("value")
            else:
                outputs[key] = REDACTED
        return outputs

    def _log_run(self, spec: RunSpec, result: RunResult) -> None:
        logger.info(
            "terraform %s %s/%s exited %d in %.3fs",
            result.args[0], spec.module.name, spec.instance, result.returncode,
            result.duration,
            extra={"run_id": spec.run_id, "changes": result.changes,
                   "timed_out": result.timed_out},
        )
        for d in result.errors:
            logger.warning("terraform: %s: %s", spec.scrub(d.summary),
                           spec.scrub(d.detail)[:1000], extra={"run_id": spec.run_id})


def _args(operation: Operation, var_file: Path, lock_wait: float) -> list[str]:
    """The terraform command of an operation."""
    if operation == "plan-destroy":
        return build_args("plan", destroy=True, var_file=var_file, lock_timeout=lock_wait)
    return build_args(operation, var_file=var_file, lock_timeout=lock_wait)


def _remaining(deadline: float) -> float:
    return max(0.1, deadline - time.monotonic())
