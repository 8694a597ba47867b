"""The route table: dispatch, Allow/405, HEAD, metrics labels and the OpenAPI paths all
read from it; routes take a small request interface; methods no route has are 405."""

from __future__ import annotations

import ast
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from support import ServerProcess
from tfserver.app.service import Service
from tfserver.auth import NoAuth, Principal
from tfserver.errors import MethodNotAllowed, NotFound
from tfserver.module.discover import load_module
from tfserver.web import routes
from tfserver.web.openapi import ApiDescription, DocSettings
from tfserver.web.request import Reply, Site
from tfserver.web.routes import ROUTES, Access, dispatch, match, template

WEB = Path(routes.__file__).parent
BASIC = Path(__file__).resolve().parent / "modules" / "basic"
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


def test_the_openapi_paths_are_the_table_s() -> None:
    doc = ApiDescription(DocSettings(auth=True, token_url="https://t/token")).document(
        {"basic": load_module(BASIC)}, Principal("local", "local", all_modules=True))
    documented = {(path, method.upper(), o["operationId"])
                  for path, item in doc["paths"].items()
                  for method, o in item.items() if method != "parameters"}
    expected = set()
    for route in ROUTES:
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
