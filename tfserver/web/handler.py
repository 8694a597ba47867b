"""A request: routed through the route table, answered, and logged (access line, metrics,
audit line); the one place errors become answers.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, cast
from urllib.parse import parse_qs, urlsplit

from ..errors import (
    BadRequest,
    LengthRequired,
    PayloadTooLarge,
    TFServerError,
    Unavailable,
    UnsupportedMediaType,
)
from ..logs import audit_request, log_access, request_id
from ..metrics import method_label
from ..settings import parse_bool
from .connections import HEALTH_HEAD_TIMEOUT, HEALTH_PATHS, client_address
from .http11 import DRAIN_LIMIT, Connection, Host, new_request_id
from .jsonbody import parse_body
from .request import Site
from .routes import dispatch, template

logger = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
#: Methods that change something: each gets an audit line.
_CHANGING = frozenset({"POST", "PUT", "DELETE", "PATCH"})
#: The most digits a Content-Length may have (an exabyte): a longer one is refused
#: before it is made a number.
MAX_LENGTH_DIGITS = 18
_JSON_TYPES = ("application/json",)


def _is_length(text: str) -> bool:
    """A Content-Length value this server reads: ASCII digits, not too many of them."""
    return text.isascii() and text.isdigit() and len(text) <= MAX_LENGTH_DIGITS


class Serving(Host, Protocol):
    """What a request needs of its server."""

    @property
    def site(self) -> Site:
        """The parts every route may use."""
        ...

    @property
    def stopping(self) -> threading.Event:
        """Set once the server is told to stop."""
        ...

    def enter(self) -> None:
        """A request began."""
        ...

    def leave(self) -> None:
        """A request ended."""
        ...

    def trusted(self, address: str) -> bool:
        """True for a trusted proxy's address."""
        ...

    def health_only(self, peer: Any) -> bool:
        """True for a connection in a place kept for health checks."""
        ...

    def give_back(self, peer: Any) -> None:
        """The connection's place is free (it closes after the answer being sent)."""
        ...


class RequestHandler(Connection):
    """A request: routed, answered, and logged (access line, metrics, audit line); the
    one place errors become answers."""

    @property
    def host(self) -> Serving:
        """The server this request belongs to."""
        return cast(Serving, self.server)

    def setup(self) -> None:
        """A connection in a place kept for health checks must send its request soon."""
        super().setup()
        self.health_only = self.host.health_only(self.client_address)
        if self.health_only:
            self.head_timeout = min(self.head_timeout, HEALTH_HEAD_TIMEOUT)

    # -- the body -----------------------------------------------------------------------

    def _check_framing(self) -> None:
        """One plain Content-Length, or none (RFC 9112 §6.3): anything else could make a
        proxy and this server disagree on where the next request starts (smuggling). A
        request with any Transfer-Encoding field (even an empty one beside another) is
        the last of its connection: its body is never read as the next request."""
        lengths = self.headers.get_all("Content-Length") or []
        if len(lengths) > 1:
            self.close_connection = True
            raise BadRequest("more than one Content-Length header")
        if lengths and not _is_length(lengths[0].strip()):
            self.close_connection = True
            raise BadRequest("Content-Length is not a number of at most "
                             f"{MAX_LENGTH_DIGITS} digits")
        if self.transfer_encoded():
            self.close_connection = True
        self.reader.for_writes()

    def _drain(self) -> None:
        """Read (and drop) a bounded part of an unread body after the answer, so that the
        client can read the answer (closing with unread data resets the connection)."""
        length = self.headers.get("Content-Length", "")
        self.discard_rest(min(int(length), DRAIN_LIMIT) if _is_length(length)
                          else DRAIN_LIMIT)

    def read_body(self, *, required: bool) -> Any:
        """The JSON body, within the size limit; an empty body is `{}`."""
        if self.transfer_encoded():
            self.close_connection = True
            raise LengthRequired("send the body with a Content-Length, not chunked")
        raw_length = self.headers.get("Content-Length", "0").strip() or "0"
        if not raw_length.isdigit():
            self.close_connection = True
            raise BadRequest("Content-Length is not a number")
        length = int(raw_length)
        if length > self.host.config.max_body:
            # The body stays unread: the connection cannot be reused.
            self.close_connection = True
            raise PayloadTooLarge(
                f"the body is {length} bytes; the limit is {self.host.config.max_body}"
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
        return parse_body(data, max_depth=self.host.config.max_depth)

    # -- the request ----------------------------------------------------------------------

    def handle_expect_100(self) -> bool:
        """`Expect: 100-continue`: 100 only for a body that will be read; a body over the
        limit gets its 413 before the client sends it."""
        length = self.headers.get("Content-Length", "").strip()
        # A length of more digits than any body this server takes is over the limit too
        # (and is not turned into a number: 65,000 digits took 25 ms of the GIL).
        if length.isascii() and length.isdigit() and (
                len(length) > MAX_LENGTH_DIGITS or int(length) > self.host.config.max_body):
            self.close_connection = True
            self.send_problem(PayloadTooLarge(
                f"the body is over the limit of {self.host.config.max_body} bytes"))
            self.answered(0.0)
            return False
        ok = super().handle_expect_100()
        self.wfile.flush()  # the 100 must reach the client before it sends the body
        return ok

    # Every standard method (RFC 9110, and PATCH) goes through `dispatch`, so one a route
    # lacks gets 405 with `Allow`; only an unknown method is http.server's 501. TRACE is
    # never echoed: no route has it.
    def do_GET(self) -> None:  # noqa: N802 - http.server calls do_<METHOD>
        """Serve GET."""
        self.dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET  # noqa: N815
    do_TRACE = do_CONNECT = do_GET  # noqa: N815

    def dispatch(self) -> None:
        """Route one request and answer it; the one place errors become responses."""
        self.host.enter()
        started = time.monotonic()
        given = self.headers.get("X-Request-Id", "")
        self.request_id = given if _REQUEST_ID.match(given) else new_request_id()
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
            if self.host.stopping.is_set():
                self.close_connection = True
                raise Unavailable("the server is shutting down", retry_after=10)
            if self.health_only:
                self._health_check_only()
            self._check_framing()
            reply = dispatch(self, self.host.site)
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
            self.host.leave()

    def closing(self) -> None:
        """A place kept for health checks is given back before its answer is written: a
        checker that reconnects as soon as it has the answer finds the place free (the
        thread's own end comes later)."""
        if self.health_only:
            self.host.give_back(self.client_address)

    def _health_check_only(self) -> None:
        """On a place kept for health checks: nothing else, and the place is given back
        after the answer."""
        self.close_connection = True
        if self.url_path not in HEALTH_PATHS:
            raise Unavailable(
                f"every connection is in use (TFSERVER_MAX_CONNECTIONS="
                f"{self.host.config.max_connections}); the places left serve only "
                "/healthz and /readyz", retry_after=1)

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
        self.host.site.service.count_request(self.command or "-", route_template,
                                             self.status, seconds)

    def _log(self, seconds: float) -> None:
        path = self._path()
        method = method_label(self.command) if self.command else "-"
        p = self.principal
        client = self.client_ip or self.client_address[0]
        log_access(method, path, self.status, seconds, client,
                   p.tenant_key if p is not None else None)
        if method in _CHANGING:
            route_template, module, instance = template(path)
            if module is None and self.audit_names is not None:
                module, instance = self.audit_names  # a run's route: the run's own
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
                              self.host.trusted)

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


def _preferences(values: list[str]) -> list[str]:
    """The tokens of `Prefer` headers (RFC 7240), lower-cased, without parameters."""
    found = []
    for value in values:
        for token in value.split(","):
            token = token.split(";")[0].strip().lower()
            if token:
                found.append(token.replace(" ", ""))
    return found
