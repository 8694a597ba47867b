"""The run engine's app side: what a queued run's spec holds, and the worker's view of it.

With the `sqs` engine a run is decided on an API replica and run on a worker: its spec
(`RunSpec`: module, instance, inputs, who asked, plan, expiry) is stored beside its record
and read back by the worker, which makes the run's job from it as the API replica would
have (runs/queued.py moves it; this module says what it is).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..auth import Principal
from ..config import Config
from ..errors import NotFound, TFServerError
from ..metrics import Metrics
from ..module.discover import Module
from ..module.versions import recorded
from ..runs.checks import Checks
from ..runs.queued import QueuedRuns
from ..runs.registry import Runs
from ..runs.sqs import SqsQueue
from ..runs.store import RunRecord
from ..scrub import Scrubber
from ..storage.base import StateBackend
from ..terraform.args import build_args
from ..terraform.process import Runner
from ..terraform.workdir import WorkingCopies
from .driftschedule import SCHEDULER
from .execute import RunSpec

logger = logging.getLogger(__name__)


def spec_doc(spec: RunSpec) -> dict[str, Any]:
    """The stored form of a decided run (it holds the inputs: kept like the state)."""
    p = spec.principal
    return {"module": spec.module.name, "instance": spec.instance,
            "workspace": spec.workspace, "operation": spec.operation, "inputs": spec.inputs,
            "principal": {"subject": p.subject, "tenant": p.tenant,
                          "scopes": sorted(p.scopes), "client_id": p.client_id,
                          "admin": p.admin, "all_modules": p.all_modules,
                          "scope_prefix": p.scope_prefix},
            "plan_of": spec.plan_of, "ttl": spec.ttl, "expires": spec.expires,
            "expiry": spec.expiry, "reconcile": spec.reconcile, "cascade": spec.cascade,
            "triggered_by": spec.triggered_by, "version": spec.module.version,
            "moved": spec.moved}


def spec_of(modules: Mapping[str, Module], record: RunRecord, doc: dict[str, Any]) -> RunSpec:
    """The run a stored spec describes (`NotFound` for a module this worker lacks)."""
    served = modules.get(str(doc.get("module")))
    if served is None:
        raise NotFound(f"run {record.id}: this worker does not serve module "
                       f"{str(doc.get('module'))[:64]!r}")
    version = doc.get("version")
    module = recorded(served, version if isinstance(version, str) else None)
    who = doc.get("principal") or {}
    principal = Principal(subject=str(who.get("subject", "")), tenant=str(who.get("tenant", "")),
                          scopes=frozenset(who.get("scopes") or ()),
                          client_id=who.get("client_id"), admin=bool(who.get("admin")),
                          all_modules=bool(who.get("all_modules")),
                          scope_prefix=str(who.get("scope_prefix", "tfserver")))
    inputs = dict(doc.get("inputs") or {})
    return RunSpec(module, record.instance, record.workspace, doc["operation"], inputs,
                   principal, Scrubber(module.secret_values(inputs)), run_id=record.id,
                   plan_of=doc.get("plan_of"), ttl=doc.get("ttl"), expires=doc.get("expires"),
                   expiry=doc.get("expiry"), reconcile=bool(doc.get("reconcile")),
                   cascade=bool(doc.get("cascade")), triggered_by=doc.get("triggered_by"),
                   moved=doc.get("moved"))


def queued_runs(config: Config, runs: Runs, backend: StateBackend, copies: WorkingCopies,
                runner: Runner, metrics: Metrics) -> QueuedRuns:
    """The `sqs` engine over the settings' queue."""
    settings = config.queue
    queue = SqsQueue(settings.url, endpoint=settings.endpoint, region=settings.region)

    def unlock(record: RunRecord, lock_id: str) -> bool:
        """Clear the lock a lost worker's run left (its terraform is past any deadline)."""
        if not lock_id:
            return False
        try:
            wc = copies.ready_any(record.module, record.version)
        except TFServerError as e:
            logger.warning("run %s: its lock not cleared: %s", record.id, e.detail)
            return False
        result = runner.run(build_args("force-unlock", extra=[lock_id]), cwd=wc.path,
                            workspace=record.workspace, timeout=min(config.run_timeout, 120))
        return result.ok

    queued = QueuedRuns(runs, queue, queue_depth=config.queue_depth,
                        resume_lost=settings.resume_lost,
                        lock_of=lambda r: backend.lock_info(r.module, r.workspace),
                        unlock=unlock,
                        stale_lock_after=config.run_timeout + config.kill_grace + 30,
                        on_resumed=lambda _: metrics.resumed.inc(),
                        checks=Checks(runs, scheduled, spare=config.max_drift_checks,
                                      on_preempted=lambda r: metrics.drift_checks.labels(
                                          r.module, "preempted").inc()))
    metrics.watch_queue(lambda: float(queue.depth().waiting), queued.oldest,
                        lambda: float(len([r for r in runs.live()
                                           if r.record.status == "running"])))
    return queued


def scheduled(record: RunRecord) -> bool:
    """Whether the run is a scheduled drift check (driftrun.py starts them as
    `tfserver:schedule`); a `POST .../drift` is a user's run."""
    return record.operation == "drift" and record.subject == SCHEDULER.subject
