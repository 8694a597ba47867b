"""The `Notifier`: webhooks delivered at least once, off the caller's path.

`notify` only builds the deliveries (one per webhook that wants the event and tenant) and
hands them to the sender thread, which keeps each in the object store (store.py) before
its first attempt, then sends the attempts that are due (schedule.py) on a small pool of
threads: 5 s an attempt, the address checked at every attempt (targets.py), no redirect
followed, the same `webhook-id` on every attempt of a delivery. A delivery that is
refused, or still failing when TFSERVER_WEBHOOK_RETRY has passed, is given up with an
audit line naming it, its event and its target's origin (never the secret, nor the path,
which can hold a token).

Trade-off: a delivery handed over in the last moment before the process is killed
(not stopped: `close` keeps what was handed over) is lost; writing it on the caller's
path instead would add a backend write (S3: tens of ms) to every run's end.
"""

from __future__ import annotations

import collections
import http.client
import json
import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Protocol

from ..errors import TFServerError
from ..logs import audit_log
from ..metrics import Metrics
from .payloads import FinishedRun, run_finished
from .schedule import Backoff, next_step
from .signing import Signer
from .store import Attempt, Deliveries, Delivery
from .targets import (
    AllowList,
    Resolve,
    TargetRefused,
    Unresolved,
    check_url,
    endpoint,
    getaddrinfo,
    origin,
)
from .transport import Transport, default_context, post

logger = logging.getLogger(__name__)

#: Public `https` targets only.
NOTHING_ALLOWED = AllowList()


class Webhook(Protocol):
    """A `[[webhooks]]` table of the policy (module/policy.py's `Webhook` has it); notify
    imports no `module`, so the table is described here."""

    @property
    def url(self) -> str:
        """Where the events go."""
        ...

    @property
    def secret_env(self) -> str:
        """The environment variable holding the signing secret."""
        ...

    @property
    def key(self) -> str:
        """Where it is in the policy file (`webhooks[0]`)."""
        ...

    def wants(self, event: str, tenant: str | None, client_id: str | None = None) -> bool:
        """True when it takes `event` of that tenant (or client id)."""
        ...


@dataclass(frozen=True)
class Target:
    """A webhook of the policy with the signer of its secret."""

    webhook: Webhook
    signer: Signer


def targets_from_policy(webhooks: Iterable[Webhook], environ: Mapping[str, str],
                        allow: AllowList) -> tuple[Target, ...]:
    """The policy's webhooks with their secrets read from `environ`, at start.

    Raises ConfigError (one line naming the policy key) for a secret's variable that is
    unset or not a Standard Webhooks secret, or an `http` URL the allow list does not name.
    """
    found = []
    for webhook in webhooks:
        check_url(webhook.url, allow, webhook.key)
        found.append(Target(webhook, Signer.from_env(webhook.secret_env, environ,
                                                     webhook.key)))
    return tuple(found)


class Notifier:
    """Sends the policy's webhooks; `start` it once, `close` it at shutdown."""

    def __init__(self, deliveries: Deliveries, targets: Sequence[Target], *, replica: str,
                 retry: float, allow: AllowList = NOTHING_ALLOWED,
                 metrics: Metrics | None = None, first_delay: float = 5.0,
                 max_delay: float = 3600.0, timeout: float = 5.0, poll: float = 5.0,
                 senders: int = 4, clock: Callable[[], float] = time.time,
                 resolve: Resolve = getaddrinfo, transport: Transport = post,
                 context: ssl.SSLContext | None = None) -> None:
        self.deliveries = deliveries
        self.targets = tuple(targets)
        self.replica = replica
        self.backoff = Backoff(first_delay, max_delay, retry, stale=timeout * 2 + poll)
        self.allow = allow
        self.metrics = metrics
        self.timeout = timeout
        self.poll = poll
        self.clock = clock
        self.resolve = resolve
        self.transport = transport
        self.context = context or default_context()
        self._handed: collections.deque[Delivery] = collections.deque()
        self._inflight: set[str] = set()
        #: When each waiting delivery is next due, as last read (the sender thread's own):
        #: its attempts are read again only then.
        self._due: dict[str, float] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max(1, senders), thread_name_prefix="webhook")
        self._thread = threading.Thread(target=self._loop, name="webhooks", daemon=True)

    # -- the caller's side: never blocks ------------------------------------------------

    def notify(self, event: str, payload: Mapping[str, Any], tenant: str | None,
               client_id: str | None = None) -> list[str]:
        """Deliver `payload` to every webhook that wants `event` of this tenant (or client
        id); the deliveries' ids. Returns at once: nothing here waits on I/O."""
        wanted = [t for t in self.targets if t.webhook.wants(event, tenant, client_id)]
        if not wanted:
            return []
        body = json.dumps(payload, separators=(",", ":"))
        now = self.clock()
        made = [Delivery(f"msg_{uuid.uuid4().hex}", event, t.webhook.url,
                         t.webhook.secret_env, tenant, now, body) for t in wanted]
        self._handed.extend(made)
        self._wake.set()
        return [d.id for d in made]

    def run_finished(self, run: FinishedRun) -> list[str]:
        """`run.finished` for a run that ended (a run record, or anything shaped so)."""
        at = run.finished_at if run.finished_at is not None else self.clock()
        return self.notify("run.finished", run_finished(run, at), run.tenant, run.client_id)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the sender thread (pending deliveries of earlier runs are picked up)."""
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop: keep what was handed over, let attempts in flight end (each is bounded
        by its deadline), start no new one."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        try:
            self._keep_handed()
        except TFServerError as e:
            logger.warning("webhooks: %d deliveries not kept, the backend failed: %s",
                           len(self._handed), e.detail)
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- the sender thread ------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self._keep_handed()
                wait = self.run_once()
            except TFServerError as e:
                logger.warning("webhooks: the backend failed: %s", e.detail)
                wait = self.poll
            self._wake.wait(wait)

    def _keep_handed(self) -> None:
        while self._handed:
            delivery = self._handed[0]
            self.deliveries.add(delivery)
            self._handed.popleft()

    def run_once(self) -> float:
        """Start every attempt that is due; seconds until the next one may be."""
        now = self.clock()
        soonest = self.poll
        pending = self.deliveries.pending()
        self._due = {d.id: self._due[d.id] for d in pending if d.id in self._due}
        if self.metrics is not None:
            oldest = min((d.created_at for d in pending), default=now)
            self.metrics.webhook_oldest.set(max(0.0, now - oldest))
        for delivery in pending:
            with self._lock:
                if delivery.id in self._inflight:
                    continue
            if self._due.get(delivery.id, now) > now:
                soonest = min(soonest, self._due[delivery.id] - now)
                continue
            attempts, ended = self.deliveries.attempts(delivery.id)
            step = next_step(delivery, attempts, ended, now, self.backoff)
            if step.kind == "wait":
                self._due[delivery.id] = step.at
                soonest = min(soonest, step.at - now)
            elif step.kind == "forget":
                self.deliveries.forget(delivery)
            elif step.kind == "give_up":
                self._give_up(delivery, step.result, step.reason, len(attempts))
            elif self._target(delivery) is not None and not self._stop.is_set():
                self._claim(delivery, step.attempt, now)
        return max(0.0, soonest)

    def _target(self, delivery: Delivery) -> Target | None:
        # A replica whose policy lacks the webhook leaves it to one that has it; past the
        # window, whoever looks gives it up.
        for target in self.targets:
            if (target.webhook.url, target.webhook.secret_env) == (delivery.url,
                                                                   delivery.secret_env):
                return target
        return None

    def _claim(self, delivery: Delivery, number: int, now: float) -> None:
        if not self.deliveries.claim(delivery.id, Attempt(number, self.replica, now)):
            return  # another replica has this attempt
        if not self.deliveries.exists(delivery):
            self.deliveries.forget(delivery)  # ended meanwhile: drop the stray claim
            return
        with self._lock:
            self._inflight.add(delivery.id)
        self._pool.submit(self._attempt, delivery, number, now)

    def _attempt(self, delivery: Delivery, number: int, claimed_at: float) -> None:
        try:
            attempt = self._send(delivery, Attempt(number, self.replica, claimed_at))
            if attempt.result != "delivered":  # a delivered one is forgotten at once
                self.deliveries.note(delivery.id, attempt)
            self._after(delivery, attempt)
        except TFServerError as e:
            logger.warning("webhooks: the backend failed: %s", e.detail)
        except Exception:  # a sender thread must not die silently
            logger.exception("webhooks: delivery %s failed unexpectedly", delivery.id)
        finally:
            with self._lock:
                self._inflight.discard(delivery.id)
            self._wake.set()

    def _send(self, delivery: Delivery, attempt: Attempt) -> Attempt:
        """One attempt, its outcome."""
        target = self._target(delivery)
        if target is None:
            return replace(attempt, result="failed", ended_at=self.clock(),
                           detail="the webhook is no longer in this replica's policy")
        try:
            where = endpoint(delivery.url, self.allow, self.resolve)
            at = self.clock()
            headers = target.signer.headers(delivery.id, at, delivery.body)
            answer = self.transport(where, delivery.body.encode(), headers,
                                    timeout=self.timeout, context=self.context)
        except TargetRefused as e:
            return replace(attempt, result="refused", ended_at=self.clock(), detail=e.detail)
        except Unresolved as e:
            result, detail = "failed", e.detail
        except (OSError, http.client.HTTPException) as e:
            result, detail = "failed", f"{type(e).__name__}: {e}"[:200]
        else:
            redirect = " (a redirect: not followed)" if 300 <= answer.status < 400 else ""
            result = "delivered" if answer.ok else "failed"
            detail = f"answered {answer.status}{redirect}"
        return replace(attempt, result=result, ended_at=self.clock(), detail=detail)

    def _after(self, delivery: Delivery, attempt: Attempt) -> None:
        """Count the attempt; forget a delivered one, give up a hopeless one."""
        if attempt.result == "delivered":
            self._count(delivery.event, "delivered")
            logger.info("webhook %s %s delivered to %s (attempt %d)", delivery.id,
                        delivery.event, origin(delivery.url), attempt.number)
            self.deliveries.forget(delivery)
            return
        attempts, ended = self.deliveries.attempts(delivery.id)
        step = next_step(delivery, attempts, ended, self.clock(), self.backoff)
        if step.kind == "give_up":
            self._give_up(delivery, step.result, step.reason, attempt.number)
        else:
            self._count(delivery.event, "retried")
            logger.info("webhook %s %s to %s: attempt %d failed (%s); retried",
                        delivery.id, delivery.event, origin(delivery.url), attempt.number,
                        attempt.detail)

    def _give_up(self, delivery: Delivery, result: str, reason: str, attempts: int) -> None:
        if not self.deliveries.end(delivery.id):
            return  # another replica ended it
        self._count(delivery.event, result)
        target = origin(delivery.url)
        audit_log.warning(
            "webhook %s %s to %s: %s after %d attempt%s: %s", delivery.id, delivery.event,
            target, "refused" if result == "refused" else "gave up", attempts,
            "" if attempts == 1 else "s", reason,
            extra={"event": "webhook",
                   "what": {"delivery": delivery.id, "webhook_event": delivery.event,
                            "target": target, "tenant": delivery.tenant},
                   "outcome": {"result": result, "attempts": attempts, "reason": reason}})
        self.deliveries.forget(delivery)

    def _count(self, event: str, result: str) -> None:
        if self.metrics is not None:
            self.metrics.webhook(event, result)
