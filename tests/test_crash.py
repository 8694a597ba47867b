"""A server killed in the middle of a run loses nothing: terraform's output outlives the
server, so terraform finishes and writes its state, and a restarted server finds it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from support import ROOT, start_server
from test_runs import ASYNC, sleepers, wait_run, wait_sleeping

MODULES = ROOT / "tests" / "modules_crash"


@pytest.fixture
def tmp(tmp_path: Path, terraform_bin: str) -> Path:
    return tmp_path


def test_a_server_killed_mid_apply_leaves_its_resource_in_state(tmp: Path) -> None:
    marker = tmp / "made"
    server = start_server(tmp, modules_dir=MODULES)
    r = server.request("PUT", "/made/one", {"marker": str(marker), "seconds": 2.25},
                       headers=ASYNC)
    assert r.status == 202, r.body
    run_id = r.json["id"]
    wait_sleeping("2.25")
    server.stop(signal.SIGKILL)
    # The slow call completes after the server died; terraform must live on to record it.
    deadline = time.monotonic() + 60
    while not marker.exists() or sleepers("2.25"):
        assert time.monotonic() < deadline, "the provisioner never finished"
        time.sleep(0.05)
    again = start_server(tmp, modules_dir=MODULES)
    try:
        deadline = time.monotonic() + 60
        while (got := again.request("GET", "/made/one")).status != 200:
            assert got.status == 404, got.body
            assert time.monotonic() < deadline, "the state never recorded the resource"
            time.sleep(0.1)
        assert got.json["outputs"]["marker"] == str(marker)
        record = wait_run(again, run_id)
        assert record["status"] == "lost", record
        # The record says what ran after the server died: terraform finished the apply.
        assert record["started_at"] is not None and record["changes"]["add"] == 1, record
        assert "terraform went on" in record["problem"]["detail"], record
        assert not record.get("state_may_be_locked")  # terraform released its lock
        events = [json.loads(line) for line in again.request(
            "GET", f"/runs/{run_id}/events").body.splitlines()]
        assert any(e["type"] == "resource" and e["phase"] == "done" for e in events), events
        assert events[-1]["summary"] == "the run was lost"
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        # A retry finds the resource: nothing is made twice.
        r = again.request("PUT", "/made/one", {"marker": str(marker), "seconds": 2.25})
        assert r.status == 200, r.body
        assert r.json["changes"]["add"] == 0, r.json
        assert marker.read_text().splitlines() == ["made"]
        assert again.request("DELETE", "/made/one").status == 200
    finally:
        again.stop()


def test_a_server_killed_while_an_answered_apply_still_exits_loses_nothing(
        tmp: Path) -> None:
    # A run is answered at terraform's last event, before its exit (terraform/process.py).
    # This terraform's process outlives terraform itself by a `sleep`, as a slow exit would.
    real = shutil.which("terraform")
    slow = tmp / "terraform-slow-exit"
    slow.write_text(f'#!/bin/sh\n"{real}" "$@"\nstatus=$?\n'
                    'if [ "$1" = apply ]; then sleep 89; fi\nexit $status\n')
    slow.chmod(0o755)
    marker = tmp / "made"
    body = {"marker": str(marker), "seconds": 0}
    server = start_server(tmp, modules_dir=MODULES, env={"TFSERVER_TERRAFORM": str(slow)})
    try:
        r = server.request("PUT", "/made/exiting", body)
        assert r.status == 201, r.body
        assert r.json["outputs"] == {"marker": str(marker)}, r.json
        wait_sleeping("89")  # answered while its process runs on
        run_id = r.json["run_id"]
        stored = tmp / "state" / "_runs" / "records" / f"{run_id}.json"
        deadline = time.monotonic() + 30  # its record is kept just after its answer
        while not (stored.exists() and json.loads(stored.read_text())["status"] == "succeeded"):
            assert time.monotonic() < deadline, "the run's record was never kept"
            time.sleep(0.02)
        server.stop(signal.SIGKILL)
        again = start_server(tmp, modules_dir=MODULES)
        try:
            got = again.request("GET", "/made/exiting")
            assert got.status == 200 and got.json["outputs"]["marker"] == str(marker), got.body
            assert wait_run(again, run_id)["status"] == "succeeded"
            # No lock is left, and nothing is made twice.
            r = again.request("PUT", "/made/exiting", body)
            assert r.status == 200 and r.json["changes"]["add"] == 0, r.body
            assert again.request("DELETE", "/made/exiting").status == 200
            assert marker.read_text().splitlines() == ["made"]
        finally:
            again.stop()
    finally:
        server.stop(signal.SIGKILL)
        for pid in sleepers("89"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_synchronous_run_killed_in_its_first_seconds_is_recorded_as_started(
        tmp: Path) -> None:
    marker = tmp / "made"
    server = start_server(tmp, modules_dir=MODULES)
    done = threading.Event()

    def call() -> None:
        with contextlib.suppress(OSError):
            server.request("PUT", "/made/quick", {"marker": str(marker), "seconds": 1.75})
        done.set()

    threading.Thread(target=call, daemon=True).start()
    wait_sleeping("1.75")  # terraform runs; the first heartbeat (2 s) has not come yet
    server.stop(signal.SIGKILL)
    assert done.wait(30)
    deadline = time.monotonic() + 60
    while not marker.exists() or sleepers("1.75"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    again = start_server(tmp, modules_dir=MODULES)
    try:
        runs = again.request("GET", "/made/quick/runs").json["runs"]
        assert len(runs) == 1, runs
        assert runs[0]["status"] == "lost" and runs[0]["started_at"] is not None, runs
        assert again.request("DELETE", "/made/quick").status == 200
    finally:
        again.stop()


def test_a_leftover_whose_lock_is_still_held_says_so(tmp: Path) -> None:
    from tfserver.app.leftovers import Leftovers
    from tfserver.runs.store import RunRecord, RunStore
    from tfserver.storage.local import LocalBackend

    class Locked(LocalBackend):
        def lock_info(self, module: str, workspace: str) -> dict[str, str] | None:
            return {"id": "lock-1"} if workspace == "local.held" else None

    backend = Locked(tmp / "state")
    leftovers = Leftovers(backend, RunStore(backend.objects), tmp / "spool", {})
    (tmp / "spool").mkdir()
    for ws, started in (("local.held", 1.0), ("local.free", 1.0), ("local.held", None)):
        record = RunRecord(id="0" * 32, module="m", instance=ws[6:], workspace=ws,
                           tenant="local", subject="s", operation="apply", status="lost",
                           started_at=started)
        leftovers(record)
        assert record.state_may_be_locked is (started is not None and ws == "local.held")


def test_a_start_removes_the_output_files_nothing_will_read(tmp: Path) -> None:
    """A process killed between a run's end and the removal of its output files (or
    before a run answered at once was stored) left them for good: a start removes those
    of ended runs, of runs without a record not written for a run's longest, and of
    processes that are gone. Those of live runs and live processes stay."""
    import subprocess

    shm = tmp / "shm"
    shm.mkdir()
    env = {"TFSERVER_TMP_DIR": str(shm), "TFSERVER_RUN_TIMEOUT": "60",
           "TFSERVER_KILL_GRACE": "5"}
    server = start_server(tmp, env=env)
    answer = server.request("PUT", "/basic/swept", {"name": "x"})
    assert answer.status == 201, answer.body
    ended = answer.json["run_id"]
    assert server.stop() == 0
    (spool,) = shm.glob("tfserver-spool-*")
    assert list(spool.iterdir()) == []  # a run removes its own
    gone = subprocess.Popen(["true"])
    gone.wait(timeout=30)
    stems = {"ended": f"{ended}.1", "young": f"{'f' * 32}.2", "old": f"{'e' * 32}.3",
             "gone": f"{gone.pid}-1-2", "live": f"{os.getpid()}-1-2"}
    for stem in stems.values():
        for suffix in (".out", ".err"):
            (spool / f"{stem}{suffix}").write_text("{}\n")
    (spool / "notes.out").write_text("not a spool file")
    long_ago = time.time() - 86  # past the longest run (60 s) and five kill graces (25 s)
    for suffix in (".out", ".err"):
        os.utime(spool / f"{stems['old']}{suffix}", (long_ago, long_ago))
    again = start_server(tmp, env=env)
    try:
        said = again.records(lambda r: "output files that earlier" in r.get("message", ""))
        assert said and said[0]["message"].startswith("removed 3 runs'"), said
        kept = {p.name for p in spool.iterdir()}
        assert kept == {"notes.out"} | {f"{stems[k]}{s}" for k in ("young", "live")
                                        for s in (".out", ".err")}, kept
        assert again.request("DELETE", "/basic/swept").status == 200
    finally:
        again.stop()


def test_a_sweep_asks_a_bounded_number_and_keeps_all_while_the_store_is_down(
        tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tfserver.app.leftovers import Leftovers
    from tfserver.errors import Unavailable
    from tfserver.runs.store import RunRecord, RunStore
    from tfserver.storage.local import LocalBackend
    from tfserver.terraform import follow

    spool = tmp / "spool"
    spool.mkdir()
    runs = [f"{n:032x}" for n in range(5)]
    for run_id in runs:
        (spool / f"{run_id}.7.out").write_text("")
    long_ago = follow.STARTED - 10
    for path in spool.iterdir():
        os.utime(path, (long_ago, long_ago))
    asked: list[str] = []

    def ended(run_id: str, age: float) -> bool:
        asked.append(run_id)
        return True

    older = long_ago - 10
    os.utime(spool / f"{runs[4]}.7.out", (older, older))
    blocked = spool / f"{'b' * 32}.7.out"  # a folder: it cannot be removed as a file
    blocked.mkdir()
    os.utime(blocked, (older - 10, older - 10))
    # the oldest first; one that cannot go does not stop the others
    assert follow.sweep(spool, ended, limit=3) == 2 and asked == ["b" * 32, runs[4], runs[0]]
    blocked.rmdir()
    assert sorted(p.name for p in spool.iterdir()) == [f"{r}.7.out" for r in runs[1:4]]

    class Down(RunStore):
        def get(self, run_id: str) -> RunRecord | None:
            raise Unavailable("the store cannot be reached")

    backend = LocalBackend(tmp / "state")
    with caplog.at_level("WARNING", logger="tfserver.app.leftovers"):
        Leftovers(backend, Down(backend.objects), spool, {}).sweep(idle=0)
    assert len(list(spool.iterdir())) == 3
    assert "not swept (next start): the store cannot be reached" in caplog.text
