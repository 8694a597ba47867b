"""Where state lives: the backend settings terraform gets, and state reads without terraform.

Modules carry no backend block; the server writes one into each working copy
(`tfserver_override.tf.json`) and passes the rest as `-backend-config` values at `init`.
Reading outputs straight from the state object makes a GET fast and lock-free.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

from .config import Config
from .errors import ConfigError, Unavailable

logger = logging.getLogger(__name__)

INPUTS_SUFFIX = ".inputs.json"


class BackendError(Unavailable):
    """The state store cannot be reached or answered an error (503)."""


class StateBackend(Protocol):
    """What the service needs of a state store."""

    name: str
    #: True when terraform creates a workspace's state on first apply by itself.
    creates_workspaces: bool

    def override(self, module: str) -> dict[str, Any]:
        """The `terraform { backend ... }` block, as JSON, for the module's working copy."""
        ...

    def init_config(self, module: str) -> list[tuple[str, str]]:
        """`-backend-config` key/value pairs for `terraform init`."""
        ...

    def read_state(self, module: str, workspace: str) -> dict[str, Any] | None:
        """The workspace's state document, or None when the workspace does not exist."""
        ...

    def workspaces(self, module: str) -> list[str]:
        """Names of the workspaces that have state."""
        ...

    def exists(self, module: str, workspace: str) -> bool:
        """True when the workspace has a state object (cheaper than reading it)."""
        ...

    def save_inputs(self, module: str, workspace: str, inputs: dict[str, Any]) -> None:
        """Keep the variables of the last apply (destroy needs them again)."""
        ...

    def load_inputs(self, module: str, workspace: str) -> dict[str, Any] | None:
        """The variables of the last apply, or None."""
        ...

    def delete_inputs(self, module: str, workspace: str) -> None:
        """Forget the variables (after destroy)."""
        ...

    def lock_info(self, module: str, workspace: str) -> dict[str, str] | None:
        """Who holds the workspace's state lock, or None when it is free."""
        ...

    def check(self) -> None:
        """Raise `BackendError` when the store cannot be reached."""
        ...


def write_private(path: Path, data: bytes) -> None:
    """Write a file readable by the owner only, atomically (temp file and rename)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LocalBackend:
    """State files under `<state_dir>/state/<module>/<workspace>/terraform.tfstate`."""

    name = "local"
    creates_workspaces = True

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "state"
        self.inputs_root = state_dir / "inputs"

    def _module_dir(self, module: str) -> Path:
        return self.root / module

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
        """Read the state file; retries briefly, since terraform rewrites it in place."""
        path = self._module_dir(module) / workspace / "terraform.tfstate"
        for attempt in range(5):
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                return None
            except OSError as e:
                raise BackendError(f"cannot read local state: {e.strerror}") from e
            try:
                doc = json.loads(text)
            except ValueError:
                time.sleep(0.02 * (attempt + 1))  # caught mid-write; bounded
                continue
            return doc if isinstance(doc, dict) else None
        raise BackendError("local state is being rewritten; try again")

    def exists(self, module: str, workspace: str) -> bool:
        """The state file is there."""
        return (self._module_dir(module) / workspace / "terraform.tfstate").is_file()

    def workspaces(self, module: str) -> list[str]:
        """Folders that hold a state file."""
        base = self._module_dir(module)
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if (p / "terraform.tfstate").is_file())

    def _inputs_path(self, module: str, workspace: str) -> Path:
        return self.inputs_root / module / (workspace + INPUTS_SUFFIX)

    def save_inputs(self, module: str, workspace: str, inputs: dict[str, Any]) -> None:
        """Write the inputs file with mode 0600."""
        write_private(self._inputs_path(module, workspace), json.dumps(inputs).encode())

    def load_inputs(self, module: str, workspace: str) -> dict[str, Any] | None:
        """Read the inputs file, if any."""
        try:
            doc = json.loads(self._inputs_path(module, workspace).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise BackendError(f"cannot read the stored inputs: {e}") from e
        return doc if isinstance(doc, dict) else None

    def delete_inputs(self, module: str, workspace: str) -> None:
        """Remove the inputs file."""
        self._inputs_path(module, workspace).unlink(missing_ok=True)

    def lock_info(self, module: str, workspace: str) -> dict[str, str] | None:
        """The local backend's lock lives in process memory and flock; not visible here."""
        return None

    def check(self) -> None:
        """The state folder must be writable."""
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not os.access(self.root, os.W_OK):
                raise BackendError(f"state folder {self.root} is not writable")
        except OSError as e:
            raise BackendError(f"state folder {self.root}: {e.strerror}") from e


def make_backend(config: Config) -> StateBackend:
    """The backend the configuration names."""
    if config.backend == "s3":
        raise ConfigError("the s3 backend is not built yet")
    return LocalBackend(config.state_dir)
