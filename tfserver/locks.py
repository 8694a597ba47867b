"""In-process concurrency limits: one run per instance, and a cap on all runs."""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import Conflict, Unavailable


@dataclass
class _Entry:
    lock: threading.Lock
    users: int = 0


class InstanceLocks:
    """A lock per key (module, workspace); entries vanish when nobody holds or waits."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._entries: dict[Hashable, _Entry] = {}

    @contextmanager
    def hold(self, key: Hashable, wait: float, *, what: str = "the instance") -> Iterator[None]:
        """Hold the key's lock, waiting up to `wait` seconds; else raise `Conflict` (409)."""
        with self._mutex:
            entry = self._entries.setdefault(key, _Entry(threading.Lock()))
            entry.users += 1
        try:
            got = entry.lock.acquire(timeout=wait) if wait > 0 else entry.lock.acquire(False)
            if not got:
                raise Conflict(
                    f"{what} is being changed by another run; try again later",
                    retry_after=max(1, int(wait) or 5),
                )
            try:
                yield
            finally:
                entry.lock.release()
        finally:
            with self._mutex:
                entry.users -= 1
                if entry.users == 0:
                    del self._entries[key]

    def busy(self, key: Hashable) -> bool:
        """True while a run holds the key."""
        with self._mutex:
            entry = self._entries.get(key)
            return entry is not None and entry.lock.locked()


class RunSlots:
    """At most `limit` terraform runs at once; beyond that, `Unavailable` (503) at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._sem = threading.BoundedSemaphore(limit)

    @contextmanager
    def take(self) -> Iterator[None]:
        """Hold one run slot for the duration of the block."""
        if not self._sem.acquire(blocking=False):
            raise Unavailable(f"all {self.limit} run slots are busy; try again later",
                              retry_after=5)
        try:
            yield
        finally:
            self._sem.release()
