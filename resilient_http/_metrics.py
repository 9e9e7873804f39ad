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

import httpx
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
        self.rate_limit_wait = histogram(p + "rate_limit_wait_seconds", "Time calls waited for a rate-limit token.")
        self.rate_limited = counter(p + "rate_limited", "Calls refused by the rate limiter.")
        self.cooldown = counter(p + "cooldown_seconds", "Time spent in cooldown imposed by the server.")
        self.bulkhead_in_flight = gauge(p + "bulkhead_in_flight", "Attempts holding a bulkhead slot.")
        self.bulkhead_queued = gauge(p + "bulkhead_queued", "Calls waiting for a bulkhead slot.")
        self.bulkhead_rejected = counter(p + "bulkhead_rejected", "Calls shed by the bulkhead.", "priority")
        self.stale_served = counter(p + "stale_served", "Stale answers served, by what failed.", "reason")
        self.cache_entries = gauge(p + "cache_entries", "Responses kept for stale fallback.")
        self.cache_bytes = gauge(p + "cache_bytes", "Bytes of responses kept for stale fallback.")


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
        "bulkhead_in_flight",
        "bulkhead_queued",
        "cache_bytes",
        "cache_entries",
        "circuit_opened",
        "cooldown",
        "host",
        "rate_limit_wait",
        "rate_limited",
        "request_duration",
    )

    attempt_duration: Histogram
    budget_exhausted: Counter
    bulkhead_in_flight: Gauge
    bulkhead_queued: Gauge
    cache_bytes: Gauge
    cache_entries: Gauge
    circuit_opened: Counter
    cooldown: Counter
    rate_limit_wait: Histogram
    rate_limited: Counter
    request_duration: Histogram

    #: The collectors labelled by ``host`` alone; each has a child attribute of the same name.
    UNLABELLED = (
        "attempt_duration",
        "budget_exhausted",
        "bulkhead_in_flight",
        "bulkhead_queued",
        "cache_bytes",
        "cache_entries",
        "circuit_opened",
        "cooldown",
        "rate_limit_wait",
        "rate_limited",
        "request_duration",
    )

    def __init__(self, metrics: Metrics, host: str) -> None:
        self._metrics = metrics
        self.host = host
        self._labelled: dict[tuple[str, str], Any] = {}
        for name in self.UNLABELLED:
            setattr(self, name, getattr(metrics, name).labels(host))

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

    def labelled(self, name: str, value: str) -> Any:
        """The child of collector ``name`` for this host and the second label ``value``."""
        return self._child(name, value)

    def circuit(self, state: str) -> None:
        for name in CIRCUIT_STATES:
            self._child("circuit_state", name).set(1 if name == state else 0)

    def remove(self) -> None:
        """Drop every series of this host from the registry."""
        m = self._metrics
        for name in self.UNLABELLED:
            _remove(getattr(m, name), self.host)
        for name, value in self._labelled:
            _remove(getattr(m, name), self.host, value)
        self._labelled.clear()


def _remove(collector: Any, *labels: str) -> None:
    try:
        collector.remove(*labels)
    except KeyError:  # another transport on the registry already removed it
        pass


def outcome_of_exception(exc: BaseException) -> str:
    """The outcome label of a call or attempt that ended in ``exc``."""
    from ._exceptions import BulkheadFullError, CircuitOpenError, RateLimitedError

    for kind, outcome in (
        (CircuitOpenError, "circuit_open"),
        (RateLimitedError, "rate_limited"),
        (BulkheadFullError, "bulkhead_full"),
        (httpx.TimeoutException, "timeout"),
        (Exception, "error"),
    ):
        if isinstance(exc, kind):
            return outcome
    return "cancelled"


_STATUS_CLASSES = ("other", "1xx", "2xx", "3xx", "4xx", "5xx")


def outcome_of_status(status: int) -> str:
    """The outcome label of a response: its status class."""
    return _STATUS_CLASSES[status // 100] if 100 <= status < 600 else "other"
