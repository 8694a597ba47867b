"""Where a webhook may go: `https` to public addresses, and whatever TFSERVER_WEBHOOK_ALLOW
names besides (loopback, private networks, plain `http`).

A target's host is resolved at every attempt and each address checked, so a name that
starts resolving to an internal address is refused at the next attempt; the request is
then sent to the checked address itself (see `transport.py`), so a DNS answer that changes
between the check and the connection (rebinding) cannot redirect it.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import ConfigError, TFServerError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: `socket.getaddrinfo`'s shape, injected so tests can answer for a name.
Resolve = Callable[[str, int], Sequence[tuple[object, ...]]]

#: Cloud metadata services: instance credentials live behind them.
METADATA = (ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"))


class TargetRefused(TFServerError):
    """A target's address is one webhooks may not reach (never retried)."""


class Unresolved(TFServerError):
    """A target's host name did not resolve (retried: DNS may come back)."""


@dataclass(frozen=True)
class AllowList:
    """TFSERVER_WEBHOOK_ALLOW: host names, and networks, allowed besides public ones."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, words: Iterable[str]) -> AllowList:
        """From the setting's words (checked by settings.py: names, addresses, CIDRs)."""
        hosts: set[str] = set()
        networks: list[Network] = []
        for word in words:
            try:
                networks.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                hosts.add(word.lower().rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def names(self, host: str) -> bool:
        """True when the list names `host` itself (a name, or a literal address)."""
        host = host.lower().rstrip(".")
        if host in self.hosts:
            return True
        try:
            return self.covers(ipaddress.ip_address(host))
        except ValueError:
            return False

    def covers(self, address: Address) -> bool:
        """True when one of the listed networks holds `address`."""
        return any(address in net for net in self.networks if net.version == address.version)


def why_refused(address: Address) -> str | None:
    """Why webhooks may not reach `address` unless allowed, or None for a public one."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return why_refused(address.ipv4_mapped)
    if address in METADATA:
        return "a cloud metadata address"
    for what, flag in (("a loopback", address.is_loopback),
                       ("an unspecified", address.is_unspecified),
                       ("a link-local", address.is_link_local),
                       ("a multicast", address.is_multicast),
                       ("a private", address.is_private),
                       ("a reserved", address.is_reserved)):
        if flag:
            return f"{what} address"
    if not address.is_global:
        return "not a public address"
    return None


def check_url(url: str, allow: AllowList, where: str) -> None:
    """At start: `https`, or `http` to a host the allow list names; else ConfigError
    naming the policy key `where`."""
    parts = urlsplit(url)
    if parts.scheme == "http" and not allow.names(parts.hostname or ""):
        raise ConfigError(f"{where}.url: must be an https URL (http only to a host "
                          "TFSERVER_WEBHOOK_ALLOW names)")


@dataclass(frozen=True)
class Endpoint:
    """Where one attempt connects: the URL's parts and the checked address."""

    scheme: str
    host: str
    port: int
    path: str
    address: str


def origin(url: str) -> str:
    """`scheme://host:port` of a URL: how logs name a target (a path can hold a token)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{parts.hostname}:{port}"


def endpoint(url: str, allow: AllowList, resolve: Resolve) -> Endpoint:
    """The URL's host resolved now and its first allowed address.

    Raises TargetRefused when no address may be reached, Unresolved when the name does
    not resolve.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if parts.scheme != "https" and not allow.names(host):
        raise TargetRefused("plain http to a host TFSERVER_WEBHOOK_ALLOW does not name")
    try:
        answers = resolve(host, port)
    except (OSError, UnicodeError) as e:
        raise Unresolved(f"{host} does not resolve ({e})") from e
    named = allow.names(host)
    reasons = []
    for answer in answers:
        sockaddr = answer[4]
        assert isinstance(sockaddr, tuple)
        try:
            address = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
        except ValueError:
            continue
        reason = why_refused(address)
        if reason is None or named or allow.covers(address):
            return Endpoint(parts.scheme, host, port, path, str(address))
        reasons.append(f"{address} is {reason}")
    if not reasons:
        raise Unresolved(f"{host} has no address")
    raise TargetRefused(f"{reasons[0]} (TFSERVER_WEBHOOK_ALLOW does not name it)")


def getaddrinfo(host: str, port: int) -> Sequence[tuple[object, ...]]:
    """The system resolver's TCP addresses of `host`."""
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
