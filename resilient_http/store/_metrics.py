"""The store's metrics, created against an injected registry like the layers' own.

``resilient_http_store_fallbacks_total{operation, reason}`` counts every
answer the store could not give (``reason``: ``timeout``, ``error``, or
``skipped`` while the store is being skipped after repeated failures); the
caller used its local state instead. ``resilient_http_store_up`` is 1 while
the store is used, 0 while it is skipped. Values are plain numbers turned
into samples at scrape time, or prometheus-client's own metrics under its
multiprocess mode.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .._series import PREFIX, Value, multiprocess

_FALLBACKS = (PREFIX + "store_fallbacks", "Store operations answered locally because the store could not answer.")
_UP = (PREFIX + "store_up", "1 while the shared store is used, 0 while it is skipped after failures.")


class _Collector(Collector):
    def __init__(self) -> None:
        self.stores: weakref.WeakSet[StoreMetrics] = weakref.WeakSet()

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(*_FALLBACKS, labels=["operation", "reason"])
        yield GaugeMetricFamily(*_UP, labels=[])

    def collect(self) -> Iterator[Metric]:
        stores = list(self.stores)
        fallbacks = CounterMetricFamily(*_FALLBACKS, labels=["operation", "reason"])
        merged: dict[tuple[str, str], float] = {}
        for store in stores:
            for labels, value in list(store.fallbacks.items()):
                merged[labels] = merged.get(labels, 0.0) + value.value
        for labels, total in merged.items():
            fallbacks.add_metric(list(labels), total)
        yield fallbacks
        up = GaugeMetricFamily(*_UP, labels=[])
        if stores:
            up.add_metric([], min(store.up.value for store in stores))
        yield up


class _Shared:
    """What one registry holds for every store on it."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.collector: _Collector | None = None
        self.fallbacks: Any = None
        self.up: Any = None
        if multiprocess():
            self.fallbacks = Counter(_FALLBACKS[0], _FALLBACKS[1], ("operation", "reason"), registry=registry)
            self.up = Gauge(_UP[0], _UP[1], registry=registry, multiprocess_mode="livemin")
        else:
            self.collector = _Collector()
            registry.register(self.collector)


_shared: weakref.WeakKeyDictionary[CollectorRegistry, _Shared] = weakref.WeakKeyDictionary()


class StoreMetrics:
    """One store's series: counted here, exported by its registry's collector while the store lives."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        registry = REGISTRY if registry is None else registry
        shared = _shared.get(registry)
        if shared is None:
            shared = _shared[registry] = _Shared(registry)
        self._shared = shared
        self.fallbacks: dict[tuple[str, str], Any] = {}
        self.up: Any = Value() if shared.up is None else shared.up
        self.up.set(1)
        if shared.collector is not None:
            shared.collector.stores.add(self)

    def fallback(self, operation: str, reason: str) -> None:
        labels = (operation, reason)
        child = self.fallbacks.get(labels)
        if child is None:
            shared = self._shared.fallbacks
            child = self.fallbacks[labels] = Value() if shared is None else shared.labels(*labels)
        child.inc()

    def remove(self) -> None:
        """Stop exporting this store's series (it is closed)."""
        if self._shared.collector is not None:
            self._shared.collector.stores.discard(self)
