"""Drift checks: a run of operation `drift` (`terraform plan -refresh-only`) with the
instance's kept inputs, its findings kept beside the instance as names only
(`driftstore.py`), and the apply that reconciles a drifted instance when asked.

The check is a run like any other (lanes, records, events, cancel, idempotency, both
engines); `Submitter.job` hands a `drift` spec here instead of to `Executor.execute`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

from ..auth import Principal
from ..errors import NotFound
from ..scrub import Scrubber
from ..terraform.args import build_args
from ..terraform.drift import DriftChange, plan_drift, stream_drift
from ..terraform.output import EventSink
from ..terraform.process import RunControl, time_left
from .catalog import Catalog, target_workspace
from .driftstore import DriftReport, DriftReports
from .execute import Checked, Executor, RunSpec, problem_for

logger = logging.getLogger(__name__)

#: Who a reconciling apply is by (its record and audit line name it).
RECONCILER = "tfserver:drift"


def drift_spec(catalog: Catalog, principal: Principal, name: str, instance: str,
               tenant: str | None, reconcile: bool) -> RunSpec:
    """The drift check of an existing instance the caller may write (404 for none); the
    inputs are read when it runs."""
    m = catalog.module(name)
    principal.require(name, "write")
    ws = target_workspace(principal, instance, tenant)
    if not catalog.backend.exists(name, ws):
        raise NotFound(f"module {name} has no instance {instance!r}")
    return RunSpec(m, instance, ws, "drift", {}, principal, Scrubber(m.secret_values({})),
                   reconcile=reconcile)


def reconcile_spec(check: RunSpec) -> RunSpec:
    """The apply of a drifted instance's kept inputs, by `tfserver:drift`."""
    who = dataclasses.replace(check.principal, subject=RECONCILER)
    return RunSpec(check.module, check.instance, check.workspace, "apply", check.inputs, who,
                   check.scrub)


class DriftCheck:
    """Runs drift checks with the executor's terraform, working copies and var files."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.reports = DriftReports(executor.backend.objects)

    def check(self, spec: RunSpec, control: RunControl | None = None,
              on_event: EventSink | None = None) -> Checked:
        """Plan `-refresh-only` with the kept inputs, read which attributes drifted from
        the saved plan (names only), and keep the report beside the instance."""
        x, name, ws = self.executor, spec.module.name, spec.workspace
        deadline = time.monotonic() + x.run_timeout
        wc = x.copies.ready(spec.module.copy_key)
        if not x.backend.exists(name, ws):
            raise NotFound(f"module {name} has no instance {spec.instance!r}")
        spec.inputs = x.backend.inputs.load(name, ws) or {}
        spec.scrub = Scrubber(spec.module.secret_values(spec.inputs))
        x.resolve(spec)  # references among the kept inputs (app/references.py)
        with x.var_files.file(spec.values or spec.inputs) as var_file:
            plan_file = var_file.with_suffix(".tfplan")
            try:
                result = x.terraform.run(
                    build_args("plan", refresh_only=True, var_file=var_file,
                               lock_timeout=x.lock_wait, plan_out=plan_file),
                    name, ws, spec.run_id, cwd=wc.path, deadline=deadline,
                    control=control, on_event=on_event)
                if not result.ok:
                    raise problem_for(result, spec.scrub, spec.instance, x.run_timeout)
                found = stream_drift(result.events)
                if found:  # which attributes: only the saved plan knows
                    found = self._attributes(spec, plan_file, deadline) or found
            finally:
                plan_file.unlink(missing_ok=True)
        report = DriftReport("drifted" if found else "in_sync", time.time(), spec.run_id,
                             [_shown(c, spec.scrub) for c in found])
        self.reports.put(name, ws, report)
        logger.info("drift check of %s/%s: %s (%d resources)", name, spec.instance,
                    report.status, len(found), extra={"run_id": spec.run_id})
        return Checked(name, spec.instance, result.changes, spec.run_id, report.as_dict())

    def reconciled(self, checked: Checked, spec: RunSpec, run_id: str) -> Checked:
        """Link the check to the apply that reconciles it (in its report too)."""
        drift = {**checked.drift, "reconciled_by": run_id}
        self.reports.put(spec.module.name, spec.workspace, DriftReport(**drift))
        return dataclasses.replace(checked, drift=drift, reconciled_by=run_id)

    def _attributes(self, spec: RunSpec, plan_file: Any,
                    deadline: float) -> list[DriftChange]:
        """The drift the saved plan records, with attribute names; none when it cannot
        be read (the stream's addresses stand). The JSON holds values: it is parsed here
        and dropped, never logged."""
        x = self.executor
        shown = x.runner.run(build_args("show", plan_file=plan_file),
                             cwd=x.copies.ready(spec.module.copy_key).path,
                             workspace=spec.workspace, timeout=time_left(deadline),
                             label=spec.run_id)
        if not shown.ok:
            logger.warning("drift of %s/%s: the saved plan could not be read (exit %d)",
                           spec.module.name, spec.instance, shown.returncode,
                           extra={"run_id": spec.run_id})
            return []
        try:
            plan = json.loads(shown.stdout)
        except ValueError:
            return []
        return plan_drift(plan) if isinstance(plan, dict) else []


def _shown(change: DriftChange, scrub: Scrubber) -> dict[str, Any]:
    """A change as stored and shown: its address scrubbed like any text of a run."""
    return {**change.as_dict(), "address": scrub(change.address),
            "attributes": [scrub(a) for a in change.attributes]}

