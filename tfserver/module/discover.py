"""Module discovery: each folder with `*.tf` files is a module; its variables become a schema.

Parsing HCL costs about 150 ms a module, so it happens once, at start. A request body is
checked against the module's JSON Schema before terraform ever runs, and every field error
is reported at once, in words that never repeat the value sent (it may be a secret).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import hcl2
from hcl2 import SerializationOptions
from lark.exceptions import LarkError

from ..errors import ConfigError, FieldError, InvalidInput
from ..names import NAME_RE, RESERVED_NAMES
from ..scrub import Secret
from .types import TfType, TypeSyntaxError, nullable, parse_type, to_schema
from .versions import is_version, version_key

logger = logging.getLogger(__name__)

_HCL_OPTIONS = SerializationOptions(
    strip_string_quotes=True, explicit_blocks=False, with_comments=False
)

#: Variables the server fills when a module declares them, so a module can name and tag
#: what it creates after its owner; a client never sets them (DESIGN: Governance).
RESERVED_VARIABLES = frozenset({"tfserver_tenant", "tfserver_instance", "tfserver_module"})


@dataclass(frozen=True)
class Variable:
    """One input variable of a module."""

    name: str
    type: TfType
    required: bool
    default: Any = None
    nullable: bool = True
    sensitive: bool = False
    description: str = ""

    def schema(self) -> dict[str, Any]:
        """The JSON Schema of this variable's value."""
        schema = to_schema(self.type)
        if self.nullable:
            schema = nullable(schema)
        if self.description:
            schema["description"] = self.description
        if not self.required and self.default is not None and not self.sensitive:
            schema["default"] = self.default
        if self.sensitive:
            schema["writeOnly"] = True
        return schema


@dataclass(frozen=True)
class Output:
    """One output of a module."""

    name: str
    description: str = ""
    sensitive: bool = False


@dataclass(frozen=True)
class Module:
    """A servable Terraform module, read once from its folder."""

    name: str
    path: Path
    variables: Mapping[str, Variable]
    outputs: Mapping[str, Output]
    description: str = ""
    #: The JSON Schema of a request body: published (GET /{module}, OpenAPI) and enforced
    #: by `validate`. A policy narrows it with `dataclasses.replace(module, schema=...)`.
    schema: dict[str, Any] = field(default_factory=dict, compare=False)
    #: This version (a versioned module's folder name); None for an unversioned module.
    version: str | None = None
    #: Every version, oldest first, as the module served holds them (each of them with
    #: no `versions` of its own); empty for an unversioned module.
    versions: Mapping[str, Module] = field(default_factory=dict, compare=False, repr=False)

    @property
    def copy_key(self) -> str:
        """The name of this version's working copy: the module's, `@version` after."""
        return self.name if self.version is None else f"{self.name}@{self.version}"

    @property
    def latest(self) -> str | None:
        """The newest version (None for an unversioned module)."""
        return list(self.versions)[-1] if self.versions else None

    @property
    def sensitive_variables(self) -> frozenset[str]:
        """Names of the variables marked `sensitive`."""
        return frozenset(n for n, v in self.variables.items() if v.sensitive)

    @property
    def reserved(self) -> frozenset[str]:
        """The reserved variables this module declares: the server fills them, clients
        never see them in the schema and may not send them."""
        return RESERVED_VARIABLES & self.variables.keys()

    def validate(self, body: Any) -> dict[str, Any]:
        """Check a request body against the variables; raise `InvalidInput` listing all faults."""
        if not isinstance(body, dict):
            raise InvalidInput(
                "the body must be a JSON object of variables",
                [FieldError("", "must be a JSON object")],
            )
        validator = self._validator
        errors = [FieldError(n, "is set by the server") for n in self.reserved & body.keys()]
        # The schema leaves reserved variables out, so without this it would call them
        # unknown; they are known, just not the client's to set.
        rest = {k: v for k, v in body.items() if k not in self.reserved}
        for error in validator.iter_errors(rest):
            errors.extend(_field_errors(error, self.sensitive_variables))
        if errors:
            unique = sorted(set(errors), key=lambda e: (e.field, e.message))
            raise InvalidInput(
                f"{len(unique)} problem(s) with the variables of module {self.name!r}", unique
            )
        return body

    @cached_property
    def _validator(self) -> Any:
        """The schema's validator, made once (making it took 0.07 ms of every apply)."""
        # jsonschema (4 MB, 40 ms of imports) waits for the first body to check: an idle
        # server, or one that only serves reads, never loads it.
        import jsonschema

        return jsonschema.Draft202012Validator(self.schema)

    def fill_reserved(self, inputs: Mapping[str, Any], *, tenant: str,
                      instance: str) -> dict[str, Any]:
        """`inputs` plus the reserved variables this module declares: `tfserver_tenant`
        (the tenant as the principal names it: its client id, or subject),
        `tfserver_instance` and `tfserver_module` (this module's name)."""
        values = {"tfserver_tenant": tenant, "tfserver_instance": instance,
                  "tfserver_module": self.name}
        return {**inputs, **{n: values[n] for n in sorted(self.reserved)}}

    def secret_values(self, inputs: Mapping[str, Any]) -> list[Secret]:
        """Every leaf of every sensitive value (given or default), for `Scrubber`, which
        knows the forms each is printed in; the longest first."""
        found: dict[tuple[type, Secret], Secret] = {}
        for name in sorted(self.sensitive_variables):
            var = self.variables[name]
            for value in (inputs.get(name), var.default):
                # Keyed by type too: 1 and 1.0 are equal but print differently.
                found.update(((type(leaf), leaf), leaf) for leaf in _leaves(value, var.type))
        leaves = [leaf for leaf in found.values() if leaf != ""]
        return sorted(leaves, key=lambda leaf: len(leaf) if isinstance(leaf, str) else -1,
                      reverse=True)


def _leaves(value: Any, t: TfType | None = None) -> Iterator[Secret]:
    """The strings and numbers inside a value of type `t`: each is printed on its own (a
    map's values, a list's items). A map's keys too: they are the caller's data, and a
    `for_each` over the map prints them in resource addresses. An object's attribute
    names (and the keys of a value typed `any`) are names, not secrets: scrubbing words
    such as `password` would maim every text."""
    kind = t.kind if t is not None else "any"
    if isinstance(value, dict):
        for k, v in value.items():
            if kind == "map" and t is not None:
                yield from _leaves(str(k))
                yield from _leaves(v, t.element)
            elif kind == "object" and t is not None and k in t.attributes:
                yield from _leaves(v, t.attributes[k].type)
            else:
                yield from _leaves(v)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            if kind in ("list", "set") and t is not None:
                yield from _leaves(v, t.element)
            elif kind == "tuple" and t is not None and i < len(t.items):
                yield from _leaves(v, t.items[i])
            else:
                yield from _leaves(v)
    elif isinstance(value, bool):
        return  # "true"/"false" reveal next to nothing and scrubbing them would maim text
    elif isinstance(value, str | int | float):
        yield value


def _describe(kind: Any) -> str:
    names = {
        "string": "a string",
        "number": "a number",
        "boolean": "true or false",
        "array": "a list",
        "object": "an object",
        "null": "null",
    }
    if isinstance(kind, list):
        return " or ".join(names.get(k, str(k)) for k in kind)
    return names.get(kind, str(kind))


def _path(parts: Iterable[Any]) -> str:
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _shown(value: Any) -> str:
    """A value of the schema (an allowed value, a bound) as a message shows it."""
    if isinstance(value, str) and value and "," not in value and value.strip() == value:
        return value
    return json.dumps(value, sort_keys=True)


#: Messages of the bounds a policy may add (DESIGN: Governance), by keyword.
_BOUNDS = {
    "minimum": "must be at least {}",
    "maximum": "must be at most {}",
    "exclusiveMinimum": "must be greater than {}",
    "exclusiveMaximum": "must be less than {}",
    "multipleOf": "must be a multiple of {}",
    "pattern": "must match the pattern {}",
    "minLength": "must be at least {} characters long",
    "maxLength": "must be at most {} characters long",
    "minProperties": "must have at least {} entries",
    "maxProperties": "must have at most {} entries",
}


def _field_errors(error: Any, hidden: frozenset[str], *,
                  secret: bool = False) -> list[FieldError]:
    """Words for one schema error (a jsonschema ValidationError) that never echo the value.

    Inside a sensitive variable (`hidden`) only the variable is named: the rest of a path
    is made of the value's own map keys and list positions, which are part of the secret.
    Nor are its allowed values listed (`secret`): next to a refusal they narrow down what
    was sent. Bounds and patterns are named: they say what a value must be, not what it is.
    """
    where = list(error.absolute_path)
    if where and where[0] in hidden:
        return [FieldError(str(where[0]), e.message)
                for e in _field_errors(error, frozenset(), secret=True)]
    here = _path(where)
    rule = error.validator
    if rule == "required":
        missing = [n for n in error.validator_value if n not in error.instance]
        what = "variable" if not where else "attribute"
        return [FieldError(_path([*where, n]), f"required {what} is missing") for n in missing]
    if rule == "additionalProperties" and error.validator_value is False:
        known = set(error.schema.get("properties", {}))
        what = "variable" if not where else "attribute"
        return [
            FieldError(_path([*where, n]), f"unknown {what}")
            for n in error.instance
            if n not in known
        ]
    if rule == "type":
        return [FieldError(here, f"must be {_describe(error.validator_value)}")]
    if rule in ("minItems", "maxItems"):
        count = error.schema.get("minItems")
        if count == error.schema.get("maxItems"):
            return [FieldError(here, f"must have exactly {count} items")]
        return [FieldError(here, f"must have {'at least' if rule == 'minItems' else 'at most'} "
                                 f"{error.validator_value} items")]
    if rule == "uniqueItems":
        return [FieldError(here, "must not repeat an item (it is a set)")]
    if rule == "items" and error.validator_value is False:
        return [FieldError(here, "has more items than the tuple type allows")]
    if rule == "anyOf":
        # The only anyOf we emit is "<schema> or null": report the first branch's faults.
        inner = [e for e in error.context or [] if e.relative_schema_path[0] == 0]
        found = [fe for e in inner for fe in _field_errors(e, frozenset(), secret=secret)]
        return found or [FieldError(here, "has the wrong type")]
    if rule in ("enum", "const"):
        if secret:
            return [FieldError(here, "is not an allowed value")]
        allowed = error.validator_value if rule == "enum" else [error.validator_value]
        if len(allowed) == 1:
            return [FieldError(here, f"must be {_shown(allowed[0])}")]
        return [FieldError(here, f"must be one of {', '.join(_shown(v) for v in allowed)}")]
    if rule in _BOUNDS:
        return [FieldError(here, _BOUNDS[rule].format(_shown(error.validator_value)))]
    return [FieldError(here, f"fails the {rule} rule")]


def _first(value: Any) -> Any:
    # python-hcl2 gives repeated attributes as lists in some versions; take the first.
    return value[0] if isinstance(value, list) and value and not isinstance(value[0], dict) \
        else value


def _readme_summary(path: Path) -> str:
    readme = path / "README.md"
    if not readme.is_file():
        return ""
    paragraph: list[str] = []
    for line in readme.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if text and not text.startswith(("#", "<!--", "```", "|")):
            paragraph.append(text)
        elif paragraph:
            break
    return " ".join(paragraph)


def _documents(path: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Each configuration file of a module, parsed: native syntax with python-hcl2, JSON
    syntax (`*.tf.json`) with json, both in python-hcl2's shape (block type -> list of
    {label: body})."""
    for tf in sorted(path.glob("*.tf")):
        try:
            yield tf, hcl2.loads(tf.read_text(encoding="utf-8"),
                                 serialization_options=_HCL_OPTIONS)
        except (LarkError, ValueError) as e:
            raise ConfigError(f"{tf}: cannot parse HCL: {type(e).__name__}") from e
    for tf in sorted(path.glob("*.tf.json")):
        try:
            raw = json.loads(tf.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ConfigError(f"{tf}: not JSON: {e}") from e
        doc: dict[str, Any] = {}
        for kind in ("variable", "output"):
            blocks = raw.get(kind, []) if isinstance(raw, dict) else []
            for block in blocks if isinstance(blocks, list) else [blocks]:
                for label, body in (block or {}).items():
                    body = body[0] if isinstance(body, list) and body else body
                    doc.setdefault(kind, []).append({label: body})
        yield tf, doc


def load_module(path: Path, name: str | None = None) -> Module:
    """Read one module folder's variables and outputs (raises ConfigError if unreadable)."""
    variables: dict[str, Variable] = {}
    outputs: dict[str, Output] = {}
    for tf, doc in _documents(path):
        for block in doc.get("variable", []):
            for var_name, body in block.items():
                try:
                    tf_type = parse_type(_first(body.get("type")))
                except TypeSyntaxError as e:
                    raise ConfigError(f"{tf}: variable {var_name}: {e}") from e
                if var_name in RESERVED_VARIABLES and tf_type.kind != "string":
                    raise ConfigError(f"{tf}: variable {var_name}: the server fills it with "
                                      f"a string, so declare it with type = string, not "
                                      f"{tf_type}")
                variables[var_name] = Variable(
                    name=var_name,
                    type=tf_type,
                    required="default" not in body,
                    default=body.get("default"),
                    nullable=bool(_first(body.get("nullable", True))),
                    sensitive=bool(_first(body.get("sensitive", False))),
                    description=str(_first(body.get("description", "")) or ""),
                )
        for block in doc.get("output", []):
            for out_name, body in block.items():
                outputs[out_name] = Output(
                    name=out_name,
                    description=str(_first(body.get("description", "")) or ""),
                    sensitive=bool(_first(body.get("sensitive", False))),
                )
    # Reserved variables are the server's to fill: clients never see them.
    public = {n: v for n, v in variables.items() if n not in RESERVED_VARIABLES}
    schema: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {n: v.schema() for n, v in public.items()},
        "required": sorted(n for n, v in public.items() if v.required),
        "additionalProperties": False,
    }
    return Module(
        name=name or path.name,
        path=path,
        variables=variables,
        outputs=outputs,
        description=_readme_summary(path),
        schema=schema,
    )


def discover(modules_dir: Path) -> dict[str, Module]:
    """Every subfolder of `modules_dir` holding `*.tf` or `*.tf.json` files, or version
    folders that do, by URL name (each module as served: its newest version)."""
    if not modules_dir.is_dir():
        raise ConfigError(f"modules folder {modules_dir} does not exist")
    found: dict[str, Module] = {}
    for sub in sorted(modules_dir.iterdir()):
        if not sub.is_dir() or not (_holds_tf(sub) or any(map(_holds_tf, _folders(sub)))):
            continue
        if not NAME_RE.match(sub.name) or sub.name in RESERVED_NAMES:
            logger.warning("module folder %s skipped: its name cannot be a URL path", sub.name)
            continue
        found[sub.name] = _load_folder(sub)
    if not found:
        raise ConfigError(f"no modules (folders with *.tf files) in {modules_dir}")
    return found


def _holds_tf(folder: Path) -> bool:
    return any(folder.glob("*.tf")) or any(folder.glob("*.tf.json"))


def _folders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _load_folder(sub: Path) -> Module:
    """One module folder: unversioned (its own `*.tf`), or version folders, each named by
    a semantic version; a folder with both, or a version folder named otherwise, is a
    start error (which files would be served is not for the server to guess)."""
    versioned = [d for d in _folders(sub) if _holds_tf(d)]
    if _holds_tf(sub):
        named = [d.name for d in versioned if is_version(d.name)]
        if named:
            raise ConfigError(f"module folder {sub} holds both *.tf files and version "
                              f"folders ({', '.join(named)}): move the *.tf files into a "
                              "version folder, or the version folders out")
        return load_module(sub)
    bad = [d.name for d in versioned if not is_version(d.name)]
    if bad:
        raise ConfigError(f"module folder {sub}: version folders are named by a semantic "
                          f"version such as 1.4.0, not {', '.join(repr(b[:64]) for b in bad)}")
    summary = _readme_summary(sub)
    versions: dict[str, Module] = {}
    for d in sorted(versioned, key=lambda d: version_key(d.name)):
        m = load_module(d, sub.name)
        versions[d.name] = replace(m, version=d.name, description=m.description or summary)
    return replace(versions[next(reversed(versions))], versions=versions)
