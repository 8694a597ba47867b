"""Who is calling: the `Principal`, and the authenticators that make one from a request."""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .config import AuthSettings, Config
from .errors import Forbidden, Unauthorized, Unavailable
from .names import LOCAL_TENANT, tenant_key

# PyJWT (and the cryptography it loads, about 20 MB and 60 ms) is imported only where a
# token is checked: a server with authentication off never loads it.
if TYPE_CHECKING:
    from jwt import PyJWK, PyJWKSet

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: its tenant and what it may do."""

    subject: str
    tenant: str
    scopes: frozenset[str] = frozenset()
    #: The token's `client_id` claim (the audit log names it), if any.
    client_id: str | None = None
    admin: bool = False
    #: When True every module may be read and written (authentication is off).
    all_modules: bool = False
    scope_prefix: str = "tfserver"

    @property
    def tenant_key(self) -> str:
        """The tenant's part of workspace names: fixed-length hex, so names cannot collide."""
        if self.tenant == LOCAL_TENANT and self.all_modules:
            return LOCAL_TENANT
        return tenant_key(self.tenant)

    def can(self, module: str, access: str) -> bool:
        """True if the caller may `access` ("read", "write" or "approve") the module."""
        if self.admin or self.all_modules:
            return True
        wanted = {f"{self.scope_prefix}/{module}.{access}"}
        if access == "read":  # who writes or approves (app/approvals.py) reads too
            wanted |= {f"{self.scope_prefix}/{module}.write",
                       f"{self.scope_prefix}/{module}.approve"}
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


class KeySource:
    """Signing keys by `kid`, from a JWKS endpoint, with a cache that cannot be abused.

    - A known kid is served from memory; the set is refreshed in the background of a
      request only when it is older than `ttl`.
    - An unknown kid triggers a fetch at most once per `min_refresh` seconds, however many
      tokens with random kids arrive; a key Cognito rotates in is still found within that.
    - When the endpoint is down, the cached keys keep verifying; only a kid that no cached
      key matches gets 503.
    All network I/O happens in `fetch` (PyJWT's `PyJWKClient`, with its timeout).
    """

    def __init__(
        self,
        fetch: Callable[[], PyJWKSet],
        *,
        min_refresh: float = 60.0,
        ttl: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
        on_fetch: Callable[[str], None] | None = None,
    ) -> None:
        self._fetch = fetch
        #: Told "ok" or "error" after each fetch (metrics).
        self.on_fetch = on_fetch
        self.min_refresh = min_refresh
        self.ttl = ttl
        self._clock = clock
        self._keys: dict[str, PyJWK] = {}
        self._fetched_at: float | None = None
        self._next_fetch = 0.0
        self._fetch_lock = threading.Lock()
        self.fetches = 0

    @classmethod
    def from_url(cls, url: str, *, timeout: float, min_refresh: float, ttl: float,
                 ssl_context: ssl.SSLContext | None = None,
                 on_fetch: Callable[[str], None] | None = None) -> KeySource:
        """A key source that fetches from `url` with PyJWT's client (its cache off)."""
        from jwt import PyJWKClient

        client = PyJWKClient(url, cache_jwk_set=False, cache_keys=False, timeout=timeout,
                             ssl_context=ssl_context)
        return cls(lambda: client.get_jwk_set(refresh=True), min_refresh=min_refresh, ttl=ttl,
                   on_fetch=on_fetch)

    def get(self, kid: str) -> PyJWK:
        """The key with this id; raises Unauthorized (unknown) or Unavailable (no JWKS)."""
        key = self._keys.get(kid)
        now = self._clock()
        fresh = self._fetched_at is not None and now - self._fetched_at < self.ttl
        if key is not None and fresh:
            return key
        if now >= self._next_fetch:
            self._refresh()
            key = self._keys.get(kid) or key
        if key is not None:
            return key
        if self._fetched_at is None:
            raise Unavailable("the token signing keys (JWKS) cannot be fetched", retry_after=5)
        raise Unauthorized("the token is signed with an unknown key")

    def _refresh(self) -> None:
        import jwt

        # One fetch at a time; callers that arrive meanwhile wait for its result.
        with self._fetch_lock:
            now = self._clock()
            if now < self._next_fetch:
                return
            self.fetches += 1
            try:
                jwk_set = self._fetch()
            except jwt.PyJWTError as e:
                # Retry a failed fetch sooner than a successful one, but still bounded.
                self._next_fetch = now + min(5.0, self.min_refresh)
                logger.warning("JWKS fetch failed: %s", type(e).__name__)
                if self.on_fetch is not None:
                    self.on_fetch("error")
                return
            if self.on_fetch is not None:
                self.on_fetch("ok")
            self._keys = {k.key_id: k for k in jwk_set.keys
                          if k.key_id and k.public_key_use in (None, "sig")}
            self._fetched_at = now
            self._next_fetch = now + self.min_refresh


class JWTAuth:
    """Cognito access tokens: RS256 signature by a key of the pool's JWKS, and claims.

    The algorithm list comes from configuration, never from the token; `exp`, `iat`,
    `iss` and `token_use == "access"` are required, `nbf` is honoured, `client_id` must
    be allowed when an allow-list is set. Tokens are only read from the header.
    """

    def __init__(self, settings: AuthSettings, keys: KeySource,
                 algorithms: tuple[str, ...] = ("RS256",)) -> None:
        self.settings = settings
        self.keys = keys
        self.algorithms = list(algorithms)
        self.admin_scopes = {f"{settings.scope_prefix}/admin", *settings.admin_scopes}

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of a valid bearer token; raises Unauthorized or Unavailable."""
        import jwt

        if not authorization:
            raise Unauthorized("this needs a bearer token in the Authorization header",
                               error=None)
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            raise Unauthorized("use 'Authorization: Bearer <token>'", error="invalid_request")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("the token is malformed") from None
        if header.get("alg") not in self.algorithms:
            raise Unauthorized("the token's algorithm is not accepted")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthorized("the token names no signing key")
        key = self.keys.get(kid)
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=self.algorithms,
                issuer=self.settings.issuer,
                leeway=self.settings.leeway,
                options={"require": ["exp", "iat", "iss", "token_use"], "verify_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("the token is not valid yet") from None
        except jwt.InvalidIssuerError:
            raise Unauthorized("the token is from another issuer") from None
        except jwt.MissingRequiredClaimError as e:
            raise Unauthorized(f"the token lacks the {e.claim} claim") from None
        except jwt.PyJWTError:
            raise Unauthorized("the token's signature or claims are invalid") from None
        if claims.get("token_use") != "access":
            raise Unauthorized("this needs an access token, not an id token")
        client_id = claims.get("client_id")
        allowed = self.settings.client_ids
        if allowed and client_id not in allowed:
            raise Unauthorized("the token's client is not allowed here")
        subject = str(claims.get("sub") or client_id or "")
        tenant = str(client_id or claims.get("sub") or "")
        if not tenant:
            raise Unauthorized("the token names neither a client nor a subject")
        scopes = frozenset(str(claims.get("scope") or "").split())
        return Principal(
            subject=subject,
            tenant=tenant,
            client_id=str(client_id) if client_id else None,
            scopes=scopes,
            admin=bool(scopes & self.admin_scopes),
            scope_prefix=self.settings.scope_prefix,
        )


def make_authenticator(config: Config,
                       on_fetch: Callable[[str], None] | None = None) -> Authenticator:
    """The authenticator the configuration asks for (`on_fetch` hears of JWKS fetches)."""
    if config.auth == "none":
        return NoAuth()
    s = config.auth_settings
    keys = KeySource.from_url(s.jwk_url, timeout=s.jwks_timeout, min_refresh=s.jwks_min_refresh,
                              ttl=s.jwks_cache_ttl, on_fetch=on_fetch)
    return JWTAuth(s, keys)
