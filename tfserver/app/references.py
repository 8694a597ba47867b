"""References between instances: a variable whose value is `{"$ref": "/<module>/<instance>
#/outputs/<name>"}` (module/refs.py parses it) takes that instance's output.

Checked before anything runs (every field at once, in the 400 of input validation):
the instance exists and the caller may read it (else one message, whatever the reason:
no oracle across tenants, whose instances a name cannot reach anyway), the output
exists, its value fits the variable's type, a sensitive output goes only into a
sensitive variable, no cycle, no chain deeper than `MAX_CHAIN`. Resolved again when the
run starts, from the referenced state (no terraform), after any older run of the
referenced instance ends; the kept inputs keep the `$ref`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..auth import Principal
from ..errors import Conflict, FieldError, InvalidInput, NotFound, TFServerError
from ..module.discover import Module
from ..module.refs import Ref, RefSyntaxError, follow, is_reference, parse_ref
from ..names import workspace_name, workspace_tenant
from ..runs.registry import Runs
from ..scrub import Scrubber
from ..storage.base import StateBackend, holds_instance
from .execute import RunSpec
from .refindex import RefIndex, kept_references

logger = logging.getLogger(__name__)

#: The longest chain of references from one instance (deeper: 400). Each hop is one
#: read of kept inputs at submit; eight covers network → subnet → app many times over.
MAX_CHAIN = 8
#: How often a run waiting on an older run of an instance it references looks again.
_POLL = 0.05
#: How often a run waiting for a destroy of an instance it references looks again.
_DESTROY_POLL = 1.0


class _Bad(Exception):
    """One reference's fault, as its field error says it."""


@dataclass(frozen=True)
class Found:
    """A reference resolved: the value, the state serial it was read at, and whether
    the output is sensitive."""

    ref: Ref
    value: Any
    serial: Any
    sensitive: bool


def digest(value: Any) -> str:
    """A short fingerprint of a referenced value (the cascade compares them)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def references_of(inputs: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(variable, `$ref` value) of every reference among the inputs."""
    return [(n, v["$ref"]) for n, v in inputs.items() if is_reference(v)]


class References:
    """Checks and resolves the references of runs."""

    def __init__(self, modules: Mapping[str, Module], backend: StateBackend, runs: Runs, *,
                 wait: float) -> None:
        self.modules = modules
        self.backend = backend
        self.runs = runs
        #: At most how long a run's start waits for older runs of what it references.
        self.wait = wait
        self.index = RefIndex(backend.objects)

    # -- at submit ---------------------------------------------------------------------

    def validator(self, principal: Principal, instance: str
                  ) -> Callable[[Module, Any], dict[str, Any]]:
        """`validate` for this caller's instance, as a check of one module version
        (app/versions.py checks the version being applied with it)."""
        return lambda m, body: self.validate(m, principal, instance, body)

    def validate(self, m: Module, principal: Principal, instance: str, body: Any
                 ) -> dict[str, Any]:
        """`m.validate(body)` with each reference checked and its current value in place
        for the type check; the body (references kept) or `InvalidInput` listing every
        fault of every field."""
        if not isinstance(body, dict) or not any(is_reference(v) for v in body.values()):
            return m.validate(body)
        ws = workspace_name(principal.tenant_key, instance)
        errors: list[FieldError] = []
        skip: set[str] = set()
        checked = dict(body)
        for name, text in references_of(body):
            if name not in m.variables or name in m.reserved:
                continue  # m.validate names it (unknown, or the server's)
            try:  # the instance first: a chain is followed only from one the caller reads
                found = self._lookup(m, name, text, principal, ws, pending_ok=True)
                self._chain(m.name, ws, text)
            except _Bad as e:
                errors.append(FieldError(name, str(e)))
                skip.add(name)
                continue
            if found is None:
                skip.add(name)  # being created by a queued run: checked when this starts
            else:
                checked[name] = found.value
        try:
            m.validate({k: v for k, v in checked.items() if k not in skip})
        except InvalidInput as e:
            errors.extend(f for f in e.errors if _top(f.field) not in skip)
        if errors:
            unique = sorted(set(errors), key=lambda e: (e.field, e.message))
            raise InvalidInput(
                f"{len(unique)} problem(s) with the variables of module {m.name!r}", unique)
        return body

    # -- at the run's start ------------------------------------------------------------

    def resolve(self, spec: RunSpec) -> None:
        """Give the run the referenced values (`spec.values`), its scrubber and the
        record's `references`; `InvalidInput` when one no longer resolves. A saved plan's
        apply has its values in the plan: they are resolved again for the record and the
        index only."""
        refs = references_of(spec.inputs)
        if not refs:
            return
        m, ws = spec.module, spec.workspace
        if spec.operation == "apply":  # before the states are read: see `claim`
            try:
                self.index.claim(m.name, ws, refs, run_id=spec.run_id, at=time.time())
            except TFServerError as e:  # the index is repaired from the kept inputs
                logger.warning("reference index of %s/%s not claimed: %s", m.name,
                               spec.instance, e.detail, extra={"run_id": spec.run_id})
        self._wait_for(spec, refs)
        errors: list[FieldError] = []
        values = dict(spec.inputs)
        resolved = []
        for name, text in refs:
            try:
                found = self._lookup(m, name, text, spec.principal, ws, pending_ok=False)
            except _Bad as e:
                errors.append(FieldError(name, str(e)))
                continue
            assert found is not None
            values[name] = found.value
            resolved.append({"variable": name, "ref": text, "serial": found.serial,
                             "digest": digest(found.value)})
        names = {n for n, _ in refs}
        try:
            m.validate({n: values[n] for n in names if n in values})
        except InvalidInput as e:
            errors.extend(f for f in e.errors
                          if _top(f.field) in names and f.message != "required variable "
                          "is missing")
        if errors:
            raise InvalidInput(f"{len(errors)} reference(s) of module {m.name!r} no longer "
                               "resolve", sorted(set(errors), key=lambda e: e.field))
        spec.values = values
        spec.references = resolved
        spec.scrub = Scrubber(m.secret_values(values))

    def _wait_for(self, spec: RunSpec, refs: list[tuple[str, Any]]) -> None:
        """Wait (at most `wait` seconds) until no run of a referenced instance made
        before this one is queued or running: a reference to an instance whose apply is
        queued resolves to what that apply made. Only older runs count, so two runs that
        reference each other's instance never wait for each other. A destroy of one
        under way counts whatever its age; still under way when the wait ends, it is a
        `Conflict` (409): the run would reference what the destroy takes away."""
        tenant = workspace_tenant(spec.workspace)
        sources = set()
        for _, text in refs:
            try:
                ref = parse_ref(text)
            except RefSyntaxError:
                continue
            sources.add((ref.module, workspace_name(tenant, ref.instance)))
        modules = {s[0] for s in sources}
        deadline = time.monotonic() + self.wait
        looked, destroying = float("-inf"), False
        while time.monotonic() < deadline:
            older = [run_id for t, module, run_id in self.runs.store.active()
                     if t == tenant and module in modules and run_id > spec.run_id]
            if time.monotonic() - looked >= _DESTROY_POLL:
                # A LIST a source: looked at less often than the runs while one goes on.
                destroying = any(self.destroying(*source) for source in sources)
                looked = time.monotonic()
            if not destroying and not any(r.active and (r.module, r.workspace) in sources
                                          for r in self.runs.records(older)):
                return
            time.sleep(_POLL)
        gone = sorted(f"{m}/{ws.partition('.')[2]}" for m, ws in sources
                      if self.destroying(m, ws))
        if gone:  # applied now, it would reference what the destroy takes away
            raise Conflict(f"{', '.join(gone)} referenced by this run is being destroyed; "
                           "the run did not start", retry_after=10)

    def destroying(self, module: str, workspace: str) -> bool:
        """A destroy of the instance is under way, of any age (`RefIndex.under_way`): it
        may have looked for users before this dependent claimed its entries."""
        return self.index.under_way(module, workspace, self._active)

    def _active(self, run_id: str) -> bool | None:
        """Whether the run is queued or running (None: no record of it is found)."""
        try:
            return self.runs.record(run_id).active
        except NotFound:
            return None

    # -- one reference -----------------------------------------------------------------

    def _lookup(self, m: Module, variable: str, text: Any, principal: Principal, ws: str,
                *, pending_ok: bool) -> Found | None:
        """The reference resolved from the state; None when the instance is not there
        yet but a run of it is queued or running (`pending_ok`); `_Bad` saying what is
        wrong."""
        try:
            ref = parse_ref(text)
        except RefSyntaxError as e:
            raise _Bad(str(e)) from None
        source = self.modules.get(ref.module)
        unknown = _Bad(f"references {ref.source}: no such instance (of yours)")
        if source is None or not principal.can(ref.module, "read"):
            raise unknown
        src_ws = workspace_name(workspace_tenant(ws), ref.instance)
        if (ref.module, src_ws) == (m.name, ws):
            raise _Bad(f"a cycle: {m.name}/{ref.instance} -> {m.name}/{ref.instance}")
        try:
            state = self.backend.read_state(ref.module, src_ws)
        except TFServerError as e:
            raise _Bad(f"references {ref.source}: its state cannot be read now "
                       f"({e.detail})") from None
        if not holds_instance(state):
            if pending_ok and self._pending(ref.module, src_ws):
                return None
            raise unknown
        assert state is not None
        output = (state.get("outputs") or {}).get(ref.output)
        if not isinstance(output, dict) or "value" not in output:
            raise _Bad(f"references {ref.source}: it has no output {ref.output!r}")
        try:
            value = follow(output["value"], ref.path)
        except KeyError as e:
            raise _Bad(f"references {ref.source}: output {ref.output!r} has nothing at "
                       f"{_shown_token(str(e.args[0]))!r}") from None
        declared = source.outputs.get(ref.output)
        sensitive = bool(output.get("sensitive")) or bool(declared and declared.sensitive)
        if sensitive and variable not in m.sensitive_variables:
            raise _Bad(f"references the sensitive output {ref.output!r} of {ref.source}: "
                       "only a sensitive variable may take it")
        return Found(ref, value, state.get("serial"), sensitive)

    def applying(self, tenant: str) -> set[tuple[str, str]]:
        """(module, workspace) of each instance of the tenant an apply is queued or
        running on (on any replica)."""
        ids = [r for t, _, r in self.runs.store.active() if t == tenant]
        return {(r.module, r.workspace) for r in self.runs.records(ids)
                if r.active and r.operation == "apply"}

    def _pending(self, module: str, ws: str) -> bool:
        """A run of the instance is queued or running (on any replica)."""
        tenant = workspace_tenant(ws)
        ids = [r for t, mod, r in self.runs.store.active() if t == tenant and mod == module]
        return any(r.active and r.workspace == ws for r in self.runs.records(ids))

    def cycle(self, module: str, ws: str, inputs: Mapping[str, Any]) -> str | None:
        """What is wrong with the chains of references of an instance's inputs (a cycle,
        or one too long), or None: what a cascade checks before it applies it, since two
        applies submitted at once may each pass the other's check."""
        try:
            for _, text in references_of(inputs):
                self._chain(module, ws, text)
        except _Bad as e:
            return str(e)
        return None

    def _chain(self, module: str, ws: str, text: Any) -> None:
        """`_Bad` when the reference closes a cycle back to (module, ws) (named) or
        makes a chain longer than `MAX_CHAIN`; read from the kept inputs of each
        instance on the way."""
        try:
            ref = parse_ref(text)
        except RefSyntaxError:
            return  # `_lookup` says why
        tenant = workspace_tenant(ws)
        start = (module, ws)
        heights: dict[tuple[str, str], int] = {}

        def height(node: tuple[str, str], path: list[str]) -> int:
            if node in heights:
                return heights[node]
            if len(path) > MAX_CHAIN + 1:  # the path names the instances: hops + 1
                raise _Bad(f"a chain of references longer than {MAX_CHAIN}: "
                           + " -> ".join(path[:MAX_CHAIN + 2]) + " -> ...")
            try:
                inputs = self.backend.inputs.load(*node)
            except TFServerError:
                inputs = None  # damaged: no references read from it
            best = 0
            for _, child_text in kept_references(inputs):
                child = parse_ref(child_text)
                nxt = (child.module, workspace_name(tenant, child.instance))
                name = child.source
                if nxt == start or name in path:
                    raise _Bad("a cycle: " + " -> ".join([*path, name]))
                best = max(best, 1 + height(nxt, [*path, name]))
            heights[node] = best
            return best

        first = (ref.module, workspace_name(tenant, ref.instance))
        if first != start:
            height(first, [f"{module}/{ws.partition('.')[2]}", ref.source])


def _top(field: str) -> str:
    """The variable a field error's path starts with."""
    return re.split(r"[.\[]", field, maxsplit=1)[0]


def _shown_token(token: str) -> str:
    """A pointer token as a message shows it (a huge one cut short)."""
    return token if len(token) <= 64 else token[:61] + "..."
