"""Prometheus metrics (prometheus_client), in a registry of the server's own.

Labels never carry a tenant or a raw path: `route` is the route template
(`/{module}/{instance}`), methods outside HTTP's own are counted as `other`, and modules
are the served ones (a fixed set).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

#: The content type of `render()`'s text format.
CONTENT_TYPE = CONTENT_TYPE_LATEST
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
#: Runs take seconds to many minutes (a droplet: about one).
_RUN_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                1800.0)


def method_label(method: str) -> str:
    """A request's method as metrics and log lines name it: one the API knows, else
    `other` (any token is a method: a client may send a bearer token there, or 64 KiB)."""
    return method if method in _METHODS else "other"


#: Label sets of answered requests whose metric children are kept (methods, routes and
#: statuses are each a bounded set: a few hundred at most).
_CHILDREN_KEPT = 2048


class Metrics:
    """Every metric of DESIGN.md's Operability section."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter("tfserver_http_requests_total",
                                     "HTTP requests answered", ["method", "route", "status"],
                                     registry=r)
        self.http_duration = Histogram("tfserver_http_request_duration_seconds",
                                       "Time to answer an HTTP request (a stream: to its end)",
                                       ["route"], registry=r)
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self.runs = Counter("tfserver_runs_total", "Runs that ended",
                            ["module", "operation", "status"], registry=r)
        self.run_duration = Histogram("tfserver_run_duration_seconds",
                                      "Time from a run's start to its end",
                                      ["module", "operation"], buckets=_RUN_BUCKETS,
                                      registry=r)
        self.running = Gauge("tfserver_runs_running", "Runs running on this replica",
                             registry=r)
        self.queued = Gauge("tfserver_runs_queued", "Runs queued on this replica",
                            registry=r)
        self.lock_conflicts = Counter("tfserver_lock_conflicts_total",
                                      "Requests refused because an instance was busy or "
                                      "its state locked", ["module"], registry=r)
        self.jwks_fetches = Counter("tfserver_jwks_fetches_total",
                                    "Fetches of the token signing keys", ["result"],
                                    registry=r)
        for result in ("ok", "error"):
            self.jwks_fetches.labels(result)  # shown at 0 before the first fetch
        self.module_ready = Gauge("tfserver_module_ready",
                                  "1 when the module is initialised and can run",
                                  ["module"], registry=r)
        self.webhook_deliveries = Counter("tfserver_webhook_deliveries_total",
                                          "Webhook delivery attempts by outcome: delivered, "
                                          "retried, gave_up, refused", ["event", "result"],
                                          registry=r)
        self.webhook_oldest = Gauge("tfserver_webhook_oldest_pending_seconds",
                                    "Age of the oldest webhook delivery not yet delivered",
                                    registry=r)
        # The `sqs` engine's (absent with `local`):
        self.queue_waiting = Gauge("tfserver_queue_waiting",
                                   "Runs waiting on the queue (SQS's approximate count)",
                                   registry=r)
        self.queue_oldest = Gauge("tfserver_queue_oldest_seconds",
                                  "Age of the oldest run waiting on the queue", registry=r)
        self.worker_busy = Gauge("tfserver_worker_slots_busy",
                                 "Runs this worker holds now", registry=r)
        self.drift_checks = Counter("tfserver_drift_checks_scheduled_total",
                                    "Scheduled drift checks started, or put off while "
                                    "their instance was busy",
                                    ["module", "result"], registry=r)
        self.resumed = Counter("tfserver_runs_resumed_total",
                               "Runs run again after their worker died", registry=r)

    def watch(self, counts: Callable[[], tuple[int, int]],
              modules: Callable[[], Mapping[str, str]], names: list[str]) -> None:
        """Read the run counts and the modules' readiness when scraped."""
        self.running.set_function(lambda: counts()[0])
        self.queued.set_function(lambda: counts()[1])
        for name in names:
            self.module_ready.labels(name).set_function(_ready(modules, name))

    def watch_queue(self, waiting: Callable[[], float], oldest: Callable[[], float],
                    busy: Callable[[], float]) -> None:
        """Read the queue's figures when scraped (a failed read shows as NaN)."""
        self.queue_waiting.set_function(_or_nan(waiting))
        self.queue_oldest.set_function(_or_nan(oldest))
        self.worker_busy.set_function(busy)

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        """An HTTP request was answered."""
        key = (method_label(method), route, status)
        children = self._children.get(key)
        if children is None:
            # `labels` takes a lock and builds its key at each call (half the cost of
            # counting a request): the children of a label set are kept.
            children = (self.http_requests.labels(key[0], route, str(status)),
                        self.http_duration.labels(route))
            if len(self._children) < _CHILDREN_KEPT:  # bounded labels; a bound anyway
                self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def run(self, module: str, operation: str, status: str, seconds: float | None) -> None:
        """A run ended."""
        self.runs.labels(module, operation, status).inc()
        if seconds is not None:
            self.run_duration.labels(module, operation).observe(seconds)

    def webhook(self, event: str, result: str) -> None:
        """A webhook delivery attempt ended (`result`: delivered, retried, gave_up,
        refused)."""
        self.webhook_deliveries.labels(event, result).inc()

    def render(self) -> bytes:
        """The text format a Prometheus server scrapes."""
        return bytes(generate_latest(self.registry))


def _ready(modules: Callable[[], Mapping[str, str]], name: str) -> Callable[[], float]:
    return lambda: 1.0 if modules().get(name) == "ready" else 0.0


def _or_nan(read: Callable[[], float]) -> Callable[[], float]:
    def value() -> float:
        try:
            return read()
        except Exception:  # a scrape shows the gap instead of failing  # noqa: BLE001
            return float("nan")
    return value
