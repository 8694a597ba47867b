"""One POST of a webhook to a checked address: http.client, TLS verified against the URL's
host name, a deadline for the whole attempt, and no redirect followed (a 3xx is an answer
like any other that is not 2xx)."""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Protocol

from .. import __version__
from .targets import Endpoint

#: How much of an answer's body is read (it is only logged as its size).
MAX_ANSWER = 64 * 1024


@dataclass(frozen=True)
class Answer:
    """What the receiver answered."""

    status: int

    @property
    def ok(self) -> bool:
        """True for a 2xx: the delivery is done."""
        return 200 <= self.status < 300


class Transport(Protocol):
    """How an attempt is sent (`post`; tests pass a recorder)."""

    def __call__(self, target: Endpoint, body: bytes, headers: dict[str, str], *,
                 timeout: float, context: ssl.SSLContext) -> Answer:
        """POST `body` to the endpoint; raises OSError or http.client.HTTPException."""
        ...


class _Pinned(http.client.HTTPSConnection):
    """A connection to `address` that still speaks to `host`: its Host header, SNI and
    certificate check name the URL's host, never the address."""

    def __init__(self, target: Endpoint, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(target.host, target.port, timeout=timeout, context=context)
        self.target = target
        self.context = context

    def connect(self) -> None:
        """Connect to the checked address (no resolving here), then TLS for https."""
        sock = socket.create_connection((self.target.address, self.target.port),
                                        self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.target.scheme == "https":
            sock = self.context.wrap_socket(sock, server_hostname=self.target.host)
        self.sock = sock


def post(target: Endpoint, body: bytes, headers: dict[str, str], *, timeout: float,
         context: ssl.SSLContext) -> Answer:
    """POST `body` to the endpoint within `timeout` seconds in all.

    Raises OSError (refused, reset, timed out, TLS) or http.client.HTTPException (a bad
    answer).
    """
    conn = _Pinned(target, timeout, context)
    # A receiver dripping its answer a byte at a time would outlast a per-read timeout:
    # the watchdog ends the attempt at its deadline whatever the socket is doing.
    watchdog = threading.Timer(timeout, _cut, (conn,))
    watchdog.daemon = True
    watchdog.start()
    try:
        conn.request("POST", target.path, body=body, headers={
            **headers, "Content-Type": "application/json",
            "User-Agent": f"tfserver/{__version__} (webhooks)"})
        response = conn.getresponse()
        response.read(MAX_ANSWER)
        return Answer(response.status)
    finally:
        watchdog.cancel()
        conn.close()


def _cut(conn: http.client.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):  # closed already: the attempt ended on its own
            sock.shutdown(socket.SHUT_RDWR)


def default_context() -> ssl.SSLContext:
    """TLS with the system's CAs, host names checked, TLS 1.2 or later."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
