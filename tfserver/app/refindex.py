"""The dependency index of references between instances, in the backend's object store
(so every replica and both run engines see it, and it survives restarts):

    _refs/used-by/<module>/<workspace>/<dep module>.<dep instance>.<variable>.<output>
                                             empty (HCL names and ours hold no dot); when
                                             that name is long, <dep module>.<dep
                                             instance>.~<digest>, its content
                                             {"variable", "output"} (a file name has at
                                             most 255 bytes)
    _refs/uses/<module>/<workspace>.json     {"references": [{"variable", "ref",
                                              "serial", "digest"}]} of its last apply
    _refs/built                              written once the index was built
    _refs/destroying/<module>/<workspace>/<run id>
                                             {"at"}: a destroy of the instance is under
                                             way (one key a run: two replicas' destroys
                                             of one instance never remove each other's)

A dependent's apply writes its entries as it starts (`claim`, with its run id and time)
and then looks for a destroy under way of what it references; a destroy writes its
marker (`mark_destroy`) and then looks for users. Each writes before it reads, so of a
destroy and a dependent's first apply racing, at least one sees the other: the destroy
is refused (409), or the apply waits for it and then fails (400), never strands.

A dependent is always of the source's tenant (a reference names an instance of the
caller's own), so an entry names its instance alone. The kept inputs (`_inputs/`) are the
truth: `rebuild` makes the index again from them (at start when `_refs/built` is missing),
and `users` callers that must be sure (a DELETE) check each entry against them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import TFServerError
from ..module.refs import Ref, RefSyntaxError, is_reference, parse_ref
from ..names import split_workspace, workspace_name, workspace_tenant
from ..storage.base import ObjectStore, json_object

logger = logging.getLogger(__name__)

BUILT = "_refs/built"
#: A claim or a destroy's marker this young is taken for a run under way even when no
#: record of it is found yet (a synchronous run is stored at its first heartbeat).
CLAIM_GRACE = 60.0


@dataclass(frozen=True)
class User:
    """One variable of one instance that references another instance."""

    module: str
    instance: str
    variable: str
    #: The output of the instance used that the variable references.
    output: str


def used_by_folder(module: str, workspace: str) -> str:
    """The folder of an instance's users."""
    return f"_refs/used-by/{module}/{workspace}/"


def uses_key(module: str, workspace: str) -> str:
    """Where a dependent's references of its last apply are."""
    return f"_refs/uses/{module}/{workspace}.json"


def destroying_folder(module: str, workspace: str) -> str:
    """Where the destroys under way of an instance are marked."""
    return f"_refs/destroying/{module}/{workspace}/"


def _uses_of(data: bytes | None) -> list[dict[str, Any]]:
    """The well-formed references of a stored `uses` document ([] if none or damaged)."""
    found = (json_object(data) or {}).get("references")
    return [_use(r) for r in found if _well_formed(r)] if isinstance(found, list) else []


def kept_references(inputs: dict[str, Any] | None) -> Iterator[tuple[str, str]]:
    """(variable, `$ref` text) of each well-formed reference among kept inputs."""
    for name, value in sorted((inputs or {}).items()):
        if is_reference(value):
            try:
                parse_ref(value["$ref"])
            except RefSyntaxError:
                continue
            yield name, value["$ref"]


class RefIndex:
    """Who references whom, kept beside the state."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects

    def uses(self, module: str, workspace: str) -> list[dict[str, Any]]:
        """A dependent's references as its last apply resolved them ([] if none)."""
        return _uses_of(self.objects.get(uses_key(module, workspace)))

    def record(self, module: str, workspace: str, references: list[dict[str, Any]]) -> None:
        """After a dependent's apply: its references now (entries added and dropped)."""
        stored = self.objects.get(uses_key(module, workspace))
        old = {(r.get("variable"), r.get("ref")) for r in _uses_of(stored)}
        new = {(r["variable"], r["ref"]) for r in references}
        for variable, ref in new - old:
            self.objects.put(*self._entry(module, workspace, variable, parse_ref(ref)))
        if references:
            self.objects.put(uses_key(module, workspace),
                             json.dumps({"references": references}).encode())
        elif stored is not None:  # most applies reference nothing: no delete of nothing
            self.objects.delete(uses_key(module, workspace))
        self._drop(module, workspace, old - new)

    def claim(self, module: str, workspace: str, references: list[tuple[str, Any]], *,
              run_id: str, at: float) -> None:
        """At the start of a dependent's apply (run `run_id`, at `at`), before it reads
        what it references: the entries of its references (variable, `$ref`), so that a
        destroy of a referenced instance starting meanwhile finds it in use (its kept
        inputs are not written yet: `Dependents.users` keeps an entry of an instance
        being applied, or claimed within `CLAIM_GRACE`)."""
        for variable, text in references:
            try:
                src = parse_ref(text)
            except RefSyntaxError:
                continue
            key, data = self._entry(module, workspace, variable, src)
            doc = {**(json_object(data) or {}), "run_id": run_id, "at": at}
            self.objects.put(key, json.dumps(doc).encode())

    def fresh(self, module: str, workspace: str, user: User, now: float) -> bool:
        """True when an apply of `user`'s instance claimed its entry as it started,
        within CLAIM_GRACE: it is under way, even with no record stored yet (another
        replica's synchronous run)."""
        doc = json_object(self.objects.get(used_by_folder(module, workspace) + _name(user)[0]))
        at = (doc or {}).get("at")
        return isinstance(at, int | float) and abs(now - at) < CLAIM_GRACE

    def mark_destroy(self, module: str, workspace: str, run_id: str, at: float) -> None:
        """A destroy of the instance starts (before it looks for users)."""
        self.objects.put(destroying_folder(module, workspace) + run_id,
                         json.dumps({"at": at}).encode())

    def unmark_destroy(self, module: str, workspace: str, run_id: str) -> None:
        """The destroy `run_id` of the instance ended (however it ended)."""
        self.objects.delete(destroying_folder(module, workspace) + run_id)

    def unmark_destroys(self, module: str, workspace: str) -> None:
        """The instance was destroyed: every mark of a destroy of it goes."""
        folder = destroying_folder(module, workspace)
        for run_id in self.objects.keys(folder):
            self.objects.delete(folder + run_id)

    def under_way(self, module: str, workspace: str,
                  active: Callable[[str], bool | None]) -> bool:
        """A destroy of the instance is under way: a mark whose run is `active` (None:
        no record of it found, then it counts while the mark is younger than
        CLAIM_GRACE). A mark of a run that ended, or was lost, counts for nothing, and
        goes once that old (a crash's)."""
        found = False
        for run_id, at in self.destroys_of(module, workspace):
            alive = active(run_id)
            if alive is None:
                alive = time.time() - at < CLAIM_GRACE  # its record not stored yet
            found = found or alive
            if not alive and time.time() - at >= CLAIM_GRACE:
                with contextlib.suppress(TFServerError):  # tried again by the next look
                    self.unmark_destroy(module, workspace, run_id)
        return found

    def destroys_of(self, module: str, workspace: str) -> list[tuple[str, float]]:
        """(run id, when it started) of each destroy of the instance marked under way
        (a damaged mark is dated 0: long past)."""
        folder, found = destroying_folder(module, workspace), []
        for run_id in self.objects.keys(folder):
            at = (json_object(self.objects.get(folder + run_id)) or {}).get("at")
            found.append((run_id, float(at) if isinstance(at, int | float) else 0.0))
        return found

    def forget(self, module: str, workspace: str) -> None:
        """A dependent destroyed or orphaned: its entries go."""
        old = {(r.get("variable"), r.get("ref")) for r in self.uses(module, workspace)}
        self._drop(module, workspace, old)
        self.objects.delete(uses_key(module, workspace))

    def users(self, module: str, workspace: str) -> list[User]:
        """The instance's users as the index lists them (every page)."""
        folder, found, after = used_by_folder(module, workspace), [], ""
        while True:
            names = self.objects.keys(folder, start_after=after, limit=1000)
            for name in names:
                parts = name.split(".")
                if len(parts) == 4:
                    found.append(User(*parts))
                elif len(parts) == 3 and parts[2].startswith("~"):
                    long = self._long(folder + name, parts[0], parts[1])
                    if long is not None:
                        found.append(long)
            if len(names) < 1000:
                return found
            after = names[-1]

    def rebuild(self, modules: Iterable[str], kept: Any) -> int:
        """Make the index again from every kept input of the modules (`kept`: the
        backend's `KeptInputs`); how many references it holds."""
        count = 0
        for module in modules:
            for name in self.objects.keys(f"_inputs/{module}/", limit=100000):
                ws = name.removesuffix(".json")
                if split_workspace(ws) is None:
                    continue
                try:
                    count += self.reindex(module, ws, kept, anew=True)
                except TFServerError as e:
                    logger.warning("references of %s/%s not indexed: %s", module, ws,
                                   e.detail)
        self.objects.put(BUILT, b"1")
        return count

    def reindex(self, module: str, workspace: str, kept: Any, *, anew: bool = False) -> int:
        """An instance's entries made to match its kept inputs (what its last apply that
        changed something kept); what a reference's last apply resolved stays. `anew`:
        every entry written again. How many references it has."""
        refs = [{"variable": v, "ref": r, "serial": None, "digest": None}
                for v, r in kept_references(kept.load(module, workspace))]
        applied = {(r.get("variable"), r.get("ref")): r for r in self.uses(module, workspace)}
        refs = [applied.get((r["variable"], r["ref"]), r) for r in refs]
        if anew:
            self.objects.delete(uses_key(module, workspace))
        self.record(module, workspace, refs)
        return len(refs)

    def drop(self, module: str, workspace: str, user: User) -> None:
        """Remove one entry of an instance's users (one its user's inputs no longer back)."""
        self.objects.delete(used_by_folder(module, workspace) + _name(user)[0])

    def _drop(self, module: str, workspace: str, gone: set[tuple[Any, Any]]) -> None:
        for variable, ref in gone:
            try:
                src = parse_ref(ref)
            except RefSyntaxError:
                continue
            self.objects.delete(self._entry(module, workspace, str(variable), src)[0])

    def _long(self, key: str, module: str, instance: str) -> User | None:
        """The user a long entry's content names (None when it is damaged, or gone)."""
        doc = json_object(self.objects.get(key)) or {}
        variable, output = doc.get("variable"), doc.get("output")
        if not (isinstance(variable, str) and isinstance(output, str)) or \
                _name(User(module, instance, variable, output))[0] != key.rpartition("/")[2]:
            return None
        return User(module, instance, variable, output)

    @staticmethod
    def _entry(dep_module: str, dep_workspace: str, variable: str, src: Ref
               ) -> tuple[str, bytes]:
        """The entry, under the instance `src` names, of a dependent's variable, and its
        content."""
        user = User(dep_module, dep_workspace.partition(".")[2], variable, src.output)
        name, data = _name(user)
        return used_by_folder(src.module, workspace_name(workspace_tenant(dep_workspace),
                                                         src.instance)) + name, data


def _well_formed(entry: Any) -> bool:
    """True for an entry of `uses` whose variable and reference are text (a damaged one,
    wrong types in it, is left out: `reindex` writes it again from the kept inputs)."""
    return isinstance(entry, dict) and isinstance(entry.get("variable"), str) and \
        isinstance(entry.get("ref"), str)


def _use(entry: dict[str, Any]) -> dict[str, Any]:
    """An entry of `uses` with a serial that is a number and a digest that is text, or
    None (what a damaged one holds instead is not shown, nor compared)."""
    serial, found = entry.get("serial"), entry.get("digest")
    return {"variable": entry["variable"], "ref": entry["ref"],
            "serial": serial if isinstance(serial, int) and not isinstance(serial, bool)
            else None, "digest": found if isinstance(found, str) else None}


#: The longest entry name made of the names themselves (a file name has 255 bytes).
_NAME_MAX = 200


def _name(user: User) -> tuple[str, bytes]:
    """An entry's name and content: the four names, or when they are too long together,
    the dependent's two and a digest of the variable and output, which the content
    holds."""
    full = f"{user.module}.{user.instance}.{user.variable}.{user.output}"
    if len(full.encode()) <= _NAME_MAX:
        return full, b""
    digest = hashlib.sha256(f"{user.variable}\0{user.output}".encode()).hexdigest()[:32]
    return (f"{user.module}.{user.instance}.~{digest}",
            json.dumps({"variable": user.variable, "output": user.output}).encode())
