"""The HTTP server: it owns the shared parts (config, the site routes use, certificates),
caps connections, runs each connection's TLS handshake in its thread, and counts the
requests in flight for a graceful stop.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Any

from ..app.service import Service
from ..auth import Authenticator
from ..config import Config
from ..settings import Network
from ..tls import Certificates
from .connections import HEALTH_HEAD_TIMEOUT, ConnectionLimits
from .handler import RequestHandler
from .openapi import ApiDescription, DocSettings
from .request import Site
from .streams import StreamLimits

__all__ = ["RequestHandler", "TFServer"]

logger = logging.getLogger(__name__)


class TFServer(ThreadingHTTPServer):
    """A threading HTTP server that knows its service and counts requests in flight."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(
        self,
        config: Config,
        service: Service,
        authenticator: Authenticator,
        certificates: Certificates | None = None,
    ) -> None:
        self.config = config
        self.service = service
        self.authenticator = authenticator
        #: What every route may use: the operations, authentication, the OpenAPI document.
        #: Each tenant's open event streams (a stream holds a connection for long).
        self.streams = StreamLimits(config.max_streams_per_tenant, config.stream_max)
        self.site = Site(service, authenticator, ApiDescription(DocSettings.from_config(config)),
                         auth=config.auth == "jwt", token_url=config.auth_settings.token_url,
                         serves_api=config.queue.serves_api,
                         streams=self.streams)
        self.certificates = certificates
        self.stopping = threading.Event()
        # One thread per connection: cap them, in all and per client address, so idle or
        # slow clients cannot pile up threads, and keep a few for health checks beyond
        # the cap (see connections.py).
        self.limits = ConnectionLimits(config.max_connections,
                                       config.max_connections_per_ip,
                                       config.health_connections)
        self._busy = 0
        self._busy_cond = threading.Condition()
        if ":" in config.host:
            self.address_family = socket.AF_INET6
        super().__init__((config.host, config.port), RequestHandler)

    def trusted(self, address: str) -> bool:
        """True for a peer in TFSERVER_TRUSTED_PROXIES (whose X-Forwarded-For is believed)."""
        return _in(address, self.config.trusted_proxies)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start the connection's thread, or close it at once when a cap is reached."""
        refused = self.limits.admit(client_address,
                                    per_address=not self.trusted(client_address[0]))
        if refused is not None:
            logger.warning("%s: closing a new connection from %s", refused,
                           client_address[0])
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.limits.release(client_address)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve the connection, then give its place back."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.limits.release(client_address)

    def health_only(self, peer: Any) -> bool:
        """True for a connection in a place kept for health checks."""
        return self.limits.health_only(peer)

    def give_back(self, peer: Any) -> None:
        """The connection's place is free before its thread ends (see `limits.release`)."""
        self.limits.release(peer)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Run the TLS handshake in the connection's own thread, with a deadline."""
        if self.certificates is not None:
            request.settimeout(min(self.config.read_timeout, HEALTH_HEAD_TIMEOUT)
                               if self.health_only(client_address) else self.config.read_timeout)
            try:
                # The context of the moment: a renewal applies to the next connection.
                request = self.certificates.context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as e:
                logger.info("TLS handshake with %s failed: %s", client_address[0],
                            getattr(e, "reason", None) or type(e).__name__)
                request.close()
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log unexpected connection errors as JSON, not as a bare traceback on stderr."""
        logger.exception("error on the connection from %s", client_address[0])

    def enter(self) -> None:
        """A request began."""
        with self._busy_cond:
            self._busy += 1

    def leave(self) -> None:
        """A request ended."""
        with self._busy_cond:
            self._busy -= 1
            self._busy_cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if `timeout` passed first."""
        end = time.monotonic() + timeout
        with self._busy_cond:
            while self._busy > 0:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._busy_cond.wait(left)
        return True

    @property
    def url(self) -> str:
        """The base URL the server answers on."""
        host, port = self.server_address[:2]
        scheme = "https" if self.certificates else "http"
        return f"{scheme}://{host!s}:{port}"


def _in(address: str, networks: tuple[Network, ...]) -> bool:
    """True when `address` falls in one of `networks` (False for anything unreadable)."""
    if not networks:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)
