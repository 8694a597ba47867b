"""TLS: the server's `SSLContext` (TLS 1.2 or later only)."""

from __future__ import annotations

import ssl
from pathlib import Path

from .errors import ConfigError


def server_context() -> ssl.SSLContext:
    """A server-side context that refuses anything older than TLS 1.2."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


def context_from_files(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context with the certificate chain and key from PEM files."""
    ctx = server_context()
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load the TLS certificate {cert} and key {key}: {e}") from e
    return ctx
