"""ACME failure handling with small fakes injected where tfserver's own seams are."""

from __future__ import annotations

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
