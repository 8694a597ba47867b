"""Graceful stop: SIGTERM lets runs in flight finish, then the server exits 0."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from support import start_server
from test_concurrency import intervals, put_slow


def wait_started(journal: Path, tag: str, timeout: float = 30) -> None:
    """Block until the slow module's command has begun (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if journal.exists() and f"start {tag} " in journal.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"run {tag} never started")


def test_sigterm_lets_a_run_in_flight_finish(tmp: Path) -> None:
    srv = start_server(tmp)
    journal = tmp / "journal"
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(put_slow, srv, "inflight", journal, "inflight", 3)
        wait_started(journal, "inflight")
        srv.proc.send_signal(signal.SIGTERM)
        answer = running.result(timeout=60)
    assert answer.status == 201, answer.body
    assert srv.proc.wait(timeout=30) == 0
    assert "inflight" in intervals(journal)  # the command ran to its end
    assert any(r.get("message") == "stopped" for r in srv.log_records())


def test_grace_period_over_interrupts_the_run_and_frees_state(tmp: Path) -> None:
    srv = start_server(tmp, env={"TFSERVER_SHUTDOWN_GRACE": "1"})
    journal = tmp / "journal"
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(put_slow, srv, "cut", journal, "cut", 60)
        wait_started(journal, "cut")
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        answer = running.result(timeout=60)
        assert srv.proc.wait(timeout=30) == 0
    assert time.monotonic() - started < 15
    assert answer.status == 503, answer.body
    assert "interrupted" in answer.json["detail"]
    # A new server on the same state folder finds the instance unlocked.
    again = start_server(tmp)
    try:
        assert put_slow(again, "cut", journal, "after", 0).status in (200, 201)
    finally:
        again.stop()
