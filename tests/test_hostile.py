"""Hostile clients and faults (issue 15): each hole found by trying to break the server,
closed, and proven here against a real tfserver over real sockets."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import (
    ROOT,
    TEST_MODULES,
    Moto,
    ServerProcess,
    launch,
    request,
    start_server,
    terraform_shim,
)
from test_runs import MODULES as RUN_MODULES
from test_runs import sleepers, wait_sleeping

HOSTILE_MODULES = ROOT / "tests" / "modules_hostile"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, terraform_bin: str
        ) -> Iterator[tuple[ServerProcess, Path]]:
    tmp = tmp_path_factory.mktemp("hostile")
    shim, log = terraform_shim(tmp)
    server = start_server(tmp, env={"TFSERVER_TERRAFORM": str(shim)})
    yield server, log
    server.stop()


def raw(server: ServerProcess, data: bytes, *, source: str = "127.0.0.1",
        timeout: float = 10) -> bytes:
    """Send raw bytes on a new connection; everything the server answers until it closes."""
    host, port = server.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout,
                                  source_address=(source, 0)) as s:
        s.sendall(data)
        got = b""
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while chunk := s.recv(65536):
                got += chunk
        return got


def terraform_calls(log: Path) -> int:
    return len(log.read_text().splitlines())


# -- 1. nesting bombs and wide bodies ------------------------------------------------------


def test_deep_and_wide_bodies_are_400_before_terraform(srv: tuple[ServerProcess, Path]
                                                        ) -> None:
    server, log = srv
    before = terraform_calls(log)
    for depth in (33, 400, 900, 10_000):
        body = '{"name": "x", "anything": ' + "[" * depth + "]" * depth + "}"
        r = server.request("PUT", "/basic/bomb", raw=body.encode(),
                           headers={"Content-Type": "application/json"})
        assert r.status == 400, (depth, r.body[:300])
        assert r.json["errors"][0]["field"] == "anything"
        assert "deep" in r.json["errors"][0]["message"]
    ok = '{"name": "x", "anything": ' + "[" * 31 + "]" * 31 + "}"
    assert server.request("PUT", "/basic/bomb?dry_run=true", raw=ok.encode(),
                          headers={"Content-Type": "application/json"}).status == 200
    wide = b'{"name": "x", "anything": [' + b",".join([b"1"] * 500_000) + b"]}"
    started = time.monotonic()
    r = server.request("PUT", "/basic/bomb", raw=wide,
                       headers={"Content-Type": "application/json"})
    assert r.status == 400 and time.monotonic() - started < 5, r.body[:300]
    assert terraform_calls(log) - before == 1  # only the dry run of the allowed body


# -- 3. numbers --------------------------------------------------------------------------


def test_huge_and_non_finite_numbers_are_400(srv: tuple[ServerProcess, Path]) -> None:
    server, log = srv
    before = terraform_calls(log)
    for number in ("1" * 4300, "1e400", "-1e400", "NaN", "Infinity", "1" * 101):
        body = f'{{"name": "x", "count_of": {number}}}'.encode()
        r = server.request("PUT", "/basic/numbers", raw=body,
                           headers={"Content-Type": "application/json"})
        assert r.status == 400, (number[:10], r.body[:300])
        assert number[:20] not in r.body.decode() or number in ("NaN", "Infinity")
    assert terraform_calls(log) == before


def test_a_huge_output_is_answered_exactly_and_read_back(tmp: Path) -> None:
    server = start_server(tmp, modules_dir=HOSTILE_MODULES)
    try:
        r = server.request("PUT", "/bignum/b", {"thousands": 5})
        assert r.status == 201, r.body[:500]
        digits = "1" + "0" * 5000
        assert json.loads(r.body, parse_int=str)["outputs"]["big"] == digits
        got = server.request("GET", "/bignum/b")
        assert got.status == 200 and json.loads(got.body, parse_int=str)["outputs"][
            "big"] == digits
        assert server.request("DELETE", "/bignum/b").status == 200
    finally:
        server.stop()


# -- 2. slow clients -----------------------------------------------------------------------


def test_trickling_clients_cannot_lock_others_out(tmp: Path) -> None:
    server = start_server(tmp, env={"TFSERVER_MAX_CONNECTIONS": "16",
                                    "TFSERVER_MAX_CONNECTIONS_PER_IP": "6",
                                    "TFSERVER_REQUEST_TIMEOUT": "4",
                                    "TFSERVER_READ_TIMEOUT": "30"})
    host, port = server.url.split("//")[1].split(":")
    stop = threading.Event()
    cut_after: list[float] = []

    def trickle() -> None:
        started = time.monotonic()
        with contextlib.suppress(OSError), socket.create_connection(
                (host, int(port)), timeout=30, source_address=("127.0.0.1", 0)) as s:
            for byte in b"POST /basic HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n":
                if stop.is_set():
                    return
                s.sendall(bytes([byte]))
                time.sleep(0.5)
            cut_after.append(time.monotonic() - started)  # never cut: a failure
            return
        cut_after.append(time.monotonic() - started)

    threads = [threading.Thread(target=trickle) for _ in range(10)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)  # every slot of 127.0.0.1 is taken by a trickler
        for _ in range(5):  # a client from another address is served at once
            started = time.monotonic()
            answer = raw(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                                 b"Connection: close\r\n\r\n", source="127.0.0.2", timeout=5)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
            assert time.monotonic() - started < 1.0
        for t in threads:
            t.join(20)
        # the tricklers were cut off at the request deadline, or refused at the per-address cap
        assert len(cut_after) == 10 and max(cut_after) < 10, cut_after
    finally:
        stop.set()
        server.stop()


# -- 6. request smuggling ------------------------------------------------------------------


def test_two_content_lengths_or_odd_digits_are_400_and_close(
        srv: tuple[ServerProcess, Path]) -> None:
    server, _ = srv
    smuggle = (b"POST /basic?dry_run=true HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
               b"\r\nContent-Length: 2\r\nContent-Length: 60\r\n\r\n{}"
               b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = raw(server, smuggle)
    assert answer.startswith(b"HTTP/1.1 400") and answer.count(b"HTTP/1.1") == 1, answer
    assert b"Connection: close" in answer
    odd = "POST /basic HTTP/1.1\r\nHost: x\r\nContent-Length: \u00b2\r\n\r\n{}".encode()
    assert raw(server, odd).startswith(b"HTTP/1.1 400")


# -- 7. 413 readable ----------------------------------------------------------------------


def test_413_reaches_the_client(srv: tuple[ServerProcess, Path]) -> None:
    server, _ = srv
    big = b'{"name": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    for _ in range(3):  # not a lucky race: every time
        r = server.request("POST", "/basic", raw=big,
                           headers={"Content-Type": "application/json"})
        assert r.status == 413 and r.json["status"] == 413
    curl = shutil.which("curl")
    if curl:
        done = subprocess.run([curl, "-s", "-o", "/dev/null", "-w", "%{http_code}",
                               "-H", "Content-Type: application/json", "--data-binary", "@-",
                               f"{server.url}/basic"], input=big, capture_output=True,
                              timeout=60)
        assert done.stdout == b"413", done.stderr
    # Expect: 100-continue with a body that will be refused: 413 first, no 100 Continue
    answer = raw(server, b"POST /basic HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                         b"\r\nExpect: 100-continue\r\nContent-Length: 99999999\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413") and b"100 Continue" not in answer
    # and an acceptable one gets its 100 Continue
    host, port = server.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /basic?dry_run=true HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nExpect: 100-continue\r\nContent-Length: 13\r\n\r\n")
        assert s.recv(1024).startswith(b"HTTP/1.1 100 Continue")
        s.sendall(b'{"name": "y"}')
        assert s.recv(65536).startswith(b"HTTP/1.1 200")



def test_an_early_413_on_a_kept_connection_is_logged_with_its_own_path(
        srv: tuple[ServerProcess, Path]) -> None:
    # The 413 is answered before the request is dispatched: its access line must not
    # carry the previous request's path or id.
    server, _ = srv
    host, port = server.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-Id: first-of-two\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        s.sendall(b"POST /basic/early-413 HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nExpect: 100-continue\r\n"
                  b"Content-Length: 99999999\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 413")
    lines = server.records(lambda r: r.get("logger") == "tfserver.access"
                           and r.get("status") == 413 and r.get("path") == "/basic/early-413")
    assert lines, "no access line for the early 413 under its own path"
    assert lines[-1]["request_id"] != "first-of-two"

# -- 8, 9. protocol errors logged once each, HEAD ------------------------------------------


def test_protocol_errors_write_one_line_and_an_access_line(srv: tuple[ServerProcess, Path]
                                                          ) -> None:
    server, _ = srv
    cases = {
        b"GET /basic HTTP/1.1 extra\r\n\r\n": b"400",
        b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n": b"414",
        b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(120)) + b"\r\n":
            b"431",
        b"BREW /coffee HTTP/1.1\r\nHost: x\r\n\r\n": b"501",
        b"GET / HTTP/2.0\r\n\r\n": b"505",
    }
    before = len(server.lines)
    for data, status in cases.items():
        assert raw(server, data).startswith(b"HTTP/1.1 " + status), (data[:40], status)
    time.sleep(0.3)
    new = server.lines[before:]
    text = "\n".join(new)
    assert "Logging error" not in text and "Traceback" not in text
    access = [json.loads(line) for line in new if '"tfserver.access"' in line]
    assert sorted(a["status"] for a in access if a["status"] >= 400) == [400, 414, 431, 501, 505]
    assert all(json.loads(line) for line in new)  # every line is one JSON document


def test_head_answers_wherever_get_does(srv: tuple[ServerProcess, Path]) -> None:
    server, _ = srv
    for path in ("/healthz", "/readyz", "/", "/basic", "/runs"):
        r = server.request("HEAD", path)
        get = server.request("GET", path)
        assert r.status == get.status == 200 and r.body == b"", path
        assert r.header("Content-Type") == get.header("Content-Type")
    curl = shutil.which("curl")
    if curl:
        done = subprocess.run([curl, "-sI", f"{server.url}/healthz"], capture_output=True,
                              text=True, timeout=30)
        assert done.stdout.startswith("HTTP/1.1 200"), done.stdout


# -- 10. draining --------------------------------------------------------------------------


def test_draining_refuses_new_connections_and_closes_kept_ones(tmp: Path) -> None:
    server = start_server(tmp, modules_dir=RUN_MODULES, env={"TFSERVER_SHUTDOWN_GRACE": "30"})
    host, port = server.url.split("//")[1].split(":")
    kept = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        kept.request("GET", "/healthz")
        assert kept.getresponse().read()
        running = server.request("PUT", "/steps/drain", {"seconds": 3},
                                 headers={"Prefer": "respond-async"})
        assert running.status == 202
        deadline = time.monotonic() + 20
        while server.request("GET", f"/runs/{running.json['id']}").json["status"] != \
                "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, int(port)), timeout=2).close()
        kept.request("GET", "/healthz")
        resp = kept.getresponse()
        assert resp.status == 503 and resp.getheader("Connection") == "close"
        resp.read()
        assert server.proc.wait(timeout=60) == 0
    finally:
        kept.close()
        server.stop()


# -- 11. nothing of a stopped run survives -----------------------------------------------


def test_timeout_and_shutdown_leave_no_process(tmp: Path) -> None:
    server = start_server(tmp, modules_dir=RUN_MODULES, env={
        "TFSERVER_RUN_TIMEOUT": "3", "TFSERVER_KILL_GRACE": "3",
        "TFSERVER_SHUTDOWN_GRACE": "1"})
    try:
        r = server.request("PUT", "/steps/late", {"seconds": 47})
        assert r.status == 504, r.body
        assert sleepers("47") == []
        running = server.request("PUT", "/steps/stop", {"seconds": 53},
                                 headers={"Prefer": "respond-async"})
        wait_sleeping("53")
        assert running.status == 202
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0
        assert sleepers("53") == []
    finally:
        server.stop()


# -- 5. state folder permissions -----------------------------------------------------------


def loose(root: Path) -> list[str]:
    found = []
    for folder, dirs, files in os.walk(root):
        for name in [folder, *(os.path.join(folder, f) for f in files)]:
            st = os.lstat(name)
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
                found.append(f"{oct(st.st_mode & 0o777)} {name}")
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]
    return found


def test_every_file_under_the_state_folder_is_private(tmp: Path) -> None:
    state = tmp / "state"
    (state / "state" / "basic" / "old").mkdir(parents=True, mode=0o755)
    (state / "state" / "basic" / "old" / "terraform.tfstate").write_text("{}")
    os.chmod(state, 0o755)
    os.chmod(state / "state" / "basic" / "old" / "terraform.tfstate", 0o644)
    server = start_server(tmp, env={"TFSERVER_TMP_DIR": str(tmp / "vars")})
    try:
        assert loose(state) == []  # tightened at start
        assert server.request("PUT", "/basic/perm", {"name": "a"}).status == 201
        assert server.request("PUT", "/basic/perm", {"name": "b"}).status == 200
        assert server.request("PUT", "/basic/perm?dry_run=true", {"name": "c"}).status == 200
        r = server.request("PUT", "/basic/perm2", {"name": "d"},
                           headers={"Prefer": "respond-async"})
        assert r.status == 202
        deadline = time.monotonic() + 30
        while server.request("GET", f"/runs/{r.json['id']}").json["status"] != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert server.request("DELETE", "/basic/perm").status == 200
        assert loose(state) == [] and loose(tmp / "vars") == []
    finally:
        server.stop()


# -- 12. reads while terraform rewrites, and after a kill mid-write -----------------------


def test_a_half_written_state_serves_the_last_complete_one(tmp: Path) -> None:
    server = start_server(tmp)
    try:
        assert server.request("PUT", "/basic/torn", {"name": "first"}).status == 201
        assert server.request("PUT", "/basic/torn", {"name": "second"}).status == 200
        path = tmp / "state" / "state" / "basic" / "local.torn" / "terraform.tfstate"
        path.write_text(path.read_text()[:50])  # caught mid-write
        r = server.request("GET", "/basic/torn")
        assert r.status == 200 and r.json["stale"] is True
        assert r.json["outputs"]["name"] == "first"  # terraform's backup of the last one
        path.write_text("")  # what a SIGKILL mid-write leaves
        assert server.request("GET", "/basic/torn").json["stale"] is True
        assert server.request("PUT", "/basic/torn", {"name": "third"}).status == 200
        assert "stale" not in server.request("GET", "/basic/torn").json
        # a first apply killed mid-write: no complete state, no backup: no instance yet
        fresh = path.parent.parent / "local.fresh" / "terraform.tfstate"
        fresh.parent.mkdir()
        fresh.write_text("")
        assert server.request("GET", "/basic/fresh").status == 404
        assert server.request("PUT", "/basic/fresh", {"name": "f"}).status == 201
    finally:
        server.stop()


# -- 13. a backend change -------------------------------------------------------------------


def test_a_changed_backend_is_reinitialised_not_refused(tmp: Path, moto: Moto) -> None:
    bucket = f"tfstate-{os.urandom(6).hex()}"
    moto.client("s3").create_bucket(Bucket=bucket)
    local = start_server(tmp)
    assert local.request("PUT", "/basic/moved", {"name": "local"}).status == 201
    local.stop()
    s3 = start_server(tmp, env={"TFSERVER_BACKEND": "s3", "TF_STATE_BUCKET": bucket,
                                "TF_STATE_ENDPOINT": moto.url, **moto.aws_env()})
    try:
        ready = s3.request("GET", "/readyz").json
        assert ready["modules"]["basic"] == "ready" and ready["backend"] == "s3: ok"
        assert s3.request("PUT", "/basic/moved", {"name": "s3"}).status == 201  # not migrated
        assert s3.records(lambda r: "the backend changed" in r.get("message", ""))
        assert s3.request("DELETE", "/basic/moved").status == 200
    finally:
        s3.stop()


# -- 16, 17. start-up --------------------------------------------------------------------


def test_the_modules_folder_defaults_to_the_working_directory(tmp: Path) -> None:
    shutil.copytree(TEST_MODULES / "basic", tmp / "modules" / "here")
    server = launch([sys.executable, "-m", "tfserver", "--port", "0"], cwd=tmp,
                    env={"PATH": os.environ["PATH"], "HOME": str(tmp)})
    try:
        assert [m["name"] for m in request(server.url, "GET", "/").json["modules"]] == ["here"]
    finally:
        server.stop()


def test_a_missing_terraform_stops_the_start_with_one_line(tmp: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "tfserver", "--port", "0"], cwd=ROOT,
                          env={"PATH": os.environ["PATH"], "TFSERVER_TERRAFORM": "/no/such/tf",
                               "TFSERVER_STATE_DIR": str(tmp / "s"),
                               "TFSERVER_MODULES_DIR": str(TEST_MODULES)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "TFSERVER_TERRAFORM" in done.stderr
