"""What each route does: read its request, call one operation of the service, and answer
(a `Reply`, or None when it answered itself: bytes or a stream of events).

Which path and method reach which of these is the route table's (`routes.py`).
"""

from __future__ import annotations

import hashlib
import itertools
import re
import time

from .. import metrics
from ..app.execute import Applied
from ..app.history import Idempotency, Submitted
from ..app.submit import Origin
from ..errors import BadRequest, NotFound, Rejected, Unavailable
from ..runs.store import ENDED
from . import docs, render, streams
from .request import Call, Reply, Request
from .schemas import MAX_PREFER_WAIT

# RFC 7240: a preference's value is a token or a quoted string (`wait=5`, `wait="5"`).
_PREFER_WAIT = re.compile(r'^wait\s*=\s*(?:(\d+)|"(\d+)")$')


# -- the server -------------------------------------------------------------------------


def health(call: Call) -> Reply:
    """Liveness."""
    return Reply(200, {"status": "ok"})


def readiness(call: Call) -> Reply:
    """Readiness: 503 with the report when a part is not working."""
    report = call.service.readiness()
    if not report.ok:
        problem = Unavailable("not ready: a part below is not working", retry_after=5)
        problem.extra.update(render.readiness(report))
        raise problem
    return Reply(200, {"status": "ready", **render.readiness(report)})


def openapi(call: Call) -> Reply:
    """The OpenAPI document of the modules the caller may read."""
    return Reply(200, call.site.api.document(call.service.served(), call.principal))


def docs_page(call: Call) -> None:
    """The docs page and its files, with the page's Content-Security-Policy."""
    found = docs.asset(call.params.get("asset", ""))
    if found is None:
        raise NotFound(f"nothing at {call.req.url_path[:100]}")
    headers = {"Content-Security-Policy": docs.content_security_policy(
        call.site.token_url if call.site.auth else ""), "Referrer-Policy": "no-referrer"}
    if found.cacheable:
        headers["Cache-Control"] = "public, max-age=3600"
    call.req.send_bytes(200, found.data, found.content_type, headers)


def metrics_text(call: Call) -> None:
    """The Prometheus metrics."""
    call.req.send_bytes(200, call.service.metrics_text(call.who), metrics.CONTENT_TYPE)


def index(call: Call) -> Reply:
    """The modules the caller may read, with links."""
    return Reply(200, {"modules": [{"name": m.name, "href": f"/{m.name}",
                                    "description": m.description}
                                   for m in call.service.index(call.who)]})


# -- modules and instances --------------------------------------------------------------


def describe(call: Call) -> Reply:
    """A module: variables, outputs, the caller's instances."""
    module = call.params["module"]
    call.service.check_module(module)
    return Reply(200, render.render(call.service.describe(call.who, module,
                                                          call.req.param("version"))))


def show(call: Call) -> Reply:
    """An instance, read from its state."""
    module = call.params["module"]
    call.service.check_module(module)
    return Reply(200, render.render(call.service.show(
        call.who, module, call.params["instance"], call.req.param("tenant"))))


def apply(call: Call) -> Reply:
    """Apply (or plan) the module's default instance, or a named one."""
    module, instance, named = _target(call)
    h, svc = call.req, call.service
    dry_run = h.flag("dry_run")
    asynchronous, wait = prefer(h)
    body = h.read_body(required=True)
    submitted = svc.apply(call.who, module, instance, body, dry_run=dry_run,
                          asynchronous=asynchronous, idempotency=_idempotency(h),
                          ttl=h.param("ttl"), origin=_origin(h), cascade=h.flag("cascade"),
                          version=h.param("version"))
    return _answer(call, submitted, wait, named=named)


def destroy(call: Call) -> Reply:
    """Destroy (or plan to) the module's default instance, or a named one; `?orphan=true`
    (admin) forgets it instead, destroying nothing."""
    module, instance, named = _target(call)
    h, svc = call.req, call.service
    dry_run = h.flag("dry_run")
    if h.flag("orphan"):
        if dry_run:  # each is valid alone: the pair is refused as a whole (422)
            raise Rejected("?orphan=true takes no ?dry_run: an orphan plans nothing",
                           extra={"errors": [{"field": "orphan", "message": "not with "
                                              "dry_run"}]})
        h.read_body(required=False)
        return Reply(200, render.render(svc.orphan(call.who, module, instance,
                                                   tenant=h.param("tenant"),
                                                   address=h.client_ip)))
    asynchronous, wait = prefer(h)
    h.read_body(required=False)
    submitted = svc.destroy(call.who, module, instance, dry_run=dry_run,
                            tenant=h.param("tenant"), asynchronous=asynchronous,
                            idempotency=_idempotency(h), origin=_origin(h))
    return _answer(call, submitted, wait, named=named)


def _target(call: Call) -> tuple[str, str, bool]:
    """The module (which must exist), the instance, and whether the path named it."""
    module = call.params["module"]
    call.service.check_module(module)
    instance = call.params.get("instance")
    return module, instance or "default", instance is not None


def unlock(call: Call) -> Reply:
    """Admin: clear a state lock left by a killed run."""
    module, instance = call.params["module"], call.params["instance"]
    call.service.check_module(module)
    body = call.req.read_body(required=True)
    lock_id = body.get("lock_id") if isinstance(body, dict) else None
    return Reply(200, render.render(call.service.force_unlock(
        call.who, module, instance, lock_id, tenant=call.req.param("tenant"))))


def instance_runs(call: Call) -> Reply:
    """An instance's runs, newest first."""
    module, instance, h = call.params["module"], call.params["instance"], call.req
    page = call.service.list_runs(call.who, module=module, instance=instance,
                                  tenant=h.param("tenant"), limit=_limit(h),
                                  after=h.param("before") or "")
    return Reply(200, render.run_page(page, f"/{module}/{instance}/runs",
                                      _kept(h, "tenant", "limit")))


# -- drift ------------------------------------------------------------------------------


def drift(call: Call) -> Reply:
    """Check an instance for drift (`?reconcile=true`: then apply it if drifted)."""
    module, instance, _ = _target(call)
    h = call.req
    asynchronous, wait = prefer(h)
    h.read_body(required=False)
    submitted = call.service.drift(call.who, module, instance, reconcile=h.flag("reconcile"),
                                   tenant=h.param("tenant"), asynchronous=asynchronous,
                                   idempotency=_idempotency(h), origin=_origin(h))
    return _answer(call, submitted, wait, named=True)


# -- fleet upgrades ---------------------------------------------------------------------


def start_upgrade(call: Call) -> Reply:
    """Admin: preview a fleet upgrade (a saved plan per instance; nothing applied)."""
    module = call.params["module"]
    call.service.check_module(module)
    doc = call.service.start_upgrade(call.who, module, call.req.read_body(required=True))
    return Reply(202, render.upgrade(doc), {"Location": f"/upgrades/{doc['id']}"})


def get_upgrade(call: Call) -> Reply:
    """Admin: an upgrade's record (its progress); with `Prefer: wait=N`, once it is no
    longer planning or applying, or after N seconds."""
    doc = call.service.upgrade(call.who, call.params["id"], _asked_wait(call.req) or 0.0)
    return Reply(200, render.upgrade(doc))


def apply_upgrade(call: Call) -> Reply:
    """Admin: apply a previewed upgrade's saved plans in batches."""
    call.req.read_body(required=False)
    return Reply(202, render.upgrade(call.service.apply_upgrade(call.who,
                                                                call.params["id"])))


# -- runs -------------------------------------------------------------------------------


def list_runs(call: Call) -> Reply:
    """The caller's runs (an admin's: everyone's), newest first."""
    h = call.req
    page = call.service.list_runs(call.who, module=h.param("module"),
                                  status=h.param("status"), limit=_limit(h),
                                  after=h.param("before") or "")
    return Reply(200, render.run_page(page, "/runs", _kept(h, "module", "status", "limit")))


def get_run(call: Call) -> Reply:
    """One run's record."""
    record = call.service.run(call.who, call.params["id"])
    return Reply(200, render.run(record, call.who.tenant_key))


def cancel_run(call: Call) -> Reply:
    """Cancel a run."""
    call.req.read_body(required=False)
    record = call.service.cancel(call.who, call.params["id"], force=call.req.flag("force"))
    return Reply(202, render.run(record, call.who.tenant_key))


def apply_plan(call: Call) -> Reply:
    """Apply exactly the plan a dry run saved."""
    h = call.req
    h.read_body(required=False)
    asynchronous, wait = prefer(h)
    submitted = call.service.apply_plan(call.who, call.params["id"],
                                        asynchronous=asynchronous,
                                        idempotency=_idempotency(h), origin=_origin(h))
    return _answer(call, submitted, wait, named=True)


def retry_run(call: Call) -> Reply:
    """Run a failed, canceled, lost or expired run again (its kept request), as a new run."""
    h = call.req
    h.read_body(required=False)
    asynchronous, wait = prefer(h)
    submitted = call.service.retry(call.who, call.params["id"], asynchronous=asynchronous,
                                   idempotency=_idempotency(h), origin=_origin(h))
    return _answer(call, submitted, wait, named=True)


def approve_run(call: Call) -> Reply:
    """Approve a run awaiting approval: exactly its saved plan is applied."""
    h = call.req
    h.read_body(required=False)
    _, wait = prefer(h)
    submitted = call.service.approve(call.who, call.params["id"])
    return _answer(call, submitted, wait, named=True)


def reject_run(call: Call) -> Reply:
    """Reject a run awaiting approval: it ends `rejected`."""
    call.req.read_body(required=False)
    record = call.service.reject(call.who, call.params["id"])
    return Reply(200, render.run(record, call.who.tenant_key))


def run_events(call: Call) -> None:
    """Replay the run's events, then follow them live, as NDJSON or Server-Sent Events."""
    h = call.req
    sse = "text/event-stream" in (h.headers.get("Accept") or "")
    after_text = (h.headers.get("Last-Event-ID") if sse else None) or h.param("after") or "0"
    if not after_text.isascii() or not after_text.isdigit() or len(after_text) > 9:
        raise BadRequest("Last-Event-ID and ?after= take an event's seq number")
    batches = call.service.follow(call.who, call.params["id"], int(after_text))
    if sse and call.service.run(call.who, call.params["id"]).status in ENDED:
        # An ended run's stream does not wait: nothing after `after` is 204, which tells
        # an EventSource to stop reconnecting (an empty 200 makes it retry forever).
        first = next(batches, None)
        if first is None:
            h.send_bytes(204, b"", "text/event-stream")
            return
        batches = itertools.chain([first], batches)
    limits = call.site.streams
    # Counted only once the run is known to be the caller's (another tenant's is 404
    # before), and given back however the stream ends.
    with limits.hold(call.who.tenant_key):
        write = h.start_stream("text/event-stream" if sse else "application/x-ndjson")
        if write is None:
            return  # HEAD
        streams.relay(batches, write, sse=sse, seconds=limits.max_seconds,
                      gone=h.client_gone, clock=time.monotonic)


# -- the parts of answers and requests ----------------------------------------------------


def _answer(call: Call, submitted: Submitted, wait: float | None, *, named: bool) -> Reply:
    """The run's outcome when it ends within the wait (None: as long as it takes), else
    202 with its record."""
    h, svc, principal = call.req, call.service, call.who
    if submitted.run is not None:
        h.after_answer.append(submitted.run.answered.set)
    asked = _asked_wait(h)
    if not svc.wait(submitted, wait):
        record = svc.run(principal, submitted.run_id)
        applied = ["respond-async"] if "respond-async" in h.preferences else []
        if asked is not None:
            applied.append(f"wait={int(asked)}")
        headers = {"Location": f"/runs/{submitted.run_id}"}
        if applied:
            headers["Preference-Applied"] = ", ".join(applied)
        return Reply(202, render.run(record, principal.tenant_key), headers)
    outcome = svc.result(principal, submitted)
    headers = {}
    if asked is not None:
        headers["Preference-Applied"] = f"wait={int(asked)}"
    if named and isinstance(outcome, Applied) and outcome.created:
        headers["Location"] = f"/{outcome.module}/{outcome.instance}"
        return Reply(201, render.render(outcome), headers)
    return Reply(200, render.render(outcome), headers)


def prefer(h: Request) -> tuple[bool, float | None]:
    """RFC 7240 `Prefer`: (run asynchronously, seconds to wait before 202 or None)."""
    wait = _asked_wait(h)
    if "respond-async" in h.preferences:
        return True, wait or 0.0
    return wait is not None, wait


def _asked_wait(h: Request) -> float | None:
    """The seconds of `Prefer: wait=N` (the last one given), at most MAX_PREFER_WAIT: a
    longer wait is the longest honoured, not no wait at all; None when none is given."""
    wait = None
    for p in h.preferences:
        m = _PREFER_WAIT.match(p)
        if m:
            digits = (m.group(1) or m.group(2)).lstrip("0") or "0"
            # More digits than the cap has cannot be under it (nor need converting).
            wait = float(MAX_PREFER_WAIT if len(digits) > len(str(MAX_PREFER_WAIT))
                         else min(int(digits), MAX_PREFER_WAIT))
    return wait


def _origin(h: Request) -> Origin:
    return Origin(h.client_ip, h.request_id)


def _idempotency(h: Request) -> Idempotency | None:
    """The request's `Idempotency-Key` (a structured-field string, `"key"`, or the bare
    key) and the digest of what it came with; one key at most, its quotes balanced."""
    keys = h.headers.get_all("Idempotency-Key") or []
    if not keys:
        return None
    key = keys[0]
    if len(keys) > 1:
        raise _malformed_key("send one Idempotency-Key header, not several")
    if key.startswith('"') and key.endswith('"') and len(key) >= 2:
        key = key[1:-1]
    if '"' in key:
        raise _malformed_key('Idempotency-Key is a key or "a quoted key": its quotes '
                             "do not match")
    digest = hashlib.sha256(f"{h.command} {h.path}\n".encode() + h.raw_body).hexdigest()
    return Idempotency(key, digest)


def _malformed_key(detail: str) -> BadRequest:
    return BadRequest(detail, extra={"errors": [{"field": "Idempotency-Key",
                                                 "message": "malformed"}]})


def _limit(h: Request) -> int:
    text = h.param("limit") or "20"
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 100:
        raise BadRequest("limit is a number from 1 to 100",
                         extra={"errors": [{"field": "limit", "message": "1 to 100"}]})
    return int(text)


def _kept(h: Request, *names: str) -> dict[str, str]:
    """The query parameters a next-page link keeps."""
    return {n: v for n in names if (v := h.param(n)) is not None}

