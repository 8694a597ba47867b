"""References between instances (issue 22): `{"$ref": "/network/n1#/outputs/network_id"}`
as a variable's value, checked before anything runs, resolved at the run's start from the
referenced state, `used_by`/`outdated`/409, the cascade, the index on S3 from two
replicas, and a hostile pass. Modules: tests/modules_refs (network -> subnet -> app,
with a sensitive token along the chain, and `link` for chains)."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support import Jwks, Moto, ServerProcess, Signer, bearer, start_server
from tfserver.module.refs import (
    MAX_REF_LENGTH,
    Ref,
    RefSyntaxError,
    follow,
    is_reference,
    parse_ref,
    pointer_tokens,
    ref_text,
)

REFS = Path(__file__).parent / "modules_refs"
SECRET = "network-token-0001"


def ref(text: str) -> dict[str, str]:
    return {"$ref": text}


def events(srv: ServerProcess, run_id: str, **kw: Any) -> list[dict[str, Any]]:
    """A run's whole event log (the stream ends with the run)."""
    r = srv.request("GET", f"/runs/{run_id}/events", timeout=120, **kw)
    assert r.status == 200, r.body
    return [json.loads(line) for line in r.body.decode().splitlines() if line.strip()]


def finished(srv: ServerProcess, run_id: str, **kw: Any) -> dict[str, Any]:
    """The record of a run once it ended."""
    events(srv, run_id, **kw)
    return srv.request("GET", f"/runs/{run_id}", **kw).json


def cascaded(srv: ServerProcess, run_id: str) -> list[dict[str, str]]:
    """The runs a run's cascade started (its `cascade` event)."""
    return [r for e in events(srv, run_id) if e["type"] == "cascade" for r in e["runs"]]


def run_count(srv: ServerProcess, **kw: Any) -> int:
    return len(srv.request("GET", "/runs?limit=100", **kw).json["runs"])


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of the module's server (its state folder is `state/` in it)."""
    return tmp_path_factory.mktemp("refs")


@pytest.fixture(scope="module")
def srv(home: Path, terraform_bin: str) -> Iterator[ServerProcess]:
    server = start_server(home, modules_dir=REFS)
    yield server
    server.stop()


def chain(srv: ServerProcess, suffix: str) -> dict[str, Any]:
    """network/n<suffix> -> subnet/s<suffix> -> app/a<suffix>; the three answers."""
    net = srv.request("PUT", f"/network/n{suffix}", {"name": f"main{suffix}"})
    assert net.status == 201, net.body
    sub = srv.request("PUT", f"/subnet/s{suffix}", {
        "network_id": ref(f"/network/n{suffix}#/outputs/network_id"),
        "token": ref(f"/network/n{suffix}#/outputs/token")})
    assert sub.status == 201, sub.body
    app = srv.request("PUT", f"/app/a{suffix}", {
        "subnet_id": ref(f"/subnet/s{suffix}#/outputs/subnet_id"),
        "token": ref(f"/subnet/s{suffix}#/outputs/token")})
    assert app.status == 201, app.body
    return {"network": net.json, "subnet": sub.json, "app": app.json}


# -- the pointer, alone ----------------------------------------------------------------

def test_parse_and_follow() -> None:
    assert parse_ref("/network/n1#/outputs/subnets/0/id") == Ref("network", "n1", "subnets",
                                                                ("0", "id"))
    assert parse_ref("/m/i#/outputs/a~1b/c~0d").path == ("c~d",)
    assert parse_ref("/m/i#/outputs/a~1b").output == "a/b"
    assert ref_text(parse_ref("/m/i#/outputs/a~1b/~0")) == "/m/i#/outputs/a~1b/~0"
    assert pointer_tokens("") == []
    assert is_reference({"$ref": "x"}) and not is_reference({"$ref": "x", "y": 1})
    doc = {"a": [{"b": 1}], "": {"~": 2}}
    assert follow(doc, ("a", "0", "b")) == 1
    assert follow(doc, ("", "~")) == 2
    for bad in (("a", "01"), ("a", "-"), ("a", "1"), ("a", "0", "c"), ("a", "²")):
        with pytest.raises(KeyError):
            follow(doc, bad)
    for text in ("/network/../n1#/outputs/x", "/network%2Fn1#/outputs/x",
                 "/network/n1%2F#/outputs/x", "/runs#/outputs/x", "/docs", "network/n1",
                 "/network/n1#outputs/x", "/network/n1#/inputs/x", "/network/n1#/outputs",
                 "/network/n1#/outputs/", "/network/n1#/outputs/x~2", "/Net/n1#/outputs/x",
                 "/network/n1/x#/outputs/x", "/network/n1?a=b#/outputs/x", 7, None,
                 "/m/i#/outputs" + "/a" * 40, "/m/i#/outputs/" + "x" * MAX_REF_LENGTH):
        with pytest.raises(RefSyntaxError):
            parse_ref(text)


# -- resolution and the record ---------------------------------------------------------

def test_resolution_record_kept_inputs_and_scrubbing(srv: ServerProcess, home: Path) -> None:
    made = chain(srv, "1")
    assert made["subnet"]["outputs"]["subnet_id"] == "subnet-net-main1/a"
    assert made["app"]["outputs"]["url"] == "https://subnet-net-main1/a.example"
    # The sensitive token went network -> subnet -> app (its length is app's output).
    assert made["app"]["outputs"]["token_length"] == len(f"{SECRET}-main1")
    serial = srv.request("GET", "/network/n1").json["serial"]
    record = finished(srv, made["subnet"]["run_id"])
    assert record["references"] == [
        {"variable": "network_id", "ref": "/network/n1#/outputs/network_id", "serial": serial},
        {"variable": "token", "ref": "/network/n1#/outputs/token", "serial": serial}]
    # The kept inputs keep the reference (a destroy, a retry and a cascade resolve it again).
    kept = json.loads((home / "state" / "_inputs/subnet/local.s1.json").read_text())
    assert kept["network_id"] == ref("/network/n1#/outputs/network_id")
    # The referenced secret is scrubbed as a sensitive variable's value is.
    for run_id in (made["subnet"]["run_id"], made["app"]["run_id"]):
        text = json.dumps(events(srv, run_id)) + json.dumps(finished(srv, run_id))
        assert f"{SECRET}-main1" not in text
    assert f"{SECRET}-main1" not in srv.log_text()
    # An output that tells terraform the token is not sensitive is scrubbed all the same,
    # in the apply's answer and in a GET of the instance (its kept inputs hold the $ref).
    assert made["app"]["outputs"]["token_echo"] != f"{SECRET}-main1"
    shown = srv.request("GET", "/app/a1").json["outputs"]
    assert shown["token_echo"] == made["app"]["outputs"]["token_echo"]
    assert SECRET not in json.dumps(shown)
    # A pointer into a list.
    r = srv.request("PUT", "/subnet/s1b", {"network_id": ref("/network/n1#/outputs/subnets/1/id")})
    assert r.status == 201, r.body
    assert r.json["outputs"]["subnet_id"] == "subnet-sn-main1-b/a"


def test_every_fault_is_a_400_before_any_run(srv: ServerProcess) -> None:
    assert srv.request("PUT", "/network/n2", {"name": "two"}).status == 201
    before = run_count(srv)
    r = srv.request("PUT", "/subnet/s2", {
        "network_id": ref("/network/nope#/outputs/network_id"),  # no such instance
        "zone": ref("/network/n2#/outputs/zz"),                   # no such output
        "plain": ref("/network/n2#/outputs/token"),               # sensitive -> plain
        "token": ref("/network/n2#/outputs/size"),                # a number, not a string
    })
    assert r.status == 400, r.body
    errors = {e["field"]: e["message"] for e in r.json["errors"]}
    assert errors == {
        "network_id": "references network/nope: no such instance (of yours)",
        "zone": "references network/n2: it has no output 'zz'",
        "plain": "references the sensitive output 'token' of network/n2: only a sensitive "
                 "variable may take it",
        "token": "must be a string or null"}
    r = srv.request("PUT", "/subnet/s2", {"network_id": ref("/network/n2#/outputs/subnets/9"),
                                          "zone": ref("/nomodule/n2#/outputs/size"),
                                          "plain": ref("/subnet/s2#/outputs/subnet_id")})
    assert r.status == 400, r.body
    errors = {e["field"]: e["message"] for e in r.json["errors"]}
    assert errors["network_id"] == "references network/n2: output 'subnets' has nothing at '9'"
    assert errors["zone"] == "references nomodule/n2: no such instance (of yours)"
    assert errors["plain"] == "a cycle: subnet/s2 -> subnet/s2"
    assert run_count(srv) == before
    assert srv.request("GET", "/subnet/s2").status == 404


def test_used_by_outdated_and_409(srv: ServerProcess) -> None:
    chain(srv, "3")
    shown = srv.request("GET", "/network/n3").json
    assert shown["used_by"] == [{"module": "subnet", "instance": "s3", "variable": "network_id"},
                                {"module": "subnet", "instance": "s3", "variable": "token"}]
    assert srv.request("GET", "/subnet/s3").json["outdated"] == []
    applied = srv.request("GET", "/network/n3").json["serial"]
    assert srv.request("PUT", "/network/n3", {"name": "moved"}).status == 200
    current = srv.request("GET", "/network/n3").json["serial"]
    outdated = srv.request("GET", "/subnet/s3").json["outdated"]
    assert outdated == [{"variable": v, "ref": f"/network/n3#/outputs/{v}",
                         "applied_serial": applied, "current_serial": current}
                        for v in ("network_id", "token")]
    before = run_count(srv)
    for path in ("/network/n3", "/subnet/s3"):
        r = srv.request("DELETE", path)
        assert r.status == 409, r.body
        assert "used by" in r.json["detail"]
    assert r.json["used_by"] == [{"module": "app", "instance": "a3", "variable": "subnet_id"},
                                 {"module": "app", "instance": "a3", "variable": "token"}]
    assert run_count(srv) == before  # refused before any run
    # Dependents first, then what they used.
    for path in ("/app/a3", "/subnet/s3", "/network/n3"):
        r = srv.request("DELETE", path)
        assert r.status == 200, r.body
    # A dependent that drops its reference frees what it used.
    chain(srv, "4")
    assert srv.request("PUT", "/app/a4", {"subnet_id": "plain"}).status == 200
    assert srv.request("GET", "/subnet/s4").json["used_by"] == []
    assert srv.request("DELETE", "/subnet/s4").status == 200


def test_cascade_in_order_and_its_stop(srv: ServerProcess) -> None:
    made = chain(srv, "5")
    r = srv.request("PUT", "/network/n5?cascade=true", {"name": "next"})
    assert r.status == 200, r.body
    sub_runs = cascaded(srv, r.json["run_id"])
    assert [(c["module"], c["instance"]) for c in sub_runs] == [("subnet", "s5")]
    sub = finished(srv, sub_runs[0]["run_id"])
    assert sub["status"] == "succeeded" and sub["triggered_by"] == r.json["run_id"]
    assert sub["outputs"]["subnet_id"] == "subnet-net-next/a"
    app_runs = cascaded(srv, sub["id"])
    assert [(c["module"], c["instance"]) for c in app_runs] == [("app", "a5")]
    app = finished(srv, app_runs[0]["run_id"])
    assert app["status"] == "succeeded" and app["triggered_by"] == sub["id"]
    assert app["outputs"]["url"] == "https://subnet-net-next/a.example"
    assert {r["serial"] for r in app["references"]} == {
        srv.request("GET", "/subnet/s5").json["serial"]}
    assert srv.request("GET", "/app/a5").json["outdated"] == []
    # Nothing changed for the dependents: no cascade.
    same = srv.request("PUT", "/network/n5?cascade=true", {"name": "next"})
    assert cascaded(srv, same.json["run_id"]) == []
    # subnet refuses a "bad" network id: the cascade stops there, and says so.
    app_runs_before = len(srv.request("GET", "/app/a5/runs").json["runs"])
    bad = srv.request("PUT", "/network/n5?cascade=true", {"name": "bad"})
    assert bad.status == 200, bad.body
    (failing,) = cascaded(srv, bad.json["run_id"])
    failed = finished(srv, failing["run_id"])
    assert failed["status"] == "failed"
    assert failed["warnings"] == ["the cascade stopped here: its dependents app/a5 were not "
                                  "applied"]
    stopped = [e for e in events(srv, failed["id"]) if e["type"] == "cascade_stopped"]
    assert stopped and stopped[0]["dependents"] == ["app/a5"]
    assert len(srv.request("GET", "/app/a5/runs").json["runs"]) == app_runs_before
    assert made["app"]["run_id"]


def test_a_queued_apply_is_resolved_at_the_dependents_start(srv: ServerProcess) -> None:
    asynch = {"Prefer": "respond-async"}
    first = srv.request("PUT", "/network/q1", {"name": "first"}, headers=asynch)
    second = srv.request("PUT", "/network/q1", {"name": "second"}, headers=asynch)
    assert first.status == 202 and second.status == 202, (first.body, second.body)
    # The network may not exist yet: its create is queued, so the reference is taken.
    dep = srv.request("PUT", "/subnet/q1", {"network_id": ref("/network/q1#/outputs/network_id")},
                      headers=asynch)
    assert dep.status == 202, dep.body
    record = finished(srv, dep.json["id"])
    assert record["status"] == "succeeded", record
    assert record["outputs"]["subnet_id"] == "subnet-net-second/a"
    assert record["references"][0]["serial"] == srv.request("GET", "/network/q1").json["serial"]
    assert finished(srv, second.json["id"])["status"] == "succeeded"


def test_chains_cycles_and_the_depth_bound(srv: ServerProcess) -> None:
    assert srv.request("PUT", "/link/l0", {}).status == 201
    for i in range(1, 9):  # l8 is 8 references from l0: the longest chain taken
        r = srv.request("PUT", f"/link/l{i}", {"up": ref(f"/link/l{i - 1}#/outputs/id")})
        assert r.status == 201, r.body
    r = srv.request("PUT", "/link/l9", {"up": ref("/link/l8#/outputs/id")})
    assert r.status == 400, r.body
    assert r.json["errors"][0]["field"] == "up"
    assert r.json["errors"][0]["message"].startswith(
        "a chain of references longer than 8: link/l9 -> link/l8 -> link/l7")
    r = srv.request("PUT", "/link/l0", {"up": ref("/link/l2#/outputs/id")})
    assert r.status == 400, r.body
    assert r.json["errors"] == [{"field": "up",
                                 "message": "a cycle: link/l0 -> link/l2 -> link/l1 -> link/l0"}]


def test_hostile_references(srv: ServerProcess) -> None:
    assert srv.request("PUT", "/network/h1", {}).status == 201
    before = run_count(srv)
    for text in ("/network/../network/h1#/outputs/network_id",
                 "/network/h1/..#/outputs/network_id", "/network%2Fh1#/outputs/network_id",
                 "/network/h1%2F#/outputs/network_id", "/runs/x#/outputs/network_id",
                 "/docs", "/docs#/outputs/x", "/openapi.json#/outputs/x",
                 "/network/h1#/outputs/" + "a/" * 5000, "/network/h1#/outputs/" + "x" * 100000,
                 "/network/h1#/outputs/network_id/" + "9" * 900, "", "#",
                 "/network/h1#/outputs/token/0"):
        r = srv.request("PUT", "/subnet/hx", {"network_id": ref(text)})
        assert r.status == 400, (text[:80], r.body)
        assert [e["field"] for e in r.json["errors"]] == ["network_id"], r.body
        assert len(r.body) < 2000  # a huge pointer is not echoed
    for value in ({"$ref": 7}, {"$ref": None}, {"$ref": ["/network/h1#/outputs/x"]}):
        r = srv.request("PUT", "/subnet/hx", {"network_id": value})
        assert r.status == 400, r.body
    # Not a reference (a second key): an object, which a string variable refuses.
    r = srv.request("PUT", "/subnet/hx", {"network_id": {"$ref": "/network/h1#/outputs/x",
                                                         "also": 1}})
    assert r.status == 400 and r.json["errors"][0]["message"] == "must be a string or null"
    # A reference in a variable the module does not have, or in a reserved one.
    r = srv.request("PUT", "/subnet/hx", {"network_id": "n", "nope": ref("/network/h1#/x")})
    assert r.status == 400 and r.json["errors"] == [{"field": "nope",
                                                     "message": "unknown variable"}]
    assert run_count(srv) == before


def test_a_thousand_dependents_stay_fast(srv: ServerProcess, home: Path) -> None:
    assert srv.request("PUT", "/network/big", {}).status == 201
    state = home / "state"
    users = state / "_refs/used-by/network/local.big"
    users.mkdir(parents=True)
    inputs = state / "_inputs/app"
    inputs.mkdir(parents=True, exist_ok=True)
    for i in range(1000):
        (users / f"app.d{i:04d}.subnet_id.network_id").touch()
        (inputs / f"local.d{i:04d}.json").write_text(json.dumps(
            {"subnet_id": ref("/network/big#/outputs/network_id")}))
    started = time.monotonic()
    shown = srv.request("GET", "/network/big")
    assert time.monotonic() - started < 2.0
    assert len(shown.json["used_by"]) == 1000
    started = time.monotonic()
    module = srv.request("GET", "/network")
    assert time.monotonic() - started < 2.0
    assert "app" in module.json["outputs"]["network_id"]["referenced_by"]
    started = time.monotonic()
    r = srv.request("DELETE", "/network/big")
    assert time.monotonic() - started < 2.0
    assert r.status == 409 and len(r.json["used_by"]) == 20 and "and more" in r.json["detail"]
    # Entries the kept inputs do not back are dropped (the index repaired) at a DELETE.
    for i in range(1000):
        (inputs / f"local.d{i:04d}.json").unlink()
    r = srv.request("DELETE", "/network/big")
    assert r.status == 200, r.body
    assert list(users.iterdir()) == []


# -- the index: survives restarts, repaired from the kept inputs ------------------------

def test_index_rebuilt_from_kept_inputs(tmp: Path, terraform_bin: str) -> None:
    server = start_server(tmp, modules_dir=REFS)
    try:
        chain(server, "r")
    finally:
        server.stop()
    shutil.rmtree(tmp / "state" / "_refs")
    server = start_server(tmp, modules_dir=REFS)
    try:
        shown = server.request("GET", "/network/nr").json
        assert {u["instance"] for u in shown["used_by"]} == {"sr"}
        assert server.request("DELETE", "/network/nr").status == 409
        assert server.request("DELETE", "/subnet/sr").status == 409
    finally:
        server.stop()


# -- tenants ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer("key-refs")


@pytest.fixture(scope="module")
def auth_srv(tmp_path_factory: pytest.TempPathFactory, signer: Signer, terraform_bin: str
             ) -> Iterator[ServerProcess]:
    jwks = Jwks()
    jwks.publish(signer)
    server = start_server(tmp_path_factory.mktemp("refs-auth"), modules_dir=REFS, env={
        "COGNITO_ISSUER": Signer.ISSUER, "JWK_URL": jwks.url,
        "TFSERVER_CLIENT_IDS": "client-a,client-b,client-admin"})
    yield server
    server.stop()
    jwks.close()


WRITE = "tfserver/network.write tfserver/subnet.write tfserver/app.write"


def test_another_tenants_instance_reads_as_a_missing_one(auth_srv: ServerProcess,
                                                         signer: Signer) -> None:
    a = bearer(signer.token("client-a", WRITE))
    b = bearer(signer.token("client-b", WRITE))
    narrow = bearer(signer.token("client-b", "tfserver/subnet.write"))
    admin = bearer(signer.token("client-admin", "tfserver/admin"))
    assert auth_srv.request("PUT", "/network/shared", {}, headers=a).status == 201
    answers = []
    for headers, text in ((b, "/network/shared#/outputs/network_id"),
                          (b, "/network/absent#/outputs/network_id"),
                          (narrow, "/network/shared#/outputs/network_id")):
        before = run_count(auth_srv, headers=headers)
        r = auth_srv.request("PUT", "/subnet/mine", {"network_id": ref(text)}, headers=headers)
        assert r.status == 400, r.body
        assert run_count(auth_srv, headers=headers) == before
        answers.append(dict(r.json))
    assert answers[0] == {**answers[1], "errors": [
        {"field": "network_id",
         "message": "references network/shared: no such instance (of yours)"}]}
    assert answers[2] == answers[0]
    # client-a's own reference works; then neither client-a nor an admin may delete it.
    r = auth_srv.request("PUT", "/subnet/mine", {"network_id": ref(
        "/network/shared#/outputs/network_id")}, headers=a)
    assert r.status == 201, r.body
    listed = auth_srv.request("GET", "/network", headers=admin).json["instances"]
    tenant = next(i["tenant"] for i in listed if i["instance"] == "shared")
    assert auth_srv.request("DELETE", "/network/shared", headers=a).status == 409
    for query in ("", "&orphan=true"):
        r = auth_srv.request("DELETE", f"/network/shared?tenant={tenant}{query}", headers=admin)
        assert r.status == 409, r.body
        assert r.json["used_by"] == [{"module": "subnet", "instance": "mine",
                                      "variable": "network_id"}]
    # An admin orphans the dependent: its reference leaves the index.
    r = auth_srv.request("DELETE", f"/subnet/mine?tenant={tenant}&orphan=true", headers=admin)
    assert r.status == 200, r.body
    assert auth_srv.request("GET", "/network/shared", headers=a).json["used_by"] == []


# -- S3, two replicas ------------------------------------------------------------------

def test_references_on_s3_from_two_replicas(tmp: Path, moto: Moto) -> None:
    bucket = f"refs-{uuid.uuid4().hex[:12]}"
    moto.client("s3").create_bucket(Bucket=bucket)
    env = {"TFSERVER_BACKEND": "s3", "TF_STATE_BUCKET": bucket, "TF_STATE_REGION": "us-east-1",
           "TF_STATE_ENDPOINT": moto.url, "TF_STATE_KEY_PREFIX": "tfs", **moto.aws_env()}
    one = start_server(tmp / "one", modules_dir=REFS, env=env)
    two = start_server(tmp / "two", modules_dir=REFS, env=env)
    try:
        assert one.request("PUT", "/network/s3n", {"name": "s3"}).status == 201
        r = two.request("PUT", "/subnet/s3s", {
            "network_id": ref("/network/s3n#/outputs/network_id"),
            "token": ref("/network/s3n#/outputs/token")})
        assert r.status == 201, r.body
        assert r.json["outputs"]["subnet_id"] == "subnet-net-s3/a"
        assert one.request("GET", "/network/s3n").json["used_by"][0]["instance"] == "s3s"
        assert one.request("DELETE", "/network/s3n").status == 409
        r = one.request("PUT", "/network/s3n?cascade=true", {"name": "s3b"})
        (dep,) = cascaded(one, r.json["run_id"])
        record = finished(two, dep["run_id"])
        assert record["status"] == "succeeded"
        assert record["outputs"]["subnet_id"] == "subnet-net-s3b/a"
        assert two.request("DELETE", "/subnet/s3s").status == 200
        assert one.request("GET", "/network/s3n").json["used_by"] == []
        assert two.request("DELETE", "/network/s3n").status == 200
    finally:
        one.stop()
        two.stop()


def test_a_drift_check_of_a_dependent_resolves_its_references(srv: ServerProcess) -> None:
    chain(srv, "d")
    r = srv.request("POST", "/subnet/sd/drift")
    assert r.status == 200, r.body
    assert r.json["drift"]["status"] == "in_sync"
    record = srv.request("GET", f"/runs/{r.json['run_id']}").json
    assert record["references"][0]["ref"] == "/network/nd#/outputs/network_id"


def test_cascade_from_the_policy(tmp: Path, terraform_bin: str) -> None:
    from tfserver.errors import ConfigError
    from tfserver.module.discover import discover
    from tfserver.module.policyfile import load_policy

    policy = tmp / "policy.toml"
    policy.write_text('[modules.network]\ncascade = "yes"\n')
    with pytest.raises(ConfigError, match=r"modules\.network\.cascade: must be true or false"):
        load_policy(policy, discover(REFS))
    policy.write_text("[modules.network]\ncascade = true\n")
    assert load_policy(policy, discover(REFS)).limits("network", None).cascade
    server = start_server(tmp, modules_dir=REFS, env={"TFSERVER_POLICY": str(policy)})
    try:
        assert server.request("PUT", "/network/p1", {"name": "one"}).status == 201
        assert server.request("PUT", "/subnet/p1", {
            "network_id": ref("/network/p1#/outputs/network_id")}).status == 201
        r = server.request("PUT", "/network/p1", {"name": "two"})  # no ?cascade: the policy
        (dep,) = cascaded(server, r.json["run_id"])
        record = finished(server, dep["run_id"])
        assert record["status"] == "succeeded" and record["triggered_by"] == r.json["run_id"]
        # A dry run never cascades.
        plan = server.request("PUT", "/network/p1?dry_run=true&cascade=true", {"name": "three"})
        assert plan.status == 200 and cascaded(server, plan.json["run_id"]) == []
    finally:
        server.stop()


def test_openapi_lets_every_variable_be_a_reference(srv: ServerProcess) -> None:
    import jsonschema
    from openapi_spec_validator import validate

    doc = srv.request("GET", "/openapi.json").json
    validate(doc)
    root = {"components": doc["components"]}

    def valid(schema: str, body: Any) -> bool:
        return jsonschema.Draft202012Validator(
            {**root, "$ref": f"#/components/schemas/{schema}"}).is_valid(body)

    reference = ref("/network/n1#/outputs/subnets/0/id")
    app = doc["components"]["schemas"]["app_variables"]["properties"]
    assert app["subnet_id"]["oneOf"][1] == {"$ref": "#/components/schemas/Reference"}
    assert app["token"]["writeOnly"] is True
    # Each variable takes exactly one of its type and a reference (a map too).
    assert valid("app_variables", {"subnet_id": reference, "labels": reference,
                                   "replicas": reference, "token": reference})
    assert valid("app_variables", {"subnet_id": "x", "labels": {"a": "b"}})
    assert not valid("app_variables", {"subnet_id": ref("network/n1")})
    assert not valid("app_variables", {"subnet_id": {"$ref": "/network/n1#/outputs/x",
                                                     "b": 1}})
    assert not valid("app_variables", {"subnet_id": 1})
    for path, method in (("/app", "post"), ("/app/{instance}", "put")):
        names = [p.get("name") for p in doc["paths"][path][method]["parameters"]]
        assert "cascade" in names, (path, names)


def test_get_of_a_module_says_which_outputs_are_referenced(srv: ServerProcess) -> None:
    chain(srv, "o")
    outputs = srv.request("GET", "/network").json["outputs"]
    assert outputs["network_id"]["referenced_by"] == ["subnet"]
    assert outputs["token"]["referenced_by"] == ["subnet"]
    assert "referenced_by" not in outputs["size"]
    assert srv.request("GET", "/subnet").json["outputs"]["subnet_id"]["referenced_by"] == ["app"]


def test_a_saved_plan_with_references_is_applied_and_indexed(srv: ServerProcess) -> None:
    assert srv.request("PUT", "/network/sp", {"name": "plan"}).status == 201
    plan = srv.request("PUT", "/subnet/sp?dry_run=true", {
        "network_id": ref("/network/sp#/outputs/network_id")})
    assert plan.status == 200, plan.body
    applied = srv.request("POST", f"/runs/{plan.json['run_id']}/apply")
    assert applied.status == 201, applied.body
    assert applied.json["outputs"]["subnet_id"] == "subnet-net-plan/a"
    assert srv.request("GET", "/network/sp").json["used_by"] == [
        {"module": "subnet", "instance": "sp", "variable": "network_id"}]
    assert srv.request("DELETE", "/network/sp").status == 409
    # A destroy of the dependent resolves its kept reference again.
    assert srv.request("DELETE", "/subnet/sp").status == 200
    assert srv.request("DELETE", "/network/sp").status == 200


def test_references_and_a_cascade_on_the_sqs_engine(tmp: Path, moto: Moto) -> None:
    bucket = f"refs-{uuid.uuid4().hex[:12]}"
    moto.client("s3").create_bucket(Bucket=bucket)
    url = moto.client("sqs").create_queue(QueueName=f"refs-{uuid.uuid4().hex[:8]}.fifo",
                                          Attributes={"FifoQueue": "true"})["QueueUrl"]
    env = {"TFSERVER_BACKEND": "s3", "TF_STATE_BUCKET": bucket, "TF_STATE_REGION": "us-east-1",
           "TF_STATE_ENDPOINT": moto.url, "TF_STATE_KEY_PREFIX": "tfs", **moto.aws_env(),
           "TFSERVER_QUEUE": "sqs", "TFSERVER_QUEUE_URL": url,
           "TFSERVER_SQS_ENDPOINT": moto.url, "TFSERVER_SQS_VISIBILITY": "6"}
    api = start_server(tmp / "api", modules_dir=REFS,
                       env={**env, "TFSERVER_ROLE": "api", "TFSERVER_REPLICA_ID": "api"})
    worker = start_server(tmp / "worker", modules_dir=REFS,
                          env={**env, "TFSERVER_ROLE": "worker", "TFSERVER_REPLICA_ID": "w"})
    try:
        assert api.request("PUT", "/network/qn", {"name": "q"}).status == 201
        r = api.request("PUT", "/subnet/qs", {"network_id": ref("/network/qn#/outputs/network_id"),
                                              "token": ref("/network/qn#/outputs/token")})
        assert r.status == 201, r.body
        assert r.json["outputs"]["subnet_id"] == "subnet-net-q/a"
        assert api.request("DELETE", "/network/qn").status == 409
        r = api.request("PUT", "/network/qn?cascade=true", {"name": "q2"})
        assert r.status == 200, r.body
        (dep,) = cascaded(api, r.json["run_id"])
        record = finished(api, dep["run_id"])
        assert record["status"] == "succeeded" and record["triggered_by"] == r.json["run_id"]
        assert record["outputs"]["subnet_id"] == "subnet-net-q2/a"
        assert "network-token-0001-q2" not in json.dumps(events(api, dep["run_id"]))
    finally:
        api.stop(timeout=90)
        worker.stop(timeout=90)


def test_an_apply_that_fails_part_way_keeps_the_index_with_its_kept_inputs(
        srv: ServerProcess) -> None:
    chain(srv, "f")
    assert srv.request("PUT", "/subnet/sf2", {
        "network_id": ref("/network/nf#/outputs/network_id")}).status == 201
    r = srv.request("PUT", "/app/af", {"subnet_id": ref("/subnet/sf2#/outputs/subnet_id"),
                                       "fail": True})
    assert r.status == 502, r.body  # terraform started, then failed
    # The kept inputs are the failed apply's (terraform changed things): so is the index.
    assert srv.request("GET", "/subnet/sf2").json["used_by"] == [
        {"module": "app", "instance": "af", "variable": "subnet_id"}]
    assert srv.request("DELETE", "/subnet/sf2").status == 409
    assert srv.request("GET", "/subnet/sf").json["used_by"] == []


def test_a_cascade_never_applies_a_cycle_that_two_racing_applies_made(
        srv: ServerProcess, home: Path) -> None:
    """Two applies that reference each other's instance, submitted at once, each pass
    the other's check; a cascade then finds the cycle and leaves it alone."""
    for name, body in (("k2", {}), ("k0", {}), ("k1", {"up": ref("/link/k0#/outputs/id")})):
        assert srv.request("PUT", f"/link/{name}", body).status == 201
    state = home / "state"
    # What the racing apply of k0 left: its kept inputs reference k1 (a cycle) and k2.
    (state / "_inputs/link/local.k0.json").write_text(json.dumps(
        {"up": ref("/link/k1#/outputs/id"), "side": ref("/link/k2#/outputs/id")}))
    (state / "_refs/used-by/link/local.k2").mkdir(parents=True, exist_ok=True)
    (state / "_refs/used-by/link/local.k2/link.k0.side.id").touch()
    (state / "_refs/uses/link/local.k0.json").write_text(json.dumps({"references": [
        {"variable": "side", "ref": "/link/k2#/outputs/id", "serial": 1, "digest": "x"}]}))
    r = srv.request("PUT", "/link/k2?cascade=true", {"up": "changed"})
    assert r.status == 200, r.body
    assert cascaded(srv, r.json["run_id"]) == []
    deadline = time.monotonic() + 10  # the log is read from the server's pipe meanwhile
    while "a cycle: link/k0 -> link/k1 -> link/k0" not in srv.log_text():
        assert time.monotonic() < deadline, srv.log_text()[-2000:]
        time.sleep(0.02)
