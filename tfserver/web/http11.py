"""One HTTP/1.1 connection: requests read within their limits, answers written with
their length and the headers every answer carries, or as a stream.

Only the protocol lives here; what a request does is `handler.RequestHandler`'s. Every
error leaves through `send_problem`, so a client never sees a traceback or an HTML page.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import random
import select
import socket
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any, Protocol, cast

from .. import __version__
from ..auth import Principal
from ..config import Config
from ..errors import TFServerError
from ..metrics import method_label
from ..tls import Certificates
from .connections import DeadlineReader
from .head import BadHead, read_fields, request_line

logger = logging.getLogger(__name__)

PROBLEM = "application/problem+json"
#: After an answer that ends a connection whose request was not all read, at most this
#: much of what the client still sends is read and dropped, for at most this long.
DRAIN_LIMIT = 4 * 1024 * 1024
DRAIN_SECONDS = 5.0


def new_request_id() -> str:
    """A request's id: it names a request in logs and answers, nothing more, so it is
    drawn from `random`'s generator (seeded once from the system), where uuid4's read of
    the system's randomness was a system call (a handoff of the GIL between busy
    threads) a request. It is predictable from earlier ids: nothing may trust it as a
    secret or a capability (a client may even choose its own, X-Request-Id)."""
    return f"{random.getrandbits(128):032x}"


class Host(Protocol):
    """What a connection needs of its server."""

    @property
    def config(self) -> Config:
        """The server's configuration."""
        ...

    @property
    def certificates(self) -> Certificates | None:
        """The TLS certificates (None: plain HTTP)."""
        ...


def _loggable(text: str, method: str) -> str:
    """A protocol error's text fit for the log. It may hold a raw request line: query
    strings are cut (a token could be there), and so is a method the API does not know
    ("Unsupported method ('<a token>')": any token is a method)."""
    if method and method_label(method) == "other":
        text = text.replace(method, "<method>")
    return " ".join(word.split("?")[0] for word in text.split())[:300]


class Connection(BaseHTTPRequestHandler):
    """One connection, HTTP/1.1 with keep-alive: requests read under a deadline for head
    and body (the body itself is the request handler's: `handler.RequestHandler`), and
    answers written with their length and the headers every answer carries, or as a
    stream."""

    protocol_version = "HTTP/1.1"
    # Headers and body leave in one write (http.server flushes after each request), and
    # without Nagle's delay: two small sends would otherwise wait on the peer's delayed ACK.
    wbufsize = 1 << 16
    disable_nagle_algorithm = True
    # Per-request state; `dispatch` resets it, and these defaults hold for the errors
    # http.server answers itself before a request is dispatched.
    status = 0
    body_consumed = True
    raw_body = b""
    streaming = False
    preferences: list[str] = []
    request_id = ""
    url_path = ""
    command = ""  # http.server sets these once it has read a request line
    raw_requestline = b""
    path = ""
    principal: Principal | None = None
    client_ip = ""
    query: dict[str, list[str]] = {}
    #: What the audit line names: the run an answer carried, the title of a problem.
    audit_run: str | None = None
    #: The module and instance of the run the answer is (a `/runs/{id}` route names none).
    audit_names: tuple[str, str] | None = None
    audit_title: str | None = None

    @property
    def host(self) -> Host:
        """The server this connection belongs to."""
        return cast(Host, self.server)

    def setup(self) -> None:
        """Bound every socket read by the read timeout, and each request's head and body
        by the request deadline (slow clients are cut off)."""
        config = self.host.config
        self.request.settimeout(config.read_timeout)
        super().setup()
        self.reader = DeadlineReader(self.connection, config.read_timeout)
        self.rfile = io.BufferedReader(self.reader, 1 << 16)
        #: How soon each request's head and body must have arrived.
        self.head_timeout = config.request_timeout

    def handle_one_request(self) -> None:
        """One request: its head and body must arrive within TFSERVER_REQUEST_TIMEOUT. A
        client that goes away (a stream it cut, say) ends the connection quietly: that is
        routine, not an error."""
        self.reader.arm(self.head_timeout)
        # The defaults again: an error http.server answers before `dispatch` (a bad head,
        # an early 413) must not be logged with the previous request's path or id.
        self.status, self.request_id, self.url_path, self.client_ip = 0, "", "", ""
        self.principal = self.audit_run = self.audit_title = self.audit_names = None
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError) as e:
            self.close_connection = True
            logger.info("client connection lost: %s", type(e).__name__)

    def finish(self) -> None:
        """Flush and close the connection's files; a client that went away (a stream it
        cut) leaves nothing to tell, and is no error."""
        with contextlib.suppress(OSError):
            super().finish()
        with contextlib.suppress(OSError):
            self.rfile.close()

    def parse_request(self) -> bool:
        """The request line and header fields (`head.py`: http.server's parsing, lighter
        and stricter); False once an error is answered."""
        self.command = ""  # no request yet (an error answered now has no method)
        self.request_version = self.default_request_version
        self.close_connection = True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        try:
            line = request_line(self.requestline)
            if line is None:
                return False
            self.command, self.path, self.request_version = line.command, line.path, \
                line.version
            self.close_connection = not line.keep_alive
            http11 = line.keep_alive  # 1.1 by its numbers: "HTTP/01.1" is too
            self.headers = read_fields(self.rfile)
        except BadHead as e:
            self.send_error(e.status, e.message, e.explain)
            self.discard_rest(DRAIN_LIMIT)  # the rest of the head, and any body
            return False
        connection = self.headers.get("Connection", "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive":
            self.close_connection = False
        # Not for a method the API does not know: its 501 comes at once, and closes.
        if self.headers.get("Expect", "").lower() == "100-continue" and http11 \
                and method_label(self.command) != "other":
            return self.handle_expect_100()
        return True

    def version_string(self) -> str:
        """The Server header: the product only, not the Python version."""
        return f"tfserver/{__version__}"

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Access lines are written by `dispatch`, with timing and request id."""

    def log_error(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Protocol errors found by http.server (bad request line, timeouts), one line."""
        try:
            text = format % args
        except (TypeError, ValueError):
            text = " ".join([format, *map(str, args)])
        logger.warning("http: %s", _loggable(text, self.command))

    # -- answers ----------------------------------------------------------------------

    def send_json(self, status: int, body: dict[str, Any],
                  content_type: str = "application/json",
                  headers: dict[str, str] | None = None) -> None:
        """Write a JSON answer (see `send_bytes`)."""
        run = body.get("run_id") or (body.get("id") if "operation" in body else None)
        self.audit_run = str(run) if run else None
        if run and isinstance(body.get("module"), str) and isinstance(body.get("instance"), str):
            self.audit_names = (body["module"], body["instance"])  # a run, or its outcome
        self.audit_title = str(body["title"]) if content_type == PROBLEM else None
        self.send_bytes(status, (json.dumps(body, indent=2) + "\n").encode(), content_type,
                        headers)

    def send_bytes(self, status: int, data: bytes, content_type: str,
                   headers: dict[str, str] | None = None) -> None:
        """Write an answer with its length, the request id and the security headers;
        `headers` are added (and may replace a default such as `Cache-Control`). The
        answer goes out in one write with the headers."""
        self.status = status
        if not self.body_consumed and (
                self.transfer_encoded()
                or self.headers.get("Content-Length", "0").strip() not in ("", "0")):
            # An answer given before the body was read (401, 404, 405...): the body is
            # still in the stream and would be taken for the next request. Close instead.
            self.close_connection = True
        fields = {**self._fields(content_type), "Content-Length": str(len(data)),
                  **(headers or {})}
        if status in (204, 304):  # no body, and so neither its length nor its type
            fields.pop("Content-Length")
            fields.pop("Content-Type")
            data = b""
        if self.close_connection:
            fields["Connection"] = "close"
            self.closing()
        self.send_response(status)
        for key, value in fields.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def closing(self) -> None:
        """Called as an answer after which the connection closes is written."""

    def transfer_encoded(self) -> bool:
        """The request has a Transfer-Encoding field, even an empty one beside another
        (`headers.get` gives only the first: "" there hid a `chunked` after it)."""
        return self.headers.get_all("Transfer-Encoding") is not None

    def discard_rest(self, limit: int) -> None:
        """After an answer that ends the connection with the request not all read: send
        it, end this side, and read and drop up to `limit` bytes of what the client still
        sends (within DRAIN_SECONDS). Closed with unread data, the socket would reset the
        connection, and the client could lose the answer."""
        with contextlib.suppress(OSError, ValueError):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.reader.arm(DRAIN_SECONDS)
            while limit > 0:
                chunk = self.rfile.read1(min(limit, 1 << 16))
                if not chunk:
                    break
                limit -= len(chunk)

    def _fields(self, content_type: str) -> dict[str, str]:
        """The headers of every answer."""
        fields = {"Content-Type": content_type, "X-Request-Id": self.request_id,
                  "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
        if self.host.certificates is not None:
            fields["Strict-Transport-Security"] = "max-age=31536000"
        return fields

    def answered(self, seconds: float) -> None:
        """A hook: an answer went out (`RequestHandler` logs it and counts it)."""

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """Errors http.server finds itself (bad request line, unknown method, headers too
        long): a problem document too, never an HTML page that echoes the request line."""
        status = HTTPStatus(code)
        self.log_error("code %d, message %s", code, message)
        # A request line too broken to name its version still gets an HTTP/1.1 answer.
        self.request_version = "HTTP/1.1"
        self.close_connection = True
        if not self.request_id:
            self.request_id = new_request_id()
        error = TFServerError(status.description)
        error.status = status
        self.send_problem(error)
        self.answered(0.0)

    def send_problem(self, error: TFServerError) -> None:
        """Write an RFC 9457 problem document for `error` (unless a stream has begun: then
        the only honest answer left is to close the connection)."""
        if self.streaming:
            self.close_connection = True
            logger.warning("stream ended by an error: %s", error.detail)
            return
        self.send_json(int(error.status), error.problem(), PROBLEM, error.headers)

    def start_stream(self, content_type: str) -> Callable[[bytes], None] | None:
        """Send a 200 whose body follows in chunks; returns the chunk writer (an empty
        chunk ends the body), or None for HEAD."""
        self.status = 200
        self.send_response(200)
        for key, value in {**self._fields(content_type), "X-Accel-Buffering": "no"}.items():
            self.send_header(key, value)
        if self.command == "HEAD":
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        self.streaming = True

        def write(data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        return write

    def client_gone(self) -> bool:
        """True once the client closed its side: the socket reads as ended (a peek, so a
        request sent meanwhile stays unread). A TLS socket is peeked under its records,
        which a close_notify keeps from looking ended: its writes fail soon instead."""
        try:
            poller = select.poll()  # not select(): no limit on the descriptor's number
            poller.register(self.connection, select.POLLIN)
            return bool(poller.poll(0)) and socket.socket.recv(self.connection, 1,
                                                                socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True
