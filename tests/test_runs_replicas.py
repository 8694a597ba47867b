"""Runs on two replicas sharing one S3 bucket (moto): a run started on one is read,
followed and canceled on the other; a replica killed mid-run leaves its run `lost`."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from support import Moto, ServerProcess, start_server
from test_runs import ASYNC, MODULES, SECRET, body, sleepers, stream, wait_run, wait_sleeping
from test_s3 import MODES, store

__all__ = ["store"]


def replicas(tmp: Path, env: dict[str, str]) -> tuple[ServerProcess, ServerProcess]:
    full = {**env, **MODES["lockfile"], "TFSERVER_KILL_GRACE": "5"}
    a = start_server(tmp / "a", modules_dir=MODULES, env={**full, "TFSERVER_REPLICA_ID": "a"})
    b = start_server(tmp / "b", modules_dir=MODULES, env={**full, "TFSERVER_REPLICA_ID": "b"})
    return a, b


def test_start_on_one_replica_read_follow_and_cancel_on_the_other(
        tmp: Path, moto: Moto, store: dict[str, str]) -> None:
    a, b = replicas(tmp, store)
    try:
        done = a.request("PUT", "/steps/shared", body(1, "via-a"), headers=ASYNC).json
        lines = list(stream(b, done["id"]))  # followed on B while A runs it
        events = [json.loads(line) for _, line in lines]
        assert events[-1]["type"] == "finished" and events[-1]["status"] == "succeeded"
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        first = next(t for (t, _), e in zip(lines, events, strict=True)
                     if e["type"] == "resource")
        assert lines[-1][0] - first > 1.0  # arrived while the run went on (a few s lag)
        assert SECRET not in b"".join(line for _, line in lines).decode()
        record = wait_run(b, done["id"])
        assert record["status"] == "succeeded" and record["outputs"]["tag"] == "via-a"
        assert done["id"] in [r["id"] for r in b.request("GET", "/steps/shared/runs").json[
            "runs"]]

        long = a.request("PUT", "/steps/shared", body(41, "to-cancel"), headers=ASYNC).json
        wait_sleeping("41")
        r = b.request("POST", f"/runs/{long['id']}/cancel")
        assert r.status == 202 and r.json["cancel"] == "requested", r.body
        ended = wait_run(b, long["id"], timeout=30)  # A acts within its heartbeat
        assert ended["status"] == "canceled", ended
        assert sleepers("41") == []
        assert b.request("PUT", "/steps/shared", body(0, "via-b")).status == 200
        assert b.request("DELETE", "/steps/shared").status == 200
    finally:
        a.stop()
        b.stop()


def test_a_replica_killed_mid_run_shows_the_run_lost_on_the_other(
        tmp: Path, moto: Moto, store: dict[str, str]) -> None:
    a, b = replicas(tmp, store)
    try:
        run = a.request("PUT", "/steps/crash", body(43, "crash"), headers=ASYNC).json
        deadline = time.monotonic() + 30
        while b.request("GET", f"/runs/{run['id']}").json["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        a.stop(signal.SIGKILL)
        for pid in sleepers("43"):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while (record := b.request("GET", f"/runs/{run['id']}").json)["status"] != "lost":
            assert record["status"] == "running", record
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert record["state_may_be_locked"] is True
        # the stream of a lost run ends instead of waiting forever
        kinds = [json.loads(line)["type"] for _, line in stream(b, run["id"])]
        assert "finished" not in kinds and kinds[0] == "queued"
    finally:
        a.stop()
        b.stop()
