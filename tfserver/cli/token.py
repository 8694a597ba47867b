"""`tfserver token`: fetch a Cognito access token with the client-credentials grant.

For users' shells: `curl -H "Authorization: Bearer $(tfserver token)" ...`. The client id
and secret come from the environment only, never from the command line (where other users
of the machine could read them in the process list).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence

from ..errors import ConfigError, TFServerError


class TokenError(TFServerError):
    """The token endpoint could not be reached or refused the client."""


def fetch_token(
    token_url: str,
    client_id: str,
    client_secret: str,
    *,
    scopes: Sequence[str] = (),
    timeout: float = 10.0,
) -> str:
    """POST the client-credentials grant to `token_url`; return the access token."""
    form = {"grant_type": "client_credentials", "client_id": client_id}
    if scopes:
        form["scope"] = " ".join(scopes)
    basic = base64.b64encode(f"{client_id}:{client_secret}".encode()).decode()
    req = urllib.request.Request(  # noqa: S310 - the URL's scheme is checked by the caller
        token_url,
        data=urllib.parse.urlencode(form).encode(),
        headers={"Authorization": f"Basic {basic}",
                 "Content-Type": "application/x-www-form-urlencoded",
                 "Accept": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            doc = json.load(resp)
    except urllib.error.HTTPError as e:
        reason = ""
        try:
            reason = str(json.load(e).get("error", ""))
        except (ValueError, AttributeError):
            pass
        finally:
            e.close()
        raise TokenError(f"the token endpoint answered {e.code} {reason}".strip()) from e
    except (urllib.error.URLError, TimeoutError, ValueError) as e:
        raise TokenError(f"cannot get a token from {token_url}: {e}") from e
    token = doc.get("access_token") if isinstance(doc, dict) else None
    if not isinstance(token, str) or not token:
        raise TokenError("the token endpoint answered without an access_token")
    return token


def token_url_from(environ: Mapping[str, str]) -> str:
    """TFSERVER_TOKEN_URL, or the `/oauth2/token` endpoint of COGNITO_DOMAIN."""
    url = environ.get("TFSERVER_TOKEN_URL")
    if not url and environ.get("COGNITO_DOMAIN"):
        domain = environ["COGNITO_DOMAIN"].rstrip("/")
        url = (domain if "://" in domain else f"https://{domain}") + "/oauth2/token"
    if not url:
        raise ConfigError("set TFSERVER_TOKEN_URL or COGNITO_DOMAIN")
    if urllib.parse.urlsplit(url).scheme not in ("https", "http"):
        raise ConfigError(f"the token URL must be https, not {url!r}")
    return url


def main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    """Print an access token on stdout; errors on stderr with exit status 1 (2 for config)."""
    parser = argparse.ArgumentParser(
        prog="tfserver token",
        description="Print a Cognito access token (client-credentials grant).",
        epilog="Environment: TFSERVER_TOKEN_URL (or COGNITO_DOMAIN), TFSERVER_CLIENT_ID, "
               "TFSERVER_CLIENT_SECRET, TFSERVER_TOKEN_SCOPES (space-separated, optional).",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds (10)")
    args = parser.parse_args(list(argv))
    try:
        url = token_url_from(environ)
        client_id = environ.get("TFSERVER_CLIENT_ID", "")
        secret = environ.get("TFSERVER_CLIENT_SECRET", "")
        if not client_id or not secret:
            raise ConfigError("set TFSERVER_CLIENT_ID and TFSERVER_CLIENT_SECRET")
    except ConfigError as e:
        print(f"tfserver token: error: {e}", file=sys.stderr)
        return 2
    try:
        token = fetch_token(url, client_id, secret,
                            scopes=environ.get("TFSERVER_TOKEN_SCOPES", "").split(),
                            timeout=args.timeout)
    except TokenError as e:
        print(f"tfserver token: error: {e}", file=sys.stderr)
        return 1
    print(token)
    return 0
