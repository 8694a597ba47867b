"""The inputs of an instance's last apply, kept for its destroy, in the object store.

One layout for every backend: `_inputs/<module>/<workspace>.json` (on S3 under the
state prefix, locally a 0600 file under the state folder). A local state folder from
before this layout kept them at `inputs/<module>/<workspace>.inputs.json`: that file is
read when the new one is missing and moved to the new key, so an upgrade loses nothing.

The document also records the module version the instance is on, under `@version` (never
a variable's name: terraform's names cannot hold `@`); one written before versions existed
has none, and reads as the unversioned module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .base import BackendError, ObjectStore

#: The key of the instance's module version in the kept document.
VERSION_KEY = "@version"


@dataclass(frozen=True)
class Kept:
    """An instance's kept inputs and the module version they were applied with."""

    inputs: dict[str, Any]
    version: str | None = None


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

    def save(self, module: str, workspace: str, inputs: dict[str, Any],
             version: str | None = None) -> None:
        """Keep the inputs and their module version (replacing what was kept)."""
        doc = {**inputs, VERSION_KEY: version} if version is not None else inputs
        self.objects.put(self.key(module, workspace), json.dumps(doc).encode())

    def kept(self, module: str, workspace: str) -> Kept | None:
        """The kept inputs with their version, or None when there are none."""
        doc = self._load(module, workspace)
        if doc is None:
            return None
        version = doc.pop(VERSION_KEY, None)
        return Kept(doc, version if isinstance(version, str) else None)

    def load(self, module: str, workspace: str) -> dict[str, Any] | None:
        """The kept inputs, or None when there are none."""
        found = self.kept(module, workspace)
        return found.inputs if found is not None else None

    def _load(self, module: str, workspace: str) -> dict[str, Any] | None:
        doc = _json_object(self.objects.get(self.key(module, workspace)))
        if doc is not None or not self.legacy:
            return doc
        old = self.legacy_key(module, workspace)
        doc = _json_object(self.objects.get(old))
        if doc is not None:
            self.save(module, workspace, doc)  # moved: written anew before the old goes
            self.objects.delete(old)
        return doc

    def restore(self, module: str, workspace: str, kept: Kept | None) -> None:
        """Put back what `kept` read before (None: there was nothing)."""
        if kept is None:
            self.delete(module, workspace)
        else:
            self.save(module, workspace, kept.inputs, kept.version)

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
