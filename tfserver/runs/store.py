"""Run records, event logs, saved plans and idempotency keys, kept in the state backend.

Everything lives in the backend's object store (a folder beside local state, or the state
bucket under its prefix), so any replica can answer for any run. The layout:

    _runs/records/<id>.json                      the record
    _runs/events/<id>.ndjson                     its event log
    _runs/by-tenant/<tenant>/<id>                an empty index entry per run
    _runs/by-instance/<tenant>/<module>/<instance>/<id>
    _runs/active/<tenant>.<module>.<id>          while queued or running: its first record
                                                 (read for its "replica")
    _runs/cancel/<id>                            a cancel asked on another replica
    _runs/replicas/<replica>                     its heartbeat: {"at", "runs": [its ids]}
    _runs/requests/<id>.json                     what the run was asked (specs.py: retry)
    _runs/awaiting/<id>.json                     a run awaiting approval: its apply's spec
    _runs/answers/<id>                           its answer, written once (approvals.py)
    _plans/<id>.tfplan, _plans/<id>.json         a saved plan and what applying it needs
    _plans/<id>.used                             written once, by the run that applies it
    _idempotency/<tenant>.<sha256 of the key>    {"fingerprint", "run_id", "claimed_at",
                                                 "expires_at"}

Run ids sort newest first (the first 12 hex digits count down from the end of time in
milliseconds), so every listing is one ordered LIST call.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import quote

from ..errors import TFServerError
from ..storage.base import ObjectStore
from .specs import request_key

logger = logging.getLogger(__name__)

ACTIVE = frozenset({"queued", "running"})
ENDED = frozenset({"succeeded", "failed", "canceled", "lost", "rejected", "expired"})
#: A run that planned and waits for an approval (app/approvals.py): neither active (no
#: replica beats for it; it is never lost) nor ended.
AWAITING = "awaiting_approval"
_ID_MAX = (1 << 48) - 1


def new_run_id(now: float | None = None) -> str:
    """32 hex digits that sort newest first, then random."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{_ID_MAX - ms:012x}{os.urandom(10).hex()}"


def run_id_time(run_id: str) -> float:
    """When a run id was made (seconds since the epoch)."""
    return (_ID_MAX - int(run_id[:12], 16)) / 1000.0


def is_run_id(text: str) -> bool:
    """True for 32 lowercase hex digits."""
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


def rfc3339(epoch: float | None) -> str | None:
    """An RFC 3339 UTC time with milliseconds, or None."""
    if epoch is None:
        return None
    try:
        moment = dt.datetime.fromtimestamp(epoch, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return None  # not a date (a record written by hand, or damaged)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class RunRecord:
    """What is known of one run; the stored form, and what `GET /runs/{id}` shows."""

    id: str
    module: str
    instance: str
    workspace: str
    tenant: str
    subject: str
    operation: str
    status: str = "queued"
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    queue_position: int | None = None
    changes: dict[str, int] | None = None
    outputs: dict[str, Any] | None = None
    planned: list[dict[str, str]] | None = None
    problem: dict[str, Any] | None = None
    #: An apply that made a new instance (the synchronous answer was 201).
    created: bool | None = None
    #: A plan that can be applied: {"expires_at": epoch, "applied_by": run id or None}.
    plan: dict[str, Any] | None = None
    #: The run whose saved plan this run applies.
    plan_of: str | None = None
    #: The run this run retries (`POST /runs/{id}/retry`: its kept request again).
    retry_of: str | None = None
    #: The module version the run used (None: an unversioned module).
    version: str | None = None
    #: A plan or apply that moves the instance to `version`: from which, and the
    #: variables that differ (`dropped`, `added`, `retyped`: names only).
    moved: dict[str, Any] | None = None
    idempotency_key: str | None = None
    #: Who asked, for the audit log: the token's client id, the client's address, and
    #: the request's id.
    client_id: str | None = None
    client_address: str | None = None
    request_id: str | None = None
    replica: str = ""
    heartbeat_at: float = field(default_factory=time.time)
    #: "requested" once a cancel was asked, "forced" once the process group was killed.
    cancel: str | None = None
    state_may_be_locked: bool = False
    #: What went wrong around a run that succeeded (its inputs not kept, for one).
    warnings: list[str] | None = None
    #: How many times the run was started (a run whose worker died is run again).
    attempt: int = 1
    #: A drift check's report: status, changes as names only, the reconciling run.
    drift: dict[str, Any] | None = None
    #: The references resolved at the start: [{"variable", "ref", "serial"}].
    references: list[dict[str, Any]] | None = None
    #: The run whose cascade started this one (`?cascade=true`).
    triggered_by: str | None = None
    #: A run that needed an approval: {"separate_approver", "expires_at", "planned_by",
    #: "answer": approved|rejected|expired|canceled, "answered_by", "answered_at"}.
    approval: dict[str, Any] | None = None

    def to_json(self) -> bytes:
        """The stored form."""
        # The fields themselves, not `asdict`: that deep-copies every nested list and
        # dict first, and a record is serialised several times a run.
        return json.dumps(vars(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> RunRecord | None:
        """A stored record, or None when it cannot be read."""
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                return None
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in doc.items() if k in known})
        except (ValueError, TypeError):
            return None

    @classmethod
    def damaged(cls, run_id: str) -> RunRecord:
        """What is shown of a run whose stored record cannot be read: lost."""
        made = run_id_time(run_id) if is_run_id(run_id) else 0.0
        return cls(id=run_id, module="", instance="", workspace="", tenant="", subject="",
                   operation="", status="lost", created_at=made, heartbeat_at=made,
                   problem=TFServerError("the run's stored record is damaged").problem())

    @property
    def active(self) -> bool:
        """Queued or running."""
        return self.status in ACTIVE


class RunStore:
    """The layout above, over an `ObjectStore`."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects

    # -- records ---------------------------------------------------------------------

    def create(self, record: RunRecord) -> None:
        """Store a new record with its index entries and its active marker (none for a
        run stored only once it ended)."""
        data, key = record.to_json(), f"_runs/records/{record.id}.json"
        self.objects.put(key, data)
        t, r = record.tenant, record.id
        self.objects.put(f"_runs/by-tenant/{t}/{r}", b"")
        self.objects.put(f"_runs/by-instance/{t}/{record.module}/{record.instance}/{r}", b"")
        if record.active:  # the start record, its "replica" the replica that holds it
            self.objects.put_copy(self._active(record), data, key)

    @staticmethod
    def _active(record: RunRecord) -> str:
        return f"_runs/active/{record.tenant}.{record.module}.{record.id}"

    def save(self, record: RunRecord) -> None:
        """Replace the record; an ended run loses its active marker."""
        self.objects.put(f"_runs/records/{record.id}.json", record.to_json())
        if not record.active:
            self.objects.delete(self._active(record))
            self.objects.delete(f"_runs/cancel/{record.id}")

    def get(self, run_id: str) -> RunRecord | None:
        """The stored record, if any (a damaged one is shown lost)."""
        data = self.objects.get(f"_runs/records/{run_id}.json")
        if data is None:
            return None
        record = RunRecord.from_json(data)
        if record is None:
            logger.warning("run %s: its stored record is damaged (not a record's JSON "
                           "object); shown as lost", run_id)
            return RunRecord.damaged(run_id)
        return record

    def ids(self, *, tenant: str | None, module: str | None = None,
            instance: str | None = None, after: str = "", limit: int = 100) -> list[str]:
        """Run ids, newest first: a tenant's, an instance's, or (tenant None) everyone's."""
        if tenant is None:
            names = self.objects.keys("_runs/records/", start_after=f"{after}.json"
                                      if after else "", limit=limit)
            return [n.removesuffix(".json") for n in names]
        folder = (f"_runs/by-instance/{tenant}/{module}/{instance}/" if instance
                  else f"_runs/by-tenant/{tenant}/")
        return self.objects.keys(folder, start_after=after, limit=limit)

    def active(self) -> list[tuple[str, str, str]]:
        """(tenant, module, run id) of every run some replica holds queued or running."""
        found = []
        for name in self.objects.keys("_runs/active/", limit=100_000):
            tenant, _, rest = name.partition(".")
            module, _, run_id = rest.partition(".")
            found.append((tenant, module, run_id))
        return found

    def active_replica(self, tenant: str, module: str, run_id: str) -> str | None:
        """Which replica holds an active run."""
        data = self.objects.get(f"_runs/active/{tenant}.{module}.{run_id}")
        try:
            return str(json.loads(data)["replica"]) if data else None
        except (ValueError, KeyError, TypeError):
            return None

    def delete(self, record: RunRecord) -> None:
        """Forget a run entirely (retention)."""
        t, r = record.tenant, record.id
        keys = [f"_runs/events/{r}.ndjson", f"_runs/cancel/{r}", request_key(r),
                f"_runs/answers/{r}", f"_runs/awaiting/{r}.json",
                f"_plans/{r}.tfplan",
                f"_plans/{r}.json", f"_plans/{r}.used", f"_runs/records/{r}.json"]
        if t and record.module and record.instance:  # unknown for a damaged record
            keys[:0] = [f"_runs/by-tenant/{t}/{r}",
                        f"_runs/by-instance/{t}/{record.module}/{record.instance}/{r}",
                        self._active(record)]
        for key in keys:
            self.objects.delete(key)

    # -- events and cancels ------------------------------------------------------------

    def put_events(self, run_id: str, events: list[dict[str, Any]]) -> None:
        """Replace the stored event log (S3 cannot append)."""
        data = b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in events)
        self.objects.put(f"_runs/events/{run_id}.ndjson", data)

    def get_events(self, run_id: str) -> list[dict[str, Any]]:
        """The stored event log."""
        data = self.objects.get(f"_runs/events/{run_id}.ndjson") or b""
        events = []
        for line in data.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events

    def request_cancel(self, run_id: str, *, force: bool) -> None:
        """Leave a cancel for the replica that runs it."""
        self.objects.put(f"_runs/cancel/{run_id}", json.dumps({"force": force}).encode())

    def cancel_requests(self) -> set[str]:
        """The ids of the runs a cancel waits for (one listing, whichever replica's)."""
        return set(self._every("_runs/cancel/", page=1000))

    def cancel_request(self, run_id: str) -> bool | None:
        """None when no cancel is waiting; else whether it asks to force."""
        data = self.objects.get(f"_runs/cancel/{run_id}")
        if data is None:
            return None
        self.objects.delete(f"_runs/cancel/{run_id}")
        try:
            return bool(json.loads(data).get("force"))
        except (ValueError, AttributeError):
            return False

    # -- replica heartbeats -------------------------------------------------------------

    @staticmethod
    def _replica(replica: str) -> str:
        return f"_runs/replicas/{quote(replica, safe='')}"

    def beat(self, replica: str, at: float, run_ids: list[str]) -> None:
        """The replica is alive at `at` and holds these runs (one write for all of them)."""
        self.objects.put(self._replica(replica),
                         json.dumps({"at": at, "runs": run_ids}).encode())

    def beat_of(self, replica: str) -> tuple[float, frozenset[str]] | None:
        """When the replica last beat, and the runs it held then; None if never (or
        unreadable)."""
        data = self.objects.get(self._replica(replica)) if replica else None
        try:
            doc = json.loads(data) if data is not None else None
            if isinstance(doc, dict) and isinstance(doc.get("runs"), list):
                return float(doc["at"]), frozenset(str(r) for r in doc["runs"])
        except (ValueError, TypeError, KeyError):
            pass
        return None

    # -- saved plans ----------------------------------------------------------------------

    def put_plan(self, run_id: str, planfile: bytes, meta: dict[str, Any]) -> None:
        """Keep a plan file and what applying it needs (its inputs: stored like state)."""
        self.objects.put(f"_plans/{run_id}.tfplan", planfile)
        self.objects.put(f"_plans/{run_id}.json", json.dumps(meta).encode())

    def plan_meta(self, run_id: str) -> dict[str, Any] | None:
        """What a saved plan needs, or None when it is gone."""
        data = self.objects.get(f"_plans/{run_id}.json")
        try:
            doc = json.loads(data) if data is not None else None
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    def plan_file(self, run_id: str) -> bytes | None:
        """The saved plan's bytes."""
        return self.objects.get(f"_plans/{run_id}.tfplan")

    def claim_plan(self, run_id: str, by: str) -> bool:
        """Mark a plan used by run `by`; False when another run used it first."""
        return self.objects.put_new(f"_plans/{run_id}.used", by.encode())

    def release_plan(self, run_id: str) -> None:
        """Undo `claim_plan`: the run that claimed the plan never started."""
        self.objects.delete(f"_plans/{run_id}.used")

    def drop_plan(self, run_id: str) -> None:
        """Delete a plan's file and inputs (after use or expiry); keep the used mark."""
        self.objects.delete(f"_plans/{run_id}.tfplan")
        self.objects.delete(f"_plans/{run_id}.json")

    # -- idempotency keys -------------------------------------------------------------

    @staticmethod
    def _key_name(tenant: str, key: str) -> str:
        return f"_idempotency/{tenant}.{hashlib.sha256(key.encode()).hexdigest()}"

    def claim_key(self, tenant: str, key: str, doc: dict[str, Any],
                  now: float) -> dict[str, Any] | None:
        """Store `doc` for the key unless a live entry exists; return that entry if so."""
        name = self._key_name(tenant, key)
        for _ in range(3):
            if self.objects.put_new(name, json.dumps(doc).encode()):
                return None
            existing = _live_entry(self.objects.get(name), now)
            if existing is not None:
                return existing
            self.objects.delete(name)  # expired or unreadable: take its place
        return None

    def key_entry(self, tenant: str, key: str, now: float) -> dict[str, Any] | None:
        """The live entry of a key, if any (claims nothing)."""
        return _live_entry(self.objects.get(self._key_name(tenant, key)), now)

    def drop_key(self, tenant: str, key: str) -> None:
        """Forget a key (its request was refused before a run began)."""
        self.objects.delete(self._key_name(tenant, key))

    # -- retention --------------------------------------------------------------------

    def purge(self, *, runs_before: float, now: float, page: int = 1000) -> int:
        """Delete runs made before `runs_before`, plans and idempotency keys past their
        lifetime; returns how many objects went. Reads every name, `page` at a time."""
        removed = 0
        cutoff = new_run_id(runs_before)[:12]
        for name in self._every("_runs/records/", start_after=cutoff, page=page):
            record = self.get(name.removesuffix(".json"))
            if record is not None and not record.active:
                self.delete(record)
                removed += 1
        for name in self._every("_plans/", page=page):
            if name.endswith(".json"):
                meta = self.plan_meta(name.removesuffix(".json"))
                if meta is None or float(meta.get("expires_at", 0)) <= now:
                    self.drop_plan(name.removesuffix(".json"))
                    removed += 1
        for name in self._every("_idempotency/", page=page):
            data = self.objects.get(f"_idempotency/{name}")
            try:
                expires = float(json.loads(data).get("expires_at", 0)) if data else 0.0
            except (ValueError, AttributeError, TypeError):
                expires = 0.0
            if expires <= now:
                self.objects.delete(f"_idempotency/{name}")
                removed += 1
        return removed

    def _every(self, folder: str, *, start_after: str = "", page: int) -> Iterator[str]:
        """Every name in the folder after `start_after`, one listing of `page` at a time
        (what the caller deletes meanwhile does not move the next page)."""
        while True:
            names = self.objects.keys(folder, start_after=start_after, limit=page)
            yield from names
            if len(names) < page:
                return
            start_after = names[-1]


def _live_entry(data: bytes | None, now: float) -> dict[str, Any] | None:
    """An idempotency key's entry, unless missing, unreadable or expired."""
    try:
        existing = json.loads(data) if data is not None else None
    except ValueError:
        return None
    if isinstance(existing, dict) and float(existing.get("expires_at", 0)) > now:
        return existing
    return None
