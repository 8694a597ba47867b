"""An HTTP proxy on 127.0.0.1 in front of moto that loses the answer to chosen requests:
the request reaches moto and is carried out, then the caller's connection is closed with
no answer. An SDK then sends the request again, as it does after a connection reset in
the cloud: a terraform whose lock write was retried so finds its own lock held."""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

#: Which requests lose their answer: (method, path, headers, body) -> bool.
Choose = Callable[[str, str, dict[str, str], bytes], bool]


@dataclass
class LossyProxy:
    """A running proxy: `url` to use instead of moto's; `lost` counts lost answers."""

    server: ThreadingHTTPServer
    url: str
    choose: list[Choose] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    mutex: threading.Lock = field(default_factory=threading.Lock)

    def lose_once(self, choose: Choose) -> None:
        """Lose the answer to the next request `choose` picks (once)."""
        with self.mutex:
            self.choose.append(choose)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_lossy_proxy(upstream: str) -> LossyProxy:
    """A proxy forwarding every request to `upstream` (moto's URL)."""
    target = urlsplit(upstream)
    proxy: LossyProxy

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("connection", "keep-alive")}
            with proxy.mutex:
                picked = next((c for c in proxy.choose
                               if c(self.command, self.path, headers, body)), None)
                if picked is not None:
                    proxy.choose.remove(picked)
                    proxy.lost.append(f"{self.command} {self.path}")
            if picked is not None:
                # Sent on without the SDK's invocation id: moto's launcher answers a request
                # sent again with its first answer, and this one's second attempt must be
                # carried out (every other request keeps it, so an answer the client here
                # misses by itself is still given again).
                headers = {k: v for k, v in headers.items()
                           if k.lower() != "amz-sdk-invocation-id"}
            upstream_conn = http.client.HTTPConnection(target.hostname, target.port,
                                                       timeout=30)
            try:
                upstream_conn.request(self.command, self.path, body=body, headers=headers)
                answer = upstream_conn.getresponse()
                data = answer.read()
            finally:
                upstream_conn.close()
            if picked is not None:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)  # carried out, never answered
                return
            self.send_response_only(answer.status, answer.reason)
            for k, v in answer.getheaders():
                if k.lower() not in ("connection", "transfer-encoding", "content-length",
                                     "keep-alive"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def do_GET(self) -> None:
            self._forward()

        def do_PUT(self) -> None:
            self._forward()

        def do_POST(self) -> None:
            self._forward()

        def do_DELETE(self) -> None:
            self._forward()

        def do_HEAD(self) -> None:
            self._forward()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    proxy = LossyProxy(server, f"http://127.0.0.1:{server.server_address[1]}")
    return proxy
