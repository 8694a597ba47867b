"""The app layer's defects (issue 19) and the inputs kept for destroy, each tried as it
broke: a fake runner where terraform adds nothing, real terraform where it does."""

from __future__ import annotations

import json
import logging
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from test_outcomes import APPLY_START, LOCAL, FakeRunner, sync

from support import TEST_MODULES, start_server
from tfserver.app.execute import INPUTS_NOT_KEPT, Applied
from tfserver.app.service import Service
from tfserver.config import Config
from tfserver.files import private_dir, write_private
from tfserver.module.discover import load_module
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

    def get(self, key: str) -> bytes | None:
        return self.inner.get(key)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def keys(self, folder: str, *, start_after: str = "", limit: int = 1000) -> list[str]:
        return self.inner.keys(folder, start_after=start_after, limit=limit)


@pytest.fixture()
def failing(tmp_path: Path) -> Callable[[int], Service]:
    """A service over a local backend whose kept-inputs writes fail `failures` times."""
    def make(failures: int) -> Service:
        config = Config(state_dir=tmp_path / "state", run_timeout=7.0,
                        tmp_dir=tmp_path / "vars")
        backend = LocalBackend(config.state_dir)
        backend.objects = FailingInputs(backend.objects, failures)
        backend.inputs = KeptInputs(backend.objects, legacy=True)
        svc = Service(config, {"basic": load_module(TEST_MODULES / "basic")},
                      FakeRunner(RunResult(("apply",), 0, (APPLY_START, SUMMARY, OUTPUTS))),
                      backend)
        svc.prepare(None)
        return svc
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
