"""Local files read from memory while they have not changed: state documents
(`ParsedFiles`) and objects' bytes (`SettledBytes`).

Why: a GET of an instance reads its state and several small objects (kept inputs,
expiry, drift report, references). Every system call a thread makes hands the GIL to
another busy thread, and under 32 keep-alive connections each handoff cost about as
much as the work between them. A file found unchanged (same inode, size and
modification time) is served from memory after one `stat`.

Only a settled file is kept: one last changed longer ago than `SETTLED_NS` when it is
looked at cannot change again without a new modification time, so a change always
shows as a new version. At most a budget of bytes is kept, the oldest dropped first.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from .base import BackendError

#: A file last changed longer ago than this when it is looked at cannot change again
#: without a new modification time (filesystems stamp a change with a clock that is at
#: worst a second or two coarse): only such a file's contents are kept.
SETTLED_NS = 3_000_000_000
#: At most this many bytes of files are kept (a parsed document takes several times that).
PARSED_BYTES = 1 << 20
#: A larger object is never kept (plans, event logs): the budget is for small documents.
LARGEST_KEPT = 64 * 1024

T = TypeVar("T")
#: What tells two versions of a file apart: inode, size, modification time.
Version = tuple[int, int, int]


def version(st: os.stat_result) -> Version:
    """A file's version as its `stat` gives it."""
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class Versions(Generic[T]):
    """What was made of each settled file, by path, for as long as its version holds."""

    def __init__(self, budget: int, largest: int,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.budget = budget
        self.largest = min(budget, largest)
        self._clock = clock
        self._kept: dict[str, tuple[Version, T]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, path: str, seen: Version) -> T | None:
        """What was kept of `path` at version `seen`, or None."""
        with self._lock:
            kept = self._kept.get(path)
        return kept[1] if kept is not None and kept[0] == seen else None

    def keep(self, path: str, st: os.stat_result, value: T) -> None:
        """Keep `value` for `path` at `st`'s version, if the file has settled and fits."""
        if st.st_size > self.largest \
                or self._clock() - st.st_mtime_ns <= SETTLED_NS:
            return
        with self._lock:
            self._forget_locked(path)
            self._kept[path] = (version(st), value)
            self._bytes += st.st_size
            while self._bytes > self.budget:
                self._forget_locked(next(iter(self._kept)))

    def forget(self, path: str) -> None:
        """Drop what was kept of `path` (it is gone)."""
        with self._lock:
            self._forget_locked(path)

    def _forget_locked(self, path: str) -> None:
        old = self._kept.pop(path, None)
        if old is not None:
            self._bytes -= old[0][1]


class Unreadable:
    """The marker of a file that exists but holds no complete JSON document."""


UNREADABLE = Unreadable()


def read_json(path: str) -> dict[str, Any] | Unreadable | None:
    """A JSON object file: its document, None when missing, or `UNREADABLE`."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise BackendError(f"cannot read local state: {e.strerror}") from e
    try:
        doc = json.loads(text)
    except ValueError:
        return UNREADABLE
    return doc if isinstance(doc, dict) else UNREADABLE


class ParsedFiles:
    """JSON object files, each parsed once per version: a file found unchanged gives the
    document read before, unread.

    A GET of an instance read and parsed its state file on every request: 25 of the 38 µs
    its read of the instance took (a 3 KB state). The documents are shared by every
    reader: they are read, never changed.
    """

    def __init__(self, budget: int = PARSED_BYTES,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self._kept: Versions[dict[str, Any]] = Versions(budget, budget, clock)

    def read(self, path: str) -> dict[str, Any] | Unreadable | None:
        """What `read_json(path)` gives, from memory when the file has not changed."""
        try:
            st = os.stat(path)
        except OSError:
            self._kept.forget(path)
            return read_json(path)
        # Looked at before the read: a change made meanwhile gives a newer document under
        # an older version, which only costs another read.
        kept = self._kept.get(path, version(st))
        if kept is not None:
            return kept
        doc = read_json(path)
        if isinstance(doc, dict):
            self._kept.keep(path, st, doc)
        return doc


class SettledBytes:
    """Files' bytes, read once per version (see the module's docstring)."""

    def __init__(self, budget: int = PARSED_BYTES,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self._kept: Versions[bytes] = Versions(budget, LARGEST_KEPT, clock)

    def read(self, path: str) -> bytes | None:
        """The file's bytes, None when it is missing (OSError for any other failure)."""
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            self._kept.forget(path)
            return None
        kept = self._kept.get(path, version(st))
        if kept is not None:
            return kept
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None  # removed since
        try:
            st = os.fstat(fd)  # the version of the very file read
            data = _read_all(fd, st.st_size)
        finally:
            os.close(fd)
        self._kept.keep(path, st, data)
        return data


def _read_all(fd: int, size: int) -> bytes:
    """All of a regular file from its descriptor (`size`: what fstat said): one read
    when it has not grown. (A regular file's short read is its end.)"""
    chunks, want = [], size + 1
    while True:
        chunk = os.read(fd, want)
        if chunk:
            chunks.append(chunk)
        if len(chunk) < want:
            return b"".join(chunks)
        want = 1 << 16
