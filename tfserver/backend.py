"""Where state lives: the backend settings terraform gets, and state reads without terraform.

Modules carry no backend block; the server writes one into each working copy
(`tfserver_override.tf.json`) and passes the rest as `-backend-config` values at `init`.
Reading outputs straight from the state object makes a GET fast and lock-free.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from .config import Config, S3Settings
from .errors import Unavailable
from .files import create_private, private_dir, write_private

logger = logging.getLogger(__name__)

INPUTS_SUFFIX = ".inputs.json"
STATE_NAME = "terraform.tfstate"


class BackendError(Unavailable):
    """The state store cannot be reached or answered an error (503)."""


@dataclass(frozen=True)
class Snapshot:
    """What a GET of an instance shows: its state, and the lock held on it, if any.
    `stale` when the state is the last complete one while a newer one is being written
    (or was left half written by a killed run)."""

    state: dict[str, Any] | None
    lock: dict[str, str] | None
    stale: bool = False


class ObjectStore(Protocol):
    """Small documents by key beside the state: run records, event logs, saved plans,
    idempotency keys. Keys are `/`-separated; listings are of one folder (a prefix that
    ends with `/`), in key order."""

    def put(self, key: str, data: bytes) -> None:
        """Write (or replace) the object, readable by the server only."""
        ...

    def put_new(self, key: str, data: bytes) -> bool:
        """Write the object only if there is none yet; False if there was (atomic)."""
        ...

    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is none."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object (no error when it is gone already)."""
        ...

    def keys(self, folder: str, *, start_after: str = "", limit: int = 1000) -> list[str]:
        """Names (not whole keys) in the folder after `start_after`, in order."""
        ...


class StateBackend(Protocol):
    """What the service needs of a state store."""

    name: str
    objects: ObjectStore

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

    def snapshot(self, module: str, workspace: str) -> Snapshot:
        """State and lock of a workspace, read together."""
        ...

    def close(self) -> None:
        """Release what the backend holds (threads, connections)."""
        ...


class LocalObjects:
    """Objects as 0600 files under a 0700 folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # Folders known to exist (private): a run writes several objects into few folders.
        self._folders: set[Path] = set()

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"bad object key {key!r}")
        return self.root.joinpath(*parts)

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
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
            except FileNotFoundError:
                self._folders.discard(path.parent)  # removed meanwhile: made again
                write_private(path, data)
        except OSError as e:
            raise BackendError(f"cannot write {key}: {e.strerror}") from e

    def put_new(self, key: str, data: bytes) -> bool:
        """Create the file only if absent (see `files.create_private`)."""
        try:
            return create_private(self._path(key), data)
        except OSError as e:
            raise BackendError(f"cannot write {key}: {e.strerror}") from e

    def get(self, key: str) -> bytes | None:
        """The file's bytes."""
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise BackendError(f"cannot read {key}: {e.strerror}") from e

    def delete(self, key: str) -> None:
        """Remove the file."""
        self._path(key).unlink(missing_ok=True)

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
        self.root = state_dir / "state"
        self.inputs_root = state_dir / "inputs"
        self.objects: ObjectStore = LocalObjects(state_dir)

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
        path = self._state_path(module, workspace)
        for attempt in range(3):
            doc = _read_json(path)
            if not isinstance(doc, _Unreadable):
                return doc, False
            time.sleep(0.01 * (attempt + 1))  # caught mid-write: a moment may finish it
        backup = _read_json(path.with_name(STATE_NAME + ".backup"))
        if isinstance(backup, dict):
            return backup, True
        return None, False  # a first write that never completed: no instance yet

    def exists(self, module: str, workspace: str) -> bool:
        """A state is there: a state file that is not empty (an empty one is what a kill
        mid-write leaves), or terraform's backup of the last complete one."""
        path = self._state_path(module, workspace)
        try:
            if path.stat().st_size > 0:
                return True
        except FileNotFoundError:
            return False
        return path.with_name(STATE_NAME + ".backup").is_file()

    def workspaces(self, module: str) -> list[str]:
        """Folders that hold a state file."""
        base = self._module_dir(module)
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if (p / STATE_NAME).is_file())

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

    def snapshot(self, module: str, workspace: str) -> Snapshot:
        """The state file; local locks are not visible from outside terraform."""
        state, stale = self.read(module, workspace)
        return Snapshot(state, None, stale)

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


class S3Objects:
    """Objects under `<prefix>/` in the state bucket (server-side encrypted like state)."""

    def __init__(self, s3: Any, bucket: str, prefix: str) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.prefix = prefix

    def put(self, key: str, data: bytes) -> None:
        """PUT the object."""
        with _aws(f"S3 cannot write {key}"):
            self.s3.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)

    def put_new(self, key: str, data: bytes) -> bool:
        """A conditional PUT (`If-None-Match: *`): S3 answers 412 when the key exists."""
        with _aws(f"S3 cannot write {key}"):
            try:
                self.s3.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data,
                                   IfNoneMatch="*")
            except ClientError as e:
                code = str(e.response.get("Error", {}).get("Code"))
                if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                    return False
                raise
        return True

    def get(self, key: str) -> bytes | None:
        """GET the object, or None."""
        with _aws(f"S3 cannot read {key}"):
            try:
                return bytes(self.s3.get_object(Bucket=self.bucket,
                                                Key=self.prefix + key)["Body"].read())
            except ClientError as e:
                if _missing(e):
                    return None
                raise

    def delete(self, key: str) -> None:
        """DELETE the object."""
        with _aws(f"S3 cannot delete {key}"):
            self.s3.delete_object(Bucket=self.bucket, Key=self.prefix + key)

    def keys(self, folder: str, *, start_after: str = "", limit: int = 1000) -> list[str]:
        """One LIST call per 1000 names (S3 lists in key order)."""
        base = self.prefix + folder
        names: list[str] = []
        after = base + start_after if start_after else ""
        with _aws(f"S3 cannot list {folder}"):
            while len(names) < limit:
                page = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=base,
                                               Delimiter="/", StartAfter=after,
                                               MaxKeys=min(1000, limit - len(names)))
                found = [str(o["Key"])[len(base):] for o in page.get("Contents", [])]
                names += found
                if not page.get("IsTruncated") or not found:
                    break
                after = base + found[-1]
        return names


class _Unreadable:
    """The marker of a file that exists but holds no complete JSON document."""


_UNREADABLE = _Unreadable()


def _read_json(path: Path) -> dict[str, Any] | _Unreadable | None:
    """A JSON object file: its document, None when missing, or `_UNREADABLE`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise BackendError(f"cannot read local state: {e.strerror}") from e
    try:
        doc = json.loads(text)
    except ValueError:
        return _UNREADABLE
    return doc if isinstance(doc, dict) else _UNREADABLE


def s3_backend_config(settings: S3Settings, module: str) -> list[tuple[str, str]]:
    """`-backend-config` pairs for a module's state in S3 (pure; no secrets: credentials
    come from the standard AWS chain in terraform's environment)."""
    pairs = [
        ("bucket", settings.bucket),
        ("key", STATE_NAME),
        ("workspace_key_prefix", f"{settings.key_prefix}/{module}"),
        ("region", settings.region),
        ("use_lockfile", "true" if settings.use_lockfile else "false"),
    ]
    if settings.lock_table:
        pairs.append(("dynamodb_table", settings.lock_table))
    if settings.endpoint:
        endpoints = {"s3": settings.endpoint, "sts": settings.endpoint}
        if settings.lock_table:
            endpoints["dynamodb"] = settings.dynamodb_endpoint or settings.endpoint
        pairs += [
            ("endpoints", json.dumps(endpoints, sort_keys=True)),
            ("use_path_style", "true"),
            ("skip_credentials_validation", "true"),
            ("skip_requesting_account_id", "true"),
            ("skip_metadata_api_check", "true"),
            ("skip_region_validation", "true"),
        ]
    else:
        pairs.append(("encrypt", "true"))
    return pairs


class S3Backend:
    """State objects at `<prefix>/<module>/<workspace>/terraform.tfstate` in a bucket.

    Terraform locks with the S3 lock file (`<state key>.tflock`) and/or a DynamoDB item
    (`LockID = <bucket>/<state key>`); this class only reads them, to report who holds a
    lock. The inputs kept for destroy live beside, at `<prefix>/_inputs/<module>/<ws>.json`.
    """

    name = "s3"

    def __init__(self, settings: S3Settings, *, timeout: float = 10.0) -> None:
        self.settings = settings
        boto = BotoConfig(
            region_name=settings.region,
            connect_timeout=min(timeout, 5.0),
            read_timeout=timeout,
            retries={"max_attempts": 3, "mode": "standard"},
            s3={"addressing_style": "path"} if settings.endpoint else {},
        )
        self.s3 = boto3.client("s3", endpoint_url=settings.endpoint, config=boto)
        # A GET of an instance reads the state and the lock at once, not one after another.
        self._readers = ThreadPoolExecutor(max_workers=12, thread_name_prefix="s3-read")
        self.ddb = (
            boto3.client("dynamodb", endpoint_url=settings.dynamodb_endpoint or settings.endpoint,
                         config=boto)
            if settings.lock_table else None
        )
        self.objects: ObjectStore = S3Objects(self.s3, settings.bucket,
                                              f"{settings.key_prefix}/")

    def state_key(self, module: str, workspace: str) -> str:
        """The object key of a workspace's state."""
        return f"{self.settings.key_prefix}/{module}/{workspace}/{STATE_NAME}"

    def _inputs_key(self, module: str, workspace: str) -> str:
        return f"{self.settings.key_prefix}/_inputs/{module}/{workspace}.json"

    def override(self, module: str) -> dict[str, Any]:
        """An empty s3 backend block; the settings come as `-backend-config` values."""
        return {"terraform": {"backend": {"s3": {}}}}

    def init_config(self, module: str) -> list[tuple[str, str]]:
        """See `s3_backend_config`."""
        return s3_backend_config(self.settings, module)

    def _get(self, key: str) -> bytes | None:
        """An object's bytes, or None when there is no such object."""
        with _aws("S3 cannot read state"):
            try:
                return bytes(self.s3.get_object(Bucket=self.settings.bucket,
                                                Key=key)["Body"].read())
            except ClientError as e:
                if _missing(e):
                    return None
                raise

    def exists(self, module: str, workspace: str) -> bool:
        """HEAD of the state object."""
        with _aws("S3 cannot read state"):
            try:
                self.s3.head_object(Bucket=self.settings.bucket,
                                    Key=self.state_key(module, workspace))
            except ClientError as e:
                if _missing(e):
                    return False
                raise
        return True

    def read_state(self, module: str, workspace: str) -> dict[str, Any] | None:
        """GET of the state object (no terraform, no lock)."""
        return _json_object(self._get(self.state_key(module, workspace)), "the state object")

    def workspaces(self, module: str) -> list[str]:
        """Workspaces with a state object under the module's prefix."""
        prefix = f"{self.settings.key_prefix}/{module}/"
        found = []
        with _aws("S3 cannot list workspaces"):
            pages = self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.settings.bucket, Prefix=prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    ws, _, name = str(obj["Key"])[len(prefix):].partition("/")
                    if name == STATE_NAME:
                        found.append(ws)
        return sorted(found)

    def save_inputs(self, module: str, workspace: str, inputs: dict[str, Any]) -> None:
        """PUT the inputs object."""
        with _aws("S3 cannot keep the inputs"):
            self.s3.put_object(Bucket=self.settings.bucket,
                               Key=self._inputs_key(module, workspace),
                               Body=json.dumps(inputs).encode(),
                               ContentType="application/json")

    def load_inputs(self, module: str, workspace: str) -> dict[str, Any] | None:
        """GET the inputs object, if any."""
        return _json_object(self._get(self._inputs_key(module, workspace)), "the stored inputs")

    def delete_inputs(self, module: str, workspace: str) -> None:
        """DELETE the inputs object."""
        with _aws("S3 cannot delete the inputs"):
            self.s3.delete_object(Bucket=self.settings.bucket,
                                  Key=self._inputs_key(module, workspace))

    def lock_info(self, module: str, workspace: str) -> dict[str, str] | None:
        """The lock file's content, or the DynamoDB lock item's, when one is held."""
        key = self.state_key(module, workspace)
        raw: str | None = None
        if self.settings.use_lockfile:
            data = self._get(key + ".tflock")
            raw = data.decode("utf-8", "replace") if data else None
        if raw is None and self.ddb is not None:
            with _aws("DynamoDB cannot be read"):
                item = self.ddb.get_item(
                    TableName=str(self.settings.lock_table),
                    Key={"LockID": {"S": f"{self.settings.bucket}/{key}"}},
                    ConsistentRead=True,
                ).get("Item")
            raw = (item or {}).get("Info", {}).get("S")
        if not raw:
            return None
        try:
            doc = json.loads(raw)
        except ValueError:
            return {"info": "unreadable lock record"}
        return {str(k).lower(): str(v) for k, v in doc.items() if v not in (None, "")}

    def snapshot(self, module: str, workspace: str) -> Snapshot:
        """State and lock, fetched concurrently (the latency of one round trip)."""
        state = self._readers.submit(self.read_state, module, workspace)
        lock = self._readers.submit(self.lock_info, module, workspace)
        return Snapshot(state.result(), lock.result())

    def check(self) -> None:
        """HEAD the bucket, and describe the lock table when there is one."""
        with _aws("state store"):
            self.s3.head_bucket(Bucket=self.settings.bucket)
            if self.ddb is not None:
                self.ddb.describe_table(TableName=str(self.settings.lock_table))

    def close(self) -> None:
        """Stop the reader threads."""
        self._readers.shutdown(wait=True)


def _missing(error: ClientError) -> bool:
    """True when S3 says the object does not exist."""
    return str(error.response.get("Error", {}).get("Code")) in ("NoSuchKey", "404", "NotFound")


@contextmanager
def _aws(what: str) -> Iterator[None]:
    """Translate botocore's errors into `BackendError` (503)."""
    try:
        yield
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", "error"))
        raise BackendError(f"{what}: {code}") from e
    except BotoCoreError as e:
        raise BackendError(f"{what}: cannot be reached ({type(e).__name__})") from e


def _json_object(data: bytes | None, what: str) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise BackendError(f"{what} is not JSON") from e
    return doc if isinstance(doc, dict) else None


def make_backend(config: Config) -> StateBackend:
    """The backend the configuration names."""
    if isinstance(config.backend, S3Settings):
        return S3Backend(config.backend)
    return LocalBackend(config.state_dir)
