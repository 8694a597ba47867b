"""Remote state in S3 with locking, on moto's server and the real terraform."""

from __future__ import annotations

import itertools
import os
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from support import Jwks, Moto, Signer, bearer, start_server, terraform_shim
from test_concurrency import churn, intervals, put_slow
from tfserver.config import S3Settings
from tfserver.storage.s3 import s3_backend_config

MODES = {
    "dynamodb": {"TF_STATE_LOCK_TABLE": "locks", "TF_STATE_USE_LOCKFILE": "false"},
    "lockfile": {"TF_STATE_USE_LOCKFILE": "true"},
    "both": {"TF_STATE_LOCK_TABLE": "locks", "TF_STATE_USE_LOCKFILE": "true"},
}


@pytest.fixture()
def store(moto: Moto) -> Iterator[dict[str, str]]:
    """A fresh bucket and lock table; the environment a tfserver needs to use them."""
    bucket = f"tfstate-{uuid.uuid4().hex[:12]}"
    moto.client("s3").create_bucket(Bucket=bucket)
    ddb = moto.client("dynamodb")
    if "locks" not in ddb.list_tables()["TableNames"]:
        ddb.create_table(TableName="locks",
                         KeySchema=[{"AttributeName": "LockID", "KeyType": "HASH"}],
                         AttributeDefinitions=[{"AttributeName": "LockID",
                                                "AttributeType": "S"}],
                         BillingMode="PAY_PER_REQUEST")
    yield {"TFSERVER_BACKEND": "s3", "TF_STATE_BUCKET": bucket, "TF_STATE_REGION": "us-east-1",
           "TF_STATE_ENDPOINT": moto.url, "TF_STATE_KEY_PREFIX": "tfs", **moto.aws_env()}


def keys(moto: Moto, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in
                  moto.client("s3").list_objects_v2(Bucket=bucket).get("Contents", []))


def lock_rows(moto: Moto, bucket: str) -> list[str]:
    """DynamoDB lock items of this bucket (not the `-md5` digest items terraform keeps)."""
    items = moto.client("dynamodb").scan(TableName="locks")["Items"]
    return [i["LockID"]["S"] for i in items
            if i["LockID"]["S"].startswith(bucket + "/") and not i["LockID"]["S"].endswith("-md5")]


def assert_no_locks(moto: Moto, bucket: str) -> None:
    assert not [k for k in keys(moto, bucket) if k.endswith(".tflock")]
    assert lock_rows(moto, bucket) == []


@pytest.mark.parametrize("mode", sorted(MODES))
def test_apply_get_destroy_in_each_lock_mode(tmp: Path, moto: Moto, store: dict[str, str],
                                             mode: str) -> None:
    shim, log = terraform_shim(tmp)
    srv = start_server(tmp, env={**store, **MODES[mode], "TFSERVER_TERRAFORM": str(shim)})
    bucket = store["TF_STATE_BUCKET"]
    try:
        ready = srv.request("GET", "/readyz").json
        assert ready["backend"] == "s3: ok"
        r = srv.request("PUT", "/basic/remote", {"name": "in-s3", "token": "s3-secret-token"})
        assert r.status == 201, r.body
        assert "tfs/basic/local.remote/terraform.tfstate" in keys(moto, bucket)
        assert "tfs/_inputs/basic/local.remote.json" in keys(moto, bucket)
        assert srv.request("PUT", "/basic/remote", {"name": "again"}).status == 200
        calls = len(log.read_text().splitlines())
        got = srv.request("GET", "/basic/remote")
        assert got.status == 200 and got.json["outputs"]["name"] == "again"
        assert got.json["serial"] >= 2 and "lock" not in got.json
        listed = srv.request("GET", "/basic").json["instances"]
        assert {"instance": "remote", "href": "/basic/remote"} in listed
        assert len(log.read_text().splitlines()) == calls  # reads ran no terraform
        assert_no_locks(moto, bucket)
        made = churn(srv, "par", 4)  # workspaces made and dropped at once
        assert made == [(201, 200)] * 4, (made, [line for line in srv.lines if any(
            w in line for w in ('"warning"', '"error"'))][-6:])
        assert srv.request("DELETE", "/basic/remote").status == 200
        assert srv.request("GET", "/basic/remote").status == 404
        # nothing of the instance is left but its run history (kept TFSERVER_RUN_RETENTION)
        assert [k for k in keys(moto, bucket) if "remote" in k and "/_runs/" not in k] == []
        assert_no_locks(moto, bucket)
    finally:
        srv.stop()


def test_two_replicas_on_one_bucket_never_overlap(tmp: Path, moto: Moto,
                                                  store: dict[str, str]) -> None:
    """Both keep the default replica id (the host name), as two servers on one host
    would: each once took the other's lock mid-apply for its own (app/ownlock.py)."""
    env = {**store, **MODES["both"]}
    one = start_server(tmp / "one", env=env)
    two = start_server(tmp / "two", env=env)
    journal = tmp / "journal"
    bucket = store["TF_STATE_BUCKET"]
    s3 = moto.client("s3")
    key = "tfs/slow/local.shared/terraform.tfstate"

    def serial() -> int:
        import json
        return int(json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())["serial"])

    try:
        assert put_slow(one, "shared", journal, "first", 0).status == 201
        before = serial()
        with ThreadPoolExecutor(6) as pool:
            futures = {
                f"r{i}": pool.submit(put_slow, (one, two)[i % 2], "shared", journal, f"r{i}",
                                     0.5, i * 0.15)
                for i in range(12)
            }
            answers = {tag: f.result(timeout=300) for tag, f in futures.items()}
        statuses = {tag: a.status for tag, a in answers.items()}
        assert set(statuses.values()) <= {200, 409}, statuses
        won = {tag for tag, s in statuses.items() if s == 200}
        lost = set(statuses) - won
        assert won and lost, statuses  # the race really happened, and both outcomes showed
        for tag in lost:
            problem = answers[tag].json
            assert answers[tag].header("Retry-After")
            assert "being changed" in problem["detail"] or "locked" in problem["detail"]
        ran = set(intervals(journal)) - {"first"}
        assert ran == won  # a refused request ran nothing; every accepted one ran once
        spans = sorted(intervals(journal).values())
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end, spans
        assert serial() - before == len(won)  # one state write per apply, none lost
        assert_no_locks(moto, bucket)
    finally:
        one.stop()
        two.stop()


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the direct children of `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append((int(entry.name), cmd))
        except (OSError, ValueError, IndexError):
            continue
    return found


def test_killed_apply_leaves_a_lock_that_an_admin_clears(tmp: Path, moto: Moto,
                                                         store: dict[str, str]) -> None:
    signer = Signer("s3-admin")
    jwks = Jwks()
    jwks.publish(signer)
    env = {**store, **MODES["both"], "COGNITO_ISSUER": Signer.ISSUER, "JWK_URL": jwks.url}
    srv = start_server(tmp, env=env)
    admin = bearer(signer.token("ops", "tfserver/admin"))
    writer = bearer(signer.token("ops", "tfserver/slow.write"))
    journal = tmp / "journal"
    try:
        def put(tag: str, seconds: float, headers: dict[str, str]) -> Any:
            return srv.request("PUT", "/slow/killed",
                               {"seconds": seconds, "journal": str(journal), "tag": tag},
                               headers=headers)

        assert put("seed", 0, admin).status == 201
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(put, "victim", 60, admin)
            deadline = time.monotonic() + 30
            while not (journal.exists() and "start victim" in journal.read_text()):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            victims = [p for p, cmd in children(srv.proc.pid) if " apply " in f" {cmd} "]
            assert len(victims) == 1
            os.killpg(victims[0], signal.SIGKILL)  # terraform and its provisioner
            answer = running.result(timeout=60)
        assert answer.status == 502, answer.body
        assert "killed by signal 9" in answer.json["detail"]

        shown = srv.request("GET", "/slow/killed", headers=admin).json
        assert shown["status"] == "locked"
        lock = shown["lock"]
        assert lock["operation"] == "OperationTypeApply" and lock["id"]
        assert lock_rows(moto, store["TF_STATE_BUCKET"]) or any(
            k.endswith(".tflock") for k in keys(moto, store["TF_STATE_BUCKET"]))

        blocked = put("blocked", 0, admin)
        assert blocked.status == 409 and blocked.json["lock"]["id"] == lock["id"]
        assert blocked.header("Retry-After")

        r = srv.request("DELETE", "/slow/killed/lock", {"lock_id": lock["id"]}, headers=writer)
        assert r.status == 403  # only an admin may break a lock
        r = srv.request("DELETE", "/slow/killed/lock", {"lock_id": "not-the-id"}, headers=admin)
        assert r.status == 409
        r = srv.request("DELETE", "/slow/killed/lock", {}, headers=admin)
        assert r.status == 400
        r = srv.request("DELETE", "/slow/killed/lock", {"lock_id": lock["id"]}, headers=admin)
        assert r.status == 200, r.body
        assert "lock" not in srv.request("GET", "/slow/killed", headers=admin).json
        assert_no_locks(moto, store["TF_STATE_BUCKET"])
        assert put("after", 0, admin).status == 200
        assert srv.request("DELETE", "/slow/killed", headers=admin).status == 200
    finally:
        srv.stop()
        jwks.close()


def test_unreachable_bucket_is_not_ready(tmp: Path, moto: Moto, store: dict[str, str]) -> None:
    srv = start_server(tmp, env={**store, "TF_STATE_BUCKET": "no-such-bucket-here"},
                       wait_modules=False)
    try:
        deadline = time.monotonic() + 20
        while True:
            r = srv.request("GET", "/readyz")
            if all(v == "ready" for v in r.json.get("modules", {}).values()) or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert r.status == 503
        assert r.json["backend"].startswith("s3: state store")
    finally:
        srv.stop()


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (S3Settings(bucket="b", region="eu-west-1"),
         [("bucket", "b"), ("key", "terraform.tfstate"),
          ("workspace_key_prefix", "tfserver/demo"), ("region", "eu-west-1"),
          ("use_lockfile", "true"), ("encrypt", "true")]),
        (S3Settings(bucket="b", region="r", key_prefix="p/q", lock_table="t",
                    use_lockfile=False),
         [("bucket", "b"), ("key", "terraform.tfstate"), ("workspace_key_prefix", "p/q/demo"),
          ("region", "r"), ("use_lockfile", "false"), ("dynamodb_table", "t"),
          ("encrypt", "true")]),
        (S3Settings(bucket="b", region="nyc3", endpoint="https://nyc3.digitaloceanspaces.com"),
         [("bucket", "b"), ("key", "terraform.tfstate"),
          ("workspace_key_prefix", "tfserver/demo"), ("region", "nyc3"),
          ("use_lockfile", "true"),
          ("endpoints", '{"s3": "https://nyc3.digitaloceanspaces.com", '
                        '"sts": "https://nyc3.digitaloceanspaces.com"}'),
          ("use_path_style", "true"), ("skip_credentials_validation", "true"),
          ("skip_requesting_account_id", "true"), ("skip_metadata_api_check", "true"),
          ("skip_region_validation", "true")]),
        (S3Settings(bucket="b", region="r", lock_table="t", endpoint="http://s3",
                    dynamodb_endpoint="http://ddb"),
         [("bucket", "b"), ("key", "terraform.tfstate"),
          ("workspace_key_prefix", "tfserver/demo"), ("region", "r"), ("use_lockfile", "true"),
          ("dynamodb_table", "t"),
          ("endpoints", '{"dynamodb": "http://ddb", "s3": "http://s3", "sts": "http://s3"}'),
          ("use_path_style", "true"), ("skip_credentials_validation", "true"),
          ("skip_requesting_account_id", "true"), ("skip_metadata_api_check", "true"),
          ("skip_region_validation", "true")]),
    ],
)
def test_s3_backend_config(settings: S3Settings, expected: list[tuple[str, str]]) -> None:
    assert s3_backend_config(settings, "demo") == expected
