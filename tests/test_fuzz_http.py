"""The HTTP layer fuzzed with hypothesis: request lines, headers and bodies, valid and not,
against a running tfserver. No 5xx but the 501 and 505 RFC 9110 asks for, no traceback
in the log, and the server still answers afterwards."""

from __future__ import annotations

import contextlib
import shutil
import socket
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from support import TEST_MODULES, ServerProcess, start_server

ALLOWED_5XX = {501, 505}
TOKEN = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126,
                                       exclude_characters="()<>@,;:\\\"/[]?={}"),
                min_size=1, max_size=12)
PATHS = st.one_of(
    st.sampled_from(["/", "/basic", "/basic/x", "/basic/x/lock", "/basic/x/runs", "/runs",
                     "/runs/" + "0" * 32, "/runs/x/events", "/runs/x/cancel", "/healthz",
                     "/readyz", "/basic/UPPER", "/basic/../..", "//basic", "/basic?dry_run",
                     "/basic/x?tenant=abc", "/runs?limit=5&before=zz", "/%00", "/%ff%fe"]),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=80)
    .map(lambda t: "/" + t),
)
HEADER_VALUES = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
    st.sampled_from(["application/json", "respond-async", "wait=1", "100-continue",
                     "chunked", "-1", "99999999999999999999", "\u00b2", "Bearer x.y.z"]),
)
HEADER_NAMES = st.one_of(
    st.sampled_from(["Content-Type", "Content-Length", "Transfer-Encoding", "Prefer",
                     "Idempotency-Key", "Authorization", "Accept", "Last-Event-ID",
                     "X-Request-Id", "Expect", "Connection", "Host"]),
    TOKEN,
)
BODIES = st.one_of(
    st.just(b""),
    st.binary(max_size=200),
    st.sampled_from([b"{}", b'{"name": "fz"}', b"[]", b"null", b'{"name": 1e999}',
                     b'{"name": "x", "anything": [[[[[[[[]]]]]]]]}', b"\xff\xfe"]),
)


@pytest.fixture(scope="module")
def only_basic(tmp_path_factory: pytest.TempPathFactory, terraform_bin: str
               ) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(TEST_MODULES / "basic", tmp / "modules" / "basic")
    server = start_server(tmp, modules_dir=tmp / "modules",
                          env={"TFSERVER_REQUEST_TIMEOUT": "3", "TFSERVER_READ_TIMEOUT": "3",
                               "TFSERVER_LOG_LEVEL": "INFO"})
    yield server
    server.stop()


def exchange(server: ServerProcess, data: bytes) -> bytes:
    host, port = server.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        with contextlib.suppress(OSError):
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)  # the server sees the end of what we send
        got = b""
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while chunk := s.recv(65536):
                got += chunk
    return got


@seed(20261128)
@settings(max_examples=600, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(method=st.one_of(st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH",
                                         "OPTIONS"]), TOKEN),
       path=PATHS,
       version=st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/1.1", "HTTP/0.9", "HTTP/2.0",
                                "HTTP/1.x", ""]),
       headers=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=8),
       body=BODIES)
def test_no_request_makes_a_5xx_or_a_traceback(only_basic: ServerProcess, method: str,
                                               path: str, version: str,
                                               headers: list[tuple[str, str]],
                                               body: bytes) -> None:
    line = f"{method} {path} {version}".strip()
    head = "".join(f"{k}: {v}\r\n" for k, v in headers)
    if not any(k.lower() == "content-length" for k, _ in headers) and body:
        head += f"Content-Length: {len(body)}\r\n"
    data = f"{line}\r\nHost: fuzz\r\n{head}\r\n".encode("latin-1", "replace") + body
    answer = exchange(only_basic, data)
    if not answer:
        return  # closed without an answer (a request the server could not even read)
    status_line = answer.split(b"\r\n", 1)[0]
    parts = status_line.split(b" ")
    assert parts[0] in (b"HTTP/1.1", b"HTTP/1.0"), answer[:200]
    status = int(parts[1])
    assert status < 500 or status in ALLOWED_5XX, (data[:300], answer[:500])


@seed(20261129)
@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.one_of(st.binary(max_size=400),
                      st.binary(max_size=100).map(lambda b: b"GET / HTTP/1.1\r\n" + b),
                      st.binary(max_size=100).map(
                          lambda b: b"POST /basic HTTP/1.1\r\nContent-Length: 5\r\n" + b)))
def test_raw_bytes_make_no_5xx(only_basic: ServerProcess, data: bytes) -> None:
    answer = exchange(only_basic, data)
    if answer:
        status = int(answer.split(b"\r\n", 1)[0].split(b" ")[1])
        assert status < 500 or status in ALLOWED_5XX, (data[:300], answer[:500])


def test_the_server_survived_the_fuzzing(only_basic: ServerProcess) -> None:
    # runs after the fuzzing test in this module (pytest keeps file order)
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError):
            if only_basic.request("GET", "/healthz", timeout=5).status == 200:
                break
        assert time.monotonic() < deadline
        time.sleep(0.2)
    text = only_basic.log_text()
    assert "Traceback" not in text and "Logging error" not in text
    assert '"level": "error"' not in text, [
        line for line in only_basic.lines if '"level": "error"' in line][:5]
    assert only_basic.proc.poll() is None
