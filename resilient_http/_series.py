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
would write the same series, so the second is refused. So is a transport
whose histogram ``buckets`` differ from those of the transports already
there: one metric's series must share their bounds, or summing them by
``le`` (every quantile across transports) would mix different bounds.

The dependency a series is about is named by two labels, OpenTelemetry's
``server.address`` and ``server.port`` as Prometheus spells them
(``server_address``, ``server_port``, which is also what Prometheus makes of
OpenTelemetry's attributes). A label called ``host`` (the library's first
choice) collides with the target label that many scrape configurations
set (the machine scraped): Prometheus then renames ours ``exported_host``,
and every ``by (host)`` groups by machine instead of by dependency. No
common target label (``job``, ``instance``, ``host``, ``hostname``,
``node``, ``pod``, ``namespace``, ``service``, ``cluster``, ``env``) is
called ``server_address`` or ``server_port``.
"""

from __future__ import annotations

import gc
import os
import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from itertools import pairwise
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ._errors import ConfigurationError

if TYPE_CHECKING:
    from ._metrics import TransportMetrics

#: Upper bounds, in seconds, of the histograms' buckets unless a transport is given ``buckets=``:
#: OpenTelemetry's for ``http.client.request.duration``.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
MAX_BUCKETS = 100
CIRCUIT_STATES = ("closed", "open", "half_open")
PREFIX = "resilient_http_"
#: The labels every series carries, in this order: the transport's ``name``, and the host and port called.
LABELS = ("transport", "server_address", "server_port")

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
    ("rate_limit_per_second", "gauge", "rate_limit_per_second", "The rate limit: calls a second, as configured.", None),
    ("rate_limit_burst", "gauge", "rate_limit_burst", "The rate limit: calls allowed at once, as configured.", None),
    ("cooldown", "counter", "cooldown_seconds", "Time spent in cooldown imposed by the server.", None),
    ("bulkhead_in_flight", "gauge", "bulkhead_in_flight", "Attempts holding a bulkhead slot.", None),
    ("bulkhead_queued", "gauge", "bulkhead_queued", "Calls waiting for a bulkhead slot.", None),
    ("bulkhead_limit", "gauge", "bulkhead_limit", "Bulkhead slots: max_concurrent, or the adaptive limit now.", None),
    ("bulkhead_rejected", "counter", "bulkhead_rejected", "Calls shed by the bulkhead.", "priority"),
    ("shed", "counter", "shed", "Calls refused locally (breaker, limiter, bulkhead), stale or not.", "reason"),
    ("stale_served", "counter", "stale_served", "Stale answers served, by what failed.", "reason"),
    ("cache_entries", "gauge", "cache_entries", "Responses kept for stale fallback.", None),
    ("cache_bytes", "gauge", "cache_bytes", "Bytes of responses kept for stale fallback.", None),
    ("coalesced", "counter", "coalesced", "Calls that waited for an identical call in flight, by result.", "result"),
    ("hedges", "counter", "hedges", "Hedges: sent and won or lost, or why one that was due was not sent.", "result"),
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

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


def checked_buckets(buckets: Iterable[float] | None) -> tuple[float, ...]:
    """``buckets`` as a tuple of upper bounds in seconds; :class:`ConfigurationError` unless valid.

    At least one bound and at most :data:`MAX_BUCKETS`, each finite and
    positive, strictly increasing; ``+Inf`` is always added. ``None`` is
    :data:`DURATION_BUCKETS`.
    """
    if buckets is None:
        return DURATION_BUCKETS
    if isinstance(buckets, (str, bytes)) or not isinstance(buckets, Iterable):
        raise ConfigurationError("buckets", buckets, "must be a sequence of upper bounds in seconds")
    bounds = tuple(buckets)
    if not 0 < len(bounds) <= MAX_BUCKETS:
        raise ConfigurationError("buckets", buckets, f"must hold 1 to {MAX_BUCKETS} upper bounds")
    for bound in bounds:
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not 0 < bound < float("inf"):
            raise ConfigurationError(
                "buckets", buckets, "must be finite positive numbers of seconds (+Inf is always added)"
            )
    if any(later <= earlier for earlier, later in pairwise(bounds)):
        raise ConfigurationError("buckets", buckets, "must be strictly increasing")
    return tuple(float(bound) for bound in bounds)


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


def plain(attribute: str, bounds: tuple[float, ...]) -> Value | Buckets:
    """A fresh in-memory series for metric ``attribute`` (``bounds``: a histogram's buckets)."""
    return Buckets(bounds) if KINDS[attribute] == "histogram" else Value()


class Exporter:
    """The library's metrics on one registry, and the live transports that write them, by name."""

    def __init__(self, registry: CollectorRegistry, multiprocess: bool, buckets: tuple[float, ...]) -> None:
        self.registry = registry
        self.multiprocess = multiprocess
        self.buckets = buckets
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
                    made = Histogram(PREFIX + name, doc, labels, registry=None, buckets=buckets)
                self._metrics[attribute] = made
                self._registered.append(made)
        for collector in self._registered:
            registry.register(collector)

    def series(self, attribute: str, labels: tuple[str, ...]) -> Any:
        """The series an attached host writes for metric ``attribute`` and label values ``labels``."""
        if not self.multiprocess:
            return plain(attribute, self.buckets)
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
                        family.add_metric(list(labels), _cumulative(value.bounds, value.counts), value.sum)
                    else:
                        family.add_metric(list(labels), value.value)
            yield family


def _cumulative(bounds: tuple[float, ...], counts: Iterable[int]) -> list[tuple[str, float]]:
    found, running = [], 0
    for bound, count in zip((*bounds, float("inf")), counts, strict=True):
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


def _claim(
    registry: CollectorRegistry, name: str, owner: TransportMetrics, multiprocess: bool, buckets: tuple[float, ...]
) -> Exporter | None:
    with _lock:
        exporter = _exporters.get(registry)
        if exporter is None:
            exporter = _exporters[registry] = Exporter(registry, multiprocess, buckets)
        if name in exporter.transports:
            return None
        if exporter.buckets != buckets:
            raise ConfigurationError(
                "buckets",
                buckets,
                f"differs from the buckets {exporter.buckets} of the transports already on this registry "
                f"(one metric's series share their bounds, or they cannot be summed)",
            )
        exporter.transports[name] = owner
        return exporter


def attach(
    registry: CollectorRegistry,
    name: str,
    owner: TransportMetrics,
    multiprocess: bool,
    buckets: tuple[float, ...] = DURATION_BUCKETS,
) -> Exporter:
    """Register ``owner`` as the live transport called ``name`` on ``registry``.

    A transport dropped without being closed releases its name when it is
    garbage collected; transports sit in reference cycles, so before
    refusing a name the garbage is collected once, and only a transport
    that is still alive keeps its name.
    """
    release_abandoned()
    exporter = _claim(registry, name, owner, multiprocess, buckets)
    if exporter is None:
        gc.collect()
        release_abandoned()
        exporter = _claim(registry, name, owner, multiprocess, buckets)
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
