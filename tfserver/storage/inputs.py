"""The inputs of an instance's last apply, kept for its destroy, in the object store.

One layout for every backend: `_inputs/<module>/<workspace>.json` (on S3 under the
state prefix, locally a 0600 file under the state folder). A local state folder from
before this layout kept them at `inputs/<module>/<workspace>.inputs.json`: that file is
read when the new one is missing and moved to the new key, so an upgrade loses nothing.
"""

from __future__ import annotations

import json
from typing import Any

from .base import BackendError, ObjectStore


class KeptInputs:
    """The variables of each instance's last apply (destroy needs them again)."""

    def __init__(self, objects: ObjectStore, *, legacy: bool = False) -> None:
        self.objects = objects
        #: Read the pre-`_inputs/` local layout as a fallback (only the local folder had it).
        self.legacy = legacy

    @staticmethod
    def key(module: str, workspace: str) -> str:
        """The object key of an instance's kept inputs."""
        return f"_inputs/{module}/{workspace}.json"

    @staticmethod
    def legacy_key(module: str, workspace: str) -> str:
        """Where a local state folder kept them before (relative to the folder)."""
        return f"inputs/{module}/{workspace}.inputs.json"

    def save(self, module: str, workspace: str, inputs: dict[str, Any]) -> None:
        """Keep the inputs (replacing what was kept)."""
        self.objects.put(self.key(module, workspace), json.dumps(inputs).encode())

    def load(self, module: str, workspace: str) -> dict[str, Any] | None:
        """The kept inputs, or None when there are none."""
        doc = _json_object(self.objects.get(self.key(module, workspace)))
        if doc is not None or not self.legacy:
            return doc
        old = self.legacy_key(module, workspace)
        doc = _json_object(self.objects.get(old))
        if doc is not None:
            self.save(module, workspace, doc)  # moved: written anew before the old goes
            self.objects.delete(old)
        return doc

    def delete(self, module: str, workspace: str) -> None:
        """Forget the inputs (after destroy)."""
        self.objects.delete(self.key(module, workspace))
        if self.legacy:
            self.objects.delete(self.legacy_key(module, workspace))


def _json_object(data: bytes | None) -> dict[str, Any] | None:
    """The stored document, None when there is none; a damaged one is a `BackendError`."""
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise BackendError(f"the stored inputs are not JSON: {e}") from e
    return doc if isinstance(doc, dict) else None
