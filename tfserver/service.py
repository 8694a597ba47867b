"""The operations of the API, free of HTTP: apply, destroy, read, list.

It ties the parts together for one request: the caller's rights, input validation, the
instance lock, a run slot, the terraform run, and the translation of terraform's
diagnostics into problem details that never carry a secret.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .auth import Principal
from .backend import StateBackend, write_private
from .config import NAME_RE, Config
from .errors import (
    BadRequest,
    Conflict,
    FieldError,
    NotFound,
    Rejected,
    TFServerError,
    Timeout,
    Unavailable,
    UpstreamFailed,
)
from .locks import InstanceLocks, RunSlots
from .modules import Module
from .terraform import RunResult, Terraform, build_args, cli_config_text

logger = logging.getLogger(__name__)

OVERRIDE_FILE = "tfserver_override.tf.json"
REDACTED = "<sensitive>"
#: A failed init is retried on the next request, but not more often than this.
INIT_RETRY_SECONDS = 30.0
_KEEP_IN_WORKING_COPY = {".terraform", ".terraform.lock.hcl"}
_LOCK_FIELD = re.compile(r"^\s*(ID|Path|Operation|Who|Version|Created|Info):\s*(.*)$")


def workspace_name(tenant_key: str, instance: str) -> str:
    """The Terraform workspace of a tenant's instance: `<tenant_key>.<instance>`.

    Instance names cannot hold a dot, and tenant keys are fixed, so no name one tenant
    picks can reach another tenant's workspace.
    """
    return f"{tenant_key}.{instance}"


_TENANT_KEY = re.compile(r"^([0-9a-f]{24}|local)$")


def check_instance_name(instance: str) -> None:
    """Raise 400 unless the name is a valid instance name."""
    if not NAME_RE.match(instance):
        raise BadRequest(
            f"instance names match {NAME_RE.pattern}",
            extra={"errors": [{"field": "instance", "message": "invalid name"}]},
        )


def target_workspace(principal: Principal, instance: str, tenant: str | None) -> str:
    """The workspace a request names: the caller's own instance, or for an admin that
    passes `?tenant=<key>` (as listings show it), another tenant's."""
    check_instance_name(instance)
    if tenant is None or tenant == principal.tenant_key:
        return workspace_name(principal.tenant_key, instance)
    principal.require_admin()
    if not _TENANT_KEY.match(tenant):
        raise BadRequest("tenant keys are 24 hex digits, as instance listings show them",
                         extra={"errors": [{"field": "tenant", "message": "invalid key"}]})
    return workspace_name(tenant, instance)


class Scrubber:
    """Removes every sensitive value from text meant for a client or a log."""

    def __init__(self, secrets: list[str]) -> None:
        forms: set[str] = set()
        for s in secrets:
            forms.add(s)
            forms.add(json.dumps(s)[1:-1])  # as it appears inside a JSON or HCL string
        self.forms = sorted((f for f in forms if f), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for form in self.forms:
            text = text.replace(form, "(sensitive value)")
        return text


def parse_lock_info(detail: str) -> dict[str, str]:
    """The `Lock Info:` block of terraform's "Error acquiring the state lock"."""
    info: dict[str, str] = {}
    for line in detail.splitlines():
        m = _LOCK_FIELD.match(line)
        if m and m.group(2).strip():
            info[m.group(1).lower()] = m.group(2).strip()
    return info


@dataclass
class WorkingCopy:
    """A module's private, initialised copy under the state folder."""

    module: Module
    path: Path
    status: str = "new"
    error: str = ""
    failed_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass(frozen=True)
class RunOutcome:
    """The answer to an apply, destroy or plan: the JSON body and whether it created."""

    body: dict[str, Any]
    created: bool = False


class Service:
    """Everything the HTTP layer can ask for, given a `Principal`."""

    def __init__(
        self,
        config: Config,
        modules: Mapping[str, Module],
        terraform: Terraform,
        backend: StateBackend,
    ) -> None:
        self.config = config
        self.modules = dict(modules)
        self.terraform = terraform
        self.backend = backend
        self.locks = InstanceLocks()
        self.slots = RunSlots(config.max_runs)
        self.terraform_version: str | None = None
        self._init_mutex = threading.Lock()  # the plugin cache is not safe for parallel init
        self._io = ThreadPoolExecutor(max_workers=config.max_runs, thread_name_prefix="io")
        self.var_dir = config.state_dir / "tmp"
        self._own_var_dir = False
        self.copies = {
            name: WorkingCopy(m, config.state_dir / "work" / name) for name, m in modules.items()
        }

    # -- start-up ---------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the state folder, the CLI config and every working copy (no terraform)."""
        state = self.config.state_dir
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        for sub in ("work", "tmp", "plugin-cache"):
            (state / sub).mkdir(exist_ok=True, mode=0o700)
        self.var_dir, self._own_var_dir = _var_dir(self.config)
        if self.terraform.cli_config_file is None:
            path = state / "terraformrc"
            write_private(path, cli_config_text(state / "plugin-cache",
                                                self.config.provider_mirror).encode())
            self.terraform.cli_config_file = path
        for copy in self.copies.values():
            self._sync(copy)

    def close(self) -> None:
        """Remove what only this process used (its private var-file folder)."""
        self._io.shutdown(wait=True)
        if self._own_var_dir:
            shutil.rmtree(self.var_dir, ignore_errors=True)

    def _sync(self, copy: WorkingCopy) -> None:
        copy.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        for entry in copy.path.iterdir():
            if entry.name in _KEEP_IN_WORKING_COPY:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        shutil.copytree(
            copy.module.path,
            copy.path,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns(".terraform", "terraform.tfstate*", "*.tfvars",
                                          "*.tfvars.json", ".terraform.tfstate.lock.info"),
        )
        override = self.backend.override(copy.module.name)
        (copy.path / OVERRIDE_FILE).write_text(json.dumps(override, indent=2) + "\n")

    def start(self) -> None:
        """Check terraform and initialise every module (in the background, once)."""
        self.terraform_version = self.terraform.version()
        if self.terraform_version is None:
            logger.error("terraform (%s) cannot run; runs will fail", self.terraform.binary)
        for name in self.copies:
            threading.Thread(target=self._init_quietly, args=(name,),
                             name=f"init-{name}", daemon=True).start()

    def _init_quietly(self, name: str) -> None:
        with contextlib.suppress(TFServerError):  # recorded on the working copy, logged
            self.ensure_ready(name)

    def ensure_ready(self, name: str) -> WorkingCopy:
        """The module's working copy, initialised (init runs once, behind a lock)."""
        copy = self.copies[name]
        if copy.status == "ready":
            return copy
        with copy.lock:
            if copy.status == "ready":
                return copy
            if copy.status == "failed" and time.monotonic() - copy.failed_at < INIT_RETRY_SECONDS:
                raise Unavailable(f"module {name} could not be initialised: {copy.error}",
                                  retry_after=int(INIT_RETRY_SECONDS))
            copy.status = "initialising"
            with self._init_mutex:
                result = self.terraform.run(
                    build_args("init", backend_config=self.backend.init_config(name)),
                    cwd=copy.path,
                    timeout=self.config.run_timeout,
                )
            if result.ok:
                copy.status, copy.error = "ready", ""
                logger.info("module %s initialised in %.2fs", name, result.duration)
                return copy
            copy.status, copy.failed_at = "failed", time.monotonic()
            copy.error = _init_error(result)
            logger.error("module %s: terraform init failed: %s", name, copy.error)
            raise Unavailable(f"module {name} could not be initialised: {copy.error}",
                              retry_after=int(INIT_RETRY_SECONDS))

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether every part works, and a report of each."""
        report: dict[str, Any] = {"terraform": self.terraform_version or "not found"}
        ok = self.terraform_version is not None
        report["modules"] = {n: c.status if c.status != "failed" else f"failed: {c.error}"
                             for n, c in self.copies.items()}
        ok = ok and all(c.status == "ready" for c in self.copies.values())
        try:
            self.backend.check()
            report["backend"] = f"{self.backend.name}: ok"
        except TFServerError as e:
            report["backend"] = f"{self.backend.name}: {e.detail}"
            ok = False
        return ok, report

    # -- reads ------------------------------------------------------------------------

    def module(self, name: str) -> Module:
        """The module served at `/<name>`, or 404."""
        found = self.modules.get(name)
        if found is None:
            raise NotFound(f"no module named {name!r}")
        return found

    def index(self, principal: Principal) -> dict[str, Any]:
        """The modules the caller may read, with links."""
        return {
            "modules": [
                {"name": m.name, "href": f"/{m.name}", "description": m.description}
                for m in self.modules.values()
                if principal.can(m.name, "read")
            ]
        }

    def instances(self, principal: Principal, module: str) -> list[dict[str, str]]:
        """The caller's instances of a module (an admin sees every tenant's)."""
        found = []
        for ws in self.backend.workspaces(module):
            tenant, _, instance = ws.partition(".")
            if not instance:
                continue
            if tenant == principal.tenant_key:
                found.append({"instance": instance, "href": f"/{module}/{instance}"})
            elif principal.admin:
                found.append({"instance": instance, "tenant": tenant})
        return found

    def describe(self, principal: Principal, name: str) -> dict[str, Any]:
        """A module: its variables schema, outputs and the caller's instances."""
        m = self.module(name)
        principal.require(name, "read")
        return {
            "module": m.name,
            "description": m.description,
            "variables": m.schema,
            "outputs": {o.name: {"description": o.description, "sensitive": o.sensitive}
                        for o in m.outputs.values()},
            "instances": self.instances(principal, name),
        }

    def show(self, principal: Principal, name: str, instance: str,
             tenant: str | None = None) -> dict[str, Any]:
        """An instance's outputs and status, read from its state without terraform."""
        self.module(name)
        principal.require(name, "read")
        ws = target_workspace(principal, instance, tenant)
        snap = self.backend.snapshot(name, ws)
        state = snap.state
        if state is None:
            raise NotFound(f"module {name} has no instance {instance!r}")
        outputs = {
            k: REDACTED if (v.get("sensitive") and not principal.admin) else v.get("value")
            for k, v in (state.get("outputs") or {}).items()
        }
        body: dict[str, Any] = {
            "module": name,
            "instance": instance,
            "outputs": outputs,
            "resources": len(state.get("resources") or []),
            "serial": state.get("serial"),
            "terraform_version": state.get("terraform_version"),
            "status": "busy" if self.locks.busy((name, ws)) else "idle",
        }
        if snap.lock:
            body["lock"] = snap.lock
            body["status"] = "locked"
        return body

    # -- runs -------------------------------------------------------------------------

    def apply(
        self,
        principal: Principal,
        name: str,
        instance: str,
        body: Any,
        *,
        dry_run: bool = False,
    ) -> RunOutcome:
        """Apply (or plan, with `dry_run`) an instance with the body's variables."""
        m = self.module(name)
        principal.require(name, "write")
        check_instance_name(instance)
        inputs = m.validate(body)
        ws = workspace_name(principal.tenant_key, instance)
        scrub = Scrubber(m.secret_values(inputs))
        run_id = uuid.uuid4().hex
        deadline = time.monotonic() + self.config.run_timeout
        copy = self.ensure_ready(name)
        with self._exclusive(name, ws, instance):
            # Terraform creates a new workspace's state on its first apply (TF_WORKSPACE),
            # in the local and the S3 backend alike: no `workspace new` process is needed.
            existed = self.backend.exists(name, ws)
            command = "plan" if dry_run else "apply"
            # Destroy needs the same variables again, so they are kept durably. The write
            # goes on while terraform runs (it is off the request's critical path: a
            # rename on disk, a PUT on S3) and is undone if terraform changed nothing.
            keeping = None if dry_run else self._io.submit(self._keep_inputs, name, ws, inputs)
            with self._var_file(inputs) as var_file:
                result = self.terraform.run(
                    build_args(command, var_file=var_file, lock_timeout=self.config.lock_wait),
                    cwd=copy.path,
                    workspace=ws,
                    timeout=_remaining(deadline),
                )
            self._log_run(run_id, name, instance, result, scrub)
            if keeping is not None:
                previous = keeping.result()
                if not (result.ok or result.apply_started) and previous != inputs:
                    self._restore_inputs(name, ws, previous)
            if not result.ok:
                raise self._failure(result, scrub, instance)
            if dry_run:
                return RunOutcome(self._plan_body(name, instance, run_id, result))
            outputs = self._outputs(principal, name, ws, result)
        return RunOutcome(
            {
                "module": name,
                "instance": instance,
                "outputs": outputs,
                "changes": result.changes,
                "run_id": run_id,
            },
            created=not existed,
        )

    def destroy(
        self,
        principal: Principal,
        name: str,
        instance: str,
        *,
        dry_run: bool = False,
        tenant: str | None = None,
    ) -> RunOutcome:
        """Destroy an instance (or plan its destruction) and forget its workspace."""
        m = self.module(name)
        principal.require(name, "write")
        ws = target_workspace(principal, instance, tenant)
        run_id = uuid.uuid4().hex
        deadline = time.monotonic() + self.config.run_timeout
        copy = self.ensure_ready(name)
        with self._exclusive(name, ws, instance):
            if not self.backend.exists(name, ws):
                raise NotFound(f"module {name} has no instance {instance!r}")
            inputs = self.backend.load_inputs(name, ws) or {}
            scrub = Scrubber(m.secret_values(inputs))
            with self._var_file(inputs) as var_file:
                args = (build_args("plan", destroy=True, var_file=var_file,
                                   lock_timeout=self.config.lock_wait) if dry_run
                        else build_args("destroy", var_file=var_file,
                                        lock_timeout=self.config.lock_wait))
                result = self.terraform.run(args, cwd=copy.path, workspace=ws,
                                            timeout=_remaining(deadline))
            self._log_run(run_id, name, instance, result, scrub)
            if not result.ok:
                raise self._failure(result, scrub, instance)
            if dry_run:
                return RunOutcome(self._plan_body(name, instance, run_id, result))
            self._workspace_delete(copy, ws, deadline, scrub)
            self.backend.delete_inputs(name, ws)
        return RunOutcome(
            {"module": name, "instance": instance, "destroyed": True,
             "changes": result.changes, "run_id": run_id}
        )

    def force_unlock(self, principal: Principal, name: str, instance: str,
                     lock_id: Any, tenant: str | None = None) -> dict[str, Any]:
        """Admin: clear a backend lock left by a killed run (its id must match)."""
        self.module(name)
        principal.require_admin()
        ws = target_workspace(principal, instance, tenant)
        if not isinstance(lock_id, str) or not lock_id.strip():
            raise BadRequest("send the lock id to clear as {\"lock_id\": \"...\"}",
                             extra={"errors": [{"field": "lock_id", "message": "required"}]})
        copy = self.ensure_ready(name)
        # Never while this server runs terraform on the instance: that lock is alive.
        with self.locks.hold((name, ws), 0, what=f"instance {instance!r} of module {name}"):
            held = self.backend.lock_info(name, ws)
            if held is not None and held.get("id") not in (None, lock_id):
                raise Conflict("that is not the id of the lock held now", lock=held)
            result = self.terraform.run(
                build_args("force-unlock", extra=[lock_id]),
                cwd=copy.path, workspace=ws, timeout=min(self.config.run_timeout, 120))
            if not result.ok:
                logger.warning("force-unlock of %s/%s failed: %s", name, instance,
                               result.stderr.strip()[-500:])
                raise Conflict("terraform could not clear that lock: the id does not match "
                               "a held lock", lock=held or {})
        logger.warning("lock %s of %s/%s cleared by %s", lock_id, name, instance,
                       principal.subject)
        return {"module": name, "instance": instance, "unlocked": lock_id}

    # -- helpers ----------------------------------------------------------------------

    @contextmanager
    def _exclusive(self, name: str, ws: str, instance: str) -> Iterator[None]:
        """The instance lock, then a run slot (so a waiting run holds no slot)."""
        what = f"instance {instance!r} of module {name}"
        with self.locks.hold((name, ws), self.config.lock_wait, what=what), self.slots.take():
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

    @contextmanager
    def _var_file(self, inputs: Mapping[str, Any]) -> Iterator[Path]:
        """The variables in a 0600 file that exists only for the run (never in argv)."""
        fd, raw = tempfile.mkstemp(suffix=".tfvars.json", dir=self.var_dir)
        path = Path(raw)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(dict(inputs), f)
            yield path
        finally:
            path.unlink(missing_ok=True)

    def _workspace_delete(self, copy: WorkingCopy, ws: str, deadline: float,
                          scrub: Scrubber) -> None:
        result = self.terraform.run(
            build_args("workspace delete", lock_timeout=self.config.lock_wait, extra=[ws]),
            cwd=copy.path, workspace="default", timeout=_remaining(deadline))
        if not result.ok:
            logger.warning("workspace %s of %s not deleted after destroy: %s", ws,
                           copy.module.name, scrub(result.stderr.strip())[-500:])

    def _outputs(self, principal: Principal, name: str, ws: str,
                 result: RunResult) -> dict[str, Any]:
        events = result.outputs or {}
        needs_state = principal.admin and any(v.get("sensitive") for v in events.values())
        state = self.backend.read_state(name, ws) if needs_state else None
        from_state = (state or {}).get("outputs") or {}
        outputs: dict[str, Any] = {}
        for key, out in events.items():
            if not out.get("sensitive"):
                outputs[key] = out.get("value")
            elif principal.admin and key in from_state:
                outputs[key] = from_state[key].get("value")
            else:
                outputs[key] = REDACTED
        return outputs

    def _plan_body(self, name: str, instance: str, run_id: str,
                   result: RunResult) -> dict[str, Any]:
        return {
            "module": name,
            "instance": instance,
            "dry_run": True,
            "changes": result.changes,
            "planned": result.planned,
            "run_id": run_id,
        }

    def _failure(self, result: RunResult, scrub: Scrubber, instance: str) -> TFServerError:
        """The problem to answer for a failed run; every text passes through `scrub`."""
        if result.interrupted:
            return Unavailable("the server is shutting down; the run was interrupted")
        if result.timed_out:
            return Timeout(
                f"the run passed its deadline of {self.config.run_timeout:g}s and was "
                "interrupted; terraform released its lock"
            )
        errors = result.errors
        for d in errors:
            if d.summary.startswith(("Error acquiring the state lock", "Error locking state")):
                return Conflict(
                    f"the state of instance {instance!r} is locked by another run",
                    lock={k: scrub(v) for k, v in parse_lock_info(d.detail).items()},
                )
        diagnostics = [{"summary": scrub(d.summary), "detail": scrub(d.detail)}
                       | ({"address": d.address} if d.address else {}) for d in errors]
        if not diagnostics:
            tail = scrub(result.stderr.strip())[-1000:]
            logger.warning("terraform exited %d without diagnostics: %s",
                           result.returncode, tail)
            if result.returncode < 0:
                return UpstreamFailed(
                    f"terraform was killed by signal {-result.returncode} during the run; "
                    f"the state of instance {instance!r} may still be locked: GET the "
                    "instance to see the lock, and an admin can clear it with "
                    "DELETE .../lock"
                )
            return UpstreamFailed(f"terraform exited with status {result.returncode}")
        summary = "; ".join(d["summary"] for d in diagnostics)
        if not result.apply_started and result.args[0] != "destroy":
            fields = [FieldError(f, (d["detail"] or d["summary"]).splitlines()[0])
                      for f, d in zip(_variables_named(result), diagnostics, strict=True) if f]
            return Rejected(
                f"terraform rejected the inputs: {summary}",
                extra={"diagnostics": diagnostics} | (
                    {"errors": [{"field": f.field, "message": f.message} for f in fields]}
                    if fields else {}),
            )
        return UpstreamFailed(f"terraform failed while applying: {summary}",
                              extra={"diagnostics": diagnostics})

    def _log_run(self, run_id: str, name: str, instance: str, result: RunResult,
                 scrub: Scrubber) -> None:
        logger.info(
            "terraform %s %s/%s exited %d in %.3fs",
            result.args[0], name, instance, result.returncode, result.duration,
            extra={"run_id": run_id, "changes": result.changes,
                   "timed_out": result.timed_out},
        )
        for d in result.errors:
            logger.warning("terraform: %s: %s", scrub(d.summary), scrub(d.detail)[:1000],
                           extra={"run_id": run_id})


def _variables_named(result: RunResult) -> list[str]:
    """For each error diagnostic, the variable it is about (`var.x` in its snippet), or ""."""
    names = []
    for event in result.events:
        d = event.get("diagnostic") if event.get("type") == "diagnostic" else None
        if not d or d.get("severity") != "error":
            continue
        found = ""
        for v in ((d.get("snippet") or {}).get("values") or []):
            traversal = str(v.get("traversal", ""))
            if traversal.startswith("var."):
                found = traversal[4:].split(".")[0].split("[")[0]
                break
        names.append(found)
    return names


def _init_error(result: RunResult) -> str:
    text = (result.stderr or result.stdout).strip()
    for line in text.splitlines():
        if "Error:" in line:
            return line.strip(" │╷╵").strip()[:300]
    if result.timed_out:
        return "terraform init timed out"
    return text[-300:] or f"exit status {result.returncode}"


def _var_dir(config: Config) -> tuple[Path, bool]:
    """The folder for var files, and whether this process made it (and must remove it).

    Preferably a private folder on tmpfs: the values (secrets included) never reach a
    persistent disk, and terraform's fsync of its state does not have to flush them too,
    which measurably slowed every apply that changed state.
    """
    if config.tmp_dir is not None:
        config.tmp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return config.tmp_dir, False
    shm = Path("/dev/shm")  # noqa: S108 - a private mkdtemp inside it, mode 0700
    if shm.is_dir() and os.access(shm, os.W_OK):
        remove_orphan_var_dirs(shm)
        return Path(tempfile.mkdtemp(prefix=f"tfserver-vars-{os.getpid()}-", dir=shm)), True
    return config.state_dir / "tmp", False


def remove_orphan_var_dirs(parent: Path) -> None:
    """Remove var-file folders of this user's tfserver processes that are gone (a server
    killed mid-run would otherwise leave a var file, secrets included, until reboot)."""
    for folder in parent.glob("tfserver-vars-*-*"):
        try:
            pid = int(folder.name.split("-")[2])
            if folder.stat().st_uid != os.getuid():
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
            logger.info("removed %s, left by a stopped tfserver", folder)
        except (ValueError, OSError):
            continue


def _remaining(deadline: float) -> float:
    return max(0.1, deadline - time.monotonic())
