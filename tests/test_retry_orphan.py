"""Retry of an ended run (`POST /runs/{id}/retry`) and orphaning an instance
(`DELETE /{module}/{instance}?orphan=true`) on a running tfserver with real terraform."""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support import ROOT, Jwks, ServerProcess, Signer, bearer, start_server
from test_runs import ASYNC, sleepers, wait_run
from test_s3 import store  # noqa: F401 - the fixture

MODULES = ROOT / "tests" / "modules_retry"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, terraform_bin: str
        ) -> Iterator[tuple[ServerProcess, Path]]:
    tmp = tmp_path_factory.mktemp("retry")
    server = start_server(tmp, modules_dir=MODULES, env={"TFSERVER_QUEUE_DEPTH": "12"})
    yield server, tmp
    server.stop()


def flaky(gate: Path, seconds: float = 0, tag: str = "run", journal: Path | None = None
          ) -> dict[str, Any]:
    return {"gate": str(gate), "seconds": seconds, "tag": tag,
            "journal": str(journal or "")}


def last_run(server: ServerProcess, path: str, headers: dict[str, str] | None = None
             ) -> dict[str, Any]:
    r = server.request("GET", f"{path}/runs", headers=headers)
    assert r.status == 200, r.body
    return dict(r.json["runs"][0])


def retry(server: ServerProcess, run_id: str, headers: dict[str, str] | None = None
          ) -> Any:
    return server.request("POST", f"/runs/{run_id}/retry", headers=headers)


def test_a_failed_run_runs_again_with_its_kept_inputs(srv: tuple[ServerProcess, Path]
                                                      ) -> None:
    server, tmp = srv
    gate = tmp / "gate-failed"
    r = server.request("PUT", "/flaky/failed", flaky(gate, tag="kept"))
    assert r.status == 502, r.body  # the provisioner failed: the gate is missing
    failed = last_run(server, "/flaky/failed")
    assert failed["status"] == "failed"
    gate.write_text("open")
    again = retry(server, failed["id"])  # no body: the kept request is run again
    # Answered as the PUT would be: the failed create left a tainted resource in the
    # state, so the instance exists (200), and the retry replaces the resource.
    assert again.status == 200, again.body
    assert again.json["changes"] == {"add": 1, "change": 0, "remove": 1}, again.body
    assert again.json["outputs"]["tag"] == "kept" and again.json["run_id"] != failed["id"]
    record = server.request("GET", f"/runs/{again.json['run_id']}").json
    assert record["retry_of"] == failed["id"] and record["status"] == "succeeded", record
    assert record["operation"] == "apply" and record["instance"] == "failed"
    assert "retry_of" not in server.request("GET", f"/runs/{failed['id']}").json
    # A run that succeeded is not retried; the failed one still is (asynchronously too).
    refused = retry(server, record["id"])
    assert refused.status == 409 and "succeeded" in refused.json["detail"], refused.body
    later = retry(server, failed["id"], ASYNC)
    assert later.status == 202 and later.json["retry_of"] == failed["id"], later.body
    assert later.header("Location") == f"/runs/{later.json['id']}"
    assert wait_run(server, later.json["id"])["status"] == "succeeded"
    assert server.request("DELETE", "/flaky/failed").status == 200


def test_a_canceled_run_and_a_canceled_dry_run_run_again(srv: tuple[ServerProcess, Path]
                                                         ) -> None:
    server, tmp = srv
    gate, journal = tmp / "gate-canceled", tmp / "journal-canceled"
    gate.write_text("open")
    head = server.request("PUT", "/flaky/canceled", flaky(gate, 1.5, "head", journal),
                          headers=ASYNC).json["id"]
    doomed = server.request("PUT", "/flaky/canceled", flaky(gate, 0, "doomed", journal),
                            headers=ASYNC).json
    plan = server.request("PUT", "/flaky/canceled?dry_run=true", flaky(gate, 0, "plan"),
                          headers=ASYNC).json
    for queued in (doomed, plan):
        assert queued["status"] == "queued", queued
        r = server.request("POST", f"/runs/{queued['id']}/cancel")
        assert r.status == 202 and r.json["status"] == "canceled", r.body
    busy = retry(server, head)  # still running (or queued): not retried
    assert busy.status == 409 and "only a run that failed" in busy.json["detail"], busy.body
    again = retry(server, doomed["id"], ASYNC)
    assert again.status == 202, again.body
    assert wait_run(server, head)["status"] == "succeeded"
    ran = wait_run(server, again.json["id"])
    assert ran["status"] == "succeeded" and ran["retry_of"] == doomed["id"], ran
    starts = [line.split()[1] for line in journal.read_text().splitlines()
              if line.startswith("start")]
    assert starts == ["head", "doomed"]  # the retry ran, after the run it queued behind
    planned = retry(server, plan["id"])  # a dry run retried plans again
    assert planned.status == 200 and planned.json["dry_run"] is True, planned.body
    record = server.request("GET", f"/runs/{planned.json['run_id']}").json
    assert record["operation"] == "plan" and record["retry_of"] == plan["id"], record
    assert server.request("DELETE", "/flaky/canceled").status == 200


def test_a_lost_run_runs_again(tmp_path: Path, terraform_bin: str) -> None:
    gate = tmp_path / "gate"
    gate.write_text("open")
    server = start_server(tmp_path, modules_dir=MODULES)
    try:
        r = server.request("PUT", "/flaky/lost", flaky(gate, tag="lost"), headers=ASYNC)
        run_id = r.json["id"]
        assert wait_run(server, run_id)["status"] == "succeeded"
    finally:
        server.stop()
    # What a restart finds of a run whose server died: its record says lost.
    path = tmp_path / "state" / "_runs" / "records" / f"{run_id}.json"
    doc = json.loads(path.read_text())
    doc["status"] = "lost"
    path.write_text(json.dumps(doc))
    again = start_server(tmp_path, modules_dir=MODULES)
    try:
        assert again.request("GET", f"/runs/{run_id}").json["status"] == "lost"
        r = retry(again, run_id)
        assert r.status == 200 and r.json["outputs"]["tag"] == "lost", r.body
        assert again.request("GET", f"/runs/{r.json['run_id']}").json["retry_of"] == run_id
        assert again.request("DELETE", "/flaky/lost").status == 200
    finally:
        again.stop()


def test_a_run_lost_with_its_killed_server_runs_again(tmp_path: Path, terraform_bin: str
                                                     ) -> None:
    gate = tmp_path / "gate"
    gate.write_text("open")
    server = start_server(tmp_path, modules_dir=MODULES)
    r = server.request("PUT", "/flaky/killed", flaky(gate, 79, "killed"), headers=ASYNC)
    run_id = r.json["id"]
    deadline = time.monotonic() + 30
    while server.request("GET", f"/runs/{run_id}").json["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    server.stop(signal.SIGKILL)
    # What a crashed host would not leave behind: terraform (it outlives its server, in
    # a session of its own) and its provisioner. Killing the sleep alone let terraform
    # run on and hold the state while the retried run started.
    groups = set()
    for pid in sleepers("79"):
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
            group = os.getpgid(pid)
            os.killpg(group, signal.SIGKILL)
            groups.add(group)
    while groups:
        assert time.monotonic() < deadline + 30, "terraform's group outlived SIGKILL"
        for group in list(groups):
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                groups.discard(group)
        time.sleep(0.05)
    again = start_server(tmp_path, modules_dir=MODULES)
    try:
        assert again.request("GET", f"/runs/{run_id}").json["status"] == "lost"
        r = retry(again, run_id, ASYNC)
        assert r.status == 202 and r.json["retry_of"] == run_id, r.body
        # Its kept request: 79 s of sleep, the same tag; cancel it once it runs.
        while again.request("GET", f"/runs/{r.json['id']}").json["status"] != "running":
            assert time.monotonic() < deadline + 60
            time.sleep(0.1)
        # "running" as terraform starts: its provisioner's sleep comes a little later.
        while not sleepers("79"):
            assert time.monotonic() < deadline + 90, "the retried run never slept"
            time.sleep(0.1)
        assert again.request("POST", f"/runs/{r.json['id']}/cancel?force=true").status == 202
        assert wait_run(again, r.json["id"])["status"] == "canceled"
    finally:
        again.stop()


def test_a_saved_plans_apply_is_not_retried_and_bad_ids_are_404(
        srv: tuple[ServerProcess, Path]) -> None:
    server, tmp = srv
    gate = tmp / "gate-plan"
    plan = server.request("PUT", "/flaky/plan?dry_run=true", flaky(gate, tag="p"))
    assert plan.status == 200, plan.body
    applied = server.request("POST", f"/runs/{plan.json['run_id']}/apply")
    assert applied.status == 502, applied.body
    failed = last_run(server, "/flaky/plan")
    assert failed["status"] == "failed" and failed["plan_of"] == plan.json["run_id"]
    r = retry(server, failed["id"])
    assert r.status == 409 and "plan again" in r.json["detail"], r.body
    assert retry(server, plan.json["run_id"]).status == 409  # a plan that succeeded
    # Hostile ids: unknown, huge, odd, and a run id under another path.
    for bad in ("0" * 32, "f" * 4000, "..", "%2e%2e", "x%00y", "A" * 32, failed["id"] + "0"):
        got = server.request("POST", f"/runs/{bad}/retry")
        assert got.status in (404, 414), (bad, got.status, got.body)
    assert server.request("POST", f"/flaky/{failed['id']}/retry").status in (404, 405)
    assert server.request("POST", f"/flaky/plan/{failed['id']}/retry").status == 404
    wrong = server.request("GET", f"/runs/{failed['id']}/retry")
    assert wrong.status == 405 and wrong.header("Allow") == "POST"
    runs = server.request("GET", "/flaky/plan/runs").json["runs"]
    assert len(runs) == 2, runs  # none of those ran anything
    assert server.request("DELETE", "/flaky/plan").status in (200, 404)


def failed_run(server: ServerProcess, gate: Path, instance: str,
               journal: Path | None = None) -> str:
    r = server.request("PUT", f"/flaky/{instance}", flaky(gate, 0, "storm", journal))
    assert r.status == 502, r.body
    return str(last_run(server, f"/flaky/{instance}")["id"])


def test_an_idempotency_key_makes_one_retry(srv: tuple[ServerProcess, Path]) -> None:
    server, tmp = srv
    gate = tmp / "gate-key"
    run_id = failed_run(server, gate, "key")
    key = {"Idempotency-Key": "retry-key-1"}
    first = retry(server, run_id, {**ASYNC, **key})
    assert first.status == 202, first.body
    second = retry(server, run_id, {**ASYNC, **key})
    assert second.status == 202 and second.json["id"] == first.json["id"], second.body
    wait_run(server, first.json["id"])
    sync = retry(server, run_id, key)  # answered as the first call's run ended
    assert sync.status == 502, sync.body
    other = failed_run(server, gate, "key")
    assert retry(server, other, key).status == 422  # the key came with another request
    runs = server.request("GET", "/flaky/key/runs").json["runs"]
    assert [r.get("retry_of") for r in runs].count(run_id) == 1, runs


def test_retry_storms_with_and_without_a_key(srv: tuple[ServerProcess, Path]) -> None:
    server, tmp = srv
    gate, journal = tmp / "gate-storm", tmp / "journal-storm"
    run_id = failed_run(server, gate, "storm", journal)
    answers: list[Any] = []

    def storm(headers: dict[str, str]) -> None:
        answers.clear()
        go = threading.Barrier(10)

        def one() -> None:
            go.wait(10)
            answers.append(retry(server, run_id, headers))

        threads = [threading.Thread(target=one) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)

    storm({**ASYNC, "Idempotency-Key": "storm-key"})
    assert len(answers) == 10
    assert {a.status for a in answers} <= {202, 409}, [a.body for a in answers]
    ids = {a.json["id"] for a in answers if a.status == 202}
    assert len(ids) == 1, ids
    for a in answers:
        if a.status == 409:
            assert "Idempotency-Key" in a.json["detail"], a.body
    wait_run(server, ids.pop())
    journal.unlink(missing_ok=True)
    assert server.request("GET", f"/runs/{run_id}").status == 200
    storm(ASYNC)
    assert [a.status for a in answers] == [202] * 10, [a.body for a in answers]
    made = {a.json["id"] for a in answers}
    assert len(made) == 10
    records = sorted((wait_run(server, i) for i in made), key=lambda x: x["started_at"])
    assert all(x["status"] == "failed" and x["retry_of"] == run_id for x in records)
    spans = [(x["started_at"], x["finished_at"]) for x in records]
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # one after another
    lines = journal.read_text().splitlines()
    assert [w.split()[0] for w in lines] == ["start", "end"] * 10, lines


# -- with auth: tenants, scopes, orphan ------------------------------------------------------


POLICY = """
[modules.keep]
max_instances_per_tenant = 1
"""


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer("retry-key")


@pytest.fixture(scope="module")
def authed(tmp_path_factory: pytest.TempPathFactory, signer: Signer, terraform_bin: str
           ) -> Iterator[tuple[ServerProcess, Path]]:
    tmp = tmp_path_factory.mktemp("authed")
    jwks = Jwks()
    jwks.publish(signer)
    (tmp / "policy.toml").write_text(POLICY)
    server = start_server(tmp, modules_dir=MODULES, env={
        "COGNITO_ISSUER": Signer.ISSUER, "JWK_URL": jwks.url,
        "TFSERVER_POLICY": str(tmp / "policy.toml"),
        "TFSERVER_ARCHIVE_RETENTION": "2d"})
    yield server, tmp
    server.stop()
    jwks.close()


def who(signer: Signer, client: str, scopes: str) -> dict[str, str]:
    return bearer(signer.token(client, scopes))


def test_another_tenants_run_is_404_and_retry_needs_the_write_scope(
        authed: tuple[ServerProcess, Path], signer: Signer) -> None:
    server, tmp = authed
    owner = who(signer, "owner", "tfserver/flaky.write")
    gate = tmp / "gate-tenant"
    assert server.request("PUT", "/flaky/mine", flaky(gate), headers=owner).status == 502
    run_id = last_run(server, "/flaky/mine", owner)["id"]
    stranger = who(signer, "stranger", "tfserver/flaky.write")
    r = retry(server, run_id, stranger)
    assert r.status == 404, r.body
    reader = who(signer, "owner", "tfserver/flaky.read")
    assert retry(server, run_id, reader).status == 403
    # The same tenant with another module's scope: that module's run is not its to see.
    elsewhere = who(signer, "owner", "tfserver/keep.write")
    assert retry(server, run_id, elsewhere).status == 404
    assert retry(server, run_id).status == 401
    gate.write_text("open")
    r = retry(server, run_id, owner)
    assert r.status == 200, r.body
    assert server.request("DELETE", "/flaky/mine", headers=owner).status == 200


def test_orphan_forgets_the_instance_and_destroys_nothing(
        authed: tuple[ServerProcess, Path], signer: Signer) -> None:
    server, tmp = authed
    writer = who(signer, "keeper", "tfserver/keep.write")
    admin = who(signer, "keeper", "tfserver/admin")
    marker = tmp / "destroyed-o1"
    made = server.request("PUT", "/keep/o1", {"marker": str(marker)}, headers=writer)
    assert made.status == 201, made.body
    kept = list((tmp / "state" / "_inputs" / "keep").glob("*.o1.json"))
    assert len(kept) == 1, kept
    run_id = made.json["run_id"]
    refused = server.request("DELETE", "/keep/o1?orphan=true", headers=writer)
    assert refused.status == 403, refused.body  # admin only
    odd = server.request("DELETE", "/keep/o1?orphan=maybe", headers=admin)
    assert odd.status == 400, odd.body
    both = server.request("DELETE", "/keep/o1?orphan=true&dry_run=true", headers=admin)
    assert both.status == 422, both.body
    assert server.request("GET", "/keep/o1", headers=writer).status == 200  # still there
    before = time.time()
    r = server.request("DELETE", "/keep/o1?orphan=true", headers=admin)
    assert r.status == 200, r.body
    assert set(r.json) == {"module", "instance", "orphaned", "archived_until"}
    assert r.json["module"] == "keep" and r.json["instance"] == "o1" and r.json["orphaned"]
    until = dt.datetime.fromisoformat(r.json["archived_until"].replace("Z", "+00:00"))
    assert abs(until.timestamp() - (before + 2 * 86400)) < 30, r.json
    assert not marker.exists()  # no destroy ran
    assert not kept[0].exists()  # its kept inputs went with it
    assert server.request("GET", "/keep/o1", headers=writer).status == 404
    listed = server.request("GET", "/keep", headers=writer).json["instances"]
    assert all(i["instance"] != "o1" for i in listed), listed
    assert server.request("GET", f"/runs/{run_id}", headers=writer).status == 200
    runs = server.request("GET", "/keep/o1/runs", headers=writer).json["runs"]
    assert [x["id"] for x in runs] == [run_id]
    archived = list((tmp / "state" / "_archive" / "keep").glob("*.o1.*/terraform.tfstate"))
    assert len(archived) == 1 and json.loads(archived[0].read_text())["resources"], archived
    audit = server.records(lambda x: x.get("logger") == "tfserver.audit"
                           and x.get("event") == "orphan")
    assert audit and audit[-1]["what"]["instance"] == "o1", audit
    assert audit[-1]["who"]["subject"] == "keeper"
    # The quota no longer counts it (one instance per tenant), and the name starts afresh.
    other = tmp / "destroyed-o2"
    assert server.request("PUT", "/keep/o2", {"marker": str(other)},
                          headers=writer).status == 201
    assert server.request("DELETE", "/keep/o2", headers=writer).status == 200
    assert other.read_text() == "destroyed\n"  # a real destroy runs the provisioner
    again = server.request("PUT", "/keep/o1", {"marker": str(marker)}, headers=writer)
    assert again.status == 201, again.body
    # ?orphan=false is the plain destroy, for anyone with the write scope.
    assert server.request("DELETE", "/keep/o1?orphan=false", headers=writer).status == 200
    assert marker.read_text() == "destroyed\n"  # once: the new instance's destroy
    gone = server.request("DELETE", "/keep/o1?orphan=true", headers=admin)
    assert gone.status == 404, gone.body


def test_orphan_of_a_busy_or_default_instance(authed: tuple[ServerProcess, Path],
                                              signer: Signer) -> None:
    server, tmp = authed
    writer = who(signer, "busy", "tfserver/flaky.write tfserver/keep.write")
    admin = who(signer, "busy", "tfserver/admin")
    gate = tmp / "gate-busy"
    gate.write_text("open")
    assert server.request("PUT", "/flaky/busy", flaky(gate), headers=writer).status == 201
    slow = server.request("PUT", "/flaky/busy", flaky(gate, 3, "slow"),
                          headers={**writer, **ASYNC}).json["id"]
    r = server.request("DELETE", "/flaky/busy?orphan=true", headers=admin)
    assert r.status == 409, r.body
    assert wait_run(server, slow, headers=writer)["status"] == "succeeded"
    assert server.request("GET", "/flaky/busy", headers=writer).status == 200
    r = server.request("DELETE", "/flaky/busy?orphan=1", headers=admin)
    assert r.status == 200 and r.json["orphaned"] is True, r.body
    # The default instance of a module: `DELETE /{module}?orphan=TRUE`.
    marker = tmp / "destroyed-default"
    assert server.request("POST", "/keep", {"marker": str(marker)},
                          headers=writer).status == 200
    r = server.request("DELETE", "/keep?orphan=TRUE", headers=admin)
    assert r.status == 200 and r.json["instance"] == "default", r.body
    assert not marker.exists()
    assert server.request("GET", "/keep/default", headers=writer).status == 404
    # Another tenant's instance: only with ?tenant= (and an admin).
    assert server.request("DELETE", "/keep/default?orphan=yes",
                          headers=who(signer, "stranger", "tfserver/admin")).status == 404


def test_orphan_hostile_names_and_an_orphan_on_s3(moto: Any, store: dict[str, str],  # noqa: F811
                                                  tmp_path: Path, signer: Signer,
                                                  terraform_bin: str) -> None:
    jwks = Jwks()
    jwks.publish(signer)
    env = {**store, "TF_STATE_LOCK_TABLE": "locks", "TF_STATE_USE_LOCKFILE": "true",
           "COGNITO_ISSUER": Signer.ISSUER, "JWK_URL": jwks.url}
    server = start_server(tmp_path, modules_dir=MODULES, env=env)
    try:
        writer = who(signer, "s3-tenant", "tfserver/keep.write")
        admin = who(signer, "s3-tenant", "tfserver/admin")
        for bad in ("bad%20name", "..", "x" * 300, "UPPER"):
            r = server.request("DELETE", f"/keep/{bad}?orphan=true", headers=admin)
            assert r.status in (400, 404), (bad, r.status, r.body)
        marker = tmp_path / "destroyed"
        assert server.request("PUT", "/keep/s1", {"marker": str(marker)},
                              headers=writer).status == 201
        bucket = store["TF_STATE_BUCKET"]
        s3 = moto.client("s3")
        names = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
        state = next(k for k in names if k.startswith("tfs/keep/") and ".s1/" in k)
        s3.put_object(Bucket=bucket, Key=state + ".tflock", Body=b'{"ID": "left"}')
        r = server.request("DELETE", "/keep/s1?orphan=true", headers=admin)
        assert r.status == 200 and r.json["orphaned"] is True, r.body
        names = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
        assert state not in names and state + ".tflock" not in names, names
        archived = [k for k in names if k.startswith("tfs/_archive/keep/")]
        assert len(archived) == 1 and archived[0].endswith(".tfstate"), names
        assert json.loads(s3.get_object(Bucket=bucket, Key=archived[0])["Body"].read())[
            "resources"]
        items = moto.client("dynamodb").scan(TableName="locks")["Items"]
        assert not [i for i in items if i["LockID"]["S"].startswith(f"{bucket}/{state}")]
        assert server.request("GET", "/keep/s1", headers=writer).status == 404
        # A new state of the name: no old digest or lock stands in its way.
        again = server.request("PUT", "/keep/s1", {"marker": str(marker)}, headers=writer)
        assert again.status == 201, again.body
        assert server.request("DELETE", "/keep/s1", headers=writer).status == 200
        assert marker.read_text() == "destroyed\n"
    finally:
        server.stop()
        jwks.close()


def test_archives_are_purged_after_their_retention(tmp_path: Path) -> None:
    from tfserver.runs.expiry import Expiries, Reaper
    from tfserver.storage.base import archive_stamp, archive_time
    from tfserver.storage.local import LocalBackend

    at = 1_796_000_000.25
    assert archive_stamp(at) == "20261130T005320250Z"
    assert archive_time(f"k.web.{archive_stamp(at)}") == at
    assert archive_time(f"k.web.{archive_stamp(at)}.tfstate") == at
    assert archive_time("k.web.garbage") is None and archive_time("") is None
    backend = LocalBackend(tmp_path)
    for ws, when in (("k.old", at), ("k.new", at + 86400)):
        folder = backend.root / "keep" / ws
        folder.mkdir(parents=True)
        (folder / "terraform.tfstate").write_text("{}")
        assert backend.archive("keep", ws, when).endswith(f"{ws}.{archive_stamp(when)}")
        assert not folder.exists()
    assert backend.archive("keep", "k.none", at) == ""  # no state: nothing moved
    assert backend.purge_archives(at + 1) == 1
    left = sorted(p.name for p in (tmp_path / "_archive" / "keep").iterdir())
    assert left == [f"k.new.{archive_stamp(at + 86400)}"]
    # The reaper does the purge as its chore: at its first round, then hourly.
    done = threading.Event()
    reaper = Reaper(Expiries(backend.objects), lambda due: None, lambda run: "succeeded",
                    replica="r", interval=0.05, chore=done.set)
    reaper.start()
    try:
        assert done.wait(10)
    finally:
        reaper.stop_event.set()
        reaper.join(5)


def test_the_document_has_retry_and_orphan(authed: tuple[ServerProcess, Path],
                                           signer: Signer) -> None:
    server, _ = authed
    doc = server.request("GET", "/openapi.json",
                         headers=who(signer, "doc", "tfserver/admin")).json
    retry_op = doc["paths"]["/runs/{run_id}/retry"]["post"]
    assert retry_op["operationId"] == "retry_run"
    assert {"201", "202", "404", "409"} <= set(retry_op["responses"])
    for path in ("/keep", "/keep/{instance}"):
        names = [p["name"] for p in doc["paths"][path]["delete"]["parameters"]]
        assert "orphan" in names, names
    assert "retry_of" in doc["components"]["schemas"]["RunRecord"]["properties"]


def test_a_runs_kept_request_goes_with_its_record(tmp_path: Path) -> None:
    from tfserver.runs.specs import KeptRequests, request_key
    from tfserver.runs.store import RunRecord, RunStore, new_run_id
    from tfserver.storage.local import LocalObjects

    objects = LocalObjects(tmp_path)
    runs, kept = RunStore(objects), KeptRequests(objects)
    record = RunRecord(id=new_run_id(time.time() - 7200), module="m", instance="i",
                       workspace="t.i", tenant="t", subject="s", operation="apply",
                       status="failed")
    runs.create(record)
    kept.keep(record.id, {"module": "m", "inputs": {"a": 1}})
    assert kept.get(record.id) == {"module": "m", "inputs": {"a": 1}}  # written or not
    deadline = time.monotonic() + 10
    while objects.get(request_key(record.id)) is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert runs.purge(runs_before=time.time() - 3600, now=time.time()) >= 1
    assert objects.get(request_key(record.id)) is None and kept.get(record.id) is None
