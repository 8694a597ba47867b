"""The API as an OpenAPI 3.1 document, made from the route table and the served modules
(pure functions).

The paths, their methods, operation ids and security are the route table's
(`routes.ROUTES`); this module says what each operation takes and answers. Each module
brings the routes of `/{module}...`: apply, plan (`?dry_run=true`), destroy, read, unlock
and its runs, with the module's variables as the request body's JSON Schema (draft
2020-12, which OpenAPI 3.1 speaks) taken from `Module.schema` as it is served, so a policy
that narrows a schema narrows the document too. `ApiDescription` keeps the part of each
module once made (keyed by the module object, which a policy replaces rather than
changes), so a document for one caller is a filter over prepared parts: only the modules
it may read. The schemas themselves are `schemas.py`'s.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from ..auth import Principal
from ..module.discover import Module
from ..runs.store import ACTIVE, AWAITING, ENDED
from . import upgradedoc
from .approvaldoc import APPROVE_SCOPE, approval_operations, approval_schema
from .document import ModulePart, assemble
from .driftdoc import RECONCILE, drift_schemas
from .refschema import CASCADE
from .routes import ROUTES, Access, Route
from .schemas import (
    APPLIED_PREF,
    APPLY_FAILURES,
    BEFORE,
    DRY_RUN,
    IDEMPOTENCY,
    INSTANCE,
    LIMIT,
    LOCATION,
    NAME,
    NDJSON,
    ORPHAN,
    PREFER,
    RUN,
    RUN_FAILURES,
    SSE,
    TENANT,
    DocSettings,
    accepted,
    answers,
    common_schemas,
    content,
    module_schemas,
    obj,
    ok_answer,
    param,
    ref,
    scope_names,
    security,
)

__all__ = ["ApiDescription", "DocSettings", "ModulePart", "assemble", "base_document",
           "module_part", "operation_idents"]

#: Documents kept at most (one per set of modules a caller may read).
MAX_DOCUMENTS = 64


class ApiDescription:
    """The document for a caller: prepared parts, filtered by what the caller may read.

    The part of a module is made on first use and kept as long as the same `Module`
    object is served; the shared part is made once. Both are read-only once made, so a
    document shares them (it is serialised, never changed).
    """

    def __init__(self, settings: DocSettings) -> None:
        self.settings = settings
        self._base = base_document(settings)
        self._parts: dict[str, tuple[Module, str, ModulePart]] = {}
        self._mutex = threading.Lock()
        # Documents by (every module's name, the names shown), with the modules shown.
        self._documents: dict[tuple[tuple[str, ...], tuple[str, ...]],
                              tuple[tuple[Module, ...], dict[str, Any]]] = {}
        #: Documents assembled so far (the others were served from `_documents`).
        self.builds = 0

    def document(self, modules: Mapping[str, Module],
                 principal: Principal | None) -> dict[str, Any]:
        """The document showing the modules `principal` may read (None: none).

        It depends on nothing else of the caller (an admin reads every module): one is
        made per set of modules shown, and shared as long as those `Module` objects are
        served (it is serialised, never changed). Operation ids depend on every module's
        name, so those are part of the key too.
        """
        shown = tuple(name for name in sorted(modules)
                      if principal is not None and principal.can(name, "read"))
        key = (tuple(sorted(modules)), shown)
        objects = tuple(modules[name] for name in shown)
        with self._mutex:
            kept = self._documents.get(key)
        if kept is not None and all(a is b for a, b in zip(kept[0], objects, strict=True)):
            return kept[1]
        idents = operation_idents(modules)
        doc = assemble(self._base, [self._part(modules[n], idents[n]) for n in shown],
                       self.settings)
        with self._mutex:
            self.builds += 1
            if len(self._documents) >= MAX_DOCUMENTS:
                self._documents.clear()  # a bound, not a policy: made again on demand
            self._documents[key] = (objects, doc)
        return doc

    def _part(self, module: Module, ident: str) -> ModulePart:
        with self._mutex:
            kept = self._parts.get(module.name)
            if kept is not None and kept[0] is module and kept[1] == ident:
                return kept[2]
        part = module_part(module, ident, self.settings)
        with self._mutex:
            self._parts[module.name] = (module, ident, part)
        return part


# -- names --------------------------------------------------------------------------------


def operation_idents(modules: Iterable[str]) -> dict[str, str]:
    """Each module's name as it appears in operation ids and schema names: `-` becomes
    `_` (generators make method names of them), and names that would then clash keep a
    short digest of their own, so every id stays unique and the same for a module set."""
    names = sorted(modules)
    plain = {n: n.replace("-", "_") for n in names}
    counts: dict[str, int] = {}
    for ident in plain.values():
        counts[ident] = counts.get(ident, 0) + 1
    return {n: ident if counts[ident] == 1
            else f"{ident}_{hashlib.sha256(n.encode()).hexdigest()[:6]}"
            for n, ident in plain.items()}


# -- paths, from the route table ---------------------------------------------------------

#: The OpenAPI parameter of each path parameter of the table (`{module}` is filled in).
_PATH_PARAMETERS = {"instance": INSTANCE, "id": RUN}


def _doc_path(route: Route, module: str) -> str:
    """The route's path as the document names it: the module's name filled in, each
    parameter under its documented name."""
    segments = []
    for segment in route.label.split("/")[1:]:
        name = segment.strip("{}")
        if segment.startswith("{") and name == "module":
            segments.append(module)
        elif segment.startswith("{"):
            segments.append("{" + _PATH_PARAMETERS[name]["name"] + "}")
        else:
            segments.append(segment)
    return "/" + "/".join(segments)


def _access(settings: DocSettings, access: Access, module: str) -> dict[str, Any]:
    """The `security` of an operation that needs `access`."""
    read, write, admin = scope_names(settings.scope_prefix, module)
    if access is Access.PUBLIC:
        return {"security": []} if settings.auth else {}
    if access is Access.OPTIONAL:
        return {"security": [{}, {"oauth2": []}, {"bearer": []}]} if settings.auth else {}
    approve = f"{settings.scope_prefix}/{module}.approve"  # approvers read (app/approvals.py)
    scopes = {Access.TOKEN: (), Access.READ: (read, write, approve, admin),
              Access.WRITE: (write, admin), Access.ADMIN: (admin,)}[access]
    return security(settings, *scopes)


def paths_of(routes: Iterable[Route], operations: Mapping[str, dict[str, Any]],
             settings: DocSettings, module: str = "", ident: str = "") -> dict[str, Any]:
    """The document's paths of some routes: each route's operation id and security, and
    what `operations` (by operation id as the table writes it) says of it."""
    paths: dict[str, Any] = {}
    for route in routes:
        item = paths.setdefault(_doc_path(route, module), {})
        shared = [_PATH_PARAMETERS[p] for p in route.parameters if p in _PATH_PARAMETERS]
        if shared:
            item["parameters"] = shared
        item[route.method.lower()] = {
            "operationId": route.operation_id.format(module=ident),
            **operations[route.operation_id], **_access(settings, route.access, module)}
    return paths


# -- one module ------------------------------------------------------------------------------


def module_part(module: Module, ident: str, settings: DocSettings) -> ModulePart:
    """The paths and schemas of one module (pure)."""
    name = module.name
    read, write, _ = scope_names(settings.scope_prefix, name)
    # A module without versions has no upgrades (its route answers 400).
    routes = (r for r in ROUTES if r.per_module and (module.versions or r.operation_id
                                                       != "upgrade_{module}"))
    paths = paths_of(routes, module_operations(module, ident, settings), settings, name, ident)
    scopes = {read: f"Read module {name}: its schema, instances and runs",
              write: f"Apply and destroy instances of module {name} (and read them)",
              f"{settings.scope_prefix}/{name}.approve": APPROVE_SCOPE.format(name=name)}
    tag_doc: dict[str, Any] = {"name": name}
    if module.description:
        tag_doc["description"] = module.description
    return ModulePart(name, paths, module_schemas(module, ident), scopes, tag_doc)


def module_operations(module: Module, ident: str,
                      settings: DocSettings) -> dict[str, dict[str, Any]]:
    """What each operation of a module's routes takes and answers, by the operation id
    the route table writes (a document builder: one literal)."""
    name = module.name
    applied, instance_view = f"{ident}_applied", f"{ident}_instance"
    body = {"required": True, "content": content(ref(f"{ident}_variables")),
            "description": f"The variables of module {name}."}
    outcome = {"oneOf": [ref(applied), ref("Planned")]}
    gone = {"oneOf": [ref("Destroyed"), ref("Planned"), ref("Orphaned")]}
    run_params = [PREFER, IDEMPOTENCY]
    versions = upgradedoc.version_parameters(module)
    forbidden = (403,) if settings.auth else ()

    def op(summary: str, **fields: Any) -> dict[str, Any]:
        return {"summary": summary, "tags": [name], **fields}

    return {
        "describe_{module}": op(
            f"Module {name}: variables, outputs, instances",
            parameters=versions,
            responses=answers(settings, {"200": ok_answer("The module.", ref(
                f"{ident}_module"))}, *forbidden)),
        "apply_{module}": op(
            f"Apply (or plan) the default instance of {name}",
            parameters=[DRY_RUN, CASCADE, *run_params, *versions], requestBody=body,
            responses=answers(settings, {
                "200": ok_answer("The outputs of the apply, or the plan.", outcome,
                                 APPLIED_PREF),
                "202": accepted()}, *forbidden, *APPLY_FAILURES)),
        "destroy_{module}": op(
            f"Destroy (or plan to) the default instance of {name}",
            parameters=[DRY_RUN, ORPHAN, TENANT, *run_params],
            responses=answers(settings, {
                "200": ok_answer("Destroyed, the plan, or orphaned.", gone, APPLIED_PREF),
                "202": accepted()}, 403, 404, *RUN_FAILURES)),
        "get_{module}_instance": op(
            f"An instance of {name}: outputs and status",
            parameters=[TENANT], responses=answers(settings, {
                "200": ok_answer("The instance.", ref(instance_view))}, 400, 403, 404)),
        "apply_{module}_instance": op(
            f"Apply (or plan) a named instance of {name}",
            parameters=[DRY_RUN, CASCADE, *run_params, *versions], requestBody=body,
            responses=answers(settings, {
                "200": ok_answer("Updated (or planned).", outcome, APPLIED_PREF),
                "201": ok_answer("Created.", ref(applied), {**LOCATION, **APPLIED_PREF}),
                "202": accepted()}, *forbidden, *APPLY_FAILURES)),
        "destroy_{module}_instance": op(
            f"Destroy (or plan to) a named instance of {name}",
            parameters=[DRY_RUN, ORPHAN, TENANT, *run_params],
            responses=answers(settings, {
                "200": ok_answer("Destroyed, the plan, or orphaned.", gone, APPLIED_PREF),
                "202": accepted()}, 403, 404, *RUN_FAILURES)),
        "unlock_{module}_instance": op(
            "Admin: clear a state lock left by a killed run",
            parameters=[TENANT],
            requestBody={"required": True, "content": content(obj(
                {"lock_id": {"type": "string", "pattern": "\\S",
                             "description": "The id of the lock to clear."}},
                ("lock_id",)))},
            responses=answers(settings, {
                "200": ok_answer("The lock is cleared.", ref("Unlocked"))},
                400, 403, 404, 409, 411, 413, 415)),
        "list_{module}_instance_runs": op(
            "The instance's runs, newest first",
            parameters=[TENANT, LIMIT, BEFORE], responses=answers(settings, {
                "200": ok_answer("A page of runs.", ref("RunPage"))}, 400, 403)),
        "drift_{module}_instance": op(
            f"Check an instance of {name} for drift (a refresh-only plan)",
            parameters=[RECONCILE, TENANT, *run_params], responses=answers(settings, {
                "200": ok_answer("What the check found.", ref("Checked"), APPLIED_PREF),
                "202": accepted()}, 403, 404, *RUN_FAILURES)),
        **upgradedoc.module_upgrade_operations(module, settings),
    }


# -- the rest of the API, and the whole -------------------------------------------------------


def base_document(settings: DocSettings) -> dict[str, Any]:
    """The paths and schemas that do not depend on the modules (pure)."""
    paths = paths_of((r for r in ROUTES if not r.per_module), base_operations(settings),
                     settings)
    return {"paths": paths, "schemas": {**common_schemas(), **drift_schemas(),
                                        "Approval": approval_schema(),
                                        **upgradedoc.upgrade_schemas()}}


def base_operations(settings: DocSettings) -> dict[str, dict[str, Any]]:
    """What each operation of the routes outside modules takes and answers, by operation
    id (a document builder: one literal)."""
    server, runs = ["Server"], ["Runs"]
    record = ok_answer("The run's record.", ref("RunRecord"))
    events = {
        "description": "The run's events from the start (or after `after`/`Last-Event-ID`), "
                       "then live until it ends: NDJSON (one `Event` a line), or Server-Sent "
                       "Events with `Accept: text/event-stream` (`id:` is the event's `seq`).",
        "content": {NDJSON: {"schema": ref("Event")},
                    SSE: {"schema": {"type": "string"}}},
    }
    text = {"schema": {"type": "string"}}
    return {
        "list_modules": {
            "summary": "The modules the caller may read", "tags": server,
            "responses": answers(settings, {"200": ok_answer("The modules.", ref("Index"))})},
        "get_health": {
            "summary": "Liveness", "tags": server, "responses": answers(settings, {
                "200": ok_answer("The process serves.", ref("Health"))}, authenticated=False)},
        "get_readiness": {
            "summary": "Readiness: terraform, backend, modules", "tags": server,
            "responses": answers(settings, {"200": ok_answer("Ready.", ref("Readiness"))},
                                 authenticated=False)},
        "get_openapi": {
            "tags": server, "summary": "This document, showing the modules the caller may read",
            "responses": answers(settings, {"200": ok_answer("An OpenAPI 3.1 document.",
                                                             {"type": "object"})})},
        "get_docs": {
            "tags": server, "summary": "Swagger UI for this document",
            "responses": answers(settings, {"200": {
                "description": "The page.", "content": {"text/html": text}}},
                authenticated=False)},
        "get_metrics": {
            "tags": server, "summary": "Prometheus metrics (admin when auth is on)",
            "responses": answers(settings, {"200": {
                "description": "The Prometheus text format.", "content": {"text/plain": text}}},
                *((403,) if settings.auth else ()))},
        "list_runs": {
            "summary": "The caller's runs (admin: all), newest first", "tags": runs,
            "parameters": [
                param("module", "query", NAME, "Only this module's runs."),
                param("status", "query", {"enum": [*sorted(ACTIVE), AWAITING, *sorted(ENDED)]},
                      "Only runs of this status."),
                LIMIT, BEFORE],
            "responses": answers(settings, {"200": ok_answer("A page of runs.",
                                                             ref("RunPage"))}, 400, 403, 404)},
        "get_run": {"summary": "One run's record", "tags": runs,
                    "responses": answers(settings, {"200": record}, 404)},
        "get_run_events": {
            "summary": "The run's progress, replayed then live", "tags": runs,
            "parameters": [
                param("after", "query", {"type": "integer", "minimum": 0,
                                         "maximum": 999_999_999},
                      "Only events after this `seq`."),
                param("Last-Event-ID", "header", {"type": "string",
                                                  "pattern": "^[0-9]{1,9}$"},
                      "Server-Sent Events: resume after this `seq`.")],
            "responses": answers(settings, {"200": events, "204": {
                "description": "Server-Sent Events resumed after the last event of a run "
                               "that ended: nothing more will come."}}, 400, 404)},
        "cancel_run": {
            "summary": "Cancel a run", "tags": runs,
            "parameters": [param("force", "query", {"type": "boolean", "default": False},
                                 "Kill terraform's process group at once (the state may "
                                 "stay locked).")],
            "responses": answers(settings, {"202": ok_answer(
                "Canceled, or being canceled: the record.", ref("RunRecord"))},
                400, 403, 404, 409, 411, 413)},
        "apply_plan": {
            "summary": "Apply exactly the plan a dry run saved",
            "tags": runs, "parameters": [PREFER, IDEMPOTENCY],
            "responses": answers(settings, {
                "200": ok_answer("The outcome.", {"oneOf": [ref("Applied"),
                                                            ref("Destroyed")]},
                                 APPLIED_PREF),
                "201": ok_answer("A new instance.", ref("Applied"), {**LOCATION,
                                                                      **APPLIED_PREF}),
                "202": accepted()}, 403, 404, *RUN_FAILURES)},
        "retry_run": {
            "summary": "Run a failed, canceled, lost or expired run again, as a new run",
            "tags": runs, "parameters": [PREFER, IDEMPOTENCY],
            "responses": answers(settings, {
                "200": ok_answer("The outcome.", {"oneOf": [ref("Applied"), ref("Destroyed"),
                                                            ref("Planned")]}, APPLIED_PREF),
                "201": ok_answer("A new instance.", ref("Applied"), {**LOCATION,
                                                                      **APPLIED_PREF}),
                "202": accepted()}, 403, 404, *RUN_FAILURES)},
        **approval_operations(settings),
        **upgradedoc.upgrade_operations(settings),
    }
