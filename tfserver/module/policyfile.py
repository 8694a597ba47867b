"""The policy file (TOML) read and checked: every fault is one line naming the key."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import ConfigError
from ..settings import parse_duration
from .discover import Module
from .limits import UNLIMITED, Scope, format_duration
from .policy import WEBHOOK_EVENTS, ModuleRules, Policy, TenantRules, Webhook, key_path
from .versions import is_version


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
            if key not in ("defaults", "modules", "tenants", "webhooks"):
                raise self.fault((key,), "unknown key (expected defaults, modules, tenants, "
                                         "webhooks)")
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
            drift_check, reconcile = self.schedule(body, keys)
            modules[name] = ModuleRules(limits, variables, drift_check, reconcile,
                                        default_version=self.default_version(
                                            body, (*keys, "default_version")))
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
        return Policy(self.path, defaults, modules, tenants,
                      self.webhooks(document.get("webhooks", [])))

    def default_version(self, body: dict[str, Any], keys: tuple[str | int, ...]) -> str | None:
        """A module's `default_version` (that the module has it is checked at narrowing)."""
        raw = body.get("default_version")
        if raw is not None and not (isinstance(raw, str) and is_version(raw)):
            raise self.fault(keys, "must be a semantic version such as 1.4.0, as a string")
        return raw

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
            elif key in _SWITCHES or key == "cascade":  # cascade: app/dependents.py
                if not isinstance(raw, bool):
                    raise self.fault(at, "must be true or false")
                found[key] = raw
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

    def schedule(self, body: dict[str, Any], keys: tuple[str | int, ...]
                 ) -> tuple[float | None, bool]:
        """A module's `drift_check` (seconds, at most `DRIFT_CHECK_MAX`; the least is
        TFSERVER_DRIFT_CHECK_MIN's, checked at start) and `reconcile`."""
        reconcile = body.get("reconcile", False)
        if not isinstance(reconcile, bool):
            raise self.fault((*keys, "reconcile"), "must be true or false")
        raw = body.get("drift_check")
        if raw is None:
            if reconcile:
                raise self.fault((*keys, "reconcile"), "needs drift_check (reconcile "
                                                       "applies what a scheduled check finds)")
            return None, False
        wanted = 'must be a duration such as "30m", "6h" or "1d"'
        if not isinstance(raw, str):
            raise self.fault((*keys, "drift_check"), wanted)
        try:
            seconds = parse_duration(raw)
        except ValueError:
            raise self.fault((*keys, "drift_check"), wanted) from None
        if not seconds > 0 or seconds > DRIFT_CHECK_MAX:
            raise self.fault((*keys, "drift_check"), f"must be longer than 0 and at most "
                                                     f"{format_duration(DRIFT_CHECK_MAX)}")
        return seconds, reconcile

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


    # -- [[webhooks]] ------------------------------------------------------------------

    def webhooks(self, value: Any) -> tuple[Webhook, ...]:
        """The `[[webhooks]]` tables; the secret's variable is read at start (notify/)."""
        if not isinstance(value, list):
            raise self.fault(("webhooks",), "must be an array of tables ([[webhooks]])")
        found: list[Webhook] = []
        for i, body in enumerate(value):
            keys: tuple[str | int, ...] = ("webhooks", i)
            table = self.table(body, keys, _WEBHOOK_KEYS)
            for key in _WEBHOOK_KEYS:
                if key not in table:
                    raise self.fault((*keys, key), "missing (a webhook needs url, secret, "
                                                   "events and tenants)")
            url = self.webhook_url(table["url"], (*keys, "url"))
            for j, other in enumerate(found):
                if other.url == url:
                    raise self.fault((*keys, "url"), f"repeats {key_path(('webhooks', j))}")
            found.append(Webhook(url, self.webhook_secret(table["secret"], (*keys, "secret")),
                                 self.webhook_events(table["events"], (*keys, "events")),
                                 self.webhook_tenants(table["tenants"], (*keys, "tenants")),
                                 key_path(keys)))
        return tuple(found)

    def webhook_url(self, raw: Any, keys: tuple[str | int, ...]) -> str:
        """An http(s) URL with a host and no credentials (whether `http` may be used is
        TFSERVER_WEBHOOK_ALLOW's, checked at start)."""
        if not isinstance(raw, str) or not raw.strip():
            raise self.fault(keys, "must be an https URL")
        try:
            parts = urlsplit(raw.strip())
            parts.port  # noqa: B018 (a bad port raises here)
        except ValueError:
            raise self.fault(keys, "is not a URL") from None
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise self.fault(keys, "must be an https URL")
        if parts.username is not None or parts.password is not None:
            raise self.fault(keys, "must not carry credentials (user:password@); the "
                                   "receiver checks the signature instead")
        if parts.fragment:
            raise self.fault(keys, "must not have a fragment (#...)")
        return raw.strip()

    def webhook_secret(self, raw: Any, keys: tuple[str | int, ...]) -> str:
        """The name of the environment variable of `secret = "env:NAME"`."""
        # Never repeat the value: it may be the secret itself, written in by mistake.
        if not isinstance(raw, str) or not raw.startswith("env:"):
            raise self.fault(keys, 'must be "env:NAME": the secret is read from the '
                                   "environment, never written in the file")
        name = raw.removeprefix("env:")
        if not _ENV_NAME.match(name):
            raise self.fault(keys, 'must be "env:NAME" with NAME an environment variable '
                                   "(letters, digits, _)")
        return name

    def webhook_events(self, raw: Any, keys: tuple[str | int, ...]) -> frozenset[str]:
        expected = ", ".join(WEBHOOK_EVENTS)
        if not isinstance(raw, list) or not raw:
            raise self.fault(keys, f"must be a non-empty array of events ({expected})")
        for i, event in enumerate(raw):
            if event not in WEBHOOK_EVENTS:
                raise self.fault((*keys, i), f"unknown event (expected {expected})")
            if event in raw[:i]:
                raise self.fault((*keys, i), f"repeats {key_path((keys[-1], raw.index(event)))}")
        return frozenset(raw)

    def webhook_tenants(self, raw: Any, keys: tuple[str | int, ...]) -> frozenset[str]:
        wanted = 'must be ["*"] (every tenant) or a non-empty array of tenant names or ' \
                 "client ids"
        if not isinstance(raw, list) or not raw:
            raise self.fault(keys, wanted)
        for i, name in enumerate(raw):
            if not isinstance(name, str) or not name.strip():
                raise self.fault((*keys, i), wanted)
            if name == "*" and len(raw) > 1:
                raise self.fault((*keys, i), '"*" already means every tenant: list it alone')
        return frozenset(raw)


_WEBHOOK_KEYS = ("url", "secret", "events", "tenants")


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


_COUNTS = ("max_instances_per_tenant", "max_runs_per_tenant", "max_queued_per_tenant")


_DURATIONS = ("default_ttl", "max_ttl")


#: Approvals (app/approvals.py), in every table but the webhooks'.
_SWITCHES = ("require_approval", "separate_approver")


#: The keys of each table of limits.
_DEFAULTS_KEYS = (*_COUNTS, *_DURATIONS, *_SWITCHES)


#: A module's table and a tenant's module table: the queued-run bound is tenant-wide.
_MODULE_COUNTS = ("max_instances_per_tenant", "max_runs_per_tenant")


_MODULE_KEYS = (*_MODULE_COUNTS, *_DURATIONS, *_SWITCHES, "variables", "drift_check",
                "reconcile", "cascade", "default_version")


#: The longest `drift_check`: a year (a longer one is a typo, not a schedule).
DRIFT_CHECK_MAX = 365 * 86400.0


_TENANT_KEYS = (*_COUNTS, *_SWITCHES, "modules")


_TENANT_MODULE_KEYS = (*_MODULE_COUNTS, *_SWITCHES)
