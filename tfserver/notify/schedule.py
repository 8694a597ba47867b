"""When a delivery's next attempt is due: exponential back-off with jitter, within the
retry window (TFSERVER_WEBHOOK_RETRY). Pure, so every replica reads the same stored
attempts the same way."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from .store import Attempt, Delivery


@dataclass(frozen=True)
class Backoff:
    """The first retry within `first` seconds, then doubling up to `maximum`, for
    `window` seconds after the delivery was made."""

    first: float = 5.0
    maximum: float = 3600.0
    window: float = 86400.0
    #: How long a claimed attempt may go without an outcome before it counts as failed
    #: (its replica died): a little over one attempt's deadline.
    stale: float = 15.0

    def delay(self, delivery_id: str, number: int) -> float:
        """The wait after failed attempt `number` (1, 2, ...): the doubling delay times a
        jitter in [0.5, 1) drawn from the delivery and the attempt, so deliveries that
        failed together spread out and every replica computes the same time."""
        base = min(self.maximum, self.first * 2.0 ** max(0, number - 1))
        # Not a secret: a spread any replica can recompute (hence seeded, not random).
        jitter: float = random.Random(f"{delivery_id}.{number}").uniform(0.5, 1.0)  # noqa: S311
        return base * jitter


@dataclass(frozen=True)
class Step:
    """What to do with a delivery now: send attempt `attempt`, wait until `at`, give it up
    (`result` gave_up or refused, and why), or forget it (delivered, or ended already)."""

    kind: Literal["send", "wait", "give_up", "forget"]
    attempt: int = 0
    at: float = 0.0
    result: str = ""
    reason: str = ""


def next_step(delivery: Delivery, attempts: list[Attempt], ended: bool, now: float,
              backoff: Backoff) -> Step:
    """The step the stored attempts call for at time `now`."""
    if ended:
        return Step("forget")
    deadline = delivery.created_at + backoff.window
    if not attempts:
        if now > deadline:
            return Step("give_up", result="gave_up", reason="no attempt was made in time")
        return Step("send", attempt=1)
    last = attempts[-1]
    if last.result == "delivered":
        return Step("forget")
    if last.result == "refused":
        return Step("give_up", result="refused", reason=last.detail)
    ended_at = last.ended_at
    if last.result is None:
        if now < last.at + backoff.stale:
            return Step("wait", at=last.at + backoff.stale)
        ended_at = last.at  # its replica died mid-attempt
    due = (ended_at or last.at) + backoff.delay(delivery.id, last.number)
    if due > deadline:
        return Step("give_up", result="gave_up",
                    reason=f"{last.number} attempts failed, the last: "
                           f"{last.detail or 'no outcome'}")
    if now < due:
        return Step("wait", at=due)
    return Step("send", attempt=last.number + 1)
