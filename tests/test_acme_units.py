"""ACME failure handling with small fakes injected where tfserver's own seams are."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from acme import challenges, messages

from support import self_signed
from tfserver.config import AcmeSettings
from tfserver.tls import (
    AcmeError,
    AcmeIssuer,
    Certificates,
    ChallengeStore,
    Renewer,
    context_from_files,
    retry_delay,
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


def retries_logged(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The `retry_in` of each "renewal failed" line, in order."""
    return [r.__dict__["retry_in"] for r in caplog.records
            if r.getMessage().startswith("certificate renewal failed")]


def test_failed_renewal_keeps_the_certificate_and_backs_off(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cert, key = self_signed(["tfserver.test"], tmp_path, "current")
    current = context_from_files(cert, key)
    certificates = Certificates(current)
    issuer = Failing()
    caplog.set_level(logging.INFO, logger="tfserver.tls")
    renewer = Renewer(issuer, certificates, interval=0.01, first_retry=0.01, max_retry=0.04)
    renewer.start()
    try:
        deadline = time.monotonic() + 10
        while len(issuer.attempts) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        renewer.stop_event.set()
        renewer.join(5)
    assert len(issuer.attempts) >= 6
    # the schedule the renewer chose (read from its log, so a busy machine cannot blur it):
    # doubling from the first retry, then held at the cap while the certificate is due
    assert retries_logged(caplog)[:6] == [0.01, 0.02, 0.04, 0.04, 0.04, 0.04]
    assert certificates.context is current  # still serving the old certificate
    assert renewer.renewals == 0


H = 3600.0


@pytest.mark.parametrize(("failures", "interval", "first", "most", "expected"), [
    (1, 12 * H, 120, H, 120),  # one failure of a due certificate: two minutes, not hours
    (2, 12 * H, 120, H, 240),
    (5, 12 * H, 120, H, 1920),
    (6, 12 * H, 120, H, H),  # 3840 s capped at an hour
    (10_000, 12 * H, 120, H, H),  # no overflow after weeks of failures
    (1, 1, 120, H, 1),  # a check interval shorter than the first retry wins
    (3, 1, 120, H, 4),
    (1, 0.05, 0.05, 0.2, 0.05),
    (4, 0.05, 0.05, 0.2, 0.2),
])
def test_retry_schedule(failures: int, interval: float, first: float, most: float,
                        expected: float) -> None:
    assert retry_delay(failures, interval=interval, first=first, most=most) == expected


class FailsOnce(Failing):
    """Due; the first renewal fails, the next one works."""

    def __init__(self, context: object) -> None:
        super().__init__()
        self.renewed = context

    def obtain(self) -> None:
        if not self.attempts:
            super().obtain()
        self.attempts.append(time.monotonic())

    def context(self) -> object:
        return self.renewed


def test_a_renewal_after_one_failure_swaps_the_new_certificate_in(tmp_path: Path) -> None:
    cert, key = self_signed(["tfserver.test"], tmp_path, "current")
    certificates = Certificates(context_from_files(cert, key))
    new_cert, new_key = self_signed(["tfserver.test"], tmp_path, "new")
    renewed = context_from_files(new_cert, new_key)
    renewer = Renewer(FailsOnce(renewed), certificates, interval=0.05,
                      first_retry=0.05, max_retry=0.05)
    renewer.start()
    try:
        deadline = time.monotonic() + 10
        while renewer.renewals == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        renewer.stop_event.set()
        renewer.join(5)
    assert renewer.renewals >= 1
    assert certificates.context is renewed


# --- authorizations the CA reuses ---------------------------------------------------------

def authorization(name: str, status: messages.Status, token: bytes
                  ) -> messages.AuthorizationResource:
    chall = messages.ChallengeBody(chall=challenges.HTTP01(token=token), status=status,
                                   uri=f"https://acme.invalid/chall/{name}")
    return messages.AuthorizationResource(
        uri=f"https://acme.invalid/authz/{name}",
        body=messages.Authorization(
            identifier=messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=name),
            challenges=[chall], status=status))


class ReusingCA:
    """A CA like Pebble or Let's Encrypt that hands back authorizations already valid.

    It refuses to update a challenge that is not pending, as they do; it issues
    `chain` when the order is finalised.
    """

    def __init__(self, authorizations: list[messages.AuthorizationResource],
                 chain: bytes) -> None:
        self.authorizations = authorizations
        self.chain = chain
        self.answered: list[str] = []

    def __call__(self, account_key: object) -> ReusingCA:
        return self

    def new_order(self, csr_pem: bytes) -> messages.OrderResource:
        return messages.OrderResource(uri="https://acme.invalid/order/1", body=messages.Order(),
                                      authorizations=self.authorizations, csr_pem=csr_pem)

    def answer_challenge(self, challb: messages.ChallengeBody, response: object) -> object:
        if challb.status != messages.STATUS_PENDING:
            raise messages.Error(typ="urn:ietf:params:acme:error:malformed",
                                 detail=f"Cannot update challenge with status {challb.status}, "
                                        "only status pending")
        self.answered.append(challb.uri)
        return challb

    def poll_and_finalize(self, orderr: messages.OrderResource,
                          deadline: object = None) -> messages.OrderResource:
        return orderr.update(fullchain_pem=self.chain.decode())


SETTINGS_TWO = AcmeSettings(domains=("tfserver.test", "www.tfserver.test"),
                            directory="https://acme.invalid/dir")


def test_reused_authorizations_are_not_answered_again(tmp_path: Path) -> None:
    cert, _ = self_signed(["tfserver.test", "www.tfserver.test"], tmp_path, "issued")
    ca = ReusingCA([authorization("tfserver.test", messages.STATUS_VALID, b"a" * 22),
                    authorization("www.tfserver.test", messages.STATUS_PENDING, b"b" * 22)],
                   cert.read_bytes())
    store = ChallengeStore()
    issuer = AcmeIssuer(SETTINGS_TWO, tmp_path / "acme", store, connect=ca)
    issuer.obtain()
    # only the pending authorization's challenge was answered; the reused one was left be
    assert ca.answered == ["https://acme.invalid/chall/www.tfserver.test"]
    assert issuer.cert_path.read_bytes() == cert.read_bytes()
    assert store.get("b" * 22) is None  # nothing left served


def test_an_order_of_reused_authorizations_only_is_finalised(tmp_path: Path) -> None:
    cert, _ = self_signed(["tfserver.test"], tmp_path, "issued")
    ca = ReusingCA([authorization("tfserver.test", messages.STATUS_VALID, b"a" * 22)],
                   cert.read_bytes())
    issuer = AcmeIssuer(SETTINGS, tmp_path / "acme", ChallengeStore(), connect=ca)
    issuer.obtain()
    assert ca.answered == []
    assert issuer.certificate() is not None


def test_an_authorization_neither_pending_nor_valid_is_named(tmp_path: Path) -> None:
    ca = ReusingCA([authorization("tfserver.test", messages.STATUS_DEACTIVATED, b"a" * 22)],
                   b"")
    issuer = AcmeIssuer(SETTINGS, tmp_path / "acme", ChallengeStore(), connect=ca)
    with pytest.raises(AcmeError, match=r"authorization for tfserver\.test is deactivated"):
        issuer.obtain()
    assert ca.answered == []
