"""A lock write whose answer is lost: the AWS SDK sends it again and terraform finds its
own lock held (seen on moto under load, and what a connection reset does in the cloud).
The run clears that lock and goes on; a lock anybody else holds is never touched. Real
terraform and moto's server, behind a proxy that loses chosen answers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from lossy_proxy import LossyProxy, start_lossy_proxy

from support import Moto, start_server
from test_s3 import (
    MODES,
    assert_no_locks,
    keys,
    lock_rows,
    store,  # noqa: F401 - the fixture
)
from tfserver.app.ownlock import lock_created, own_lock_id, terraform_who
from tfserver.terraform.output import RunResult


@pytest.fixture()
def proxy(moto: Moto) -> Iterator[LossyProxy]:
    lossy = start_lossy_proxy(moto.url)
    yield lossy
    lossy.stop()


def said(server: Any) -> list[str]:
    """The server's warnings and errors, and terraform's exits (for a failure's message)."""
    return [line[:700] for line in server.lines
            if any(w in line for w in ('"warning"', '"error"', "exited"))]


def lock_write(mode: str) -> Any:
    """Picks the request that writes the state's lock in `mode` (not a digest item)."""
    def dynamodb(method: str, path: str, headers: dict[str, str], body: bytes) -> bool:
        return headers.get("X-Amz-Target", "").endswith(".PutItem") and b"-md5" not in body \
            and b"terraform.tfstate" in body

    def lockfile(method: str, path: str, headers: dict[str, str], body: bytes) -> bool:
        return method == "PUT" and path.split("?")[0].endswith(".tflock")

    return lockfile if mode == "lockfile" else dynamodb


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_lock_written_twice_is_cleared_and_the_run_goes_on(
        tmp: Path, moto: Moto, store: dict[str, str], proxy: LossyProxy,  # noqa: F811
        mode: str) -> None:
    env = {**store, **MODES[mode], "TF_STATE_ENDPOINT": proxy.url}
    server = start_server(tmp, env=env)
    bucket = store["TF_STATE_BUCKET"]
    try:
        proxy.lose_once(lock_write(mode))
        r = server.request("PUT", "/basic/twice", {"name": "one"})
        assert r.status == 201, (r.body, said(server))
        assert len(proxy.lost) == 1, proxy.lost  # the lock write's answer was lost
        assert any("its own lock" in line for line in server.lines)
        assert_no_locks(moto, bucket)
        # A dry run (a plan takes the lock too), then the destroy, each losing one answer.
        proxy.lose_once(lock_write(mode))
        r = server.request("PUT", "/basic/twice?dry_run=true", {"name": "two"})
        assert r.status == 200, (r.body, said(server))
        proxy.lose_once(lock_write(mode))
        r = server.request("DELETE", "/basic/twice")
        assert r.status == 200, (r.body, said(server))
        assert len(proxy.lost) == 3, proxy.lost
        assert lock_rows(moto, bucket) == [], said(server)
        assert_no_locks(moto, bucket)
        assert server.request("GET", "/basic/twice").status == 404
        assert [k for k in keys(moto, bucket) if "/_replicas/" in k]  # its name
    finally:
        server.stop()
    assert [k for k in keys(moto, bucket) if "/_replicas/" in k] == []  # a clean stop


@pytest.mark.parametrize("ids", [("a", "b"), ("twin", "twin")])
def test_two_replicas_on_one_host_never_clear_a_lock_as_their_own(
        tmp: Path, moto: Moto, store: dict[str, str], proxy: LossyProxy,  # noqa: F811
        ids: tuple[str, str]) -> None:
    """Two replicas of one user on one host take locks with the same `Who`: a lock taken
    while one's terraform ran may be the other's (its run not stored yet), so neither
    clears one. The lost write then leaves the lock, as before: 409, the lock shown.
    The same holds for two that share a replica id (two servers on one host left to the
    default, the host name): one cleared the other's lock mid-apply, and its own
    terraform then applied beside it (test_s3's race saw a 502)."""
    env = {**store, **MODES["dynamodb"], "TF_STATE_ENDPOINT": proxy.url}
    a = start_server(tmp / "a", env={**env, "TFSERVER_REPLICA_ID": ids[0]})
    b = start_server(tmp / "b", env={**env, "TFSERVER_REPLICA_ID": ids[1]})
    bucket = store["TF_STATE_BUCKET"]
    try:
        assert b.request("PUT", "/basic/on-b", {"name": "b"}).status == 201
        assert a.request("PUT", "/basic/shared", {"name": "one"}).status == 201
        proxy.lose_once(lock_write("dynamodb"))
        r = a.request("PUT", "/basic/shared", {"name": "two"})
        assert r.status == 409 and len(proxy.lost) == 1, r.body
        assert not any("its own lock" in line for line in a.lines)
        assert lock_rows(moto, bucket) == [f"{bucket}/tfs/basic/local.shared/terraform.tfstate"]
    finally:
        a.stop()
        b.stop()


def test_a_lock_another_holds_is_never_cleared(tmp: Path, moto: Moto,
                                               store: dict[str, str]) -> None:  # noqa: F811
    """A lock written before the run began (a hand-run terraform, a killed run) stays:
    409 naming it, the lock still there."""
    env = {**store, **MODES["dynamodb"]}
    server = start_server(tmp, env=env)
    bucket = store["TF_STATE_BUCKET"]
    try:
        assert server.request("PUT", "/basic/held", {"name": "one"}).status == 201
        row = f"{bucket}/tfs/basic/local.held/terraform.tfstate"
        info = ('{"ID":"0d5e1f5e-1111-2222-3333-444455556666","Operation":"OperationTypeApply",'
                '"Info":"","Who":"root@vm","Version":"1.11.4",'
                '"Created":"2020-01-01T00:00:00Z","Path":"' + row + '"}')
        moto.client("dynamodb").put_item(TableName="locks", Item={
            "LockID": {"S": row}, "Info": {"S": info}})
        r = server.request("PUT", "/basic/held", {"name": "two"})
        assert r.status == 409, r.body
        assert r.json["lock"]["id"] == "0d5e1f5e-1111-2222-3333-444455556666"
        assert lock_rows(moto, bucket) == [row]
        # A new instance: the lock terraform takes to write its first state ("init") is
        # held: 409 too (it was a 422, "terraform rejected the inputs").
        fresh = f"{bucket}/tfs/basic/local.fresh/terraform.tfstate"
        moto.client("dynamodb").put_item(TableName="locks", Item={
            "LockID": {"S": fresh}, "Info": {"S": info.replace(row, fresh)}})
        r = server.request("PUT", "/basic/fresh", {"name": "new"})
        assert r.status == 409, r.body
        assert r.json["lock"]["operation"] == "OperationTypeApply"
        assert sorted(lock_rows(moto, bucket)) == sorted([row, fresh])
        assert not any("its own lock" in line for line in server.lines)
    finally:
        server.stop()


def locked(created: str, who: str = "root@vm", operation: str = "OperationTypeApply",
           command: str = "apply") -> RunResult:
    detail = (f"Lock Info:\n  ID:        abc\n  Path:      b/k\n  Operation: {operation}\n"
              f"  Who:       {who}\n  Version:   1.11.4\n  Created:   {created}\n  Info:\n")
    return RunResult((command,), 1, events=({"type": "diagnostic", "diagnostic": {
        "severity": "error", "summary": "Error acquiring the state lock", "detail": detail}},))


def test_only_a_lock_taken_by_that_very_process_is_its_own() -> None:
    created = "2026-12-02 02:54:35.7450315 +0000 UTC"
    at = lock_created({"created": created})
    assert at is not None and abs(at - 1796180075.7450315) < 1e-6
    assert lock_created({"created": "2026-12-02 02:54:35 +0000 UTC"}) == 1796180075.0
    assert lock_created({"created": "yesterday"}) is None
    assert lock_created({}) is None
    who = frozenset({"root@vm"})
    assert own_lock_id(locked(created), at - 1, at + 1, who) == "abc"
    assert own_lock_id(locked(created), at + 0.001, at + 1, who) is None  # before it ran
    assert own_lock_id(locked(created), at - 2, at - 1, who) is None  # after it ended
    assert own_lock_id(locked(created, who="ops@laptop"), at - 1, at + 1, who) is None
    assert own_lock_id(locked(created, operation="OperationTypePlan"), at - 1, at + 1,
                       who) is None
    assert own_lock_id(locked(created, operation="OperationTypePlan", command="plan"),
                       at - 1, at + 1, who) == "abc"
    assert own_lock_id(locked(created, command="destroy"), at - 1, at + 1, who) == "abc"
    assert own_lock_id(RunResult(("apply",), 1), at - 1, at + 1, who) is None
    assert all("@" in w for w in terraform_who())


def test_the_moto_launcher_answers_a_request_sent_again_as_it_was_first(moto: Moto) -> None:
    """The harness (tests/moto_launcher.py): an SDK's later attempt of a request gets the
    first attempt's answer; a new request is carried out (its condition fails)."""
    import uuid

    table = f"replay-{uuid.uuid4().hex[:8]}"
    ddb = moto.client("dynamodb")
    ddb.create_table(TableName=table, KeySchema=[{"AttributeName": "k", "KeyType": "HASH"}],
                     AttributeDefinitions=[{"AttributeName": "k", "AttributeType": "S"}],
                     BillingMode="PAY_PER_REQUEST")
    attempt = [1]
    invocation = uuid.uuid4().hex

    def headers(request: Any, **_: Any) -> None:
        request.headers["amz-sdk-invocation-id"] = invocation
        request.headers["amz-sdk-request"] = f"attempt={attempt[0]}; max=3"

    ddb.meta.events.register("before-send.dynamodb.PutItem", headers)

    def put() -> None:
        ddb.put_item(TableName=table, Item={"k": {"S": "x"}},
                     ConditionExpression="attribute_not_exists(k)")

    put()
    attempt[0] = 2
    put()  # the first answer again: no ConditionalCheckFailedException
    attempt[0] = 1
    with pytest.raises(ddb.exceptions.ConditionalCheckFailedException):
        put()


def test_a_run_of_this_replica_still_stored_active_is_no_holder(
        tmp: Path, moto: Moto, store: dict[str, str], proxy: LossyProxy) -> None:  # noqa: F811
    """A run's last write follows its answer, so the next request can find it stored
    active: a run of this very replica (which holds the instance's lane) does not hold
    the lock, and the run clears its own. A run stored active on another replica does:
    the lock stays (409)."""
    from tfserver.runs.store import RunRecord, new_run_id

    env = {**store, **MODES["dynamodb"], "TF_STATE_ENDPOINT": proxy.url,
           "TFSERVER_REPLICA_ID": "solo"}
    server = start_server(tmp, env=env)
    s3, bucket = moto.client("s3"), store["TF_STATE_BUCKET"]

    def stored_active(replica: str) -> None:
        record = RunRecord(new_run_id(), "basic", "stale", "local.stale", "local", "x",
                           "apply", status="running", started_at=1.0, replica=replica)
        for key in (f"_runs/records/{record.id}.json",
                    f"_runs/active/local.basic.{record.id}"):
            s3.put_object(Bucket=bucket, Key=f"tfs/{key}", Body=record.to_json())

    try:
        assert server.request("PUT", "/basic/stale", {"name": "one"}).status == 201
        stored_active("solo")
        proxy.lose_once(lock_write("dynamodb"))
        r = server.request("PUT", "/basic/stale", {"name": "two"})
        assert r.status == 200 and len(proxy.lost) == 1, (r.body, said(server))
        stored_active("elsewhere")
        proxy.lose_once(lock_write("dynamodb"))
        r = server.request("PUT", "/basic/stale", {"name": "three"})
        assert r.status == 409 and len(proxy.lost) == 2, (r.body, said(server))
    finally:
        server.stop()


class _Backend:
    """A state store with only what `OwnLocks` uses: objects, and the locks cleared."""

    def __init__(self, root: Path) -> None:
        from tfserver.storage.local import LocalObjects

        self.objects = LocalObjects(root)
        self.cleared: list[str] = []

    def clear_lock(self, module: str, workspace: str, lock_id: str) -> bool:
        self.cleared.append(lock_id)
        return True


class _Runner:
    """Terraform that finds a lock taken as it runs, by this user and host, then succeeds."""

    def __init__(self) -> None:
        self.calls = 0

    def run(self, args: Any, **_: Any) -> RunResult:
        import datetime

        self.calls += 1
        if self.calls > 1:
            return RunResult(tuple(args), 0)
        now = datetime.datetime.now(datetime.UTC)
        return locked(now.strftime("%Y-%m-%d %H:%M:%S.%f +0000 UTC"),
                      who=sorted(terraform_who())[0])


def _own_locks(backend: _Backend, replica: str) -> Any:
    from tfserver.app.ownlock import OwnLocks
    from tfserver.runs.store import RunStore

    return OwnLocks(_Runner(), backend, RunStore(backend.objects),  # type: ignore[arg-type]
                    replica, longest_run=120)


def _folders(locks: Any) -> list[str]:
    """Where `locks`' process names itself: one folder for each of its `Who`s."""
    from tfserver.app import ownlock

    return [ownlock.PRESENCE + quote(who, safe="") + "/" for who in locks.who]


def _apply(locks: Any, tmp: Path) -> RunResult:
    locks.runner.calls = 0  # its first terraform finds the lock
    return locks.run(["apply"], "basic", "local.x", "run-1", cwd=tmp,  # type: ignore[no-any-return]
                     deadline=time.monotonic() + 60, control=None, on_event=None)


def _name(backend: _Backend, folder: str, name: str, ago: float,
          until: float | None = None) -> None:
    """A name written `ago` seconds since, as a process that may run until `until`."""
    at = time.time() - ago
    backend.objects.put(folder + name, json.dumps(
        {"at": at, "until": at if until is None else until, "replica": "x"}).encode())


def test_each_server_process_names_itself_and_a_gone_one_stops_counting(
        tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One name per process (never shared by two of one replica id), written again every
    REFRESH seconds as a new object; another's name younger than a run can last (by its
    writer's run timeout or this one's) stops a clear, an older one (a process gone) is
    removed and does not."""
    from tfserver.app import ownlock

    backend = _Backend(tmp / "objects")
    alone = _own_locks(backend, "twin")
    assert _apply(alone, tmp).returncode == 0 and backend.cleared == ["abc"]
    folders = _folders(alone)
    assert all(backend.objects.keys(f) == [f"{alone.token}-1"] for f in folders)

    twin = _own_locks(backend, "twin")  # the same replica id: a name of its own
    assert _apply(twin, tmp).returncode == 1 and backend.cleared == ["abc"]
    assert _apply(alone, tmp).returncode == 1  # and neither clears one, whichever asks

    alone._written -= ownlock.REFRESH  # its name is old: the next run writes a new one
    _apply(alone, tmp)
    assert all(f"{alone.token}-2" in backend.objects.keys(f) and
               f"{alone.token}-1" not in backend.objects.keys(f) for f in folders)

    twin_name = f"{twin.token}-1"
    for folder in folders:  # written before the twin's longest run began: it may run on
        _name(backend, folder, twin_name, ago=ownlock.REFRESH + 120 - 1)
    assert _apply(alone, tmp).returncode == 1 and len(backend.cleared) == 1
    for folder in folders:  # older, but its writer's run timeout is longer than ours
        _name(backend, folder, twin_name, ago=alone.fresh_for + 1, until=time.time() + 60)
    assert _apply(alone, tmp).returncode == 1 and len(backend.cleared) == 1
    for folder in folders:  # the twin was killed long ago: its name is that old
        _name(backend, folder, twin_name, ago=alone.fresh_for + 1)
    assert _apply(alone, tmp).returncode == 0 and backend.cleared == ["abc", "abc"]
    assert all(backend.objects.keys(f) == [f"{alone.token}-2"] for f in folders)

    for folder in folders:  # a name that cannot be read may be of a running process
        backend.objects.put(folder + "damaged", b"[")
    assert _apply(alone, tmp).returncode == 1 and len(backend.cleared) == 2
    assert any("damaged beside the state cannot be read" in r.getMessage()
               for r in caplog.records)


def test_a_first_run_removes_the_names_of_processes_gone_and_a_stop_its_own(
        tmp: Path) -> None:

    backend = _Backend(tmp / "objects")
    late = _own_locks(backend, "late")
    folders = _folders(late)
    for folder in folders:  # each start leaves a name (a crash, or a stop mid-run)
        _name(backend, folder, "gone-1", ago=late.fresh_for + 1)
        _name(backend, folder, "live-1", ago=1)
    late.name_this_process()
    assert all(backend.objects.keys(f) == sorted([f"{late.token}-1", "live-1"])
               for f in folders)
    late.close()  # no terraform of it runs any longer
    assert all(backend.objects.keys(f) == ["live-1"] for f in folders)


def test_runs_that_start_at_once_leave_the_process_one_name(tmp: Path) -> None:
    """Two runs of one process starting together once wrote two names and removed the
    one just written: the process had none while its terraform ran."""
    import threading

    from tfserver.storage.local import LocalObjects

    class Slow(LocalObjects):
        puts: list[str] = []

        def put(self, key: str, data: bytes) -> None:
            self.puts.append(key)
            time.sleep(0.05)
            super().put(key, data)

    backend = _Backend(tmp / "objects")
    backend.objects = Slow(tmp / "objects")
    locks = _own_locks(backend, "solo")
    together = threading.Barrier(2)

    def start() -> None:
        together.wait(10)
        locks.name_this_process()

    threads = [threading.Thread(target=start) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    folders = _folders(locks)
    assert all(backend.objects.keys(f) == [f"{locks.token}-1"] for f in folders)
    assert len(Slow.puts) == len(folders)  # the second waited for the first's write


def test_a_process_says_once_when_another_may_run_with_its_replica_id(
        tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two servers on one host left to one replica id (the default: the host name) mark
    each other's active runs lost at start: the second says so at its first run."""
    backend = _Backend(tmp / "objects")
    _own_locks(backend, "twin").name_this_process()
    _own_locks(backend, "other").name_this_process()

    def told() -> list[str]:
        return [r.getMessage() for r in caplog.records if "TFSERVER_REPLICA_ID" in r.getMessage()]

    assert told() == []
    twin = _own_locks(backend, "twin")
    twin.name_this_process()
    _apply(twin, tmp)
    assert len(told()) == 1 and "'twin'" in told()[0]
