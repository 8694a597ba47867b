"""Who is calling: the `Principal` and the authenticators that produce it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

from .errors import Forbidden

#: Tenant key of callers when authentication is off.
LOCAL_TENANT = "local"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: its tenant and what it may do."""

    subject: str
    tenant: str
    scopes: frozenset[str] = frozenset()
    admin: bool = False
    #: When True every module may be read and written (authentication is off).
    all_modules: bool = False
    scope_prefix: str = "tfserver"

    @property
    def tenant_key(self) -> str:
        """The tenant's part of workspace names: fixed-length hex, so names cannot collide."""
        if self.tenant == LOCAL_TENANT and self.all_modules:
            return LOCAL_TENANT
        return hashlib.sha256(self.tenant.encode()).hexdigest()[:24]

    def can(self, module: str, access: str) -> bool:
        """True if the caller may `access` ("read" or "write") the module."""
        if self.admin or self.all_modules:
            return True
        wanted = {f"{self.scope_prefix}/{module}.{access}"}
        if access == "read":
            wanted.add(f"{self.scope_prefix}/{module}.write")
        return bool(self.scopes & wanted)

    def require(self, module: str, access: str) -> None:
        """Raise `Forbidden` (403 insufficient_scope) unless `can(module, access)`."""
        if not self.can(module, access):
            scope = f"{self.scope_prefix}/{module}.{access}"
            raise Forbidden(f"this token lacks the scope {scope}", scope=scope)

    def require_admin(self) -> None:
        """Raise `Forbidden` unless the caller has the admin scope."""
        if not self.admin:
            scope = f"{self.scope_prefix}/admin"
            raise Forbidden(f"this needs the scope {scope}", scope=scope)


class Authenticator(Protocol):
    """Turns a request's headers into a `Principal`, or raises `Unauthorized`."""

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller of a request with this `Authorization` header (None if absent)."""
        ...


class NoAuth:
    """Authentication off (loopback only): every caller is the local operator.

    The local operator may use every module but is not admin: sensitive outputs stay
    redacted, as they would for any caller without the admin scope.
    """

    def authenticate(self, authorization: str | None) -> Principal:
        """Always the local principal."""
        return Principal(subject="local", tenant=LOCAL_TENANT, all_modules=True)
