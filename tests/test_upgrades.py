"""Fleet upgrades (DESIGN: Module versions and upgrades): a preview that saves a plan per
instance and applies nothing, then an apply in batches that stops at the first failure,
holds back replacements, never applies a stale plan, and whose record any replica reads."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support import ROOT, Jwks, Moto, ServerProcess, Signer, bearer, start_server
from test_s3 import MODES, store

__all__ = ["store"]  # the fixture

MODULES = ROOT / "tests" / "modules_versions"
ENDED = ("planned", "applied", "failed")


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, terraform_bin: str
        ) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("upgrades"), modules_dir=MODULES,
                          env={"TFSERVER_MAX_RUNS": "4"})
    yield server
    server.stop()


def make(srv: ServerProcess, instance: str, version: str = "1.0.0", **body: Any) -> None:
    r = srv.request("PUT", f"/app/{instance}?version={version}", {"name": instance, **body})
    assert r.status in (200, 201), r.body


def start(srv: ServerProcess, body: dict[str, Any]) -> dict[str, Any]:
    r = srv.request("POST", "/app/upgrades", body)
    assert r.status == 202, r.body
    assert r.header("Location") == f"/upgrades/{r.json['id']}"
    return r.json


def settle(srv: ServerProcess, upgrade_id: str, wanted: tuple[str, ...] = ENDED,
           timeout: float = 120) -> dict[str, Any]:
    """The upgrade's record once its status is one of `wanted` (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = srv.request("GET", f"/upgrades/{upgrade_id}").json
        if doc["status"] in wanted:
            return doc
        time.sleep(0.1)
    raise AssertionError(f"upgrade {upgrade_id} did not settle: {doc}")


def by_instance(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["instance"]: e for e in doc["instances"]}


def version_of(srv: ServerProcess, instance: str) -> str:
    return srv.request("GET", f"/app/{instance}").json["version"]


def test_fleet_of_ten_in_batches_of_three_stops_at_the_first_failure(
        srv: ServerProcess) -> None:
    names = [f"f{i}" for i in range(10)]
    for name in names:
        # f4 is named "bad" inside: version 1.1.0 fails to apply it (a provisioner).
        make(srv, name) if name != "f4" else srv.request(
            "PUT", "/app/f4?version=1.0.0", {"name": "bad"})
    doc = start(srv, {"to": "1.1.0", "instances": names, "batch_size": 3})
    assert doc["status"] == "planning"
    doc = settle(srv, doc["id"])
    assert doc["status"] == "planned", doc
    entries = by_instance(doc)
    for name in names:
        e = entries[name]
        assert (e["status"], e["from"], e["added"]) == ("planned", "1.0.0", ["tags"]), e
        assert e["changes"] == {"add": 1, "change": 0, "remove": 0}
        assert e["replaced"] == [] and e["destroyed"] == []
    # Nothing applied by the preview.
    assert {version_of(srv, n) for n in names} == {"1.0.0"}
    assert doc["links"]["apply"] == f"/upgrades/{doc['id']}/apply"
    r = srv.request("POST", f"/upgrades/{doc['id']}/apply")
    assert r.status == 202 and r.json["status"] == "applying"
    doc = settle(srv, doc["id"], ("applied", "failed"))
    assert doc["status"] == "failed"
    entries = by_instance(doc)
    assert [entries[n]["status"] for n in names] == [
        "applied", "applied", "applied", "applied", "failed", "applied",
        "not_applied", "not_applied", "not_applied", "not_applied"]
    assert "local-exec" in entries["f4"]["problem"]
    assert "stopped after f4 failed" in entries["f6"]["held_back"]
    # f4's apply failed after it began changing resources: like its inputs, the version
    # it ran is kept (its state holds what 1.1.0 made); those not applied stay on 1.0.0.
    assert [version_of(srv, n) for n in names] == ["1.1.0"] * 6 + ["1.0.0"] * 4
    # Batch after batch: the second began once the first had ended.
    runs = {n: srv.request("GET", f"/runs/{entries[n]['apply_run']}").json
            for n in names[:6]}
    assert min(runs[n]["started_at"] for n in names[3:6]) >= \
        max(runs[n]["finished_at"] for n in names[:3])
    assert runs["f0"]["version"] == "1.1.0"
    kinds = [e["type"] for e in doc["events"]]
    assert kinds[0] == "started" and "applying" in kinds and kinds[-1] == "failed"
    # Applied once: a second apply is refused.
    assert srv.request("POST", f"/upgrades/{doc['id']}/apply").status == 409


def waited(srv: ServerProcess, upgrade_id: str, prefer: str = "wait=60") -> Any:
    return srv.request("GET", f"/upgrades/{upgrade_id}", headers={"Prefer": prefer},
                       timeout=100)


def test_prefer_wait_answers_once_the_upgrade_is_no_longer_on_its_way(
        srv: ServerProcess) -> None:
    for name in ("w1", "w2", "w3"):
        make(srv, name)
    doc = start(srv, {"to": "1.1.0", "instances": ["w1", "w2", "w3"]})
    r = waited(srv, doc["id"])  # one request, answered when the preview is done
    assert r.status == 200 and r.json["status"] == "planned", r.body
    assert [e["status"] for e in r.json["instances"]] == ["planned"] * 3
    r = srv.request("POST", f"/upgrades/{doc['id']}/apply")
    assert r.status == 202
    r = waited(srv, doc["id"])
    assert r.json["status"] == "applied", r.body
    # Done already, no wait; hostile or odd preferences are no wait or the longest one.
    for prefer in ("wait=90", "wait=0", "wait=abc", "wait=99999999999999999999",
                   "wait=-1", "respond-async"):
        r = waited(srv, doc["id"], prefer)
        assert r.status == 200 and r.json["status"] == "applied", (prefer, r.body)
    assert waited(srv, "0" * 32).status == 404
    assert waited(srv, "not-an-id").status == 404


def test_replacing_plans_are_held_back_unless_allowed(srv: ServerProcess) -> None:
    for name in ("r1", "r2"):
        make(srv, name)
    make(srv, "r3", size="m")  # its kept size is a string: version 2.0.0 takes numbers
    doc = settle(srv, start(srv, {"to": "2.0.0", "instances": ["r1", "r2", "r3"],
                                  "set": {"owner": "ops"}})["id"])
    entries = by_instance(doc)
    assert entries["r1"]["status"] == "held"
    assert entries["r1"]["replaced"] == ["terraform_data.this"]
    assert "allow_replace" in entries["r1"]["held_back"]
    assert entries["r1"]["retyped"] == ["size"] and entries["r1"]["added"] == ["owner"]
    assert entries["r3"]["status"] == "held" and "plan_run" not in entries["r3"]
    assert "size: must be a number" in entries["r3"]["held_back"]
    assert srv.request("POST", f"/upgrades/{doc['id']}/apply").status == 202
    doc = settle(srv, doc["id"], ("applied", "failed"))
    assert doc["status"] == "applied"
    assert {version_of(srv, n) for n in ("r1", "r2", "r3")} == {"1.0.0"}
    allowed = settle(srv, start(srv, {"to": "2.0.0", "instances": ["r1"],
                                      "set": {"owner": "ops"}, "allow_replace": True})["id"])
    assert by_instance(allowed)["r1"]["status"] == "planned"
    srv.request("POST", f"/upgrades/{allowed['id']}/apply")
    assert settle(srv, allowed["id"], ("applied", "failed"))["status"] == "applied"
    assert version_of(srv, "r1") == "2.0.0"
    assert srv.request("GET", "/app/r1").json["outputs"]["version"] == "2.0.0"


def test_a_stale_plan_is_reported_never_applied(srv: ServerProcess) -> None:
    make(srv, "s1")
    make(srv, "s2")
    doc = settle(srv, start(srv, {"to": "1.1.0", "instances": ["s1", "s2"]})["id"])
    assert doc["status"] == "planned"
    make(srv, "s1", size="xl")  # the state changes after the plan was saved
    srv.request("POST", f"/upgrades/{doc['id']}/apply")
    doc = settle(srv, doc["id"], ("applied", "failed"))
    entries = by_instance(doc)
    assert entries["s1"]["status"] == "stale", entries["s1"]
    assert entries["s2"]["status"] == "applied"
    assert version_of(srv, "s1") == "1.0.0" and version_of(srv, "s2") == "1.1.0"
    assert srv.request("GET", "/app/s1").json["outputs"]["id"] == "s1-xl"


def test_default_instances_are_those_on_another_version(srv: ServerProcess) -> None:
    make(srv, "d1", version="2.0.0", owner="me")
    make(srv, "d2")
    doc = settle(srv, start(srv, {"to": "2.0.0", "set": {"owner": "x"}})["id"])
    names = set(by_instance(doc))
    assert "d1" not in names and "d2" in names  # every instance on another version


BAD_BODIES: list[tuple[Any, str]] = [
    ([], ""), ("x", ""), ({}, "to"), ({"to": 2}, "to"), ({"to": "2.0.0", "extra": 1}, "extra"),
    ({"to": "2.0.0", "instances": "f1"}, "instances"),
    ({"to": "2.0.0", "instances": ["../x"]}, "instances[0]"),
    ({"to": "2.0.0", "instances": ["a\n"]}, "instances[0]"),
    ({"to": "2.0.0", "instances": [{"instance": "f1", "tenant": "../"}]}, "instances[0]"),
    ({"to": "2.0.0", "instances": ["f1"] * 1001}, "instances"),
    ({"to": "2.0.0", "instances": ["nosuch"]}, "instances"),
    ({"to": "2.0.0", "set": []}, "set"), ({"to": "2.0.0", "set": {"nope": 1}}, "set.nope"),
    ({"to": "2.0.0", "set": {"size": "big"}}, "set.size"),
    ({"to": "2.0.0", "set": {"tfserver_tenant": "x"}}, "set.tfserver_tenant"),
    ({"to": "2.0.0", "batch_size": 0}, "batch_size"),
    ({"to": "2.0.0", "batch_size": 101}, "batch_size"),
    ({"to": "2.0.0", "batch_size": True}, "batch_size"),
    ({"to": "2.0.0", "batch_size": "3"}, "batch_size"),
    ({"to": "2.0.0", "allow_replace": "yes"}, "allow_replace"),
]


@pytest.mark.parametrize(("body", "field"), BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_hostile_upgrade_bodies_are_400s(srv: ServerProcess, body: Any, field: str) -> None:
    r = srv.request("POST", "/app/upgrades", body)
    assert r.status == 400, r.body[:300]
    if field:
        assert field in {e["field"] for e in r.json.get("errors", [])}, r.json


@pytest.mark.parametrize("to", ["../../etc", "9" * 5000, "\u0661.0.0", "", "3.0.0"])
def test_hostile_target_versions_are_400s(srv: ServerProcess, to: str) -> None:
    r = srv.request("POST", "/app/upgrades", {"to": to})
    assert r.status == 400
    assert to in ("", "3.0.0") or to[:50] not in r.body.decode()


def test_upgrade_ids_and_unversioned_modules(srv: ServerProcess) -> None:
    for path in ("/upgrades/nosuch", "/upgrades/" + "0" * 32, "/upgrades/..%2F_inputs",
                 "/upgrades/" + "a" * 33):
        assert srv.request("GET", path).status == 404, path
        assert srv.request("POST", path + "/apply").status == 404, path
    r = srv.request("POST", "/plain/upgrades", {"to": "1.0.0"})
    assert r.status == 400 and "no versions" in r.json["detail"]
    assert srv.request("GET", "/app/upgrades").status == 405


def test_two_replicas_on_s3_share_the_upgrade_record(tmp: Path, moto: Moto,
                                                     store: dict[str, str]) -> None:
    env = {**store, **MODES["lockfile"]}
    a = start_server(tmp / "a", modules_dir=MODULES, env={**env, "TFSERVER_REPLICA_ID": "a"})
    b = start_server(tmp / "b", modules_dir=MODULES, env={**env, "TFSERVER_REPLICA_ID": "b"})
    try:
        for name in ("m1", "m2"):
            make(a, name)
        doc = start(a, {"to": "1.1.0", "batch_size": 1})
        seen = waited(b, doc["id"]).json  # planned on a, waited for on b
        assert seen["status"] == "planned" and set(by_instance(seen)) == {"m1", "m2"}
        answers: list[int] = []
        both = [threading.Thread(target=lambda s=s: answers.append(s.request(
            "POST", f"/upgrades/{doc['id']}/apply").status)) for s in (a, b)]
        for t in both:
            t.start()
        for t in both:
            t.join(60)
        assert sorted(answers) == [202, 409]  # asked of both at once: applied once
        done = settle(a, doc["id"], ("applied", "failed"))  # applied by b, read on a
        assert done["status"] == "applied", done
        assert version_of(a, "m1") == version_of(b, "m2") == "1.1.0"
    finally:
        a.stop()
        b.stop()


def test_upgrades_are_an_admins_and_reach_every_tenant(tmp: Path, terraform_bin: str) -> None:
    signer = Signer("upgrade-key")
    jwks = Jwks()
    jwks.publish(signer)
    srv = start_server(tmp, modules_dir=MODULES, env={"COGNITO_ISSUER": Signer.ISSUER,
                                                       "JWK_URL": jwks.url})
    try:
        writers = {c: bearer(signer.token(c, "tfserver/app.write")) for c in ("one", "two")}
        admin = bearer(signer.token("ops", "tfserver/admin"))
        for client, who in writers.items():
            r = srv.request("PUT", "/app/web?version=1.0.0", {"name": client}, headers=who)
            assert r.status == 201, r.body
        r = srv.request("POST", "/app/upgrades", {"to": "1.1.0"}, headers=writers["one"])
        assert r.status == 403
        doc = srv.request("POST", "/app/upgrades", {"to": "1.1.0"}, headers=admin).json
        assert srv.request("GET", f"/upgrades/{doc['id']}", headers=writers["one"]
                           ).status == 403
        assert srv.request("GET", f"/upgrades/{doc['id']}").status == 401
        deadline = time.monotonic() + 60
        while doc["status"] == "planning" and time.monotonic() < deadline:
            time.sleep(0.1)
            doc = srv.request("GET", f"/upgrades/{doc['id']}", headers=admin).json
        assert doc["status"] == "planned"
        assert len({e["tenant"] for e in doc["instances"]}) == 2  # both tenants' "web"
        assert srv.request("POST", f"/upgrades/{doc['id']}/apply",
                           headers=writers["two"]).status == 403
        assert srv.request("POST", f"/upgrades/{doc['id']}/apply",
                           headers=admin).status == 202
        deadline = time.monotonic() + 60
        while doc["status"] in ("planned", "applying") and time.monotonic() < deadline:
            time.sleep(0.1)
            doc = srv.request("GET", f"/upgrades/{doc['id']}", headers=admin).json
        assert doc["status"] == "applied", doc
        for who in writers.values():
            shown = srv.request("GET", "/app/web", headers=who).json
            assert shown["version"] == "1.1.0" and shown["upgrade_available"] is True
        # An admin's force-unlock of a versioned module's instance runs in a version's
        # working copy (none is named after the module alone): no lock held, a 409.
        r = srv.request("DELETE", "/app/web/lock", {"lock_id": "no-such-lock"}, headers=admin)
        assert r.status == 409, r.body
    finally:
        srv.stop()
        jwks.close()


def test_versions_and_upgrades_through_the_sqs_engine(tmp: Path, moto: Moto,
                                                      store: dict[str, str]) -> None:
    """An API replica that never runs terraform and a worker: the version travels with
    each queued run's spec, and an upgrade's plans and applies run on the worker."""
    url = moto.client("sqs").create_queue(QueueName=f"up-{time.time_ns()}.fifo", Attributes={
        "FifoQueue": "true"})["QueueUrl"]
    env = {**store, **MODES["lockfile"], "TFSERVER_QUEUE": "sqs", "TFSERVER_QUEUE_URL": url,
           "TFSERVER_SQS_ENDPOINT": moto.url, "TFSERVER_SQS_VISIBILITY": "6"}
    worker = start_server(tmp / "w", modules_dir=MODULES, env={
        **env, "TFSERVER_ROLE": "worker", "TFSERVER_REPLICA_ID": "w"})
    api = start_server(tmp / "a", modules_dir=MODULES, env={
        **env, "TFSERVER_ROLE": "api", "TFSERVER_REPLICA_ID": "a"})
    try:
        for name in ("q1", "q2"):
            make(api, name)
        assert version_of(api, "q1") == "1.0.0"
        plan = api.request("PUT", "/app/q1?dry_run=true&version=2.0.0",
                           {"owner": "me", "size": 3})
        assert plan.status == 200 and plan.json["from_version"] == "1.0.0", plan.body
        doc = settle(api, start(api, {"to": "1.1.0", "batch_size": 1})["id"])
        assert doc["status"] == "planned", doc
        assert api.request("POST", f"/upgrades/{doc['id']}/apply").status == 202
        assert settle(api, doc["id"], ("applied", "failed"))["status"] == "applied"
        assert version_of(api, "q1") == version_of(api, "q2") == "1.1.0"
        assert api.request("DELETE", "/app/q2").status == 200  # on its kept 1.1.0
    finally:
        api.stop(timeout=90)
        worker.stop(timeout=90)
