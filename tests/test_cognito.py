"""End to end against moto's Cognito, and the `tfserver token` helper."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

from support import ROOT, Moto, bearer, moto_user_token, reply_json, start_server


def test_moto_cognito_access_token_is_accepted(tmp: Path, moto: Moto) -> None:
    idp = moto.client("cognito-idp")
    pool = idp.create_user_pool(PoolName="tfserver-test")["UserPool"]["Id"]
    token, client_id = moto_user_token(idp, pool)

    srv = start_server(tmp, env={
        # moto signs with an AWS-style issuer and serves the JWKS under its own URL
        "COGNITO_ISSUER": f"https://cognito-idp.us-east-1.amazonaws.com/{pool}",
        "JWK_URL": f"{moto.url}/{pool}/.well-known/jwks.json",
        "TFSERVER_CLIENT_IDS": client_id,
        # moto's access tokens carry only this scope: let it stand for admin here
        "TFSERVER_ADMIN_SCOPES": "aws.cognito.signin.user.admin",
    })
    try:
        r = srv.request("PUT", "/basic/cognito", {"name": "from-moto"}, headers=bearer(token))
        assert r.status == 201, r.body
        assert r.json["outputs"]["name"] == "from-moto"
        assert srv.request("GET", "/basic/cognito", headers=bearer(token)).status == 200
        assert srv.request("GET", "/basic/cognito").status == 401
        assert srv.request("DELETE", "/basic/cognito", headers=bearer(token)).status == 200
    finally:
        srv.stop()


@pytest.fixture()
def token_endpoint() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A small OAuth2 token endpoint that checks the client-credentials grant."""
    seen: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"])).decode()
            form = {k: v[0] for k, v in parse_qs(body).items()}
            auth = self.headers.get("Authorization", "")
            creds = base64.b64decode(auth.removeprefix("Basic ")).decode() if auth else ""
            seen.append({"form": form, "creds": creds, "path": self.path})
            ok = creds == "cid:csecret" and form.get("grant_type") == "client_credentials"
            doc = {"access_token": "tok-123", "token_type": "Bearer"} if ok else \
                {"error": "invalid_client"}
            reply_json(self, 200 if ok else 400, doc)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    httpd.shutdown()
    httpd.server_close()


def run_token(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tfserver", "token"], cwd=ROOT,
                          env={"PATH": os.environ["PATH"], **env}, capture_output=True,
                          text=True, timeout=60)


def test_token_helper_uses_the_client_credentials_grant(
        token_endpoint: tuple[str, list[dict[str, Any]]]) -> None:
    url, seen = token_endpoint
    done = run_token({"COGNITO_DOMAIN": url, "TFSERVER_CLIENT_ID": "cid",
                      "TFSERVER_CLIENT_SECRET": "csecret",
                      "TFSERVER_TOKEN_SCOPES": "tfserver/demo.write tfserver/demo.read"})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "tok-123\n"
    assert seen[0]["path"] == "/oauth2/token"
    assert seen[0]["form"]["scope"] == "tfserver/demo.write tfserver/demo.read"


def test_token_helper_errors_are_clear(
        token_endpoint: tuple[str, list[dict[str, Any]]]) -> None:
    url, _ = token_endpoint
    done = run_token({"TFSERVER_TOKEN_URL": url + "/oauth2/token", "TFSERVER_CLIENT_ID": "cid",
                      "TFSERVER_CLIENT_SECRET": "wrong"})
    assert done.returncode == 1
    assert "answered 400 invalid_client" in done.stderr and "Traceback" not in done.stderr
    assert "wrong" not in done.stderr
    done = run_token({"TFSERVER_TOKEN_URL": url})
    assert done.returncode == 2 and "TFSERVER_CLIENT_ID" in done.stderr
    done = run_token({"TFSERVER_TOKEN_URL": "http://127.0.0.1:9/oauth2/token",
                      "TFSERVER_CLIENT_ID": "a", "TFSERVER_CLIENT_SECRET": "b"})
    assert done.returncode == 1 and "cannot get a token" in done.stderr
