"""What a policy allows one tenant on one module (`Limits`), and TTLs as `?ttl=` and the
policy write them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import BadRequest
from ..settings import parse_duration

#: The word for "no limit" (TOML has no null): it also lifts a limit set by a wider scope.
UNLIMITED = "unlimited"


#: The limits one table sets; a key left out inherits, None is unlimited.
Scope = Mapping[str, int | float | None]


#: A tenant's queued runs over all its instances when the policy does not say
#: (`max_queued_per_tenant`): each instance's queue is bounded too (TFSERVER_QUEUE_DEPTH),
#: but a tenant could otherwise fill queues of any number of instances.
DEFAULT_MAX_QUEUED = 64


@dataclass(frozen=True)
class Limits:
    """What the policy allows one tenant on one module.

    `None` is no limit. `max_instances` caps the tenant's instances of the module (an update
    of an existing instance is never refused by it); `max_runs` caps the tenant's runs of
    the module in flight (queued or running) at once; `max_queued` the tenant's queued
    runs over all its instances; TTLs are seconds.
    """

    max_instances: int | None = None
    max_runs: int | None = None
    default_ttl: float | None = None
    max_ttl: float | None = None
    max_queued: int | None = DEFAULT_MAX_QUEUED
    #: Every apply of the module applies its dependents after it (`?cascade=true`).
    cascade: bool = False
    #: Applies and destroys plan first and wait for an approval (app/approvals.py);
    #: `separate_approver`: never by the run's own subject.
    require_approval: bool = False
    separate_approver: bool = False

    @property
    def expires(self) -> bool:
        """True when instances expire by default under these limits."""
        return self.default_ttl is not None or self.max_ttl is not None

    def ttl(self, requested: float | None) -> float | None:
        """The TTL of an apply: `requested` (from `?ttl=`), else `default_ttl`.

        A request beyond `max_ttl` is 400 naming `ttl` and the maximum. With `max_ttl`
        and no `default_ttl`, an apply without `?ttl=` gets `max_ttl`, so the maximum
        holds for every instance.
        """
        if requested is None:
            return self.default_ttl if self.default_ttl is not None else self.max_ttl
        if not requested > 0:
            raise _ttl_error("must be a positive duration")
        if self.max_ttl is not None and requested > self.max_ttl:
            raise _ttl_error(f"must be at most {format_duration(self.max_ttl)}")
        return requested


#: The longest `?ttl=` taken even without a policy's `max_ttl` (an expiry must stay a
#: date that can be written down).
TTL_CEILING = 3650 * 86400.0


def parse_ttl(text: str) -> float:
    """Seconds from a `?ttl=` value such as `2h`, `90m` or `7d`; 400 naming `ttl` else."""
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise _ttl_error("must be a duration such as 90m, 24h or 7d") from None
    if not seconds > 0:
        raise _ttl_error("must be a positive duration")
    if not math.isfinite(seconds) or seconds > TTL_CEILING:
        raise _ttl_error(f"must be at most {format_duration(TTL_CEILING)}")
    return seconds


def _ttl_error(message: str) -> BadRequest:
    return BadRequest(f"ttl {message}", extra={"errors": [{"field": "ttl", "message": message}]})


def format_duration(seconds: float) -> str:
    """A duration the way a policy writes it: `7d`, `24h`, `90m`, `45s`."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
