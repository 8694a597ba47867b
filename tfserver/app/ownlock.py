"""A state lock that terraform reports held by another run when it is its own.

Terraform writes its lock with a conditional write (a DynamoDB item, or S3's lock file
`If-None-Match: *`). When the answer to that write is lost, by a connection reset between
the server and AWS, the AWS SDK sends it again; the second write finds the first one's
lock, and terraform fails with "Error acquiring the state lock", naming its own lock, and
leaves it held. Every later run of the instance would then be refused until an admin
cleared it. `OwnLocks.run` clears such a lock (`StateBackend.clear_lock`) and runs
terraform once more, only when `own_lock_id` finds the lock taken by that very process's
user and host while it ran, no other run holds the instance, and no other server process
may run terraform as the same user on the same host: each process names itself under
`_replicas/<user@host>/` before its runs (a name of its own, whatever its replica id,
written again every `REFRESH` seconds), so that a lock of another process on this host
(the same `Who`, a run whose record is not stored yet) is never taken for one's own. A
name not written again for longer than a run can last is a process that is gone. Replicas
on separate hosts (containers) each have a `Who` of their own.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import pwd
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

from ..errors import TFServerError
from ..runs.store import RunStore
from ..storage.base import StateBackend
from ..terraform.output import EventSink, Failure, RunResult
from ..terraform.process import RunControl, Runner, time_left
from .holder import lock_holder

logger = logging.getLogger(__name__)

#: Where each server process names itself under its `Who` (user@host), before its runs.
PRESENCE = "_replicas/"

#: How often (seconds) a process that runs terraform writes its name again.
REFRESH = 60.0

#: Beyond a run's longest terraform: its kill grace and the clock between two writes.
_MARGIN = 60.0

#: The lock's `Operation` each terraform command takes it for.
LOCK_OPERATIONS = {"apply": "OperationTypeApply", "destroy": "OperationTypeApply",
                   "plan": "OperationTypePlan"}

#: The operation of the lock the S3 backend takes to write a new workspace's first state
#: (any command on a new instance).
NEW_STATE = "init"

#: Go's `time.Time.String()`, as terraform prints a lock's `Created`.
_GO_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2}) (\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))? "
                      r"([+-]\d{4})\b")


def lock_created(lock: Mapping[str, str]) -> float | None:
    """When the lock was taken (a Unix time), or None when its `created` is unreadable."""
    m = _GO_TIME.match(lock.get("created", ""))
    if m is None:
        return None
    day, clock, fraction, offset = m.groups()
    try:
        at = datetime.datetime.strptime(f"{day} {clock} {offset}", "%Y-%m-%d %H:%M:%S %z")
    except ValueError:
        return None
    return at.timestamp() + (int(fraction.ljust(9, "0")) / 1e9 if fraction else 0.0)


def terraform_who() -> frozenset[str]:
    """The `Who` terraform writes into the locks it takes here: user@host (the user as
    the password database or the environment names it)."""
    host = socket.gethostname()
    names = {os.environ.get("USER", ""), os.environ.get("LOGNAME", "")}
    with contextlib.suppress(KeyError):  # a uid the password database does not name
        names.add(pwd.getpwuid(os.getuid()).pw_name)
    return frozenset(f"{name}@{host}" for name in names if name)


def own_lock_id(result: RunResult, started: float, ended: float,
                who: frozenset[str]) -> str | None:
    """The id of the lock that `result`'s terraform found held when it is its own: taken
    while that very process ran (`started`..`ended`, Unix times), by this user on this
    host, for this command's operation. The caller also checks that no other run holds
    the instance (`holder.lock_holder`): a run of another replica on the same host that
    locked meanwhile looks the same."""
    lock = result.lock
    if result.failure is not Failure.LOCKED or lock is None or not lock.get("id"):
        return None
    created = lock_created(lock)
    if created is None or not started <= created <= ended:
        return None
    if lock.get("who") not in who:
        return None
    command = result.args[0] if result.args else ""
    if lock.get("operation") not in (LOCK_OPERATIONS.get(command), NEW_STATE):
        return None
    return lock["id"]


class OwnLocks:
    """Terraform for one run of an instance (the caller holds it), a lock it reports
    held that is its own cleared and terraform run once more."""

    def __init__(self, runner: Runner, backend: StateBackend, store: RunStore,
                 replica: str, *, longest_run: float) -> None:
        self.runner = runner
        self.backend = backend
        self.store = store
        self.replica = replica
        #: The `Who` of the locks this server's terraform takes.
        self.who = terraform_who()
        #: This process's name under each `Who`: never two processes', even of one
        #: replica id (two servers on one host left to the default, its host name).
        self.token = secrets.token_hex(8)
        #: How long after its last write a name may still be of a running terraform.
        self.fresh_for = REFRESH + longest_run + _MARGIN
        #: Names tried so far (each attempt takes a new number), and the last written.
        self._attempts = 0
        self._current: str | None = None
        self._written = -math.inf  # monotonic
        # Runs of several instances start at once: one writes the name, the rest wait.
        self._mutex = threading.Lock()
        self._told = False  # that another process may have this replica id

    def _presence(self, who: str) -> str:
        return f"{PRESENCE}{quote(who, safe='')}/"

    def name_this_process(self) -> None:
        """Before a run's first terraform: this process's name under each of its
        `Who`s, written again once it is `REFRESH` old (the previous one removed). At
        the first, the names of processes gone are removed: each start leaves one."""
        with self._mutex:
            if time.monotonic() - self._written < REFRESH:
                return
            # A new object at each attempt: a name read as stale is never written
            # again, so the process that removes it can never remove a fresh one.
            self._attempts += 1
            name, now = f"{self.token}-{self._attempts}", time.time()
            doc = json.dumps({"at": now, "until": now + self.fresh_for,
                              "replica": self.replica}).encode()
            try:
                for who in self.who:
                    self.backend.objects.put(self._presence(who) + name, doc)
            except TFServerError as e:
                logger.warning("this server's name not kept beside the state (tried again "
                               "at the next run): %s", e.detail)
                return
            previous, self._current, self._written = self._current, name, time.monotonic()
            with contextlib.suppress(TFServerError):
                for who in self.who:
                    if previous is not None:
                        self.backend.objects.delete(self._presence(who) + previous)
                    else:
                        self._others(self._presence(who))

    def close(self) -> None:
        """Remove this process's name: called only once no terraform of it runs."""
        with self._mutex:
            current, self._current = self._current, None
            if current is not None:
                with contextlib.suppress(TFServerError):
                    for who in self.who:
                        self.backend.objects.delete(self._presence(who) + current)

    def _fresh_until(self, key: str) -> tuple[float, str] | None:
        """Until when the name may be of a running process (by its writer's run timeout
        or this process's, the later), and its replica id; None when it cannot be read."""
        try:
            doc = json.loads(self.backend.objects.get(key) or b"null")
            if not isinstance(doc, dict):
                return None
            at = float(doc["at"])
            return max(at + self.fresh_for, float(doc.get("until", at))), str(
                doc.get("replica", ""))
        except (ValueError, TypeError, KeyError):
            return None

    def _same_id(self, replica: str) -> None:
        """Say once that another process may run with this process's replica id."""
        if replica == self.replica and not self._told:
            self._told = True
            logger.warning("another server process with replica id %r wrote beside the "
                           "state on this host and may still run: if it does, give each "
                           "its own TFSERVER_REPLICA_ID (a start marks lost the active "
                           "runs of its id)", replica)

    def _others(self, folder: str) -> bool:
        """True when a name in `folder` but this process's may be of a running process
        (or cannot be read); the older ones are removed."""
        mine, now = self._current, time.time()
        names = self.backend.objects.keys(folder, limit=100)
        others = len(names) == 100  # more may follow: they are read at the next call
        for name in names:
            if name == mine:
                continue
            read = self._fresh_until(folder + name)
            if read is None:
                logger.warning("the name %s%s beside the state cannot be read: a lock "
                               "terraform finds its own is not cleared on this host while "
                               "it is there", folder, name)
                others = True
            elif now <= read[0]:
                others = True
                self._same_id(read[1])
            else:
                self.backend.objects.delete(folder + name)
        return others

    def _alone(self) -> bool:
        """True when no other process may run terraform as this process's `Who`s."""
        try:
            return self._current is not None and not any(
                [self._others(self._presence(who)) for who in self.who])
        except TFServerError:
            return False

    def run(self, args: Sequence[str], module: str, workspace: str, run_id: str, *,
            cwd: Path, deadline: float, control: RunControl | None,
            on_event: EventSink | None,
            on_start: Callable[[], None] | None = None) -> RunResult:
        """`Runner.run` before `deadline` (monotonic); `on_start` at the first start only."""
        started: list[None] = []

        def first_start() -> None:
            if not started and on_start is not None:
                on_start()
            started.append(None)

        def run() -> RunResult:
            return self.runner.run(args, cwd=cwd, workspace=workspace,
                                   timeout=time_left(deadline),
                                   control=control, on_event=on_event,
                                   on_start=first_start, label=run_id)

        self.name_this_process()
        began = time.time()
        result = run()
        lock_id = own_lock_id(result, began, time.time(), self.who)
        if lock_id is None or not self._alone() or lock_holder(
                self.store, module, workspace, run_id,
                elsewhere_than=self.replica) is not None:
            return result
        try:
            cleared, why = self.backend.clear_lock(module, workspace, lock_id), "not found"
        except TFServerError as e:
            cleared, why = False, e.detail
        if not cleared:
            logger.warning("run %s: its own lock %s, left by a lock request sent twice, "
                           "was not cleared: %s", run_id, lock_id, why,
                           extra={"run_id": run_id})
            return result
        logger.warning("run %s: terraform found its own lock %s held (its lock request "
                       "was sent twice); cleared, and terraform runs once more", run_id,
                       lock_id, extra={"run_id": run_id})
        return run()
