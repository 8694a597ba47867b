"""A drift check of the demo module against a dry run of it, through one tfserver.

    python bench/bench_drift.py [--rounds N]

Each round, in turn (the order rotates so any slowdown hits both alike):
  drift check   POST /demo/<instance>/drift (`terraform plan -refresh-only` of the kept
                inputs; in sync, so no `terraform show` of the plan follows)
  dry run       PUT /demo/<instance>?dry_run=true with the same inputs (`terraform plan`,
                the plan saved for `POST /runs/{id}/apply`)
Medians, and the median of the per-round ratios. No timed assertion: numbers to read.
Measured (2 cores, 10 rounds): 53.0 ms against 52.9 ms, a ratio of 1.00.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support import ServerProcess, start_server  # noqa: E402

INPUTS = {"name": "bench-drift", "replicas": 2, "tags": {"team": "bench"},
          "settings": {"tier": "small"}}


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def call(server: ServerProcess, method: str, path: str, body: object = None) -> None:
    r = server.request(method, path, body)
    if r.status != 200:
        raise SystemExit(f"{method} {path}: {r.status} {r.body[:500]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    rounds = parser.parse_args().rounds
    with tempfile.TemporaryDirectory() as tmp:
        modules = Path(tmp) / "modules"
        shutil.copytree(ROOT / "modules" / "demo", modules / "demo")
        server = start_server(Path(tmp), modules_dir=modules, env={"TFSERVER_LOG_LEVEL": "INFO"})
        try:
            r = server.request("PUT", "/demo/bench", INPUTS)
            if r.status not in (200, 201):
                raise SystemExit(f"apply: {r.status} {r.body[:500]!r}")
            steps = {"drift check": lambda: call(server, "POST", "/demo/bench/drift"),
                     "dry run": lambda: call(server, "PUT", "/demo/bench?dry_run=true",
                                             INPUTS)}
            for fn in steps.values():
                fn()  # warm: the working copy and the OS caches
            times: dict[str, list[float]] = {k: [] for k in steps}
            names = list(steps)
            for i in range(rounds):
                for name in names[i % 2:] + names[:i % 2]:
                    times[name].append(timed(steps[name]))
        finally:
            server.stop()
    ratios = [d / p for d, p in zip(times["drift check"], times["dry run"], strict=True)]
    print(f"demo module, {rounds} rounds, one tfserver (terraform_data: always in sync)")
    print(f"{'':14}{'median ms':>10}{'min ms':>10}{'max ms':>10}")
    for name, found in times.items():
        print(f"{name:14}{statistics.median(found) * 1000:10.1f}"
              f"{min(found) * 1000:10.1f}{max(found) * 1000:10.1f}")
    of_medians = statistics.median(times["drift check"]) / statistics.median(times["dry run"])
    print(f"drift check / dry run: {of_medians:.2f} (ratio of medians), "
          f"{statistics.median(ratios):.2f} (median of ratios)")


if __name__ == "__main__":
    main()
