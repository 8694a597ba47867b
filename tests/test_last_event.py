"""A run ends at terraform's last event, and its exit is awaited apart (process.py, wake.py).

An apply's or destroy's last event comes once its state is written and its lock released;
after it terraform only exits (about 2 ms here). The stand-in scripts below print the events
real terraform 1.11 prints, then wait for the test before they exit, so each test sees the
run's result while the process still lives.
"""

from __future__ import annotations

import json
import logging
import os
import select
import sys
import time
from pathlib import Path

import pytest
from test_runner_io import _alive

from tfserver.terraform.follow import Output
from tfserver.terraform.output import last_event
from tfserver.terraform.process import Terraform
from tfserver.terraform.wake import Wake, Wakes

PLAN = [{"type": "version"},
        {"type": "change_summary", "changes": {"add": 1, "change": 0, "remove": 0,
                                               "operation": "plan"}},
        {"type": "outputs", "outputs": {"name": {"sensitive": False, "action": "create"}}}]
APPLIED = [{"type": "apply_start", "hook": {"resource": {"addr": "terraform_data.this"}}},
           {"type": "change_summary", "changes": {"add": 1, "change": 0, "remove": 0,
                                                  "operation": "apply"}},
           {"type": "outputs", "outputs": {"name": {"sensitive": False, "type": "string",
                                                    "value": "n"}}}]
DESTROYED = [{"type": "change_summary", "changes": {"add": 0, "change": 0, "remove": 1,
                                                    "operation": "destroy"}}]


def stand_in(tmp_path: Path, events: list[dict[str, object]], after: str = "",
             kill_grace: float = 2.0, wakes: Wakes | None = None,
             before: str = "") -> Terraform:
    """A runner whose terraform runs `before`, prints `events` one write each, then runs
    `after`."""
    path = tmp_path / "fake-terraform"
    (tmp_path / "spool").mkdir(exist_ok=True)
    lines = "".join(f"sys.stdout.write({json.dumps(json.dumps(e) + chr(10))}); "
                    "sys.stdout.flush()\n" for e in events)
    path.write_text(f"#!{sys.executable}\nimport os, sys, time, signal, subprocess\n"
                    f"{before}{lines}{after}\n")
    path.chmod(0o755)
    return Terraform(binary=str(path), base_env={"PATH": "/usr/bin:/bin"},
                     kill_grace=kill_grace, spool_dir=tmp_path / "spool",
                     **({"wakes": wakes} if wakes is not None else {}))


def waits_for(go: Path) -> str:
    """A stand-in's end: it waits (bounded) for the test to create `go`."""
    return (f"deadline = time.monotonic() + 30\n"
            f"while not os.path.exists({str(go)!r}) and time.monotonic() < deadline:\n"
            f"    time.sleep(0.01)\n")


def until(check: object, within: float = 30.0) -> bool:
    deadline = time.monotonic() + within
    while not check() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.01)
    return bool(check())  # type: ignore[operator]


@pytest.mark.parametrize("wakes", [None, Wakes(enabled=False)], ids=["woken", "polled"])
def test_an_apply_ends_at_its_last_event_and_its_exit_is_awaited_apart(
        tmp_path: Path, wakes: Wakes | None, monkeypatch: pytest.MonkeyPatch) -> None:
    go = tmp_path / "go"
    if wakes is None:  # woken by the write itself: a poll would come only after the wait
        monkeypatch.setattr(Output, "POLL", 60.0)
    tf = stand_in(tmp_path, PLAN + APPLIED, waits_for(go), wakes=wakes)
    result = tf.run(["apply", "-json"], cwd=tmp_path, timeout=60)
    assert result.ok and result.returncode == 0
    assert result.outputs == {"name": {"sensitive": False, "type": "string", "value": "n"}}
    assert result.changes == {"add": 1, "change": 0, "remove": 0}
    assert tf.running() == 1, "the run waited for the exit"
    assert list((tmp_path / "spool").iterdir()), "its output files went before its exit"
    go.touch()
    assert until(lambda: tf.running() == 0)
    assert until(lambda: not list((tmp_path / "spool").iterdir()))
    tf.close()


def test_a_destroy_ends_at_its_summary(tmp_path: Path) -> None:
    go = tmp_path / "go"
    tf = stand_in(tmp_path, PLAN[:1] + DESTROYED, waits_for(go))
    result = tf.run(["destroy", "-json"], cwd=tmp_path, timeout=60)
    assert result.ok and result.changes == {"add": 0, "change": 0, "remove": 1}
    assert tf.running() == 1
    go.touch()
    tf.close()  # awaits the exit
    assert tf.running() == 0


def test_a_plan_and_a_failed_apply_end_only_at_the_exit(tmp_path: Path) -> None:
    exiting = tmp_path / "exiting"
    after = f"time.sleep(0.3)\nopen({str(exiting)!r}, 'w').close()\n"
    tf = stand_in(tmp_path, PLAN, after)
    assert tf.run(["plan", "-json"], cwd=tmp_path, timeout=60).ok
    assert exiting.exists() and tf.running() == 0
    exiting.unlink()
    # The plan phase of an apply reports a summary and outputs too: they are not its end.
    tf = stand_in(tmp_path, PLAN, after + "sys.exit(1)\n")
    result = tf.run(["apply", "-json"], cwd=tmp_path, timeout=60)
    assert result.returncode == 1 and not result.ok
    assert exiting.exists() and tf.running() == 0


def test_an_exit_status_after_the_last_event_is_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    go = tmp_path / "go"
    tf = stand_in(tmp_path, APPLIED, waits_for(go) + "sys.exit(3)\n")
    with caplog.at_level(logging.ERROR, logger="tfserver.terraform.process"):
        result = tf.run(["apply", "-json"], cwd=tmp_path, timeout=60)
        assert result.ok
        go.touch()
        tf.close()
    assert any("exited 3 after its last event" in r.getMessage() for r in caplog.records)


def test_a_terraform_that_does_not_exit_after_its_last_event_is_killed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    child = tmp_path / "child"
    before = ("signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
              "c = subprocess.Popen(['sleep', '83'])\n"
              f"open({str(child)!r} + '.tmp', 'w').write(str(c.pid))\n"
              f"os.rename({str(child)!r} + '.tmp', {str(child)!r})\n")
    tf = stand_in(tmp_path, APPLIED, "time.sleep(60)\n", kill_grace=0.5, before=before)
    with caplog.at_level(logging.ERROR, logger="tfserver.terraform.process"):
        assert tf.run(["apply", "-json"], cwd=tmp_path, timeout=60).ok
        assert until(child.exists)
        tf.close()  # awaits the kill
    assert tf.running() == 0
    pid = int(child.read_text())
    assert until(lambda: not _alive(pid), within=10), "its group's child lives"
    assert any("has not exited" in r.getMessage() for r in caplog.records)


def test_a_failure_awaiting_the_exit_still_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    pid_file = tmp_path / "pid"
    tf = stand_in(tmp_path, APPLIED, "time.sleep(60)\n",
                  before=f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n")
    pump = Output.pump

    def failing(self: Output, until: float, *, to_exit: bool = False) -> bool:
        if to_exit:
            raise OSError(5, "Input/output error")
        return pump(self, until, to_exit=to_exit)

    monkeypatch.setattr(Output, "pump", failing)
    before = len(os.listdir("/proc/self/fd"))
    with caplog.at_level(logging.ERROR, logger="tfserver.terraform.process"):
        assert tf.run(["apply", "-json"], cwd=tmp_path, timeout=60).ok
        tf.close()
    assert tf.running() == 0
    assert until(lambda: not _alive(int(pid_file.read_text())), within=10)
    assert not list((tmp_path / "spool").iterdir())
    assert len(os.listdir("/proc/self/fd")) <= before
    assert any("exit failed" in r.getMessage() for r in caplog.records)


def test_a_wake_wakes_at_each_write_and_its_descriptor_is_used_again(tmp_path: Path) -> None:
    wakes = Wakes()
    first, second = tmp_path / "a", tmp_path / "b"
    first.touch()
    second.touch()
    wake = wakes.watch(first)
    if wake is None:
        pytest.skip("no inotify on this system")
    assert not _readable(wake.fd, 0)
    first.write_text("x")
    assert _readable(wake.fd, 5)
    wake.clear()
    assert not _readable(wake.fd, 0)
    fd = wake.fd
    wake.close()
    wake.close()  # once
    again = wakes.watch(second)
    assert again is not None and again.fd == fd, "the descriptor was not used again"
    first.write_text("y")  # no longer watched
    assert not _readable(fd, 0.05)
    second.write_text("z")
    assert _readable(fd, 5)
    again.close()
    wakes.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_last_event_of_each_command() -> None:
    assert last_event("plan") is None and last_event("init") is None
    apply = last_event("apply")
    assert apply is not None
    assert [apply(e) for e in PLAN + APPLIED] == [False] * 5 + [True]
    destroy = last_event("destroy")
    assert destroy is not None
    assert [destroy(e) for e in PLAN + DESTROYED] == [False, False, False, True]
    # A summary without an operation (older streams) is never the end.
    bare = last_event("apply")
    assert bare is not None
    assert not any(bare(e) for e in [{"type": "change_summary", "changes": {"add": 1}},
                                     APPLIED[2], {"type": "change_summary", "changes": []},
                                     APPLIED[2]])


def _readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_an_apply_whose_events_all_came_before_the_watch_still_ends_at_its_last_event(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """terraform (here a quick stand-in on a busy machine) may write every event before
    its output file is watched: no write wakes the reader after, and the run waited for
    the exit (CI saw it: the stand-in's own deadline, 30 s, then `running() == 0`)."""
    go = tmp_path / "go"
    monkeypatch.setattr(Output, "POLL", 60.0)  # only a wake or the exit would read again
    written = tmp_path / "written"

    class Late(Wakes):
        def watch(self, path: Path) -> Wake | None:
            until(written.exists)  # the stand-in has written everything
            return super().watch(path)

    tf = stand_in(tmp_path, PLAN + APPLIED,
                  f"open({str(written)!r}, 'w').close()\n" + waits_for(go), wakes=Late())
    started = time.monotonic()
    result = tf.run(["apply", "-json"], cwd=tmp_path, timeout=60)
    assert result.ok and result.changes == {"add": 1, "change": 0, "remove": 0}
    assert tf.running() == 1, "the run waited for the exit"
    assert time.monotonic() - started < 20
    go.touch()
    assert until(lambda: tf.running() == 0)
    tf.close()
