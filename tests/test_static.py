"""Static checks of Terraform code that cannot run here, and of the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from support import ROOT, require_tool
from tfserver.module.discover import discover, load_module


def test_every_terraform_folder_is_fmt_clean() -> None:
    terraform = require_tool("terraform")
    for folder in ("modules", "tests/modules", "deploy"):
        if not (ROOT / folder).exists():
            continue
        done = subprocess.run([terraform, "fmt", "-check", "-recursive", "-diff", folder],
                              cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin:/usr/local/bin",
                                   "CHECKPOINT_DISABLE": "1",
                                   "TF_CLI_CONFIG_FILE": "/dev/null"})
        assert done.returncode == 0, done.stdout + done.stderr


DROPLET_VERSIONS = ("1.0.0", "1.1.0")


@pytest.mark.parametrize("version", DROPLET_VERSIONS)
def test_droplet_keeps_the_originals_contract(version: str) -> None:
    m = load_module(ROOT / "modules" / "droplet" / version, "droplet")
    v = m.variables
    for name in ("image", "region", "size"):
        assert v[name].required and v[name].type.kind == "string", name
    # name became optional (issue 13): the droplet is named after its instance by default
    assert not v["name"].required and v["name"].default is None
    assert v["name"].type.kind == "string"
    # the server fills these; clients never see them
    assert m.reserved == {"tfserver_tenant", "tfserver_instance", "tfserver_module"}
    assert not m.reserved & set(m.schema["properties"])
    for name in ("monitoring", "ipv6"):
        assert not v[name].required and v[name].default is False
        assert v[name].type.kind == "bool"
    assert set(m.outputs) >= {"droplet_id", "droplet_ip_address", "droplet_status",
                              "droplet_created_at", "droplet_ipv6_address"}
    assert all(var.description for var in v.values())
    assert all(out.description for out in m.outputs.values())
    # the original's request body is valid input
    m.validate({"name": "web-1", "image": "ubuntu-24-04-x64", "region": "nyc3",
                "size": "s-1vcpu-1gb"})
    text = (ROOT / "modules" / "droplet" / version / "versions.tf").read_text()
    assert 'source  = "digitalocean/digitalocean"' in text and 'version = "~>' in text
    assert "backend" not in "".join(p.read_text() for p in (ROOT / "modules").rglob("*.tf"))


def test_droplet_second_version_adds_backups() -> None:
    """modules/droplet is versioned (DESIGN: Module versions): 1.1.0 adds `backups`."""
    droplet = discover(ROOT / "modules")["droplet"]
    assert list(droplet.versions) == list(DROPLET_VERSIONS) and droplet.version == "1.1.0"
    assert "backups" not in droplet.versions["1.0.0"].variables
    backups = droplet.variables["backups"]
    assert not backups.required and backups.default is False and backups.type.kind == "bool"


@pytest.mark.parametrize("version", DROPLET_VERSIONS)
def test_droplet_validation_blocks_reject_bad_slugs(tmp: Path, version: str) -> None:
    # The validation conditions are plain regexes; check them with terraform console-free
    # logic: the same patterns in Python must agree with the examples the docs give.
    import re

    text = (ROOT / "modules" / "droplet" / version / "variables.tf").read_text()
    patterns = dict(re.findall(r'regex\("(.+?)", var\.(\w+)\)', text))
    patterns = {v: p.replace("\\\\", "\\") for p, v in patterns.items()}
    good = {"name": "web-1.example", "image": "ubuntu-24-04-x64", "region": "nyc3",
            "size": "s-1vcpu-1gb"}
    bad = {"name": "-web", "image": "Ubuntu 24", "region": "newyork", "size": "S_1"}
    for var, pattern in patterns.items():
        assert re.fullmatch(pattern, good[var]), var
        assert not re.fullmatch(pattern, bad[var]), var


def test_help_and_config_errors() -> None:
    done = subprocess.run([sys.executable, "-m", "tfserver", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for flag in ("--host", "--port", "--modules-dir", "--state-dir", "--auth", "--backend"):
        assert flag in done.stdout
    done = subprocess.run([sys.executable, "-m", "tfserver", "--host", "0.0.0.0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 2
    assert "refusing to serve without authentication" in done.stderr
    assert "Traceback" not in done.stderr
