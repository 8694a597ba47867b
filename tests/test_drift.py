"""Drift checks (issue 23): `POST /{module}/{instance}/drift` runs a refresh-only plan of
the kept inputs with every run feature, and the instance's `drift` field shows what it
found as names only. Real drift needs a real provider: the slow tests drive hashicorp/aws
from the offline mirror against moto's server; the rest use terraform_data (which a
refresh never finds drifted) and a terraform shim that can make a check slow."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_engine import Start, calls, fleet

from support import (
    ROOT,
    Jwks,
    Moto,
    ServerProcess,
    Signer,
    aws_provider_mirror,
    bearer,
    start_server,
)
from test_runs import body
from test_s3 import store
from tfserver.__main__ import _webhooks
from tfserver.app.engine import spec_doc, spec_of
from tfserver.app.execute import RunSpec
from tfserver.auth import Principal
from tfserver.module.discover import load_module
from tfserver.runs.store import RunRecord
from tfserver.scrub import Scrubber
from tfserver.terraform.drift import DriftChange, differing, plan_drift, stream_drift
from tfserver.terraform.output import api_event
from tfserver.web.render import drift as shown_drift

__all__ = ["fleet", "store"]

ASYNC = {"Prefer": "respond-async"}
REFRESH = "plan -json -refresh-only"


# -- the route and the field on terraform_data ----------------------------------------------


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer("drift-key")


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, signer: Signer, terraform_bin: str
        ) -> Iterator[tuple[ServerProcess, Path, Path]]:
    """A server with auth on, terraform behind a shim that logs its calls and makes a
    drift check sleep while the flag file exists; (server, call log, flag)."""
    tmp = tmp_path_factory.mktemp("drift")
    log, flag, shim = tmp / "calls.log", tmp / "slow-drift", tmp / "terraform-shim"
    # The sleep is waited for so that the interrupt of a cancel ends the shim at once.
    shim.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n'
                    f'case "$*" in "{REFRESH}"*) if [ -e "{flag}" ]; then\n'
                    "  sleep 30 & p=$!; trap 'kill $p; exit 130' INT TERM; wait $p\n"
                    f'fi;; esac\nexec "{terraform_bin}" "$@"\n')
    shim.chmod(0o755)
    jwks = Jwks()
    jwks.publish(signer)
    server = start_server(tmp, env={"COGNITO_ISSUER": Signer.ISSUER, "JWK_URL": jwks.url,
                                    "TFSERVER_TERRAFORM": str(shim)})
    yield server, log, flag
    server.stop()
    jwks.close()


def who(signer: Signer, client: str = "drift-client", access: str = "write") -> dict[str, str]:
    return bearer(signer.token(client, f"tfserver/basic.{access}"))


def make(server: ServerProcess, headers: dict[str, str], instance: str) -> None:
    r = server.request("PUT", f"/basic/{instance}", {"name": instance}, headers=headers)
    assert r.status == 201, r.body


def checks(log: Path) -> int:
    return sum(1 for line in log.read_text().splitlines() if line.startswith(REFRESH))


def wait_run(server: ServerProcess, run_id: str, headers: dict[str, str],
             timeout: float = 60) -> dict[str, Any]:
    """The run's record once it ended (its events stream ends with it: awaited, bounded
    by the stream's own timeout)."""
    r = server.request("GET", f"/runs/{run_id}/events", headers=headers, timeout=timeout)
    assert r.status == 200, r.body
    record = server.request("GET", f"/runs/{run_id}", headers=headers).json
    assert record["status"] in ("succeeded", "failed", "canceled", "lost"), record
    return dict(record)


def test_unknown_before_any_check_then_in_sync(srv: tuple[ServerProcess, Path, Path],
                                               signer: Signer) -> None:
    server, log, _ = srv
    h = who(signer)
    make(server, h, "plain")
    before = server.request("GET", "/basic/plain", headers=h).json
    assert before["drift"] == {"status": "unknown", "checked_at": None, "run_id": None,
                               "changes": []}
    r = server.request("POST", "/basic/plain/drift", headers=h)
    assert r.status == 200, r.body
    run_id = r.json["run_id"]
    assert r.json["drift"]["status"] == "in_sync" and r.json["drift"]["changes"] == []
    assert r.json["drift"]["run_id"] == run_id
    shown = server.request("GET", "/basic/plain", headers=h).json["drift"]
    assert shown["status"] == "in_sync" and shown["run_id"] == run_id
    assert shown["checked_at"].endswith("Z")
    record = server.request("GET", f"/runs/{run_id}", headers=h).json
    assert record["operation"] == "drift" and record["status"] == "succeeded"
    assert record["drift"]["status"] == "in_sync"
    runs = server.request("GET", "/basic/plain/runs", headers=h).json["runs"]
    assert runs[0]["id"] == run_id
    assert checks(log) == 1
    # in sync: nothing to reconcile, no apply started
    r = server.request("POST", "/basic/plain/drift?reconcile=true", headers=h)
    assert r.status == 200 and "reconciled_by" not in r.json["drift"], r.body
    assert server.request("GET", "/basic/plain/runs", headers=h).json["runs"][0][
        "operation"] == "drift"


def test_unknown_instances_other_tenants_and_scopes(srv: tuple[ServerProcess, Path, Path],
                                                    signer: Signer) -> None:
    server, _, _ = srv
    h = who(signer)
    make(server, h, "mine")
    assert server.request("POST", "/basic/nothing/drift", headers=h).status == 404
    assert server.request("POST", "/nomodule/x/drift", headers=h).status == 404
    assert server.request("POST", "/basic/Bad_Name/drift", headers=h).status == 400
    assert server.request("POST", "/basic/mine/drift?reconcile=maybe",
                          headers=h).status == 400
    # another client is another tenant: it has no such instance
    assert server.request("POST", "/basic/mine/drift",
                          headers=who(signer, "someone-else")).status == 404
    assert server.request("POST", "/basic/mine/drift",
                          headers=who(signer, access="read")).status == 403
    assert server.request("POST", "/basic/mine/drift").status == 401
    r = server.request("GET", "/basic/mine/drift", headers=h)
    assert r.status == 405 and r.header("Allow") == "POST"


def test_async_check_with_events_and_cancel(srv: tuple[ServerProcess, Path, Path],
                                            signer: Signer) -> None:
    server, _, flag = srv
    h = who(signer)
    make(server, h, "slow")
    flag.touch()
    try:
        r = server.request("POST", "/basic/slow/drift", headers={**h, **ASYNC})
        assert r.status == 202, r.body
        run_id = r.json["id"]
        assert r.header("Location") == f"/runs/{run_id}"
        assert r.json["operation"] == "drift"
        deadline = time.monotonic() + 30
        while server.request("GET", f"/runs/{run_id}", headers=h).json["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert server.request("POST", f"/runs/{run_id}/cancel", headers=h).status == 202
        done = wait_run(server, run_id, h)
        assert done["status"] == "canceled", done
    finally:
        flag.unlink()
    events = [json.loads(line) for line in server.request(
        "GET", f"/runs/{run_id}/events", headers=h).body.splitlines()]
    assert events[0]["type"] == "queued"
    assert events[-1]["type"] == "finished" and events[-1]["status"] == "canceled"
    # a canceled check changes nothing: the instance shows no check, and the next runs
    assert server.request("GET", "/basic/slow", headers=h).json["drift"]["status"] == "unknown"
    r = server.request("POST", "/basic/slow/drift", headers={**h, "Prefer": "wait=30"})
    assert r.status == 200 and r.json["drift"]["status"] == "in_sync", r.body
    events = [json.loads(line)["type"] for line in server.request(
        "GET", f"/runs/{r.json['run_id']}/events", headers=h).body.splitlines()]
    assert "started" in events and events[-1] == "finished"


def test_an_idempotent_check_runs_terraform_once(srv: tuple[ServerProcess, Path, Path],
                                                 signer: Signer) -> None:
    server, log, _ = srv
    h = who(signer)
    make(server, h, "idem")
    before = checks(log)
    key = {**h, "Idempotency-Key": "drift-key-1"}
    first = server.request("POST", "/basic/idem/drift", headers=key)
    again = server.request("POST", "/basic/idem/drift", headers=key)
    assert first.status == again.status == 200, (first.body, again.body)
    assert first.json["run_id"] == again.json["run_id"]
    assert again.json["drift"] == first.json["drift"]
    assert checks(log) == before + 1
    other = server.request("POST", "/basic/idem/drift?reconcile=true", headers=key)
    assert other.status == 422, other.body


def test_a_destroy_forgets_the_drift(srv: tuple[ServerProcess, Path, Path],
                                     signer: Signer) -> None:
    server, _, _ = srv
    h = who(signer)
    make(server, h, "gone")
    assert server.request("POST", "/basic/gone/drift", headers=h).status == 200
    assert server.request("DELETE", "/basic/gone", headers=h).status == 200
    assert server.request("POST", "/basic/gone/drift", headers=h).status == 404
    make(server, h, "gone")
    assert server.request("GET", "/basic/gone", headers=h).json["drift"]["status"] == "unknown"


def test_a_drift_check_through_the_sqs_engine(fleet: tuple[Start, str]) -> None:
    """An API replica queues the check, a worker runs it; the report is kept in the bucket
    and read by the API replica."""
    start, _ = fleet
    api, worker = start("api1", "api"), start("w1", "worker")
    assert api.request("PUT", "/steps/checked", body(0, "c")).status == 201
    r = api.request("POST", "/steps/checked/drift?reconcile=true")
    assert r.status == 200 and r.json["drift"]["status"] == "in_sync", r.body
    assert api.request("GET", "/steps/checked").json["drift"]["run_id"] == r.json["run_id"]
    assert calls(api) == []
    assert [c for c in calls(worker) if c.startswith(REFRESH)]


# -- pure parts -------------------------------------------------------------------------------


def test_only_attribute_names_are_kept() -> None:
    secret = "s3cr3t-value"
    plan = {"resource_drift": [
        {"address": "aws_s3_bucket.this", "change": {
            "actions": ["update"],
            "before": {"bucket": "b", "tags": {"k": "old"}, "tags_all": {"k": "old"}},
            "after": {"bucket": "b", "tags": {"k": secret}, "tags_all": {"k": secret}}}},
        {"address": "x.gone", "change": {"actions": ["delete"], "before": {"a": 1},
                                         "after": None}},
    ]}
    found = plan_drift(plan)
    assert found == [DriftChange("aws_s3_bucket.this", "update", ("tags", "tags_all")),
                     DriftChange("x.gone", "delete")]
    assert secret not in json.dumps([c.as_dict() for c in found])
    assert differing({"a": 1, "b": 2}, {"a": 1, "c": 3}) == ("b", "c")
    event = {"type": "resource_drift",
             "change": {"resource": {"addr": "a.b"}, "action": "update"}}
    assert stream_drift([event, {"type": "planned_change"}]) == [DriftChange("a.b", "update")]
    assert api_event(event) == {"type": "drift", "address": "a.b", "action": "update"}
    assert shown_drift(None)["status"] == "unknown"


def test_the_sqs_engine_carries_a_drift_check() -> None:
    module = load_module(ROOT / "tests" / "modules" / "basic")
    principal = Principal(subject="s", tenant="t")
    spec = RunSpec(module, "i", "ws", "drift", {}, principal, Scrubber([]), reconcile=True)
    record = RunRecord(id=spec.run_id, module=module.name, instance="i", workspace="ws",
                       tenant="t", subject="s", operation="drift")
    back = spec_of({module.name: module}, record, json.loads(json.dumps(spec_doc(spec))))
    assert (back.operation, back.reconcile) == ("drift", True)


class _Notifier:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any], str | None]] = []

    def run_finished(self, record: RunRecord) -> list[str]:
        self.sent.append(("run.finished", {}, record.tenant))
        return []

    def notify(self, event: str, payload: dict[str, Any], tenant: str | None,
               client_id: str | None = None) -> list[str]:
        self.sent.append((event, payload, tenant))
        return []


def test_a_drifted_check_notifies_instance_drifted() -> None:
    notifier = _Notifier()
    ended = _webhooks(notifier)  # type: ignore[arg-type]
    base = {"id": "r1", "module": "m", "instance": "i", "workspace": "t.i", "tenant": "t",
            "subject": "s", "operation": "drift", "status": "succeeded", "finished_at": 5.0}
    ended(RunRecord(**base, drift={"status": "in_sync", "changes": []}))
    assert [e for e, _, _ in notifier.sent] == ["run.finished"]
    changes = [{"address": "a.b", "action": "update", "attributes": ["tags"]}]
    ended(RunRecord(**base, drift={"status": "drifted", "changes": changes}))
    event, payload, tenant = notifier.sent[-1]
    assert (event, tenant) == ("instance.drifted", "t")
    assert payload["type"] == "instance.drifted"
    assert payload["data"]["run_id"] == "r1" and payload["data"]["status"] == "drifted"
    assert "tags" not in json.dumps(payload)  # names stay in the API, behind a token


# -- real drift: hashicorp/aws against moto ---------------------------------------------------


@pytest.fixture(scope="module")
def aws(tmp_path_factory: pytest.TempPathFactory, moto: Moto, terraform_bin: str
        ) -> Iterator[ServerProcess]:
    mirror = aws_provider_mirror()
    tmp = tmp_path_factory.mktemp("drift-aws")
    shutil.copytree(ROOT / "tests" / "modules_drift", tmp / "modules")
    server = start_server(tmp, modules_dir=tmp / "modules", ready_timeout=180, env={
        **moto.aws_env(), "TFSERVER_PROVIDER_MIRROR": str(mirror)})
    yield server
    server.stop()


TAG_VALUE = "cost-center-Zq81x"  # the out-of-band value: never shown anywhere


@pytest.mark.slow
def test_real_drift_is_named_never_shown_and_reconciled(aws: ServerProcess,
                                                        moto: Moto) -> None:
    s3 = moto.client("s3")
    tags = {"team": "blue", "owner": "ops"}
    r = aws.request("PUT", "/bucket/tagged", {"endpoint": moto.url, "bucket": "drift-tagged",
                                              "tags": tags}, timeout=120)
    assert r.status == 201, r.body
    r = aws.request("POST", "/bucket/tagged/drift", timeout=120)
    assert r.status == 200 and r.json["drift"]["status"] == "in_sync", r.body
    s3.put_bucket_tagging(Bucket="drift-tagged", Tagging={"TagSet": [
        {"Key": "team", "Value": TAG_VALUE}, {"Key": "owner", "Value": "ops"}]})
    r = aws.request("POST", "/bucket/tagged/drift?reconcile=true", timeout=120)
    assert r.status == 200, r.body
    drift = r.json["drift"]
    assert drift["status"] == "drifted", drift
    assert drift["changes"] == [{"address": "aws_s3_bucket.this", "action": "update",
                                 "attributes": ["tags", "tags_all"]}]
    apply_id = drift["reconciled_by"]
    shown = aws.request("GET", "/bucket/tagged").json["drift"]
    assert shown["status"] == "drifted" and shown["reconciled_by"] == apply_id
    applied = wait_run(aws, apply_id, {}, timeout=120)
    assert applied["status"] == "succeeded" and applied["operation"] == "apply", applied
    assert applied["who"]["subject"] == "tfserver:drift"
    got = s3.get_bucket_tagging(Bucket="drift-tagged")["TagSet"]
    assert {t["Key"]: t["Value"] for t in got} == tags  # the kept inputs, applied again
    check = r.json["run_id"]
    seen = [r.body, aws.request("GET", "/bucket/tagged").body,
            aws.request("GET", f"/runs/{check}").body,
            aws.request("GET", f"/runs/{check}/events").body,
            aws.request("GET", f"/runs/{apply_id}/events").body,
            aws.request("GET", "/bucket/tagged/runs").body, aws.log_text().encode()]
    assert not [s for s in seen if TAG_VALUE.encode() in s]
