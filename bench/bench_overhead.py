"""The server's own cost per synchronous apply, with terraform's apply taken out.

    python bench/bench_overhead.py [--rounds N] [--real]

`bench.py` measures the server against raw terraform; on a 50 ms apply the server's few
milliseconds are about this machine's run-to-run noise. Here the server runs a stand-in
for `terraform apply` (a shell script that prints a real apply's JSON lines and exits 0;
every other command goes to the real terraform), so what is left is the server: HTTP,
validation, the run's record, events and lane, the var file, the kept inputs and request,
the process start and the output parsing. Measured per PUT: the answer's latency, and
the CPU time the server process spent (all its threads; the stand-in's own is apart).
The stand-in's exec alone is timed too, to subtract. A second server has a webhook for
`run.finished` configured (issue 23's target: under 1 ms more at a run's end), delivered to
a receiver on loopback that answers 204. With the stand-in, runs end about 150 times a
second and the deliveries' own work (kept in the backend, claimed, sent, ended) competes
with them; `--real` runs the real terraform
instead, at the pace of real applies (then "PUT answered" is the whole apply).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import http.server
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support import on_tmpfs, start_server  # noqa: E402

MINIMAL = ROOT / "bench" / "modules" / "minimal"


def stand_in(base: Path) -> Path:
    """A `terraform` whose apply prints a real apply's JSON lines (captured once from the
    minimal module) and exits; anything else runs the real one."""
    work = base / "capture"
    shutil.copytree(MINIMAL, work)
    real = shutil.which("terraform")
    if real is None:
        raise SystemExit("terraform is not on PATH")
    env = {**os.environ, "TF_IN_AUTOMATION": "1", "CHECKPOINT_DISABLE": "1"}
    subprocess.run([real, "init", "-input=false"], cwd=work, env=env, check=True,
                   capture_output=True, timeout=120)
    (work / "in.tfvars.json").write_text('{"name": "a"}')
    done = subprocess.run([real, "apply", "-json", "-auto-approve", "-input=false",
                           "-var-file=in.tfvars.json"], cwd=work, env=env, check=True,
                          capture_output=True, text=True, timeout=120)
    lines = base / "apply.ndjson"
    lines.write_text(done.stdout)
    script = base / "terraform"
    script.write_text(f'#!/bin/sh\nif [ "$1" = apply ]; then\n  while IFS= read -r l; do '
                      f'printf "%s\\n" "$l"; done < "{lines}"\n  exit 0\nfi\n'
                      f'exec "{real}" "$@"\n')
    script.chmod(0o700)
    return script


def receive() -> str:
    """A webhook receiver on loopback that answers every delivery 204; its URL."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/hook"


def server_cpu(pid: int) -> float:
    """User and system seconds of a process, its threads included (children apart)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--real", action="store_true", help="the real terraform's apply")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="tfserver-overhead-"))
    try:
        if args.real:
            script, execs = Path(shutil.which("terraform") or "terraform"), [0.0]
        else:
            script, execs = stand_in(base), []
            for _ in range(50):
                started = time.perf_counter()
                subprocess.run([str(script), "apply"], capture_output=True, check=True)
                execs.append(time.perf_counter() - started)
        served = base / "modules"
        shutil.copytree(MINIMAL, served / "minimal")
        policy = base / "policy.toml"
        receiver = receive()
        policy.write_text(f'[[webhooks]]\nurl = "{receiver}"\n'
                          'secret = "env:BENCH_HOOK_SECRET"\nevents = ["run.finished"]\n'
                          'tenants = ["*"]\n')
        with on_tmpfs() as scratch:  # var files and output where the server puts them
            plain, hooked = measure(base, served, script, args.rounds, scratch, {
                "TFSERVER_POLICY": str(policy), "TFSERVER_WEBHOOK_ALLOW": "127.0.0.1",
                "BENCH_HOOK_SECRET": "whsec_"
                + base64.b64encode(b"0123456789abcdef0123").decode()})
    finally:
        shutil.rmtree(base, ignore_errors=True)
    stand_in_p50 = statistics.median(execs)
    print(f"{args.rounds} synchronous applies of the minimal module, terraform's apply "
          + ("real; ms\n" if args.real else "replaced by a stand-in; ms\n"))
    print("| measurement | p50 | p90 |")
    print("|---|---:|---:|")
    if not args.real:
        print(f"| the stand-in's exec alone | {stand_in_p50 * 1000:.2f} | |")
    for name, (latencies, cpu) in (("", plain), (", a webhook configured", hooked)):
        p50, p90 = statistics.median(latencies), latencies[len(latencies) * 9 // 10]
        print(f"| PUT answered{name} | {p50 * 1000:.2f} | {p90 * 1000:.2f} |")
        if not args.real:
            print(f"| the server's own latency (PUT - stand-in){name} | "
                  f"{(p50 - stand_in_p50) * 1000:.2f} | |")
        print(f"| server CPU per apply (all threads){name} | {cpu * 1000:.2f} | |")
    return 0


def measure(base: Path, served: Path, script: Path, rounds: int, common: dict[str, str],
            hook_env: dict[str, str]
            ) -> tuple[tuple[list[float], float], tuple[list[float], float]]:
    """For a server without and one with a webhook, their applies taken in turn (so drift
    hits both alike): sorted PUT latencies (s) and the server's CPU seconds per apply."""
    servers = [start_server(base / name, modules_dir=served, env={
        "TFSERVER_LOG_LEVEL": "INFO", "TFSERVER_TERRAFORM": str(script), **common, **env})
        for name, env in (("plain", {}), ("hooked", hook_env))]
    try:
        conns = [http.client.HTTPConnection(s.url.split("//")[1], timeout=60) for s in servers]

        def put(conn: http.client.HTTPConnection, i: int) -> None:
            conn.request("PUT", "/minimal/overhead", body=json.dumps({"name": "ab"[i % 2]}),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status in (200, 201), resp.status

        for i in range(10):  # warm-up
            for conn in conns:
                put(conn, i)
        latencies: list[list[float]] = [[], []]
        cpu: list[float] = [0.0, 0.0]
        for i in range(rounds):
            for k in ((0, 1) if i % 2 else (1, 0)):
                before = server_cpu(servers[k].proc.pid)
                started = time.perf_counter()
                put(conns[k], i)
                latencies[k].append(time.perf_counter() - started)
                time.sleep(0.002)  # the writes that follow an answer are the run's cost too
                cpu[k] += server_cpu(servers[k].proc.pid) - before
        for conn in conns:
            conn.close()
    finally:
        for srv in servers:
            srv.stop()
    return (sorted(latencies[0]), cpu[0] / rounds), (sorted(latencies[1]), cpu[1] / rounds)


if __name__ == "__main__":
    sys.exit(main())
