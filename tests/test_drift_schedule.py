"""Drift checks on the policy's schedule (issue 23): `drift_check` and `reconcile` per
module, each check claimed once across replicas, skipped while the instance is busy, at
most TFSERVER_MAX_DRIFT_CHECKS at once in slots of their own; and the `instance.expired`
and `instance.destroyed` webhooks. The schedule's tick is driven directly with fakes for
the rules; real servers (a 2 s schedule, allowed by TFSERVER_DRIFT_CHECK_MIN) for the
rest."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook as Verifier
from test_engine import Start, calls, fleet

from support import ROOT, Moto, ServerProcess, start_server
from test_runs import ASYNC, MODULES, SECRET, body, wait_run
from test_s3 import MODES, store
from tfserver.app.driftclaims import CLAIM_GRACE, DriftClaims
from tfserver.app.driftschedule import (
    DriftSchedule,
    Instances,
    Schedule,
    period,
    schedules,
)
from tfserver.config import load as load_config
from tfserver.errors import ConfigError, Conflict, Unavailable
from tfserver.metrics import Metrics
from tfserver.module.discover import discover
from tfserver.module.policyfile import load_policy
from tfserver.notify.payloads import instance_events
from tfserver.runs.lanes import Scheduler, Ticket
from tfserver.storage.local import LocalObjects

__all__ = ["fleet", "store"]

# -- the policy's keys -------------------------------------------------------------------


SERVED = discover(ROOT / "tests" / "modules")  # basic, fails, slow


def policy_of(tmp: Path, text: str) -> Any:
    path = tmp / "policy.toml"
    path.write_text(text)
    return load_policy(path, SERVED)


def test_the_policy_reads_schedules(tmp: Path) -> None:
    policy = policy_of(tmp, '[modules.basic]\ndrift_check = "6h"\nreconcile = true\n'
                            '[modules.slow]\ndrift_check = "90m"\n[modules.fails]\n')
    assert schedules(policy, 300) == {"basic": Schedule(6 * 3600, True),
                                      "slow": Schedule(5400, False)}
    assert schedules(policy_of(tmp, "[defaults]\nmax_runs_per_tenant = 1\n"), 300) == {}


HOSTILE = [
    ('drift_check = "-6h"', 'drift_check: must be a duration such as "30m", "6h" or "1d"'),
    ('drift_check = "6 hours"', 'drift_check: must be a duration such as "30m", "6h" or "1d"'),
    ('drift_check = ""', 'drift_check: must be a duration such as "30m", "6h" or "1d"'),
    ('drift_check = "nan"', 'drift_check: must be a duration such as "30m", "6h" or "1d"'),
    ('drift_check = "1e9h"', 'drift_check: must be a duration such as "30m", "6h" or "1d"'),
    ("drift_check = 6", 'drift_check: must be a duration such as "30m", "6h" or "1d"'),
    ("drift_check = 6.5", 'drift_check: must be a duration such as "30m", "6h" or "1d"'),
    ("drift_check = true", 'drift_check: must be a duration such as "30m", "6h" or "1d"'),
    ('drift_check = ["6h"]', 'drift_check: must be a duration such as "30m", "6h" or "1d"'),
    ("drift_check = 2026-01-01", 'drift_check: must be a duration such as "30m", "6h" or '
                                 '"1d"'),
    ('drift_check = "0s"', "drift_check: must be longer than 0 and at most 365d"),
    ('drift_check = "366d"', "drift_check: must be longer than 0 and at most 365d"),
    ('drift_check = "99999999999999999999d"',
     "drift_check: must be longer than 0 and at most 365d"),
    ('drift_check = "unlimited"', 'drift_check: must be a duration such as "30m", "6h" or '
                                  '"1d"'),
    ('drift_check = "6h"\nreconcile = "yes"', "reconcile: must be true or false"),
    ('drift_check = "6h"\nreconcile = 1', "reconcile: must be true or false"),
    ("reconcile = true", "reconcile: needs drift_check (reconcile applies what a scheduled "
                         "check finds)"),
    ('drift_checks = "6h"', "drift_checks: unknown key (expected max_instances_per_tenant, "
                            "max_runs_per_tenant, default_ttl, max_ttl, require_approval, "
                            "separate_approver, variables, drift_check, reconcile, cascade, "
                            "default_version)"),
]


@pytest.mark.parametrize(("line", "fault"), HOSTILE, ids=[f"{i}" for i in range(len(HOSTILE))])
def test_hostile_schedules_are_one_line_faults(tmp: Path, line: str, fault: str) -> None:
    with pytest.raises(ConfigError) as caught:
        policy_of(tmp, f"[modules.basic]\n{line}\n")
    assert str(caught.value) == f"{tmp / 'policy.toml'}: modules.basic.{fault}"


def test_a_schedule_below_the_minimum_is_refused(tmp: Path) -> None:
    policy = policy_of(tmp, '[modules.basic]\ndrift_check = "1m"\n')
    with pytest.raises(ConfigError) as caught:
        schedules(policy, 300)
    assert str(caught.value) == (f"{tmp / 'policy.toml'}: modules.basic.drift_check: must be "
                                 "at least 5m (TFSERVER_DRIFT_CHECK_MIN)")
    assert schedules(policy, 60) == {"basic": Schedule(60, False)}
    config = load_config([], {})
    assert (config.max_drift_checks, config.drift_check_min) == (2, 300.0)
    for name, value in (("TFSERVER_MAX_DRIFT_CHECKS", "0"), ("TFSERVER_MAX_DRIFT_CHECKS", "-1"),
                        ("TFSERVER_MAX_DRIFT_CHECKS", "1e9"),
                        ("TFSERVER_DRIFT_CHECK_MIN", "0.5s"),
                        ("TFSERVER_DRIFT_CHECK_MIN", "soon")):
        with pytest.raises(ConfigError, match=name):
            load_config([], {name: value})


# -- spare slots in the lanes ------------------------------------------------------------


def test_checks_take_spare_slots_never_a_users() -> None:
    lanes = Scheduler(1, 4, spare=1)
    started: list[str] = []
    stopped: list[str] = []

    def ticket(key: str, *, background: bool = False, sync: bool = False) -> Ticket:
        return Ticket(key, key, sync=sync, on_start=lambda: started.append(key),
                      background=(lambda: stopped.append(key)) if background else None)

    check = ticket("a", background=True)
    lanes.enqueue(check)
    second_check = ticket("b", background=True)
    lanes.enqueue(second_check)
    assert started == ["a"]  # one spare slot: the second check waits for it
    user = ticket("c", sync=True)
    lanes.enqueue(user)  # the user's slot is free: a synchronous run starts at once
    assert started == ["a", "c"]
    assert lanes.counts() == (2, 1)
    assert not lanes.idle("a") and not lanes.idle("b") and lanes.idle("z")
    with pytest.raises(Unavailable):  # every user slot busy: checks' slots do not help
        lanes.enqueue(ticket("d", sync=True))
    lanes.finish(check)
    assert started == ["a", "c", "b"]
    lanes.finish(second_check)
    lanes.finish(user)
    assert lanes.counts() == (0, 0) and lanes.idle("a") and stopped == []


def test_a_users_run_stops_the_check_of_its_instance_and_waits_only_for_that() -> None:
    lanes = Scheduler(1, 4, spare=1)
    started: list[str] = []
    check = Ticket("i", "check", sync=False, on_start=lambda: started.append("check"),
                   background=lambda: threading.Timer(0.2, lanes.finish, [check]).start())
    lanes.enqueue(check)
    user = Ticket("i", "user", sync=True, on_start=lambda: started.append("user"))
    began = time.monotonic()
    lanes.enqueue(user, wait=0.0)  # no patience of its own: it is not refused
    assert started == ["check", "user"] and time.monotonic() - began < 5
    lanes.finish(user)
    other = Ticket("i", "other", sync=True, on_start=lambda: started.append("other"))
    lanes.enqueue(other)  # a user's run is never stopped for another's
    blocked = Ticket("i", "blocked", sync=True, on_start=lambda: None)
    with pytest.raises(Conflict):
        lanes.enqueue(blocked, wait=0.0)
    lanes.finish(other)


# -- the tick, with fakes ----------------------------------------------------------------


@dataclass
class Fleet:
    """Instances, runs and what the checks did, shared by the schedules of 'replicas'."""

    workspaces: list[str]
    now: float = 1_000_000.0
    busy: set[str] = field(default_factory=set)
    checked: dict[str, float] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)
    started: list[tuple[str, str, bool, str]] = field(default_factory=list)
    mutex: threading.Lock = field(default_factory=threading.Lock)

    def running(self) -> int:
        return sum(1 for s in self.status.values() if s == "running")

    def start(self, replica: str) -> Callable[[str, str, bool], str]:
        def start(module: str, workspace: str, reconcile: bool) -> str:
            with self.mutex:
                run_id = f"run-{len(self.started)}"
                self.started.append((workspace, replica, reconcile, run_id))
                self.status[run_id] = "running"
            return run_id
        return start

    def end_all(self) -> None:
        """Every running check ends, and its instance is then checked."""
        for workspace, _, _, run_id in self.started:
            if self.status[run_id] == "running":
                self.status[run_id] = "succeeded"
                self.checked[workspace] = self.now

    def schedule(self, objects: LocalObjects, replica: str, *, slots: int = 2,
                 interval: float = 600.0, reconcile: bool = False,
                 metrics: Metrics | None = None) -> DriftSchedule:
        claims = DriftClaims(objects, lambda run_id: self.status.get(run_id, "lost"),
                             slots=slots, max_age=3600)
        instances = Instances(lambda module: list(self.workspaces),
                              lambda module, ws: self.checked.get(ws),
                              lambda module, ws: ws in self.busy)
        return DriftSchedule({"m": Schedule(interval, reconcile)}, instances, claims,
                             self.start(replica), replica=replica,
                             metrics=metrics or Metrics(), clock=lambda: self.now)


def counter(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value("tfserver_drift_checks_scheduled_total",
                                              {"module": "m", "result": result})
    return value or 0.0


def test_a_due_check_starts_once_a_period_and_spreads(tmp: Path) -> None:
    fleet = Fleet([f"t.i{n}" for n in range(3)])
    metrics = Metrics()
    schedule = fleet.schedule(LocalObjects(tmp / "o"), "a", slots=5, reconcile=True,
                              metrics=metrics)
    assert schedule.tick_once() == 3  # never checked: all due now
    assert all(reconcile for _, _, reconcile, _ in fleet.started)
    fleet.end_all()
    assert schedule.tick_once() == 0  # checked in this period
    assert counter(metrics, "started") == 3
    # Each instance comes round again at its own point of the next period (the jitter).
    starts = sorted(period("m", ws, 600, fleet.now)[1] + 600 for ws in fleet.workspaces)
    assert len(set(starts)) == 3 and starts[-1] - starts[0] < 600
    for at in starts:
        fleet.now = at + 0.001
        schedule._next.clear()  # a fresh replica's view: only the backend decides
        assert schedule.tick_once() == 1
        fleet.end_all()
    assert len(fleet.started) == 6
    objects = schedule.claims.objects
    assert objects.keys("_driftcheck/m/t.i0/")
    fleet.workspaces.clear()  # all destroyed: their claims go
    assert schedule.tick_once() == 0 and objects.keys("_driftcheck/m/t.i0/") == []


def test_a_busy_instance_is_skipped_until_the_next_period(tmp: Path) -> None:
    fleet = Fleet(["t.busy", "t.idle"], busy={"t.busy"})
    metrics = Metrics()
    schedule = fleet.schedule(LocalObjects(tmp / "o"), "a", metrics=metrics)
    assert schedule.tick_once() == 1
    assert [ws for ws, *_ in fleet.started] == ["t.idle"]
    assert schedule.tick_once() == 0
    assert counter(metrics, "skipped_busy") == 1  # once a period, not once a tick
    other = fleet.schedule(LocalObjects(tmp / "o"), "b", metrics=Metrics())
    fleet.busy.clear()
    fleet.end_all()
    assert other.tick_once() == 0  # the period's check was put off for every replica
    fleet.now += 601
    assert other.tick_once() == 2
    assert counter(metrics, "skipped_busy") == 1


def test_never_more_than_max_checks_at_once_over_replicas(tmp: Path) -> None:
    fleet = Fleet([f"t.i{n}" for n in range(7)])
    objects = LocalObjects(tmp / "o")
    a, b = (fleet.schedule(objects, r, slots=2) for r in ("a", "b"))
    assert a.tick_once() == 2 and b.tick_once() == 0
    assert fleet.running() == 2
    fleet.end_all()
    assert b.tick_once() == 2 and a.tick_once() == 0 and fleet.running() == 2
    fleet.end_all()
    fleet.status[fleet.started[-1][3]] = "running"  # one goes on
    assert a.tick_once() == 1 and fleet.running() == 2
    fleet.end_all()
    assert b.tick_once() == 2 and a.tick_once() == 0
    assert sorted(ws for ws, *_ in fleet.started) == sorted(fleet.workspaces)


def test_two_replicas_racing_start_each_check_once(tmp: Path) -> None:
    fleet = Fleet([f"t.i{n}" for n in range(12)])
    objects = LocalObjects(tmp / "o")
    replicas = [fleet.schedule(objects, r, slots=12) for r in ("a", "b", "c")]
    gate = threading.Barrier(len(replicas))

    def tick(schedule: DriftSchedule) -> None:
        gate.wait(5)
        schedule.tick_once()

    threads = [threading.Thread(target=tick, args=(s,)) for s in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(ws for ws, *_ in fleet.started) == sorted(fleet.workspaces)


def test_a_lease_whose_run_died_or_never_started_is_outlived(tmp: Path) -> None:
    status: dict[str, str] = {}
    claims = DriftClaims(LocalObjects(tmp / "o"), lambda r: status.get(r, "lost"), slots=1,
                         max_age=100)
    first = claims.take("a", 0.0)
    assert first is not None and claims.take("b", 1.0) is None
    assert claims.take("b", CLAIM_GRACE + 1) is not None  # never named a run: over
    assert claims.take("a", CLAIM_GRACE + 2) is None  # b's is young
    claims2 = DriftClaims(claims.objects, claims.status, slots=1, max_age=100)
    held = claims2.take("c", 2000.0)  # b's is older than max_age
    assert held is not None
    claims2.run_of(held, "c", 2000.0, "r1")
    status["r1"] = "running"
    assert claims2.take("a", 2001.0) is None and claims2.held(2001.0) == 1
    status["r1"] = "lost"  # its replica was killed: the liveness says so
    assert claims2.take("a", 2002.0) is not None
    assert len(claims.objects.keys("_driftslots/")) == 1  # older generations go


def test_claims_of_old_periods_go(tmp: Path) -> None:
    claims = DriftClaims(LocalObjects(tmp / "o"), lambda r: "lost", slots=1, max_age=1)
    for number in range(5):
        assert claims.claim("m", "t.i", number, {"at": number})
        assert not claims.claim("m", "t.i", number, {"at": number})
    assert claims.objects.keys("_driftcheck/m/t.i/") == ["000000000003", "000000000004"]
    claims.forget("m", "t.i")
    assert claims.objects.keys("_driftcheck/m/t.i/") == []


# -- the instance events -----------------------------------------------------------------


@pytest.mark.parametrize(("operation", "status", "drift", "expired", "events"), [
    ("destroy", "succeeded", None, False, [("instance.destroyed", "destroyed")]),
    ("destroy", "succeeded", None, True, [("instance.expired", "succeeded"),
                                          ("instance.destroyed", "destroyed")]),
    ("destroy", "failed", None, True, [("instance.expired", "failed")]),
    ("destroy", "failed", None, False, []),
    ("plan-destroy", "succeeded", None, False, []),
    ("apply", "succeeded", None, False, []),
    ("drift", "succeeded", "drifted", False, [("instance.drifted", "drifted")]),
    ("drift", "succeeded", "in_sync", False, []),
])
def test_which_instance_events_a_run_makes(operation: str, status: str, drift: str | None,
                                           expired: bool,
                                           events: list[tuple[str, str]]) -> None:
    assert instance_events(operation, status, drift, expired=expired) == events


# -- real servers: a 2 s schedule -------------------------------------------------------

HOOK_SECRET = "whsec_" + base64.b64encode(b"schedule-secret-0123456789").decode()
REFRESH = "plan -json -refresh-only"
#: What the stand-in reports when the `drift` flag is set: terraform_data never drifts, so
#: a fake `resource_drift` line (of the shape terraform writes) follows the real plan's
#: output. Real drift, with a real provider, is test_drift.py's.
FAKE_DRIFT = json.dumps({"type": "resource_drift", "change": {
    "resource": {"addr": "terraform_data.first"}, "action": "update"}})
WAIT = 40.0


@dataclass
class Receiver:
    """Webhooks received on 127.0.0.1: (headers, body) in order."""

    url: str = ""
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    def events(self, instance: str) -> list[dict[str, Any]]:
        with self.arrived:
            found = [Verifier(HOOK_SECRET).verify(body, headers)
                     for headers, body in self.requests]
        return [e for e in found if e["data"]["instance"] == instance]

    def wait_for(self, instance: str, count: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + WAIT
        with self.arrived:
            while len(self.events(instance)) < count:
                assert self.arrived.wait(max(0.0, deadline - time.monotonic())), \
                    self.requests
        return self.events(instance)


def receive() -> tuple[Receiver, http.server.ThreadingHTTPServer]:
    receiver = Receiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with receiver.arrived:
                receiver.requests.append((dict(self.headers.items()), body))
                receiver.arrived.notify_all()
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    return receiver, server


def shim(folder: Path, real: str) -> Path:
    """Terraform behind a stand-in: with the `drift` flag a check reports drift; with
    `slow` a check sleeps first (its pids in `pids`, so a test can end it)."""
    path = folder / "terraform-shim"
    path.write_text(
        f'#!/bin/sh\ncase "$*" in "{REFRESH}"*)\n'
        f'  if [ -e "{folder}/slow" ]; then echo $$ >> "{folder}/pids"\n'
        "    sleep 30 & p=$!; echo $p >> " f'"{folder}/pids"' "\n"
        "    trap 'kill $p; exit 130' INT TERM; wait $p; fi\n"
        f'  if [ -e "{folder}/drift" ]; then "{real}" "$@"; rc=$?\n'
        f"    echo '{FAKE_DRIFT}'; exit $rc; fi;;\nesac\n"
        f'exec "{real}" "$@"\n')
    path.chmod(0o755)
    return path


def policy_file(folder: Path, text: str) -> Path:
    path = folder / "policy.toml"
    path.write_text(text)
    return path


def scheduled(terraform: Path, policy: Path, folder: Path,
              **env: str) -> ServerProcess:
    return start_server(folder, modules_dir=MODULES, env={
        "TFSERVER_TERRAFORM": str(terraform), "TFSERVER_POLICY": str(policy),
        "TFSERVER_DRIFT_CHECK_MIN": "1s", "TFSERVER_REAP_INTERVAL": "0.5",
        "TFSERVER_WEBHOOK_ALLOW": "127.0.0.1", "HOOK_SECRET": HOOK_SECRET, **env})


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, terraform_bin: str
        ) -> Iterator[tuple[ServerProcess, Path, Receiver, Receiver]]:
    """A server checking `steps` every 2 s (reconcile on), one check at a time, with
    webhooks for every tenant and for another tenant only."""
    tmp = tmp_path_factory.mktemp("schedule")
    everyone, one = receive()
    nobody, other = receive()
    policy = policy_file(tmp, f"""
[modules.steps]
drift_check = "2s"
reconcile = true

[[webhooks]]
url = "{everyone.url}"
secret = "env:HOOK_SECRET"
events = ["instance.expired", "instance.destroyed"]
tenants = ["*"]

[[webhooks]]
url = "{nobody.url}"
secret = "env:HOOK_SECRET"
events = ["instance.expired", "instance.destroyed", "instance.drifted"]
tenants = ["someone-else"]
""")
    server = scheduled(shim(tmp, terraform_bin), policy, tmp,
                       TFSERVER_MAX_DRIFT_CHECKS="1")
    yield server, tmp, everyone, nobody
    server.stop()
    one.shutdown()
    other.shutdown()


def drift_of(server: ServerProcess, instance: str) -> dict[str, Any]:
    r = server.request("GET", f"/steps/{instance}")
    assert r.status == 200, r.body
    return dict(r.json["drift"])


def until(what: Callable[[], Any], timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := what()):
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.2)
    return found


def counted(server: ServerProcess, result: str) -> float:
    text = server.request("GET", "/metrics").body.decode()
    found = re.search(r'^tfserver_drift_checks_scheduled_total\{module="steps",result="'
                      + result + r'"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def runs_of(server: ServerProcess, instance: str) -> list[dict[str, Any]]:
    return list(server.request("GET", f"/steps/{instance}/runs?limit=100").json["runs"])


def test_a_scheduled_check_sets_the_drift(srv: tuple[ServerProcess, Path, Receiver, Receiver]
                                          ) -> None:
    server, *_ = srv
    assert server.request("PUT", "/steps/sched", body(0, "sched")).status == 201
    drift = until(lambda: (d := drift_of(server, "sched"))["status"] == "in_sync" and d)
    run = server.request("GET", f"/runs/{drift['run_id']}").json
    assert run["operation"] == "drift" and run["status"] == "succeeded", run
    assert run["who"]["subject"] == "tfserver:schedule"
    assert counted(server, "started") >= 1
    # and again the next period
    until(lambda: drift_of(server, "sched")["checked_at"] != drift["checked_at"])


def test_a_busy_instance_is_skipped(srv: tuple[ServerProcess, Path, Receiver, Receiver]
                                    ) -> None:
    server, *_ = srv
    assert server.request("PUT", "/steps/busy", body(0, "busy")).status == 201
    until(lambda: drift_of(server, "busy")["status"] == "in_sync")
    skipped = counted(server, "skipped_busy")
    slow = server.request("PUT", "/steps/busy", body(2, "busy"), headers=ASYNC).json
    applied = wait_run(server, slow["id"], timeout=60)
    assert applied["status"] == "succeeded"
    assert counted(server, "skipped_busy") > skipped
    during = [r for r in runs_of(server, "busy") if r["operation"] == "drift"
              and applied["started_at"] <= r["created_at"] <= applied["finished_at"]]
    assert during == []


def test_reconcile_from_the_schedule(srv: tuple[ServerProcess, Path, Receiver, Receiver]
                                     ) -> None:
    server, tmp, *_ = srv
    assert server.request("PUT", "/steps/recon", body(0, "recon")).status == 201
    until(lambda: drift_of(server, "recon")["status"] == "in_sync")
    (tmp / "drift").touch()
    try:
        drift = until(lambda: (d := drift_of(server, "recon"))["status"] == "drifted" and
                      d.get("reconciled_by") and d)
    finally:
        (tmp / "drift").unlink()
    check = wait_run(server, drift["run_id"])
    assert check["who"]["subject"] == "tfserver:schedule"
    assert check["status"] == "succeeded", check  # its own apply did not stop it
    assert check.get("cancel") is None, check
    applied = wait_run(server, drift["reconciled_by"], timeout=60)
    assert applied["operation"] == "apply" and applied["status"] == "succeeded", applied
    assert applied["who"]["subject"] == "tfserver:drift"


def test_expired_and_destroyed_instances_are_told(
        srv: tuple[ServerProcess, Path, Receiver, Receiver]) -> None:
    server, _, everyone, nobody = srv
    assert server.request("PUT", "/steps/short?ttl=2s", body(0, "short")).status == 201
    # in no fixed order: deliveries go out on several threads
    expired, destroyed = sorted(everyone.wait_for("short", 2),
                                key=lambda e: e["type"] != "instance.expired")
    assert [expired["type"], destroyed["type"]] == ["instance.expired", "instance.destroyed"]
    assert expired["data"]["status"] == "succeeded"
    assert destroyed["data"]["status"] == "destroyed"
    run = server.request("GET", f"/runs/{destroyed['data']['run_id']}").json
    assert run["who"]["subject"] == "tfserver:ttl" and run["operation"] == "destroy"
    assert expired["data"]["run_id"] == run["id"]
    assert expired["data"]["links"] == {"instance": "/steps/short", "run": f"/runs/{run['id']}"}
    assert server.request("GET", "/steps/short").status == 404

    assert server.request("PUT", "/steps/gone", body(0, "gone")).status == 201
    r = server.request("DELETE", "/steps/gone")
    assert r.status == 200, r.body
    (event,) = everyone.wait_for("gone", 1)
    assert event["type"] == "instance.destroyed" and event["data"]["run_id"] == r.json["run_id"]
    assert set(event["data"]) == {"module", "instance", "tenant", "run_id", "links", "status"}
    bodies = b"".join(b for _, b in everyone.requests)
    assert SECRET.encode() not in bodies and b"short" in bodies
    assert nobody.requests == []  # another tenant's webhook hears nothing of these


def test_a_users_run_on_an_instance_being_checked_stops_the_check(
        tmp: Path, terraform_bin: str) -> None:
    policy = policy_file(tmp, '[modules.steps]\ndrift_check = "2s"\n')
    server = scheduled(shim(tmp, terraform_bin), policy, tmp, TFSERVER_MAX_DRIFT_CHECKS="1")
    try:
        (tmp / "slow").touch()
        assert server.request("PUT", "/steps/p", body(0, "p")).status == 201
        (check,) = until(lambda: [r for r in runs_of(server, "p") if r["operation"] == "drift"
                                  and r["status"] == "running"])
        began = time.monotonic()
        r = server.request("PUT", "/steps/p", body(0, "user"), timeout=60)
        assert r.status == 200, r.body  # not 409: the check stood aside
        assert time.monotonic() - began < 20  # the check's 30 s sleep was not waited for
        stopped = wait_run(server, check["id"])
        assert stopped["status"] == "canceled", stopped
        assert counted(server, "preempted") == 1
    finally:
        (tmp / "slow").unlink(missing_ok=True)
        server.stop()


def test_a_server_killed_mid_check_checks_again_after_restart(
        tmp: Path, terraform_bin: str) -> None:
    policy = policy_file(tmp, '[modules.steps]\ndrift_check = "2s"\n')
    terraform = shim(tmp, terraform_bin)
    env = {"TFSERVER_REPLICA_ID": "kill-me", "TFSERVER_MAX_DRIFT_CHECKS": "1"}
    server = scheduled(terraform, policy, tmp, **env)
    try:
        (tmp / "slow").touch()
        assert server.request("PUT", "/steps/k", body(0, "k")).status == 201
        killed = until(lambda: [r for r in runs_of(server, "k") if r["operation"] == "drift"
                                and r["status"] == "running" and (tmp / "pids").exists()])
        server.stop(signal.SIGKILL)
    finally:
        server.stop()
        for pid in (tmp / "pids").read_text().split() if (tmp / "pids").exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        (tmp / "slow").unlink(missing_ok=True)
    server = scheduled(terraform, policy, tmp, **env)
    try:
        drift = until(lambda: (d := drift_of(server, "k"))["status"] == "in_sync" and d)
        assert drift["run_id"] != killed[0]["id"]
        lost = server.request("GET", f"/runs/{killed[0]['id']}").json
        assert lost["status"] in ("lost", "failed"), lost
        # and again: the slot is not held by the killed check
        until(lambda: drift_of(server, "k")["checked_at"] != drift["checked_at"])
        assert server.request("GET", "/steps/k").json.get("lock") is None
        assert server.request("PUT", "/steps/k", body(0, "after")).status == 200
    finally:
        server.stop()


def test_two_replicas_on_one_bucket_run_each_check_once(
        tmp: Path, terraform_bin: str, moto: Moto, store: dict[str, str]) -> None:
    policy = policy_file(tmp, '[modules.steps]\ndrift_check = "2s"\n')
    terraform = shim(tmp, terraform_bin)
    env = {**store, **MODES["lockfile"], "TFSERVER_MAX_DRIFT_CHECKS": "2"}
    a = scheduled(terraform, policy, tmp / "a", TFSERVER_REPLICA_ID="a", **env)
    b = scheduled(terraform, policy, tmp / "b", TFSERVER_REPLICA_ID="b", **env)
    try:
        for name in ("one", "two"):
            assert a.request("PUT", f"/steps/{name}", body(0, name)).status == 201
        for name in ("one", "two"):
            until(lambda n=name: len([r for r in runs_of(b, n)  # type: ignore[misc]
                                      if r["operation"] == "drift"]) >= 3, timeout=60)
        checks = {r["id"]: r for name in ("one", "two") for r in runs_of(a, name)
                  if r["operation"] == "drift"}
        # A check's line is logged once its run exists, and read from the pipe later.
        until(lambda: all(f"(run {run})" in a.log_text() + b.log_text() for run in checks),
              timeout=10)
        started = [m.groups() for s in (a, b) for m in re.finditer(
            r"drift schedule: checking steps/(\S+), period (\d+) \(run (\w+)\)",
            s.log_text())]
        assert len({(ws, n) for ws, n, _ in started}) == len(started)  # each period once
        assert {run for *_, run in started} >= set(checks)
        assert {r["status"] for r in checks.values()} <= {"succeeded", "running", "queued"}
    finally:
        a.stop()
        b.stop()


def test_no_drift_check_no_schedule() -> None:
    from tfserver.app.driftrun import drift_schedule
    from tfserver.module.policy import Policy

    nothing: Any = None  # never touched: no thread, no store read, no listing
    assert drift_schedule(load_config([], {}), Policy.empty(), nothing, nothing, nothing,
                          Metrics()) is None


def test_a_scheduled_check_through_the_sqs_engine(fleet: tuple[Start, str], tmp: Path
                                                  ) -> None:
    """With `sqs`, a replica's schedule queues the check and a worker runs it."""
    start, _ = fleet
    policy = policy_file(tmp, '[modules.steps]\ndrift_check = "2s"\n')
    env = {"TFSERVER_POLICY": str(policy), "TFSERVER_DRIFT_CHECK_MIN": "1s"}
    api, worker = start("api1", "api", **env), start("w1", "worker", **env)
    assert api.request("PUT", "/steps/queued", body(0, "q")).status == 201
    drift = until(lambda: (d := drift_of(api, "queued"))["status"] == "in_sync" and d,
                  timeout=60)
    run = api.request("GET", f"/runs/{drift['run_id']}").json
    assert run["who"]["subject"] == "tfserver:schedule", run
    assert calls(api) == [] and [c for c in calls(worker) if c.startswith(REFRESH)]


def test_a_tenants_webhook_hears_of_its_instances_whoever_ran() -> None:
    """The reaper's and the schedule's runs have no client id: the instance's tenant key
    names the tenant (it failed before: such a webhook heard nothing of them)."""
    from tfserver.module.policy import Webhook
    from tfserver.names import tenant_key

    hook = Webhook("https://h.example/", "S", frozenset({"instance.expired"}),
                   frozenset({"client-123"}))
    assert hook.wants("instance.expired", tenant_key("client-123"), None)
    assert hook.wants("instance.expired", "other", "client-123")
    assert not hook.wants("instance.expired", tenant_key("client-9"), None)
    assert not hook.wants("instance.destroyed", tenant_key("client-123"), None)


def test_a_reapers_destroy_refused_is_no_expiry() -> None:
    """The reaper's destroy refused because a later apply moved the expiry (409) or the
    instance went (404) tells nothing: the instance did not expire."""
    from test_drift import _Notifier

    from tfserver.__main__ import _webhooks
    from tfserver.runs.store import RunRecord

    notifier = _Notifier()
    ended = _webhooks(notifier)  # type: ignore[arg-type]
    base = {"id": "r1", "module": "m", "instance": "i", "workspace": "t.i", "tenant": "t",
            "subject": "tfserver:ttl", "operation": "destroy", "finished_at": 5.0}
    for status in (409, 404):
        ended(RunRecord(**base, status="failed", problem={"status": status}))
    assert [e for e, _, _ in notifier.sent] == ["run.finished", "run.finished"]
    ended(RunRecord(**base, status="failed", problem={"status": 500}))
    assert [e for e, _, _ in notifier.sent][2:] == ["run.finished", "instance.expired"]
    ended(RunRecord(**base, status="succeeded"))
    assert [e for e, _, _ in notifier.sent][4:] == ["run.finished", "instance.expired",
                                                    "instance.destroyed"]
    payload = notifier.sent[-1][1]
    assert payload["data"]["status"] == "destroyed" and payload["data"]["run_id"] == "r1"
