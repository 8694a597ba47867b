"""deploy/: docs/deploy.md's runbook run for real where it can be, checked statically where not.

The slow test follows "Deploying from zero" against a moto server of its own that enforces
IAM policies: the state and auth stacks applied with the real terraform and hashicorp/aws
from the offline mirror, their state moved into the bucket, the env file sourced into a
tfserver that applies and destroys as the runtime IAM user, a tenant added, the app's
environment computed from the stacks' outputs, and both stacks destroyed. The runtime user's
policy is checked call by call with a small IAM evaluator over the real document (moto
ignores conditions and cannot scope DynamoDB to a table), cross-checked against moto where
moto is faithful. The sqs engine's queue is made by the state stack, its calls made as the
runtime user (from the environment deploy/app gives a worker) under moto's enforcement,
and the runbook's queue steps run with the AWS CLI pointed at moto. The App Platform
stack, the Dockerfile, the policy file and the runbook's other commands are checked
statically."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import hcl2
import pytest

from support import (
    ROOT,
    Moto,
    ServerProcess,
    aws_provider_mirror,
    bearer,
    launch,
    require_tool,
    start_moto,
)
from tfserver.config import PASSED_ENV
from tfserver.module.discover import discover, load_module
from tfserver.runs.sqs import QueueDepth, SqsQueue, message_group

TF_TIMEOUT = 300
DEPLOY = (ROOT / "docs" / "deploy.md").read_text()
AWS_STACKS = ("state", "auth")
STACKS = ("state", "auth", "app")
#: The sqs engine's settings (DESIGN, "Run engines"), which deploy/app sets on the service
#: and the worker component only with engine = "sqs".
SQS_ENGINE_SETTINGS = {"TFSERVER_QUEUE", "TFSERVER_QUEUE_URL", "TFSERVER_ROLE",
                       "TFSERVER_RESUME_LOST"}


# -- reading Terraform and the runbook ------------------------------------------------------


def hcl(path: Path) -> dict[str, Any]:
    """Every block of the *.tf files of a folder, merged by block type."""
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


def runbook_section() -> str:
    """docs/deploy.md from "## Deploying from zero" to the next `## ` heading, or its end."""
    start = DEPLOY.index("## Deploying from zero")
    end = DEPLOY.find("\n## ", start + 1)
    return DEPLOY[start:end if end >= 0 else len(DEPLOY)]


def runbook() -> dict[str, list[str]]:
    """docs/deploy.md's runbook: each `### N. title` step (N as a string) to its sh blocks,
    and the unnumbered subsections by title."""
    steps: dict[str, list[str]] = {}
    for head, body in re.findall(r"^### (.+?)\n(.*?)(?=^### |\Z)", runbook_section(),
                                 re.S | re.M):
        number = re.match(r"(\d+)\. ", head)
        steps[number.group(1) if number else head] = re.findall(r"```sh\n(.*?)```", body,
                                                                re.S)
    return steps


def shell_commands(block: str) -> list[list[str]]:
    """A block's simple commands as argument lists (continuations joined, comments gone,
    `$(...)` and variables left as written)."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split("  #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"\s*(?:&&|\|\||;|\|)\s*", line):
            with contextlib.suppress(ValueError):
                if words := shlex.split(part):
                    commands.append(words)
    return commands


# -- the runtime user's policy, evaluated ---------------------------------------------------


def _glob(pattern: str, value: str, *, fold: bool) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.I if fold else 0) is not None


def _listed(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


_OPERATORS = {
    "StringEquals": lambda actual, wanted: actual == wanted,
    "StringLike": lambda actual, wanted: _glob(wanted, actual, fold=False),
}


def _conditions_hold(conditions: dict[str, dict[str, Any]], context: dict[str, str]) -> bool:
    for operator, tests in conditions.items():
        base = operator.removesuffix("IfExists")
        for key, wanted in tests.items():
            if base == "Null":
                holds = any((key not in context) == (w == "true") for w in _listed(wanted))
            elif base in _OPERATORS:
                holds = (operator != base) if key not in context else any(
                    _OPERATORS[base](context[key], w) for w in _listed(wanted))
            else:
                raise ValueError(f"the evaluator does not know {operator}")
            if not holds:
                return False
    return True


def iam_allows(policy: dict[str, Any], action: str, resource: str,
               context: dict[str, str] | None = None) -> bool:
    """Whether an identity policy allows one request, by IAM's rules for one policy: an
    explicit Deny wins, else any matching Allow, else the implicit deny. Anything it does
    not understand (NotAction, Principal, another condition operator) is an error, never
    silently ignored."""
    allowed = False
    statements = policy["Statement"]
    for st in [statements] if isinstance(statements, dict) else statements:
        unknown = set(st) - {"Sid", "Effect", "Action", "Resource", "Condition"}
        if unknown:
            raise ValueError(f"the evaluator does not know {sorted(unknown)}")
        if not any(_glob(a, action, fold=True) for a in _listed(st["Action"])):
            continue
        if not any(_glob(r, resource, fold=False) for r in _listed(st["Resource"])):
            continue
        if not _conditions_hold(st.get("Condition", {}), context or {}):
            continue
        if st["Effect"] == "Deny":
            return False
        allowed = True
    return allowed


def test_the_policy_evaluator_follows_iams_rules() -> None:
    policy = {"Statement": [
        {"Effect": "Allow", "Action": ["s3:Get*", "s3:ListBucket"],
         "Resource": ["arn:aws:s3:::b/p/*", "arn:aws:s3:::b"]},
        {"Effect": "Deny", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::b/p/secret?"},
        {"Effect": "Allow", "Action": "dynamodb:GetItem", "Resource": "arn:t",
         "Condition": {"StringLike": {"k": ["a*"]}}},
        {"Effect": "Allow", "Action": "dynamodb:PutItem", "Resource": "arn:t",
         "Condition": {"StringEqualsIfExists": {"k": "x"}}},
        {"Effect": "Allow", "Action": "dynamodb:Scan", "Resource": "arn:t",
         "Condition": {"Null": {"k": "true"}}},
    ]}
    table = [
        ("s3:GetObject", "arn:aws:s3:::b/p/x", {}, True),
        ("S3:getobject", "arn:aws:s3:::b/p/x", {}, True),  # actions ignore case
        ("s3:GetObject", "arn:aws:s3:::B/p/x", {}, False),  # resources do not
        ("s3:GetObject", "arn:aws:s3:::b/q/x", {}, False),
        ("s3:GetObject", "arn:aws:s3:::b/p/secret1", {}, False),  # explicit deny wins
        ("s3:GetObject", "arn:aws:s3:::b/p/secret12", {}, True),  # ? is one character
        ("s3:PutObject", "arn:aws:s3:::b/p/x", {}, False),  # implicit deny
        ("dynamodb:GetItem", "arn:t", {"k": "abc"}, True),
        ("dynamodb:GetItem", "arn:t", {"k": "bc"}, False),
        ("dynamodb:GetItem", "arn:t", {}, False),  # a missing key fails the condition
        ("dynamodb:PutItem", "arn:t", {}, True),  # ...unless IfExists
        ("dynamodb:PutItem", "arn:t", {"k": "y"}, False),
        ("dynamodb:Scan", "arn:t", {}, True),
        ("dynamodb:Scan", "arn:t", {"k": ""}, False),
    ]
    for action, resource, context, expected in table:
        assert iam_allows(policy, action, resource, context) is expected, (action, resource)
    for strange in ({"NotAction": "s3:*"}, {"Condition": {"ArnLike": {"k": "x"}}}):
        statement = {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*", **strange}
        with pytest.raises(ValueError):
            iam_allows({"Statement": [statement]}, "s3:GetObject", "x", {})


SQS_CALLS = ("SendMessage", "ReceiveMessage", "ChangeMessageVisibility", "DeleteMessage",
             "GetQueueAttributes")


def policy_table(bucket: str, table_arn: str, queue_arn: str
                 ) -> list[tuple[str, str, dict[str, str], bool]]:
    """(action, resource, request context, allowed) for the runtime user: every call
    tfserver and its terraform make, then what it must not do."""
    b = f"arn:aws:s3:::{bucket}"
    dead_letters = queue_arn.removesuffix(".fifo") + "-dlq.fifo"
    other_queue = queue_arn.rsplit(":", 1)[0] + ":other-runs.fifo"
    other_table = table_arn.rsplit("/", 1)[0] + "/other-table"
    state = f"{b}/tfserver/demo/0a1b.first/terraform.tfstate"
    allowed = [
        ("s3:ListBucket", b, {"s3:prefix": "tfserver/demo/"}),  # terraform's workspaces
        ("s3:ListBucket", b, {"s3:prefix": "tfserver/_runs/"}),  # tfserver's own folders
        ("s3:ListBucket", b, {}),  # HeadBucket (/readyz), and 404s for missing keys
        ("s3:GetObject", f"{b}/terraform.tfstate", {}),  # init's default-workspace probe
        *[(f"s3:{verb}Object", key, {}) for verb in ("Get", "Put", "Delete")
          for key in (state, state + ".tflock", f"{b}/tfserver/_inputs/demo/0a1b.first.json",
                      f"{b}/tfserver/_runs/r1/record.json", f"{b}/tfserver/_plans/r1.tfplan",
                      f"{b}/tfserver/_idempotency/k.json")],
        *[(f"dynamodb:{verb}", table_arn, {})
          for verb in ("DescribeTable", "GetItem", "PutItem", "DeleteItem")],
        *[(f"sqs:{call}", queue_arn, {}) for call in SQS_CALLS],  # the sqs engine
    ]
    denied = [
        ("s3:ListBucket", b, {"s3:prefix": ""}),
        ("s3:ListBucket", b, {"s3:prefix": "deploy/"}),
        ("s3:ListBucket", b, {"s3:prefix": "tfserver"}),  # would list tfserver-other/ too
        ("s3:ListBucket", b, {"s3:prefix": "tfserver-other/"}),
        ("s3:ListBucket", "arn:aws:s3:::other-bucket", {"s3:prefix": "tfserver/"}),
        ("s3:ListBucket", "arn:aws:s3:::other-bucket", {}),
        ("s3:PutObject", f"{b}/terraform.tfstate", {}),
        ("s3:DeleteObject", f"{b}/terraform.tfstate", {}),
        ("s3:GetObject", f"{b}/deploy/state.tfstate", {}),  # the stacks' own states
        ("s3:PutObject", f"{b}/deploy/auth.tfstate", {}),
        ("s3:DeleteObject", f"{b}/deploy/app.tfstate", {}),
        ("s3:GetObject", f"{b}/tfserver-other/x", {}),
        ("s3:GetObject", f"{b}/tfserverx/terraform.tfstate", {}),
        ("s3:GetObject", "arn:aws:s3:::other-bucket/tfserver/x", {}),
        ("s3:PutObject", "arn:aws:s3:::other-bucket/tfserver/x", {}),
        ("s3:GetObjectVersion", state, {}),
        ("s3:ListBucketVersions", b, {}),
        ("s3:DeleteBucket", b, {}),
        ("s3:PutBucketPolicy", b, {}),
        ("s3:PutLifecycleConfiguration", b, {}),
        ("s3:ListAllMyBuckets", "*", {}),
        ("dynamodb:GetItem", other_table, {}),
        ("dynamodb:PutItem", other_table, {}),
        ("dynamodb:Scan", table_arn, {}),
        ("dynamodb:Query", table_arn, {}),
        ("dynamodb:UpdateItem", table_arn, {}),
        ("dynamodb:DeleteTable", table_arn, {}),
        ("dynamodb:ListTables", "*", {}),
        ("iam:CreateAccessKey", "arn:aws:iam::123456789012:user/tfserver/tfserver-runtime", {}),
        ("sts:AssumeRole", "*", {}),
        ("cognito-idp:ListUserPoolClients", "*", {}),
        *[(f"sqs:{call}", queue, {}) for call in SQS_CALLS
          for queue in (dead_letters, other_queue)],
        ("sqs:GetQueueUrl", queue_arn, {}),  # the URL is configured, never looked up
        ("sqs:CreateQueue", queue_arn.rsplit(":", 1)[0] + ":new.fifo", {}),
        ("sqs:DeleteQueue", queue_arn, {}),
        ("sqs:PurgeQueue", queue_arn, {}),
        ("sqs:SetQueueAttributes", queue_arn, {}),
        ("sqs:StartMessageMoveTask", dead_letters, {}),
        ("sqs:ListQueues", "*", {}),
    ]
    return [(*row, True) for row in allowed] + [(*row, False) for row in denied]


# -- a moto that enforces IAM, and the runbook run against it -------------------------------


def moto_auth(moto: Moto, enforce: bool) -> None:
    """Switch moto's IAM enforcement on (every request checked) or off."""
    req = urllib.request.Request(f"{moto.url}/moto-api/reset-auth", method="POST",
                                 data=b"0" if enforce else b"inf",
                                 headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


@pytest.fixture(scope="module")
def iam_moto() -> Iterator[Moto]:
    """A moto server of this module's own (the session's serves tests that sign with any
    key), whose IAM enforcement the runbook test switches on."""
    server = start_moto()
    yield server
    server.proc.terminate()
    server.proc.wait(timeout=10)


def aws(moto: Moto, service: str, key: tuple[str, str], region: str = "eu-west-1") -> Any:
    import boto3

    return boto3.client(service, endpoint_url=moto.url, region_name=region,
                        aws_access_key_id=key[0], aws_secret_access_key=key[1])


def denied(call: Any) -> bool:
    """True when moto refuses a call for lack of permission; False when it is let through
    (an answer, or an error about the thing itself, such as a missing key)."""
    from botocore.exceptions import ClientError

    try:
        call()
    except ClientError as e:
        code = e.response["Error"]["Code"]
        if code in ("AccessDenied", "403", "InvalidAccessKeyId"):
            return True
        assert code in ("NoSuchKey", "404"), code
    return False


class GroupProcess(ServerProcess):
    """A shell pipeline that ends in a tfserver, stopped as a whole process group."""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            raise


def launch_group(script: str, *, cwd: Path, env: dict[str, str]) -> GroupProcess:
    """Run a shell script whose last command serves tfserver; wait (bounded) for its URL."""
    proc = subprocess.Popen(["bash", "-c", script], cwd=cwd, env=env, start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    server = GroupProcess(proc)
    found = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            server.lines.append(line.rstrip("\n"))
            if not found.is_set() and '"url": "' in line:
                server.url = json.loads(line)["url"]
                found.set()
        found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(60) or not server.url:
        server.stop(signal.SIGKILL, timeout=10)
        raise AssertionError("tfserver did not start:\n" + server.log_text())
    return server


def wait_serving(srv: ServerProcess, token: str, module: str = "demo",
                 timeout: float = 60) -> None:
    """Until the module answers (its working copy initialised on the state store)."""
    deadline = time.monotonic() + timeout
    while True:
        r = srv.request("GET", f"/{module}", headers=bearer(token))
        if r.status == 200:
            return
        assert time.monotonic() < deadline, (r.status, r.body, srv.log_text()[-3000:])
        time.sleep(0.2)


class Runbook:
    """A scratch copy of the repository's deploy/ where docs/deploy.md's runbook runs as
    written: the AWS stacks pointed at moto, deploy/app reduced to what needs no DigitalOcean
    provider, and `docker`, `doctl` and `tfserver` replaced by stand-ins on PATH."""

    def __init__(self, tmp: Path, moto: Moto, operator: tuple[str, str]) -> None:
        self.tmp, self.moto = tmp, moto
        self.work = tmp / "work"
        deploy = self.work / "deploy"
        shutil.copytree(ROOT / "deploy", deploy,
                        ignore=shutil.ignore_patterns(".terraform", "*.tfstate*", "*.tfvars*",
                                                      "backend.tf", "tfserver.env"))
        (self.work / "modules").symlink_to(ROOT / "modules")  # what deploy/auth discovers
        for stack in AWS_STACKS:
            endpoints = {k: moto.url for k in ("s3", "dynamodb", "sts", "iam", "cognitoidp",
                                               "sqs")}
            # Three attempts: once, a response moto had sent (200) could not be read (the
            # provider's "use of closed network connection") and a single attempt failed
            # the whole runbook. More would wait long on what moto does not implement.
            (deploy / stack / "moto_override.tf.json").write_text(json.dumps({"provider": {
                "aws": {"s3_use_path_style": True, "skip_credentials_validation": True,
                        "skip_metadata_api_check": True, "skip_requesting_account_id": True,
                        "max_retries": 3, "endpoints": [endpoints]}}}))
        # moto keeps no RedriveAllowPolicy (the provider would wait for it for ever): the
        # dead-letter queue's allow policy is left out here and checked statically
        # (test_state_stack_limits_who_moves_messages_to_the_dead_letter_queue).
        (deploy / "state" / "moto_gaps_override.tf.json").write_text(json.dumps({"resource": {
            "aws_sqs_queue_redrive_allow_policy": {"dead_letters": {"count": 0}}}}))
        # deploy/app without its App Platform resource: the same variables and env.tf, and
        # stand-ins for its outputs plus the environment App Platform would get.
        app = deploy / "app"
        shutil.rmtree(app)
        app.mkdir()
        for name in ("variables.tf", "env.tf"):
            shutil.copy(ROOT / "deploy" / "app" / name, app / name)
        (app / "standin.tf").write_text(
            'output "app_id" { value = "app-under-test" }\n'
            'output "live_url" { value = "https://${var.domain}" }\n'
            'output "default_ingress" { value = "https://tfserver-x.ondigitalocean.app" }\n'
            'output "image_tag" { value = var.image_tag }\n'
            'output "plain_env" { value = local.plain_env }\n'
            'output "service_engine_env" { value = local.service_engine_env }\n'
            'output "worker_engine_env" { value = local.worker_engine_env }\n'
            'output "secret_env" {\n  value     = local.secret_env\n  sensitive = true\n}\n')
        # the modules the stand-in tfserver serves: demo, and droplet's variables on
        # terraform_data (the DigitalOcean provider cannot run here)
        self.served = tmp / "served"
        shutil.copytree(ROOT / "modules" / "demo", self.served / "demo")
        (self.served / "droplet").mkdir()
        shutil.copy(ROOT / "modules" / "droplet" / "1.1.0" / "variables.tf",
                    self.served / "droplet" / "variables.tf")
        (self.served / "droplet" / "main.tf").write_text(
            'resource "terraform_data" "this" {\n  input = [var.name, var.size]\n}\n')
        self.bin, self.calls, self.tokens = tmp / "bin", tmp / "calls.jsonl", tmp / "tokens"
        self.bin.mkdir()
        self.tokens.mkdir()
        for tool in ("docker", "doctl"):
            self._script(tool, f"#!{sys.executable}\nimport json, os, sys\n"
                         f"with open({str(self.calls)!r}, 'a') as f:\n"
                         "    f.write(json.dumps([os.path.basename(sys.argv[0]), "
                         "*sys.argv[1:]]) + '\\n')\n")
        # The AWS CLI as the operator runs it, pointed at moto (AWS CLI v1 pins SQS in some
        # regions to a legacy endpoint that AWS_ENDPOINT_URL_SQS does not override).
        self._script("aws", f'#!/bin/sh\nexec {require_tool("aws")} --endpoint-url '
                     f'{moto.url} "$@"\n')
        rc = tmp / "aws-mirror.tfrc"
        rc.write_text(
            "provider_installation {\n"
            f'  filesystem_mirror {{\n    path    = "{aws_provider_mirror()}"\n'
            '    include = ["registry.terraform.io/hashicorp/*"]\n  }\n'
            '  direct {\n    exclude = ["registry.terraform.io/hashicorp/*"]\n  }\n}\n')
        endpoints = f'{{s3="{moto.url}",dynamodb="{moto.url}",sts="{moto.url}"}}'
        backend_test_settings = " ".join(
            f"-backend-config={setting}" for setting in (
                "use_path_style=true", "skip_credentials_validation=true",
                "skip_requesting_account_id=true", "skip_metadata_api_check=true",
                "skip_region_validation=true", f"'endpoints={endpoints}'"))
        # The operator's shell: an AWS identity that may do anything (moto checks its
        # signature and its policy like any other), answers "yes" given by flag, and the
        # test servers' endpoints added to every `init` (TF_CLI_ARGS_init).
        self.env = {
            "PATH": f"{self.bin}:{os.environ['PATH']}", "HOME": str(tmp), "LANG": "C.UTF-8",
            "TF_CLI_CONFIG_FILE": str(rc), "CHECKPOINT_DISABLE": "1", "TF_IN_AUTOMATION": "1",
            "TF_INPUT": "0", "TF_CLI_ARGS_apply": "-auto-approve",
            "TF_CLI_ARGS_destroy": "-auto-approve", "TF_CLI_ARGS_init": backend_test_settings,
            "AWS_ACCESS_KEY_ID": operator[0], "AWS_SECRET_ACCESS_KEY": operator[1],
        }

    def _script(self, name: str, text: str) -> None:
        path = self.bin / name
        path.write_text(text)
        path.chmod(0o755)

    def sh(self, script: str, *, stdin: str = "") -> str:
        """Run shell text in the scratch repository as the operator; it must succeed."""
        started = time.monotonic()
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=self.work,
                              env=self.env, input=stdin, capture_output=True, text=True,
                              timeout=3 * TF_TIMEOUT)
        with open(self.tmp / "runbook.log", "a") as log:  # for whoever debugs a failure
            log.write(f"$ {script}\n{done.stdout}{done.stderr}"
                      f"[exit {done.returncode}, {time.monotonic() - started:.1f} s]\n")
        assert done.returncode == 0, f"{script[-1500:]}\n---\n{done.stderr[-4000:]}"
        return done.stdout

    def terraform(self, stack: str, *args: str) -> str:
        return self.sh(shlex.join(["terraform", f"-chdir=deploy/{stack}", *args]))

    def output(self, stack: str, name: str) -> Any:
        return json.loads(self.terraform(stack, "output", "-json", name))

    def recorded(self) -> list[list[str]]:
        text = self.calls.read_text() if self.calls.exists() else ""
        return [json.loads(line) for line in text.splitlines()]

    def stand_in_tfserver(self, pool: str) -> None:
        """`tfserver token` prints the moto token of $TFSERVER_CLIENT_ID (moto cannot do the
        client-credentials grant); `tfserver ...` serves, with what the test servers need
        added: moto's endpoint and key URL, a free loopback port, the served folder, moto's
        token scope taken as admin, and no DynamoDB lock (moto cannot scope a DynamoDB
        permission to one table, so under its enforcement every table call is refused;
        the Locks statement is checked by the evaluator)."""
        self._script("tfserver", f"""#!/bin/sh
if [ "$1" = token ]; then exec cat "{self.tokens}/$TFSERVER_CLIENT_ID"; fi
unset TF_STATE_LOCK_TABLE TF_CLI_ARGS_init TF_CLI_ARGS_apply TF_CLI_ARGS_destroy
export TF_STATE_ENDPOINT={self.moto.url}
export JWK_URL={self.moto.url}/{pool}/.well-known/jwks.json
export TFSERVER_ADMIN_SCOPES=aws.cognito.signin.user.admin
export TFSERVER_HOST=127.0.0.1 TFSERVER_PORT=0 TFSERVER_MODULES_DIR={self.served}
export TFSERVER_STATE_DIR="$(mktemp -d {self.tmp}/srv.XXXXXX)" PYTHONUNBUFFERED=1
exec {sys.executable} -m tfserver
""")


def moto_tokens(idp: Any, pool: str, clients: list[str], folder: Path) -> dict[str, str]:
    """An access token per client, signed by moto for `pool`, saved under `folder`."""
    idp.admin_create_user(UserPoolId=pool, Username="ops", TemporaryPassword="Temp-Pass-123!")
    idp.admin_set_user_password(UserPoolId=pool, Username="ops", Password="Real-Pass-456!",
                                Permanent=True)
    tokens = {}
    for client in clients:
        tokens[client] = idp.admin_initiate_auth(
            UserPoolId=pool, ClientId=client, AuthFlow="ADMIN_USER_PASSWORD_AUTH",
            AuthParameters={"USERNAME": "ops", "PASSWORD": "Real-Pass-456!"},
        )["AuthenticationResult"]["AccessToken"]
        (folder / client).write_text(tokens[client])
    return tokens


def sourced(env_file: Path) -> dict[str, str]:
    """What a POSIX shell (dash, as /bin/sh) has in its environment after `. file`."""
    done = subprocess.run(["sh", "-c", '. "$1" && exec env -0', "sh", str(env_file)],
                          env={"PATH": os.environ["PATH"]}, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    pairs = (item.split(b"=", 1) for item in done.stdout.split(b"\0") if item)
    return {k.decode(): v.decode() for k, v in pairs}


@pytest.mark.slow
def test_runbook_from_zero_on_moto(tmp: Path, iam_moto: Moto) -> None:
    moto = iam_moto
    root_key = ("test", "test")
    iam = aws(moto, "iam", root_key, "us-east-1")
    iam.create_user(UserName="operator")
    iam.put_user_policy(UserName="operator", PolicyName="admin", PolicyDocument=json.dumps(
        {"Version": "2012-10-17",
         "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    made = iam.create_access_key(UserName="operator")["AccessKey"]
    operator = (made["AccessKeyId"], made["SecretAccessKey"])
    aws(moto, "s3", root_key).create_bucket(
        Bucket="other-bucket", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    moto_auth(moto, enforce=True)  # from here on moto checks every caller's policy
    book = Runbook(tmp, moto, operator)
    steps = runbook()
    s0 = steps["0"][0]
    servers: list[ServerProcess] = []
    try:
        # Steps 1-3: the state store and runtime user, Cognito, the env file.
        book.sh("\n".join([s0, steps["1"][0], steps["2"][0], steps["3"][0]]))
        check_state_stack(book, moto, operator)
        policy = json.loads(book.output("state", "tfserver_policy_json"))
        runtime = (book.terraform("state", "output", "-raw", "access_key_id"),
                   book.terraform("state", "output", "-raw", "secret_access_key"))
        check_policy(book, moto, operator, runtime, policy)
        pool, clients = check_auth_stack(book, moto, operator)
        idp = aws(moto, "cognito-idp", operator)
        stranger = idp.create_user_pool_client(UserPoolId=pool, ClientName="stranger")
        tokens = moto_tokens(idp, pool, [*clients, stranger["UserPoolClient"]["ClientId"]],
                             book.tokens)
        stranger_token = tokens[stranger["UserPoolClient"]["ClientId"]]
        env_file = book.work / "tfserver.env"
        assert runtime[1] not in env_file.read_text()
        env = sourced(env_file)
        assert env["TFSERVER_BACKEND"] == "s3" and env["TF_STATE_BUCKET"] == "acme-tfserver-state"
        assert env["TFSERVER_CLIENT_IDS"] == ",".join(clients)

        # Step 3's pre-flight: the env file sourced into a tfserver running as the runtime
        # user, with moto enforcing that user's policy on every state-store call.
        book.stand_in_tfserver(pool)
        preflight = launch_group("\n".join([s0, steps["3"][1]]), cwd=book.work, env=book.env)
        servers.append(preflight)
        admin_token = tokens[clients[0]]
        wait_serving(preflight, admin_token)
        wait_serving(preflight, admin_token, "droplet")  # the policy file loaded with it
        assert preflight.request("GET", "/demo", headers=bearer(stranger_token)).status in \
            (401, 403)

        # Step 6 against the pre-flight server; steps 4, 5, 7, 8 and 9 as written, with the
        # registry, the image build and App Platform recorded by the stand-ins.
        stdin = "droplet-module-token\napp-manager-token\n"
        book.sh("\n".join([s0, steps["4"][0], steps["5"][0], f"URL={preflight.url}",
                           steps["6"][0], steps["7"][0], steps["8"][0], steps["8"][1],
                           steps["9"][0]]), stdin=stdin)
        keys = list_keys(moto, operator)
        assert not [k for k in keys if k.startswith("tfserver/demo/")], keys  # destroyed
        assert {"deploy/state.tfstate", "deploy/auth.tfstate", "deploy/app.tfstate"} <= set(keys)
        check_recorded_tools(book)
        clients = check_added_tenant(book, clients, env)
        tokens |= moto_tokens_for_new(idp, pool, clients, tokens, book.tokens)
        globex = clients[-1]
        # a running instance keeps the list it started with
        assert preflight.request("GET", "/demo", headers=bearer(tokens[globex])).status in \
            (401, 403)

        # The app's environment, as deploy/app computes it from the stacks' outputs, serves
        # the new tenant.
        assert book.output("app", "image_tag") == "0.1.0"  # rolled back
        plain = book.output("app", "plain_env")
        secret = book.output("app", "secret_env")
        assert secret == {"AWS_ACCESS_KEY_ID": runtime[0], "AWS_SECRET_ACCESS_KEY": runtime[1],
                          "DIGITALOCEAN_TOKEN": "droplet-module-token"}
        assert plain["TFSERVER_CLIENT_IDS"] == ",".join(clients)
        for name, value in env.items():
            if name in plain:
                assert plain[name] == value or name == "TFSERVER_CLIENT_IDS", name
        assert plain["TFSERVER_POLICY"] == "/app/policy.toml"
        app_env = {**plain, **secret, "TFSERVER_POLICY": str(book.work / "deploy/policy.toml"),
                   "PATH": os.environ["PATH"], "HOME": str(tmp)}
        app_server = launch_group("exec tfserver", cwd=book.work, env=app_env | {
            "PATH": f"{book.bin}:{os.environ['PATH']}"})
        servers.append(app_server)
        wait_serving(app_server, tokens[globex])
        r = app_server.request("PUT", "/demo/globex-1", {"name": "globex-1"},
                               headers=bearer(tokens[globex]))
        assert r.status == 201, r.body
        assert app_server.request("DELETE", "/demo/globex-1",
                                  headers=bearer(tokens[globex])).status == 200
        assert app_server.request("GET", "/demo", headers=bearer(stranger_token)).status in \
            (401, 403)

        # Steps 10 and 11: the sqs engine turned on (the shell has step 5's exports), the
        # engine's calls made from the environment deploy/app gives a worker, a run that
        # can never run left in the dead-letter queue, and the queues watched as written.
        assert book.output("app", "service_engine_env") == {}  # local unless asked
        exports = {"TF_VAR_aws_access_key_id": runtime[0],
                   "TF_VAR_aws_secret_access_key": runtime[1],
                   "TF_VAR_modules_digitalocean_token": "droplet-module-token"}
        book.sh("\n".join([s0, *(f"export {k}={shlex.quote(v)}" for k, v in exports.items()),
                           *steps["10"]]))
        assert book.output("app", "image_tag") == "0.1.0"  # still the tag that runs
        assert book.output("app", "plain_env") == plain
        check_sqs_engine(book, moto, operator)
        check_watching(book.sh("\n".join([s0, *steps["11"]])))
    finally:
        for srv in servers:
            srv.stop()
        teardown(book, moto, operator)
    moto_auth(moto, enforce=False)
    assert "acme-tfserver-state" not in [b["Name"] for b in aws(moto, "s3", root_key)
                                         .list_buckets()["Buckets"]]
    assert aws(moto, "iam", root_key, "us-east-1").list_users(PathPrefix="/tfserver/")[
        "Users"] == []
    assert aws(moto, "dynamodb", root_key).list_tables()["TableNames"] == []
    assert aws(moto, "cognito-idp", root_key).list_user_pools(MaxResults=10)["UserPools"] == []
    assert aws(moto, "sqs", root_key).list_queues().get("QueueUrls", []) == []


def check_sqs_engine(book: Runbook, moto: Moto, operator: tuple[str, str]) -> None:
    """What step 10 gave the app: the service an api replica, the worker component a
    worker, both on the state stack's queue; and that a worker's environment (the runtime
    user's key) makes the engine's calls on it, moto enforcing the policy. A message
    received max_receive_count times without being deleted lands in the dead-letter
    queue."""
    queue = book.output("state", "queue_url")
    service = book.output("app", "service_engine_env")
    worker = book.output("app", "worker_engine_env")
    assert service == {"TFSERVER_QUEUE": "sqs", "TFSERVER_QUEUE_URL": queue,
                       "TFSERVER_ROLE": "api", "TFSERVER_RESUME_LOST": "1"}
    assert worker == {**service, "TFSERVER_ROLE": "worker"}
    secret = book.output("app", "secret_env")
    keys = {k: secret[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    with mock.patch.dict(os.environ, keys):
        runs = SqsQueue(worker["TFSERVER_QUEUE_URL"], endpoint=moto.url, region="eu-west-1",
                        wait_seconds=0)
        try:
            runs.send("r-step10", message_group("demo", "first"))
            [message] = runs.receive(1, visibility=30)
            assert (message.run_id, message.receives) == ("r-step10", 1)
            runs.extend(message, 60)
            assert runs.depth() == QueueDepth(waiting=0, in_flight=1)
            runs.release(message)
            [message] = runs.receive(1, visibility=30)
            assert message.receives == 2
            runs.delete(message)
            assert runs.depth() == QueueDepth(waiting=0, in_flight=0)
            runs.send("r-poison", message_group("demo", "poison"))
            for receives in range(1, 6):
                [message] = runs.receive(1, visibility=30)
                assert (message.run_id, message.receives) == ("r-poison", receives)
                runs.release(message)
            assert runs.receive(1, visibility=30) == []
        finally:
            runs.close()
    dead_letters = book.output("state", "dead_letter_queue_url")
    assert aws(moto, "sqs", operator).get_queue_attributes(
        QueueUrl=dead_letters, AttributeNames=["ApproximateNumberOfMessages"])[
        "Attributes"]["ApproximateNumberOfMessages"] == "1"


def check_watching(output: str) -> None:
    """Step 11's commands printed the queue's depth, the age of its oldest message, the
    dead-letter queue's depth and the run id in it."""
    decoder, docs, at = json.JSONDecoder(), [], 0
    while at < len(output):
        if output[at].isspace():
            at += 1
            continue
        doc, at = decoder.raw_decode(output, at)
        docs.append(doc)
    depth, age, dead, letters = docs
    assert depth["Attributes"] == {"ApproximateNumberOfMessages": "0",
                                   "ApproximateNumberOfMessagesNotVisible": "0"}
    assert age["Label"] == "ApproximateAgeOfOldestMessage"
    assert dead["Attributes"] == {"ApproximateNumberOfMessages": "1"}
    assert [m["Body"] for m in letters["Messages"]] == ["r-poison"]


def list_keys(moto: Moto, key: tuple[str, str]) -> list[str]:
    listing = aws(moto, "s3", key).list_objects_v2(Bucket="acme-tfserver-state")
    return [str(o["Key"]) for o in listing.get("Contents", [])]


def check_state_stack(book: Runbook, moto: Moto, operator: tuple[str, str]) -> None:
    """What step 1 made, and that its secrets stay out of plain output and local files."""
    s3 = aws(moto, "s3", operator)
    bucket = "acme-tfserver-state"
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    rules = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]
    assert rules["Rules"][0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    assert all(s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
               .values())
    rule = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"][0]
    assert rule["NoncurrentVersionExpiration"]["NoncurrentDays"] == 90
    table = aws(moto, "dynamodb", operator).describe_table(TableName="tfserver-locks")["Table"]
    assert table["KeySchema"] == [{"AttributeName": "LockID", "KeyType": "HASH"}]
    iam = aws(moto, "iam", operator, "us-east-1")
    user = iam.get_user(UserName="tfserver-runtime")["User"]
    assert user["Path"] == "/tfserver/"
    assert iam.list_attached_user_policies(UserName="tfserver-runtime")["AttachedPolicies"] == []
    assert iam.list_user_policies(UserName="tfserver-runtime")["PolicyNames"] == ["tfserver-state"]
    # the sqs engine's FIFO queue, and the dead-letter queue its redrive policy feeds
    queue, dead_letters = (book.output("state", name)
                           for name in ("queue_url", "dead_letter_queue_url"))
    assert queue.endswith("/tfserver-runs.fifo") and dead_letters.endswith(
        "/tfserver-runs-dlq.fifo")
    sqs = aws(moto, "sqs", operator)
    attrs = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])["Attributes"]
    dlq = sqs.get_queue_attributes(QueueUrl=dead_letters, AttributeNames=["All"])["Attributes"]
    assert attrs["QueueArn"] == book.output("state", "queue_arn")
    assert dlq["QueueArn"] == book.output("state", "dead_letter_queue_arn")
    assert book.output("state", "queue_name") == "tfserver-runs.fifo"
    for queue_attrs in (attrs, dlq):
        assert queue_attrs["FifoQueue"] == "true"
        assert queue_attrs["ContentBasedDeduplication"] == "false"
        assert queue_attrs["SqsManagedSseEnabled"] == "true"
    assert (attrs["VisibilityTimeout"], attrs["MessageRetentionPeriod"]) == ("60", "345600")
    assert attrs["ReceiveMessageWaitTimeSeconds"] == "20"
    assert json.loads(attrs["RedrivePolicy"]) == {"deadLetterTargetArn": dlq["QueueArn"],
                                                  "maxReceiveCount": 5}
    assert int(dlq["MessageRetentionPeriod"]) > int(attrs["MessageRetentionPeriod"])
    assert "RedrivePolicy" not in dlq
    assert book.output("state", "app_inputs")["queue_url"] == queue
    document = iam.get_user_policy(UserName="tfserver-runtime",
                                   PolicyName="tfserver-state")["PolicyDocument"]
    document = json.loads(document) if isinstance(document, str) else document
    assert document == json.loads(book.output("state", "tfserver_policy_json"))
    # the key exists, is sensitive, and only a named output prints it
    secret = book.terraform("state", "output", "-raw", "secret_access_key")
    listing = book.terraform("state", "output")
    assert secret and secret not in listing
    assert re.search(r"^secret_access_key = <sensitive>$", listing, re.M)
    assert re.search(r"^access_key_id = <sensitive>$", listing, re.M)
    # the stack's state moved into the bucket, and no local copy of it is left
    assert not list((book.work / "deploy" / "state").glob("terraform.tfstate*"))
    assert "deploy/state.tfstate" in list_keys(moto, operator)


def check_policy(book: Runbook, moto: Moto, operator: tuple[str, str],
                 runtime: tuple[str, str], policy: dict[str, Any]) -> None:
    """The runtime user's policy, call by call with the evaluator; moto's verdicts where it
    is faithful (object calls: it ignores conditions, checks HeadBucket against an action
    that does not exist, and cannot scope DynamoDB to a table) must agree."""
    bucket = "acme-tfserver-state"
    table_arn = aws(moto, "dynamodb", operator).describe_table(
        TableName="tfserver-locks")["Table"]["TableArn"]
    queue, dead_letters = (book.output("state", name)
                           for name in ("queue_url", "dead_letter_queue_url"))
    queue_arn = book.output("state", "queue_arn")
    rows = policy_table(bucket, table_arn, queue_arn)
    wrong = [(a, r, c) for a, r, c, allowed in rows if iam_allows(policy, a, r, c) != allowed]
    assert not wrong, wrong
    # moto is enforcing: a key no IAM user holds is refused outright
    assert denied(lambda: aws(moto, "s3", ("test", "test")).list_objects_v2(Bucket=bucket))
    s3 = aws(moto, "s3", runtime)
    checked = 0
    for action, resource, _, allowed in rows:
        verb = action.removeprefix("s3:")
        if verb not in ("GetObject", "PutObject", "DeleteObject"):
            continue
        target, _, key = resource.removeprefix("arn:aws:s3:::").partition("/")
        method = {"GetObject": s3.get_object, "PutObject": s3.put_object,
                  "DeleteObject": s3.delete_object}[verb]
        extra = {"Body": b"{}", "IfNoneMatch": "*"} if verb == "PutObject" else {}
        call = functools.partial(method, Bucket=target, Key=key, **extra)
        assert denied(call) is not allowed, (action, resource)
        checked += 1
    assert checked >= 20
    # the stacks' own states are really there, and really out of its reach
    assert denied(lambda: s3.get_object(Bucket=bucket, Key="deploy/state.tfstate"))
    assert denied(lambda: s3.get_object(Bucket=bucket, Key="deploy/auth.tfstate"))
    # moto scopes SQS calls to the queue they name, as AWS does: the engine's calls on the
    # run queue pass, the same calls on the dead-letter queue or another queue do not, nor
    # does managing queues
    sqs = aws(moto, "sqs", runtime)
    other = aws(moto, "sqs", operator).create_queue(
        QueueName="other-runs.fifo", Attributes={"FifoQueue": "true"})["QueueUrl"]
    try:
        for url, allowed in ((queue, True), (dead_letters, False), (other, False)):
            assert sqs_engine_calls_denied(sqs, url) == [not allowed] * 5, url
        for manage in (lambda: sqs.create_queue(QueueName="new.fifo",
                                                Attributes={"FifoQueue": "true"}),
                       lambda: sqs.delete_queue(QueueUrl=queue),
                       lambda: sqs.purge_queue(QueueUrl=queue),
                       lambda: sqs.set_queue_attributes(
                           QueueUrl=queue, Attributes={"VisibilityTimeout": "0"}),
                       lambda: sqs.get_queue_url(QueueName="tfserver-runs.fifo"),
                       lambda: sqs.list_queues()):
            assert denied(manage)
    finally:
        aws(moto, "sqs", operator).delete_queue(QueueUrl=other)


def sqs_engine_calls_denied(sqs: Any, url: str) -> list[bool]:
    """Whether moto refused each of the sqs engine's calls on one queue: send, depth,
    receive, extend, delete (a refused receive leaves no handle; a made-up one is used)."""
    verdicts = [denied(lambda: sqs.send_message(
        QueueUrl=url, MessageBody="r-probe", MessageGroupId="demo/probe",
        MessageDeduplicationId="r-probe"))]
    verdicts.append(denied(lambda: sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])))
    received: list[dict[str, Any]] = []
    verdicts.append(denied(lambda: received.extend(sqs.receive_message(
        QueueUrl=url, MaxNumberOfMessages=1, WaitTimeSeconds=0, VisibilityTimeout=30,
        MessageSystemAttributeNames=["ApproximateReceiveCount"]).get("Messages", []))))
    assert len(received) == (0 if verdicts[-1] else 1), received
    handle = received[0]["ReceiptHandle"] if received else "made-up-handle"
    verdicts.append(denied(lambda: sqs.change_message_visibility(
        QueueUrl=url, ReceiptHandle=handle, VisibilityTimeout=60)))
    verdicts.append(denied(lambda: sqs.delete_message(QueueUrl=url, ReceiptHandle=handle)))
    return verdicts


def check_auth_stack(book: Runbook, moto: Moto,
                     operator: tuple[str, str]) -> tuple[str, list[str]]:
    """What step 2 made: scopes from the module folders, the admin client, a tenant."""
    out = {k: v["value"] for k, v in json.loads(book.terraform("auth", "output", "-json"))
           .items()}
    pool = out["user_pool_id"]
    assert out["issuer"] == f"https://cognito-idp.eu-west-1.amazonaws.com/{pool}"
    assert out["jwks_url"] == out["issuer"] + "/.well-known/jwks.json"
    assert out["token_url"] == \
        "https://acme-tfserver.auth.eu-west-1.amazoncognito.com/oauth2/token"
    served = sorted(discover(ROOT / "modules"))  # droplet's *.tf are in version folders
    assert out["modules"] == served == ["demo", "droplet"]
    assert sorted(out["scopes"]) == ["tfserver/admin"] + [
        f"tfserver/{m}.{rw}" for m in served for rw in ("approve", "read", "write")]
    assert set(out["tenant_client_ids"]) == {"acme"}
    clients = [out["admin_client_id"], out["tenant_client_ids"]["acme"]]
    assert out["client_ids"] == clients
    assert out["app_inputs"]["client_ids"] == clients
    idp = aws(moto, "cognito-idp", operator)
    admin = idp.describe_user_pool_client(UserPoolId=pool, ClientId=clients[0])["UserPoolClient"]
    assert admin["AllowedOAuthFlows"] == ["client_credentials"] and admin["ClientSecret"]
    assert admin["AllowedOAuthScopes"] == ["tfserver/admin"]
    acme = idp.describe_user_pool_client(UserPoolId=pool, ClientId=clients[1])["UserPoolClient"]
    assert sorted(acme["AllowedOAuthScopes"]) == ["tfserver/demo.read", "tfserver/demo.write",
                                                  "tfserver/droplet.read",
                                                  "tfserver/droplet.write"]
    listing = book.terraform("auth", "output")
    assert admin["ClientSecret"] not in listing and acme["ClientSecret"] not in listing
    return pool, clients


def check_recorded_tools(book: Runbook) -> None:
    """Steps 4, 8 and 9 called the registry, the image build and App Platform's logs so."""
    image = "registry.digitalocean.com/acme/tfserver"
    assert book.recorded() == [
        ["doctl", "registry", "create", "acme", "--subscription-tier", "starter"],
        ["doctl", "registry", "login"],
        ["docker", "buildx", "build", "--platform", "linux/amd64", "-t", f"{image}:0.1.0",
         "--push", "."],
        ["docker", "buildx", "build", "--platform", "linux/amd64", "-t", f"{image}:0.2.0",
         "--push", "."],
        ["doctl", "apps", "logs", "app-under-test", "tfserver", "--type", "run", "--follow"],
        ["doctl", "apps", "logs", "app-under-test", "tfserver", "--type", "deploy"],
        ["doctl", "apps", "list-deployments", "app-under-test"],
    ]


def check_added_tenant(book: Runbook, before: list[str], env: dict[str, str]) -> list[str]:
    """Step 7 added globex: a new client, listed after the others, in the app's inputs."""
    ids = book.output("auth", "tenant_client_ids")
    assert set(ids) == {"acme", "globex"} and ids["acme"] == before[1]
    clients = book.output("auth", "client_ids")
    assert clients == [*before, ids["globex"]]
    inputs = json.loads((book.work / "deploy/app/auth.auto.tfvars.json").read_text())
    assert inputs == {"cognito_issuer": env["COGNITO_ISSUER"], "jwks_url": env["JWK_URL"],
                      "token_url": book.output("auth", "token_url"),
                      "client_ids": clients, "scope_prefix": "tfserver"}
    return list(clients)


def moto_tokens_for_new(idp: Any, pool: str, clients: list[str], tokens: dict[str, str],
                        folder: Path) -> dict[str, str]:
    new = {}
    for client in clients:
        if client not in tokens:
            new[client] = idp.admin_initiate_auth(
                UserPoolId=pool, ClientId=client, AuthFlow="ADMIN_USER_PASSWORD_AUTH",
                AuthParameters={"USERNAME": "ops", "PASSWORD": "Real-Pass-456!"},
            )["AuthenticationResult"]["AccessToken"]
            (folder / client).write_text(new[client])
    return new


def teardown(book: Runbook, moto: Moto, operator: tuple[str, str]) -> None:
    """Destroy both stacks the way docs/deploy.md's "To stop paying" says, with moto's gaps
    worked around: it lacks DeleteResourceServer (drop the server from the state; it goes
    with the pool) and answers versioned batch deletes with a 500 (empty the bucket one
    version at a time)."""
    auth = book.work / "deploy" / "auth"
    if (auth / "backend.tf").exists() or (auth / "terraform.tfstate").exists():
        with contextlib.suppress(AssertionError):
            book.terraform("auth", "state", "rm", "aws_cognito_resource_server.this")
        book.sh('rm -f deploy/auth/backend.tf\n'
                'terraform -chdir=deploy/auth init -migrate-state -force-copy\n'
                'terraform -chdir=deploy/auth destroy -var region=eu-west-1 '
                '-var domain_prefix=acme-tfserver')
    state = book.work / "deploy" / "state"
    if (state / "backend.tf").exists() or (state / "terraform.tfstate").exists():
        book.sh('rm -f deploy/state/backend.tf\n'
                'terraform -chdir=deploy/state init -migrate-state -force-copy')
        s3 = aws(moto, "s3", operator)
        listing = s3.list_object_versions(Bucket="acme-tfserver-state")
        for item in listing.get("Versions", []) + listing.get("DeleteMarkers", []):
            s3.delete_object(Bucket="acme-tfserver-state", Key=item["Key"],
                             VersionId=item["VersionId"])
        book.sh("terraform -chdir=deploy/state destroy -var region=eu-west-1 "
                "-var bucket_name=acme-tfserver-state")


# -- static checks of what cannot run here ------------------------------------------------


def test_envfile_quotes_any_value(tmp: Path) -> None:
    """deploy/envfile's lines, sourced by sh, give back exactly the values, whatever they
    hold; no value runs a command."""
    terraform = require_tool("terraform")
    shutil.copytree(ROOT / "deploy" / "envfile", tmp / "envfile")
    canary = tmp / "ran"
    values = {"PLAIN": "abc", "QUOTE": "it's", "QUOTES": "''\"'\"", "SPACES": " a  b ",
              "DOLLAR": f"$(touch {canary})", "BACKTICK": f"`touch {canary}`",
              "BACKSLASH": "a\\'b\\", "NEWLINE": "line1\nline2", "EMPTY": "",
              "UNICODE": "Grüße ☃", "GLOB": "*"}
    (tmp / "envfile" / "in.auto.tfvars.json").write_text(json.dumps({"vars": values}))
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp), "CHECKPOINT_DISABLE": "1",
           "TF_CLI_CONFIG_FILE": "/dev/null"}
    done = subprocess.run([terraform, "apply", "-auto-approve", "-input=false", "-no-color"],
                          cwd=tmp / "envfile", env=env, capture_output=True, text=True,
                          timeout=TF_TIMEOUT)
    assert done.returncode == 0, done.stderr
    text = subprocess.run([terraform, "output", "-raw", "text"], cwd=tmp / "envfile", env=env,
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert [line.split("=")[0] for line in text.splitlines() if line.startswith("export ")] \
        == [f"export {k}" for k in sorted(values)]
    (tmp / "vars.env").write_text(text)
    got = sourced(tmp / "vars.env")
    assert {k: got[k] for k in values} == values
    assert not canary.exists()
    bash = subprocess.run(["bash", "-c", '. "$1" && printf %s "$QUOTES|$NEWLINE"', "bash",
                           str(tmp / "vars.env")], capture_output=True, text=True, timeout=30)
    assert bash.stdout == values["QUOTES"] + "|" + values["NEWLINE"]


def test_auth_scopes_come_from_the_module_folders(tmp: Path) -> None:
    """deploy/auth/scopes.tf and variables.tf, evaluated on their own (no provider): every
    folder of ../../modules with *.tf or *.tf.json files is a served module, others are
    not; a tenant may ask only for scopes of served modules."""
    terraform = require_tool("terraform")
    stack = tmp / "deploy" / "auth"
    stack.mkdir(parents=True)
    for name in ("scopes.tf", "variables.tf"):
        shutil.copy(ROOT / "deploy" / "auth" / name, stack / name)
    (stack / "probe.tf").write_text(
        'output "served" { value = local.served_modules }\n'
        'output "module_scopes" { value = local.module_scopes }\n'
        'output "tenant_scopes" { value = local.tenant_scopes }\n')
    modules = tmp / "modules"
    shutil.copytree(ROOT / "modules", modules)
    (modules / "jsononly").mkdir()
    (modules / "jsononly" / "main.tf.json").write_text("{}")
    (modules / "notes").mkdir()
    (modules / "notes" / "README.md").write_text("not a module")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp), "CHECKPOINT_DISABLE": "1",
           "TF_CLI_CONFIG_FILE": "/dev/null"}

    def evaluate(**tfvars: Any) -> dict[str, Any]:
        (stack / "t.auto.tfvars.json").write_text(json.dumps(
            {"region": "eu-west-1", "domain_prefix": "x", **tfvars}))
        done = subprocess.run([terraform, "apply", "-auto-approve", "-input=false",
                               "-no-color"], cwd=stack, env=env, capture_output=True,
                              text=True, timeout=TF_TIMEOUT)
        assert done.returncode == 0, done.stderr
        got = subprocess.run([terraform, "output", "-json"], cwd=stack, env=env, check=True,
                             capture_output=True, text=True, timeout=60).stdout
        return {k: v["value"] for k, v in json.loads(got).items()}

    out = evaluate(tenants={"acme": ["demo.write", "demo.read"]})
    assert evaluate(tenants={"acme": ["demo.approve"]})["tenant_scopes"] == {
        "acme": ["tfserver/demo.approve"]}
    assert out["served"] == ["demo", "droplet", "jsononly"]
    assert out["module_scopes"][:2] == ["demo.read", "demo.write"]
    assert out["tenant_scopes"] == {"acme": ["tfserver/demo.read", "tfserver/demo.write"]}
    assert evaluate(modules=["basic"])["module_scopes"] == ["basic.read", "basic.write",
                                                            "basic.approve"]
    for bad in ({"admin": ["demo.read"]}, {"acme": ["admin"]}, {"Acme": ["demo.read"]},
                {"acme": ["demo.delete"]}, {"acme": ["demo.read", "nothere.read"]}):
        (stack / "t.auto.tfvars.json").write_text(json.dumps(
            {"region": "eu-west-1", "domain_prefix": "x", "tenants": bad}))
        done = subprocess.run([terraform, "plan", "-input=false", "-no-color"], cwd=stack,
                              env=env, capture_output=True, text=True, timeout=TF_TIMEOUT)
        assert done.returncode != 0, bad


def test_app_stack_wires_tfservers_settings() -> None:
    app = ROOT / "deploy" / "app"
    doc = hcl(app)
    local = {k: v for block in doc["locals"] for k, v in block.items()}
    known = tfserver_env_names()
    assert set(local["plain_env"]) <= known, set(local["plain_env"]) - known
    assert set(local["secret_env"]) <= set(PASSED_ENV)
    assert set(local["secret_env"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                        "DIGITALOCEAN_TOKEN"}
    plain = local["plain_env"]
    assert plain["TFSERVER_AUTH"] == "jwt" and plain["TFSERVER_BACKEND"] == "s3"
    assert plain["TFSERVER_MAX_CONNECTIONS_PER_IP"] == "0"
    assert plain["TFSERVER_POLICY"] == "${var.policy_file}"
    assert "var.trusted_proxies" in plain["TFSERVER_TRUSTED_PROXIES"]
    assert "var.client_ids" in plain["TFSERVER_CLIENT_IDS"]
    service = doc["resource"][0]["digitalocean_app"]["tfserver"]["spec"][0]["service"][0]
    assert service["health_check"][0]["http_path"] == "/readyz"
    assert service["liveness_health_check"][0]["http_path"] == "/healthz"
    text = (app / "main.tf").read_text()
    assert re.search(r'for_each = local\.plain_env\n.*?type  = "GENERAL"', text, re.S)
    assert re.search(r'for_each = toset\(keys\(local\.secret_env\)\)\n.*?type  = "SECRET"',
                     text, re.S)
    assert 'type = "PRIMARY"' in text  # the custom domain App Platform certifies
    app_vars = variables(app)
    for secret in ("aws_access_key_id", "aws_secret_access_key", "modules_digitalocean_token"):
        assert app_vars[secret]["sensitive"] is True and "default" not in app_vars[secret]
    assert app_vars["instance_count"]["default"] >= 2
    assert "instance_count >= 2" in str(app_vars["instance_count"]["validation"])
    assert app_vars["policy_file"]["default"] == "/app/policy.toml"
    assert app_vars["trusted_proxies"]["default"] == ["10.0.0.0/8", "172.16.0.0/12",
                                                      "192.168.0.0/16"]
    # what the app needs comes out of the other two stacks' app_inputs, names alike
    for stack in AWS_STACKS:
        inputs = hcl(ROOT / "deploy" / stack)["output"]
        keys = next(o["app_inputs"]["value"] for o in inputs if "app_inputs" in o)
        assert set(keys) <= set(app_vars), (stack, set(keys) - set(app_vars))
    required = {n for n, v in app_vars.items() if "default" not in v}
    assert required == {"domain", "image_tag", "cognito_issuer", "jwks_url", "client_ids",
                        "state_bucket", "state_region", "state_lock_table",
                        "aws_access_key_id", "aws_secret_access_key",
                        "modules_digitalocean_token"}
    assert {"live_url", "default_ingress", "app_id"} <= outputs(app)


def test_app_stack_adds_workers_with_the_sqs_engine() -> None:
    """engine = "sqs" gives the service TFSERVER_ROLE=api on the state stack's queue and adds
    a worker component (its own count and size, `tfserver worker`, liveness on /healthz,
    the service's image, environment and secrets); the default keeps the service as it is
    and makes no worker."""
    app = ROOT / "deploy" / "app"
    doc = hcl(app)
    local = {k: v for block in doc["locals"] for k, v in block.items()}
    assert set(local["engine_env"]) | {"TFSERVER_ROLE"} == SQS_ENGINE_SETTINGS
    assert not SQS_ENGINE_SETTINGS & set(local["plain_env"])
    assert local["engine_env"]["TFSERVER_QUEUE"] == "sqs"
    assert local["engine_env"]["TFSERVER_QUEUE_URL"] == "${var.queue_url}"
    assert local["service_engine_env"] == ('${var.engine == "sqs" ? merge(local.engine_env, '
                                           '{TFSERVER_ROLE = "api"}) : {}}')
    assert local["worker_engine_env"] == \
        '${merge(local.engine_env, {TFSERVER_ROLE = "worker"})}'
    app_vars = variables(app)
    assert app_vars["engine"]["default"] == "local"
    assert app_vars["queue_url"]["default"] == ""
    assert app_vars["worker_count"]["default"] >= 1
    assert app_vars["worker_size_slug"]["default"].startswith("apps-")
    assert app_vars["worker_grace_seconds"]["default"] > 60  # TFSERVER_SHUTDOWN_GRACE
    assert local["plain_env"]["TFSERVER_SHUTDOWN_GRACE"] == "60"
    spec = doc["resource"][0]["digitalocean_app"]["tfserver"]["spec"][0]
    service = spec["service"][0]

    def env_blocks(component: dict[str, Any]) -> list[tuple[str, str]]:
        return [(d["env"]["for_each"], d["env"]["content"][0]["type"])
                for d in component["dynamic"]]

    assert env_blocks(service) == [("${local.plain_env}", "GENERAL"),
                                   ("${local.service_engine_env}", "GENERAL"),
                                   ("${toset(keys(local.secret_env))}", "SECRET")]
    [dynamic] = spec["dynamic"]
    assert dynamic["worker"]["for_each"] == '${var.engine == "sqs" ? ["tfserver-worker"] : []}'
    worker = dynamic["worker"]["content"][0]
    assert worker["run_command"] == "/usr/bin/tini -s -- tfserver worker"
    assert worker["instance_count"] == "${var.worker_count}"
    assert worker["instance_size_slug"] == "${var.worker_size_slug}"
    assert worker["image"] == service["image"]
    assert env_blocks(worker) == [("${local.plain_env}", "GENERAL"),
                                  ("${local.worker_engine_env}", "GENERAL"),
                                  ("${toset(keys(local.secret_env))}", "SECRET")]
    assert [d["env"]["content"] for d in worker["dynamic"]][::2] == \
        [d["env"]["content"] for d in service["dynamic"]][::2]
    [live] = worker["liveness_health_check"]
    assert live["http_path"] == "/healthz"
    assert str(live["port"]) == local["plain_env"]["TFSERVER_PORT"] == str(service["http_port"])
    assert worker["termination"] == [{"grace_period_seconds": "${var.worker_grace_seconds}"}]
    assert "health_check" not in worker and "http_port" not in worker  # no route reaches it


def test_state_stack_limits_who_moves_messages_to_the_dead_letter_queue() -> None:
    """The dead-letter queue's redrive allow policy (which moto does not keep, so the
    runbook test leaves it out): only the run queue may move messages there."""
    doc = hcl(ROOT / "deploy" / "state")
    resources = {(kind, name): body for block in doc["resource"]
                 for kind, named in block.items() for name, body in named.items()}
    allow = resources[("aws_sqs_queue_redrive_allow_policy", "dead_letters")]
    assert allow["queue_url"] == "${aws_sqs_queue.dead_letters.id}"
    assert allow["redrive_allow_policy"] == ('${jsonencode({redrivePermission = "byQueue", '
                                             'sourceQueueArns = [aws_sqs_queue.runs.arn]})}')
    dead = resources[("aws_sqs_queue", "dead_letters")]
    assert dead["fifo_queue"] is True and dead["content_based_deduplication"] is False
    assert "redrive_policy" not in dead
    max_receive = variables(ROOT / "deploy" / "state")["max_receive_count"]
    assert max_receive["default"] == 5


def test_every_stack_pins_providers_and_describes_variables() -> None:
    for stack in STACKS:
        path = ROOT / "deploy" / stack
        required = hcl(path)["terraform"][0]["required_providers"][0]
        for name, spec in required.items():
            assert spec["version"].startswith("~>"), (stack, name)
        for name, var in variables(path).items():
            assert var.get("description"), (stack, name)
            assert "type" in var, (stack, name)
        for block in hcl(path).get("output", []):
            for name, out in block.items():
                assert out.get("description"), (stack, name)
    for name, var in variables(ROOT / "deploy" / "envfile").items():
        assert var.get("description") and "type" in var, name


def test_aws_stacks_commit_their_lock_files() -> None:
    """state and auth lock hashicorp/aws to the mirror's version, and git keeps the files."""
    mirror = aws_provider_mirror() / "registry.terraform.io" / "hashicorp" / "aws"
    versions = sorted(p.name for p in mirror.iterdir())
    git = require_tool("git")
    for stack in AWS_STACKS:
        lock = ROOT / "deploy" / stack / ".terraform.lock.hcl"
        text = lock.read_text()
        version = re.search(r'provider "registry\.terraform\.io/hashicorp/aws" \{\n'
                            r'  version     = "([0-9.]+)"', text)
        assert version and version.group(1) in versions, text
        assert re.search(r'"h1:[A-Za-z0-9+/=]{44}"', text)
        ignored = subprocess.run([git, "check-ignore", "-q", str(lock)], cwd=ROOT,
                                 capture_output=True, timeout=30)
        assert ignored.returncode == 1, f"{lock} is ignored by git"


def test_the_governance_policy_file() -> None:
    """deploy/policy.toml in DESIGN's format: cheap droplet sizes and a few regions that the
    droplet module accepts, three instances per tenant, a day by default, a week at most."""
    policy = tomllib.loads((ROOT / "deploy" / "policy.toml").read_text())
    assert set(policy) == {"defaults", "modules"}
    assert isinstance(policy["defaults"]["max_runs_per_tenant"], int)
    assert 1 <= policy["defaults"]["max_runs_per_tenant"] <= 4
    assert set(policy["modules"]) == {"droplet"}
    droplet = policy["modules"]["droplet"]
    assert droplet["max_instances_per_tenant"] == 3
    assert (droplet["default_ttl"], droplet["max_ttl"]) == ("24h", "7d")
    module = load_module(ROOT / "modules" / "droplet" / "1.1.0", "droplet")
    assert set(droplet["variables"]) == {"size", "region"} <= set(module.variables)
    sizes = droplet["variables"]["size"]["enum"]
    assert sizes and all(re.fullmatch(r"s-1vcpu-(512mb-10gb|1gb|2gb)", s) for s in sizes)
    regions = droplet["variables"]["region"]["enum"]
    assert 1 <= len(regions) <= 8
    for region in regions:
        for size in sizes:
            module.validate({"name": "x", "image": "ubuntu-24-04-x64", "region": region,
                             "size": size})


def test_the_image_carries_the_policy() -> None:
    """The runtime stage copies deploy/policy.toml to deploy/app's TFSERVER_POLICY path, and
    .dockerignore lets that one file of deploy/ into the build context."""
    runtime = (ROOT / "Dockerfile").read_text().split("\nFROM ")[-1]
    default = variables(ROOT / "deploy" / "app")["policy_file"]["default"]
    assert re.search(rf"^COPY deploy/policy\.toml {re.escape(default)}$", runtime, re.M)
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "**" and "!deploy/policy.toml" in lines
    after = lines[lines.index("!deploy/policy.toml") + 1:]
    assert not [p for p in after if not p.startswith("!") and
                re.fullmatch(p.replace("**/", "(.*/)?").replace("*", "[^/]*"),
                             "deploy/policy.toml")]


def runbook_lines() -> list[str]:
    """Every command line of docs/deploy.md's runbook: the sh blocks' lines (continuations
    joined) and the inline code of its prose."""
    section = runbook_section()
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"```.*?```", "", section, flags=re.S)
    return lines + [code.replace("\n", " ") for code in re.findall(r"`([^`]+)`", prose)]


def test_the_runbook_is_complete_and_names_what_exists() -> None:
    """Every step of docs/deploy.md's runbook is there, every stack output, variable and TF_VAR_ it
    names exists, and the commands that cannot run here are the right ones."""
    steps = runbook()
    assert [s for s in steps if s.isdigit()] == [str(n) for n in range(12)]
    assert {"Costs", "Lock files"} <= set(steps)
    outs = {s: outputs(ROOT / "deploy" / s) for s in STACKS}
    vars_ = {s: variables(ROOT / "deploy" / s) for s in STACKS}
    named = 0
    for line in runbook_lines():
        for stack, name in re.findall(
                r"terraform -chdir=deploy/(\w+) output (?:-(?:raw|json) )?(\w+)", line):
            assert name in outs[stack], (stack, name)
            named += 1
        for stack, rest in re.findall(r"terraform -chdir=deploy/(\w+) (?:apply|destroy)(.*)",
                                      line):
            for name in re.findall(r"-var[ =](\w+)=", rest):
                assert name in vars_[stack], (stack, name)
        for name in re.findall(r"TF_VAR_(\w+)", line):
            assert name in vars_["app"], name
    assert named >= 15
    text = "\n".join(runbook_lines())
    # the env file is sourced; the runtime key is only ever piped, never written to a file
    assert "output -raw env" in text and ". ./tfserver.env" in text
    assert not re.search(r"output -raw (secret_access_key|access_key_id)\)?\"? *>", text)
    # registry, a linux/amd64 build pushed where deploy/app pulls from, logs
    commands = shell_commands("\n".join(b for blocks in steps.values() for b in blocks))
    assert ["doctl", "registry", "login"] in commands
    builds = [c for c in commands if c[:3] == ["docker", "buildx", "build"]]
    assert len(builds) == 2
    for build in builds:
        assert build[build.index("--platform") + 1] == "linux/amd64" and "--push" in build
        assert build[build.index("-t") + 1] == "registry.digitalocean.com/$REGISTRY/tfserver:$TAG"
    assert vars_["app"]["image_registry_type"]["default"] == "DOCR"
    assert vars_["app"]["image_repository"]["default"] == "tfserver"
    assert any(c[:3] == ["doctl", "apps", "logs"] for c in commands)
    # the droplet example is valid input that the policy allows
    droplet = next(b for b in steps["6"] if "/droplet/" in b)
    body = json.loads(re.search(r"-d '(\{.*?\})'", droplet, re.S).group(1))
    load_module(ROOT / "modules" / "droplet" / "1.1.0", "droplet").validate(body)
    allowed = tomllib.loads((ROOT / "deploy" / "policy.toml").read_text())[
        "modules"]["droplet"]["variables"]
    assert body["size"] in allowed["size"]["enum"]
    assert body["region"] in allowed["region"]["enum"]
    # the sqs engine: turned on in a file later applies keep, scaled by deploy/app's
    # variables, watched by queue depth, the oldest message's age and the dead letters
    engine = re.search(r"<<'EOF'\n(.*?)EOF", steps["10"][0], re.S).group(1)
    engine_vars = dict(re.findall(r'^(\w+) += ("?[\w-]+"?)', engine, re.M))
    assert engine_vars["engine"] == '"sqs"'
    assert set(engine_vars) <= set(vars_["app"])
    assert "deploy/app/engine.auto.tfvars" in steps["10"][0]
    watch = shell_commands(steps["11"][0])
    assert ["aws", "sqs", "get-queue-attributes"] == watch[2][:3] == watch[4][:3]
    assert "ApproximateNumberOfMessages" in watch[2] and "$DLQ_URL" in watch[4]
    assert "ApproximateAgeOfOldestMessage" in watch[3]
    assert shell_commands(steps["11"][1])[0][:3] == ["aws", "sqs", "receive-message"]
    for name in ("instance_count", "worker_count", "worker_size_slug", "max_runs"):
        assert f"`{name}`" in runbook_section(), name
    for metric in ("tfserver_queue_waiting", "tfserver_queue_oldest_seconds",
                   "tfserver_worker_slots_busy", "tfserver_runs_resumed_total"):
        assert f"`{metric}`" in runbook_section(), metric
    # with network, every stack gets locked for the usual platforms
    lock = steps["Lock files"][0]
    assert "for stack in state auth app" in lock and "providers lock" in lock
    assert "-platform=linux_amd64" in lock and "-platform=darwin_arm64" in lock


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or \
        require_tool("hadolint")
    done = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def dockerfile() -> tuple[dict[str, str], list[str], list[str], list[str]]:
    """The runtime stage's ENV, ENTRYPOINT, CMD and HEALTHCHECK command."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    runtime = text.split("\nFROM ")[-1]
    env: dict[str, str] = {}
    for line in runtime.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", runtime, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", runtime, re.M).group(1))
    health = json.loads(re.search(r"HEALTHCHECK .*?CMD (\[.*\])$", runtime, re.M).group(1))
    return env, entrypoint, cmd, health


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
    env, entrypoint, cmd, health = dockerfile()
    # PID 1 is tini (Debian's package puts it there): it reaps the orphans of canceled runs,
    # which tfserver as PID 1 would leave as zombies, and passes signals on.
    assert entrypoint == ["/usr/bin/tini", "--"] and cmd == ["tfserver"]
    script = shutil.which("tfserver", path=str(Path(sys.executable).parent))
    assert script, "the console script is installed"
    # Outside a container tini is not PID 1: as a child subreaper it does what it does there.
    argv = [require_tool("tini"), *entrypoint[1:], script]
    base = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(tmp),
            **env, "TFSERVER_STATE_DIR": str(tmp / "state"),
            "TFSERVER_MODULES_DIR": str(ROOT / "modules"), "TFSERVER_PROVIDER_MIRROR": "",
            "TFSERVER_PORT": "0", "TINI_SUBREAPER": "1"}
    # As the image ships it: listening on 0.0.0.0 without auth is refused.
    done = subprocess.run(argv, env=base, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "refusing to serve without authentication" in done.stderr
    # With an issuer configured (as App Platform sets it), the same command serves.
    srv = launch(argv, cwd=tmp, env={**base, "COGNITO_ISSUER": "https://issuer.test/p",
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
        assert srv.stop() == 0  # tini passed SIGTERM on, and tfserver's exit status back

