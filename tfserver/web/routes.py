"""The route table: every method and path of the API, once.

Each row names a method, a path template, the operation (`operations.py`), the access it
needs and its OpenAPI operation id. Everything else reads the table: `dispatch` (which
row a request reaches, `Allow` and 405, HEAD wherever GET goes), `template` (the route
label of metrics and audit lines) and the OpenAPI paths (`openapi.py`).

A template is `/`-separated segments: a literal, `{name}` (one segment), or a last
`{name*}` (the rest of the path, possibly empty; not part of the route's label). A
parameter in the first segment never takes a literal first segment of the table
(`runs`, `healthz`...): no module may be named so.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from ..auth import Principal
from ..errors import MethodNotAllowed, NotFound
from . import operations as op
from .request import Call, Reply, Request, Site


class Access(Enum):
    """What a route needs of its caller. The service checks the scopes themselves (after
    it knows the module exists); the table says which to ask for and documents them."""

    PUBLIC = "public"  # no token
    OPTIONAL = "optional"  # a token if one is sent (the OpenAPI document)
    TOKEN = "token"  # noqa: S105 - any valid token (the service checks each module)
    READ = "read"  # the module's read scope
    WRITE = "write"  # the module's write scope
    ADMIN = "admin"  # the admin scope (metrics: only when auth is on)


Operation = Callable[[Call], Reply | None]


@dataclass(frozen=True)
class Route:
    """One row: a method on a path template, the operation it calls, the access it needs
    and its OpenAPI operation id (`{module}` in it: the module's identifier)."""

    method: str
    template: str
    operation: Operation
    access: Access
    operation_id: str
    segments: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "segments", tuple(s for s in self.template.split("/") if s))

    @property
    def label(self) -> str:
        """The template without a rest segment: the route's name in metrics and docs."""
        kept = [s for s in self.segments if not s.endswith("*}")]
        return "/" + "/".join(kept)

    @property
    def parameters(self) -> tuple[str, ...]:
        """The names of the template's parameters, in order."""
        return tuple(s.strip("{}*") for s in self.segments if s.startswith("{"))

    @property
    def per_module(self) -> bool:
        """True for a route of each module (its template starts with `{module}`)."""
        return self.segments[:1] == ("{module}",)


A = Access
ROUTES: tuple[Route, ...] = (
    Route("GET", "/", op.index, A.TOKEN, "list_modules"),
    Route("GET", "/healthz", op.health, A.PUBLIC, "get_health"),
    Route("GET", "/readyz", op.readiness, A.PUBLIC, "get_readiness"),
    Route("GET", "/openapi.json", op.openapi, A.OPTIONAL, "get_openapi"),
    Route("GET", "/docs/{asset*}", op.docs_page, A.PUBLIC, "get_docs"),
    Route("GET", "/metrics", op.metrics_text, A.ADMIN, "get_metrics"),
    Route("GET", "/runs", op.list_runs, A.TOKEN, "list_runs"),
    Route("GET", "/runs/{id}", op.get_run, A.TOKEN, "get_run"),
    Route("GET", "/runs/{id}/events", op.run_events, A.TOKEN, "get_run_events"),
    Route("POST", "/runs/{id}/cancel", op.cancel_run, A.TOKEN, "cancel_run"),
    Route("POST", "/runs/{id}/apply", op.apply_plan, A.TOKEN, "apply_plan"),
    Route("POST", "/runs/{id}/retry", op.retry_run, A.TOKEN, "retry_run"),
    Route("POST", "/runs/{id}/approve", op.approve_run, A.TOKEN, "approve_run"),
    Route("POST", "/runs/{id}/reject", op.reject_run, A.TOKEN, "reject_run"),
    Route("GET", "/upgrades/{id}", op.get_upgrade, A.ADMIN, "get_upgrade"),
    Route("POST", "/upgrades/{id}/apply", op.apply_upgrade, A.ADMIN, "apply_upgrade"),
    Route("GET", "/{module}", op.describe, A.READ, "describe_{module}"),
    Route("POST", "/{module}", op.apply, A.WRITE, "apply_{module}"),
    Route("DELETE", "/{module}", op.destroy, A.WRITE, "destroy_{module}"),
    # Before `/{module}/{instance}`: no instance is named `upgrades`.
    Route("POST", "/{module}/upgrades", op.start_upgrade, A.ADMIN, "upgrade_{module}"),
    Route("GET", "/{module}/{instance}", op.show, A.READ, "get_{module}_instance"),
    Route("PUT", "/{module}/{instance}", op.apply, A.WRITE, "apply_{module}_instance"),
    Route("DELETE", "/{module}/{instance}", op.destroy, A.WRITE, "destroy_{module}_instance"),
    Route("DELETE", "/{module}/{instance}/lock", op.unlock, A.ADMIN,
          "unlock_{module}_instance"),
    Route("GET", "/{module}/{instance}/runs", op.instance_runs, A.READ,
          "list_{module}_instance_runs"),
    Route("POST", "/{module}/{instance}/drift", op.drift, A.WRITE,
          "drift_{module}_instance"),
)
del A

#: First segments that are literals: never a module's name.
RESERVED = frozenset(r.segments[0] for r in ROUTES if r.segments
                     and not r.segments[0].startswith("{"))
#: The rows of each template, in the table's order.
_BY_TEMPLATE = {t: tuple(r for r in ROUTES if r.template == t) for t in
                dict.fromkeys(r.template for r in ROUTES)}
#: The most segments any template has (a `{name*}` counted as one): a longer path can
#: reach only a template ending in a `{name*}`, so all longer paths share one index row.
_LONGEST = max(len(r.segments) for r in ROUTES)


def _could_bind(segments: tuple[str, ...], n: int, first: str | None) -> bool:
    """Whether a path of `n` segments whose first is `first` (None: no literal first
    segment of the table) could reach the template of `segments`."""
    wild = len(segments) - 1 if segments and segments[-1].endswith("*}") else None
    if (n != len(segments)) if wild is None else (n < wild):
        return False
    if not segments or wild == 0:
        return True
    head = segments[0]
    return first is None if head.startswith("{") else head == first


#: The templates a path may reach, in the table's order, by its number of segments (at
#: most `_LONGEST + 1`) and literal first segment (or None): a GET of an instance tried
#: 15 templates before its own, twice a request (dispatch, then the metrics label).
_CANDIDATES = {(n, first): tuple(rows for rows in _BY_TEMPLATE.values()
                                 if _could_bind(rows[0].segments, n, first))
               for n in range(_LONGEST + 2) for first in (*sorted(RESERVED), None)}


@dataclass(frozen=True)
class Match:
    """The rows of the template a path reached (one per method), and its parameters."""

    rows: tuple[Route, ...]
    params: dict[str, str]

    @property
    def label(self) -> str:
        """The route's label."""
        return self.rows[0].label

    def allowed(self) -> list[str]:
        """The methods of the template, in the table's order (HEAD goes with GET)."""
        return [r.method for r in self.rows]

    def row(self, method: str) -> Route | None:
        """The row serving `method` (HEAD: GET's), or None."""
        wanted = "GET" if method == "HEAD" else method
        return next((r for r in self.rows if r.method == wanted), None)


def _parts(path: str) -> list[str]:
    """A path's segments, one trailing slash dropped."""
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    return [] if path == "/" else path.lstrip("/").split("/")


def _bind(segments: tuple[str, ...], parts: list[str]) -> dict[str, str] | None:
    """The parameters of `parts` under a template's segments, or None if they differ."""
    params: dict[str, str] = {}
    for i, segment in enumerate(segments):
        if segment.endswith("*}"):
            params[segment[1:-2]] = "/".join(parts[i:])
            return params
        if i >= len(parts):
            return None
        if segment.startswith("{"):
            if i == 0 and parts[0] in RESERVED:
                return None
            params[segment[1:-1]] = parts[i]
        elif segment != parts[i]:
            return None
    return params if len(parts) == len(segments) else None


def match(path: str) -> Match | None:
    """The template a path reaches, or None."""
    parts = _parts(path)
    first = parts[0] if parts and parts[0] in RESERVED else None
    for rows in _CANDIDATES[min(len(parts), _LONGEST + 1), first]:
        params = _bind(rows[0].segments, parts)
        if params is not None:
            return Match(rows, params)
    return None


def template(path: str) -> tuple[str, str | None, str | None]:
    """The route label of a path (a bounded set, for metrics labels; `unmatched` when no
    route has it), and the module and instance it names, if any."""
    # Each answer asks for its path's label again (metrics, audit): the short paths'
    # are kept. A long one (a head's line may take 64 KiB) is matched each time.
    return _labelled(path) if len(path) <= 200 else _label(path)


def _label(path: str) -> tuple[str, str | None, str | None]:
    found = match(path)
    if found is None:
        return "unmatched", None, None
    module = found.params.get("module")
    return found.label, module, found.params.get("instance", "default" if module else None)


_labelled = functools.lru_cache(maxsize=256)(_label)


#: What a worker of the `sqs` engine answers (it runs terraform; the API is elsewhere).
_WORKER_ROUTES = frozenset({"/healthz", "/readyz"})


def dispatch(req: Request, site: Site) -> Reply | None:
    """Find the row of the request's path and method, authenticate as the row asks, and
    call its operation (405 with `Allow` for a method the path lacks, 404 for a path no
    row has). A path that needs a token is authenticated before it is refused."""
    found = match(req.url_path)
    if found is not None and not site.serves_api and found.label not in _WORKER_ROUTES:
        found = None  # a worker answers only its health checks
    row = found.row(req.command) if found is not None else None
    access = row.access if row is not None else _weakest(found)
    principal: Principal | None = None
    if access is Access.OPTIONAL:
        principal = _reader(req, site)
    elif access is not Access.PUBLIC:
        principal = site.authenticator.authenticate(req.headers.get("Authorization"))
        req.principal = principal
    if found is None:
        raise NotFound(f"nothing at {req.url_path[:100]}")
    if row is None:
        raise MethodNotAllowed(req.command, found.allowed())
    return row.operation(Call(req, site, found.params, principal))


def _weakest(found: Match | None) -> Access:
    """The access a refusal (404, 405) needs: none when every row of the path is open to
    anyone (a 405 of /healthz), else a token (a 404 tells nothing before it)."""
    if found is not None and all(r.access in (Access.PUBLIC, Access.OPTIONAL)
                                 for r in found.rows):
        return Access.PUBLIC
    return Access.TOKEN


def _reader(req: Request, site: Site) -> Principal | None:
    """Who reads the API's document: the token's principal, or None for a caller without
    a token while auth is on (it sees no module, and the docs page can load the document
    before the caller authorizes)."""
    authorization = req.headers.get("Authorization")
    if authorization is None and site.auth:
        return None
    return site.authenticator.authenticate(authorization)
