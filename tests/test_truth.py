"""Answers that say the truth (issue 20 §5, the run side) and idempotency keys after a
crash (§1): replays before plan checks, plans freed by runs that never started, a plan
applied after its instance was destroyed, keys whose run never got a record or was lost."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import ServerProcess, start_server
from test_runs import ASYNC, MODULES, body, sleepers, start_async, wait_run, wait_sleeping


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, terraform_bin: str
        ) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("truth"), modules_dir=MODULES,
                          env={"TFSERVER_KILL_GRACE": "5", "TFSERVER_MAX_RUNS": "1"})
    yield server
    server.stop()


def test_an_idempotent_retry_of_a_plans_apply_is_replayed(srv: ServerProcess) -> None:
    plan = srv.request("PUT", "/steps/replay?dry_run=true", body(0, "planned")).json
    key = {"Idempotency-Key": f"plan-{uuid.uuid4()}"}
    first = srv.request("POST", f"/runs/{plan['run_id']}/apply", headers=key)
    assert first.status == 201, first.body
    again = srv.request("POST", f"/runs/{plan['run_id']}/apply", headers=key)
    assert again.status == 201 and again.json["run_id"] == first.json["run_id"], again.body
    assert srv.request("DELETE", "/steps/replay").status == 200


def test_a_plan_whose_apply_is_canceled_while_queued_can_be_applied(
        srv: ServerProcess) -> None:
    assert srv.request("PUT", "/steps/freed", body(0, "first")).status == 201
    plan = srv.request("PUT", "/steps/freed?dry_run=true", body(0, "planned")).json
    # The server's one run slot is taken by a run of another instance: the plan's apply
    # waits in line, and the plan stays fresh.
    busy = start_async(srv, "/steps/other", body(7.5, "busy")).json["id"]
    wait_sleeping("7.5")
    queued = srv.request("POST", f"/runs/{plan['run_id']}/apply", headers=ASYNC)
    assert queued.status == 202 and queued.json["status"] == "queued", queued.body
    assert srv.request("POST", f"/runs/{queued.json['id']}/cancel").status == 202
    assert wait_run(srv, queued.json["id"])["status"] == "canceled"
    record = srv.request("GET", f"/runs/{plan['run_id']}").json
    assert record["links"].get("apply"), record  # the plan is free again
    assert srv.request("POST", f"/runs/{busy}/cancel").status == 202
    assert wait_run(srv, busy)["status"] in ("canceled", "succeeded")
    applied = srv.request("POST", f"/runs/{plan['run_id']}/apply")
    assert applied.status == 200 and applied.json["outputs"]["tag"] == "planned", applied.body
    assert srv.request("DELETE", "/steps/freed").status == 200
    srv.request("DELETE", "/steps/other")


def test_a_plan_applied_after_its_instance_was_destroyed_is_stale(srv: ServerProcess) -> None:
    assert srv.request("PUT", "/steps/gone", body(0, "a")).status == 201
    plan = srv.request("PUT", "/steps/gone?dry_run=true", body(0, "b")).json
    assert srv.request("DELETE", "/steps/gone").status == 200
    r = srv.request("POST", f"/runs/{plan['run_id']}/apply")
    assert r.status == 409 and "stale" in r.json["detail"], r.body
    srv.request("DELETE", "/steps/gone")


def test_keys_after_a_crash(tmp_path: Path, terraform_bin: str) -> None:
    server = start_server(tmp_path, modules_dir=MODULES)
    lost_key = {"Idempotency-Key": f"lost-{uuid.uuid4()}"}
    run = start_async(server, "/steps/crash", body(8.25, "lost"), lost_key).json
    wait_sleeping("8.25")
    server.stop(signal.SIGKILL)
    for pid in sleepers("8.25"):
        import os
        os.kill(pid, signal.SIGKILL)
    again = start_server(tmp_path, modules_dir=MODULES)
    try:
        assert wait_run(again, run["id"])["status"] == "lost"
        # A lost run's key: a final answer that says so, never "retry later".
        r = again.request("PUT", "/steps/crash", body(8.25, "lost"), headers=lost_key)
        assert r.status == 409 and "was lost" in r.json["detail"], r.body
        assert r.header("Retry-After") == "0"
        # A key whose run never got a record (its server died while admitting it): once
        # the claim is older than the lost-run window, the retry runs.
        objects = tmp_path / "state"
        key = f"orphan-{uuid.uuid4()}"
        claim(again, objects, key)
        r = again.request("PUT", "/steps/orphan", body(0, "x"),
                          headers={"Idempotency-Key": key})
        assert r.status == 409 and r.header("Retry-After") == "1", r.body
        deadline = time.monotonic() + 30
        while (r := again.request("PUT", "/steps/orphan", body(0, "x"),
                                  headers={"Idempotency-Key": key})).status == 409:
            assert time.monotonic() < deadline, r.body
            time.sleep(0.5)
        assert r.status == 201, r.body
        assert again.request("DELETE", "/steps/orphan").status == 200
    finally:
        again.stop()


def claim(server: ServerProcess, state: Path, key: str) -> None:
    """What a server that died between claiming a key and storing its run left: the key's
    claim, naming a run that has no record."""
    import hashlib
    import json

    from tfserver.runs.store import RunStore
    from tfserver.storage.local import LocalObjects

    # The request's fingerprint as the server computes it (method, path, body).
    raw = json.dumps(body(0, "x")).encode()
    fingerprint = hashlib.sha256(b"PUT /steps/orphan\n" + raw).hexdigest()
    store = RunStore(LocalObjects(state))
    assert store.claim_key("local", key, {
        "fingerprint": fingerprint, "run_id": "f" * 32, "claimed_at": time.time(),
        "expires_at": time.time() + 3600}, time.time()) is None
    del server
