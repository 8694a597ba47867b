"""Event streams cannot starve the server (issue 20 §4): a cap on each tenant's open
streams, a bound on a stream's life (ended resumably), and connections kept for
`/healthz` and `/readyz` however the others are held. Behind the platform's proxy, as
deployed: the per-address cap off, the proxy trusted."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from support import Jwks, ServerProcess, Signer, bearer, start_server
from test_runs import ASYNC, MODULES, body, wait_run, wait_sleeping

CAP = 3
SSE = {"Accept": "text/event-stream"}
DEPLOYED = {"TFSERVER_MAX_CONNECTIONS_PER_IP": "0", "TFSERVER_TRUSTED_PROXIES": "127.0.0.0/8",
            "TFSERVER_MAX_STREAMS_PER_TENANT": str(CAP), "TFSERVER_MAX_RUNS": "1"}


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer("key-streams")


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory, signer: Signer, terraform_bin: str
           ) -> Iterator[tuple[ServerProcess, dict[str, str], str]]:
    """A server with auth (two tenants), 12 connections, streams that last long, and a
    run of tenant A kept queued behind a slow one: (server, A's headers, the run's id)."""
    jwks = Jwks()
    jwks.publish(signer)
    tmp = tmp_path_factory.mktemp("capped")
    server = start_server(tmp, modules_dir=MODULES, env={
        **DEPLOYED, "COGNITO_ISSUER": Signer.ISSUER, "JWK_URL": jwks.url,
        "TFSERVER_MAX_CONNECTIONS": "12", "TFSERVER_STREAM_MAX": "120",
        "TFSERVER_KILL_GRACE": "2"})
    a = bearer(signer.token("client-a", "tfserver/steps.write"))
    blocker = start(server, "/steps/block", body(61), a)
    wait_sleeping("61")
    queued = start(server, "/steps/queued", body(0), a)
    try:
        yield server, a, queued
    finally:
        for run_id in (queued, blocker):
            server.request("POST", f"/runs/{run_id}/cancel?force=true", headers=a)
        server.stop()
        jwks.close()


@pytest.fixture(scope="module")
def short(tmp_path_factory: pytest.TempPathFactory, terraform_bin: str
          ) -> Iterator[ServerProcess]:
    """A server (auth off) whose streams last 2 s."""
    tmp = tmp_path_factory.mktemp("short")
    server = start_server(tmp, modules_dir=MODULES, env={
        **DEPLOYED, "TFSERVER_STREAM_MAX": "2", "TFSERVER_KILL_GRACE": "2"})
    yield server
    server.stop()


def start(server: ServerProcess, path: str, doc: dict[str, Any],
          headers: dict[str, str] | None = None) -> str:
    r = server.request("PUT", path, doc, headers={**ASYNC, **(headers or {})})
    assert r.status == 202, r.body
    return str(r.json["id"])


def address(server: ServerProcess) -> tuple[str, int]:
    host, port = server.url.split("//")[1].split(":")
    return host, int(port)


def open_stream(server: ServerProcess, run_id: str, headers: dict[str, str],
                sse: bool = True) -> tuple[int, socket.socket]:
    """Open an events stream on a raw socket: (the status, the socket after the head)."""
    s = socket.create_connection(address(server), timeout=10)
    fields = {"Host": "x", **(SSE if sse else {}), **headers}
    s.sendall(f"GET /runs/{run_id}/events HTTP/1.1\r\n".encode() + b"".join(
        f"{k}: {v}\r\n".encode() for k, v in fields.items()) + b"\r\n")
    head = b""
    with contextlib.suppress(ConnectionError, TimeoutError):
        while b"\r\n\r\n" not in head and (chunk := s.recv(1)):
            head += chunk
    return (int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else 0), s


def until_admitted(server: ServerProcess, run_id: str, headers: dict[str, str],
                   timeout: float = 30) -> socket.socket:
    """Open a stream, retrying while it is refused with 429 (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        status, s = open_stream(server, run_id, headers)
        if status == 200:
            return s
        s.close()
        assert status == 429 and time.monotonic() < deadline, status
        time.sleep(0.5)


def read_to_end(s: socket.socket, timeout: float = 30) -> bytes:
    """Everything until the server closes or ends the chunked body (bounded)."""
    s.settimeout(timeout)
    got = b""
    with contextlib.suppress(ConnectionError, TimeoutError):
        while not got.endswith(b"0\r\n\r\n") and (chunk := s.recv(65536)):
            got += chunk
    return got


# -- 1. a cap on each tenant's streams ---------------------------------------------------


def test_streams_past_the_tenant_cap_are_429_and_a_closed_one_frees_its_place(
        capped: tuple[ServerProcess, dict[str, str], str]) -> None:
    server, a, run_id = capped
    places_back(server, run_id, a)
    held = [until_admitted(server, run_id, a) for _ in range(CAP)]
    try:
        extra = server.request("GET", f"/runs/{run_id}/events", headers={**a, **SSE},
                               timeout=10)
        assert extra.status == 429, extra.body[:200]
        assert extra.header("Retry-After") and int(extra.header("Retry-After") or 0) > 0
        problem = extra.json
        assert problem["limit"] == CAP and "TFSERVER_MAX_STREAMS_PER_TENANT" in \
            problem["detail"]
        held.pop().close()  # a client leaves: its place comes back (bounded wait)
        held.append(until_admitted(server, run_id, a))
    finally:
        for s in held:
            s.close()


# -- 2. health checks find a connection whoever holds the others --------------------------


def idle_connection(server: ServerProcess) -> tuple[socket.socket, bytes]:
    """A keep-alive connection that made one request and now idles: (it, the answer)."""
    s = socket.create_connection(address(server), timeout=10)
    got = b""
    with contextlib.suppress(ConnectionError):
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        while b"}" not in got and (chunk := s.recv(4096)):
            got += chunk
    return s, got


def places_back(server: ServerProcess, run_id: str, a: dict[str, str]) -> None:
    """Wait (bounded) until an ordinary request is served again: the streams a test
    before closed hold their places until their threads notice (at their next write),
    and meanwhile a new request gets a kept place, and a 503."""
    deadline = time.monotonic() + 30
    while server.request("GET", f"/runs/{run_id}", headers=a, timeout=10).status == 503:
        assert time.monotonic() < deadline, "the places of closed streams stayed taken"
        time.sleep(0.2)


def fill(server: ServerProcess, run_id: str, a: dict[str, str]) -> list[socket.socket]:
    """Take every ordinary place: the tenant's streams, then idle keep-alive connections
    until one is answered on a kept place (closed after its answer) or refused."""
    places_back(server, run_id, a)
    held = [until_admitted(server, run_id, a) for _ in range(CAP)]
    for _ in range(16):
        s, answer = idle_connection(server)
        held.append(s)
        if not answer.startswith(b"HTTP/1.1 200") or b"Connection: close" in answer:
            return held
    raise AssertionError("the connections never ran out")


def test_health_checks_answer_while_streams_and_idle_clients_hold_every_connection(
        capped: tuple[ServerProcess, dict[str, str], str]) -> None:
    server, a, run_id = capped
    held: list[socket.socket] = []
    try:
        held += fill(server, run_id, a)
        other = server.request("GET", "/runs", headers=a, timeout=10)
        assert other.status == 503 and other.header("Retry-After") == "1", other.body[:200]
        assert "only /healthz and /readyz" in other.json["detail"]
        # More checks than places kept, each on a new connection at once: each place is
        # given back before its answer is written (not when its thread ends, later).
        for _ in range(15):
            for path in ("/healthz", "/readyz"):
                assert server.request("GET", path, timeout=10).status == 200, path
    finally:
        for s in held:
            s.close()


def test_silent_clients_on_the_kept_places_give_them_back_soon(
        capped: tuple[ServerProcess, dict[str, str], str]) -> None:
    server, a, run_id = capped
    held: list[socket.socket] = []
    try:
        held += fill(server, run_id, a)
        silent = [socket.create_connection(address(server), timeout=20) for _ in range(4)]
        held += silent
        # The silent ones hold the kept places for a few seconds only (the ordinary
        # places stay taken for the 30 s request timeout): health checks come back.
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(ConnectionError, http.client.HTTPException):
                if server.request("GET", "/healthz", timeout=10).status == 200:
                    break
            assert time.monotonic() < deadline, "the kept places stayed taken"
            time.sleep(0.2)
        for s in silent:
            with contextlib.suppress(ConnectionError):
                assert s.recv(1) == b""  # cut by the server, not left open
    finally:
        for s in held:
            s.close()


# -- 3. a stream's life is bounded, and resumes without loss or repeat --------------------


def follow(server: ServerProcess, run_id: str, sse: bool) -> tuple[list[int], int, bytes]:
    """Follow a run to its `finished` event through cut streams, resuming each time:
    (every seq in order of arrival, how many streams it took, the first one's end)."""
    seqs: list[int] = []
    kinds: list[str] = []
    streams, first_tail = 0, b""
    deadline = time.monotonic() + 90
    while not kinds or kinds[-1] != "finished":
        assert time.monotonic() < deadline, seqs
        after = {"Last-Event-ID": str(seqs[-1])} if sse and seqs else {}
        query = f"?after={seqs[-1]}" if not sse and seqs else ""
        r = server.request("GET", f"/runs/{run_id}/events{query}",
                           headers={**(SSE if sse else {}), **after}, timeout=30)
        assert r.status == 200, r.body[:200]
        streams += 1
        first_tail = first_tail or r.body[-200:]
        if sse:
            frames = [f.split("\n") for f in r.body.decode().split("\n\n")
                      if f.startswith("id: ")]
            seqs += [int(f[0][4:]) for f in frames]
            kinds += [f[1].removeprefix("event: ") for f in frames]
        else:
            events = [json.loads(line) for line in r.body.splitlines()]
            seqs += [e["seq"] for e in events]
            kinds += [e["type"] for e in events]
    return seqs, streams, first_tail


def test_a_stream_past_its_life_ends_and_resumes_without_loss_or_repeat(
        short: ServerProcess) -> None:
    run_id = start(short, "/steps/life", body(1.5, "life"))
    results: dict[bool, tuple[list[int], int, bytes]] = {}

    def run(sse: bool) -> None:
        results[sse] = follow(short, run_id, sse)

    threads = [threading.Thread(target=run, args=(sse,)) for sse in (True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert wait_run(short, run_id)["status"] == "succeeded"
    everything = [json.loads(line)["seq"] for line in short.request(
        "GET", f"/runs/{run_id}/events", timeout=30).body.splitlines()]
    assert everything == list(range(1, len(everything) + 1))
    for sse in (True, False):
        seqs, streams, tail = results[sse]
        assert seqs == everything, (sse, seqs)
        assert streams >= 2, (sse, streams)  # the first stream was cut, then resumed
        if sse:
            assert b"retry: " in tail  # the EventSource is told to come back


# -- 6. hostile clients --------------------------------------------------------------------


def test_many_streams_opened_and_dropped_at_once_give_every_place_back(
        capped: tuple[ServerProcess, dict[str, str], str]) -> None:
    server, a, run_id = capped
    statuses: list[int] = []

    def grab() -> None:
        try:
            status, s = open_stream(server, run_id, a)
        except OSError:
            statuses.append(0)  # refused at the connection cap (12 here)
            return
        statuses.append(status)
        s.close()

    threads = [threading.Thread(target=grab) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # 503 and 0: a connection past the (small) connection cap, on a kept place or refused.
    assert len(statuses) == 20 and set(statuses) <= {200, 429, 503, 0}, statuses
    assert 429 in statuses or statuses.count(200) == CAP, statuses
    assert statuses.count(200) <= CAP, statuses  # never more than the cap at once
    # Every dropped stream gave its place back: the full cap is open again (bounded).
    held = [until_admitted(server, run_id, a) for _ in range(CAP)]
    for s in held:
        s.close()
    assert server.request("GET", "/healthz", timeout=10).status == 200


def test_another_tenants_run_is_404_and_takes_no_place(
        capped: tuple[ServerProcess, dict[str, str], str], signer: Signer) -> None:
    server, a, run_id = capped
    b = bearer(signer.token("client-b", "tfserver/steps.write"))
    for _ in range(CAP + 2):  # B's refusals do not count against anyone
        status, s = open_stream(server, run_id, b)
        s.close()
        assert status == 404, status
    held = [until_admitted(server, run_id, a) for _ in range(CAP)]
    try:
        # A's cap is A's alone: B still streams a run of its own, and sees A's as 404.
        own = start(server, "/steps/b-own", body(0), b)
        status, s = open_stream(server, own, b)
        held.append(s)
        assert status == 200, status
        assert server.request("GET", f"/runs/{run_id}/events", headers={**b, **SSE},
                              timeout=10).status == 404
    finally:
        for s in held:
            s.close()


def test_a_stalled_or_half_closed_client_loses_its_stream_at_the_bound(
        short: ServerProcess) -> None:
    blocker = start(short, "/steps/stall-block", body(62))
    wait_sleeping("62")
    queued = start(short, "/steps/stall", body(0))
    try:
        stalled = [until_admitted(short, queued, {}) for _ in range(CAP - 1)]
        half = until_admitted(short, queued, {})
        half.shutdown(socket.SHUT_WR)  # says it is done sending; reads on
        assert open_stream(short, queued, {})[0] == 429
        # Neither holds its place past the bound (plus the follower's 15 s tick).
        again = until_admitted(short, queued, {}, timeout=40)
        again.close()
        for s in stalled:
            tail = read_to_end(s)
            assert tail.endswith(b"0\r\n\r\n") and b"retry: " in tail, tail[-200:]
            s.close()
        half.close()
    finally:
        for run_id in (queued, blocker):
            short.request("POST", f"/runs/{run_id}/cancel?force=true")


def test_streams_of_the_tenant_cap_count_only_open_streams() -> None:
    """The counters live on the server: two servers do not share them, and a stream's
    place is its tenant's only while the stream is open (the units of the counter)."""
    from tfserver.errors import TooManyStreams
    from tfserver.web.streams import StreamLimits

    limits = StreamLimits(2, 1.0)
    with limits.hold("t"), limits.hold("t"):
        with pytest.raises(TooManyStreams) as refused, limits.hold("t"):
            pass
        assert refused.value.status == 429 and refused.value.extra["limit"] == 2
        with limits.hold("u"):
            assert limits.open("t") == 2 and limits.open() == 3
    with pytest.raises(RuntimeError), limits.hold("t"):
        raise RuntimeError("a stream that ends by an error gives its place back")
    assert limits.open() == 0 and StreamLimits(2, 1.0).open() == 0


def test_the_places_kept_for_health_checks_are_taken_only_past_the_cap() -> None:
    from tfserver.web.connections import ConnectionLimits

    limits = ConnectionLimits(2, 0, 1)
    one, two, three, four = (("10.0.0.1", port) for port in (1, 2, 3, 4))
    assert limits.admit(one) is None and limits.admit(two) is None
    assert not limits.health_only(one) and not limits.health_only(two)
    assert limits.admit(three) is None and limits.health_only(three)  # past the cap
    refused = limits.admit(four)
    assert refused is not None and "kept for health checks" in refused
    limits.release(one)  # an ordinary place frees: the next one is ordinary again
    assert limits.admit(four) is None and not limits.health_only(four)
    limits.release(three)
    assert not limits.health_only(three) and limits.open() == 2
    limits.release(three)  # given back as its answer went out, then at its thread's end
    assert limits.open() == 2
    per_address = ConnectionLimits(10, 1, 4)
    assert per_address.admit(one) is None and per_address.admit(two) is not None
