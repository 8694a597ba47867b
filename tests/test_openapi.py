"""The OpenAPI document, the docs page, and the whole server fuzzed from the document.

Servers run the offline `demo` module and `modules_openapi/shapes` (every shape of
variable) through a terraform shim that counts terraform processes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, Phase, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from support import (
    ROOT,
    Jwks,
    Response,
    ServerProcess,
    Signer,
    bearer,
    require_tool,
    start_server,
    terraform_shim,
)
from tfserver.auth import Principal
from tfserver.module.discover import load_module
from tfserver.web.openapi import ApiDescription, DocSettings, operation_idents
from tfserver.web.varschema import NUMBER_LIMITS, request_schema

SHAPES = Path(__file__).resolve().parent / "modules_openapi" / "shapes"
MODULE_DIRS = {"demo": ROOT / "modules" / "demo", "droplet": ROOT / "modules" / "droplet",
               "basic": Path(__file__).resolve().parent / "modules" / "basic",
               "shapes": SHAPES}
TOKEN_URL = "https://tfserver-test.auth.us-east-1.amazoncognito.com/oauth2/token"

try:
    import hypothesis_jsonschema
except ImportError:  # a test extra (pip install -e '.[test]'); CI must have it
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise
    pytest.skip("hypothesis-jsonschema is not installed", allow_module_level=True)


# -- fixtures ------------------------------------------------------------------------------


@dataclasses.dataclass
class Served:
    """A running server, the terraform calls it made so far, and its document."""

    server: ServerProcess
    calls: Path
    headers: dict[str, str]

    def doc(self) -> dict[str, Any]:
        r = self.server.request("GET", "/openapi.json", headers=self.headers)
        assert r.status == 200, r.body
        return dict(r.json)

    def terraform_runs(self) -> int:
        return len(self.calls.read_text().splitlines()) if self.calls.exists() else 0

    def request(self, method: str, path: str, body: Any = None, **kw: Any) -> Response:
        kw["headers"] = {**self.headers, **kw.get("headers", {})}
        return self.server.request(method, path, body, **kw)


def _modules(tmp: Path) -> Path:
    folder = tmp / "modules"
    folder.mkdir()
    for name in ("demo", "shapes"):
        shutil.copytree(MODULE_DIRS[name], folder / name)
    return folder


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory, terraform_bin: str
                ) -> Iterator[Served]:
    """Auth off, the demo and shapes modules, terraform through a counting shim."""
    tmp = tmp_path_factory.mktemp("openapi-off")
    shim, calls = terraform_shim(tmp)
    srv = start_server(tmp, modules_dir=_modules(tmp),
                       env={"TFSERVER_TERRAFORM": str(shim), "TFSERVER_LOG_LEVEL": "INFO"})
    yield Served(srv, calls, {})
    srv.stop()


@dataclasses.dataclass
class AuthServer:
    """A server with auth on, and the means to mint its tokens."""

    served: Served
    signer: Signer


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory, terraform_bin: str
                ) -> Iterator[AuthServer]:
    """Auth on (a local JWKS), the demo and shapes modules; a token with write scopes."""
    tmp = tmp_path_factory.mktemp("openapi-on")
    shim, calls = terraform_shim(tmp)
    jwks = Jwks()
    signer = Signer("openapi-key")
    jwks.publish(signer)
    srv = start_server(tmp, modules_dir=_modules(tmp), env={
        "TFSERVER_TERRAFORM": str(shim), "TFSERVER_LOG_LEVEL": "INFO",
        "TFSERVER_AUTH": "jwt", "COGNITO_ISSUER": Signer.ISSUER, "JWK_URL": jwks.url,
        "TFSERVER_TOKEN_URL": TOKEN_URL})
    token = signer.token("fuzzer", "tfserver/demo.write tfserver/shapes.write")
    yield AuthServer(Served(srv, calls, bearer(token)), signer)
    srv.stop()
    jwks.close()


# -- the document itself ------------------------------------------------------------------


def _document(names: list[str], *, auth: bool,
              principal: Principal | None = None) -> dict[str, Any]:
    modules = {n: load_module(MODULE_DIRS[n]) for n in names}
    api = ApiDescription(DocSettings(auth=auth, token_url=TOKEN_URL))
    return api.document(modules, principal or Principal("local", "local", all_modules=True))


@pytest.mark.parametrize("auth", [False, True], ids=["auth-off", "auth-on"])
@pytest.mark.parametrize("names", [["demo"], ["droplet"], ["shapes"], ["basic"],
                                   ["demo", "droplet", "shapes", "basic"]],
                         ids=lambda n: "+".join(n))
def test_openapi_spec_validator_accepts_the_document(names: list[str], auth: bool) -> None:
    from openapi_spec_validator import validate

    doc = _document(names, auth=auth)
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    assert "servers" not in doc  # "Try it out" calls the server that served the document
    for name in names:
        assert f"/{name}" in doc["paths"] and f"/{name}/{{instance}}" in doc["paths"]
    # The document is plain JSON (what the server sends).
    assert json.loads(json.dumps(doc)) == doc


def test_operation_ids_are_stable_names_a_generator_can_use() -> None:
    doc = _document(["demo", "droplet"], auth=True)
    ids = sorted(op["operationId"] for item in doc["paths"].values()
                 for method, op in item.items() if method != "parameters")
    assert ids == sorted([
        *(f"{verb}_{m}" for m in ("demo", "droplet") for verb in ("apply", "describe",
                                                                    "destroy")),
        *(f"{verb}_{m}_instance" for m in ("demo", "droplet")
          for verb in ("apply", "get", "destroy", "unlock", "drift")),
        "list_demo_instance_runs", "list_droplet_instance_runs",
        "list_modules", "get_health", "get_readiness", "get_openapi", "get_docs", "get_metrics",
        "list_runs", "get_run", "get_run_events", "cancel_run", "apply_plan", "retry_run",
        "approve_run", "reject_run", "get_upgrade", "apply_upgrade"])
    assert _document(["demo", "droplet"], auth=True) == doc
    # Names that differ only by - and _ still get ids of their own, the same every time.
    idents = operation_idents(["web-app", "web_app", "db"])
    assert idents["db"] == "db" and len(set(idents.values())) == 3
    assert idents == operation_idents(["db", "web_app", "web-app"])


def test_security_is_oauth2_client_credentials_with_scopes_per_operation() -> None:
    doc = _document(["demo"], auth=True)
    oauth = doc["components"]["securitySchemes"]["oauth2"]
    assert oauth["flows"]["clientCredentials"]["tokenUrl"] == TOKEN_URL
    assert set(oauth["flows"]["clientCredentials"]["scopes"]) == {
        "tfserver/demo.read", "tfserver/demo.write", "tfserver/demo.approve", "tfserver/admin"}
    ops = doc["paths"]

    def scopes(op: dict[str, Any]) -> set[str]:
        return {s for req in op["security"] for found in req.values() for s in found}

    assert scopes(ops["/demo"]["get"]) == {"tfserver/demo.read", "tfserver/demo.write",
                                           "tfserver/demo.approve", "tfserver/admin"}
    assert scopes(ops["/demo"]["post"]) == {"tfserver/demo.write", "tfserver/admin"}
    assert scopes(ops["/demo/{instance}/lock"]["delete"]) == {"tfserver/admin"}
    assert ops["/healthz"]["get"]["security"] == []
    assert {} in ops["/openapi.json"]["get"]["security"]  # anonymous: a document anyway
    assert "401" in ops["/demo"]["post"]["responses"]
    off = _document(["demo"], auth=False)
    assert "securitySchemes" not in off["components"] and "security" not in off
    assert all("security" not in op and "401" not in op["responses"]
               for item in off["paths"].values() for k, op in item.items()
               if k != "parameters")


def test_only_the_modules_the_caller_may_read_are_shown() -> None:
    modules = {n: load_module(MODULE_DIRS[n]) for n in ("demo", "shapes")}
    api = ApiDescription(DocSettings(auth=True, token_url=TOKEN_URL))
    reader = Principal("c", "c", scopes=frozenset({"tfserver/demo.read"}))
    doc = api.document(modules, reader)
    assert "/demo" in doc["paths"] and "/shapes" not in doc["paths"]
    assert "shapes_variables" not in doc["components"]["schemas"]
    assert set(doc["components"]["securitySchemes"]["oauth2"]["flows"]["clientCredentials"]
               ["scopes"]) == {"tfserver/demo.read", "tfserver/demo.write",
                               "tfserver/demo.approve", "tfserver/admin"}
    nobody = api.document(modules, None)
    assert not any(p.startswith(("/demo", "/shapes")) for p in nobody["paths"])
    assert "/runs" in nobody["paths"]
    admin = api.document(modules, Principal("a", "a", admin=True))
    assert "/demo" in admin["paths"] and "/shapes" in admin["paths"]


def test_module_parts_are_made_once_and_follow_a_narrowed_module() -> None:
    demo = load_module(MODULE_DIRS["demo"])
    before = copy.deepcopy(demo.schema)
    api = ApiDescription(DocSettings())
    who = Principal("local", "local", all_modules=True)
    first = api.document({"demo": demo}, who)
    again = api.document({"demo": demo}, who)
    # The same prepared part: filtering per caller copies nothing deep.
    assert first["paths"]["/demo"] is again["paths"]["/demo"]
    assert demo.schema == before  # the module's own schema is never changed
    # A policy narrows by replacing the module (dataclasses.replace): the document follows.
    narrowed = copy.deepcopy(demo.schema)
    narrowed["properties"]["greeting"]["enum"] = ["Hello", "Hi"]
    doc = api.document({"demo": dataclasses.replace(demo, schema=narrowed)}, who)
    # (each variable is `oneOf` its type and a reference to another instance's output)
    assert doc["components"]["schemas"]["demo_variables"]["properties"]["greeting"][
        "oneOf"][0]["enum"] == ["Hello", "Hi"]
    assert "enum" not in first["components"]["schemas"]["demo_variables"]["properties"][
        "greeting"]["oneOf"][0]


def test_request_schema_states_what_the_server_refuses_and_keeps_the_rest() -> None:
    shapes = load_module(SHAPES)
    shown = request_schema(shapes.schema)
    props = shown["properties"]
    assert "$schema" not in shown
    assert props["ratio"]["maximum"] == NUMBER_LIMITS["maximum"]
    assert props["ratio"]["default"] == 0.5 and props["name"]["description"]
    assert props["password"]["writeOnly"] is True and "default" not in props["password"]
    assert props["anything"]["$ref"] == "#/components/schemas/AnyValue"
    assert "items" not in props["pair"] and props["pair"]["maxItems"] == 3
    assert props["zones"]["uniqueItems"] is True
    # A nullable object with a default: the default moves into its object branch.
    assert props["spec"]["anyOf"][1] == {"type": "null"}
    assert props["spec"]["anyOf"][0]["default"] == {"tier": "small"}
    assert props["spec"]["description"] and props["spec"]["anyOf"][0]["properties"][
        "disks"]["default"] == []
    doc = _document(["shapes"], auth=False)
    validator = _validator(doc, {"$ref": "#/components/schemas/shapes_variables"})
    module = jsonschema.Draft202012Validator(shapes.schema)
    for body, doc_ok in [
        ({"name": "a"}, True),
        ({"name": "a", "ratio": 1e100, "matrix": [[0, -1e-300, 5, 10**99 + 1]]}, True),
        ({"name": "a", "ratio": 1e301}, False),  # beyond jsonbody's limits
        ({"name": "a", "ratio": 1e300}, False),  # within them, but no schema counts digits
        ({"name": "a", "ratio": 1e-301}, False),
        ({"name": "a", "ratio": 10**101}, False),  # more digits than jsonbody reads
        ({"name": "a", "anything": {"x": [1, {"y": 1e-320}]}}, False),
        ({"name": "a", "anything": {"x": [1, {"y": "z"}]}}, True),
        ({"name": "a", "spec": None}, True),
        ({"name": "a", "spec": {"tier": "x", "size": None}}, True),
        ({"name": "a", "pair": ["a", 1]}, False),
        ({"name": "a", "unknown": 1}, False),
    ]:
        assert validator.is_valid(body) is doc_ok, body
        if doc_ok:
            assert module.is_valid(body), body  # never looser than the server


# -- answers of the real server against the document ---------------------------------------


def _validator(doc: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    """A validator of `schema` whose `#/components/...` references resolve in `doc`."""
    root = {"allOf": [schema], "components": doc["components"]}
    return jsonschema.Draft202012Validator(
        root, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def check_answer(doc: dict[str, Any], method: str, template: str, r: Response) -> None:
    """The answer's status, content type, headers and body are what the document says."""
    # HEAD is answered as GET is, without a body (the document lists GET).
    op = doc["paths"][template]["get" if method == "HEAD" else method.lower()]
    answer = op["responses"].get(str(r.status))
    assert answer is not None, f"{method} {template}: {r.status} is not documented: {r.body!r}"
    for name, header in answer.get("headers", {}).items():
        if header.get("required"):
            assert r.header(name), f"{method} {template} {r.status}: no {name} header"
    if method == "HEAD":
        return
    kind = (r.header("Content-Type") or "").split(";")[0]
    assert kind in answer["content"], f"{method} {template} {r.status}: {kind}"
    schema = answer["content"][kind]["schema"]
    if kind == "application/x-ndjson":
        lines = [json.loads(line) for line in r.body.decode().splitlines()]
        validator = _validator(doc, schema)
        for line in lines:
            validator.validate(line)
    elif kind.endswith("json"):
        _validator(doc, schema).validate(r.json)


def test_main_calls_answer_as_the_document_says(open_server: Served) -> None:
    s = open_server
    doc = s.doc()

    def call(method: str, template: str, path: str, body: Any = None,
             **kw: Any) -> Response:
        r = s.request(method, path, body, **kw)
        check_answer(doc, method, template, r)
        return r

    assert call("GET", "/", "/").status == 200
    assert call("GET", "/healthz", "/healthz").status == 200
    assert call("GET", "/readyz", "/readyz").status == 200
    assert call("GET", "/openapi.json", "/openapi.json").status == 200
    assert call("GET", "/demo", "/demo").status == 200
    plan = call("POST", "/demo", "/demo?dry_run=true", {"name": "plan-me"})
    assert plan.status == 200 and plan.json["dry_run"] is True
    applied = call("POST", "/demo", "/demo", {"name": "doc-default"})
    assert applied.status == 200 and "outputs" in applied.json
    created = call("PUT", "/demo/{instance}", "/demo/doc-one",
                   {"name": "doc-one", "password": "pw-Zq8"})
    assert created.status == 201
    assert call("PUT", "/demo/{instance}", "/demo/doc-one",
                {"name": "doc-two", "password": "pw-Zq9"}).status == 200
    shown = call("GET", "/demo/{instance}", "/demo/doc-one")
    assert shown.json["outputs"]["password_digest"] == "<sensitive>"
    call("HEAD", "/demo/{instance}", "/demo/doc-one")
    runs = call("GET", "/demo/{instance}/runs", "/demo/doc-one/runs?limit=1")
    assert runs.json["next"]
    call("GET", "/runs", "/runs?module=demo&status=succeeded&limit=2")
    record = call("GET", "/runs/{run_id}", f"/runs/{created.json['run_id']}")
    assert record.json["status"] == "succeeded"
    events = call("GET", "/runs/{run_id}/events", f"/runs/{created.json['run_id']}/events")
    assert json.loads(events.body.splitlines()[-1])["type"] == "finished"
    sse = s.request("GET", f"/runs/{created.json['run_id']}/events",
                    headers={"Accept": "text/event-stream", "Last-Event-ID": "1"})
    check_answer(doc, "GET", "/runs/{run_id}/events", sse)
    assert sse.body.startswith(b"id: 2\n")
    ended = call("POST", "/runs/{run_id}/cancel", f"/runs/{created.json['run_id']}/cancel")
    assert ended.status == 409
    accepted = call("PUT", "/demo/{instance}", "/demo/doc-async", {"name": "doc-async"},
                    headers={"Prefer": "respond-async"})
    assert accepted.status == 202 and accepted.header("Location")
    saved = call("PUT", "/demo/{instance}", "/demo/doc-one?dry_run=true", {"name": "three"})
    from_plan = call("POST", "/runs/{run_id}/apply", f"/runs/{saved.json['run_id']}/apply")
    assert from_plan.status == 200
    # Problems
    assert call("POST", "/demo", "/demo", {"replicas": "two"}).status == 400
    assert call("POST", "/demo", "/demo", {"name": "Not Valid!"}).status == 422
    assert call("POST", "/demo", "/demo", raw=b"x=1",
                headers={"Content-Type": "text/plain"}).status == 415
    assert call("GET", "/demo/{instance}", "/demo/missing").status == 404
    assert call("GET", "/runs/{run_id}", "/runs/" + "0" * 32).status == 404
    assert call("GET", "/runs", "/runs?limit=0").status == 400
    assert call("DELETE", "/demo/{instance}/lock", "/demo/doc-one/lock",
                {"lock_id": "x"}).status == 403  # the local caller is no admin
    assert call("GET", "/demo/{instance}", "/demo/doc-one?tenant=" + "a" * 24).status == 403
    # Destroy everything made here (the async apply first ends).
    deadline = time.monotonic() + 60
    while s.request("GET", accepted.header("Location") or "").json["status"] in (
            "queued", "running") and time.monotonic() < deadline:
        time.sleep(0.1)
    for path in ("/demo/doc-one", "/demo/doc-async"):
        assert call("DELETE", "/demo/{instance}", path).status == 200
    assert call("DELETE", "/demo", "/demo?dry_run=true").status == 200
    assert call("DELETE", "/demo", "/demo").status == 200


def test_docs_page_and_document_answer_head_and_carry_a_csp(open_server: Served) -> None:
    s = open_server
    page = s.request("GET", "/docs")
    assert page.status == 200 and page.header("Content-Type") == "text/html; charset=utf-8"
    csp = page.header("Content-Security-Policy") or ""
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert b"<script>" not in page.body and b"/docs/init.js" in page.body
    assert b"cdn" not in page.body.lower() and b"https://" not in page.body
    init = s.request("GET", "/docs/init.js")
    assert init.status == 200 and b'url: "/openapi.json"' in init.body
    bundle = s.request("GET", "/docs/swagger-ui-bundle.js")
    assert bundle.status == 200 and len(bundle.body) > 100_000
    assert bundle.header("Content-Type") == "text/javascript; charset=utf-8"
    for path in ("/docs", "/docs/swagger-ui.css", "/openapi.json"):
        head = s.request("HEAD", path)
        assert head.status == 200 and head.body == b""
        assert int(head.header("Content-Length") or 0) > 0
    for path in ("/docs/nope.js", "/docs/../setup.cfg", "/docs/swagger-ui.js.map",
                 "/docs/vendor/swagger-ui.css"):
        assert s.request("GET", path).status == 404, path
    assert s.request("POST", "/openapi.json").status == 405


def test_auth_on_the_document_follows_the_token(auth_server: AuthServer) -> None:
    s = auth_server.served
    token = auth_server.signer.token("reader", "tfserver/demo.read")
    doc = s.request("GET", "/openapi.json", headers=bearer(token)).json
    assert "/demo" in doc["paths"] and "/shapes" not in doc["paths"]
    anonymous = s.server.request("GET", "/openapi.json")
    assert anonymous.status == 200
    assert not any(p.startswith(("/demo", "/shapes")) for p in anonymous.json["paths"])
    assert anonymous.json["components"]["securitySchemes"]["oauth2"]["flows"][
        "clientCredentials"]["tokenUrl"] == TOKEN_URL
    assert s.server.request("GET", "/openapi.json",
                            headers=bearer("not-a-token")).status == 401
    assert s.server.request("GET", "/docs").status == 200  # the page needs no token
    csp = s.server.request("GET", "/docs").header("Content-Security-Policy") or ""
    assert "connect-src 'self' https://tfserver-test.auth.us-east-1.amazoncognito.com" in csp
    full = s.doc()
    from openapi_spec_validator import validate

    validate(full)
    assert "/demo" in full["paths"] and "/shapes" in full["paths"]


# -- Schemathesis against the running server -----------------------------------------------


def _no_400_for_an_allowed_request(ctx: Any, response: Any, case: Any) -> bool | None:
    """A request generated from the document (positive) is never refused as malformed."""
    from schemathesis import GenerationMode

    mode = getattr(getattr(case, "meta", None), "generation", None)
    positive = getattr(mode, "mode", GenerationMode.POSITIVE) == GenerationMode.POSITIVE
    if positive and response.status_code == 400:
        raise AssertionError(f"400 for a request the document allows: {response.text[:500]}")
    return None


def types_only(doc: dict[str, Any]) -> dict[str, Any]:
    """The document with each variable as its type alone (without the `oneOf` branch of a
    reference to another instance, issue 22): what is fuzzed here is what the types
    take; a reference drawn at random names no instance (400), and references have their
    own hostile pass in test_references.py."""
    out = copy.deepcopy(doc)
    for name, schema in out["components"]["schemas"].items():
        if not name.endswith("_variables"):
            continue
        for var, sub in schema.get("properties", {}).items():
            branches = sub.get("oneOf") or []
            if len(branches) == 2 and branches[1] == {"$ref": "#/components/schemas/Reference"}:
                typed = dict(branches[0])
                if typed.get("not") == {"type": "object", "required": ["$ref"],
                                        "maxProperties": 1}:
                    del typed["not"]
                elif list(typed) == ["allOf"] and typed["allOf"][1].get("not"):
                    typed = typed["allOf"][0]
                outer = {k: v for k, v in sub.items() if k != "oneOf"}
                schema["properties"][var] = {**outer, **typed}
    return out


def fuzz(served: Served, *, examples: int, negative_examples: int,
         budget: float) -> dict[str, Counter[int]]:
    """Every operation of the document, bounded examples, the same ones every run; returns
    the statuses each operation answered."""
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    # A deeper search by hand: TFSERVER_FUZZ_SCALE=10 pytest -k schemathesis
    scale = int(os.environ.get("TFSERVER_FUZZ_SCALE", "1"))
    examples, negative_examples, budget = (examples * scale, negative_examples * scale,
                                           budget * scale)
    schema = schemathesis.openapi.from_dict(types_only(served.doc()))
    base = served.server.url
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_headers_conformance, response_schema_conformance,
              _no_400_for_an_allowed_request]
    negative_checks = [not_a_server_error, status_code_conformance,
                       content_type_conformance, response_schema_conformance]
    answered: dict[str, Counter[int]] = {}

    def record(ctx: Any, response: Any, case: Any) -> None:
        label = f"{case.operation.method.upper()} {case.operation.path}"
        answered.setdefault(label, Counter())[response.status_code] += 1

    checks.append(record)
    negative_checks.append(record)
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode, count, used in ((GenerationMode.POSITIVE, examples, checks),
                                  (GenerationMode.NEGATIVE, negative_examples,
                                   negative_checks)):
            left = budget - (time.monotonic() - started)
            assert left > 0, f"fuzzing passed its budget of {budget:g}s at {operation.label}"
            if count:
                _fuzz_operation(operation, mode, count, used, base, served.headers)
    print("statuses answered:", json.dumps(answered, sort_keys=True))
    return answered


def _fuzz_operation(operation: Any, mode: Any, count: int, checks: list[Any], base: str,
                    headers: dict[str, str]) -> None:
    # derandomize: a fixed seed, so every run (and CI) draws the same examples.
    @settings(max_examples=count, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck),
              phases=[Phase.explicit, Phase.generate, Phase.shrink])
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        case.call_and_validate(base_url=base, headers=headers, checks=checks, timeout=60)

    try:
        run()
    except Unsatisfiable:
        # Nothing to break in a request without parameters or body: no negative case.
        if mode.is_positive:
            raise


def test_schemathesis_auth_off(open_server: Served) -> None:
    answered = fuzz(open_server, examples=20, negative_examples=5, budget=150)
    # 27, each module's drift check, retry, approve, reject and the 2 upgrade routes
    assert len(answered) == 34, sorted(answered)
    # The fuzzing reached terraform, not only the refusals (demo's names mostly fail its
    # validation block: 422, from terraform too).
    assert answered["POST /shapes"][200] and answered["PUT /shapes/{instance}"][201]
    assert answered["PUT /demo/{instance}"][422]


def test_schemathesis_auth_on(auth_server: AuthServer) -> None:
    answered = fuzz(auth_server.served, examples=10, negative_examples=3, budget=150)
    # 27, each module's drift check, retry, approve, reject and the 2 upgrade routes
    assert len(answered) == 34, sorted(answered)
    assert answered["PUT /shapes/{instance}"][201] and answered["GET /demo"][200]


# -- what terraform accepts ----------------------------------------------------------------


def _inline(schema: Any, components: dict[str, Any], depth: int = 3) -> Any:
    """`schema` with its references replaced by what they name (`AnyValue`'s recursion
    cut after `depth` levels) and tuples in the draft-7 form hypothesis-jsonschema reads."""
    if isinstance(schema, list):
        return [_inline(s, components, depth) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v for k, v in schema.items() if k not in ("$ref", "prefixItems")}
    ref = schema.get("$ref")
    if ref is not None:
        target = components[ref.rsplit("/", 1)[1]]
        if ref.endswith("/AnyValue") and depth == 0:
            target = {k: v for k, v in target.items()
                      if k not in ("items", "additionalProperties")}
            target = {**target, "type": ["string", "number", "boolean", "null"]}
        out.update(_inline(target, components, depth - 1 if ref.endswith("AnyValue")
                           else depth))
    for key in ("properties",):
        if key in out:
            out[key] = {n: _inline(s, components, depth) for n, s in out[key].items()}
    for key in ("items", "additionalProperties", "anyOf", "allOf", "not"):
        if key in out and not isinstance(out[key], bool):
            out[key] = _inline(out[key], components, depth)
    if "prefixItems" in schema:
        out["items"] = _inline(schema["prefixItems"], components, depth)
        out["additionalItems"] = False
    if out.get("not") == NUMBER_LIMITS["not"]:
        out = _number_ranges(out)
    return out


_JSON_TYPES = ["string", "boolean", "null", "array", "object"]


def _number_ranges(schema: dict[str, Any]) -> dict[str, Any]:
    """The number limits as ranges: the same values, but hypothesis-jsonschema generates
    from `not` by filtering, which takes minutes on a schema this size."""
    out = {k: v for k, v in schema.items() if k not in ("not", "minimum", "maximum", "type")}
    kinds = schema.get("type", [*_JSON_TYPES, "number"])
    kinds = [kinds] if isinstance(kinds, str) else kinds
    others = [k for k in kinds if k not in ("number", "integer")]
    low, high = -NUMBER_LIMITS["not"]["exclusiveMinimum"], NUMBER_LIMITS["maximum"]
    out["anyOf"] = ([{"type": others}] if others else []) + [
        {"const": 0}, {"type": "number", "minimum": low, "maximum": high},
        {"type": "number", "minimum": -high, "maximum": -low}]
    return out


def _shapes_schema(doc: dict[str, Any]) -> dict[str, Any]:
    schemas = types_only(doc)["components"]["schemas"]
    found = _inline({"$ref": "#/components/schemas/shapes_variables"}, schemas)
    return {k: v for k, v in found.items() if k not in ("description",)}


def test_values_from_the_schema_are_accepted_by_terraform(open_server: Served) -> None:
    """Plans (`dry_run`) of bodies drawn from the published schema of a module with every
    shape: terraform takes every value; a 422 comes only from the module's own
    `validation` blocks, never from a type conversion."""
    s = open_server
    doc = s.doc()
    validator = _validator(doc, {"$ref": "#/components/schemas/shapes_variables"})
    seen: list[int] = []

    @settings(max_examples=30, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(hypothesis_jsonschema.from_schema(_shapes_schema(doc)))
    @example({"name": "${var.x} %{if true}y%{endif}", "tags": {"": "\u0000", "é": "1"},
              "anything": {"a": [1, "x", {"b": None}], "": 1e100, "c": 5e-300},
              "spec": {"tier": "t", "extra": [[[]]], "labels": None, "disks": None},
              "matrix": [[1e100, -1e-300, 0, 10**99 + 7]], "pair": ["a", -0.0, False]})
    def plan(body: dict[str, Any]) -> None:
        assume(validator.is_valid(body))
        r = s.request("POST", "/shapes?dry_run=true", body, timeout=60)
        seen.append(r.status)
        if r.status == 422:
            summaries = {d["summary"] for d in r.json.get("diagnostics", [])}
            assert summaries == {"Invalid value for variable"}, r.json
            return
        assert r.status == 200, r.body

    plan()
    assert seen.count(200) >= 10, seen


def _wrong(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """JSON values that `schema` refuses."""
    check = jsonschema.Draft202012Validator(schema)
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=5)
        | st.floats(-1e6, 1e6),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3),
                                                                    inner, max_size=3),
        max_leaves=6)
    return json_values.filter(lambda v: not check.is_valid(v))


def test_values_outside_the_schema_are_400_before_terraform_runs(
        open_server: Served) -> None:
    s = open_server
    shapes = load_module(SHAPES)
    typed = {n: sch for n, sch in shapes.schema["properties"].items() if sch}  # not `any`
    before = s.terraform_runs()

    def outside() -> st.SearchStrategy[dict[str, Any]]:
        wrong_value = st.sampled_from(sorted(typed)).flatmap(
            lambda n: st.tuples(st.just(n), _wrong(typed[n])))
        return st.one_of(
            wrong_value.map(lambda kv: {"name": "ok", kv[0]: kv[1]}),
            st.text(min_size=1, max_size=8).filter(lambda k: k not in typed
                                                   and k != "anything")
            .map(lambda k: {"name": "ok", k: 1}),
            st.just({"ratio": 1}),  # the required variable missing
        )

    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(outside())
    @example({"name": "ok", "tags": {"é": "1", "e\u0301": "2"}})  # one key once NFC
    @example({"name": "ok", "ratio": 1e301})
    @example({"name": "ok", "anything": [[[{"x": 1e-320}]]]})
    def refuse(body: dict[str, Any]) -> None:
        r = s.request("POST", "/shapes?dry_run=true", body, timeout=30)
        assert r.status == 400, (body, r.body)
        assert r.json["errors"], r.json

    refuse()
    assert s.terraform_runs() == before, "a refused body started terraform"


def test_keys_equal_once_unicode_normalized_are_400(open_server: Served) -> None:
    """Fuzzing finding: terraform normalizes strings (NFC), so an object with the keys
    "é" and "e" + U+0301 was its "Duplicate object attribute" (422, after a terraform
    run); no schema can say it, so the body parser refuses it (400, before terraform)."""
    s = open_server
    before = s.terraform_runs()
    r = s.request("POST", "/shapes?dry_run=true",
                  {"name": "n", "tags": {"\u00e9": "a", "e\u0301": "b"}})
    assert r.status == 400 and "NFC" in r.json["detail"]
    assert s.terraform_runs() == before
    ok = s.request("POST", "/shapes?dry_run=true", {"name": "n", "tags": {"\u00e9": "a"}})
    assert ok.status == 200, ok.body


# -- a client generated from the document --------------------------------------------------


def test_generated_python_client_applies_reads_and_destroys(open_server: Served,
                                                            tmp_path: Path) -> None:
    generator = shutil.which("openapi-python-client", path=str(Path(sys.executable).parent)) \
        or require_tool("openapi-python-client")
    spec = tmp_path / "openapi.json"
    spec.write_text(json.dumps(open_server.doc()))
    out = tmp_path / "tfserver_client"
    done = subprocess.run([generator, "generate", "--path", str(spec), "--meta", "none",
                           "--output-path", str(out)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path,
                          env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
                               "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "WARNING" not in done.stdout + done.stderr, done.stdout + done.stderr
    sys.path.insert(0, str(tmp_path))
    try:
        from tfserver_client import Client  # type: ignore[import-not-found]
        from tfserver_client.api.demo import (  # type: ignore[import-not-found]
            apply_demo_instance,
            destroy_demo_instance,
            get_demo_instance,
        )
        from tfserver_client.models import (  # type: ignore[import-not-found]
            DemoApplied,
            DemoInstance,
            DemoVariables,
            Destroyed,
        )

        client = Client(base_url=open_server.server.url, timeout=60)
        made = apply_demo_instance.sync_detailed(
            "from-client", client=client, body=DemoVariables(name="from-client", replicas=3))
        assert made.status_code == 201, made.content
        assert isinstance(made.parsed, DemoApplied)
        assert made.parsed.outputs.to_dict()["replicas"] == 3
        read = get_demo_instance.sync("from-client", client=client)
        assert isinstance(read, DemoInstance) and read.resources >= 1
        gone = destroy_demo_instance.sync("from-client", client=client)
        assert isinstance(gone, Destroyed) and gone.destroyed is True
        assert get_demo_instance.sync_detailed("from-client", client=client).status_code \
            == 404
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m.startswith("tfserver_client")]:
            del sys.modules[name]


# -- the page in a browser -----------------------------------------------------------------


def test_docs_page_renders_the_operations_in_chromium(open_server: Served,
                                                      tmp_path: Path) -> None:
    chromium = require_tool("chromium")
    url = open_server.server.url + "/docs"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000",
             "--window-size=1280,2000"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for op in ("demo-apply_demo", "demo-apply_demo_instance", "demo-get_demo_instance",
               "demo-destroy_demo", "shapes-apply_shapes", "Runs-list_runs",
               "Runs-cancel_run"):
        assert f'id="operations-{op}"' in dom.stdout, op
    assert "Failed to load API definition" not in dom.stdout
    screenshot = tmp_path / "docs.png"
    shot = subprocess.run([*flags, f"--screenshot={screenshot}", url], capture_output=True,
                          text=True, timeout=120)
    assert shot.returncode == 0 and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    print(f"screenshot of /docs: {screenshot}")
