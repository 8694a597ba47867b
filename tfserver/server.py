"""The HTTP layer: parse requests, route them, answer JSON or problem details.

Only HTTP lives here. The server object owns the shared parts (config, service,
authenticator); handlers reach them through `self.server`. Every error leaves through
`send_problem`, so a client never sees a traceback.
"""

from __future__ import annotations

import contextlib
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

from . import __version__
from .auth import Authenticator
from .config import Config, parse_bool
from .errors import (
    BadRequest,
    LengthRequired,
    PayloadTooLarge,
    TFServerError,
    Unavailable,
    UnsupportedMediaType,
)
from .jsonbody import parse_body
from .logs import request_id
from .routes import route
from .service import Service
from .tls import Certificates

logger = logging.getLogger(__name__)
access_log = logging.getLogger("tfserver.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
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
        # One thread per connection: cap them, so idle or slow clients cannot pile up
        # threads (each is also cut off after TFSERVER_READ_TIMEOUT).
        self._connections = threading.BoundedSemaphore(config.max_connections)
        self._busy = 0
        self._busy_cond = threading.Condition()
        if ":" in config.host:
            self.address_family = socket.AF_INET6
        super().__init__((config.host, config.port), RequestHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start the connection's thread, or close it at once when the cap is reached."""
        if not self._connections.acquire(blocking=False):
            logger.warning("connection limit (%d) reached: closing a new connection from %s",
                           self.config.max_connections, client_address[0])
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connections.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve the connection, then give its place back."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

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


class RequestHandler(BaseHTTPRequestHandler):
    """One connection: HTTP/1.1 with keep-alive; every answer has a Content-Length."""

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

    def setup(self) -> None:
        """Bound every socket read by the configured timeout (slow clients are cut off)."""
        self.request.settimeout(self.server.config.read_timeout)
        super().setup()

    # Every method goes through `dispatch`, so unknown ones get 405 rather than 501.
    def do_GET(self) -> None:
        """Serve GET."""
        self.dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET  # noqa: N815

    def version_string(self) -> str:
        """The Server header: the product only, not the Python version."""
        return f"tfserver/{__version__}"

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Access lines are written by `dispatch`, with timing and request id."""

    def log_error(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Protocol errors found by http.server (bad request line, timeouts)."""
        # Arguments may hold a raw request line: cut query strings (a token could be there).
        logger.warning("http: " + format, *(str(a).split("?")[0][:200] for a in args))

    # -- the request ------------------------------------------------------------------

    def dispatch(self) -> None:
        """Route one request and answer it; the one place errors become responses."""
        self.server.enter()
        started = time.monotonic()
        given = self.headers.get("X-Request-Id", "")
        self.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        token = request_id.set(self.request_id)
        self.status = 0
        self.body_consumed = False
        self.raw_body = b""
        self.streaming = False
        self.preferences = _preferences(self.headers.get_all("Prefer") or [])
        url = urlsplit(self.path)
        self.url_path = url.path
        self.query = parse_qs(url.query, keep_blank_values=True)
        try:
            if self.server.stopping.is_set():
                self.close_connection = True
                raise Unavailable("the server is shutting down", retry_after=10)
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
            # The answer is buffered: it must be on the wire before this request counts as
            # done, or a shutdown waiting for idle could exit with it still in the buffer.
            with contextlib.suppress(OSError):
                self.wfile.flush()
            access_log.info(
                "%s %s %s", self.command, self.url_path[:200], self.status,
                extra={"method": self.command, "path": self.url_path[:200],
                       "status": self.status,
                       "duration_ms": round((time.monotonic() - started) * 1000, 1),
                       "client": self.client_address[0]},
            )
            request_id.reset(token)
            self.server.leave()

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
        """Write a JSON answer with length, request id and security headers."""
        data = (json.dumps(body, indent=2) + "\n").encode()
        self.status = status
        if not self.body_consumed and (
                self.headers.get("Transfer-Encoding")
                or self.headers.get("Content-Length", "0").strip() not in ("", "0")):
            # An answer given before the body was read (401, 404, 405...): the body is
            # still in the stream and would be taken for the next request. Close instead.
            self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Request-Id", self.request_id)
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if self.server.certificates is not None:
            self.send_header("Strict-Transport-Security", "max-age=31536000")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

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

    def send_problem(self, error: TFServerError) -> None:
        """Write an RFC 9457 problem document for `error` (unless a stream has begun: then
        the only honest answer left is to close the connection)."""
        if self.streaming:
            self.close_connection = True
            logger.warning("stream ended by an error: %s", error.detail)
            return
        self.send_json(int(error.status), error.problem(), "application/problem+json",
                       error.headers)

    def start_stream(self, content_type: str) -> Callable[[bytes], None] | None:
        """Send a 200 whose body follows in chunks; returns the chunk writer (an empty
        chunk ends the body), or None for HEAD."""
        self.status = 200
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("X-Request-Id", self.request_id)
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Accel-Buffering", "no")
        if self.server.certificates is not None:
            self.send_header("Strict-Transport-Security", "max-age=31536000")
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


def _preferences(values: list[str]) -> list[str]:
    """The tokens of `Prefer` headers (RFC 7240), lower-cased, without parameters."""
    found = []
    for value in values:
        for token in value.split(","):
            token = token.split(";")[0].strip().lower()
            if token:
                found.append(token.replace(" ", ""))
    return found
