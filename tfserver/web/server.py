"""The HTTP layer: parse requests, route them, answer JSON or problem details.

Only HTTP lives here. The server object owns the shared parts (config, service,
authenticator); handlers reach them through `self.server`. Every error leaves through
`send_problem`, so a client never sees a traceback.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import logging
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .. import __version__
from ..app.service import Service
from ..auth import Authenticator, Principal
from ..config import Config
from ..errors import (
    BadRequest,
    LengthRequired,
    PayloadTooLarge,
    TFServerError,
    Unavailable,
    UnsupportedMediaType,
)
from ..logs import audit_request, log_access, request_id
from ..settings import Network, parse_bool
from ..tls import Certificates
from .connections import ConnectionLimits, DeadlineReader, client_address
from .jsonbody import parse_body
from .routes import route, template

logger = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
PROBLEM = "application/problem+json"
#: Methods that change something: each gets an audit line.
_CHANGING = frozenset({"POST", "PUT", "DELETE", "PATCH"})
#: At most this much of a refused body is read after the answer, for at most this long.
DRAIN_LIMIT = 4 * 1024 * 1024
DRAIN_SECONDS = 5.0
_JSON_TYPES = ("application/json",)


class TFServer(ThreadingHTTPServer):
    """A threading HTTP server that knows its service and counts requests in flight."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(
        self,
        config: Config,
        service: Service,
        authenticator: Authenticator,
        certificates: Certificates | None = None,
    ) -> None:
        self.config = config
        self.service = service
        self.authenticator = authenticator
        self.certificates = certificates
        self.stopping = threading.Event()
        # One thread per connection: cap them, in all and per client address, so idle or
        # slow clients cannot pile up threads (see connections.py).
        self.limits = ConnectionLimits(config.max_connections,
                                       config.max_connections_per_ip)
        self._busy = 0
        self._busy_cond = threading.Condition()
        if ":" in config.host:
            self.address_family = socket.AF_INET6
        super().__init__((config.host, config.port), RequestHandler)

    def trusted(self, address: str) -> bool:
        """True for a peer in TFSERVER_TRUSTED_PROXIES (whose X-Forwarded-For is believed)."""
        return _in(address, self.config.trusted_proxies)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start the connection's thread, or close it at once when a cap is reached."""
        refused = self.limits.admit(client_address[0],
                                    per_address=not self.trusted(client_address[0]))
        if refused is not None:
            logger.warning("%s: closing a new connection from %s", refused,
                           client_address[0])
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.limits.release(client_address[0])
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve the connection, then give its place back."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.limits.release(client_address[0])

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Run the TLS handshake in the connection's own thread, with a deadline."""
        if self.certificates is not None:
            request.settimeout(self.config.read_timeout)
            try:
                # The context of the moment: a renewal applies to the next connection.
                request = self.certificates.context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as e:
                logger.info("TLS handshake with %s failed: %s", client_address[0],
                            getattr(e, "reason", None) or type(e).__name__)
                request.close()
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log unexpected connection errors as JSON, not as a bare traceback on stderr."""
        logger.exception("error on the connection from %s", client_address[0])

    def enter(self) -> None:
        """A request began."""
        with self._busy_cond:
            self._busy += 1

    def leave(self) -> None:
        """A request ended."""
        with self._busy_cond:
            self._busy -= 1
            self._busy_cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if `timeout` passed first."""
        end = time.monotonic() + timeout
        with self._busy_cond:
            while self._busy > 0:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._busy_cond.wait(left)
        return True

    @property
    def url(self) -> str:
        """The base URL the server answers on."""
        host, port = self.server_address[:2]
        scheme = "https" if self.certificates else "http"
        return f"{scheme}://{host!s}:{port}"


class Connection(BaseHTTPRequestHandler):
    """One connection, HTTP/1.1 with keep-alive: requests read within their limits (a
    deadline for head and body, one plain Content-Length, a bounded body), and answers
    written with their length and the headers every answer carries, or as a stream."""

    protocol_version = "HTTP/1.1"
    # Headers and body leave in one write (http.server flushes after each request), and
    # without Nagle's delay: two small sends would otherwise wait on the peer's delayed ACK.
    wbufsize = 1 << 16
    disable_nagle_algorithm = True
    server: TFServer
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
    path = ""
    principal: Principal | None = None
    client_ip = ""
    query: dict[str, list[str]] = {}
    #: What the audit line names: the run an answer carried, the title of a problem.
    audit_run: str | None = None
    audit_title: str | None = None

    def setup(self) -> None:
        """Bound every socket read by the read timeout, and each request's head and body
        by the request deadline (slow clients are cut off)."""
        config = self.server.config
        self.request.settimeout(config.read_timeout)
        super().setup()
        self.reader = DeadlineReader(self.connection, config.read_timeout)
        self.rfile = io.BufferedReader(self.reader, 1 << 16)

    def handle_one_request(self) -> None:
        """One request: its head and body must arrive within TFSERVER_REQUEST_TIMEOUT. A
        client that goes away (a stream it cut, say) ends the connection quietly: that is
        routine, not an error."""
        self.reader.arm(self.server.config.request_timeout)
        # The defaults again: an error http.server answers before `dispatch` (a bad head,
        # an early 413) must not be logged with the previous request's path or id.
        self.status, self.request_id, self.url_path, self.client_ip = 0, "", "", ""
        self.principal = self.audit_run = self.audit_title = None
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
        """http.server's parsing, without HTTP/0.9: a request line without a version would
        get an answer without a status line or headers."""
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":
            self.send_error(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED)
            return False
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
        # The text may hold a raw request line: cut query strings (a token could be there).
        logger.warning("http: %s", " ".join(word.split("?")[0] for word in text.split())[:300])

    # -- the request ------------------------------------------------------------------

    def _check_framing(self) -> None:
        """One plain Content-Length, or none (RFC 9112 §6.3): anything else could make a
        proxy and this server disagree on where the next request starts (smuggling)."""
        lengths = self.headers.get_all("Content-Length") or []
        if len(lengths) > 1:
            self.close_connection = True
            raise BadRequest("more than one Content-Length header")
        if lengths and not (lengths[0].strip().isascii() and lengths[0].strip().isdigit()):
            self.close_connection = True
            raise BadRequest("Content-Length is not a number")
        self.connection.settimeout(self.server.config.read_timeout)

    def _drain(self) -> None:
        """Read (and drop) a bounded part of an unread body after the answer, so that the
        client can read the answer (closing with unread data resets the connection)."""
        length = self.headers.get("Content-Length", "")
        left = min(int(length), DRAIN_LIMIT) if length.isascii() and length.isdigit() \
            else DRAIN_LIMIT
        with contextlib.suppress(OSError, ValueError):
            self.connection.shutdown(socket.SHUT_WR)
            self.reader.arm(DRAIN_SECONDS)
            while left > 0:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)

    def read_body(self, *, required: bool) -> Any:
        """The JSON body, within the size limit; an empty body is `{}`."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise LengthRequired("send the body with a Content-Length, not chunked")
        raw_length = self.headers.get("Content-Length", "0").strip() or "0"
        if not raw_length.isdigit():
            self.close_connection = True
            raise BadRequest("Content-Length is not a number")
        length = int(raw_length)
        if length > self.server.config.max_body:
            # The body stays unread: the connection cannot be reused.
            self.close_connection = True
            raise PayloadTooLarge(
                f"the body is {length} bytes; the limit is {self.server.config.max_body}"
            )
        data = self.rfile.read(length) if length else b""
        self.reader.arm(None)  # the request is in: writes go on at the read timeout
        self.body_consumed = True
        self.raw_body = data
        if len(data) != length:
            self.close_connection = True
            raise BadRequest("the body ended before Content-Length bytes")
        if not required:
            return None
        if not data.strip():
            return {}
        kind = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind not in _JSON_TYPES:
            raise UnsupportedMediaType(
                f"send the variables as application/json, not {kind[:60] or 'no type'}"
            )
        return parse_body(data, max_depth=self.server.config.max_depth)

    # -- answers ----------------------------------------------------------------------

    def send_json(self, status: int, body: dict[str, Any],
                  content_type: str = "application/json",
                  headers: dict[str, str] | None = None) -> None:
        """Write a JSON answer (see `send_bytes`)."""
        run = body.get("run_id") or (body.get("id") if "operation" in body else None)
        self.audit_run = str(run) if run else None
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
                self.headers.get("Transfer-Encoding")
                or self.headers.get("Content-Length", "0").strip() not in ("", "0")):
            # An answer given before the body was read (401, 404, 405...): the body is
            # still in the stream and would be taken for the next request. Close instead.
            self.close_connection = True
        fields = {**self._fields(content_type), "Content-Length": str(len(data)),
                  **(headers or {})}
        if self.close_connection:
            fields["Connection"] = "close"
        self.send_response(status)
        for key, value in fields.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _fields(self, content_type: str) -> dict[str, str]:
        """The headers of every answer."""
        fields = {"Content-Type": content_type, "X-Request-Id": self.request_id,
                  "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
        if self.server.certificates is not None:
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
            self.request_id = uuid.uuid4().hex
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


class RequestHandler(Connection):
    """A request: routed, answered, and logged (access line, metrics, audit line); the
    one place errors become answers."""

    def handle_expect_100(self) -> bool:
        """`Expect: 100-continue`: 100 only for a body that will be read; a body over the
        limit gets its 413 before the client sends it."""
        length = self.headers.get("Content-Length", "")
        if length.isascii() and length.strip().isdigit() and \
                int(length) > self.server.config.max_body:
            self.close_connection = True
            self.send_problem(PayloadTooLarge(
                f"the body is {int(length)} bytes; the limit is {self.server.config.max_body}"))
            self.answered(0.0)
            return False
        ok = super().handle_expect_100()
        self.wfile.flush()  # the 100 must reach the client before it sends the body
        return ok

    # Every method goes through `dispatch`, so unknown ones get 405 rather than 501.
    def do_GET(self) -> None:
        """Serve GET."""
        self.dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET  # noqa: N815

    def dispatch(self) -> None:
        """Route one request and answer it; the one place errors become responses."""
        self.server.enter()
        started = time.monotonic()
        given = self.headers.get("X-Request-Id", "")
        self.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        token = request_id.set(self.request_id)
        # status, principal and the audit fields start from `handle_one_request`'s reset.
        self.body_consumed = False
        self.raw_body = b""
        self.streaming = False
        self.after_answer: list[Callable[[], None]] = []
        self.client_ip = self._client_ip()
        self.preferences = _preferences(self.headers.get_all("Prefer") or [])
        url = urlsplit(self.path)
        self.url_path = url.path
        self.query = parse_qs(url.query, keep_blank_values=True)
        try:
            if self.server.stopping.is_set():
                self.close_connection = True
                raise Unavailable("the server is shutting down", retry_after=10)
            self._check_framing()
            reply = route(self)
            if reply is not None:
                self.send_json(reply.status, reply.body, headers=reply.headers)
        except TFServerError as e:
            self.send_problem(e)
        except (TimeoutError, ConnectionError) as e:
            self.close_connection = True
            logger.info("client connection lost: %s", type(e).__name__)
        except Exception:
            logger.exception("unexpected error")
            self.send_problem(TFServerError("an unexpected error occurred; see the server log "
                                            f"for request {self.request_id}"))
        finally:
            # Counted before the answer leaves: a client that reads it and then scrapes
            # /metrics finds it there. Its log lines follow at once, not in its way.
            seconds = time.monotonic() - started
            self._count(seconds)
            # The answer is buffered: it must be on the wire before this request counts as
            # done, or a shutdown waiting for idle could exit with it still in the buffer.
            with contextlib.suppress(OSError):
                self.wfile.flush()
            for then in self.after_answer:
                then()
            self._log(seconds)
            if self.close_connection and not self.body_consumed:
                self._drain()
            request_id.reset(token)
            self.server.leave()

    def answered(self, seconds: float) -> None:
        """The metrics of a request (also of one http.server refused itself), its access
        line, and for a state-changing request its audit line."""
        self._count(seconds)
        self._log(seconds)

    def _path(self) -> str:
        """The request's path, without its query."""
        return self.url_path or self.path.split("?")[0]

    def _count(self, seconds: float) -> None:
        route_template, _, _ = template(self._path())
        self.server.service.metrics.request(self.command or "-", route_template, self.status,
                                            seconds)

    def _log(self, seconds: float) -> None:
        path = self._path()
        method = self.command or "-"
        p = self.principal
        client = self.client_ip or self.client_address[0]
        log_access(method, path, self.status, seconds, client,
                   p.tenant_key if p is not None else None)
        if method in _CHANGING:
            route_template, module, instance = template(path)
            audit_request(
                p, client, status=self.status, title=self.audit_title,
                what={"method": method, "route": route_template, "module": module,
                      "instance": instance, "run_id": self.audit_run,
                      "request_id": self.request_id,
                      "idempotency_key": self._header("Idempotency-Key"),
                      "dry_run": "dry_run" in self.query})

    def _header(self, name: str) -> str | None:
        """A request header, cut short (None before headers were read)."""
        headers = getattr(self, "headers", None)  # http.server sets it with the request
        value = headers.get(name) if headers is not None else None
        return value[:255] if value else None

    def _client_ip(self) -> str:
        """The client's address (see `connections.client_address`)."""
        return client_address(str(self.client_address[0]),
                              self.headers.get_all("X-Forwarded-For") or [],
                              self.server.trusted)

    def param(self, name: str) -> str | None:
        """A query parameter's last value, if given."""
        values = self.query.get(name)
        return values[-1] if values else None

    def flag(self, name: str) -> bool:
        """A boolean query parameter (`?dry_run=true`); anything else is a 400."""
        values = self.query.get(name)
        if not values:
            return False
        if not values[-1]:
            return True  # `?dry_run` alone
        try:
            return parse_bool(values[-1])
        except ValueError:
            raise BadRequest(f"query parameter {name} must be true or false") from None


def _in(address: str, networks: tuple[Network, ...]) -> bool:
    """True when `address` falls in one of `networks` (False for anything unreadable)."""
    if not networks:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def _preferences(values: list[str]) -> list[str]:
    """The tokens of `Prefer` headers (RFC 7240), lower-cased, without parameters."""
    found = []
    for value in values:
        for token in value.split(","):
            token = token.split(";")[0].strip().lower()
            if token:
                found.append(token.replace(" ", ""))
    return found
