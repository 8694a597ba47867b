"""The last drift check of each instance, kept beside it in the backend's object store:

    _drift/<module>/<workspace>.json    {"status", "checked_at", "run_id", "changes",
                                         "reconciled_by"}

`changes` holds addresses, actions and attribute names: never a value. An instance never
checked has no object, and shows `unknown`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..storage.base import ObjectStore, json_object


@dataclass(frozen=True)
class DriftReport:
    """The result of one drift check, as stored."""

    status: str  # in_sync | drifted
    checked_at: float
    run_id: str
    changes: list[dict[str, Any]] = field(default_factory=list)
    reconciled_by: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The stored form (and what a run's record keeps)."""
        return {"status": self.status, "checked_at": self.checked_at, "run_id": self.run_id,
                "changes": self.changes, "reconciled_by": self.reconciled_by}


class DriftReports:
    """The layout above, over an `ObjectStore`."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects

    @staticmethod
    def _key(module: str, workspace: str) -> str:
        return f"_drift/{module}/{workspace}.json"

    def get(self, module: str, workspace: str) -> dict[str, Any] | None:
        """The last check's report, or None when the instance was never checked."""
        doc = json_object(self.objects.get(self._key(module, workspace)))
        return doc if doc is not None and doc.get("status") else None

    def put(self, module: str, workspace: str, report: DriftReport) -> None:
        """Keep a check's report (replacing the one before)."""
        self.objects.put(self._key(module, workspace),
                         json.dumps(report.as_dict(), separators=(",", ":")).encode())

    def clear(self, module: str, workspace: str) -> None:
        """The instance is gone: forget its drift."""
        self.objects.delete(self._key(module, workspace))
