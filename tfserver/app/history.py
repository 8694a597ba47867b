"""What runs did and do, for callers: records, lists, events, cancels, outcomes, and the
runs an idempotency key or a saved plan points to.

A caller sees its own tenant's runs (an admin every run); anyone else gets 404, as if
there were none.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..auth import Principal
from ..errors import BadRequest, Conflict, NotFound, Rejected, TFServerError
from ..names import workspace_tenant
from ..runs.liveness import QUEUED
from ..runs.queued import QueuedRuns
from ..runs.registry import Runs
from ..runs.run import Run, RunProblem
from ..runs.store import ACTIVE, AWAITING, RunRecord
from .catalog import Catalog, target_workspace
from .execute import Applied, Checked, Destroyed, Operation, Outcome, Planned

logger = logging.getLogger(__name__)

#: Idempotency keys: 1-255 visible ASCII characters (the one definition: the OpenAPI
#: document's pattern is this text).
IDEMPOTENCY_KEY_PATTERN = "^[!-~]{1,255}$"
_IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)


@dataclass(frozen=True)
class RunPage:
    """Some runs, newest first, and the id to continue after (None at the end)."""

    runs: list[RunRecord]
    next_after: str | None
    #: The caller's own tenant (records of other tenants show theirs).
    viewer_tenant: str


@dataclass(frozen=True)
class Idempotency:
    """An Idempotency-Key and the fingerprint of the request that carried it."""

    key: str
    fingerprint: str


@dataclass(frozen=True)
class Submitted:
    """A run that a request started (or found again by its idempotency key)."""

    run_id: str
    run: Run | None
    replayed: bool = False


class History:
    """Runs as their callers see them."""

    def __init__(self, runs: Runs, catalog: Catalog, *, idempotency_ttl: float,
                 queued: QueuedRuns | None = None) -> None:
        self.runs = runs
        self.store = runs.store
        self.catalog = catalog
        self.idempotency_ttl = idempotency_ttl
        #: The `sqs` engine's queue, when runs wait there.
        self.queued = queued

    def wait(self, submitted: Submitted, timeout: float | None) -> bool:
        """Wait for the run to end (at most `timeout` seconds); True if it ended, False
        also at once when it awaits its approval (its caller is answered 202)."""
        if submitted.run is not None:
            return submitted.run.settle(timeout) and submitted.run.done.is_set()
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        while True:
            status = self.runs.record(submitted.run_id).status
            if status not in ACTIVE:
                return status != AWAITING
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            # A run elsewhere (a worker): its record is read every 20 ms for the first
            # seconds (most runs end by then; a small read), then every 250 ms.
            pause = 0.02 if now - started < 5.0 else 0.25
            time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - now)))

    def result(self, principal: Principal, submitted: Submitted) -> Outcome:
        """The ended run's outcome as the synchronous call answers it; raises its error."""
        run = submitted.run
        if run is not None and run.done.is_set() and not submitted.replayed:
            if run.error is not None:
                raise run.error
            outcome: Outcome = run.result
            return outcome
        return _outcome_of(self.runs.record(submitted.run_id))

    def record(self, principal: Principal, run_id: str) -> RunRecord:
        """One run's record (404 for another tenant's, unless admin)."""
        record = self.visible(principal, self.runs.record(run_id))
        if self.queued is not None and record.status == "queued" and record.replica == QUEUED:
            record.queue_position = self.queued.waiting(record) + 1
        return record

    def list_runs(self, principal: Principal, *, module: str | None = None,
                  instance: str | None = None, tenant: str | None = None,
                  status: str | None = None, limit: int = 20,
                  after: str = "") -> RunPage:
        """Runs newest first: the caller's (an admin: everyone's, or one tenant's), of
        one module or instance, of one status."""
        if module is not None:
            self.catalog.module(module)
            principal.require(module, "read")
        key = principal.tenant_key
        if instance is not None:
            ws = target_workspace(principal, instance, tenant)
            key = workspace_tenant(ws)
        scope: str | None = key if (instance is not None or not principal.admin) else None
        found, cursor = _page(
            self.runs, tenant=scope, module=module, instance=instance, after=after, limit=limit,
            keep=lambda r: (status is None or r.status == status)
            and (principal.admin or principal.can(r.module, "read")))
        return RunPage(found, cursor, principal.tenant_key)

    def cancel(self, principal: Principal, run_id: str, *, force: bool) -> RunRecord:
        """Cancel a run (409 when it already ended)."""
        record = self.visible(principal, self.runs.record(run_id))
        principal.require(record.module, "write")
        if self.queued is not None and (ended := self.queued.cancel(run_id)) is not None:
            return ended  # it was still waiting on the queue: it never starts
        return self.runs.cancel(run_id, force=force)

    def follow(self, principal: Principal, run_id: str,
               after: int = 0) -> Iterator[list[dict[str, Any]]]:
        """The run's events after `after`, replayed and then live, until it ends."""
        self.record(principal, run_id)
        return self.runs.follow(run_id, after)

    def visible(self, principal: Principal, record: RunRecord) -> RunRecord:
        """The record if the caller may see it; else 404, as if there were none."""
        if record.tenant != principal.tenant_key and not principal.admin:
            raise NotFound(f"no run {record.id!r}")
        if not principal.can(record.module, "read"):
            raise NotFound(f"no run {record.id!r}")
        return record

    def replay(self, tenant: str, run_id: str, idem: Idempotency) -> Submitted | None:
        """The run an earlier request with this key started, or None after claiming the
        key for the new run `run_id`; 422 when the key came with another request.

        A key whose run never got a record within the lost-run window (its server died
        while admitting it) is claimed afresh: the retry runs. A key whose run was lost is
        a final 409: what it did is unknown, so nothing runs again under that key.
        """
        _check_key(idem)
        existing = self.store.claim_key(tenant, idem.key, {
            "fingerprint": idem.fingerprint, "run_id": run_id, "claimed_at": time.time(),
            "expires_at": time.time() + self.idempotency_ttl}, time.time())
        if existing is None:
            return None
        found = self._found(existing, idem)
        if found is not None:
            return found
        # The claim's run never got a record and is past the window: take the key over.
        self.store.drop_key(tenant, idem.key)
        if self.store.claim_key(tenant, idem.key, {
                "fingerprint": idem.fingerprint, "run_id": run_id, "claimed_at": time.time(),
                "expires_at": time.time() + self.idempotency_ttl}, time.time()) is None:
            return None
        raise Conflict("a request with this Idempotency-Key is in progress", retry_after=1)

    def replayed(self, tenant: str, idem: Idempotency) -> Submitted | None:
        """The run an earlier request with this key started, if any (claims nothing): a
        retry is answered before anything else is checked."""
        _check_key(idem)
        existing = self.store.key_entry(tenant, idem.key, time.time())
        return self._found(existing, idem) if existing is not None else None

    def _found(self, existing: dict[str, Any], idem: Idempotency) -> Submitted | None:
        """The run of a key's entry; None when its run never got a record and the entry is
        older than the lost-run window."""
        if existing.get("fingerprint") != idem.fingerprint:
            raise Rejected("this Idempotency-Key was used with another request")
        run_id = str(existing.get("run_id"))
        local = self.runs.local(run_id)
        if local is not None:
            return Submitted(run_id, local, replayed=True)
        try:
            record = self.runs.record(run_id)
        except NotFound:
            claimed = float(existing.get("claimed_at") or 0.0)
            if time.time() - claimed > self.runs.liveness.lost_after:
                return None
            # The first request with this key is still being admitted (or was refused a
            # moment ago): the draft's answer to a concurrent duplicate.
            raise Conflict("a request with this Idempotency-Key is in progress",
                           retry_after=1) from None
        if record.status == "lost":
            raise Conflict(f"run {run_id}, started with this Idempotency-Key, was lost (the "
                           "server running it stopped): what it did is unknown. Read the "
                           "instance, then send the request with a new key", retry_after=0)
        return Submitted(run_id, None, replayed=True)

    def drop_key(self, tenant: str, idem: Idempotency | None) -> None:
        """Forget a key whose request was refused before its run began."""
        if idem is not None:
            self.store.drop_key(tenant, idem.key)

    def mark_plan_applied(self, plan_id: str, run_id: str | None) -> None:
        """Note on the plan's record that it is used, or (None) free again (best effort;
        the mark is the `.used` object)."""
        def note(record: RunRecord) -> None:
            if record.plan is not None:
                record.plan["applied_by"] = run_id

        # The plan may be this replica's and not stored yet (a synchronous dry run is
        # stored just after its answer): its own write then carries the note.
        if self.runs.amend(plan_id, note):
            return
        try:
            record = self.store.get(plan_id)
            if record is not None and record.plan is not None:
                note(record)
                self.store.save(record)
        except TFServerError as e:
            logger.warning("plan %s: could not note its use: %s", plan_id, e.detail)


def _check_key(idem: Idempotency) -> None:
    if not _IDEMPOTENCY_KEY.match(idem.key):
        raise BadRequest("Idempotency-Key must be 1-255 visible ASCII characters",
                         extra={"errors": [{"field": "Idempotency-Key",
                                            "message": "malformed"}]})


def _page(runs: Runs, *, tenant: str | None, module: str | None, instance: str | None,
         after: str, limit: int, keep: Callable[[RunRecord], bool]
         ) -> tuple[list[RunRecord], str | None]:
    """Up to `limit` records that `keep` accepts, newest first, after the run id
    `after`: a tenant's (or everyone's, `tenant` None), of a module or an instance;
    and the id to continue after, or None at the end. Scans at most 2,000 runs."""
    if after:
        return _stored_page(runs, tenant, module, instance, after, limit, keep)
    # Runs of this replica not stored yet (a synchronous run is stored at its first
    # heartbeat, or just after its answer) are the newest: the first page has them.
    # Taken before the store is read: a run stored in between is then in one or both.
    pending = [r for r in runs.unstored()
               if (tenant is None or r.tenant == tenant)
               and (module is None or r.module == module)
               and (instance is None or r.instance == instance) and keep(r)]
    found, cursor = _stored_page(runs, tenant, module, instance, after, limit, keep)
    if pending:
        merged = sorted({r.id: r for r in (*pending, *found)}.values(), key=lambda r: r.id)
        if len(merged) > limit:
            merged = merged[:limit]
            cursor = merged[-1].id
        found = merged
    return found, cursor


def _stored_page(runs: Runs, tenant: str | None, module: str | None, instance: str | None,
                 after: str, limit: int, keep: Callable[[RunRecord], bool]
                 ) -> tuple[list[RunRecord], str | None]:
    """A page of stored records (see `_page`)."""
    found: list[RunRecord] = []
    cursor = after
    scanned = 0
    while len(found) < limit and scanned < 2000:
        ids = runs.store.ids(tenant=tenant, module=module, instance=instance,
                             after=cursor, limit=100)
        if not ids:
            return found, None
        scanned += len(ids)
        cursor = ids[-1]
        for record in runs.records(ids):
            if (module is None or record.module == module) and keep(record):
                found.append(record)
                if len(found) == limit:
                    return found, record.id
        if len(ids) < 100:
            return found, None
    return found, cursor


def _outcome_of(record: RunRecord) -> Outcome:
    """A stored run's outcome, as its synchronous call answered (outputs redacted)."""
    if record.status != "succeeded":
        raise RunProblem(record.problem or {
            "type": "about:blank", "title": "Service Unavailable", "status": 503,
            "detail": f"the run is {record.status}: the replica that ran it stopped"})
    changes = record.changes or {"add": 0, "change": 0, "remove": 0}
    op: Operation = record.operation  # type: ignore[assignment]
    if op in ("plan", "plan-destroy"):
        return Planned(record.module, record.instance, changes, record.planned or [],
                       record.id, record.moved or {"to": record.version})
    if op == "destroy":
        return Destroyed(record.module, record.instance, changes, record.id)
    if op == "drift":
        drift = record.drift or {}
        return Checked(record.module, record.instance, changes, record.id, drift,
                       drift.get("reconciled_by"))
    return Applied(record.module, record.instance, record.outputs or {}, changes, record.id,
                   created=bool(record.created), warnings=tuple(record.warnings or ()),
                   public_outputs=record.outputs or {})
