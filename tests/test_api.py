"""The API end to end: a real tfserver process, real sockets, the real terraform."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time
from pathlib import Path

import pytest

from support import ServerProcess, start_server, terraform_shim

SECRET = "s3cr3t-Value-Zq9x"  # a sensitive value that must never come back or be logged
SHORT_SECRET = "tiny-Qz7"  # fails the token validation, whose message repeats the value


def problem(r) -> dict:
    assert r.header("Content-Type") == "application/problem+json", r.body
    doc = r.json
    assert doc["status"] == r.status
    assert {"type", "title", "status", "detail"} <= set(doc)
    return doc


def fields(r) -> dict[str, str]:
    return {e["field"]: e["message"] for e in problem(r)["errors"]}


# -- the happy path ----------------------------------------------------------------------


def test_post_get_delete_default_instance(server: ServerProcess) -> None:
    r = server.request("POST", "/basic", {"name": "alpha"})
    assert r.status == 200, r.body
    body = r.json
    assert body["module"] == "basic" and body["instance"] == "default"
    assert body["outputs"]["name"] == "alpha"
    assert body["outputs"]["spec"] == {"tier": "small", "disks": []}
    assert body["changes"] == {"add": 1, "change": 0, "remove": 0}
    assert len(body["run_id"]) == 32

    r = server.request("GET", "/basic/default")
    assert r.status == 200
    assert r.json["outputs"]["id"] == body["outputs"]["id"]
    assert "inputs" not in r.json  # kept for destroy, never shown

    r = server.request("GET", "/basic")
    assert r.status == 200
    assert {"instance": "default", "href": "/basic/default"} in r.json["instances"]
    assert r.json["variables"]["required"] == ["name"]

    r = server.request("DELETE", "/basic")
    assert r.status == 200, r.body
    assert r.json["destroyed"] is True and r.json["changes"]["remove"] == 1
    assert server.request("GET", "/basic/default").status == 404
    assert server.request("DELETE", "/basic").status == 404


def test_put_creates_201_then_updates_200(server: ServerProcess) -> None:
    r = server.request("PUT", "/basic/web", {"name": "one"})
    assert r.status == 201, r.body
    assert r.header("Location") == "/basic/web"
    r = server.request("PUT", "/basic/web", {"name": "two"})
    assert r.status == 200, r.body
    assert r.json["outputs"]["name"] == "two"
    assert r.json["changes"]["change"] + r.json["changes"]["add"] >= 1
    r = server.request("PUT", "/basic/web", {"name": "two"})
    assert r.status == 200 and r.json["changes"] == {"add": 0, "change": 0, "remove": 0}
    assert server.request("DELETE", "/basic/web").status == 200
    assert server.request("PUT", "/basic/web", {"name": "three"}).status == 201
    assert server.request("DELETE", "/basic/web").status == 200


def test_instances_are_independent(server: ServerProcess) -> None:
    a = server.request("PUT", "/basic/ind-a", {"name": "a"})
    b = server.request("PUT", "/basic/ind-b", {"name": "b"})
    assert a.status == b.status == 201
    assert a.json["outputs"]["id"] != b.json["outputs"]["id"]
    assert server.request("DELETE", "/basic/ind-a").status == 200
    r = server.request("GET", "/basic/ind-b")
    assert r.status == 200 and r.json["outputs"]["name"] == "b"
    listed = [i["instance"] for i in server.request("GET", "/basic").json["instances"]]
    assert "ind-b" in listed and "ind-a" not in listed
    assert server.request("DELETE", "/basic/ind-b").status == 200


def test_dry_run_plans_without_applying(server: ServerProcess) -> None:
    r = server.request("PUT", "/basic/dry?dry_run=true", {"name": "x"})
    assert r.status == 200, r.body
    assert r.json["dry_run"] is True
    assert r.json["changes"]["add"] == 1
    assert {"address": "terraform_data.this", "action": "create"} in r.json["planned"]
    assert server.request("GET", "/basic/dry").status == 404
    assert server.request("PUT", "/basic/dry", {"name": "x"}).status == 201
    r = server.request("DELETE", "/basic/dry?dry_run=true")
    assert r.status == 200 and r.json["changes"]["remove"] == 1
    assert server.request("GET", "/basic/dry").status == 200
    assert server.request("DELETE", "/basic/dry").status == 200
    assert server.request("PUT", "/basic/dry?dry_run=maybe", {"name": "x"}).status == 400


def test_index_health_and_request_id(server: ServerProcess) -> None:
    r = server.request("GET", "/")
    names = [m["name"] for m in r.json["modules"]]
    assert names == ["basic", "fails", "slow"]
    assert server.request("GET", "/healthz").json == {"status": "ok"}
    ready = server.request("GET", "/readyz")
    assert ready.status == 200 and ready.json["modules"]["basic"] == "ready"
    r = server.request("GET", "/healthz", headers={"X-Request-Id": "abc-123"})
    assert r.header("X-Request-Id") == "abc-123"
    r = server.request("GET", "/healthz", headers={"X-Request-Id": "bad id\u00e9"})
    assert r.header("X-Request-Id") not in (None, "bad id\u00e9")
    assert r.header("Cache-Control") == "no-store"


def test_keep_alive_serves_several_requests_on_one_connection(server: ServerProcess) -> None:
    conn = http.client.HTTPConnection(server.url.split("//")[1], timeout=30)
    try:
        for _ in range(3):
            conn.request("GET", "/healthz")
            resp = conn.getresponse()
            assert resp.status == 200 and resp.read()
        sock = conn.sock
        conn.request("GET", "/nope")
        resp = conn.getresponse()
        assert resp.status == 404 and resp.read()
        assert conn.sock is sock  # same connection throughout
    finally:
        conn.close()


# -- 400: bad input, every field error at once -------------------------------------------


def test_body_not_json(server: ServerProcess) -> None:
    r = server.request("POST", "/basic", raw=b"{nope", headers={"Content-Type": "application/json"})
    assert r.status == 400 and "not valid JSON" in problem(r)["detail"]
    r = server.request("POST", "/basic", raw=b'{"name": NaN}',
                       headers={"Content-Type": "application/json"})
    assert r.status == 400
    r = server.request("POST", "/basic", raw=b"\xff\xfe",
                       headers={"Content-Type": "application/json"})
    assert r.status == 400


@pytest.mark.parametrize("body", [[], "name", 3, None])
def test_body_not_an_object(server: ServerProcess, body: object) -> None:
    r = server.request("POST", "/basic", raw=json.dumps(body).encode(),
                       headers={"Content-Type": "application/json"})
    assert r.status == 400
    assert fields(r) == {"": "must be a JSON object"}


def test_every_field_error_listed_at_once(server: ServerProcess) -> None:
    r = server.request("POST", "/basic", {
        "count_of": "three",
        "enabled": "yes",
        "labels": {"a": 1},
        "zones": ["a", "a"],
        "pair": ["a"],
        "spec": {"disks": [{"size": "big", "colour": "red"}]},
        "strict_nonnull": None,
        "nope": 1,
        "token": 12345678901234,
    })
    assert r.status == 400
    assert fields(r) == {
        "name": "required variable is missing",
        "count_of": "must be a number or null",
        "enabled": "must be true or false or null",
        "labels.a": "must be a string",
        "zones": "must not repeat an item (it is a set)",
        "pair": "must have exactly 2 items",
        "spec.tier": "required attribute is missing",
        "spec.disks[0].size": "must be a number",
        "spec.disks[0].colour": "unknown attribute",
        "strict_nonnull": "must be a string",
        "nope": "unknown variable",
        "token": "must be a string or null",
    }
    assert "12345678901234" not in r.body.decode()  # messages never echo values


def test_bad_instance_name(server: ServerProcess) -> None:
    for name in ("UPPER", "-dash", "a.b", "x" * 64):
        r = server.request("PUT", f"/basic/{name}", {"name": "x"})
        assert r.status == 400, name
        assert fields(r) == {"instance": "invalid name"}


def test_any_type_and_optional_attributes_accepted(server: ServerProcess) -> None:
    r = server.request("PUT", "/basic/types", {
        "name": "t", "anything": {"deep": [1, "two", None]}, "zones": ["b", "a"],
        "pair": ["z", 2.5], "spec": {"tier": "big", "disks": [{"size": 10}, {"size": 20,
                                                                         "kind": "hdd"}]},
    })
    assert r.status == 201, r.body
    assert r.json["outputs"]["spec"]["disks"] == [{"size": 10, "kind": "ssd"},
                                                   {"size": 20, "kind": "hdd"}]
    assert server.request("DELETE", "/basic/types").status == 200


# -- 404, 405, 411, 413, 415 -------------------------------------------------------------


def test_not_found(server: ServerProcess) -> None:
    assert problem(server.request("GET", "/nosuch"))["status"] == 404
    assert server.request("POST", "/nosuch", {"name": "x"}).status == 404
    assert server.request("GET", "/basic/never-made").status == 404
    assert server.request("DELETE", "/basic/never-made").status == 404
    assert server.request("GET", "/basic/a/b/c").status == 404
    assert server.request("GET", "/../../etc/passwd").status == 404


def test_method_not_allowed_lists_allow(server: ServerProcess) -> None:
    r = server.request("PUT", "/basic", {"name": "x"})
    assert r.status == 405 and r.header("Allow") == "GET, POST, DELETE"
    r = server.request("POST", "/basic/x", {"name": "x"})
    assert r.status == 405 and r.header("Allow") == "GET, PUT, DELETE"
    r = server.request("PATCH", "/basic/x", {"name": "x"})
    assert r.status == 405
    r = server.request("DELETE", "/healthz")
    assert r.status == 405 and r.header("Allow") == "GET"
    problem(r)


def test_unsupported_media_type(server: ServerProcess) -> None:
    r = server.request("POST", "/basic", raw=b'{"name": "x"}',
                       headers={"Content-Type": "text/plain"})
    assert r.status == 415
    problem(r)
    r = server.request("POST", "/basic", raw=b"name=x",
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 415


def test_body_too_large_is_refused_unread(server: ServerProcess) -> None:
    big = b'{"name": "' + b"x" * (1024 * 1024 + 10) + b'"}'
    r = server.request("POST", "/basic", raw=big, headers={"Content-Type": "application/json"})
    assert r.status == 413
    assert r.header("Connection") == "close"
    problem(r)


def test_chunked_body_needs_length(server: ServerProcess) -> None:
    host, port = server.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /basic HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n0\r\n\r\n")
        data = s.recv(65536)
    assert data.startswith(b"HTTP/1.1 411")


def test_slow_client_is_cut_off(tmp: Path) -> None:
    srv = start_server(tmp, env={"TFSERVER_READ_TIMEOUT": "1"})
    try:
        host, port = srv.url.split("//")[1].split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /basic HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{")
            started = time.monotonic()
            data = s.recv(65536)
            # closed without an answer, and soon: no thread waits for the body forever
            assert data == b"" or data.startswith(b"HTTP/1.1 4")
            assert time.monotonic() - started < 8
        assert srv.request("GET", "/healthz").status == 200
    finally:
        srv.stop()


# -- 422 and 502: terraform's own verdicts, scrubbed --------------------------------------


def test_validation_failure_is_422_and_never_shows_the_secret(server: ServerProcess) -> None:
    r = server.request("PUT", "/basic/val", {"name": "v", "token": SHORT_SECRET})
    assert r.status == 422, r.body
    doc = problem(r)
    assert doc["diagnostics"][0]["summary"] == "Invalid value for variable"
    assert "is too short" in doc["diagnostics"][0]["detail"]
    assert doc["errors"] == [{"field": "token",
                              "message": "The token (sensitive value) is too short."}]
    assert SHORT_SECRET not in r.body.decode()
    assert server.request("GET", "/basic/val").status == 404
    time.sleep(0.2)
    assert SHORT_SECRET not in server.log_text()


def test_apply_failure_is_502_with_terraforms_summary(server: ServerProcess) -> None:
    r = server.request("PUT", "/fails/one", {"secret": SECRET})
    assert r.status == 502, r.body
    doc = problem(r)
    assert "local-exec provisioner error" in doc["detail"]
    assert doc["diagnostics"] and "exit status 3" in doc["diagnostics"][0]["detail"]
    assert SECRET not in r.body.decode()
    # The apply began, so the inputs are kept and a destroy can clean up.
    r = server.request("DELETE", "/fails/one")
    assert r.status == 200, r.body
    time.sleep(0.2)
    assert SECRET not in server.log_text()


def test_sensitive_outputs_redacted_and_secret_never_returned(server: ServerProcess) -> None:
    r = server.request("PUT", "/basic/sens", {"name": "s", "token": SECRET})
    assert r.status == 201, r.body
    assert r.json["outputs"]["token_out"] == "<sensitive>"
    got = server.request("GET", "/basic/sens")
    assert got.json["outputs"]["token_out"] == "<sensitive>"
    described = server.request("GET", "/basic")
    assert described.json["outputs"]["token_out"]["sensitive"] is True
    for resp in (r, got, described, server.request("DELETE", "/basic/sens")):
        assert SECRET not in resp.body.decode()
    time.sleep(0.2)
    assert SECRET not in server.log_text()


# -- terraform processes per request -----------------------------------------------------


def test_no_init_and_no_output_process_per_request(tmp: Path) -> None:
    shim, log = terraform_shim(tmp)
    srv = start_server(tmp, env={"TFSERVER_TERRAFORM": str(shim),
                                 "TFSERVER_TMP_DIR": str(tmp / "vars")})
    try:
        startup = log.read_text().splitlines()
        assert sum(1 for c in startup if c.startswith("init")) == 3  # once per module, at start

        def calls(method: str, path: str, body: object = None) -> list[str]:
            before = len(log.read_text().splitlines())
            r = srv.request(method, path, body)
            assert r.status in (200, 201), r.body
            return log.read_text().splitlines()[before:]

        new = calls("PUT", "/basic/count", {"name": "a"})
        assert [c.split()[0] for c in new] == ["apply"], new
        assert "-var-file=" in new[0] and "-json" in new[0]
        assert "a" not in new[0].split()  # values travel in the file, never in argv
        again = calls("PUT", "/basic/count", {"name": "b"})
        assert [c.split()[0] for c in again] == ["apply"]
        assert calls("GET", "/basic/count") == []  # reads come from the state file
        assert calls("GET", "/basic") == []
        gone = calls("DELETE", "/basic/count")
        assert [c.split()[:2] for c in gone] == [["destroy", "-json"], ["workspace", "delete"]]
        # The var file is gone after each run.
        assert list((tmp / "vars").iterdir()) == []
    finally:
        srv.stop()


def test_kept_inputs_are_private(server: ServerProcess) -> None:
    # The inputs kept for destroy are readable by the owner only.
    assert server.request("PUT", "/basic/perm", {"name": "p", "token": SECRET}).status == 201
    inputs = list(Path(server_state_dir(server)).glob("_inputs/basic/*.json"))
    assert inputs and all(p.stat().st_mode & 0o077 == 0 for p in inputs)
    assert server.request("DELETE", "/basic/perm").status == 200


def server_state_dir(server: ServerProcess) -> str:
    for rec in server.log_records():
        if rec.get("state_dir"):
            return str(rec["state_dir"])
    raise AssertionError("the start-up log names the state folder")


def test_terraform_is_not_given_the_servers_environment(tmp: Path) -> None:
    # A module that prints its environment into an output shows what terraform got.
    mod = tmp / "mods" / "envdump"
    mod.mkdir(parents=True)
    (mod / "main.tf").write_text(
        'resource "terraform_data" "e" {\n'
        '  provisioner "local-exec" {\n'
        f'    command = "env > {tmp}/env.txt"\n'
        "  }\n}\n"
    )
    srv = start_server(tmp, modules_dir=tmp / "mods",
                       env={"SERVER_ONLY_SECRET": "do-not-pass",
                            "DIGITALOCEAN_API_TOKEN": "dop_v1"})
    try:
        assert srv.request("POST", "/envdump", {}).status == 200
        env = dict(line.split("=", 1) for line in (tmp / "env.txt").read_text().splitlines()
                   if "=" in line)
        assert "SERVER_ONLY_SECRET" not in env
        assert env["DIGITALOCEAN_TOKEN"] == "dop_v1"
        assert env["TF_IN_AUTOMATION"] == "1"
        assert env["TF_WORKSPACE"] == "local.default"
    finally:
        srv.stop()


def test_rejected_update_keeps_the_inputs_destroy_needs(server: ServerProcess) -> None:
    # The kept inputs are written while terraform runs; a run that changed nothing must
    # put the previous ones back, or the destroy below would fail the token validation.
    good = {"name": "keep", "token": "long-enough-token-1"}
    assert server.request("PUT", "/basic/keep", good).status == 201
    bad = server.request("PUT", "/basic/keep", {"name": "keep", "token": "short"})
    assert bad.status == 422
    r = server.request("DELETE", "/basic/keep")
    assert r.status == 200, r.body
    # a new instance whose first run is rejected leaves no inputs behind
    assert server.request("PUT", "/basic/never", {"name": "n", "token": "short"}).status == 422
    assert not list(Path(server_state_dir(server)).glob("_inputs/basic/local.never*"))


def test_http_servers_own_errors_are_problem_documents(server: ServerProcess) -> None:
    host, port = server.url.split("//")[1].split(":")
    for raw, status in ((b"FOO /basic HTTP/1.1\r\nHost: x\r\n\r\n", b"501"),
                        (b"GET /basic HTTP/1.1 extra\r\n\r\n", b"400"),
                        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"414")):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(raw)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 " + status), head
        assert b"Content-Type: application/problem+json" in head
        assert json.loads(body)["status"] == int(status)
        assert b"extra" not in body and b"aaaa" not in body  # the request is not echoed


def test_connection_cap_closes_extra_connections(tmp: Path) -> None:
    # Three places, and one more kept for health checks (issue 20 §4): past all four, a
    # connection is closed at once, even a health check's.
    srv = start_server(tmp, env={"TFSERVER_MAX_CONNECTIONS": "3", "TFSERVER_READ_TIMEOUT": "2",
                                 "TFSERVER_HEALTH_CONNECTIONS": "1"})
    host, port = srv.url.split("//")[1].split(":")
    try:
        def still_open(s: socket.socket) -> bool:
            s.setblocking(False)
            try:
                return s.recv(1, socket.MSG_PEEK) != b""
            except BlockingIOError:
                return True  # nothing to read, not closed
            except ConnectionError:
                return False
            finally:
                s.settimeout(10)

        # Earlier connections' threads may hold a place for a moment: retry until all
        # four idle connections were really accepted (bounded).
        for _ in range(20):
            idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(4)]
            time.sleep(0.3)
            if all(still_open(s) for s in idle):
                break
            for s in idle:
                s.close()
            time.sleep(2.5)  # past the read timeout: every place is free again
        else:
            raise AssertionError("could not hold four connections open")
        with socket.create_connection((host, int(port)), timeout=10) as extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            with contextlib.suppress(ConnectionResetError):
                assert extra.recv(1024) == b""  # closed without an answer
        for s in idle:  # the read timeout frees their places
            assert s.recv(1024) == b""
            s.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                if srv.request("GET", "/healthz").status == 200:
                    break
            except (ConnectionError, http.client.RemoteDisconnected):
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        srv.stop()


def test_an_unread_body_closes_the_connection(server: ServerProcess) -> None:
    conn = http.client.HTTPConnection(server.url.split("//")[1], timeout=30)
    try:
        conn.request("POST", "/nosuch", body=b'{"name": "GET /healthz HTTP/1.1"}',
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 404
        assert resp.getheader("Connection") == "close"  # never read the body as a request
        conn.request("GET", "/healthz")  # http.client reconnects
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read()
    finally:
        conn.close()


def test_a_module_in_json_syntax_is_served(tmp: Path) -> None:
    mod = tmp / "mods" / "jsonmod"
    mod.mkdir(parents=True)
    (mod / "main.tf.json").write_text(json.dumps({
        "variable": {"name": {"type": "string"}},
        "resource": {"terraform_data": {"this": {"input": "${var.name}"}}},
        "output": {"name": {"value": "${terraform_data.this.output}"}},
    }))
    srv = start_server(tmp, modules_dir=tmp / "mods")
    try:
        assert srv.request("PUT", "/jsonmod/a", {"name": 1}).status == 400
        r = srv.request("PUT", "/jsonmod/a", {"name": "from-json"})
        assert r.status == 201 and r.json["outputs"] == {"name": "from-json"}
        assert srv.request("DELETE", "/jsonmod/a").status == 200
    finally:
        srv.stop()
