"""The route table: dispatch, Allow/405, HEAD, metrics labels and the OpenAPI paths all
read from it; routes take a small request interface; methods no route has are 405; and
the HTTP answers of issue 20 (Prefer: wait, SSE resume, Idempotency-Key)."""

from __future__ import annotations

import ast
import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from support import ROOT, ServerProcess, start_server, terraform_shim
from test_runs import body as run_body
from test_runs import wait_run
from tfserver.app.service import Service
from tfserver.auth import NoAuth, Principal
from tfserver.errors import MethodNotAllowed, NotFound
from tfserver.module.discover import load_module
from tfserver.names import RESERVED_NAMES
from tfserver.web import routes
from tfserver.web.openapi import ApiDescription, DocSettings
from tfserver.web.request import Reply, Site
from tfserver.web.routes import ROUTES, Access, dispatch, match, template

WEB = Path(routes.__file__).parent
BASIC = Path(__file__).resolve().parent / "modules" / "basic"
RUN_MODULES = ROOT / "tests" / "modules_runs"
SAMPLE = {"module": "basic", "instance": "x", "id": "0" * 32, "asset": ""}


def _path(route: routes.Route) -> str:
    """A path the route's template matches."""
    return "/" + "/".join(SAMPLE[s.strip("{}*")] if s.startswith("{") else s
                          for s in route.segments if s != "{asset*}")


# -- the table --------------------------------------------------------------------------


def test_every_row_is_dispatched_and_labelled_from_the_table() -> None:
    for route in ROUTES:
        found = match(_path(route))
        assert found is not None and found.row(route.method) is route, route
        label, module, instance = template(_path(route))
        assert label == route.label
        if route.per_module:
            assert module == "basic" and instance in ("x", "default")


def test_allow_lists_the_path_s_methods_in_table_order_and_head_goes_with_get() -> None:
    basic, named = match("/basic"), match("/basic/x")
    assert basic is not None and basic.allowed() == ["GET", "POST", "DELETE"]
    assert named is not None and named.allowed() == ["GET", "PUT", "DELETE"]
    for route in ROUTES:
        found = match(_path(route))
        assert found is not None
        assert found.row("HEAD") is found.row("GET")
        assert found.row("TRACE") is None and found.row("CONNECT") is None


def test_labels_are_a_bounded_set_and_literal_heads_are_no_modules() -> None:
    assert template("/docs/swagger-ui.css")[0] == "/docs"
    assert template("/demo/")[0] == "/{module}"
    assert template("/runs/abc/")[0] == "/runs/{id}"
    for path in ("/runs/x/lock", "/healthz/x", "/basic/a/b/c", "/runs/a/b/c"):
        assert template(path) == ("unmatched", None, None)
    labels = {template(_path(r))[0] for r in ROUTES}
    assert labels == {r.label for r in ROUTES}
    # every literal head of the table is a name no module folder may have
    assert routes.RESERVED <= RESERVED_NAMES


def _walk(path: str) -> routes.Match | None:
    """What `match` must give: the first template of the table that binds the path."""
    parts = routes._parts(path)
    for rows in routes._BY_TEMPLATE.values():
        params = routes._bind(rows[0].segments, parts)
        if params is not None:
            return routes.Match(rows, params)
    return None


def test_the_indexed_match_is_the_first_template_of_the_table() -> None:
    # `match` looks only at the templates a path's length and first segment allow: it
    # must find what a walk of the whole table finds, for every shape of path.
    heads = [*sorted(routes.RESERVED), "basic", "demo", "", "runs.x", "{module}"]
    tails = ["x", "upgrades", "lock", "runs", "drift", "events", "apply", "cancel",
             "retry", "approve", "reject", "", "a b", "%2F"]
    paths = ["/", "//", "///"]
    for head in heads:
        paths += [f"/{head}", f"/{head}/"]
        for one in tails:
            paths += [f"/{head}/{one}", f"/{head}/{one}/"]
            for two in tails:
                paths += [f"/{head}/{one}/{two}", f"/{head}/x/{one}/{two}",
                          f"/{head}/{one}/{two}/x/y/z"]
    paths += [_path(r) for r in ROUTES]
    for path in paths:
        assert match(path) == _walk(path), path


def test_the_openapi_paths_are_the_table_s() -> None:
    doc = ApiDescription(DocSettings(auth=True, token_url="https://t/token")).document(
        {"basic": load_module(BASIC)}, Principal("local", "local", all_modules=True))
    documented = {(path, method.upper(), o["operationId"])
                  for path, item in doc["paths"].items()
                  for method, o in item.items() if method != "parameters"}
    expected = set()
    for route in ROUTES:
        if route.operation_id == "upgrade_{module}":
            continue  # `basic` has no versions: nothing to upgrade to, none documented
        path = route.label.replace("{module}", "basic").replace("{id}", "{run_id}")
        expected.add((path, route.method, route.operation_id.format(module="basic")))
    assert documented == expected
    # the access a row names is the security its operation shows
    public = {r.label for r in ROUTES if r.access is Access.PUBLIC}
    assert all(doc["paths"][p]["get"]["security"] == [] for p in public)


# -- the request interface --------------------------------------------------------------


class _Headers(dict[str, str]):
    def get_all(self, name: str, /) -> list[str] | None:
        value = self.get(name)
        return None if value is None else [value]


@dataclass
class FakeRequest:
    """Not a handler: only what a route may use."""

    command: str
    url_path: str
    headers: _Headers = field(default_factory=_Headers)
    principal: Principal | None = None
    path: str = ""
    preferences: list[str] = field(default_factory=list)
    client_ip: str = "127.0.0.1"
    request_id: str = "r1"
    raw_body: bytes = b""
    after_answer: list[Callable[[], None]] = field(default_factory=list)
    sent: list[tuple[int, bytes, str]] = field(default_factory=list)

    def param(self, name: str) -> str | None:
        return None

    def flag(self, name: str) -> bool:
        return False

    def read_body(self, *, required: bool) -> Any:
        return {} if required else None

    def send_bytes(self, status: int, data: bytes, content_type: str,
                   headers: dict[str, str] | None = None) -> None:
        self.sent.append((status, data, content_type))

    def start_stream(self, content_type: str) -> Callable[[bytes], None] | None:
        return None


class _Service:
    def index(self, principal: Principal) -> list[Any]:
        return []


def _site() -> Site:
    return Site(cast(Service, _Service()), NoAuth(), ApiDescription(DocSettings()))


def test_routes_take_a_small_request_not_the_handler() -> None:
    assert dispatch(FakeRequest("GET", "/healthz"), _site()) == Reply(200, {"status": "ok"})
    assert dispatch(FakeRequest("HEAD", "/healthz"), _site()) == Reply(200, {"status": "ok"})
    req = FakeRequest("GET", "/")
    assert dispatch(req, _site()) == Reply(200, {"modules": []})
    assert req.principal is not None and req.principal.subject == "local"
    asset = FakeRequest("GET", "/docs/nosuch.js")
    with pytest.raises(NotFound):
        dispatch(asset, _site())
    for method in ("TRACE", "CONNECT", "OPTIONS", "PATCH", "POST"):
        with pytest.raises(MethodNotAllowed) as refused:
            dispatch(FakeRequest(method, "/healthz"), _site())
        assert refused.value.headers == {"Allow": "GET"}
        assert dispatch(FakeRequest("GET", "/healthz"), _site()) is not None


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
            names.update("." * node.level + a.name for a in node.names if not node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_routes_know_neither_the_server_nor_the_service_s_parts() -> None:
    for name in ("routes.py", "operations.py", "request.py"):
        found = _imports(WEB / name)
        assert not found & {".server", ".handler", ".http11", ".openapi"}, (name, found)
        tree = ast.parse((WEB / name).read_text())
        walked = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        # the service only through its own methods; the handler's server never
        assert not walked & {"history", "catalog", "api_description", "metrics", "server",
                             "copies", "runs", "store", "governance"}, (name, walked)
    assert ".app.service" not in _imports(WEB / "openapi.py")
    assert ".web.openapi" not in _imports(WEB.parent / "app" / "service.py")


# -- over HTTP --------------------------------------------------------------------------


def _raw(server: ServerProcess, data: bytes) -> bytes:
    host, port = server.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    return got


@pytest.mark.parametrize("method", ["TRACE", "CONNECT", "OPTIONS", "PATCH"])
def test_a_standard_method_no_route_has_is_405_with_allow(server: ServerProcess,
                                                          method: str) -> None:
    for path, allow in (("/basic", "GET, POST, DELETE"), ("/basic/x", "GET, PUT, DELETE"),
                        ("/healthz", "GET"), ("/runs", "GET"),
                        ("/runs/" + "0" * 32 + "/cancel", "POST")):
        r = server.request(method, path, headers={"X-Secret": "do-not-echo-me"})
        assert r.status == 405, (method, path, r.status)
        assert r.header("Allow") == allow
        assert r.header("Content-Type") == "application/problem+json"
        assert json.loads(r.body)["status"] == 405
        assert b"do-not-echo-me" not in r.body  # TRACE stays disabled: nothing echoed


def test_trace_is_never_echoed_and_connect_to_an_authority_is_405(server: ServerProcess
                                                                  ) -> None:
    answer = _raw(server, b"TRACE /basic HTTP/1.1\r\nHost: x\r\nCookie: secret=1\r\n"
                          b"Connection: close\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405"), head
    assert b"secret=1" not in answer and b"message/http" not in head
    assert json.loads(body)["status"] == 405
    answer = _raw(server, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n"
                          b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 405"), answer[:60]
    assert b"\r\nAllow: " in answer
    # an unknown method is still the 501 RFC 9110 asks for
    assert _raw(server, b"BREW /basic HTTP/1.1\r\nHost: x\r\n\r\n").startswith(
        b"HTTP/1.1 501")


# -- answers that say the truth (issue 20, section 5) --------------------------------------


@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory, terraform_bin: str
          ) -> Iterator[ServerProcess]:
    """A server on the runs' test modules, terraform a quick shim."""
    tmp = tmp_path_factory.mktemp("web-routes")
    shim, _ = terraform_shim(tmp)
    server = start_server(tmp, modules_dir=RUN_MODULES, env={"TFSERVER_TERRAFORM": str(shim)})
    yield server
    server.stop()


@pytest.mark.parametrize(("prefer", "applied"), [
    ("wait=9999999", "wait=90"), ("wait=99999999999999999999", "wait=90"),
    ('wait="5"', "wait=5"), ("wait=0030", "wait=30"),
    # answered within the wait: the wait applied, not respond-async
    ("respond-async, wait=100", "wait=90")])
def test_prefer_wait_caps_any_number_and_takes_the_quoted_form(
        steps: ServerProcess, prefer: str, applied: str) -> None:
    r = steps.request("PUT", "/steps/prefer", run_body(0, "quick"), headers={"Prefer": prefer})
    assert r.status in (200, 201, 202), r.body
    assert r.header("Preference-Applied") == applied, (prefer, r.headers)
    if r.status == 202:
        assert wait_run(steps, r.json["id"])["status"] == "succeeded"


def test_a_quoted_wait_with_respond_async_waits_then_answers_202(steps: ServerProcess
                                                                ) -> None:
    # A run longer than the wait: 202 after the wait, both preferences applied.
    started = time.monotonic()
    r = steps.request("PUT", "/steps/prefer", run_body(3, "slow"),
                      headers={"Prefer": 'respond-async, wait="1"'})
    assert r.status == 202 and 0.9 < time.monotonic() - started < 3, r.body
    assert r.header("Preference-Applied") == "respond-async, wait=1"
    assert wait_run(steps, r.json["id"])["status"] == "succeeded"


def test_sse_resume_past_the_end_of_an_ended_run_is_204(steps: ServerProcess) -> None:
    done = steps.request("PUT", "/steps/sse", run_body(0, "sse"))
    assert done.status in (200, 201), done.body
    run_id = done.json["run_id"]
    sse = {"Accept": "text/event-stream"}
    full = steps.request("GET", f"/runs/{run_id}/events", headers=sse)
    assert full.status == 200
    last = [line for line in full.body.decode().splitlines() if line.startswith("id: ")][-1]
    for after in (last[4:], "999999"):
        r = steps.request("GET", f"/runs/{run_id}/events",
                          headers={**sse, "Last-Event-ID": after})
        assert r.status == 204 and r.body == b"", (after, r.status, r.body)
        assert r.header("Content-Length") is None
    # before the end it replays; NDJSON past the end stays an empty 200
    r = steps.request("GET", f"/runs/{run_id}/events", headers={**sse, "Last-Event-ID": "1"})
    assert r.status == 200 and b"event: finished" in r.body
    r = steps.request("GET", f"/runs/{run_id}/events?after=999999")
    assert r.status == 200 and r.body == b""


def _put(server: ServerProcess, path: str, doc: dict[str, Any], extra: bytes) -> bytes:
    data = json.dumps(doc).encode()
    return _raw(server, b"PUT " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(data)
                + extra + b"Connection: close\r\n\r\n" + data)


def test_idempotency_keys_one_header_with_balanced_quotes(steps: ServerProcess) -> None:
    key = uuid.uuid4().hex
    twice = _put(steps, "/steps/idem", run_body(0, "twice"),
                 f"Idempotency-Key: {key}-a\r\nIdempotency-Key: {key}-b\r\n".encode())
    assert twice.startswith(b"HTTP/1.1 400"), twice[:200]
    assert b"Idempotency-Key" in twice
    for bad in (f'"{key}', f'{key}"', '"', f'"{key}"x"', f'{key}"x'):
        r = steps.request("PUT", "/steps/idem", run_body(0, "bad"),
                          headers={"Idempotency-Key": bad})
        assert r.status == 400, (bad, r.status, r.body)
        assert r.json["errors"] == [{"field": "Idempotency-Key", "message": "malformed"}]
    quoted = steps.request("PUT", "/steps/idem", run_body(0, "ok"),
                           headers={"Idempotency-Key": f'"{key}"'})
    assert quoted.status in (200, 201), quoted.body
    bare = steps.request("PUT", "/steps/idem", run_body(0, "ok"),
                         headers={"Idempotency-Key": key})
    assert bare.status in (200, 201) and bare.json["run_id"] == quoted.json["run_id"]
    assert steps.request("GET", f"/runs/{quoted.json['run_id']}").json[
        "idempotency_key"] == key


def test_the_labels_kept_for_metrics_stay_bounded_under_hostile_paths_and_methods() -> None:
    """A path's label and a label set's metric children are kept between answers; paths
    and methods a client makes up (distinct, long, junk) never grow what is kept."""
    from tfserver.metrics import Metrics
    from tfserver.web import routes

    long_path = "/demo/" + "x" * 300
    for i in range(2_000):
        assert routes.template(f"/demo/i{i}") == ("/{module}/{instance}", "demo", f"i{i}")
    assert routes.template(long_path) == routes._label(long_path)
    assert routes._labelled.cache_info().currsize <= 256
    assert routes.template("/no/such/route/here") == ("unmatched", None, None)

    metrics = Metrics()
    for i in range(5_000):
        metrics.request(f"M{i}" * 50, routes.template(f"/a/b/c/d{i}")[0], 404 + i % 3, 0.001)
    assert len(metrics._children) == 3  # the method is `other`, the route `unmatched`
    text = metrics.render().decode()
    assert 'tfserver_http_requests_total{method="other",route="unmatched",status="404"}' \
        in text and "M1" not in text
