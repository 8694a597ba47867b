"""What a refresh-only plan found changed outside terraform, as names only.

terraform's `-json` stream tells which resources drifted (`resource_drift`: address and
action) but not which attributes; `terraform show -json <plan>` holds the refreshed and
prior objects (`resource_drift[].change.before/after`). Only the names of the top-level
attributes whose values differ are kept: a drifted value can be a secret, so the values
are dropped here, at once, and never reach a record, an event or a log line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DriftChange:
    """One resource changed outside terraform: its address, terraform's action for it
    (`update`, `delete`) and the names of the attributes that differ."""

    address: str
    action: str
    attributes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """The stored and shown form."""
        return {"address": self.address, "action": self.action,
                "attributes": list(self.attributes)}


def differing(before: Any, after: Any) -> tuple[str, ...]:
    """The top-level keys whose values differ between two objects (sorted); none when
    either is not an object (a resource gone, or created)."""
    if not isinstance(before, Mapping) or not isinstance(after, Mapping):
        return ()
    return tuple(sorted(k for k in set(before) | set(after)
                        if before.get(k) != after.get(k)))


def _action(actions: Any) -> str:
    """terraform's list of actions as one word (`["update"]` → `update`)."""
    if isinstance(actions, list) and actions:
        return "-".join(str(a) for a in actions) if len(actions) > 1 else str(actions[0])
    return "update"


def plan_drift(plan: Mapping[str, Any]) -> list[DriftChange]:
    """The drift a saved refresh-only plan's JSON (`terraform show -json`) records."""
    found = []
    for item in plan.get("resource_drift") or []:
        if not isinstance(item, Mapping):
            continue
        change = item.get("change") or {}
        found.append(DriftChange(str(item.get("address", "")),
                                 _action(change.get("actions")),
                                 differing(change.get("before"), change.get("after"))))
    return found


def stream_drift(events: Iterable[Mapping[str, Any]]) -> list[DriftChange]:
    """The drift the `-json` stream reports (`resource_drift` events): addresses and
    actions, without attribute names (the stream has none)."""
    found = []
    for event in events:
        if event.get("type") == "resource_drift":
            change = event.get("change") or {}
            found.append(DriftChange(str((change.get("resource") or {}).get("addr", "")),
                                     str(change.get("action", "update"))))
    return found
