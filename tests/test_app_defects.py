"""The app layer's defects (issue 19) and the inputs kept for destroy, each tried as it
broke: a fake runner where terraform adds nothing, real terraform where it does."""

from __future__ import annotations

import json
import logging
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from test_outcomes import APPLY_START, LOCAL, SECRET, FakeRunner, diag, sync

from support import TEST_MODULES, start_server
from tfserver.app.execute import INPUTS_NOT_KEPT, Applied, Planned
from tfserver.app.service import Service
from tfserver.app.statedir import prepare_state
from tfserver.auth import Principal
from tfserver.config import Config
from tfserver.errors import TFServerError
from tfserver.files import private_dir, write_private
from tfserver.module.discover import Module, Variable, load_module
from tfserver.module.types import parse_type
from tfserver.runs.store import RunRecord, new_run_id
from tfserver.scrub import REDACTED, SCRUBBED, Scrubber
from tfserver.storage.base import BackendError, ObjectStore
from tfserver.storage.inputs import KeptInputs
from tfserver.storage.local import LocalBackend
from tfserver.terraform.output import RunResult
from tfserver.web import render

SUMMARY = {"type": "change_summary", "changes": {"add": 1, "change": 0, "remove": 0}}
OUTPUTS = {"type": "outputs", "outputs": {"name": {"value": "n", "sensitive": False}}}


class FailingInputs:
    """An object store whose writes of kept inputs fail (the first `failures` of them)."""

    def __init__(self, inner: ObjectStore, failures: int = 1_000) -> None:
        self.inner = inner
        self.failures = failures

    def put(self, key: str, data: bytes) -> None:
        if key.startswith("_inputs/") and self.failures > 0:
            self.failures -= 1
            raise BackendError(f"cannot write {key}: Input/output error")
        self.inner.put(key, data)

    def put_new(self, key: str, data: bytes) -> bool:
        return self.inner.put_new(key, data)

    def put_copy(self, key: str, data: bytes, source: str) -> None:
        self.inner.put_copy(key, data, source)

    def get(self, key: str) -> bytes | None:
        return self.inner.get(key)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def keys(self, folder: str, *, start_after: str = "", limit: int = 1000) -> list[str]:
        return self.inner.keys(folder, start_after=start_after, limit=limit)


def fake_service(tmp_path: Path, result: RunResult, failures: int = 0) -> Service:
    """A service over a local backend and a fake runner that answers `result`; its
    kept-inputs writes fail `failures` times."""
    config = Config(state_dir=tmp_path / "state", run_timeout=7.0, tmp_dir=tmp_path / "vars")
    backend = LocalBackend(config.state_dir)
    backend.objects = FailingInputs(backend.objects, failures)
    backend.inputs = KeptInputs(backend.objects, legacy=True)
    svc = Service(config, {"basic": load_module(TEST_MODULES / "basic")},
                  FakeRunner(result), backend)
    prepare_state(config)
    svc.prepare()
    return svc


@pytest.fixture()
def failing(tmp_path: Path) -> Callable[[int], Service]:
    """A service whose applies succeed and whose kept-inputs writes fail `failures` times."""
    def make(failures: int) -> Service:
        return fake_service(tmp_path, RunResult(("apply",), 0, (APPLY_START, SUMMARY, OUTPUTS)),
                            failures)
    return make


def test_an_apply_whose_inputs_cannot_be_kept_is_still_answered(
        failing: Callable[[int], Service], caplog: pytest.LogCaptureFixture) -> None:
    # Defect 2: the backend failed to keep the inputs; the apply happened all the same.
    # It was answered 503, its outputs lost and its expiry never set.
    svc = failing(1_000)
    with caplog.at_level(logging.WARNING, logger="tfserver.app.execute"):
        applied = sync(svc, svc.apply(LOCAL, "basic", "k", {"name": "n"}, ttl="1h"))
    assert isinstance(applied, Applied)
    assert applied.outputs == {"name": "n"} and applied.created
    assert applied.expires_at is not None
    assert svc.expiries.get("basic", "local.k") == pytest.approx(applied.expires_at, abs=1)
    record = svc.history.record(LOCAL, applied.run_id)
    assert record.status == "succeeded" and record.warnings == [INPUTS_NOT_KEPT]
    assert render.run(record, record.tenant)["warnings"] == [INPUTS_NOT_KEPT]
    lines = [r.getMessage() for r in caplog.records if "not kept" in r.getMessage()]
    assert lines and "basic/k" in lines[0] and "Input/output error" in lines[0]
    svc.close()


def test_inputs_kept_on_the_second_try_leave_no_warning(
        failing: Callable[[int], Service]) -> None:
    # The write during terraform failed once; tried again after it, the inputs are kept.
    svc = failing(1)
    applied = sync(svc, svc.apply(LOCAL, "basic", "k", {"name": "n"}))
    assert isinstance(applied, Applied) and applied.warnings == ()
    assert svc.history.record(LOCAL, applied.run_id).warnings is None
    assert svc.backend.inputs.load("basic", "local.k")["name"] == "n"
    assert "warnings" not in render.run(svc.history.record(LOCAL, applied.run_id), "local")
    svc.close()


def test_inputs_of_an_old_state_folder_are_read_and_moved(tmp_path: Path) -> None:
    # Before the object store kept them, a local folder had them at inputs/<m>/<ws>.inputs.json.
    state = tmp_path / "state"
    backend = LocalBackend(state)
    old = state / "inputs" / "basic" / "local.x.inputs.json"
    private_dir(old.parent)
    write_private(old, json.dumps({"name": "old"}).encode())
    assert backend.inputs.load("basic", "local.x") == {"name": "old"}
    new = state / "_inputs" / "basic" / "local.x.json"
    assert json.loads(new.read_text()) == {"name": "old"} and not old.exists()
    assert stat.S_IMODE(new.stat().st_mode) == 0o600
    assert stat.S_IMODE(new.parent.stat().st_mode) == 0o700
    assert backend.inputs.load("basic", "local.x") == {"name": "old"}  # from the new key
    write_private(old, json.dumps({"name": "older"}).encode())
    backend.inputs.delete("basic", "local.x")  # both layouts forgotten
    assert not new.exists() and not old.exists()
    assert backend.inputs.load("basic", "local.x") is None


def test_an_upgraded_server_destroys_with_the_inputs_of_the_old_layout(tmp: Path) -> None:
    # `name` has no default: a destroy without the kept inputs cannot run.
    srv = start_server(tmp)
    try:
        r = srv.request("PUT", "/basic/up", {"name": "up", "token": "long-enough-token-1"})
        assert r.status == 201, r.body
    finally:
        srv.stop()
    state = tmp / "state"
    new = state / "_inputs" / "basic" / "local.up.json"
    old = state / "inputs" / "basic" / "local.up.inputs.json"
    private_dir(old.parent)
    write_private(old, new.read_bytes())
    new.unlink()
    srv = start_server(tmp)
    try:
        r = srv.request("DELETE", "/basic/up")
        assert r.status == 200, r.body
        assert srv.request("GET", "/basic/up").status == 404
        assert not old.exists() and not new.exists()
    finally:
        srv.stop()


# -- issue 20, section 3: secrets out of plans, addresses and outputs -------------------

ADDRESS = f'terraform_data.k["{SECRET}"]'


def test_planned_addresses_are_scrubbed(tmp_path: Path) -> None:
    # A `for_each` over a sensitive value puts the secret into the resource's address.
    change = {"type": "planned_change",
              "change": {"resource": {"addr": ADDRESS}, "action": "create"}}
    plan = {"type": "change_summary",
            "changes": {"add": 1, "change": 0, "remove": 0, "operation": "plan"}}
    svc = fake_service(tmp_path, RunResult(("plan",), 0, (change, plan)))
    planned = sync(svc, svc.apply(LOCAL, "basic", "p", {"name": "n", "token": SECRET},
                                  dry_run=True))
    assert isinstance(planned, Planned)
    assert planned.planned == [{"address": f'terraform_data.k["{SCRUBBED}"]',
                                "action": "create"}]
    record = svc.history.record(LOCAL, planned.run_id)
    shown = json.dumps([render.run(record, "local"), render.render(planned)])
    assert SECRET not in shown and SECRET not in json.dumps(record.planned)
    listed = svc.history.list_runs(LOCAL, module="basic")
    assert SECRET not in json.dumps(render.run_page(listed, "/runs", {}))
    svc.close()


def test_diagnostic_addresses_are_scrubbed(tmp_path: Path) -> None:
    failed = diag("local-exec provisioner error", "exit status 3")
    failed["diagnostic"]["address"] = ADDRESS
    svc = fake_service(tmp_path, RunResult(("apply",), 1, (APPLY_START, failed)))
    with pytest.raises(TFServerError) as raised:
        sync(svc, svc.apply(LOCAL, "basic", "d", {"name": "n", "token": SECRET}))
    problem = raised.value.problem()
    assert problem["diagnostics"][0]["address"] == f'terraform_data.k["{SCRUBBED}"]'
    assert SECRET not in json.dumps(problem)
    svc.close()


def test_an_output_equal_to_a_secret_is_scrubbed_everywhere(tmp_path: Path) -> None:
    # `nonsensitive(var.token)`: scrubbed in the `outputs` event, so in every other view.
    echo = {"type": "outputs", "outputs": {
        "name": {"value": SECRET, "sensitive": False},
        "nested": {"value": {SECRET: [f"x {SECRET}"]}, "sensitive": False},
        "token_out": {"sensitive": True}}}
    svc = fake_service(tmp_path, RunResult(("apply",), 0, (APPLY_START, SUMMARY, echo)))
    applied = sync(svc, svc.apply(LOCAL, "basic", "e", {"name": "n", "token": SECRET}))
    assert isinstance(applied, Applied)
    expected = {"name": SCRUBBED, "nested": {SCRUBBED: [f"x {SCRUBBED}"]},
                "token_out": REDACTED}
    assert applied.outputs == expected
    record = svc.history.record(LOCAL, applied.run_id)
    assert record.outputs == expected
    events = [e for batch in svc.runs.follow(applied.run_id) for e in batch
              if e["type"] == "outputs"]
    assert events and events[0]["outputs"]["name"] == SCRUBBED
    # GET reads the state: the same rule, with the secrets of the inputs kept for destroy.
    state = tmp_path / "state" / "state" / "basic" / "local.e" / "terraform.tfstate"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"outputs": {
        "name": {"value": SECRET, "type": "string"},
        "nested": {"value": {SECRET: [f"x {SECRET}"]}, "type": "any"},
        "token_out": {"value": SECRET, "type": "string", "sensitive": True}},
        "resources": []}))
    assert svc.catalog.show(LOCAL, "basic", "e").outputs == expected
    admin = Principal(subject="root", tenant="local", admin=True)
    assert svc.catalog.show(admin, "basic", "e", tenant="local").outputs == {
        **expected, "token_out": SECRET}  # a sensitive output is the admin's to read
    svc.close()


def test_a_lock_conflict_names_the_lock_and_the_run_holding_it(tmp_path: Path) -> None:
    # The 409 showed the server's absolute state path and `who: root@<host>`.
    detail = ("Error message: resource temporarily unavailable\nLock Info:\n"
              "  ID:        6f2b0c6e-1b6b\n"
              f"  Path:      {tmp_path}/state/state/basic/local.l/terraform.tfstate\n"
              "  Operation: OperationTypeApply\n  Who:       root@build-host-7\n"
              "  Version:   1.11.4\n  Created:   2026-11-27 19:00:00 +0000 UTC\n  Info:\n")
    locked = RunResult(("apply",), 1, (diag("Error acquiring the state lock", detail),))
    svc = fake_service(tmp_path, locked)
    holder = RunRecord(id=new_run_id(), module="basic", instance="l", workspace="local.l",
                       tenant="local", subject="other", operation="apply", status="running",
                       replica="elsewhere")
    svc.store.create(holder)
    with pytest.raises(TFServerError) as raised:
        sync(svc, svc.apply(LOCAL, "basic", "l", {"name": "n"}))
    problem = raised.value.problem()
    assert problem["status"] == 409
    assert problem["lock"] == {"id": "6f2b0c6e-1b6b", "operation": "OperationTypeApply",
                               "created": "2026-11-27 19:00:00 +0000 UTC",
                               "run_id": holder.id}
    assert str(tmp_path) not in json.dumps(problem) and "build-host" not in json.dumps(problem)
    svc.close()


def test_keys_of_a_sensitive_map_are_scrubbed() -> None:
    # "Every value of a sensitive variable is scrubbed": a map's keys are its caller's data
    # (and a `for_each` over the map prints them in addresses); attribute names are not.
    def var(name: str, t: str) -> Variable:
        return Variable(name, parse_type(t), required=False, sensitive=True)

    module = Module("m", Path("."), {
        "secret_map": var("secret_map", "map(string)"),
        "secret_obj": var("secret_obj", "object({ user = string, tags = map(string) })"),
        "loose": var("loose", "any")}, {})
    found = module.secret_values({
        "secret_map": {"db-host-7f3a": "pw-value-1"},
        "secret_obj": {"user": "u-name-x", "tags": {"tag-key-91": "tag-value-2"}},
        "loose": {"attribute": "loose-value-3"}})
    assert {"db-host-7f3a", "pw-value-1", "u-name-x", "tag-key-91", "tag-value-2",
            "loose-value-3"} == set(found)
    scrub = Scrubber(found)
    assert scrub('terraform_data.k["db-host-7f3a"]') == f'terraform_data.k["{SCRUBBED}"]'
