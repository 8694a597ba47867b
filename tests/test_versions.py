"""Module versions (DESIGN: Module versions and upgrades): version folders discovered and
served side by side, `?version=` on applies and dry runs, an instance keeping its version,
the variables that differ between two versions, and instances older than versions."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from support import ROOT, ServerProcess, start_server
from tfserver.errors import ConfigError
from tfserver.module.discover import discover
from tfserver.module.policyfile import load_policy
from tfserver.module.versions import difference, is_version, newest

MODULES = ROOT / "tests" / "modules_versions"
APP = MODULES / "app"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, terraform_bin: str
        ) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("versions"), modules_dir=MODULES)
    yield server
    server.stop()


def put(srv: ServerProcess, instance: str, body: Any, query: str = "") -> Any:
    return srv.request("PUT", f"/app/{instance}{query}", body)


# -- discovery (no server) ----------------------------------------------------------------


def test_versions_sort_by_semver_not_text() -> None:
    assert newest(["1.9.0", "1.10.0", "1.2.3"]) == "1.10.0"
    assert newest(["2.0.0-rc.1", "1.9.9"]) == "2.0.0-rc.1"
    assert newest(["2.0.0-rc.1", "2.0.0"]) == "2.0.0"
    for bad in ("1.0", "v1.0.0", "01.0.0", "1.0.0/..", "../1.0.0", "", "\uff11.0.0", "1.0.0\n",
                "1." * 40 + "0"):
        assert not is_version(bad), bad


def test_discovered_versions_oldest_first_default_newest() -> None:
    app = discover(MODULES)["app"]
    assert list(app.versions) == ["1.0.0", "1.1.0", "2.0.0"]
    assert app.version == app.latest == "2.0.0"
    assert "owner" in app.schema["properties"]
    assert "legacy" in app.versions["1.0.0"].schema["properties"]
    assert {m.copy_key for m in app.versions.values()} == {"app@1.0.0", "app@1.1.0",
                                                           "app@2.0.0"}
    assert discover(MODULES)["plain"].versions == {}


def test_a_folder_with_files_and_versions_is_a_start_error(tmp: Path) -> None:
    shutil.copytree(APP, tmp / "app")
    shutil.copy(APP / "1.0.0" / "main.tf", tmp / "app" / "main.tf")
    with pytest.raises(ConfigError, match=r"both \*\.tf files and version folders"):
        discover(tmp)


def test_a_badly_named_version_folder_is_a_start_error(tmp: Path) -> None:
    shutil.copytree(APP, tmp / "app")
    (tmp / "app" / "1.1.0").rename(tmp / "app" / "v1.1")
    with pytest.raises(ConfigError, match=r"semantic version such as 1\.4\.0, not 'v1\.1'"):
        discover(tmp)


def test_policy_default_version_must_be_a_version_the_module_has(tmp: Path) -> None:
    modules = discover(MODULES)
    policy = tmp / "policy.toml"
    policy.write_text('[modules.app]\ndefault_version = "1.1.0"\n')
    narrowed = load_policy(policy, modules).narrowed(modules)
    assert narrowed["app"].version == "1.1.0"
    assert list(narrowed["app"].versions) == ["1.0.0", "1.1.0", "2.0.0"]
    for text, words in (('default_version = "3.0.0"', "has no version 3.0.0"),
                        ('default_version = "latest"', "must be a semantic version"),
                        ("default_version = 1", "must be a semantic version")):
        policy.write_text(f"[modules.app]\n{text}\n")
        with pytest.raises(ConfigError, match=words):
            load_policy(policy, modules).narrowed(modules)
    policy.write_text('[modules.plain]\ndefault_version = "1.0.0"\n')
    with pytest.raises(ConfigError, match="has no versions"):
        load_policy(policy, modules).narrowed(modules)


def test_policy_narrows_each_version_that_declares_the_variable(tmp: Path) -> None:
    modules = discover(MODULES)
    policy = tmp / "policy.toml"
    policy.write_text('[modules.app.variables.legacy]\nenum = ["old", "x"]\n')
    app = load_policy(policy, modules).narrowed(modules)["app"]
    assert app.versions["1.0.0"].schema["properties"]["legacy"]["enum"] == ["old", "x"]
    assert "legacy" not in app.schema["properties"]  # 2.0.0 dropped it
    policy.write_text('[modules.app.variables.nowhere]\nenum = ["a"]\n')
    with pytest.raises(ConfigError, match="no variable nowhere"):
        load_policy(policy, modules).narrowed(modules)


def test_reserved_variables_are_neither_dropped_nor_carried(tmp: Path) -> None:
    reserved = 'variable "tfserver_tenant" {\n  type    = string\n  default = ""\n}\n'
    for version, extra in (("1.0.0", reserved), ("1.1.0", "")):
        (tmp / "m" / version).mkdir(parents=True)
        (tmp / "m" / version / "main.tf").write_text(
            'variable "name" {\n  type = string\n}\n' + extra)
    m = discover(tmp)["m"]
    moved = difference(m.versions["1.0.0"], m.versions["1.1.0"],
                       {"name": "a", "tfserver_tenant": "t"})
    assert (moved.dropped, moved.inputs) == ([], {"name": "a"})


# -- the API ------------------------------------------------------------------------------


def test_module_lists_versions_and_the_default_schema(srv: ServerProcess) -> None:
    doc = srv.request("GET", "/app").json
    assert doc["versions"] == ["1.0.0", "1.1.0", "2.0.0"]
    assert doc["version"] == doc["default_version"] == "2.0.0"
    assert doc["variables"]["required"] == ["name", "owner"]
    old = srv.request("GET", "/app?version=1.0.0").json
    assert old["version"] == "1.0.0" and "legacy" in old["variables"]["properties"]
    assert "versions" not in srv.request("GET", "/plain").json
    assert srv.request("GET", "/readyz").json["modules"]["app"] == "ready"


def test_pinned_instance_keeps_its_version(srv: ServerProcess) -> None:
    r = put(srv, "pin", {"name": "pin"}, "?version=1.0.0")
    assert r.status == 201, r.body
    assert r.json["outputs"]["version"] == "1.0.0"
    shown = srv.request("GET", "/app/pin").json
    assert (shown["version"], shown["latest"], shown["upgrade_available"]) == \
        ("1.0.0", "2.0.0", True)
    again = put(srv, "pin", {"name": "pin", "size": "m"})  # no ?version=: it stays
    assert again.status == 200, again.body
    assert again.json["outputs"] == {"id": "pin-m", "version": "1.0.0"}
    run = srv.request("GET", f"/runs/{again.json['run_id']}").json
    assert run["version"] == "1.0.0"
    moved = put(srv, "pin", {}, "?version=1.1.0")  # kept inputs carried over
    assert moved.status == 200, moved.body
    assert moved.json["outputs"] == {"id": "pin-m", "version": "1.1.0"}
    shown = srv.request("GET", "/app/pin").json
    assert shown["version"] == "1.1.0" and shown["upgrade_available"] is True
    # Destroyed with its own version (2.0.0 would want an `owner` it never had).
    gone = srv.request("DELETE", "/app/pin")
    assert gone.status == 200, gone.body
    assert srv.request("GET", f"/runs/{gone.json['run_id']}").json["version"] == "1.1.0"


def test_new_instance_gets_the_default_version(srv: ServerProcess) -> None:
    r = put(srv, "fresh", {"name": "fresh", "owner": "me"})
    assert r.status == 201, r.body
    assert r.json["outputs"]["version"] == "2.0.0"
    shown = srv.request("GET", "/app/fresh").json
    assert shown["version"] == shown["latest"] == "2.0.0"
    assert shown["upgrade_available"] is False
    assert srv.request("DELETE", "/app/fresh").status == 200


def test_dry_run_to_another_version_names_the_differences(srv: ServerProcess) -> None:
    assert put(srv, "diff", {"name": "diff", "legacy": "x"}, "?version=1.0.0").status == 201
    missing = put(srv, "diff", {}, "?version=2.0.0&dry_run=true")
    assert missing.status == 400
    assert {"field": "owner", "message": "is new in version 2.0.0 and required: give it a "
            "value"} in missing.json["errors"]
    plan = put(srv, "diff", {"owner": "me"}, "?version=2.0.0&dry_run=true")
    assert plan.status == 200, plan.body
    doc = plan.json
    assert (doc["version"], doc["from_version"]) == ("2.0.0", "1.0.0")
    assert doc["dropped"] == ["legacy"] and doc["added"] == ["owner"]
    assert doc["retyped"] == ["size"]
    assert {"address": "terraform_data.this", "action": "replace"} in doc["planned"]
    # A kept value the new type refuses: checked before terraform runs.
    assert put(srv, "diff", {"name": "diff", "size": "m"}).status == 200
    retyped = put(srv, "diff", {"owner": "me"}, "?version=2.0.0&dry_run=true")
    assert retyped.status == 400
    assert retyped.json["errors"] == [{"field": "size", "message": "must be a number or "
                                         "null (its type is number in version 2.0.0)"}]
    assert put(srv, "diff", {"owner": "me", "size": 2},
               "?version=2.0.0&dry_run=true").status == 200
    # A dry run changes nothing: the instance is still on 1.0.0.
    assert srv.request("GET", "/app/diff").json["version"] == "1.0.0"
    assert srv.request("DELETE", "/app/diff").status == 200


HOSTILE = ["../", "..%2F..%2Fetc", "1.0.0%2F..", quote("\uff11.\uff10.\uff10"), quote("1.0.0\x00"),
           "9" * 5000, "", "%20", "1.0", "latest", quote("2.0.0 "), "-1.0.0",
           "1.0.0-" + "a" * 40]


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_versions_are_400s(srv: ServerProcess, value: str) -> None:
    for method, path, body in (("PUT", f"/app/h?version={value}", {"name": "h"}),
                               ("PUT", f"/app/h?dry_run=true&version={value}", {}),
                               ("POST", f"/app?version={value}", {"name": "h"}),
                               ("GET", f"/app?version={value}", None)):
        r = srv.request(method, path, body)
        assert r.status == 400, (method, path, r.body[:300])
        assert value[:100] not in r.body.decode() or len(value) < 3
    assert srv.request("GET", "/app/h").status == 404


def test_unknown_and_needless_versions_are_400s_naming_the_versions(
        srv: ServerProcess) -> None:
    r = put(srv, "u", {"name": "u"}, "?version=9.9.9")
    assert r.status == 400
    assert r.json["versions"] == ["1.0.0", "1.1.0", "2.0.0"]
    assert "1.0.0, 1.1.0, 2.0.0" in r.json["detail"]
    r = srv.request("PUT", "/plain/u?version=1.0.0", {})
    assert r.status == 400 and "has no versions" in r.json["detail"]


def test_a_reference_is_checked_against_the_version_being_applied(
        srv: ServerProcess) -> None:
    # `size` is a string in 1.x and a number in 2.0.0: the referenced output (a string)
    # fits the one and not the other, and the check is the version's, before any run.
    assert srv.request("PUT", "/plain/source", {"name": "not-a-number"}).status == 201
    ref = {"$ref": "/plain/source#/outputs/id"}
    r = put(srv, "fed", {"name": "fed", "size": ref}, "?version=1.0.0")
    assert r.status == 201, r.body
    r = put(srv, "fed2", {"name": "fed", "owner": "o", "size": ref}, "?version=2.0.0")
    assert r.status == 400, r.body
    assert [e["field"] for e in r.json["errors"]] == ["size"], r.json
    moved = put(srv, "fed", {"owner": "o"}, "?version=2.0.0&dry_run=true")
    assert moved.status == 400, moved.body  # the kept reference no longer fits
    assert "size" in [e["field"] for e in moved.json["errors"]], moved.json
    listed = srv.request("GET", "/app/fed2/runs")
    assert listed.status == 404 or listed.json["runs"] == []  # refused before any run


def test_instances_older_than_versions_keep_working(tmp: Path, terraform_bin: str) -> None:
    """An instance made while the module was unversioned is on its oldest version once
    the module has versions, and applies and destroys there."""
    before = tmp / "before"
    (before / "app").mkdir(parents=True)
    shutil.copy(APP / "1.0.0" / "main.tf", before / "app" / "main.tf")
    srv = start_server(tmp, modules_dir=before)
    try:
        assert srv.request("PUT", "/app/old", {"name": "old", "legacy": "y"}).status == 201
        shown = srv.request("GET", "/app/old").json
        assert "version" not in shown and "latest" not in shown
    finally:
        srv.stop()
    after = tmp / "after"
    after.mkdir()
    shutil.copytree(APP, after / "app")
    srv = start_server(tmp, modules_dir=after)
    try:
        shown = srv.request("GET", "/app/old").json
        assert (shown["version"], shown["upgrade_available"]) == ("1.0.0", True)
        r = srv.request("PUT", "/app/old", {"name": "old", "size": "l"})
        assert r.status == 200, r.body
        assert r.json["outputs"] == {"id": "old-l", "version": "1.0.0"}
        assert srv.request("DELETE", "/app/old").status == 200
    finally:
        srv.stop()


def test_drift_checks_and_retries_use_the_kept_version(srv: ServerProcess) -> None:
    assert put(srv, "kv", {"name": "kv"}, "?version=1.0.0").status == 201
    # Version 2.0.0 would want an `owner` this instance never had: the check runs 1.0.0.
    check = srv.request("POST", "/app/kv/drift")
    assert check.status == 200, check.body
    assert check.json["drift"]["status"] == "in_sync"
    assert srv.request("GET", f"/runs/{check.json['run_id']}").json["version"] == "1.0.0"
    # An apply that fails on 1.1.0 (its provisioner refuses the name "bad") is retried there.
    failed = put(srv, "kv", {"name": "bad"}, "?version=1.1.0")
    assert failed.status == 502, failed.body
    run = srv.request("GET", "/app/kv/runs").json["runs"][0]
    assert (run["status"], run["version"]) == ("failed", "1.1.0")
    retry = srv.request("POST", f"/runs/{run['id']}/retry")
    assert retry.status == 502, retry.body
    again = srv.request("GET", "/app/kv/runs").json["runs"][0]
    assert (again["retry_of"], again["version"]) == (run["id"], "1.1.0")
    assert srv.request("DELETE", "/app/kv").status == 200


def test_openapi_shows_the_default_schema_and_the_version_values(srv: ServerProcess) -> None:
    doc = srv.request("GET", "/openapi.json").json
    put_op = doc["paths"]["/app/{instance}"]["put"]
    version = next(p for p in put_op["parameters"] if p["name"] == "version")
    assert version["in"] == "query"
    assert version["schema"]["enum"] == ["1.0.0", "1.1.0", "2.0.0"]
    assert version["schema"]["default"] == "2.0.0"
    schemas = doc["components"]["schemas"]
    variables = next(v for k, v in schemas.items() if k.endswith("_variables")
                     and "owner" in v.get("properties", {}))
    assert "legacy" not in variables["properties"]  # the default's (2.0.0) schema
    assert "/app/upgrades" in doc["paths"] and "/plain/upgrades" not in doc["paths"]
    assert not [p for p in doc["paths"]["/plain/{instance}"]["put"]["parameters"]
                if p["name"] == "version"]
    assert srv.request("GET", "/docs/").status == 200


def test_the_policys_default_version_is_what_new_instances_get(tmp: Path,
                                                                terraform_bin: str) -> None:
    (tmp / "policy.toml").write_text('[modules.app]\ndefault_version = "1.1.0"\n')
    srv = start_server(tmp, modules_dir=MODULES,
                       env={"TFSERVER_POLICY": str(tmp / "policy.toml")})
    try:
        doc = srv.request("GET", "/app").json
        assert (doc["version"], doc["default_version"]) == ("1.1.0", "1.1.0")
        assert "tags" in doc["variables"]["properties"]
        r = srv.request("PUT", "/app/p", {"name": "p"})
        assert r.status == 201 and r.json["outputs"]["version"] == "1.1.0"
        shown = srv.request("GET", "/app/p").json
        assert (shown["version"], shown["latest"], shown["upgrade_available"]) == \
            ("1.1.0", "2.0.0", True)
    finally:
        srv.stop()
