"""TLS: certificates from files and from an ACME CA (Pebble, with real HTTP-01)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from support import (
    ROOT,
    Pebble,
    ServerProcess,
    free_port,
    https_get,
    self_signed,
    start_pebble,
    start_server,
)
from tfserver.tls import Certificates, context_from_files

NAME = "tfserver.test"  # Pebble's DNS answers 127.0.0.1 for every name


@pytest.fixture()
def pebble(tmp: Path) -> Iterator[Pebble]:
    ca = start_pebble(tmp / "pebble")
    yield ca
    ca.stop()


def acme_env(pebble: Pebble, **extra: str) -> dict[str, str]:
    return {
        "TFSERVER_ACME_DOMAINS": NAME,
        "TFSERVER_ACME_EMAIL": "ops@tfserver.test",
        "TFSERVER_ACME_DIRECTORY": pebble.directory,
        "TFSERVER_ACME_CA_BUNDLE": str(pebble.ca_bundle),
        "TFSERVER_HTTP_PORT": str(pebble.http_port),
        **extra,
    }


def port_of(srv: ServerProcess) -> int:
    return int(srv.url.rsplit(":", 1)[1])


def test_certificate_from_pebble_served_and_reused(tmp: Path, pebble: Pebble) -> None:
    srv = start_server(tmp, env=acme_env(pebble), wait_modules=False, ready_timeout=90)
    try:
        assert srv.url.startswith("https://")
        r = https_get(port_of(srv), "/healthz", cafile=pebble.root, hostname=NAME)
        assert r.status == 200 and b'"ok"' in r.body
        assert r.headers["Strict-Transport-Security"].startswith("max-age=")
        first = r.serial
        acme = tmp / "state" / "acme"
        for name in ("account.key", "privkey.pem", "fullchain.pem"):
            assert (acme / name).stat().st_mode & 0o777 == 0o600, name
        # a client that does not trust Pebble's root, or checks another name, refuses
        with pytest.raises(ssl.SSLCertVerificationError):
            https_get(port_of(srv), "/healthz", cafile=pebble.ca_bundle, hostname=NAME)
        with pytest.raises(ssl.SSLCertVerificationError):
            https_get(port_of(srv), "/healthz", cafile=pebble.root, hostname="other.test")
    finally:
        assert srv.stop() == 0
    again = start_server(tmp, env=acme_env(pebble), wait_modules=False)
    try:
        assert again.records(lambda r: "reusing the stored certificate" in
                             r.get("message", ""))
        assert https_get(port_of(again), "/healthz", cafile=pebble.root,
                         hostname=NAME).serial == first
    finally:
        again.stop()


@pytest.fixture()
def reusing_pebble(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pebble]:
    """Pebble reusing every valid authorization (its default is half of them, at random;
    Let's Encrypt reuses them for a while too), so a renewal meets one on every run."""
    monkeypatch.setenv("PEBBLE_AUTHZREUSE", "100")
    ca = start_pebble(tmp / "pebble")
    yield ca
    ca.stop()


def messages(srv: ServerProcess) -> list[str]:
    return [str(r.get("message", "")) for r in srv.log_records()]


def logs(srv: ServerProcess, pebble: Pebble) -> str:
    """The end of the server's and Pebble's logs, for a failure message."""
    ca_log = (pebble.root.parent / "pebble.log").read_text(errors="replace")
    return (f"--- tfserver log:\n{srv.log_text()[-6000:]}\n"
            f"--- pebble log:\n{ca_log[-3000:]}")


def test_renewal_swaps_the_certificate_while_serving(tmp: Path, reusing_pebble: Pebble
                                                     ) -> None:
    # Renew when less than ten years are left: Pebble's five-year certificates are due at
    # once, so the renewer (checking every second) renews while the test watches. The
    # first certificate proved HTTP-01; the renewal's order gets that authorization back.
    pebble = reusing_pebble
    env = acme_env(pebble, TFSERVER_ACME_RENEW_BEFORE=str(10 * 365 * 86400),
                   TFSERVER_ACME_CHECK_INTERVAL="1")
    srv = start_server(tmp, env=env, wait_modules=False, ready_timeout=90)
    try:
        port = port_of(srv)
        first = https_get(port, "/healthz", cafile=pebble.root, hostname=NAME).serial
        failures = []
        # Wait on the renewal itself: its log line comes just after the swap. The bound only
        # ends a run that hangs; a renewal takes a few seconds even on a busy machine.
        deadline = time.monotonic() + 240
        while not any(m.startswith("certificate renewed") for m in messages(srv)):
            assert srv.proc.poll() is None, logs(srv, pebble)
            assert time.monotonic() < deadline, "no renewal in 240 s\n" + logs(srv, pebble)
            try:  # the server must keep answering throughout
                assert https_get(port, "/healthz", cafile=pebble.root,
                                 hostname=NAME).status == 200
            except OSError as e:
                failures.append(repr(e))
            time.sleep(0.2)
        assert failures == [], logs(srv, pebble)
        renewed = https_get(port, "/healthz", cafile=pebble.root, hostname=NAME)
        assert renewed.status == 200 and renewed.serial != first, logs(srv, pebble)
        # the reused authorization was taken as proved, not answered again
        assert not any("Cannot update challenge" in m for m in messages(srv)), \
            logs(srv, pebble)
    finally:
        srv.stop()


def test_http_port_redirects_and_serves_only_challenges(tmp: Path, pebble: Pebble) -> None:
    srv = start_server(tmp, env=acme_env(pebble), wait_modules=False, ready_timeout=90)
    try:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", pebble.http_port, timeout=10)
        conn.request("GET", "/demo/x?y=1", headers={"Host": f"{NAME}:{pebble.http_port}"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 308
        assert resp.getheader("Location") == f"https://{NAME}:{port_of(srv)}/demo/x?y=1"
        conn.request("GET", "/", headers={"Host": "evil.example"})
        resp = conn.getresponse()
        resp.read()
        assert resp.getheader("Location").startswith(f"https://{NAME}:")  # no open redirect
        conn.request("GET", "/.well-known/acme-challenge/unknown-token")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 404
        conn.close()
    finally:
        srv.stop()


@pytest.fixture()
def file_tls(tmp: Path) -> Iterator[tuple[ServerProcess, Path]]:
    cert, key = self_signed(["localhost", "127.0.0.1"], tmp, "server")
    srv = start_server(tmp, env={"TFSERVER_TLS_CERT": str(cert), "TFSERVER_TLS_KEY": str(key),
                                 "TFSERVER_READ_TIMEOUT": "2"}, wait_modules=False)
    yield srv, cert
    srv.stop()


def test_tls_from_files(file_tls: tuple[ServerProcess, Path]) -> None:
    srv, cert = file_tls
    r = https_get(port_of(srv), "/healthz", cafile=cert, hostname="localhost")
    assert r.status == 200 and "Strict-Transport-Security" in r.headers


def tls11_client(cafile: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(cafile))
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    return ctx


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls_1_1_is_refused(file_tls: tuple[ServerProcess, Path], tmp: Path) -> None:
    srv, cert = file_tls
    ctx = tls11_client(cert)
    # Control: this client really speaks TLS 1.1 to a server that allows it, so the
    # refusal below is tfserver's doing, not a client that cannot try.
    permissive = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    permissive.minimum_version = ssl.TLSVersion.TLSv1
    permissive.set_ciphers("ALL:@SECLEVEL=0")
    permissive.load_cert_chain(str(cert), str(tmp / "server.key"))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        accepted: list[str] = []

        def accept() -> None:
            conn, _ = listener.accept()
            with permissive.wrap_socket(conn, server_side=True) as tls:
                accepted.append(str(tls.version()))

        t = threading.Thread(target=accept)
        t.start()
        with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.version() == "TLSv1.1"
        t.join(10)
    assert accepted == ["TLSv1.1"]
    with socket.create_connection(("127.0.0.1", port_of(srv)), timeout=10) as raw, \
            pytest.raises(ssl.SSLError):
        ctx.wrap_socket(raw, server_hostname="localhost").close()
    # TLS 1.2 with the same client settings goes through
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", port_of(srv)), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.version() == "TLSv1.2"


def test_plain_http_and_silent_clients_on_the_tls_port(
        file_tls: tuple[ServerProcess, Path]) -> None:
    srv, cert = file_tls
    port = port_of(srv)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            s.recv(1024)
        assert time.monotonic() - started < 8
    # a client that connects and says nothing holds no thread beyond the read timeout
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(5)]
    results = []

    def probe() -> None:
        results.append(https_get(port, "/healthz", cafile=cert, hostname="localhost").status)

    t = threading.Thread(target=probe)
    t.start()
    t.join(15)
    assert results == [200]
    for s in idle:
        s.settimeout(10)
        assert s.recv(1024) == b""  # closed by the server after TFSERVER_READ_TIMEOUT
        s.close()
    assert srv.proc.poll() is None


def run_start(env: dict[str, str], tmp: Path) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "tfserver", "--port", "0"], cwd=ROOT,
                          env={"PATH": os.environ["PATH"], "TFSERVER_STATE_DIR": str(tmp / "s"),
                               **env},
                          capture_output=True, text=True, timeout=120)


def test_unreachable_directory_is_a_clear_error(tmp: Path) -> None:
    done = run_start({"TFSERVER_ACME_DOMAINS": NAME, "TFSERVER_HTTP_PORT": str(free_port()),
                      "TFSERVER_ACME_DIRECTORY": f"https://127.0.0.1:{free_port()}/dir"}, tmp)
    assert done.returncode == 2
    assert "cannot be reached" in done.stderr and "Traceback" not in done.stderr


def test_failed_challenge_is_a_clear_error(tmp: Path, pebble: Pebble) -> None:
    # tfserver answers challenges on another port than the one Pebble checks
    env = acme_env(pebble, TFSERVER_HTTP_PORT=str(free_port()))
    done = run_start(env, tmp)
    assert done.returncode == 2, done.stderr
    assert "could not validate the HTTP-01 challenge" in done.stderr
    assert "Traceback" not in done.stderr


# --- reloading the certificate files (SIGHUP) ----------------------------------------------

def served_serial(context: ssl.SSLContext, cafile: Path) -> int:
    """The serial of the certificate `context` presents in a handshake (in memory)."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ssl.create_default_context(cafile=str(cafile)).wrap_bio(
        to_client, to_server, server_hostname="localhost")
    from_client, from_server = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = context.wrap_bio(from_client, from_server, server_side=True)
    done: set[ssl.SSLObject] = set()
    for _ in range(20):  # a handshake takes two or three round trips
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
                done.add(side)
        from_client.write(to_server.read())
        to_client.write(from_server.read())
        if len(done) == 2:
            der = client.getpeercert(binary_form=True)
            assert der is not None
            return x509.load_der_x509_certificate(der).serial_number
    raise AssertionError("the in-memory handshake did not finish")


def serial_of(cert: Path) -> int:
    return x509.load_pem_x509_certificate(cert.read_bytes()).serial_number


def certificate_in(folder: Path) -> tuple[Path, Path]:
    """server.crt and server.key for localhost, named (CN) after the folder: a client that
    trusts several of them tells them apart by subject."""
    folder.mkdir(parents=True, exist_ok=True)
    return self_signed([f"{folder.name}.test", "localhost", "127.0.0.1"], folder, "server")


def reload_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("TLS ")]


def test_reload_puts_new_files_in_service(tmp: Path, caplog: pytest.LogCaptureFixture
                                          ) -> None:
    cert, key = certificate_in(tmp)
    certificates = Certificates(context_from_files(cert, key))
    assert served_serial(certificates.context, cert) == serial_of(cert)
    new_cert, new_key = certificate_in(tmp / "next")
    os.replace(new_cert, cert)
    os.replace(new_key, key)
    caplog.set_level(logging.INFO, logger="tfserver.tls")
    assert certificates.reload(cert, key) is True
    assert served_serial(certificates.context, cert) == serial_of(cert)
    [line] = reload_lines(caplog)
    assert line.levelno == logging.INFO
    assert f"serial {serial_of(cert):x}" in line.getMessage() and str(cert) in line.getMessage()


def encrypted_key(key: Path) -> None:
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    key.write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"a passphrase")))


@pytest.mark.parametrize(("break_files", "reason"), [
    (lambda cert, key, other_key: os.replace(other_key, key), "key values mismatch"),
    (lambda cert, key, other_key: cert.write_text("not a certificate\n"),
     "cannot read the TLS certificate"),
    (lambda cert, key, other_key: cert.unlink(), "No such file or directory"),
    (lambda cert, key, other_key: key.unlink(), "No such file or directory"),
    (lambda cert, key, other_key: key.write_text("-----BEGIN PRIVATE KEY-----\nx\n"),
     "cannot load the TLS certificate"),
    (lambda cert, key, other_key: encrypted_key(key), "the key is encrypted"),
], ids=["key-of-another-certificate", "garbage-certificate", "no-certificate", "no-key",
        "garbage-key", "encrypted-key"])
def test_reload_keeps_the_current_certificate_when_the_files_are_broken(
        tmp: Path, caplog: pytest.LogCaptureFixture,
        break_files: Callable[[Path, Path, Path], object], reason: str) -> None:
    cert, key = certificate_in(tmp)
    certificates = Certificates(context_from_files(cert, key))
    current, serial = certificates.context, serial_of(cert)
    trusted = tmp / "trusted.crt"
    trusted.write_bytes(cert.read_bytes())
    _, other_key = certificate_in(tmp / "other")
    key_text = key.read_text()
    break_files(cert, key, other_key)
    caplog.set_level(logging.INFO, logger="tfserver.tls")
    assert certificates.reload(cert, key) is False
    assert certificates.context is current
    assert served_serial(certificates.context, trusted) == serial
    [line] = reload_lines(caplog)
    assert line.levelno == logging.ERROR and reason in line.getMessage(), line.getMessage()
    assert "stays in service" in line.getMessage()
    secret = "".join(key_text.splitlines()[1:-1])  # the key's base64 body
    for text in (line.getMessage(), caplog.text):
        assert secret[:40] not in text.replace("\n", "")


def wait_for(what: str, check: Callable[[], bool], srv: ServerProcess,
             timeout: float = 30) -> None:
    """Poll `check` until true (bounded), failing with the server's log."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OSError:
            with contextlib.suppress(subprocess.TimeoutExpired):
                srv.proc.wait(timeout=2)
            if srv.proc.poll() is None:
                raise  # refused a connection while running: it must keep serving
        if srv.proc.poll() is not None:
            raise AssertionError(f"tfserver exited ({srv.proc.returncode}) waiting for {what}"
                                 " (is SIGHUP handled in __main__?):\n" + srv.log_text()[-4000:])
        assert time.monotonic() < deadline, f"no {what} in {timeout:g}s:\n" + \
            srv.log_text()[-4000:]
        time.sleep(0.1)


def test_sighup_reloads_the_tls_files(tmp: Path) -> None:
    cert, key = certificate_in(tmp)
    srv = start_server(tmp, env={"TFSERVER_TLS_CERT": str(cert), "TFSERVER_TLS_KEY": str(key)},
                       wait_modules=False)
    try:
        port = port_of(srv)
        old = serial_of(cert)
        next_cert, next_key = certificate_in(tmp / "next")
        new = serial_of(next_cert)
        trust = tmp / "trust.pem"  # both: either handshake works and the serial tells
        trust.write_bytes(cert.read_bytes() + next_cert.read_bytes())
        assert https_get(port, "/healthz", cafile=trust, hostname="localhost").serial == old

        def served() -> int:
            answer = https_get(port, "/healthz", cafile=trust, hostname="localhost")
            assert answer.status == 200  # the server keeps serving throughout
            return answer.serial

        def reloads(word: str) -> int:
            return sum(m.startswith(f"TLS {word}") for m in messages(srv))

        os.replace(next_cert, cert)
        os.replace(next_key, key)
        srv.proc.send_signal(signal.SIGHUP)
        wait_for("new certificate on new connections", lambda: served() == new, srv)
        wait_for("its log line", lambda: reloads("certificate reloaded") >= 1, srv)
        assert reloads("certificate reloaded") == 1, srv.log_text()[-3000:]

        # a broken replacement (a certificate whose key is not the one beside it) is refused
        # and the certificate in service stays
        third_cert, _ = certificate_in(tmp / "third")
        trust.write_bytes(trust.read_bytes() + third_cert.read_bytes())
        os.replace(third_cert, cert)
        srv.proc.send_signal(signal.SIGHUP)
        wait_for("log line refusing the broken files", lambda: reloads("files not") == 1, srv)
        assert served() == new
        assert reloads("certificate reloaded") == 1
        assert srv.proc.poll() is None
    finally:
        srv.stop()
