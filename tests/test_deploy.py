"""deploy/: the state and auth stacks applied for real (hashicorp/aws from the offline
mirror, against moto's server), a tfserver pointed at what they made; the App Platform
stack, the Dockerfile and its entrypoint checked statically and outside Docker."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import hcl2
import pytest

from support import (
    ROOT,
    Moto,
    aws_provider_mirror,
    bearer,
    launch,
    moto_user_token,
    require_tool,
    start_server,
)
from tfserver.config import PASSED_ENV

TF_TIMEOUT = 300


class Stack:
    """A copy of a deploy/ stack wired to moto, run with the real terraform."""

    def __init__(self, name: str, tmp: Path, moto: Moto) -> None:
        self.dir = tmp / name
        shutil.copytree(ROOT / "deploy" / name, self.dir)
        # Point the provider at moto; max_retries = 1 so a call moto lacks fails fast.
        endpoints = {k: moto.url for k in ("s3", "dynamodb", "sts", "iam", "cognitoidp")}
        (self.dir / "moto_override.tf.json").write_text(json.dumps({"provider": {"aws": {
            "access_key": "test", "secret_key": "test", "s3_use_path_style": True,
            "skip_credentials_validation": True, "skip_metadata_api_check": True,
            "skip_requesting_account_id": True, "max_retries": 1, "endpoints": [endpoints],
        }}}))
        rc = tmp / "aws-mirror.tfrc"
        rc.write_text(
            "provider_installation {\n"
            f'  filesystem_mirror {{\n    path    = "{aws_provider_mirror()}"\n'
            '    include = ["registry.terraform.io/hashicorp/*"]\n  }\n'
            '  direct {\n    exclude = ["registry.terraform.io/hashicorp/*"]\n  }\n}\n')
        self.env = {"PATH": os.environ["PATH"], "HOME": str(tmp), "TF_IN_AUTOMATION": "1",
                    "CHECKPOINT_DISABLE": "1", "TF_CLI_CONFIG_FILE": str(rc),
                    **moto.aws_env()}

    def run(self, *args: str) -> str:
        done = subprocess.run([require_tool("terraform"), *args], cwd=self.dir, env=self.env,
                              capture_output=True, text=True, timeout=TF_TIMEOUT)
        assert done.returncode == 0, f"terraform {args[0]}: {done.stderr[-3000:]}"
        return done.stdout

    def apply(self, **variables: Any) -> dict[str, Any]:
        var_file = self.dir / "test.tfvars.json"
        var_file.write_text(json.dumps(variables))
        self.run("init", "-input=false", "-no-color")
        self.run("apply", "-auto-approve", "-input=false", "-no-color", f"-var-file={var_file}")
        outputs = json.loads(self.run("output", "-json"))
        return {k: v["value"] for k, v in outputs.items()}

    def destroy(self) -> None:
        self.run("destroy", "-auto-approve", "-input=false", "-no-color",
                 f"-var-file={self.dir / 'test.tfvars.json'}")


@pytest.mark.slow
def test_state_stack_then_tfserver_on_it(tmp: Path, moto: Moto) -> None:
    stack = Stack("state", tmp, moto)
    bucket = f"tfserver-state-{uuid.uuid4().hex[:8]}"
    out = stack.apply(region="us-east-1", bucket_name=bucket, lock_table_name="deploy-locks")
    try:
        assert out["bucket"] == bucket and out["lock_table"] == "deploy-locks"
        s3 = moto.client("s3")
        assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
        rules = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]
        assert rules["Rules"][0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == \
            "AES256"
        block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
        assert all(block.values())
        table = moto.client("dynamodb").describe_table(TableName="deploy-locks")["Table"]
        assert table["KeySchema"] == [{"AttributeName": "LockID", "KeyType": "HASH"}]
        policy = json.loads(out["tfserver_policy_json"])
        assert {s["Sid"] for s in policy["Statement"]} == {"ListStatePrefix", "ReadWriteState",
                                                           "Locks"}

        env = {**out["tfserver_env"], "TF_STATE_ENDPOINT": moto.url, **moto.aws_env()}
        srv = start_server(tmp / "srv", env=env)
        try:
            assert srv.request("GET", "/readyz").json["backend"] == "s3: ok"
            r = srv.request("PUT", "/basic/deployed", {"name": "on-the-deployed-bucket"})
            assert r.status == 201, r.body
            keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
            assert "tfserver/basic/local.deployed/terraform.tfstate" in keys
            assert srv.request("DELETE", "/basic/deployed").status == 200
        finally:
            srv.stop()
    finally:
        # The provider empties a bucket with batch DeleteObjects over its versions, which
        # moto 5.2 answers with a 500; empty it one version at a time instead.
        s3 = moto.client("s3")
        listing = s3.list_object_versions(Bucket=bucket)
        for item in listing.get("Versions", []) + listing.get("DeleteMarkers", []):
            s3.delete_object(Bucket=bucket, Key=item["Key"], VersionId=item["VersionId"])
        stack.destroy()
    assert bucket not in [b["Name"] for b in moto.client("s3").list_buckets()["Buckets"]]


@pytest.mark.slow
def test_auth_stack_then_tfserver_accepts_its_pools_tokens(tmp: Path, moto: Moto) -> None:
    stack = Stack("auth", tmp, moto)
    out = stack.apply(region="us-east-1", domain_prefix=f"tfs-{uuid.uuid4().hex[:8]}",
                      modules=["basic", "slow"], pool_name="deploy-test")
    try:
        pool = out["user_pool_id"]
        assert out["issuer"] == f"https://cognito-idp.us-east-1.amazonaws.com/{pool}"
        assert out["jwks_url"] == out["issuer"] + "/.well-known/jwks.json"
        assert out["token_url"].endswith(".auth.us-east-1.amazoncognito.com/oauth2/token")
        assert sorted(out["scopes"]) == ["tfserver/admin", "tfserver/basic.read",
                                         "tfserver/basic.write", "tfserver/slow.read",
                                         "tfserver/slow.write"]
        idp = moto.client("cognito-idp")
        client = idp.describe_user_pool_client(UserPoolId=pool,
                                               ClientId=out["client_id"])["UserPoolClient"]
        assert client["AllowedOAuthFlows"] == ["client_credentials"]
        assert client["ClientSecret"]
        assert sorted(client["AllowedOAuthScopes"]) == ["tfserver/basic.read",
                                                        "tfserver/basic.write",
                                                        "tfserver/slow.read",
                                                        "tfserver/slow.write"]
        # moto cannot issue client-credentials tokens (its /oauth2/token answers 500), so
        # sign in a user through a second client of the same pool to get a token it signs.
        token, user_client = moto_user_token(idp, pool)
        srv = start_server(tmp / "srv", env={
            "COGNITO_ISSUER": out["issuer"],
            # the stack's JWKS URL is AWS's; moto serves the pool's keys under its own URL
            "JWK_URL": f"{moto.url}/{pool}/.well-known/jwks.json",
            "TFSERVER_CLIENT_IDS": f"{out['client_id']},{user_client}",
            "TFSERVER_ADMIN_SCOPES": "aws.cognito.signin.user.admin",
        })
        try:
            r = srv.request("PUT", "/basic/authed", {"name": "x"}, headers=bearer(token))
            assert r.status == 201, r.body
            assert srv.request("PUT", "/basic/authed", {"name": "x"}).status == 401
            assert srv.request("DELETE", "/basic/authed", headers=bearer(token)).status == 200
        finally:
            srv.stop()
    finally:
        # moto 5.2 lacks DeleteResourceServer: destroying it would retry for many minutes.
        # Drop it from the state first; it goes away with the pool.
        stack.run("state", "rm", "aws_cognito_resource_server.this")
        stack.destroy()


# -- static checks of what cannot run here ------------------------------------------------


def hcl(path: Path) -> dict[str, Any]:
    from hcl2 import SerializationOptions

    opts = SerializationOptions(strip_string_quotes=True, explicit_blocks=False,
                                with_comments=False)
    merged: dict[str, Any] = {}
    for tf in sorted(path.glob("*.tf")):
        for key, value in hcl2.loads(tf.read_text(), serialization_options=opts).items():
            merged.setdefault(key, []).extend(value)
    return merged


def variables(path: Path) -> dict[str, dict[str, Any]]:
    return {k: v for block in hcl(path).get("variable", []) for k, v in block.items()}


def outputs(path: Path) -> set[str]:
    return {k for block in hcl(path).get("output", []) for k in block}


def tfserver_env_names() -> set[str]:
    """Every environment variable tfserver reads (taken from its source)."""
    source = (ROOT / "tfserver" / "config.py").read_text()
    return set(re.findall(r'"((?:TFSERVER|TF_STATE|COGNITO|JWK)_[A-Z_]+|JWK_URL)"', source)) \
        | set(PASSED_ENV)


def test_app_stack_wires_tfservers_settings() -> None:
    app = ROOT / "deploy" / "app"
    doc = hcl(app)
    local = {k: v for block in doc["locals"] for k, v in block.items()}
    known = tfserver_env_names()
    assert set(local["plain_env"]) <= known, set(local["plain_env"]) - known
    assert set(local["secret_env"]) <= set(PASSED_ENV)
    assert local["plain_env"]["TFSERVER_AUTH"] == "jwt"
    assert local["plain_env"]["TFSERVER_BACKEND"] == "s3"
    text = (app / "main.tf").read_text()
    assert 'type  = "SECRET"' in text and 'http_path             = "/healthz"' in text
    assert 'type = "PRIMARY"' in text  # the custom domain App Platform certifies
    app_vars = variables(app)
    for name, var in app_vars.items():
        assert var.get("description"), name
    for secret in ("aws_access_key_id", "aws_secret_access_key", "modules_digitalocean_token"):
        assert app_vars[secret]["sensitive"] is True
    assert app_vars["instance_count"]["default"] >= 2
    assert "instance_count >= 2" in str(app_vars["instance_count"]["validation"])
    # what the app needs comes out of the other two stacks
    needs = {"state_bucket": "bucket", "state_region": "region",
             "state_lock_table": "lock_table", "state_key_prefix": "key_prefix"}
    assert set(needs) <= set(app_vars) and set(needs.values()) <= outputs(ROOT / "deploy" /
                                                                          "state")
    assert {"issuer", "jwks_url", "client_id", "client_secret", "token_url"} <= \
        outputs(ROOT / "deploy" / "auth")
    assert {"live_url"} <= outputs(app)


def test_every_stack_pins_providers_and_describes_variables() -> None:
    for stack in ("state", "auth", "app"):
        path = ROOT / "deploy" / stack
        required = hcl(path)["terraform"][0]["required_providers"][0]
        for name, spec in required.items():
            assert spec["version"].startswith("~>"), (stack, name)
        for name, var in variables(path).items():
            assert var.get("description"), (stack, name)
            assert "type" in var, (stack, name)


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or \
        require_tool("hadolint")
    done = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def dockerfile() -> tuple[dict[str, str], list[str], list[str]]:
    """The runtime stage's ENV, CMD and HEALTHCHECK command."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    runtime = text.split("\nFROM ")[-1]
    env: dict[str, str] = {}
    for line in runtime.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", runtime, re.M).group(1))
    health = json.loads(re.search(r"HEALTHCHECK .*?CMD (\[.*\])$", runtime, re.M).group(1))
    return env, cmd, health


def test_dockerfile_pins_and_verifies_terraform() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG TERRAFORM_VERSION=1.11.4" in text
    assert re.search(r"TERRAFORM_SHA256_AMD64=[0-9a-f]{64}", text)
    assert "sha256sum -c -" in text
    assert "providers mirror /opt/tf-mirror" in text
    assert re.search(r"^USER 10001", text, re.M)
    ignored = (ROOT / ".dockerignore").read_text()
    for pattern in ("**/.terraform", "**/*.tfstate", "**/*.tfvars", "**/*.pem", "**/*.key",
                    "**/.env"):
        assert pattern in ignored


def test_container_entrypoint_outside_docker(tmp: Path) -> None:
    env, cmd, health = dockerfile()
    assert cmd == ["tfserver"]
    script = shutil.which("tfserver", path=str(Path(sys.executable).parent))
    assert script, "the console script is installed"
    base = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(tmp),
            **env, "TFSERVER_STATE_DIR": str(tmp / "state"),
            "TFSERVER_MODULES_DIR": str(ROOT / "modules"), "TFSERVER_PROVIDER_MIRROR": "",
            "TFSERVER_PORT": "0"}
    # As the image ships it: listening on 0.0.0.0 without auth is refused.
    done = subprocess.run([script], env=base, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "refusing to serve without authentication" in done.stderr
    # With an issuer configured (as App Platform sets it), the same command serves.
    srv = launch([script], cwd=tmp, env={**base, "COGNITO_ISSUER": "https://issuer.test/p",
                                         "JWK_URL": "http://127.0.0.1:9/jwks"})
    try:
        assert srv.url.startswith("http://0.0.0.0:")
        port = srv.url.rsplit(":", 1)[1]
        # the image's HEALTHCHECK command, run as Docker would
        check = subprocess.run(health, env={**base, "TFSERVER_PORT": port}, timeout=30,
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        down = subprocess.run(health, env={**base, "TFSERVER_PORT": "9"}, timeout=30,
                              capture_output=True, text=True)
        assert down.returncode != 0
    finally:
        assert srv.stop() == 0
