"""Who runs which scheduled drift check, agreed through the backend's object store:

    _driftcheck/<module>/<workspace>/<period:012d>   one period's check of an instance:
                                                     {"replica", "at", "run_id"} or
                                                     {"replica", "at", "skipped": "busy"}
                                                     ("busy", or "failed": not started),
                                                     written once
    _driftslots/<n:04d>.<generation:012d>            a lease on check slot n (of
                                                     TFSERVER_MAX_DRIFT_CHECKS):
                                                     {"replica", "at", "run_id"}

Every replica schedules; a period's check is claimed by writing its key only if absent,
so exactly one replica starts it (or notes it put off). Two neighbouring periods are
claimed by two replicas when one looks just before a period's end and the other just
after: each, once its claim is written, reads the other period's (`overlaps`). The
earlier period gives way; the later one, finding the earlier being started, gives its
claim back and looks again next tick. So one instance never has two checks at once, and a
period is not lost to two replicas each giving way to the other.

A slot is taken by writing the next generation of its lease only if absent, once the last
one is over: its run ended (any replica's liveness says so: a killed replica's run shows
`lost`), or it never named a run within `CLAIM_GRACE`, or it is older than `max_age`.
Nothing needs freeing after a crash: a dead lease is simply outlived.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..storage.base import ObjectStore, json_object

#: A lease or claim that names no run this long after it was written is over (its
#: replica died between the claim and the run's start).
CLAIM_GRACE = 60.0
_ACTIVE = ("queued", "running")


@dataclass(frozen=True)
class Lease:
    """One check slot held: its number and generation (its key)."""

    slot: int
    generation: int

    @property
    def key(self) -> str:
        """Where it is kept."""
        return f"_driftslots/{self.slot:04d}.{self.generation:012d}"


class DriftClaims:
    """The layout above, over an `ObjectStore`; `status` reads a run's status by id."""

    def __init__(self, objects: ObjectStore, status: Callable[[str], str], *,
                 slots: int, max_age: float) -> None:
        self.objects = objects
        self.status = status
        self.slots = slots
        self.max_age = max_age

    # -- one period's check of an instance -------------------------------------------

    @staticmethod
    def _folder(module: str, workspace: str) -> str:
        return f"_driftcheck/{module}/{workspace}/"

    def claimed(self, module: str, workspace: str, period: int) -> bool:
        """True when some replica took (or put off) this period's check."""
        key = f"{self._folder(module, workspace)}{period:012d}"
        return self.objects.get(key) is not None

    def claim(self, module: str, workspace: str, period: int, doc: dict[str, Any]) -> bool:
        """Take this period's check; False when another replica has it. Older periods'
        claims go (the one before stays: a replica a little behind still sees it)."""
        folder = self._folder(module, workspace)
        if not self.objects.put_new(f"{folder}{period:012d}", _dump(doc)):
            return False
        for name in self.objects.keys(folder):
            if name.isdigit() and int(name) < period - 1:
                self.objects.delete(folder + name)
        return True

    def overlaps(self, module: str, workspace: str, period: int, now: float) -> str:
        """What a neighbouring period's check is doing, this period's claim just taken:
        "busy" when this period must give way (the next period is claimed already: this
        replica looked late; or the previous period's check still runs), "starting"
        when the previous period's check is being started (its run not named yet: look
        again next tick, `unclaim` first), "" when neither. Each of two replicas claiming
        neighbouring periods reads the other's key after writing its own, so at least
        one of them sees the other; the earlier period always gives way, and the later
        one waits for it to say what it did."""
        folder = self._folder(module, workspace)
        if self.objects.get(f"{folder}{period + 1:012d}") is not None:
            return "busy"
        doc = json_object(self.objects.get(f"{folder}{period - 1:012d}"))
        if doc is None or "skipped" in doc:
            return ""
        run_id = doc.get("run_id")
        if isinstance(run_id, str):
            return "busy" if self.status(run_id) in _ACTIVE else ""
        at = doc.get("at")  # claimed, its run not named yet: being started (or died)
        return "starting" if isinstance(at, int | float) and abs(now - at) < CLAIM_GRACE \
            else ""

    def unclaim(self, module: str, workspace: str, period: int) -> None:
        """Give this period's claim back (its check is decided on a later look)."""
        self.objects.delete(f"{self._folder(module, workspace)}{period:012d}")

    def note(self, module: str, workspace: str, period: int, doc: dict[str, Any]) -> None:
        """Record what the claimed check did (its run)."""
        self.objects.put(f"{self._folder(module, workspace)}{period:012d}", _dump(doc))

    def forget(self, module: str, workspace: str) -> None:
        """The instance is gone: drop its claims."""
        folder = self._folder(module, workspace)
        for name in self.objects.keys(folder):
            self.objects.delete(folder + name)

    # -- the slots -------------------------------------------------------------------

    def take(self, replica: str, now: float) -> Lease | None:
        """A free check slot, leased to `replica`; None when every slot is in use."""
        latest = self._latest()
        doc = {"replica": replica, "at": now}
        for slot in range(self.slots):
            generation = latest.get(slot)
            if generation is not None and self._held(Lease(slot, generation), now):
                continue
            lease = Lease(slot, 0 if generation is None else generation + 1)
            if self.objects.put_new(lease.key, _dump(doc)):
                if generation is not None:
                    self.objects.delete(Lease(slot, generation).key)
                return lease
        return None

    def run_of(self, lease: Lease, replica: str, now: float, run_id: str) -> None:
        """The lease's check started as run `run_id`."""
        self.objects.put(lease.key, _dump({"replica": replica, "at": now, "run_id": run_id}))

    def release(self, lease: Lease) -> None:
        """Give the slot back at once (the check did not start)."""
        self.objects.delete(lease.key)

    def held(self, now: float) -> int:
        """How many slots are in use now (over all replicas)."""
        latest = self._latest()
        return sum(1 for s, g in latest.items() if self._held(Lease(s, g), now))

    def _latest(self) -> dict[int, int]:
        """The last generation of each slot's lease (one listing)."""
        latest: dict[int, int] = {}
        for name in self.objects.keys("_driftslots/"):
            slot, _, generation = name.partition(".")
            if slot.isdigit() and generation.isdigit():
                latest[int(slot)] = max(latest.get(int(slot), -1), int(generation))
        return latest

    def _held(self, lease: Lease, now: float) -> bool:
        doc = json_object(self.objects.get(lease.key))
        if doc is None:
            return False  # gone meanwhile (released), or unreadable: free
        at = float(doc.get("at", 0)) if isinstance(doc.get("at"), int | float) else 0.0
        if not abs(now - at) <= self.max_age:  # too old, damaged (NaN), or far ahead
            return False
        run_id = doc.get("run_id")
        if not isinstance(run_id, str):
            return now - at < CLAIM_GRACE
        return self.status(run_id) in _ACTIVE


def _dump(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()
