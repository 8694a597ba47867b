"""Operability on a running tfserver: Prometheus metrics, the audit trail, the client's
address behind a trusted proxy, and the human log format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_runs_defects import wait_for

from support import ROOT, TEST_MODULES, Jwks, ServerProcess, Signer, bearer, start_server

SECRET = "audit-Secret-Zq9x\"k"


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer("ops-key")


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory, signer: Signer, terraform_bin: str
        ) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("ops")
    jwks = Jwks()
    jwks.publish(signer)
    server = start_server(tmp, env={"COGNITO_ISSUER": Signer.ISSUER, "JWK_URL": jwks.url,
                                    "TFSERVER_TRUSTED_PROXIES": "10.9.0.0/16"})
    yield server
    server.stop()
    jwks.close()


def samples(server: ServerProcess, headers: dict[str, str]) -> dict[tuple[str, frozenset[
        tuple[str, str]]], float]:
    r = server.request("GET", "/metrics", headers=headers)
    assert r.status == 200, r.body
    assert r.header("Content-Type").startswith("text/plain")
    found = {}
    for family in text_string_to_metric_families(r.body.decode()):
        for s in family.samples:
            found[(s.name, frozenset(s.labels.items()))] = s.value
    return found


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def test_metrics_move_with_applies_failures_conflicts_and_refusals(
        ops: ServerProcess, signer: Signer, tmp: Path) -> None:
    admin = bearer(signer.token("ops-admin", "tfserver/admin"))
    writer = bearer(signer.token("ops-writer", "tfserver/basic.write tfserver/fails.write "
                                               "tfserver/slow.write"))
    assert ops.request("GET", "/metrics").status == 401
    assert ops.request("GET", "/metrics", headers=writer).status == 403  # admin only
    before = samples(ops, admin)
    assert ops.request("PUT", "/basic/m1", {"name": "a"}, headers=writer).status == 201
    assert ops.request("PUT", "/basic/m1", {"name": "b"}, headers=writer).status == 200
    assert ops.request("PUT", "/fails/m2", {"secret": SECRET}, headers=writer).status == 502
    assert ops.request("GET", "/basic", headers={"Authorization": "Bearer nope"}).status == 401
    journal = tmp / "journal"
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(lambda: ops.request(
            "PUT", "/slow/m3", {"seconds": 2, "journal": str(journal), "tag": "a"},
            headers=writer))
        time.sleep(1)
        second = ops.request("PUT", "/slow/m3", {"seconds": 0, "journal": str(journal),
                                                 "tag": "b"}, headers=writer)
        assert first.result(timeout=60).status == 201
    assert second.status == 409
    after = samples(ops, admin)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    route = "/{module}/{instance}"
    assert moved("tfserver_http_requests_total", method="PUT", route=route, status="201") == 2
    assert moved("tfserver_http_requests_total", method="PUT", route=route, status="200") == 1
    assert moved("tfserver_http_requests_total", method="PUT", route=route, status="502") == 1
    assert moved("tfserver_http_requests_total", method="PUT", route=route, status="409") == 1
    assert moved("tfserver_http_requests_total", method="GET", route="/{module}",
                 status="401") == 1
    assert moved("tfserver_http_request_duration_seconds_count", route=route) == 5
    assert moved("tfserver_runs_total", module="basic", operation="apply",
                 status="succeeded") == 2
    assert moved("tfserver_runs_total", module="fails", operation="apply",
                 status="failed") == 1
    assert moved("tfserver_run_duration_seconds_count", module="slow",
                 operation="apply") == 1
    assert moved("tfserver_run_duration_seconds_sum", module="slow", operation="apply") >= 2
    assert moved("tfserver_lock_conflicts_total", module="slow") == 1
    assert value(after, "tfserver_jwks_fetches_total", result="ok") >= 1
    assert value(after, "tfserver_module_ready", module="basic") == 1
    assert value(after, "tfserver_runs_running") == 0 and value(after, "tfserver_runs_queued") == 0
    # no label carries a tenant or a raw path
    labels = {v for (_, ls) in after for _, v in ls}
    assert not [v for v in labels if "m1" in v or "ops-writer" in v], labels
    for name in ("m1", "m3"):
        path = "/basic/m1" if name == "m1" else "/slow/m3"
        assert ops.request("DELETE", path, headers=writer).status == 200
    assert ops.request("DELETE", "/fails/m2", headers=writer).status == 200


def audit_lines(server: ServerProcess) -> list[dict[str, Any]]:
    return [r for r in server.log_records() if r.get("logger") == "tfserver.audit"]


def test_the_audit_trail_names_who_and_what_and_never_a_secret(
        ops: ServerProcess, signer: Signer) -> None:
    writer = bearer(signer.token("audit-writer", "tfserver/basic.write tfserver/fails.write"))
    reader = bearer(signer.token("audit-reader", "tfserver/basic.read"))
    key = {"Idempotency-Key": "audit-key-1"}
    before = len(audit_lines(ops))
    assert ops.request("PUT", "/basic/au", {"name": "x", "token": SECRET},
                       headers={**writer, **key, "X-Forwarded-For": "10.9.8.7"}).status == 201
    assert ops.request("PUT", "/basic/au", {"name": "y"}, headers=reader).status == 403
    assert ops.request("PUT", "/fails/au", {"secret": SECRET}, headers=writer).status == 502
    assert ops.request("DELETE", "/basic/au", headers=writer).status == 200

    def of_au(event: str) -> list[dict[str, Any]]:
        return [r for r in audit_lines(ops)[before:]
                if r["event"] == event and r["what"]["instance"] == "au"]

    # Each line is written by its request's thread after the answer: they may come in
    # another order than the requests, and a moment after the last answer.
    wait_for(lambda: len(of_au("request")) == 4 and len(of_au("run")) >= 3, timeout=30)
    requests, runs = of_au("request"), of_au("run")
    by_status = {(r["what"]["method"], r["outcome"]["status"]): r for r in requests}
    apply, refused, failed, destroy = (by_status[("PUT", 201)], by_status[("PUT", 403)],
                                       by_status[("PUT", 502)], by_status[("DELETE", 200)])
    assert apply["who"]["subject"] == "audit-writer" and apply["who"]["client_id"] == \
        "audit-writer" and len(apply["who"]["tenant"]) == 24
    assert apply["who"]["address"] == "127.0.0.1"  # the peer is not a trusted proxy
    assert apply["what"]["module"] == "basic" and apply["what"]["idempotency_key"] == \
        "audit-key-1" and len(apply["what"]["run_id"]) == 32
    assert apply["outcome"]["status"] == 201
    assert refused["who"]["subject"] == "audit-reader" and refused["outcome"] == {
        "status": 403, "title": "Forbidden"}
    assert failed["outcome"] == {"status": 502, "title": "Bad Gateway"}
    assert destroy["what"]["method"] == "DELETE" and destroy["outcome"]["status"] == 200
    kinds = {(r["what"]["module"], r["what"]["operation"], r["outcome"]["status"])
             for r in runs}
    assert {("basic", "apply", "succeeded"), ("fails", "apply", "failed"),
            ("basic", "destroy", "succeeded")} <= kinds
    failed_run = next(r for r in runs if r["what"]["module"] == "fails")
    assert failed_run["outcome"]["problem"] == "Bad Gateway"
    assert failed_run["who"]["subject"] == "audit-writer"
    assert apply["what"]["run_id"] in {r["what"]["run_id"] for r in runs}
    text = ops.log_text()
    for secret in (SECRET, json.dumps(SECRET)[1:-1]):
        assert secret not in text
    assert "Bearer" not in text and signer.token("x")[:20] not in text
    assert ops.request("DELETE", "/fails/au", headers=writer).status == 200


def test_the_client_address_comes_from_a_trusted_proxy_only(tmp: Path) -> None:
    trusting = start_server(tmp / "t", env={"TFSERVER_TRUSTED_PROXIES": "127.0.0.0/8",
                                            "TFSERVER_MAX_CONNECTIONS_PER_IP": "1"})
    wary = start_server(tmp / "w", env={"TFSERVER_TRUSTED_PROXIES": "10.0.0.0/8"})
    try:
        forwarded = {"X-Forwarded-For": "198.51.100.7, 127.0.0.5"}
        assert trusting.request("GET", "/healthz",
                                headers={**forwarded, "X-Request-Id": "proxied"}).status == 200
        assert wary.request("GET", "/healthz",
                            headers={**forwarded, "X-Request-Id": "unbelieved"}).status == 200
        assert trusting.request("GET", "/healthz", headers={
            "X-Forwarded-For": "not-an-address", "X-Request-Id": "malformed"}).status == 200

        def client(server: ServerProcess, request: str) -> str:
            """The client its access line names (written after the answer: waited for)."""
            found = server.records(lambda r: r.get("logger") == "tfserver.access"
                                   and r.get("request_id") == request, timeout=30)
            assert found, f"no access line for {request}"
            return str(found[0]["client"])

        assert client(trusting, "proxied") == "198.51.100.7"
        assert client(trusting, "malformed") == "127.0.0.1"
        assert client(wary, "unbelieved") == "127.0.0.1"  # the header is not believed
        # a trusted proxy is not held to the per-address cap (1 here): parallel requests
        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(lambda _: trusting.request(
                "PUT", "/slow/px", {"seconds": 0, "journal": str(tmp / "j"), "tag": "x"},
                headers={"Prefer": "respond-async"}).status, range(4)))
        assert statuses == [202] * 4
    finally:
        trusting.stop()
        wary.stop()


def test_a_human_log_format_for_a_terminal(tmp: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tfserver", "--port", "0"], cwd=ROOT,
        env={"PATH": os.environ["PATH"], "TFSERVER_LOG_FORMAT": "text",
             "TFSERVER_STATE_DIR": str(tmp / "s"), "TFSERVER_MODULES_DIR": str(TEST_MODULES)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        line = ""
        while "serving" not in line:
            assert time.monotonic() < deadline
            line = proc.stdout.readline()
        assert not line.lstrip().startswith("{")
        assert " info " in line and "tfserver: serving basic, fails, slow on http://" in line
    finally:
        proc.terminate()
        try:
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()  # never leave a server behind, whatever failed
                proc.wait(timeout=10)
