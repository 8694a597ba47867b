"""Benchmarks: tfserver against raw terraform, interleaved, medians and ratios as a table.

    python bench/bench.py [--rounds N]

Measurements, taken in turn in every round (the order rotates) so drift hits them alike:
Modules: bench/modules/minimal (one variable, one terraform_data, one output) and the
demo module of modules/demo (six variables with validations, two resources).
  server apply   PUT /<module>/<instance> through a running tfserver (HTTP, validation, locks,
                 one `terraform apply -json`)
  raw apply      `terraform apply -json -var-file=...` in an equally prepared (initialised,
                 same backend override) copy of the module
  original       what the Go original did per request: init + apply + output -json
  server GET     GET /<module>/<instance> (outputs read from the state file)
  output -json   `terraform output -json` in the raw copy
Two scenarios: "change", where every apply alternates between two inputs so terraform
really updates a resource, and "no-op", where the inputs stay the same. Ratios are given
both as the ratio of medians and as the median of the per-round ratios.
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
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support import on_tmpfs, start_server  # noqa: E402

ENV = {
    "PATH": os.environ["PATH"],
    "HOME": os.environ.get("HOME", "/tmp"),
    "TF_IN_AUTOMATION": "1",
    "TF_INPUT": "0",
    "CHECKPOINT_DISABLE": "1",
}


def terraform(args: list[str], cwd: Path, workspace: str) -> None:
    done = subprocess.run(["terraform", *args], cwd=cwd, capture_output=True, text=True,
                          env={**ENV, "TF_WORKSPACE": workspace}, timeout=300, check=False)
    if done.returncode != 0:
        raise SystemExit(f"terraform {args[0]} failed: {done.stderr[-2000:]}")


MODULES = {"minimal": ROOT / "bench" / "modules" / "minimal", "demo": ROOT / "modules" / "demo"}
if os.environ.get("BENCH_ONLY"):
    MODULES = {k: v for k, v in MODULES.items() if k == os.environ["BENCH_ONLY"]}


def prepare_raw(base: Path, module: str) -> Path:
    work = base / "raw" / module
    shutil.copytree(MODULES[module], work)
    state = base / "raw-state" / module
    (work / "bench_override.tf.json").write_text(json.dumps({"terraform": {"backend": {
        "local": {"path": str(state / "default.tfstate"), "workspace_dir": str(state)}}}}))
    rc = base / "raw.tfrc"
    (base / "raw-cache").mkdir(exist_ok=True)
    rc.write_text(f'plugin_cache_dir = "{base / "raw-cache"}"\n')
    ENV["TF_CLI_CONFIG_FILE"] = str(rc)
    terraform(["init", "-input=false", "-no-color"], work, "default")
    return work


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run_scenario(srv_url: str, module: str, raw: Path, base: Path, rounds: int, change: bool
                 ) -> dict[str, list[float]]:
    tag = "chg" if change else "noop"
    conn = http.client.HTTPConnection(srv_url.split("//")[1], timeout=120)
    names = (f"{tag}-a", f"{tag}-b") if change else (f"{tag}-a", f"{tag}-a")
    var_files = []
    for name in names:
        path = base / f"{module}-{name}.tfvars.json"
        path.write_text(json.dumps({"name": name}))
        var_files.append(path)
    ws = f"local.{tag}"

    def server_apply(i: int) -> None:
        body = json.dumps({"name": names[i % 2]}).encode()
        conn.request("PUT", f"/{module}/{tag}", body=body,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status in (200, 201), resp.status

    def server_get() -> None:
        conn.request("GET", f"/{module}/{tag}")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200

    def raw_apply(i: int) -> None:
        terraform(["apply", "-json", "-auto-approve", "-input=false", "-no-color",
                   "-lock-timeout=0s", f"-var-file={var_files[i % 2]}"], raw, ws)

    def original(i: int) -> None:
        # The original had one state for everybody: the default workspace.
        terraform(["init", "-input=false", "-no-color"], raw, "default")
        terraform(["apply", "-json", "-auto-approve", "-input=false", "-no-color",
                   f"-var-file={var_files[i % 2]}"], raw, "default")
        terraform(["output", "-json"], raw, "default")

    def raw_output() -> None:
        terraform(["output", "-json"], raw, ws)

    for i in (1, 2):  # warm-up, and every instance exists before timing
        server_apply(i)
        raw_apply(i)
        original(i)
    samples: dict[str, list[float]] = {k: [] for k in ("server", "raw", "orig", "get", "out")}
    for i in range(rounds):
        steps: list[tuple[str, Callable[[], object]]] = [
            ("server", lambda i=i: server_apply(i)),
            ("raw", lambda i=i: raw_apply(i)),
            ("orig", lambda i=i: original(i)),
            ("get", server_get),
            ("out", raw_output),
        ]
        for key, fn in steps[i % 5:] + steps[:i % 5]:
            samples[key].append(timed(fn))
    conn.close()
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="tfserver-bench-"))
    results = {}
    try:
        with on_tmpfs() as scratch:
            served = base / "modules"
            for name, path in MODULES.items():
                shutil.copytree(path, served / name)
            # Var files and terraform's output on tmpfs, as the server puts them by default.
            srv = start_server(base / "srv", modules_dir=served,
                               env={"TFSERVER_LOG_LEVEL": "INFO", **scratch})
            for module in MODULES:
                raw = prepare_raw(base, module)
                for change in (True, False):
                    key = f"{module}, {'change' if change else 'no-op'}"
                    results[key] = run_scenario(srv.url, module, raw, base, args.rounds, change)
            srv.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)

    def med(v: list[float]) -> float:
        return statistics.median(v) * 1000

    def paired(a: list[float], b: list[float]) -> float:
        return statistics.median(x / y for x, y in zip(a, b, strict=True))

    print(f"{args.rounds} interleaved rounds per scenario, medians in ms\n")
    print("| module, scenario | server apply | raw apply | server / raw "
          "| original init+apply+output | original / server "
          "| server GET | output -json | output / GET |")
    print("|---|---:|---:|---|---:|---|---:|---:|---|")
    for name, s in results.items():
        print(
            f"| {name} | {med(s['server']):.1f} | {med(s['raw']):.1f} | "
            f"{med(s['server']) / med(s['raw']):.3f}x (paired {paired(s['server'], s['raw']):.3f}x)"
            f" | {med(s['orig']):.1f} | {med(s['orig']) / med(s['server']):.2f}x "
            f"(paired {paired(s['orig'], s['server']):.2f}x) | {med(s['get']):.1f} | "
            f"{med(s['out']):.1f} | {med(s['out']) / med(s['get']):.1f}x |"
        )
    print("\ntargets: server / raw <= 1.05x; original / server >= 2.5x; output / GET >= 3x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
