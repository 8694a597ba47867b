"""A run's workspace after the run: deleted once a destroy emptied it, and after a create
that failed, was canceled or killed, what it made expires as the create asked, or the
empty state it left (a phantom, see `holds_instance`) is deleted."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import TFServerError
from ..runs.expiry import Expiries
from ..storage.base import StateBackend
from ..terraform.args import build_args
from ..terraform.output import Failure, RunResult
from ..terraform.process import Runner

if TYPE_CHECKING:
    from .execute import RunSpec

logger = logging.getLogger(__name__)

#: Seconds the removal of a phantom's workspace may take (its run's deadline may be past).
PHANTOM_TIMEOUT = 30.0


class Workspaces:
    """Deletes emptied workspaces and settles what failed creates left."""

    def __init__(self, runner: Runner, backend: StateBackend, expiries: Expiries, *,
                 lock_wait: float) -> None:
        self.runner = runner
        self.backend = backend
        self.expiries = expiries
        self.lock_wait = lock_wait

    def failed_create(self, spec: RunSpec, result: RunResult, cwd: Path) -> None:
        """A create that failed, was canceled or killed: what it made expires as the
        create asked (canceling a create once its costly part exists keeps nothing
        forever), and an empty state it left is removed. Never raises: the run's own
        error is the answer."""
        if result.failure in (Failure.LOCKED, Failure.INTERRUPTED):
            return  # another run holds the state, or the server is stopping
        name, ws = spec.module.name, spec.workspace
        try:
            if not self.backend.exists(name, ws):
                self.drop_phantom(spec, cwd)
            elif spec.ttl is not None:
                self.expiries.set(name, ws, time.time() + spec.ttl)
        except TFServerError as e:
            logger.warning("what the failed create of %s/%s left is not settled: %s", name,
                           spec.instance, e.detail, extra={"run_id": spec.run_id})

    def drop_phantom(self, spec: RunSpec, cwd: Path) -> None:
        """Delete the workspace when its state holds no instance; terraform takes the
        state lock for it, so a state another run is making (or a lock a killed run
        left) keeps it."""
        if self.backend.phantom(spec.module.name, spec.workspace):
            self.delete_workspace(spec, cwd, PHANTOM_TIMEOUT)

    def delete_workspace(self, spec: RunSpec, cwd: Path, timeout: float) -> None:
        """`terraform workspace delete` (a failure is logged: the state holds nothing)."""
        result = self.runner.run(
            build_args("workspace delete", lock_timeout=self.lock_wait,
                       extra=[spec.workspace]),
            cwd=cwd, workspace="default", timeout=timeout)
        if not result.ok:
            logger.warning("workspace %s of %s not deleted: %s", spec.workspace,
                           spec.module.name, spec.scrub(result.stderr.strip())[-500:],
                           extra={"run_id": spec.run_id})
