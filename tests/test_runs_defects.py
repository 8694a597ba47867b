"""Defects of the run lifecycle (issue 19), each pinned by a test that failed before its
fix, and the heartbeat's cost (issue 20, §4): a real Scheduler, Runs and RunStore over
files in tmp_path, small fakes behind the project's own interfaces (a process handle, a
terraform runner, an object store that counts calls), no terraform."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_outcomes import service as outcomes_service  # noqa: F401  (a fixture)

from tfserver.app.execute import Applied
from tfserver.auth import Principal
from tfserver.errors import Conflict, TFServerError, Unavailable
from tfserver.runs.expiry import Due, Expiries, Reaper
from tfserver.runs.lanes import Scheduler
from tfserver.runs.registry import Runs
from tfserver.runs.run import Run
from tfserver.runs.store import RunRecord, RunStore, new_run_id
from tfserver.storage.base import ObjectStore
from tfserver.storage.local import LocalObjects
from tfserver.terraform.output import RunResult

LOCAL = Principal(subject="local", tenant="local", all_modules=True)


class FakeControl:
    """A process handle with no process: records who stopped the run."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.killed = False

    def interrupt(self, reason: str) -> bool:
        first = self.reason is None
        self.reason = self.reason or reason
        return first

    def kill(self, reason: str) -> None:
        self.reason = self.reason or reason
        self.killed = True

    def when_started(self, fn: Callable[[], None]) -> None:
        fn()  # no process to wait for: it "runs" as soon as it is asked


def make_runs(tmp_path: Path, slots: int = 4) -> Runs:
    return Runs(RunStore(LocalObjects(tmp_path / "objects")), Scheduler(slots, 8),
                replica="r1", kill_grace=1.0)


def new_run(job: Callable[[Run], Any], *, sync: bool = False, instance: str = "x") -> Run:
    record = RunRecord(id=new_run_id(), module="m", instance=instance,
                       workspace=f"t.{instance}", tenant="t", subject="s", operation="apply")
    return Run(record, job, lambda text: text, FakeControl(), sync=sync)


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class Busy:
    """An instance held by a running run until `release`."""

    def __init__(self, runs: Runs) -> None:
        self.started, self.release = threading.Event(), threading.Event()

        def job(run: Run) -> str:
            self.started.set()
            assert self.release.wait(30)
            return "done"

        self.run = runs.submit(new_run(job), what="x")
        assert self.started.wait(5)


def submit_waiting(runs: Runs) -> tuple[Run, threading.Thread, list[Any]]:
    """A synchronous run waiting (up to 30 s) for the busy instance, in a thread."""
    waiter = new_run(lambda run: "waited", sync=True)
    got: list[Any] = []

    def call() -> None:
        try:
            got.append(runs.submit(waiter, what="x", wait=30.0))
        except TFServerError as e:
            got.append(e)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    wait_for(lambda: waiter.ticket is not None
             and runs.scheduler.position(waiter.ticket) == 1)
    return waiter, thread, got


# -- 1. a synchronous caller waiting for a busy instance is released ----------------------

def test_a_waiting_synchronous_run_canceled_by_another_client_answers(tmp_path: Path) -> None:
    runs = make_runs(tmp_path)
    busy = Busy(runs)
    waiter, thread, got = submit_waiting(runs)
    runs.cancel(waiter.record.id, force=False)
    thread.join(5)
    assert not thread.is_alive(), "the caller still waits for the instance"
    assert got == [waiter]
    assert waiter.done.wait(5)
    assert waiter.record.status == "canceled"
    assert isinstance(waiter.error, Conflict) and "canceled" in waiter.error.detail
    busy.release.set()
    assert busy.run.done.wait(5) and busy.run.record.status == "succeeded"


def test_a_waiting_synchronous_run_is_released_when_the_server_stops(tmp_path: Path) -> None:
    runs = make_runs(tmp_path)
    busy = Busy(runs)
    waiter, thread, got = submit_waiting(runs)
    assert runs.close_queues() == 1
    thread.join(5)
    assert not thread.is_alive(), "the caller still waits for the instance"
    if got != [waiter]:
        assert len(got) == 1 and isinstance(got[0], Unavailable)
    else:
        assert waiter.done.wait(5) and waiter.record.status == "canceled"
    busy.release.set()
    assert busy.run.done.wait(5)


# -- 3. exit 0 wins over a cancel (or shutdown) that lands after it -----------------------

OUTPUTS = {"type": "outputs", "outputs": {"name": {"value": "n", "sensitive": False}}}


@pytest.mark.parametrize("stop", ["canceled", "interrupted"])
def test_exit_0_wins_over_a_late_stop(request: pytest.FixtureRequest, stop: str) -> None:
    # terraform exited 0, and a cancel (or the shutdown's interrupt) came before its
    # result was made: the result says both, as `Terraform.run` builds it from the control.
    late = RunResult(("apply",), 0, (OUTPUTS,), **{stop: True})
    assert late.ok
    svc = request.getfixturevalue("outcomes_service")(late)  # test_outcomes' fake runner
    submitted = svc.apply(LOCAL, "basic", "x", {"name": "n"})
    assert svc.history.wait(submitted, 30)
    applied = svc.history.result(LOCAL, submitted)
    assert isinstance(applied, Applied) and applied.outputs == {"name": "n"}
    assert svc.runs.record(submitted.run_id).status == "succeeded"


# -- 4. purge reads every page --------------------------------------------------------

def test_purge_reads_past_the_first_thousand_names(tmp_path: Path) -> None:
    store = RunStore(LocalObjects(tmp_path))
    now = time.time()
    for n in range(600):  # 1,200 names under _plans/, every plan expired
        store.put_plan(new_run_id(now - 100 + n / 1000), b"plan", {"expires_at": now - 1})
    for n in range(1001):
        store.objects.put(f"_idempotency/t.{n:064x}", json.dumps({"expires_at": now - 1})
                          .encode())
    old = now - 40 * 86400
    for n in range(1001):
        store.create(RunRecord(id=new_run_id(old - n), module="m", instance="i",
                               workspace="t.i", tenant="t", subject="s",
                               operation="apply", status="succeeded"))
    store.purge(runs_before=now - 30 * 86400, now=now)
    assert store.objects.keys("_plans/", limit=10_000) == []
    assert store.objects.keys("_idempotency/", limit=10_000) == []
    assert store.objects.keys("_runs/records/", limit=10_000) == []


# -- 5. the reaper is not starved by due expiries it cannot reap yet ------------------------

def test_the_reaper_reaches_past_a_hundred_it_cannot_reap(tmp_path: Path) -> None:
    expiries = Expiries(LocalObjects(tmp_path))
    now = 1_800_000_000.0
    for n in range(101):
        expiries.set("m", f"t.i{n:03d}", now - 60)
    tried: list[str] = []

    def start(due: Due) -> str | None:
        tried.append(due.workspace)
        return "a-run" if due.workspace == "t.i100" else None  # the rest are busy

    reaper = Reaper(expiries, start, lambda run_id: "running", replica="r1",
                    interval=30.0, clock=lambda: now)
    reaper.reap_once()
    assert "t.i100" in tried


# -- 6. a stored record that is not a JSON object is a damaged record ------------------

@pytest.mark.parametrize("stored", [b"[]", b'"x"', b"7", b"{not json", b'{"id": 1}'])
def test_a_record_that_is_not_an_object_is_shown_lost(tmp_path: Path, stored: bytes,
                                                      caplog: pytest.LogCaptureFixture
                                                      ) -> None:
    runs = make_runs(tmp_path)
    run_id = new_run_id()
    runs.store.objects.put(f"_runs/records/{run_id}.json", stored)
    with caplog.at_level(logging.WARNING, logger="tfserver"):
        record = runs.record(run_id)
        assert [r.id for r in runs.records([run_id])] == [run_id]
    assert record.id == run_id and record.status == "lost"
    damaged = [r for r in caplog.records if "damaged" in r.getMessage()]
    assert damaged and run_id in damaged[0].getMessage()
    assert all(r.exc_info is None for r in caplog.records)
    runs.store.purge(runs_before=time.time() + 1, now=time.time())  # retention takes it
    assert runs.store.objects.get(f"_runs/records/{run_id}.json") is None


# -- issue 20, §4: one heartbeat per replica judges its runs ---------------------------

class Counting:
    """An object store that counts the calls made to it."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def put(self, key: str, data: bytes) -> None:
        self.calls["put"] += 1
        self.inner.put(key, data)

    def put_new(self, key: str, data: bytes) -> bool:
        self.calls["put_new"] += 1
        return self.inner.put_new(key, data)

    def put_copy(self, key: str, data: bytes, source: str) -> None:
        self.calls["put_copy"] += 1
        self.inner.put_copy(key, data, source)

    def get(self, key: str) -> bytes | None:
        self.calls["get"] += 1
        return self.inner.get(key)

    def delete(self, key: str) -> None:
        self.calls["delete"] += 1
        self.inner.delete(key)

    def keys(self, folder: str, *, start_after: str = "", limit: int = 1000) -> list[str]:
        self.calls["keys"] += 1
        return self.inner.keys(folder, start_after=start_after, limit=limit)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def replica(objects: ObjectStore, name: str, clock: Clock) -> Runs:
    # No run slot: every run stays queued.
    return Runs(RunStore(objects), Scheduler(0, 8), replica=name, kill_grace=1.0,
                clock=clock)


def queue(runs: Runs, count: int) -> list[Run]:
    queued = []
    for n in range(count):
        record = RunRecord(id=new_run_id(), module="m", instance=f"i{n:03d}",
                           workspace=f"t.i{n:03d}", tenant="t", subject="s",
                           operation="apply")
        run = Run(record, lambda r: None, lambda text: text, FakeControl())
        queued.append(runs.submit(run, what=f"i{n:03d}"))
    return queued


def test_a_beat_of_400_unchanged_queued_runs_is_two_calls(tmp_path: Path) -> None:
    objects = Counting(LocalObjects(tmp_path))
    runs = replica(objects, "r1", Clock())
    queue(runs, 400)
    runs.keeper.beat()  # their queue positions are stored
    objects.calls.clear()
    runs.keeper.beat()
    assert objects.calls == Counter({"put": 1, "keys": 1}), objects.calls


def test_a_cancel_left_by_another_replica_is_found_by_the_listing(tmp_path: Path) -> None:
    objects = Counting(LocalObjects(tmp_path))
    clock = Clock()
    runs, other = replica(objects, "r1", clock), replica(objects, "r2", clock)
    queued = queue(runs, 50)
    runs.keeper.beat()
    target = queued[17]
    assert other.cancel(target.record.id, force=False).cancel == "requested"
    objects.calls.clear()
    runs.keeper.beat()
    assert target.done.is_set() and target.record.status == "canceled"
    assert objects.calls["keys"] == 1 and objects.calls["get"] == 1
    assert all(not r.done.is_set() for r in queued if r is not target)


def test_runs_are_judged_by_their_replicas_heartbeat(tmp_path: Path) -> None:
    objects = LocalObjects(tmp_path)
    clock = Clock()
    runs, other = replica(objects, "r1", clock), replica(objects, "r2", clock)
    [run] = queue(runs, 1)
    runs.keeper.beat()
    clock.now += 60  # the record was not rewritten since; the replica beats
    runs.keeper.beat()
    assert other.record(run.record.id).status == "queued"
    # A run the replica's heartbeat does not name (it no longer holds it) is lost.
    stray = RunRecord(id=new_run_id(), module="m", instance="s", workspace="t.s", tenant="t",
                      subject="s", operation="apply", status="running", replica="r1",
                      heartbeat_at=clock.now - 60)
    runs.store.create(stray)
    assert other.record(stray.id).status == "lost"
    clock.now += 60  # the replica stopped beating
    assert other.record(run.record.id).status == "lost"


def test_a_run_s_final_record_is_stored_before_its_finished_event(tmp_path: Path) -> None:
    # A follower on another replica ends at the stored `finished` event and reads the
    # record at once (the sqs engine's api replica): it must be the ended one by then.
    writes: list[tuple[str, bytes]] = []

    class Recording(LocalObjects):
        def put(self, key: str, data: bytes) -> None:
            if key.startswith(("_runs/records/", "_runs/events/")):
                writes.append((key.split("/")[1], data))
            super().put(key, data)

    runs = Runs(RunStore(Recording(tmp_path / "objects")), Scheduler(4, 8),
                replica="r1", kill_grace=1.0)
    run = runs.submit(new_run(lambda r: "done"), what="x")
    assert run.done.wait(10)
    wait_for(lambda: not runs.live())
    finished = next(i for i, (kind, data) in enumerate(writes)
                    if kind == "events" and b'"type":"finished"' in data)
    ended = [i for i, (kind, data) in enumerate(writes)
             if kind == "records" and json.loads(data)["status"] == "succeeded"]
    assert ended and ended[0] < finished, writes


def test_a_follower_reads_the_finished_event_stored_just_after_the_record() -> None:
    """The final record is stored before the final events (the test above): a follower
    on another replica that read the events a moment before they were stored, and then
    the ended record, stopped without the `finished` event (test_runs_replicas saw its
    stream end at `resource`). It reads the events on, for up to FINAL_EVENTS."""
    from types import SimpleNamespace

    from tfserver.runs.registry import _follow_stored

    started = {"seq": 1, "type": "started"}
    finished = {"seq": 2, "type": "finished", "status": "succeeded"}
    reads = iter([[started], [started], [started, finished]])
    store = SimpleNamespace(get_events=lambda run_id: next(reads, [started, finished]))
    record = RunRecord(id=new_run_id(), module="m", instance="i", workspace="t.i",
                       tenant="t", subject="s", operation="apply", status="succeeded")
    runs: Any = SimpleNamespace(store=store, record=lambda run_id: record)
    batches = list(_follow_stored(runs, record.id, 0))
    assert [e["type"] for batch in batches for e in batch] == ["started", "finished"]
