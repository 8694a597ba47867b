"""Governance on a running tfserver: instance quotas, per-tenant run limits, expiry and
the reaper (on one server and on two replicas sharing one bucket)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support import Jwks, Moto, ServerProcess, Signer, bearer, start_server, terraform_shim
from test_runs import MODULES as RUN_MODULES
from test_runs import body as steps_body
from test_runs import wait_run
from test_s3 import store  # noqa: F401 - the fixture
from tfserver.runs.expiry import BACKOFF_FIRST, Due, Expiries, Reaper
from tfserver.storage.local import LocalObjects

POLICY = """
[defaults]
max_runs_per_tenant = 1

[modules.steps]
max_instances_per_tenant = 3
max_ttl = "1h"
"""


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer("gov-key")


@pytest.fixture(scope="module")
def governed(tmp_path_factory: pytest.TempPathFactory, signer: Signer, terraform_bin: str
             ) -> Iterator[tuple[ServerProcess, Path]]:
    tmp = tmp_path_factory.mktemp("gov")
    jwks = Jwks()
    jwks.publish(signer)
    (tmp / "policy.toml").write_text(POLICY)
    shim, log = terraform_shim(tmp)
    server = start_server(tmp, modules_dir=RUN_MODULES, env={
        "COGNITO_ISSUER": Signer.ISSUER, "JWK_URL": jwks.url, "TFSERVER_TERRAFORM": str(shim),
        "TFSERVER_POLICY": str(tmp / "policy.toml"), "TFSERVER_REAP_INTERVAL": "0.5"})
    yield server, log
    server.stop()
    jwks.close()


def token(signer: Signer, client: str) -> dict[str, str]:
    return bearer(signer.token(client, "tfserver/steps.write"))


def test_the_instance_quota_refuses_the_fourth_but_updates_the_third(
        governed: tuple[ServerProcess, Path], signer: Signer) -> None:
    server, log = governed
    who = token(signer, "quota-client")
    for i in range(3):
        assert server.request("PUT", f"/steps/q{i}", steps_body(0, f"q{i}"),
                              headers=who).status == 201
    before = len(log.read_text().splitlines())
    r = server.request("PUT", "/steps/q3", steps_body(0, "q3"), headers=who)
    assert r.status == 403, r.body
    assert r.json["limit"] == 3 and r.json["count"] == 3 and "limit is 3" in r.json["detail"]
    assert len(log.read_text().splitlines()) == before  # no terraform for a refusal
    assert server.request("PUT", "/steps/q2", steps_body(0, "again"), headers=who).status == 200
    assert server.request("PUT", "/steps/q3?dry_run=true", steps_body(0),
                          headers=who).status == 200  # a plan creates nothing
    other = token(signer, "another-client")  # quotas are per tenant
    assert server.request("PUT", "/steps/q3", steps_body(0), headers=other).status == 201
    assert server.request("DELETE", "/steps/q0", headers=who).status == 200
    assert server.request("PUT", "/steps/q3", steps_body(0, "q3"), headers=who).status == 201
    for name, headers in (("q1", who), ("q2", who), ("q3", who), ("q3", other)):
        assert server.request("DELETE", f"/steps/{name}", headers=headers).status == 200


def test_the_run_limit_is_429_while_another_tenant_still_runs(
        governed: tuple[ServerProcess, Path], signer: Signer) -> None:
    server, _ = governed
    first = token(signer, "busy-client")
    running = server.request("PUT", "/steps/busy-a", steps_body(3, "long"),
                             headers={**first, "Prefer": "respond-async"})
    assert running.status == 202
    r = server.request("PUT", "/steps/busy-b", steps_body(0), headers=first)
    assert r.status == 429 and r.header("Retry-After") and r.json["limit"] == 1, r.body
    second = token(signer, "calm-client")
    assert server.request("PUT", "/steps/calm", steps_body(0), headers=second).status == 201
    assert wait_run(server, running.json["id"], headers=first)["status"] == "succeeded"
    assert server.request("PUT", "/steps/busy-b", steps_body(0), headers=first).status == 201
    for name, headers in (("busy-a", first), ("busy-b", first), ("calm", second)):
        assert server.request("DELETE", f"/steps/{name}", headers=headers).status == 200


def wait_gone(server: ServerProcess, path: str, headers: dict[str, str],
              timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while server.request("GET", path, headers=headers).status != 404:
        assert time.monotonic() < deadline, f"{path} was never reaped"
        time.sleep(0.25)


def test_an_instance_expires_and_the_reaper_destroys_it(
        governed: tuple[ServerProcess, Path], signer: Signer) -> None:
    server, _ = governed
    who = token(signer, "ttl-client")
    assert server.request("PUT", "/steps/long?ttl=2h", steps_body(0),
                          headers=who).status == 400  # beyond max_ttl
    r = server.request("PUT", "/steps/brief?ttl=2s", steps_body(0), headers=who)
    assert r.status == 201 and r.json["expires_at"].endswith("Z"), r.body
    # (GET shows expires_at: checked on the longer-lived instance below, as a loaded
    # machine may reap this one before a GET gets there)
    wait_gone(server, "/steps/brief", who)
    # The state goes before the destroy's record ends: its status follows (bounded).
    deadline = time.monotonic() + 30
    while True:
        runs = server.request("GET", "/steps/brief/runs", headers=who).json["runs"]
        if runs[0]["status"] not in ("queued", "running") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [(x["operation"], x["who"]["subject"], x["status"]) for x in runs[:2]] == [
        ("destroy", "tfserver:ttl", "succeeded"), ("apply", "ttl-client", "succeeded")]
    # without ?ttl= the policy's max_ttl (no default_ttl) is the expiry; a later ?ttl=
    # moves it
    r = server.request("PUT", "/steps/kept", steps_body(0), headers=who)
    assert r.status == 201 and r.json["expires_at"]
    moved = server.request("PUT", "/steps/kept?ttl=30m", steps_body(0), headers=who).json
    assert moved["expires_at"] < r.json["expires_at"]
    assert server.request("GET", "/steps/kept", headers=who).json["expires_at"] == \
        moved["expires_at"]
    assert server.request("DELETE", "/steps/kept", headers=who).status == 200


def test_an_instance_being_changed_is_not_reaped(governed: tuple[ServerProcess, Path],
                                                 signer: Signer) -> None:
    server, _ = governed
    who = token(signer, "change-client")
    assert server.request("PUT", "/steps/changing?ttl=2s", steps_body(0),
                          headers=who).status == 201
    # an apply that outlives the expiry and moves it: the reaper must wait, then leave it
    r = server.request("PUT", "/steps/changing?ttl=30m", steps_body(1.5, "changed"),
                       headers=who)
    assert r.status == 200, r.body
    time.sleep(2)
    shown = server.request("GET", "/steps/changing", headers=who)
    assert shown.status == 200 and shown.json["outputs"]["tag"] == "changed"
    runs = server.request("GET", "/steps/changing/runs", headers=who).json["runs"]
    assert not [x for x in runs if x["who"]["subject"] == "tfserver:ttl" and
                x["status"] == "succeeded"], runs
    assert server.request("DELETE", "/steps/changing", headers=who).status == 200


def test_two_replicas_reap_an_instance_exactly_once(tmp: Path, moto: Moto,
                                                    store: dict[str, str]) -> None:  # noqa: F811
    shim, log = terraform_shim(tmp)
    env = {**store, "TFSERVER_TERRAFORM": str(shim), "TFSERVER_REAP_INTERVAL": "0.5",
           "TF_STATE_USE_LOCKFILE": "true"}
    a = start_server(tmp / "a", modules_dir=RUN_MODULES, env={**env, "TFSERVER_REPLICA_ID": "a"})
    b = start_server(tmp / "b", modules_dir=RUN_MODULES, env={**env, "TFSERVER_REPLICA_ID": "b"})
    try:
        assert a.request("PUT", "/steps/shared?ttl=2s", steps_body(0)).status == 201
        wait_gone(b, "/steps/shared", {})
        time.sleep(3)  # both reapers had several more rounds to act twice
        runs = b.request("GET", "/steps/shared/runs").json["runs"]
        reaps = [x for x in runs if x["who"]["subject"] == "tfserver:ttl"]
        assert len(reaps) == 1 and reaps[0]["status"] == "succeeded", runs
        destroys = [line for line in log.read_text().splitlines()
                    if line.startswith("destroy ")]
        assert len(destroys) == 1, destroys
    finally:
        a.stop()
        b.stop()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_failed_reap_is_retried_with_back_off(tmp_path: Path) -> None:
    expiries = Expiries(LocalObjects(tmp_path))
    clock = FakeClock()
    expiries.set("m", "local.x", clock.now - 1)
    statuses: dict[str, str] = {}
    started: list[Due] = []

    def start(due: Due) -> str:
        started.append(due)
        run_id = f"run{len(started)}"
        statuses[run_id] = "failed"
        return run_id

    reaper = Reaper(expiries, start, statuses.__getitem__, replica="r", interval=1.0,
                    clock=clock)
    other = Reaper(expiries, start, statuses.__getitem__, replica="o", interval=1.0,
                   clock=clock)
    assert reaper.reap_once() == 1 and other.reap_once() == 0  # one attempt, one replica
    clock.now += BACKOFF_FIRST - 1
    assert reaper.reap_once() == 0 and other.reap_once() == 0  # backing off
    clock.now += 2
    assert other.reap_once() == 1 and reaper.reap_once() == 0  # the second attempt
    clock.now += BACKOFF_FIRST * 2 - 1
    assert reaper.reap_once() == 0  # the back-off doubled
    clock.now += 2
    assert reaper.reap_once() == 1
    statuses["run3"] = "succeeded"
    clock.now += 10_000
    assert reaper.reap_once() == 0 and len(started) == 3
    expiries.clear("m", "local.x")
    assert expiries.due(clock.now) == [] and list(tmp_path.rglob("*.0")) == []


def test_a_moved_expiry_is_not_reaped(tmp_path: Path) -> None:
    expiries = Expiries(LocalObjects(tmp_path))
    clock = FakeClock()
    expiries.set("m", "local.x", clock.now - 5)
    expiries.set("m", "local.x", clock.now + 3600)  # a later apply moved it
    started: list[Any] = []
    reaper = Reaper(expiries, lambda due: started.append(due) or "r1", lambda r: "failed",
                    replica="r", interval=1.0, clock=clock)
    assert reaper.reap_once() == 0 and started == []
    clock.now += 3601
    assert reaper.reap_once() == 1
