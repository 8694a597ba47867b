"""Limits exact under bursts: run and instance slots taken with create-if-absent writes
(app/reservations.py), on a real server (plain synchronous requests, the original API) and
on the slots themselves; the per-tenant bound on queued runs."""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from support import ServerProcess, start_server
from test_concurrency import intervals
from tfserver.app.reservations import Reservations, Slots
from tfserver.storage.local import LocalObjects


def server_with(tmp: Path, policy: str, **env: str) -> ServerProcess:
    (tmp / "policy.toml").write_text(policy)
    return start_server(tmp, env={"TFSERVER_POLICY": str(tmp / "policy.toml"), **env})


def test_a_burst_of_synchronous_creates_makes_exactly_the_quota(tmp: Path) -> None:
    server = server_with(tmp, "[modules.basic]\nmax_instances_per_tenant = 3\n",
                         TFSERVER_MAX_RUNS="10")
    try:
        with ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(lambda i: server.request(
                "PUT", f"/basic/burst-{i}", {"name": f"n{i}"}), range(10)))
        statuses = sorted(a.status for a in answers)
        assert statuses == [201] * 3 + [403] * 7, [a.body for a in answers]
        listed = server.request("GET", "/basic").json["instances"]
        assert len([i for i in listed if i["instance"].startswith("burst-")]) == 3
        made = [f"burst-{i}" for i, a in enumerate(answers) if a.status == 201]
        # Updates are never refused; a destroy gives its slot back.
        assert server.request("PUT", f"/basic/{made[0]}", {"name": "again"}).status == 200
        assert server.request("PUT", "/basic/burst-new", {"name": "x"}).status == 403
        assert server.request("DELETE", f"/basic/{made[0]}").status == 200
        assert server.request("PUT", "/basic/burst-new", {"name": "x"}).status == 201
        for name in [*made[1:], "burst-new"]:
            assert server.request("DELETE", f"/basic/{name}").status == 200
    finally:
        server.stop()


def test_a_burst_of_synchronous_runs_never_runs_more_than_the_limit(tmp: Path) -> None:
    server = server_with(tmp, "[defaults]\nmax_runs_per_tenant = 2\n", TFSERVER_MAX_RUNS="6")
    journal = tmp / "journal"
    try:
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda i: server.request(
                "PUT", f"/slow/limit-{i}", {"seconds": 1.5, "journal": str(journal),
                                            "tag": f"r{i}"}), range(6)))
        ran = [a for a in answers if a.status in (200, 201)]
        assert len(ran) >= 2 and all(a.status in (200, 201, 429) for a in answers), \
            [a.body for a in answers]
        spans = list(intervals(journal).values())
        for a, b, c in itertools.combinations(spans, 3):  # never three at once
            assert max(a[0], b[0], c[0]) >= min(a[1], b[1], c[1]), spans
        # The slots came back: the next run is admitted.
        r = server.request("PUT", "/slow/limit-0", {"seconds": 0, "journal": str(journal),
                                                    "tag": "after"})
        assert r.status in (200, 201), r.body
    finally:
        server.stop()


def test_a_tenant_cannot_queue_without_bound(tmp: Path) -> None:
    server = server_with(tmp, "[defaults]\nmax_queued_per_tenant = 2\n", TFSERVER_MAX_RUNS="1")
    journal = tmp / "journal"
    try:
        ids = []
        for i in range(3):  # one runs, two wait for the run slot
            r = server.request("PUT", f"/slow/q-{i}", {"seconds": 3, "journal": str(journal),
                                                       "tag": f"q{i}"},
                               headers={"Prefer": "respond-async"})
            assert r.status == 202, r.body
            ids.append(r.json["id"])
        r = server.request("PUT", "/slow/q-3", {"seconds": 0, "journal": str(journal),
                                                "tag": "q3"},
                           headers={"Prefer": "respond-async"})
        assert r.status == 409, r.body
        assert "waiting in queues" in r.json["detail"] and r.header("Retry-After")
        for run_id in ids:
            assert server.request("POST", f"/runs/{run_id}/cancel").status in (202, 409)
    finally:
        server.stop()


def test_slots_are_never_held_twice(tmp: Path) -> None:
    slots = Slots(LocalObjects(tmp / "objects"), "runs")
    took: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(12)

    def race(i: int) -> None:
        barrier.wait(10)
        if slots.take("t", "m", f"run-{i}", 3):
            with lock:
                took.append(f"run-{i}")

    threads = [threading.Thread(target=race, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(took) == 3
    assert sorted(h.holder for h in slots.held("t", "m")) == sorted(took)


def test_slots_of_gone_holders_are_freed_after_the_grace(tmp: Path) -> None:
    now = [1000.0]
    alive = {"live"}
    res = Reservations(LocalObjects(tmp / "objects"), run_alive=lambda r: r in alive,
                       clock=lambda: now[0], grace=30)
    assert res.take_run("t", "m", "live", 2) and res.take_run("t", "m", "dead", 2)
    assert not res.take_run("t", "m", "new", 2)  # within the grace: trusted
    now[0] += 31
    assert res.take_run("t", "m", "new", 2)  # "dead" ended without giving its slot back
    assert not res.take_run("t", "m", "more", 2)
    res.free_run("t", "m", "live")
    assert res.take_run("t", "m", "more", 2)
    # Instances made before slots existed take slots first, then count.
    assert not res.take_instance("t", "m", "t.c", 2, existing={"t.a", "t.b"}, creating=())
    assert res.take_instance("t", "m", "t.a", 2, existing={"t.a", "t.b"}, creating=())
    res.free_instance("t", "m", "t.b")
    assert res.take_instance("t", "m", "t.c", 2, existing={"t.a"}, creating=())
    # A slot whose instance has no state and no run making it is freed after the grace.
    now[0] += 31
    assert res.take_instance("t", "m", "t.d", 2, existing={"t.a"}, creating=())
    assert {h.holder for h in res.instances.held("t", "m")} == {"t.a", "t.d"}
