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
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .affinity import Affinity
from .args import JSON_COMMANDS, build_env
from .follow import Output, Spool
from .output import EventSink, RunResult, last_event
from .wake import Wake, Wakes

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
        self._on_start: list[Callable[[], None]] | None = []
        self.reason: str | None = None
        self.killed = False

    def attach(self, proc: subprocess.Popen[bytes]) -> None:
        """Called by the runner once the process runs."""
        with self._mutex:
            self._proc = proc
            reason, killed = self.reason, self.killed
            waiting, self._on_start = self._on_start or [], None
        if killed:
            _kill_group(proc)
        elif reason is not None:
            _signal(proc, signal.SIGINT)
        for fn in waiting:
            try:
                fn()
            except Exception:  # terraform runs: it must be watched whatever this did
                logger.exception("work waiting for terraform's start failed")

    def when_started(self, fn: Callable[[], None]) -> None:
        """Call `fn` once, as the first process of this handle runs (at once if one has).
        Work that must follow terraform's start goes here: done before, it delays it."""
        with self._mutex:
            waiting = self._on_start
            if waiting is not None:
                waiting.append(fn)
        if waiting is None:
            fn()

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


def time_left(deadline: float) -> float:
    """The seconds before the monotonic `deadline`, as a run's timeout: at least 0.1 (a
    runner's timeout must be positive; a run past its deadline is interrupted at once)."""
    return max(0.1, deadline - time.monotonic())


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


def _group_gone(proc: subprocess.Popen[bytes], until: float) -> bool:
    """Wait until no process of terraform's group runs, until the monotonic time `until`;
    True if none does."""
    pause = 0.01
    while True:
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return True
        if not _group_runs(proc.pid):
            return True
        if time.monotonic() >= until:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.2)  # a scan of /proc reads every process: a few ms


def _group_runs(group: int) -> bool:
    """Whether a process of `group` runs (True where /proc cannot tell). A zombie does
    not: an orphan of the group is one for good under a PID 1 that never reaps (tfserver
    itself, in a container started without an init)."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return True
    for name in names:
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as stat:
                    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parens.
                    state, _, pgrp = stat.read().rpartition(b")")[2].split()[:3]
                    member = int(pgrp) == group
            except (OSError, ValueError):
                continue  # gone meanwhile
            if member and state != b"Z":
                return True
    return False


class Runner(Protocol):
    """What the service needs of a terraform runner (tests pass a small fake)."""

    def run(self, args: Sequence[str], *, cwd: Path, workspace: str = "default",
            timeout: float, on_event: EventSink | None = None,
            control: RunControl | None = None,
            on_start: Callable[[], None] | None = None,
            label: str | None = None) -> RunResult:
        """Run `terraform <args>` in `cwd` and return what it did; `on_start` is called
        once the process runs; `label` (a run id) names its output files."""
        ...

    def version(self, timeout: float = 30.0) -> str | None:
        """Terraform's version, or None when it cannot run."""
        ...

    def interrupt_all(self) -> int:
        """Interrupt every live run (the server is stopping); how many there were."""
        ...

    def close(self) -> None:
        """Await what is still ending (the server stops)."""
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
    #: Where terraform's output files are written while it runs (see `Spool`); a private
    #: temporary folder when None.
    spool_dir: Path | None = None
    #: The CPUs terraform starts with: all the server's, even when its threads keep to one.
    affinity: Affinity = field(default_factory=Affinity)
    #: What wakes a run's reader as terraform writes (wake.py).
    wakes: Wakes = field(default_factory=Wakes, repr=False)
    _live: dict[int, RunControl] = field(default_factory=dict, init=False, repr=False)
    _exits: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)
    _closed: bool = field(default=False, init=False, repr=False)
    _mutex: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _stopping: bool = field(default=False, init=False, repr=False)

    def run(self, args: Sequence[str], *, cwd: Path, workspace: str = "default",
            timeout: float, on_event: EventSink | None = None,
            control: RunControl | None = None, on_start: Callable[[], None] | None = None,
            label: str | None = None) -> RunResult:
        """Run `terraform <args>` in `cwd`; on timeout interrupt it and mark the result.
        `on_start` is called once the process runs (work that can wait until then should:
        before, it delays terraform)."""
        argv = [self.binary, *args]
        env = build_env(self.base_env, workspace=workspace, cli_config_file=self.cli_config_file,
                        memory_limit=self.memory_limit)
        control = control or RunControl()
        started = time.monotonic()
        spool = Spool.create(self._spool(), label)
        try:
            proc = self._start(argv, cwd, env, spool)
        except OSError as e:
            spool.discard()
            logger.error("cannot start terraform %s: %s", self.binary, e.strerror)
            return RunResult(tuple(args), returncode=127, stderr=str(e.strerror),
                             duration=time.monotonic() - started)
        with self._mutex:
            self._live[proc.pid] = control
            stopping = self._stopping
        control.attach(proc)
        if stopping:
            control.interrupt("shutdown")
        return self._follow(proc, args, spool, control, on_event=on_event,
                            on_start=on_start, started=started, deadline=started + timeout)

    def _follow(self, proc: subprocess.Popen[bytes], args: Sequence[str], spool: Spool,
                control: RunControl, *, on_event: EventSink | None,
                on_start: Callable[[], None] | None, started: float, deadline: float
                ) -> RunResult:
        """Read terraform's output until it exits, or until it reports its last event (its
        exit is then awaited apart, `_exiting`); what it did."""
        output: Output | None = None
        wake: Wake | None = None
        timed_out = waited = early = False
        try:
            streamed = bool(args) and args[0] in JSON_COMMANDS
            last = last_event(args[0]) if streamed else None
            wake = self.wakes.watch(spool.paths[0]) if last else None
            output = Output(proc, spool.readers, streamed=streamed, on_event=on_event,
                            last=last, wake=wake)
            if on_start is not None:
                on_start()
            timed_out = self._wait(proc, output, deadline)
            waited = True
            early = not (timed_out or output.exited)
        finally:
            if not early:
                self._end(proc, output, stopped=timed_out or control.reason is not None,
                          watched=waited)
                spool.discard()
                if output is None and wake is not None:
                    wake.close()  # the reader that would have closed it never started
        assert output is not None
        try:
            return RunResult(
                args=tuple(args), returncode=0 if early else proc.returncode,
                events=tuple(output.events), stdout="".join(output.out),
                stderr="".join(output.err), duration=time.monotonic() - started,
                timed_out=timed_out, interrupted=control.reason == "shutdown",
                canceled=control.reason == "cancel", unreadable=output.unreadable)
        finally:
            if early:  # read above, so that the exit's thread has the output to itself
                self._exiting(proc, output, spool, stopped=control.reason is not None)

    def _exiting(self, proc: subprocess.Popen[bytes], output: Output, spool: Spool, *,
                 stopped: bool) -> None:
        """Await the exit of a terraform that reported its last event, in the background
        (in this thread once the runner is closed: the server is stopping)."""
        with self._mutex:
            if self._exits is None and not self._closed:
                self._exits = ThreadPoolExecutor(max_workers=4,
                                                 thread_name_prefix="terraform-exit")
            exits = self._exits
        if exits is None:
            self._exit(proc, output, spool, stopped)
        else:
            exits.submit(self._exit, proc, output, spool, stopped)

    def _exit(self, proc: subprocess.Popen[bytes], output: Output, spool: Spool,
              stopped: bool) -> None:
        """After the last event: the exit (within the kill grace, else its group is
        killed), what it said after, and no process of its group left."""
        ended = False
        try:
            output.on_event = None  # its run has ended: nothing is told of it any more
            until = time.monotonic() + self.kill_grace
            exited = output.pump(until, to_exit=True) and _reaped(proc, until)
            if not exited:
                logger.error("terraform pid %d has not exited %gs after its last event; "
                             "killing it", proc.pid, self.kill_grace)
            self._end(proc, output, stopped=stopped, watched=exited)
            ended = True
            if exited and proc.returncode:
                # Never seen: after its last event terraform returns 0 (output.py).
                logger.error("terraform pid %d exited %d after its last event; its run "
                             "was answered as it reported", proc.pid, proc.returncode)
        except Exception:  # a thread of its own: nothing above it would log this
            logger.exception("awaiting terraform pid %d's exit failed", proc.pid)
        finally:
            if not ended:  # nothing of it may stay: not the process, its entry, its files
                with contextlib.suppress(Exception):
                    self._end(proc, output, stopped=True, watched=False)
            spool.discard()

    def close(self) -> None:
        """Await the exits still awaited (each at most the kill grace) and release the
        output wakes; a run after this awaits its own exit."""
        with self._mutex:
            exits, self._exits, self._closed = self._exits, None, True
        if exits is not None:
            exits.shutdown(wait=True)
        self.wakes.close()

    def _spool(self) -> Path:
        """The folder terraform's output files go to (made once, owner-only)."""
        with self._mutex:
            if self.spool_dir is None:
                self.spool_dir = Path(tempfile.mkdtemp(prefix="tfserver-spool-"))
            return self.spool_dir

    def _end(self, proc: subprocess.Popen[bytes], output: Output | None, *, stopped: bool,
             watched: bool) -> None:
        """After a run: forget it, leave nothing of it running, read and close its output."""
        with self._mutex:
            self._live.pop(proc.pid, None)
        if stopped or not watched:
            # A provisioner's child (a `sleep`) outlives terraform's SIGINT with parent 1;
            # nothing of a stopped run (or of one this failed to watch) may keep running.
            _kill_group(proc)
            if not watched:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=self.kill_grace)
            # SIGKILL is sent, not yet done: a process that has not run since still shows
            # (4 times in 200 here under load; once in CI). The run ends once none is left.
            if proc.returncode is not None and not _group_gone(
                    proc, time.monotonic() + self.kill_grace):
                logger.error("terraform pid %d: its group outlives SIGKILL", proc.pid)
        elif not _group_gone(proc, time.monotonic() + self.kill_grace):
            # Something terraform started is still running after it ended: it goes too.
            logger.error("terraform pid %d: its children still run after it ended; killing "
                         "them", proc.pid)
            _kill_group(proc)
        if output is not None:
            output.close()

    def _start(self, argv: list[str], cwd: Path, env: dict[str, str], spool: Spool
               ) -> subprocess.Popen[bytes]:
        """Start terraform in its own session, owner-only files, under the memory cap,
        writing to its spool files, on every CPU the server may use."""
        try:
            with self.affinity.spawning():
                proc = subprocess.Popen(
                    argv,
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=spool.writers[0],
                    stderr=spool.writers[1],
                    # Own process group and session: a Ctrl-C meant for the server does
                    # not hit terraform mid-apply, SIGKILL can take the providers down
                    # with it, and terraform outlives a server that dies (and finishes
                    # writing its state).
                    start_new_session=True,
                    # State, backups and plan files hold secrets in clear: owner only.
                    umask=0o077,
                )
        finally:
            spool.close_writers()
        if self.memory_limit:
            # Set at once after the exec: terraform reads its configuration before it
            # allocates much, and every provider it starts inherits the limit.
            with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
                resource.prlimit(proc.pid, resource.RLIMIT_AS,
                                 (self.memory_limit, self.memory_limit))
        return proc

    def _wait(self, proc: subprocess.Popen[bytes], output: Output, deadline: float) -> bool:
        """Read terraform's output until it exits; past the deadline interrupt it, then
        kill its group. Returns True when the deadline passed.

        The selector wakes at once when terraform exits (its pidfd): `Popen.wait(timeout)`
        polls with sleeps that grow to 50 ms, which cost every run up to that much after
        terraform was done. Output is read while it winds down, too.
        """
        if output.pump(deadline) and (not output.exited or _reaped(proc, deadline)):
            return False  # it exited, or reported its last event (`early` in `run`)
        _signal(proc, signal.SIGINT)
        grace = time.monotonic() + self.kill_grace
        if not (output.pump(grace, to_exit=True) and _reaped(proc, grace)):
            logger.warning("terraform pid %d ignored SIGINT; killing it", proc.pid)
            _kill_group(proc)
            output.pump(time.monotonic() + self.kill_grace, to_exit=True)
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


