"""Every Prometheus metric of resilient_http, created against an injected registry.

Nothing here is module-level: a :class:`Metrics` is made for a
``CollectorRegistry`` the first time a transport uses that registry, and
every later transport on the same registry shares it (registering the same
names twice would fail). Series are labelled by ``host`` (``host:port``) and
a small closed set of values; paths and query strings never become labels.

The hot path never calls ``.labels()``: each host gets a :class:`HostMetrics`
holding its children, made once, and removed from the registry when the host
is evicted from the transport's host table.
"""

from __future__ import annotations

import weakref
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CIRCUIT_STATES = ("closed", "open", "half_open")

_shared: weakref.WeakKeyDictionary[CollectorRegistry, Metrics] = weakref.WeakKeyDictionary()


class Metrics:
    """The collectors; one instance per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, ("host", *labels), registry=registry)

        def gauge(name: str, doc: str, *labels: str) -> Gauge:
            return Gauge(name, doc, ("host", *labels), registry=registry, multiprocess_mode="livesum")

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, ("host",), registry=registry, buckets=DURATION_BUCKETS)

        p = "resilient_http_"
        self.requests = counter(p + "requests", "Calls made through the transport, by final outcome.", "outcome")
        self.attempts = counter(p + "attempts", "Tries that reached, or tried to reach, the network.", "outcome")
        self.request_duration = histogram(p + "request_duration_seconds", "Time from call to response headers.")
        self.attempt_duration = histogram(p + "attempt_duration_seconds", "Time of one try on the network.")
        self.retries = counter(p + "retries", "Retries made, by what caused them.", "reason")
        self.budget_exhausted = counter(p + "retry_budget_exhausted", "Retries refused by the retry budget.")
        self.circuit_state = gauge(p + "circuit_state", "1 for the breaker's current state, 0 otherwise.", "state")
        self.circuit_opened = counter(p + "circuit_opened", "Times the breaker opened.")
        self.timeouts = counter(p + "timeouts", "Timeouts, per attempt or of the whole call.", "kind")


def metrics_for(registry: CollectorRegistry | None) -> Metrics:
    """The shared :class:`Metrics` of ``registry`` (the global registry when ``None``)."""
    registry = REGISTRY if registry is None else registry
    found = _shared.get(registry)
    if found is None:
        found = _shared[registry] = Metrics(registry)
    return found


class HostMetrics:
    """One host's metric children, made lazily and cached for the hot path."""

    __slots__ = (
        "_labelled",
        "_metrics",
        "attempt_duration",
        "budget_exhausted",
        "circuit_opened",
        "host",
        "request_duration",
    )

    def __init__(self, metrics: Metrics, host: str) -> None:
        self._metrics = metrics
        self.host = host
        self._labelled: dict[tuple[str, str], Any] = {}
        self.request_duration = metrics.request_duration.labels(host)
        self.attempt_duration = metrics.attempt_duration.labels(host)
        self.budget_exhausted = metrics.budget_exhausted.labels(host)
        self.circuit_opened = metrics.circuit_opened.labels(host)

    def _child(self, name: str, value: str) -> Any:
        key = (name, value)
        child = self._labelled.get(key)
        if child is None:
            child = self._labelled[key] = getattr(self._metrics, name).labels(self.host, value)
        return child

    def request(self, outcome: str, seconds: float) -> None:
        self._child("requests", outcome).inc()
        self.request_duration.observe(seconds)

    def attempt(self, outcome: str, seconds: float) -> None:
        self._child("attempts", outcome).inc()
        self.attempt_duration.observe(seconds)

    def retry(self, reason: str) -> None:
        self._child("retries", reason).inc()

    def timeout(self, kind: str) -> None:
        self._child("timeouts", kind).inc()

    def circuit(self, state: str) -> None:
        for name in CIRCUIT_STATES:
            self._child("circuit_state", name).set(1 if name == state else 0)

    def remove(self) -> None:
        """Drop every series of this host from the registry."""
        m = self._metrics
        for collector in (m.request_duration, m.attempt_duration, m.budget_exhausted, m.circuit_opened):
            _remove(collector, self.host)
        for name, value in self._labelled:
            _remove(getattr(m, name), self.host, value)
        self._labelled.clear()


def _remove(collector: Any, *labels: str) -> None:
    try:
        collector.remove(*labels)
    except KeyError:  # another transport on the registry already removed it
        pass


_STATUS_CLASSES = ("other", "1xx", "2xx", "3xx", "4xx", "5xx")


def outcome_of_status(status: int) -> str:
    """The outcome label of a response: its status class."""
    return _STATUS_CLASSES[status // 100] if 100 <= status < 600 else "other"
