"""A server imports only what its settings use: the S3 client with the S3 backend, the
JWT stack with auth on, the ACME client with ACME (issue 19, "Lighter at rest")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from support import ROOT

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
