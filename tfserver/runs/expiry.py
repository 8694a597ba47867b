"""Instances that expire: when, and the reaper that destroys them.

An instance's expiry is kept in the backend's object store, so every replica sees it:

    _ttl/<module>.<workspace>.json                 {"expires_at", "index"}
    _expiry/<expires_at:012d>.<module>.<workspace>  one entry per expiry, in time order
    _reaping/<module>.<workspace>/<expires_at>.<n>  attempt n to reap it: {"replica", "at",
                                                    "run_id"}, written once

Every replica reaps: it lists the entries that are due (one ordered LIST up to the first
future one), and claims an attempt by writing its key only if absent, so exactly one
replica starts each attempt. A further attempt is claimed only once the last one ended
without destroying (failed, lost, refused), after a back-off that doubles.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import TFServerError
from ..storage.base import ObjectStore, json_object

logger = logging.getLogger(__name__)

#: The first retry of a failed reap, doubling up to `BACKOFF_MAX`.
BACKOFF_FIRST = 30.0
BACKOFF_MAX = 3600.0


def backoff(attempt: int) -> float:
    """How long after attempt `attempt` (1, 2, ...) failed the next one may start."""
    return float(min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, attempt - 1)))


@dataclass(frozen=True)
class Due:
    """An instance whose expiry has come."""

    expires_at: float
    module: str
    workspace: str


class Expiries:
    """The layout above, over an `ObjectStore`."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects

    @staticmethod
    def _pointer(module: str, workspace: str) -> str:
        return f"_ttl/{module}.{workspace}.json"

    def get(self, module: str, workspace: str) -> float | None:
        """When the instance expires (seconds since the epoch), or None."""
        doc = json_object(self.objects.get(self._pointer(module, workspace)))
        try:
            return float(doc["expires_at"]) if doc else None
        except (KeyError, TypeError, ValueError):
            return None

    def set(self, module: str, workspace: str, expires_at: float) -> None:
        """Make the instance expire at `expires_at` (moving an earlier expiry)."""
        old = json_object(self.objects.get(self._pointer(module, workspace)))
        index = f"{int(expires_at):012d}.{module}.{workspace}"
        self.objects.put(f"_expiry/{index}", b"")
        self.objects.put(self._pointer(module, workspace),
                         json.dumps({"expires_at": expires_at, "index": index}).encode())
        if old and old.get("index") not in (None, index):
            self.objects.delete(f"_expiry/{old['index']}")

    def clear(self, module: str, workspace: str) -> None:
        """The instance is gone: forget its expiry and its reaping attempts."""
        old = json_object(self.objects.get(self._pointer(module, workspace)))
        if old and old.get("index"):
            self.objects.delete(f"_expiry/{old['index']}")
        self.objects.delete(self._pointer(module, workspace))
        folder = f"_reaping/{module}.{workspace}/"
        for name in self.objects.keys(folder):
            self.objects.delete(folder + name)

    def due(self, now: float, page: int = 100) -> list[Due]:
        """Every entry whose time has come, oldest first, listed `page` at a time up to
        the first future one (those not reaped yet never hide the ones after them)."""
        found: list[Due] = []
        after = ""
        while True:
            names = self.objects.keys("_expiry/", start_after=after, limit=page)
            for name in names:
                stamp, _, rest = name.partition(".")
                module, _, workspace = rest.partition(".")
                if not stamp.isdigit() or int(stamp) > now:
                    return found
                found.append(Due(float(stamp), module, workspace))
            if len(names) < page:
                return found
            after = names[-1]

    def drop_entry(self, due: Due) -> None:
        """Forget an index entry whose expiry moved or whose instance is gone."""
        self.objects.delete(f"_expiry/{int(due.expires_at):012d}.{due.module}.{due.workspace}")

    def attempts(self, due: Due) -> list[tuple[int, dict[str, Any]]]:
        """The reaping attempts of this expiry, in order."""
        folder = f"_reaping/{due.module}.{due.workspace}/"
        found = []
        for name in self.objects.keys(folder):
            stamp, _, number = name.partition(".")
            if stamp == str(int(due.expires_at)) and number.isdigit():
                found.append((int(number), json_object(self.objects.get(folder + name)) or {}))
        return sorted(found, key=lambda a: a[0])

    def claim(self, due: Due, attempt: int, doc: dict[str, Any]) -> bool:
        """Take attempt `attempt` of this expiry; False when another replica has it."""
        key = f"_reaping/{due.module}.{due.workspace}/{int(due.expires_at)}.{attempt}"
        return self.objects.put_new(key, json.dumps(doc).encode())

    def note(self, due: Due, attempt: int, doc: dict[str, Any]) -> None:
        """Record what the claimed attempt did (its run)."""
        key = f"_reaping/{due.module}.{due.workspace}/{int(due.expires_at)}.{attempt}"
        self.objects.put(key, json.dumps(doc).encode())


#: Starts the destroy run of an expired instance: its run id, or None when it cannot
#: start now (the instance is busy). Raises errors of the package's tree.
StartDestroy = Callable[[Due], str | None]
#: The status of a run by id ("succeeded", "failed", "running", ...).
RunStatus = Callable[[str], str]


#: How often the reaper does its chore.
CHORE_EVERY = 3600.0


class Reaper(threading.Thread):
    """Destroys expired instances, in every replica, never two at once for one expiry."""

    def __init__(self, expiries: Expiries, start: StartDestroy, status: RunStatus, *,
                 replica: str, interval: float,
                 clock: Callable[[], float] = time.time,
                 chore: Callable[[], object] | None = None) -> None:
        super().__init__(name="reaper", daemon=True)
        #: Done at start and hourly after (the purge of orphaned instances' archives).
        self.chore = chore
        self.expiries = expiries
        self.start_destroy = start
        self.status = status
        self.replica = replica
        self.interval = interval
        self.clock = clock
        self.stop_event = threading.Event()

    def run(self) -> None:
        """Reap every `interval` seconds until stopped (the chore hourly)."""
        next_chore = time.monotonic()
        while not self.stop_event.wait(self.interval):
            try:
                if self.chore is not None and time.monotonic() >= next_chore:
                    next_chore = time.monotonic() + CHORE_EVERY
                    self.chore()
                self.reap_once()
            except TFServerError as e:
                logger.warning("reaper: the backend failed: %s", e.detail)

    def reap_once(self) -> int:
        """Start the destroy of every due instance this replica may take; how many."""
        started = 0
        now = self.clock()
        for due in self.expiries.due(now):
            current = self.expiries.get(due.module, due.workspace)
            if current is None or int(current) != int(due.expires_at):
                self.expiries.drop_entry(due)  # moved by a later apply, or destroyed
                continue
            attempt = self._next_attempt(due, now)
            if attempt is None or not self.expiries.claim(
                    due, attempt, {"replica": self.replica, "at": now}):
                continue
            try:
                run_id = self.start_destroy(due)
            except TFServerError as e:
                logger.warning("reaper: %s/%s not destroyed now: %s", due.module,
                               due.workspace, e.detail)
                run_id = None
            self.expiries.note(due, attempt, {"replica": self.replica, "at": now,
                                              "run_id": run_id})
            if run_id is not None:
                started += 1
                logger.info("reaper: destroying %s/%s, expired (run %s)", due.module,
                            due.workspace, run_id)
        return started

    def _next_attempt(self, due: Due, now: float) -> int | None:
        """The attempt to claim now, or None while the last one runs or backs off."""
        attempts = self.expiries.attempts(due)
        if not attempts:
            return 1
        number, last = attempts[-1]
        run_id = last.get("run_id")
        if run_id:
            status = self.status(str(run_id))
            if status in ("queued", "running", "succeeded"):
                return None
        elif now - float(last.get("at", 0)) < self.interval * 2:
            return None  # claimed a moment ago; its run id is about to be noted
        if now - float(last.get("at", 0)) < backoff(number):
            return None
        return number + 1
