"""The `sqs` engine on moto's server (SQS FIFO with atomic receives, S3) with real
terraform: API replicas that never start terraform, workers that take runs one instance at
a time in order, a worker killed mid-apply whose run is resumed elsewhere, cancel of a
queued run through another replica, a worker's SIGTERM, a message that can never run."""

from __future__ import annotations

import itertools
import json
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from support import Moto, ServerProcess, start_server, terraform_shim
from test_concurrency import intervals
from test_runs import ASYNC, MODULES, body, sleepers, wait_run, wait_sleeping
from test_s3 import MODES, store

__all__ = ["store"]

Start = Callable[..., ServerProcess]


@pytest.fixture
def fleet(tmp: Path, moto: Moto, store: dict[str, str]) -> Iterator[tuple[Start, str]]:
    """Start API replicas and workers on one bucket and one FIFO queue (with its DLQ)."""
    sqs = moto.client("sqs")
    name = f"runs-{uuid.uuid4().hex[:8]}"
    dead = sqs.create_queue(QueueName=f"{name}-dead.fifo", Attributes={"FifoQueue": "true"})
    arn = sqs.get_queue_attributes(QueueUrl=dead["QueueUrl"], AttributeNames=["QueueArn"]
                                   )["Attributes"]["QueueArn"]
    url = sqs.create_queue(QueueName=f"{name}.fifo", Attributes={
        "FifoQueue": "true", "RedrivePolicy": json.dumps(
            {"deadLetterTargetArn": arn, "maxReceiveCount": "3"})})["QueueUrl"]
    started: list[ServerProcess] = []

    def start(replica: str, role: str, **env: str) -> ServerProcess:
        folder = tmp / replica
        folder.mkdir(exist_ok=True)
        shim, log = terraform_shim(folder)
        server = start_server(folder, modules_dir=MODULES, env={
            **store, **MODES["lockfile"], "TFSERVER_QUEUE": "sqs", "TFSERVER_QUEUE_URL": url,
            "TFSERVER_SQS_ENDPOINT": moto.url, "TFSERVER_SQS_VISIBILITY": "6",
            "TFSERVER_ROLE": role, "TFSERVER_REPLICA_ID": replica, "TFSERVER_KILL_GRACE": "5",
            "TFSERVER_TERRAFORM": str(shim), **env})
        server.calls_log = log  # type: ignore[attr-defined]
        started.append(server)
        return server

    yield start, str(dead["QueueUrl"])
    for server in started:
        server.stop(timeout=90)


def calls(server: ServerProcess) -> list[str]:
    """The terraform commands the server started (its shim's log)."""
    log: Path = server.calls_log  # type: ignore[attr-defined]
    return log.read_text().splitlines() if log.exists() else []


def test_api_replicas_queue_and_workers_run_one_instance_at_a_time_in_order(
        fleet: tuple[Start, str], tmp: Path) -> None:
    start, _ = fleet
    apis = [start("api1", "api"), start("api2", "api")]
    workers = [start("w1", "worker"), start("w2", "worker")]
    journal = tmp / "journal"
    ids = []
    for i in range(6):
        r = apis[i % 2].request("PUT", "/steps/order", body(0.2, f"r{i}", journal),
                                headers=ASYNC)
        assert r.status == 202, r.body
        ids.append(r.json["id"])
    queued = apis[1].request("GET", f"/runs/{ids[-1]}").json
    assert queued["status"] in ("queued", "running", "succeeded"), queued
    for run_id in ids:
        assert wait_run(apis[0], run_id, timeout=180)["status"] == "succeeded"
    spans = intervals(journal)
    assert [tag for tag, _ in sorted(spans.items(), key=lambda kv: kv[1][0])] == \
        [f"r{i}" for i in range(6)]  # in submission order
    for (_, end), (begin, _) in itertools.pairwise(sorted(spans.values())):
        assert begin >= end, spans  # one at a time
    # A synchronous call on an API replica answers as with `local`.
    r = apis[1].request("PUT", "/steps/sync", body(0, "sync"))
    assert r.status == 201 and r.json["outputs"]["tag"] == "sync", r.body
    assert apis[0].request("GET", "/steps/sync").json["outputs"]["tag"] == "sync"
    ran = {w.url: [c for c in calls(w) if c.startswith("apply")] for w in workers}
    assert sum(len(v) for v in ran.values()) == 7, ran
    for api in apis:
        assert calls(api) == [], "an API replica started terraform"
    for worker in workers:
        assert worker.request("GET", "/healthz").status == 200
        assert worker.request("GET", "/readyz").status == 200
        assert worker.request("GET", "/steps").status == 404  # the API is elsewhere
    metrics = apis[0].request("GET", "/metrics").body.decode()
    assert "tfserver_queue_waiting" in metrics and "tfserver_queue_oldest_seconds" in metrics


def test_a_killed_workers_run_is_resumed_on_another(fleet: tuple[Start, str]) -> None:
    start, _ = fleet
    api = start("api", "api")
    first = start("w1", "worker")
    run = api.request("PUT", "/steps/resume", body(2.75, "resumed"), headers=ASYNC).json
    wait_sleeping("2.75")
    first.stop(signal.SIGKILL)  # its terraform goes on to its end (and frees the lock)
    deadline = time.monotonic() + 60
    while sleepers("2.75"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    second = start("w2", "worker")
    record = wait_run(api, run["id"], timeout=120)
    assert record["status"] == "succeeded" and record["attempt"] == 2, record
    events = [json.loads(line) for line in
              api.request("GET", f"/runs/{run['id']}/events").body.splitlines()]
    resumed = [e for e in events if e["type"] == "resumed"]
    assert resumed and resumed[0]["lost_worker"] == "w1", events
    assert "lock" not in api.request("GET", "/steps/resume").json
    again = api.request("PUT", "/steps/resume", body(0, "next"))
    assert again.status == 200 and again.json["outputs"]["tag"] == "next", again.body
    assert any(c.startswith("apply") for c in calls(second))


def test_cancel_through_another_replica_sigterm_and_a_poison_message(
        fleet: tuple[Start, str], moto: Moto) -> None:
    start, dead_url = fleet
    api1, api2 = start("api1", "api"), start("api2", "api")
    worker = start("w1", "worker", TFSERVER_SHUTDOWN_GRACE="60")
    long = api1.request("PUT", "/steps/cq", body(3.5, "long"), headers=ASYNC).json
    waiting = api1.request("PUT", "/steps/cq", body(0, "waiting"), headers=ASYNC).json
    wait_sleeping("3.5")
    assert api2.request("GET", f"/runs/{waiting['id']}").json["queue_position"] == 1
    r = api2.request("POST", f"/runs/{waiting['id']}/cancel")
    assert r.status == 202 and r.json["status"] == "canceled", r.body  # at once
    # SIGTERM while the long run runs: it finishes, nothing is lost.
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(timeout=90) == 0
    assert wait_run(api1, long["id"])["status"] == "succeeded"
    assert wait_run(api1, waiting["id"])["status"] == "canceled"
    # A message for a run nobody stored can never run: it ends in the dead-letter queue.
    other = start("w2", "worker")
    sqs = moto.client("sqs")
    queue_url = dead_url.replace("-dead.fifo", ".fifo")
    sqs.send_message(QueueUrl=queue_url, MessageBody="f" * 32, MessageGroupId="poison",
                     MessageDeduplicationId=uuid.uuid4().hex)
    deadline = time.monotonic() + 90
    while True:
        got = sqs.receive_message(QueueUrl=dead_url, WaitTimeSeconds=0).get("Messages", [])
        if got:
            assert got[0]["Body"] == "f" * 32
            break
        assert time.monotonic() < deadline, "the poison message never reached the DLQ"
        time.sleep(1)
    assert other.request("GET", "/healthz").status == 200


def test_limits_hold_over_two_api_replicas(fleet: tuple[Start, str], tmp: Path) -> None:
    start, _ = fleet
    (tmp / "policy.toml").write_text("[modules.steps]\nmax_instances_per_tenant = 3\n")
    env = {"TFSERVER_POLICY": str(tmp / "policy.toml")}
    apis = [start("api1", "api", **env), start("api2", "api", **env)]
    start("w1", "worker", TFSERVER_MAX_RUNS="4", **env)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: apis[i % 2].request(
            "PUT", f"/steps/q-{i}", body(0, f"q{i}"), headers=ASYNC), range(8)))
    statuses = sorted(a.status for a in answers)
    assert statuses == [202] * 3 + [403] * 5, [a.body for a in answers]
    for a in answers:
        if a.status == 202:
            assert wait_run(apis[0], a.json["id"], timeout=120)["status"] == "succeeded"


def test_the_run_limit_holds_over_two_api_replicas(fleet: tuple[Start, str], tmp: Path) -> None:
    start, _ = fleet
    (tmp / "policy.toml").write_text("[defaults]\nmax_runs_per_tenant = 2\n")
    env = {"TFSERVER_POLICY": str(tmp / "policy.toml")}
    apis = [start("api1", "api", **env), start("api2", "api", **env)]
    start("w1", "worker", TFSERVER_MAX_RUNS="6", **env)
    journal = tmp / "journal"
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: apis[i % 2].request(
            "PUT", f"/steps/r-{i}", body(0.75, f"r{i}", journal), headers=ASYNC), range(6)))
    accepted = [a for a in answers if a.status == 202]
    assert 1 <= len(accepted) <= 2 and all(a.status in (202, 429) for a in answers), \
        [a.body for a in answers]
    for a in accepted:
        assert wait_run(apis[0], a.json["id"], timeout=120)["status"] == "succeeded"
    spans = list(intervals(journal).values())
    for a, b, c in itertools.combinations(spans, 3):  # never three at once
        assert max(a[0], b[0], c[0]) >= min(a[1], b[1], c[1]), spans
    # The slots came back with the runs' ends (on the worker): the next runs are admitted.
    r = apis[1].request("PUT", "/steps/r-0", body(0, "after"), headers=ASYNC)
    assert r.status == 202, r.body
    assert wait_run(apis[0], r.json["id"], timeout=120)["status"] == "succeeded"


# -- the worker's choices, without a queue server -------------------------------------------

class Control:
    reason: str | None = None
    killed = False

    def interrupt(self, reason: str) -> bool:
        self.reason = reason
        return True

    def kill(self, reason: str) -> None:
        self.killed = True

    def when_started(self, fn: Callable[[], None]) -> None:
        fn()


def queued_runs(tmp: Path, ran: list[str]) -> tuple[object, Callable[..., object]]:
    from tfserver.runs.lanes import Scheduler
    from tfserver.runs.queued import QueuedRuns
    from tfserver.runs.registry import Runs
    from tfserver.runs.run import Run
    from tfserver.runs.sqs import Message
    from tfserver.runs.store import RunRecord, RunStore, new_run_id
    from tfserver.storage.local import LocalObjects

    runs = Runs(RunStore(LocalObjects(tmp / "objects")), Scheduler(2, 8), replica="w2",
                kill_grace=1.0, resume_lost=1)
    queued = QueuedRuns(runs, None, queue_depth=8, resume_lost=1,  # type: ignore[arg-type]
                        lock_of=lambda r: None, unlock=lambda r, i: False,
                        stale_lock_after=60)

    def build(record: RunRecord, spec: dict[str, object]) -> Run:
        return Run(record, lambda r: ran.append(r.record.id), lambda s: s, Control())

    def stored(**fields: object) -> tuple[RunRecord, Message]:
        record = RunRecord(id=new_run_id(), module="m", instance="i", workspace="t.i",
                           tenant="t", subject="s", operation="apply", **fields)
        runs.store.create(record)
        runs.store.objects.put(f"_runs/specs/{record.id}.json", b"{}")
        return record, Message(record.id, "receipt", 2)

    return (runs, queued, build), stored


def test_a_claim_whose_worker_died_before_starting_is_taken_over(tmp: Path) -> None:
    ran: list[str] = []
    (runs, queued, build), stored = queued_runs(tmp, ran)
    record, message = stored(replica="queue")
    claim = f"_runs/claims/{record.id}.1"
    runs.store.objects.put(claim, json.dumps({"at": time.time()}).encode())
    assert queued.take(message, build) is False  # claimed a moment ago: not yet
    runs.store.objects.put(claim, json.dumps({"at": time.time() - 60}).encode())
    assert queued.take(message, build) is True
    assert ran == [record.id]
    done = runs.store.get(record.id)
    assert done.status == "succeeded" and done.attempt == 2, done
    # A message whose body is no run id (a hostile or broken sender) is handed back (the
    # dead-letter queue takes it after its last receive), and nothing is read for it.
    from tfserver.runs.sqs import Message

    for body_ in ("../../etc/passwd", "x" * 5000, "", "0" * 32):
        assert queued.take(Message(body_, "receipt", 1), build) is False
    # A run whose cancel was asked while no worker held it ends canceled, never run.
    other, message = stored(replica="queue")
    runs.store.request_cancel(other.id, force=False)
    assert queued.take(message, build) is True
    assert runs.store.get(other.id).status == "canceled" and ran == [record.id]
