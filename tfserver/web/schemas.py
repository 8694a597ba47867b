"""The pieces of the OpenAPI document that do not depend on the routes: what request
bodies may hold, the schemas every document has, parameters, answers and security.

What the server refuses before any schema applies is stated in the schemas too, so a
client (or a fuzzer) that keeps to the document never gets a 400: numbers within the
limits of `jsonbody`, names and keys as `names` checks them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .. import __version__
from ..config import Config
from ..module.discover import Module
from ..names import NAME_RE, TENANT_KEY_RE
from ..runs.store import ACTIVE, AWAITING, ENDED
from . import refschema
from .varschema import NUMBER_LIMITS, request_schema

JSON = "application/json"
PROBLEM = "application/problem+json"
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"

RUN_ID = "^[0-9a-f]{32}$"
#: The longest `Prefer: wait=N` honoured, in seconds (App Platform's edge cuts requests
#: at about 100 s).
MAX_PREFER_WAIT = 90
#: A key of visible ASCII, bare or as a quoted string (`"key"`); no stray quote.
IDEMPOTENCY_KEY = '^(?:[!#-~]{1,255}|"[!#-~]{1,255}")$'
SCHEMAS = "#/components/schemas/"


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


def ref(name: str) -> dict[str, Any]:
    """A reference to a schema of the document's components."""
    return {"$ref": SCHEMAS + name}


def content(schema: dict[str, Any], media_type: str = JSON) -> dict[str, Any]:
    """A `content` map of one media type."""
    return {media_type: {"schema": schema}}


# -- what request bodies may hold -----------------------------------------------------------

#: Terraform's `any`: every JSON value, with the numbers anywhere in it within the limits.
ANY_VALUE: dict[str, Any] = {
    "description": "Any JSON value (Terraform's `any`); its numbers within the same limits "
                   "as every number of a request.",
    **NUMBER_LIMITS,
    "items": ref("AnyValue"),
    "additionalProperties": ref("AnyValue"),
}

# -- schemas every document has ---------------------------------------------------------------


def obj(properties: dict[str, Any], required: Iterable[str] = (),
        description: str = "") -> dict[str, Any]:
    """An object schema (`required` sorted)."""
    schema: dict[str, Any] = {"type": "object", "properties": properties,
                              "required": sorted(required)}
    if description:
        schema["description"] = description
    return schema


STRING = {"type": "string"}
NAME = {"type": "string", "pattern": NAME_RE.pattern}
TIME = {"type": ["string", "null"], "format": "date-time"}
NAMES = {"type": "array", "items": STRING}


def common_schemas() -> dict[str, Any]:
    """The schemas of answers that are the same for every module."""
    changes = obj({k: {"type": "integer", "minimum": 0} for k in ("add", "change", "remove")},
                   ("add", "change", "remove"), "Resources added, changed and removed.")
    planned_change = obj({"address": STRING, "action": STRING}, ("address", "action"))
    problem = obj({
        "type": {**STRING, "description": "A URI naming the kind of problem."},
        "title": STRING,
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": STRING,
        "errors": {"type": "array", "items": ref("FieldError"),
                   "description": "Every fault of the input at once (400), or the variables "
                                  "terraform named (422)."},
        "diagnostics": {"type": "array", "items": obj(
            {"summary": STRING, "detail": STRING, "address": STRING}, ("summary",))},
        "lock": {"type": "object", "additionalProperties": STRING,
                 "description": "Who holds the state lock (409)."},
    }, ("type", "title", "status", "detail"),
        "An RFC 9457 problem document; never a traceback, raw stderr or a secret.")
    record = obj({
        "id": {"type": "string", "pattern": RUN_ID},
        "module": STRING,
        "instance": STRING,
        "operation": {"enum": ["apply", "destroy", "plan", "plan-destroy", "drift"]},
        "status": {"enum": [*sorted(ACTIVE), AWAITING, *sorted(ENDED)]},
        "queue_position": {"type": ["integer", "null"], "minimum": 0},
        "created_at": TIME,
        "started_at": TIME,
        "finished_at": TIME,
        "who": obj({"subject": STRING, "tenant": STRING}, ("subject", "tenant")),
        "changes": {"anyOf": [ref("Changes"), {"type": "null"}]},
        "outputs": {"type": ["object", "null"],
                    "description": "A succeeded apply's outputs, sensitive ones redacted "
                                   "unless the caller has the admin scope."},
        "planned": {"type": ["array", "null"], "items": ref("PlannedChange")},
        "problem": {"anyOf": [ref("Problem"), {"type": "null"}],
                    "description": "A failed run: what its synchronous call answered."},
        "links": obj({"self": STRING, "events": STRING, "instance": STRING,
                       "apply": {**STRING, "description": "A plan that can still be applied."},
                       "approve": STRING, "reject": STRING},
                      ("self", "events", "instance")),
        "plan": obj({"expires_at": TIME, "applied_by": {"type": ["string", "null"]}},
                     ("expires_at",)),
        "plan_of": {**STRING, "description": "The plan this run applies."},
        "retry_of": {**STRING, "description": "The run this run retries."},
        "version": STRING, "from_version": STRING, "dropped": NAMES, "added": NAMES,
        "retyped": NAMES,
        "idempotency_key": STRING,
        "cancel": {"enum": ["requested", "forced"]},
        "state_may_be_locked": {"type": "boolean"},
        "drift": {**ref("Drift"), "description": "A drift check: what it found."},
        **refschema.RUN_REFERENCES,
        "approval": ref("Approval"),
    }, ("id", "module", "instance", "operation", "status", "queue_position", "created_at",
        "started_at", "finished_at", "who", "changes", "outputs", "planned", "problem",
        "links"), "A run: every apply, destroy and plan is one.")
    event = obj({
        "seq": {"type": "integer", "minimum": 1},
        "time": {"type": "string", "format": "date-time"},
        "type": {"enum": ["queued", "started", "planned", "resource", "diagnostic",
                          "outputs", "drift", "cascade", "cascade_stopped", AWAITING,
                          "approved", "finished"]},
        "changes": {"anyOf": [ref("Changes"), {"type": "null"}]},
        "address": STRING,
        "action": STRING,
        "phase": {"enum": ["start", "progress", "done", "errored"]},
        "elapsed_s": {"type": "number"},
        "severity": STRING,
        "summary": STRING,
        "detail": STRING,
        "outputs": {"type": "object"},
        "status": {"enum": sorted(ENDED)},
        "problem": {"anyOf": [ref("Problem"), {"type": "null"}]},
    }, ("seq", "time", "type"),
        "One event of a run; the stream ends after `finished`. Every value of a sensitive "
        "variable is scrubbed.")
    base = {"module": STRING, "instance": STRING, "changes": ref("Changes"),
            "run_id": {"type": "string", "pattern": RUN_ID}}
    return {
        "AnyValue": ANY_VALUE,
        refschema.REFERENCE: refschema.reference_schema(),
        "Changes": changes,
        "PlannedChange": planned_change,
        "FieldError": obj({"field": STRING, "message": STRING}, ("field", "message")),
        "Problem": problem,
        "Applied": obj({**base, "outputs": {"type": "object"}},
                        ("module", "instance", "outputs", "changes", "run_id"),
                        "An apply that succeeded."),
        "Planned": obj({**base, "dry_run": {"const": True},
                         "planned": {"type": "array", "items": ref("PlannedChange")},
                         "version": STRING, "from_version": STRING, "dropped": NAMES,
                         "added": NAMES, "retyped": NAMES},
                        ("module", "instance", "dry_run", "changes", "planned", "run_id"),
                        "A plan (`?dry_run=true`): what the run would change. It can be "
                        "applied as it is with `POST /runs/{run_id}/apply`."),
        "Destroyed": obj({**base, "destroyed": {"const": True}},
                          ("module", "instance", "destroyed", "changes", "run_id"),
                          "A destroy that succeeded: the instance is gone."),
        "Unlocked": obj({"module": STRING, "instance": STRING, "unlocked": STRING},
                         ("module", "instance", "unlocked")),
        "Orphaned": obj({"module": STRING, "instance": STRING, "orphaned": {"const": True},
                         "archived_until": {"type": "string", "format": "date-time"}},
                        ("module", "instance", "orphaned", "archived_until"),
                        "An instance forgotten (`?orphan=true`); nothing was destroyed."),
        "RunRecord": record,
        "RunPage": obj({"runs": {"type": "array", "items": ref("RunRecord")},
                         "next": {"type": ["string", "null"],
                                  "description": "The next page's href, or null."}},
                        ("runs", "next")),
        "Event": event,
        "Index": obj({"modules": {"type": "array", "items": obj(
            {"name": NAME, "href": STRING, "description": STRING},
            ("name", "href", "description"))}}, ("modules",)),
        "Health": obj({"status": {"const": "ok"}}, ("status",)),
        "Readiness": obj({"status": {"const": "ready"}, "terraform": STRING,
                           "backend": STRING,
                           "modules": {"type": "object", "additionalProperties": STRING}},
                          ("status", "terraform", "backend", "modules")),
    }


def module_schemas(module: Module, ident: str) -> dict[str, Any]:
    """The schemas of one module: its variables, outputs and answers (pure)."""
    name = module.name
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
    body_schema = refschema.with_references(request_schema(module.schema))
    body_schema.setdefault("description", f"The input variables of module {name}. "
                           "Terraform's own `validation` blocks are checked at plan time "
                           "(422). Keys of one object must differ once Unicode-normalized "
                           "(NFC), as terraform compares them.")
    schemas = {
        variables: body_schema,
        outputs: output_schema,
        applied: obj({"module": STRING, "instance": STRING, "outputs": ref(outputs),
                       "changes": ref("Changes"),
                       "run_id": {"type": "string", "pattern": RUN_ID}},
                      ("module", "instance", "outputs", "changes", "run_id"),
                      f"An apply of module {name} that succeeded."),
        instance_view: obj({
            "module": STRING, "instance": STRING, "outputs": ref(outputs),
            "resources": {"type": "integer", "minimum": 0},
            "serial": {"type": ["integer", "null"]},
            "terraform_version": {"type": ["string", "null"]},
            "status": {"enum": ["idle", "busy", "locked"]},
            "lock": {"type": "object", "additionalProperties": STRING},
            "stale": {"type": "boolean",
                      "description": "The last complete state; a newer one is being "
                                     "written."},
            "drift": ref("Drift"),
            **refschema.INSTANCE_REFERENCES,
            "version": STRING, "latest": STRING, "upgrade_available": {"type": "boolean"},
        }, ("module", "instance", "outputs", "resources", "serial", "terraform_version",
            "status"), f"An instance of module {name}, read from its state."),
        f"{ident}_module": obj({
            "module": STRING, "description": STRING,
            "variables": {"type": "object", "description": "The variables' JSON Schema."},
            "outputs": {"type": "object", "additionalProperties": obj(
                {"description": STRING, "sensitive": {"type": "boolean"},
                 "referenced_by": refschema.REFERENCED_BY},
                ("description", "sensitive"))},
            "instances": {"type": "array", "items": obj(
                {"instance": NAME, "href": STRING,
                 "tenant": {**STRING, "description": "Another tenant's (admins)."}},
                ("instance",))},
            "version": STRING, "default_version": STRING, "versions": NAMES,
        }, ("module", "description", "variables", "outputs", "instances"),
            f"Module {name}: its variables, outputs and the caller's instances."),
    }
    return schemas


# -- parameters and answers -------------------------------------------------------------------


def param(name: str, where: str, schema: dict[str, Any], description: str, *,
          required: bool = False) -> dict[str, Any]:
    """A parameter (a path parameter is always required)."""
    return {"name": name, "in": where, "required": required or where == "path",
            "description": description, "schema": schema}


INSTANCE = param("instance", "path", NAME, "The instance's name.")
RUN = param("run_id", "path", {"type": "string", "pattern": RUN_ID}, "The run's id.")
DRY_RUN = param("dry_run", "query", {"type": "boolean", "default": False},
                  "Plan without changing anything; the answer lists the planned changes.")
ORPHAN = param("orphan", "query", {"type": "boolean", "default": False},
                 "Admin: forget the instance without destroying anything (no terraform "
                 "runs); its state is kept aside for TFSERVER_ARCHIVE_RETENTION.")
TENANT = param("tenant", "query", {"type": "string", "pattern": TENANT_KEY_RE.pattern},
                 "Admin: another tenant's key, as listings show it.")
LIMIT = param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 100,
                                   "default": 20}, "Runs per page.")
BEFORE = param("before", "query", {"type": "string", "pattern": RUN_ID},
                 "Continue after this run id (the `next` href carries it).")
PREFER = param("Prefer", "header", {"type": "string", "examples": ["respond-async",
                                                                     "wait=10"]},
                 "RFC 7240: `respond-async` answers 202 at once with the run's record; "
                 f"`wait=N` waits up to N seconds (at most {MAX_PREFER_WAIT}), then 202.")
IDEMPOTENCY = param("Idempotency-Key", "header",
                      {"type": "string", "pattern": IDEMPOTENCY_KEY},
                      "The same key with the same request gives the same run, never a "
                      "second terraform run; with another request it is 422.")

RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again.",
                                "schema": {"type": "integer", "minimum": 0}}}
LOCATION = {"Location": {"description": "Where the new resource is.", "required": True,
                          "schema": {"type": "string"}}}
APPLIED_PREF = {"Preference-Applied": {"description": "The preferences honoured.",
                                        "schema": {"type": "string"}}}

_PROBLEMS: dict[int, tuple[str, dict[str, Any]]] = {
    400: ("The request is malformed: every field error listed in `errors`.", {}),
    401: ("No token, or a token that fails verification.",
          {"WWW-Authenticate": {"schema": {"type": "string"}, "required": True}}),
    403: ("The token lacks the scope, or a quota of the policy is reached.",
          {"WWW-Authenticate": {"schema": {"type": "string"}}}),
    404: ("No such module, instance or run (or another tenant's).", {}),
    409: ("The instance is busy, its queue is full, the plan is stale or used, or the run "
          "already ended.", RETRY_AFTER),
    411: ("The body was sent chunked; send a Content-Length.", {}),
    413: ("The body is too large.", {}),
    415: ("The body is not application/json.", {}),
    422: ("Terraform rejected the inputs at plan time (a `validation` block, a provider's "
          "check), or the Idempotency-Key came with another request.", {}),
    429: ("The tenant's concurrent-run limit.", RETRY_AFTER),
    502: ("Terraform failed while applying (the provider or cloud API), with "
          "`diagnostics`.", {}),
    503: ("Too many runs at once, not ready, or shutting down.", RETRY_AFTER),
    504: ("The run passed its deadline; terraform was interrupted and released its lock.",
          {}),
}


def answers(settings: DocSettings, ok: dict[str, Any], *statuses: int,
            authenticated: bool = True) -> dict[str, Any]:
    """`ok` (the 2xx answers) and a problem answer for each status (401 when auth is on)."""
    found = set(statuses) | {503}
    if settings.auth and authenticated:
        found.add(401)
    every = dict(ok)
    for status in sorted(found):
        description, headers = _PROBLEMS[status]
        answer: dict[str, Any] = {"description": description,
                                  "content": content(ref("Problem"), PROBLEM)}
        if headers:
            answer["headers"] = headers
        every[str(status)] = answer
    return every


def accepted() -> dict[str, Any]:
    """The 202 of a call that starts a run."""
    return {"description": "The run goes on (`Prefer: respond-async` or `wait=N`): its "
                           "record; follow `Location`.",
            "headers": {**LOCATION, **APPLIED_PREF},
            "content": content(ref("RunRecord"))}


def ok_answer(description: str, schema: dict[str, Any],
              headers: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON answer of a success status."""
    answer: dict[str, Any] = {"description": description, "content": content(schema)}
    if headers:
        answer["headers"] = headers
    return answer


#: Statuses of a call that starts a run and answers its outcome.
RUN_FAILURES = (400, 409, 411, 413, 422, 429, 502, 504)
#: And of one that sends the variables.
APPLY_FAILURES = (*RUN_FAILURES, 415)


# -- the security of each operation ---------------------------------------------------------


def scope_names(prefix: str, module: str) -> tuple[str, str, str]:
    """A module's read, write and the admin scope."""
    return f"{prefix}/{module}.read", f"{prefix}/{module}.write", f"{prefix}/admin"


def security(settings: DocSettings, *scopes: str) -> dict[str, Any]:
    """Each scope that is enough on its own, as alternatives; none: any valid token."""
    if not settings.auth:
        return {}
    if not scopes:
        return {"security": [{"oauth2": []}, {"bearer": []}]}
    return {"security": [{scheme: [s]} for s in scopes for scheme in ("oauth2", "bearer")]}
