"""`tfserver run METHOD URL [-d JSON | -d @file]`: start a run, watch it, answer with it.

The request goes out with `Prefer: respond-async` and a fresh `Idempotency-Key` (a retry
after a dropped connection never starts a second run). The run's events are followed as
NDJSON: on a terminal as one live line (resources done of planned, the current one,
elapsed), otherwise one line per event. A dropped stream is resumed after the last event
seen. Ctrl-C cancels the run, a second Ctrl-C forces it. The run's final record is printed
as JSON; the exit status is 0 when it succeeded, 1 when not, 2 for bad usage, and 3
(`EXIT_AWAITING`) when the run planned and now awaits an approval (`POST
/runs/{id}/approve`; the record printed shows its plan).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import ssl
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import urlsplit

from ..errors import ConfigError, TFServerError
from .token import TokenError, fetch_token, token_url_from

#: Reconnects of a dropped event stream before giving up.
MAX_RECONNECTS = 20
#: The exit status of a run that awaits an approval (the policy's `require_approval`).
EXIT_AWAITING = 3


class ClientError(TFServerError):
    """The server could not be reached or answered something unexpected."""


@dataclass
class Target:
    """Where the server is, and how to reach it."""

    scheme: str
    netloc: str
    path: str
    headers: dict[str, str]
    timeout: float

    @classmethod
    def parse(cls, url: str, token: str | None, timeout: float) -> Target:
        """The parts of an http(s) URL."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"the URL must be http(s)://host/path, not {url!r}")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {"Accept": "application/json", "User-Agent": "tfserver-run"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return cls(parts.scheme, parts.netloc, path, headers, timeout)

    def connect(self) -> http.client.HTTPConnection:
        """A new connection to the server."""
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.netloc, timeout=self.timeout,
                                               context=ssl.create_default_context())
        return http.client.HTTPConnection(self.netloc, timeout=self.timeout)

    def call(self, method: str, path: str, body: bytes | None = None,
             headers: Mapping[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
        """One request; (status, headers, JSON body or None)."""
        conn = self.connect()
        try:
            conn.request(method, path, body=body, headers={**self.headers, **(headers or {})})
            resp = conn.getresponse()
            data = resp.read()
            try:
                doc = json.loads(data) if data else None
            except ValueError:
                doc = {"body": data.decode("utf-8", "replace")[:2000]}
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, doc
        except (OSError, http.client.HTTPException) as e:
            raise ClientError(f"cannot reach {self.netloc}: {e}") from e
        finally:
            conn.close()

    def events(self, run_id: str, after: int) -> Iterator[dict[str, Any]]:
        """The run's events after `after`, as they come."""
        conn = self.connect()
        try:
            conn.request("GET", f"/runs/{run_id}/events?after={after}",
                         headers={**self.headers, "Accept": "application/x-ndjson"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise ClientError(f"the event stream answered {resp.status}")
            while line := resp.readline():
                if line.strip():
                    yield json.loads(line)
        finally:
            conn.close()


@dataclass
class Progress:
    """What the live line shows, from the events seen so far."""

    out: TextIO
    live: bool
    started: float = field(default_factory=time.monotonic)
    planned: int | None = None
    done: int = 0
    current: str = ""
    width: int = 0

    def show(self, event: dict[str, Any]) -> None:
        """Take one event into account and redraw (or print a line)."""
        kind = event.get("type")
        if kind == "planned":
            changes = event.get("changes") or {}
            self.planned = sum(int(changes.get(k, 0)) for k in ("add", "change", "remove"))
        elif kind == "resource":
            self.current = f"{event.get('address', '')} {event.get('action', '')}".strip()
            if event.get("phase") in ("done", "errored"):
                self.done += 1
        if not self.live:
            self.out.write(_plain(event) + "\n")
            self.out.flush()
            return
        if kind == "finished":
            self.clear()
            return
        total = "?" if self.planned is None else str(self.planned)
        line = (f"[{self.done}/{total}] {kind}: {self.current or '-'} "
                f"({time.monotonic() - self.started:.0f}s)")[:120]
        self.out.write("\r" + line.ljust(self.width))
        self.width = len(line)
        self.out.flush()

    def clear(self) -> None:
        """Remove the live line."""
        if self.live and self.width:
            self.out.write("\r" + " " * self.width + "\r")
            self.out.flush()
            self.width = 0


def _plain(event: dict[str, Any]) -> str:
    kind = str(event.get("type"))
    detail = {k: v for k, v in event.items() if k not in ("seq", "time", "type")}
    return f"{event.get('time', '')} {kind} {json.dumps(detail, separators=(',', ':'))}"


def _body(data: str | None) -> bytes | None:
    if data is None:
        return None
    if data == "@-":
        return sys.stdin.buffer.read()
    if data.startswith("@"):
        try:
            with open(data[1:], "rb") as f:
                return f.read()
        except OSError as e:
            raise ConfigError(f"cannot read {data[1:]}: {e.strerror}") from e
    return data.encode()


def _token(environ: Mapping[str, str]) -> str | None:
    token = environ.get("TFSERVER_TOKEN")
    if token:
        return token
    if environ.get("TFSERVER_CLIENT_ID") and environ.get("TFSERVER_CLIENT_SECRET"):
        return fetch_token(token_url_from(environ), environ["TFSERVER_CLIENT_ID"],
                           environ["TFSERVER_CLIENT_SECRET"],
                           scopes=environ.get("TFSERVER_TOKEN_SCOPES", "").split())
    return None


def watch(target: Target, run_id: str, progress: Progress) -> dict[str, Any]:
    """Follow the run to its end (Ctrl-C cancels, twice forces); its final record."""
    seq, cancels, reconnects = 0, 0, 0
    while True:
        try:
            for event in target.events(run_id, seq):
                seq = max(seq, int(event.get("seq", seq)))
                progress.show(event)
                if event.get("type") == "finished":
                    return _record(target, run_id)
                if event.get("type") == "awaiting_approval":  # still, or approved since
                    record = _record(target, run_id)
                    if record.get("status") == "awaiting_approval":
                        return record
            status, _, doc = target.call("GET", f"/runs/{run_id}")
            if status == 200 and doc.get("status") not in ("queued", "running"):
                return dict(doc)
        except KeyboardInterrupt:
            cancels += 1
            force = "?force=true" if cancels > 1 else ""
            progress.clear()
            print(f"tfserver run: {'forcing' if force else 'canceling'} run {run_id}",
                  file=sys.stderr)
            target.call("POST", f"/runs/{run_id}/cancel{force}")
            continue
        except (ClientError, OSError, http.client.HTTPException, ValueError):
            pass
        reconnects += 1
        if reconnects > MAX_RECONNECTS:
            raise ClientError("the event stream kept failing; the run goes on: "
                              f"GET /runs/{run_id}")
        time.sleep(min(5.0, 0.5 * reconnects))


def _record(target: Target, run_id: str) -> dict[str, Any]:
    status, _, doc = target.call("GET", f"/runs/{run_id}")
    if status != 200 or not isinstance(doc, dict):
        raise ClientError(f"GET /runs/{run_id} answered {status}")
    return doc


def main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    """`tfserver run`: see the module's docstring."""
    parser = argparse.ArgumentParser(
        prog="tfserver run",
        description="Start a run on a tfserver, follow its progress, print its record.",
        epilog="Token: TFSERVER_TOKEN, or TFSERVER_TOKEN_URL (or COGNITO_DOMAIN) with "
               "TFSERVER_CLIENT_ID and TFSERVER_CLIENT_SECRET. Exit status: 0 succeeded, "
               "1 failed or canceled, 2 bad usage, 3 awaiting approval.")
    parser.add_argument("method", type=str.upper,
                        choices=("POST", "PUT", "DELETE"), metavar="METHOD")
    parser.add_argument("url", help="e.g. https://tfserver.example.com/demo/staging")
    parser.add_argument("-d", "--data", help="the JSON body, @file, or @- for stdin")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds per network read (30)")
    args = parser.parse_args(list(argv))
    try:
        target = Target.parse(args.url, _token(environ), args.timeout)
        body = _body(args.data)
    except (ConfigError, TokenError) as e:
        print(f"tfserver run: error: {e.detail}", file=sys.stderr)
        return 2
    headers = {"Prefer": "respond-async", "Idempotency-Key": f"tfserver-run-{uuid.uuid4()}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    progress = Progress(sys.stderr, live=sys.stderr.isatty() and
                        os.environ.get("TERM", "") != "dumb")
    try:
        status, _, doc = target.call(args.method, target.path, body, headers)
        if status == 202 and isinstance(doc, dict) and doc.get("id"):
            doc = watch(target, str(doc["id"]), progress)
            ok = doc.get("status") == "succeeded"
            if doc.get("status") == "awaiting_approval":
                print(f"tfserver run: awaiting approval: POST /runs/{doc.get('id')}/approve "
                      "(or /reject)", file=sys.stderr)
                print(json.dumps(doc, indent=2))
                return EXIT_AWAITING
        else:
            ok = 200 <= status < 300
    except ClientError as e:
        progress.clear()
        print(f"tfserver run: error: {e.detail}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tfserver run: interrupted before the run was accepted", file=sys.stderr)
        return 1
    print(json.dumps(doc, indent=2))
    return 0 if ok else 1
