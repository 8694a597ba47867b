"""A synchronous run's own path to terraform and back (issue 19's overhead): what waits for
terraform's start, and who a run's events wake.

Written before terraform started, a run's first record and its kept request took the GIL
from the run's thread on its way to the exec; woken by every event, the caller waiting for
the answer took it about 15 times an apply. These tests hold both where they are now."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from test_runs_defects import FakeControl, make_runs, new_run, wait_for

from tfserver.errors import Conflict
from tfserver.runs.run import Run
from tfserver.terraform.process import RunControl


def a_process() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "pass"])


class Startable(FakeControl):
    """A process handle whose process "starts" when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self._waiting: list[Callable[[], None]] | None = []

    def when_started(self, fn: Callable[[], None]) -> None:
        if self._waiting is None:
            fn()
        else:
            self._waiting.append(fn)

    def start(self) -> None:
        waiting, self._waiting = self._waiting or [], None
        for fn in waiting:
            fn()


# -- RunControl.when_started ---------------------------------------------------------------

def test_work_waiting_for_the_start_runs_once_as_the_first_process_starts() -> None:
    control, calls = RunControl(), []
    control.when_started(lambda: calls.append("a"))
    control.when_started(lambda: calls.append("b"))
    assert calls == []
    first, second = a_process(), a_process()
    try:
        control.attach(first)
        assert calls == ["a", "b"]
        control.attach(second)  # a run's second terraform (a rerun) starts nothing again
        assert calls == ["a", "b"]
        control.when_started(lambda: calls.append("late"))  # started already: at once
        assert calls == ["a", "b", "late"]
    finally:
        for proc in (first, second):
            proc.wait(10)


# -- the first record and the rest of on_started wait for terraform ---------------------------

def test_a_synchronous_runs_first_record_waits_for_terraforms_start(tmp_path: Path) -> None:
    runs = make_runs(tmp_path)
    runs.start(leftovers="none")
    try:
        control, release, at_start = Startable(), threading.Event(), []
        entered = threading.Event()

        def job(run: Run) -> str:
            entered.set()
            assert release.wait(10)
            return "done"

        run = new_run(job, sync=True)
        run.control = control
        run.on_started.append(lambda: at_start.append(runs.store.get(run.record.id)))
        runs.submit(run, what="x")
        assert entered.wait(10)
        # Before terraform starts nothing of the run is written: that would slow its start.
        assert runs.store.get(run.record.id) is None and at_start == []
        control.start()
        wait_for(lambda: len(at_start) == 1, timeout=10)
        stored = runs.store.get(run.record.id)
        assert stored is not None and stored.status == "running"
        # The record is written first, then the rest (the kept request, in the app).
        assert at_start[0] is not None and at_start[0].status == "running"
        release.set()
        assert run.done.wait(10)
        run.answered.set()
        wait_for(lambda: (runs.store.get(run.record.id) or run.record).status == "succeeded",
                 timeout=10)
        assert len(at_start) == 1, "the start's work ran twice"
    finally:
        runs.stop()


def test_a_run_whose_terraform_never_started_does_its_start_work_at_its_end(
        tmp_path: Path) -> None:
    runs = make_runs(tmp_path)
    runs.start(leftovers="none")
    try:
        at_start: list[str] = []

        def job(run: Run) -> Any:
            raise Conflict("refused before terraform")  # a reference in use, say

        run = new_run(job, sync=True)
        run.control = Startable()  # never started
        run.on_started.append(lambda: at_start.append(run.record.status))
        runs.submit(run, what="x")
        assert run.done.wait(10)
        run.answered.set()
        # Kept all the same (a retry needs the request), once the run has ended.
        wait_for(lambda: at_start == ["failed"], timeout=10)
        wait_for(lambda: runs.store.get(run.record.id) is not None, timeout=10)
    finally:
        runs.stop()


# -- the caller waiting for the answer -------------------------------------------------------

def test_the_caller_waiting_for_the_answer_is_not_woken_by_each_event() -> None:
    run = new_run(lambda r: None, sync=True)
    waits = []
    settled = run._settled
    real_wait = settled.wait

    def counted(timeout: float | None = None) -> bool:
        waits.append(timeout)
        return real_wait(timeout)

    settled.wait = counted  # type: ignore[method-assign]
    answered = []
    waiter = threading.Thread(target=lambda: answered.append(run.settle(30)), daemon=True)
    waiter.start()
    wait_for(lambda: len(waits) == 1)
    for i in range(20):
        run.emit("progress", n=i)
    follower = run.events_after(0, 1)
    assert len(follower) == 20  # followers still see every event at once
    assert waiter.is_alive() and len(waits) == 1, "an event woke the caller"
    run.done.set()
    run.wake()
    waiter.join(10)
    assert answered == [True]


def test_the_caller_waiting_for_the_answer_wakes_when_the_run_parks() -> None:
    run = new_run(lambda r: None, sync=True)
    answered = []
    waiter = threading.Thread(target=lambda: answered.append(run.settle(30)), daemon=True)
    waiter.start()
    wait_for(lambda: waiter.is_alive())
    run.parked.set()
    run.wake()
    waiter.join(10)
    assert answered == [True] and not run.done.is_set()


def test_a_failing_start_work_never_leaves_terraform_unwatched() -> None:
    control, calls = RunControl(), []

    def broken() -> None:
        raise RuntimeError("a bug in what waited")

    control.when_started(broken)
    control.when_started(lambda: calls.append("next"))
    proc = a_process()
    try:
        control.attach(proc)  # does not raise: the runner goes on to watch the process
        assert calls == ["next"]
    finally:
        proc.wait(10)


def test_a_failing_piece_of_start_work_does_not_stop_the_rest() -> None:
    run, calls = new_run(lambda r: None, sync=True), []

    def broken() -> None:
        raise RuntimeError("a bug in what waited")

    run.on_started.extend([broken, lambda: calls.append("next")])
    run.started()  # in the keeper's thread this must not raise: it would end the thread
    assert calls == ["next"]
    run.started()
    assert calls == ["next"]
