"""The one place terraform starts: `Terraform.run` starts the process, reads its `-json`
stream line by line as it comes (handing each event to the caller), and enforces a deadline:
SIGINT first (terraform then stops cleanly and releases its state lock), SIGKILL to the whole
process group only after a grace period. `RunControl` is the handle a caller stops it with."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .args import JSON_COMMANDS, build_env
from .output import STDERR_KEEP, EventSink, RunResult, parse_event

logger = logging.getLogger(__name__)


class RunControl:
    """A handle on one run's process, for a caller that may want to stop it.

    `interrupt` sends SIGINT (terraform stops at a safe point and releases its lock);
    `kill` sends SIGKILL to the whole process group. Either may come before the process
    has started: the runner then acts on it as soon as it starts. `reason` says who
    stopped the run first: "cancel" (a caller) or "shutdown" (the server).
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self.reason: str | None = None
        self.killed = False

    def attach(self, proc: subprocess.Popen[bytes]) -> None:
        """Called by the runner once the process runs."""
        with self._mutex:
            self._proc = proc
            reason, killed = self.reason, self.killed
        if killed:
            _kill_group(proc)
        elif reason is not None:
            _signal(proc, signal.SIGINT)

    def interrupt(self, reason: str) -> bool:
        """Ask terraform to stop (SIGINT); False if it was asked already."""
        with self._mutex:
            first = self.reason is None
            if first:
                self.reason = reason
            proc = self._proc
        if first and proc is not None:
            _signal(proc, signal.SIGINT)
        return first

    def kill(self, reason: str) -> None:
        """Kill terraform and everything it started (SIGKILL to the process group)."""
        with self._mutex:
            self.reason = self.reason or reason
            self.killed = True
            proc = self._proc
        if proc is not None:
            _kill_group(proc)


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _reaped(proc: subprocess.Popen[bytes], until: float) -> bool:
    """Wait for the process to exit until the monotonic time `until`; True if it did."""
    try:
        proc.wait(timeout=max(0.0, until - time.monotonic()))
    except subprocess.TimeoutExpired:
        return False
    return True


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # The group outlives its leader while any member lives (a provisioner's child, say),
    # and its id is not reused meanwhile: killing it after terraform exited is safe.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


class Runner(Protocol):
    """What the service needs of a terraform runner (tests pass a small fake)."""

    def run(self, args: Sequence[str], *, cwd: Path, workspace: str = "default",
            timeout: float, on_event: EventSink | None = None,
            control: RunControl | None = None,
            on_start: Callable[[], None] | None = None) -> RunResult:
        """Run `terraform <args>` in `cwd` and return what it did; `on_start` is called
        once the process runs."""
        ...

    def version(self, timeout: float = 30.0) -> str | None:
        """Terraform's version, or None when it cannot run."""
        ...

    def interrupt_all(self) -> int:
        """Interrupt every live run (the server is stopping); how many there were."""
        ...


@dataclass
class Terraform:
    """Runs terraform processes; tracks the live ones so a shutdown can interrupt them."""

    binary: str
    base_env: Mapping[str, str] = field(repr=False)
    cli_config_file: Path | None = None
    kill_grace: float = 10.0
    #: Address space each terraform process (and provider) may take; 0 for no cap.
    memory_limit: int = 0
    _live: dict[int, RunControl] = field(default_factory=dict, init=False, repr=False)
    _mutex: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _stopping: bool = field(default=False, init=False, repr=False)

    def run(
        self,
        args: Sequence[str],
        *,
        cwd: Path,
        workspace: str = "default",
        timeout: float,
        on_event: EventSink | None = None,
        control: RunControl | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> RunResult:
        """Run `terraform <args>` in `cwd`; on timeout interrupt it and mark the result.
        `on_start` is called once the process runs (work that can wait until then should:
        before, it delays terraform)."""
        argv = [self.binary, *args]
        env = build_env(self.base_env, workspace=workspace, cli_config_file=self.cli_config_file,
                        memory_limit=self.memory_limit)
        control = control or RunControl()
        started = time.monotonic()
        try:
            proc = self._start(argv, cwd, env)
        except OSError as e:
            logger.error("cannot start terraform %s: %s", self.binary, e.strerror)
            return RunResult(tuple(args), returncode=127, stderr=str(e.strerror),
                             duration=time.monotonic() - started)
        with self._mutex:
            self._live[proc.pid] = control
            stopping = self._stopping
        control.attach(proc)
        if stopping:
            control.interrupt("shutdown")
        output: _Output | None = None
        timed_out = waited = False
        try:
            output = _Output(proc, streamed=bool(args) and args[0] in JSON_COMMANDS,
                             on_event=on_event)
            if on_start is not None:
                on_start()
            timed_out = self._wait(proc, output, started + timeout)
            waited = True
        finally:
            self._end(proc, output, stopped=timed_out or control.reason is not None,
                      watched=waited)
        assert output is not None
        return RunResult(
            args=tuple(args),
            returncode=proc.returncode,
            events=tuple(output.events),
            stdout="".join(output.out),
            stderr="".join(output.err),
            duration=time.monotonic() - started,
            timed_out=timed_out,
            interrupted=control.reason == "shutdown",
            canceled=control.reason == "cancel",
            unreadable=output.unreadable,
        )

    def _end(self, proc: subprocess.Popen[bytes], output: _Output | None, *, stopped: bool,
             watched: bool) -> None:
        """After a run: forget it, leave nothing of it running, read and close its pipes."""
        with self._mutex:
            self._live.pop(proc.pid, None)
        if stopped or not watched:
            # A provisioner's child (a `sleep`) outlives terraform's SIGINT with parent 1;
            # nothing of a stopped run (or of one this failed to watch) may keep running.
            _kill_group(proc)
            if not watched:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=self.kill_grace)
        if output is None:
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        elif not output.close(self.kill_grace):
            # Something terraform started still holds its pipes: it goes too.
            _kill_group(proc)

    def _start(self, argv: list[str], cwd: Path, env: dict[str, str]
               ) -> subprocess.Popen[bytes]:
        """Start terraform in its own session, owner-only files, under the memory cap."""
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # Own process group: a Ctrl-C meant for the server does not hit terraform
            # mid-apply, and SIGKILL can take the providers down with it.
            start_new_session=True,
            # State, backups and plan files hold secrets in clear: owner only.
            umask=0o077,
        )
        if self.memory_limit:
            # Set at once after the exec: terraform reads its configuration before it
            # allocates much, and every provider it starts inherits the limit.
            with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
                resource.prlimit(proc.pid, resource.RLIMIT_AS,
                                 (self.memory_limit, self.memory_limit))
        return proc

    def _wait(self, proc: subprocess.Popen[bytes], output: _Output, deadline: float) -> bool:
        """Read terraform's output until it exits; past the deadline interrupt it, then
        kill its group. Returns True when the deadline passed.

        The selector wakes at once when terraform exits (its pidfd; without one, its
        stdout's end): `Popen.wait(timeout)` polls with sleeps that grow to 50 ms, which
        cost every run up to that much after terraform was done. Output is read while it
        winds down, too, so a full pipe never keeps it from stopping.
        """
        if output.pump(deadline) and _reaped(proc, deadline):
            return False
        _signal(proc, signal.SIGINT)
        grace = time.monotonic() + self.kill_grace
        if not (output.pump(grace) and _reaped(proc, grace)):
            logger.warning("terraform pid %d ignored SIGINT; killing it", proc.pid)
            _kill_group(proc)
            output.pump(time.monotonic() + self.kill_grace)
            proc.wait(timeout=self.kill_grace)
        return True

    def interrupt_all(self) -> int:
        """Send SIGINT to every live terraform (once); returns how many were running."""
        with self._mutex:
            self._stopping = True
            live = list(self._live.values())
        for control in live:
            control.interrupt("shutdown")
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


class _Output:
    """terraform's stdout and stderr, read as they come by the run's own thread through one
    selector: events from the `-json` stream (each handed to `on_event` at once) or text,
    and stderr's tail.

    No reader threads: starting two for every run cost about 0.4 ms before terraform could
    be waited on, and waking them as it ended more again. The process's exit is watched in
    the same selector (a pidfd): a child that keeps a pipe open, or output that follows the
    close of stdout, does not hide it.
    """

    def __init__(self, proc: subprocess.Popen[bytes], *, streamed: bool,
                 on_event: EventSink | None) -> None:
        self.pid = proc.pid
        self.streamed = streamed
        self.on_event = on_event
        self.events: list[dict[str, Any]] = []
        self.out: list[str] = []
        self.err: list[str] = []
        #: Lines of the stream that could not be read (never silently dropped).
        self.unreadable = 0
        self._err_kept = 0
        self.exited = False
        assert proc.stdout is not None and proc.stderr is not None
        self._stdout_fd, self._stderr_fd = proc.stdout.fileno(), proc.stderr.fileno()
        self._selector = selectors.DefaultSelector()
        #: The start of each stream's line still coming, in pieces (joined once whole: a
        #: long line, a big output's event, is not copied again for every piece).
        self._partial: dict[int, list[bytes]] = {}
        self._pending: dict[int, int] = {}
        for stream, on_line in ((proc.stdout, self._stdout_line),
                                (proc.stderr, self._stderr_line)):
            os.set_blocking(stream.fileno(), False)
            self._selector.register(stream, selectors.EVENT_READ, on_line)
            self._partial[stream.fileno()], self._pending[stream.fileno()] = [], 0
        self._pidfd: int | None = None
        with contextlib.suppress(OSError, AttributeError):  # Linux 5.3+; else stdout's end
            pidfd = os.pidfd_open(proc.pid)
            try:
                self._selector.register(pidfd, selectors.EVENT_READ, None)
            except OSError:
                os.close(pidfd)
                raise
            self._pidfd = pidfd

    def pump(self, until: float, *, both: bool = False) -> bool:
        """Read what comes until the process exits (with `both`: until both streams end)
        or the monotonic time `until` passes; True when it did."""
        while self._open(both):
            left = until - time.monotonic()
            if left <= 0:
                return False
            for key, _ in self._selector.select(left):
                self._read(key)
        return True

    def close(self, timeout: float) -> bool:
        """Read both streams to their end (they end once terraform and its children exit),
        waiting at most `timeout`, then close them; False if they were still open."""
        ended = self.pump(time.monotonic() + timeout, both=True)
        if not ended:
            logger.error("terraform pid %d: output still open after it ended", self.pid)
        for key in list(self._selector.get_map().values()):
            self._selector.unregister(key.fileobj)
            self._closed(key)
        self._selector.close()
        return ended

    def _open(self, both: bool) -> bool:
        streams = self._selector.get_map()
        if both:
            return self._stdout_fd in streams or self._stderr_fd in streams
        if self._pidfd is not None:
            return not self.exited
        return self._stdout_fd in streams

    def _closed(self, key: selectors.SelectorKey) -> None:
        if key.fd == self._pidfd:
            os.close(key.fd)
        else:
            key.fileobj.close()  # type: ignore[union-attr]

    def _read(self, key: selectors.SelectorKey) -> None:
        fd = key.fd
        if fd == self._pidfd:  # the process exited
            self.exited = True
            self._selector.unregister(fd)
            self._closed(key)
            return
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        on_line: Callable[[str], None] = key.data
        pieces = self._partial[fd]
        if not chunk:  # the end: the last line may lack its newline
            if pieces:
                on_line(_decoded(b"".join(pieces)))
            pieces.clear()
            self._selector.unregister(key.fileobj)
            self._closed(key)
            return
        if b"\n" not in chunk:
            pieces.append(chunk)
            self._pending[fd] += len(chunk)
            if fd == self._stderr_fd and self._pending[fd] > 2 * STDERR_KEEP:
                # A stderr line without end: only its tail is kept anyway.
                tail = b"".join(pieces)[-STDERR_KEEP:]
                pieces[:], self._pending[fd] = [tail], len(tail)
            return
        first, *lines, rest = chunk.split(b"\n")
        pieces.append(first)
        on_line(_decoded(b"".join(pieces) + b"\n"))
        for line in lines:
            on_line(_decoded(line + b"\n"))
        pieces[:] = [rest] if rest else []
        self._pending[fd] = len(rest)

    def _stdout_line(self, line: str) -> None:
        if not self.streamed:
            self.out.append(line)
            return
        event = parse_event(line)
        if event is None:
            if line.lstrip().startswith("{"):
                self.unreadable += 1
                logger.error("a line of terraform's -json stream cannot be read "
                             "(%d characters)", len(line))
            return
        self.events.append(event)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # a listener's bug must not stop the reading
                logger.exception("event listener failed")

    def _stderr_line(self, line: str) -> None:
        """Keep stderr's last STDERR_KEEP characters."""
        line = line[-STDERR_KEEP:]
        self.err.append(line)
        self._err_kept += len(line)
        while self._err_kept > STDERR_KEEP and len(self.err) > 1:
            self._err_kept -= len(self.err.pop(0))


def _decoded(line: bytes) -> str:
    """A line of terraform's output as text (as a text-mode pipe would read it)."""
    return line.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")


