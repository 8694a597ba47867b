"""TLS: the server's `SSLContext` (TLS 1.2 or later), and certificates from an ACME CA.

`Certificates` holds the context new connections use; a renewal swaps it, so a new
certificate applies to new connections without a restart. `AcmeIssuer` speaks ACME with
certbot's `acme` library (no hand-written JOSE); `ChallengeServer` answers HTTP-01 on the
plain HTTP port and redirects everything else there to HTTPS.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from .config import AcmeSettings
from .errors import ConfigError, TFServerError
from .files import write_private

if TYPE_CHECKING:  # acme, josepy, requests, cryptography (30 MB, 100 ms): imported where used
    from acme import challenges, messages
    from cryptography import x509
    from josepy.jwk import JWKRSA

logger = logging.getLogger(__name__)

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"


class AcmeError(TFServerError):
    """Obtaining or renewing a certificate failed; the message names the cause."""


class AcmeClient(Protocol):
    """The ACME verbs tfserver uses; certbot's `acme.client.ClientV2` has them, and tests
    pass a small fake through `AcmeIssuer(connect=...)`."""

    def new_order(self, csr_pem: bytes) -> messages.OrderResource:
        """Order a certificate for the CSR's names."""
        ...

    def answer_challenge(self, challb: messages.ChallengeBody,
                         response: challenges.ChallengeResponse) -> Any:
        """Tell the CA a challenge is ready."""
        ...

    def poll_and_finalize(self, orderr: messages.OrderResource,
                          deadline: dt.datetime | None = None) -> messages.OrderResource:
        """Wait for the authorizations, finalise, and fetch the chain."""
        ...


#: Makes a client registered with the CA for an account key.
AcmeConnect = Callable[["JWKRSA"], AcmeClient]


def server_context() -> ssl.SSLContext:
    """A server-side context that refuses anything older than TLS 1.2."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


def context_from_files(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context with the certificate chain and key from PEM files."""
    ctx = server_context()
    asked: list[bool] = []

    def no_passphrase() -> bytes:
        # Without a callback OpenSSL prompts on the terminal for an encrypted key: a server
        # (or its SIGHUP handler) would hang there.
        asked.append(True)
        return b""

    try:
        ctx.load_cert_chain(str(cert), str(key), password=no_passphrase)
    except (OSError, ssl.SSLError) as e:
        reason = "the key is encrypted; give an unencrypted key (mode 0600)" if asked else e
        raise ConfigError(f"cannot load the TLS certificate {cert} and key {key}: {reason}"
                          ) from e
    return ctx


class Certificates:
    """The context for new TLS connections; `swap` and `reload` replace it atomically."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context

    def swap(self, context: ssl.SSLContext) -> None:
        """Use `context` for every connection from now on (open ones keep theirs)."""
        self.context = context

    def reload(self, cert: Path, key: Path) -> bool:
        """Re-read the certificate chain and key files (SIGHUP); True if they are in service.

        Files that cannot be read, or a key that does not match the certificate, leave the
        current context in service. One log line either way, naming the files and the new
        certificate's serial and expiry or the reason; never anything of the key. Fit for a
        signal handler: it takes no lock of its own and never prompts for a passphrase.
        """
        from cryptography import x509
        try:
            try:
                leaf = x509.load_pem_x509_certificate(cert.read_bytes())
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot read the TLS certificate {cert}: "
                                  f"{getattr(e, 'strerror', None) or e}") from e
            context = context_from_files(cert, key)
        except ConfigError as e:
            logger.error("TLS files not reloaded, the current certificate stays in service: %s",
                         e, extra={"tls_cert": str(cert), "tls_key": str(key)})
            return False
        self.swap(context)
        logger.info("TLS certificate reloaded from %s (serial %x, valid until %s); new "
                    "connections use it", cert, leaf.serial_number,
                    leaf.not_valid_after_utc.isoformat(),
                    extra={"tls_cert": str(cert), "tls_key": str(key)})
        return True


class ChallengeStore:
    """HTTP-01 key authorizations by token, shared by the issuer and the HTTP listener."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._answers: dict[str, str] = {}

    def put(self, token: str, validation: str) -> None:
        """Serve `validation` at the token's path."""
        with self._mutex:
            self._answers[token] = validation

    def pop(self, token: str) -> None:
        """Stop serving the token."""
        with self._mutex:
            self._answers.pop(token, None)

    def get(self, token: str) -> str | None:
        """The validation for a token, if one is pending."""
        with self._mutex:
            return self._answers.get(token)


class ChallengeServer(ThreadingHTTPServer):
    """Plain HTTP: `/.well-known/acme-challenge/<token>` answers, everything else 308s to
    HTTPS at `https_port()`, read per redirect: that listener binds after the certificate."""

    daemon_threads = True

    def __init__(self, host: str, port: int, store: ChallengeStore,
                 https_port: Callable[[], int], domains: tuple[str, ...]) -> None:
        self.store = store
        self.https_port = https_port
        self.domains = domains
        super().__init__((host, port), _ChallengeHandler)


class _ChallengeHandler(BaseHTTPRequestHandler):
    server: ChallengeServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        self.request.settimeout(10)
        super().setup()

    def do_GET(self) -> None:
        if self.path.startswith(CHALLENGE_PREFIX):
            answer = self.server.store.get(self.path[len(CHALLENGE_PREFIX):])
            if answer is None:
                self._send(404, b"no such challenge\n", {})
            else:
                self._send(200, answer.encode(), {})
            return
        # Redirect to HTTPS on a name this server has a certificate for (no open redirect).
        host = (self.headers.get("Host") or "").split(":")[0].lower()
        if host not in self.server.domains:
            host = self.server.domains[0]
        https_port = self.server.https_port()
        port = "" if https_port == 443 else f":{https_port}"
        self._send(308, b"", {"Location": f"https://{host}{port}{self.path}"})

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET  # noqa: N815

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        logger.debug("acme http: " + format, *args)


def _pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
    return bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))


class AcmeIssuer:
    """Obtains and renews one certificate for `settings.domains` (HTTP-01).

    Files in `folder` (each 0600): `account.key`, `privkey.pem`, `fullchain.pem`. They are
    reused on restart while the certificate is valid, covers the domains, and is not due.
    """

    def __init__(self, settings: AcmeSettings, folder: Path, store: ChallengeStore, *,
                 timeout: float = 30.0, poll_seconds: float = 120.0,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
                 connect: AcmeConnect | None = None) -> None:
        self.settings = settings
        self.connect: AcmeConnect = connect or self._connect
        self.folder = folder
        self.store = store
        self.timeout = timeout
        self.poll_seconds = poll_seconds
        self.clock = clock
        self.account_key_path = folder / "account.key"
        self.key_path = folder / "privkey.pem"
        self.cert_path = folder / "fullchain.pem"

    def certificate(self) -> x509.Certificate | None:
        """The stored leaf certificate, if any and readable."""
        from cryptography import x509
        try:
            return x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        except (OSError, ValueError):
            return None

    def usable(self, cert: x509.Certificate | None) -> bool:
        """True when the stored certificate covers the domains and is not due for renewal."""
        if cert is None or not self.key_path.exists():
            return False
        from cryptography import x509
        try:
            names = set(cert.extensions.get_extension_for_class(
                x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName))
        except x509.ExtensionNotFound:
            return False
        return set(self.settings.domains) <= names and not self.due(cert)

    def due(self, cert: x509.Certificate) -> bool:
        """Renewal is due when less than `renew_before` (default: a third) is left."""
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        before = (dt.timedelta(seconds=self.settings.renew_before)
                  if self.settings.renew_before is not None else lifetime / 3)
        return cert.not_valid_after_utc - self.clock() <= before

    def ensure(self) -> bool:
        """Obtain a certificate unless a usable one is stored; True if it obtained one."""
        if self.usable(self.certificate()):
            logger.info("reusing the stored certificate for %s", ", ".join(self.settings.domains))
            return False
        self.obtain()
        return True

    def obtain(self) -> None:
        """Run one ACME order to the end and store the key and chain; raises AcmeError."""
        import josepy
        import requests
        from acme import errors, messages
        try:
            self._obtain()
        except AcmeError:
            raise
        except messages.Error as e:
            kind = (e.typ or "").rsplit(":", 1)[-1]
            if kind == "rateLimited":
                raise AcmeError(f"the ACME CA rate-limited this server: {e.detail}") from e
            raise AcmeError(f"the ACME CA refused: {kind or 'error'}: {e.detail}") from e
        except errors.ValidationError as e:
            raise AcmeError(
                "the CA could not validate the HTTP-01 challenge for "
                f"{', '.join(self.settings.domains)}: is port {self.settings.http_port} "
                "reachable from the CA at that name?") from e
        except errors.TimeoutError as e:
            raise AcmeError("the ACME order did not complete in time") from e
        except errors.Error as e:
            raise AcmeError(f"ACME failed: {type(e).__name__}: {e}") from e
        except requests.exceptions.RequestException as e:
            raise AcmeError(f"the ACME directory {self.settings.directory} cannot be "
                            f"reached: {type(e).__name__}") from e
        except josepy.errors.Error as e:
            raise AcmeError(f"the ACME CA sent something unreadable: {e}") from e

    def _account_key(self) -> JWKRSA:
        """The ACME account's key, made on first use and kept (0600)."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from josepy.jwk import JWKRSA
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.account_key_path.exists():
            key = serialization.load_pem_private_key(self.account_key_path.read_bytes(),
                                                     password=None)
        else:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            write_private(self.account_key_path, _pem(key))
        return JWKRSA(key=key)

    def _connect(self, account_key: JWKRSA) -> AcmeClient:
        """The network client: the directory, then the account (new, or the key's own)."""
        from acme import client, errors, messages
        # requests takes a CA bundle path where acme's annotation says bool.
        verify = cast(bool, self.settings.ca_bundle or True)
        net = client.ClientNetwork(account_key, verify_ssl=verify, user_agent="tfserver",
                                   timeout=int(self.timeout))
        directory = client.ClientV2.get_directory(self.settings.directory, net)
        acme = client.ClientV2(directory, net)
        registration = messages.NewRegistration.from_data(
            email=self.settings.email, terms_of_service_agreed=True)
        try:
            net.account = acme.new_account(registration)
        except errors.ConflictError as e:
            # The key is registered already: use that account.
            net.account = acme.query_registration(
                messages.RegistrationResource(uri=e.location, body=messages.Registration()))
        return cast(AcmeClient, acme)

    def _obtain(self) -> None:
        from acme import challenges, crypto_util, messages
        from cryptography.hazmat.primitives.asymmetric import ec
        account_key = self._account_key()
        acme = self.connect(account_key)
        key = ec.generate_private_key(ec.SECP256R1())
        csr = crypto_util.make_csr(_pem(key), list(self.settings.domains))
        order = acme.new_order(csr)
        tokens = []
        try:
            for authz in order.authorizations:
                status = authz.body.status
                if status == messages.STATUS_VALID:
                    # The CA reused an authorization this account proved before (Let's
                    # Encrypt for a while, Pebble at random): its challenge is done, and
                    # answering it again is refused ("Cannot update challenge with status
                    # valid").
                    continue
                if status not in (None, messages.STATUS_PENDING):
                    raise AcmeError(f"the CA's authorization for "
                                    f"{authz.body.identifier.value} is {status.name}")
                chall = next((c for c in authz.body.challenges
                              if isinstance(c.chall, challenges.HTTP01)), None)
                if chall is None:
                    raise AcmeError(f"the CA offers no HTTP-01 challenge for "
                                    f"{authz.body.identifier.value}")
                response, validation = chall.response_and_validation(account_key)
                token = chall.chall.encode("token")
                self.store.put(token, validation)
                tokens.append(token)
                acme.answer_challenge(chall, response)
            deadline = dt.datetime.now() + dt.timedelta(seconds=self.poll_seconds)
            order = acme.poll_and_finalize(order, deadline=deadline)
        finally:
            for token in tokens:
                self.store.pop(token)
        write_private(self.key_path, _pem(key))
        write_private(self.cert_path, order.fullchain_pem.encode())
        logger.info("obtained a certificate for %s", ", ".join(self.settings.domains))

    def context(self) -> ssl.SSLContext:
        """A server context with the stored certificate."""
        return context_from_files(self.cert_path, self.key_path)


class CertificateSource(Protocol):
    """What the renewer needs of an issuer (`AcmeIssuer`, or a test's fake)."""

    def certificate(self) -> x509.Certificate | None:
        """The certificate in service, if any."""
        ...

    def due(self, cert: x509.Certificate) -> bool:
        """True when it should be renewed."""
        ...

    def obtain(self) -> None:
        """Get a new one; raises AcmeError."""
        ...

    def context(self) -> ssl.SSLContext:
        """A server context with the current certificate."""
        ...


def retry_delay(failures: int, *, interval: float, first: float, most: float) -> float:
    """Seconds to wait after the `failures`-th failed renewal in a row (1, 2, ...).

    `first` (never more than `interval`), doubling at each failure, at most `most`.
    """
    return min(min(first, interval) * 2.0 ** min(failures - 1, 64), most)


class Renewer(threading.Thread):
    """Checks the certificate every `interval` seconds; renews it when due.

    A failed renewal keeps the current certificate in service and retries soon, because a
    due certificate is urgent: after `first_retry` seconds (or `interval` if that is
    shorter), then twice as long after each failure in a row, never longer than
    `max_retry`. With the defaults (2 min doubling to 1 h) one transient failure costs two
    minutes, and a CA that keeps refusing is asked at most five times in any hour (Let's
    Encrypt allows five failed authorizations of a name an hour).
    """

    def __init__(self, issuer: CertificateSource, certificates: Certificates,
                 interval: float, *, first_retry: float = 120.0,
                 max_retry: float = 3600.0) -> None:
        super().__init__(name="acme-renewer", daemon=True)
        self.issuer = issuer
        self.certificates = certificates
        self.interval = interval
        self.first_retry = first_retry
        self.max_retry = max_retry
        self.stop_event = threading.Event()
        self.renewals = 0

    def run(self) -> None:
        """Loop until `stop_event` is set."""
        wait = self.interval
        failures = 0
        while not self.stop_event.wait(wait):
            cert = self.issuer.certificate()
            if cert is not None and not self.issuer.due(cert):
                wait, failures = self.interval, 0
                continue
            try:
                self.issuer.obtain()
                self.certificates.swap(self.issuer.context())
            except (AcmeError, ConfigError) as e:
                failures += 1
                wait = retry_delay(failures, interval=self.interval, first=self.first_retry,
                                   most=self.max_retry)
                logger.error("certificate renewal failed (retry in %.0fs): %s", wait, e,
                             extra={"retry_in": wait, "failures": failures})
                continue
            self.renewals += 1
            wait, failures = self.interval, 0
            logger.info("certificate renewed; new connections use it")
