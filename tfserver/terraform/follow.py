"""terraform's output followed from the files it writes (`Spool`), not from pipes: see
`Output`. Files outlive the server; pipes did not, and terraform with them."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import selectors
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .output import STDERR_KEEP, EventSink, parse_event
from .wake import Wake

logger = logging.getLogger(__name__)

#: About when this process started (this module is imported before any run): what an
#: earlier process left was last written before.
STARTED = time.time()
#: A spool file's stem: a run's (`<run id>.<ns>`), or a command's of no run (`<pid>-...`).
_STEM = re.compile(r"(?:(?P<run>[0-9A-Za-z_-]+)\.[0-9]+|(?P<pid>[0-9]+)-[0-9]+-[0-9]+)")


@dataclass
class Spool:
    """The two files one terraform process writes its stdout and stderr to (owner-only),
    with a reader's descriptor on each. They are removed once the run ended here; a server
    that died leaves them, with what terraform said after."""

    paths: tuple[Path, Path]
    writers: tuple[int, int]
    readers: tuple[int, int]

    @classmethod
    def create(cls, folder: Path, label: str | None = None) -> Spool:
        """Two new files in `folder`, named after `label` (a run id) when given: a
        server restarted after a crash finds what terraform said after (`leftover`)."""
        stem = f"{label}.{time.monotonic_ns()}" if label else \
            f"{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}"
        paths = (folder / f"{stem}.out", folder / f"{stem}.err")
        writers = tuple(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
                        for p in paths)
        readers = tuple(os.open(p, os.O_RDONLY) for p in paths)
        return cls(paths, (writers[0], writers[1]), (readers[0], readers[1]))

    def close_writers(self) -> None:
        """The child has its copies: close the server's (once: a descriptor number closed
        twice may by then be another thread's file)."""
        writers, self.writers = self.writers, (-1, -1)
        _close(writers)

    def discard(self) -> None:
        """Close every descriptor (once) and remove the files."""
        self.close_writers()
        readers, self.readers = self.readers, (-1, -1)
        _close(readers)
        for path in self.paths:
            path.unlink(missing_ok=True)


def leftover(folder: Path, label: str) -> list[dict[str, Any]] | None:
    """The `-json` events terraform wrote for `label` (a run id) that no server read to
    the end (its server died), and the files removed; None when there are none."""
    found = sorted(folder.glob(f"{label}.*.out"))
    if not found:
        return None
    events = []
    for path in found:
        with contextlib.suppress(OSError):
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                event = parse_event(line)
                if event is not None:
                    events.append(event)
        path.unlink(missing_ok=True)
        path.with_suffix(".err").unlink(missing_ok=True)
    return events


def sweep(folder: Path, ended: Callable[[str, float], bool], *, limit: int = 200) -> int:
    """Remove what earlier processes left that nothing will read: a run's files once
    `ended(its id, seconds since they were written)` says so, and the files of a process
    that is gone; how many stems were removed. At most `limit` runs are asked about (each
    may be a read of the store): the rest wait for the next start."""
    removed = asked = 0
    for written, stem in _stems(folder):  # the oldest first: the likeliest to go
        found = _STEM.fullmatch(stem)
        paths = [folder / f"{stem}.out", folder / f"{stem}.err"]
        if found is None or written >= STARTED:
            continue  # not ours, or this process's own
        if found["run"] is not None:
            if asked >= limit:
                continue
            asked += 1
            if not ended(found["run"], time.time() - written):
                continue
        elif int(found["pid"]) != os.getpid() and process_runs(int(found["pid"])):
            continue
        try:
            for path in paths:
                path.unlink(missing_ok=True)
        except OSError as e:  # one that cannot go does not keep the others
            logger.warning("spool file %s cannot be removed: %s", stem, e.strerror)
            continue
        removed += 1
    return removed


def _stems(folder: Path) -> list[tuple[float, str]]:
    """The stems of the spool files in `folder`, each with when it was last written."""
    written: dict[str, float] = {}
    for path in [*folder.glob("*.out"), *folder.glob("*.err")]:
        try:
            mtime = path.lstat().st_mtime
        except OSError:
            continue  # removed meanwhile
        stem = path.name.rsplit(".", 1)[0]
        written[stem] = max(mtime, written.get(stem, mtime))
    return sorted((mtime, stem) for stem, mtime in written.items())


def process_runs(pid: int) -> bool:
    """Whether a process of that id exists (True for another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # somebody else's
    return True


def _close(fds: tuple[int, int]) -> None:
    for fd in fds:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


class Output:
    """terraform's stdout and stderr, followed as they come by the run's own thread: events
    from the `-json` stream (each handed to `on_event` at once) or text, and stderr's tail.

    terraform writes to files (`Spool`), not pipes: a Go program dies of SIGPIPE at its next
    write to a pipe whose reader is gone, so a server killed mid-apply took terraform with
    it before it wrote its state, leaving resources that no state records. A file has no
    reader to lose: terraform finishes and writes its state whatever happens to the server.
    The process's exit is watched through a pidfd (the selector wakes at once), and so
    are terraform's writes to stdout where a `Wake` watches the file (wake.py); the files
    are read whenever it wakes, and at least every `POLL` seconds while terraform runs.
    """

    #: How often the files are read while terraform runs (the events' latency). Each
    #: wake took about 0.1 ms of CPU from terraform on 2 cores: every 10 ms that was 0.3-0.5
    #: ms an apply; a follower is a few hundred ms behind anyway (the store, its re-reads).
    POLL = 0.05

    def __init__(self, proc: subprocess.Popen[bytes], files: tuple[int, int], *,
                 streamed: bool, on_event: EventSink | None,
                 last: Callable[[dict[str, Any]], bool] | None = None,
                 wake: Wake | None = None) -> None:
        self.proc = proc
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
        #: `last` (output.py's `last_event`) saw the event after which terraform has only
        #: to exit: its run is over, and `pump` returns.
        self.finished = False
        self._last = last
        self._wake = wake
        self._stdout_fd, self._stderr_fd = files
        self._lines: dict[int, Callable[[str], None]] = {
            self._stdout_fd: self._stdout_line, self._stderr_fd: self._stderr_line}
        #: The start of each stream's line still coming, in pieces (joined once whole: a
        #: long line, a big output's event, is not copied again for every piece).
        self._partial: dict[int, list[bytes]] = {fd: [] for fd in files}
        self._pending: dict[int, int] = {fd: 0 for fd in files}
        self._selector = selectors.DefaultSelector()
        self._pidfd: int | None = None
        with contextlib.suppress(OSError, AttributeError):  # Linux 5.3+; else polled
            pidfd = os.pidfd_open(proc.pid)
            try:
                self._selector.register(pidfd, selectors.EVENT_READ, None)
            except OSError:
                os.close(pidfd)
                raise
            self._pidfd = pidfd
        if wake is not None and self._pidfd is None:
            wake.close()  # polled: nothing selects on it
            self._wake = None
        elif wake is not None:
            self._selector.register(wake.fd, selectors.EVENT_READ, wake)

    def pump(self, until: float, *, to_exit: bool = False) -> bool:
        """Read what comes until the process exits (or, unless `to_exit`, reports its last
        event) or the monotonic time `until` passes; True when it did (everything it wrote
        until then is read)."""
        # What came before the wake watched the file (terraform may have written all of
        # it by then) wakes nobody: read first, then wait.
        self._drain()
        while not (self.exited or (self.finished and not to_exit)):
            left = until - time.monotonic()
            if left <= 0:
                return False
            if self._pidfd is not None:
                for key, _ in self._selector.select(min(left, self.POLL)):
                    if key.data is None:
                        self.exited = True
                    else:
                        key.data.clear()  # a write: read below
            else:
                time.sleep(min(left, self.POLL))
                self.exited = self.proc.poll() is not None
            self._drain()
        return True

    def close(self) -> None:
        """Read what is left and end the last lines (the files are the spool's to close)."""
        self._drain()
        for fd, pieces in self._partial.items():
            if pieces:  # the last line may lack its newline
                self._lines[fd](_decoded(b"".join(pieces)))
            pieces.clear()
        if self._wake is not None:
            self._selector.unregister(self._wake.fd)
            self._wake.close()
            self._wake = None
        if self._pidfd is not None:
            self._selector.unregister(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        self._selector.close()

    def _drain(self) -> None:
        for fd in (self._stdout_fd, self._stderr_fd):
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:  # what is written so far is read
                    break
                self._chunk(fd, chunk)

    def _chunk(self, fd: int, chunk: bytes) -> None:
        on_line = self._lines[fd]
        pieces = self._partial[fd]
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
        if self._last is not None and self._last(event):
            self.finished = True
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
