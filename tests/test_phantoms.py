"""What failed, canceled and killed creates leave (issue 20 §1): an empty state is no
instance (not listed, not counted, 404 to a GET and a DELETE, removed by the run that
left it or by that DELETE), and a create that made something before it failed expires
as it asked."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support import ROOT, Moto, ServerProcess, start_server
from test_runs import start_async, wait_run, wait_sleeping
from test_s3 import keys, store  # noqa: F401 - the fixture

MODULES = ROOT / "tests" / "modules_phantoms"
POLICY = """
[modules.half]
max_instances_per_tenant = 1
max_ttl = "1h"
"""
#: Terraform's state of a workspace that holds nothing yet (what a create starts with).
EMPTY_STATE = {"version": 4, "terraform_version": "1.11.4", "serial": 0,
               "lineage": "00000000-0000-0000-0000-000000000000", "outputs": {},
               "resources": [], "check_results": None}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, terraform_bin: str
        ) -> Iterator[tuple[ServerProcess, Path]]:
    tmp = tmp_path_factory.mktemp("phantoms")
    (tmp / "policy.toml").write_text(POLICY)
    server = start_server(tmp, modules_dir=MODULES, env={
        "TFSERVER_POLICY": str(tmp / "policy.toml"), "TFSERVER_KILL_GRACE": "5"})
    yield server, tmp / "state" / "state" / "half"
    server.stop()


def listed(server: ServerProcess) -> list[str]:
    r = server.request("GET", "/half")
    assert r.status == 200, r.body
    return [i["instance"] for i in r.json["instances"]]


def assert_no_instance(server: ServerProcess, instance: str) -> None:
    """Listing, quota, GET and DELETE agree that there is no such instance."""
    assert instance not in listed(server)
    assert server.request("GET", f"/half/{instance}").status == 404
    r = server.request("PUT", "/half/other", {})  # the quota of 1 is free
    assert r.status == 201, r.body
    assert server.request("DELETE", "/half/other").status == 200
    r = server.request("DELETE", f"/half/{instance}")
    assert r.status == 404, r.body
    assert server.request("GET", f"/half/{instance}").status == 404
    assert instance not in listed(server)


def test_a_force_canceled_create_leaves_no_phantom(srv: tuple[ServerProcess, Path]) -> None:
    server, states = srv
    run_id = start_async(server, "/half/forced", {"seconds": 71}).json["id"]
    wait_sleeping("71")  # terraform made the workspace's state; no resource exists yet
    r = server.request("POST", f"/runs/{run_id}/cancel?force=true")
    assert r.status == 202, r.body
    assert wait_run(server, run_id, timeout=60)["status"] == "canceled"
    assert not (states / "local.forced").exists()  # the run removed what it left
    assert_no_instance(server, "forced")


@pytest.mark.parametrize("content", [b"", json.dumps(EMPTY_STATE).encode()],
                         ids=["zero-bytes", "no-resources"])
def test_an_empty_state_is_no_instance(srv: tuple[ServerProcess, Path],
                                       content: bytes) -> None:
    """What a killed server's create leaves (no run left to clean it): a DELETE does."""
    server, states = srv
    folder = states / "local.killed"
    folder.mkdir(parents=True)
    (folder / "terraform.tfstate").write_bytes(content)
    assert_no_instance(server, "killed")
    assert not folder.exists()  # the DELETE removed the phantom


def check_expires(server: ServerProcess, instance: str, resources: int) -> dict[str, Any]:
    r = server.request("GET", f"/half/{instance}")
    assert r.status == 200, r.body
    assert r.json["resources"] == resources, r.json
    assert r.json["expires_at"] is not None, r.json
    assert instance in listed(server)
    assert server.request("PUT", "/half/other", {}).status == 403  # counted
    return dict(r.json)


def test_a_failed_create_expires_as_it_asked(srv: tuple[ServerProcess, Path]) -> None:
    server, _ = srv
    r = server.request("PUT", "/half/failed?ttl=30m", {"fail": True})
    assert r.status == 502, r.body
    check_expires(server, "failed", 2)  # the second is tainted
    assert server.request("DELETE", "/half/failed").status == 200
    assert "failed" not in listed(server)


def test_a_canceled_create_expires_as_it_asked(srv: tuple[ServerProcess, Path]) -> None:
    server, _ = srv
    run_id = start_async(server, "/half/halfway?ttl=30m", {"then_seconds": 73}).json["id"]
    wait_sleeping("73")  # the first resource exists
    assert server.request("POST", f"/runs/{run_id}/cancel").status == 202
    assert wait_run(server, run_id, timeout=60)["status"] == "canceled"
    check_expires(server, "halfway", 2)  # the second is tainted
    assert server.request("DELETE", "/half/halfway").status == 200


@pytest.mark.parametrize("content", [b"", json.dumps(EMPTY_STATE).encode()],
                         ids=["zero-bytes", "no-resources"])
def test_an_empty_state_object_in_s3_is_no_instance(
        tmp: Path, moto: Moto, store: dict[str, str],  # noqa: F811
        content: bytes) -> None:
    (tmp / "policy.toml").write_text(POLICY)
    server = start_server(tmp, modules_dir=MODULES, env={
        **store, "TF_STATE_USE_LOCKFILE": "true", "TFSERVER_POLICY": str(tmp / "policy.toml")})
    s3, bucket = moto.client("s3"), store["TF_STATE_BUCKET"]
    key = "tfs/half/local.killed/terraform.tfstate"
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=content)
        assert_no_instance(server, "killed")
        assert key not in keys(moto, bucket)  # the DELETE removed the phantom
    finally:
        server.stop()


def test_a_force_canceled_create_in_s3_is_no_instance_while_locked(
        tmp: Path, moto: Moto, store: dict[str, str]) -> None:  # noqa: F811
    (tmp / "policy.toml").write_text(POLICY)
    server = start_server(tmp, modules_dir=MODULES, env={
        **store, "TF_STATE_USE_LOCKFILE": "true", "TFSERVER_POLICY": str(tmp / "policy.toml")})
    try:
        run_id = start_async(server, "/half/forced", {"seconds": 77}).json["id"]
        wait_sleeping("77")
        assert server.request("POST", f"/runs/{run_id}/cancel?force=true").status == 202
        assert wait_run(server, run_id, timeout=60)["status"] == "canceled"
        assert_no_instance(server, "forced")
        # the killed terraform's lock stays (an admin clears it): a create of the name says so
        r = server.request("PUT", "/half/forced", {})
        assert r.status == 409 and r.json["lock"]["id"], r.body
    finally:
        server.stop()
