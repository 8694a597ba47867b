"""moto's server with SQS receives made atomic, as real SQS's are (see FACTS.md).

moto's long poll copies the queue's in-flight message groups once, when the poll starts:
two consumers already waiting when two messages of one FIFO group arrive each get one, so
two messages of one group are in flight at once (real SQS never does this). Here every
receive is a short poll under one lock, and a long poll is a series of them, each woken as
soon as a message is sent, deleted or made visible again (or after 50 ms, when a
visibility timeout may have run out): it answers about as soon as real SQS would, without
spinning.

Every other request runs under one lock, one at a time: moto checks a conditional write
(S3's `If-None-Match: *`, DynamoDB's condition expressions) and then writes, so two
writers of one key at once could both win, where real S3 and DynamoDB let exactly one.

A request sent again by an AWS SDK (the same `amz-sdk-invocation-id`, a later attempt) is
answered with what its first attempt was answered. Under load on this machine, the client
sometimes never gets an answer that moto sent for a request it carried out (the cause was
not found); the SDK then sends it again. A conditional write sent again then fails on its
own first write: a terraform that finds its own lock held (tfserver clears it where it
can tell: `app/ownlock.py`, tested through `tests/lossy_proxy.py`, which drops the id so
that moto carries out the second attempt). Here the second attempt gets the first
answer, as if it had arrived.
"""

from __future__ import annotations

import io
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import moto.server
from moto.server import main
from moto.sqs.models import SQSBackend

_receive = SQSBackend.receive_message
_lock = threading.Lock()
#: Held by every request but SQS's receives (which poll under `_lock`, and wait).
_one_at_a_time = threading.Lock()
#: The answers to the last requests, by their SDK invocation id (oldest first).
_answers: dict[str, tuple[str, list[Any], list[bytes]]] = {}
_changed = threading.Condition()


def receive_message(self: SQSBackend, queue_name: str, count: int,
                    wait_seconds_timeout: int, visibility_timeout: int,
                    message_attribute_names: list[str] | None = None) -> Any:
    """A receive that sees the queue as it is now, polled until the wait ends."""
    deadline = time.monotonic() + (wait_seconds_timeout or 0)
    while True:
        with _lock:
            found = _receive(self, queue_name, count, 0, visibility_timeout,
                             message_attribute_names)
        left = deadline - time.monotonic()
        if found or left <= 0:
            return found
        with _changed:
            _changed.wait(min(left, 0.05))


def _waking(method: Callable[..., Any]) -> Callable[..., Any]:
    """The backend's method, waking the waiting receives after it ran."""
    def call(self: SQSBackend, *args: Any, **kwargs: Any) -> Any:
        result = method(self, *args, **kwargs)
        with _changed:
            _changed.notify_all()
        return result
    return call


SQSBackend.receive_message = receive_message  # type: ignore[method-assign]
for _name in ("send_message", "send_message_batch", "delete_message",
              "delete_message_batch", "change_message_visibility",
              "change_message_visibility_batch"):
    setattr(SQSBackend, _name, _waking(getattr(SQSBackend, _name)))

def _serialised(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """`app` (moto's WSGI application) taking requests one at a time, SQS receives
    aside. The body is read first, so a slow sender holds nobody up."""
    def call(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if length:
            body = environ["wsgi.input"].read(length)
            environ["wsgi.input"] = io.BytesIO(body)
        else:
            body = b""
        receive = str(environ.get("HTTP_X_AMZ_TARGET", "")).endswith(".ReceiveMessage") \
            or "Action=ReceiveMessage" in str(environ.get("QUERY_STRING", "")) \
            or b"Action=ReceiveMessage" in body
        if receive:
            return list(app(environ, start_response))
        invocation = str(environ.get("HTTP_AMZ_SDK_INVOCATION_ID", ""))
        again = invocation and not str(environ.get("HTTP_AMZ_SDK_REQUEST", "attempt=1")
                                       ).startswith("attempt=1;")
        with _one_at_a_time:
            if again and invocation in _answers:
                status, headers, data = _answers[invocation]
                start_response(status, headers)
                return data
            kept: list[Any] = []

            def keep(status: str, headers: list[Any], *exc: Any) -> Any:
                kept[:] = [status, headers]
                return start_response(status, headers, *exc)

            data = list(app(environ, keep))
            if invocation and kept:
                _answers[invocation] = (kept[0], kept[1], data)
                while len(_answers) > 2000:
                    _answers.pop(next(iter(_answers)))
            return data
    return call


_run_simple = moto.server.run_simple


def run_simple(host: str, port: int, app: Any, **options: Any) -> None:
    """werkzeug's `run_simple`, serving `app` one request at a time (`_serialised`)."""
    _run_simple(host, port, _serialised(app), **options)


moto.server.run_simple = run_simple  # type: ignore[assignment]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
