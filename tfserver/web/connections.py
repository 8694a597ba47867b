"""What one client may hold: connections per address and in all, and how long a request
may take to arrive.

One thread serves each connection, so slow or idle clients cost threads. A cap on all
connections bounds the threads; a cap per client address keeps one address from taking
every place (0 turns it off, for a server behind a proxy whose address every client
shares); a deadline for the whole request head and body keeps a client that trickles a
byte every few seconds from holding its place forever (the socket's read timeout alone
limits each read, not the request). A few places beyond the cap are kept for health
checks (see `ConnectionLimits`).
"""

from __future__ import annotations

import io
import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from typing import Any


class ConnectionLimits:
    """Counts open connections, in all and per client address, and the few kept for
    health checks beyond the cap (`health`).

    Why a reserve, and not a cap on streams below the connection cap: streams are not
    the only holders of connections. Idle keep-alive connections and slow clients fill
    them too, and behind a proxy (no per-address cap) nothing tells one tenant's from
    the platform's. Only places that nothing but a health check may use keep `/healthz`
    and `/readyz` answering when every ordinary place is taken, whoever holds them. A
    connection given a reserved place is served like any other, but answers 503 to any
    other request, is closed after each answer, and must send its request soon
    (`HEALTH_HEAD_TIMEOUT`), so a client that takes those places too gives them back
    quickly.
    """

    def __init__(self, total: int, per_address: int, health: int = 0) -> None:
        self.total = total
        self.per_address = per_address
        self.health = health
        self._mutex = threading.Lock()
        self._by_address: dict[str, int] = {}
        #: The peers (address, port...) of the connections in a reserved place.
        self._health_only: set[tuple[Any, ...]] = set()
        #: The peers of every open connection (their count is the connections open; a
        #: place is given back once).
        self._peers: set[tuple[Any, ...]] = set()

    def admit(self, peer: tuple[Any, ...], *, per_address: bool = True) -> str | None:
        """Count a new connection from `peer` (address, port...) and return None; or
        return why it is refused. Past the cap, a connection takes a reserved place if
        one is free (`health_only` says so). A trusted proxy's address (`per_address`
        False) is not held to the per-address cap."""
        address = str(peer[0])
        with self._mutex:
            held = self._by_address.get(address, 0)
            if per_address and self.per_address and held >= self.per_address:
                return f"limit of {self.per_address} connections per address reached"
            if len(self._peers) - len(self._health_only) >= self.total:
                if len(self._health_only) >= self.health:
                    return (f"connection limit ({self.total}, and {self.health} kept for "
                            "health checks) reached")
                self._health_only.add(peer)
            self._peers.add(peer)
            self._by_address[address] = held + 1
            return None

    def health_only(self, peer: tuple[Any, ...]) -> bool:
        """True for a connection admitted to a place kept for health checks."""
        with self._mutex:
            return peer in self._health_only

    def release(self, peer: tuple[Any, ...]) -> None:
        """A connection admitted for `peer` closed, or is about to (its place is given
        back once, whoever calls first)."""
        address = str(peer[0])
        with self._mutex:
            if peer not in self._peers:
                return
            self._peers.remove(peer)
            self._health_only.discard(peer)
            left = self._by_address.get(address, 1) - 1
            if left:
                self._by_address[address] = left
            else:
                self._by_address.pop(address, None)

    def open(self) -> int:
        """Connections open now."""
        with self._mutex:
            return len(self._peers)


#: How soon a connection in a place kept for health checks must send its request.
HEALTH_HEAD_TIMEOUT = 5.0
#: The only paths a connection in a place kept for health checks is served.
HEALTH_PATHS = frozenset({"/healthz", "/readyz"})


#: How much shorter than asked a socket's timeout may be left: setting it is a system call
#: (and so a handoff of the GIL to another thread) on every read of every request, when
#: the timeout asked for shrinks by microseconds from one read to the next.
SLACK = 0.05


class DeadlineReader(io.RawIOBase):
    """A socket's reads under a deadline for the whole request, not only for each read.

    `arm(seconds)` sets the deadline for the reads to come (None: only the per-read
    timeout); a read past it raises TimeoutError, like a socket timeout.

    The socket's own timeout is changed only when it is outside `SLACK` of the time a
    read may take: under 32 busy keep-alive connections, the two changes a request made
    were a fifth of a `/healthz`. A socket timeout left a little short ends a read early;
    the read then goes on for exactly the time left, so no limit is shortened.
    """

    def __init__(self, sock: socket.socket, read_timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.sock = sock
        self.read_timeout = read_timeout
        self.clock = clock
        self.deadline: float | None = None
        self._timeout = sock.gettimeout()

    def arm(self, seconds: float | None) -> None:
        """Reads from now on must be done within `seconds` (None: no deadline)."""
        self.deadline = None if seconds is None else self.clock() + seconds
        if seconds is None:
            self.for_writes()

    def for_writes(self) -> None:
        """The socket's timeout back to (about) the read timeout: writes wait that long."""
        self._within(self.read_timeout)

    def readable(self) -> bool:
        """Always."""
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        """Read what the socket has, waiting at most until the deadline."""
        limit = self.read_timeout
        if self.deadline is not None:
            left = self.deadline - self.clock()
            if left <= 0:
                raise TimeoutError("the request took too long to arrive")
            limit = min(limit, left)
        started = self.clock()
        self._within(limit)
        while True:
            try:
                return self.sock.recv_into(buffer)
            except TimeoutError:
                left = limit - (self.clock() - started)
                if left <= 0:
                    raise
                self._set(left)  # ended early by the slack: the rest, exactly

    def _within(self, seconds: float) -> None:
        """A socket timeout of at most `seconds` and at least `seconds - SLACK`."""
        current = self._timeout
        if current is None or not seconds - SLACK <= current <= seconds:
            self._set(seconds - SLACK / 2 if seconds > SLACK else seconds)

    def _set(self, seconds: float) -> None:
        self.sock.settimeout(seconds)
        self._timeout = seconds


def client_address(peer: str, forwarded: list[str], trusted: Callable[[str], bool]) -> str:
    """The client's address: the peer's, or when the peer is a trusted proxy, the last
    address of `X-Forwarded-For` (its header values, in order) that is not a trusted proxy
    itself. A header that is not a list of addresses is not believed."""
    if not trusted(peer):
        return peer
    hops = [hop.strip() for value in forwarded for hop in value.split(",")]
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return peer
        if not trusted(hop):
            return hop
    return peer
