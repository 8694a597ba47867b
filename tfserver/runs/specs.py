"""The kept request of each run: what it was asked to do (its spec), so that it can be
run again (`POST /runs/{id}/retry`).

`_runs/requests/<id>.json` holds the spec's stored form (app/engine.py `spec_doc`:
inputs included, so it is kept like the state); it goes with the run's record
(`RunStore.delete`). It is written by a thread of its own, never on the run's path: a
run's answer does not wait for it, and a spec not written yet is read from memory.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from typing import Any

from ..errors import TFServerError
from ..storage.base import ObjectStore, json_object

logger = logging.getLogger(__name__)


def request_key(run_id: str) -> str:
    """Where a run's kept request is."""
    return f"_runs/requests/{run_id}.json"


class KeptRequests:
    """Writes run specs in the background and reads them back."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects
        self._todo: queue.Queue[str] = queue.Queue()
        self._pending: dict[str, bytes] = {}
        self._mutex = threading.Lock()
        self._thread: threading.Thread | None = None

    def keep(self, run_id: str, doc: dict[str, Any]) -> None:
        """Keep a run's spec (written soon, by the writer thread)."""
        data = json.dumps(doc, separators=(",", ":")).encode()
        with self._mutex:
            self._pending[run_id] = data
            if self._thread is None:
                self._thread = threading.Thread(target=self._write, name="kept-requests",
                                                daemon=True)
                self._thread.start()
        self._todo.put(run_id)

    def put(self, run_id: str, doc: dict[str, Any]) -> None:
        """Keep a run's spec now (an asynchronous run's, before its 202: a server that
        dies once the caller has the run's id leaves it kept)."""
        try:
            self.objects.put(request_key(run_id), json.dumps(doc, separators=(",", ":")).encode())
        except TFServerError as e:
            logger.warning("run %s: its request was not kept (no retry): %s", run_id, e.detail)

    def get(self, run_id: str) -> dict[str, Any] | None:
        """A run's kept spec, or None (never kept, damaged, or deleted)."""
        with self._mutex:
            data = self._pending.get(run_id)
        return json_object(data if data is not None else self.objects.get(request_key(run_id)))

    def _write(self) -> None:
        """Write each spec kept, in order (a failed write is logged: no retry of it)."""
        while True:
            run_id = self._todo.get()
            with self._mutex:
                data = self._pending.get(run_id)
            if data is None:
                continue
            try:
                self.objects.put(request_key(run_id), data)
            except TFServerError as e:
                logger.warning("run %s: its request was not kept (no retry): %s", run_id,
                               e.detail)
            with self._mutex:
                if self._pending.get(run_id) is data:
                    del self._pending[run_id]
