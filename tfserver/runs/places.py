"""Places on the `sqs` engine's queue: bounds that hold under a burst over many replicas.

An instance may have `TFSERVER_QUEUE_DEPTH` runs waiting on the queue and a tenant
`max_queued_per_tenant`; counting the waiting runs and then storing a new one lets two
replicas (or two threads) that counted at once both pass. A run therefore waits only once
it holds a place, an object created only if absent (`put_new`), so never more than the
limit hold one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

from ..storage.base import ObjectStore, json_object

#: How long a place whose run has no record yet is trusted (it is being stored).
GRACE = 30.0


class Places:
    """Places on the queue: `_runs/waiting/<instance or tenant>/<n>` for n < the limit,
    each created only if absent by the run it admits and removed once the run leaves the
    queue; one whose run no longer waits (or never got a record) is taken over."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects

    def take(self, folder: str, run_id: str, limit: int,
             waits: Callable[[str], bool | None]) -> bool:
        """A place in `folder` for the run; False when `limit` runs hold one."""
        data = json.dumps({"run": run_id, "at": time.time()}).encode()
        for _ in range(2):
            # Only the places free a moment ago are tried: one write each, not `limit`.
            taken = set(self.objects.keys(folder, limit=limit + 1))
            if any(self.objects.put_new(f"{folder}{n}", data) for n in range(limit)
                   if str(n) not in taken):
                return True
            freed = False
            for key, holder, at in self._held(folder):
                gone = waits(holder)
                if gone is False or (gone is None and time.time() - at > GRACE):
                    self.objects.delete(key)
                    freed = True
            if not freed:
                return False
        return False

    def free(self, folder: str, run_id: str) -> None:
        """The run left the queue (it started, was canceled or never queued)."""
        for key, holder, _ in self._held(folder):
            if holder == run_id:
                self.objects.delete(key)
                return  # a run holds one place of a folder

    def _held(self, folder: str) -> Iterator[tuple[str, str, float]]:
        """Each place of the folder: its key, its run, when it was taken (read lazily)."""
        for name in self.objects.keys(folder, limit=100_000):
            doc = json_object(self.objects.get(folder + name)) or {}
            at = doc.get("at")
            yield (folder + name, str(doc.get("run", "")),
                   float(at) if isinstance(at, int | float) else 0.0)
