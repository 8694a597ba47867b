"""Working copies and var files: where terraform runs, and how inputs reach it.

Every module is copied once into `<state>/work/<module>/` (a version of a versioned module
into `<state>/work/<module>@<version>/`) with a backend override file and initialised once
(in the background at start, retried on use after a failure). Variables travel in a 0600
`*.tfvars.json` file that exists only for the run, preferably on tmpfs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import TFServerError, Unavailable
from ..files import new_private, private_dir, tighten_tree, write_all
from .args import build_args
from .follow import process_runs
from .output import error_text
from .process import Runner

logger = logging.getLogger(__name__)

OVERRIDE_FILE = "tfserver_override.tf.json"
#: Where a working copy remembers the backend it was initialised for.
BACKEND_STAMP = ".tfserver-backend"
#: A failed init is retried on the next request, but not more often than this.
INIT_RETRY_SECONDS = 30.0
_KEEP_IN_WORKING_COPY = {".terraform", ".terraform.lock.hcl", BACKEND_STAMP}


class ModuleFiles(Protocol):
    """What a working copy needs of a module: its name and the folder of its files."""

    @property
    def name(self) -> str:
        """The module's name (its working copy's folder)."""
        ...

    @property
    def path(self) -> Path:
        """The folder the module's files are copied from."""
        ...


class BackendSettings(Protocol):
    """What `terraform init` needs of the state backend: its block and its settings."""

    @property
    def name(self) -> str:
        """The backend's name, for the log."""
        ...

    def override(self, module: str) -> dict[str, Any]:
        """The `terraform { backend ... }` block, as JSON, for the module's working copy."""
        ...

    def init_config(self, module: str) -> list[tuple[str, str]]:
        """`-backend-config` key/value pairs for `terraform init`."""
        ...


@dataclass
class WorkingCopy:
    """A module's private, initialised copy under the state folder."""

    module: ModuleFiles
    path: Path
    status: str = "new"
    error: str = ""
    failed_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class WorkingCopies:
    """Every module's working copy, its one `terraform init`, and its readiness."""

    def __init__(self, root: Path, modules: Mapping[str, ModuleFiles], runner: Runner,
                 backend: BackendSettings, *, init_timeout: float) -> None:
        self.runner = runner
        self.backend = backend
        self.init_timeout = init_timeout
        self.copies = {name: WorkingCopy(m, root / name) for name, m in modules.items()}
        self._init_mutex = threading.Lock()  # the plugin cache is not safe for parallel init

    def prepare(self) -> None:
        """Copy every module's files into its working copy, with the backend override."""
        for wc in self.copies.values():
            self._sync(wc)

    def _sync(self, wc: WorkingCopy) -> None:
        private_dir(wc.path)
        for entry in wc.path.iterdir():
            if entry.name in _KEEP_IN_WORKING_COPY:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        shutil.copytree(
            wc.module.path,
            wc.path,
            dirs_exist_ok=True,
            # New files under the server's umask (owner only), not the modules' modes.
            copy_function=shutil.copyfile,
            ignore=shutil.ignore_patterns(".terraform", "terraform.tfstate*", "*.tfvars",
                                          "*.tfvars.json", ".terraform.tfstate.lock.info"),
        )
        override = self.backend.override(wc.module.name)
        (wc.path / OVERRIDE_FILE).write_text(json.dumps(override, indent=2) + "\n")
        tighten_tree(wc.path)  # copytree copied the module folders' own modes

    def start(self) -> None:
        """Initialise every module in the background (once each)."""
        for name in self.copies:
            threading.Thread(target=self._init_quietly, args=(name,),
                             name=f"init-{name}", daemon=True).start()

    def _init_quietly(self, name: str) -> None:
        with contextlib.suppress(TFServerError):  # recorded on the working copy, logged
            self.ready(name)

    def ready(self, name: str) -> WorkingCopy:
        """The module's working copy, initialised (init runs once, behind a lock)."""
        wc = self.copies[name]
        if wc.status == "ready":
            return wc
        with wc.lock:
            if wc.status == "ready":
                return wc
            if wc.status == "failed" and time.monotonic() - wc.failed_at < INIT_RETRY_SECONDS:
                raise _not_initialised(name, wc.error)
            wc.status = "initialising"
            self._init(wc)
            return wc

    def ready_any(self, module: str, version: str | None = None) -> WorkingCopy:
        """That version's working copy, else any of the module's (what only needs the
        backend, a force-unlock, works in any: the versions share the state)."""
        key = module if version is None else f"{module}@{version}"
        if key not in self.copies:
            key = next((k for k, wc in self.copies.items() if wc.module.name == module), key)
        if key not in self.copies:
            raise Unavailable(f"module {module} is not served here")
        return self.ready(key)

    def _init(self, wc: WorkingCopy) -> None:
        name = wc.module.name
        backend_config = self.backend.init_config(name)
        stamp = _fingerprint(self.backend.override(name), backend_config)
        stamp_file = wc.path / BACKEND_STAMP
        previous = stamp_file.read_text().strip() if stamp_file.is_file() else None
        # A working copy first initialised for another backend: terraform would refuse
        # every command ("Backend configuration changed"). Reconfigure, which never
        # migrates state: the instances of the old backend stay where they are.
        reconfigure = (wc.path / ".terraform").is_dir() and previous != stamp
        if reconfigure and previous is not None:
            logger.warning("module %s: the backend changed since its last start; "
                           "re-initialising it for %s (state is not migrated)",
                           name, self.backend.name)
        with self._init_mutex:
            result = self.runner.run(
                build_args("init", backend_config=backend_config, reconfigure=reconfigure),
                cwd=wc.path, timeout=self.init_timeout)
        if result.ok:
            stamp_file.write_text(stamp + "\n")
            wc.status, wc.error = "ready", ""
            logger.info("module %s initialised in %.2fs", name, result.duration)
            return
        wc.status, wc.failed_at = "failed", time.monotonic()
        wc.error = ("terraform init timed out" if result.timed_out
                    else error_text(result.stderr or result.stdout)
                    or f"exit status {result.returncode}")
        # A warning, not an error: the server serves the other modules; this one answers
        # 503 and init is tried again on use.
        logger.warning("module %s cannot be served yet: terraform init failed (tried again "
                       "on use, at most every %ds). If it needs providers, give the server "
                       "network access to their registry, or a provider mirror "
                       "(TFSERVER_PROVIDER_MIRROR): %s", name, int(INIT_RETRY_SECONDS),
                       wc.error)
        raise _not_initialised(name, wc.error)

    def report(self) -> dict[str, str]:
        """Each module's state: new, initialising, ready, or `failed: <why>`; a versioned
        module's versions taken together (ready when every one is, else the first that
        is not)."""
        found: dict[str, str] = {}
        for wc in self.copies.values():
            name = wc.module.name
            if found.get(name, "ready") == "ready":
                found[name] = wc.status if wc.status != "failed" else f"failed: {wc.error}"
        return found

    def settled(self) -> bool:
        """True when no module is still to be initialised (each is ready, or failed and
        answers 503 on its own)."""
        return all(wc.status in ("ready", "failed") for wc in self.copies.values())


def _fingerprint(override: Mapping[str, Any], backend_config: list[tuple[str, str]]) -> str:
    doc = json.dumps({"override": override, "config": backend_config}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()


def _not_initialised(name: str, error: str) -> Unavailable:
    return Unavailable(f"module {name} could not be initialised: {error}",
                       retry_after=int(INIT_RETRY_SECONDS))


class VarFiles:
    """The folder of short-lived var files, and the files themselves (never argv).

    Preferably a private folder on tmpfs: the values (secrets included) never reach a
    persistent disk, and terraform's fsync of its state does not have to flush them too,
    which measurably slowed every apply that changed state.
    """

    def __init__(self, tmp_dir: Path | None, fallback: Path) -> None:
        self.folder, self.owned = _var_dir(tmp_dir, fallback)

    @contextmanager
    def file(self, inputs: Mapping[str, Any]) -> Iterator[Path]:
        """The variables in a 0600 file that exists only inside the block."""
        data = json.dumps(dict(inputs)).encode()
        fd, raw = new_private(self.folder, "vars-", ".tfvars.json")
        path = Path(raw)
        try:
            try:
                write_all(fd, data)
            finally:
                os.close(fd)
            yield path
        finally:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        """Remove the folder if this process made it."""
        if self.owned:
            shutil.rmtree(self.folder, ignore_errors=True)


def _var_dir(tmp_dir: Path | None, fallback: Path) -> tuple[Path, bool]:
    """The folder for var files, and whether this process made it (and must remove it)."""
    if tmp_dir is not None:
        return private_dir(tmp_dir), False
    shm = Path("/dev/shm")  # noqa: S108 - a private mkdtemp inside it, mode 0700
    if shm.is_dir() and os.access(shm, os.W_OK):
        remove_orphan_var_dirs(shm)
        return Path(tempfile.mkdtemp(prefix=f"tfserver-vars-{os.getpid()}-", dir=shm)), True
    return private_dir(fallback), False


def remove_orphan_var_dirs(parent: Path) -> None:
    """Remove var-file folders of this user's tfserver processes that are gone (a server
    killed mid-run would otherwise leave a var file, secrets included, until reboot)."""
    for folder in parent.glob("tfserver-vars-*-*"):
        try:
            pid = int(folder.name.split("-")[2])
            if folder.stat().st_uid != os.getuid():
                continue
        except (ValueError, OSError):
            continue
        if not process_runs(pid):
            shutil.rmtree(folder, ignore_errors=True)
            logger.info("removed %s, left by a stopped tfserver", folder)
