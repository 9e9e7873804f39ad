"""Every Prometheus metric of resilient_http, created against an injected registry.

Nothing here is module-level: a :class:`Metrics` is made for a
``CollectorRegistry`` the first time a transport uses that registry, and
every later transport on the same registry shares it (registering the same
names twice would fail). Series are labelled by ``host`` (``host:port``) and
a small closed set of values; paths and query strings never become labels.

The hot path pays for plain arithmetic only. Each host gets a
:class:`HostMetrics` whose counters, gauges and histograms are small objects
with prometheus-client's method names (``inc``, ``dec``, ``set``,
``observe``) that add to Python numbers; a collector registered once per
registry turns them into samples when Prometheus scrapes. An
``inc`` costs about 0.1 µs instead of about 1 µs for a prometheus-client
child (lock, validation, a Python loop over histogram buckets), and a call
makes a dozen of them.

Under prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``
set, for gunicorn or uvicorn workers), values must live in the shared
files that only prometheus-client's own metric classes write, so there
:class:`HostMetrics` holds their labelled children instead; the layers do
not know the difference. Gauges then aggregate with ``livesum`` (the
circuit state with ``livemax``: 1 if any worker's breaker is in that state).
"""

from __future__ import annotations

import os
import weakref
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

import httpx
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CIRCUIT_STATES = ("closed", "open", "half_open")
PREFIX = "resilient_http_"

# (attribute, kind, name without prefix or _total, help, second label or None), in exposition order.
SPECS: tuple[tuple[str, str, str, str, str | None], ...] = (
    ("requests", "counter", "requests", "Calls made through the transport, by final outcome.", "outcome"),
    ("attempts", "counter", "attempts", "Tries that reached, or tried to reach, the network.", "outcome"),
    ("request_duration", "histogram", "request_duration_seconds", "Time from call to response headers.", None),
    ("attempt_duration", "histogram", "attempt_duration_seconds", "Time of one try on the network.", None),
    ("retries", "counter", "retries", "Retries made, by what caused them.", "reason"),
    ("budget_exhausted", "counter", "retry_budget_exhausted", "Retries refused by the retry budget.", None),
    ("circuit_state", "gauge", "circuit_state", "1 for the breaker's current state, 0 otherwise.", "state"),
    ("circuit_opened", "counter", "circuit_opened", "Times the breaker opened.", None),
    ("timeouts", "counter", "timeouts", "Timeouts, per attempt or of the whole call.", "kind"),
    ("rate_limit_wait", "histogram", "rate_limit_wait_seconds", "Time calls waited for a rate-limit token.", None),
    ("rate_limited", "counter", "rate_limited", "Calls refused by the rate limiter.", None),
    ("cooldown", "counter", "cooldown_seconds", "Time spent in cooldown imposed by the server.", None),
    ("bulkhead_in_flight", "gauge", "bulkhead_in_flight", "Attempts holding a bulkhead slot.", None),
    ("bulkhead_queued", "gauge", "bulkhead_queued", "Calls waiting for a bulkhead slot.", None),
    ("bulkhead_limit", "gauge", "bulkhead_limit", "Bulkhead slots: max_concurrent, or the adaptive limit now.", None),
    ("bulkhead_rejected", "counter", "bulkhead_rejected", "Calls shed by the bulkhead.", "priority"),
    ("stale_served", "counter", "stale_served", "Stale answers served, by what failed.", "reason"),
    ("cache_entries", "gauge", "cache_entries", "Responses kept for stale fallback.", None),
    ("cache_bytes", "gauge", "cache_bytes", "Bytes of responses kept for stale fallback.", None),
    ("coalesced", "counter", "coalesced", "Calls that waited for an identical call in flight, by result.", "result"),
    ("hedges", "counter", "hedges", "Hedges: sent and won or lost, or why one that was due was not sent.", "result"),
)
_KINDS = {attribute: kind for attribute, kind, *_ in SPECS}


class Value:
    """A counter's or a gauge's value: prometheus-client's method names, plain arithmetic."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


class Buckets:
    """A histogram's value: a count per bucket (not cumulative) and a sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(DURATION_BUCKETS, amount)] += 1
        self.sum += amount


def _multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir"))


class _Collector(Collector):
    """Turns the live :class:`HostMetrics` of a registry into samples at scrape time."""

    def __init__(self) -> None:
        self.hosts: set[HostMetrics] = set()

    def describe(self) -> Iterator[Metric]:
        for _, kind, name, doc, label in SPECS:
            yield _family(kind, name, doc, label)

    def collect(self) -> Iterator[Metric]:
        hosts = list(self.hosts)
        for attribute, kind, name, doc, label in SPECS:
            family = _family(kind, name, doc, label)
            merged: dict[tuple[str, ...], Any] = {}
            for host in hosts:
                for labels, value in host.values(attribute):
                    if kind == "histogram":
                        counts, total = merged.get(labels, ([0] * len(value.counts), 0.0))
                        merged[labels] = ([a + b for a, b in zip(counts, value.counts, strict=True)], total + value.sum)
                    elif attribute == "circuit_state":
                        merged[labels] = max(merged.get(labels, 0.0), value.value)
                    else:
                        merged[labels] = merged.get(labels, 0.0) + value.value
            for labels, value in merged.items():
                if kind == "histogram":
                    counts, total = value
                    cumulative, running = [], 0
                    for bound, count in zip((*DURATION_BUCKETS, float("inf")), counts, strict=True):
                        running += count
                        cumulative.append((_le(bound), float(running)))
                    assert isinstance(family, HistogramMetricFamily)
                    family.add_metric(list(labels), cumulative, total)
                else:
                    assert not isinstance(family, HistogramMetricFamily)
                    family.add_metric(list(labels), value)
            yield family


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def _family(
    kind: str, name: str, doc: str, label: str | None
) -> CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily:
    labels = ["host"] if label is None else ["host", label]
    full = PREFIX + name
    if kind == "counter":
        return CounterMetricFamily(full, doc, labels=labels)
    if kind == "gauge":
        return GaugeMetricFamily(full, doc, labels=labels)
    return HistogramMetricFamily(full, doc, labels=labels)


class Metrics:
    """The metrics of one registry: a collector of plain values, or prometheus-client's classes."""

    def __init__(self, registry: CollectorRegistry, multiprocess: bool) -> None:
        self.multiprocess = multiprocess
        self.collector: _Collector | None = None
        self.collectors: dict[str, Any] = {}
        if not multiprocess:
            self.collector = _Collector()
            registry.register(self.collector)
            return
        for attribute, kind, name, doc, label in SPECS:
            labels = ("host",) if label is None else ("host", label)
            if kind == "counter":
                made: Any = Counter(PREFIX + name, doc, labels, registry=registry)
            elif kind == "gauge":
                if attribute == "circuit_state":
                    made = Gauge(PREFIX + name, doc, labels, registry=registry, multiprocess_mode="livemax")
                else:
                    made = Gauge(PREFIX + name, doc, labels, registry=registry, multiprocess_mode="livesum")
            else:
                made = Histogram(PREFIX + name, doc, labels, registry=registry, buckets=DURATION_BUCKETS)
            self.collectors[attribute] = made


_shared: weakref.WeakKeyDictionary[CollectorRegistry, Metrics] = weakref.WeakKeyDictionary()


def metrics_for(registry: CollectorRegistry | None) -> Metrics:
    """The shared :class:`Metrics` of ``registry`` (the global registry when ``None``)."""
    registry = REGISTRY if registry is None else registry
    found = _shared.get(registry)
    if found is None:
        found = _shared[registry] = Metrics(registry, _multiprocess())
    return found


class HostMetrics:
    """One host's counters, gauges and histograms, made once and kept for the hot path."""

    __slots__ = (
        "_attempts",
        "_labelled",
        "_metrics",
        "_requests",
        "attempt_duration",
        "budget_exhausted",
        "bulkhead_in_flight",
        "bulkhead_limit",
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

    attempt_duration: Buckets
    budget_exhausted: Value
    bulkhead_in_flight: Value
    bulkhead_limit: Value
    bulkhead_queued: Value
    cache_bytes: Value
    cache_entries: Value
    circuit_opened: Value
    cooldown: Value
    rate_limit_wait: Buckets
    rate_limited: Value
    request_duration: Buckets

    #: The metrics labelled by ``host`` alone; each has an attribute of the same name.
    UNLABELLED = tuple(attribute for attribute, _, _, _, label in SPECS if label is None)

    def __init__(self, metrics: Metrics, host: str) -> None:
        self._metrics = metrics
        self.host = host
        # metric name -> second label value -> series
        self._labelled: dict[str, dict[str, Any]] = {name: {} for name in _KINDS if name not in self.UNLABELLED}
        self._requests = self._labelled["requests"]
        self._attempts = self._labelled["attempts"]
        for name in self.UNLABELLED:
            setattr(self, name, self._make(name, ()))
        if metrics.collector is not None:
            metrics.collector.hosts.add(self)

    def _make(self, name: str, extra: tuple[str, ...]) -> Any:
        if self._metrics.multiprocess:
            return self._metrics.collectors[name].labels(self.host, *extra)
        return Buckets() if _KINDS[name] == "histogram" else Value()

    def _child(self, name: str, value: str) -> Any:
        series = self._labelled[name]
        child = series.get(value)
        if child is None:
            child = series[value] = self._make(name, (value,))
        return child

    def values(self, name: str) -> Iterator[tuple[tuple[str, ...], Any]]:
        """``(label values, value)`` of every series of metric ``name`` for this host."""
        if name in self.UNLABELLED:
            yield (self.host,), getattr(self, name)
            return
        for value, child in list(self._labelled[name].items()):
            yield (self.host, value), child

    def labelled(self, name: str, value: str) -> Any:
        """The series of metric ``name`` for this host and the second label ``value``."""
        return self._child(name, value)

    def request(self, outcome: str, seconds: float) -> None:
        child = self._requests.get(outcome)
        if child is None:
            child = self._child("requests", outcome)
        child.inc()
        self.request_duration.observe(seconds)

    def attempt(self, outcome: str, seconds: float) -> None:
        child = self._attempts.get(outcome)
        if child is None:
            child = self._child("attempts", outcome)
        child.inc()
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
        if m.collector is not None:
            m.collector.hosts.discard(self)
            return
        # prometheus-client cannot remove series in multiprocess mode (it warns and
        # keeps them in the files): the counters stay, and the gauges are zeroed
        # so that an evicted host does not read "open" or "in flight" for ever.
        for name in self.UNLABELLED:
            if _KINDS[name] == "gauge":
                getattr(self, name).set(0)
        for name, series in self._labelled.items():
            if _KINDS[name] == "gauge":
                for child in series.values():
                    child.set(0)


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
