"""What metrics and the audit trail cost per request, against an apply and a GET.

    python bench/bench_ops.py [--rounds N]

The work operability adds to a request is measured in isolation, with the server's own
objects: the route template and the Prometheus request metrics, and for a state-changing
request its audit line (through the JSON formatter, to a null stream) and its run's
metrics and audit line. The access line every request had before is not counted. It is
then set against the median of real applies and real GETs of the same server
(keep-alive), measured in the same process.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from support import start_server  # noqa: E402
from tfserver.logs import JsonFormatter, audit_log  # noqa: E402
from tfserver.metrics import Metrics  # noqa: E402
from tfserver.web.routes import template  # noqa: E402


def per_request_cost(n: int, changing: bool) -> float:
    """Seconds of operability work per request (median of batches)."""
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    metrics = Metrics()
    batches = []
    for _ in range(20):
        handler.stream = io.StringIO()
        started = time.perf_counter()
        for _ in range(n):
            route, module, instance = template("/demo/staging")
            metrics.request("PUT", route, 201, 0.08)
            if changing:
                audit_log.info("%s %s: %s", "PUT", route, 201, extra={
                    "event": "request",
                    "who": {"subject": "s", "client_id": "c", "tenant": "t", "address": "a"},
                    "what": {"method": "PUT", "route": route, "module": module,
                             "instance": instance, "run_id": "r" * 32, "request_id": "q",
                             "idempotency_key": None, "dry_run": False},
                    "outcome": {"status": 201, "title": None}})
                metrics.run("demo", "apply", "succeeded", 0.08)
                audit_log.info("run %s", "r", extra={"event": "run", "who": {}, "what": {},
                                                      "outcome": {}})
        batches.append((time.perf_counter() - started) / n)
    return statistics.median(batches)


def server_times(rounds: int) -> tuple[float, float]:
    base = Path(tempfile.mkdtemp(prefix="tfserver-bench-ops-"))
    try:
        shutil.copytree(ROOT / "bench" / "modules" / "minimal", base / "modules" / "minimal")
        srv = start_server(base / "srv", modules_dir=base / "modules",
                           env={"TFSERVER_LOG_LEVEL": "INFO"})
        conn = http.client.HTTPConnection(srv.url.split("//")[1], timeout=60)
        applies, gets = [], []
        for i in range(rounds):
            body = json.dumps({"name": f"n{i % 2}"}).encode()
            started = time.perf_counter()
            conn.request("PUT", "/minimal/x", body=body,
                         headers={"Content-Type": "application/json"})
            conn.getresponse().read()
            applies.append(time.perf_counter() - started)
            for _ in range(20):
                started = time.perf_counter()
                conn.request("GET", "/minimal/x")
                conn.getresponse().read()
                gets.append(time.perf_counter() - started)
        conn.close()
        srv.stop()
        return statistics.median(applies), statistics.median(gets)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    apply_s, get_s = server_times(args.rounds)
    changing = per_request_cost(2000, changing=True)
    reading = per_request_cost(2000, changing=False)
    print("| path | median request | metrics + audit | share | target |")
    print("|---|---:|---:|---:|---|")
    print(f"| apply (PUT, minimal module) | {apply_s * 1000:.1f} ms | {changing * 1e6:.0f} µs "
          f"| {changing / apply_s * 100:.2f}% | <= 2% |")
    print(f"| GET of an instance | {get_s * 1000:.2f} ms | {reading * 1e6:.0f} µs "
          f"| {reading / get_s * 100:.2f}% | <= 2% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
