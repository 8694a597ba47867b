"""Configuration: the settings of `settings.py` read from flags and the environment into one
frozen `Config`.

Every setting is an environment variable; a few also have a command-line flag, and flags
win. `load(argv, environ)` is pure: it reads only what it is given, so tests build configs
without touching `os.environ`. A bad value is a `ConfigError` naming the setting, which
`__main__` prints as one line before exiting with status 2.
"""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import __version__
from .errors import ConfigError
from .settings import SETTINGS, Network, default

#: Environment variables handed to terraform when the server's environment has them:
#: provider credentials and the settings programs need to reach the network. Nothing else
#: of the server's environment reaches terraform.
PASSED_ENV = (
    "PATH",
    "HOME",
    "TMPDIR",
    "LANG",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "NO_PROXY",
    "https_proxy",
    "http_proxy",
    "no_proxy",
    "DIGITALOCEAN_TOKEN",
    "DIGITALOCEAN_ACCESS_TOKEN",
    "SPACES_ACCESS_KEY_ID",
    "SPACES_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CA_BUNDLE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
)

# -- the typed configuration -----------------------------------------------------------


@dataclass(frozen=True)
class LocalSettings:
    """State in files under the state folder."""

    name: Literal["local"] = "local"


@dataclass(frozen=True)
class S3Settings:
    """Where remote state lives and how it is locked."""

    bucket: str
    region: str
    key_prefix: str = default("TF_STATE_KEY_PREFIX")
    lock_table: str | None = None
    use_lockfile: bool = default("TF_STATE_USE_LOCKFILE")
    endpoint: str | None = None
    dynamodb_endpoint: str | None = None
    name: Literal["s3"] = "s3"


BackendSettings = LocalSettings | S3Settings


@dataclass(frozen=True)
class AuthSettings:
    """How tokens are checked (used when `Config.auth == "jwt"`)."""

    issuer: str = ""
    jwk_url: str = ""
    client_ids: frozenset[str] = frozenset()
    scope_prefix: str = default("TFSERVER_SCOPE_PREFIX")
    admin_scopes: frozenset[str] = frozenset()
    leeway: float = default("TFSERVER_JWT_LEEWAY")
    jwks_timeout: float = default("TFSERVER_JWKS_TIMEOUT")
    jwks_min_refresh: float = default("TFSERVER_JWKS_MIN_REFRESH")
    jwks_cache_ttl: float = default("TFSERVER_JWKS_CACHE_TTL")
    #: Where clients get tokens (client credentials): shown in the OpenAPI document.
    token_url: str = ""


@dataclass(frozen=True)
class AcmeSettings:
    """Obtain and renew the server certificate from an ACME CA."""

    domains: tuple[str, ...]
    email: str | None = None
    directory: str = default("TFSERVER_ACME_DIRECTORY")
    ca_bundle: str | None = None
    http_port: int = default("TFSERVER_HTTP_PORT")
    #: Renew when less than this many seconds are left (None: a third of the lifetime).
    renew_before: float | None = None
    #: How often the renewer looks at the certificate.
    check_interval: float = default("TFSERVER_ACME_CHECK_INTERVAL")


@dataclass(frozen=True)
class QueueSettings:
    """The run engine: `local` lanes, or the `sqs` queue and this replica's role."""

    engine: Literal["local", "sqs"] = "local"
    url: str = ""
    endpoint: str | None = None
    region: str | None = None
    role: Literal["all", "api", "worker"] = "all"
    resume_lost: int = default("TFSERVER_RESUME_LOST")
    visibility: int = default("TFSERVER_SQS_VISIBILITY")

    @property
    def serves_api(self) -> bool:
        """This replica answers the API (every role but `worker`)."""
        return self.role != "worker"

    @property
    def runs_terraform(self) -> bool:
        """This replica starts terraform (every role but `api` of the `sqs` engine)."""
        return self.engine == "local" or self.role != "api"


@dataclass(frozen=True)
class Config:
    """Everything the server needs, built once at start."""

    host: str = default("TFSERVER_HOST")
    port: int = default("TFSERVER_PORT")
    modules_dir: Path = default("TFSERVER_MODULES_DIR")
    state_dir: Path = default("TFSERVER_STATE_DIR")
    auth: Literal["none", "jwt"] = "none"
    auth_settings: AuthSettings = field(default_factory=AuthSettings)
    backend: BackendSettings = field(default_factory=LocalSettings)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    acme: AcmeSettings | None = None
    max_body: int = default("TFSERVER_MAX_BODY")
    max_depth: int = default("TFSERVER_MAX_DEPTH")
    run_timeout: float = default("TFSERVER_RUN_TIMEOUT")
    max_runs: int = default("TFSERVER_MAX_RUNS")
    lock_wait: float = default("TFSERVER_LOCK_WAIT")
    kill_grace: float = default("TFSERVER_KILL_GRACE")
    shutdown_grace: float = default("TFSERVER_SHUTDOWN_GRACE")
    read_timeout: float = default("TFSERVER_READ_TIMEOUT")
    max_connections: int = default("TFSERVER_MAX_CONNECTIONS")
    max_connections_per_ip: int = default("TFSERVER_MAX_CONNECTIONS_PER_IP")
    request_timeout: float = default("TFSERVER_REQUEST_TIMEOUT")
    health_connections: int = default("TFSERVER_HEALTH_CONNECTIONS")
    max_streams_per_tenant: int = default("TFSERVER_MAX_STREAMS_PER_TENANT")
    stream_max: float = default("TFSERVER_STREAM_MAX")
    queue_depth: int = default("TFSERVER_QUEUE_DEPTH")
    queue: QueueSettings = field(default_factory=QueueSettings)
    plan_ttl: float = default("TFSERVER_PLAN_TTL")
    run_retention: float = default("TFSERVER_RUN_RETENTION")
    archive_retention: float = default("TFSERVER_ARCHIVE_RETENTION")
    idempotency_ttl: float = default("TFSERVER_IDEMPOTENCY_TTL")
    #: The governance policy file (None: no quotas, TTLs or narrowed values).
    policy: Path | None = None
    replica: str | None = None
    reap_interval: float = default("TFSERVER_REAP_INTERVAL")
    #: Scheduled drift checks at once (all replicas), and the shortest schedule allowed.
    max_drift_checks: int = default("TFSERVER_MAX_DRIFT_CHECKS")
    drift_check_min: float = default("TFSERVER_DRIFT_CHECK_MIN")
    #: How long a webhook delivery is retried, and the targets allowed besides public ones.
    webhook_retry: float = default("TFSERVER_WEBHOOK_RETRY")
    webhook_allow: tuple[str, ...] = ()
    #: Where the short-lived var files go; None picks a private folder on tmpfs if any.
    tmp_dir: Path | None = None
    terraform_bin: str = default("TFSERVER_TERRAFORM")
    run_memory: int = default("TFSERVER_RUN_MEMORY")
    #: The CPU the server's threads keep to: a number, "auto", or None (any).
    pin_cpu: int | str | None = default("TFSERVER_PIN_CPU")
    cli_config_file: Path | None = None
    provider_mirror: Path | None = None
    log_level: str = default("TFSERVER_LOG_LEVEL")
    log_format: str = default("TFSERVER_LOG_FORMAT")
    trusted_proxies: tuple[Network, ...] = ()
    #: What terraform gets of the server's environment (see PASSED_ENV); never logged.
    terraform_env: Mapping[str, str] = field(default_factory=dict, repr=False)


def is_loopback(host: str) -> bool:
    """True for an address (or `localhost`) that only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- the command line ------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    """The command line of `tfserver` (serve); its help lists every setting."""
    env_only = "\n".join(
        f"  {s.env}" + (f" [{s.shown_default}]" if s.shown_default else "") + f": {s.help}"
        for s in SETTINGS if s.flag is None)
    p = argparse.ArgumentParser(
        prog="tfserver",
        description="Serve Terraform modules as an HTTP API: POST/PUT apply, DELETE destroys.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Every flag has an environment variable (shown in brackets); flags win.\n"
            "Settings from the environment only:\n" + env_only + "\n\n"
            "'tfserver token' prints a Cognito access token (client credentials);\n"
            "'tfserver run METHOD URL [-d JSON]' starts a run and follows it."
        ).replace("`", ""),
    )
    p.add_argument("--version", action="version", version=f"tfserver {__version__}")
    for s in SETTINGS:
        if s.flag is not None:
            shown = f", {s.shown_default}" if s.shown_default else ""
            p.add_argument(s.flag, dest=s.env, metavar=s.flag[2:].upper().replace("-", "_"),
                           help=f"{s.help} [{s.env}{shown}]".replace("`", ""))
    return p


# -- loading ---------------------------------------------------------------------------


def _values(argv: Sequence[str], environ: Mapping[str, str]) -> dict[str, Any]:
    """Every setting's typed value: the flag, else the variable, else the default.

    An empty variable counts as unset (as shells and container platforms write them).
    """
    args = vars(parser().parse_args(list(argv)))
    values: dict[str, Any] = {}
    for s in SETTINGS:
        raw = args.get(s.env)
        if raw is None:
            raw = environ.get(s.env)
        if raw is None or not raw.strip():
            values[s.env] = s.default
            continue
        try:
            values[s.env] = s.parse(raw)
        except ValueError as e:
            shown = raw if len(raw) <= 60 else raw[:57] + "..."
            raise ConfigError(f"{s.env} {e}, not {shown!r}") from None
    return values


def load(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """Build the `Config` from command-line arguments and an environment."""
    v = _values(argv, environ)
    host: str = v["TFSERVER_HOST"]
    issuer = (v["COGNITO_ISSUER"] or "").rstrip("/")
    auth: Literal["none", "jwt"] = v["TFSERVER_AUTH"] or ("jwt" if issuer else "none")
    if auth == "none" and not is_loopback(host):
        raise ConfigError(f"refusing to serve without authentication on {host}: set "
                          "TFSERVER_AUTH=jwt with COGNITO_ISSUER, or listen on a loopback address")
    if auth == "jwt" and not issuer:
        raise ConfigError("TFSERVER_AUTH=jwt needs COGNITO_ISSUER")
    cert, key = v["TFSERVER_TLS_CERT"], v["TFSERVER_TLS_KEY"]
    if (cert is None) != (key is None):
        raise ConfigError("TFSERVER_TLS_CERT and TFSERVER_TLS_KEY go together")
    if cert is not None and v["TFSERVER_ACME_DOMAINS"]:
        raise ConfigError("set either TFSERVER_TLS_CERT/KEY or TFSERVER_ACME_DOMAINS")
    cli_config: Path | None = v["TF_CLI_CONFIG_FILE"]
    return Config(
        host=host,
        port=v["TFSERVER_PORT"],
        modules_dir=v["TFSERVER_MODULES_DIR"].absolute(),
        state_dir=v["TFSERVER_STATE_DIR"].absolute(),
        auth=auth,
        auth_settings=_auth_settings(v, issuer),
        backend=_backend_settings(v, environ),
        tls_cert=cert,
        tls_key=key,
        acme=_acme_settings(v),
        max_body=v["TFSERVER_MAX_BODY"],
        max_depth=v["TFSERVER_MAX_DEPTH"],
        run_timeout=v["TFSERVER_RUN_TIMEOUT"],
        max_runs=v["TFSERVER_MAX_RUNS"],
        lock_wait=v["TFSERVER_LOCK_WAIT"],
        kill_grace=v["TFSERVER_KILL_GRACE"],
        shutdown_grace=v["TFSERVER_SHUTDOWN_GRACE"],
        **_connection_limits(v),
        queue_depth=v["TFSERVER_QUEUE_DEPTH"],
        queue=_queue_settings(v),
        plan_ttl=v["TFSERVER_PLAN_TTL"],
        run_retention=v["TFSERVER_RUN_RETENTION"],
        archive_retention=v["TFSERVER_ARCHIVE_RETENTION"],
        idempotency_ttl=v["TFSERVER_IDEMPOTENCY_TTL"],
        policy=v["TFSERVER_POLICY"],
        replica=v["TFSERVER_REPLICA_ID"],
        reap_interval=v["TFSERVER_REAP_INTERVAL"],
        max_drift_checks=v["TFSERVER_MAX_DRIFT_CHECKS"],
        drift_check_min=v["TFSERVER_DRIFT_CHECK_MIN"],
        webhook_retry=v["TFSERVER_WEBHOOK_RETRY"],
        webhook_allow=v["TFSERVER_WEBHOOK_ALLOW"],
        tmp_dir=v["TFSERVER_TMP_DIR"],
        terraform_bin=v["TFSERVER_TERRAFORM"],
        run_memory=v["TFSERVER_RUN_MEMORY"],
        pin_cpu=v["TFSERVER_PIN_CPU"],
        cli_config_file=cli_config if cli_config is not None and cli_config.is_file() else None,
        provider_mirror=v["TFSERVER_PROVIDER_MIRROR"],
        log_level=v["TFSERVER_LOG_LEVEL"],
        log_format=v["TFSERVER_LOG_FORMAT"],
        trusted_proxies=v["TFSERVER_TRUSTED_PROXIES"],
        terraform_env=_terraform_env(environ, v["TFSERVER_PASS_ENV"]),
    )


def _queue_settings(v: Mapping[str, Any]) -> QueueSettings:
    engine: Literal["local", "sqs"] = v["TFSERVER_QUEUE"]
    if engine == "local":
        # One process runs what it accepts: every role is `all`.
        return QueueSettings(resume_lost=v["TFSERVER_RESUME_LOST"])
    if not v["TFSERVER_QUEUE_URL"]:
        raise ConfigError("TFSERVER_QUEUE=sqs needs TFSERVER_QUEUE_URL")
    return QueueSettings(engine, v["TFSERVER_QUEUE_URL"], v["TFSERVER_SQS_ENDPOINT"],
                         v["TFSERVER_SQS_REGION"], v["TFSERVER_ROLE"],
                         v["TFSERVER_RESUME_LOST"], v["TFSERVER_SQS_VISIBILITY"])


def _connection_limits(v: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of what a client may hold: connections, streams, how long it may take."""
    return {
        "read_timeout": v["TFSERVER_READ_TIMEOUT"],
        "max_connections": v["TFSERVER_MAX_CONNECTIONS"],
        "max_connections_per_ip": v["TFSERVER_MAX_CONNECTIONS_PER_IP"],
        "request_timeout": v["TFSERVER_REQUEST_TIMEOUT"],
        "health_connections": v["TFSERVER_HEALTH_CONNECTIONS"],
        "max_streams_per_tenant": v["TFSERVER_MAX_STREAMS_PER_TENANT"],
        "stream_max": v["TFSERVER_STREAM_MAX"],
    }


def _auth_settings(v: Mapping[str, Any], issuer: str) -> AuthSettings:
    return AuthSettings(
        issuer=issuer,
        jwk_url=v["JWK_URL"] or (issuer + "/.well-known/jwks.json" if issuer else ""),
        client_ids=v["TFSERVER_CLIENT_IDS"],
        scope_prefix=v["TFSERVER_SCOPE_PREFIX"],
        admin_scopes=v["TFSERVER_ADMIN_SCOPES"],
        leeway=v["TFSERVER_JWT_LEEWAY"],
        jwks_timeout=v["TFSERVER_JWKS_TIMEOUT"],
        jwks_min_refresh=v["TFSERVER_JWKS_MIN_REFRESH"],
        jwks_cache_ttl=v["TFSERVER_JWKS_CACHE_TTL"],
        token_url=_token_url(v, issuer),
    )


def _token_url(v: Mapping[str, Any], issuer: str) -> str:
    """TFSERVER_TOKEN_URL, else the token endpoint of COGNITO_DOMAIN (as `tfserver token`
    finds it), else a guess from the issuer (an OAuth server's usual path)."""
    if v["TFSERVER_TOKEN_URL"]:
        return str(v["TFSERVER_TOKEN_URL"])
    domain = (v["COGNITO_DOMAIN"] or "").rstrip("/")
    if domain:
        return (domain if "://" in domain else f"https://{domain}") + "/oauth2/token"
    return issuer + "/oauth2/token" if issuer else ""


def _backend_settings(v: Mapping[str, Any], environ: Mapping[str, str]) -> BackendSettings:
    if v["TFSERVER_BACKEND"] == "local":
        return LocalSettings()
    bucket = v["TF_STATE_BUCKET"]
    if not bucket:
        raise ConfigError("TFSERVER_BACKEND=s3 needs TF_STATE_BUCKET")
    settings = S3Settings(
        bucket=bucket,
        region=v["TF_STATE_REGION"] or environ.get("AWS_REGION") or "us-east-1",
        key_prefix=v["TF_STATE_KEY_PREFIX"].strip("/"),
        lock_table=v["TF_STATE_LOCK_TABLE"],
        use_lockfile=v["TF_STATE_USE_LOCKFILE"],
        endpoint=v["TF_STATE_ENDPOINT"],
        dynamodb_endpoint=v["TF_STATE_DYNAMODB_ENDPOINT"],
    )
    if not settings.lock_table and not settings.use_lockfile:
        raise ConfigError(
            "the s3 backend needs a lock: set TF_STATE_LOCK_TABLE or TF_STATE_USE_LOCKFILE")
    return settings


def _acme_settings(v: Mapping[str, Any]) -> AcmeSettings | None:
    if not v["TFSERVER_ACME_DOMAINS"]:
        return None
    return AcmeSettings(
        domains=v["TFSERVER_ACME_DOMAINS"],
        email=v["TFSERVER_ACME_EMAIL"],
        directory=v["TFSERVER_ACME_DIRECTORY"],
        ca_bundle=v["TFSERVER_ACME_CA_BUNDLE"],
        http_port=v["TFSERVER_HTTP_PORT"],
        renew_before=v["TFSERVER_ACME_RENEW_BEFORE"],
        check_interval=v["TFSERVER_ACME_CHECK_INTERVAL"],
    )


def _terraform_env(environ: Mapping[str, str], extra: frozenset[str]) -> dict[str, str]:
    env = {k: environ[k] for k in PASSED_ENV if environ.get(k)}
    # The original read DIGITALOCEAN_API_TOKEN; the provider reads DIGITALOCEAN_TOKEN.
    if "DIGITALOCEAN_TOKEN" not in env and environ.get("DIGITALOCEAN_API_TOKEN"):
        env["DIGITALOCEAN_TOKEN"] = environ["DIGITALOCEAN_API_TOKEN"]
    for name in extra:
        if environ.get(name):
            env[name] = environ[name]
    return env
