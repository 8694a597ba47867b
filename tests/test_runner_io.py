"""The runner's reading of a process's output, and the run threads.

The process here is a small stand-in script, not terraform: what is tested is how
`Terraform.run` reads its output files (events as they come, partial lines, bad bytes, a flood of
output, a process that ignores SIGINT), which real terraform cannot be made to do on cue.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tfserver.runs.workers import Workers
from tfserver.terraform.output import STDERR_KEEP
from tfserver.terraform.process import RunControl, Terraform


def runner(tmp_path: Path, script: str, kill_grace: float = 2.0) -> Terraform:
    """A runner whose 'terraform' is a Python script (its argv is ignored)."""
    path = tmp_path / "fake-terraform"
    path.write_text(f"#!{sys.executable}\nimport os, sys, time, signal, json\n{script}\n")
    path.chmod(0o755)
    return Terraform(binary=str(path), base_env={"PATH": "/usr/bin:/bin"},
                     kill_grace=kill_grace)


def _alive(pid: int) -> bool:
    """The process runs (it is neither gone nor a zombie)."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _ends(pid: int, within: float = 5.0) -> bool:
    """The process is gone (or a zombie) within `within` seconds."""
    deadline = time.monotonic() + within
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not _alive(pid)


def test_events_reach_the_listener_while_the_process_still_runs(tmp_path: Path) -> None:
    tf = runner(tmp_path, """
w = sys.stdout
w.write(json.dumps({"type": "version", "@message": "v"}) + "\\n"); w.flush()
time.sleep(1.0)
# A line written in two pieces is one event.
line = json.dumps({"type": "change_summary", "changes": {"add": 1, "change": 0, "remove": 0}})
w.write(line[:10]); w.flush(); time.sleep(0.2); w.write(line[10:] + "\\n"); w.flush()
""")
    seen: list[tuple[float, str]] = []
    started = time.monotonic()
    result = tf.run(["apply"], cwd=tmp_path, timeout=30,
                    on_event=lambda e: seen.append((time.monotonic() - started, e["type"])))
    assert result.returncode == 0
    assert [t for _, t in seen] == ["version", "change_summary"]
    assert seen[0][0] < 0.9, "the first event came only when the process ended"
    assert result.changes == {"add": 1, "change": 0, "remove": 0}


def test_text_output_keeps_its_last_line_and_replaces_bad_bytes(tmp_path: Path) -> None:
    tf = runner(tmp_path, r"""
sys.stdout.buffer.write(b'{"a": 1}\r\nno newline at the end \xff\xfe'); sys.stdout.flush()
sys.stderr.buffer.write(b"Error: \xe2\x82"); sys.stderr.flush()
sys.stderr.buffer.write(b"\xac sign\n"); sys.exit(3)
""")
    result = tf.run(["output", "-json"], cwd=tmp_path, timeout=30)
    assert result.returncode == 3
    assert result.stdout == '{"a": 1}\nno newline at the end \ufffd\ufffd'
    assert result.stderr == "Error: \u20ac sign\n"  # a character split across writes


def test_unreadable_event_lines_are_counted_not_dropped(tmp_path: Path) -> None:
    tf = runner(tmp_path, """
print('{"type": "version"}'); print('{"type": broken'); print('plain text')
""")
    result = tf.run(["plan"], cwd=tmp_path, timeout=30)
    assert [e["type"] for e in result.events] == ["version"]
    assert result.unreadable == 1


def test_a_flood_of_output_is_read_and_stderr_keeps_its_tail(tmp_path: Path) -> None:
    # Far more than a pipe holds, on both streams at once: nothing may block.
    tf = runner(tmp_path, """
for i in range(20000):
    sys.stdout.write(json.dumps({"type": "log", "@message": "x" * 40, "i": i}) + "\\n")
    sys.stderr.write(f"line {i:06d} " + "y" * 30 + "\\n")
""")
    result = tf.run(["apply"], cwd=tmp_path, timeout=60)
    assert result.returncode == 0
    assert len(result.events) == 20000
    assert len(result.stderr) <= STDERR_KEEP + 100
    assert result.stderr.endswith("line 019999 " + "y" * 30 + "\n")


def test_past_the_deadline_sigint_then_the_group_is_killed(tmp_path: Path) -> None:
    marker = tmp_path / "child.pid"
    tf = runner(tmp_path, f"""
signal.signal(signal.SIGINT, signal.SIG_IGN)
import subprocess
child = subprocess.Popen(["sleep", "60"])
open({str(marker)!r}, "w").write(str(child.pid))
print('{{"type": "version"}}', flush=True)
while True:
    sys.stdout.write("still here\\n"); sys.stdout.flush(); time.sleep(0.01)
""", kill_grace=0.5)
    started = time.monotonic()
    result = tf.run(["apply"], cwd=tmp_path, timeout=1.0)
    assert result.timed_out
    assert result.returncode == -9
    assert time.monotonic() - started < 10
    assert _ends(int(marker.read_text())), "the group's child lives"
    assert tf.running() == 0


def test_cancel_interrupts_a_process_that_prints_nothing(tmp_path: Path) -> None:
    tf = runner(tmp_path, """
signal.signal(signal.SIGINT, lambda *a: sys.exit(1))
time.sleep(60)
""")
    control = RunControl()
    threading.Timer(0.3, control.interrupt, args=("cancel",)).start()
    started = time.monotonic()
    result = tf.run(["apply"], cwd=tmp_path, timeout=60, control=control)
    assert result.canceled and result.returncode == 1
    assert time.monotonic() - started < 10


def test_a_missing_binary_is_exit_127(tmp_path: Path) -> None:
    tf = Terraform(binary=str(tmp_path / "nowhere"), base_env={})
    result = tf.run(["version"], cwd=tmp_path, timeout=5)
    assert result.returncode == 127


def test_workers_reuse_idle_threads_and_isolate_jobs() -> None:
    workers = Workers("t", idle_for=5.0)
    names: list[str] = []
    done = threading.Event()

    def job() -> None:
        names.append(threading.current_thread().name)
        done.set()

    for _ in range(3):
        done.clear()
        workers.submit(job)
        assert done.wait(5)
        time.sleep(0.05)  # the thread goes back to idle
    assert len(set(names)) == 1, names

    # A failing job does not take its thread down; busy threads make the pool grow.
    release = threading.Event()
    workers.submit(lambda: 1 / 0)  # type: ignore[func-returns-value]
    time.sleep(0.05)
    started = threading.Barrier(3, timeout=5)
    for _ in range(2):
        workers.submit(lambda: (started.wait(), release.wait(5)))  # type: ignore[func-returns-value]
    started.wait()  # two jobs run at once: a second thread was started
    release.set()


def test_idle_workers_end() -> None:
    workers = Workers("idle", idle_for=0.1)
    ran = threading.Event()
    workers.submit(ran.set)
    assert ran.wait(5)
    deadline = time.monotonic() + 5
    while any(t.name.startswith("idle-") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "an idle worker did not end"
        time.sleep(0.02)
    ran.clear()
    workers.submit(ran.set)  # a new thread starts for the next job
    assert ran.wait(5)



def test_a_failing_start_hook_leaves_no_process_behind(tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    tf = runner(tmp_path, f"""
open({str(marker)!r} + ".tmp", "w").write(str(os.getpid()))
os.rename({str(marker)!r} + ".tmp", {str(marker)!r})  # whole, or not there
time.sleep(60)
""")

    def hook() -> None:
        deadline = time.monotonic() + 5
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        raise RuntimeError("the hook failed")

    with pytest.raises(RuntimeError):
        tf.run(["apply"], cwd=tmp_path, timeout=60, on_start=hook)
    assert _ends(int(marker.read_text())), "the process outlived its runner"
    assert tf.running() == 0


def test_one_huge_line_is_read_whole_and_an_endless_stderr_line_kept_short(
        tmp_path: Path) -> None:
    # A big output is one line of the stream; a line with no end on stderr must not
    # grow the server's memory without bound.
    tf = runner(tmp_path, """
sys.stdout.write(json.dumps({"type": "outputs", "outputs": {"big": {"value": "v" * 20_000_000}}}))
sys.stdout.write("\\n"); sys.stdout.flush()
for _ in range(300):
    sys.stderr.write("e" * 65536)
sys.stderr.write("THE END")
""")
    result = tf.run(["apply"], cwd=tmp_path, timeout=120)
    assert not result.timed_out and result.returncode == 0
    assert len(result.events[0]["outputs"]["big"]["value"]) == 20_000_000
    assert len(result.stderr) <= STDERR_KEEP
    assert result.stderr.endswith("eeeTHE END")


def test_a_stderr_line_in_many_small_writes_is_kept_whole(tmp_path: Path) -> None:
    tf = runner(tmp_path, """
for i in range(10):
    sys.stderr.write(f"part{i} "); sys.stderr.flush(); time.sleep(0.02)
sys.stderr.write("end\\n"); sys.stdout.buffer.write(b"a\\rb\\r\\nc")
""")
    result = tf.run(["output"], cwd=tmp_path, timeout=30)
    assert result.stderr == "part0 part1 part2 part3 part4 part5 part6 part7 part8 part9 end\n"
    assert result.stdout == "a\nb\nc"  # as a text-mode pipe reads it


def test_an_exit_is_seen_though_a_child_keeps_stdout_open(tmp_path: Path) -> None:
    # The process succeeded: it is not "timed out" because something it started holds
    # its pipes, and nothing waits for the deadline.
    tf = runner(tmp_path, """
import subprocess
subprocess.Popen(["sleep", "8"], start_new_session=True)
print('{"type": "version"}', flush=True)
""", kill_grace=1.0)
    result = tf.run(["apply"], cwd=tmp_path, timeout=20)
    assert result.returncode == 0 and not result.timed_out
    assert result.duration < 15, "the run waited for the deadline"


def test_output_after_stdout_closed_does_not_block_the_exit(tmp_path: Path) -> None:
    tf = runner(tmp_path, """
os.close(1)
sys.stderr.write("x" * 200_000 + "\\n"); sys.stderr.flush()
""", kill_grace=1.0)
    result = tf.run(["apply"], cwd=tmp_path, timeout=20)
    assert result.returncode == 0 and not result.timed_out
    assert result.stderr.endswith("x\n")


def test_what_holds_the_pipes_after_a_good_run_is_stopped(tmp_path: Path) -> None:
    marker = tmp_path / "child.pid"
    tf = runner(tmp_path, f"""
import subprocess
child = subprocess.Popen(["sleep", "30"])  # same group; it holds the pipes
open({str(marker)!r}, "w").write(str(child.pid))
""", kill_grace=0.5)
    result = tf.run(["apply"], cwd=tmp_path, timeout=20)
    assert result.returncode == 0 and not result.timed_out
    assert _ends(int(marker.read_text())), "a process holding terraform's pipes outlived the run"


def test_without_a_pidfd_the_exit_is_still_seen(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # The pidfd cannot be watched (an old kernel, or the selector refuses it): the
    # runner falls back to polling the process, leaks no descriptor and reports no timeout.
    class Refusing(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
        def register(self, fileobj: Any, events: int, data: Any = None) -> Any:
            if isinstance(fileobj, int):
                raise OSError(28, "No space left on device")
            return super().register(fileobj, events, data)

    monkeypatch.setattr("tfserver.terraform.follow.selectors.DefaultSelector", Refusing)
    tf = runner(tmp_path, 'print(\'{"type": "version"}\')', kill_grace=0.5)
    before = len(os.listdir("/proc/self/fd"))
    result = tf.run(["apply"], cwd=tmp_path, timeout=20)
    tf.close()  # its idle output wakes (wake.py) are kept until then
    assert result.returncode == 0 and not result.timed_out
    assert [e["type"] for e in result.events] == ["version"]
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_reader_that_cannot_start_leaves_no_process(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pid"
    tf = runner(tmp_path, f"""
open({str(marker)!r} + ".tmp", "w").write(str(os.getpid()))
os.rename({str(marker)!r} + ".tmp", {str(marker)!r})  # whole, or not there
time.sleep(60)
""")

    def refuse(*args: Any, **kwargs: Any) -> None:
        deadline = time.monotonic() + 5
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        raise OSError(24, "Too many open files")

    monkeypatch.setattr("tfserver.terraform.process.Output", refuse)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError):
        tf.run(["apply"], cwd=tmp_path, timeout=60)
    assert _ends(int(marker.read_text()), within=0)
    tf.close()
    assert len(os.listdir("/proc/self/fd")) == before
    assert tf.running() == 0


def test_runs_in_many_threads_read_only_their_own_output(tmp_path: Path) -> None:
    # Each run's descriptors are closed exactly once: a number closed twice could by then
    # be another run's file (seen as EBADF, or worse, one run reading another's output).
    tf = runner(tmp_path, """
print(json.dumps({"type": "version", "@message": sys.argv[2]}), flush=True)
print("err " + sys.argv[2], file=sys.stderr, flush=True)
""")
    before = len(os.listdir("/proc/self/fd"))
    failures: list[str] = []

    def many(worker: int) -> None:
        for i in range(15):
            tag = f"{worker}-{i}"
            result = tf.run(["apply", tag], cwd=tmp_path, timeout=30)
            if not (result.returncode == 0 and [e.get("@message") for e in result.events]
                    == [tag] and result.stderr == f"err {tag}\n"):
                failures.append(f"{tag}: {result}")

    threads = [threading.Thread(target=many, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures[:3]
    tf.close()
    assert len(os.listdir("/proc/self/fd")) == before
    assert list(tf._spool().iterdir()) == []


def _run_leaving_a_member(tmp_path: Path
                          ) -> tuple[Terraform, RunControl, threading.Event, threading.Thread]:
    """A cancelable apply whose stand-in starts a `sleep` in its group (its pid written to
    member.pid) and sleeps; the run's runner, control, end and thread."""
    marker = tmp_path / "member.pid"
    tf = runner(tmp_path, f"""
import subprocess
member = subprocess.Popen(["sleep", "60"])
open({str(marker)!r}, "w").write(str(member.pid))
time.sleep(60)
""", kill_grace=30)
    control = RunControl()
    done = threading.Event()
    thread = threading.Thread(target=lambda: (tf.run(["apply"], cwd=tmp_path, timeout=60,
                                                     control=control), done.set()))
    return tf, control, done, thread


def _member(tmp_path: Path) -> int:
    """The pid the stand-in of `_run_leaving_a_member` wrote, once it has (bounded)."""
    marker = tmp_path / "member.pid"
    deadline = time.monotonic() + 30
    while not marker.exists() or not marker.read_text():
        assert time.monotonic() < deadline, "the stand-in did not start"
        time.sleep(0.01)
    return int(marker.read_text())


def test_a_stopped_run_ends_only_once_nothing_of_its_group_is_left(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # SIGKILL is delivered when its target next runs: the run must wait for that, or a
    # caller told "stopped" may still see the process (test_hostile once did, in CI). A
    # kill that spares the group's member stands in for one not yet delivered.
    import signal

    from tfserver.terraform import process

    def kill_the_leader(proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)

    monkeypatch.setattr(process, "_kill_group", kill_the_leader)
    tf, control, done, thread = _run_leaving_a_member(tmp_path)
    thread.start()
    member = _member(tmp_path)
    try:
        control.kill("cancel")
        assert not done.wait(1.0), "the run ended while its group still had a member"
    finally:
        os.kill(member, signal.SIGKILL)
    assert done.wait(30), "the run did not end once its group was gone"
    thread.join(timeout=30)
    assert tf.running() == 0


def test_a_member_left_as_a_zombie_does_not_hold_the_run(tmp_path: Path) -> None:
    # In the image tfserver may be PID 1 (without an init): an orphan of terraform's group
    # is its child then, and a zombie until reaped, which tfserver never does. Here this
    # test process stands in for PID 1 as a child subreaper: the run must end without
    # waiting out the kill grace for that zombie.
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_child_subreaper = 36
    assert libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0, ctypes.get_errno()
    tf, control, done, thread = _run_leaving_a_member(tmp_path)
    member = 0
    try:
        thread.start()
        member = _member(tmp_path)
        control.kill("cancel")
        assert _ends(member, within=30), "the member outlived SIGKILL"
        assert Path(f"/proc/{member}").exists()  # a zombie of this process: not reaped yet
        assert done.wait(10), "the run waited on a zombie"
    finally:
        libc.prctl(pr_set_child_subreaper, 0, 0, 0, 0)
        if member:
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(member, 0)
        thread.join(timeout=60)
    assert tf.running() == 0
