"""Every Prometheus metric of resilient_http, owned by the transport that writes it.

Every series carries the labels in :data:`LABELS`: ``transport`` (the
transport's ``name``, ``"default"`` unless given) and ``host``
(``host:port``), and at most one more from a small closed set; paths and
query strings never become labels. A transport's series live as long as it
does: :class:`TransportMetrics` is made with the transport, and its
``close()`` (``aclose``, the end of ``async with``, or garbage collection)
takes them off the registry. A host evicted from the transport's table
takes its own series with it. What one registry holds for the library, and
for how long, is in :mod:`resilient_http._series`.

The hot path pays for plain arithmetic only: each host's counters, gauges
and histograms are small objects with prometheus-client's method names
(``inc``, ``dec``, ``set``, ``observe``) adding to Python numbers, turned
into samples when Prometheus scrapes. An ``inc`` costs about 0.1 µs instead
of about 1 µs for a prometheus-client child, and a call makes a dozen.
Under prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``
set, for gunicorn or uvicorn workers) values must live in the shared files
that only prometheus-client's own classes write, so hosts hold their
labelled children instead (gauges through :class:`SharedGauge`), and the
layers do not know the difference. Gauges aggregate with ``livesum`` (the
circuit state with ``livemax``). Files cannot forget a series: a host or
transport that leaves keeps its counters there and sets its gauges to 0.

What the counters promise each other, per ``transport`` and ``host``, for
the calls that ended while the host was in the table (a scrape may fall
between two updates of one call, so these hold between calls, and for
``increase()`` over a window up to the calls that straddle its edges):

- ``requests_total`` counts every call once, whatever ended it (``outcome``
  ``cancelled`` included): ``sum(requests_total) ==
  request_duration_seconds_count``. A call ends when its response headers
  are returned; a body that fails later is not a second outcome.
- ``attempts_total`` counts every try handed to the network once, however it
  ended: ``sum(attempts_total) == attempt_duration_seconds_count``.
- ``retries_total`` counts a retry when its try is made, not when it is
  scheduled: a retry cancelled during its backoff, refused by the bulkhead or
  the server's cooldown, or overtaken by the deadline is not a retry. So
  ``sum(attempts_total) - sum(retries_total)`` is the number of calls that
  reached the network, and ``attempts - requests = retries`` exactly when
  every call did. The calls that did not are those refused before their
  first try (``circuit_open``, ``rate_limited``, ``bulkhead_full``, a
  deadline already past, ``cancelled``), whether or not the stale cache then
  answered in their place, and the followers of a coalesced call, which
  share its leader's tries (``coalesced_total``).
  ``retries_total{reason}`` never exceeds the tries that gave the reason:
  ``status_NNN`` retries ≤ tries with that status class; ``timeout``,
  ``connect_error`` and ``network_error`` retries ≤ tries whose outcome is
  ``timeout`` or ``error``.
- ``requests_total{outcome="stale"} == sum(stale_served_total)``: a stale
  answer is always the call's answer.
- Refusals are counted where they are made, once: every
  ``RateLimitedError`` a call gets adds to ``rate_limited_total`` (a turn the
  limiter could not give in time, or a server's cooldown that outlasts a
  waiting retry), so ``requests_total{outcome="rate_limited"} +
  stale_served_total{reason="rate_limited"} == rate_limited_total``. The
  same sum for ``bulkhead_full`` is at most ``sum(bulkhead_rejected_total)``:
  a waiter shed for a higher priority is counted when it is shed, and may be
  cancelled before it learns it. With a ``fallback`` function, a failure it
  answered ends as ``outcome="fallback"`` and is counted in
  ``fallbacks_total{reason}`` by what failed (``reason="server_error"`` for a
  final 5xx, otherwise the outcome it replaced): add
  ``fallbacks_total{reason="rate_limited"}`` (or ``"bulkhead_full"``) to the
  left side of these sums.
- ``timeouts_total{kind="attempt"} <= attempts_total{outcome="timeout"}``
  (the rest are the network's own timeouts); calls that end in a timeout,
  answered or stale, number at most ``timeouts_total{kind="total"} +
  attempts_total{outcome="timeout"}``. A total timeout may also strike a
  streamed body after the call has ended.
- Gauges return to rest: with no call in flight, ``bulkhead_in_flight`` and
  ``bulkhead_queued`` read 0, whatever was cancelled; with a breaker, exactly
  one ``circuit_state`` reads 1.

``tests/test_metrics.py`` drives random faults, cancellations and deadlines
through every layer and checks each of these.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
from prometheus_client import REGISTRY, CollectorRegistry

from ._errors import ConfigurationError
from ._series import (
    CIRCUIT_STATES,
    DURATION_BUCKETS,
    KINDS,
    LABELS,
    PREFIX,
    SPECS,
    Buckets,
    SharedGauge,
    Value,
    attach,
    detach,
    multiprocess,
    plain,
)

__all__ = [
    "CIRCUIT_STATES",
    "DURATION_BUCKETS",
    "LABELS",
    "PREFIX",
    "SPECS",
    "Buckets",
    "HostMetrics",
    "TransportMetrics",
    "Value",
    "outcome_of_exception",
    "outcome_of_status",
]

#: The transport label of a transport made without ``name=``.
DEFAULT_NAME = "default"


class TransportMetrics:
    """The series of one transport: made with it, gone from the registry when it is closed.

    Holds the transport's live hosts; :meth:`close` (the transport's
    ``aclose``, or its garbage collection) takes them off the registry and
    frees the transport's name. A host made after that still counts, on
    numbers nobody exports.
    """

    def __init__(self, registry: CollectorRegistry | None, name: str) -> None:
        if not isinstance(name, str) or not name or not name.isprintable() or len(name) > 100:
            raise ConfigurationError("name", name, "must be a non-empty printable string of at most 100 characters")
        self.name = name
        self.hosts: set[HostMetrics] = set()
        self.closed = False
        self._multiprocess = multiprocess()
        self._exporter = attach(REGISTRY if registry is None else registry, name, self, self._multiprocess)

    def host(self, host: str) -> HostMetrics:
        """The series of ``host`` (``host:port``), exported until the host or the transport goes."""
        return HostMetrics(self, host)

    def series(self, attribute: str, labels: tuple[str, ...]) -> Any:
        if self.closed:
            return plain(attribute)
        return self._exporter.series(attribute, labels)

    def close(self) -> None:
        """Take every host's series off the registry, and free the name; a second call does nothing."""
        if self.closed:
            return
        self.closed = True
        for host in list(self.hosts):
            host.remove()
        detach(self._exporter, self.name, self)


class HostMetrics:
    """One host's counters, gauges and histograms, made once and kept for the hot path."""

    __slots__ = (
        "_attempts",
        "_labelled",
        "_owner",
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
        "labels",
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

    #: The metrics labelled by :data:`LABELS` alone; each has an attribute of the same name.
    UNLABELLED = tuple(attribute for attribute, _, _, _, label in SPECS if label is None)

    def __init__(self, owner: TransportMetrics, host: str) -> None:
        self._owner = owner
        self.host = host
        #: The values of :data:`LABELS` for this host's series.
        self.labels = (owner.name, host)
        # metric name -> second label value -> series
        self._labelled: dict[str, dict[str, Any]] = {name: {} for name in KINDS if name not in self.UNLABELLED}
        self._requests = self._labelled["requests"]
        self._attempts = self._labelled["attempts"]
        for name in self.UNLABELLED:
            setattr(self, name, owner.series(name, self.labels))
        if not owner.closed:
            owner.hosts.add(self)

    def _child(self, name: str, value: str) -> Any:
        series = self._labelled[name]
        child = series.get(value)
        if child is None:
            child = series[value] = self._owner.series(name, (*self.labels, value))
        return child

    def values(self, name: str) -> Iterator[tuple[tuple[str, ...], Any]]:
        """``(label values, value)`` of every series of metric ``name`` for this host."""
        if name in self.UNLABELLED:
            yield self.labels, getattr(self, name)
            return
        for value, child in list(self._labelled[name].items()):
            yield (*self.labels, value), child

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
        """Drop every series of this host from the registry (its values go on counting, unexported)."""
        self._owner.hosts.discard(self)
        # prometheus-client cannot remove series in multiprocess mode (it warns and
        # keeps them in the files): the counters stay, and the gauges read 0 and stop
        # following this host, so that it never reads "open" or "in flight" for ever,
        # nor below zero when a call in flight ends after it left.
        for name in self.UNLABELLED:
            value = getattr(self, name)
            if isinstance(value, SharedGauge):
                value.detach()
        for series in self._labelled.values():
            for child in series.values():
                if isinstance(child, SharedGauge):
                    child.detach()


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
