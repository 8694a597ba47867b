"""A hostile pass over approvals (issue 25): what a client or a crash can do to a run
awaiting approval, against a running tfserver with real terraform and auth on (the
tokens, module and policy of test_approvals.py)."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_approvals import (
    ENDED,
    MODULES,
    People,
    answer,
    auth_env,
    awaiting,
    body,
    journal,
)

from support import Jwks, ServerProcess, Signer, start_server
from test_runs import ASYNC, wait_run
from test_s3 import store  # noqa: F401 - the fixture


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer("hostile-approvals-key")


@pytest.fixture(scope="module")
def jwks(signer: Signer) -> Iterator[Jwks]:
    keys = Jwks()
    keys.publish(signer)
    yield keys
    keys.close()


@pytest.fixture(scope="module")
def people(signer: Signer) -> People:
    return People(signer)


def kinds(server: ServerProcess, run_id: str, who: dict[str, str]) -> list[str]:
    lines = server.request("GET", f"/runs/{run_id}/events",
                           headers=who).body.decode().splitlines()
    return [json.loads(line)["type"] for line in lines]


def approved_behind_a_hog(server: ServerProcess, tmp: Path, people: People, instance: str,
                          tag: str, *, seconds: float) -> tuple[dict[str, Any], str]:
    """A run awaiting approval, approved (202, queued) while `free`'s slow apply (no
    approval needed) holds the one run slot: (the run, the slow apply's run id)."""
    run = awaiting(server, tmp, people.alice, instance, tag)
    hog = server.request("PUT", "/gated/hog", body(tmp, "hog", "h", seconds=seconds),
                         headers={**people.free, **ASYNC})
    assert hog.status == 202, hog.body
    wait_run(server, hog.json["id"], ("running", *ENDED), headers=people.free)
    r = answer(server, run["id"], "approve", people.bob, ASYNC)
    assert r.status == 202 and r.json["status"] == "queued", r.body
    return run, str(hog.json["id"])


def test_an_approval_killed_before_its_apply_began_applies_once(
        tmp_path: Path, jwks: Jwks, people: People, terraform_bin: str) -> None:
    """Approved (202), the apply waits for the one run slot; SIGKILL then: after the
    restart the approved apply runs, once (it was lost, never applied, before)."""
    env = auth_env(tmp_path, jwks, TFSERVER_MAX_RUNS="1")
    server = start_server(tmp_path, modules_dir=MODULES, env=env)
    run, _ = approved_behind_a_hog(server, tmp_path, people, "once", "o1", seconds=4)
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    server = start_server(tmp_path, modules_dir=MODULES, env=env)
    try:
        done = wait_run(server, run["id"], ENDED, headers=people.alice)
        assert done["status"] == "succeeded", done
        assert done["approval"]["answered_by"] == "bob"
        assert journal(tmp_path, "once") == ["apply o1"]
        assert not (tmp_path / "state" / "_runs" / "awaiting" / f"{run['id']}.json").exists()
    finally:
        assert server.stop() == 0
    # Never twice: a later start finds nothing to take back.
    server = start_server(tmp_path, modules_dir=MODULES, env=env)
    try:
        again = server.request("GET", f"/runs/{run['id']}", headers=people.alice).json
        assert again["status"] == "succeeded"
        assert journal(tmp_path, "once") == ["apply o1"]
    finally:
        server.stop()


def test_an_approval_killed_once_its_apply_began_is_lost_not_rerun(
        tmp_path: Path, jwks: Jwks, people: People, terraform_bin: str) -> None:
    """SIGKILL while the approved apply runs: after the restart the run is lost (what it
    did is unknown), never applied a second time by the server."""
    env = auth_env(tmp_path, jwks)
    server = start_server(tmp_path, modules_dir=MODULES, env=env)
    run = awaiting(server, tmp_path, people.alice, "begun", "b1", seconds=2)
    r = answer(server, run["id"], "approve", people.bob, ASYNC)
    assert r.status == 202, r.body
    wait_run(server, run["id"], ("running", *ENDED), headers=people.alice)
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    server = start_server(tmp_path, modules_dir=MODULES, env=env)
    try:
        record = wait_run(server, run["id"], ENDED, headers=people.alice)
        assert record["status"] == "lost", record
        assert kinds(server, run["id"], people.alice).count("approved") <= 1
        assert not (tmp_path / "state" / "_runs" / "awaiting" / f"{run['id']}.json").exists()
    finally:
        server.stop()


def test_an_answer_on_another_replica_frees_the_planners_lane(
        moto: Any, store: dict[str, str], tmp_path: Path, jwks: Jwks,  # noqa: F811
        people: People,
        terraform_bin: str) -> None:
    """Two replicas on one bucket: a run parked on A approved (or rejected) on B ends on
    A too: A shows its end and its lane is free for the instance's next run."""
    env = {**store, "TF_STATE_USE_LOCKFILE": "true", **auth_env(tmp_path, jwks)}
    a = start_server(tmp_path / "a", modules_dir=MODULES,
                     env={**env, "TFSERVER_REPLICA_ID": "a"})
    b = start_server(tmp_path / "b", modules_dir=MODULES,
                     env={**env, "TFSERVER_REPLICA_ID": "b"})
    try:
        run = awaiting(a, tmp_path, people.alice, "two", "t1")
        r = answer(b, run["id"], "approve", people.bob)
        assert r.status == 201, r.body
        assert journal(tmp_path, "two") == ["apply t1"]
        seen = wait_run(a, run["id"], ENDED, timeout=30, headers=people.alice)
        assert seen["status"] == "succeeded", seen
        nxt = awaiting(a, tmp_path, people.alice, "two", "t2")  # A's lane is free
        r = answer(b, nxt["id"], "reject", people.bob)
        assert r.status == 200 and r.json["status"] == "rejected", r.body
        seen = wait_run(a, nxt["id"], ENDED, timeout=30, headers=people.alice)
        assert seen["status"] == "rejected", seen
        # A cancel on A just after an approval on B cancels B's apply (it was taken by
        # A's parked copy of the run, and the apply went on).
        run = awaiting(a, tmp_path, people.alice, "two", "t3", seconds=6.5)
        r = answer(b, run["id"], "approve", people.bob, ASYNC)
        assert r.status == 202, r.body
        r = a.request("POST", f"/runs/{run['id']}/cancel", headers=people.alice)
        assert r.status == 202, r.body
        seen = wait_run(b, run["id"], ENDED, timeout=30, headers=people.alice)
        assert seen["status"] == "canceled", seen
        assert "apply t3" not in journal(tmp_path, "two")
        # B runs the apply it approved as its own: A sees it running past the lost-run
        # window (10 s; it showed lost, or queued again, when the record named A).
        run = awaiting(a, tmp_path, people.alice, "two", "t4", seconds=12)
        assert answer(b, run["id"], "approve", people.bob, ASYNC).status == 202
        began = time.monotonic()
        wait_run(a, run["id"], ("running", *ENDED), timeout=10, headers=people.alice)
        while time.monotonic() - began < 11.5:
            shown = a.request("GET", f"/runs/{run['id']}", headers=people.alice).json
            if shown["status"] != "running":
                break
            time.sleep(0.5)
        assert shown["status"] in ("running", "succeeded"), shown
        assert wait_run(a, run["id"], ENDED, timeout=30,
                        headers=people.alice)["status"] == "succeeded"
    finally:
        a.stop()
        b.stop()


def test_a_run_left_awaiting_by_a_replica_gone_for_good_expires(
        moto: Any, store: dict[str, str], tmp_path: Path, jwks: Jwks,  # noqa: F811
        people: People, terraform_bin: str) -> None:
    """Replica A parks a run and dies; it never comes back (a deploy names replicas
    anew): replica B expires the run once its plan's time passed (it stayed awaiting)."""
    env = {**store, "TF_STATE_USE_LOCKFILE": "true",
           **auth_env(tmp_path, jwks, TFSERVER_PLAN_TTL="2s")}
    a = start_server(tmp_path / "a", modules_dir=MODULES,
                     env={**env, "TFSERVER_REPLICA_ID": "a"})
    run = awaiting(a, tmp_path, people.alice, "gone", "g1")
    assert a.stop(signal.SIGKILL) == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) <= run["approval"][
            "expires_at"][:19]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    b = start_server(tmp_path / "b", modules_dir=MODULES,
                     env={**env, "TFSERVER_REPLICA_ID": "b", "TFSERVER_PLAN_TTL": "1h"})
    try:
        record = wait_run(b, run["id"], ENDED, timeout=20, headers=people.alice)
        assert record["status"] == "expired", record
        assert record["approval"]["answered_by"] == "tfserver:plan-ttl"
        assert answer(b, awaiting(b, tmp_path, people.alice, "gone", "g2")["id"], "approve",
                      people.bob).status == 201
        assert journal(tmp_path, "gone") == ["apply g2"]
    finally:
        b.stop()


def test_an_approval_stopped_before_its_apply_began_applies_after_the_start(
        tmp_path: Path, jwks: Jwks, people: People, terraform_bin: str) -> None:
    """A graceful stop (SIGTERM) while the approved apply waits for the one run slot: the
    next start applies it, once (it ended canceled, the approval spent, while a SIGKILL
    kept it)."""
    env = auth_env(tmp_path, jwks, TFSERVER_MAX_RUNS="1")
    server = start_server(tmp_path, modules_dir=MODULES, env=env)
    run, hog = approved_behind_a_hog(server, tmp_path, people, "term", "t1", seconds=2)
    assert server.stop() == 0
    assert journal(tmp_path, "term") == []
    server = start_server(tmp_path, modules_dir=MODULES, env=env)
    try:
        done = wait_run(server, run["id"], ENDED, headers=people.alice)
        assert done["status"] == "succeeded", done
        assert journal(tmp_path, "term") == ["apply t1"]
        assert wait_run(server, hog, ENDED, headers=people.free)["status"] == "succeeded"
    finally:
        server.stop()


def test_a_run_awaiting_approval_holds_no_run_slot(
        tmp_path: Path, jwks: Jwks, people: People, terraform_bin: str) -> None:
    """`max_runs_per_tenant = 1`: a run awaiting its approval is not in flight, so the
    tenant's next run plans at once (it was 429 for 30 s, the parked run's slot kept); an
    approval takes the slot again, 429 while another approved run holds it (the run still
    awaits, and is approved once that one ended)."""
    env = auth_env(tmp_path, jwks)
    limited = tmp_path / "limited.toml"
    limited.write_text((tmp_path / "policy.toml").read_text()
                       + "\n[tenants.team.modules.gated]\nmax_runs_per_tenant = 1\n")
    server = start_server(tmp_path, modules_dir=MODULES,
                          env={**env, "TFSERVER_POLICY": str(limited)})
    try:
        first = awaiting(server, tmp_path, people.alice, "s1", "a", seconds=3)
        second = awaiting(server, tmp_path, people.alice, "s2", "b")
        r = answer(server, first["id"], "approve", people.bob, ASYNC)
        assert r.status == 202, r.body
        r = answer(server, second["id"], "approve", people.bob)
        assert r.status == 429 and r.headers["Retry-After"], r.body
        assert "approve run" in r.json["detail"] and r.json["limit"] == 1, r.body
        shown = server.request("GET", f"/runs/{second['id']}", headers=people.alice).json
        assert shown["status"] == "awaiting_approval" and shown["approval"]["answer"] is None
        refused = server.request("PUT", "/gated/s3", body(tmp_path, "s3", "c"),
                                 headers=people.alice)
        assert refused.status == 429, refused.body  # the approved run is in flight
        done = wait_run(server, first["id"], ENDED, headers=people.alice)
        assert done["status"] == "succeeded", done
        r = answer(server, second["id"], "approve", people.bob)
        assert r.status == 201 and r.json["outputs"] == {"tag": "b"}, r.body
        assert journal(tmp_path, "s1") == ["apply a"] and journal(tmp_path, "s2") == ["apply b"]
        awaiting(server, tmp_path, people.alice, "s3", "c")  # every slot given back
    finally:
        server.stop()


def limited(tmp_path: Path, max_runs: int) -> Any:
    """`Governance` over test_approvals' policy, `team` limited to `max_runs` runs of
    `gated`, on a local backend."""
    from test_approvals import POLICY

    from tfserver.app.governance import Governance
    from tfserver.module.discover import discover
    from tfserver.module.policyfile import load_policy
    from tfserver.runs.lanes import Scheduler
    from tfserver.runs.registry import Runs
    from tfserver.runs.store import RunStore
    from tfserver.storage.local import LocalBackend

    path = tmp_path / "policy.toml"
    path.write_text(POLICY + f"\n[tenants.team.modules.gated]\nmax_runs_per_tenant = {max_runs}\n")
    backend = LocalBackend(tmp_path / "state")
    runs = Runs(RunStore(backend.objects), Scheduler(1, 4), replica="r", kill_grace=1)
    return Governance(load_policy(path, discover(MODULES)), backend, runs)


def gated_run(instance: str) -> Any:
    """A new run record of `gated` (tenant `t`)."""
    from tfserver.runs.store import RunRecord, new_run_id

    return RunRecord(id=new_run_id(), module="gated", instance=instance,
                     workspace=f"t.{instance}", tenant="t", subject="alice",
                     operation="apply")


def holders(governance: Any) -> list[str]:
    """Who holds `gated`'s run slots of tenant `t`."""
    return [h.holder for h in governance.reservations.runs.held("t", "gated")]


def test_a_losing_approval_gives_back_only_its_own_slot(tmp_path: Path) -> None:
    """Two approvals of one run racing (two replicas, a double click) each take a run
    slot before one wins the answer: the loser gave back every slot of the run, the
    winner's too, and the tenant could run one more than its limit; so did the parking
    of a run approved as it parked. And a slot that cannot be given back as a run parks
    is no error (it is freed as stale later)."""
    from tfserver.auth import Principal
    from tfserver.errors import Unavailable
    from tfserver.module.limits import Limits

    governance = limited(tmp_path, 2)
    record = gated_run("x")
    planner = Principal(subject="alice", tenant="team")
    governance.reserve(governance.limits(planner, "gated"), record, queued=False)
    governance.resumed(record, planner)  # approved as it parks: the event came first
    governance.parked(record)  # gives back its admission's slot, not the approval's
    assert holders(governance) == [record.id]
    lost = governance.resumed(record, planner)  # a second approval racing the first
    lost()  # it lost the answer (409): its slot back, and that one only
    assert holders(governance) == [record.id]
    governance.ended(record)
    assert holders(governance) == []
    # A run that cannot park is not remembered: on the sqs engine it ends on a worker,
    # and the API replica's memory of it would grow with every run.
    other = gated_run("y")
    governance.reserve(Limits(max_runs=2), other, queued=True)
    assert other.id not in governance._admitted

    def failing(key: str, holder: str) -> None:
        raise Unavailable("the backend is down")

    governance.reserve(governance.limits(planner, "gated"), record, queued=False)
    governance.reservations.free_slot = failing
    governance.parked(record)  # logged, not raised: the run still parks


def test_an_approved_run_taken_back_at_a_restart_takes_its_slot_again(
        tmp_path: Path) -> None:
    """An approved run a killed server left waiting held its slot; while the server was
    down the slot could be freed as stale, and the run taken back at the restart went on
    without one (a run past the tenant's limit). Now it takes one again (never refused:
    it was approved; past the limit it is logged), and none more if it still holds one."""
    from tfserver.auth import Principal

    governance = limited(tmp_path, 1)
    planner = Principal(subject="alice", tenant="team")
    first, second = gated_run("x"), gated_run("x")
    governance.readmitted(first, planner)
    assert holders(governance) == [first.id]
    governance.readmitted(first, planner)  # it holds one: none more
    assert holders(governance) == [first.id]
    governance.readmitted(second, planner)  # the limit is full: logged, not refused
    assert holders(governance) == [first.id]
