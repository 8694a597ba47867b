"""State in S3 (with a DynamoDB table or S3 lock file), and objects in the same bucket.
AWS errors are translated here, once, into `BackendError`."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from ..config import S3Settings
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

logger = logging.getLogger(__name__)

#: A state object this small may hold no instance and is read to tell; terraform's empty
#: state (what a create killed before its first resource leaves) is about 180 bytes, and
#: one with a resource or an output is larger, but check results can pad an empty one.
SMALL_STATE = 4096


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

    def put_copy(self, key: str, data: bytes, source: str) -> None:
        """A PUT of the bytes (a copy in S3 is a request too)."""
        self.put(key, data)

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
    lock. The inputs kept for destroy live beside, in the objects (`KeptInputs`):
    `<prefix>/_inputs/<module>/<ws>.json`.
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
        self.inputs = KeptInputs(self.objects)

    def state_key(self, module: str, workspace: str) -> str:
        """The object key of a workspace's state."""
        return f"{self.settings.key_prefix}/{module}/{workspace}/{STATE_NAME}"

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
        """The state object holds an instance (a GET: an empty state is no instance)."""
        return holds_instance(self.read_state(module, workspace))

    def phantom(self, module: str, workspace: str) -> bool:
        """A state object is there that holds no instance."""
        data = self._get(self.state_key(module, workspace))
        return data is not None and not holds_instance(_json_object(data, "the state object"))

    def read_state(self, module: str, workspace: str) -> dict[str, Any] | None:
        """GET of the state object (no terraform, no lock)."""
        return _json_object(self._get(self.state_key(module, workspace)), "the state object")

    def workspaces(self, module: str) -> list[str]:
        """Workspaces under the module's prefix whose state object holds an instance:
        one listing, and a GET of each small object only (see `SMALL_STATE`)."""
        prefix = f"{self.settings.key_prefix}/{module}/"
        found: list[str] = []
        small: list[str] = []
        with _aws("S3 cannot list workspaces"):
            pages = self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.settings.bucket, Prefix=prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    ws, _, name = str(obj["Key"])[len(prefix):].partition("/")
                    if name == STATE_NAME:
                        (small if int(obj.get("Size", 0)) <= SMALL_STATE else found).append(ws)
        held = self._readers.map(lambda ws: self.exists(module, ws), small)
        found.extend(ws for ws, instance in zip(small, held, strict=True) if instance)
        return sorted(found)

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
        return _lock_fields(raw) if raw else None

    def clear_lock(self, module: str, workspace: str, lock_id: str) -> bool:
        """The lock file if its id is `lock_id`, and the DynamoDB lock item if its info
        names it (a conditional delete); what `terraform force-unlock` removes, without a
        terraform that would lock a new workspace's state to start."""
        key, bucket = self.state_key(module, workspace), self.settings.bucket
        removed = False
        if self.settings.use_lockfile:
            data = self._get(key + ".tflock")
            if data and _lock_fields(data.decode("utf-8", "replace")).get("id") == lock_id:
                with _aws("S3 cannot clear a lock"):
                    self.s3.delete_object(Bucket=bucket, Key=key + ".tflock")
                removed = True
        if self.ddb is not None:
            with _aws("DynamoDB cannot clear a lock"):
                try:
                    self.ddb.delete_item(
                        TableName=str(self.settings.lock_table),
                        Key={"LockID": {"S": f"{bucket}/{key}"}},
                        ConditionExpression="contains(Info, :id)",
                        ExpressionAttributeValues={":id": {"S": f'"ID":"{lock_id}"'}})
                    removed = True
                except ClientError as e:
                    if e.response.get("Error", {}).get("Code") != \
                            "ConditionalCheckFailedException":
                        raise
        return removed

    def snapshot(self, module: str, workspace: str) -> Snapshot:
        """State and lock, fetched concurrently (the latency of one round trip)."""
        state = self._readers.submit(self.read_state, module, workspace)
        lock = self._readers.submit(self.lock_info, module, workspace)
        return Snapshot(state.result(), lock.result())

    def archive(self, module: str, workspace: str, at: float) -> str:
        """The state object copied to `<prefix>/_archive/<module>/<ws>.<stamp>.tfstate`,
        then deleted with its lock file and DynamoDB items (the lock, the digest: a new
        state of the name would not match the old digest)."""
        key, bucket = self.state_key(module, workspace), self.settings.bucket
        target = (f"{self.settings.key_prefix}/{ARCHIVE}/{module}/"
                  f"{workspace}.{archive_stamp(at)}.tfstate")
        if not self.exists(module, workspace):
            target = ""
        with _aws("S3 cannot move the state aside"):
            if target:
                self.s3.copy_object(Bucket=bucket, Key=target,
                                    CopySource={"Bucket": bucket, "Key": key})
            self.s3.delete_object(Bucket=bucket, Key=key)
            self.s3.delete_object(Bucket=bucket, Key=key + ".tflock")
        if self.ddb is not None:
            with _aws("DynamoDB cannot be written"):
                for lock_id in (f"{bucket}/{key}", f"{bucket}/{key}-md5"):
                    self.ddb.delete_item(TableName=str(self.settings.lock_table),
                                         Key={"LockID": {"S": lock_id}})
        return f"s3://{bucket}/{target}" if target else ""

    def purge_archives(self, before: float) -> int:
        """Delete the archived state objects made before `before`."""
        prefix = f"{self.settings.key_prefix}/{ARCHIVE}/"
        removed = 0
        with _aws("S3 cannot purge archives"):
            pages = self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.settings.bucket, Prefix=prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    made = archive_time(str(obj["Key"]).rpartition("/")[2])
                    if made is not None and made < before:
                        self.s3.delete_object(Bucket=self.settings.bucket, Key=obj["Key"])
                        removed += 1
        return removed

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


def _lock_fields(raw: str) -> dict[str, str]:
    """A lock's record (the lock file's content, or the DynamoDB item's `Info`), its
    field names in lower case; an unreadable one says so."""
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        return {"info": "unreadable lock record"}
    return {str(k).lower(): str(v) for k, v in doc.items() if v not in (None, "")}


def _json_object(data: bytes | None, what: str) -> dict[str, Any] | None:
    if not data:
        return None  # none, or an empty object: no state
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise BackendError(f"{what} is not JSON") from e
    return doc if isinstance(doc, dict) else None
