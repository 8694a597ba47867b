"""Local files read from memory while they have not changed: state documents
(`ParsedFiles`) and objects' bytes (`SettledBytes`).

Why: a GET of an instance reads its state and several small objects (kept inputs,
expiry, drift report, references). Every system call a thread makes hands the GIL to
another busy thread, and under 32 keep-alive connections each handoff cost about as
much as the work between them. A file found unchanged (same device, inode, size,
modification and change times) is served from memory after one `stat`.

Only a settled file is kept: one whose last change (its `ctime`, which no caller can
set back) is older than `SETTLED_NS` when it is looked at cannot change again without a
new change time, so a change always shows as a new version. At most a budget of bytes
is kept (each entry costs its size and its path's, and `ENTRY_COST`), the oldest
dropped first. Only regular files are read: a FIFO at an object's path would block.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from .base import BackendError

#: A file last changed longer ago than this when it is looked at cannot change again
#: without a new change time (filesystems stamp a change with a clock that is at worst a
#: second or two coarse): only such a file's contents are kept.
SETTLED_NS = 3_000_000_000
#: At most this many bytes of files are kept (a parsed document takes several times that).
PARSED_BYTES = 1 << 20
#: A larger object is never kept (plans, event logs): the budget is for small documents.
LARGEST_KEPT = 64 * 1024
#: What an entry costs beside its file's bytes and its path (the key, the version, the
#: dict's slot): empty files too fill the budget, so their number stays bounded.
ENTRY_COST = 200

T = TypeVar("T")
#: What tells two versions of a file apart: device, inode, size, modification and
#: change times (a file put back with its old mtime still has a new ctime).
Version = tuple[int, int, int, int, int]


def version(st: os.stat_result) -> Version:
    """A file's version as its `stat` gives it."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def require_file(st: os.stat_result) -> None:
    """OSError unless `st` is a regular file's (not a folder, a FIFO, a device)."""
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "not a regular file")


class Versions(Generic[T]):
    """What was made of each settled file, by path, for as long as its version holds."""

    def __init__(self, budget: int, largest: int,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.budget = budget
        self.largest = min(budget, largest)
        self._clock = clock
        self._kept: dict[str, tuple[Version, T, int]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def cost(self) -> int:
        """What the kept entries cost of the budget."""
        return self._bytes

    def get(self, path: str, seen: Version) -> T | None:
        """What was kept of `path` at version `seen`, or None."""
        with self._lock:
            kept = self._kept.get(path)
        return kept[1] if kept is not None and kept[0] == seen else None

    def keep(self, path: str, st: os.stat_result, value: T) -> None:
        """Keep `value` for `path` at `st`'s version, if the file has settled and fits."""
        cost = st.st_size + len(path) + ENTRY_COST
        changed = max(st.st_mtime_ns, st.st_ctime_ns)
        if st.st_size > self.largest or cost > self.budget \
                or self._clock() - changed <= SETTLED_NS:
            return
        with self._lock:
            self._forget_locked(path)
            self._kept[path] = (version(st), value, cost)
            self._bytes += cost
            while self._bytes > self.budget:
                self._forget_locked(next(iter(self._kept)))

    def forget(self, path: str) -> None:
        """Drop what was kept of `path` (it is gone)."""
        with self._lock:
            self._forget_locked(path)

    def _forget_locked(self, path: str) -> None:
        old = self._kept.pop(path, None)
        if old is not None:
            self._bytes -= old[2]


class Unreadable:
    """The marker of a file that exists but holds no complete JSON document."""


UNREADABLE = Unreadable()


def read_json(path: str) -> dict[str, Any] | Unreadable | None:
    """A JSON object file: its document, None when missing, or `UNREADABLE`."""
    return _parsed(path)[0]


def _parsed(path: str) -> tuple[dict[str, Any] | Unreadable | None, os.stat_result | None]:
    """`read_json`'s document and the version of the very file read (None if missing)."""
    try:
        got = read_file(path)
    except OSError as e:
        raise BackendError(f"cannot read local state: {e.strerror}") from e
    if got is None:
        return None, None
    try:
        doc = json.loads(got[0])  # bytes: UTF-8 (or -16/-32 by its BOM), else unreadable
    except ValueError:
        return UNREADABLE, got[1]
    return (doc if isinstance(doc, dict) else UNREADABLE), got[1]


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
        kept = self._kept.get(path, version(st))
        if kept is not None:
            return kept
        doc, read = _parsed(path)
        if isinstance(doc, dict) and read is not None:
            self._kept.keep(path, read, doc)
        return doc


def read_file(path: str, read: Callable[[int, int], bytes] = os.read
              ) -> tuple[bytes, os.stat_result] | None:
    """A regular file's bytes and the `fstat` of the very file read; None when it is
    missing, OSError for any other failure (EINVAL: not a regular file). Opened with
    O_NONBLOCK: a FIFO put at the path must not hang the open."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        st = os.fstat(fd)
        require_file(st)
        return read_all(fd, st.st_size, read), st
    finally:
        os.close(fd)


class SettledBytes:
    """Files' bytes, read once per version (see the module's docstring).

    `read` is how a descriptor is read (os.read; a test gives short reads, as a network
    or FUSE filesystem may)."""

    def __init__(self, budget: int = PARSED_BYTES,
                 clock: Callable[[], int] = time.time_ns,
                 read: Callable[[int, int], bytes] = os.read) -> None:
        self._kept: Versions[bytes] = Versions(budget, LARGEST_KEPT, clock)
        self._read = read

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
        got = read_file(path, self._read)  # refuses what is not a regular file
        if got is None:
            return None  # removed since
        data, read = got
        if len(data) == read.st_size:  # not a file that grew as it was read
            self._kept.keep(path, read, data)
        return data


def read_all(fd: int, size: int, read: Callable[[int, int], bytes] = os.read) -> bytes:
    """All of a regular file from its descriptor (`size`: what fstat said): one read
    when it has not grown. A read may come up short before `size` (a read over 2 GiB, a
    network filesystem): only an empty read, or a short one past `size`, is the end."""
    chunks: list[bytes] = []
    total = 0
    while True:
        want = size - total + 1 if total <= size else 1 << 16
        chunk = read(fd, want)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total >= size and len(chunk) < want:
            return b"".join(chunks)
