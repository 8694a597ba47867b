"""Files only the server's user may read: state, inputs, run records, plans, keys."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

#: How a temporary file is opened: new (never an existing file or a link), owner-only.
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) with mode 0700, and tighten it if it existed looser."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def _staged(path: Path, data: bytes) -> str:
    """`data` in a new owner-only temporary file beside `path` (its name)."""
    try:
        fd, tmp = _temporary(path)
    except FileNotFoundError:
        private_dir(path.parent)
        fd, tmp = _temporary(path)
    try:
        write_all(fd, data)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    return tmp


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to the descriptor (a write may take only part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _temporary(path: Path) -> tuple[int, str]:
    """A new owner-only file beside `path`, opened for writing."""
    return new_private(path.parent, ".tmp-")


def new_private(folder: Path, prefix: str, suffix: str = "") -> tuple[int, str]:
    """A new owner-only file in `folder`, opened for writing: its descriptor and name.
    Named by process, thread and time rather than by `tempfile.mkstemp`'s random letters:
    a run writes several files, and the random names cost more than the writes."""
    base = f"{folder}/{prefix}{os.getpid()}-{threading.get_ident()}-"
    for _ in range(100):
        name = f"{base}{time.monotonic_ns()}{suffix}"
        try:
            return os.open(name, _NEW, 0o600), name
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {folder}")


def write_private(path: Path, data: bytes) -> None:
    """Write a file readable by the owner only, atomically (temp file and rename)."""
    tmp = _staged(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create_private(path: Path, data: bytes) -> bool:
    """Create an owner-only file unless one exists; False if it did. The content is
    written aside and hard-linked in place: the link fails if the name exists, so of
    writers racing for one name exactly one wins, and readers never see it half written."""
    tmp = _staged(path, data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def tighten_tree(root: Path) -> int:
    """Take group and other permissions off everything under `root`; returns how many
    entries changed.

    Terraform writes state 0644 in 0755 folders; the umask the server runs terraform with
    covers what is written from now on, this covers what an earlier run or another tool
    left behind. Symbolic links are not followed.
    """
    changed = 0
    if not root.is_dir() or root.is_symlink():
        return 0
    for folder, _dirs, files in os.walk(root):
        for name in [folder, *(os.path.join(folder, f) for f in files)]:
            try:
                st = os.lstat(name)
            except FileNotFoundError:
                continue
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
                os.chmod(name, stat.S_IMODE(st.st_mode) & 0o700)
                changed += 1
    return changed
