"""moto's server with SQS receives made atomic, as real SQS's are (see FACTS.md).

moto's long poll copies the queue's in-flight message groups once, when the poll starts:
two consumers already waiting when two messages of one FIFO group arrive each get one, so
two messages of one group are in flight at once (real SQS never does this). Here every
receive is a short poll under one lock, and a long poll is a series of them.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from moto.server import main
from moto.sqs.models import SQSBackend

_receive = SQSBackend.receive_message
_lock = threading.Lock()


def receive_message(self: SQSBackend, queue_name: str, count: int,
                    wait_seconds_timeout: int, visibility_timeout: int,
                    message_attribute_names: list[str] | None = None) -> Any:
    """A receive that sees the queue as it is now, polled until the wait ends."""
    deadline = time.monotonic() + (wait_seconds_timeout or 0)
    while True:
        with _lock:
            found = _receive(self, queue_name, count, 0, visibility_timeout,
                             message_attribute_names)
        if found or time.monotonic() >= deadline:
            return found
        time.sleep(0.005)  # a real long poll answers at once: poll often


SQSBackend.receive_message = receive_message  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
