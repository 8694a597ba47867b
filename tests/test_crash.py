"""A server killed in the middle of a run loses nothing: terraform's output outlives the
server, so terraform finishes and writes its state, and a restarted server finds it."""

from __future__ import annotations

import signal
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
        # A retry finds the resource: nothing is made twice.
        r = again.request("PUT", "/made/one", {"marker": str(marker), "seconds": 2.25})
        assert r.status == 200, r.body
        assert r.json["changes"]["add"] == 0, r.json
        assert marker.read_text().splitlines() == ["made"]
        assert again.request("DELETE", "/made/one").status == 200
    finally:
        again.stop()
