"""The API as an OpenAPI 3.1 document, made from the served modules (pure functions).

Each module brings its own paths: apply, plan (`?dry_run=true`), destroy, read, unlock and
its runs, with the module's variables as the request body's JSON Schema (draft 2020-12,
which OpenAPI 3.1 speaks) taken from `Module.schema` as it is served, so a policy that
narrows a schema narrows the document too. `ApiDescription` keeps the part of each module
once made (keyed by the module object, which a policy replaces rather than changes), so a
document for one caller is a filter over prepared parts: only the modules it may read.

What the server refuses before any schema applies is stated in the schemas too, so a
client (or a fuzzer) that keeps to the document never gets a 400: numbers within the
limits of `jsonbody`, names and keys as `names` checks them.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .. import __version__
from ..auth import Principal
from ..config import Config
from ..module.discover import Module
from ..names import NAME_RE, TENANT_KEY_RE
from ..runs.store import ACTIVE, ENDED
from .jsonbody import MAX_DIGITS, MAX_EXPONENT

OPENAPI_VERSION = "3.1.0"

JSON = "application/json"
PROBLEM = "application/problem+json"
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"

_RUN_ID = "^[0-9a-f]{32}$"
_IDEMPOTENCY_KEY = "^[!-~]{1,255}$"
_SCHEMAS = "#/components/schemas/"


@dataclass(frozen=True)
class DocSettings:
    """What the document says besides the modules: auth and where tokens come from."""

    auth: bool = False
    scope_prefix: str = "tfserver"
    token_url: str = ""
    version: str = __version__

    @classmethod
    def from_config(cls, config: Config) -> DocSettings:
        """The settings of a server's configuration."""
        s = config.auth_settings
        return cls(auth=config.auth == "jwt", scope_prefix=s.scope_prefix,
                   token_url=s.token_url)


@dataclass(frozen=True)
class ModulePart:
    """One module's share of the document: its paths, schemas, scopes and tag."""

    name: str
    paths: dict[str, Any]
    schemas: dict[str, Any]
    scopes: dict[str, str]
    tag: dict[str, Any]


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


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _SCHEMAS + name}


def _content(schema: dict[str, Any], media_type: str = JSON) -> dict[str, Any]:
    return {media_type: {"schema": schema}}


# -- what request bodies may hold -----------------------------------------------------------

#: Numbers `jsonbody` accepts, as JSON Schema keywords: zero, or from 1e-300 to 1e100 in
#: size. The server takes up to 1e300 but no more than 100 significant digits, and a
#: schema cannot count digits: an integer below 1e100 never has more, and a whole number
#: (every float from 2**53 up is one) cannot be told from an integer written out in full.
#: So a little stricter than the server, never looser.
NUMBER_LIMITS: dict[str, Any] = {
    "minimum": -float(f"1e{MAX_DIGITS}"),
    "maximum": float(f"1e{MAX_DIGITS}"),
    "not": {"type": "number", "exclusiveMinimum": -float(f"1e-{MAX_EXPONENT}"),
            "exclusiveMaximum": float(f"1e-{MAX_EXPONENT}"), "not": {"const": 0}},
}

#: Terraform's `any`: every JSON value, with the numbers anywhere in it within the limits.
ANY_VALUE: dict[str, Any] = {
    "description": "Any JSON value (Terraform's `any`); its numbers within the same limits "
                   "as every number of a request.",
    **NUMBER_LIMITS,
    "items": _ref("AnyValue"),
    "additionalProperties": _ref("AnyValue"),
}

_SUBSCHEMA_KEYS = ("items", "additionalProperties")
_SUBSCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf")
_SCHEMA_VALUES = ("default", "const", "enum", "examples")
#: Keywords about a value as a whole, kept outside `anyOf` when a schema is split.
_OUTER = ("description", "title", "writeOnly", "readOnly", "deprecated")
_STRUCTURE = frozenset({"type", "$ref", "anyOf", "oneOf", "allOf", "const", "enum", "not"})


def request_schema(schema: Any) -> Any:
    """A module's variables schema as the document shows it: a new tree (the module's is
    never changed) with the number limits wherever a number may be, `any` as `AnyValue`,
    and tuples without the `items: false` that `maxItems` already says."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$schema":
            continue  # the document's dialect (2020-12 based) applies
        if key in _SCHEMA_VALUES:
            out[key] = value
        elif key == "properties" and isinstance(value, dict):
            out[key] = {n: request_schema(s) for n, s in value.items()}
        elif key in _SUBSCHEMA_KEYS:
            out[key] = request_schema(value)
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            out[key] = [request_schema(s) for s in value]
        else:
            out[key] = value
    if out.get("items") is False and isinstance(out.get("prefixItems"), list) \
            and out.get("maxItems") == len(out["prefixItems"]):
        del out["items"]
    if _is_nullable_object(out) and isinstance(out.get("default"), dict):
        # The same schema, its default moved into the object branch: generators
        # (openapi-python-client) cannot give a nullable object a default of its own.
        outer = {k: out.pop(k) for k in _OUTER if k in out}
        out = {**outer, "anyOf": [{**out, "type": "object"}, {"type": "null"}]}
    elif not _STRUCTURE & out.keys():
        out["$ref"] = _SCHEMAS + "AnyValue"
    elif _admits_numbers(out.get("type")):
        for key, value in NUMBER_LIMITS.items():
            if key == "not" and "not" in out:
                out["allOf"] = [*out.get("allOf", []), {"not": value}]
            else:
                out.setdefault(key, value)
    return out


def _is_nullable_object(schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    return isinstance(kind, list) and sorted(kind) == ["null", "object"]


def _admits_numbers(kind: Any) -> bool:
    kinds = kind if isinstance(kind, list) else [kind]
    return "number" in kinds or "integer" in kinds


# -- schemas every document has ---------------------------------------------------------------


def _obj(properties: dict[str, Any], required: Iterable[str] = (),
         description: str = "") -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties,
                              "required": sorted(required)}
    if description:
        schema["description"] = description
    return schema


_STRING = {"type": "string"}
_NAME = {"type": "string", "pattern": NAME_RE.pattern}
_TIME = {"type": ["string", "null"], "format": "date-time"}


def common_schemas() -> dict[str, Any]:
    """The schemas of answers that are the same for every module."""
    changes = _obj({k: {"type": "integer", "minimum": 0} for k in ("add", "change", "remove")},
                   ("add", "change", "remove"), "Resources added, changed and removed.")
    planned_change = _obj({"address": _STRING, "action": _STRING}, ("address", "action"))
    problem = _obj({
        "type": {**_STRING, "description": "A URI naming the kind of problem."},
        "title": _STRING,
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": _STRING,
        "errors": {"type": "array", "items": _ref("FieldError"),
                   "description": "Every fault of the input at once (400), or the variables "
                                  "terraform named (422)."},
        "diagnostics": {"type": "array", "items": _obj(
            {"summary": _STRING, "detail": _STRING, "address": _STRING}, ("summary",))},
        "lock": {"type": "object", "additionalProperties": _STRING,
                 "description": "Who holds the state lock (409)."},
    }, ("type", "title", "status", "detail"),
        "An RFC 9457 problem document; never a traceback, raw stderr or a secret.")
    record = _obj({
        "id": {"type": "string", "pattern": _RUN_ID},
        "module": _STRING,
        "instance": _STRING,
        "operation": {"enum": ["apply", "destroy", "plan", "plan-destroy"]},
        "status": {"enum": sorted(ACTIVE) + sorted(ENDED)},
        "queue_position": {"type": ["integer", "null"], "minimum": 0},
        "created_at": _TIME,
        "started_at": _TIME,
        "finished_at": _TIME,
        "who": _obj({"subject": _STRING, "tenant": _STRING}, ("subject", "tenant")),
        "changes": {"anyOf": [_ref("Changes"), {"type": "null"}]},
        "outputs": {"type": ["object", "null"],
                    "description": "A succeeded apply's outputs, sensitive ones redacted "
                                   "unless the caller has the admin scope."},
        "planned": {"type": ["array", "null"], "items": _ref("PlannedChange")},
        "problem": {"anyOf": [_ref("Problem"), {"type": "null"}],
                    "description": "A failed run: what its synchronous call answered."},
        "links": _obj({"self": _STRING, "events": _STRING, "instance": _STRING,
                       "apply": {**_STRING, "description": "A plan that can still be applied."}},
                      ("self", "events", "instance")),
        "plan": _obj({"expires_at": _TIME, "applied_by": {"type": ["string", "null"]}},
                     ("expires_at",)),
        "plan_of": {**_STRING, "description": "The plan this run applies."},
        "idempotency_key": _STRING,
        "cancel": {"enum": ["requested", "forced"]},
        "state_may_be_locked": {"type": "boolean"},
    }, ("id", "module", "instance", "operation", "status", "queue_position", "created_at",
        "started_at", "finished_at", "who", "changes", "outputs", "planned", "problem",
        "links"), "A run: every apply, destroy and plan is one.")
    event = _obj({
        "seq": {"type": "integer", "minimum": 1},
        "time": {"type": "string", "format": "date-time"},
        "type": {"enum": ["queued", "started", "planned", "resource", "diagnostic",
                          "outputs", "finished"]},
        "changes": {"anyOf": [_ref("Changes"), {"type": "null"}]},
        "address": _STRING,
        "action": _STRING,
        "phase": {"enum": ["start", "progress", "done", "errored"]},
        "elapsed_s": {"type": "number"},
        "severity": _STRING,
        "summary": _STRING,
        "detail": _STRING,
        "outputs": {"type": "object"},
        "status": {"enum": sorted(ENDED)},
        "problem": {"anyOf": [_ref("Problem"), {"type": "null"}]},
    }, ("seq", "time", "type"),
        "One event of a run; the stream ends after `finished`. Every value of a sensitive "
        "variable is scrubbed.")
    base = {"module": _STRING, "instance": _STRING, "changes": _ref("Changes"),
            "run_id": {"type": "string", "pattern": _RUN_ID}}
    return {
        "AnyValue": ANY_VALUE,
        "Changes": changes,
        "PlannedChange": planned_change,
        "FieldError": _obj({"field": _STRING, "message": _STRING}, ("field", "message")),
        "Problem": problem,
        "Applied": _obj({**base, "outputs": {"type": "object"}},
                        ("module", "instance", "outputs", "changes", "run_id"),
                        "An apply that succeeded."),
        "Planned": _obj({**base, "dry_run": {"const": True},
                         "planned": {"type": "array", "items": _ref("PlannedChange")}},
                        ("module", "instance", "dry_run", "changes", "planned", "run_id"),
                        "A plan (`?dry_run=true`): what the run would change. It can be "
                        "applied as it is with `POST /runs/{run_id}/apply`."),
        "Destroyed": _obj({**base, "destroyed": {"const": True}},
                          ("module", "instance", "destroyed", "changes", "run_id"),
                          "A destroy that succeeded: the instance is gone."),
        "Unlocked": _obj({"module": _STRING, "instance": _STRING, "unlocked": _STRING},
                         ("module", "instance", "unlocked")),
        "RunRecord": record,
        "RunPage": _obj({"runs": {"type": "array", "items": _ref("RunRecord")},
                         "next": {"type": ["string", "null"],
                                  "description": "The next page's href, or null."}},
                        ("runs", "next")),
        "Event": event,
        "Index": _obj({"modules": {"type": "array", "items": _obj(
            {"name": _NAME, "href": _STRING, "description": _STRING},
            ("name", "href", "description"))}}, ("modules",)),
        "Health": _obj({"status": {"const": "ok"}}, ("status",)),
        "Readiness": _obj({"status": {"const": "ready"}, "terraform": _STRING,
                           "backend": _STRING,
                           "modules": {"type": "object", "additionalProperties": _STRING}},
                          ("status", "terraform", "backend", "modules")),
    }


# -- parameters and answers -------------------------------------------------------------------


def _param(name: str, where: str, schema: dict[str, Any], description: str, *,
           required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required or where == "path",
            "description": description, "schema": schema}


_INSTANCE = _param("instance", "path", _NAME, "The instance's name.")
_RUN = _param("run_id", "path", {"type": "string", "pattern": _RUN_ID}, "The run's id.")
_DRY_RUN = _param("dry_run", "query", {"type": "boolean", "default": False},
                  "Plan without changing anything; the answer lists the planned changes.")
_TENANT = _param("tenant", "query", {"type": "string", "pattern": TENANT_KEY_RE.pattern},
                 "Admin: another tenant's key, as listings show it.")
_LIMIT = _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 100,
                                   "default": 20}, "Runs per page.")
_BEFORE = _param("before", "query", {"type": "string", "pattern": _RUN_ID},
                 "Continue after this run id (the `next` href carries it).")
_PREFER = _param("Prefer", "header", {"type": "string", "examples": ["respond-async",
                                                                     "wait=10"]},
                 "RFC 7240: `respond-async` answers 202 at once with the run's record; "
                 "`wait=N` waits up to N seconds (at most 90), then 202.")
_IDEMPOTENCY = _param("Idempotency-Key", "header",
                      {"type": "string", "pattern": _IDEMPOTENCY_KEY},
                      "The same key with the same request gives the same run, never a "
                      "second terraform run; with another request it is 422.")

_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again.",
                                "schema": {"type": "integer", "minimum": 0}}}
_LOCATION = {"Location": {"description": "Where the new resource is.", "required": True,
                          "schema": {"type": "string"}}}
_APPLIED_PREF = {"Preference-Applied": {"description": "The preferences honoured.",
                                        "schema": {"type": "string"}}}

_PROBLEMS: dict[int, tuple[str, dict[str, Any]]] = {
    400: ("The request is malformed: every field error listed in `errors`.", {}),
    401: ("No token, or a token that fails verification.",
          {"WWW-Authenticate": {"schema": {"type": "string"}, "required": True}}),
    403: ("The token lacks the scope, or a quota of the policy is reached.",
          {"WWW-Authenticate": {"schema": {"type": "string"}}}),
    404: ("No such module, instance or run (or another tenant's).", {}),
    409: ("The instance is busy, its queue is full, the plan is stale or used, or the run "
          "already ended.", _RETRY_AFTER),
    411: ("The body was sent chunked; send a Content-Length.", {}),
    413: ("The body is too large.", {}),
    415: ("The body is not application/json.", {}),
    422: ("Terraform rejected the inputs at plan time (a `validation` block, a provider's "
          "check), or the Idempotency-Key came with another request.", {}),
    429: ("The tenant's concurrent-run limit.", _RETRY_AFTER),
    502: ("Terraform failed while applying (the provider or cloud API), with "
          "`diagnostics`.", {}),
    503: ("Too many runs at once, not ready, or shutting down.", _RETRY_AFTER),
    504: ("The run passed its deadline; terraform was interrupted and released its lock.",
          {}),
}


def _answers(settings: DocSettings, ok: dict[str, Any], *statuses: int,
             authenticated: bool = True) -> dict[str, Any]:
    """`ok` (the 2xx answers) and a problem answer for each status (401 when auth is on)."""
    found = set(statuses) | {503}
    if settings.auth and authenticated:
        found.add(401)
    answers = dict(ok)
    for status in sorted(found):
        description, headers = _PROBLEMS[status]
        answer: dict[str, Any] = {"description": description,
                                  "content": _content(_ref("Problem"), PROBLEM)}
        if headers:
            answer["headers"] = headers
        answers[str(status)] = answer
    return answers


def _accepted() -> dict[str, Any]:
    return {"description": "The run goes on (`Prefer: respond-async` or `wait=N`): its "
                           "record; follow `Location`.",
            "headers": {**_LOCATION, **_APPLIED_PREF},
            "content": _content(_ref("RunRecord"))}


def _ok(description: str, schema: dict[str, Any], headers: dict[str, Any] | None = None
        ) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description, "content": _content(schema)}
    if headers:
        answer["headers"] = headers
    return answer


#: Statuses of a call that starts a run and answers its outcome.
_RUN_FAILURES = (400, 409, 411, 413, 422, 429, 502, 504)
#: And of one that sends the variables.
_APPLY_FAILURES = (*_RUN_FAILURES, 415)


# -- the security of each operation ---------------------------------------------------------


def _scope_names(prefix: str, module: str) -> tuple[str, str, str]:
    return f"{prefix}/{module}.read", f"{prefix}/{module}.write", f"{prefix}/admin"


def _security(settings: DocSettings, *scopes: str) -> dict[str, Any]:
    """Each scope that is enough on its own, as alternatives; none: any valid token."""
    if not settings.auth:
        return {}
    if not scopes:
        return {"security": [{"oauth2": []}, {"bearer": []}]}
    return {"security": [{scheme: [s]} for s in scopes for scheme in ("oauth2", "bearer")]}


# -- one module ------------------------------------------------------------------------------


def module_part(module: Module, ident: str, settings: DocSettings) -> ModulePart:
    """The paths and schemas of one module (pure)."""
    name = module.name
    read, write, admin = _scope_names(settings.scope_prefix, name)
    variables, outputs = f"{ident}_variables", f"{ident}_outputs"
    applied, instance_view = f"{ident}_applied", f"{ident}_instance"
    output_schema = {
        "type": "object",
        "description": f"The outputs of module {name}; sensitive ones read `<sensitive>` "
                       "unless the caller has the admin scope.",
        "properties": {o.name: {"description": (o.description + " (sensitive)").strip()
                                if o.sensitive else o.description}
                       for o in module.outputs.values()},
    }
    body_schema = request_schema(module.schema)
    body_schema.setdefault("description", f"The input variables of module {name}. "
                           "Terraform's own `validation` blocks are checked at plan time "
                           "(422). Keys of one object must differ once Unicode-normalized "
                           "(NFC), as terraform compares them.")
    schemas = {
        variables: body_schema,
        outputs: output_schema,
        applied: _obj({"module": _STRING, "instance": _STRING, "outputs": _ref(outputs),
                       "changes": _ref("Changes"),
                       "run_id": {"type": "string", "pattern": _RUN_ID}},
                      ("module", "instance", "outputs", "changes", "run_id"),
                      f"An apply of module {name} that succeeded."),
        instance_view: _obj({
            "module": _STRING, "instance": _STRING, "outputs": _ref(outputs),
            "resources": {"type": "integer", "minimum": 0},
            "serial": {"type": ["integer", "null"]},
            "terraform_version": {"type": ["string", "null"]},
            "status": {"enum": ["idle", "busy", "locked"]},
            "lock": {"type": "object", "additionalProperties": _STRING},
            "stale": {"type": "boolean",
                      "description": "The last complete state; a newer one is being "
                                     "written."},
        }, ("module", "instance", "outputs", "resources", "serial", "terraform_version",
            "status"), f"An instance of module {name}, read from its state."),
        f"{ident}_module": _obj({
            "module": _STRING, "description": _STRING,
            "variables": {"type": "object", "description": "The variables' JSON Schema."},
            "outputs": {"type": "object", "additionalProperties": _obj(
                {"description": _STRING, "sensitive": {"type": "boolean"}},
                ("description", "sensitive"))},
            "instances": {"type": "array", "items": _obj(
                {"instance": _NAME, "href": _STRING,
                 "tenant": {**_STRING, "description": "Another tenant's (admins)."}},
                ("instance",))},
        }, ("module", "description", "variables", "outputs", "instances"),
            f"Module {name}: its variables, outputs and the caller's instances."),
    }
    body = {"required": True, "content": _content(_ref(variables)),
            "description": f"The variables of module {name}."}
    outcome = {"oneOf": [_ref(applied), _ref("Planned")]}
    gone = {"oneOf": [_ref("Destroyed"), _ref("Planned")]}
    run_params = [_PREFER, _IDEMPOTENCY]
    reading = _security(settings, read, write, admin)
    writing = _security(settings, write, admin)
    forbidden = (403,) if settings.auth else ()
    tag = [name]

    def op(op_id: str, summary: str, **fields: Any) -> dict[str, Any]:
        return {"operationId": op_id, "summary": summary, "tags": tag, **fields}

    paths = {
        f"/{name}": {
            "get": op(f"describe_{ident}", f"Module {name}: variables, outputs, instances",
                      responses=_answers(settings, {"200": _ok("The module.", _ref(
                          f"{ident}_module"))}, *forbidden), **reading),
            "post": op(f"apply_{ident}", f"Apply (or plan) the default instance of {name}",
                       parameters=[_DRY_RUN, *run_params], requestBody=body,
                       responses=_answers(settings, {
                           "200": _ok("The outputs of the apply, or the plan.", outcome,
                                      _APPLIED_PREF),
                           "202": _accepted()}, *forbidden, *_APPLY_FAILURES), **writing),
            "delete": op(f"destroy_{ident}", f"Destroy (or plan to) the default instance "
                                             f"of {name}",
                         parameters=[_DRY_RUN, _TENANT, *run_params],
                         responses=_answers(settings, {
                             "200": _ok("Destroyed, or the plan.", gone, _APPLIED_PREF),
                             "202": _accepted()}, 403, 404, *_RUN_FAILURES), **writing),
        },
        f"/{name}/{{instance}}": {
            "parameters": [_INSTANCE],
            "get": op(f"get_{ident}_instance", f"An instance of {name}: outputs and status",
                      parameters=[_TENANT], responses=_answers(settings, {
                          "200": _ok("The instance.", _ref(instance_view))}, 400, 403, 404),
                      **reading),
            "put": op(f"apply_{ident}_instance", f"Apply (or plan) a named instance of {name}",
                      parameters=[_DRY_RUN, *run_params], requestBody=body,
                      responses=_answers(settings, {
                          "200": _ok("Updated (or planned).", outcome, _APPLIED_PREF),
                          "201": _ok("Created.", _ref(applied), {**_LOCATION,
                                                                  **_APPLIED_PREF}),
                          "202": _accepted()}, *forbidden, *_APPLY_FAILURES), **writing),
            "delete": op(f"destroy_{ident}_instance",
                         f"Destroy (or plan to) a named instance of {name}",
                         parameters=[_DRY_RUN, _TENANT, *run_params],
                         responses=_answers(settings, {
                             "200": _ok("Destroyed, or the plan.", gone, _APPLIED_PREF),
                             "202": _accepted()}, 403, 404, *_RUN_FAILURES), **writing),
        },
        f"/{name}/{{instance}}/lock": {
            "parameters": [_INSTANCE],
            "delete": op(f"unlock_{ident}_instance",
                         "Admin: clear a state lock left by a killed run",
                         parameters=[_TENANT],
                         requestBody={"required": True, "content": _content(_obj(
                             {"lock_id": {"type": "string", "pattern": "\\S",
                                          "description": "The id of the lock to clear."}},
                             ("lock_id",)))},
                         responses=_answers(settings, {
                             "200": _ok("The lock is cleared.", _ref("Unlocked"))},
                             400, 403, 404, 409, 411, 413, 415),
                         **_security(settings, admin)),
        },
        f"/{name}/{{instance}}/runs": {
            "parameters": [_INSTANCE],
            "get": op(f"list_{ident}_instance_runs", "The instance's runs, newest first",
                      parameters=[_TENANT, _LIMIT, _BEFORE], responses=_answers(settings, {
                          "200": _ok("A page of runs.", _ref("RunPage"))}, 400, 403),
                      **reading),
        },
    }
    scopes = {read: f"Read module {name}: its schema, instances and runs",
              write: f"Apply and destroy instances of module {name} (and read them)"}
    tag_doc: dict[str, Any] = {"name": name}
    if module.description:
        tag_doc["description"] = module.description
    return ModulePart(name, paths, schemas, scopes, tag_doc)


# -- the rest of the API, and the whole -------------------------------------------------------


def base_document(settings: DocSettings) -> dict[str, Any]:
    """The paths and schemas that do not depend on the modules (pure)."""
    public: dict[str, Any] = {"security": []} if settings.auth else {}
    anyone = _security(settings)
    server, runs = ["Server"], ["Runs"]
    record = _ok("The run's record.", _ref("RunRecord"))
    events = {
        "description": "The run's events from the start (or after `after`/`Last-Event-ID`), "
                       "then live until it ends: NDJSON (one `Event` a line), or Server-Sent "
                       "Events with `Accept: text/event-stream` (`id:` is the event's `seq`).",
        "content": {NDJSON: {"schema": _ref("Event")},
                    SSE: {"schema": {"type": "string"}}},
    }
    paths: dict[str, Any] = {
        "/": {"get": {"operationId": "list_modules", "summary": "The modules the caller "
                      "may read", "tags": server, **anyone,
                      "responses": _answers(settings, {"200": _ok("The modules.",
                                                                  _ref("Index"))})}},
        "/healthz": {"get": {"operationId": "get_health", "summary": "Liveness", "tags": server,
                             **public, "responses": _answers(settings, {
                                 "200": _ok("The process serves.", _ref("Health"))},
                                 authenticated=False)}},
        "/readyz": {"get": {"operationId": "get_readiness", "summary": "Readiness: terraform, "
                            "backend, modules", "tags": server, **public,
                            "responses": _answers(settings, {
                                "200": _ok("Ready.", _ref("Readiness"))},
                                authenticated=False)}},
        "/openapi.json": {"get": {
            "operationId": "get_openapi", "tags": server,
            "summary": "This document, showing the modules the caller may read",
            **({"security": [{}, {"oauth2": []}, {"bearer": []}]} if settings.auth else {}),
            "responses": _answers(settings, {"200": _ok("An OpenAPI 3.1 document.",
                                                        {"type": "object"})})}},
        "/docs": {"get": {
            "operationId": "get_docs", "tags": server, **public,
            "summary": "Swagger UI for this document",
            "responses": _answers(settings, {"200": {
                "description": "The page.", "content": {"text/html": {
                    "schema": {"type": "string"}}}}}, authenticated=False)}},
        "/metrics": {"get": {
            "operationId": "get_metrics", "tags": server,
            "summary": "Prometheus metrics (admin when auth is on)",
            **_security(settings, f"{settings.scope_prefix}/admin"),
            "responses": _answers(settings, {"200": {
                "description": "The Prometheus text format.", "content": {"text/plain": {
                    "schema": {"type": "string"}}}}}, *((403,) if settings.auth else ()))}},
        "/runs": {"get": {
            "operationId": "list_runs", "summary": "The caller's runs (admin: all), newest "
            "first", "tags": runs, **anyone,
            "parameters": [
                _param("module", "query", _NAME, "Only this module's runs."),
                _param("status", "query", {"enum": sorted(ACTIVE) + sorted(ENDED)},
                       "Only runs of this status."),
                _LIMIT, _BEFORE],
            "responses": _answers(settings, {"200": _ok("A page of runs.", _ref("RunPage"))},
                                  400, 403, 404)}},
        "/runs/{run_id}": {"parameters": [_RUN], "get": {
            "operationId": "get_run", "summary": "One run's record", "tags": runs, **anyone,
            "responses": _answers(settings, {"200": record}, 404)}},
        "/runs/{run_id}/events": {"parameters": [_RUN], "get": {
            "operationId": "get_run_events", "summary": "The run's progress, replayed then "
            "live", "tags": runs, **anyone,
            "parameters": [
                _param("after", "query", {"type": "integer", "minimum": 0,
                                          "maximum": 999_999_999},
                       "Only events after this `seq`."),
                _param("Last-Event-ID", "header", {"type": "string",
                                                   "pattern": "^[0-9]{1,9}$"},
                       "Server-Sent Events: resume after this `seq`.")],
            "responses": _answers(settings, {"200": events}, 400, 404)}},
        "/runs/{run_id}/cancel": {"parameters": [_RUN], "post": {
            "operationId": "cancel_run", "summary": "Cancel a run", "tags": runs, **anyone,
            "parameters": [_param("force", "query", {"type": "boolean", "default": False},
                                  "Kill terraform's process group at once (the state may "
                                  "stay locked).")],
            "responses": _answers(settings, {"202": _ok(
                "Canceled, or being canceled: the record.", _ref("RunRecord"))},
                400, 403, 404, 409, 411, 413)}},
        "/runs/{run_id}/apply": {"parameters": [_RUN], "post": {
            "operationId": "apply_plan", "summary": "Apply exactly the plan a dry run saved",
            "tags": runs, **anyone, "parameters": [_PREFER, _IDEMPOTENCY],
            "responses": _answers(settings, {
                "200": _ok("The outcome.", {"oneOf": [_ref("Applied"), _ref("Destroyed")]},
                           _APPLIED_PREF),
                "201": _ok("A new instance.", _ref("Applied"), {**_LOCATION,
                                                                 **_APPLIED_PREF}),
                "202": _accepted()}, 403, 404, *_RUN_FAILURES)}},
    }
    return {"paths": paths, "schemas": common_schemas()}


def assemble(base: Mapping[str, Any], parts: Iterable[ModulePart],
             settings: DocSettings) -> dict[str, Any]:
    """The document of the shared part and some modules' parts (pure; nothing is copied
    deeply: the parts are shared, read-only)."""
    parts = list(parts)
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = dict(base["schemas"])
    scopes: dict[str, str] = {}
    for part in parts:
        paths.update(part.paths)
        schemas.update(part.schemas)
        scopes.update(part.scopes)
    paths.update(base["paths"])
    names = ", ".join(f"`{p.name}`" for p in parts) or "none (send a token that may read one)"
    doc: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "tfserver",
            "version": settings.version,
            "description": (
                "Terraform modules as an HTTP API: `POST /{module}` and `PUT "
                "/{module}/{instance}` apply with the body's variables, `DELETE` destroys, "
                "`?dry_run=true` plans. Every apply, destroy and plan is a run under "
                "`/runs`. Errors are RFC 9457 problem documents.\n\nModules shown: "
                + names + "."),
        },
        "tags": [p.tag for p in parts] + [
            # Capitalised: no module can be named so (module names are lowercase).
            {"name": "Runs", "description": "Runs: records, progress, cancel, saved plans."},
            {"name": "Server", "description": "The server: index, health, this document."}],
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if settings.auth:
        scopes[f"{settings.scope_prefix}/admin"] = (
            "Everything: every tenant's instances and runs, sensitive outputs in clear, "
            "unlocking")
        doc["components"]["securitySchemes"] = {
            "oauth2": {"type": "oauth2", "description": "Cognito client credentials.",
                       "flows": {"clientCredentials": {"tokenUrl": settings.token_url,
                                                       "scopes": scopes}}},
            "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                       "description": "An access token, for example from `tfserver token`."},
        }
        doc["security"] = [{"oauth2": []}, {"bearer": []}]
    return doc

