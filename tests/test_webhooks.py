"""Webhooks (issue 23): the policy's `[[webhooks]]` tables, Standard Webhooks signatures
checked with the package's own verifier, delivery at least once (retries with one
`webhook-id`, a restart mid-retry), never on the caller's path, and the address rules
(private and loopback targets refused, also behind a DNS name; no redirect followed)."""

from __future__ import annotations

import base64
import http.server
import ipaddress
import json
import logging
import os
import ssl
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook as Verifier
from standardwebhooks import WebhookVerificationError

from support import self_signed
from tfserver.config import load as load_config
from tfserver.errors import ConfigError
from tfserver.metrics import Metrics
from tfserver.module.policy import Webhook
from tfserver.module.policyfile import load_policy
from tfserver.notify.delivery import Notifier, Target, targets_from_policy
from tfserver.notify.payloads import run_finished
from tfserver.notify.schedule import Backoff, next_step
from tfserver.notify.signing import Signer, check_secret
from tfserver.notify.store import PENDING, Attempt, Deliveries, Delivery
from tfserver.notify.targets import AllowList, Endpoint, Resolve, endpoint, why_refused
from tfserver.notify.transport import Answer
from tfserver.runs.store import RunRecord
from tfserver.storage.local import LocalObjects

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef01234567").decode()
EVENTS = ["run.finished", "instance.expired"]
WAIT = 10.0  # every wait below is bounded by this


# -- the policy's [[webhooks]] tables ------------------------------------------------------

def load(tmp: Path, text: str) -> Any:
    path = tmp / "policy.toml"
    path.write_text(text)
    return load_policy(path, {})


GOOD = """
[[webhooks]]
url = "https://hooks.example.com/tfserver?team=a"
secret = "env:HOOK_SECRET"
events = ["run.finished", "instance.drifted"]
tenants = ["*"]

[[webhooks]]
url = "http://127.0.0.1:9999/"
secret = "env:OTHER"
events = ["instance.destroyed"]
tenants = ["acme", "client-123"]
"""


def test_the_policy_reads_webhooks(tmp: Path) -> None:
    policy = load(tmp, GOOD)
    first, second = policy.webhooks
    assert first == Webhook("https://hooks.example.com/tfserver?team=a", "HOOK_SECRET",
                            frozenset({"run.finished", "instance.drifted"}),
                            frozenset({"*"}), "webhooks[0]")
    assert first.wants("run.finished", "anyone") and not first.wants("instance.expired", "x")
    assert second.wants("instance.destroyed", "acme")
    assert second.wants("instance.destroyed", "other", "client-123")
    assert not second.wants("instance.destroyed", "other", "client-9")
    assert load(tmp, "[defaults]\nmax_runs_per_tenant = 1\n").webhooks == ()


W = '[[webhooks]]\nurl = "https://h.example/"\nsecret = "env:S"\nevents = ["run.finished"]\n' \
    'tenants = ["*"]\n'
BAD = [
    ('[webhooks]\nurl = "https://h.example/"',
     "webhooks: must be an array of tables ([[webhooks]])"),
    (W.replace('url = "https://h.example/"\n', ""),
     "webhooks[0].url: missing (a webhook needs url, secret, events and tenants)"),
    (W + "retries = 3\n",
     "webhooks[0].retries: unknown key (expected url, secret, events, tenants)"),
    (W.replace("https://h.example/", "ftp://h.example/"), "webhooks[0].url: must be an https URL"),
    (W.replace('"https://h.example/"', "42"), "webhooks[0].url: must be an https URL"),
    (W.replace("https://h.example/", "https:///path"), "webhooks[0].url: must be an https URL"),
    (W.replace("https://h.example/", "https://h.example:99999/"),
     "webhooks[0].url: is not a URL"),
    (W.replace("https://h.example/", "https://u:p@h.example/"),
     "webhooks[0].url: must not carry credentials (user:password@); the receiver checks the "
     "signature instead"),
    (W.replace('"env:S"', f'"{SECRET}"'),
     'webhooks[0].secret: must be "env:NAME": the secret is read from the environment, '
     "never written in the file"),
    (W.replace('"env:S"', '"env:1-no"'),
     'webhooks[0].secret: must be "env:NAME" with NAME an environment variable (letters, '
     "digits, _)"),
    (W.replace('["run.finished"]', '["run.finished", "run.started"]'),
     "webhooks[0].events[1]: unknown event (expected run.finished, run.awaiting_approval, "
     "instance.drifted, instance.expired, instance.destroyed)"),
    (W.replace('["run.finished"]', "[]"),
     "webhooks[0].events: must be a non-empty array of events (run.finished, "
     "run.awaiting_approval, instance.drifted, instance.expired, instance.destroyed)"),
    (W.replace('["run.finished"]', '["run.finished", "run.finished"]'),
     "webhooks[0].events[1]: repeats events[0]"),
    (W.replace('["*"]', '["*", "acme"]'),
     'webhooks[0].tenants[0]: "*" already means every tenant: list it alone'),
    (W.replace('["*"]', '[""]'),
     'webhooks[0].tenants[0]: must be ["*"] (every tenant) or a non-empty array of tenant '
     "names or client ids"),
    (W.replace('["*"]', '"*"'),
     'webhooks[0].tenants: must be ["*"] (every tenant) or a non-empty array of tenant '
     "names or client ids"),
    (W + W.replace("[[webhooks]]\n", "[[webhooks]]\n"), "webhooks[1].url: repeats webhooks[0]"),
]


@pytest.mark.parametrize(("text", "line"), BAD, ids=[line.split(":")[0] for _, line in BAD])
def test_each_fault_is_one_line(tmp: Path, text: str, line: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp, text)
    assert str(caught.value) == f"{tmp / 'policy.toml'}: {line}"
    assert SECRET not in str(caught.value)


def test_secrets_come_from_the_environment_at_start(tmp: Path) -> None:
    webhooks = load(tmp, GOOD).webhooks
    allow = AllowList.parse(["127.0.0.1"])
    env = {"HOOK_SECRET": SECRET, "OTHER": base64.b64encode(os.urandom(32)).decode()}
    targets = targets_from_policy(webhooks, env, allow)
    assert [t.webhook.url for t in targets] == [w.url for w in webhooks]
    assert SECRET not in repr(targets)
    with pytest.raises(ConfigError, match=r"^webhooks\[1\]\.secret: environment variable "
                                          r"OTHER is not set$"):
        targets_from_policy(webhooks, {"HOOK_SECRET": SECRET}, allow)
    with pytest.raises(ConfigError, match=r"^webhooks\[0\]\.secret: environment variable "
                                          r"HOOK_SECRET is not a base64 secret"):
        targets_from_policy(webhooks, {**env, "HOOK_SECRET": "not base64!"}, allow)
    with pytest.raises(ConfigError, match=r"^webhooks\[1\]\.url: must be an https URL \(http "
                                          r"only to a host TFSERVER_WEBHOOK_ALLOW names\)$"):
        targets_from_policy(webhooks, env, AllowList())
    assert check_secret(SECRET) == check_secret(SECRET.removeprefix("whsec_"))
    with pytest.raises(ValueError, match="too short"):
        check_secret(base64.b64encode(b"short").decode())


def test_the_settings() -> None:
    config = load_config([], {"TFSERVER_WEBHOOK_ALLOW": "127.0.0.1, Hooks.Internal,10.0.0.0/8",
                              "TFSERVER_WEBHOOK_RETRY": "2h"})
    assert config.webhook_retry == 7200.0
    assert config.webhook_allow == ("10.0.0.0/8", "127.0.0.1", "hooks.internal")
    allow = AllowList.parse(config.webhook_allow)
    assert allow.names("HOOKS.internal.") and allow.names("10.2.3.4")
    assert not allow.names("127.0.0.2") and not allow.names("other.internal")
    assert load_config([], {}).webhook_retry == 86400.0
    with pytest.raises(ConfigError, match=r"^TFSERVER_WEBHOOK_ALLOW must be host names, "
                                          r"addresses or CIDRs; 'a b' is none of them"):
        load_config([], {"TFSERVER_WEBHOOK_ALLOW": "a b"})


# -- the address rules -------------------------------------------------------------------

@pytest.mark.parametrize(("address", "why"), [
    ("8.8.8.8", None), ("2606:4700::1111", None),
    ("127.0.0.1", "a loopback address"), ("::1", "a loopback address"),
    ("10.0.0.1", "a private address"), ("192.168.1.1", "a private address"),
    ("fd00::1", "a private address"), ("169.254.1.1", "a link-local address"),
    ("fe80::1", "a link-local address"), ("169.254.169.254", "a cloud metadata address"),
    ("fd00:ec2::254", "a cloud metadata address"), ("224.0.0.1", "a multicast address"),
    ("0.0.0.0", "an unspecified address"),
    ("240.0.0.1", "a private address"), ("100.64.0.1", "not a public address"),
    ("::ffff:10.0.0.1", "a private address"), ("::ffff:127.0.0.1", "a loopback address"),
])
def test_which_addresses_are_refused(address: str, why: str | None) -> None:
    assert why_refused(ipaddress.ip_address(address)) == why


def answers(*addresses: str) -> Resolve:
    def resolve(host: str, port: int) -> Sequence[tuple[object, ...]]:
        return [(2, 1, 6, "", (a, port)) for a in addresses]
    return resolve


def test_the_checked_address_is_the_one_connected_to() -> None:
    allow = AllowList.parse(["10.1.0.0/16", "hooks.internal"])
    found = endpoint("https://example.com/x?y=1", allow, answers("10.0.0.1", "93.184.215.14"))
    assert found == Endpoint("https", "example.com", 443, "/x?y=1", "93.184.215.14")
    assert endpoint("https://a.example/", allow, answers("10.1.2.3")).address == "10.1.2.3"
    assert endpoint("http://hooks.internal:81/", allow,
                    answers("127.0.0.5")).address == "127.0.0.5"


# -- a receiver on loopback, and the notifier over a local object store ---------------------

@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 that answers `statuses` in turn (then 204), optionally
    holding each answer until `release` is set; it records every request."""

    statuses: list[int] = field(default_factory=list)
    hold: bool = False
    location: str = ""
    release: threading.Event = field(default_factory=threading.Event)
    answered: threading.Event = field(default_factory=threading.Event)
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    arrived: threading.Condition = field(default_factory=threading.Condition)
    port: int = 0

    def wait_for(self, count: int) -> None:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.requests) >= count, WAIT), \
                f"{len(self.requests)} requests arrived, not {count}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


@pytest.fixture()
def receivers() -> Iterator[Any]:
    servers: list[http.server.ThreadingHTTPServer] = []

    def make(tls: tuple[Path, Path] | None = None, **kwargs: Any) -> Receiver:
        receiver = Receiver(**kwargs)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.arrived:
                    receiver.requests.append((dict(self.headers.items()), body))
                    receiver.arrived.notify_all()
                if receiver.hold:
                    receiver.release.wait(WAIT)
                status = receiver.statuses.pop(0) if receiver.statuses else 204
                self.send_response(status)
                if receiver.location:
                    self.send_header("Location", receiver.location)
                self.send_header("Content-Length", "0")
                self.end_headers()
                receiver.answered.set()

            def log_message(self, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        receiver.port = server.server_address[1]
        return receiver

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


class Audit(logging.Handler):
    """The audit lines of webhooks that ended, and an event set by each."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[logging.LogRecord] = []
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) == "webhook":
            self.lines.append(record)
            self.seen.set()


@pytest.fixture()
def audit() -> Iterator[Audit]:
    handler = Audit()
    log = logging.getLogger("tfserver.audit")
    log.addHandler(handler)
    yield handler
    log.removeHandler(handler)


@pytest.fixture()
def notifiers(tmp: Path) -> Iterator[Any]:
    made: list[Notifier] = []

    def make(url: str, *, allow: Sequence[str] = ("127.0.0.1",), retry: float = 60.0,
             first_delay: float = 0.01, store: Path | None = None, **kwargs: Any) -> Notifier:
        webhook = Webhook(url, "S", frozenset(EVENTS), frozenset({"*"}), "webhooks[0]")
        notifier = Notifier(Deliveries(LocalObjects(store or tmp / "objects")),
                            [Target(webhook, Signer(SECRET))], replica=f"r{len(made)}",
                            retry=retry, allow=AllowList.parse(allow),
                            first_delay=first_delay, timeout=kwargs.pop("timeout", 2.0),
                            poll=kwargs.pop("poll", 0.2), **kwargs)
        made.append(notifier)
        notifier.start()
        return notifier

    yield make
    for notifier in made:
        notifier.close()


def record(**changes: Any) -> RunRecord:
    return RunRecord(id="run-1", module="demo", instance="prod", workspace="prod",
                     tenant="acme", subject="s", operation="apply", status="succeeded",
                     changes={"add": 2, "change": 0, "remove": 1},
                     outputs={"password": "hunter2-output"}, client_id="client-1", **changes)


def test_a_delivery_is_signed_per_standard_webhooks(receivers: Any, notifiers: Any) -> None:
    receiver = receivers()
    notifier = notifiers(receiver.url)
    [delivery_id] = notifier.run_finished(record())
    receiver.wait_for(1)
    headers, body = receiver.requests[0]
    payload = Verifier(SECRET).verify(body, headers)
    assert headers["webhook-id"] == delivery_id and delivery_id.startswith("msg_")
    assert headers["Content-Type"] == "application/json"
    assert payload["type"] == "run.finished" and payload["timestamp"].endswith("Z")
    assert payload["data"] == {
        "run_id": "run-1", "module": "demo", "instance": "prod", "tenant": "acme",
        "operation": "apply", "status": "succeeded",
        "changes": {"add": 2, "change": 0, "remove": 1},
        "links": {"run": "/runs/run-1", "instance": "/demo/prod"}}
    assert b"hunter2" not in body
    tampered = {**headers, "webhook-id": "msg_other"}
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Verifier(SECRET).verify(body, tampered)


def test_events_and_tenants_filter(receivers: Any, notifiers: Any) -> None:
    receiver = receivers()
    notifier = notifiers(receiver.url)
    assert notifier.notify("instance.drifted", {"x": 1}, "acme") == []  # not subscribed
    assert len(notifier.notify("instance.expired", {"x": 1}, "acme")) == 1


def test_failing_twice_then_succeeding_gets_one_id(receivers: Any, notifiers: Any,
                                                   tmp: Path) -> None:
    receiver = receivers(statuses=[500, 503])
    metrics = Metrics()
    notifier = notifiers(receiver.url, metrics=metrics)
    [delivery_id] = notifier.run_finished(record())
    receiver.wait_for(3)
    notifier.close()
    ids = [h["webhook-id"] for h, _ in receiver.requests]
    assert ids == [delivery_id] * 3
    for headers, body in receiver.requests:
        Verifier(SECRET).verify(body, headers)
    assert len({body for _, body in receiver.requests}) == 1
    text = metrics.render().decode()
    assert 'tfserver_webhook_deliveries_total{event="run.finished",result="retried"} 2.0' in text
    assert 'tfserver_webhook_deliveries_total{event="run.finished",result="delivered"} 1.0' \
        in text
    assert LocalObjects(tmp / "objects").keys(PENDING) == []


def test_a_receiver_that_never_answers_does_not_hold_the_caller(receivers: Any,
                                                               notifiers: Any) -> None:
    receiver = receivers(hold=True)
    notifier = notifiers(receiver.url)
    try:
        notifier.run_finished(record())
        assert not receiver.answered.is_set()  # notify returned before any answer
        receiver.wait_for(1)
        assert not receiver.answered.is_set()
    finally:
        receiver.release.set()


def test_an_attempt_ends_at_its_deadline(receivers: Any, notifiers: Any) -> None:
    """A receiver that holds its answer past the attempt's deadline fails the attempt; the
    retry comes while the first request still hangs."""
    receiver = receivers(hold=True)
    notifier = notifiers(receiver.url, timeout=0.3)
    try:
        notifier.notify("run.finished", {"x": 1}, "acme")
        receiver.wait_for(2)
        assert not receiver.answered.is_set()
    finally:
        receiver.release.set()


def test_https_is_verified_against_the_urls_host_at_the_checked_address(
        receivers: Any, notifiers: Any, tmp: Path, audit: Audit) -> None:
    """The name resolves (here, by an injected resolver) to an allowed address; the
    connection goes to that address, and TLS checks the certificate for the name."""
    cert, key = self_signed(["hooks.test"], tmp, "hooks")
    receiver = receivers(tls=(cert, key))
    trusted = ssl.create_default_context(cafile=str(cert))
    url = f"https://hooks.test:{receiver.port}/hook"
    good = notifiers(url, resolve=answers("127.0.0.1"), context=trusted)
    [delivery_id] = good.notify("run.finished", {"x": 1}, "acme")
    receiver.wait_for(1)
    headers, body = receiver.requests[0]
    assert headers["Host"] == f"hooks.test:{receiver.port}"
    assert headers["webhook-id"] == delivery_id
    Verifier(SECRET).verify(body, headers)
    good.close()
    untrusted = notifiers(url, resolve=answers("127.0.0.1"), retry=0.2, first_delay=0.05,
                          store=tmp / "other")
    untrusted.notify("run.finished", {"x": 1}, "acme")
    assert audit.seen.wait(WAIT)
    assert "CERTIFICATE_VERIFY_FAILED" in audit.lines[0].outcome["reason"]  # type: ignore[attr-defined]
    assert len(receiver.requests) == 1


def test_a_restart_mid_retry_still_delivers(receivers: Any, notifiers: Any, tmp: Path) -> None:
    receiver = receivers(statuses=[500])
    first = notifiers(receiver.url, first_delay=3600.0, retry=86400.0)
    [delivery_id] = first.run_finished(record())
    receiver.wait_for(1)
    first.close()  # its retry is an hour away
    assert len(LocalObjects(tmp / "objects").keys(PENDING)) == 1
    notifiers(receiver.url, first_delay=0.01)  # a new process over the same store
    receiver.wait_for(2)
    assert [h["webhook-id"] for h, _ in receiver.requests] == [delivery_id] * 2


@dataclass
class Recorder:
    """A transport that records where it would connect, and answers `status`."""

    status: int = 500
    calls: list[Endpoint] = field(default_factory=list)

    def __call__(self, target: Endpoint, body: bytes, headers: dict[str, str], *,
                 timeout: float, context: ssl.SSLContext) -> Answer:
        self.calls.append(target)
        return Answer(self.status)


@pytest.mark.parametrize(("url", "target", "reason"), [
    ("https://10.0.0.1/hook", "https://10.0.0.1:443", "10.0.0.1 is a private address"),
    ("https://127.0.0.1:9/hook", "https://127.0.0.1:9", "127.0.0.1 is a loopback address"),
    ("https://169.254.169.254/latest/hook", "https://169.254.169.254:443",
     "169.254.169.254 is a cloud metadata address"),
    ("https://localhost:9/hook", "https://localhost:9", "is a loopback address"),
])
def test_private_and_loopback_targets_are_refused_before_connecting(
        notifiers: Any, audit: Audit, url: str, target: str, reason: str) -> None:
    recorder = Recorder()
    metrics = Metrics()
    notifier = notifiers(url, allow=(), transport=recorder, metrics=metrics)
    [delivery_id] = notifier.notify("run.finished", {"x": 1}, "acme")
    assert audit.seen.wait(WAIT)
    [line] = audit.lines
    assert recorder.calls == []
    assert line.levelno == logging.WARNING
    assert line.what == {"delivery": delivery_id,  # type: ignore[attr-defined]
                         "webhook_event": "run.finished", "target": target, "tenant": "acme"}
    assert line.outcome["result"] == "refused"  # type: ignore[attr-defined]
    assert reason in line.outcome["reason"]  # type: ignore[attr-defined]
    assert "/hook" not in line.getMessage() and SECRET not in line.getMessage()
    assert 'result="refused"} 1.0' in metrics.render().decode()


def test_the_address_is_checked_again_at_every_attempt(notifiers: Any, audit: Audit) -> None:
    """A name that resolved to an allowed address, then to a private one (rebinding), is
    refused at the next attempt without connecting to it."""
    recorder = Recorder(status=500)
    seen: list[str] = []

    def resolve(host: str, port: int) -> Sequence[tuple[object, ...]]:
        seen.append(host)
        return answers("93.184.215.14" if len(seen) == 1 else "10.0.0.1")(host, port)

    notifier = notifiers("https://hooks.example/x", allow=(), transport=recorder,
                         resolve=resolve)
    notifier.notify("run.finished", {"x": 1}, "acme")
    assert audit.seen.wait(WAIT)
    assert [c.address for c in recorder.calls] == ["93.184.215.14"]
    assert recorder.calls[0].host == "hooks.example"
    assert seen == ["hooks.example", "hooks.example"]
    assert "10.0.0.1 is a private address" in audit.lines[0].outcome["reason"]  # type: ignore[attr-defined]


def test_a_redirect_is_not_followed(receivers: Any, notifiers: Any, audit: Audit) -> None:
    elsewhere = receivers()
    receiver = receivers(statuses=[302] * 50, location=elsewhere.url)
    notifier = notifiers(receiver.url, retry=0.5, first_delay=0.05)
    notifier.notify("run.finished", {"x": 1}, "acme")
    assert audit.seen.wait(WAIT)
    assert elsewhere.requests == [] and len(receiver.requests) >= 1
    outcome = audit.lines[0].outcome  # type: ignore[attr-defined]
    assert outcome["result"] == "gave_up"
    assert "answered 302 (a redirect: not followed)" in outcome["reason"]


def test_a_delivery_is_given_up_after_the_retry_window(receivers: Any, notifiers: Any,
                                                       audit: Audit) -> None:
    receiver = receivers(statuses=[500] * 50)
    metrics = Metrics()
    notifier = notifiers(receiver.url, retry=0.3, first_delay=0.02, metrics=metrics)
    [delivery_id] = notifier.notify("instance.expired", {"x": 1}, "acme")
    assert audit.seen.wait(WAIT)
    [line] = audit.lines
    assert line.what["delivery"] == delivery_id  # type: ignore[attr-defined]
    assert line.outcome["result"] == "gave_up"  # type: ignore[attr-defined]
    assert "answered 500" in line.outcome["reason"]  # type: ignore[attr-defined]
    assert 'event="instance.expired",result="gave_up"} 1.0' in metrics.render().decode()


# -- several replicas: each attempt is claimed once ---------------------------------------

def test_a_second_replica_does_not_send_an_attempt_in_flight(receivers: Any, notifiers: Any,
                                                             tmp: Path) -> None:
    receiver = receivers(hold=True)
    sender = notifiers(receiver.url)
    other = Notifier(Deliveries(LocalObjects(tmp / "objects")), sender.targets,
                     replica="other", retry=60.0, allow=sender.allow, first_delay=0.01)
    try:
        sender.notify("run.finished", {"x": 1}, "acme")
        receiver.wait_for(1)
        assert other.run_once() > 0  # it sees attempt 1 claimed, and waits
    finally:
        receiver.release.set()
    sender.close()
    other.run_once()
    other.close()
    assert len(receiver.requests) == 1
    assert LocalObjects(tmp / "objects").keys(PENDING) == []


def test_each_attempt_is_claimed_by_one_replica(tmp: Path) -> None:
    objects = Deliveries(LocalObjects(tmp / "objects"))
    delivery = Delivery("msg_1", "run.finished", "https://h.example/", "S", "acme", 0.0, "{}")
    objects.add(delivery)
    assert objects.claim("msg_1", Attempt(1, "a", 1.0))
    assert not objects.claim("msg_1", Attempt(1, "b", 1.0))
    assert objects.attempts("msg_1") == ([Attempt(1, "a", 1.0)], False)
    assert objects.end("msg_1") and not objects.end("msg_1")
    objects.forget(delivery)
    assert objects.pending() == [] and objects.attempts("msg_1") == ([], False)


def test_the_schedule_doubles_with_jitter_within_the_window() -> None:
    backoff = Backoff(first=5.0, maximum=3600.0, window=86400.0, stale=15.0)
    delays = [backoff.delay("msg_1", n) for n in range(1, 20)]
    assert 2.5 <= delays[0] <= 5.0
    assert all(0.5 * min(3600, 5 * 2 ** i) <= d <= min(3600, 5 * 2 ** i)
               for i, d in enumerate(delays))
    assert delays == [backoff.delay("msg_1", n) for n in range(1, 20)]  # every replica
    assert backoff.delay("msg_2", 1) != delays[0]
    d = Delivery("msg_1", "run.finished", "https://h.example/", "S", None, 1000.0, "{}")
    failed = Attempt(1, "a", 1000.0, "failed", 1001.0, "answered 500")
    assert next_step(d, [], False, 1000.0, backoff).kind == "send"
    assert next_step(d, [failed], False, 1001.0, backoff).kind == "wait"
    assert next_step(d, [failed], False, 1001.0 + delays[0], backoff).attempt == 2
    running = Attempt(2, "a", 2000.0)
    assert next_step(d, [failed, running], False, 2001.0, backoff).kind == "wait"
    assert next_step(d, [failed, running], False, 2016.0, backoff).kind == "send"
    late = Attempt(9, "a", 87000.0, "failed", 87001.0, "answered 500")
    assert next_step(d, [late], False, 87001.0, backoff).kind == "give_up"
    assert next_step(d, [failed], True, 1001.0, backoff).kind == "forget"


def test_a_payload_carries_no_value() -> None:
    payload = run_finished(record(), 0.0)
    assert "hunter2" not in json.dumps(payload)
    assert payload["timestamp"] == "1970-01-01T00:00:00.000Z"


# -- the server, end to end ----------------------------------------------------------------

def test_a_server_signs_run_finished_for_its_runs(receivers: Any, tmp: Path,
                                                  terraform_bin: str) -> None:
    from standardwebhooks import Webhook as Verifier

    from support import start_server

    receiver = receivers()
    policy = tmp / "policy.toml"
    policy.write_text(f'[[webhooks]]\nurl = "{receiver.url}"\nsecret = "env:HOOK_SECRET"\n'
                      'events = ["run.finished"]\ntenants = ["*"]\n')
    server = start_server(tmp, env={"TFSERVER_POLICY": str(policy), "HOOK_SECRET": SECRET,
                                    "TFSERVER_WEBHOOK_ALLOW": "127.0.0.1"})
    try:
        r = server.request("PUT", "/basic/hooked", {"name": "hook-value-7d1"})
        assert r.status == 201, r.body
        receiver.wait_for(1)
        headers, body = receiver.requests[0]
        event = Verifier(SECRET).verify(body, headers)
        assert event["type"] == "run.finished"
        assert event["data"]["run_id"] == r.json["run_id"]
        assert event["data"]["status"] == "succeeded"
        assert b"hook-value-7d1" not in body  # ids, statuses and counts, never a value
        assert SECRET not in server.log_text()
    finally:
        server.stop()
