"""ACME failure handling with small fakes behind tfserver's own classes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from acme import messages

from support import self_signed
from tfserver.config import AcmeSettings
from tfserver.tls import (
    AcmeError,
    AcmeIssuer,
    Certificates,
    ChallengeStore,
    Renewer,
    context_from_files,
)

SETTINGS = AcmeSettings(domains=("tfserver.test",), directory="https://acme.invalid/dir")


class RateLimited(AcmeIssuer):
    def _obtain(self) -> None:
        raise messages.Error(typ="urn:ietf:params:acme:error:rateLimited",
                             detail="too many certificates already issued")


def test_rate_limit_is_named(tmp_path: Path) -> None:
    with pytest.raises(AcmeError, match="rate-limited this server: too many certificates"):
        RateLimited(SETTINGS, tmp_path, ChallengeStore()).obtain()


class Failing(AcmeIssuer):
    """Always due, never renews; records when it was asked."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.attempts: list[float] = []

    def certificate(self):  # type: ignore[no-untyped-def]
        return None

    def obtain(self) -> None:
        self.attempts.append(time.monotonic())
        raise AcmeError("the ACME directory cannot be reached")


def test_failed_renewal_keeps_the_certificate_and_backs_off(tmp_path: Path) -> None:
    cert, key = self_signed(["tfserver.test"], tmp_path, "current")
    current = context_from_files(cert, key)
    certificates = Certificates(current)
    issuer = Failing(SETTINGS, tmp_path, ChallengeStore())
    renewer = Renewer(issuer, certificates, interval=0.05)
    renewer.start()
    try:
        deadline = time.monotonic() + 10
        while len(issuer.attempts) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        renewer.stop_event.set()
        renewer.join(5)
    assert len(issuer.attempts) >= 4
    gaps = [b - a for a, b in zip(issuer.attempts, issuer.attempts[1:], strict=False)]
    assert gaps[1] > gaps[0] * 1.5 and gaps[2] > gaps[1] * 1.5  # doubling back-off
    assert certificates.context is current  # still serving the old certificate
    assert renewer.renewals == 0
