"""Configuration: one table of settings drives parsing, `--help` and README's table.

Every setting is an environment variable; a few also have a command-line flag, and flags
win. `load(argv, environ)` is pure: it reads only what it is given, so tests build configs
without touching `os.environ`. A bad value is a `ConfigError` naming the setting, which
`__main__` prints as one line before exiting with status 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import __version__
from .errors import ConfigError

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

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"

# -- parsers: text in, a typed value out, or ValueError with the reason -------------------

Parser = Callable[[str], Any]

_DURATION = re.compile(r"^(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h|d)?$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^(\d+)\s*(KiB|MiB|GiB|k|M|G)?$")
_SIZE_UNITS = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "k": 1000, "M": 1000**2,
               "G": 1000**3, None: 1}


def parse_bool(text: str) -> bool:
    """`true/yes/on/1` or `false/no/off/0`, any case; else ValueError."""
    word = text.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def parse_duration(text: str) -> float:
    """Seconds from `90`, `1.5`, `500ms`, `90s`, `5m`, `24h` or `7d`."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError("must be a duration such as 90, 90s, 5m, 24h or 7d")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def _text(text: str) -> str:
    return text.strip()


def _integer(low: int, high: int | None = None) -> Parser:
    def parse(text: str) -> int:
        if not text.strip().isdigit() or not text.strip().isascii():
            raise ValueError("must be a whole number")
        value = int(text.strip())
        if value < low or (high is not None and value > high):
            raise ValueError(f"must be between {low} and {high}" if high is not None
                             else f"must be at least {low}")
        return value
    return parse


def _duration(low: float = 0.0) -> Parser:
    def parse(text: str) -> float:
        value = parse_duration(text)
        if value < low:
            raise ValueError(f"must be at least {low:g}s")
        return value
    return parse


def _size(low: int = 1) -> Parser:
    def parse(text: str) -> int:
        m = _SIZE.match(text.strip())
        if not m:
            raise ValueError("must be a size in bytes, or with KiB, MiB or GiB")
        value = int(m.group(1)) * _SIZE_UNITS[m.group(2)]
        if value < low:
            raise ValueError(f"must be at least {low} bytes")
        return value
    return parse


def _choice(*values: str, fold: Callable[[str], str] = str.lower) -> Parser:
    def parse(text: str) -> str:
        word = fold(text.strip())
        if word not in values:
            raise ValueError(f"must be one of {', '.join(values)}")
        return word
    return parse


def _path(text: str) -> Path:
    return Path(text.strip())


def _words(text: str) -> frozenset[str]:
    return frozenset(w.strip() for w in text.split(",") if w.strip())


def _domains(text: str) -> tuple[str, ...]:
    return tuple(sorted(_words(text)))


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(text: str) -> tuple[Network, ...]:
    found = []
    for word in sorted(_words(text)):
        try:
            found.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            raise ValueError(f"must be addresses or CIDRs; {word[:40]!r} is neither") from None
    return tuple(found)


# -- the table ------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One setting: its variable, optional flag, parser, typed default and meaning."""

    env: str
    parse: Parser
    default: Any
    help: str
    flag: str | None = None
    #: How the default reads in `--help` and README, when `str(default)` would not do.
    shown: str | None = None

    @property
    def shown_default(self) -> str:
        """The default as documentation shows it."""
        if self.shown is not None:
            return self.shown
        if self.default in (None, frozenset(), ()):
            return ""
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        return str(self.default)


MiB = 1024 * 1024

SETTINGS: tuple[Setting, ...] = (
    Setting("TFSERVER_HOST", _text, "127.0.0.1", "listen address", flag="--host"),
    Setting("TFSERVER_PORT", _integer(0, 65535), 8000, "listen port (0 picks a free one)",
            flag="--port"),
    Setting("TFSERVER_MODULES_DIR", _path, Path("modules"),
            "each subfolder with `*.tf` or `*.tf.json` files is served at `/<folder>`",
            flag="--modules-dir", shown="`./modules` (of the working directory)"),
    Setting("TFSERVER_STATE_DIR", _path, Path(".tfserver"),
            "working copies, local state, kept inputs, temp var files", flag="--state-dir",
            shown="`.tfserver/`"),
    Setting("TFSERVER_AUTH", _choice("none", "jwt"), None,
            "`none` refuses to start on a non-loopback address", flag="--auth",
            shown="`jwt` if `COGNITO_ISSUER` is set, else `none`"),
    Setting("COGNITO_ISSUER", _text, None, "token issuer to require (turns auth on)"),
    Setting("JWK_URL", _text, None, "where the issuer's signing keys are",
            shown="issuer + `/.well-known/jwks.json`"),
    Setting("TFSERVER_CLIENT_IDS", _words, frozenset(),
            "comma list of accepted `client_id` claims", shown="any"),
    Setting("TFSERVER_SCOPE_PREFIX", _text, "tfserver",
            "scopes are `<prefix>/<module>.read`, `.write` and `<prefix>/admin`"),
    Setting("TFSERVER_ADMIN_SCOPES", _words, frozenset(),
            "comma list of other scopes that count as admin"),
    Setting("TFSERVER_JWT_LEEWAY", _duration(), 30.0, "clock skew allowed on token times",
            shown="30 s"),
    Setting("TFSERVER_JWKS_TIMEOUT", _duration(0.1), 5.0, "timeout of one JWKS fetch",
            shown="5 s"),
    Setting("TFSERVER_JWKS_MIN_REFRESH", _duration(), 60.0,
            "at most one JWKS fetch this often for unknown key ids", shown="60 s"),
    Setting("TFSERVER_JWKS_CACHE_TTL", _duration(1.0), 3600.0,
            "how long fetched keys are used before a refresh", shown="1 h"),
    Setting("COGNITO_DOMAIN", _text, None,
            "the user pool's domain (`<prefix>.auth.<region>.amazoncognito.com`)"),
    Setting("TFSERVER_TOKEN_URL", _text, None,
            "client-credentials token endpoint, as the OpenAPI document and `tfserver "
            "token` name it", shown="`https://$COGNITO_DOMAIN/oauth2/token`, else the "
            "issuer's `/oauth2/token`"),
    Setting("TFSERVER_BACKEND", _choice("local", "s3"), "local",
            "where state lives: `local` or `s3`", flag="--backend"),
    Setting("TF_STATE_BUCKET", _text, None, "S3 bucket of the state (s3 backend)"),
    Setting("TF_STATE_REGION", _text, None, "its region", shown="`AWS_REGION`, else us-east-1"),
    Setting("TF_STATE_KEY_PREFIX", _text, "tfserver", "key prefix of everything tfserver keeps"),
    Setting("TF_STATE_LOCK_TABLE", _text, None, "DynamoDB lock table"),
    Setting("TF_STATE_USE_LOCKFILE", parse_bool, True,
            "S3-native lock file; at least one lock is required"),
    Setting("TF_STATE_ENDPOINT", _text, None, "S3-compatible endpoint (Spaces, MinIO, tests)",
            shown="AWS"),
    Setting("TF_STATE_DYNAMODB_ENDPOINT", _text, None, "DynamoDB endpoint",
            shown="`TF_STATE_ENDPOINT`"),
    Setting("TFSERVER_TLS_CERT", _path, None, "serve HTTPS with this certificate chain"),
    Setting("TFSERVER_TLS_KEY", _path, None, "and this key"),
    Setting("TFSERVER_ACME_DOMAINS", _domains, (),
            "obtain and renew a certificate for these names (comma list)"),
    Setting("TFSERVER_ACME_EMAIL", _text, None, "contact address of the ACME account"),
    Setting("TFSERVER_ACME_DIRECTORY", _text, LETS_ENCRYPT, "the ACME CA",
            shown="Let's Encrypt production"),
    Setting("TFSERVER_ACME_CA_BUNDLE", _text, None, "CA bundle to trust the ACME CA with",
            shown="system CAs"),
    Setting("TFSERVER_HTTP_PORT", _integer(0, 65535), 80,
            "plain HTTP port: HTTP-01 challenges, redirects to HTTPS"),
    Setting("TFSERVER_ACME_RENEW_BEFORE", _duration(), None,
            "renew when less than this is left", shown="a third of the lifetime"),
    Setting("TFSERVER_ACME_CHECK_INTERVAL", _duration(1.0), 12 * 3600.0,
            "how often the certificate is looked at", shown="12 h"),
    Setting("TFSERVER_MAX_BODY", _size(1), MiB, "largest request body (`2MiB`, `512KiB`)",
            shown="1 MiB"),
    Setting("TFSERVER_MAX_DEPTH", _integer(1, 1000), 32,
            "deepest nesting of arrays and objects in a body; deeper is 400"),
    Setting("TFSERVER_RUN_TIMEOUT", _duration(0.1), 1800.0,
            "deadline of one request's terraform runs", shown="1800 s"),
    Setting("TFSERVER_MAX_RUNS", _integer(1), 4, "terraform runs at once; more get 503"),
    Setting("TFSERVER_LOCK_WAIT", _duration(), 0.0,
            "how long a run waits for a busy instance before 409; terraform's `-lock-timeout`",
            shown="0 s"),
    Setting("TFSERVER_KILL_GRACE", _duration(), 10.0,
            "after SIGINT, how long terraform gets before SIGKILL", shown="10 s"),
    Setting("TFSERVER_SHUTDOWN_GRACE", _duration(), 60.0,
            "on SIGTERM, how long runs in flight get before they are interrupted",
            shown="60 s"),
    Setting("TFSERVER_READ_TIMEOUT", _duration(0.1), 30.0,
            "socket read timeout (slow or idle clients are cut off)", shown="30 s"),
    Setting("TFSERVER_MAX_CONNECTIONS", _integer(1), 256,
            "open connections (a thread each); more are closed at once"),
    Setting("TFSERVER_MAX_CONNECTIONS_PER_IP", _integer(0), 32,
            "open connections one client address may hold (0: no cap, behind a proxy)"),
    Setting("TFSERVER_REQUEST_TIMEOUT", _duration(0.1), 30.0,
            "a request's head and body must arrive within this (idle keep-alive time "
            "counts); slower clients are cut off", shown="30 s"),
    Setting("TFSERVER_QUEUE_DEPTH", _integer(0), 8,
            "async runs that may wait per instance; more get 409"),
    Setting("TFSERVER_PLAN_TTL", _duration(1.0), 3600.0,
            "how long a dry run's saved plan can be applied", shown="1 h"),
    Setting("TFSERVER_RUN_RETENTION", _duration(60.0), 30 * 86400.0,
            "how long run records and event logs are kept", shown="30 d"),
    Setting("TFSERVER_IDEMPOTENCY_TTL", _duration(1.0), 86400.0,
            "how long an Idempotency-Key answers with its run", shown="24 h"),
    Setting("TFSERVER_POLICY", _path, None,
            "TOML policy file: quotas, allowed values, TTLs (README: Governance)",
            flag="--policy"),
    Setting("TFSERVER_REAP_INTERVAL", _duration(0.5), 30.0,
            "how often each replica looks for expired instances to destroy", shown="30 s"),
    Setting("TFSERVER_REPLICA_ID", _text, None,
            "this replica's name in run records (leftovers of the same name are marked "
            "lost at start)", shown="the host name"),
    Setting("TFSERVER_TERRAFORM", _text, "terraform", "the terraform binary",
            flag="--terraform"),
    Setting("TFSERVER_RUN_MEMORY", _size(0), 4 * 1024 * MiB,
            "address space each terraform process and provider may take (RLIMIT_AS; "
            "GOMEMLIMIT at half); 0 for no cap", shown="4 GiB"),
    Setting("TFSERVER_TMP_DIR", _path, None, "where the short-lived 0600 var files go",
            shown="a private folder in `/dev/shm`, else `<state>/tmp`"),
    Setting("TF_CLI_CONFIG_FILE", _path, None,
            "terraform CLI config, used as is when the file exists",
            shown="tfserver's own, with a plugin cache"),
    Setting("TFSERVER_PROVIDER_MIRROR", _path, None,
            "a filesystem mirror to install providers from (no downloads)"),
    Setting("TFSERVER_PASS_ENV", _words, frozenset(),
            "comma list of extra environment variables terraform may see"),
    Setting("TFSERVER_LOG_LEVEL", _choice(*LOG_LEVELS, fold=str.upper), "INFO",
            "log level of the lines on stderr", flag="--log-level"),
    Setting("TFSERVER_LOG_FORMAT", _choice("auto", "json", "text"), "auto",
            "`json` lines, `text` for a person, `auto`: text on a terminal, else JSON"),
    Setting("TFSERVER_TRUSTED_PROXIES", _networks, (),
            "comma list of proxy addresses or CIDRs whose `X-Forwarded-For` is believed "
            "(App Platform's edge); they are also exempt from the per-address cap"),
)

_BY_ENV = {s.env: s for s in SETTINGS}


def default(env: str) -> Any:
    """The typed default of a setting (the one place defaults are written)."""
    return _BY_ENV[env].default


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
    queue_depth: int = default("TFSERVER_QUEUE_DEPTH")
    plan_ttl: float = default("TFSERVER_PLAN_TTL")
    run_retention: float = default("TFSERVER_RUN_RETENTION")
    idempotency_ttl: float = default("TFSERVER_IDEMPOTENCY_TTL")
    #: The governance policy file (None: no quotas, TTLs or narrowed values).
    policy: Path | None = None
    replica: str | None = None
    reap_interval: float = default("TFSERVER_REAP_INTERVAL")
    #: Where the short-lived var files go; None picks a private folder on tmpfs if any.
    tmp_dir: Path | None = None
    terraform_bin: str = default("TFSERVER_TERRAFORM")
    run_memory: int = default("TFSERVER_RUN_MEMORY")
    cli_config_file: Path | None = None
    provider_mirror: Path | None = None
    log_level: str = default("TFSERVER_LOG_LEVEL")
    log_format: str = default("TFSERVER_LOG_FORMAT")
    trusted_proxies: tuple[Network, ...] = ()
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


def markdown_table() -> str:
    """README's table of settings, made from `SETTINGS`."""
    lines = ["| env | flag | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        flag = f"`{s.flag}`" if s.flag else ""
        lines.append(f"| `{s.env}` | {flag} | {s.shown_default} | {s.help} |")
    return "\n".join(lines)


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
        raise ConfigError(
            f"refusing to serve without authentication on {host}: "
            "set TFSERVER_AUTH=jwt with COGNITO_ISSUER, or listen on a loopback address"
        )
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
        read_timeout=v["TFSERVER_READ_TIMEOUT"],
        max_connections=v["TFSERVER_MAX_CONNECTIONS"],
        max_connections_per_ip=v["TFSERVER_MAX_CONNECTIONS_PER_IP"],
        request_timeout=v["TFSERVER_REQUEST_TIMEOUT"],
        queue_depth=v["TFSERVER_QUEUE_DEPTH"],
        plan_ttl=v["TFSERVER_PLAN_TTL"],
        run_retention=v["TFSERVER_RUN_RETENTION"],
        idempotency_ttl=v["TFSERVER_IDEMPOTENCY_TTL"],
        policy=v["TFSERVER_POLICY"],
        replica=v["TFSERVER_REPLICA_ID"],
        reap_interval=v["TFSERVER_REAP_INTERVAL"],
        tmp_dir=v["TFSERVER_TMP_DIR"],
        terraform_bin=v["TFSERVER_TERRAFORM"],
        run_memory=v["TFSERVER_RUN_MEMORY"],
        cli_config_file=cli_config if cli_config is not None and cli_config.is_file() else None,
        provider_mirror=v["TFSERVER_PROVIDER_MIRROR"],
        log_level=v["TFSERVER_LOG_LEVEL"],
        log_format=v["TFSERVER_LOG_FORMAT"],
        trusted_proxies=v["TFSERVER_TRUSTED_PROXIES"],
        terraform_env=_terraform_env(environ, v["TFSERVER_PASS_ENV"]),
    )


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
