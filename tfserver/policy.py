"""The governance policy: quotas, allowed values and TTLs, from one TOML file read at start.

`TFSERVER_POLICY` names the file (DESIGN: Governance). It is read once and checked against
the served modules before the server listens: every fault is a `ConfigError` of one line
naming the file, the TOML key and what is wrong, so a policy that does not do what its
author meant never serves a request. Nothing here runs terraform or counts anything; the
service asks `Policy.limits` for the numbers and counts instances and runs itself.

Allowed values only ever narrow a variable's type. They are merged into the module's JSON
Schema (`Policy.narrowed`), so the schema clients read is the schema requests are checked
against, before any terraform process starts.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jsonschema

from .config import parse_duration
from .errors import BadRequest, ConfigError
from .modules import RESERVED_VARIABLES, Module
from .types import TfType

#: The word for "no limit" (TOML has no null): it also lifts a limit set by a wider scope.
UNLIMITED = "unlimited"

_COUNTS = ("max_instances_per_tenant", "max_runs_per_tenant")
_DURATIONS = ("default_ttl", "max_ttl")
#: The keys of each table of limits.
_DEFAULTS_KEYS = (*_COUNTS, *_DURATIONS)
_MODULE_KEYS = (*_COUNTS, *_DURATIONS, "variables")
_TENANT_KEYS = (*_COUNTS, "modules")
_TENANT_MODULE_KEYS = _COUNTS

#: JSON Schema keywords a policy may add, and the JSON types they act on (None: any).
#: Each can only shrink the set of values the type accepts. Left out on purpose: `format`
#: (JSON Schema makes it a note, not a rule, and validators check only some formats; a
#: `pattern` says the same and is enforced), and anything that widens or restructures a
#: type (`type`, `anyOf`, `not`, `$ref`, `default`, ...).
KEYWORDS: Mapping[str, frozenset[str] | None] = {
    "enum": None,
    "const": None,
    "minimum": frozenset({"number"}),
    "maximum": frozenset({"number"}),
    "exclusiveMinimum": frozenset({"number"}),
    "exclusiveMaximum": frozenset({"number"}),
    "multipleOf": frozenset({"number"}),
    "pattern": frozenset({"string"}),
    "minLength": frozenset({"string"}),
    "maxLength": frozenset({"string"}),
    "minItems": frozenset({"array"}),
    "maxItems": frozenset({"array"}),
    "uniqueItems": frozenset({"array"}),
    "minProperties": frozenset({"object"}),
    "maxProperties": frozenset({"object"}),
}
#: Tables that reach inside a value, by the Terraform kinds that have them: an object's
#: attributes, a list's or set's items, a map's values.
STRUCTURE: Mapping[str, tuple[str, ...]] = {
    "properties": ("object",),
    "items": ("list", "set"),
    "additionalProperties": ("map",),
}
_JSON_KIND = {"string": "string", "number": "number", "bool": "boolean", "list": "array",
              "set": "array", "tuple": "array", "map": "object", "object": "object"}
#: Keywords whose value is a size: a whole number of at least 0.
_SIZES = frozenset({"minLength", "maxLength", "minItems", "maxItems", "minProperties",
                    "maxProperties"})
_PLURAL = {"number": "numbers", "string": "strings", "array": "lists, sets and tuples",
           "object": "maps and objects"}
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")

#: The limits one table sets; a key left out inherits, None is unlimited.
Scope = Mapping[str, int | float | None]


@dataclass(frozen=True)
class Limits:
    """What the policy allows one tenant on one module.

    `None` is no limit. `max_instances` caps the tenant's instances of the module (an update
    of an existing instance is never refused by it); `max_runs` caps the tenant's runs of
    the module in flight (queued or running) at once; TTLs are seconds.
    """

    max_instances: int | None = None
    max_runs: int | None = None
    default_ttl: float | None = None
    max_ttl: float | None = None

    @property
    def expires(self) -> bool:
        """True when instances expire by default under these limits."""
        return self.default_ttl is not None or self.max_ttl is not None

    def ttl(self, requested: float | None) -> float | None:
        """The TTL of an apply: `requested` (from `?ttl=`), else `default_ttl`.

        A request beyond `max_ttl` is 400 naming `ttl` and the maximum. With `max_ttl`
        and no `default_ttl`, an apply without `?ttl=` gets `max_ttl`, so the maximum
        holds for every instance.
        """
        if requested is None:
            return self.default_ttl if self.default_ttl is not None else self.max_ttl
        if not requested > 0:
            raise _ttl_error("must be a positive duration")
        if self.max_ttl is not None and requested > self.max_ttl:
            raise _ttl_error(f"must be at most {format_duration(self.max_ttl)}")
        return requested


#: The longest `?ttl=` taken even without a policy's `max_ttl` (an expiry must stay a
#: date that can be written down).
TTL_CEILING = 3650 * 86400.0


def parse_ttl(text: str) -> float:
    """Seconds from a `?ttl=` value such as `2h`, `90m` or `7d`; 400 naming `ttl` else."""
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise _ttl_error("must be a duration such as 90m, 24h or 7d") from None
    if not seconds > 0:
        raise _ttl_error("must be a positive duration")
    if not math.isfinite(seconds) or seconds > TTL_CEILING:
        raise _ttl_error(f"must be at most {format_duration(TTL_CEILING)}")
    return seconds


def _ttl_error(message: str) -> BadRequest:
    return BadRequest(f"ttl {message}", extra={"errors": [{"field": "ttl", "message": message}]})


def format_duration(seconds: float) -> str:
    """A duration the way a policy writes it: `7d`, `24h`, `90m`, `45s`."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


@dataclass(frozen=True)
class ModuleRules:
    """A module's table: its limits and the narrowing of its variables (schema fragments)."""

    limits: Scope = field(default_factory=dict)
    variables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class TenantRules:
    """One client's overrides of the quotas: for every module, and per module."""

    limits: Scope = field(default_factory=dict)
    modules: Mapping[str, Scope] = field(default_factory=dict)


@dataclass(frozen=True)
class Policy:
    """A checked policy file. Limits resolve from the widest scope to the narrowest:
    `[defaults]` < `[modules.M]` < `[tenants.T]` < `[tenants.T.modules.M]`."""

    source: Path | None = None
    defaults: Scope = field(default_factory=dict)
    modules: Mapping[str, ModuleRules] = field(default_factory=dict)
    tenants: Mapping[str, TenantRules] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> Policy:
        """The policy of a server without a policy file: no limits, nothing narrowed."""
        return cls()

    def limits(self, module: str, client_id: str | None) -> Limits:
        """The limits of `client_id` (None: no tenant overrides) on `module`."""
        merged: dict[str, int | float | None] = dict(self.defaults)
        rules = self.modules.get(module)
        if rules is not None:
            merged.update(rules.limits)
        tenant = self.tenants.get(client_id) if client_id is not None else None
        if tenant is not None:
            merged.update(tenant.limits)
            merged.update(tenant.modules.get(module, {}))
        return Limits(max_instances=_count(merged.get("max_instances_per_tenant")),
                      max_runs=_count(merged.get("max_runs_per_tenant")),
                      default_ttl=merged.get("default_ttl"),
                      max_ttl=merged.get("max_ttl"))

    def narrowed(self, modules: Mapping[str, Module]) -> dict[str, Module]:
        """`modules` with the policy's allowed values merged into their schemas.

        Raises ConfigError (one line: file, key, fault) for a module or variable that does
        not exist, a keyword that is not allowed or does not fit the type, a value of the
        wrong type, and constraints that no value could meet or that refuse the module's
        own default.
        """
        out = dict(modules)
        for name, rules in self.modules.items():
            module = modules.get(name)
            if module is None:
                raise self._fault(("modules", name), _no_module(name, modules))
            if rules.variables:
                out[name] = replace(module, schema=self._narrow_module(module, rules))
        return out

    def check(self, modules: Mapping[str, Module]) -> None:
        """Raise ConfigError unless every module the policy names is served and its
        constraints fit (see `narrowed`)."""
        for client_id, tenant in self.tenants.items():
            for name in tenant.modules:
                if name not in modules:
                    raise self._fault(("tenants", client_id, "modules", name),
                                      _no_module(name, modules))
        self.narrowed(modules)

    # -- narrowing ---------------------------------------------------------------------

    def _fault(self, keys: tuple[str | int, ...], what: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key_path(keys)}: {what}")

    def _narrow_module(self, module: Module, rules: ModuleRules) -> dict[str, Any]:
        # A deep copy the policy may change; the module's own schema stays as it was read.
        schema: dict[str, Any] = json.loads(json.dumps(module.schema))
        for var_name, fragment in rules.variables.items():
            keys: tuple[str | int, ...] = ("modules", module.name, "variables", var_name)
            if var_name in RESERVED_VARIABLES and var_name in module.variables:
                raise self._fault(keys, "is set by the server, so a policy cannot narrow it")
            var = module.variables.get(var_name)
            if var is None:
                raise self._fault(keys, f"module {module.name} has no variable {var_name} "
                                        f"(it has {', '.join(sorted(schema['properties']))})")
            default = None if var.required else var.default
            schema["properties"][var_name] = self._narrow(
                schema["properties"][var_name], var.type, fragment, keys, default)
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as e:
            raise self._fault(("modules", module.name), f"makes an invalid schema: "
                                                         f"{e.message}") from e
        return schema

    def _narrow(self, node: dict[str, Any], tf: TfType, fragment: Mapping[str, Any],
                keys: tuple[str | int, ...], default: Any) -> dict[str, Any]:
        """`node`, the JSON Schema of a value of type `tf`, narrowed by `fragment`."""
        out = dict(node)
        kind = _JSON_KIND.get(tf.kind)
        for key, value in fragment.items():
            at = (*keys, key)
            if key in STRUCTURE:
                out[key] = self._narrow_inside(node, tf, key, value, at)
                continue
            if key not in KEYWORDS:
                raise self._fault(at, _not_allowed(key))
            applies = KEYWORDS[key]
            if applies is not None and kind not in applies:
                plural = " and ".join(_PLURAL[k] for k in sorted(applies))
                raise self._fault(at, f"applies to {plural}, and this value is {tf}")
            self._check_keyword(key, value, at)
            if key in node and node[key] != value:
                raise self._fault(at, f"type {tf} already sets {key}; a policy cannot "
                                      "change it")
            out[key] = value
        self._check_bounds(out, keys)
        for key in ("enum", "const"):
            if key in fragment:
                self._check_allowed(node, out, key, fragment[key], (*keys, key), tf)
        if default is not None and not _valid(out, default):
            raise self._fault(keys, "the module's default is outside these constraints, so "
                                    "a request that leaves it out would be refused")
        return out

    def _narrow_inside(self, node: dict[str, Any], tf: TfType, key: str, value: Any,
                       keys: tuple[str | int, ...]) -> Any:
        """The `properties`, `items` or `additionalProperties` part of `node`, narrowed."""
        if tf.kind not in STRUCTURE[key]:
            hint = {"object": "properties.<attribute>", "list": "items", "set": "items",
                    "map": "additionalProperties"}.get(tf.kind)
            where = f"; use {hint}" if hint else ""
            raise self._fault(keys, f"applies to {' and '.join(STRUCTURE[key])} types, and "
                                    f"this value is {tf}{where}")
        if not isinstance(value, dict):
            raise self._fault(keys, "must be a table")
        if key != "properties":
            assert tf.element is not None
            return self._narrow(node[key], tf.element, value, keys, None)
        properties = dict(node["properties"])
        for attr, sub in value.items():
            at = (*keys, attr)
            if attr not in tf.attributes:
                raise self._fault(at, f"type {tf} has no attribute {attr}")
            if not isinstance(sub, dict):
                raise self._fault(at, "must be a table of JSON Schema keywords")
            properties[attr] = self._narrow(properties[attr], tf.attributes[attr].type, sub,
                                            at, tf.attributes[attr].default)
        return properties

    def _check_keyword(self, key: str, value: Any, keys: tuple[str | int, ...]) -> None:
        """The keyword's own value has the shape JSON Schema wants, and narrows."""
        if key == "enum":
            if not isinstance(value, list) or not value:
                raise self._fault(keys, "must be a non-empty array of allowed values")
            seen: dict[str, int] = {}
            for i, item in enumerate(value):
                self._check_json(item, (*keys, i))
                text = json.dumps(item, sort_keys=True)
                if text in seen:
                    raise self._fault((*keys, i), f"repeats {key_path((key, seen[text]))}")
                seen[text] = i
        elif key == "const":
            self._check_json(value, keys)
        elif key == "pattern":
            if not isinstance(value, str):
                raise self._fault(keys, "must be a string (a regular expression)")
            try:
                re.compile(value)
            except re.error as e:
                raise self._fault(keys, f"is not a regular expression: {e}") from None
        elif key == "uniqueItems":
            if value is not True:
                raise self._fault(keys, "must be true (false would not narrow anything)")
        elif key in _SIZES:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise self._fault(keys, "must be a whole number of at least 0")
        else:  # minimum, maximum, exclusive*, multipleOf
            if not _is_number(value):
                raise self._fault(keys, "must be a number")
            if key == "multipleOf" and not value > 0:
                raise self._fault(keys, "must be greater than 0")

    def _check_json(self, value: Any, keys: tuple[str | int, ...]) -> None:
        """A value JSON can carry (the schema is published as JSON): no TOML dates, no
        infinities."""
        if isinstance(value, dict):
            for k, v in value.items():
                self._check_json(v, (*keys, k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                self._check_json(v, (*keys, i))
        elif not isinstance(value, str | bool) and not _is_number(value):
            raise self._fault(keys, "must be a JSON value (a TOML date or time, infinity "
                                    "or nan is not)")

    def _check_bounds(self, node: Mapping[str, Any], keys: tuple[str | int, ...]) -> None:
        """Lower and upper bounds leave room for at least one value."""
        for low, high in (("minLength", "maxLength"), ("minItems", "maxItems"),
                          ("minProperties", "maxProperties")):
            if low in node and high in node and node[low] > node[high]:
                raise self._fault(keys, f"{low} {node[low]} is above {high} {node[high]}: no "
                                        "value could pass")
        lows = [(node[k], k == "exclusiveMinimum") for k in ("minimum", "exclusiveMinimum")
                if k in node]
        highs = [(node[k], k == "exclusiveMaximum") for k in ("maximum", "exclusiveMaximum")
                 if k in node]
        if lows and highs:
            # The tighter bound of each side: the larger low (exclusive wins a tie), the
            # smaller high.
            low, low_open = max(lows, key=lambda b: (b[0], b[1]))
            high, high_open = min(highs, key=lambda b: (b[0], not b[1]))
            if low > high or (low == high and (low_open or high_open)):
                raise self._fault(keys, f"no number is above {'' if low_open else 'or at '}"
                                        f"{low:g} and below {'' if high_open else 'or at '}"
                                        f"{high:g}")

    def _check_allowed(self, node: dict[str, Any], narrowed: dict[str, Any], key: str,
                       value: Any, keys: tuple[str | int, ...], tf: TfType) -> None:
        """Each allowed value is a value of the type, and meets the other constraints."""
        items = list(enumerate(value)) if key == "enum" else [(None, value)]
        others = {k: v for k, v in narrowed.items() if k not in ("enum", "const")}
        for i, item in items:
            at = keys if i is None else (*keys, i)
            if not _valid(node, item):
                raise self._fault(at, f"is not a value of type {tf}")
            if not _valid(others, item):
                raise self._fault(at, "is outside the other constraints here, so it could "
                                      "never be accepted")


# -- reading the file ------------------------------------------------------------------


def load_policy(path: Path | None, modules: Mapping[str, Module]) -> Policy:
    """Read and check the policy file `path` (None: no policy) against the served modules.

    Raises ConfigError with one line for an unreadable file, TOML syntax (with the line
    tomllib reports), or any fault of content.
    """
    if path is None:
        return Policy.empty()
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"TFSERVER_POLICY {path}: cannot read it: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    policy = _Reader(path).policy(document)
    policy.check(modules)
    return policy


@dataclass(frozen=True)
class _Reader:
    """Turns the TOML document into a `Policy`, refusing what it does not know."""

    path: Path

    def fault(self, keys: tuple[str | int, ...], what: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key_path(keys)}: {what}")

    def table(self, value: Any, keys: tuple[str | int, ...],
              allowed: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fault(keys, "must be a table")
        for key in value:
            if key not in allowed:
                raise self.fault((*keys, key), f"unknown key (expected {', '.join(allowed)})")
        return value

    def policy(self, document: dict[str, Any]) -> Policy:
        for key in document:
            if key not in ("defaults", "modules", "tenants"):
                raise self.fault((key,), "unknown key (expected defaults, modules, tenants)")
        defaults = self.limits(document.get("defaults", {}), ("defaults",), _DEFAULTS_KEYS)
        self.check_ttls(defaults, defaults, ("defaults",))
        modules: dict[str, ModuleRules] = {}
        for name, body in self.names(document.get("modules", {}), ("modules",)).items():
            keys = ("modules", name)
            limits = self.limits(body, keys, _MODULE_KEYS)
            self.check_ttls({**defaults, **limits}, limits, keys)
            variables = self.names(body.get("variables", {}), (*keys, "variables"))
            for var_name, fragment in variables.items():
                if not isinstance(fragment, dict):
                    raise self.fault((*keys, "variables", var_name),
                                     "must be a table of JSON Schema keywords")
            modules[name] = ModuleRules(limits, variables)
        tenants: dict[str, TenantRules] = {}
        for client_id, body in self.names(document.get("tenants", {}), ("tenants",)).items():
            keys = ("tenants", client_id)
            if not client_id.strip():
                raise self.fault(keys, "a client id cannot be empty")
            limits = self.limits(body, keys, _TENANT_KEYS)
            per_module = {
                name: self.limits(sub, (*keys, "modules", name), _TENANT_MODULE_KEYS)
                for name, sub in self.names(body.get("modules", {}), (*keys, "modules")).items()
            }
            tenants[client_id] = TenantRules(limits, per_module)
        return Policy(self.path, defaults, modules, tenants)

    def names(self, value: Any, keys: tuple[str | int, ...]) -> dict[str, Any]:
        """A table of named tables (modules, variables, tenants)."""
        if not isinstance(value, dict):
            raise self.fault(keys, "must be a table")
        for name, body in value.items():
            if not isinstance(body, dict):
                raise self.fault((*keys, name), "must be a table")
        return value

    def limits(self, value: Any, keys: tuple[str | int, ...],
               allowed: tuple[str, ...]) -> dict[str, int | float | None]:
        """The limits a table sets: counts, durations (seconds), None for unlimited."""
        found: dict[str, int | float | None] = {}
        for key, raw in self.table(value, keys, allowed).items():
            at = (*keys, key)
            if key in _COUNTS:
                if raw == UNLIMITED:
                    found[key] = None
                elif isinstance(raw, bool) or not isinstance(raw, int):
                    raise self.fault(at, f'must be a whole number, or "{UNLIMITED}"')
                elif raw < 0:
                    raise self.fault(at, "must not be negative")
                else:
                    found[key] = raw
            elif key in _DURATIONS:
                found[key] = self.duration(raw, at)
        return found

    def duration(self, raw: Any, keys: tuple[str | int, ...]) -> float | None:
        if raw == UNLIMITED:
            return None
        wanted = f'must be a duration such as "90m", "24h" or "7d", or "{UNLIMITED}"'
        if not isinstance(raw, str):
            raise self.fault(keys, wanted)
        try:
            seconds = parse_duration(raw)
        except ValueError:
            raise self.fault(keys, wanted) from None
        if not seconds > 0:
            raise self.fault(keys, "must be longer than 0")
        return seconds

    def check_ttls(self, resolved: Scope, own: Scope, keys: tuple[str | int, ...]) -> None:
        """`default_ttl` within `max_ttl`, once a table sets either of them."""
        default, maximum = resolved.get("default_ttl"), resolved.get("max_ttl")
        if not (own.keys() & set(_DURATIONS)) or maximum is None:
            return
        if default is None and "default_ttl" in resolved:
            raise self.fault(keys, f'default_ttl is "{UNLIMITED}" but max_ttl is '
                                   f"{format_duration(maximum)}: instances would outlive "
                                   "the maximum")
        if default is not None and default > maximum:
            raise self.fault(keys, f"default_ttl {format_duration(default)} is longer than "
                                   f"max_ttl {format_duration(maximum)}")


# -- small pure helpers ----------------------------------------------------------------


def key_path(keys: tuple[str | int, ...]) -> str:
    """A TOML key path as its author would write it: `tenants."a.b".modules.droplet`,
    with `[i]` for array positions."""
    text = ""
    for key in keys:
        if isinstance(key, int):
            text += f"[{key}]"
        else:
            part = key if _BARE_KEY.match(key) else json.dumps(key)
            text += f".{part}" if text else part
    return text


def _count(value: int | float | None) -> int | None:
    return None if value is None else int(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and \
        math.isfinite(value)


def _valid(schema: Mapping[str, Any], value: Any) -> bool:
    return bool(jsonschema.Draft202012Validator(schema).is_valid(value))


def _no_module(name: str, modules: Mapping[str, Module]) -> str:
    return f"no module {name} is served (served: {', '.join(sorted(modules)) or 'none'})"


def _not_allowed(key: str) -> str:
    allowed = ", ".join([*KEYWORDS, *STRUCTURE])
    if key == "format":
        return ("format is not allowed: JSON Schema treats it as a note, not a rule; use "
                "pattern")
    return f"{key} is not allowed: a policy only narrows a type, with {allowed}"
