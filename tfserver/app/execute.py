"""One run, from a decided `RunSpec` to a typed outcome: inputs kept, var file written,
terraform run, outputs read, plans saved; a failure becomes its error in `problem_for`.

The caller holds the instance (its lane); this module neither queues nor speaks HTTP.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..auth import Principal
from ..errors import (
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
from ..module.discover import Module
from ..runs.expiry import Expiries
from ..runs.store import RunStore
from ..scrub import Scrubber, shown_outputs
from ..storage.base import StateBackend
from ..storage.inputs import Kept
from ..terraform.args import build_args
from ..terraform.output import EventSink, Failure, RunResult
from ..terraform.process import RunControl, Runner, time_left
from ..terraform.workdir import VarFiles, WorkingCopies
from .driftstore import DriftReports
from .holder import lock_holder
from .ownlock import OwnLocks
from .workspaces import Workspaces

logger = logging.getLogger(__name__)

Operation = Literal["apply", "plan", "destroy", "plan-destroy", "drift"]

#: The warning of an apply whose inputs the backend would not keep.
INPUTS_NOT_KEPT = ("the inputs of this apply could not be kept for its destroy (the "
                   "state backend failed); apply the same inputs again before a destroy")


@dataclass(frozen=True)
class Applied:
    """An apply that succeeded: the outputs (redacted for the caller) and the changes."""

    module: str
    instance: str
    outputs: dict[str, Any]
    changes: dict[str, int]
    run_id: str
    created: bool
    #: When the instance expires after this apply (seconds since the epoch), if it does.
    expires_at: float | None = None
    #: What went wrong around the apply that succeeded (for its record).
    warnings: tuple[str, ...] = ()
    #: The outputs as anyone but an admin sees them (what the run's record keeps).
    public_outputs: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class Planned:
    """A plan (a dry run): what an apply or destroy would change."""

    module: str
    instance: str
    changes: dict[str, int]
    planned: list[dict[str, str]]
    run_id: str
    #: The module version planned with (`to`), and what moving the instance changes.
    version: dict[str, Any] | None = None


@dataclass(frozen=True)
class Destroyed:
    """A destroy that succeeded; the instance is gone."""

    module: str
    instance: str
    changes: dict[str, int]
    run_id: str


@dataclass(frozen=True)
class Checked:
    """A drift check that ran: the report kept beside the instance (`drift.py`: status,
    time, run, changes as names only) and the apply that reconciles it, if one started."""

    module: str
    instance: str
    changes: dict[str, int]
    run_id: str
    drift: dict[str, Any]
    reconciled_by: str | None = None


Outcome = Applied | Planned | Destroyed | Checked


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
    #: The dry run whose saved plan this run applies (its inputs are in `inputs`).
    plan_of: str | None = None
    #: An apply: seconds the instance lives from its success on (None: leave it be).
    ttl: float | None = None
    #: When the instance expired as the run was submitted (None: never, or not asked).
    expires: float | None = None
    #: A destroy by the reaper: the expiry it acts on (the run stops if it moved).
    expiry: float | None = None
    #: A drift check: apply the kept inputs when it finds drift.
    reconcile: bool = False
    #: References (app/references.py): the inputs terraform gets and what was resolved
    #: at the start; `cascade`: the dependents follow its success; `triggered_by`: whose.
    values: dict[str, Any] | None = None
    references: list[dict[str, Any]] | None = None
    cascade: bool = False
    triggered_by: str | None = None
    #: Plan first and wait for an approval (app/approvals.py), then apply that plan.
    approval: bool = False
    #: An apply or plan that moves the instance to `module`'s version (`versions.py`).
    moved: dict[str, Any] | None = None


#: What an answer shows of a state lock: never the server's paths, user or host.
LOCK_FIELDS = ("id", "operation", "created")


def shown_lock(lock: Mapping[str, str], holder: str | None = None) -> dict[str, str]:
    """A state lock as an answer shows it: its id, operation and time, and the run that
    holds it when one is known (`run_id`)."""
    shown = {k: lock[k] for k in LOCK_FIELDS if k in lock}
    return shown | ({"run_id": holder} if holder else {})


def problem_for(result: RunResult, scrub: Scrubber, instance: str,
                run_timeout: float, holder: str | None = None) -> TFServerError:
    """The error to answer for a failed run; every text terraform wrote passes `scrub`
    (`holder`: the run that holds the state lock, when it is locked)."""
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
                        lock={k: scrub(v) for k, v in shown_lock(result.lock or {},
                                                                 holder).items()})
    if kind is Failure.STALE_PLAN:
        return Conflict("the saved plan is stale: the state changed since it was made; "
                        "plan again", retry_after=0)
    if kind is Failure.KILLED:
        return RunKilled(-result.returncode, instance)
    errors = result.errors
    diagnostics = [{"summary": scrub(d.summary), "detail": scrub(d.detail)}
                   | ({"address": scrub(d.address)} if d.address else {}) for d in errors]
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


class Executor:
    """Runs terraform for specs whose instance the caller holds."""

    def __init__(self, runner: Runner, backend: StateBackend, copies: WorkingCopies,
                 store: RunStore, expiries: Expiries, *, run_timeout: float,
                 lock_wait: float, plan_ttl: float, max_workers: int,
                 var_files: VarFiles, replica: str = "",
                 resolve: Callable[[RunSpec], None] | None = None,
                 run_thread: Callable[[], None] | None = None) -> None:
        self.runner = runner
        self.backend = backend
        self.copies = copies
        self.store = store
        self.expiries = expiries
        self.run_timeout = run_timeout
        self.lock_wait = lock_wait
        self.plan_ttl = plan_ttl
        self.var_files = var_files
        #: Before terraform: references resolved (app/references.py), in-use refused.
        self.resolve = resolve or (lambda spec: None)
        self.workspaces = Workspaces(runner, backend, expiries, lock_wait=lock_wait)
        #: Terraform for a run; a lock it finds its own is cleared (`ownlock.py`).
        self.terraform = OwnLocks(runner, backend, store, replica, longest_run=run_timeout)
        # Keeps inputs while terraform runs (off the critical path); `run_thread` is
        # called first in each of its threads (the server's `Affinity.anywhere`).
        self._background = ThreadPoolExecutor(max_workers=max_workers,
                                              thread_name_prefix="keep-inputs",
                                              initializer=run_thread)

    def close(self, *, idle: bool = False) -> None:
        """Wait for background writes; remove the var-file folder, and this process's
        name beside the state once no terraform of it runs (`idle`)."""
        self._background.shutdown(wait=True)
        if idle:
            self.terraform.close()
        if self.var_files is not None:
            self.var_files.close()

    def execute(self, spec: RunSpec, control: RunControl | None = None,
                on_event: EventSink | None = None) -> Outcome:
        """Run terraform for the spec; the typed outcome, or the error of `problem_for`."""
        name, ws = spec.module.name, spec.workspace
        deadline = time.monotonic() + self.run_timeout
        wc = self.copies.ready(spec.module.copy_key)
        self.terraform.name_this_process()  # before any terraform here takes a lock
        existed = self.backend.exists(name, ws)
        destroying = spec.operation in ("destroy", "plan-destroy")
        if spec.operation == "destroy" and not existed and spec.plan_of is None:
            self.workspaces.drop_phantom(spec, wc.path)  # a DELETE answers 404 as a GET does
        self._check(spec, existed)
        self.resolve(spec)
        # Destroy needs the same variables again, so they are kept durably. The write
        # starts once terraform runs and goes on meanwhile (a rename on disk, a PUT on
        # S3); it is undone if terraform changed nothing.
        keeping: list[Future[Kept | None]] = []
        with self.var_files.file(spec.values or spec.inputs) as var_file:
            plan_file = self._plan_file(spec, var_file)
            try:
                result = self.terraform.run(
                    self._args(spec, var_file, plan_file), spec.module.name, ws,
                    spec.run_id, cwd=wc.path, deadline=deadline, control=control,
                    on_event=on_event,
                    on_start=(lambda: keeping.append(self._keep_later(name, ws, spec)))
                    if spec.operation == "apply" else None)
                saved = (plan_file.read_bytes() if plan_file is not None and result.ok
                         and spec.plan_of is None else None)
            finally:
                if plan_file is not None:
                    plan_file.unlink(missing_ok=True)
        self._log_run(spec, result)
        if spec.plan_of is not None:
            self.store.drop_plan(spec.plan_of)  # used, whatever the outcome
        warnings = self._settle_inputs(spec, result, keeping[0]) if keeping else ()
        if not result.ok:
            if spec.operation == "apply" and not existed:
                self.workspaces.failed_create(spec, result, wc.path)
            holder = (lock_holder(self.store, spec.module.name, spec.workspace, spec.run_id)
                      if result.failure is Failure.LOCKED else None)
            raise problem_for(result, spec.scrub, spec.instance, self.run_timeout, holder)
        expires_at = self._expire(spec) if spec.operation == "apply" else None
        if result.unreadable and spec.operation == "apply" and result.outputs is None:
            # Never answer an apply with outputs made up of nulls.
            raise UpstreamFailed("the apply ended, but terraform's report of it could not "
                                 "be read; GET the instance to see its outputs")
        if spec.operation in ("plan", "plan-destroy"):
            if saved is not None:
                self._save_plan(spec, saved)
            planned = [{**p, "address": spec.scrub(p["address"])} for p in result.planned]
            return Planned(name, spec.instance, result.changes, planned, spec.run_id,
                           spec.moved or {"to": spec.module.version})
        if destroying:
            return self.forget(spec, result.changes, deadline)
        return Applied(name, spec.instance, self._outputs(spec, result), result.changes,
                       spec.run_id, created=not existed, expires_at=expires_at,
                       warnings=warnings,
                       public_outputs=shown_outputs(result.outputs or {}, scrub=spec.scrub))

    def forget(self, spec: RunSpec, changes: dict[str, int] | None = None,
               deadline: float | None = None) -> Destroyed:
        """A destroy's clean-up (its workspace, kept inputs, expiry, drift report); also
        a destroy run again whose instance an earlier attempt already destroyed."""
        name, ws = spec.module.name, spec.workspace
        wc = self.copies.ready(spec.module.copy_key)
        left = time_left(deadline if deadline is not None else time.monotonic() + 120)
        self.workspaces.delete_workspace(spec, wc.path, left)
        self.backend.inputs.delete(name, ws)
        self.expiries.clear(name, ws)
        DriftReports(self.backend.objects).clear(name, ws)
        return Destroyed(name, spec.instance, changes or dict.fromkeys(_COUNTS, 0), spec.run_id)

    def _expire(self, spec: RunSpec) -> float | None:
        """After an apply that succeeded: when the instance expires (recorded)."""
        if spec.ttl is None:
            return spec.expires
        expires_at = time.time() + spec.ttl
        self.expiries.set(spec.module.name, spec.workspace, expires_at)
        return expires_at

    def _check(self, spec: RunSpec, existed: bool) -> None:
        """Refuse a reaper's destroy whose expiry moved, or a destroy of nothing; give a
        destroy the inputs of the last apply."""
        name, ws = spec.module.name, spec.workspace
        if spec.expiry is not None:
            current = self.expiries.get(name, ws)
            if current is None or int(current) != int(spec.expiry):
                # A later apply moved the expiry (or the instance went) meanwhile.
                raise Conflict("the instance's expiry moved; it is not destroyed",
                               retry_after=0)
        if spec.operation in ("destroy", "plan-destroy") and spec.plan_of is None:
            if not existed:
                raise NotFound(f"module {name} has no instance {spec.instance!r}")
            spec.inputs = self.backend.inputs.load(name, ws) or {}
            spec.scrub = Scrubber(spec.module.secret_values(spec.inputs))

    def _plan_file(self, spec: RunSpec, var_file: Path) -> Path | None:
        """Where the plan is saved (a dry run) or read from (applying a saved plan), on
        the var files' tmpfs, 0600."""
        path = var_file.with_suffix(".tfplan")
        if spec.plan_of is not None:
            data = self.store.plan_file(spec.plan_of)
            if data is None:
                raise Conflict("the saved plan expired or was used", retry_after=0)
            path.touch(mode=0o600)
            path.write_bytes(data)
            return path
        return path if spec.operation in ("plan", "plan-destroy") else None

    def _args(self, spec: RunSpec, var_file: Path, plan_file: Path | None) -> list[str]:
        """The terraform command of a spec."""
        if spec.plan_of is not None:
            return build_args("apply", lock_timeout=self.lock_wait, plan_file=plan_file)
        if spec.operation in ("plan", "plan-destroy"):
            return build_args("plan", destroy=spec.operation == "plan-destroy",
                              var_file=var_file, lock_timeout=self.lock_wait,
                              plan_out=plan_file)
        return build_args(spec.operation, var_file=var_file, lock_timeout=self.lock_wait)

    def _save_plan(self, spec: RunSpec, data: bytes) -> None:
        """Keep the plan and its inputs (stored like state) for `POST /runs/{id}/apply`."""
        try:
            self.store.put_plan(spec.run_id, data, {
                "module": spec.module.name, "instance": spec.instance,
                "workspace": spec.workspace, "operation": spec.operation,
                "inputs": spec.inputs, "expires_at": time.time() + self.plan_ttl})
        except TFServerError as e:
            logger.warning("plan of run %s not kept: %s", spec.run_id, e.detail)

    def _keep_later(self, name: str, ws: str, spec: RunSpec) -> Future[Kept | None]:
        """`_keep_inputs` in the background (what it returns, or raised, is the future's)."""
        now = Kept(spec.inputs, spec.module.version)
        try:
            return self._background.submit(self._keep_inputs, name, ws, now)
        except RuntimeError:  # the pool stopped (a late shutdown): kept in this thread
            kept: Future[Kept | None] = Future()
            try:
                kept.set_result(self._keep_inputs(name, ws, now))
            except (TFServerError, OSError) as e:
                kept.set_exception(e)
            return kept

    def _keep_inputs(self, name: str, ws: str, now: Kept) -> Kept | None:
        """Store the inputs and version unless stored already; return what was there."""
        previous = self.backend.inputs.kept(name, ws)
        if previous != now:
            self.backend.inputs.save(name, ws, now.inputs, now.version)
        return previous

    def _settle_inputs(self, spec: RunSpec, result: RunResult,
                       keeping: Future[Kept | None]) -> tuple[str, ...]:
        """After an apply: put back the previous inputs if terraform changed nothing, or
        make sure the new ones are kept if it did. A backend that fails here never turns
        the apply that happened into a failure: the warnings to record, if any."""
        name, ws = spec.module.name, spec.workspace
        now = Kept(spec.inputs, spec.module.version)
        try:
            previous = keeping.result()
        except (TFServerError, OSError) as e:
            if not (result.ok or result.apply_started):
                return ()  # nothing was written, nothing changed: nothing to keep
            try:  # once more, now that terraform is done (the store may be back)
                self._keep_inputs(name, ws, now)
                return ()
            except (TFServerError, OSError) as again:
                logger.warning("inputs of %s/%s not kept after the apply: %s (first: %s)",
                               name, spec.instance, _detail(again), _detail(e),
                               extra={"run_id": spec.run_id})
                return (INPUTS_NOT_KEPT,)
        if not (result.ok or result.apply_started) and previous != now:
            try:
                self._restore_inputs(name, ws, previous)
            except (TFServerError, OSError) as e:
                logger.warning("inputs of %s/%s not put back after a run that changed "
                               "nothing: %s", name, spec.instance, _detail(e),
                               extra={"run_id": spec.run_id})
        return ()

    def _restore_inputs(self, name: str, ws: str, previous: Kept | None) -> None:
        """Put back the inputs of the last apply that changed something."""
        self.backend.inputs.restore(name, ws, previous)

    def _outputs(self, spec: RunSpec, result: RunResult) -> dict[str, Any]:
        """The apply's outputs; sensitive ones redacted unless the caller is an admin (who
        gets them from the state: the event stream never carries their values)."""
        admin = spec.principal.admin
        events = result.outputs or {}
        if not (admin and any(v.get("sensitive") for v in events.values())):
            return shown_outputs(events, scrub=spec.scrub)
        state = self.backend.read_state(spec.module.name, spec.workspace)
        from_state = (state or {}).get("outputs") or {}
        return shown_outputs({k: from_state.get(k, v) if v.get("sensitive") else v
                              for k, v in events.items()}, reveal=True, scrub=spec.scrub)

    def _log_run(self, spec: RunSpec, result: RunResult) -> None:
        # A run that went well has its audit line (status, changes, time); this line is
        # for following terraform itself, and costs a synchronous answer its writing.
        logger.log(
            logging.INFO if result.returncode != 0 or result.timed_out else logging.DEBUG,
            "terraform %s %s/%s exited %d in %.3fs",
            result.args[0], spec.module.name, spec.instance, result.returncode,
            result.duration,
            extra={"run_id": spec.run_id, "changes": result.changes,
                   "timed_out": result.timed_out},
        )
        for d in result.errors:
            logger.warning("terraform: %s: %s", spec.scrub(d.summary),
                           spec.scrub(d.detail)[:1000], extra={"run_id": spec.run_id})


def _detail(error: TFServerError | OSError) -> str:
    """What a storage error says (never a value: keys and the OS's reason only)."""
    return error.detail if isinstance(error, TFServerError) else str(error.strerror)


_COUNTS = ("add", "change", "remove")

