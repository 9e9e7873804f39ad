"""What resilient_http puts on a ``CollectorRegistry``, and for how long.

The metric names and labels are written down once, here (:data:`SPECS`,
:data:`LABELS`). An :class:`Exporter` is what one registry holds for the
library: a collector of plain values, or, in prometheus-client's
multiprocess mode, prometheus-client's own metric classes. It exists while
at least one live transport uses the registry: the first transport to attach
registers it, the last to detach unregisters it, so nothing here outlives
the transports (the table of exporters is empty when no transport is open).

A transport attaches under its ``name``, which becomes the ``transport``
label of its series: two live transports with the same name on one registry
would write the same series, so the second is refused.
"""

from __future__ import annotations

import gc
import os
import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ._errors import ConfigurationError

if TYPE_CHECKING:
    from ._metrics import TransportMetrics

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CIRCUIT_STATES = ("closed", "open", "half_open")
PREFIX = "resilient_http_"
#: The labels every series carries, in this order: the transport's ``name`` and ``host:port``.
LABELS = ("transport", "host")

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
    ("dry_run_blocked", "counter", "dry_run_blocked", "Calls a dry-run layer would have blocked.", "layer"),
    ("fallbacks", "counter", "fallbacks", "Calls the fallback function answered, by what failed.", "reason"),
)
KINDS = {attribute: kind for attribute, kind, *_ in SPECS}


def multiprocess() -> bool:
    """Whether prometheus-client's multiprocess mode is on (its directory is set)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir"))


def label_names(label: str | None) -> tuple[str, ...]:
    """The label names of a metric whose own label is ``label`` (``None`` for none)."""
    return LABELS if label is None else (*LABELS, label)


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


class _Child(Protocol):
    def set(self, value: float) -> None: ...


class SharedGauge:
    """A multiprocess gauge: its own count, written to prometheus-client's child until detached.

    The files cannot forget a series, so a host that leaves sets its gauges
    to 0 and detaches them; a call still in flight then changes the count
    that nobody exports instead of pushing the file's value below zero.
    """

    __slots__ = ("child", "value")

    def __init__(self, child: _Child) -> None:
        self.child: _Child | None = child
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount
        if self.child is not None:
            self.child.set(self.value)

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount
        if self.child is not None:
            self.child.set(self.value)

    def set(self, value: float) -> None:
        self.value = float(value)
        if self.child is not None:
            self.child.set(self.value)

    def detach(self) -> None:
        if self.child is not None:
            self.child.set(0)
            self.child = None


def plain(attribute: str) -> Value | Buckets:
    """A fresh in-memory series for metric ``attribute``."""
    return Buckets() if KINDS[attribute] == "histogram" else Value()


class Exporter:
    """The library's metrics on one registry, and the live transports that write them, by name."""

    def __init__(self, registry: CollectorRegistry, multiprocess: bool) -> None:
        self.registry = registry
        self.multiprocess = multiprocess
        self.transports: dict[str, TransportMetrics] = {}
        self._registered: list[Collector] = []
        #: multiprocess mode: prometheus-client's metric of each attribute.
        self._metrics: dict[str, Any] = {}
        if not multiprocess:
            self._registered.append(_Collector(self))
        else:
            for attribute, kind, name, doc, label in SPECS:
                labels = label_names(label)
                if kind == "counter":
                    made: Any = Counter(PREFIX + name, doc, labels, registry=None)
                elif kind == "gauge":
                    # livemax: a state reads 1 when any worker's breaker is in it.
                    made = Gauge(
                        PREFIX + name,
                        doc,
                        labels,
                        registry=None,
                        multiprocess_mode="livemax" if attribute == "circuit_state" else "livesum",
                    )
                else:
                    made = Histogram(PREFIX + name, doc, labels, registry=None, buckets=DURATION_BUCKETS)
                self._metrics[attribute] = made
                self._registered.append(made)
        for collector in self._registered:
            registry.register(collector)

    def series(self, attribute: str, labels: tuple[str, ...]) -> Any:
        """The series an attached host writes for metric ``attribute`` and label values ``labels``."""
        if not self.multiprocess:
            return plain(attribute)
        child = self._metrics[attribute].labels(*labels)
        return SharedGauge(child) if KINDS[attribute] == "gauge" else child

    def unregister(self) -> None:
        for collector in self._registered:
            self.registry.unregister(collector)


class _Collector(Collector):
    """Turns the live hosts of an exporter's transports into samples at scrape time.

    A scrape may run on another thread (prometheus-client's HTTP server):
    it only copies containers, which the GIL makes atomic, never iterates
    one that the event loop may be changing.
    """

    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter

    def describe(self) -> Iterator[Metric]:
        for _, kind, name, doc, label in SPECS:
            yield _family(kind, name, doc, label)

    def collect(self) -> Iterator[Metric]:
        release_abandoned()
        hosts = [host for transport in list(self.exporter.transports.values()) for host in list(transport.hosts)]
        for attribute, kind, name, doc, label in SPECS:
            family = _family(kind, name, doc, label)
            for host in hosts:
                for labels, value in host.values(attribute):
                    if isinstance(family, HistogramMetricFamily):
                        family.add_metric(list(labels), _cumulative(value.counts), value.sum)
                    else:
                        family.add_metric(list(labels), value.value)
            yield family


def _cumulative(counts: Iterable[int]) -> list[tuple[str, float]]:
    found, running = [], 0
    for bound, count in zip((*DURATION_BUCKETS, float("inf")), counts, strict=True):
        running += count
        found.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(running)))
    return found


def _family(
    kind: str, name: str, doc: str, label: str | None
) -> CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily:
    labels = list(label_names(label))
    full = PREFIX + name
    if kind == "counter":
        return CounterMetricFamily(full, doc, labels=labels)
    if kind == "gauge":
        return GaugeMetricFamily(full, doc, labels=labels)
    return HistogramMetricFamily(full, doc, labels=labels)


# One exporter per registry in use; an entry leaves with the registry's last transport.
_exporters: dict[CollectorRegistry, Exporter] = {}
_lock = threading.Lock()  # transports on several threads may share a registry
# Transports the garbage collector took before they were closed. The collector may
# run anywhere, even inside _claim with the lock held: it only appends here, and the
# next attach or scrape closes them.
_abandoned: list[TransportMetrics] = []


def abandon(owner: TransportMetrics) -> None:
    """``owner``'s transport was garbage collected unclosed: close it soon, outside any lock."""
    _abandoned.append(owner)


def release_abandoned() -> None:
    while _abandoned:
        try:
            owner = _abandoned.pop()
        except IndexError:  # another thread took the last one
            return
        owner.close()


def _claim(registry: CollectorRegistry, name: str, owner: TransportMetrics, multiprocess: bool) -> Exporter | None:
    with _lock:
        exporter = _exporters.get(registry)
        if exporter is None:
            exporter = _exporters[registry] = Exporter(registry, multiprocess)
        if name in exporter.transports:
            return None
        exporter.transports[name] = owner
        return exporter


def attach(registry: CollectorRegistry, name: str, owner: TransportMetrics, multiprocess: bool) -> Exporter:
    """Register ``owner`` as the live transport called ``name`` on ``registry``.

    A transport dropped without being closed releases its name when it is
    garbage collected; transports sit in reference cycles, so before
    refusing a name the garbage is collected once, and only a transport
    that is still alive keeps its name.
    """
    release_abandoned()
    exporter = _claim(registry, name, owner, multiprocess)
    if exporter is None:
        gc.collect()
        release_abandoned()
        exporter = _claim(registry, name, owner, multiprocess)
    if exporter is None:
        raise ConfigurationError(
            "name",
            name,
            "another open transport on this registry already has this name: pass name= to tell "
            "their metrics apart (or close the other one first)",
        )
    return exporter


def detach(exporter: Exporter, name: str, owner: TransportMetrics) -> None:
    """Take ``owner`` off its registry; the last transport out unregisters the library's metrics."""
    with _lock:
        if exporter.transports.get(name) is owner:
            del exporter.transports[name]
        if not exporter.transports and _exporters.get(exporter.registry) is exporter:
            del _exporters[exporter.registry]
            exporter.unregister()
