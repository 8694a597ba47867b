"""What references mean for the instances referenced: `used_by` and `outdated` on a GET,
the 409 of deleting an instance in use, the index kept after each run, and the cascade
(`?cascade=true`): after an apply succeeds, each dependent whose referenced value changed
is applied again with its kept inputs, in dependency order (each dependent's own success
carries the cascade on below it; a failure stops it there and its record says so).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..auth import Principal
from ..errors import Conflict, TFServerError
from ..module.discover import Module
from ..module.refs import RefSyntaxError, follow, parse_ref
from ..names import workspace_name, workspace_tenant
from ..runs.run import Run
from ..scrub import Scrubber, scrubbed
from ..storage.base import StateBackend
from .catalog import InstanceView, ModuleView, target_workspace
from .execute import Applied, Destroyed, Outcome, RunSpec
from .orphan import Orphaned, Orphaner
from .references import References, digest, references_of
from .refindex import BUILT, RefIndex, User, kept_references

logger = logging.getLogger(__name__)

#: How many users a 409 names (the rest are counted).
NAMED_USERS = 20

Submit = Callable[[RunSpec], str]


class Dependents:
    """The referenced side of references."""

    def __init__(self, modules: Mapping[str, Module], backend: StateBackend,
                 references: References) -> None:
        self.modules = modules
        self.backend = backend
        self.references = references
        self.index: RefIndex = references.index

    def repair(self) -> int | None:
        """Build the index from the kept inputs if it was never built (or was lost);
        how many references it holds then (None: it was there, or the backend cannot
        be read now: the next start tries again, and /readyz says why)."""
        try:
            if self.backend.objects.get(BUILT) is not None:
                return None
            count = self.index.rebuild(sorted(self.modules), self.backend.inputs)
        except TFServerError as e:
            logger.warning("reference index not checked: %s", e.detail)
            return None
        logger.info("reference index built from the kept inputs: %d references", count)
        return count

    def annotate(self, view: InstanceView, workspace: str) -> InstanceView:
        """The instance's `used_by` and `outdated`, read from the index and states; its
        outputs scrubbed of the values its sensitive variables reference (as the
        referenced instances hold them now), as of a sensitive variable's own."""
        used_by = [{"module": u.module, "instance": u.instance, "variable": u.variable}
                   for u in self.index.users(view.module, workspace)]
        module = self.modules.get(view.module)
        outdated, secrets = [], {}
        for use in self.index.uses(view.module, workspace):
            try:
                ref = parse_ref(use.get("ref"))
                state = self.backend.read_state(ref.module, workspace_name(
                    workspace_tenant(workspace), ref.instance))
            except (RefSyntaxError, TFServerError):
                continue
            if module is not None and use.get("variable") in module.sensitive_variables:
                with contextlib.suppress(KeyError):
                    secrets[str(use["variable"])] = follow(
                        ((state or {}).get("outputs") or {}).get(ref.output, {}).get("value"),
                        ref.path)
            current = (state or {}).get("serial")
            if current != use.get("serial"):
                outdated.append({"variable": use.get("variable"), "ref": use.get("ref"),
                                 "applied_serial": use.get("serial"),
                                 "current_serial": current})
        outputs = view.outputs
        if secrets and module is not None:
            scrub = Scrubber(module.secret_values(secrets))
            outputs = {k: v if k in module.outputs and module.outputs[k].sensitive
                       else scrubbed(v, scrub) for k, v in outputs.items()}
        return dataclasses.replace(view, used_by=used_by, outdated=outdated, outputs=outputs)

    def describe(self, view: ModuleView, principal: Principal) -> ModuleView:
        """The module's view with, per output, the modules whose instances reference it
        (of the instances the caller sees: one listing of the index each)."""
        referenced: dict[str, set[str]] = {}
        for listed in view.instances:
            ws = workspace_name(listed.tenant or principal.tenant_key, listed.instance)
            for user in self.index.users(view.module.name, ws):
                referenced.setdefault(user.output, set()).add(user.module)
        return dataclasses.replace(view, referenced={k: sorted(v)
                                                     for k, v in referenced.items()})

    def users(self, module: str, workspace: str, *, at_most: int | None = None) -> list[User]:
        """The instance's users, each checked against its kept inputs (an entry the
        inputs no longer back is dropped, the index repaired, unless an apply of its
        instance is under way: it wrote the entry as it started, and is listed active or
        claimed it within CLAIM_GRACE); `at_most` stops early."""
        found = []
        tenant = workspace_tenant(workspace)
        applying: set[tuple[str, str]] | None = None
        for user in self.index.users(module, workspace):
            dep_ws = workspace_name(tenant, user.instance)
            try:
                inputs = self.backend.inputs.load(user.module, dep_ws)
            except TFServerError:
                found.append(user)  # cannot tell: kept as a user
                continue
            if any(v == user.variable and _names(r, module, workspace, tenant)
                   for v, r in kept_references(inputs)):
                found.append(user)
            else:
                if applying is None:
                    applying = self.references.applying(tenant)
                if (user.module, dep_ws) in applying or \
                        self.index.fresh(module, workspace, user, time.time()):
                    found.append(user)
                else:
                    self.index.drop(module, workspace, user)
            if at_most is not None and len(found) >= at_most:
                break
        return found

    def check_unused(self, module: str, workspace: str, instance: str) -> None:
        """409 naming the users of an instance that others reference (admins too)."""
        users = self.users(module, workspace, at_most=NAMED_USERS + 1)
        if not users:
            return
        named = [f"{u.module}/{u.instance} ({u.variable})" for u in users[:NAMED_USERS]]
        more = " and more" if len(users) > NAMED_USERS else ""
        error = Conflict(f"instance {instance!r} of module {module} is used by "
                         f"{', '.join(named)}{more}: destroy those first, or apply them "
                         "without the reference", retry_after=0)
        error.extra["used_by"] = [{"module": u.module, "instance": u.instance,
                                   "variable": u.variable} for u in users[:NAMED_USERS]]
        raise error

    def orphan(self, orphaner: Orphaner, principal: Principal, module: str, instance: str,
               *, tenant: str | None, address: str | None) -> Orphaned:
        """`Orphaner.orphan`, refused (409) while others reference the instance (an
        orphan would strand them as a destroy would); its own references leave the index."""
        orphaner.catalog.module(module)
        principal.require_admin()
        ws = target_workspace(principal, instance, tenant)
        self.check_unused(module, ws, instance)
        orphaned = orphaner.orphan(principal, module, instance, tenant=tenant, address=address)
        self.index.forget(module, ws)
        return orphaned

    def settled(self, run: Run, spec: RunSpec, outcome: Outcome, submit: Submit) -> None:
        """After a run succeeded: the index kept (an apply's references, a destroy's
        gone), and the cascade started when asked."""
        name, ws = spec.module.name, spec.workspace
        try:
            if isinstance(outcome, Destroyed):
                self.index.forget(name, ws)
                self.index.unmark_destroys(name, ws)  # a crash's too: nobody looks again
            elif isinstance(outcome, Applied):
                self.index.record(name, ws, list(spec.references or []))
        except TFServerError as e:  # repaired from the kept inputs (`users`, `repair`)
            logger.warning("reference index of %s/%s not kept: %s", name, spec.instance,
                           e.detail, extra={"run_id": spec.run_id})
        if isinstance(outcome, Applied) and spec.cascade:
            started, refused = self.cascade(spec, submit)
            if started:
                run.emit("cascade", runs=started)
            if refused:  # the dependents stay outdated: the caller must hear of it
                run.record.warnings = [*(run.record.warnings or []), *(
                    f"the cascade did not start the apply of {d}: {why}"
                    for d, why in refused)]
                run.emit("cascade_stopped", dependents=[d for d, _ in refused])

    def failed(self, run: Run, spec: RunSpec) -> None:
        """An apply failed: the index follows the kept inputs (an apply that failed
        part way keeps its new inputs); a run of a cascade stops the cascade below it,
        and says so."""
        if spec.operation != "apply":
            return
        try:
            self.index.reindex(spec.module.name, spec.workspace, self.backend.inputs)
            self._unclaim(spec)
        except TFServerError as e:
            logger.warning("reference index of %s/%s not kept: %s", spec.module.name,
                           spec.instance, e.detail, extra={"run_id": spec.run_id})
        if not spec.cascade:
            return
        below = [f"{u.module}/{u.instance}" for u in
                 self.index.users(spec.module.name, spec.workspace)]
        if not below:
            return
        note = ("the cascade stopped here: its dependents " + ", ".join(sorted(set(below)))
                + " were not applied")
        run.record.warnings = [*(run.record.warnings or []), note]
        run.emit("cascade_stopped", dependents=sorted(set(below)))

    def _unclaim(self, spec: RunSpec) -> None:
        """Drop the entries a failed apply wrote as it started (`RefIndex.claim`) that
        its instance's kept inputs do not hold (it changed nothing, or never ran). An
        entry names the variable and the output, not the path into it: so does this."""
        tenant = workspace_tenant(spec.workspace)

        def entries(refs: Iterable[tuple[str, Any]]) -> dict[tuple[str, str, str], User]:
            found = {}
            for variable, text in refs:
                with contextlib.suppress(RefSyntaxError):
                    ref = parse_ref(text)
                    found[(ref.module, ref.instance, variable)] = User(
                        spec.module.name, spec.instance, variable, ref.output)
            return found

        kept = entries(kept_references(self.backend.inputs.load(spec.module.name,
                                                                spec.workspace)))
        for key, user in entries(references_of(spec.inputs)).items():
            if kept.get(key) != user:
                self.index.drop(key[0], workspace_name(tenant, key[1]), user)

    def cascade(self, spec: RunSpec, submit: Submit
                ) -> tuple[list[dict[str, str]], list[tuple[str, str]]]:
        """Start the apply of each dependent whose referenced value changed (async, its
        kept inputs, `triggered_by` this run); what started, and the dependents that
        could not be started (`module/instance`, why: busy, the queue full)."""
        name, ws = spec.module.name, spec.workspace
        tenant = workspace_tenant(ws)
        started, refused = [], []
        for dep_module, dep_instance in sorted({(u.module, u.instance)
                                                for u in self.users(name, ws)}):
            module = self.modules.get(dep_module)
            dep_ws = workspace_name(tenant, dep_instance)
            if module is None or not self._changed(dep_module, dep_ws, name, ws):
                continue
            try:
                inputs = self.backend.inputs.load(dep_module, dep_ws)
                if inputs is None:
                    continue
                cycle = self.references.cycle(dep_module, dep_ws, inputs)
                if cycle is not None:  # two applies that raced past each other's check
                    logger.warning("cascade to %s/%s not started: %s", dep_module,
                                   dep_instance, cycle, extra={"run_id": spec.run_id})
                    continue
                dep = RunSpec(module, dep_instance, dep_ws, "apply", inputs, spec.principal,
                              Scrubber(module.secret_values(inputs)), cascade=True,
                              triggered_by=spec.run_id)
                started.append({"module": dep_module, "instance": dep_instance,
                                "run_id": submit(dep)})
            except TFServerError as e:
                logger.warning("cascade to %s/%s not started: %s", dep_module, dep_instance,
                               e.detail, extra={"run_id": spec.run_id})
                refused.append((f"{dep_module}/{dep_instance}", spec.scrub(e.detail)))
        return started, refused

    def _changed(self, dep_module: str, dep_ws: str, module: str, ws: str) -> bool:
        """A dependent's references to (module, ws) resolve to other values now than at
        its last apply."""
        tenant = workspace_tenant(ws)
        try:
            state = self.backend.read_state(module, ws) or {}
        except TFServerError:
            return False
        outputs = state.get("outputs") or {}
        for use in self.index.uses(dep_module, dep_ws):
            try:
                ref = parse_ref(use.get("ref"))
            except RefSyntaxError:
                continue
            if (ref.module, workspace_name(tenant, ref.instance)) != (module, ws):
                continue
            try:
                now = follow((outputs.get(ref.output) or {}).get("value"), ref.path)
            except KeyError:
                return True
            if use.get("digest") != digest(now):
                return True
        return False


def destroy_starts(dependents: Dependents, spec: RunSpec) -> None:
    """A destroy starts: its marker first (a dependent's apply starting meanwhile waits
    for it: refindex.py), then the 409 of an instance in use (the marker goes again)."""
    name, ws = spec.module.name, spec.workspace
    dependents.index.mark_destroy(name, ws, spec.run_id, time.time())
    try:  # an approved destroy too: a dependent may have come while it awaited
        dependents.check_unused(name, ws, spec.instance)
    except TFServerError:
        destroy_ends(dependents, spec)
        raise


def destroy_ends(dependents: Dependents, spec: RunSpec) -> None:
    """A destroy ended, however: its marker goes (one left by a crash is outlived: its
    run is not active, `References.destroying`)."""
    try:
        dependents.index.unmark_destroy(spec.module.name, spec.workspace, spec.run_id)
    except TFServerError as e:
        logger.warning("destroy marker of %s/%s not removed: %s", spec.module.name,
                       spec.instance, e.detail, extra={"run_id": spec.run_id})


def before_run(dependents: Dependents, resolve: Callable[[RunSpec], None]
               ) -> Callable[[RunSpec], None]:
    """What the executor does before terraform: a destroy of an instance in use is
    refused (whoever started it: a caller, the reaper, a retry), then references are
    resolved."""
    def before(spec: RunSpec) -> None:
        if spec.operation == "destroy":
            destroy_starts(dependents, spec)
        resolve(spec)
    return before


def _names(text: Any, module: str, workspace: str, tenant: str) -> bool:
    """True when a `$ref` names (module, workspace) of the tenant."""
    try:
        ref = parse_ref(text)
    except RefSyntaxError:
        return False
    return ref.module == module and workspace_name(tenant, ref.instance) == workspace
