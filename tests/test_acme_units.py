"""ACME failure handling with small fakes injected where tfserver's own seams are."""

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


class RateLimitingCA:
    """An ACME client whose CA refuses every order with a rate limit."""

    def __init__(self, account_key: object) -> None:
        self.account_key = account_key

    def new_order(self, csr_pem: bytes) -> object:
        raise messages.Error(typ="urn:ietf:params:acme:error:rateLimited",
                             detail="too many certificates already issued")

    def answer_challenge(self, challb: object, response: object) -> object:
        raise AssertionError("never reached")

    def poll_and_finalize(self, orderr: object, deadline: object = None) -> object:
        raise AssertionError("never reached")


def test_rate_limit_is_named(tmp_path: Path) -> None:
    issuer = AcmeIssuer(SETTINGS, tmp_path, ChallengeStore(), connect=RateLimitingCA)
    with pytest.raises(AcmeError, match="rate-limited this server: too many certificates"):
        issuer.obtain()
    # the account key was made and kept for the next attempt
    assert (tmp_path / "account.key").stat().st_mode & 0o777 == 0o600


class Failing:
    """A certificate source that is always due and never renews; records when asked."""

    def __init__(self) -> None:
        self.attempts: list[float] = []

    def certificate(self) -> None:
        return None

    def due(self, cert: object) -> bool:
        return True

    def obtain(self) -> None:
        self.attempts.append(time.monotonic())
        raise AcmeError("the ACME directory cannot be reached")

    def context(self) -> object:
        raise AssertionError("never reached")


def test_failed_renewal_keeps_the_certificate_and_backs_off(tmp_path: Path) -> None:
    cert, key = self_signed(["tfserver.test"], tmp_path, "current")
    current = context_from_files(cert, key)
    certificates = Certificates(current)
    issuer = Failing()
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
