"""Approvals (`require_approval`, `separate_approver`): applies and destroys plan first and
wait in `awaiting_approval`; `POST /runs/{id}/approve` applies exactly the saved plan,
`/reject` ends the run, TFSERVER_PLAN_TTL expires it. A running tfserver with real
terraform, auth on with tokens the test signs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support import ROOT, Jwks, ServerProcess, Signer, bearer, start_server
from test_runs import ASYNC, wait_run
from test_s3 import store  # noqa: F401 - the fixture
from tfserver.errors import ConfigError
from tfserver.module.discover import discover
from tfserver.module.policyfile import load_policy

MODULES = ROOT / "tests" / "modules_approvals"
POLICY = """
[modules.gated]
require_approval = true
separate_approver = true

[tenants.solo.modules.gated]
separate_approver = false

[tenants.free]
require_approval = false
"""
ENDED = ("succeeded", "failed", "canceled", "lost", "rejected", "expired")
AWAITS = ("awaiting_approval", *ENDED)


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer("approvals-key")


@pytest.fixture(scope="module")
def jwks(signer: Signer) -> Iterator[Jwks]:
    keys = Jwks()
    keys.publish(signer)
    yield keys
    keys.close()


def auth_env(tmp: Path, jwks: Jwks, **extra: str) -> dict[str, str]:
    (tmp / "policy.toml").write_text(POLICY)
    return {"COGNITO_ISSUER": Signer.ISSUER, "JWK_URL": jwks.url,
            "TFSERVER_POLICY": str(tmp / "policy.toml"), **extra}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, jwks: Jwks, terraform_bin: str
        ) -> Iterator[tuple[ServerProcess, Path]]:
    tmp = tmp_path_factory.mktemp("approvals")
    server = start_server(tmp, modules_dir=MODULES, env=auth_env(tmp, jwks))
    yield server, tmp
    server.stop()


class People:
    """Tokens of tenant `team`: alice writes, bob approves, carol reads; `both` is alice
    with the approve scope too; `root` is an admin of another tenant, `eve` a stranger
    with every scope of the module."""

    def __init__(self, signer: Signer) -> None:
        def token(client: str, scopes: str, sub: str) -> dict[str, str]:
            return bearer(signer.token(client, scopes, sub=sub))

        self.alice = token("team", "tfserver/gated.write", "alice")
        self.bob = token("team", "tfserver/gated.approve", "bob")
        self.carol = token("team", "tfserver/gated.read", "carol")
        self.both = token("team", "tfserver/gated.write tfserver/gated.approve", "alice")
        self.root = token("ops", "tfserver/admin", "root")
        self.eve = token("other", "tfserver/gated.write tfserver/gated.approve", "eve")
        self.solo = token("solo", "tfserver/gated.write tfserver/gated.approve", "solo")
        self.free = token("free", "tfserver/gated.write", "free")


@pytest.fixture(scope="module")
def people(signer: Signer) -> People:
    return People(signer)


def body(tmp: Path, instance: str, tag: str, **more: Any) -> dict[str, Any]:
    return {"tag": tag, "journal": str(tmp / f"journal-{instance}"), **more}


def journal(tmp: Path, instance: str) -> list[str]:
    path = tmp / f"journal-{instance}"
    return path.read_text().splitlines() if path.exists() else []


def awaiting(server: ServerProcess, tmp: Path, who: dict[str, str], instance: str,
             tag: str, **more: Any) -> dict[str, Any]:
    """A synchronous PUT of a gated module: 202 with the record awaiting approval."""
    r = server.request("PUT", f"/gated/{instance}", body(tmp, instance, tag, **more),
                       headers=who)
    assert r.status == 202, r.body
    assert r.json["status"] == "awaiting_approval", r.json
    assert r.headers["Location"] == f"/runs/{r.json['id']}"
    return dict(r.json)


def answer(server: ServerProcess, run_id: str, verb: str, who: dict[str, str],
           prefer: dict[str, str] | None = None) -> Any:
    return server.request("POST", f"/runs/{run_id}/{verb}", headers={**who, **(prefer or {})})


def test_approve_applies_exactly_the_plan(srv: tuple[ServerProcess, Path],
                                          people: People) -> None:
    server, tmp = srv
    run = awaiting(server, tmp, people.alice, "one", "first", secret="a-very-secret-value")
    assert run["operation"] == "apply" and run["changes"] == {"add": 2, "change": 0,
                                                              "remove": 0}
    assert sorted(p["address"] for p in run["planned"]) == ["terraform_data.hidden",
                                                           "terraform_data.this"]
    assert all(set(p) == {"address", "action"} for p in run["planned"])
    assert run["approval"]["planned_by"] == "alice" and run["approval"]["answer"] is None
    assert run["links"]["approve"] == f"/runs/{run['id']}/approve"
    text = server.request("GET", f"/runs/{run['id']}", headers=people.carol).body.decode()
    assert "a-very-secret-value" not in text and "first" not in text
    assert journal(tmp, "one") == []  # planned only
    # Who may answer: the approve scope (or admin) of the run's tenant, not its author.
    assert answer(server, run["id"], "approve", people.both).status == 403
    assert answer(server, run["id"], "approve", people.alice).status == 403
    assert answer(server, run["id"], "approve", people.carol).status == 403
    assert answer(server, run["id"], "approve", people.eve).status == 404
    assert answer(server, run["id"], "approve", {}).status == 401
    r = answer(server, run["id"], "approve", people.bob)
    assert r.status == 201, r.body
    assert r.json["outputs"] == {"tag": "first"} and r.json["run_id"] == run["id"]
    assert journal(tmp, "one") == ["apply first"]
    record = wait_run(server, run["id"], ENDED, headers=people.alice)
    assert record["status"] == "succeeded" and "approve" not in record["links"]
    assert record["approval"]["answer"] == "approved"
    assert record["approval"]["answered_by"] == "bob"
    assert record["approval"]["planned_by"] == "alice"
    assert answer(server, run["id"], "approve", people.bob).status == 409  # answered
    assert answer(server, run["id"], "reject", people.bob).status == 409
    lines = server.records(lambda r: r.get("event") == "run"
                           and r.get("what", {}).get("run_id") == run["id"], count=2)
    assert [line["outcome"]["status"] for line in lines] == ["awaiting_approval",
                                                             "succeeded"]
    assert lines[-1]["approval"] == {"planned_by": "alice", "answer": "approved",
                                     "answered_by": "bob"}
    # The approve request's own audit line names the run's module and instance (its route
    # names neither); a refused answer's line names what its route does: nothing.
    answers = [r["what"] for r in server.records(
        lambda r: r.get("event") == "request"
        and r.get("what", {}).get("route") == "/runs/{id}/approve"
        and r.get("status", r.get("outcome", {}).get("status")) in (201, None)
        and r["what"].get("run_id") == run["id"])]
    assert answers and all((w["module"], w["instance"]) == ("gated", "one")
                           for w in answers), answers
    # A destroy waits too; an admin approves it (of another tenant: it sees all).
    r = server.request("DELETE", "/gated/one", headers=people.alice)
    assert r.status == 202 and r.json["operation"] == "destroy", r.body
    assert [p["action"] for p in r.json["planned"]] == ["delete", "delete"]
    done = answer(server, r.json["id"], "approve", people.root, ASYNC)
    assert done.status == 202 and done.json["status"] in ("queued", "running")
    assert wait_run(server, r.json["id"], headers=people.alice)["status"] == "succeeded"
    assert journal(tmp, "one") == ["apply first", "destroy first"]
    assert server.request("GET", "/gated/one", headers=people.alice).status == 404


def test_per_tenant_settings(srv: tuple[ServerProcess, Path], people: People) -> None:
    server, tmp = srv
    # `solo` may approve its own runs (its table lifts separate_approver).
    run = awaiting(server, tmp, people.solo, "mine", "s")
    assert run["approval"]["separate_approver"] is False
    assert answer(server, run["id"], "approve", people.solo).status == 201
    # `free` needs no approval: its apply runs at once, and is not answerable.
    r = server.request("PUT", "/gated/free", body(tmp, "free", "f"), headers=people.free)
    assert r.status == 201, r.body
    assert "approval" not in server.request("GET", f"/runs/{r.json['run_id']}",
                                            headers=people.free).json
    assert answer(server, r.json["run_id"], "approve", people.root).status == 409
    # A saved plan of a module under approval is not applied directly.
    plan = server.request("PUT", "/gated/planned?dry_run=true", body(tmp, "planned", "p"),
                          headers=people.alice)
    assert plan.status == 200, plan.body
    r = server.request("POST", f"/runs/{plan.json['run_id']}/apply", headers=people.alice)
    assert r.status == 409 and "approved plans" in r.json["detail"], r.body


def test_reject_cancel_and_hostile_ids(srv: tuple[ServerProcess, Path],
                                       people: People) -> None:
    server, tmp = srv
    r = server.request("PUT", "/gated/nope", body(tmp, "nope", "n"),
                       headers={**people.alice, **ASYNC})
    assert r.status == 202 and r.json["status"] in ("queued", "running"), r.body
    run = wait_run(server, r.json["id"], AWAITS, headers=people.alice)
    assert run["status"] == "awaiting_approval"
    assert answer(server, run["id"], "reject", people.carol).status == 403
    assert answer(server, run["id"], "reject", people.eve).status == 404
    r = answer(server, run["id"], "reject", people.bob)
    assert r.status == 200 and r.json["status"] == "rejected", r.body
    assert r.json["approval"]["answered_by"] == "bob" and r.json["finished_at"]
    for verb in ("approve", "reject"):
        assert answer(server, run["id"], verb, people.bob).status == 409
    assert journal(tmp, "nope") == []
    assert server.request("GET", "/gated/nope", headers=people.alice).status == 404
    # The author cancels a run awaiting approval: it ends at once.
    run = awaiting(server, tmp, people.alice, "nope", "m")
    r = server.request("POST", f"/runs/{run['id']}/cancel", headers=people.alice)
    assert r.status == 202 and r.json["status"] == "canceled", r.body
    assert r.json["approval"]["answer"] == "canceled"
    assert answer(server, run["id"], "approve", people.bob).status == 409
    assert server.request("POST", f"/runs/{run['id']}/cancel",
                          headers=people.alice).status == 409
    for bad in ("x", "0" * 32, "F" * 32, "a" * 33, "%2e%2e", "..", "a" * 500,
                run["id"].upper(), f"{run['id']}%00"):
        for verb in ("approve", "reject"):
            r = answer(server, bad, verb, people.root)
            assert r.status == 404, (bad, verb, r.body)
    r = server.request("GET", f"/runs/{run['id']}/approve", headers=people.bob)
    assert r.status == 405 and r.headers["Allow"] == "POST"
    assert journal(tmp, "nope") == []


def test_a_queue_holds_behind_an_awaiting_run(srv: tuple[ServerProcess, Path],
                                              people: People) -> None:
    server, tmp = srv
    first = awaiting(server, tmp, people.alice, "lane", "a")
    r = server.request("PUT", "/gated/lane", body(tmp, "lane", "b"),
                       headers={**people.alice, **ASYNC})
    assert r.status == 202 and r.json["queue_position"] == 1, r.body
    second = r.json["id"]
    # A synchronous call does not wait for the lane (TFSERVER_LOCK_WAIT 0): 409.
    r = server.request("PUT", "/gated/lane", body(tmp, "lane", "c"), headers=people.alice)
    assert r.status == 409, r.body
    time.sleep(1.0)  # nothing to await: the second run must not start meanwhile
    held = server.request("GET", f"/runs/{second}", headers=people.alice).json
    assert held["status"] == "queued" and held["queue_position"] == 1
    assert answer(server, first["id"], "approve", people.bob).status == 201
    # Then the second one runs: it plans and waits in turn.
    after = wait_run(server, second, AWAITS, headers=people.alice)
    assert after["status"] == "awaiting_approval"
    assert after["changes"] == {"add": 1, "change": 0, "remove": 1}
    assert answer(server, second, "reject", people.root).status == 200
    assert journal(tmp, "lane") == ["apply a"]


def bump_serial(tmp: Path, instance: str) -> None:
    """Change the instance's state behind the server's back (a new serial): a plan made
    before is stale."""
    [state] = [p for p in (tmp / "state" / "state" / "gated").glob("*/terraform.tfstate")
               if instance in p.parent.name]
    doc = json.loads(state.read_text())
    doc["serial"] += 1
    state.write_text(json.dumps(doc))


def test_a_stale_approved_plan_fails(srv: tuple[ServerProcess, Path], people: People) -> None:
    server, tmp = srv
    assert answer(server, awaiting(server, tmp, people.alice, "stale", "v1")["id"],
                  "approve", people.bob).status == 201
    run = awaiting(server, tmp, people.alice, "stale", "v2")
    bump_serial(tmp, "stale")
    r = answer(server, run["id"], "approve", people.bob)
    assert r.status == 409 and "stale" in r.json["detail"], r.body
    record = wait_run(server, run["id"], ENDED, headers=people.alice)
    assert record["status"] == "failed" and record["approval"]["answered_by"] == "bob"
    assert journal(tmp, "stale") == ["apply v1"]
    shown = server.request("GET", "/gated/stale", headers=people.alice).json
    assert shown["outputs"]["tag"] == "v1"


def test_concurrent_approvals_apply_once(srv: tuple[ServerProcess, Path],
                                         people: People) -> None:
    server, tmp = srv
    run = awaiting(server, tmp, people.alice, "race", "r1")
    statuses: list[int] = []
    start = threading.Barrier(8)

    def approve(who: dict[str, str]) -> None:
        start.wait(10)
        statuses.append(answer(server, run["id"], "approve", who).status)

    threads = [threading.Thread(target=approve, args=(people.bob if i % 2 else people.root,))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(statuses) == [201] + [409] * 7, statuses
    assert journal(tmp, "race") == ["apply r1"]


def act(server: ServerProcess, run_id: str, verb: str, who: dict[str, str],
        start: threading.Barrier, results: dict[str, int]) -> None:
    start.wait(10)
    results[verb] = answer(server, run_id, verb, who, ASYNC).status


def test_approve_while_canceling_is_consistent(srv: tuple[ServerProcess, Path],
                                               people: People) -> None:
    server, tmp = srv
    for round_ in range(4):
        instance = f"both{round_}"
        run = awaiting(server, tmp, people.alice, instance, "x", seconds=1)
        results: dict[str, int] = {}
        start = threading.Barrier(2)
        threads = [threading.Thread(target=act, args=(server, run["id"], verb, who, start,
                                                      results))
                   for verb, who in (("approve", people.bob), ("cancel", people.alice))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        record = wait_run(server, run["id"], ENDED, headers=people.alice)
        assert results["cancel"] == 202, results
        if results["approve"] == 409:  # the cancel came first: nothing applied
            assert record["status"] == "canceled" and record["approval"]["answer"] == \
                "canceled"
            assert journal(tmp, instance) == []
        else:  # approved first: the cancel stops (or misses) the apply that followed
            assert results["approve"] == 202, results
            assert record["approval"]["answer"] == "approved"
            assert record["status"] in ("succeeded", "canceled", "failed"), record
        assert answer(server, run["id"], "approve", people.bob).status == 409


def test_expiry_frees_the_lane_and_a_retry_waits_again(
        tmp_path: Path, jwks: Jwks, people: People, terraform_bin: str) -> None:
    server = start_server(tmp_path, modules_dir=MODULES,
                          env=auth_env(tmp_path, jwks, TFSERVER_PLAN_TTL="2s"))
    try:
        run = awaiting(server, tmp_path, people.alice, "late", "l")
        r = server.request("PUT", "/gated/late", body(tmp_path, "late", "m"),
                           headers={**people.alice, **ASYNC})
        assert r.status == 202 and r.json["status"] == "queued"
        expired = wait_run(server, run["id"], ENDED, timeout=20, headers=people.alice)
        assert expired["status"] == "expired", expired
        assert expired["approval"]["answered_by"] == "tfserver:plan-ttl"
        assert answer(server, run["id"], "approve", people.bob).status == 409
        # The lane is free: the queued run went on to plan (and waits in turn).
        nxt = wait_run(server, r.json["id"], AWAITS, headers=people.alice)
        assert nxt["status"] in ("awaiting_approval", "expired")
        # An expired run is retried: a new run that waits for its approval again.
        again = server.request("POST", f"/runs/{run['id']}/retry",
                               headers={**people.alice, **ASYNC})
        assert again.status == 202 and again.json["retry_of"] == run["id"], again.body
        retried = wait_run(server, again.json["id"], AWAITS, headers=people.alice)
        assert retried["status"] in ("awaiting_approval", "expired"), retried
        assert retried["approval"]["planned_by"] == "alice"
        assert journal(tmp_path, "late") == []
    finally:
        server.stop()


def test_a_crash_while_awaiting_keeps_the_run(tmp_path: Path, jwks: Jwks, people: People,
                                              terraform_bin: str) -> None:
    env = auth_env(tmp_path, jwks)
    server = start_server(tmp_path, modules_dir=MODULES, env=env)
    run = awaiting(server, tmp_path, people.alice, "crash", "c1")
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    server = start_server(tmp_path, modules_dir=MODULES, env=env)
    try:
        record = server.request("GET", f"/runs/{run['id']}", headers=people.alice).json
        assert record["status"] == "awaiting_approval", record
        assert record["planned"] == run["planned"]
        # Its lane is held again: a later run queues behind it, and runs once it is
        # approved.
        r = server.request("PUT", "/gated/crash", body(tmp_path, "crash", "c2"),
                           headers={**people.alice, **ASYNC})
        assert r.status == 202 and r.json["queue_position"] == 1, r.body
        assert answer(server, run["id"], "approve", people.bob).status == 201
        assert journal(tmp_path, "crash") == ["apply c1"]
        nxt = wait_run(server, r.json["id"], AWAITS, headers=people.alice)
        assert nxt["status"] == "awaiting_approval"
        events = server.request("GET", f"/runs/{run['id']}/events",
                                headers=people.alice).body.decode().splitlines()
        kinds = [json.loads(line)["type"] for line in events]
        assert kinds.count("awaiting_approval") == 1 and kinds[-1] == "finished", kinds
        seqs = [json.loads(line)["seq"] for line in events]
        assert seqs == list(range(1, len(seqs) + 1))
        # A graceful stop does not wait for the awaiting run; it stays stored.
        stopping = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - stopping < 20
        # An approval written just before a stop, whose apply never began, goes on.
        objects = tmp_path / "state" / "_runs"
        assert (objects / "awaiting" / f"{nxt['id']}.json").exists()
        (objects / "answers" / nxt["id"]).write_text(
            json.dumps({"answer": "approved", "by": "bob", "at": time.time()}))
        server = start_server(tmp_path, modules_dir=MODULES, env=env)
        done = wait_run(server, nxt["id"], ENDED, headers=people.alice)
        assert done["status"] == "succeeded" and done["approval"]["answered_by"] == "bob"
        assert journal(tmp_path, "crash") == ["apply c1", "destroy c1", "apply c2"]
        assert not (objects / "awaiting" / f"{nxt['id']}.json").exists()
    finally:
        server.stop()


def test_a_crash_past_the_plans_time_ends_it_expired(tmp_path: Path, jwks: Jwks,
                                                     people: People, terraform_bin: str
                                                     ) -> None:
    env = auth_env(tmp_path, jwks, TFSERVER_PLAN_TTL="3s")
    server = start_server(tmp_path, modules_dir=MODULES, env=env)
    run = awaiting(server, tmp_path, people.alice, "gone", "g1")
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    left = run["approval"]["expires_at"]
    deadline = time.time() + 10
    while time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) <= left[:19]:
        assert time.time() < deadline
        time.sleep(0.2)
    server = start_server(tmp_path, modules_dir=MODULES,
                          env={**env, "TFSERVER_PLAN_TTL": "1h"})
    try:
        record = server.request("GET", f"/runs/{run['id']}", headers=people.alice).json
        assert record["status"] == "expired", record
        # Not locked forever: the next run of the instance plans and waits.
        nxt = awaiting(server, tmp_path, people.alice, "gone", "g2")
        assert answer(server, nxt["id"], "approve", people.bob).status == 201
        assert journal(tmp_path, "gone") == ["apply g2"]
    finally:
        server.stop()


def test_the_cli_exits_with_its_own_status(srv: tuple[ServerProcess, Path], signer: Signer
                                           ) -> None:
    server, tmp = srv
    done = subprocess.run(
        [sys.executable, "-m", "tfserver", "run", "PUT", f"{server.url}/gated/cli", "-d",
         json.dumps(body(tmp, "cli", "k"))], cwd=ROOT, capture_output=True, text=True,
        timeout=120, env={"PATH": os.environ["PATH"], "HOME": str(tmp),
                          "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT)),
                          "TFSERVER_TOKEN": signer.token("team", "tfserver/gated.write",
                                                         sub="alice")})
    assert done.returncode == 3, done.stderr
    assert "awaiting approval" in done.stderr
    run = json.loads(done.stdout)
    assert run["status"] == "awaiting_approval"
    # The approver follows the apply it lets run (its replayed events hold the wait).
    done = subprocess.run(
        [sys.executable, "-m", "tfserver", "run", "POST", f"{server.url}/runs/{run['id']}/approve"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp),
             "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT)),
             "TFSERVER_TOKEN": signer.token("team", "tfserver/gated.approve", sub="bob")})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "succeeded"


def test_the_document_has_approvals(srv: tuple[ServerProcess, Path], people: People) -> None:
    server, _ = srv
    doc = server.request("GET", "/openapi.json", headers=people.alice).json
    assert {"/runs/{run_id}/approve", "/runs/{run_id}/reject"} <= set(doc["paths"])
    assert doc["paths"]["/runs/{run_id}/approve"]["post"]["operationId"] == "approve_run"
    flows = doc["components"]["securitySchemes"]["oauth2"]["flows"]["clientCredentials"]
    assert "tfserver/gated.approve" in flows["scopes"]
    status = doc["components"]["schemas"]["RunRecord"]["properties"]["status"]["enum"]
    assert {"awaiting_approval", "rejected", "expired"} <= set(status)


POLICY_FAULTS = [
    ('[modules.gated]\nrequire_approval = "yes"\n',
     "modules.gated.require_approval: must be true or false"),
    ("[tenants.a.modules.gated]\nseparate_approver = 1\n",
     "tenants.a.modules.gated.separate_approver: must be true or false"),
    ("[defaults]\nrequire_approval = \"unlimited\"\n",
     "defaults.require_approval: must be true or false"),
    ("[modules.gated]\nrequire_approvals = true\n",
     "modules.gated.require_approvals: unknown key"),
]


@pytest.mark.parametrize(("text", "fault"), POLICY_FAULTS)
def test_policy_keys_are_checked(tmp_path: Path, text: str, fault: str) -> None:
    (tmp_path / "p.toml").write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_policy(tmp_path / "p.toml", discover(MODULES))
    assert caught.value.detail.startswith(f"{tmp_path / 'p.toml'}: {fault}"), \
        caught.value.detail


def test_policy_keys_resolve_per_module_and_tenant(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text(POLICY + "[tenants.late]\nseparate_approver = true\n"
                                     "[tenants.late.modules.gated]\nrequire_approval = false\n")
    policy = load_policy(tmp_path / "p.toml", discover(MODULES))
    assert policy.requires_approval
    team = policy.limits("gated", "team")
    assert team.require_approval and team.separate_approver
    solo = policy.limits("gated", "solo")
    assert solo.require_approval and not solo.separate_approver
    assert not policy.limits("gated", "free").require_approval
    assert not policy.limits("gated", "late").require_approval


def test_the_sqs_engine_refuses_approvals(tmp_path: Path, terraform_bin: str) -> None:
    (tmp_path / "policy.toml").write_text(POLICY)
    done = subprocess.run(
        [sys.executable, "-m", "tfserver"], cwd=ROOT, capture_output=True, text=True,
        timeout=60, env={"PATH": os.environ["PATH"], "HOME": str(tmp_path),
                         "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT)),
                         "TFSERVER_POLICY": str(tmp_path / "policy.toml"),
                         "TFSERVER_MODULES_DIR": str(MODULES), "TFSERVER_PORT": "0",
                         "TFSERVER_STATE_DIR": str(tmp_path / "state"),
                         "TFSERVER_QUEUE": "sqs",
                         "TFSERVER_QUEUE_URL": "https://sqs.eu-west-1.amazonaws.com/1/q.fifo"})
    assert done.returncode == 2, done.stderr
    assert "require_approval works with TFSERVER_QUEUE=local only" in done.stderr


def test_a_separate_approver_without_authentication_stops_the_start(
        tmp_path: Path, terraform_bin: str) -> None:
    """With auth off every caller is `local`: a separate approver could never be found,
    and every gated run would wait until it expired. A one-line start error instead."""
    (tmp_path / "policy.toml").write_text(POLICY)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path),
           "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT)),
           "TFSERVER_POLICY": str(tmp_path / "policy.toml"),
           "TFSERVER_MODULES_DIR": str(MODULES), "TFSERVER_PORT": "0",
           "TFSERVER_STATE_DIR": str(tmp_path / "state")}
    done = subprocess.run([sys.executable, "-m", "tfserver"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=env)
    assert done.returncode == 2, done.stderr
    assert "modules.gated: separate_approver needs TFSERVER_AUTH=jwt" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_webhook_says_a_run_awaits(tmp_path: Path, terraform_bin: str) -> None:
    import http.server

    got: list[dict[str, Any]] = []
    arrived = threading.Condition()

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with arrived:
                got.append(data)
                arrived.notify_all()
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    (tmp_path / "policy.toml").write_text(
        "[modules.gated]\nrequire_approval = true\n[[webhooks]]\n"
        f'url = "http://127.0.0.1:{hook.server_address[1]}/hook"\n'
        'secret = "env:HOOK_SECRET"\nevents = ["run.awaiting_approval", "run.finished"]\n'
        'tenants = ["*"]\n')
    server = start_server(tmp_path, modules_dir=MODULES, env={
        "TFSERVER_POLICY": str(tmp_path / "policy.toml"), "TFSERVER_WEBHOOK_ALLOW": "127.0.0.1",
        "HOOK_SECRET": "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3"})
    try:
        run = awaiting(server, tmp_path, {}, "hooked", "h", secret="hook-secret-4411")
        with arrived:
            assert arrived.wait_for(lambda: len(got) >= 1, 30), got
        assert got[0]["type"] == "run.awaiting_approval"
        assert got[0]["data"]["run_id"] == run["id"]
        assert got[0]["data"]["status"] == "awaiting_approval"
        assert "hook-secret-4411" not in json.dumps(got)
        assert answer(server, run["id"], "approve", {}).status == 201
        with arrived:
            assert arrived.wait_for(lambda: len(got) >= 2, 30), got
        assert [g["type"] for g in got] == ["run.awaiting_approval", "run.finished"]
    finally:
        server.stop()
        hook.shutdown()
        hook.server_close()


def test_approvals_on_s3(moto: Any, store: dict[str, str], tmp_path: Path,  # noqa: F811
                         jwks: Jwks, people: People, terraform_bin: str) -> None:
    env = {**store, "TF_STATE_LOCK_TABLE": "locks", "TF_STATE_USE_LOCKFILE": "true",
           **auth_env(tmp_path, jwks)}
    server = start_server(tmp_path, modules_dir=MODULES, env=env)
    try:
        run = awaiting(server, tmp_path, people.alice, "s3", "one")
        statuses: list[int] = []
        start = threading.Barrier(4)

        def approve() -> None:
            start.wait(10)
            statuses.append(answer(server, run["id"], "approve", people.bob).status)

        threads = [threading.Thread(target=approve) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert sorted(statuses) == [201, 409, 409, 409], statuses
        assert journal(tmp_path, "s3") == ["apply one"]
        left = awaiting(server, tmp_path, people.alice, "s3", "two")
        assert server.stop(signal.SIGKILL) == -signal.SIGKILL
        server = start_server(tmp_path, modules_dir=MODULES, env=env)
        record = server.request("GET", f"/runs/{left['id']}", headers=people.alice).json
        assert record["status"] == "awaiting_approval", record
        r = answer(server, left["id"], "reject", people.bob)
        assert r.status == 200 and r.json["status"] == "rejected", r.body
        names = [o["Key"] for o in moto.client("s3").list_objects_v2(
            Bucket=store["TF_STATE_BUCKET"], Prefix="tfs/_").get("Contents", [])]
        assert not [n for n in names if n.startswith("tfs/_runs/awaiting/")], names
        assert f"tfs/_runs/answers/{left['id']}" in names
        assert not [n for n in names if n.startswith(f"tfs/_plans/{left['id']}")]
        assert f"tfs/_plans/{run['id']}.tfplan" not in names  # used: dropped
    finally:
        server.stop()
