"""A server imports only what its settings use: the S3 client with the S3 backend, the
JWT stack with auth on, the ACME client with ACME (issue 19, "Lighter at rest")."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from support import ROOT
from tfserver.auth import Principal
from tfserver.logs import LineWriter
from tfserver.module.discover import discover
from tfserver.storage.settled import ENTRY_COST, ParsedFiles
from tfserver.web.openapi import ApiDescription, DocSettings

#: Libraries a server with `make run`'s defaults (auth off, local state, no TLS) has no
#: use for.
HEAVY = ("boto3", "botocore", "jwt", "cryptography", "acme", "josepy")

#: Builds every part of a server as `python -m tfserver` does (bound, not serving), then
#: prints the top-level names of the modules imported by then.
BUILD = """
import json, os, sys
import tfserver.__main__ as main
from tfserver.config import load
parts = main.build(load([], os.environ))
parts.server.server_close()
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def imported(tmp: Path, **settings: str) -> set[str]:
    """The top-level modules a server built with these settings has imported."""
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp), "PYTHONPATH": str(ROOT),
           "TFSERVER_PORT": "0", "TFSERVER_STATE_DIR": str(tmp / "state"),
           "TFSERVER_MODULES_DIR": str(ROOT / "modules"), **settings}
    done = subprocess.run([sys.executable, "-c", BUILD], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_the_default_server_imports_no_s3_jwt_or_acme_library(tmp_path: Path,
                                                              terraform_bin: str) -> None:
    names = imported(tmp_path)
    assert "tfserver" in names
    assert sorted(names & set(HEAVY)) == []


def test_the_s3_backend_imports_boto3(tmp_path: Path, terraform_bin: str) -> None:
    # Building the client reaches no endpoint: a closed port will do.
    names = imported(tmp_path, TFSERVER_BACKEND="s3", TF_STATE_BUCKET="bench",
                     TF_STATE_ENDPOINT="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="x",
                     AWS_SECRET_ACCESS_KEY="x", AWS_REGION="us-east-1")
    assert {"boto3", "botocore"} <= names
    assert sorted(names & {"jwt", "acme", "josepy"}) == []


def test_auth_on_imports_the_jwt_stack(tmp_path: Path, terraform_bin: str) -> None:
    names = imported(tmp_path, COGNITO_ISSUER="https://cognito-idp.us-east-1.amazonaws.com/"
                                              "us-east-1_TEST")
    assert "jwt" in names
    assert sorted(names & {"boto3", "botocore", "acme", "josepy"}) == []


# -- reads at rest: parsed state files, log lines written off the request thread ------


def _later() -> int:
    """A clock 10 s ahead: every file written so far has settled."""
    return time.time_ns() + 10_000_000_000


def test_a_settled_file_is_parsed_once_and_a_changed_one_again(tmp_path: Path) -> None:
    path = tmp_path / "terraform.tfstate"
    path.write_text(json.dumps({"serial": 1}))
    files = ParsedFiles(clock=_later)
    first = files.read(str(path))
    assert first == {"serial": 1}
    assert files.read(str(path)) is first  # from memory
    # The same size, the same modification time: its change time tells.
    mtime = path.stat().st_mtime_ns
    time.sleep(0.02)  # past a coarse kernel's timestamp tick: the change time moves
    path.write_text(json.dumps({"serial": 2}))
    os.utime(path, ns=(mtime, mtime))
    assert files.read(str(path)) == {"serial": 2}
    path.unlink()
    assert files.read(str(path)) is None


def test_a_file_changed_just_now_is_not_kept(tmp_path: Path) -> None:
    # Its next change could carry the same change time (a coarse clock), even when its
    # modification time was set back.
    path = tmp_path / "terraform.tfstate"
    path.write_text(json.dumps({"serial": 1}))
    old = time.time() - 10
    os.utime(path, (old, old))
    files = ParsedFiles()
    first = files.read(str(path))
    again = files.read(str(path))
    assert first == again == {"serial": 1}
    assert again is not first


def test_parsed_files_keep_at_most_their_budget(tmp_path: Path) -> None:
    paths = []
    for i in range(3):
        path = tmp_path / f"s{i}.json"
        path.write_text(json.dumps({"serial": i, "pad": "x" * 5}))  # 29 bytes
        paths.append(str(path))
    # Room for two: each entry costs its bytes, its path and ENTRY_COST.
    files = ParsedFiles(budget=2 * (29 + len(paths[0]) + ENTRY_COST), clock=_later)
    docs = [files.read(p) for p in paths]
    assert files.read(paths[2]) is docs[2]  # the newest is kept
    assert files.read(paths[1]) is docs[1]
    assert files.read(paths[0]) is not docs[0]  # the oldest was dropped


def test_log_lines_from_many_threads_are_all_written_in_order() -> None:
    stream = io.StringIO()
    writer = LineWriter(stream)
    writer.setFormatter(logging.Formatter("%(message)s"))  # records name no thread here
    log = logging.getLogger("tfserver.test-lightweight")
    log.propagate = False
    log.addHandler(writer)
    log.setLevel(logging.INFO)

    def lines(n: int) -> None:
        for i in range(500):
            log.info("t%d %d", n, i)

    threads = [threading.Thread(target=lines, args=(n,), name=f"t{n}") for n in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        writer.flush()
        written = stream.getvalue().splitlines()
        assert len(written) == 8 * 500
        for n in range(8):
            assert [int(w.split()[1]) for w in written if w.startswith(f"t{n} ")] == \
                list(range(500))
    finally:
        log.removeHandler(writer)
        writer.close()
    assert not writer._writer.is_alive()


def test_the_api_document_is_made_once_per_set_of_readable_modules() -> None:
    modules = discover(ROOT / "modules")
    api = ApiDescription(DocSettings(auth=True, token_url="https://auth.example/token"))
    reader = Principal("c", "c", scopes=frozenset({"tfserver/demo.read"}))
    first = api.document(modules, reader)
    assert api.builds == 1
    # Another caller who may read the same modules shares it: nothing is rebuilt.
    other = Principal("d", "d", scopes=frozenset({"tfserver/demo.write"}))
    assert api.document(modules, reader) is first
    assert api.document(modules, other) is first
    assert api.builds == 1
    admin = api.document(modules, Principal("a", "a", admin=True))
    assert "/droplet" in admin["paths"] and "/droplet" not in first["paths"]
    assert api.document(modules, None) is not first
    assert api.builds == 3
    # A module replaced (a policy narrows by replacing it): its documents are made again.
    narrowed = {**modules, "demo": dataclasses.replace(modules["demo"])}
    assert api.document(narrowed, reader) is not first
    assert api.builds == 4
