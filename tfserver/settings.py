"""The one table of settings: each setting's variable, flag, parser, default and meaning.

It drives `config.load`, `--help` and the settings table in docs/configuration.md (a test
keeps that table equal to `markdown_table()`). Parsers take text and give a typed value or
raise ValueError with the reason.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def _cpu(text: str) -> int | str | None:
    """`off` (None), `auto`, or a CPU's number."""
    word = text.strip().lower()
    if word in ("off", "auto"):
        return None if word == "off" else word
    if not (word.isascii() and word.isdigit()):
        raise ValueError("must be off, auto or a CPU's number")
    return int(word)


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


_LABEL = r"[a-z0-9_][a-z0-9_-]{0,62}"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?$")


def _hosts(text: str) -> tuple[str, ...]:
    """Host names, addresses and CIDRs (lower case, sorted); each checked."""
    found = []
    for word in sorted({w.lower() for w in _words(text)}):
        try:
            ipaddress.ip_network(word, strict=False)
        except ValueError:
            if not _HOST_NAME.match(word):
                raise ValueError(f"must be host names, addresses or CIDRs; {word[:40]!r} is "
                                 "none of them") from None
        found.append(word)
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
    #: How the default reads in `--help` and the docs, when `str(default)` would not do.
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
            "each subfolder with `*.tf` or `*.tf.json` files (or version folders such as "
            "`1.4.0/` that have them) is served at `/<folder>`",
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
    Setting("TFSERVER_HEALTH_CONNECTIONS", _integer(0), 4,
            "connections kept, beyond `TFSERVER_MAX_CONNECTIONS`, for `/healthz` and "
            "`/readyz` alone (other requests on them get 503)"),
    Setting("TFSERVER_MAX_STREAMS_PER_TENANT", _integer(1), 8,
            "event streams (`/runs/{id}/events`) one tenant may have open; more get 429"),
    Setting("TFSERVER_STREAM_MAX", _duration(0.1), 300.0,
            "longest life of an event stream: it then ends, and the client resumes with "
            "`Last-Event-ID` or `?after=`", shown="300 s"),
    Setting("TFSERVER_REQUEST_TIMEOUT", _duration(0.1), 30.0,
            "a request's head and body must arrive within this (idle keep-alive time "
            "counts); slower clients are cut off", shown="30 s"),
    Setting("TFSERVER_QUEUE_DEPTH", _integer(0), 8,
            "async runs that may wait per instance; more get 409"),
    Setting("TFSERVER_QUEUE", _choice("local", "sqs"), "local",
            "the run engine: `local` (each replica runs what it accepted, in per-instance "
            "lanes) or `sqs` (runs travel on an SQS FIFO queue to workers)"),
    Setting("TFSERVER_QUEUE_URL", _text, None, "the SQS FIFO queue of the `sqs` engine"),
    Setting("TFSERVER_SQS_ENDPOINT", _text, None, "SQS endpoint (test servers)",
            shown="AWS"),
    Setting("TFSERVER_SQS_REGION", _text, None, "the queue's region",
            shown="from the queue URL, else `AWS_REGION`"),
    Setting("TFSERVER_ROLE", _choice("all", "api", "worker"), "all",
            "with `sqs`: `api` answers HTTP and queues runs, never starts terraform; "
            "`worker` takes runs from the queue and serves only /healthz and /readyz; "
            "`all` is both (`tfserver worker` is `--role worker`)", flag="--role"),
    Setting("TFSERVER_RESUME_LOST", _integer(0, 10), 1,
            "how many times a run whose worker died is run again (`sqs`)"),
    Setting("TFSERVER_SQS_VISIBILITY", _integer(5, 43200), 60,
            "seconds a taken message stays hidden between a worker's extensions: a dead "
            "worker's run comes back after this long (`sqs`)"),
    Setting("TFSERVER_PLAN_TTL", _duration(1.0), 3600.0,
            "how long a dry run's saved plan can be applied, and a run awaits its approval",
            shown="1 h"),
    Setting("TFSERVER_RUN_RETENTION", _duration(60.0), 30 * 86400.0,
            "how long run records and event logs are kept", shown="30 d"),
    Setting("TFSERVER_ARCHIVE_RETENTION", _duration(60.0), 30 * 86400.0,
            "how long the state of an orphaned instance (`?orphan=true`) is kept aside",
            shown="30 d"),
    Setting("TFSERVER_IDEMPOTENCY_TTL", _duration(1.0), 86400.0,
            "how long an Idempotency-Key answers with its run", shown="24 h"),
    Setting("TFSERVER_POLICY", _path, None,
            "TOML policy file: quotas, allowed values, TTLs (docs/governance.md)",
            flag="--policy"),
    Setting("TFSERVER_WEBHOOK_RETRY", _duration(1.0), 86400.0,
            "how long a webhook delivery is retried before it is given up (docs/governance.md)",
            shown="24 h"),
    Setting("TFSERVER_WEBHOOK_ALLOW", _hosts, (),
            "comma list of host names, addresses or CIDRs webhooks may reach besides public "
            "`https` ones (loopback, private); `http://` is allowed for these only"),
    Setting("TFSERVER_REAP_INTERVAL", _duration(0.5), 30.0,
            "how often each replica looks for expired instances to destroy", shown="30 s"),
    Setting("TFSERVER_MAX_DRIFT_CHECKS", _integer(1, 1000), 2,
            "scheduled drift checks at once, over all replicas; they run in slots of their "
            "own beside TFSERVER_MAX_RUNS (docs/governance.md)"),
    Setting("TFSERVER_DRIFT_CHECK_MIN", _duration(1.0), 300.0,
            "the shortest `drift_check` a policy may set (lower only for tests)",
            shown="300 s"),
    Setting("TFSERVER_REPLICA_ID", _text, None,
            "this replica's name in run records (leftovers of the same name are marked "
            "lost at start)", shown="the host name"),
    Setting("TFSERVER_TERRAFORM", _text, "terraform", "the terraform binary",
            flag="--terraform"),
    Setting("TFSERVER_RUN_MEMORY", _size(0), 4 * 1024 * MiB,
            "address space each terraform process and provider may take (RLIMIT_AS; "
            "GOMEMLIMIT at half); 0 for no cap", shown="4 GiB"),
    Setting("TFSERVER_PIN_CPU", _cpu, "auto",
            "keep the server's own threads to one CPU (`auto`: the one it starts on, where "
            "there are several; a number; or `off`); terraform and the threads of runs "
            "keep every CPU. Many more requests a second on a machine of several CPUs "
            "(docs/operations.md)"),
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


def markdown_table() -> str:
    """The settings table of docs/configuration.md, made from `SETTINGS`."""
    lines = ["| env | flag | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        flag = f"`{s.flag}`" if s.flag else ""
        lines.append(f"| `{s.env}` | {flag} | {s.shown_default} | {s.help} |")
    return "\n".join(lines)
