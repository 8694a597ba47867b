"""Locks and limits under real concurrency: runs on one instance never overlap."""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from support import Response, ServerProcess, start_server


def intervals(journal: Path) -> dict[str, tuple[float, float]]:
    """Start and end time of each tagged run, from the slow module's journal."""
    starts: dict[str, float] = {}
    found: dict[str, tuple[float, float]] = {}
    for line in journal.read_text().splitlines():
        kind, tag, ts = line.split()
        if kind == "start":
            starts[tag] = float(ts)
        else:
            found[tag] = (starts[tag], float(ts))
    return found


def put_slow(srv: ServerProcess, instance: str, journal: Path, tag: str,
             seconds: float, delay: float = 0.0) -> Response:
    time.sleep(delay)
    return srv.request("PUT", f"/slow/{instance}",
                       {"seconds": seconds, "journal": str(journal), "tag": tag})


def test_runs_on_one_instance_wait_and_never_overlap(tmp: Path) -> None:
    srv = start_server(tmp, env={"TFSERVER_LOCK_WAIT": "60"})
    journal = tmp / "journal"
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(put_slow, srv, "same", journal, f"r{i}", 1, i * 0.1)
                       for i in range(4)]
            answers = [f.result(timeout=120) for f in futures]
        assert sorted(a.status for a in answers) == [200, 200, 200, 201], \
            [a.body for a in answers]
        spans = sorted(intervals(journal).values())
        assert len(spans) == 4
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end, spans
    finally:
        srv.stop()


def test_busy_instance_answers_409_with_retry_after(server: ServerProcess, tmp: Path) -> None:
    journal = tmp / "journal"
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(put_slow, server, "busy", journal, "first", 3)
        second = pool.submit(put_slow, server, "busy", journal, "second", 0, 1.0)
        a, b = first.result(timeout=60), second.result(timeout=60)
    assert a.status == 201, a.body
    assert b.status == 409, b.body
    assert b.header("Retry-After") is not None
    assert "being changed by another run" in b.json["detail"]
    assert set(intervals(journal)) == {"first"}
    assert server.request("DELETE", "/slow/busy").status == 200


def test_runs_on_different_instances_overlap(server: ServerProcess, tmp: Path) -> None:
    journal = tmp / "journal"
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(put_slow, server, name, journal, name, 2)
                   for name in ("par-a", "par-b")]
        answers = [f.result(timeout=60) for f in futures]
    assert [a.status for a in answers] == [201, 201]
    spans = intervals(journal)
    (s1, e1), (s2, e2) = spans["par-a"], spans["par-b"]
    assert s1 < e2 and s2 < e1, spans  # the two sleeps ran at the same time
    for name in ("par-a", "par-b"):
        assert server.request("DELETE", f"/slow/{name}").status == 200


def test_run_cap_answers_503(tmp: Path) -> None:
    srv = start_server(tmp, env={"TFSERVER_MAX_RUNS": "1"})
    journal = tmp / "journal"
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(put_slow, srv, "cap-a", journal, "a", 3)
            second = pool.submit(put_slow, srv, "cap-b", journal, "b", 0, 1.0)
            a, b = first.result(timeout=60), second.result(timeout=60)
        assert a.status == 201, a.body
        assert b.status == 503, b.body
        assert b.header("Retry-After") is not None
        assert "run slots are busy" in b.json["detail"]
        # The refused run released its instance lock: it can run now.
        assert put_slow(srv, "cap-b", journal, "b2", 0).status == 201
    finally:
        srv.stop()


def test_timed_out_run_answers_504_and_releases_the_instance(tmp: Path) -> None:
    srv = start_server(tmp, env={"TFSERVER_RUN_TIMEOUT": "3", "TFSERVER_KILL_GRACE": "5"})
    journal = tmp / "journal"
    try:
        started = time.monotonic()
        r = put_slow(srv, "late", journal, "late", 60)
        assert r.status == 504, r.body
        assert "deadline of 3s" in r.json["detail"]
        assert time.monotonic() - started < 15
        # Terraform was interrupted, wrote its state and released its lock; the
        # in-process lock is free too: the next run on the instance goes through.
        r = put_slow(srv, "late", journal, "again", 0)
        assert r.status in (200, 201), r.body
        assert "again" in intervals(journal)
        assert srv.request("DELETE", "/slow/late").status == 200
    finally:
        srv.stop()


def churn(srv: ServerProcess, prefix: str, count: int = 4) -> list[tuple[int, int]]:
    """Create and destroy `count` instances at once; their (PUT, DELETE) statuses."""
    def one(i: int) -> tuple[int, int]:
        put = srv.request("PUT", f"/basic/{prefix}-{i}", {"name": f"n{i}"}).status
        return put, srv.request("DELETE", f"/basic/{prefix}-{i}").status

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_workspaces_created_and_deleted_in_parallel(server: ServerProcess) -> None:
    # Every run names its workspace with TF_WORKSPACE: no shared .terraform/environment.
    assert churn(server, "churn") == [(201, 200)] * 4  # as many as the run cap allows
    listed = [i["instance"] for i in server.request("GET", "/basic").json["instances"]]
    assert not [name for name in listed if name.startswith("churn-")]
