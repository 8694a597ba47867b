"""TFSERVER_PIN_CPU (terraform/affinity.py): the server's threads on one CPU, the threads
of runs and terraform on every CPU; what happens when the CPUs cannot be changed."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from support import ROOT, ServerProcess, start_server
from tfserver.errors import ConfigError
from tfserver.runs.workers import Workers
from tfserver.terraform.affinity import Affinity, Scheduler

# -- the server's threads on one CPU, terraform on all ----------------------------------


def _cpus(status_file: Path) -> str:
    """The `Cpus_allowed_list` of a thread or process status file."""
    for line in status_file.read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list in {status_file}")


def _several_cpus() -> list[int]:
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("one CPU only: pinned and not pinned look the same")
    return allowed


def _thread_cpus(srv: ServerProcess) -> dict[int, str]:
    """The `Cpus_allowed_list` of each of the server's threads, by thread id."""
    seen = {}
    threads = list(Path(f"/proc/{srv.proc.pid}/task").iterdir())
    assert len(threads) > 3
    for thread in threads:
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            seen[int(thread.name)] = _cpus(thread / "status")
    return seen


@pytest.mark.parametrize("setting", ["last", "default"])
def test_pin_cpu_keeps_the_server_s_threads_to_one_cpu_and_terraform_to_all(
        tmp_path: Path, setting: str) -> None:
    allowed = _several_cpus()
    log = tmp_path / "cpus.log"
    shim = tmp_path / "terraform-shim"
    # The shim is the process terraform becomes (exec): its CPUs are terraform's.
    shim.write_text(f'#!/bin/sh\ngrep Cpus_allowed_list /proc/$$/status >> "{log}"\n'
                    f'exec "{shutil.which("terraform")}" "$@"\n')
    shim.chmod(0o755)
    everything = _cpus(Path("/proc/self/status"))
    env = {"TFSERVER_TERRAFORM": str(shim)}
    if setting == "last":
        env["TFSERVER_PIN_CPU"] = str(allowed[-1])
    srv = start_server(tmp_path, env=env)
    try:
        r = srv.request("PUT", "/basic/pinned", {"name": "p"})
        assert r.status in (200, 201), r.body
        threads = _thread_cpus(srv)
        # The main thread, and with it those serving connections and writing the log,
        # on the one CPU: the one asked for, or (auto) the one it started on.
        one = threads[srv.proc.pid]
        assert one in {str(cpu) for cpu in allowed}
        if setting == "last":
            assert one == str(allowed[-1])
        assert set(threads.values()) == {one, everything}
        assert sum(cpus == one for cpus in threads.values()) >= 3
        # The threads of runs on every CPU: the run's own, the keeper, the inputs' writer.
        assert sum(cpus == everything for cpus in threads.values()) >= 3
        lines = log.read_text().splitlines()
        assert lines and all(line.split(":", 1)[1].strip() == everything for line in lines)
    finally:
        srv.stop()


def test_pin_cpu_off_leaves_the_server_s_threads_on_every_cpu(tmp_path: Path) -> None:
    _several_cpus()
    srv = start_server(tmp_path, env={"TFSERVER_PIN_CPU": "off"})
    try:
        assert set(_thread_cpus(srv).values()) == {_cpus(Path("/proc/self/status"))}
    finally:
        srv.stop()


@pytest.mark.parametrize(("value", "message"), [
    ("4096", "TFSERVER_PIN_CPU: CPU 4096 is not one this server may run on"),
    ("fast", "TFSERVER_PIN_CPU must be off, auto or a CPU's number, not 'fast'"),
])
def test_a_cpu_the_server_cannot_have_stops_the_start(tmp_path: Path, value: str,
                                                      message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "tfserver", "--port", "0",
                           "--state-dir", str(tmp_path / "state")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "HOME": str(tmp_path),
                               "TFSERVER_PIN_CPU": value})
    assert done.returncode == 2
    assert done.stderr.startswith("tfserver: error: ") and message in done.stderr, \
        done.stderr


class FakeScheduler(Scheduler):
    """Threads' CPUs in a dict; `fail_on` names the `keep` calls (counted from 1) that
    fail; `started` threads appear, unpinned, at the first walk."""

    def __init__(self, cpus: dict[int, set[int]], fail_on: tuple[int, ...] = (),
                 started: tuple[int, ...] = ()) -> None:
        self.cpus, self.fail_on, self.started = cpus, fail_on, list(started)
        self.keeps = 0

    def cpus_of(self, tid: int) -> set[int]:
        return set(self.cpus[tid])

    def keep(self, tid: int, cpus: set[int] | frozenset[int]) -> None:
        self.keeps += 1
        if self.keeps in self.fail_on:
            raise OSError(errno.EINVAL, "Invalid argument")
        self.cpus[tid] = set(cpus)

    def threads(self) -> list[int]:
        # One more thread each walk, started by one not yet pinned (so on all CPUs): a
        # single walk would miss those after the first.
        for tid in self.started[:1]:
            self.cpus[tid] = {0, 1}
        self.started = self.started[1:]
        return [tid for tid in self.cpus if tid]


def test_spawning_gives_the_thread_back_the_cpus_it_had() -> None:
    # A thread that was never pinned (started before `pin`) stays unpinned.
    sched = FakeScheduler({0: {0, 1}})
    with Affinity(1, frozenset({0, 1}), sched).spawning():
        assert sched.cpus[0] == {0, 1}
    assert sched.cpus[0] == {0, 1}
    sched = FakeScheduler({0: {1}})
    with Affinity(1, frozenset({0, 1}), sched).spawning():
        assert sched.cpus[0] == {0, 1}
    assert sched.cpus[0] == {1}


@pytest.mark.parametrize(("fail_on", "logged"), [
    ((1,), "cannot give terraform every CPU"),
    ((2,), "cannot keep this thread to CPU 1 again"),
])
def test_spawning_that_cannot_change_cpus_logs_and_starts_the_process_anyway(
        caplog: pytest.LogCaptureFixture, fail_on: tuple[int, ...], logged: str) -> None:
    # Raised after the process started, the error would lose the process (untracked).
    sched = FakeScheduler({0: {1}}, fail_on=fail_on)
    started = []
    with caplog.at_level(logging.WARNING, "tfserver.terraform.affinity"), \
            Affinity(1, frozenset({0, 1}), sched).spawning():
        started.append(True)
    assert started == [True]
    assert logged in caplog.text


def test_pin_walks_the_threads_until_none_is_left_unpinned() -> None:
    sched = FakeScheduler({0: {0, 1}, 11: {0, 1}}, started=(12, 13))
    Affinity(1, frozenset({0, 1}), sched).pin()
    assert sched.cpus == {0: {1}, 11: {1}, 12: {1}, 13: {1}}
    # Threads that keep coming unpinned: the walks end, and the start with them.
    endless = FakeScheduler({0: {0, 1}}, started=tuple(range(100, 130)))
    with pytest.raises(ConfigError, match="threads kept starting unpinned after 10 walks"):
        Affinity(1, frozenset({0, 1}), endless).pin()


def test_pin_that_cannot_list_or_move_the_threads_is_a_config_error() -> None:
    class NoProc(FakeScheduler):
        def threads(self) -> list[int]:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")

    with pytest.raises(ConfigError, match="cannot keep the server's threads to CPU 1: No "):
        Affinity(1, frozenset({0, 1}), NoProc({0: {0, 1}})).pin()
    with pytest.raises(ConfigError, match="Invalid argument"):
        Affinity(1, frozenset({0, 1}), FakeScheduler({0: {0, 1}}, fail_on=(1,))).pin()


def test_auto_that_cannot_pin_warns_and_serves_on_every_cpu(
        caplog: pytest.LogCaptureFixture) -> None:
    sched = FakeScheduler({0: {0, 1}, 11: {0, 1}}, fail_on=(2,))
    affinity = Affinity(1, frozenset({0, 1}), sched, required=False)
    with caplog.at_level(logging.WARNING, "tfserver.terraform.affinity"):
        affinity.pin()
    assert "cannot keep the server's threads to CPU 1: Invalid argument; its threads run " \
        "on every CPU" in caplog.text
    assert affinity.cpu is None and sched.cpus == {0: {0, 1}, 11: {0, 1}}
    before = sched.keeps
    with affinity.spawning():  # nothing left to widen
        pass
    assert sched.keeps == before


def test_auto_on_one_cpu_or_off_pins_nothing(monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    assert Affinity.choose(None).cpu is None
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert Affinity.choose("auto").cpu is None
    with pytest.raises(ConfigError, match="CPU 2 is not one this server may run on"):
        Affinity.choose(2)

    def refused(pid: int) -> set[int]:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    # A sandbox that refuses to say: `auto` runs unpinned, a number stops the start.
    monkeypatch.setattr(os, "sched_getaffinity", refused)
    with caplog.at_level(logging.WARNING, "tfserver.terraform.affinity"):
        assert Affinity.choose("auto").cpu is None
    assert "cannot read this server's CPUs (Operation not permitted)" in caplog.text
    with pytest.raises(ConfigError, match="cannot read this server's CPUs"):
        Affinity.choose(1)


def test_a_run_s_thread_may_use_every_cpu_and_starts_terraform_as_it_is() -> None:
    sched = FakeScheduler({0: {1}})
    affinity = Affinity(1, frozenset({0, 1}), sched)
    affinity.anywhere()
    assert sched.cpus[0] == {0, 1}
    keeps = sched.keeps
    with affinity.spawning():  # already on every CPU: nothing to widen or narrow
        pass
    assert sched.keeps == keeps and sched.cpus[0] == {0, 1}


def test_a_run_s_thread_that_cannot_move_warns_and_stays(
        caplog: pytest.LogCaptureFixture) -> None:
    sched = FakeScheduler({0: {1}}, fail_on=(1,))
    with caplog.at_level(logging.WARNING, "tfserver.terraform.affinity"):
        Affinity(1, frozenset({0, 1}), sched).anywhere()
    assert "cannot let a run's thread use every CPU" in caplog.text
    assert sched.cpus[0] == {1}
    Affinity().anywhere()  # off: nothing to do


def test_the_threads_of_runs_are_started_through_the_hook() -> None:
    started: list[str] = []
    done = threading.Event()
    workers = Workers("test", on_start=lambda: started.append(threading.current_thread().name))
    workers.submit(done.set)
    assert done.wait(10)
    assert started == ["test-1"]
