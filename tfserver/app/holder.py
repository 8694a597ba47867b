"""Which run holds an instance's state lock, as the run store knows it (a failed run's
problem names it: `execute.problem_for`)."""

from __future__ import annotations

import logging

from ..errors import TFServerError
from ..names import workspace_tenant
from ..runs.store import RunStore

logger = logging.getLogger(__name__)


def lock_holder(store: RunStore, module: str, workspace: str, run_id: str, *,
                elsewhere_than: str | None = None) -> str | None:
    """The run that holds the instance's state lock: another of its runs that some
    replica holds now; None when the store knows none (terraform run by hand, or a
    killed run's leftover lock). `elsewhere_than` (a replica that holds the instance's
    lane) leaves out its own runs: one of them that is stored active has ended (its
    last write follows its answer) or is parked."""
    tenant = workspace_tenant(workspace)
    try:
        for t, mod, other in store.active():
            if t != tenant or mod != module or other == run_id:
                continue
            record = store.get(other)
            if record is not None and record.workspace == workspace and (
                    elsewhere_than is None or record.replica != elsewhere_than):
                return other
    except TFServerError as e:
        logger.warning("the run holding %s/%s not found: %s", module,
                       workspace.partition(".")[2], e.detail, extra={"run_id": run_id})
    return None
