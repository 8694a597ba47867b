"""Approvals (DESIGN: Approvals, retry, orphan): with `require_approval` in the policy,
an apply or destroy first plans (a saved plan, under the run's own id), then waits in
`awaiting_approval` holding its instance's lane (runs/parked.py); `approve` applies
exactly that plan, `reject` ends it `rejected`, and unanswered for TFSERVER_PLAN_TTL it
ends `expired`.

Each run is answered once: the answer is written with a create-if-absent write
(`_runs/answers/<id>`), so two approvals, or an approval and a cancel, racing on any
replicas make exactly one of them happen. What the approved apply needs (its spec, the
inputs included) is kept beside the record (`_runs/awaiting/<id>.json`, stored like the
state), so a server killed while a run awaits finds it again at start: still awaiting,
its lane held, or ended `expired` when its plan's time passed meanwhile.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..auth import Principal
from ..errors import Conflict, Forbidden, NotFound, TFServerError, Unavailable
from ..module.discover import Module
from ..runs.parked import Awaiting
from ..runs.registry import Runs
from ..runs.run import Run
from ..runs.store import AWAITING, RunRecord, rfc3339
from ..scrub import Scrubber
from ..storage.base import json_object
from ..terraform.output import EventSink
from ..terraform.process import RunControl
from .engine import spec_doc, spec_of
from .execute import Executor, Operation, Planned, RunSpec
from .history import History, Submitted

if TYPE_CHECKING:  # submit.py imports this module
    from .submit import Submitter

logger = logging.getLogger(__name__)

#: The plan each operation that may need an approval makes first.
PLANS: Mapping[str, Operation] = {"apply": "plan", "destroy": "plan-destroy"}
#: Who expires a run nobody answered, in its record and audit line.
PLAN_TTL = "tfserver:plan-ttl"
#: The longest the expiry thread sleeps (it finds a run parked meanwhile by then).
_TICK = 1.0
#: How often the runs parked here are checked for an answer another replica gave.
_ELSEWHERE_EVERY = 2.0
#: How often the store is swept for runs another replica left awaiting past their time.
_SWEEP_EVERY = 30.0

Job = Callable[[Run, RunSpec, RunControl], Any]


def _nothing() -> None:
    """Nothing to give back."""


def _readmitted(approvals: Approvals, record: RunRecord) -> RunSpec | None:
    """What an approved run taken back at a restart applies (None: not kept), its run
    slot taken again first if the restart lost it (`Governance.readmitted`)."""
    spec = approvals._kept(record)
    if spec is not None:
        approvals.governance.readmitted(record, spec.principal)
    return spec


def awaiting_key(run_id: str) -> str:
    """Where an awaiting run's apply spec is kept."""
    return f"_runs/awaiting/{run_id}.json"


def answer_key(run_id: str) -> str:
    """Where a run's one answer is written."""
    return f"_runs/answers/{run_id}"


def approval_of(spec: RunSpec, require: bool, separate: bool) -> dict[str, Any] | None:
    """The record's `approval` of a run the policy makes wait (None: it runs at once);
    marks the spec so. A saved plan's apply never waits here (`Reruns` refuses it)."""
    if not require or spec.operation not in PLANS or spec.plan_of is not None:
        return None
    spec.approval = True
    return {"separate_approver": separate, "planned_by": spec.principal.subject,
            "expires_at": None, "answer": None, "answered_by": None, "answered_at": None}


def plan_first(executor: Executor, run: Run, spec: RunSpec, control: RunControl,
               on_event: EventSink) -> Awaiting:
    """What a run that needs an approval does first: plan (the plan saved under the
    run's id), keep what its apply needs, and park (the plan summary in its event)."""
    plan = replace(spec, operation=PLANS[spec.operation], approval=False)
    outcome = executor.execute(plan, control=control, on_event=on_event)
    spec.inputs, spec.scrub = plan.inputs, plan.scrub  # a destroy's, read by its plan
    spec.references = plan.references  # resolved for the plan: the record names them
    meta = executor.store.plan_meta(spec.run_id)
    if not isinstance(outcome, Planned) or meta is None:
        raise Unavailable("the plan could not be kept for its approval; try again",
                          retry_after=5)
    expires_at = float(meta.get("expires_at", 0))
    then = replace(spec, plan_of=spec.run_id, approval=False)
    executor.store.objects.put(awaiting_key(spec.run_id), json.dumps(
        {"spec": spec_doc(then), "expires_at": expires_at}).encode())
    record = run.record
    record.changes, record.planned = outcome.changes, outcome.planned
    record.approval = {**(record.approval or {}), "expires_at": expires_at}
    return Awaiting({"changes": outcome.changes, "planned": outcome.planned,
                     "expires_at": rfc3339(expires_at)})


def _answered_elsewhere(approvals: Approvals) -> None:
    """Let go the runs parked here that another replica answered: it took the run on
    (`approve` there revives it), so this replica's lane of the instance is freed."""
    for run in approvals.runs.live():
        if run.record.status != AWAITING:
            continue
        try:
            answered = approvals.objects.get(answer_key(run.record.id)) is not None
        except TFServerError as e:
            logger.warning("run %s: its answer not read now: %s", run.record.id, e.detail)
            return
        with approvals._mutex:  # this replica's own answers change the status first
            if answered and run.record.status == AWAITING \
                    and approvals.runs.local(run.record.id) is run:
                logger.info("run %s was answered on another replica", run.record.id)
                approvals.runs.let_go(run)


def _sweep(approvals: Approvals) -> bool:
    """Expire the runs other replicas left awaiting past their time: a replica gone
    for good (a new host name after a deploy) never does, nor recovers them. False when
    none was found awaiting (nor answered, nor unreadable)."""
    try:
        names = approvals.objects.keys("_runs/awaiting/", limit=100_000)
        for name in names:
            run_id = name.removesuffix(".json")
            if approvals.runs.local(run_id) is not None:
                continue  # the expiry loop has it
            record = approvals.store.get(run_id)
            if record is not None and record.status == AWAITING and float(
                    (record.approval or {}).get("expires_at") or 0) <= approvals.clock():
                approvals.expire(run_id)
    except TFServerError as e:
        logger.warning("runs awaiting approval elsewhere not swept now: %s", e.detail)
        return True
    return bool(names)


class Approvals:
    """Answers to runs awaiting approval, their expiry, and their return after a start."""

    def __init__(self, runs: Runs, history: History, submitter: Submitter, *,
                 gated: bool = True, clock: Callable[[], float] = time.time) -> None:
        self.runs = runs
        self.store = runs.store
        self.objects = runs.store.objects
        self.history = history
        self.modules: Mapping[str, Module] = submitter.modules
        #: What an approved run does: the submitter's job with the apply's spec.
        self.job: Job = submitter.job
        #: An approved run's run slot taken again (a parked run holds none).
        self.governance = submitter.governance
        self.clock = clock
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        #: The store is this server's alone: no other replica answers its runs.
        self._alone = False
        #: Some policy table requires approvals; without, the sweep of other replicas'
        #: leftovers stops once one found none (`_sweep`: a LIST a round on a bucket).
        self.gated = gated
        self._left_awaiting = True
        self._thread = threading.Thread(target=self._expire_loop, name="approvals",
                                        daemon=True)

    def start(self, *, every_replica: bool = False) -> None:
        """Bring back the runs a stopped server left awaiting (`every_replica`: the store
        is this server's alone); then expire on time. Called before `Runs.start` marks
        leftovers lost: an approved run whose apply never began is taken back first."""
        self._alone = every_replica
        try:
            self.recover(every_replica=every_replica)
        except TFServerError as e:
            logger.error("runs awaiting approval not recovered: %s", e.detail)
        self._thread.start()

    def stop(self) -> None:
        """Stop the expiry thread (awaiting runs stay stored, found at the next start)."""
        self._stop.set()
        self._wake.set()

    # -- answers --------------------------------------------------------------------------

    def approve(self, principal: Principal, run_id: str) -> Submitted:
        """Apply exactly the run's saved plan (see `_answerable` for who may); 409 once
        answered, expired or stale (the apply then fails as a stale saved plan does)."""
        record = self._answerable(principal, run_id, approving=True)
        spec = self._kept(record)
        # The run slot is taken (429) before the answer is written: refused, it awaits.
        release = self.governance.resumed(record, spec.principal) if spec else _nothing
        try:
            with self._mutex:
                self._claim(record, "approved", principal.subject)
                run = self.runs.local(run_id) or self._revive(record)
                self._resume(run, principal.subject, spec)
        except BaseException:
            release()
            raise
        return Submitted(run_id, run)

    def reject(self, principal: Principal, run_id: str) -> RunRecord:
        """End the run `rejected`: its plan is dropped, its lane freed."""
        record = self._answerable(principal, run_id, approving=False)
        with self._mutex:
            self._claim(record, "rejected", principal.subject)
            self._end(record, "rejected", f"the run was rejected by {principal.subject}")
        return self.runs.record(run_id)

    def cancel(self, principal: Principal, run_id: str, *, force: bool) -> RunRecord:
        """Cancel a run (`History.cancel`); one awaiting approval ends `canceled` at once,
        unless an answer came first."""
        record = self.history.record(principal, run_id)
        principal.require(record.module, "write")
        with self._mutex:
            record = self.runs.record(run_id)
            if record.status == AWAITING and self._claim(record, "canceled",
                                                         principal.subject, strict=False):
                self._end(record, "canceled", "the run was canceled while it awaited "
                                              "approval")
                return self.runs.record(run_id)
            run = self.runs.local(run_id)
            if run is not None and run.record.status == AWAITING:
                self.runs.let_go(run)  # answered on another replica: the cancel is its
        return self.history.cancel(principal, run_id, force=force)

    def _answerable(self, principal: Principal, run_id: str, *, approving: bool
                    ) -> RunRecord:
        """The run, if the caller may answer it now: 404 for another tenant's, 403
        without the module's approve scope (or admin), or approving one's own run under
        `separate_approver`; 409 when it does not await an approval."""
        record = self.history.record(principal, run_id)
        if not principal.admin:
            principal.require(record.module, "approve")
        if record.status != AWAITING or record.approval is None:
            raise Conflict(f"run {record.id} is {record.status}: only a run awaiting "
                           "approval is approved or rejected", retry_after=0)
        if approving and record.approval.get("separate_approver") \
                and principal.subject == record.subject:
            raise Forbidden(f"module {record.module} needs a separate approver: run "
                            f"{record.id} is {principal.subject}'s own")
        if float(record.approval.get("expires_at") or 0) <= self.clock():
            self.expire(record.id)
            raise Conflict(f"run {record.id} expired: nobody approved it within "
                           "TFSERVER_PLAN_TTL; plan it again", retry_after=0)
        return record

    def _claim(self, record: RunRecord, answer: str, by: str, *, strict: bool = True
               ) -> bool:
        """Write the run's one answer; False (or `Conflict` when `strict`) when it was
        answered already."""
        doc = {"answer": answer, "by": by, "at": self.clock()}
        if self.objects.put_new(answer_key(record.id), json.dumps(doc).encode()):
            return True
        if strict:
            raise Conflict(f"run {record.id} was answered already", retry_after=0)
        return False

    def _kept(self, record: RunRecord) -> RunSpec | None:
        """What the run's apply needs, as kept beside it (None: damaged, not kept, or its
        module not served here)."""
        kept = (json_object(self.objects.get(awaiting_key(record.id))) or {}).get("spec")
        try:
            spec = spec_of(self.modules, record, kept) if isinstance(kept, dict) else None
        except (TFServerError, KeyError, TypeError, ValueError):
            return None
        return spec if spec is not None and spec.plan_of == record.id else None

    def _resume(self, run: Run, by: str, spec: RunSpec | None = None) -> None:
        """Queue the approved run first on its lane, its job the apply of its plan (read
        from what was kept, unless given)."""
        spec = spec or self._kept(run.record)
        if spec is None:
            self._end(run.record, "failed", "what the approved apply needs was not kept")
            raise Conflict(f"run {run.record.id}: what its apply needs was not kept; "
                           "plan it again", retry_after=0)
        self._answered(run.record, "approved", by)
        control = RunControl()

        def apply(r: Run) -> Any:
            # Kept until the apply begins: a server killed while the approved run waits
            # for a slot takes it back at start (`recover`); once begun, never again.
            self.objects.delete(awaiting_key(r.record.id))
            return self.job(r, spec, control)

        self.runs.resume(run, apply, control, by=by)

    def _answered(self, record: RunRecord, answer: str, by: str) -> None:
        record.approval = {**(record.approval or {}), "answer": answer, "answered_by": by,
                           "answered_at": self.clock()}

    def _end(self, record: RunRecord, status: str, detail: str) -> None:
        """End an awaiting run here (`rejected`, `expired`, `canceled`, `failed`)."""
        run = self.runs.local(record.id) or self._revive(record)
        answer = json_object(self.objects.get(answer_key(record.id))) or {}
        self._answered(run.record, str(answer.get("answer") or status),
                       str(answer.get("by") or PLAN_TTL))
        self.runs.end_waiting(run, status, detail)
        self.store.drop_plan(record.id)
        self.objects.delete(awaiting_key(record.id))

    # -- expiry and recovery ------------------------------------------------------------

    def expire(self, run_id: str) -> None:
        """End an awaiting run nobody answered within its plan's lifetime `expired`."""
        with self._mutex:
            try:
                record = self.runs.record(run_id)
            except NotFound:
                return
            if record.status == AWAITING and self._claim(record, "expired", PLAN_TTL,
                                                         strict=False):
                self._end(record, "expired", "nobody approved the run within "
                                             "TFSERVER_PLAN_TTL")

    def _expire_loop(self) -> None:
        checked = swept = 0.0
        while not self._stop.is_set():
            now = self.clock()
            if not self._alone and now - checked >= _ELSEWHERE_EVERY:
                checked = now
                _answered_elsewhere(self)
            if not self._alone and now - swept >= _SWEEP_EVERY and (
                    self.gated or self._left_awaiting):
                swept = now
                self._left_awaiting = _sweep(self)
            due = [(float((r.record.approval or {}).get("expires_at") or 0), r.record.id)
                   for r in self.runs.live() if r.record.status == AWAITING]
            for at, run_id in due:
                if at <= now:
                    try:
                        self.expire(run_id)
                    except TFServerError as e:
                        logger.warning("run %s not expired yet: %s", run_id, e.detail)
            soonest = min((at - now for at, _ in due if at > now), default=_TICK)
            self._wake.wait(max(0.05, min(soonest, _TICK)))
            self._wake.clear()

    def recover(self, *, every_replica: bool = False) -> None:
        """Hold again the runs an earlier start of this server left awaiting (their lane
        taken first), expire those past their time, and go on with those approved
        before the stop whose apply never began (stored `queued`, their spec still kept:
        it goes when the apply begins)."""
        for name in self.objects.keys("_runs/awaiting/", limit=100_000):
            run_id = name.removesuffix(".json")
            record = self.store.get(run_id)
            if record is None or record.status not in (AWAITING, "queued") or (
                    record.status == "queued" and record.approval is None):
                self.objects.delete(awaiting_key(run_id))  # it went on or ended
            elif record.replica == self.runs.replica or every_replica:
                try:
                    with self._mutex:
                        self._recover(record)
                except TFServerError as e:  # the others are recovered all the same
                    logger.error("run %s awaiting approval not recovered: %s", run_id,
                                 e.detail)

    def _recover(self, record: RunRecord) -> None:
        """One run found awaiting at start (see `recover`)."""
        if float((record.approval or {}).get("expires_at") or 0) <= self.clock():
            self._claim(record, "expired", PLAN_TTL, strict=False)
        answer = json_object(self.objects.get(answer_key(record.id)))
        if record.status != AWAITING and (answer or {}).get("answer") != "approved":
            self.objects.delete(awaiting_key(record.id))  # not approved: marked lost
            return
        run = self._revive(record)
        if answer is None:
            logger.info("run %s awaits its approval still", record.id)
        elif answer.get("answer") == "approved":
            self._resume(run, str(answer.get("by")), _readmitted(self, record))
        else:
            status = str(answer.get("answer"))
            self._end(record, status if status in ("rejected", "canceled") else "expired",
                      f"the run was {status} while the server was stopped")

    def _revive(self, record: RunRecord) -> Run:
        """A stored awaiting run held here (its job is set once it is approved)."""
        doc = json_object(self.objects.get(awaiting_key(record.id))) or {}
        module = self.modules.get(record.module)
        inputs = dict((doc.get("spec") or {}).get("inputs") or {})
        secrets = module.secret_values(inputs) if module is not None else []
        scrub = Scrubber(secrets)
        record.replica = self.runs.replica  # held, and run once approved, here now
        run = Run(record, _unapproved, lambda text: scrub(text), RunControl())
        self.runs.hold(run, f"instance {record.instance!r} of module {record.module}")
        return run


def _unapproved(run: Run) -> Any:
    """The job of a run held again before its approval: never started."""
    raise Conflict(f"run {run.record.id} was not approved", retry_after=0)


class ApprovalCalls:
    """The facade's approval operations (a base of `Service`, which is at its size
    limit; it sets `approvals`)."""

    approvals: Approvals

    def approve(self, principal: Principal, run_id: str) -> Submitted:
        """Apply exactly the saved plan of a run awaiting approval (see `Approvals`)."""
        return self.approvals.approve(principal, run_id)

    def reject(self, principal: Principal, run_id: str) -> RunRecord:
        """End a run awaiting approval `rejected` (see `Approvals`)."""
        return self.approvals.reject(principal, run_id)
