"""Which version of a module a run uses, and the inputs of an instance that moves.

An instance keeps the version it was last applied with (recorded beside its kept inputs,
`storage/inputs.py`); a new instance gets the module's default. A request that names
another version (`?version=`) moves the instance: it starts from the kept inputs (the
variables the new version dropped left out, and listed), the body's variables on top, all
checked against the new version's schema before terraform runs.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ..module.discover import Module
from ..module.versions import Validate, difference, recorded, requested
from ..storage.base import StateBackend


class Chosen(NamedTuple):
    """The version a request runs, its inputs (checked, the reserved ones filled), and
    when it moves the instance, what moving changes (`from`, `to`, `dropped`, `added`,
    `retyped`)."""

    module: Module
    inputs: dict[str, Any]
    moved: dict[str, Any] | None = None


def instance_version(backend: StateBackend, served: Module, workspace: str) -> Module:
    """The version an instance is on: the one its kept inputs record (see `recorded`),
    the default for an instance that has none yet; `served` itself when unversioned or
    already one version (it has no `versions`)."""
    if not served.versions:
        return served
    kept = backend.inputs.kept(served.name, workspace)
    return served if kept is None else recorded(served, kept.version)


def choose(backend: StateBackend, served: Module, workspace: str, version: str | None,
           body: Any, tenant: str, instance: str, validate: Validate | None = None
           ) -> Chosen:
    """The version and inputs of an apply or its dry run (`version`: as `?version=` gave
    it, None for none; `tenant` as the principal names it): 400 for a version the module
    lacks, or inputs the version refuses (a new required variable without a value names
    it). `validate` checks a body against a version (the references' check: a `$ref`
    is checked against the version being applied)."""
    asked = requested(served, version)
    kept = backend.inputs.kept(served.name, workspace) if served.versions else None
    current = recorded(served, kept.version) if kept is not None else None
    target = asked or current or served
    moved: dict[str, Any] | None = None
    if kept is None or current is None or current.version == target.version:
        inputs = target.validate(body) if validate is None else validate(target, body)
    else:
        if not isinstance(body, dict):
            target.validate(body)  # raises: the body must be an object
        found = difference(current, target, kept.inputs, body, validate)
        inputs = found.inputs
        moved = {"from": current.version, "to": target.version, "dropped": found.dropped,
                 "added": found.added, "retyped": found.retyped}
    return Chosen(target, target.fill_reserved(inputs, tenant=tenant, instance=instance),
                  moved)
