"""The read path's system calls (issue 19, "faster on reads"): under many busy keep-alive
connections every system call hands the GIL to another thread, so a GET of an instance
at rest reads settled objects from memory, a socket's timeout is changed only when it
must be, and request ids are drawn without the system's randomness."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from support import ServerProcess
from tfserver.storage import settled
from tfserver.storage.base import BackendError
from tfserver.storage.local import LocalObjects
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
    time.sleep(0.02)  # past a coarse kernel's timestamp tick: the change time moves
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


def test_a_fifo_is_opened_without_waiting_for_a_writer(tmp_path: Path) -> None:
    # Put there between the `stat` and the `open`, a FIFO would hang a blocking open.
    os.mkfifo(tmp_path / "fifo")
    raised = _bounded(lambda: settled.read_file(str(tmp_path / "fifo")))
    assert isinstance(raised, OSError) and raised.strerror == "not a regular file"


def test_an_object_that_grew_as_it_was_read_is_not_kept(tmp_path: Path) -> None:
    class Growing(Reads):
        def __call__(self, fd: int, want: int) -> bytes:
            self.calls.append(want)
            return os.read(fd, want) + (b"+" if len(self.calls) == 1 else b"")

    reads = Growing()
    objects = _objects(tmp_path, reads)
    objects.put("k/v", b"abc")
    assert objects.get("k/v") == b"abc+"  # more than its fstat said
    assert objects.get("k/v") == b"abc"  # read again: not kept as the version it saw


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
