"""Where deliveries wait, in the backend's object store, so that a restart or another
replica carries them on:

    _webhooks/pending/<created_ms:013d>-<id>.json   the delivery: event, target, body
    _webhooks/attempts/<id>/<n:04d>                 attempt n: {"replica", "at", "result",
                                                    "ended_at", "detail"}, claimed once
    _webhooks/attempts/<id>/end                     written once by whoever ends it

An attempt is claimed by creating its object only if absent (as the reaper claims its
attempts, runs/expiry.py), so exactly one replica sends each attempt. A delivery is
forgotten pending object first, attempts after: a replica that still saw it pending and
claims an attempt of it then finds it gone before sending.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass

from ..storage.base import ObjectStore, json_object

PENDING = "_webhooks/pending/"
ATTEMPTS = "_webhooks/attempts/"
END = "end"


@dataclass(frozen=True)
class Delivery:
    """One event for one target; its body is sent byte for byte at every attempt."""

    id: str
    event: str
    url: str
    secret_env: str
    tenant: str | None
    created_at: float
    body: str

    @property
    def key(self) -> str:
        """Its pending object's key (in creation order)."""
        return f"{PENDING}{int(self.created_at * 1000):013d}-{self.id}.json"

    @classmethod
    def from_json(cls, data: bytes | None) -> Delivery | None:
        """A stored delivery, or None when it cannot be read."""
        doc = json_object(data)
        try:
            return cls(**doc) if doc is not None else None
        except TypeError:
            return None


@dataclass(frozen=True)
class Attempt:
    """One attempt: who claimed it when, and (once it ended) how it went."""

    number: int
    replica: str
    at: float
    #: None while it runs; "delivered", "failed" or "refused".
    result: str | None = None
    ended_at: float | None = None
    detail: str = ""


class Deliveries:
    """The layout above, over an `ObjectStore`."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects
        # A pending object never changes once written: each is read once, then known by
        # its name (one LIST a pass, not one GET a delivery).
        self._known: dict[str, Delivery] = {}

    def add(self, delivery: Delivery) -> None:
        """Keep a new delivery until it is delivered or given up."""
        self.objects.put(delivery.key, json.dumps(asdict(delivery)).encode())

    def pending(self, limit: int = 1000) -> list[Delivery]:
        """The deliveries waiting, oldest first (call from one thread)."""
        names = self.objects.keys(PENDING, limit=limit)
        known = {name: self._known[name] for name in names if name in self._known}
        for name in names:
            if name not in known:
                delivery = Delivery.from_json(self.objects.get(PENDING + name))
                if delivery is not None:
                    known[name] = delivery
        self._known = known
        return [known[name] for name in names if name in known]

    def exists(self, delivery: Delivery) -> bool:
        """True while the delivery is pending."""
        return self.objects.get(delivery.key) is not None

    def attempts(self, delivery_id: str) -> tuple[list[Attempt], bool]:
        """Its attempts in order, and whether someone ended it."""
        folder = f"{ATTEMPTS}{delivery_id}/"
        found, ended = [], False
        for name in self.objects.keys(folder):
            if name == END:
                ended = True
                continue
            doc = json_object(self.objects.get(folder + name))
            with contextlib.suppress(TypeError, ValueError):
                if doc is not None and name.isdigit():
                    found.append(Attempt(**doc))
        return sorted(found, key=lambda a: a.number), ended

    def claim(self, delivery_id: str, attempt: Attempt) -> bool:
        """Take the attempt; False when another replica has it."""
        return self.objects.put_new(self._attempt_key(delivery_id, attempt.number),
                                    json.dumps(asdict(attempt)).encode())

    def note(self, delivery_id: str, attempt: Attempt) -> None:
        """Record how the claimed attempt went."""
        self.objects.put(self._attempt_key(delivery_id, attempt.number),
                         json.dumps(asdict(attempt)).encode())

    def end(self, delivery_id: str) -> bool:
        """Take the ending of the delivery (its audit line); False when another has."""
        return self.objects.put_new(f"{ATTEMPTS}{delivery_id}/{END}", b"{}")

    def forget(self, delivery: Delivery) -> None:
        """Remove the delivery: the pending object first, then its attempts."""
        self.objects.delete(delivery.key)
        folder = f"{ATTEMPTS}{delivery.id}/"
        for name in self.objects.keys(folder):
            self.objects.delete(folder + name)

    @staticmethod
    def _attempt_key(delivery_id: str, number: int) -> str:
        return f"{ATTEMPTS}{delivery_id}/{number:04d}"


