"""A wake for the reader of terraform's output files, as terraform writes to them (Linux
inotify, through ctypes). Without one the files are read when the process exits and every
`Output.POLL` seconds.

Why: an apply's last event comes about 2 ms before terraform's exit (the Go runtime, then
the kernel tearing its memory down), and on a small module that is about 5 % of the whole
apply. Woken as the event is written, the run ends there (`Output.finished`).

Why a pool: closing an inotify descriptor waits for the kernel's grace period (SRCU), 8 to
15 ms measured here, in the thread that closes it; removing a watch does not wait. So a
descriptor is made once, watches one file at a time, and goes back to the pool after.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # loaded at the first run's watch, not at the server's start
    import ctypes

logger = logging.getLogger(__name__)

#: inotify's event of a write to the watched file.
IN_MODIFY = 0x2


class Wake:
    """One file watched: `fd` becomes readable when the file is written to."""

    def __init__(self, wakes: Wakes, fd: int, wd: int) -> None:
        self.wakes = wakes
        self.fd = fd
        self._wd = wd

    def clear(self) -> None:
        """Take the events that woke the reader (they say nothing it needs)."""
        _clear(self.fd)

    def close(self) -> None:
        """Stop watching; the descriptor goes back to the pool (once)."""
        wd, self._wd = self._wd, -1
        if wd >= 0:
            self.wakes.give_back(self.fd, wd)


class Wakes:
    """The pool of inotify descriptors one runner watches its output files with."""

    def __init__(self, *, enabled: bool = sys.platform.startswith("linux")) -> None:
        self._mutex = threading.Lock()
        self._idle: list[int] = []
        self._enabled = enabled
        self._libc: ctypes.CDLL | None = None
        self._closed = False

    def watch(self, path: Path) -> Wake | None:
        """A wake for writes to `path`, or None where none can be had (not Linux, no
        libc, or the system's inotify limits reached): the file is then polled."""
        libc = self._library()
        if libc is None or self._closed:
            return None
        with self._mutex:
            fd = self._idle.pop() if self._idle else -1
        if fd < 0:
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            if fd < 0:
                return None  # EMFILE: max_user_instances; polled instead
        wd = libc.inotify_add_watch(fd, os.fsencode(path), IN_MODIFY)
        if wd < 0:
            self._keep(fd)
            return None
        return Wake(self, fd, wd)

    def give_back(self, fd: int, wd: int) -> None:
        """Remove the watch `wd` from `fd` and keep `fd` for the next file."""
        libc = self._library()
        if libc is not None:
            libc.inotify_rm_watch(fd, wd)
        _clear(fd)  # what the old watch queued (its writes, IN_IGNORED) wakes nobody
        self._keep(fd)

    def close(self) -> None:
        """Close the idle descriptors (the runner is done); one given back later is
        closed then, and no new wake is had."""
        with self._mutex:
            idle, self._idle, self._closed = self._idle, [], True
        for fd in idle:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _keep(self, fd: int) -> None:
        with self._mutex:
            if not self._closed:
                self._idle.append(fd)
                return
        with contextlib.suppress(OSError):
            os.close(fd)

    def _library(self) -> ctypes.CDLL | None:
        """libc's inotify calls, loaded once (None when they cannot be)."""
        with self._mutex:
            if self._libc is None and self._enabled:
                self._enabled = False  # one attempt
                try:
                    import ctypes

                    # The interpreter's own symbols: libc is linked in already.
                    libc = ctypes.CDLL(None, use_errno=True)
                    for name, args in (("inotify_init1", [ctypes.c_int]),
                                       ("inotify_add_watch",
                                        [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]),
                                       ("inotify_rm_watch", [ctypes.c_int, ctypes.c_int])):
                        function = getattr(libc, name)
                        function.argtypes, function.restype = args, ctypes.c_int
                except (ImportError, OSError, AttributeError) as e:
                    logger.info("no inotify (%s): terraform's output is polled", e)
                else:
                    self._libc = libc
            return self._libc


def _clear(fd: int) -> None:
    with contextlib.suppress(BlockingIOError, OSError):
        while os.read(fd, 4096):
            pass
