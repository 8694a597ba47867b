"""Helpers for tests that drive a real tfserver process over real sockets."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_MODULES = Path(__file__).resolve().parent / "modules"


def require_tool(name: str) -> str:
    """The tool's path; a missing tool skips the test, or fails it under CI=true."""
    path = shutil.which(name)
    if path:
        return path
    reason = f"{name} is not installed"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI must exercise everything)")
    pytest.skip(reason)


@dataclass
class Response:
    """A finished HTTP exchange."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        for k, v in self.headers.items():
            if k.lower() == name.lower():
                return v
        return None


def request(
    url: str,
    method: str,
    path: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
    timeout: float = 60,
) -> Response:
    """One request on a new connection."""
    host_port = url.split("://", 1)[1]
    conn = http.client.HTTPConnection(host_port, timeout=timeout)
    try:
        hdrs = dict(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        return Response(resp.status, dict(resp.getheaders()), resp.read())
    finally:
        conn.close()


def terraform_shim(folder: Path) -> tuple[Path, Path]:
    """A terraform wrapper that logs each invocation's arguments; returns (shim, log)."""
    real = shutil.which("terraform")
    assert real, "terraform is needed"
    log = folder / "terraform-calls.log"
    shim = folder / "terraform-shim"
    shim.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\nexec "{real}" "$@"\n')
    shim.chmod(0o755)
    return shim, log


@dataclass
class ServerProcess:
    """A `python -m tfserver` child process with its log lines collected."""

    proc: subprocess.Popen[str]
    url: str = ""
    lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    def request(self, method: str, path: str, body: Any = None, **kw: Any) -> Response:
        return request(self.url, method, path, body, **kw)

    def log_text(self) -> str:
        return "\n".join(self.lines)

    def log_records(self) -> list[dict[str, Any]]:
        found = []
        for line in list(self.lines):
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))
        return found

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise


def start_server(
    tmp: Path,
    *,
    modules_dir: Path = TEST_MODULES,
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
    ready_timeout: float = 30,
    wait_modules: bool = True,
) -> ServerProcess:
    """Start tfserver on a free loopback port and wait until it serves."""
    state = tmp / "state"
    full_env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", str(tmp)),
        "TFSERVER_PORT": "0",
        "TFSERVER_STATE_DIR": str(state),
        "TFSERVER_MODULES_DIR": str(modules_dir),
        "TFSERVER_LOG_LEVEL": "DEBUG",
        "PYTHONUNBUFFERED": "1",
    }
    full_env.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "tfserver", *(args or [])],
        cwd=ROOT,
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server = ServerProcess(proc)
    found = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            server.lines.append(line.rstrip("\n"))
            if not found.is_set() and '"url": "' in line:
                server.url = json.loads(line)["url"]
                found.set()
        found.set()

    server._reader = threading.Thread(target=read, daemon=True)
    server._reader.start()
    if not found.wait(ready_timeout) or not server.url:
        proc.kill()
        raise AssertionError("tfserver did not start:\n" + server.log_text())
    if wait_modules:
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            r = server.request("GET", "/readyz")
            if r.status == 200:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("tfserver not ready: " + r.body.decode())
    return server
