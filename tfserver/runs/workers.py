"""A small pool of reusable threads for runs (a thread per run, kept a while)."""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


class Workers:
    """Threads for runs: an idle one takes the next job, else a new one starts; a thread
    idle for `idle_for` seconds ends. Starting a thread for every run cost about 0.2 ms
    before terraform could start. Each job runs in a fresh context (nothing of the one
    before it, such as a request id, carries over). `on_start` is called first in each
    new thread (the server's `Affinity.anywhere`)."""

    def __init__(self, name: str, idle_for: float = 60.0,
                 on_start: Callable[[], None] | None = None) -> None:
        self.name = name
        self.idle_for = idle_for
        self.on_start = on_start
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._mutex = threading.Lock()
        self._idle = 0
        self._started = 0

    def submit(self, job: Callable[[], None]) -> None:
        """Run `job` in a thread of the pool (at once: the pool has no limit of its own,
        the scheduler's run slots are the limit)."""
        with self._mutex:
            if self._idle:
                self._idle -= 1
                self._jobs.put(job)
                return
            self._started += 1
            name = f"{self.name}-{self._started}"
        threading.Thread(target=self._work, args=(job,), name=name, daemon=True).start()

    def _work(self, job: Callable[[], None]) -> None:
        if self.on_start is not None:
            self.on_start()
        while True:
            try:
                contextvars.Context().run(job)
            except Exception:  # a job's bug must not take the thread's next jobs with it
                logger.exception("a job of the %s threads failed", self.name)
            with self._mutex:
                self._idle += 1
            try:
                job = self._jobs.get(timeout=self.idle_for)
                continue
            except queue.Empty:
                pass
            with self._mutex:
                # A job may have been handed to this thread just as it timed out.
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    self._idle -= 1
                    return
