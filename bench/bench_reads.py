"""A server at rest and under reads: resident memory, start time, keep-alive read rates.

    python bench/bench_reads.py [--starts N] [--rounds N] [--seconds S]

The server runs as `make run` runs it (defaults, the repository's modules/, auth off,
local state), in a temporary state folder. Figures:
- exec -> serving: from the exec of `python -m tfserver` to the first answer of /healthz
  (each start in a new state folder);
- RSS at idle: VmRSS of the server one second after /readyz first answers;
- requests/s of a keep-alive GET of an instance (after a PUT), of /healthz and of
  GET /demo, with wrk (2 threads, 32 connections) when it is installed, else with a Python
  keep-alive client (whose own cost then shows in the figures);
- new TLS connections a second (wrk, `Connection: close` on /healthz over HTTPS with a
  self-signed P-256 certificate: a handshake each), when wrk is installed;
- the same figures again with TFSERVER_PIN_CPU=off (the server's threads on every CPU,
  not kept to one as by default), on a machine of more than one.
Each figure is given as the best and the median of its repetitions: the machine may be
shared. Nothing here asserts a time; it prints a table.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: A state file last changed this long ago is read from memory (storage/local.py,
#: SETTLED_NS): the GETs measured are those of an instance at rest.
SETTLE = 3.5
INSTANCE = "bench"


@dataclass
class Server:
    """A `python -m tfserver` child with its state folder and log file."""

    proc: subprocess.Popen[bytes]
    port: int
    folder: Path
    tls: bool = False

    def get(self, path: str) -> int:
        """The status of a GET on a new connection (0 when refused)."""
        try:
            conn = http.client.HTTPSConnection(
                "127.0.0.1", self.port, timeout=10,
                context=ssl._create_unverified_context()) if self.tls \
                else http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            conn.request("GET", path)
            status = conn.getresponse().status
            conn.close()
            return status
        except OSError:
            return 0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.folder, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def self_signed(folder: Path) -> dict[str, str]:
    """TLS settings with a new self-signed P-256 certificate for 127.0.0.1 in `folder`."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return {"TFSERVER_TLS_CERT": str(folder / "cert.pem"),
            "TFSERVER_TLS_KEY": str(folder / "key.pem")}


def start(extra: dict[str, str] | None = None, tls: bool = False) -> tuple[Server, float]:
    """A server as `make run` starts it (with `extra` settings, over HTTPS with `tls`),
    and the seconds from its exec to its first answer of /healthz."""
    folder = Path(tempfile.mkdtemp(prefix="tfserver-bench-reads-"))
    if tls:
        extra = {**(extra or {}), **self_signed(folder)}
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TFSERVER_PORT": str(port),
           "TFSERVER_STATE_DIR": str(folder / "state"),
           "TFSERVER_MODULES_DIR": str(ROOT / "modules"), "TFSERVER_LOG_FORMAT": "json",
           **(extra or {})}
    log = (folder / "server.log").open("wb")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tfserver"], cwd=ROOT, env=env,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    server = Server(proc, port, folder, tls)
    deadline = started + 60
    while server.get("/healthz") != 200:
        if proc.poll() is not None or time.perf_counter() > deadline:
            raise SystemExit("the server did not start:\n" + (folder / "server.log").read_text())
        time.sleep(0.002)
    return server, time.perf_counter() - started


def wait_ready(server: Server) -> None:
    deadline = time.monotonic() + 120
    while server.get("/readyz") != 200:
        if time.monotonic() > deadline:
            raise SystemExit("the server did not get ready")
        time.sleep(0.05)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wrk_rate(port: int, path: str, seconds: float, *options: str,
             scheme: str = "http") -> float:
    out = subprocess.run(["wrk", "-t2", "-c32", f"-d{seconds:g}s", *options,
                          f"{scheme}://127.0.0.1:{port}{path}"],
                         capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out:
        raise SystemExit(f"GET {path} answered errors:\n{out}")
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    raise SystemExit(f"wrk printed no rate:\n{out}")


def python_rate(port: int, path: str, seconds: float, connections: int = 32) -> float:
    """Keep-alive GETs on `connections` threads for `seconds`: answers per second."""
    counts = [0] * connections
    stop = time.monotonic() + seconds

    def loop(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.monotonic() < stop:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise SystemExit(f"GET {path}: {response.status}")
            counts[i] += 1
        conn.close()

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(connections)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - began)


def put_instance(server: Server) -> None:
    """The instance the GETs read, left to settle."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("PUT", f"/demo/{INSTANCE}", body=json.dumps({"name": INSTANCE}),
                 headers={"Content-Type": "application/json"})
    put = conn.getresponse()
    put.read()
    conn.close()
    if put.status not in (200, 201):
        raise SystemExit(f"PUT /demo/{INSTANCE}: {put.status}")
    time.sleep(SETTLE)


PATHS = {"instance GET": f"/demo/{INSTANCE}", "/healthz": "/healthz", "GET /demo": "/demo"}


def read_rates(server: Server, rate: Callable[[int, str, float], float], rounds: int,
               seconds: float) -> dict[str, list[float]]:
    """Each path's rates, `rounds` times, the paths taken in turn."""
    rates: dict[str, list[float]] = {name: [] for name in PATHS}
    for _ in range(rounds):
        for name, path in PATHS.items():
            rates[name].append(rate(server.port, path, seconds))
    return rates


def handshake_rates(extra: dict[str, str], rounds: int, seconds: float) -> list[float]:
    """New TLS connections a second: wrk's GETs of /healthz, each on its own connection."""
    server, _ = start(extra, tls=True)
    try:
        return [wrk_rate(server.port, "/healthz", seconds, "-H", "Connection: close",
                         scheme="https") for _ in range(rounds)]
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--starts", type=int, default=5, help="starts timed")
    parser.add_argument("--rounds", type=int, default=3, help="load runs per path")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of a load run")
    args = parser.parse_args()
    if shutil.which("terraform") is None:
        raise SystemExit("terraform is not on PATH")
    use_wrk = shutil.which("wrk") is not None
    rate = wrk_rate if use_wrk else python_rate

    starts = []
    for _ in range(args.starts):
        server, seconds = start()
        starts.append(seconds)
        server.stop()

    server, seconds = start()
    starts.append(seconds)
    try:
        wait_ready(server)
        time.sleep(1.0)
        idle = rss_mb(server.proc.pid)
        put_instance(server)
        rates = read_rates(server, rate, args.rounds, args.seconds)
        loaded = rss_mb(server.proc.pid)
    finally:
        server.stop()
    if use_wrk:
        rates["new TLS connection"] = handshake_rates({}, args.rounds, args.seconds)
    # The same with the server's threads on every CPU (terraform/affinity.py).
    unpinned: dict[str, list[float]] = {}
    if len(os.sched_getaffinity(0)) > 1:
        off = {"TFSERVER_PIN_CPU": "off"}
        server, _ = start(off)
        try:
            wait_ready(server)
            put_instance(server)
            unpinned = read_rates(server, rate, args.rounds, args.seconds)
        finally:
            server.stop()
        if use_wrk:
            unpinned["new TLS connection"] = handshake_rates(off, args.rounds, args.seconds)

    client = "wrk -t2 -c32" if use_wrk else "Python client, 32 connections (wrk missing)"
    print(f"tfserver at rest and under keep-alive reads ({client}; load average "
          f"{os.getloadavg()[0]:.1f} at the end)\n")
    print("| figure | best | median | goal |")
    print("|---|---:|---:|---|")
    print(f"| exec -> serving (/healthz answers) | {min(starts):.2f} s "
          f"| {statistics.median(starts):.2f} s | < 1 s |")
    print(f"| RSS at idle (after /readyz) | {idle:.1f} MB | - | < 50 MB |")
    goals = {"instance GET": ">= 3,000/s"}
    rows = [*((name, values) for name, values in rates.items()),
            *((f"{name}, TFSERVER_PIN_CPU=off", values) for name, values in unpinned.items())]
    for name, values in rows:
        goal = goals.get(name, "-")
        print(f"| {name} (req/s) | {max(values):,.0f} | {statistics.median(values):,.0f} "
              f"| {goal} |")
    print(f"| RSS after the load | {loaded:.1f} MB | - | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
