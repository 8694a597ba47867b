"""The read path's system calls (issue 19, "faster on reads"): under many busy keep-alive
connections every system call hands the GIL to another thread, so a GET of an instance
at rest reads settled objects from memory, a socket's timeout is changed only when it
must be, and request ids are drawn without the system's randomness."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from support import ROOT, ServerProcess, start_server
from tfserver.errors import ConfigError
from tfserver.storage import settled
from tfserver.storage.base import BackendError
from tfserver.storage.local import LocalObjects
from tfserver.terraform.affinity import Affinity, Scheduler
from tfserver.web.connections import SLACK, DeadlineReader


def _later() -> int:
    """A clock 10 s ahead: every file written so far has settled (`settled.SETTLED_NS`)."""
    return time.time_ns() + 10_000_000_000


class Reads:
    """`os.read` that records each read, giving at most `most` bytes a call."""

    def __init__(self, most: int | None = None) -> None:
        self.most = most
        self.calls: list[int] = []

    def __call__(self, fd: int, want: int) -> bytes:
        self.calls.append(want)
        return os.read(fd, want if self.most is None else min(want, self.most))


def _objects(root: Path, reads: Reads | None = None,
             clock: Callable[[], int] = _later) -> LocalObjects:
    return LocalObjects(root, settled.SettledBytes(clock=clock, read=reads or Reads()))


def test_a_settled_object_is_read_once_and_a_replaced_one_again(tmp_path: Path) -> None:
    reads = Reads()
    objects = _objects(tmp_path, reads)
    objects.put("_inputs/m/ws.json", b'{"name": "a"}')
    first = objects.get("_inputs/m/ws.json")
    assert first == b'{"name": "a"}'
    assert objects.get("_inputs/m/ws.json") is first  # from memory: one stat, no read
    assert len(reads.calls) == 1
    # Replaced by a write of the same size (a new file, renamed over it): read again.
    objects.put("_inputs/m/ws.json", b'{"name": "b"}')
    assert objects.get("_inputs/m/ws.json") == b'{"name": "b"}'
    objects.delete("_inputs/m/ws.json")
    assert objects.get("_inputs/m/ws.json") is None


def test_an_object_changed_in_place_with_its_old_mtime_put_back_is_read_again(
        tmp_path: Path) -> None:
    objects = _objects(tmp_path)
    objects.put("k/v", b"one")
    path = tmp_path / "k/v"
    before = path.stat()
    assert objects.get("k/v") == b"one"
    path.write_bytes(b"two")  # the same inode and size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the same mtime
    assert path.stat().st_ino == before.st_ino
    assert objects.get("k/v") == b"two"  # its change time is new


def test_an_object_written_just_now_is_read_each_time(tmp_path: Path) -> None:
    # Its next change could carry the same change time (a coarse clock).
    objects = _objects(tmp_path, clock=time.time_ns)
    objects.put("k/v", b"x")
    first = objects.get("k/v")
    again = objects.get("k/v")
    assert first == again == b"x"
    assert again is not first


def test_a_large_object_is_never_kept(tmp_path: Path) -> None:
    reads = Reads()
    objects = _objects(tmp_path, reads)
    data = os.urandom(settled.LARGEST_KEPT + 1)
    objects.put("_plans/p", data)
    assert objects.get("_plans/p") == data
    assert objects.get("_plans/p") == data
    assert len(reads.calls) == 2


@pytest.mark.parametrize("most", [None, 1000, 4096])
def test_objects_of_every_size_are_read_whole_even_in_short_reads(
        tmp_path: Path, most: int | None) -> None:
    # A read may give less than asked before the end (over 2 GiB, a network or FUSE
    # filesystem): only an empty read is the end of a file shorter than fstat said.
    objects = _objects(tmp_path, Reads(most))
    for size in (0, 1, 999, 1000, 1001, 4095, 4096, 65536, 65537, 300_000):
        data = os.urandom(size)
        objects.put(f"s/{size}", data)
        assert objects.get(f"s/{size}") == data, size


def test_a_file_that_grew_since_its_fstat_is_read_to_its_end(tmp_path: Path) -> None:
    path = tmp_path / "grown"
    path.write_bytes(b"x" * 100_000)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert settled.read_all(fd, 10) == b"x" * 100_000
    finally:
        os.close(fd)


def test_empty_objects_too_fill_the_budget(tmp_path: Path) -> None:
    kept: settled.Versions[bytes] = settled.Versions(20_000, 1024, clock=_later)
    for i in range(1000):
        path = tmp_path / f"empty-{i}"
        path.write_bytes(b"")
        kept.keep(str(path), path.stat(), b"")
    assert kept.cost <= 20_000
    assert 0 < len(kept) <= 20_000 // settled.ENTRY_COST


def test_a_missing_object_is_none_and_a_folder_is_a_backend_error(tmp_path: Path) -> None:
    objects = _objects(tmp_path)
    assert objects.get("nothing/here.json") is None
    objects.put("file", b"x")
    assert objects.get("file/below") is None  # a file where a folder would be
    (tmp_path / "folder").mkdir()
    with pytest.raises(BackendError, match="cannot read folder: not a regular file"):
        objects.get("folder")


def _bounded(call: Callable[[], object]) -> BaseException | None:
    """What `call` raised, run in a thread given 10 s (a hang fails the test)."""
    raised: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            raised.append(None)
        except BaseException as e:  # handed to the test
            raised.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    assert raised, "the read hung"
    return raised[0]


def test_a_fifo_at_an_object_or_state_path_is_refused_not_waited_on(tmp_path: Path) -> None:
    objects = _objects(tmp_path)
    objects.put("k/v", b"x")
    (tmp_path / "k/v").unlink()
    os.mkfifo(tmp_path / "k/v")
    raised = _bounded(lambda: objects.get("k/v"))
    assert isinstance(raised, BackendError)
    assert "cannot read k/v: not a regular file" in str(raised)
    os.mkfifo(tmp_path / "terraform.tfstate")
    raised = _bounded(lambda: settled.ParsedFiles().read(str(tmp_path / "terraform.tfstate")))
    assert isinstance(raised, BackendError)
    assert "cannot read local state: not a regular file" in str(raised)


# -- socket timeouts --------------------------------------------------------------------


class FakeSocket:
    """A socket whose reads give `chunks` in turn (an exception is raised), recording
    each timeout set."""

    def __init__(self, clock: list[float], chunks: list[bytes | BaseException],
                 timeout: float | None = 30.0) -> None:
        self.clock, self.chunks, self.timeout = clock, chunks, timeout
        self.set: list[float] = []

    def gettimeout(self) -> float | None:
        return self.timeout

    def settimeout(self, seconds: float) -> None:
        self.timeout = seconds
        self.set.append(seconds)

    def recv_into(self, buffer: bytearray) -> int:
        chunk = self.chunks.pop(0)
        if isinstance(chunk, BaseException):
            assert self.timeout is not None
            self.clock[0] += self.timeout  # the wait it timed out after
            raise chunk
        buffer[:len(chunk)] = chunk
        return len(chunk)


def _reader(chunks: list[bytes | BaseException], read_timeout: float = 30.0
            ) -> tuple[DeadlineReader, FakeSocket, list[float]]:
    clock = [1000.0]
    sock = FakeSocket(clock, chunks, timeout=read_timeout)
    return DeadlineReader(sock, read_timeout, clock=lambda: clock[0]), sock, clock  # type: ignore[arg-type]


def test_keep_alive_requests_set_the_socket_timeout_once() -> None:
    reader, sock, clock = _reader([b"GET / HTTP/1.1\r\n\r\n"] * 50)
    buffer = bytearray(100)
    for _ in range(50):
        reader.arm(30.0)  # each request's deadline, as `handle_one_request` arms it
        clock[0] += 0.001
        assert reader.readinto(buffer) > 0
        reader.for_writes()  # as the handler does before it answers
        clock[0] += 0.002
    assert len(sock.set) == 1
    assert 30.0 - SLACK <= sock.set[0] <= 30.0


def test_a_read_ended_early_by_the_slack_goes_on_for_exactly_the_rest() -> None:
    reader, sock, _clock = _reader([TimeoutError(), b"late"])
    reader.arm(10.0)
    buffer = bytearray(10)
    assert reader.readinto(buffer) == 4
    shortened, rest = sock.set
    assert shortened < 10.0 and rest == pytest.approx(10.0 - shortened)


def test_a_read_that_waits_out_its_deadline_times_out_on_time() -> None:
    reader, _sock, clock = _reader([TimeoutError(), TimeoutError()])
    reader.arm(10.0)
    started = clock[0]
    with pytest.raises(TimeoutError):
        reader.readinto(bytearray(10))
    assert clock[0] - started == pytest.approx(10.0)
    with pytest.raises(TimeoutError, match="too long"):
        reader.readinto(bytearray(10))  # the deadline has passed: no wait at all


def test_writes_get_the_read_timeout_back_after_a_deadline_shortened_it() -> None:
    reader, sock, clock = _reader([b"x"])
    reader.arm(30.0)
    clock[0] += 25.0  # a client that took its time
    reader.readinto(bytearray(10))
    assert sock.timeout is not None and sock.timeout <= 5.0
    reader.arm(None)
    assert 30.0 - SLACK <= sock.timeout <= 30.0


# -- request ids ------------------------------------------------------------------------


def test_request_ids_are_new_for_each_request(server: ServerProcess) -> None:
    ids = set()
    for _ in range(50):
        r = server.request("GET", "/healthz")
        given = r.header("X-Request-Id") or ""
        assert r.status == 200 and re.fullmatch(r"[0-9a-f]{32}", given)
        ids.add(given)
    assert len(ids) == 50


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


def _thread_cpus(srv: ServerProcess) -> set[str]:
    """The `Cpus_allowed_list` of each of the server's threads."""
    seen = set()
    threads = list(Path(f"/proc/{srv.proc.pid}/task").iterdir())
    assert len(threads) > 3
    for thread in threads:
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            seen.add(_cpus(thread / "status"))
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
        pinned = _thread_cpus(srv)
        # Every thread on the one CPU: the one asked for, or (auto) the one it started on.
        assert len(pinned) == 1 and pinned.pop() in {str(cpu) for cpu in allowed}
        if setting == "last":
            assert _thread_cpus(srv) == {str(allowed[-1])}
        lines = log.read_text().splitlines()
        assert lines and all(line.split(":", 1)[1].strip() == everything for line in lines)
    finally:
        srv.stop()


def test_pin_cpu_off_leaves_the_server_s_threads_on_every_cpu(tmp_path: Path) -> None:
    _several_cpus()
    srv = start_server(tmp_path, env={"TFSERVER_PIN_CPU": "off"})
    try:
        assert _thread_cpus(srv) == {_cpus(Path("/proc/self/status"))}
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
        for tid in self.started:  # started by a thread not yet pinned: all CPUs
            self.cpus[tid] = {0, 1}
        self.started = []
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


def test_auto_on_one_cpu_or_off_pins_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Affinity.choose(None).cpu is None
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert Affinity.choose("auto").cpu is None
    with pytest.raises(ConfigError, match="CPU 2 is not one this server may run on"):
        Affinity.choose(2)
