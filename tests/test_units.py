"""Pure parts as tables: terraform arguments, environment, config, locks, scrubbing."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from tfserver.config import PASSED_ENV, S3Settings, load
from tfserver.errors import ConfigError, Conflict, Unavailable
from tfserver.names import workspace_name
from tfserver.runs.lanes import Scheduler, Ticket
from tfserver.scrub import Scrubber
from tfserver.terraform.args import build_args, build_env, cli_config_text
from tfserver.terraform.output import RunResult, parse_lock_info

VF = Path("/s/tmp/x.tfvars.json")


@pytest.mark.parametrize(
    ("command", "kwargs", "expected"),
    [
        ("apply", {"var_file": VF, "lock_timeout": 0},
         ["apply", "-json", "-auto-approve", "-input=false", "-no-color", "-lock-timeout=0s",
          f"-var-file={VF}"]),
        ("plan", {"var_file": VF, "lock_timeout": 12.7},
         ["plan", "-json", "-input=false", "-no-color", "-lock-timeout=12s",
          f"-var-file={VF}"]),
        ("plan", {"var_file": VF, "destroy": True},
         ["plan", "-json", "-destroy", "-input=false", "-no-color", f"-var-file={VF}"]),
        ("destroy", {"var_file": VF, "lock_timeout": 5},
         ["destroy", "-json", "-auto-approve", "-input=false", "-no-color", "-lock-timeout=5s",
          f"-var-file={VF}"]),
        ("init", {"backend_config": [("bucket", "b"), ("key", "k")]},
         ["init", "-input=false", "-no-color", "-backend-config=bucket=b",
          "-backend-config=key=k"]),
        ("workspace new", {"lock_timeout": 3, "extra": ["t.x"]},
         ["workspace", "new", "-no-color", "-lock-timeout=3s", "t.x"]),
        ("workspace delete", {"extra": ["t.x"]}, ["workspace", "delete", "-no-color", "t.x"]),
        ("force-unlock", {"extra": ["abc"]}, ["force-unlock", "-no-color", "-force", "abc"]),
        ("plan", {"var_file": VF, "refresh_only": True, "lock_timeout": 2,
                  "plan_out": Path("/s/tmp/x.tfplan")},
         ["plan", "-json", "-refresh-only", "-input=false", "-no-color", "-lock-timeout=2s",
          f"-var-file={VF}", "-out=/s/tmp/x.tfplan"]),
        ("show", {"plan_file": Path("/s/tmp/x.tfplan"), "lock_timeout": 2},
         ["show", "-json", "-no-color", "/s/tmp/x.tfplan"]),
    ],
)
def test_build_args(command: str, kwargs: dict, expected: list[str]) -> None:
    assert build_args(command, **kwargs) == expected


def test_build_env_is_allowlist_plus_terraforms_own() -> None:
    env = build_env({"PATH": "/bin"}, workspace="t.x", cli_config_file=Path("/c/rc"))
    assert env == {"PATH": "/bin", "TF_IN_AUTOMATION": "1", "TF_INPUT": "0",
                   "CHECKPOINT_DISABLE": "1", "TF_WORKSPACE": "t.x",
                   "TF_CLI_CONFIG_FILE": "/c/rc"}


def test_cli_config_text() -> None:
    assert cli_config_text(Path("/c"), None) == 'plugin_cache_dir = "/c"\n'
    text = cli_config_text(Path("/c"), Path("/m"))
    assert 'filesystem_mirror {\n    path = "/m"' in text


def test_run_result_reads_the_event_stream() -> None:
    events = (
        {"type": "diagnostic", "diagnostic": {"severity": "warning", "summary": "w"}},
        {"type": "diagnostic", "diagnostic": {"severity": "error", "summary": "e",
                                              "detail": "d"}},
        {"type": "planned_change", "change": {"resource": {"addr": "a.b"}, "action": "create"}},
        {"type": "apply_start"},
        {"type": "change_summary", "changes": {"add": 1, "change": 2, "remove": 3,
                                               "import": 0}},
        {"type": "outputs", "outputs": {"o": {"value": 1}}},
    )
    r = RunResult(("apply",), 1, events)
    assert not r.ok and r.apply_started
    assert [d.summary for d in r.diagnostics] == ["e", "w"]
    assert [d.summary for d in r.errors] == ["e"]
    assert r.changes == {"add": 1, "change": 2, "remove": 3}
    assert r.planned == [{"address": "a.b", "action": "create"}]
    assert r.outputs == {"o": {"value": 1}}
    assert RunResult(("plan",), 0).outputs is None
    assert not RunResult(("plan",), 0, timed_out=True).ok


def test_scrubber_removes_plain_and_escaped_forms() -> None:
    scrub = Scrubber(["p@ss\"word", "12345"])
    assert scrub('value "p@ss\\"word" and p@ss"word, 12345') == \
        'value "(sensitive value)" and (sensitive value), (sensitive value)'
    assert Scrubber([])("text") == "text"


def test_parse_lock_info() -> None:
    detail = """Error message: operation error S3: PutObject, StatusCode: 412
Lock Info:
  ID:        6f2b0c6e-1b6b-d1b4-59c8-5d8f3d0b7a11
  Path:      bucket/tfserver/demo/local.x/terraform.tfstate
  Operation: OperationTypeApply
  Who:       root@host
  Version:   1.11.4
  Created:   2026-11-27 19:00:00.1 +0000 UTC
  Info:

Terraform acquires a state lock..."""
    assert parse_lock_info(detail) == {
        "id": "6f2b0c6e-1b6b-d1b4-59c8-5d8f3d0b7a11",
        "path": "bucket/tfserver/demo/local.x/terraform.tfstate",
        "operation": "OperationTypeApply",
        "who": "root@host",
        "version": "1.11.4",
        "created": "2026-11-27 19:00:00.1 +0000 UTC",
    }


def test_workspace_names_cannot_cross_tenants() -> None:
    assert workspace_name("local", "default") == "local.default"
    # instance names hold no dot, so "<tenant>.<instance>" splits one way only
    assert workspace_name("abc", "x").partition(".") == ("abc", ".", "x")


@pytest.mark.parametrize(
    ("argv", "env", "check"),
    [
        ([], {}, lambda c: (c.host, c.port, c.auth, c.backend.name) == ("127.0.0.1", 8000,
                                                                         "none", "local")),
        (["--port", "9"], {"TFSERVER_PORT": "7"}, lambda c: c.port == 9),
        ([], {"TFSERVER_PORT": "7", "TFSERVER_HOST": "::1"}, lambda c: (c.port, c.host) == (
            7, "::1")),
        ([], {"TFSERVER_RUN_TIMEOUT": "2m", "TFSERVER_LOCK_WAIT": "1.5"},
         lambda c: (c.run_timeout, c.lock_wait) == (120, 1.5)),
        ([], {"TFSERVER_MAX_BODY": "2MiB"}, lambda c: c.max_body == 2 * 1024 * 1024),
        ([], {"COGNITO_ISSUER": "https://idp/pool/", "TFSERVER_HOST": "0.0.0.0"},
         lambda c: c.auth == "jwt" and c.auth_settings.jwk_url ==
         "https://idp/pool/.well-known/jwks.json"),
        ([], {"DIGITALOCEAN_API_TOKEN": "t", "OTHER": "x"},
         lambda c: c.terraform_env == {"DIGITALOCEAN_TOKEN": "t"}),
        ([], {"TFSERVER_PASS_ENV": "OTHER", "OTHER": "x", "PATH": "/bin"},
         lambda c: c.terraform_env == {"OTHER": "x", "PATH": "/bin"}),
        ([], {"TFSERVER_BACKEND": "s3", "TF_STATE_BUCKET": "b", "TF_STATE_LOCK_TABLE": "t"},
         lambda c: isinstance(c.backend, S3Settings) and c.backend.bucket == "b"
         and c.backend.lock_table == "t" and c.backend.use_lockfile),
    ],
)
def test_config_table(argv: list[str], env: dict[str, str], check) -> None:
    assert check(load(argv, env))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TFSERVER_HOST": "0.0.0.0"}, "refusing to serve without authentication"),
        ({"TFSERVER_AUTH": "none", "TFSERVER_HOST": "10.1.2.3"}, "refusing"),
        ({"TFSERVER_AUTH": "jwt"}, "needs COGNITO_ISSUER"),
        ({"TFSERVER_BACKEND": "s3"}, "needs TF_STATE_BUCKET"),
        ({"TFSERVER_BACKEND": "s3", "TF_STATE_BUCKET": "b", "TF_STATE_USE_LOCKFILE": "false"},
         "needs a lock"),
        ({"TFSERVER_RUN_TIMEOUT": "soon"}, "TFSERVER_RUN_TIMEOUT must be a duration"),
        ({"TFSERVER_MAX_BODY": "-1"}, "must be a size"),
        ({"TFSERVER_TLS_CERT": "/c"}, "go together"),
        ({"TFSERVER_BACKEND": "gcs"}, "TFSERVER_BACKEND must be one of local, s3, not 'gcs'"),
    ],
)
def test_config_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load([], env)


@pytest.mark.parametrize(
    ("env", "value", "expected"),
    [
        # integers: whole ASCII numbers within bounds, nothing else
        ("TFSERVER_PORT", "8080", 8080),
        ("TFSERVER_PORT", " 0 ", 0),
        ("TFSERVER_PORT", "1m", "TFSERVER_PORT must be a whole number, not '1m'"),
        ("TFSERVER_PORT", "80.5", "TFSERVER_PORT must be a whole number"),
        ("TFSERVER_PORT", "70000", "TFSERVER_PORT must be between 0 and 65535"),
        ("TFSERVER_PORT", "\u00b2", "TFSERVER_PORT must be a whole number"),
        ("TFSERVER_MAX_RUNS", "2.9", "TFSERVER_MAX_RUNS must be a whole number"),
        ("TFSERVER_MAX_RUNS", "0", "TFSERVER_MAX_RUNS must be at least 1"),
        ("TFSERVER_MAX_CONNECTIONS", "12", 12),
        # durations: seconds, or with a unit
        ("TFSERVER_RUN_TIMEOUT", "90", 90.0),
        ("TFSERVER_RUN_TIMEOUT", "1.5", 1.5),
        ("TFSERVER_RUN_TIMEOUT", "500ms", 0.5),
        ("TFSERVER_RUN_TIMEOUT", "5m", 300.0),
        ("TFSERVER_RUN_TIMEOUT", "2h", 7200.0),
        ("TFSERVER_RUN_TIMEOUT", "1d", 86400.0),
        ("TFSERVER_RUN_TIMEOUT", "0", "TFSERVER_RUN_TIMEOUT must be at least 0.1s"),
        ("TFSERVER_RUN_TIMEOUT", "-5", "TFSERVER_RUN_TIMEOUT must be a duration"),
        ("TFSERVER_RUN_TIMEOUT", "5 minutes", "TFSERVER_RUN_TIMEOUT must be a duration"),
        ("TFSERVER_LOCK_WAIT", "0", 0.0),
        # sizes
        ("TFSERVER_MAX_BODY", "2MiB", 2 * 1024 * 1024),
        ("TFSERVER_MAX_BODY", "512KiB", 512 * 1024),
        ("TFSERVER_MAX_BODY", "1000", 1000),
        ("TFSERVER_MAX_BODY", "0", "TFSERVER_MAX_BODY must be at least 1 bytes"),
        ("TFSERVER_MAX_BODY", "1.5MiB", "TFSERVER_MAX_BODY must be a size"),
        # booleans: one parser
        ("TF_STATE_USE_LOCKFILE", "off", False),
        ("TF_STATE_USE_LOCKFILE", "YES", True),
        ("TF_STATE_USE_LOCKFILE", "maybe", "TF_STATE_USE_LOCKFILE must be true or false"),
        # choices
        ("TFSERVER_LOG_LEVEL", "debug", "DEBUG"),
        ("TFSERVER_LOG_LEVEL", "verbose",
         "TFSERVER_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        ("TFSERVER_AUTH", "NONE", "none"),
        ("TFSERVER_AUTH", "basic", "TFSERVER_AUTH must be one of none, jwt"),
        # lists and paths
        ("TFSERVER_CLIENT_IDS", "a, b,,a", frozenset({"a", "b"})),
        ("TFSERVER_STATE_DIR", "/var/lib/x", Path("/var/lib/x")),
        # empty means unset: the default
        ("TFSERVER_PORT", "", 8000),
    ],
)
def test_every_setting_kind_parses_or_names_the_fault(env: str, value: str,
                                                      expected: object) -> None:
    from tfserver.config import _values
    from tfserver.settings import SETTINGS

    value = value.encode().decode("unicode_escape")
    if isinstance(expected, str) and expected.startswith(env):
        with pytest.raises(ConfigError, match="^" + re.escape(expected)):
            _values([], {env: value})
        return
    assert _values([], {env: value})[env] == expected
    assert env in {s.env for s in SETTINGS}


def test_flags_win_and_are_parsed_like_their_variables() -> None:
    assert load(["--port", "9"], {"TFSERVER_PORT": "7"}).port == 9
    with pytest.raises(ConfigError, match="TFSERVER_PORT must be a whole number, not '1m'"):
        load(["--port", "1m"], {})
    assert load(["--log-level", "warning"], {}).log_level == "WARNING"


def test_version_and_help_come_from_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    from tfserver import __version__
    from tfserver.config import parser
    from tfserver.settings import SETTINGS

    with pytest.raises(SystemExit) as done:
        parser().parse_args(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"tfserver {__version__}"
    text = parser().format_help()
    for s in SETTINGS:
        assert s.env in text, s.env
        if s.flag:
            assert s.flag in text


def test_docs_settings_table_is_the_config_table() -> None:
    from support import ROOT
    from tfserver.settings import markdown_table

    page = (ROOT / "docs" / "configuration.md").read_text()
    start = page.index("<!-- settings -->") + len("<!-- settings -->")
    end = page.index("<!-- /settings -->")
    assert page[start:end].strip() == markdown_table(), \
        "docs/configuration.md's table of settings is out of date: make settings-table"


def test_passed_env_has_no_server_settings() -> None:
    assert not [k for k in PASSED_ENV if k.startswith(("TFSERVER_", "COGNITO", "JWK"))]


def ticket(key: str, sync: bool, started: list[str], tag: str) -> Ticket:
    return Ticket(key, f"instance {key}", sync=sync, on_start=lambda: started.append(tag))


def test_a_synchronous_run_waits_for_its_lane_then_conflicts() -> None:
    sched = Scheduler(slots=4, queue_depth=8)
    started: list[str] = []
    holder = ticket("k", True, started, "holder")
    sched.enqueue(holder)
    assert started == ["holder"] and sched.busy("k")
    with pytest.raises(Conflict):
        sched.enqueue(ticket("k", True, started, "now"))  # no patience: 409 at once
    t0 = time.monotonic()
    with pytest.raises(Conflict) as waited:
        sched.enqueue(ticket("k", True, started, "patient"), wait=0.3)
    assert time.monotonic() - t0 >= 0.25 and waited.value.headers["Retry-After"] == "1"
    sched.enqueue(ticket("other", True, started, "other"))  # other lanes are free
    threading.Timer(0.2, sched.finish, args=(holder,)).start()
    sched.enqueue(ticket("k", True, started, "next"), wait=5)  # waits for the holder
    assert started == ["holder", "other", "next"]


def test_slots_refuse_synchronous_runs_and_queue_async_ones_in_order() -> None:
    sched = Scheduler(slots=1, queue_depth=2)
    started: list[str] = []
    first = ticket("a", True, started, "first")
    sched.enqueue(first)
    with pytest.raises(Unavailable):
        sched.enqueue(ticket("b", True, started, "sync-b"))  # never waits for a slot
    queued = [ticket("c", False, started, f"c{i}") for i in range(2)]
    other = ticket("d", False, started, "d0")
    for t in (*queued, other):
        sched.enqueue(t)
    assert sched.position(queued[0]) == 1 and sched.position(queued[1]) == 2
    with pytest.raises(Conflict, match="queue"):
        sched.enqueue(ticket("c", False, started, "c-full"))
    assert sched.counts() == (1, 3) and started == ["first"]
    sched.finish(first)
    assert started == ["first", "c0"]  # the oldest waiting run takes the free slot
    sched.finish(queued[0])
    assert started == ["first", "c0", "c1"]  # then the next oldest, whatever its lane
    assert sched.withdraw(other) and not sched.withdraw(other)
    sched.finish(queued[1])
    assert started == ["first", "c0", "c1"] and sched.counts() == (0, 0)
    assert sched._lanes == {}


def test_hold_takes_an_idle_lane_only() -> None:
    sched = Scheduler(slots=1, queue_depth=1)
    started: list[str] = []
    with sched.hold("k", "instance k"):
        assert sched.busy("k")
        with pytest.raises(Conflict):
            sched.enqueue(ticket("k", True, started, "x"))
    busy = ticket("k", True, started, "y")
    sched.enqueue(busy)
    with pytest.raises(Conflict), sched.hold("k", "instance k"):
        pass
    assert [t.on_start for t in sched.close()] == []


def test_var_files_go_to_a_private_tmpfs_folder(tmp_path: Path) -> None:
    from tfserver.terraform.workdir import _var_dir

    chosen, owned = _var_dir(None, tmp_path / "tmp")
    try:
        if Path("/dev/shm").is_dir():
            assert owned and chosen.parent == Path("/dev/shm")
            assert chosen.stat().st_mode & 0o777 == 0o700
    finally:
        if owned:
            chosen.rmdir()
    assert _var_dir(tmp_path / "v", tmp_path / "tmp") == (tmp_path / "v", False)


def test_var_dirs_of_dead_servers_are_removed(tmp_path: Path) -> None:
    import os
    import subprocess

    from tfserver.terraform.workdir import remove_orphan_var_dirs

    finished = subprocess.Popen(["true"])
    finished.wait()
    gone_pid = finished.pid  # a process that has ended (and was reaped)
    orphan = tmp_path / f"tfserver-vars-{gone_pid}-abc"
    orphan.mkdir()
    (orphan / "x.tfvars.json").write_text('{"password": "left-behind"}')
    alive = tmp_path / f"tfserver-vars-{os.getpid()}-def"
    alive.mkdir()
    other = tmp_path / "tfserver-vars-notapid-x"
    other.mkdir()
    remove_orphan_var_dirs(tmp_path)
    assert not orphan.exists() and alive.exists() and other.exists()


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("203.0.113.9", ["198.51.100.7"], "203.0.113.9"),  # not a proxy: header ignored
        ("10.0.0.2", ["198.51.100.7"], "198.51.100.7"),
        ("10.0.0.2", ["198.51.100.7, 10.0.0.3"], "198.51.100.7"),  # trusted hops skipped
        ("10.0.0.2", ["1.2.3.4", "198.51.100.7"], "198.51.100.7"),  # the last untrusted
        ("10.0.0.2", ["not-an-address"], "10.0.0.2"),  # unreadable: not believed
        ("10.0.0.2", [], "10.0.0.2"),
        ("10.0.0.2", ["10.0.0.4"], "10.0.0.2"),
        ("10.0.0.2", ["2001:db8::1"], "2001:db8::1"),
    ],
)
def test_client_address_behind_trusted_proxies(peer: str, forwarded: list[str],
                                               expected: str) -> None:
    from tfserver.web.connections import client_address

    assert client_address(peer, forwarded, lambda a: a.startswith("10.")) == expected


def test_local_objects_share_files_for_empty_objects_and_copies(tmp_path: Path) -> None:
    """Index entries are hard links to one empty file and an active marker a second name
    of its run's record (a link, not a new file: on ext4 a new file costs ~15 times a
    name); nothing written later through one name changes another."""
    import os

    from tfserver.storage.local import LocalObjects

    objects = LocalObjects(tmp_path / "o")
    objects.put("idx/a", b"")
    objects.put("idx/b", b"")
    a, b = (os.stat(tmp_path / "o" / "idx" / n) for n in "ab")
    assert (a.st_ino, a.st_size, a.st_mode & 0o777) == (b.st_ino, 0, 0o600)
    objects.put("idx/a", b"now data")  # replaced by a rename: b stays empty
    assert objects.get("idx/a") == b"now data" and objects.get("idx/b") == b""
    objects.put("idx/a", b"")  # and empty again
    assert objects.get("idx/a") == b"" and objects.keys("idx/") == ["a", "b"]
    objects.put("rec/r.json", b'{"replica": "one"}')
    objects.put_copy("act/r", b'{"replica": "one"}', "rec/r.json")
    rec, act = (os.stat(tmp_path / "o" / p) for p in ("rec/r.json", "act/r"))
    assert rec.st_ino == act.st_ino
    objects.put("rec/r.json", b'{"replica": "one", "status": "succeeded"}')
    assert objects.get("act/r") == b'{"replica": "one"}'  # the record moved on, not it
    # A source gone, or holding other bytes, or a name taken: the bytes are written.
    objects.put_copy("act/s", b"xyz", "rec/missing.json")
    objects.put_copy("act/t", b"xyz", "rec/r.json")
    objects.put_copy("act/r", b"new", "rec/missing.json")
    assert [objects.get(k) for k in ("act/s", "act/t", "act/r")] == [b"xyz", b"xyz", b"new"]
    assert objects.get("idx/b") == b"" and (tmp_path / "o" / ".empty").stat().st_size == 0


def test_the_sweep_of_runs_left_awaiting_says_whether_any_was_found(tmp_path: Path) -> None:
    """A server whose policy requires no approval sweeps other replicas' leftovers until
    a sweep finds none (each sweep is a LIST on a shared bucket)."""
    from types import SimpleNamespace

    from tfserver.app.approvals import _sweep
    from tfserver.runs.store import RunStore
    from tfserver.storage.local import LocalObjects

    objects = LocalObjects(tmp_path / "o")
    store = RunStore(objects)
    expired: list[str] = []
    stub = SimpleNamespace(objects=objects, store=store, clock=lambda: 0.0,
                           runs=SimpleNamespace(local=lambda run_id: None),
                           expire=expired.append)
    assert _sweep(stub) is False  # type: ignore[arg-type]
    objects.put("_runs/awaiting/" + "ab" * 16 + ".json", b"{}")
    assert _sweep(stub) is True and expired == []  # type: ignore[arg-type]
