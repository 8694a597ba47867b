"""The server's own cost per synchronous apply, with terraform's apply taken out.

    python bench/bench_overhead.py [--rounds N]

`bench.py` measures the server against raw terraform; on a 50 ms apply the server's few
milliseconds are about this machine's run-to-run noise. Here the server runs a stand-in
for `terraform apply` (a shell script that prints a real apply's JSON lines and exits 0;
every other command goes to the real terraform), so what is left is the server: HTTP,
validation, the run's record, events and lane, the var file, the kept inputs and request,
the process start and the output parsing. Measured per PUT: the answer's latency, and
the CPU time the server process spent (all its threads; the stand-in's own is apart).
The stand-in's exec alone is timed too, to subtract.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
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


def server_cpu(pid: int) -> float:
    """User and system seconds of a process, its threads included (children apart)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=400)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="tfserver-overhead-"))
    try:
        script = stand_in(base)
        execs = []
        for _ in range(50):
            started = time.perf_counter()
            subprocess.run([str(script), "apply"], capture_output=True, check=True)
            execs.append(time.perf_counter() - started)
        served = base / "modules"
        shutil.copytree(MINIMAL, served / "minimal")
        srv = start_server(base / "srv", modules_dir=served,
                           env={"TFSERVER_LOG_LEVEL": "INFO", "TFSERVER_TERRAFORM": str(script)})
        conn = http.client.HTTPConnection(srv.url.split("//")[1], timeout=60)

        def put(i: int) -> None:
            conn.request("PUT", "/minimal/overhead", body=json.dumps({"name": "ab"[i % 2]}),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status in (200, 201), resp.status

        for i in range(10):  # warm-up
            put(i)
        latencies = []
        cpu_before = server_cpu(srv.proc.pid)
        for i in range(args.rounds):
            started = time.perf_counter()
            put(i)
            latencies.append(time.perf_counter() - started)
        time.sleep(0.5)  # the writes that follow an answer are the run's cost too
        cpu = (server_cpu(srv.proc.pid) - cpu_before) / args.rounds
        conn.close()
        srv.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    latencies.sort()
    p50, p90 = statistics.median(latencies), latencies[len(latencies) * 9 // 10]
    stand_in_p50 = statistics.median(execs)
    print(f"{args.rounds} synchronous applies of the minimal module, terraform's apply "
          "replaced by a stand-in; ms\n")
    print("| measurement | p50 | p90 |")
    print("|---|---:|---:|")
    print(f"| PUT answered | {p50 * 1000:.2f} | {p90 * 1000:.2f} |")
    print(f"| the stand-in's exec alone | {stand_in_p50 * 1000:.2f} | |")
    print(f"| the server's own latency (PUT - stand-in) | {(p50 - stand_in_p50) * 1000:.2f} | |")
    print(f"| server CPU per apply (all threads) | {cpu * 1000:.2f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
