"""A request's head (web/head.py): read as http.server read it, but with less code and
refusing what RFC 9112 says is no header field (a space before the colon, a folded
line, control characters)."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import socket
from collections.abc import Iterator
from http import HTTPStatus

import pytest

from support import ServerProcess, start_server
from tfserver.web.head import (
    MAX_FIELD_BYTES,
    MAX_LINE,
    MAX_LINES,
    BadHead,
    read_fields,
    request_line,
)


def _fields(block: bytes) -> list[tuple[str, str]]:
    return list(read_fields(io.BytesIO(block)).items())


@pytest.mark.parametrize("block", [
    b"Host: x\r\n\r\n",
    b"Host: x\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n",
    b"host:x\r\nX-Empty:\r\nX-Tabs:\t a b \t\r\n\r\n",
    b"Prefer: wait=5\r\nPrefer: respond-async\r\nAccept: */*\n\n",  # bare LF line ends
    b"X-Latin: caf\xe9\r\nAuthorization: Bearer a.b.c\r\n\r\n",
    b"Host: x\r\n",  # the stream ends before the blank line
    b"\r\n",
])
def test_valid_fields_read_as_http_client_reads_them(block: bytes) -> None:
    expected = http.client.parse_headers(io.BytesIO(block))
    # The email parser keeps a value's trailing blanks; a field's value has none (OWS).
    assert _fields(block) == [(k, v.rstrip(" \t")) for k, v in expected.items()]
    fields = read_fields(io.BytesIO(block))
    assert fields.get("HOST") == expected.get("host")
    assert fields.get_all("prefer") == expected.get_all("Prefer")


@pytest.mark.parametrize("line", [
    b"Content-Length : 5\r\n",  # a space before the colon: a length a proxy did not see
    b" folded: line\r\n",  # obs-fold
    b"\tX: y\r\n",
    b"no colon here\r\n",
    b": empty name\r\n",
    b"X-Nul: a\x00b\r\n",
    b"X-CR: a\rb\r\n",
    b"X-Esc: \x1b[31m\r\n",
    b"X-Del: \x7f\r\n",
    b"Na\xefme: v\r\n",
    b"From someone\r\n",
])
def test_a_line_that_is_no_field_is_a_400(line: bytes) -> None:
    with pytest.raises(BadHead) as raised:
        read_fields(io.BytesIO(b"Host: x\r\n" + line + b"\r\n"))
    assert raised.value.status == HTTPStatus.BAD_REQUEST
    assert raised.value.message == "Bad header field"  # the line itself is not echoed


def test_the_limits_are_http_client_s() -> None:
    fields = b"".join(b"X-%d: y\r\n" % i for i in range(MAX_LINES - 1))
    assert len(_fields(fields + b"\r\n")) == MAX_LINES - 1
    with pytest.raises(BadHead) as raised:
        read_fields(io.BytesIO(fields + b"X-last: y\r\n\r\n"))
    assert raised.value.status == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
    with pytest.raises(http.client.HTTPException):  # where http.client draws the line too
        http.client.parse_headers(io.BytesIO(fields + b"X-last: y\r\n\r\n"))
    long = b"X: " + b"y" * (MAX_LINE - 5) + b"\r\n"
    assert len(long) == MAX_LINE and _fields(long + b"\r\n")[0][0] == "X"
    with pytest.raises(BadHead) as raised:
        read_fields(io.BytesIO(b"X: y" + long + b"\r\n"))
    assert raised.value.status == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE


def test_the_fields_in_all_are_bounded_and_read_no_further() -> None:
    # 99 lines of 64 KiB (6.5 MB) were read and held for each connection that sent them.
    line = b"X: " + b"y" * (60_000 - 5) + b"\r\n"
    fits = MAX_FIELD_BYTES // len(line)
    assert len(_fields(line * fits + b"\r\n")) == fits
    stream = io.BytesIO(line * 99 + b"\r\n")
    with pytest.raises(BadHead) as raised:
        read_fields(stream)
    assert raised.value.status == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
    assert raised.value.message == "Too many header bytes"
    assert stream.tell() <= MAX_FIELD_BYTES + 1  # stopped at the budget


@pytest.mark.parametrize(("text", "parts"), [
    ("GET /basic HTTP/1.1", ("GET", "/basic", "HTTP/1.1", True)),
    ("PUT /basic/a HTTP/1.0", ("PUT", "/basic/a", "HTTP/1.0", False)),
    ("GET / HTTP/01.01", ("GET", "/", "HTTP/01.01", True)),  # leading zeros ignored
    ("GET //evil.example/x HTTP/1.1", ("GET", "/evil.example/x", "HTTP/1.1", True)),
    # RFC 9112's whitespace between the words: SP, HTAB, VT, FF, a bare CR, runs of them.
    ("GET\t/basic \x0b\x0cHTTP/1.1 \r", ("GET", "/basic", "HTTP/1.1", True)),
    ("GET /caf\xe9 HTTP/1.1", ("GET", "/caf\xe9", "HTTP/1.1", True)),  # for the route
])
def test_request_lines(text: str, parts: tuple[str, str, str, bool]) -> None:
    line = request_line(text)
    assert line is not None
    assert (line.command, line.path, line.version, line.keep_alive) == parts


@pytest.mark.parametrize(("text", "status"), [
    ("GET /basic HTTP/1.1 extra", HTTPStatus.BAD_REQUEST),
    ("GET / HTTP/1.x", HTTPStatus.BAD_REQUEST),
    ("GET / HTTP/\u0661.\u0661", HTTPStatus.BAD_REQUEST),  # digits, but not ASCII ones
    ("GET / HTTP/11111111111.1", HTTPStatus.BAD_REQUEST),
    ("GET / HTTP/2.0", HTTPStatus.HTTP_VERSION_NOT_SUPPORTED),
    ("GET / HTTP/0.9", HTTPStatus.HTTP_VERSION_NOT_SUPPORTED),
    ("GET /", HTTPStatus.HTTP_VERSION_NOT_SUPPORTED),  # HTTP/0.9: an answer without a head
    ("PUT /", HTTPStatus.BAD_REQUEST),
    ("GET", HTTPStatus.BAD_REQUEST),
    # No other whitespace separates words (str.split() took these, a proxy would not):
    # the line is then two words, its method no token.
    ("GET\xa0/basic HTTP/1.1", HTTPStatus.BAD_REQUEST),
    ("GET\x85/basic HTTP/1.1", HTTPStatus.BAD_REQUEST),
    ("GET /a\x1cb HTTP/1.1", HTTPStatus.BAD_REQUEST),  # nor any other control character
    ("GET /a\x00 HTTP/1.1", HTTPStatus.BAD_REQUEST),
    ("GET /a HTTP/1.1\x7f", HTTPStatus.BAD_REQUEST),
    ("G:T /a HTTP/1.1", HTTPStatus.BAD_REQUEST),  # a method is a token
    ("GET\x1f/x\x1fHTTP/1.1", HTTPStatus.BAD_REQUEST),
])
def test_bad_request_lines(text: str, status: HTTPStatus) -> None:
    with pytest.raises(BadHead) as raised:
        request_line(text)
    assert raised.value.status == status
    assert request_line("   ") is None  # an empty line: closed without an answer


@pytest.mark.parametrize("text", [
    # Lines ended by a bare CR: the whole head is one request line, its token a word.
    "GET /x HTTP/1.1\rAuthorization: Bearer sekrit.token.value",
    "GET /x sekrit.token.value",
    "PUT sekrit.token.value",
    "GET / HTTP/sekrit.token.value",
])
def test_no_error_repeats_the_request_line(text: str) -> None:
    with pytest.raises(BadHead) as raised:
        request_line(text)
    assert "sekrit" not in f"{raised.value.message} {raised.value.explain}"


# -- on the wire --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path_factory.mktemp("head"))
    yield srv
    srv.stop()


def _exchange(server: ServerProcess, data: bytes) -> bytes:
    host, port = server.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        got = b""
        # A head refused before it is all read is answered, then the connection closes
        # with the rest unread: the peer may see a reset after the answer (or as it sends).
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                got += chunk
    return got


def test_a_head_over_its_bytes_is_a_431_on_the_wire(server: ServerProcess) -> None:
    fields = b"".join(b"X-%d: %s\r\n" % (i, b"y" * 60_000) for i in range(6))
    answer = _exchange(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]


def test_a_smuggled_length_is_refused_on_the_wire(server: ServerProcess) -> None:
    answer = _exchange(server, b"PUT /basic/smuggled HTTP/1.1\r\nHost: x\r\n"
                               b"Content-Type: application/json\r\nContent-Length : 2\r\n"
                               b"\r\n{}")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert json.loads(body)["status"] == 400
    assert b"Connection: close" in head  # the head was refused, not the body read as one
    answer = _exchange(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Nul: a\x00b\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]


def test_keep_alive_and_close_are_read_from_the_fields(server: ServerProcess) -> None:
    two = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n" \
          b"Connection: close\r\n\r\n"
    assert _exchange(server, two).count(b"HTTP/1.1 200 ") == 2
    # HTTP/1.0 closes after one answer, unless it asks to be kept.
    one = b"GET /healthz HTTP/1.0\r\n\r\nGET /healthz HTTP/1.0\r\n\r\n"
    assert _exchange(server, one).count(b"HTTP/1.1 200 ") == 1
    kept = b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /healthz HTTP/1.0\r\n\r\n"
    assert _exchange(server, kept).count(b"HTTP/1.1 200 ") == 2


# HTTP/01.1 is 1.1 (leading zeros ignored): its Expect is answered too (a string
# comparison put it below "HTTP/1.1", and the client waited for a 100 that never came).
@pytest.mark.parametrize("version", [b"HTTP/1.1", b"HTTP/01.1"])
def test_expect_100_continue_is_answered_before_the_body(server: ServerProcess,
                                                         version: bytes) -> None:
    host, port = server.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"PUT /basic/expect " + version + b"\r\nHost: x\r\n"
                  b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
                  b"Content-Length: 14\r\nConnection: close\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n")
        s.sendall(b'{"name": "ex"}')
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert got.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 201 ")), got[:300]


def test_a_content_length_of_too_many_digits_is_refused_unread(server: ServerProcess
                                                               ) -> None:
    digits = b"9" * 5000
    answer = _exchange(server, b"PUT /basic/long HTTP/1.1\r\nHost: x\r\n"
                               b"Content-Type: application/json\r\nContent-Length: "
                               + digits + b"\r\n\r\n{}")
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"at most 18 digits" in answer and digits not in answer
    answer = _exchange(server, b"PUT /basic/long HTTP/1.1\r\nHost: x\r\n"
                               b"Content-Type: application/json\r\nExpect: 100-continue"
                               b"\r\nContent-Length: " + digits + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert digits not in answer


def test_any_transfer_encoding_ends_the_connection(server: ServerProcess) -> None:
    # An empty field first: `get` reads "", yet a proxy that joins the two sees chunked,
    # and would take the chunk below for the body where this server took a request.
    smuggled = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    two = (b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n" + smuggled + b"\r\n")
    answer = _exchange(server, two)
    assert answer.count(b"HTTP/1.1 ") == 1, answer[:400]
    assert b"Connection: close" in answer


def _logged(server: ServerProcess, status: int, count: int) -> list[dict[str, object]]:
    """The access lines of `status`, once there are `count` of them (bounded wait: a
    request's log lines follow its answer)."""
    return server.records(lambda r: r.get("status") == status, count=count, timeout=10)


def test_a_method_the_api_does_not_know_is_never_logged(server: ServerProcess) -> None:
    """Any token is a method, a bearer token's characters too: the 501's log lines held
    it whole (the access line twice, and uncut: 65,000 bytes of method, 130 KB a line).
    Such a method is logged as `other`, and its Expect gets no 100 (the 501 comes at once,
    and closes the connection)."""
    secret = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlSECRET"
    before = len(_logged(server, 501, 0))
    for method in (secret, "Z" * 65_000):
        answer = _exchange(server, method.encode() + b" /healthz HTTP/1.1\r\nHost: x\r\n"
                                                      b"Connection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 501 "), answer[:200]
    answer = _exchange(server, b"get /basic/x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                               b"Expect: 100-continue\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 501 ") and b" 100 " not in answer, answer[:200]
    lines = _logged(server, 501, before + 3)[before:]
    assert [r.get("method") for r in lines] == ["other"] * 3, lines
    text = server.log_text()
    assert "SECRET" not in text and "Z" * 300 not in text
