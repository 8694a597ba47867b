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
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from . import __version__
from .auth import Authenticator, Principal
from .config import Config, parse_bool
from .errors import (
    BadRequest,
    LengthRequired,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    TFServerError,
    Unavailable,
    UnsupportedMediaType,
)
from .logs import request_id
from .service import (
    Applied,
    Destroyed,
    InstanceView,
    ModuleView,
    Planned,
    Readiness,
    Service,
    Unlocked,
)
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
        self.extra_headers: dict[str, str] = {}
        url = urlsplit(self.path)
        self.url_path = url.path
        self.query = parse_qs(url.query, keep_blank_values=True)
        try:
            if self.server.stopping.is_set():
                self.close_connection = True
                raise Unavailable("the server is shutting down", retry_after=10)
            status, body = self.route()
            self.send_json(status, body)
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

    def route(self) -> tuple[int, dict[str, Any]]:
        """Find the handler for the path and method, authenticate, and call it."""
        path = self.url_path
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        parts = [] if path == "/" else path.lstrip("/").split("/")
        if parts == ["healthz"]:
            self.allow("GET")
            return 200, {"status": "ok"}
        if parts == ["readyz"]:
            self.allow("GET")
            return self.readiness(self.server.service.readiness())
        principal = self.server.authenticator.authenticate(self.headers.get("Authorization"))
        svc = self.server.service
        if not parts:
            self.allow("GET")
            return 200, {"modules": [{"name": m.name, "href": f"/{m.name}",
                                      "description": m.description}
                                     for m in svc.index(principal)]}
        module = parts[0]
        if len(parts) == 1:
            self.allow("GET", "POST", "DELETE")
            svc.module(module)
            return self.instance_call(principal, module, "default", named=False)
        if len(parts) == 2:
            self.allow("GET", "PUT", "DELETE")
            svc.module(module)
            return self.instance_call(principal, module, parts[1], named=True)
        if len(parts) == 3 and parts[2] == "lock":
            self.allow("DELETE")
            svc.module(module)
            body = self.read_body(required=True)
            lock_id = body.get("lock_id") if isinstance(body, dict) else None
            return 200, render(svc.force_unlock(principal, module, parts[1], lock_id,
                                                tenant=self.param("tenant")))
        raise NotFound(f"nothing at {path[:100]}")

    def readiness(self, report: Readiness) -> tuple[int, dict[str, Any]]:
        """200 with the report, or 503 with the same report."""
        parts = {"terraform": report.terraform, "modules": report.modules,
                 "backend": report.backend}
        if not report.ok:
            problem = Unavailable("not ready: a part below is not working", retry_after=5)
            problem.extra.update(parts)
            raise problem
        return 200, {"status": "ready", **parts}

    def instance_call(self, principal: Principal, module: str, instance: str,
                      *, named: bool) -> tuple[int, dict[str, Any]]:
        """GET / apply / destroy of one module instance."""
        svc = self.server.service
        dry_run = self.flag("dry_run")
        tenant = self.param("tenant")
        if self.command == "GET":
            if named:
                return 200, render(svc.show(principal, module, instance, tenant))
            return 200, render(svc.describe(principal, module))
        if self.command == "DELETE":
            self.read_body(required=False)
            return 200, render(svc.destroy(principal, module, instance, dry_run=dry_run,
                                           tenant=tenant))
        body = self.read_body(required=True)
        outcome = svc.apply(principal, module, instance, body, dry_run=dry_run)
        if named and isinstance(outcome, Applied) and outcome.created:
            self.extra_headers = {"Location": f"/{module}/{instance}"}
            return 201, render(outcome)
        return 200, render(outcome)

    def allow(self, *methods: str) -> None:
        """Raise 405 unless the request's method is one of `methods`."""
        if self.command not in methods:
            raise MethodNotAllowed(self.command, list(methods))

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
        try:
            return json.loads(data.decode("utf-8"), parse_constant=_no_constant)
        except UnicodeDecodeError:
            raise BadRequest("the body is not UTF-8") from None
        except ValueError as e:
            raise BadRequest(f"the body is not valid JSON: {_json_reason(e)}") from None

    # -- answers ----------------------------------------------------------------------

    def send_json(self, status: int, body: dict[str, Any],
                  content_type: str = "application/json",
                  headers: dict[str, str] | None = None) -> None:
        """Write a JSON answer with length, request id and security headers."""
        data = (json.dumps(body, indent=2) + "\n").encode()
        self.status = status
        if not getattr(self, "body_consumed", True) and (
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
        for key, value in {**self.extra_headers, **(headers or {})}.items():
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
        if not hasattr(self, "request_id"):
            self.request_id = uuid.uuid4().hex
        error = TFServerError(status.description)
        error.status = status
        self.send_problem(error)

    def send_problem(self, error: TFServerError) -> None:
        """Write an RFC 9457 problem document for `error`."""
        self.extra_headers = {}
        self.send_json(int(error.status), error.problem(), "application/problem+json",
                       error.headers)


Result = Applied | Planned | Destroyed | InstanceView | ModuleView | Unlocked


def render(result: Result) -> dict[str, Any]:
    """The JSON body of a service result."""
    if isinstance(result, Applied):
        return {"module": result.module, "instance": result.instance,
                "outputs": result.outputs, "changes": result.changes, "run_id": result.run_id}
    if isinstance(result, Planned):
        return {"module": result.module, "instance": result.instance, "dry_run": True,
                "changes": result.changes, "planned": result.planned,
                "run_id": result.run_id}
    if isinstance(result, Destroyed):
        return {"module": result.module, "instance": result.instance, "destroyed": True,
                "changes": result.changes, "run_id": result.run_id}
    if isinstance(result, InstanceView):
        body: dict[str, Any] = {
            "module": result.module, "instance": result.instance, "outputs": result.outputs,
            "resources": result.resources, "serial": result.serial,
            "terraform_version": result.terraform_version,
            "status": "busy" if result.busy else "idle",
        }
        if result.lock:
            body["lock"] = result.lock
            body["status"] = "locked"
        return body
    if isinstance(result, ModuleView):
        m = result.module
        return {
            "module": m.name,
            "description": m.description,
            "variables": m.schema,
            "outputs": {o.name: {"description": o.description, "sensitive": o.sensitive}
                        for o in m.outputs.values()},
            "instances": [{"instance": i.instance, "tenant": i.tenant} if i.tenant
                          else {"instance": i.instance, "href": f"/{m.name}/{i.instance}"}
                          for i in result.instances],
        }
    return {"module": result.module, "instance": result.instance, "unlocked": result.lock_id}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_reason(error: ValueError) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} at line {error.lineno} column {error.colno}"
    return str(error)[:100]

