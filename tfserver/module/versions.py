"""Module versions: folders named by semantic version, which one a request or an instance
means, and what changes between two versions' variables.

A module folder holds either `*.tf` files (one unversioned module) or version folders
(`modules/droplet/1.4.0/`). A version is `MAJOR.MINOR.PATCH` with an optional
`-prerelease` (letters, digits, dots, hyphens), as semver.org writes it; nothing else is
a version, and a `?version=` that is not one is refused before it is looked up, so it never
reaches a path.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..errors import BadRequest, FieldError, InvalidInput

if TYPE_CHECKING:
    from .discover import Module

VERSION_RE = re.compile(r"^(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})"
                        r"(?:-([0-9A-Za-z][0-9A-Za-z.-]{0,31}))?$")
#: How a body is checked against one version (`Module.validate`, or the references'
#: check, which also looks at what a `$ref` names).
Validate = Callable[["Module", Any], dict[str, Any]]

#: The longest version accepted (the pattern bounds it too; this bounds what is echoed).
MAX_VERSION_LENGTH = 64


def is_version(name: str) -> bool:
    """True when `name` is a semantic version as a version folder must be named."""
    return len(name) <= MAX_VERSION_LENGTH and VERSION_RE.fullmatch(name) is not None


def version_key(version: str) -> tuple[int, int, int, int, str]:
    """The sort key of a version: a prerelease sorts before its release (semver's rule,
    its dotted fields compared as text)."""
    found = VERSION_RE.fullmatch(version)
    if found is None:
        raise ValueError(f"not a version: {version!r}")
    major, minor, patch, pre = found.groups()
    return int(major), int(minor), int(patch), 0 if pre else 1, pre or ""


def newest(versions: list[str]) -> str:
    """The newest of some versions."""
    return max(versions, key=version_key)


def check_version(raw: str) -> str:
    """`raw` if it is a version; else a 400 that never repeats it (it may be hostile)."""
    if not is_version(raw):
        raise BadRequest("?version= must be a semantic version such as 1.4.0",
                         extra={"errors": [{"field": "version",
                                            "message": "not a semantic version"}]})
    return raw


def requested(module: Module, raw: str | None) -> Module | None:
    """The version a `?version=` names (None when none is named); a 400 for one the
    module lacks, naming those it has."""
    if raw is None:
        return None
    version = check_version(raw)
    if not module.versions:
        raise BadRequest(f"module {module.name} has no versions; leave out ?version=",
                         extra={"errors": [{"field": "version", "message": "unversioned"}]})
    found = module.versions.get(version)
    if found is None:
        raise BadRequest(f"module {module.name} has no version {version}; it has "
                         f"{', '.join(module.versions)}",
                         extra={"errors": [{"field": "version", "message": "unknown version"}],
                                "versions": list(module.versions)})
    return found


def every_version(modules: Mapping[str, Module]) -> dict[str, Module]:
    """Every version of every module (an unversioned module is its one), by the name of
    its working copy (`Module.copy_key`)."""
    return {v.copy_key: v for m in modules.values() for v in (m.versions.values()
                                                             or [m])}


def recorded(module: Module, version: str | None) -> Module:
    """The version an instance or run recorded (`module` is the module as served: its
    default version). An unversioned module is itself. A record without a version (made
    before the module had versions) means its oldest version, which holds the code the
    module had before; a version no longer served means the default."""
    if not module.versions:
        return module
    if version is None:
        return next(iter(module.versions.values()))
    return module.versions.get(version, module)


def narrowed(module: Module, variables: Mapping[str, Any], default: str | None,
             narrow: Callable[[Module, Mapping[str, Any]], dict[str, Any]],
             fault: Callable[[str], Exception]) -> Module:
    """A policy's table applied to a module: each version's schema narrowed by the
    variables it declares (`narrow`: the schema; a variable no version declares is its
    fault), served at `default` (a `fault` unless it is one of the versions)."""
    if not module.versions:
        if default:
            raise fault(f"module {module.name} has no versions")
        return replace(module, schema=narrow(module, variables))
    if default and default not in module.versions:
        raise fault(f"module {module.name} has no version {default} (it has "
                    f"{', '.join(module.versions)})")
    if any(not any(n in m.variables for m in module.versions.values()) for n in variables):
        narrow(module, variables)  # raises: names the variable and the module's others
    versions = {v: replace(m, schema=narrow(m, {n: f for n, f in variables.items()
                                                if n in m.variables}))
                for v, m in module.versions.items()}
    return replace(versions[default or str(module.version)], versions=versions)


@dataclass(frozen=True)
class Difference:
    """What moving an instance's kept inputs to another version changes in them."""

    #: The inputs as the new version takes them (dropped variables left out, `set` applied).
    inputs: dict[str, Any]
    #: Variables the instance set that the new version no longer declares.
    dropped: list[str] = field(default_factory=list)
    #: Variables the new version adds (required or not).
    added: list[str] = field(default_factory=list)
    #: Variables whose type differs between the two versions.
    retyped: list[str] = field(default_factory=list)


def difference(old: Module, new: Module, kept: Mapping[str, Any],
               overrides: Mapping[str, Any] | None = None,
               validate: Validate | None = None) -> Difference:
    """The kept inputs moved from `old` to `new` (with `overrides` on top), checked with
    `validate`: raises `InvalidInput` for a new required variable left without a value,
    or a kept value the new type refuses (every fault at once, never a value)."""
    given = {k: v for k, v in kept.items() if k not in old.reserved | new.reserved}
    dropped = sorted(k for k in given if k not in new.variables)
    inputs = {k: v for k, v in given.items() if k in new.variables}
    inputs.update(overrides or {})
    added = sorted(n for n in new.variables
                   if n not in old.variables and n not in new.reserved)
    retyped = sorted(n for n, v in new.variables.items()
                     if n in old.variables and old.variables[n].type != v.type)
    try:
        if validate is None:
            new.validate(inputs)
        else:
            validate(new, inputs)
    except InvalidInput as e:
        missing = [f for f in e.errors if f.message == "required variable is missing"]
        others = [f for f in e.errors if f not in missing]
        errors = [FieldError(f.field, f"is new in version {new.version} and required: "
                                      "give it a value") for f in missing]
        errors += [FieldError(f.field, f"{f.message} (its type is {new.variables[root].type} "
                                       f"in version {new.version})")
                   if (root := f.field.split(".")[0].split("[")[0]) in retyped else f
                   for f in others]
        raise InvalidInput(f"the inputs of version {old.version or 'unversioned'} do not "
                           f"fit version {new.version}", errors) from e
    return Difference(inputs, dropped, added, retyped)
