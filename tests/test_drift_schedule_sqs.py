"""Scheduled drift checks on the `sqs` engine (issue 23): a worker runs them in spare slots
beside its TFSERVER_MAX_RUNS, so a user's run never waits for them; a user's run on an
instance being checked stops the check; a check's own reconciling apply does not. On
moto's server with real terraform (a check made slow by a stand-in, test_drift_schedule)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_drift_schedule import counted, drift_of, policy_file, runs_of, shim, until
from test_engine import Start, fleet

from support import ServerProcess
from test_runs import ASYNC, body, wait_run
from test_s3 import store

__all__ = ["fleet", "store"]

#: How long a slow check sleeps (the shim's): a user's run must not wait that long.
SLOW = 30.0


@pytest.fixture
def checked(fleet: tuple[Start, str], tmp: Path, terraform_bin: str
            ) -> Iterator[tuple[ServerProcess, ServerProcess, Path]]:
    """An API replica and a worker of TFSERVER_MAX_RUNS=1 checking `steps` every 2 s (two
    checks at once at most); the folder whose `slow` and `drift` files steer the checks."""
    start, _ = fleet
    folder = tmp / "checks"
    folder.mkdir()
    policy = policy_file(folder, '[modules.steps]\ndrift_check = "2s"\nreconcile = true\n')
    env = {"TFSERVER_POLICY": str(policy), "TFSERVER_DRIFT_CHECK_MIN": "1s",
           "TFSERVER_MAX_DRIFT_CHECKS": "2",
           "TFSERVER_TERRAFORM": str(shim(folder, terraform_bin))}
    api = start("api1", "api", **env)
    worker = start("w1", "worker", TFSERVER_MAX_RUNS="1", **env)
    try:
        yield api, worker, folder
    finally:
        (folder / "slow").unlink(missing_ok=True)
        (folder / "drift").unlink(missing_ok=True)
        pids = folder / "pids"
        for pid in pids.read_text().split() if pids.exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def checking(api: ServerProcess, *instances: str) -> list[dict[str, Any]]:
    """The running checks of the instances, once each has one."""
    def running() -> list[dict[str, Any]]:
        found = [r for name in instances for r in runs_of(api, name)
                 if r["operation"] == "drift" and r["status"] == "running"]
        return found if len({r["instance"] for r in found}) == len(instances) else []

    return list(until(running, timeout=60))


def test_checks_never_hold_up_a_users_run_on_a_worker(
        checked: tuple[ServerProcess, ServerProcess, Path]) -> None:
    api, worker, folder = checked
    for name in ("a", "b"):
        assert api.request("PUT", f"/steps/{name}", body(0, name)).status == 201
    (folder / "slow").touch()
    checking(api, "a")  # in the worker's only run slot, before
    began = time.monotonic()
    r = api.request("PUT", "/steps/c", body(0, "c"), headers=ASYNC)
    assert r.status == 202, r.body
    applied = wait_run(api, r.json["id"], timeout=SLOW * 2 / 3)
    assert applied["status"] == "succeeded", applied
    assert time.monotonic() - began < SLOW / 2  # it did not wait for the check
    # Two checks at once on a worker of one run slot, beside users' runs: neither holds
    # the user slot, and neither was stopped (another instance's run leaves them be).
    checks = checking(api, "a", "b")
    r = api.request("PUT", "/steps/c", body(0, "again"), headers=ASYNC)
    assert wait_run(api, r.json["id"], timeout=SLOW * 2 / 3)["status"] == "succeeded"
    for check in checks:
        assert api.request("GET", f"/runs/{check['id']}").json["status"] == "running"
    assert counted(api, "preempted") == counted(worker, "preempted") == 0


def test_a_users_run_on_an_instance_being_checked_stops_the_check(
        checked: tuple[ServerProcess, ServerProcess, Path]) -> None:
    api, _, folder = checked
    assert api.request("PUT", "/steps/p", body(0, "p")).status == 201
    (folder / "slow").touch()
    (check,) = checking(api, "p")
    began = time.monotonic()
    r = api.request("PUT", "/steps/p", body(0, "user"), headers=ASYNC)
    assert r.status == 202, r.body
    applied = wait_run(api, r.json["id"], timeout=SLOW * 2 / 3)
    assert applied["status"] == "succeeded", applied
    assert time.monotonic() - began < SLOW / 2  # the check's sleep was not waited for
    stopped = wait_run(api, check["id"])
    assert stopped["status"] == "canceled", stopped
    assert stopped["finished_at"] <= applied["started_at"]  # one run of it at a time
    assert counted(api, "preempted") == 1


def test_a_checks_own_reconciling_apply_does_not_stop_it(
        checked: tuple[ServerProcess, ServerProcess, Path]) -> None:
    api, worker, folder = checked
    assert api.request("PUT", "/steps/recon", body(0, "recon")).status == 201
    until(lambda: drift_of(api, "recon")["status"] == "in_sync", timeout=60)
    (folder / "drift").touch()
    drift = until(lambda: (d := drift_of(api, "recon"))["status"] == "drifted" and
                  d.get("reconciled_by") and d, timeout=60)
    (folder / "drift").unlink()
    check = wait_run(api, drift["run_id"])
    assert check["who"]["subject"] == "tfserver:schedule"
    assert check["status"] == "succeeded" and check.get("cancel") is None, check
    applied = wait_run(api, drift["reconciled_by"], timeout=60)
    assert applied["status"] == "succeeded" and applied["who"]["subject"] == "tfserver:drift"
    assert counted(api, "preempted") == counted(worker, "preempted") == 0


def test_a_check_gives_its_user_slot_back_for_a_spare_one(tmp: Path) -> None:
    """The worker's side alone: a check's message frees the user slot it came in on and
    takes a spare one (waiting while none is free); a user's run keeps its slot."""
    from tfserver.runs.checks import Checks
    from tfserver.runs.lanes import Scheduler
    from tfserver.runs.registry import Runs
    from tfserver.runs.store import RunRecord, RunStore, new_run_id
    from tfserver.storage.local import LocalObjects

    store = RunStore(LocalObjects(tmp / "objects"))
    runs = Runs(store, Scheduler(1, 4), replica="w", kill_grace=1)
    checks = Checks(runs, lambda r: r.subject == "tfserver:schedule", spare=1)
    ids = {}
    for who in ("tfserver:schedule", "someone"):
        ids[who] = new_run_id()
        store.create(RunRecord(id=ids[who], module="m", instance="i", workspace="t.i",
                               tenant="t", subject=who, operation="drift"))
    user, stop = threading.Semaphore(0), threading.Event()
    assert checks.slot(ids["someone"], user, stop) is False
    assert not user.acquire(blocking=False)  # a user's run keeps the slot it came in on
    assert checks.slot(ids["tfserver:schedule"], user, stop) is True
    assert user.acquire(blocking=False)  # given back at once
    stop.set()  # the only spare slot is taken: a second check waits, until the stop
    assert checks.slot(ids["tfserver:schedule"], user, stop) is None
    assert user.acquire(blocking=False)
    checks.free_spare()
    assert checks.slot(ids["tfserver:schedule"], user, threading.Event()) is True
