"""Fleet upgrades (admin): move many instances of a module to one version, planned first.

`start` dry-runs every chosen instance at the target version (each a saved plan, queued
at once: they run in parallel within TFSERVER_MAX_RUNS) and records, per instance, its
changes, what its plan replaces or destroys, and why it is held back; nothing is applied.
`apply` applies the saved plans in batches of `batch_size` and stops after the first
batch with a failure. An instance whose plan replaces or destroys is held back unless
`allow_replace`. A plan that went stale (the instance changed since) is never applied:
terraform refuses it, and the instance is reported `stale` (preview again).

The record (`upgradestore.py`) is the upgrade's progress: a thread of the replica that
took the request drives it and writes it after every step; any replica reads it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ..auth import Principal
from ..errors import Conflict, FieldError, InvalidInput, TFServerError
from ..module.discover import Module
from ..module.versions import difference, recorded
from ..names import workspace_name
from ..runs.registry import Runs
from ..scrub import Scrubber
from ..storage.base import StateBackend
from ..storage.inputs import Kept
from .catalog import Catalog
from .execute import RunSpec
from .history import History, Submitted
from .rerun import Reruns
from .submit import Submitter
from .upgradestore import Target, UpgradeRequest, UpgradeStore, new_upgrade_id, parse_request

logger = logging.getLogger(__name__)

#: Plan actions that an upgrade holds back unless `allow_replace`.
_REPLACES, _DESTROYS = frozenset({"replace"}), frozenset({"delete"})


class Upgrades:
    """Fleet upgrades: their previews, their applies in batches, their records."""

    def __init__(self, catalog: Catalog, submitter: Submitter, history: History,
                 reruns: Reruns) -> None:
        self.catalog = catalog
        self.backend: StateBackend = catalog.backend
        self.submitter = submitter
        self.history = history
        self.reruns = reruns
        self.runs: Runs = submitter.runs
        #: The longest a run of an upgrade is waited for (its own deadline, and some).
        self.timeout = submitter.config.run_timeout + 60
        self.store = UpgradeStore(self.backend.objects)

    def start(self, principal: Principal, name: str, body: Any) -> dict[str, Any]:
        """Check the request, queue a dry run of every chosen instance and record the
        upgrade (status `planning`); a thread records each plan as it ends."""
        _require_admin(principal)
        served = self.catalog.module(name)
        if not served.versions:
            raise InvalidInput(f"module {name} has no versions to upgrade to", [])
        request = parse_request(served, body)
        doc: dict[str, Any] = {
            "id": new_upgrade_id(), "module": name, "to": request.to.version,
            "status": "planning", "created_at": time.time(), "by": principal.subject,
            "batch_size": request.batch_size, "allow_replace": request.allow_replace,
            "set": sorted(request.values), "instances": [], "events": []}
        submitted: dict[str, Submitted] = {}
        for tenant, instance, kept in self._chosen(principal, served, request):
            entry = {"instance": instance, "tenant": tenant, "status": "planning"}
            doc["instances"].append(entry)
            found = self._plan(principal, served, request, entry, kept)
            if found is not None:
                submitted[instance + "@" + tenant] = found
        _event(doc, "started", count=len(doc["instances"]))
        self.store.put(doc)
        threading.Thread(target=self._previewed, args=(doc, request, submitted),
                         name=f"upgrade-{doc['id'][:8]}", daemon=True).start()
        return doc

    def get(self, principal: Principal, upgrade_id: str, wait: float = 0.0
            ) -> dict[str, Any]:
        """An upgrade's record, as any replica wrote it last; with `wait`, once it is no
        longer planning or applying, or after `wait` seconds (`UpgradeStore.wait`)."""
        _require_admin(principal)
        return self.store.wait(upgrade_id, wait) if wait > 0 else self.store.get(upgrade_id)

    def apply(self, principal: Principal, upgrade_id: str) -> dict[str, Any]:
        """Start applying a previewed upgrade's saved plans (409 unless it is `planned`)."""
        _require_admin(principal)
        doc = self.store.get(upgrade_id)
        if doc.get("status") != "planned" or not self.store.claim_apply(upgrade_id):
            raise Conflict(f"upgrade {upgrade_id} is {doc.get('status')}: only a planned "
                           "upgrade is applied, once", retry_after=0)
        doc["status"] = "applying"
        _event(doc, "applying")
        self.store.put(doc)
        threading.Thread(target=self._applied, args=(principal, doc),
                         name=f"upgrade-{upgrade_id[:8]}", daemon=True).start()
        return doc

    # -- the preview ------------------------------------------------------------------

    def _chosen(self, principal: Principal, served: Module, request: UpgradeRequest
                ) -> list[tuple[str, str, Kept | None]]:
        """(tenant key, instance, kept inputs) of each instance to upgrade: those named
        (400 for one that does not exist), else every one on another version."""
        have = [(ref.tenant or principal.tenant_key, ref.instance)
                for ref in self.catalog.instances(principal, served.name)]
        chosen, missing = [], []
        for target in request.instances or []:
            found = [(t, i) for t, i in have if _names(target, t, i)]
            chosen += [f for f in found if f not in chosen]
            if not found:
                missing.append(target.instance)
        if missing:
            raise InvalidInput(f"module {served.name} has no instance of those names",
                               [FieldError("instances", f"no instance {n!r}")
                                for n in missing])
        read = [(t, i, self.backend.inputs.kept(served.name, workspace_name(t, i)))
                for t, i in (have if request.instances is None else chosen)]
        if request.instances is not None:
            return read
        return [(t, i, kept) for t, i, kept in read
                if recorded(served, kept.version if kept else None).version
                != request.to.version]

    def _plan(self, principal: Principal, served: Module, request: UpgradeRequest,
              entry: dict[str, Any], kept: Kept | None) -> Submitted | None:
        """Queue the dry run of one instance at the target version (None, and the entry
        held back, when its inputs do not fit it or the run is refused)."""
        ws = workspace_name(entry["tenant"], entry["instance"])
        current = recorded(served, kept.version if kept is not None else None)
        target = request.to
        entry["from"] = current.version
        try:
            moved = difference(current, target, kept.inputs if kept else {}, request.values)
        except InvalidInput as e:
            _held(entry, f"its inputs do not fit version {target.version}: " + "; ".join(
                f"{f.field}: {f.message}" for f in e.errors))
            return None
        old = kept.inputs if kept is not None else {}
        inputs = target.fill_reserved(moved.inputs, tenant=entry["tenant"],
                                      instance=entry["instance"])
        # As the instance's own apply filled them (the tenant's name, not its key).
        inputs.update({n: old[n] for n in target.reserved if n in old})
        entry.update(dropped=moved.dropped, added=moved.added, retyped=moved.retyped)
        spec = RunSpec(target, entry["instance"], ws, "plan", inputs, principal,
                       Scrubber(target.secret_values(inputs)),
                       moved={"from": current.version, "to": target.version,
                              "dropped": moved.dropped, "added": moved.added,
                              "retyped": moved.retyped})
        try:
            found = self.submitter.submit(spec, asynchronous=True, idempotency=None,
                                          governed=False)
        except TFServerError as e:
            _held(entry, f"its dry run was refused: {e.detail}")
            return None
        entry["plan_run"] = found.run_id
        return found

    def _previewed(self, doc: dict[str, Any], request: UpgradeRequest,
                   submitted: dict[str, Submitted]) -> None:
        """Wait for every dry run, record what each plans (and why it is held back)."""
        try:
            for entry in doc["instances"]:
                found = submitted.get(entry["instance"] + "@" + entry["tenant"])
                if found is None:
                    continue
                self.history.wait(found, self.timeout)
                record = self.runs.record(found.run_id)
                if record.status != "succeeded":
                    entry["status"] = "failed"
                    entry["problem"] = (record.problem or {}).get("detail", record.status)
                else:
                    _summarise(entry, record.changes or {}, record.planned or [],
                               request.allow_replace)
                _event(doc, entry["status"], instance=entry["instance"])
                self.store.put(doc)
            doc["status"] = "planned"
        except TFServerError as e:
            logger.warning("upgrade %s: preview stopped: %s", doc["id"], e.detail)
            doc["status"], doc["problem"] = "failed", e.detail
        _event(doc, doc["status"])
        self.store.put(doc)

    # -- the apply ----------------------------------------------------------------------

    def _applied(self, principal: Principal, doc: dict[str, Any]) -> None:
        """Apply the saved plans in batches; stop after the first batch with a failure."""
        ready = [e for e in doc["instances"] if e["status"] == "planned"]
        size = int(doc["batch_size"])
        failed: str | None = None
        try:
            for start in range(0, len(ready), size):
                batch = ready[start:start + size]
                failed = self._batch(principal, doc, batch)
                self.store.put(doc)
                if failed is not None:
                    for entry in ready[start + size:]:
                        _held(entry, f"not applied: the upgrade stopped after {failed} "
                                     "failed", status="not_applied")
                    break
            doc["status"] = "failed" if failed else "applied"
        except TFServerError as e:
            logger.warning("upgrade %s: apply stopped: %s", doc["id"], e.detail)
            doc["status"], doc["problem"] = "failed", e.detail
        _event(doc, doc["status"])
        self.store.put(doc)

    def _batch(self, principal: Principal, doc: dict[str, Any],
               batch: list[dict[str, Any]]) -> str | None:
        """Apply one batch's saved plans at once; the first instance that failed."""
        started: list[tuple[dict[str, Any], Submitted]] = []
        for entry in batch:
            try:
                started.append((entry, self.reruns.apply_plan(
                    principal, entry["plan_run"], asynchronous=True)))
                entry["status"] = "applying"
            except Conflict as e:  # expired or used: never applied blind
                _held(entry, f"{e.detail}: preview again", status="stale")
        self.store.put(doc)
        failed: str | None = None
        for entry, found in started:
            self.history.wait(found, self.timeout)
            record = self.runs.record(found.run_id)
            entry["apply_run"] = found.run_id
            problem = (record.problem or {}).get("detail", "")
            if record.status == "succeeded":
                entry["status"] = "applied"
            elif "stale" in problem:
                _held(entry, problem, status="stale")
            else:
                entry["status"], entry["problem"] = "failed", problem or record.status
                failed = failed or entry["instance"]
            _event(doc, entry["status"], instance=entry["instance"])
        return failed


def _require_admin(principal: Principal) -> None:
    """Upgrades are an admin's (with auth off, the one local caller's)."""
    if not principal.all_modules:
        principal.require_admin()


def _names(target: Target, tenant: str, instance: str) -> bool:
    return target.instance == instance and target.tenant in (None, tenant)


def _held(entry: dict[str, Any], why: str, *, status: str = "held") -> None:
    entry["status"], entry["held_back"] = status, why


def _summarise(entry: dict[str, Any], changes: dict[str, int],
               planned: list[dict[str, str]], allow_replace: bool) -> None:
    """An instance's plan as the upgrade shows it, held back if it replaces or destroys."""
    entry["changes"] = changes
    entry["replaced"] = [p["address"] for p in planned if p.get("action") in _REPLACES]
    entry["destroyed"] = [p["address"] for p in planned if p.get("action") in _DESTROYS]
    entry["status"] = "planned"
    if (entry["replaced"] or entry["destroyed"]) and not allow_replace:
        _held(entry, "its plan replaces or destroys resources (allow_replace is false)")


def _event(doc: dict[str, Any], kind: str, **fields: Any) -> None:
    doc["events"].append({"time": time.time(), "type": kind, **fields})


class UpgradeCalls:
    """The facade's upgrade operations (a base of `Service`, which is at its size limit;
    it sets `upgrades`)."""

    upgrades: Upgrades

    def start_upgrade(self, principal: Principal, name: str, body: Any) -> dict[str, Any]:
        """Admin: preview a fleet upgrade (see `Upgrades.start`)."""
        return self.upgrades.start(principal, name, body)

    def upgrade(self, principal: Principal, upgrade_id: str, wait: float = 0.0
                ) -> dict[str, Any]:
        """Admin: an upgrade's record (`wait`: see `Upgrades.get`)."""
        return self.upgrades.get(principal, upgrade_id, wait)

    def apply_upgrade(self, principal: Principal, upgrade_id: str) -> dict[str, Any]:
        """Admin: apply a previewed upgrade in batches (see `Upgrades.apply`)."""
        return self.upgrades.apply(principal, upgrade_id)
