"""Drift checks on the policy's schedule (`drift_check = "6h"`, `reconcile = true` in a
module's table; DESIGN: Drift, schedules and notifications).

Every replica runs a `DriftSchedule` thread. Time is cut, per instance, into periods of
the module's `drift_check`, each instance's periods shifted by a fixed offset drawn from
its name (the jitter: checks spread over the period instead of all starting at once, and
every replica agrees on the periods). An instance is due when its last check (by anyone:
a scheduled one or a `POST .../drift`) is older than its current period's start. A due
check is claimed once across replicas (driftclaims.py), needs one of the
TFSERVER_MAX_DRIFT_CHECKS slots shared by all replicas, and is put off to the next period
while the instance is busy (a run queued or running on it, on any replica).

A scheduled check is a run of operation `drift` by `tfserver:schedule`, in a spare slot of
the local lanes (never one of TFSERVER_MAX_RUNS, so a user's run never waits for a slot a
check took); its reconciling apply, when the module says `reconcile`, is an ordinary run
by `tfserver:drift`. A server whose policy has no `drift_check` starts no thread.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..auth import Principal
from ..errors import ConfigError, TFServerError
from ..metrics import Metrics
from ..module.limits import format_duration
from ..module.policy import Policy
from .driftclaims import DriftClaims

logger = logging.getLogger(__name__)

#: Who starts the scheduled checks (an admin of no tenant), as records and audit lines say.
SCHEDULER = Principal(subject="tfserver:schedule", tenant="tfserver:schedule", admin=True)
#: The longest wait between two looks at what is due.
TICK_MAX = 30.0


@dataclass(frozen=True)
class Schedule:
    """One module's schedule: every `interval` seconds, then apply if `reconcile`."""

    interval: float
    reconcile: bool


def schedules(policy: Policy, minimum: float) -> dict[str, Schedule]:
    """The modules' schedules from the policy; ConfigError (one line naming the key) for
    a `drift_check` below `minimum` (TFSERVER_DRIFT_CHECK_MIN)."""
    found = {}
    for name, rules in policy.modules.items():
        if rules.drift_check is None:
            continue
        if rules.drift_check < minimum:
            raise ConfigError(f"{policy.source}: modules.{name}.drift_check: must be at "
                              f"least {format_duration(minimum)} (TFSERVER_DRIFT_CHECK_MIN)")
        found[name] = Schedule(rules.drift_check, rules.reconcile)
    return found


def offset(module: str, workspace: str, interval: float) -> float:
    """Where in each period the instance's check falls (the same on every replica)."""
    digest = hashlib.sha256(f"{module}/{workspace}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * interval


def period(module: str, workspace: str, interval: float, now: float) -> tuple[int, float]:
    """The instance's current period at `now`: its number and when it began."""
    shift = offset(module, workspace, interval)
    number = math.floor((now - shift) / interval)
    return number, shift + number * interval


#: Starts a check: (module, workspace, reconcile) -> its run id. Raises errors of the
#: package's tree when it cannot start (shutting down, the lane's queue is full).
StartCheck = Callable[[str, str, bool], str]


@dataclass(frozen=True)
class Instances:
    """What the schedule reads of the instances: which exist, when each was last checked,
    and whether one is busy now."""

    workspaces: Callable[[str], list[str]]
    last_checked: Callable[[str, str], float | None]
    busy: Callable[[str, str], bool]


class DriftSchedule(threading.Thread):
    """Starts the due drift checks of this replica's share, every tick until stopped."""

    def __init__(self, plans: Mapping[str, Schedule], instances: Instances,
                 claims: DriftClaims, start: StartCheck, *, replica: str,
                 metrics: Metrics, clock: Callable[[], float] = time.time) -> None:
        super().__init__(name="drift-schedule", daemon=True)
        self.plans = dict(plans)
        self.instances = instances
        self.claims = claims
        self.start_check = start
        self.replica = replica
        self.metrics = metrics
        self.clock = clock
        self.tick = min(TICK_MAX, max(0.25, min(p.interval for p in plans.values()) / 4))
        self.stop_event = threading.Event()
        #: When each instance is next worth a look (its next period): no reads before.
        self._next: dict[tuple[str, str], float] = {}
        #: The instance the last tick found no slot for: the next tick begins there.
        self._resume: tuple[str, str] | None = None

    def run(self) -> None:
        """Look every tick (with jitter, so replicas do not look at the same moment)."""
        while not self.stop_event.wait(self.tick * random.uniform(0.5, 1.5)):  # noqa: S311
            try:
                self.tick_once()
            except TFServerError as e:
                logger.warning("drift schedule: the backend failed: %s", e.detail)

    def tick_once(self) -> int:
        """Start every due check this replica can take now; how many it started."""
        started = 0
        listed = [(m, ws) for m in self.plans for ws in self.instances.workspaces(m)]
        seen = set(listed)
        # Round and round, not from the top each tick: when the slots cannot keep up,
        # the instances listed last (another module's) still get their turn.
        first = listed.index(self._resume) if self._resume in seen else 0
        for module, workspace in listed[first:] + listed[:first]:
            if self.stop_event.is_set():
                return started
            outcome = self._consider(module, workspace, self.plans[module])
            if outcome == "full":
                self._resume = (module, workspace)
                return started
            started += outcome == "started"
        self._resume = None
        for gone in self._next.keys() - seen:  # destroyed meanwhile: its claims go too
            del self._next[gone]
            self.claims.forget(*gone)
        return started

    def _consider(self, module: str, workspace: str, plan: Schedule) -> str:
        """Check one instance: "started", "skipped", "full" (no slot) or "" (not due)."""
        now = self.clock()
        key = (module, workspace)
        if now < self._next.get(key, 0.0):
            return ""
        number, began = period(module, workspace, plan.interval, now)
        checked = self.instances.last_checked(module, workspace)
        # A check dated after now (a damaged report, a clock ahead) is none: else the
        # instance is never due again; the period's claim still keeps it to one check.
        if (checked is not None and began <= checked <= now) or \
                self.claims.claimed(module, workspace, number):
            self._next[key] = began + plan.interval
            return ""
        doc = {"replica": self.replica, "at": now}
        if self.instances.busy(module, workspace):
            if self.claims.claim(module, workspace, number, {**doc, "skipped": "busy"}):
                self.metrics.drift_checks.labels(module, "skipped_busy").inc()
                logger.info("drift schedule: %s/%s is busy; checked next period", module,
                            workspace)
            self._next[key] = began + plan.interval
            return "skipped"
        lease = self.claims.take(self.replica, now)
        if lease is None:
            return "full"
        if not self.claims.claim(module, workspace, number, doc):
            self.claims.release(lease)
            self._next[key] = began + plan.interval
            return ""
        overlap = self.claims.overlaps(module, workspace, number, now)
        if overlap == "starting":  # the earlier period's check: look again next tick
            self.claims.release(lease)
            self.claims.unclaim(module, workspace, number)
            return ""
        if overlap:
            self.claims.release(lease)
            self.claims.note(module, workspace, number, {**doc, "skipped": "busy"})
            self.metrics.drift_checks.labels(module, "skipped_busy").inc()
            logger.info("drift schedule: %s/%s has a check of a neighbouring period; "
                        "checked next period", module, workspace)
            self._next[key] = began + plan.interval
            return "skipped"
        try:
            run_id = self.start_check(module, workspace, plan.reconcile)
        except TFServerError as e:
            self.claims.release(lease)
            self.claims.note(module, workspace, number, {**doc, "skipped": "failed"})
            logger.warning("drift schedule: %s/%s not checked: %s", module, workspace,
                           e.detail)
            return ""
        self.claims.run_of(lease, self.replica, now, run_id)
        self.claims.note(module, workspace, number, {**doc, "run_id": run_id})
        self._next[key] = began + plan.interval
        self.metrics.drift_checks.labels(module, "started").inc()
        logger.info("drift schedule: checking %s/%s, period %d (run %s)", module, workspace,
                    number, run_id, extra={"run_id": run_id})
        return "started"
