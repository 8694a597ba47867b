"""A hostile pass over references between instances (issue 22) and drift schedules
(issue 23), against real servers: each test here is a defect found and fixed (the passes
that found nothing need no test). Modules: tests/modules_refs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support import Jwks, ServerProcess, Signer, bearer, start_server
from tfserver.app.driftclaims import DriftClaims
from tfserver.app.driftschedule import DriftSchedule, Instances, Schedule
from tfserver.metrics import Metrics
from tfserver.module.refs import RefSyntaxError, parse_ref
from tfserver.storage.local import LocalObjects

REFS = Path(__file__).parent / "modules_refs"


def ref(text: str) -> dict[str, str]:
    return {"$ref": text}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of the module's server (its state folder is `state/` in it)."""
    return tmp_path_factory.mktemp("hostile-refs")


@pytest.fixture(scope="module")
def srv(home: Path, terraform_bin: str) -> Iterator[ServerProcess]:
    server = start_server(home, modules_dir=REFS)
    yield server
    server.stop()


def test_a_name_with_a_trailing_newline_is_no_name() -> None:
    # `$` matches before a final newline: `/network/n1\n` named an instance "n1\n".
    for text in ("/network/n1\n#/outputs/network_id", "/network\n/n1#/outputs/network_id"):
        with pytest.raises(RefSyntaxError):
            parse_ref(text)


def test_a_damaged_uses_entry_is_no_500(srv: ServerProcess, home: Path) -> None:
    """Entries of `_refs/uses/` with the wrong types (a damaged object): a GET, an
    apply of the dependent and a cascade to it work on, and the entry is written anew."""
    assert srv.request("PUT", "/network/d1", {}).status == 201
    body = {"network_id": ref("/network/d1#/outputs/network_id")}
    assert srv.request("PUT", "/subnet/d1", body).status == 201
    uses = home / "state/_refs/uses/subnet/local.d1.json"
    damaged: list[Any] = [
        {"variable": ["network_id"], "ref": {"a": 1}, "serial": {}, "digest": 5},
        {"variable": {"a": 1}, "ref": "/network/d1#/outputs/network_id"},
        {"variable": "network_id", "ref": "/network/d1#/outputs/network_id",
         "serial": [1], "digest": ["x"]}]
    uses.write_text(json.dumps({"references": damaged}))
    shown = srv.request("GET", "/subnet/d1")
    assert shown.status == 200, shown.body
    assert shown.json["outdated"] == [{"variable": "network_id",
                                       "ref": "/network/d1#/outputs/network_id",
                                       "applied_serial": None, "current_serial": 2}]
    r = srv.request("PUT", "/subnet/d1", body)
    assert r.status == 200, r.body
    assert json.loads(uses.read_text())["references"] == [{
        "variable": "network_id", "ref": "/network/d1#/outputs/network_id", "serial": 2,
        "digest": json.loads(uses.read_text())["references"][0]["digest"]}]
    assert srv.request("GET", "/subnet/d1").json["outdated"] == []


def events(srv: ServerProcess, run_id: str) -> list[dict[str, Any]]:
    """A run's whole event log (the stream ends with the run)."""
    r = srv.request("GET", f"/runs/{run_id}/events", timeout=120)
    assert r.status == 200, r.body
    return [json.loads(line) for line in r.body.decode().splitlines() if line.strip()]


def wait_for(check: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_delete_racing_a_dependents_apply_is_refused(srv: ServerProcess, home: Path
                                                       ) -> None:
    """The index listed a dependent only once its apply ended: a DELETE while the
    dependent's terraform ran destroyed what it references."""
    assert srv.request("PUT", "/network/r1", {}).status == 201
    r = srv.request("PUT", "/subnet/r1", {"network_id": ref("/network/r1#/outputs/network_id")},
                    headers={"Prefer": "respond-async"})
    assert r.status == 202, r.body
    run_id = r.json["id"]
    kept = home / "state/_inputs/subnet/local.r1.json"
    wait_for(kept.exists)  # terraform runs
    d = srv.request("DELETE", "/network/r1")
    assert d.status == 409, d.body
    assert d.json["used_by"] == [{"module": "subnet", "instance": "r1",
                                  "variable": "network_id"}]
    srv.request("GET", f"/runs/{run_id}/events", timeout=120)
    assert srv.request("GET", f"/runs/{run_id}").json["status"] == "succeeded"
    assert srv.request("GET", "/network/r1").status == 200
    # An apply that fails before changing anything leaves no entry behind.
    assert srv.request("PUT", "/network/bad", {"name": "bad"}).status == 201
    r = srv.request("PUT", "/subnet/r2", {"network_id": ref("/network/bad#/outputs/network_id")})
    assert r.status >= 400, r.body
    assert srv.request("GET", "/network/bad").json["used_by"] == []
    assert srv.request("DELETE", "/network/bad").status == 200
    # Each destroy marked itself while it ran, and its mark went as it ended (refused
    # with 409, or done).
    marks = home / "state" / "_refs" / "destroying"
    assert not [p for p in marks.rglob("*") if p.is_file()], list(marks.rglob("*"))
    # A saved destroy plan of an instance used since the plan: 409 as it is applied, and
    # the plan is not used up (it was, refused only as it started).
    assert srv.request("PUT", "/network/sp", {}).status == 201
    plan = srv.request("DELETE", "/network/sp?dry_run=true").json
    assert srv.request("PUT", "/subnet/sp", {
        "network_id": ref("/network/sp#/outputs/network_id")}).status == 201
    r = srv.request("POST", f"/runs/{plan['run_id']}/apply")
    assert r.status == 409 and "is used by subnet/sp" in r.json["detail"], r.body
    assert srv.request("GET", "/network/sp").status == 200
    assert srv.request("DELETE", "/subnet/sp").status == 200
    r = srv.request("POST", f"/runs/{plan['run_id']}/apply")  # unused: it applies now
    assert r.status == 200, r.body
    assert srv.request("GET", "/network/sp").status == 404


def test_an_index_that_cannot_be_written_fails_no_apply(srv: ServerProcess, home: Path
                                                        ) -> None:
    """The entries an apply writes as it starts (see the test above) are as the rest of
    the index: repaired from the kept inputs, never a reason to fail the apply."""
    assert srv.request("PUT", "/network/w1", {}).status == 201
    folder = home / "state/_refs/used-by/network/local.w1"
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.write_text("not a folder")
    r = srv.request("PUT", "/subnet/w1", {"network_id": ref("/network/w1#/outputs/network_id")})
    assert r.status == 201, r.body


def test_a_failed_apply_that_moved_a_pointer_keeps_the_entry(srv: ServerProcess) -> None:
    """An entry names the output, not the path into it: a failed apply whose reference
    went elsewhere in the same output dropped the entry its kept inputs still need."""
    assert srv.request("PUT", "/network/badp", {"name": "bad"}).status == 201
    assert srv.request("PUT", "/subnet/p1", {"network_id": ref(
        "/network/badp#/outputs/subnets/0/zone")}).status == 201
    r = srv.request("PUT", "/subnet/p1", {"network_id": ref(
        "/network/badp#/outputs/subnets/0/id")})  # "sn-bad-a": the module refuses it
    assert r.status >= 400, r.body
    used = [{"module": "subnet", "instance": "p1", "variable": "network_id"}]
    assert srv.request("GET", "/network/badp").json["used_by"] == used
    assert srv.request("DELETE", "/network/badp").status == 409


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer("key-hostile-refs")


@pytest.fixture(scope="module")
def auth_srv(tmp_path_factory: pytest.TempPathFactory, signer: Signer, terraform_bin: str
             ) -> Iterator[ServerProcess]:
    jwks = Jwks()
    jwks.publish(signer)
    server = start_server(tmp_path_factory.mktemp("hostile-refs-auth"), modules_dir=REFS,
                          env={"COGNITO_ISSUER": Signer.ISSUER, "JWK_URL": jwks.url,
                               "TFSERVER_CLIENT_IDS": "client-a"})
    yield server
    server.stop()
    jwks.close()


def test_an_unreadable_instance_tells_nothing_of_its_references(
        auth_srv: ServerProcess, signer: Signer) -> None:
    """The chain was followed before the caller's right to read the instance was
    checked: a cycle through an instance of a module the caller may not read named it
    (and what it references) where a missing one says "no such instance"."""
    full = bearer(signer.token("client-a", "tfserver/network.write tfserver/subnet.write"))
    narrow = bearer(signer.token("client-a", "tfserver/subnet.write"))
    assert auth_srv.request("PUT", "/subnet/s0", {"network_id": "literal"},
                            headers=full).status == 201
    assert auth_srv.request("PUT", "/network/x", {"name": ref("/subnet/s0#/outputs/subnet_id")},
                            headers=full).status == 201
    answers = []
    for text in ("/network/x#/outputs/network_id", "/network/absent#/outputs/network_id"):
        r = auth_srv.request("PUT", "/subnet/s0", {"network_id": ref(text)}, headers=narrow)
        assert r.status == 400, r.body
        answers.append(r.json["errors"])
    assert answers[0] == [{"field": "network_id",
                           "message": "references network/x: no such instance (of yours)"}]
    # The caller who may read it is told of the cycle.
    r = auth_srv.request("PUT", "/subnet/s0", {"network_id": ref(
        "/network/x#/outputs/network_id")}, headers=full)
    assert r.status == 400 and "a cycle: subnet/s0 -> network/x -> subnet/s0" in r.body.decode()


# -- drift schedules -------------------------------------------------------------------


def test_checks_that_cannot_keep_up_still_reach_every_module(tmp: Path) -> None:
    """A tick started from the top of the list each time: with more checks due than
    slots, the first module's instances took every slot and another module's were
    never checked."""
    listed = {"a": [f"t.a{n}" for n in range(5)], "b": ["t.b0"]}
    checked: dict[tuple[str, str], float] = {}
    status: dict[str, str] = {}
    started: list[tuple[str, str]] = []
    clock = [1_000_000.0]

    def start(module: str, workspace: str, reconcile: bool) -> str:
        run_id = f"r{len(started)}"
        started.append((module, workspace))
        status[run_id] = "running"
        return run_id

    claims = DriftClaims(LocalObjects(tmp / "o"), lambda r: status.get(r, "lost"), slots=1,
                         max_age=3600)
    instances = Instances(lambda m: listed[m], lambda m, ws: checked.get((m, ws)),
                          lambda m, ws: False)
    schedule = DriftSchedule({"a": Schedule(600, False), "b": Schedule(600, False)},
                             instances, claims, start, replica="r", metrics=Metrics(),
                             clock=lambda: clock[0])
    for _ in range(30):  # one check a tick, a tick every 200 s: 3 a period for 6 due
        schedule.tick_once()
        for n, key in enumerate(started):
            if status[f"r{n}"] == "running":
                status[f"r{n}"] = "succeeded"
                checked[key] = clock[0]
        clock[0] += 200
    assert ("b", "t.b0") in started
    counts = {key: started.count(key) for key in set(started)}
    assert len(counts) == 6 and max(counts.values()) - min(counts.values()) <= 2, counts


def test_a_cascade_the_queue_cannot_take_says_so(tmp: Path, terraform_bin: str) -> None:
    """A dependent whose cascaded apply the lanes refused (every slot busy, the queue
    full) was left out without a word but a log line: the cascade's record now says so."""
    server = start_server(tmp, modules_dir=REFS, env={"TFSERVER_MAX_RUNS": "2",
                                                      "TFSERVER_QUEUE_DEPTH": "0"})
    try:
        assert server.request("PUT", "/network/q", {}).status == 201
        for n in range(3):
            assert server.request("PUT", f"/subnet/q{n}", {"network_id": ref(
                "/network/q#/outputs/network_id")}).status == 201
        r = server.request("PUT", "/network/q?cascade=true", {"name": "moved"})
        assert r.status == 200, r.body
        record = server.request("GET", f"/runs/{r.json['run_id']}").json
        started = [e for e in events(server, r.json["run_id"]) if e["type"] == "cascade"]
        named = {x["instance"] for e in started for x in e["runs"]}
        stopped = [e for e in events(server, r.json["run_id"])
                   if e["type"] == "cascade_stopped"]
        left = {d for e in stopped for d in e["dependents"]}
        assert len(named) + len(left) == 3 and left, (named, left)
        assert {f"subnet/{n}" for n in named}.isdisjoint(left)
        assert any(w.startswith("the cascade did not start the apply of subnet/q")
                   and "full" in w for w in record["warnings"]), record
    finally:
        server.stop()


@pytest.mark.parametrize("at", ["1e300", "Infinity"])
def test_a_lease_written_far_ahead_holds_no_slot_forever(tmp: Path, at: str) -> None:
    """A lease whose time is far in the future (a damaged object, a replica's clock
    gone wrong) was held until then: every scheduled check of every replica stopped."""
    objects = LocalObjects(tmp / "o")
    objects.put("_driftslots/0000.000000000000", f'{{"replica": "x", "at": {at}}}'.encode())
    claims = DriftClaims(objects, lambda run_id: "lost", slots=1, max_age=3600)
    assert claims.take("r", 1_000_000.0) is not None


def test_a_check_dated_in_the_future_does_not_stop_the_schedule(tmp: Path) -> None:
    """The last check's time, read from the instance's drift report, was trusted when
    ahead of the clock: a report dated far ahead (damaged) was never due again."""
    started: list[str] = []

    def start(module: str, workspace: str, reconcile: bool) -> str:
        started.append(workspace)
        return f"r{len(started)}"

    claims = DriftClaims(LocalObjects(tmp / "o"), lambda r: "succeeded", slots=1,
                         max_age=3600)
    instances = Instances(lambda m: ["t.i0"], lambda m, ws: 1e300, lambda m, ws: False)
    schedule = DriftSchedule({"m": Schedule(600, False)}, instances, claims, start,
                             replica="r", metrics=Metrics(), clock=lambda: 1_000_000.0)
    assert schedule.tick_once() == 1 and started == ["t.i0"]
    assert schedule.tick_once() == 0  # and once a period only


def test_an_entry_of_long_names_is_kept_under_a_digest(tmp: Path) -> None:
    """A variable and an output whose names together pass a file name's 255 bytes: the
    entry is named by a digest and holds the names (it failed to be written, and the
    referenced instance could be destroyed under its user)."""
    from tfserver.app.refindex import RefIndex, User, used_by_folder
    from tfserver.storage.local import LocalObjects

    objects = LocalObjects(tmp / "o")
    index = RefIndex(objects)
    variable, output = "v" * 150, "o" * 150
    ref = {"variable": variable, "ref": f"/network/main#/outputs/{output}",
           "serial": 1, "digest": None}
    index.record("app", "local.web", [ref, {**ref, "variable": "short",
                                             "ref": "/network/main#/outputs/id"}])
    names = objects.keys(used_by_folder("network", "local.main"))
    assert all(len(n.encode()) <= 255 for n in names) and len(names) == 2, names
    assert sorted(index.users("network", "local.main"), key=lambda u: u.variable) == [
        User("app", "web", "short", "id"), User("app", "web", variable, output)]
    # A damaged long entry is no user (and no 500); dropping the reference drops it.
    long_name = next(n for n in names if "~" in n)
    objects.put(used_by_folder("network", "local.main") + long_name, b"{not json")
    assert [u.variable for u in index.users("network", "local.main")] == ["short"]
    index.record("app", "local.web", [ref])
    index.record("app", "local.web", [])
    assert objects.keys(used_by_folder("network", "local.main")) == []


def test_a_destroy_and_a_dependents_first_apply_never_both_go_on(tmp: Path) -> None:
    """A DELETE racing a dependent's first apply stranded the dependent: the destroy
    took the apply's claimed entry for a leftover (no kept inputs, no stored record: a
    synchronous run on another replica, or this one's before its first heartbeat), and
    the apply never looked for the destroy. Each now writes before it reads: a fresh
    claim refuses the destroy (409), and a destroy under way holds the apply back."""
    import threading

    from support import ROOT
    from tfserver.app.dependents import Dependents, destroy_ends, destroy_starts
    from tfserver.app.execute import RunSpec
    from tfserver.app.references import References
    from tfserver.app.refindex import CLAIM_GRACE
    from tfserver.auth import Principal
    from tfserver.errors import Conflict
    from tfserver.module.discover import discover
    from tfserver.runs.lanes import Scheduler
    from tfserver.runs.registry import Runs
    from tfserver.runs.store import RunRecord, RunStore, new_run_id
    from tfserver.scrub import Scrubber
    from tfserver.storage.local import LocalBackend

    modules = discover(ROOT / "tests" / "modules_refs")
    backend = LocalBackend(tmp / "state")
    runs = Runs(RunStore(backend.objects), Scheduler(1, 4), replica="r", kill_grace=1)
    references = References(modules, backend, runs, wait=60)
    dependents = Dependents(modules, backend, references)
    index, who = references.index, Principal(subject="someone", tenant="local")
    ref = "/network/n1#/outputs/network_id"

    def destroy() -> RunSpec:
        return RunSpec(modules["network"], "n1", "local.n1", "destroy", {}, who, Scrubber([]))

    index.claim("subnet", "local.s1", [("network_id", ref)], run_id=new_run_id(),
                at=time.time())
    with pytest.raises(Conflict):
        destroy_starts(dependents, destroy())
    assert index.destroys_of("network", "local.n1") == []  # refused: its mark went
    # A claim past CLAIM_GRACE with nothing behind it (its server died) holds nothing.
    index.claim("subnet", "local.s1", [("network_id", ref)], run_id=new_run_id(),
                at=time.time() - CLAIM_GRACE - 1)
    spec = destroy()
    destroy_starts(dependents, spec)
    assert index.users("network", "local.n1") == []
    assert references.destroying("network", "local.n1")  # young, its record not stored
    # A dependent's apply starting now waits for the destroy to end.
    apply = RunSpec(modules["subnet"], "s2", "local.s2", "apply",
                    {"network_id": {"$ref": ref}}, who, Scrubber([]))
    ended = threading.Event()

    def end_later() -> None:
        time.sleep(0.3)
        ended.set()
        destroy_ends(dependents, spec)

    threading.Thread(target=end_later, daemon=True).start()
    references._wait_for(apply, [("network_id", ref)])
    assert ended.is_set() and not references.destroying("network", "local.n1")
    # A marker is a destroy under way while its run is active, or young with no record.
    record = RunRecord(id=spec.run_id, module="network", instance="n1", workspace="local.n1",
                       tenant="local", subject="someone", operation="destroy")
    runs.store.create(record)
    index.mark_destroy("network", "local.n1", spec.run_id, time.time() - CLAIM_GRACE - 1)
    assert references.destroying("network", "local.n1")  # queued: active
    record.status = "failed"
    runs.store.save(record)
    assert not references.destroying("network", "local.n1")
    index.mark_destroy("network", "local.n1", new_run_id(), time.time() - CLAIM_GRACE - 1)
    assert not references.destroying("network", "local.n1")  # left by a crash
    assert index.destroys_of("network", "local.n1") == []  # both old marks of no run went
    ahead = time.time() + 3600  # a mark dated ahead (a clock ahead) is young, and kept
    index.mark_destroy("network", "local.n1", new_run_id(), ahead)
    assert references.destroying("network", "local.n1")
    index.unmark_destroys("network", "local.n1")  # the instance destroyed: all go
    assert index.destroys_of("network", "local.n1") == []
    # A destroy still under way when the wait ends: the dependent does not start.
    index.mark_destroy("network", "local.n1", new_run_id(), time.time())
    references.wait = 0.2
    with pytest.raises(Conflict, match="network/n1 referenced by this run is being "
                                       "destroyed"):
        references._wait_for(apply, [("network_id", ref)])
    # An approved destroy (of a saved plan) is refused too when the instance is in use.
    index.claim("subnet", "local.s3", [("network_id", ref)], run_id=new_run_id(),
                at=time.time())
    approved = destroy()
    approved.plan_of = new_run_id()
    with pytest.raises(Conflict):
        destroy_starts(dependents, approved)
    assert approved.run_id not in [r for r, _ in index.destroys_of("network", "local.n1")]
