"""Benchmarks of runs: how soon a client sees terraform's events, and how soon an async
request starts terraform.

    python bench/bench_runs.py [--rounds N]

  event latency   a client follows GET /runs/{id}/events (NDJSON) while a three-resource
                  apply runs; for each event, the time from the server reading it off
                  terraform's -json stream (the event's `time`) to the client reading it
                  off its socket. Terraform writes each line as it happens and the pipe
                  adds microseconds, so this is the latency a client sees.
  async start     from sending `PUT ... Prefer: respond-async` on an idle instance to the
                  terraform process starting (a wrapper records its exec time), against
                  a bare `subprocess.Popen` of the same wrapper (the floor).
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support import start_server  # noqa: E402


def shim(folder: Path) -> tuple[Path, Path]:
    """A terraform wrapper that logs the time it was executed, then runs terraform."""
    real = shutil.which("terraform")
    assert real, "terraform is needed"
    log = folder / "starts.log"
    path = folder / "terraform-timed"
    path.write_text(f'#!/bin/sh\necho "$1 $(date +%s.%N)" >> "{log}"\nexec "{real}" "$@"\n')
    path.chmod(0o755)
    return path, log


def starts(log: Path) -> list[float]:
    return [float(line.split()[1]) for line in log.read_text().splitlines()
            if line.startswith("apply ")]


def event_latencies(url: str, rounds: int) -> list[float]:
    found: list[float] = []
    host = url.split("//")[1]
    for i in range(rounds):
        conn = http.client.HTTPConnection(host, timeout=60)
        conn.request("PUT", f"/steps/ev{i % 3}", body=json.dumps({"seconds": 0.2}).encode(),
                     headers={"Content-Type": "application/json", "Prefer": "respond-async"})
        resp = conn.getresponse()
        run = json.loads(resp.read())
        conn.request("GET", f"/runs/{run['id']}/events")
        resp = conn.getresponse()
        while line := resp.readline():
            arrived = time.time()
            event = json.loads(line)
            if event["type"] in ("resource", "planned", "outputs", "finished"):
                sent = dt.datetime.fromisoformat(event["time"].replace("Z", "+00:00"))
                found.append(arrived - sent.timestamp())
        conn.close()
    return found


def async_starts(url: str, log: Path, rounds: int) -> list[float]:
    found = []
    host = url.split("//")[1]
    conn = http.client.HTTPConnection(host, timeout=60)
    for i in range(rounds):
        before = len(starts(log))
        sent = time.time()
        conn.request("PUT", f"/steps/as{i}", body=json.dumps({"seconds": 0}).encode(),
                     headers={"Content-Type": "application/json", "Prefer": "respond-async"})
        resp = conn.getresponse()
        resp.read()
        deadline = time.monotonic() + 30
        while len(starts(log)) == before:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        found.append(starts(log)[before] - sent)
        time.sleep(0.5)  # let it finish: the next instance starts idle with free slots
    conn.close()
    return found


def bare_starts(wrapper: Path, log: Path, rounds: int) -> list[float]:
    found = []
    for _ in range(rounds):
        before = len(starts(log))
        sent = time.time()
        subprocess.run([str(wrapper), "apply", "-help"], capture_output=True, check=False)
        found.append(starts(log)[before] - sent)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="tfserver-bench-runs-"))
    try:
        wrapper, log = shim(base)
        srv = start_server(base / "srv", modules_dir=ROOT / "tests" / "modules_runs",
                           env={"TFSERVER_TERRAFORM": str(wrapper),
                                "TFSERVER_LOG_LEVEL": "INFO"})
        try:
            latencies = event_latencies(srv.url, args.rounds)
            async_ = async_starts(srv.url, log, args.rounds)
        finally:
            srv.stop()
        bare = bare_starts(wrapper, log, args.rounds)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    def ms(values: list[float], q: float) -> float:
        return statistics.quantiles(values, n=100)[int(q) - 1] * 1000 if q < 100 else \
            max(values) * 1000

    print(f"{args.rounds} runs; {len(latencies)} events\n")
    print("| measure | median ms | p95 ms | target |")
    print("|---|---:|---:|---|")
    print(f"| event: terraform's line read by the server → read by the client | "
          f"{statistics.median(latencies) * 1000:.2f} | {ms(latencies, 95):.2f} | < 100 ms |")
    print(f"| async request → terraform started (idle instance) | "
          f"{statistics.median(async_) * 1000:.1f} | {ms(async_, 95):.1f} | < 50 ms |")
    print(f"| bare Popen of the same wrapper (the floor) | "
          f"{statistics.median(bare) * 1000:.1f} | {ms(bare, 95):.1f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
