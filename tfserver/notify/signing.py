"""Standard Webhooks signatures (https://www.standardwebhooks.com), with the
`standardwebhooks` package: `webhook-id`, `webhook-timestamp` and
`webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from standardwebhooks import Webhook

from ..errors import ConfigError

PREFIX = "whsec_"


def check_secret(value: str) -> bytes:
    """The key of a Standard Webhooks secret (base64, optionally `whsec_`-prefixed).

    Raises ValueError with the reason, never with the value.
    """
    text = value.strip().removeprefix(PREFIX)
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not a base64 secret (whsec_ prefix optional)") from None
    if len(key) < 16:
        raise ValueError("is too short: a secret needs at least 16 bytes (24 base64 "
                         "characters)")
    return key


@dataclass(frozen=True)
class Signer:
    """Signs the bodies of one target's deliveries with its secret."""

    secret: str = field(repr=False)

    @classmethod
    def from_env(cls, name: str, environ: Mapping[str, str], where: str) -> Signer:
        """The signer of the secret in variable `name`; ConfigError (one line naming the
        policy key `where` and the variable, never the value) when it is unset or bad."""
        value = environ.get(name, "")
        if not value.strip():
            raise ConfigError(f"{where}.secret: environment variable {name} is not set")
        try:
            check_secret(value)
        except ValueError as e:
            raise ConfigError(f"{where}.secret: environment variable {name} {e}") from None
        return cls(value.strip())

    def headers(self, msg_id: str, at: float, body: str) -> dict[str, str]:
        """The three Standard Webhooks headers of one attempt at time `at` (epoch)."""
        stamp = datetime.fromtimestamp(int(at), tz=UTC)
        return {"webhook-id": msg_id, "webhook-timestamp": str(int(at)),
                "webhook-signature": Webhook(self.secret).sign(msg_id, stamp, body)}
