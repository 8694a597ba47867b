"""Runs an earlier process left active, as the restarted server records them: whether the
instance's state is still locked, and what terraform did after its server died.

terraform writes its output to files (terraform/follow.py), so it outlives a server that
dies and finishes its run; the files are named after the run, and what they hold is the
run's end, which no server saw. It is added to the run's events and summed up in its
record (the changes, the resources done, and a problem saying the run was lost).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import TFServerError, Unavailable
from ..module.discover import Module
from ..runs.store import RunRecord, RunStore
from ..scrub import Scrubber, scrubbed
from ..storage.base import StateBackend
from ..terraform.follow import leftover, sweep
from ..terraform.output import api_event

logger = logging.getLogger(__name__)


class Leftovers:
    """Told of each leftover run before it is stored `lost` (runs/keeper.py)."""

    def __init__(self, backend: StateBackend, store: RunStore, spool: Path,
                 modules: Mapping[str, Module]) -> None:
        self.backend = backend
        self.store = store
        self.spool = spool
        self.modules = modules

    def __call__(self, record: RunRecord) -> None:
        """Fill in the lost run's record (best effort: a backend error leaves it as is)."""
        try:
            said = leftover(self.spool, record.id)
        except OSError as e:
            logger.warning("run %s: its output files cannot be read: %s", record.id, e)
            said = None
        if said is not None:
            self._what_ran(record, said)
        if record.started_at is None:
            return  # never started: nothing of it ran, nothing holds the state
        try:
            record.state_may_be_locked = self.backend.lock_info(
                record.module, record.workspace) is not None
        except TFServerError as e:
            logger.warning("run %s: its lock cannot be read: %s", record.id, e.detail)
            record.state_may_be_locked = True

    def sweep(self, idle: float) -> None:
        """At start, after the leftover runs were marked lost: remove the output files no
        run will read. A run's go once it is not active, or once its record is gone (a run
        answered at once whose server died before storing it) and they were not written
        for `idle` seconds (the longest a run of a live server sharing the folder lasts)."""
        def ended(run_id: str, age: float) -> bool:
            record = self.store.get(run_id)
            return not record.active if record is not None else age > idle

        try:
            removed = sweep(self.spool, ended)
        except OSError as e:
            logger.warning("the spool folder %s cannot be swept: %s", self.spool, e)
        except TFServerError as e:
            logger.warning("the spool folder is not swept (next start): %s", e.detail)
        else:
            if removed:
                logger.info("removed %d runs' output files that earlier processes left",
                            removed)

    def _scrubber(self, record: RunRecord) -> Callable[[str], str]:
        """Scrubs the secrets of the instance's kept inputs (and the module's defaults)."""
        module = self.modules.get(record.module)
        if module is None:
            return lambda text: text
        try:
            inputs = self.backend.inputs.load(record.module, record.workspace) or {}
        except TFServerError:
            inputs = {}
        return Scrubber(module.secret_values(inputs))

    def _what_ran(self, record: RunRecord, said: list[dict[str, Any]]) -> None:
        events = [e for raw in said if (e := api_event(raw)) is not None]
        done = [e for e in events if e["type"] == "resource" and e.get("phase") == "done"]
        errored = [e for e in events if e["type"] == "resource"
                   and e.get("phase") == "errored"]
        applied = next((raw.get("changes") for raw in reversed(said)
                        if raw.get("type") == "change_summary"
                        and (raw.get("changes") or {}).get("operation") in ("apply", "destroy")),
                       None)
        if record.started_at is None:
            # Its record was not written as started before the server died, but terraform
            # ran (these are its files): it did start.
            record.started_at = record.created_at
        if isinstance(applied, dict):
            record.changes = {k: int(applied.get(k, 0)) for k in ("add", "change", "remove")}
        detail = (f"the server running this run stopped; terraform went on: {len(done)} "
                  f"resource operations done, {len(errored)} failed"
                  + ("" if applied is None else ", and it finished")
                  + ". Read the instance for its state now.")
        record.problem = Unavailable(detail).problem()
        kept = self.store.get_events(record.id)
        seq = max((int(e.get("seq", 0)) for e in kept), default=0)
        added = []
        for event in [*events, {"type": "diagnostic", "severity": "warning",
                                "summary": "the run was lost", "detail": detail}]:
            seq += 1
            added.append({"seq": seq, "time": record.finished_at,
                          **scrubbed(event, self._scrubber(record))})
        try:
            self.store.put_events(record.id, kept + added)
        except TFServerError as e:
            logger.warning("run %s: its last events not stored: %s", record.id, e.detail)
        logger.warning("run %s was lost mid-run; terraform went on: %d done, %d failed",
                       record.id, len(done), len(errored))
