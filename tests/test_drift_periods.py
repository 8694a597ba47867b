"""Two replicas claiming neighbouring periods of one instance's drift schedule (one looks
just before a period ends, the other just after the next began) start one check, not
two: each reads the other period's claim after writing its own (`DriftClaims.overlaps`).
Two checks of one instance at once were seen on the `sqs` engine as two checks stopped
by one user's run (test_drift_schedule_sqs)."""

from __future__ import annotations

from pathlib import Path

from test_drift_schedule import Fleet, counter

from tfserver.app.driftclaims import CLAIM_GRACE
from tfserver.app.driftschedule import Instances, period
from tfserver.errors import Unavailable
from tfserver.metrics import Metrics
from tfserver.storage.local import LocalObjects

INTERVAL = 60.0


def at_the_end_of_a_period(fleet: Fleet) -> tuple[int, float]:
    """Set the fleet's clock just before its instance's current period ends."""
    number, began = period("m", fleet.workspaces[0], INTERVAL, fleet.now)
    fleet.now = began + INTERVAL - 0.001
    return number, began + INTERVAL


def test_the_next_period_claimed_while_a_check_is_being_started(tmp: Path) -> None:
    fleet = Fleet(["t.i"])
    objects = LocalObjects(tmp / "o")
    metrics = Metrics()
    late, early = (fleet.schedule(objects, r, interval=INTERVAL, metrics=metrics)
                   for r in ("late", "early"))
    _, next_began = at_the_end_of_a_period(fleet)
    start = late.start_check

    def starting(module: str, workspace: str, reconcile: bool) -> str:
        # The other replica looks after the period turned, before this check's run exists
        # (a busy instance's runs are read from the store: this one is not there yet).
        fleet.now = next_began + 0.001
        assert early.tick_once() == 0
        return start(module, workspace, reconcile)

    late.start_check = starting
    assert late.tick_once() == 1
    assert len(fleet.started) == 1
    assert counter(metrics, "skipped_busy") == 0  # it gave its claim back, to look again
    assert early.tick_once() == 0  # the earlier period's check runs: this one is put off
    assert counter(metrics, "skipped_busy") == 1 and len(fleet.started) == 1
    fleet.end_all()
    fleet.now = next_began + INTERVAL + 0.001  # the period after: due again, as before
    assert early.tick_once() == 1 and len(fleet.started) == 2


def test_two_replicas_never_both_give_way(tmp: Path) -> None:
    """The later period claimed between the earlier's claim and its look at the later:
    the later replica finds the earlier's check being started and gives its claim back
    (both gave way before, and the period went unchecked); the earlier then starts."""
    fleet = Fleet(["t.i"])
    objects = LocalObjects(tmp / "o")
    late, early = (fleet.schedule(objects, r, interval=INTERVAL) for r in ("late", "early"))
    _, next_began = at_the_end_of_a_period(fleet)
    overlaps = late.claims.overlaps

    def looking(module: str, workspace: str, number: int, now: float) -> str:
        saved, fleet.now = fleet.now, next_began + 0.001
        assert early.tick_once() == 0
        fleet.now = saved
        return overlaps(module, workspace, number, now)

    late.claims.overlaps = looking  # type: ignore[method-assign]
    assert late.tick_once() == 1
    assert [(ws, replica) for ws, replica, *_ in fleet.started] == [("t.i", "late")]
    late.claims.overlaps = overlaps  # type: ignore[method-assign]
    fleet.now = next_began + 0.001
    assert early.tick_once() == 0  # the earlier period's check runs: put off
    fleet.end_all()
    fleet.now = next_began + INTERVAL + 0.001
    assert early.tick_once() == 1 and len(fleet.started) == 2


def test_a_late_look_gives_way_to_the_next_period_already_claimed(tmp: Path) -> None:
    fleet = Fleet(["t.i"])
    objects = LocalObjects(tmp / "o")
    late, early = (fleet.schedule(objects, r, interval=INTERVAL) for r in ("late", "early"))
    _, next_began = at_the_end_of_a_period(fleet)
    seen = late.instances

    def busy(module: str, workspace: str) -> bool:
        # The late replica read the instance idle; the other then claims and starts the
        # next period's check before the late one writes its own claim.
        idle = seen.busy(module, workspace)
        now, fleet.now = fleet.now, next_began + 0.001
        assert early.tick_once() == 1
        fleet.now = now
        return idle

    late.instances = Instances(seen.workspaces, seen.last_checked, busy)
    assert late.tick_once() == 0
    assert [(ws, replica) for ws, replica, *_ in fleet.started] == [("t.i", "early")]
    assert late.claims.held(fleet.now) == 1  # the late one gave its slot back


def test_a_neighbours_claim_that_never_ran_or_ended_holds_nothing(tmp: Path) -> None:
    fleet = Fleet(["t.i"])
    schedule = fleet.schedule(LocalObjects(tmp / "o"), "a", interval=INTERVAL)
    number, _ = at_the_end_of_a_period(fleet)
    claims = schedule.claims
    assert claims.claim("m", "t.i", number - 1, {"replica": "dead", "at": fleet.now})
    assert claims.overlaps("m", "t.i", number, fleet.now) == "starting"
    assert claims.overlaps("m", "t.i", number, fleet.now + CLAIM_GRACE) == ""  # it died
    claims.note("m", "t.i", number - 1, {"at": fleet.now, "run_id": "r"})
    fleet.status["r"] = "running"
    assert claims.overlaps("m", "t.i", number, fleet.now) == "busy"
    fleet.status["r"] = "succeeded"
    assert claims.overlaps("m", "t.i", number, fleet.now) == ""

    def refused(module: str, workspace: str, reconcile: bool) -> str:
        raise Unavailable("shutting down")

    schedule.start_check = refused  # a check that could not start is noted so
    assert schedule.tick_once() == 0
    assert claims.overlaps("m", "t.i", number + 1, fleet.now) == ""
    assert claims.held(fleet.now) == 0
