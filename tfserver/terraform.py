"""The one place that runs terraform.

`build_args` makes argument lists (pure, table-tested); `Terraform.run` starts the process
with an allowlisted environment, reads the `-json` event stream, and enforces a deadline:
SIGINT first (terraform then stops cleanly and releases its state lock), SIGKILL to the
whole process group only after a grace period.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Commands that take `-json` and report through the event stream.
JSON_COMMANDS = frozenset({"apply", "plan", "destroy"})


@dataclass(frozen=True)
class Diagnostic:
    """One error or warning terraform reported."""

    severity: str
    summary: str
    detail: str = ""
    address: str = ""


@dataclass(frozen=True)
class RunResult:
    """What one terraform process did; see `ok`. Any non-zero exit is a failure."""

    args: tuple[str, ...]
    returncode: int
    events: tuple[dict[str, Any], ...] = ()
    stdout: str = ""
    stderr: str = ""
    duration: float = 0.0
    timed_out: bool = False
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        """True when terraform exited 0 within its deadline."""
        return self.returncode == 0 and not self.timed_out and not self.interrupted

    @property
    def diagnostics(self) -> list[Diagnostic]:
        """The diagnostics of the `-json` stream, errors first."""
        found = []
        for event in self.events:
            if event.get("type") != "diagnostic":
                continue
            d = event.get("diagnostic") or {}
            found.append(
                Diagnostic(
                    severity=str(d.get("severity", "error")),
                    summary=str(d.get("summary", "")),
                    detail=str(d.get("detail", "")),
                    address=str(d.get("address", "")),
                )
            )
        return sorted(found, key=lambda d: d.severity != "error")

    @property
    def errors(self) -> list[Diagnostic]:
        """Only the diagnostics of severity error."""
        return [d for d in self.diagnostics if d.severity == "error"]

    @property
    def outputs(self) -> dict[str, dict[str, Any]] | None:
        """The `outputs` event: name to {sensitive, type, value (absent if sensitive)}."""
        for event in reversed(self.events):
            if event.get("type") == "outputs":
                outputs = event.get("outputs")
                return dict(outputs) if isinstance(outputs, dict) else {}
        return None

    @property
    def changes(self) -> dict[str, int]:
        """Resources added, changed and removed (from the `change_summary` event)."""
        for event in reversed(self.events):
            if event.get("type") == "change_summary":
                c = event.get("changes") or {}
                return {k: int(c.get(k, 0)) for k in ("add", "change", "remove")}
        return {"add": 0, "change": 0, "remove": 0}

    @property
    def planned(self) -> list[dict[str, str]]:
        """The planned changes: resource address and action."""
        found = []
        for event in self.events:
            if event.get("type") == "planned_change":
                change = event.get("change") or {}
                resource = change.get("resource") or {}
                found.append({"address": str(resource.get("addr", "")),
                              "action": str(change.get("action", ""))})
        return found

    @property
    def apply_started(self) -> bool:
        """True once terraform began changing real resources (plan time is over)."""
        return any(e.get("type") in ("apply_start", "apply_errored") for e in self.events)


def build_args(
    command: str,
    *,
    var_file: Path | None = None,
    lock_timeout: float | None = None,
    destroy: bool = False,
    backend_config: Sequence[tuple[str, str]] = (),
    extra: Sequence[str] = (),
) -> list[str]:
    """The argument list for one terraform command (without the binary).

    Always non-interactive and colourless; `-json` where the command streams events.
    """
    words = command.split()
    args = list(words)
    verb = words[0]
    if verb in ("apply", "destroy"):
        args += ["-json", "-auto-approve"]
    elif verb == "plan":
        args += ["-json"]
        if destroy:
            args.append("-destroy")
    if verb in ("apply", "destroy", "plan", "init"):
        args.append("-input=false")
    args.append("-no-color")
    takes_lock = verb in ("apply", "destroy", "plan") or words[:2] in (
        ["workspace", "new"],
        ["workspace", "delete"],
    )
    if lock_timeout is not None and takes_lock:
        args.append(f"-lock-timeout={max(0, int(lock_timeout))}s")
    if var_file is not None:
        args.append(f"-var-file={var_file}")
    if verb == "init":
        args += [f"-backend-config={k}={v}" for k, v in backend_config]
    if verb == "force-unlock":
        args.append("-force")
    args += list(extra)
    return args


def build_env(
    base: Mapping[str, str], *, workspace: str, cli_config_file: Path | None
) -> dict[str, str]:
    """The whole environment of a terraform process: the allowlist plus terraform's own."""
    env = dict(base)
    env["TF_IN_AUTOMATION"] = "1"
    env["TF_INPUT"] = "0"
    env["CHECKPOINT_DISABLE"] = "1"  # no version check calls to HashiCorp on every run
    env["TF_WORKSPACE"] = workspace
    if cli_config_file is not None:
        env["TF_CLI_CONFIG_FILE"] = str(cli_config_file)
    return env


@dataclass
class _Live:
    proc: subprocess.Popen[str]
    interrupted: bool = False


@dataclass
class Terraform:
    """Runs terraform processes; tracks the live ones so a shutdown can interrupt them."""

    binary: str
    base_env: Mapping[str, str] = field(repr=False)
    cli_config_file: Path | None = None
    kill_grace: float = 10.0
    _live: dict[int, _Live] = field(default_factory=dict, init=False, repr=False)
    _mutex: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def run(
        self,
        args: Sequence[str],
        *,
        cwd: Path,
        workspace: str = "default",
        timeout: float,
    ) -> RunResult:
        """Run `terraform <args>` in `cwd`; on timeout interrupt it and mark the result."""
        argv = [self.binary, *args]
        env = build_env(self.base_env, workspace=workspace, cli_config_file=self.cli_config_file)
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                encoding="utf-8",
                errors="replace",
                # Own process group: a Ctrl-C meant for the server does not hit terraform
                # mid-apply, and SIGKILL can take the providers down with it.
                start_new_session=True,
            )
        except OSError as e:
            logger.error("cannot start terraform %s: %s", self.binary, e.strerror)
            return RunResult(tuple(args), returncode=127, stderr=str(e.strerror),
                             duration=time.monotonic() - started)
        live = _Live(proc)
        with self._mutex:
            self._live[proc.pid] = live
        timed_out = False
        try:
            try:
                stdout, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                stdout, stderr = self._stop(proc)
        finally:
            with self._mutex:
                self._live.pop(proc.pid, None)
        events = tuple(_events(stdout)) if args and args[0] in JSON_COMMANDS else ()
        return RunResult(
            args=tuple(args),
            returncode=proc.returncode,
            events=events,
            stdout=stdout,
            stderr=stderr,
            duration=time.monotonic() - started,
            timed_out=timed_out,
            interrupted=live.interrupted,
        )

    def _stop(self, proc: subprocess.Popen[str]) -> tuple[str, str]:
        """SIGINT, wait the grace period, then SIGKILL the process group."""
        try:
            proc.send_signal(signal.SIGINT)
            return proc.communicate(timeout=self.kill_grace)
        except subprocess.TimeoutExpired:
            logger.warning("terraform pid %d ignored SIGINT; killing it", proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            try:
                return proc.communicate(timeout=self.kill_grace)
            except subprocess.TimeoutExpired:
                # A process outside the group still holds the pipes: stop reading them.
                logger.error("terraform pid %d: output pipes still open after SIGKILL", proc.pid)
                proc.wait(timeout=self.kill_grace)
                return "", ""

    def interrupt_all(self) -> int:
        """Send SIGINT to every live terraform (once); returns how many were running."""
        with self._mutex:
            live = list(self._live.values())
        for item in live:
            if not item.interrupted and item.proc.poll() is None:
                item.interrupted = True
                with contextlib.suppress(ProcessLookupError):
                    item.proc.send_signal(signal.SIGINT)
        return len(live)

    def running(self) -> int:
        """How many terraform processes are running now."""
        with self._mutex:
            return len(self._live)

    def version(self, timeout: float = 30.0) -> str | None:
        """Terraform's version, or None when the binary cannot run."""
        result = self.run(["version", "-json"], cwd=Path.cwd(), timeout=timeout)
        if not result.ok:
            return None
        try:
            return str(json.loads(result.stdout).get("terraform_version"))
        except (ValueError, AttributeError):
            return None


def _events(stdout: str) -> list[dict[str, Any]]:
    found = []
    for line in stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            found.append(event)
    return found


def cli_config_text(plugin_cache_dir: Path, provider_mirror: Path | None) -> str:
    """A terraform CLI config: a shared plugin cache, and an offline provider mirror if set."""
    lines = [f"plugin_cache_dir = {json.dumps(str(plugin_cache_dir))}"]
    if provider_mirror is not None:
        lines += [
            "provider_installation {",
            "  filesystem_mirror {",
            f"    path = {json.dumps(str(provider_mirror))}",
            "  }",
            "}",
        ]
    return "\n".join(lines) + "\n"
