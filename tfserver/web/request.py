"""What a route sees: one request (`Request`), the server-wide parts (`Site`), and the
answer it gives (`Reply`).

Routes take these small interfaces, never the connection's handler: the handler
(`handler.RequestHandler`) satisfies `Request`, and a test can give a route anything else
that does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..app.service import Service
from ..auth import Authenticator, Principal
from ..module.discover import Module
from .streams import StreamLimits


class Headers(Protocol):
    """A request's header fields (`email.message.Message` as http.server reads them)."""

    def get(self, name: str, /) -> str | None:
        """The first value of a field, or None."""
        ...

    def get_all(self, name: str, /) -> list[str] | None:
        """Every value of a field, in order, or None."""
        ...


class Request(Protocol):
    """One request, as far as a route needs it."""

    #: Who sent it, once a route authenticated it (the access and audit lines name it).
    principal: Principal | None

    @property
    def command(self) -> str:
        """The method (`GET`, `POST`...)."""
        ...

    @property
    def path(self) -> str:
        """The request target as sent, path and query."""
        ...

    @property
    def url_path(self) -> str:
        """The target's path, without its query."""
        ...

    @property
    def headers(self) -> Headers:
        """The header fields."""
        ...

    @property
    def preferences(self) -> list[str]:
        """The tokens of its `Prefer` headers, lower-cased."""
        ...

    @property
    def client_ip(self) -> str:
        """The client's address (a trusted proxy's `X-Forwarded-For` believed)."""
        ...

    @property
    def request_id(self) -> str:
        """The request's id (`X-Request-Id`)."""
        ...

    @property
    def raw_body(self) -> bytes:
        """The body's bytes, once `read_body` read them."""
        ...

    @property
    def after_answer(self) -> list[Callable[[], None]]:
        """Called once the answer is on the wire."""
        ...

    def param(self, name: str) -> str | None:
        """A query parameter's last value, if given."""
        ...

    def flag(self, name: str) -> bool:
        """A boolean query parameter; anything but true or false is a 400."""
        ...

    def read_body(self, *, required: bool) -> Any:
        """The JSON body within the limits (`{}` when empty; None unless `required`)."""
        ...

    def send_bytes(self, status: int, data: bytes, content_type: str,
                   headers: dict[str, str] | None = None) -> None:
        """Answer with these bytes (and the headers every answer carries)."""
        ...

    def start_stream(self, content_type: str) -> Callable[[bytes], None] | None:
        """Answer 200 with a body in chunks: the chunk writer, or None for HEAD."""
        ...

    def client_gone(self) -> bool:
        """True once the client closed its side of the connection (a stream it left)."""
        ...


class Documents(Protocol):
    """The API's OpenAPI document, for a caller (`openapi.ApiDescription`)."""

    def document(self, modules: Mapping[str, Module],
                 principal: Principal | None) -> dict[str, Any]:
        """The document showing the modules `principal` may read (None: none)."""
        ...


@dataclass(frozen=True)
class Site:
    """What every route may use besides its request: the operations, who a token is, the
    OpenAPI document, and whether auth is on."""

    service: Service
    authenticator: Authenticator
    api: Documents
    auth: bool = False
    token_url: str = ""
    #: False on a worker of the `sqs` engine: it answers only its health checks.
    serves_api: bool = True
    #: Each tenant's open event streams, and how long one may last.
    streams: StreamLimits = field(default_factory=StreamLimits)


@dataclass
class Reply:
    """A JSON answer: status, body and extra headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Call:
    """One request routed: the request, the site, the path's parameters (`module`,
    `instance`, `id`, `asset`) and the caller (None on a public route)."""

    req: Request
    site: Site
    params: Mapping[str, str]
    principal: Principal | None = None

    @property
    def who(self) -> Principal:
        """The caller of a route that authenticates."""
        if self.principal is None:
            raise RuntimeError("a public route asked for its caller")
        return self.principal

    @property
    def service(self) -> Service:
        """The operations."""
        return self.site.service
