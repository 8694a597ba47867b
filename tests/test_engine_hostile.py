"""The `sqs` engine against crashes and hostile callers: a worker SIGKILLed in the middle of
a destroy, a dry run and a saved plan's apply; an API replica killed during a synchronous
call; bursts against the queue depth over two replicas; cancels racing each other and a
worker; another tenant's run ids; hostile messages sent straight to the queue."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_engine import Control, Start, calls, fleet, queued_runs

from support import Moto, Signer, bearer
from test_runs import ASYNC, body, sleepers, wait_run, wait_sleeping
from test_s3 import store

__all__ = ["fleet", "store"]


def slow_shim(folder: Path) -> Path:
    """A terraform that sleeps before a dry run of an instance named `dry*` (2.65 s) and
    before a destroy (2.6 s): time to kill its worker in the middle."""
    real = shutil.which("terraform")
    folder.mkdir(exist_ok=True)
    shim = folder / "slow-terraform"
    shim.write_text(f"""#!/bin/sh
echo "$*" >> "{folder / 'terraform-calls.log'}"
case "$1 $TF_WORKSPACE" in plan*.dry*) sleep 2.65 ;; esac
case "$1" in destroy) sleep 2.6 ;; esac
exec "{real}" "$@"
""")
    shim.chmod(0o755)
    return shim


def wait_no_sleepers(*seconds: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while any(sleepers(s) for s in seconds):
        assert time.monotonic() < deadline, "the dead worker's terraform never ended"
        time.sleep(0.1)


def test_a_killed_worker_resumes_a_destroy_and_a_dry_run_but_not_a_saved_plan(
        fleet: tuple[Start, str], tmp: Path) -> None:
    start, _ = fleet
    api = start("api", "api")
    first = start("w1", "worker", TFSERVER_MAX_RUNS="3",
                  TFSERVER_TERRAFORM=str(slow_shim(tmp / "w1")))
    assert api.request("PUT", "/steps/gone", body(0, "gone")).status in (200, 201)
    saved = api.request("PUT", "/steps/saved?dry_run=true", body(2.7, "saved"))
    assert saved.status == 200, saved.body
    destroy = api.request("DELETE", "/steps/gone", headers=ASYNC)
    dry = api.request("PUT", "/steps/dry?dry_run=true", body(0, "dry"), headers=ASYNC)
    apply = api.request("POST", f"/runs/{saved.json['run_id']}/apply", headers=ASYNC)
    assert [r.status for r in (destroy, dry, apply)] == [202] * 3, [destroy.body, dry.body]
    for seconds in ("2.6", "2.65", "2.7"):
        wait_sleeping(seconds, timeout=60)
    first.stop(signal.SIGKILL)  # its terraforms go on to their ends (and free the locks)
    wait_no_sleepers("2.6", "2.65", "2.7")
    second = start("w2", "worker")
    gone = wait_run(api, destroy.json["id"], timeout=120)
    assert gone["status"] == "succeeded" and gone["attempt"] == 2, gone
    assert api.request("GET", "/steps/gone").status == 404
    planned = wait_run(api, dry.json["id"], timeout=120)
    assert planned["status"] == "succeeded" and planned["attempt"] == 2, planned
    assert planned["changes"]["add"] == 3, planned
    applied = wait_run(api, apply.json["id"], timeout=120)
    assert applied["status"] == "failed" and applied["attempt"] == 1, applied
    assert "saved plan is never applied twice" in applied["problem"]["detail"], applied
    # The dead worker's terraform applied the plan once, to its end: nothing applied it again.
    instance = api.request("GET", "/steps/saved").json
    assert instance["outputs"]["tag"] == "saved" and "lock" not in instance, instance
    assert not [c for c in calls(second) if c.startswith("apply")]
    assert api.request("PUT", "/steps/saved", body(0, "next")).status == 200


def test_the_next_worker_waits_early_for_a_dead_workers_terraform(
        fleet: tuple[Start, str]) -> None:
    # The next worker comes up at once: the message comes back while the lost run's state
    # is still locked by its terraform. Waiting for it must not use the message's receives
    # up (the queue's maxReceiveCount is 3 here) and send a live run to the DLQ.
    start, _ = fleet
    api = start("api", "api")
    fast = {"TFSERVER_SQS_VISIBILITY": "5"}  # the message comes back soon, and often
    first = start("w1", "worker", **fast)
    run = api.request("PUT", "/steps/early", body(6, "early"), headers=ASYNC).json
    wait_sleeping("6")
    first.stop(signal.SIGKILL)
    start("w2", "worker", **fast)
    record = wait_run(api, run["id"], timeout=120)
    assert record["status"] == "succeeded" and record["attempt"] == 2, record
    assert "lock" not in api.request("GET", "/steps/early").json


def test_an_api_replica_killed_during_a_synchronous_call(fleet: tuple[Start, str]) -> None:
    start, _ = fleet
    api1, api2 = start("api1", "api"), start("api2", "api")
    worker = start("w1", "worker")
    key = {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
    doc = body(2.4, "sync")
    def call() -> None:
        with contextlib.suppress(Exception):  # its replica dies under it
            api1.request("PUT", "/steps/sk", doc, headers=key)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    wait_sleeping("2.4")
    api1.stop(signal.SIGKILL)
    caller.join(30)
    retry = api2.request("PUT", "/steps/sk", doc, headers=key)  # waits for the same run
    assert retry.status in (200, 201) and retry.json["outputs"]["tag"] == "sync", retry.body
    assert len([c for c in calls(worker) if c.startswith("apply")]) == 1


def test_a_burst_against_the_queue_depth_over_two_replicas(fleet: tuple[Start, str]) -> None:
    start, _ = fleet
    env = {"TFSERVER_QUEUE_DEPTH": "3"}
    apis = [start("api1", "api", **env), start("api2", "api", **env)]
    start("w1", "worker", **env)
    first = apis[0].request("PUT", "/steps/deep", body(3.3, "first"), headers=ASYNC)
    assert first.status == 202, first.body
    wait_sleeping("3.3")
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda i: apis[i % 2].request(
            "PUT", "/steps/deep", body(0, f"b{i}"), headers=ASYNC), range(10)))
    statuses = sorted(a.status for a in answers)
    assert statuses == [202] * 3 + [409] * 7, [a.body for a in answers]
    for a in answers:
        if a.status == 202:
            assert wait_run(apis[0], a.json["id"], timeout=120)["status"] == "succeeded"


def test_cancels_race_each_other_and_a_worker(fleet: tuple[Start, str]) -> None:
    start, _ = fleet
    apis = [start("api1", "api"), start("api2", "api")]
    worker = start("w1", "worker")
    long = apis[0].request("PUT", "/steps/cc", body(3.1, "long"), headers=ASYNC).json
    waiting = apis[0].request("PUT", "/steps/cc", body(0, "never"), headers=ASYNC).json
    wait_sleeping("3.1")
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: apis[i % 2].request(
            "POST", f"/runs/{waiting['id']}/cancel"), range(6)))
    assert all(a.status in (202, 409) for a in answers), [a.body for a in answers]
    assert any(a.status == 202 for a in answers)
    for a in answers:
        if a.status == 202:
            assert a.json["status"] == "canceled", a.body
    assert wait_run(apis[1], long["id"])["status"] == "succeeded"
    assert wait_run(apis[1], waiting["id"])["status"] == "canceled"
    # A cancel racing a worker taking the run: it ends canceled, whichever came first (a
    # worker acts on a cancel at its next heartbeat, 2 s: the run lasts longer).
    for i in range(3):
        run = apis[i % 2].request("PUT", "/steps/cw", body(1.5, f"cw{i}"), headers=ASYNC).json
        r = apis[(i + 1) % 2].request("POST", f"/runs/{run['id']}/cancel")
        assert r.status == 202, r.body
        assert wait_run(apis[0], run["id"], timeout=60)["status"] == "canceled"
    instance = apis[0].request("GET", "/steps/cc").json
    assert "lock" not in instance and instance["outputs"]["tag"] == "long", instance
    assert not any("never" in c for c in calls(worker))


def test_another_tenants_runs_are_404_on_every_route(fleet: tuple[Start, str], tmp: Path
                                                     ) -> None:
    from support import Jwks

    start, _ = fleet
    signer, jwks = Signer("engine-key"), Jwks()
    jwks.publish(signer)
    env = {"COGNITO_ISSUER": Signer.ISSUER, "JWK_URL": jwks.url}
    try:
        api = start("api", "api", **env)
        start("w1", "worker", **env)
        mine = bearer(signer.token("tenant-a", "tfserver/steps.write"))
        theirs = bearer(signer.token("tenant-b", "tfserver/steps.write"))
        plan = api.request("PUT", "/steps/t?dry_run=true", body(0, "a"), headers=mine)
        assert plan.status == 200, plan.body
        run_id = plan.json["run_id"]
        for method, path in (("GET", f"/runs/{run_id}"), ("GET", f"/runs/{run_id}/events"),
                             ("POST", f"/runs/{run_id}/cancel"),
                             ("POST", f"/runs/{run_id}/apply")):
            r = api.request(method, path, headers=theirs)
            assert r.status == 404, (method, path, r.body)
        listed = api.request("GET", "/runs", headers=theirs).json
        assert run_id not in json.dumps(listed)
        assert api.request("GET", f"/runs/{run_id}", headers=mine).status == 200
    finally:
        jwks.close()


def test_many_queued_runs_hold_the_tenants_bound(fleet: tuple[Start, str], tmp: Path) -> None:
    start, _ = fleet
    (tmp / "policy.toml").write_text("[defaults]\nmax_queued_per_tenant = 4\n")
    env = {"TFSERVER_POLICY": str(tmp / "policy.toml")}
    apis = [start("api1", "api", **env), start("api2", "api", **env)]
    # No worker: everything accepted waits on the queue.
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: apis[i % 2].request(
            "PUT", f"/steps/many-{i % 12}", body(0, f"m{i}"), headers=ASYNC), range(24)))
    accepted = [a for a in answers if a.status == 202]
    assert all(a.status in (202, 409, 429) for a in answers), [a.body for a in answers]
    assert 1 <= len(accepted) <= 4, [a.body for a in answers]
    start("w1", "worker", **env)
    for a in accepted:
        assert wait_run(apis[0], a.json["id"], timeout=120)["status"] == "succeeded"


def test_hostile_messages_never_crash_a_worker_and_end_in_the_dlq(
        fleet: tuple[Start, str], moto: Moto) -> None:
    start, dead_url = fleet
    api = start("api", "api")
    worker = start("w1", "worker", TFSERVER_MAX_RUNS="2")
    sqs = moto.client("sqs")
    queue_url = dead_url.replace("-dead.fifo", ".fifo")
    done = api.request("PUT", "/steps/h", body(0, "h"), headers=ASYNC).json
    assert wait_run(api, done["id"])["status"] == "succeeded"
    bodies = ["../../../etc/passwd", "x" * 250_000, "\u00e9\u4e2d" * 1000, "{\"id\": 1}",
              "0" * 32, "f" * 31]
    for i, text in enumerate(bodies):
        sqs.send_message(QueueUrl=queue_url, MessageBody=text, MessageGroupId=f"hostile-{i}",
                         MessageDeduplicationId=uuid.uuid4().hex)
    # A second message for a run that ended: deleted, the run left as it was.
    sqs.send_message(QueueUrl=queue_url, MessageBody=done["id"], MessageGroupId="dup",
                     MessageDeduplicationId=uuid.uuid4().hex)
    dead: list[str] = []
    deadline = time.monotonic() + 120
    while len(dead) < len(bodies):
        got = sqs.receive_message(QueueUrl=dead_url, WaitTimeSeconds=1,
                                  MaxNumberOfMessages=10).get("Messages", [])
        for m in got:
            dead.append(m["Body"])
            sqs.delete_message(QueueUrl=dead_url, ReceiptHandle=m["ReceiptHandle"])
        assert time.monotonic() < deadline, f"only {len(dead)} reached the DLQ"
    assert sorted(dead) == sorted(bodies)
    assert worker.proc.poll() is None and worker.request("GET", "/healthz").status == 200
    # A huge body is not logged whole (but by botocore's own debug log of the answer).
    whole = [line[:300] for line in worker.lines
             if "x" * 1000 in line and '"logger": "botocore' not in line]
    assert not whole, whole
    assert wait_run(api, done["id"])["status"] == "succeeded"
    again = api.request("PUT", "/steps/h", body(0, "after"), headers=ASYNC).json
    assert wait_run(api, again["id"])["status"] == "succeeded"


def test_a_huge_body_is_not_logged_whole(tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tfserver.runs.sqs import Message

    (_, queued, build), _ = queued_runs(tmp, [])
    caplog.set_level(logging.DEBUG)
    assert queued.take(Message("x" * 250_000, "receipt", 1), build) is False
    assert caplog.records and "x" * 1000 not in caplog.text


def test_a_second_cancel_racing_the_first_sees_the_canceled_record(tmp: Path) -> None:
    (runs, queued, _), stored = queued_runs(tmp, [])
    record, _ = stored(replica="queue")
    # The first cancel has claimed the run and not yet stored its end.
    runs.store.objects.put(f"_runs/claims/{record.id}.1", b'{"at": 0}')

    def first_ends() -> None:
        time.sleep(0.3)
        ended = runs.store.get(record.id)
        ended.status, ended.finished_at = "canceled", time.time()
        runs.store.save(ended)

    threading.Thread(target=first_ends, daemon=True).start()
    second = queued.cancel(record.id)
    assert second is not None and second.status == "canceled", second


def test_a_lost_runs_lock_is_waited_for_not_handed_back(tmp: Path) -> None:
    import datetime as dt

    from tfserver.runs.queued import QueuedRuns

    ran: list[str] = []
    (runs, _, build), stored = queued_runs(tmp, ran)
    held = [3]  # the dead worker's terraform frees the lock after three looks

    def lock_of(record: object) -> dict[str, str] | None:
        held[0] -= 1
        created = dt.datetime.fromtimestamp(time.time() - 5, dt.UTC)
        return {"id": "lock-1", "created": created.strftime("%Y-%m-%dT%H:%M:%S.%fZ")} \
            if held[0] > 0 else None

    queued = QueuedRuns(runs, None, queue_depth=8, resume_lost=1,  # type: ignore[arg-type]
                        lock_of=lock_of, unlock=lambda r, i: False, stale_lock_after=60)
    record, message = stored(replica="w1", status="running", started_at=time.time() - 20,
                             heartbeat_at=time.time() - 60)
    assert queued.take(message, build) is True
    assert ran == [record.id] and held[0] <= 0
    done = runs.store.get(record.id)
    assert done.status == "succeeded" and done.attempt == 2, done


def test_a_duplicate_message_does_not_stop_the_heartbeat_of_the_run(tmp: Path) -> None:
    # A second message naming a run a worker holds (a hostile or careless sender) is handed
    # back; the message of the run itself must still be kept invisible.
    from tfserver.runs.queued import QueueWorker
    from tfserver.runs.sqs import Message

    extended: list[tuple[str, int]] = []
    messages = [Message("f" * 32, "a", 1), Message("f" * 32, "b", 1)]
    release, stopping = threading.Event(), threading.Event()

    class Queue:
        def receive(self, count: int, *, visibility: int, wait: int) -> list[Message]:
            if messages:
                return [messages.pop(0)]
            time.sleep(0.05)
            return []

        def extend(self, message: Message, visibility: int) -> None:
            extended.append((message.receipt, visibility))

        def delete(self, message: Message) -> None:
            pass

    class Queued:
        queue = Queue()

        def __init__(self) -> None:
            self.stopping = stopping

        def take(self, message: Message, build: object) -> bool:
            return message.receipt == "a" and release.wait(10)

    worker = QueueWorker(Queued(), lambda r, s: None, slots=2, visibility=1,  # type: ignore
                         wait=0)
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while ("b", 5) not in extended:  # the duplicate handed back
            assert time.monotonic() < deadline
            time.sleep(0.05)
        seen = len(extended)
        time.sleep(1.0)
        assert ("a", 1) in extended[seen:], extended
    finally:
        release.set()
        worker.stop()


def test_places_hold_their_bound_under_threads_and_are_taken_over(tmp: Path) -> None:
    from tfserver.runs.places import Places
    from tfserver.storage.local import LocalObjects

    places = Places(LocalObjects(tmp / "objects"))
    waiting: set[str] = set()
    left: set[str] = set()

    def waits(run_id: str) -> bool | None:
        # A run being admitted has no record yet (None): its place is trusted.
        return True if run_id in waiting else False if run_id in left else None

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: places.take("f/", f"r{i}", 3, waits), range(16)))
    holders = {f"r{i}" for i, ok in enumerate(got) if ok}
    assert len(holders) == 3, got
    waiting |= holders
    assert not places.take("f/", "late", 3, waits)
    places.free("f/", sorted(holders)[0])
    assert places.take("f/", "late", 3, waits)
    waiting.add("late")
    waiting.discard(sorted(holders)[1])  # it left the queue without freeing its place
    left.add(sorted(holders)[1])
    assert places.take("f/", "later", 3, waits)
    assert not places.take("f/", "last", 3, waits)


def test_a_burst_of_enqueues_never_passes_the_depth_or_the_tenants_bound(tmp: Path) -> None:
    from tfserver.errors import Conflict
    from tfserver.runs.queued import QueuedRuns
    from tfserver.runs.run import Run
    from tfserver.runs.store import RunRecord, new_run_id

    (runs, _, _), _ = queued_runs(tmp, [])

    class Queue:
        def send(self, run_id: str, group: str) -> None:
            time.sleep(0.01)

    queued = QueuedRuns(runs, Queue(), queue_depth=3, resume_lost=1,  # type: ignore[arg-type]
                        lock_of=lambda r: None, unlock=lambda r, i: False,
                        stale_lock_after=60)

    def enqueue(instance: str, max_queued: int | None) -> bool:
        record = RunRecord(id=new_run_id(), module="m", instance=instance,
                           workspace=f"t.{instance}", tenant="t", subject="s",
                           operation="apply")
        try:
            queued.enqueue(Run(record, lambda r: None, lambda s: s, Control()), {},
                           what="it", max_queued=max_queued)
        except Conflict:
            return False
        return True

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda _: enqueue("deep", 5), range(24)))
    assert sum(got) == 3, got
    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda i: enqueue(f"i{i % 6}", 5), range(24)))
    assert sum(got) == 2, got  # 3 of the tenant's runs wait already
