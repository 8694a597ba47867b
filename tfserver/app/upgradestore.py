"""A fleet upgrade's request, checked, and its record, kept in the backend's objects so
any replica reads it (`_upgrades/<id>.json`).

The record holds names, versions, statuses, run ids and changes: never a variable's
value (the values of `set` reach the saved plans, which are kept like state).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..errors import FieldError, InvalidInput, NotFound
from ..module.discover import Module
from ..module.versions import check_version, requested
from ..names import NAME_RE, TENANT_KEY_RE
from ..runs.store import is_run_id
from ..storage.base import ObjectStore, json_object

#: The keys of an upgrade's body.
UPGRADE_KEYS = ("to", "instances", "set", "batch_size", "allow_replace")
DEFAULT_BATCH = 5
MAX_BATCH = 100
MAX_INSTANCES = 1000
#: The statuses of an upgrade still on its way (`Prefer: wait` waits past them).
BUSY = frozenset({"planning", "applying"})


@dataclass(frozen=True)
class Target:
    """An instance an upgrade names: its name, and its tenant's key (None: any tenant)."""

    instance: str
    tenant: str | None = None


@dataclass(frozen=True)
class UpgradeRequest:
    """`POST /{module}/upgrades`, checked."""

    to: Module
    instances: list[Target] | None
    values: dict[str, Any]
    batch_size: int
    allow_replace: bool


def parse_request(module: Module, body: Any) -> UpgradeRequest:
    """The body of an upgrade, checked as a whole (every fault at once, never a value):
    `to` a version the module has, `instances` names (or {instance, tenant}), `set` the
    target version's variables, `batch_size` 1 to 100, `allow_replace` a boolean."""
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object", [FieldError("", "must be a "
                                                                              "JSON object")])
    errors = [FieldError(str(k)[:64], "unknown key") for k in body if k not in UPGRADE_KEYS]
    to = body.get("to")
    target: Module | None = None
    if not isinstance(to, str):
        errors.append(FieldError("to", "required: a version of the module"))
    else:
        check_version(to)
        target = requested(module, to)
    instances = _targets(body.get("instances"), errors)
    values = body.get("set", {})
    if not isinstance(values, dict):
        errors.append(FieldError("set", "must be an object of variables"))
    elif target is not None:
        errors += _set_errors(target, values)
    batch = body.get("batch_size", DEFAULT_BATCH)
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
        errors.append(FieldError("batch_size", f"must be a whole number from 1 to {MAX_BATCH}"))
    allow = body.get("allow_replace", False)
    if not isinstance(allow, bool):
        errors.append(FieldError("allow_replace", "must be true or false"))
    if errors or target is None:
        raise InvalidInput(f"{len(errors)} problem(s) with the upgrade", errors)
    return UpgradeRequest(target, instances, dict(values), batch, allow)


def _targets(raw: Any, errors: list[FieldError]) -> list[Target] | None:
    """The instances an upgrade names (None: every one on another version)."""
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) > MAX_INSTANCES:
        errors.append(FieldError("instances", f"must be a list of at most {MAX_INSTANCES} "
                                              "instance names"))
        return None
    found: list[Target] = []
    for i, item in enumerate(raw):
        if isinstance(item, dict) and set(item) <= {"instance", "tenant"}:
            name, tenant = item.get("instance"), item.get("tenant")
        else:
            name, tenant = item, None
        good_tenant = tenant is None or (isinstance(tenant, str)
                                         and TENANT_KEY_RE.fullmatch(tenant) is not None)
        if not isinstance(name, str) or not NAME_RE.fullmatch(name) or not good_tenant:
            errors.append(FieldError(f"instances[{i}]", "must be an instance name, or "
                                                        "{instance, tenant}"))
            continue
        found.append(Target(name, tenant))
    return found


def _set_errors(target: Module, values: dict[str, Any]) -> list[FieldError]:
    """The faults of `set` against the target version (a missing variable is each
    instance's own matter: its kept inputs may have it)."""
    try:
        target.validate(values)
    except InvalidInput as e:
        return [FieldError(f"set.{f.field}", f.message) for f in e.errors
                if f.message != "required variable is missing"]
    return []


def new_upgrade_id() -> str:
    """A fresh upgrade id (32 hex digits)."""
    return uuid.uuid4().hex


class UpgradeStore:
    """Upgrade records in the backend's objects: any replica reads what one wrote."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects
        #: Notified at each write of this replica (see `wait`); `_writes` counts them.
        self._written = threading.Condition()
        self._writes = 0

    @staticmethod
    def key(upgrade_id: str) -> str:
        """The object key of an upgrade's record."""
        return f"_upgrades/{upgrade_id}.json"

    def put(self, doc: dict[str, Any]) -> None:
        """Write an upgrade's record (the one thread that drives it is its only writer)."""
        doc["updated_at"] = time.time()
        self.objects.put(self.key(doc["id"]), json.dumps(doc).encode())
        with self._written:
            self._writes += 1
            self._written.notify_all()

    def claim_apply(self, upgrade_id: str) -> bool:
        """Take the one apply of an upgrade (a create-if-absent write, so two replicas
        asked at once never both apply it); False if it was taken."""
        return self.objects.put_new(f"_upgrades/{upgrade_id}.apply", b"")

    def wait(self, upgrade_id: str, seconds: float) -> dict[str, Any]:
        """The record once its upgrade is no longer planning or applying, or when
        `seconds` have passed (`Prefer: wait`): woken by this replica's writes, read
        again every 0.25 s for another replica's."""
        deadline = time.monotonic() + seconds
        while True:
            with self._written:
                seen = self._writes
            doc = self.get(upgrade_id)
            left = deadline - time.monotonic()
            if doc.get("status") not in BUSY or left <= 0:
                return doc
            with self._written:
                if self._writes == seen:
                    self._written.wait(min(left, 0.25))

    def get(self, upgrade_id: str) -> dict[str, Any]:
        """An upgrade's record (404 for an unknown or malformed id)."""
        doc = json_object(self.objects.get(self.key(upgrade_id))) \
            if is_run_id(upgrade_id) else None  # 32 hex digits, as a run's id
        if doc is None:
            raise NotFound(f"no upgrade {upgrade_id[:64]!r}")
        return doc
