"""Runs as resources on a real tfserver and the real terraform: async, events, cancel,
queue, idempotency keys, saved plans."""

from __future__ import annotations

import http.client
import itertools
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from support import ROOT, Response, ServerProcess, start_server, terraform_shim

MODULES = ROOT / "tests" / "modules_runs"
SECRET = "Steps-Secret-Qx9\"quoted"  # must never appear in an event or a record
ASYNC = {"Prefer": "respond-async"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, terraform_bin: str
        ) -> Iterator[tuple[ServerProcess, Path]]:
    tmp = tmp_path_factory.mktemp("runs")
    shim, log = terraform_shim(tmp)
    server = start_server(tmp, modules_dir=MODULES, env={
        "TFSERVER_TERRAFORM": str(shim), "TFSERVER_KILL_GRACE": "5",
        "TFSERVER_QUEUE_DEPTH": "4"})
    yield server, log
    server.stop()


def body(seconds: float = 0, tag: str = "run", journal: Path | None = None,
         secret: str = SECRET) -> dict[str, Any]:
    return {"seconds": seconds, "tag": tag, "journal": str(journal or ""), "secret": secret}


def wait_run(server: ServerProcess, run_id: str, statuses: tuple[str, ...] = (
        "succeeded", "failed", "canceled", "lost"), timeout: float = 90,
        headers: dict[str, str] | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = server.request("GET", f"/runs/{run_id}", headers=headers)
        assert r.status == 200, r.body
        if r.json["status"] in statuses:
            return dict(r.json)
        assert time.monotonic() < deadline, r.json
        time.sleep(0.1)


def start_async(server: ServerProcess, path: str, doc: dict[str, Any],
                headers: dict[str, str] | None = None, method: str = "PUT") -> Response:
    r = server.request(method, path, doc, headers={**ASYNC, **(headers or {})})
    assert r.status == 202, r.body
    return r


def applies(log: Path) -> int:
    return sum(1 for line in log.read_text().splitlines() if line.startswith("apply "))


def stream(server: ServerProcess, run_id: str, headers: dict[str, str] | None = None,
           query: str = "") -> Iterator[tuple[float, bytes]]:
    """(arrival time, line) of an events stream, as the lines come."""
    conn = http.client.HTTPConnection(server.url.split("//")[1], timeout=60)
    conn.request("GET", f"/runs/{run_id}/events{query}", headers=headers or {})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    try:
        while line := resp.readline():
            yield time.monotonic(), line
    finally:
        conn.close()


def test_async_apply_then_poll_to_success(srv: tuple[ServerProcess, Path]) -> None:
    server, _ = srv
    r = start_async(server, "/steps/poll", body(0.2, "polled"))
    assert r.header("Preference-Applied") == "respond-async"
    record = r.json
    assert r.header("Location") == f"/runs/{record['id']}"
    assert record["status"] in ("queued", "running") and record["operation"] == "apply"
    assert record["links"] == {"self": f"/runs/{record['id']}",
                               "events": f"/runs/{record['id']}/events",
                               "instance": "/steps/poll"}
    done = wait_run(server, record["id"])
    assert done["status"] == "succeeded", done
    assert done["outputs"] == {"tag": "polled", "secret_out": "<sensitive>"}
    assert done["changes"] == {"add": 3, "change": 0, "remove": 0}
    assert done["who"] == {"subject": "local", "tenant": "local"}
    assert done["started_at"] <= done["finished_at"] and done["created_at"].endswith("Z")
    listed = server.request("GET", "/steps/poll/runs").json
    assert [x["id"] for x in listed["runs"]] == [record["id"]] and listed["next"] is None
    assert record["id"] in [x["id"] for x in server.request("GET", "/runs").json["runs"]]
    assert server.request("GET", "/steps/poll").json["outputs"]["tag"] == "polled"
    assert server.request("DELETE", "/steps/poll").status == 200


def test_events_arrive_while_the_run_goes_on(srv: tuple[ServerProcess, Path]) -> None:
    server, _ = srv
    run_id = start_async(server, "/steps/live", body(1.5, "live")).json["id"]
    lines = list(stream(server, run_id))
    events = [json.loads(line) for _, line in lines]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "queued" and "started" in kinds and kinds[-1] == "finished"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    first_resource = next(t for (t, _), e in zip(lines, events, strict=True)
                          if e["type"] == "resource")
    assert lines[-1][0] - first_resource > 3.0  # followed live, not read at the end
    resources = [e for e in events if e["type"] == "resource"]
    assert {(e["address"], e["phase"]) for e in resources} >= {
        ("terraform_data.first", "start"), ("terraform_data.first", "done"),
        ("terraform_data.third", "done")}
    planned = next(e for e in events if e["type"] == "planned")
    assert planned["changes"] == {"add": 3, "change": 0, "remove": 0}
    assert events[-1]["status"] == "succeeded"
    outputs = next(e for e in events if e["type"] == "outputs")
    assert outputs["outputs"] == {"tag": "live", "secret_out": "<sensitive>"}
    assert all(e["time"].endswith("Z") for e in events)
    assert SECRET not in b"".join(line for _, line in lines).decode()


def test_server_sent_events_resume_after_last_event_id(srv: tuple[ServerProcess, Path]) -> None:
    server, _ = srv
    run_id = start_async(server, "/steps/sse", body(0.3, "sse")).json["id"]
    raw = b"".join(line for _, line in stream(server, run_id,
                                               {"Accept": "text/event-stream"}))
    frames = [f for f in raw.decode().split("\n\n") if f.strip() and not f.startswith(":")]
    ids = [int(f.split("\n")[0].removeprefix("id: ")) for f in frames]
    assert ids == list(range(1, len(ids) + 1))
    assert frames[-1].split("\n")[1] == "event: finished"
    resumed = b"".join(line for _, line in stream(server, run_id, {
        "Accept": "text/event-stream", "Last-Event-ID": str(ids[-3])})).decode()
    again = [f for f in resumed.split("\n\n") if f.strip()]
    assert [int(f.split("\n")[0][4:]) for f in again] == ids[-2:]
    ndjson = [json.loads(line) for _, line in stream(server, run_id, query="?after=2")]
    assert [e["seq"] for e in ndjson] == ids[2:]
    assert server.request("GET", f"/runs/{run_id}/events",
                          headers={"Last-Event-ID": "x", "Accept": "text/event-stream"}
                          ).status == 400


def sleepers(seconds: str) -> list[int]:
    """Pids of `sleep <seconds>` processes (a run's provisioner and its children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd[:2] == [b"sleep", seconds.encode()]:
                found.append(int(entry.name))
    return found


def wait_sleeping(seconds: str, timeout: float = 30) -> None:
    """Block (bounded) until a run's `sleep <seconds>` is running."""
    deadline = time.monotonic() + timeout
    while not sleepers(seconds):
        assert time.monotonic() < deadline, f"no sleep {seconds} started"
        time.sleep(0.05)


def test_cancel_a_running_run_leaves_no_lock_and_no_process(
        srv: tuple[ServerProcess, Path]) -> None:
    server, _ = srv
    run_id = start_async(server, "/steps/cancel", body(37, "long")).json["id"]
    for _, line in stream(server, run_id):
        if json.loads(line)["type"] == "resource":
            break
    wait_sleeping("37")
    r = server.request("POST", f"/runs/{run_id}/cancel")
    assert r.status == 202 and r.json["cancel"] == "requested", r.body
    done = wait_run(server, run_id, timeout=30)
    assert done["status"] == "canceled", done
    assert done["problem"]["status"] == 409
    assert sleepers("37") == []  # nothing of its process group survived
    assert server.request("POST", f"/runs/{run_id}/cancel").status == 409  # ended
    # the instance is free, and its state unlocked: a synchronous apply goes through
    r = server.request("PUT", "/steps/cancel", body(0, "after"))
    assert r.status in (200, 201), r.body
    assert server.request("DELETE", "/steps/cancel").status == 200


def test_cancel_a_queued_run_and_the_fifo_order(srv: tuple[ServerProcess, Path],
                                                 tmp: Path) -> None:
    server, _ = srv
    journal = tmp / "journal"
    ids = [start_async(server, "/steps/fifo", body(0.7, f"r{i}", journal)).json["id"]
           for i in range(3)]
    doomed = start_async(server, "/steps/fifo", body(0, "doomed", journal)).json
    assert doomed["status"] == "queued" and doomed["queue_position"] >= 1
    r = server.request("POST", f"/runs/{doomed['id']}/cancel")
    assert r.status == 202 and r.json["status"] == "canceled"
    records = [wait_run(server, i) for i in ids]
    assert [x["status"] for x in records] == ["succeeded"] * 3
    starts = [line.split()[1] for line in journal.read_text().splitlines()
              if line.startswith("start")]
    assert starts == ["r0", "r1", "r2"]  # in the order they were sent, doomed never ran
    spans = [(x["started_at"], x["finished_at"]) for x in records]
    assert spans == sorted(spans) and all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    assert server.request("DELETE", "/steps/fifo").status == 200


def test_a_full_queue_is_409(srv: tuple[ServerProcess, Path]) -> None:
    server, _ = srv
    first = start_async(server, "/steps/full", body(2, "head")).json["id"]
    queued = [start_async(server, "/steps/full", body(0, f"q{i}")).json["id"]
              for i in range(4)]
    r = server.request("PUT", "/steps/full", body(0, "extra"), headers=ASYNC)
    assert r.status == 409 and "queue" in r.json["detail"] and r.header("Retry-After")
    sync = server.request("PUT", "/steps/full", body(0, "sync"))
    assert sync.status == 409  # the synchronous contract: busy is 409 at once
    for run_id in [first, *queued]:
        assert wait_run(server, run_id)["status"] == "succeeded"
    assert server.request("DELETE", "/steps/full").status == 200


def test_idempotent_retries_run_terraform_once(srv: tuple[ServerProcess, Path]) -> None:
    server, log = srv
    key = {"Idempotency-Key": f"retry-{uuid.uuid4()}"}
    before = applies(log)
    first = start_async(server, "/steps/idem", body(1, "once"), key).json
    again = server.request("PUT", "/steps/idem", body(1, "once"), headers={**ASYNC, **key})
    assert again.status == 202 and again.json["id"] == first["id"]  # during the run
    sync = server.request("PUT", "/steps/idem", body(1, "once"), headers=key)
    assert sync.status == 201 and sync.json["run_id"] == first["id"]  # waited for it
    after = server.request("PUT", "/steps/idem", body(1, "once"), headers=key)
    assert after.status == 201 and after.json["run_id"] == first["id"]  # after the run
    assert applies(log) - before == 1
    other = server.request("PUT", "/steps/idem", body(1, "other"), headers=key)
    assert other.status == 422 and "Idempotency-Key" in other.json["detail"]
    for bad in ("", "x" * 256, "has space", "caf\u00e9"):
        r = server.request("PUT", "/steps/idem", body(), headers={
            "Idempotency-Key": bad.encode().decode("latin-1")})
        assert r.status == 400, (bad, r.body)
    assert applies(log) - before == 1
    assert server.request("DELETE", "/steps/idem").status == 200


def test_a_saved_plan_is_applied_once_and_a_stale_one_refused(
        srv: tuple[ServerProcess, Path]) -> None:
    server, _ = srv
    plan = server.request("PUT", "/steps/plan?dry_run=true", body(0, "planned"))
    assert plan.status == 200 and plan.json["changes"]["add"] == 3, plan.body
    record = server.request("GET", f"/runs/{plan.json['run_id']}").json
    assert record["operation"] == "plan" and record["links"]["apply"]
    applied = server.request("POST", record["links"]["apply"])
    assert applied.status == 201, applied.body
    assert applied.json["outputs"]["tag"] == "planned"
    assert server.request("POST", record["links"]["apply"]).status == 409  # used
    assert "apply" not in server.request("GET", record["links"]["self"]).json["links"]
    stale = server.request("PUT", "/steps/plan?dry_run=true", body(0, "stale")).json
    assert server.request("PUT", "/steps/plan", body(0, "meanwhile")).status == 200
    r = server.request("POST", f"/runs/{stale['run_id']}/apply")
    assert r.status == 409 and "stale" in r.json["detail"], r.body
    assert server.request("GET", "/steps/plan").json["outputs"]["tag"] == "meanwhile"
    destroy_plan = server.request("DELETE", "/steps/plan?dry_run=true").json
    r = server.request("POST", f"/runs/{destroy_plan['run_id']}/apply", headers=ASYNC)
    assert r.status == 202 and r.json["operation"] == "destroy"
    assert wait_run(server, r.json["id"])["status"] == "succeeded"
    assert server.request("GET", "/steps/plan").status == 404


def test_prefer_wait(srv: tuple[ServerProcess, Path]) -> None:
    server, _ = srv
    r = server.request("PUT", "/steps/wait", body(0, "quick"), headers={"Prefer": "wait=30"})
    assert r.status == 201 and r.header("Preference-Applied") == "wait=30", r.body
    started = time.monotonic()
    r = server.request("PUT", "/steps/wait", body(3, "slow"), headers={"Prefer": "wait=1"})
    assert r.status == 202 and 0.9 < time.monotonic() - started < 3, r.body
    assert wait_run(server, r.json["id"])["status"] == "succeeded"
    assert server.request("DELETE", "/steps/wait").status == 200


def test_no_sensitive_value_in_any_event_or_record(srv: tuple[ServerProcess, Path]) -> None:
    server, _ = srv
    short = "Qx\"7\u00e9"  # fails the validation, whose message repeats it
    ok = start_async(server, "/steps/sens", body(0, "s", secret=SECRET)).json["id"]
    bad = start_async(server, "/steps/sens", body(0, "s", secret=short)).json["id"]
    assert wait_run(server, bad)["status"] == "failed"
    texts = []
    for run_id in (ok, bad):
        texts.append(b"".join(line for _, line in stream(server, run_id)).decode())
        texts.append(server.request("GET", f"/runs/{run_id}").body.decode())
    texts.append(server.request("GET", "/runs?limit=100").body.decode())
    failed = next(json.loads(line) for line in texts[2].splitlines()
                  if json.loads(line)["type"] == "diagnostic")
    assert "is too short" in failed["detail"]
    for text in texts:
        for secret in (SECRET, short, json.dumps(SECRET)[1:-1], json.dumps(short)[1:-1]):
            assert secret not in text
    assert SECRET not in server.log_text() and short not in server.log_text()
    assert server.request("DELETE", "/steps/sens").status == 200


def test_runs_of_other_tenants_and_bad_ids_are_404(srv: tuple[ServerProcess, Path]) -> None:
    server, _ = srv
    for path in ("/runs/nope", "/runs/" + "0" * 32, "/runs/" + "0" * 32 + "/events",
                 "/runs/../etc/passwd"):
        assert server.request("GET", path).status == 404, path
    assert server.request("POST", "/runs/" + "0" * 32 + "/cancel").status == 404
    assert server.request("GET", "/runs?limit=0").status == 400
    assert server.request("GET", "/runs?limit=abc").status == 400
    assert server.request("DELETE", "/runs").status == 405


def test_a_restart_marks_its_leftover_runs_lost(tmp: Path) -> None:
    server = start_server(tmp, modules_dir=MODULES)
    run_id = start_async(server, "/steps/left", body(33, "left")).json["id"]
    deadline = time.monotonic() + 30
    while server.request("GET", f"/runs/{run_id}").json["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    server.stop(signal.SIGKILL)
    for pid in sleepers("33"):
        os.kill(pid, signal.SIGKILL)  # what a crashed host would not leave behind
    again = start_server(tmp, modules_dir=MODULES)
    try:
        record = again.request("GET", f"/runs/{run_id}").json
        assert record["status"] == "lost", record
    finally:
        again.stop()


def test_sigterm_cancels_queued_runs_and_lets_the_running_one_finish(tmp: Path) -> None:
    server = start_server(tmp, modules_dir=MODULES, env={"TFSERVER_SHUTDOWN_GRACE": "30"})
    journal = tmp / "journal"
    running = start_async(server, "/steps/term", body(1, "running", journal)).json["id"]
    queued = start_async(server, "/steps/term", body(0, "queued", journal)).json["id"]
    deadline = time.monotonic() + 30
    while not (journal.exists() and "start running" in journal.read_text()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0
    again = start_server(tmp, modules_dir=MODULES)
    try:
        assert again.request("GET", f"/runs/{running}").json["status"] == "succeeded"
        assert again.request("GET", f"/runs/{queued}").json["status"] == "canceled"
        assert "queued" not in journal.read_text()
    finally:
        again.stop()


def test_concurrent_idempotent_requests_make_one_run(srv: tuple[ServerProcess, Path]) -> None:
    server, log = srv
    key = {"Idempotency-Key": f"race-{uuid.uuid4()}", **ASYNC}
    before = applies(log)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: server.request("PUT", "/steps/race",
                                                         body(0.5, "race"), headers=key),
                                range(8)))
    ids = {a.json["id"] for a in answers if a.status == 202}
    assert len(ids) == 1 and {a.status for a in answers} <= {202, 409}, \
        [(a.status, a.body) for a in answers]
    wait_run(server, ids.pop())
    assert applies(log) - before == 1
    assert server.request("DELETE", "/steps/race").status == 200


def cli(server: ServerProcess, *args: str) -> subprocess.Popen[str]:
    import sys

    return subprocess.Popen([sys.executable, "-m", "tfserver", "run", *args], cwd=ROOT,
                            env={"PATH": os.environ["PATH"], "HOME": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_command_line_client_follows_and_answers(srv: tuple[ServerProcess, Path]) -> None:
    server, _ = srv
    done = cli(server, "PUT", f"{server.url}/steps/cli", "-d", json.dumps(body(0.2, "cli")))
    out, err = done.communicate(timeout=120)
    assert done.returncode == 0, err
    record = json.loads(out)
    assert record["status"] == "succeeded" and record["outputs"]["tag"] == "cli"
    kinds = [line.split()[1] for line in err.splitlines()]
    assert kinds[0] == "queued" and "resource" in kinds and kinds[-1] == "finished"
    failed = cli(server, "PUT", f"{server.url}/steps/cli", "-d",
                 json.dumps(body(0, "bad", secret="short")))
    out, err = failed.communicate(timeout=120)
    assert failed.returncode == 1 and json.loads(out)["status"] == "failed"
    assert "short" not in out + err
    refused = cli(server, "PUT", f"{server.url}/steps/cli", "-d", '{"nope": 1}')
    out, _ = refused.communicate(timeout=60)
    assert refused.returncode == 1 and json.loads(out)["status"] == 400
    usage = cli(server, "GET", f"{server.url}/steps/cli")
    usage.communicate(timeout=60)
    assert usage.returncode == 2
    assert server.request("DELETE", "/steps/cli").status == 200


def test_ctrl_c_in_the_command_line_client_cancels_the_run(
        srv: tuple[ServerProcess, Path]) -> None:
    server, _ = srv
    proc = cli(server, "PUT", f"{server.url}/steps/cli-cancel", "-d",
               json.dumps(body(39, "cancel-me")))
    assert proc.stderr is not None
    wait_sleeping("39", timeout=60)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert json.loads(out)["status"] == "canceled"
    assert "canceling run" in err
    assert sleepers("39") == []


def test_the_live_progress_line() -> None:
    import io

    from tfserver.cli.run import Progress

    out = io.StringIO()
    p = Progress(out, live=True)
    for event in ({"type": "planned", "changes": {"add": 2, "change": 1, "remove": 0}},
                  {"type": "resource", "address": "a.b", "action": "create", "phase": "start"},
                  {"type": "resource", "address": "a.b", "action": "create", "phase": "done"},
                  {"type": "finished", "status": "succeeded"}):
        p.show(event)
    text = out.getvalue()
    assert "\r[0/3] resource: a.b create" in text and "\r[1/3] resource: a.b create" in text
    assert text.endswith("\r")  # the line is cleared before the final JSON


def test_a_synchronous_run_is_listed_as_soon_as_it_answers(srv: tuple[ServerProcess, Path]
                                                          ) -> None:
    server, _ = srv
    for i in range(10):
        answer = server.request("PUT", "/steps/listed", body(0, f"l{i}"))
        assert answer.status in (200, 201), answer.body
        runs = server.request("GET", "/steps/listed/runs?limit=1").json["runs"]
        assert runs[0]["id"] == answer.json["run_id"], i  # read your writes
    assert server.request("DELETE", "/steps/listed").status == 200


def test_each_sleep_length_belongs_to_one_test_file() -> None:
    """`sleepers` finds a run's `sleep <seconds>` among every process of the machine,
    and test files run side by side (pytest-xdist): a length that another file sleeps
    too is a flake (test_hostile once took test_phantoms' sleep of 47 s for its own, left
    behind; a test here killed every sleep of 30 s, the drift tests' stand-ins' too)."""
    import re
    from collections import defaultdict

    watched: dict[str, set[str]] = defaultdict(set)
    slept: dict[str, set[str]] = defaultdict(set)
    number = r"([0-9]+(?:\.[0-9]+)?)"
    for path in Path(__file__).parent.glob("test_*.py"):
        text = path.read_text()
        for seconds in re.findall(r'(?:sleepers|wait_sleeping)\("' + number + '"', text):
            watched[seconds].add(path.name)
        for pattern in (r"\bsleep " + number + r"\b", r"\bbody\(" + number + ",",
                        r'seconds": ' + number + r"\b", r"seconds=" + number + r"\b",
                        r"flaky\(gate, " + number + ","):
            for seconds in re.findall(pattern, text):
                slept[seconds].add(path.name)
    shared = {s: sorted(files | slept[s]) for s, files in watched.items()
              if len(files | slept[s]) > 1}
    assert not shared, shared
