"""The API's routes: which path and method call which operation, and how its result is
answered (status, body, headers, or a stream of events).

`route(handler)` is called by the request handler for every request; it reads the request
through the handler and returns a `Reply`, or None when it streamed the answer itself.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import metrics
from ..app.execute import Applied
from ..app.history import Idempotency, Submitted
from ..app.service import Origin
from ..auth import Principal
from ..errors import BadRequest, MethodNotAllowed, NotFound, Unavailable
from . import docs, render

if TYPE_CHECKING:
    from .server import RequestHandler

_PREFER_WAIT = re.compile(r"^wait\s*=\s*(\d{1,6})$")
#: The longest `Prefer: wait=N` honoured (App Platform's edge cuts requests at ~100 s).
MAX_PREFER_WAIT = 90


@dataclass
class Reply:
    """A JSON answer: status, body and extra headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def route(h: RequestHandler) -> Reply | None:
    """Find the handler for the path and method, authenticate, and call it."""
    path = h.url_path
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    parts = [] if path == "/" else path.lstrip("/").split("/")
    if parts == ["healthz"]:
        allow(h, "GET")
        return Reply(200, {"status": "ok"})
    if parts == ["readyz"]:
        allow(h, "GET")
        report = h.server.service.readiness()
        if not report.ok:
            problem = Unavailable("not ready: a part below is not working", retry_after=5)
            problem.extra.update(render.readiness(report))
            raise problem
        return Reply(200, {"status": "ready", **render.readiness(report)})
    if parts == ["openapi.json"]:
        allow(h, "GET")
        svc = h.server.service
        return Reply(200, svc.api.document(svc.modules, _reader(h)))
    if parts[:1] == ["docs"]:
        allow(h, "GET")
        _docs(h, "/".join(parts[1:]))
        return None
    principal = h.server.authenticator.authenticate(h.headers.get("Authorization"))
    h.principal = principal
    if parts == ["metrics"]:
        allow(h, "GET")
        if h.server.config.auth == "jwt":
            principal.require_admin()
        h.send_bytes(200, h.server.service.metrics.render(), metrics.CONTENT_TYPE)
        return None
    if not parts:
        allow(h, "GET")
        return Reply(200, {"modules": [{"name": m.name, "href": f"/{m.name}",
                                        "description": m.description}
                                       for m in h.server.service.catalog.index(principal)]})
    if parts[0] == "runs":
        return _runs_route(h, principal, parts[1:])
    return _module_route(h, principal, parts)


def _reader(h: RequestHandler) -> Principal | None:
    """Who reads the API's document: the token's principal, or None for a caller without
    a token while auth is on (it sees no module, and the docs page can load the document
    before the caller authorizes)."""
    authorization = h.headers.get("Authorization")
    if authorization is None and h.server.config.auth == "jwt":
        return None
    return h.server.authenticator.authenticate(authorization)


def _docs(h: RequestHandler, name: str) -> None:
    """The docs page and its files, with the page's Content-Security-Policy."""
    found = docs.asset(name)
    if found is None:
        raise NotFound(f"nothing at {h.url_path[:100]}")
    headers = {"Content-Security-Policy": docs.content_security_policy(
        h.server.config.auth_settings.token_url if h.server.config.auth == "jwt" else ""),
        "Referrer-Policy": "no-referrer"}
    if found.cacheable:
        headers["Cache-Control"] = "public, max-age=3600"
    h.send_bytes(200, found.data, found.content_type, headers)


_RUN_ROUTES = {"events", "cancel", "apply"}
_INSTANCE_ROUTES = {"lock", "runs"}
_FIXED = {"healthz", "readyz", "metrics", "openapi.json", "runs"}


def template(path: str) -> tuple[str, str | None, str | None]:
    """The route template of a path (a bounded set, for metrics labels), and the module
    and instance it names, if any."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        return "/", None, None
    head = parts[0]
    if head == "docs":
        return "/docs", None, None
    if head in _FIXED:
        if len(parts) == 1:
            return f"/{head}", None, None
        if head == "runs" and len(parts) == 2:
            return "/runs/{id}", None, None
        if head == "runs" and len(parts) == 3 and parts[2] in _RUN_ROUTES:
            return f"/runs/{{id}}/{parts[2]}", None, None
        return "unmatched", None, None
    if len(parts) == 1:
        return "/{module}", head, "default"
    if len(parts) == 2:
        return "/{module}/{instance}", head, parts[1]
    if len(parts) == 3 and parts[2] in _INSTANCE_ROUTES:
        return f"/{{module}}/{{instance}}/{parts[2]}", head, parts[1]
    return "unmatched", None, None


def allow(h: RequestHandler, *methods: str) -> None:
    """Raise 405 unless the request's method is one of `methods`; HEAD goes wherever GET
    does (RFC 9110), answered with GET's headers and no body."""
    method = "GET" if h.command == "HEAD" and "GET" in methods else h.command
    if method not in methods:
        raise MethodNotAllowed(h.command, list(methods))


def _module_route(h: RequestHandler, principal: Principal, parts: list[str]) -> Reply | None:
    svc = h.server.service
    module = parts[0]
    if len(parts) == 1:
        allow(h, "GET", "POST", "DELETE")
        svc.catalog.module(module)
        return _instance(h, principal, module, "default", named=False)
    if len(parts) == 2:
        allow(h, "GET", "PUT", "DELETE")
        svc.catalog.module(module)
        return _instance(h, principal, module, parts[1], named=True)
    if len(parts) == 3 and parts[2] == "lock":
        allow(h, "DELETE")
        svc.catalog.module(module)
        body = h.read_body(required=True)
        lock_id = body.get("lock_id") if isinstance(body, dict) else None
        return Reply(200, render.render(svc.force_unlock(principal, module, parts[1], lock_id,
                                                         tenant=h.param("tenant"))))
    if len(parts) == 3 and parts[2] == "runs":
        allow(h, "GET")
        page = svc.history.list_runs(principal, module=module, instance=parts[1],
                                     tenant=h.param("tenant"), limit=_limit(h),
                                     after=h.param("before") or "")
        return Reply(200, render.run_page(page, f"/{module}/{parts[1]}/runs",
                                          _kept(h, "tenant", "limit")))
    raise NotFound(f"nothing at {h.url_path[:100]}")


def _instance(h: RequestHandler, principal: Principal, module: str, instance: str,
              *, named: bool) -> Reply:
    """GET / apply / destroy of one module instance."""
    svc = h.server.service
    if h.command in ("GET", "HEAD"):
        if named:
            return Reply(200, render.render(svc.catalog.show(principal, module, instance,
                                                             h.param("tenant"))))
        return Reply(200, render.render(svc.catalog.describe(principal, module)))
    dry_run = h.flag("dry_run")
    asynchronous, wait = prefer(h)
    if h.command == "DELETE":
        h.read_body(required=False)
        submitted = svc.destroy(principal, module, instance, dry_run=dry_run,
                                tenant=h.param("tenant"), asynchronous=asynchronous,
                                idempotency=_idempotency(h), origin=_origin(h))
    else:
        body = h.read_body(required=True)
        submitted = svc.apply(principal, module, instance, body, dry_run=dry_run,
                              asynchronous=asynchronous, idempotency=_idempotency(h),
                              ttl=h.param("ttl"), origin=_origin(h))
    return _answer(h, principal, submitted, wait, named=named)


def _answer(h: RequestHandler, principal: Principal, submitted: Submitted,
            wait: float | None, *, named: bool) -> Reply:
    """The run's outcome when it ends within the wait (None: as long as it takes), else
    202 with its record."""
    svc = h.server.service
    if submitted.run is not None:
        h.after_answer.append(submitted.run.answered.set)
    if not svc.history.wait(submitted, wait):
        record = svc.history.record(principal, submitted.run_id)
        applied = [p for p in ("respond-async", f"wait={int(wait or 0)}")
                   if p in h.preferences]
        headers = {"Location": f"/runs/{submitted.run_id}"}
        if applied:
            headers["Preference-Applied"] = ", ".join(applied)
        return Reply(202, render.run(record, principal.tenant_key), headers)
    outcome = svc.history.result(principal, submitted)
    headers = {}
    if wait is not None and f"wait={int(wait)}" in h.preferences:
        headers["Preference-Applied"] = f"wait={int(wait)}"
    if named and isinstance(outcome, Applied) and outcome.created:
        headers["Location"] = f"/{outcome.module}/{outcome.instance}"
        return Reply(201, render.render(outcome), headers)
    return Reply(200, render.render(outcome), headers)


def _runs_route(h: RequestHandler, principal: Principal, rest: list[str]) -> Reply | None:
    svc = h.server.service
    if not rest:
        allow(h, "GET")
        page = svc.history.list_runs(principal, module=h.param("module"),
                                     status=h.param("status"), limit=_limit(h),
                                     after=h.param("before") or "")
        return Reply(200, render.run_page(page, "/runs", _kept(h, "module", "status",
                                                                "limit")))
    run_id = rest[0]
    if len(rest) == 1:
        allow(h, "GET")
        record = svc.history.record(principal, run_id)
        return Reply(200, render.run(record, principal.tenant_key))
    if rest[1:] == ["events"]:
        allow(h, "GET")
        _stream(h, principal, run_id)
        return None
    if rest[1:] == ["cancel"]:
        allow(h, "POST")
        h.read_body(required=False)
        record = svc.history.cancel(principal, run_id, force=h.flag("force"))
        return Reply(202, render.run(record, principal.tenant_key))
    if rest[1:] == ["apply"]:
        allow(h, "POST")
        h.read_body(required=False)
        asynchronous, wait = prefer(h)
        submitted = svc.apply_plan(principal, run_id, asynchronous=asynchronous,
                                   idempotency=_idempotency(h), origin=_origin(h))
        return _answer(h, principal, submitted, wait, named=True)
    raise NotFound(f"nothing at {h.url_path[:100]}")


def _stream(h: RequestHandler, principal: Principal, run_id: str) -> None:
    """Replay the run's events, then follow them live, as NDJSON or Server-Sent Events."""
    sse = "text/event-stream" in (h.headers.get("Accept") or "")
    after_text = (h.headers.get("Last-Event-ID") if sse else None) or h.param("after") or "0"
    if not after_text.isascii() or not after_text.isdigit() or len(after_text) > 9:
        raise BadRequest("Last-Event-ID and ?after= take an event's seq number")
    batches = h.server.service.history.follow(principal, run_id, int(after_text))
    write = h.start_stream("text/event-stream" if sse else "application/x-ndjson")
    if write is None:
        return  # HEAD
    for batch in batches:
        if not batch:
            if sse:
                write(b": waiting\n\n")  # keeps proxies from timing the stream out
            continue
        chunk = []
        for e in batch:
            data = json.dumps(render.event(e), separators=(",", ":"))
            chunk.append(f"id: {e['seq']}\nevent: {e['type']}\ndata: {data}\n\n" if sse
                         else data + "\n")
        write("".join(chunk).encode())
    write(b"")


def prefer(h: RequestHandler) -> tuple[bool, float | None]:
    """RFC 7240 `Prefer`: (run asynchronously, seconds to wait before 202 or None)."""
    prefs = h.preferences
    wait = None
    for p in prefs:
        m = _PREFER_WAIT.match(p)
        if m:
            wait = float(min(int(m.group(1)), MAX_PREFER_WAIT))
    if "respond-async" in prefs:
        return True, wait or 0.0
    return wait is not None, wait


def _origin(h: RequestHandler) -> Origin:
    return Origin(h.client_ip, h.request_id)


def _idempotency(h: RequestHandler) -> Idempotency | None:
    key = h.headers.get("Idempotency-Key")
    if key is None:
        return None
    digest = hashlib.sha256(f"{h.command} {h.path}\n".encode() + h.raw_body).hexdigest()
    return Idempotency(key.strip('"') if key.startswith('"') else key, digest)


def _limit(h: RequestHandler) -> int:
    text = h.param("limit") or "20"
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 100:
        raise BadRequest("limit is a number from 1 to 100",
                         extra={"errors": [{"field": "limit", "message": "1 to 100"}]})
    return int(text)


def _kept(h: RequestHandler, *names: str) -> dict[str, str]:
    """The query parameters a next-page link keeps."""
    return {n: v for n in names if (v := h.param(n)) is not None}

