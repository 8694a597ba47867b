"""A run's outcome → the answer, as a table, with a small fake runner (no terraform)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from support import TEST_MODULES
from tfserver.app.execute import Applied, Destroyed, Planned
from tfserver.app.service import Service
from tfserver.auth import Principal
from tfserver.config import Config
from tfserver.errors import TFServerError
from tfserver.module.discover import load_module
from tfserver.storage.local import LocalBackend
from tfserver.terraform.output import EventSink, RunResult, error_text
from tfserver.terraform.process import RunControl

SECRET = "hunter2-Zq9x-secret"
LOCAL = Principal(subject="local", tenant="local", all_modules=True)


class FakeRunner:
    """Answers every terraform command with a canned result; records what it was asked."""

    def __init__(self, result: RunResult) -> None:
        self.result = result
        self.calls: list[tuple[str, ...]] = []

    def run(self, args: Sequence[str], *, cwd: Path, workspace: str = "default",
            timeout: float, on_event: EventSink | None = None,
            control: RunControl | None = None,
            on_start: Callable[[], None] | None = None,
            label: str | None = None) -> RunResult:
        self.calls.append(tuple(args))
        if on_start is not None:
            on_start()
        for arg in args:
            if arg.startswith("-out="):
                Path(arg[5:]).write_bytes(b"a saved plan")
        if args[0] in ("init", "workspace"):
            return RunResult(tuple(args), 0)
        for event in self.result.events:
            if on_event is not None:
                on_event(event)
        return RunResult(tuple(args), self.result.returncode, self.result.events,
                         stderr=self.result.stderr, timed_out=self.result.timed_out,
                         interrupted=self.result.interrupted, canceled=self.result.canceled)

    def version(self, timeout: float = 30.0) -> str | None:
        return "1.11.4"

    def interrupt_all(self) -> int:
        return 0

    def close(self) -> None:
        pass


def diag(summary: str, detail: str = "", severity: str | None = "error",
         variable: str | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"summary": summary, "detail": detail}
    if severity is not None:
        d["severity"] = severity
    if variable:
        d["snippet"] = {"values": [{"traversal": f"var.{variable}", "statement": "is ..."}]}
    return {"type": "diagnostic", "diagnostic": d}


APPLY_START = {"type": "apply_start", "hook": {"resource": {"addr": "terraform_data.this"}}}
LOCK_DETAIL = f"""Error message: ConditionalCheckFailedException
Lock Info:
  ID:        6f2b0c6e-1b6b
  Path:      b/tfserver/basic/local.x/terraform.tfstate
  Operation: OperationTypeApply
  Who:       root@host {SECRET}
  Version:   1.11.4
  Created:   2026-11-27 19:00:00 +0000 UTC
  Info:
"""

CASES = [
    # (id, result, status, words in the detail, extra checks on the problem)
    ("no-severity diagnostic at plan time",
     RunResult(("apply",), 1, (diag("Invalid value", f"too short {SECRET}", severity=None,
                                    variable="token"),)),
     422, "rejected the inputs",
     {"errors": [{"field": "token", "message": "too short (sensitive value)"}]}),
    ("validation failure names the variable",
     RunResult(("apply",), 1, (diag("Invalid value for variable", "bad", variable="name"),
                               diag("a warning", severity="warning"))),
     422, "Invalid value for variable",
     {"errors": [{"field": "name", "message": "bad"}]}),
    ("provider plan check without a variable",
     RunResult(("apply",), 1, (diag("Unsupported region", "nope"),)),
     422, "Unsupported region", {}),
    ("state locked elsewhere",
     RunResult(("apply",), 1, (diag("Error acquiring the state lock", LOCK_DETAIL),)),
     409, "locked by another run", {}),
    ("deadline", RunResult(("apply",), 1, timed_out=True), 504, "deadline of 7s", {}),
    ("shutdown", RunResult(("apply",), 1, interrupted=True), 503, "shutting down", {}),
    ("canceled", RunResult(("apply",), 1, canceled=True), 409, "canceled", {}),
    ("killed", RunResult(("apply",), -9), 502, "killed by signal 9", {}),
    ("failed at apply",
     RunResult(("apply",), 1, (APPLY_START, diag("local-exec provisioner error",
                                                 f"exit status 3 {SECRET}"))),
     502, "failed while applying", {}),
    ("silent non-zero exit", RunResult(("apply",), 1), 502, "exited with status 1", {}),
]


def sync(svc: Service, submitted: Any) -> Any:
    """What the synchronous call answers: wait for the run, then its outcome or error."""
    assert svc.history.wait(submitted, 30)
    return svc.history.result(LOCAL, submitted)


@pytest.fixture()
def service(tmp_path: Path) -> Any:
    def make(result: RunResult) -> Service:
        config = Config(state_dir=tmp_path / "state", run_timeout=7.0,
                        tmp_dir=tmp_path / "vars")
        modules = {"basic": load_module(TEST_MODULES / "basic")}
        svc = Service(config, modules, FakeRunner(result), LocalBackend(config.state_dir))
        svc.prepare()
        return svc
    return make


@pytest.mark.parametrize(("case", "result", "status", "words", "extra"), CASES,
                         ids=[c[0] for c in CASES])
def test_failed_run_becomes_its_problem(service: Any, case: str, result: RunResult,
                                        status: int, words: str, extra: dict[str, Any]
                                        ) -> None:
    svc = service(result)
    with pytest.raises(TFServerError) as raised:
        sync(svc, svc.apply(LOCAL, "basic", "x", {"name": "n", "token": SECRET}))
    problem = raised.value.problem()
    assert problem["status"] == status, problem
    assert words in problem["detail"]
    for key, value in extra.items():
        assert problem[key] == value
    assert SECRET not in repr(problem) and SECRET not in str(raised.value.headers)
    if status == 409 and "lock" in problem:
        assert problem["lock"]["id"] == "6f2b0c6e-1b6b"
        # only what identifies the lock: no path, user or host of the server (issue 20)
        assert problem["lock"] == {"id": "6f2b0c6e-1b6b", "operation": "OperationTypeApply",
                                   "created": "2026-11-27 19:00:00 +0000 UTC"}


#: A state that holds an instance (one resource): an empty one is none (`holds_instance`).
A_STATE = ('{"outputs": {}, "resources": [{"mode": "managed", "type": "terraform_data", '
           '"name": "this", "instances": []}]}')


def test_successful_runs_become_typed_results(service: Any, tmp_path: Path) -> None:
    outputs = {"type": "outputs", "outputs": {"name": {"value": "n", "sensitive": False},
                                              "token_out": {"sensitive": True}}}
    summary = {"type": "change_summary", "changes": {"add": 1, "change": 0, "remove": 0}}
    svc = service(RunResult(("apply",), 0, (APPLY_START, summary, outputs)))
    applied = sync(svc, svc.apply(LOCAL, "basic", "x", {"name": "n"}))
    assert applied == Applied("basic", "x", {"name": "n", "token_out": "<sensitive>"},
                              {"add": 1, "change": 0, "remove": 0}, applied.run_id,
                              created=True)
    planned = sync(svc, svc.apply(LOCAL, "basic", "x", {"name": "n"}, dry_run=True))
    assert isinstance(planned, Planned) and planned.changes["add"] == 1
    # destroy needs state: make the local backend see one
    state = tmp_path / "state" / "state" / "basic" / "local.x" / "terraform.tfstate"
    state.parent.mkdir(parents=True)
    state.write_text(A_STATE)
    destroyed = sync(svc, svc.destroy(LOCAL, "basic", "x"))
    assert isinstance(destroyed, Destroyed)
    assert [c[0] for c in svc.runner.calls] == ["init", "apply", "plan", "destroy",
                                                "workspace"]


def test_destroy_failing_before_apply_is_502_not_422(service: Any, tmp_path: Path) -> None:
    svc = service(RunResult(("destroy",), 1, (diag("Provider error", "no"),)))
    state = tmp_path / "state" / "state" / "basic" / "local.y" / "terraform.tfstate"
    state.parent.mkdir(parents=True)
    state.write_text(A_STATE)
    with pytest.raises(TFServerError) as raised:
        sync(svc, svc.destroy(LOCAL, "basic", "y"))
    assert raised.value.problem()["status"] == 502


def test_init_errors_keep_terraforms_whole_message() -> None:
    stderr = """
╷
│ Error: Failed to query available provider packages
│
│ Could not retrieve the list of available versions for provider
│ digitalocean/digitalocean: could not connect to registry.terraform.io: dial
│ tcp: lookup registry.terraform.io: no such host
╵

"""
    assert error_text(stderr) == (
        "Error: Failed to query available provider packages\n\n"
        "Could not retrieve the list of available versions for provider\n"
        "digitalocean/digitalocean: could not connect to registry.terraform.io: dial\n"
        "tcp: lookup registry.terraform.io: no such host")
    assert error_text("plain words\n") == "plain words"


def test_inputs_are_kept_even_when_the_background_pool_stopped(service: Any) -> None:
    # A run starting during a late shutdown: the inputs destroy needs are still kept (in
    # the run's thread), and the apply that terraform did is not reported as a failure.
    summary = {"type": "change_summary", "changes": {"add": 1, "change": 0, "remove": 0}}
    svc = service(RunResult(("apply",), 0, (APPLY_START, summary)))
    svc.executor._background.shutdown(wait=True)
    applied = sync(svc, svc.apply(LOCAL, "basic", "k", {"name": "n"}))
    assert isinstance(applied, Applied)
    assert svc.backend.inputs.load("basic", "local.k")["name"] == "n"


def test_a_shutdown_waits_until_a_run_is_fully_ended(service: Any) -> None:
    # Ended, but its audit line and record still being written: a shutdown that stopped
    # waiting at `done` lost the audit line with the process.
    svc = service(RunResult(("apply",), 0, (APPLY_START,)))
    ended: list[str] = []

    def slow_audit(record: Any) -> None:
        time.sleep(0.3)
        ended.append(record.id)

    svc.runs.on_ended = slow_audit
    submitted = svc.apply(LOCAL, "basic", "w", {"name": "n"})
    assert svc.history.wait(submitted, 30)
    assert svc.runs.wait_idle(10)
    assert ended == [submitted.run_id]


def test_a_plan_applied_before_its_record_is_stored_stays_applied(service: Any) -> None:
    # A synchronous dry run is stored just after its answer; applying its plan at once
    # must not be undone by that late write (the plan would offer itself again).
    summary = {"type": "change_summary", "changes": {"add": 1, "change": 0, "remove": 0}}
    svc = service(RunResult(("apply",), 0, (APPLY_START, summary)))
    planned = sync(svc, svc.apply(LOCAL, "basic", "p", {"name": "n"}, dry_run=True))
    applied = svc.apply_plan(LOCAL, planned.run_id)
    assert isinstance(sync(svc, applied), Applied)
    assert svc.runs.wait_idle(10)
    stored = svc.store.get(planned.run_id)
    assert stored is not None and stored.plan["applied_by"] == applied.run_id
