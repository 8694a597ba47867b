"""What references cost a run's start: `References.resolve` of 0, 1 and 10 references on
local state (issue 22: 10 references add under 5 ms).

    python bench/bench_refs.py [--rounds N]

In process, no terraform: ten `network`-like states are written where the local backend
keeps them (as terraform writes them), a module of ten string variables references one
output of each, and the resolution a run does before terraform (the wait for older runs
of the referenced instances, the state reads, the type check, the scrubber) is timed;
so is the check at submit (`References.validate`: the same, plus the chain walk). Each
figure is the best and the median of the rounds (the machine may be shared). Nothing
here asserts a time; it prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tfserver.app.execute import RunSpec  # noqa: E402
from tfserver.app.references import References  # noqa: E402
from tfserver.auth import Principal  # noqa: E402
from tfserver.module.discover import discover, load_module  # noqa: E402
from tfserver.runs.store import RunStore, new_run_id  # noqa: E402
from tfserver.scrub import Scrubber  # noqa: E402
from tfserver.storage.local import LocalBackend  # noqa: E402

SOURCES = 10


class _Runs:
    """What `References` asks of the run registry: the store (no run is active here)."""

    def __init__(self, store: RunStore) -> None:
        self.store = store

    def records(self, ids: list[str]) -> list[Any]:
        return []


def setup(folder: Path) -> tuple[References, Any, Principal]:
    """The states of ten network instances, and a module that references them."""
    for i in range(SOURCES):
        ws = folder / "state" / "network" / f"local.n{i}"
        ws.mkdir(parents=True)
        (ws / "terraform.tfstate").write_text(json.dumps({
            "version": 4, "serial": 3, "lineage": "bench", "terraform_version": "1.11.4",
            "outputs": {"network_id": {"value": f"net-{i}", "type": "string"},
                        "token": {"value": f"secret-{i}", "type": "string",
                                  "sensitive": True}},
            "resources": [{"mode": "managed", "type": "terraform_data", "name": "net",
                           "instances": []}]}))
    wide = folder / "modules" / "wide"
    wide.mkdir(parents=True)
    (wide / "main.tf").write_text("".join(
        f'variable "v{i}" {{\n  type = string\n}}\n' for i in range(SOURCES)))
    modules = {**discover(ROOT / "tests" / "modules_refs"), "wide": load_module(wide)}
    backend = LocalBackend(folder)
    refs = References(modules, backend, _Runs(RunStore(backend.objects)),  # type: ignore[arg-type]
                      wait=5)
    return refs, modules["wide"], Principal("bench", "local", all_modules=True)


def body(count: int) -> dict[str, Any]:
    """Ten variables, `count` of them references."""
    return {f"v{i}": {"$ref": f"/network/n{i}#/outputs/network_id"} if i < count
            else f"net-{i}" for i in range(SOURCES)}


def timed(fn: Any, rounds: int) -> tuple[float, float]:
    """(best, median) milliseconds of `fn()`."""
    fn()  # warm: the first read parses the state files
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tfserver-bench-refs-") as tmp:
        refs, module, who = setup(Path(tmp))
        rows = []
        for count in (0, 1, SOURCES):
            inputs = body(count)

            def start(inputs: dict[str, Any] = inputs, count: int = count) -> None:
                spec = RunSpec(module, "w", "local.w", "apply", inputs, who,
                               Scrubber(()), run_id=new_run_id())
                refs.resolve(spec)
                assert count == 0 or spec.values is not None

            def submit(inputs: dict[str, Any] = inputs) -> None:
                refs.validate(module, who, "w", inputs)

            rows.append((count, *timed(start, args.rounds), *timed(submit, args.rounds)))
    base_start, base_submit = rows[0][2], rows[0][4]
    print(f"{'references':>10} | {'start best':>10} | {'start median':>12} | "
          f"{'added':>7} | {'submit best':>11} | {'submit median':>13} | {'added':>7}")
    print("-" * 92)
    for count, s_best, s_med, v_best, v_med in rows:
        print(f"{count:>10} | {s_best:>8.3f}ms | {s_med:>10.3f}ms | {s_med - base_start:>5.2f}ms"
              f" | {v_best:>9.3f}ms | {v_med:>11.3f}ms | {v_med - base_submit:>5.2f}ms")
    print(f"\n(target: {SOURCES} references add under 5 ms to a run's start; "
          f"{args.rounds} rounds each)")


if __name__ == "__main__":
    main()
