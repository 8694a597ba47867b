"""State and objects in files under the state folder (owner-only)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import threading
import time
from pathlib import Path
from typing import Any

from ..files import create_private, private_dir, write_private
from .base import (
    ARCHIVE,
    STATE_NAME,
    BackendError,
    ObjectStore,
    Snapshot,
    archive_stamp,
    archive_time,
    holds_instance,
)
from .inputs import KeptInputs
from .settled import ParsedFiles, SettledBytes, Unreadable, read_json

logger = logging.getLogger(__name__)

#: Not a part of an object key: each would leave the folder or name it.
_NAMES = frozenset({"", ".", ".."})


class LocalObjects:
    """Objects as 0600 files under a 0700 folder."""

    def __init__(self, root: Path, settled: SettledBytes | None = None) -> None:
        self.root = root
        # Folders known to exist (private): a run writes several objects into few folders.
        self._folders: set[Path] = set()
        self._settled = settled or SettledBytes()
        self._empty_lock = threading.Lock()
        self._empty: str | None = None

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*self._parts(key))

    @staticmethod
    def _parts(key: str) -> list[str]:
        parts = key.split("/")
        if not _NAMES.isdisjoint(parts):
            raise ValueError(f"bad object key {key!r}")
        return parts

    def _folder(self, path: Path) -> None:
        if path.parent not in self._folders:
            private_dir(path.parent)
            self._folders.add(path.parent)

    def put(self, key: str, data: bytes) -> None:
        """Write through a temporary file and a rename: readers never see half of it
        (an empty object, an index entry, is only created)."""
        path = self._path(key)
        try:
            try:
                self._folder(path)
                if data:
                    write_private(path, data)
                else:
                    self._put_empty(path)
            except FileNotFoundError:
                self._folders.discard(path.parent)  # removed meanwhile: made again
                write_private(path, data)
        except OSError as e:
            raise BackendError(f"cannot write {key}: {e.strerror}") from e

    def put_copy(self, key: str, data: bytes, source: str) -> None:
        """A hard link to `source`'s file (a name, not a new file: see `_put_empty`), or
        the bytes written when it cannot be linked (gone, replaced meanwhile)."""
        path, origin = self._path(key), self._path(source)
        try:
            self._folder(path)
            if os.stat(origin).st_size == len(data):  # not replaced by other bytes since
                os.link(origin, path)
                return
        except FileExistsError:
            pass  # an object of that name already: replaced by the bytes below
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EMLINK):
                raise BackendError(f"cannot write {key}: {e.strerror}") from e
            self._folders.discard(path.parent)
        self.put(key, data)

    def _put_empty(self, path: Path) -> None:
        """An empty object (an index entry) as a hard link to one empty file: a link is
        a name only, where a new file is an inode (on ext4 here about 15 times the
        cost). Nothing writes into an object in place (`write_private` replaces it by a
        rename), so the entries sharing the file stay empty."""
        for _ in range(3):
            source = self._empty_source()
            try:
                os.link(source, path)
                return
            except FileExistsError:  # an object made empty: replaced by the link
                staged = f"{path.parent}/.lnk-{os.getpid()}-{threading.get_ident()}"
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(staged)
                os.link(source, staged)
                os.replace(staged, path)
                return
            except OSError as e:
                if e.errno != errno.EMLINK and (e.errno != errno.ENOENT
                                                or os.path.exists(source)):
                    raise  # the object's folder is missing (`put` makes it), or worse
                with self._empty_lock:  # its links ran out, or it was removed: a new one
                    if self._empty == source:
                        self._empty = None
        raise BackendError(f"cannot write the empty object {path.name}")

    def _empty_source(self) -> str:
        """The empty file the empty objects link to: `.empty` in the root (never a key:
        names starting with a dot are not listed), or a new `.empty-*` when that one is
        not an empty file of ours, or has all the links it may."""
        with self._empty_lock:
            if self._empty is None:
                private_dir(self.root)
                name = f"{self.root}/.empty"
                fd = os.open(name, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
                try:
                    st = os.fstat(fd)
                finally:
                    os.close(fd)
                if not (stat.S_ISREG(st.st_mode) and st.st_size == 0
                        and st.st_uid == os.getuid() and st.st_nlink < 60_000):
                    name = f"{self.root}/.empty-{os.getpid()}-{time.monotonic_ns()}"
                    os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                     | os.O_NOFOLLOW, 0o600))
                self._empty = name
            return self._empty

    def put_new(self, key: str, data: bytes) -> bool:
        """Create the file only if absent (see `files.create_private`)."""
        try:
            return create_private(self._path(key), data)
        except OSError as e:
            raise BackendError(f"cannot write {key}: {e.strerror}") from e

    def get(self, key: str) -> bytes | None:
        """The file's bytes (from memory while it has not changed: `SettledBytes`)."""
        try:
            # Named by a string: a GET reads an expiry (mostly absent) this way, and
            # building a Path cost more than the lookup.
            return self._settled.read(os.path.join(str(self.root), *self._parts(key)))
        except OSError as e:
            raise BackendError(f"cannot read {key}: {e.strerror}") from e

    def delete(self, key: str) -> None:
        """Remove the file."""
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as e:
            raise BackendError(f"cannot remove {key}: {e.strerror}") from e

    def keys(self, folder: str, *, start_after: str = "", limit: int = 1000) -> list[str]:
        """The folder's file names, sorted."""
        path = self._path(folder.rstrip("/"))
        try:
            with os.scandir(path) as entries:
                names = sorted(e.name for e in entries
                               if not e.name.startswith(".") and e.is_file())
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [n for n in names if n > start_after][:limit]


class LocalBackend:
    """State files under `<state_dir>/state/<module>/<workspace>/terraform.tfstate`."""

    name = "local"

    def __init__(self, state_dir: Path) -> None:
        self._parsed = ParsedFiles()
        self.root = state_dir / "state"
        self.objects: ObjectStore = LocalObjects(state_dir)
        # The folder kept inputs at `inputs/` before `_inputs/`: read there too.
        self.inputs = KeptInputs(self.objects, legacy=True)

    def _module_dir(self, module: str) -> Path:
        return self.root / module

    def _state_path(self, module: str, workspace: str) -> Path:
        return self._module_dir(module) / workspace / STATE_NAME

    def override(self, module: str) -> dict[str, Any]:
        """A local backend whose workspaces live in the server's state folder."""
        base = self._module_dir(module)
        return {
            "terraform": {
                "backend": {
                    "local": {
                        "path": str(base / "default.tfstate"),
                        "workspace_dir": str(base),
                    }
                }
            }
        }

    def init_config(self, module: str) -> list[tuple[str, str]]:
        """Nothing beyond the override file."""
        return []

    def read_state(self, module: str, workspace: str) -> dict[str, Any] | None:
        """The state document, or its last complete version (see `read`)."""
        return self.read(module, workspace)[0]

    def read(self, module: str, workspace: str) -> tuple[dict[str, Any] | None, bool]:
        """(state, stale): the state file, or when it is being rewritten or was left
        half written by a killed run, terraform's backup of the last complete one.

        Terraform's local backend rewrites `terraform.tfstate` in place, so a reader may
        catch it partial, and a SIGKILL mid-write leaves it empty; before its first write
        of a run it copies the previous state to `terraform.tfstate.backup`.
        """
        # A string, not a Path: building the Path cost more than reading a cached state.
        path = os.path.join(str(self.root), module, workspace, STATE_NAME)
        for attempt in range(3):
            doc = self._parsed.read(path)
            if not isinstance(doc, Unreadable):
                return doc, False
            time.sleep(0.01 * (attempt + 1))  # caught mid-write: a moment may finish it
        backup = read_json(path + ".backup")
        if isinstance(backup, dict):
            return backup, True
        return None, False  # a first write that never completed: no instance yet

    def exists(self, module: str, workspace: str) -> bool:
        """The state (or terraform's backup of the last complete one, when a kill
        mid-write left it empty) holds an instance (a missing file reads as None)."""
        return holds_instance(self.read_state(module, workspace))

    def phantom(self, module: str, workspace: str) -> bool:
        """A state file is there, but neither it nor its backup holds an instance."""
        return self._present(module, workspace) and not holds_instance(self.read_state(
            module, workspace))

    def _present(self, module: str, workspace: str) -> bool:
        return self._state_path(module, workspace).is_file()

    def workspaces(self, module: str) -> list[str]:
        """Folders whose state file holds an instance (each state read: a local file)."""
        base = self._module_dir(module)
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir()
                      if (p / STATE_NAME).is_file() and self.exists(module, p.name))

    def lock_info(self, module: str, workspace: str) -> dict[str, str] | None:
        """The local backend's lock lives in process memory and flock; not visible here."""
        return None

    def clear_lock(self, module: str, workspace: str, lock_id: str) -> bool:
        """A local lock ends with its terraform process: there is none to clear."""
        return False

    def snapshot(self, module: str, workspace: str) -> Snapshot:
        """The state file; local locks are not visible from outside terraform."""
        state, stale = self.read(module, workspace)
        return Snapshot(state, None, stale)

    def archive(self, module: str, workspace: str, at: float) -> str:
        """The workspace's folder (its state, backup and lock file) moved to
        `<state_dir>/_archive/<module>/<workspace>.<stamp>/`."""
        source = self._module_dir(module) / workspace
        target = self.root.parent / ARCHIVE / module / f"{workspace}.{archive_stamp(at)}"
        try:
            private_dir(target.parent)
            os.rename(source, target)
        except FileNotFoundError:
            return ""  # no state: nothing to keep
        except OSError as e:
            raise BackendError(f"cannot move the state of {workspace} aside: "
                               f"{e.strerror}") from e
        return str(target)

    def purge_archives(self, before: float) -> int:
        """Delete the archived folders made before `before`."""
        removed = 0
        base = self.root.parent / ARCHIVE
        for folder in sorted(base.glob("*/*")) if base.is_dir() else []:
            made = archive_time(folder.name)
            if made is not None and made < before:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        return removed

    def check(self) -> None:
        """The state folder must be writable."""
        try:
            private_dir(self.root)
            if not os.access(self.root, os.W_OK):
                raise BackendError(f"state folder {self.root} is not writable")
        except OSError as e:
            raise BackendError(f"state folder {self.root}: {e.strerror}") from e

    def close(self) -> None:
        """Nothing to release."""
