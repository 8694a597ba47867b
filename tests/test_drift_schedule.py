"""Drift checks on the policy's schedule (issue 23): `drift_check` and `reconcile` per
module, each check claimed once across replicas, skipped while the instance is busy, at
most TFSERVER_MAX_DRIFT_CHECKS at once in slots of their own; and the `instance.expired`
and `instance.destroyed` webhooks. The schedule's tick is driven directly with fakes for
the rules; real servers (a 2 s schedule, allowed by TFSERVER_DRIFT_CHECK_MIN) for the
rest."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from support import ROOT
from tfserver.app.driftclaims import CLAIM_GRACE, DriftClaims
from tfserver.app.driftschedule import (
    DriftSchedule,
    Instances,
    Schedule,
    period,
    schedules,
)
from tfserver.config import load as load_config
from tfserver.errors import ConfigError, Unavailable
from tfserver.metrics import Metrics
from tfserver.module.discover import discover
from tfserver.module.policyfile import load_policy
from tfserver.notify.payloads import instance_events
from tfserver.runs.lanes import Scheduler, Ticket
from tfserver.storage.local import LocalObjects

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
                            "max_runs_per_tenant, default_ttl, max_ttl, variables, "
                            "drift_check, reconcile)"),
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

    def ticket(key: str, *, background: bool = False, sync: bool = False) -> Ticket:
        return Ticket(key, key, sync=sync, on_start=lambda: started.append(key),
                      background=background)

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
    assert lanes.counts() == (0, 0) and lanes.idle("a")


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
