"""The storage interfaces: `ObjectStore` (records, events, plans, keys, inputs) and
`StateBackend` (terraform's state, its lock, and the backend settings terraform gets).

Modules carry no backend block; the server writes one into each working copy
(`tfserver_override.tf.json`) and passes the rest as `-backend-config` values at `init`.
Reading outputs straight from the state object makes a GET fast and lock-free."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import Unavailable

if TYPE_CHECKING:
    from .inputs import KeptInputs

logger = logging.getLogger(__name__)

STATE_NAME = "terraform.tfstate"
#: Where an orphaned instance's state is kept (beside the objects), until purged.
ARCHIVE = "_archive"
_STAMP = "%Y%m%dT%H%M%S"


def archive_stamp(at: float) -> str:
    """The time part of an archive's name (`20261201T221500123Z`: UTC, milliseconds)."""
    moment = dt.datetime.fromtimestamp(at, dt.UTC)
    return f"{moment.strftime(_STAMP)}{moment.microsecond // 1000:03d}Z"


def archive_time(name: str) -> float | None:
    """When an archive named `<workspace>.<stamp>[.tfstate]` was made, or None."""
    stamp = name.removesuffix(".tfstate").rpartition(".")[2]
    try:
        moment = dt.datetime.strptime(stamp[:15], _STAMP).replace(tzinfo=dt.UTC)
        return moment.timestamp() + int(stamp[15:18]) / 1000
    except ValueError:
        return None


def holds_instance(state: Mapping[str, Any] | None) -> bool:
    """The one rule of what an instance is: a state that records a resource or an output.

    Terraform makes a workspace's state as a create starts (a 0-byte file, or a document
    with neither); a create killed or canceled before its first resource leaves only that
    behind: a phantom, which no listing shows, no quota counts, a GET answers 404 for, and
    a DELETE (or the end of the run that made it) removes.
    """
    return state is not None and bool(state.get("resources") or state.get("outputs"))


class BackendError(Unavailable):
    """The state store cannot be reached or answered an error (503)."""


@dataclass(frozen=True)
class Snapshot:
    """What a GET of an instance shows: its state, and the lock held on it, if any.
    `stale` when the state is the last complete one while a newer one is being written
    (or was left half written by a killed run)."""

    state: dict[str, Any] | None
    lock: dict[str, str] | None
    stale: bool = False


class ObjectStore(Protocol):
    """Small documents by key beside the state: run records, event logs, saved plans,
    idempotency keys. Keys are `/`-separated; listings are of one folder (a prefix that
    ends with `/`), in key order."""

    def put(self, key: str, data: bytes) -> None:
        """Write (or replace) the object, readable by the server only."""
        ...

    def put_new(self, key: str, data: bytes) -> bool:
        """Write the object only if there is none yet; False if there was (atomic)."""
        ...

    def put_copy(self, key: str, data: bytes, source: str) -> None:
        """`put(key, data)` where the object `source` holds these very bytes: a store
        that can (files) makes `key` a second name of it instead of writing them again."""
        ...

    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is none."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object (no error when it is gone already)."""
        ...

    def keys(self, folder: str, *, start_after: str = "", limit: int = 1000) -> list[str]:
        """Names (not whole keys) in the folder after `start_after`, in order."""
        ...


class StateBackend(Protocol):
    """What the service needs of a state store."""

    name: str
    objects: ObjectStore
    #: The inputs of each instance's last apply, kept in `objects` (see `inputs.py`).
    inputs: KeptInputs

    def override(self, module: str) -> dict[str, Any]:
        """The `terraform { backend ... }` block, as JSON, for the module's working copy."""
        ...

    def init_config(self, module: str) -> list[tuple[str, str]]:
        """`-backend-config` key/value pairs for `terraform init`."""
        ...

    def read_state(self, module: str, workspace: str) -> dict[str, Any] | None:
        """The workspace's state document, or None when the workspace does not exist."""
        ...

    def workspaces(self, module: str) -> list[str]:
        """Names of the workspaces whose state holds an instance (`holds_instance`)."""
        ...

    def exists(self, module: str, workspace: str) -> bool:
        """True when the workspace's state holds an instance (`holds_instance`)."""
        ...

    def phantom(self, module: str, workspace: str) -> bool:
        """True when the workspace has a state object that holds no instance."""
        ...

    def lock_info(self, module: str, workspace: str) -> dict[str, str] | None:
        """Who holds the workspace's state lock, or None when it is free."""
        ...

    def clear_lock(self, module: str, workspace: str, lock_id: str) -> bool:
        """Remove the workspace's state lock if it is the lock `lock_id` (never another);
        True when one was removed. Only for a lock that nobody holds any longer."""
        ...

    def check(self) -> None:
        """Raise `BackendError` when the store cannot be reached."""
        ...

    def snapshot(self, module: str, workspace: str) -> Snapshot:
        """State and lock of a workspace, read together."""
        ...

    def archive(self, module: str, workspace: str, at: float) -> str:
        """Move the workspace's state aside (under `_archive/<module>/`, named with `at`)
        and drop its lock: the workspace is then unknown (an orphaned instance). Returns
        where the state went."""
        ...

    def purge_archives(self, before: float) -> int:
        """Delete the archives made before `before`; how many went."""
        ...

    def close(self) -> None:
        """Release what the backend holds (threads, connections)."""
        ...


def json_object(data: bytes | None) -> dict[str, Any] | None:
    """A stored JSON object: None when there is none, or it is unreadable or no object."""
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None
