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
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..names import tenant_key
from .discover import RESERVED_VARIABLES, Module
from .limits import DEFAULT_MAX_QUEUED, Limits, Scope
from .types import TfType
from .versions import narrowed

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


@dataclass(frozen=True)
class ModuleRules:
    """A module's table: its limits and the narrowing of its variables (schema fragments)."""

    limits: Scope = field(default_factory=dict)
    variables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: How often each instance's drift is checked (seconds; None: never on a schedule),
    #: and whether a drifted one is then applied (app/driftschedule.py).
    drift_check: float | None = None
    reconcile: bool = False
    #: The version new instances get (None: the newest).
    default_version: str | None = None


@dataclass(frozen=True)
class TenantRules:
    """One client's overrides of the quotas: for every module, and per module."""

    limits: Scope = field(default_factory=dict)
    modules: Mapping[str, Scope] = field(default_factory=dict)


#: The events a webhook can ask for (DESIGN: Drift, schedules and notifications).
WEBHOOK_EVENTS = ("run.finished", "run.awaiting_approval", "instance.drifted",
                  "instance.expired", "instance.destroyed")


@dataclass(frozen=True)
class Webhook:
    """One `[[webhooks]]` table: where events go, the environment variable holding the
    signing secret (never the secret itself), which events, and whose (`"*"`: every
    tenant's; else tenant names or client ids, as `[tenants.X]` names them)."""

    url: str
    secret_env: str
    events: frozenset[str]
    tenants: frozenset[str]
    #: Where it is in the file (`webhooks[0]`), for faults found at start.
    key: str = "webhooks"

    def wants(self, event: str, tenant: str | None, client_id: str | None = None) -> bool:
        """True when this webhook takes `event` of that tenant (or client id). `tenant`
        may be an instance's tenant key (names.tenant_key): the runs of the reaper and of
        the drift schedule are of no client, and still of the tenant's instance."""
        if event not in self.events:
            return False
        return "*" in self.tenants or bool({tenant, client_id} & self.tenants) or \
            any(tenant_key(name) == tenant for name in self.tenants)


@dataclass(frozen=True)
class Policy:
    """A checked policy file. Limits resolve from the widest scope to the narrowest:
    `[defaults]` < `[modules.M]` < `[tenants.T]` < `[tenants.T.modules.M]`."""

    source: Path | None = None
    defaults: Scope = field(default_factory=dict)
    modules: Mapping[str, ModuleRules] = field(default_factory=dict)
    tenants: Mapping[str, TenantRules] = field(default_factory=dict)
    webhooks: tuple[Webhook, ...] = ()

    @property
    def limits_runs(self) -> bool:
        """True when some table sets a run limit (runs then hold slots)."""
        return self._sets("max_runs_per_tenant")

    @property
    def limits_instances(self) -> bool:
        """True when some table sets an instance quota (instances then hold slots)."""
        return self._sets("max_instances_per_tenant")

    @property
    def requires_approval(self) -> bool:
        """True when some table sets `require_approval = true` (app/approvals.py)."""
        return any(scope.get("require_approval") is True for scope in self._scopes())

    def _sets(self, key: str) -> bool:
        return any(scope.get(key) is not None for scope in self._scopes())

    def _scopes(self) -> list[Scope]:
        scopes = [self.defaults, *(m.limits for m in self.modules.values())]
        for tenant in self.tenants.values():
            scopes += [tenant.limits, *tenant.modules.values()]
        return scopes

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
        return _limits(merged)

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
            if rules.variables or rules.default_version:
                out[name] = self._versioned(module, rules)
        return out

    def _versioned(self, module: Module, rules: ModuleRules) -> Module:
        """The module narrowed (each version by the variables it declares) and served at
        its `default_version` (see `versions.narrowed`)."""
        return narrowed(module, rules.variables, rules.default_version,
                        lambda m, variables: self._narrow_module(
                            m, replace(rules, variables=variables)),
                        lambda what: self._fault(("modules", module.name,
                                                  "default_version"), what))

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
        # Imported here: a server without a policy file never loads jsonschema at start.
        import jsonschema

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


# -- small pure helpers ----------------------------------------------------------------


def _valid(schema: Mapping[str, Any], value: Any) -> bool:
    import jsonschema

    return bool(jsonschema.Draft202012Validator(schema).is_valid(value))


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


def _limits(merged: Mapping[str, int | float | None]) -> Limits:
    """The limits of the merged scopes of one client on one module."""
    return Limits(max_instances=_count(merged.get("max_instances_per_tenant")),
                  max_runs=_count(merged.get("max_runs_per_tenant")),
                  max_queued=_count(merged.get("max_queued_per_tenant", DEFAULT_MAX_QUEUED)),
                  default_ttl=merged.get("default_ttl"),
                  max_ttl=merged.get("max_ttl"), cascade=bool(merged.get("cascade")),
                  require_approval=bool(merged.get("require_approval")),
                  separate_approver=bool(merged.get("separate_approver")))


def _no_module(name: str, modules: Mapping[str, Module]) -> str:
    return f"no module {name} is served (served: {', '.join(sorted(modules)) or 'none'})"


def _not_allowed(key: str) -> str:
    allowed = ", ".join([*KEYWORDS, *STRUCTURE])
    if key == "format":
        return ("format is not allowed: JSON Schema treats it as a note, not a rule; use "
                "pattern")
    return f"{key} is not allowed: a policy only narrows a type, with {allowed}"
