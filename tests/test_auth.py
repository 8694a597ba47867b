"""Cognito JWT auth: forged tokens, scopes, tenants, and a JWKS cache that cannot be abused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from test_runs_defects import wait_for

from support import Jwks, ServerProcess, Signer, bearer, start_server, terraform_shim
from tfserver.auth import JWTAuth, KeySource
from tfserver.config import AuthSettings
from tfserver.errors import Unauthorized, Unavailable


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer("key-1")


@pytest.fixture(scope="module")
def jwks(signer: Signer) -> Iterator[Jwks]:
    served = Jwks()
    served.publish(signer)
    yield served
    served.close()


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory, jwks: Jwks, terraform_bin: str
                ) -> Iterator[tuple[ServerProcess, Path]]:
    tmp = tmp_path_factory.mktemp("auth")
    shim, log = terraform_shim(tmp)
    srv = start_server(tmp, env={
        "COGNITO_ISSUER": Signer.ISSUER, "JWK_URL": jwks.url, "TFSERVER_TERRAFORM": str(shim),
        "TFSERVER_CLIENT_IDS": "client-a,client-b,client-admin,client-ro",
    })
    yield srv, log
    srv.stop()


def b64(doc: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()


def forged_tokens(signer: Signer) -> dict[str, dict[str, str]]:
    """Headers that must each be refused with 401."""
    good = signer.token(scopes="tfserver/basic.write")
    header, payload, sig = good.split(".")
    stranger = Signer("key-1")  # same kid, a key that is not in the JWKS
    claims = signer.claims(scopes="tfserver/admin")
    # Algorithm confusion: HS256 "signed" with the RSA public key as the HMAC secret.
    public_pem = signer.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    signing_input = f"{b64({'alg': 'HS256', 'typ': 'JWT', 'kid': 'key-1'})}.{b64(claims)}"
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    hs256 = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    tampered_payload = b64({**json.loads(base64.urlsafe_b64decode(payload + "==")),
                            "scope": "tfserver/admin"})
    return {
        "no header": {},
        "alg none": bearer(f"{b64({'alg': 'none', 'kid': 'key-1'})}.{b64(claims)}."),
        "HS256 keyed with the RSA public key": bearer(hs256),
        "key not in the JWKS": bearer(stranger.token(scopes="tfserver/admin")),
        "unknown kid": bearer(signer.token(headers={"kid": "nope"})),
        "expired": bearer(signer.token(exp=int(time.time()) - 3600)),
        "not yet valid": bearer(signer.token(nbf=int(time.time()) + 3600)),
        "wrong issuer": bearer(signer.token(iss="https://evil.example/pool")),
        "id token": bearer(signer.token(token_use="id")),
        "no exp": bearer(signer.token(exp=None)),
        "no iat": bearer(signer.token(iat=None)),
        "client not allowed": bearer(signer.token(client_id="client-z")),
        "tampered payload": bearer(f"{header}.{tampered_payload}.{sig}"),
        "tampered signature": bearer(f"{header}.{payload}.{sig[:-4]}AAAA"),
        "garbage": bearer("not-a-jwt"),
        "wrong scheme": {"Authorization": f"Basic {good}"},
        "token without scheme": {"Authorization": good},
    }


def test_forged_and_broken_tokens_get_401_and_run_nothing(
        auth_server: tuple[ServerProcess, Path], signer: Signer) -> None:
    srv, log = auth_server
    before = log.read_text()
    for name, headers in forged_tokens(signer).items():
        r = srv.request("POST", "/basic", {"name": "x"}, headers=headers)
        assert r.status == 401, (name, r.body)
        assert r.header("WWW-Authenticate", ).startswith("Bearer"), name
        assert r.header("Content-Type") == "application/problem+json"
    # a token in the query string is not a token
    good = signer.token(scopes="tfserver/basic.write")
    r = srv.request("POST", f"/basic?access_token={good}", {"name": "x"})
    assert r.status == 401
    assert log.read_text() == before  # no terraform process for any of them
    time.sleep(0.2)
    text = srv.log_text()
    assert good not in text and good.split(".")[2] not in text


def test_error_codes_follow_rfc6750(auth_server: tuple[ServerProcess, Path],
                                    signer: Signer) -> None:
    srv, _ = auth_server
    r = srv.request("GET", "/basic")
    assert r.header("WWW-Authenticate") == 'Bearer realm="tfserver"'
    r = srv.request("GET", "/basic", headers=bearer(signer.token(exp=1)))
    assert 'error="invalid_token"' in r.header("WWW-Authenticate")
    r = srv.request("GET", "/basic", headers={"Authorization": "Bearer a b"})
    assert 'error="invalid_request"' in r.header("WWW-Authenticate")
    r = srv.request("POST", "/basic", {"name": "x"},
                    headers=bearer(signer.token(scopes="tfserver/basic.read")))
    assert r.status == 403
    assert 'error="insufficient_scope"' in r.header("WWW-Authenticate")
    assert 'scope="tfserver/basic.write"' in r.header("WWW-Authenticate")


def test_health_needs_no_token(auth_server: tuple[ServerProcess, Path]) -> None:
    srv, _ = auth_server
    assert srv.request("GET", "/healthz").status == 200
    assert srv.request("GET", "/readyz").status == 200
    assert srv.request("GET", "/").status == 401


def test_scopes_per_module_and_access(auth_server: tuple[ServerProcess, Path],
                                      signer: Signer) -> None:
    srv, _ = auth_server
    read = bearer(signer.token("client-ro", "tfserver/basic.read"))
    write = bearer(signer.token("client-ro", "tfserver/basic.write"))
    other = bearer(signer.token("client-ro", "tfserver/slow.write"))
    assert srv.request("PUT", "/basic/s1", {"name": "x"}, headers=read).status == 403
    assert srv.request("PUT", "/basic/s1", {"name": "x"}, headers=other).status == 403
    assert srv.request("DELETE", "/basic/s1", headers=read).status == 403
    assert srv.request("PUT", "/basic/s1", {"name": "x"}, headers=write).status == 201
    assert srv.request("GET", "/basic/s1", headers=read).status == 200
    assert srv.request("GET", "/basic/s1", headers=other).status == 403
    assert srv.request("GET", "/slow", headers=read).status == 403
    listing = srv.request("GET", "/", headers=read).json
    assert [m["name"] for m in listing["modules"]] == ["basic"]
    assert srv.request("DELETE", "/basic/s1", headers=write).status == 200


def test_tenants_with_the_same_instance_name_are_apart(
        auth_server: tuple[ServerProcess, Path], signer: Signer) -> None:
    srv, _ = auth_server
    a = bearer(signer.token("client-a", "tfserver/basic.write"))
    b = bearer(signer.token("client-b", "tfserver/basic.write"))
    ra = srv.request("PUT", "/basic/shared", {"name": "from-a"}, headers=a)
    rb = srv.request("PUT", "/basic/shared", {"name": "from-b"}, headers=b)
    assert ra.status == rb.status == 201  # two instances, not one updated
    assert srv.request("GET", "/basic/shared", headers=a).json["outputs"]["name"] == "from-a"
    assert srv.request("GET", "/basic/shared", headers=b).json["outputs"]["name"] == "from-b"
    only_a = srv.request("PUT", "/basic/only-a", {"name": "a"}, headers=a)
    assert only_a.status == 201
    # b cannot read, change or destroy a's instance, and is not told it exists
    assert srv.request("GET", "/basic/only-a", headers=b).status == 404
    assert srv.request("DELETE", "/basic/only-a", headers=b).status == 404
    listed_b = [i["instance"] for i in srv.request("GET", "/basic", headers=b).json["instances"]]
    assert "only-a" not in listed_b and "shared" in listed_b
    # b's PUT makes b's own instance; a's stays as it was
    assert srv.request("PUT", "/basic/only-a", {"name": "b"}, headers=b).status == 201
    assert srv.request("GET", "/basic/only-a", headers=a).json["outputs"]["name"] == "a"
    # the admin sees every tenant's instances, and sensitive outputs
    admin = bearer(signer.token("client-admin", "tfserver/admin"))
    everyone = srv.request("GET", "/basic", headers=admin).json["instances"]
    assert sum(1 for i in everyone if i["instance"] == "shared") == 2
    # ... and reaches them with ?tenant=<key>, which nobody else may use
    a_key = hashlib.sha256(b"client-a").hexdigest()[:24]
    assert {"instance": "only-a", "tenant": a_key} in everyone
    seen = srv.request("GET", f"/basic/only-a?tenant={a_key}", headers=admin)
    assert seen.status == 200 and seen.json["outputs"]["name"] == "a"
    assert srv.request("GET", f"/basic/only-a?tenant={a_key}", headers=b).status == 403
    assert srv.request("GET", "/basic/only-a?tenant=../x", headers=admin).status == 400
    mine = srv.request("PUT", "/basic/adm", {"name": "x", "token": "admin-visible-token"},
                       headers=admin)
    assert mine.json["outputs"]["token_out"] == "admin-visible-token"
    shown = srv.request("GET", "/basic/adm", headers=admin).json
    assert shown["outputs"]["token_out"] == "admin-visible-token"
    assert srv.request("GET", "/basic/shared", headers=a).json["outputs"]["token_out"] == \
        "<sensitive>"
    for headers, name in ((a, "shared"), (b, "shared"), (a, "only-a"), (b, "only-a"),
                          (admin, "adm")):
        assert srv.request("DELETE", f"/basic/{name}", headers=headers).status == 200


# -- the key cache, measured ---------------------------------------------------------------


def make_auth(jwks: Jwks, **kw: float) -> JWTAuth:
    settings = AuthSettings(issuer=Signer.ISSUER, jwk_url=jwks.url)
    keys = KeySource.from_url(jwks.url, timeout=2, min_refresh=kw.get("min_refresh", 60),
                              ttl=kw.get("ttl", 3600))
    return JWTAuth(settings, keys)


def test_hundreds_of_valid_tokens_cost_one_fetch(signer: Signer) -> None:
    served = Jwks()
    served.publish(signer)
    try:
        auth = make_auth(served)
        for i in range(300):
            auth.authenticate(f"Bearer {signer.token(f'client-{i % 7}')}")
        assert served.fetches == 1
    finally:
        served.close()


def test_unknown_kids_cost_at_most_a_couple_of_fetches(signer: Signer) -> None:
    served = Jwks()
    served.publish(signer)
    try:
        auth = make_auth(served)
        auth.authenticate(f"Bearer {signer.token()}")
        for i in range(50):
            with pytest.raises(Unauthorized):
                auth.authenticate(f"Bearer {signer.token(headers={'kid': f'random-{i}'})}")
        assert served.fetches <= 2
    finally:
        served.close()


def test_a_newly_published_key_is_accepted(signer: Signer) -> None:
    served = Jwks()
    served.publish(signer)
    try:
        auth = make_auth(served, min_refresh=0.5)
        auth.authenticate(f"Bearer {signer.token()}")
        rotated = Signer("key-2")
        served.publish(rotated)
        token = f"Bearer {rotated.token()}"
        deadline = time.monotonic() + 10
        while True:
            try:
                assert auth.authenticate(token).tenant == "client-a"
                break
            except Unauthorized:
                assert time.monotonic() < deadline, "the new key was never picked up"
                time.sleep(0.1)
        assert served.fetches <= 4
    finally:
        served.close()


def test_cached_keys_keep_verifying_while_the_jwks_is_down(signer: Signer) -> None:
    served = Jwks()
    served.publish(signer)
    try:
        auth = make_auth(served, min_refresh=0.1, ttl=0.2)
        auth.authenticate(f"Bearer {signer.token()}")
        served.down = True
        time.sleep(0.3)  # past the ttl: every check would like a refresh now
        for _ in range(20):
            assert auth.authenticate(f"Bearer {signer.token()}").tenant == "client-a"
        assert served.fetches <= 3  # failed refreshes are rate-limited too
    finally:
        served.close()


def test_no_jwks_and_no_cached_key_is_503(signer: Signer) -> None:
    served = Jwks()
    served.down = True
    try:
        auth = make_auth(served)
        with pytest.raises(Unavailable):
            auth.authenticate(f"Bearer {signer.token()}")
    finally:
        served.close()


def test_jwks_down_at_start_answers_503_over_http(tmp: Path, signer: Signer) -> None:
    served = Jwks()
    served.down = True
    srv = start_server(tmp, env={"COGNITO_ISSUER": Signer.ISSUER, "JWK_URL": served.url})
    try:
        r = srv.request("GET", "/basic", headers=bearer(signer.token(scopes="tfserver/admin")))
        assert r.status == 503 and r.header("Retry-After")
    finally:
        srv.stop()
        served.close()


def test_admin_scope_can_be_mapped_by_config(jwks: Jwks, signer: Signer) -> None:
    settings = AuthSettings(issuer=Signer.ISSUER, jwk_url=jwks.url,
                            admin_scopes=frozenset({"aws.cognito.signin.user.admin"}))
    auth = JWTAuth(settings, KeySource.from_url(jwks.url, timeout=2, min_refresh=60, ttl=60))
    p = auth.authenticate(f"Bearer {signer.token(scopes='aws.cognito.signin.user.admin')}")
    assert p.admin and p.can("basic", "write")
    p = auth.authenticate(f"Bearer {signer.token(scopes='tfserver/basic.read')}")
    assert not p.admin and p.can("basic", "read") and not p.can("basic", "write")


def test_a_token_in_a_malformed_request_line_is_not_logged(
        auth_server: tuple[ServerProcess, Path]) -> None:
    import socket

    srv, _ = auth_server
    secret = "eyJhbGciOiJSUzI1NiJ9.leaked-token-value.sig"
    host, port = srv.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"GET /basic?access_token={secret} HTTP/1.1 junk\r\n\r\n".encode())
        assert s.recv(1024).startswith(b"HTTP/1.1 400")
    # the error itself is logged (its line may follow the answer)...
    wait_for(lambda: "Bad request" in srv.log_text(), timeout=30)
    assert "leaked-token-value" not in srv.log_text()  # ...without the token
