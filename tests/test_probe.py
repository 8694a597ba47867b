"""Holes found by probing a running tfserver as a hostile client would (runs, events,
ttl, saved plans). Each test fails while its hole is open."""

from __future__ import annotations

import http.client
import json
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from support import ServerProcess, start_server

LEAK = "Hush-Probe-Leak-7731"

# A destroy-time provisioner that prints the instance's secret (a module author's
# nonsensitive() is enough), and whose destroy fails so terraform repeats it in a
# diagnostic.
LEAKY = """
variable "secret" {
  type      = string
  sensitive = true
}

variable "fail" {
  type    = bool
  default = false
}

resource "terraform_data" "this" {
  input = { secret = nonsensitive(var.secret), fail = var.fail }

  provisioner "local-exec" {
    when    = destroy
    command = "echo destroying ${self.input.secret} >&2; exit ${self.input.fail ? 1 : 0}"
  }
}
"""

PLAIN = """
variable "name" {
  type    = string
  default = "x"
}

resource "terraform_data" "this" {
  input = var.name
}

output "name" {
  value = var.name
}
"""

# Takes a second and a half: a run to follow and to cut a stream of.
PAUSE = """
resource "terraform_data" "this" {
  triggers_replace = [timestamp()]

  provisioner "local-exec" {
    command = "sleep 1.5"
  }
}
"""

# `timed` expires by default and at most after 2 h; `plain` and `leaky` have no TTL.
POLICY = """
[modules.timed]
default_ttl = "1h"
max_ttl = "2h"
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory, terraform_bin: str
          ) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("probe")
    modules = tmp / "modules"
    for name, text in (("plain", PLAIN), ("timed", PLAIN), ("leaky", LEAKY),
                       ("pause", PAUSE)):
        (modules / name).mkdir(parents=True)
        (modules / name / "main.tf").write_text(text)
    policy = tmp / "policy.toml"
    policy.write_text(POLICY)
    server = start_server(tmp, modules_dir=modules, env={"TFSERVER_POLICY": str(policy)})
    yield server
    server.stop()


def events(server: ServerProcess, run_id: str, timeout: float = 60) -> str:
    """The run's whole NDJSON event stream (it ends after `finished`)."""
    conn = http.client.HTTPConnection(server.url.split("//")[1], timeout=timeout)
    try:
        conn.request("GET", f"/runs/{run_id}/events")
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        return resp.read().decode()
    finally:
        conn.close()


def test_a_huge_ttl_is_a_400_before_any_run(probe: ServerProcess) -> None:
    """`?ttl=3000000d` (past year 9999) and a ttl of 400 digits (infinity as a float)
    passed parse_ttl: terraform applied, then rendering `expires_at` (or storing the
    expiry) raised, the client got 500, and every later GET of the instance was 500."""
    for instance, ttl in (("huge", "3000000d"), ("endless", "9" * 400 + "d")):
        r = probe.request("PUT", f"/plain/{instance}?ttl={ttl}", {"name": instance})
        assert r.status == 400, (ttl[:20], r.status, r.body[:300])
        assert r.json["errors"][0]["field"] == "ttl"
        shown = probe.request("GET", f"/plain/{instance}")
        assert shown.status == 404, (ttl[:20], shown.status, shown.body[:300])
    assert "Traceback" not in probe.log_text()


def test_destroy_events_never_carry_the_instances_secret(probe: ServerProcess) -> None:
    """A destroy's inputs are read when it runs, and its synchronous answer and the log
    scrub them; the run's events were scrubbed with the secrets known at submit time
    (the defaults only), so a diagnostic of the destroy showed the secret in clear."""
    created = probe.request("PUT", "/leaky/x", {"secret": LEAK, "fail": True})
    assert created.status == 201, created.body
    started = probe.request("DELETE", "/leaky/x", headers={"Prefer": "respond-async"})
    assert started.status == 202, started.body
    run_id = started.json["id"]
    stream = events(probe, run_id)
    kinds = [json.loads(line)["type"] for line in stream.splitlines()]
    assert kinds[-1] == "finished" and "diagnostic" in kinds, kinds
    assert LEAK not in stream, [line for line in stream.splitlines() if LEAK in line]
    assert LEAK not in probe.request("GET", f"/runs/{run_id}").body.decode()
    assert LEAK not in probe.log_text()


def test_a_saved_plan_applied_gets_the_policys_expiry(probe: ServerProcess) -> None:
    """`default_ttl`/`max_ttl` hold for every instance ("no instance outlives it"); an
    instance created by `POST /runs/{plan}/apply` got no expiry at all."""
    direct = probe.request("PUT", "/timed/direct", {"name": "d"})
    assert direct.status == 201 and direct.json.get("expires_at"), direct.body
    plan = probe.request("PUT", "/timed/viaplan?dry_run=true", {"name": "p"})
    assert plan.status == 200, plan.body
    applied = probe.request("POST", f"/runs/{plan.json['run_id']}/apply")
    assert applied.status == 201, applied.body
    shown = probe.request("GET", "/timed/viaplan").json
    assert shown["expires_at"] is not None, shown


def test_a_dry_run_with_a_ttl_past_max_ttl_is_refused_like_the_apply(
        probe: ServerProcess) -> None:
    """A dry run answers what the apply would do; with `?ttl=` beyond `max_ttl` the
    apply is a 400 naming ttl, but the dry run said 200."""
    applied = probe.request("PUT", "/timed/long?ttl=99h", {"name": "l"})
    assert applied.status == 400, applied.body
    planned = probe.request("PUT", "/timed/long?dry_run=true&ttl=99h", {"name": "l"})
    assert planned.status == 400, (planned.status, planned.body[:300])



def test_a_client_that_cuts_its_event_stream_is_no_error_in_the_log(
        probe: ServerProcess) -> None:
    """A follower that goes away mid-stream (closed, or reset) is an ordinary event: each
    one was logged at error level with two tracebacks (BrokenPipeError from http.server's
    own flush after the handler), so any client could fill the log with errors."""
    started = probe.request("PUT", "/pause/cut", {}, headers={"Prefer": "respond-async"})
    assert started.status == 202, started.body
    run_id = started.json["id"]
    seen = len(probe.lines)
    host, port = probe.url.split("//")[1].split(":")
    for reset, accept in ((False, ""), (True, "Accept: text/event-stream\r\n")):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(f"GET /runs/{run_id}/events HTTP/1.1\r\nHost: x\r\n{accept}\r\n"
                      .encode())
            assert s.recv(100).startswith(b"HTTP/1.1 200")
            if reset:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    deadline = time.monotonic() + 30
    while probe.request("GET", f"/runs/{run_id}").json["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(0.5)  # the followers' last writes
    errors = [line[:300] for line in probe.lines[seen:]
              if '"level": "error"' in line or "Traceback" in line]
    assert errors == []
