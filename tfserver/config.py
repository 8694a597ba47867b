"""Configuration: command-line flags and environment variables into one frozen `Config`.

Every flag has an environment variable and flags win. `load(argv, environ)` is pure: it
reads only what it is given, so tests build configs without touching `os.environ`.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

#: The repository's modules folder, served when nothing else is configured.
DEFAULT_MODULES_DIR = Path(__file__).resolve().parent.parent / "modules"

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

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class S3Settings:
    """Where remote state lives and how it is locked."""

    bucket: str
    region: str
    key_prefix: str = "tfserver"
    lock_table: str | None = None
    use_lockfile: bool = True
    endpoint: str | None = None
    dynamodb_endpoint: str | None = None


@dataclass(frozen=True)
class AuthSettings:
    """How tokens are checked (used when `Config.auth == "jwt"`)."""

    issuer: str = ""
    jwk_url: str = ""
    client_ids: frozenset[str] = frozenset()
    scope_prefix: str = "tfserver"
    admin_scopes: frozenset[str] = frozenset()
    leeway: float = 30.0
    jwks_timeout: float = 5.0
    jwks_min_refresh: float = 60.0
    jwks_cache_ttl: float = 3600.0


@dataclass(frozen=True)
class AcmeSettings:
    """Obtain and renew the server certificate from an ACME CA."""

    domains: tuple[str, ...]
    email: str | None = None
    directory: str = "https://acme-v02.api.letsencrypt.org/directory"
    ca_bundle: str | None = None
    http_port: int = 80
    #: Renew when less than this many seconds are left (None: a third of the lifetime).
    renew_before: float | None = None
    #: How often the renewer looks at the certificate.
    check_interval: float = 12 * 3600.0


@dataclass(frozen=True)
class Config:
    """Everything the server needs, built once at start."""

    host: str = "127.0.0.1"
    port: int = 8000
    modules_dir: Path = DEFAULT_MODULES_DIR
    state_dir: Path = Path(".tfserver")
    auth: str = "none"
    auth_settings: AuthSettings = field(default_factory=AuthSettings)
    backend: str = "local"
    s3: S3Settings | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    acme: AcmeSettings | None = None
    max_body: int = 1024 * 1024
    run_timeout: float = 1800.0
    max_runs: int = 4
    lock_wait: float = 0.0
    kill_grace: float = 10.0
    shutdown_grace: float = 60.0
    read_timeout: float = 30.0
    max_connections: int = 256
    #: Where the short-lived var files go; None picks a private folder on tmpfs if any.
    tmp_dir: Path | None = None
    terraform_bin: str = "terraform"
    cli_config_file: Path | None = None
    provider_mirror: Path | None = None
    log_level: str = "INFO"
    #: What terraform gets of the server's environment (see PASSED_ENV); never logged.
    terraform_env: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def tls_enabled(self) -> bool:
        """True when the server speaks HTTPS itself."""
        return self.acme is not None or self.tls_cert is not None


def is_loopback(host: str) -> bool:
    """True for an address (or `localhost`) that only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _flag_or_env(value: str | None, environ: Mapping[str, str], name: str) -> str | None:
    if value is not None:
        return value
    got = environ.get(name)
    return got if got not in (None, "") else None


def _number(raw: str | None, name: str, default: float, *, minimum: float = 0) -> float:
    if raw is None:
        return default
    text = raw.strip().lower()
    scale = 1.0
    for suffix, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(suffix) and text[: -len(suffix)].replace(".", "", 1).isdigit():
            text, scale = text[: -len(suffix)], factor
            break
    try:
        value = float(text) * scale
    except ValueError:
        raise ConfigError(f"{name} must be a number, not {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, not {raw!r}")
    return value


def _size(raw: str | None, name: str, default: int) -> int:
    if raw is None:
        return default
    text = raw.strip()
    units = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "k": 1000, "M": 1000**2}
    for unit, factor in units.items():
        if text.endswith(unit) and text[: -len(unit)].isdigit():
            return int(text[: -len(unit)]) * factor
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise ConfigError(f"{name} must be a size in bytes (or with KiB/MiB), not {raw!r}")


def _bool(raw: str | None, name: str, default: bool) -> bool:
    if raw is None:
        return default
    text = raw.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, not {raw!r}")


def _words(raw: str | None) -> frozenset[str]:
    return frozenset(w.strip() for w in (raw or "").split(",") if w.strip())


def parser() -> argparse.ArgumentParser:
    """The command line of `tfserver` (serve) with its environment variables in the help."""
    p = argparse.ArgumentParser(
        prog="tfserver",
        description="Serve Terraform modules as an HTTP API: POST/PUT apply, DELETE destroys.",
        epilog=(
            "Every flag has an environment variable (shown in brackets); flags win. "
            "More settings are environment-only: see README.md. "
            "'tfserver token' fetches a Cognito access token (client credentials)."
        ),
    )
    p.add_argument("--host", help="listen address [TFSERVER_HOST, 127.0.0.1]")
    p.add_argument("--port", type=int, help="listen port [TFSERVER_PORT, 8000]")
    p.add_argument("--modules-dir", help="folder of modules [TFSERVER_MODULES_DIR]")
    p.add_argument("--state-dir", help="working copies, local state [TFSERVER_STATE_DIR]")
    p.add_argument(
        "--auth", choices=("none", "jwt"), help="[TFSERVER_AUTH, jwt when COGNITO_ISSUER is set]"
    )
    p.add_argument("--backend", choices=("local", "s3"), help="[TFSERVER_BACKEND, local]")
    p.add_argument("--terraform", help="terraform binary [TFSERVER_TERRAFORM, terraform]")
    p.add_argument("--log-level", help="[TFSERVER_LOG_LEVEL, INFO]")
    return p


def load(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """Build the `Config` from command-line arguments and an environment."""
    args = parser().parse_args(list(argv))
    env = environ

    def get(flag: str | None, name: str) -> str | None:
        return _flag_or_env(flag, env, name)

    host = get(args.host, "TFSERVER_HOST") or "127.0.0.1"
    port = int(_number(get(None if args.port is None else str(args.port), "TFSERVER_PORT"),
                       "TFSERVER_PORT", 8000))
    if not 0 <= port <= 65535:
        raise ConfigError(f"TFSERVER_PORT must be a port number, not {port}")

    issuer = (env.get("COGNITO_ISSUER") or "").rstrip("/")
    auth = get(args.auth, "TFSERVER_AUTH") or ("jwt" if issuer else "none")
    if auth not in ("none", "jwt"):
        raise ConfigError(f"TFSERVER_AUTH must be none or jwt, not {auth!r}")
    if auth == "none" and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve without authentication on {host}: "
            "set TFSERVER_AUTH=jwt with COGNITO_ISSUER, or listen on a loopback address"
        )
    if auth == "jwt" and not issuer:
        raise ConfigError("TFSERVER_AUTH=jwt needs COGNITO_ISSUER")
    auth_settings = AuthSettings(
        issuer=issuer,
        jwk_url=env.get("JWK_URL") or (issuer + "/.well-known/jwks.json" if issuer else ""),
        client_ids=_words(env.get("TFSERVER_CLIENT_IDS")),
        scope_prefix=env.get("TFSERVER_SCOPE_PREFIX") or "tfserver",
        admin_scopes=_words(env.get("TFSERVER_ADMIN_SCOPES")),
        leeway=_number(env.get("TFSERVER_JWT_LEEWAY"), "TFSERVER_JWT_LEEWAY", 30.0),
        jwks_timeout=_number(env.get("TFSERVER_JWKS_TIMEOUT"), "TFSERVER_JWKS_TIMEOUT", 5.0,
                             minimum=0.1),
        jwks_min_refresh=_number(env.get("TFSERVER_JWKS_MIN_REFRESH"),
                                 "TFSERVER_JWKS_MIN_REFRESH", 60.0),
        jwks_cache_ttl=_number(env.get("TFSERVER_JWKS_CACHE_TTL"), "TFSERVER_JWKS_CACHE_TTL",
                               3600.0, minimum=1),
    )

    backend = get(args.backend, "TFSERVER_BACKEND") or "local"
    s3: S3Settings | None = None
    if backend == "s3":
        bucket = env.get("TF_STATE_BUCKET")
        if not bucket:
            raise ConfigError("TFSERVER_BACKEND=s3 needs TF_STATE_BUCKET")
        s3 = S3Settings(
            bucket=bucket,
            region=env.get("TF_STATE_REGION") or env.get("AWS_REGION") or "us-east-1",
            key_prefix=(env.get("TF_STATE_KEY_PREFIX") or "tfserver").strip("/"),
            lock_table=env.get("TF_STATE_LOCK_TABLE") or None,
            use_lockfile=_bool(env.get("TF_STATE_USE_LOCKFILE"), "TF_STATE_USE_LOCKFILE", True),
            endpoint=env.get("TF_STATE_ENDPOINT") or None,
            dynamodb_endpoint=env.get("TF_STATE_DYNAMODB_ENDPOINT") or None,
        )
        if not s3.lock_table and not s3.use_lockfile:
            raise ConfigError(
                "the s3 backend needs a lock: set TF_STATE_LOCK_TABLE or TF_STATE_USE_LOCKFILE"
            )
    elif backend != "local":
        raise ConfigError(f"TFSERVER_BACKEND must be local or s3, not {backend!r}")

    cert, key = env.get("TFSERVER_TLS_CERT"), env.get("TFSERVER_TLS_KEY")
    if bool(cert) != bool(key):
        raise ConfigError("TFSERVER_TLS_CERT and TFSERVER_TLS_KEY go together")
    acme: AcmeSettings | None = None
    domains = tuple(sorted(_words(env.get("TFSERVER_ACME_DOMAINS"))))
    if domains:
        if cert:
            raise ConfigError("set either TFSERVER_TLS_CERT/KEY or TFSERVER_ACME_DOMAINS")
        acme = AcmeSettings(
            domains=domains,
            email=env.get("TFSERVER_ACME_EMAIL") or None,
            directory=env.get("TFSERVER_ACME_DIRECTORY") or AcmeSettings.directory,
            ca_bundle=env.get("TFSERVER_ACME_CA_BUNDLE") or None,
            http_port=int(_number(env.get("TFSERVER_HTTP_PORT"), "TFSERVER_HTTP_PORT", 80)),
            renew_before=(_number(env.get("TFSERVER_ACME_RENEW_BEFORE"),
                                  "TFSERVER_ACME_RENEW_BEFORE", 0)
                          if env.get("TFSERVER_ACME_RENEW_BEFORE") else None),
            check_interval=_number(env.get("TFSERVER_ACME_CHECK_INTERVAL"),
                                   "TFSERVER_ACME_CHECK_INTERVAL", 12 * 3600.0, minimum=1),
        )

    terraform_env = {k: env[k] for k in PASSED_ENV if env.get(k)}
    # The original read DIGITALOCEAN_API_TOKEN; the provider reads DIGITALOCEAN_TOKEN.
    if "DIGITALOCEAN_TOKEN" not in terraform_env and env.get("DIGITALOCEAN_API_TOKEN"):
        terraform_env["DIGITALOCEAN_TOKEN"] = env["DIGITALOCEAN_API_TOKEN"]
    for extra in _words(env.get("TFSERVER_PASS_ENV")):
        if env.get(extra):
            terraform_env[extra] = env[extra]

    cli_config = env.get("TF_CLI_CONFIG_FILE")
    mirror = env.get("TFSERVER_PROVIDER_MIRROR")
    state_dir = Path(get(args.state_dir, "TFSERVER_STATE_DIR") or ".tfserver")
    return Config(
        host=host,
        port=port,
        modules_dir=Path(get(args.modules_dir, "TFSERVER_MODULES_DIR") or DEFAULT_MODULES_DIR),
        state_dir=state_dir.absolute(),
        auth=auth,
        auth_settings=auth_settings,
        backend=backend,
        s3=s3,
        tls_cert=Path(cert) if cert else None,
        tls_key=Path(key) if key else None,
        acme=acme,
        max_body=_size(env.get("TFSERVER_MAX_BODY"), "TFSERVER_MAX_BODY", 1024 * 1024),
        run_timeout=_number(env.get("TFSERVER_RUN_TIMEOUT"), "TFSERVER_RUN_TIMEOUT", 1800.0,
                            minimum=0.1),
        max_runs=int(_number(env.get("TFSERVER_MAX_RUNS"), "TFSERVER_MAX_RUNS", 4, minimum=1)),
        lock_wait=_number(env.get("TFSERVER_LOCK_WAIT"), "TFSERVER_LOCK_WAIT", 0.0),
        kill_grace=_number(env.get("TFSERVER_KILL_GRACE"), "TFSERVER_KILL_GRACE", 10.0),
        shutdown_grace=_number(env.get("TFSERVER_SHUTDOWN_GRACE"), "TFSERVER_SHUTDOWN_GRACE",
                               60.0),
        read_timeout=_number(env.get("TFSERVER_READ_TIMEOUT"), "TFSERVER_READ_TIMEOUT", 30.0,
                             minimum=0.1),
        tmp_dir=Path(env["TFSERVER_TMP_DIR"]) if env.get("TFSERVER_TMP_DIR") else None,
        max_connections=int(_number(env.get("TFSERVER_MAX_CONNECTIONS"),
                                    "TFSERVER_MAX_CONNECTIONS", 256, minimum=1)),
        terraform_bin=get(args.terraform, "TFSERVER_TERRAFORM") or "terraform",
        cli_config_file=Path(cli_config) if cli_config and Path(cli_config).is_file() else None,
        provider_mirror=Path(mirror) if mirror else None,
        log_level=(get(args.log_level, "TFSERVER_LOG_LEVEL") or "INFO").upper(),
        terraform_env=terraform_env,
    )
