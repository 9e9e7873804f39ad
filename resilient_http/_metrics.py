"""Every Prometheus metric of resilient_http, owned by the transport that writes it.

Every series carries the labels in :data:`LABELS`: ``transport`` (the
transport's ``name``, ``"default"`` unless given), ``server_address`` and
``server_port`` (the host called, as OpenTelemetry names it; why not
``host``: :mod:`resilient_http._series`), and at most one more from a small
closed set; paths and query strings never become labels. When a host is
first seen, every label set its policy can produce is made at zero, so that
``rate()`` and ``increase()`` see the first event; a layer that is off has
no series at all (:meth:`HostMetrics.prepare`). Histograms count seconds in
the transport's ``buckets`` (OpenTelemetry's HTTP client buckets unless
given: :data:`DURATION_BUCKETS`). A transport's series live as long as it
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

A call is **shed** when resilient_http refused it locally, before or
instead of the network: the circuit breaker (``CircuitOpenError``), the
rate limiter (``RateLimitedError``, a server's cooldown that outlasts the
call included) or the bulkhead (``BulkheadFullError``), whatever became of
it next: a shed call the stale cache (or the ``fallback``) then answered
counts as shed *and* as stale (or fallback). A call that reached the network
and failed there, or timed out, was not shed, even when answered stale. ``shed_total{reason}`` counts each shed
call once, when it ends, by the refusal (:data:`SHED`); that is what the
dashboard, the alerts and the demo's table call shed::

    sum(rate(resilient_http_shed_total[5m]))

(the same as ``requests_total{outcome=~"circuit_open|rate_limited|bulkhead_full"}
+ stale_served_total{reason=~"circuit_open|rate_limited|bulkhead_full"}``, but
one series that exists as soon as a refusing layer does: a sum of two is
empty while either is).

What the counters promise each other, per ``transport`` and host, for
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
  share its leader's tries (``coalesced_total``). A hedge that was sent
  (``hedges_total{result="won"}`` or ``{result="lost"}``) is a try too, and
  not a retry: subtract those from ``attempts_total`` as well.
  ``retries_total{reason}`` never exceeds the tries that gave the reason:
  ``status_NNN`` retries ≤ tries with that status class; ``timeout``,
  ``connect_error`` and ``network_error`` retries ≤ tries whose outcome is
  ``timeout`` or ``error``.
- ``requests_total{outcome="stale"} == sum(stale_served_total)``: a stale
  answer is always the call's answer.
- ``shed_total{reason=R} == requests_total{outcome=R} +
  stale_served_total{reason=R}`` for each ``R`` in :data:`SHED`.
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

from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

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
    checked_buckets,
    detach,
    multiprocess,
    plain,
)

if TYPE_CHECKING:
    from ._config import Policy

__all__ = [
    "CIRCUIT_STATES",
    "DURATION_BUCKETS",
    "LABELS",
    "OUTCOMES",
    "PREFIX",
    "SHED",
    "SPECS",
    "Buckets",
    "HostMetrics",
    "TransportMetrics",
    "Value",
    "outcome_of_exception",
    "outcome_of_status",
    "series_of",
]

#: The transport label of a transport made without ``name=``.
DEFAULT_NAME = "default"
#: The outcomes of a shed call, one per refusing layer: the ``reason`` label of ``shed_total``.
SHED = ("circuit_open", "rate_limited", "bulkhead_full")


class TransportMetrics:
    """The series of one transport: made with it, gone from the registry when it is closed.

    Holds the transport's live hosts; :meth:`close` (the transport's
    ``aclose``, or its garbage collection) takes them off the registry and
    frees the transport's name. A host made after that still counts, on
    numbers nobody exports.
    """

    def __init__(self, registry: CollectorRegistry | None, name: str, buckets: Iterable[float] | None = None) -> None:
        if not isinstance(name, str) or not name or not name.isprintable() or len(name) > 100:
            raise ConfigurationError("name", name, "must be a non-empty printable string of at most 100 characters")
        self.name = name
        self.buckets = checked_buckets(buckets)
        self.hosts: set[HostMetrics] = set()
        self.closed = False
        self._multiprocess = multiprocess()
        registry = REGISTRY if registry is None else registry
        self._exporter = attach(registry, name, self, self._multiprocess, self.buckets)

    def host(self, host: str, port: int) -> HostMetrics:
        """The series of ``host`` (canonical, an IPv6 address without brackets) and ``port``, until either goes."""
        return HostMetrics(self, host, port)

    def series(self, attribute: str, labels: tuple[str, ...]) -> Any:
        if self.closed:
            return plain(attribute, self.buckets)
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
    """One host's counters, gauges and histograms, made once and kept for the hot path.

    A series exists on the registry from the moment it is made: by
    :meth:`prepare`, at zero, for every label set the host's policy can
    produce, or on first use for the rare ones (a ``1xx`` outcome, a status
    a single call's own retry policy retries). Reading an attribute of a
    metric labelled by :data:`LABELS` alone makes its series.
    """

    __slots__ = (
        "_answered",
        "_attempts",
        "_fast",
        "_labelled",
        "_owner",
        "_plain",
        "_requests",
        "_shed",
        "_tried",
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
        "rate_limit_burst",
        "rate_limit_per_second",
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
    rate_limit_burst: Value
    rate_limit_per_second: Value
    rate_limit_wait: Buckets
    rate_limited: Value
    request_duration: Buckets

    #: The metrics labelled by :data:`LABELS` alone; each has an attribute of the same name.
    UNLABELLED = tuple(attribute for attribute, _, _, _, label in SPECS if label is None)

    def __init__(self, owner: TransportMetrics, host: str, port: int) -> None:
        self._owner = owner
        #: ``host:port`` (``[v6]:port``), as errors and ``CallInfo.host`` name the host.
        self.host = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        #: The values of :data:`LABELS` for this host's series.
        self.labels = (owner.name, host, str(port))
        # metric name -> second label value -> series
        self._labelled: dict[str, dict[str, Any]] = {name: {} for name in KINDS if name not in self.UNLABELLED}
        self._plain: dict[str, Any] = {}  # the series made so far of the metrics in UNLABELLED
        self._requests = self._labelled["requests"]
        self._attempts = self._labelled["attempts"]
        self._shed = self._labelled["shed"]
        # Every series a plain number (not prometheus-client's multiprocess children):
        # the two updates of every call and attempt add to them in place.
        self._fast = not owner._multiprocess
        # status -> its outcome's series, for the calls and tries a server answered (only when _fast).
        self._answered: dict[int, Any] = {}
        self._tried: dict[int, Any] = {}
        for name in ALWAYS:
            getattr(self, name)
        if not owner.closed:
            owner.hosts.add(self)

    if not TYPE_CHECKING:  # mypy keeps checking attribute names

        def __getattr__(self, name: str) -> Any:
            """Make the series of an unlabelled metric on first use (only called while its slot is empty)."""
            if name not in self.UNLABELLED:
                raise AttributeError(name)
            series = self._plain[name] = self._owner.series(name, self.labels)
            setattr(self, name, series)
            return series

    def prepare(self, policy: Policy) -> None:
        """Make, at zero, every series ``policy`` can write, so ``rate()`` and ``increase()`` see their first event.

        Only the layers ``policy`` turns on get series; those of a layer
        that is off never appear. Made series stay until the host goes (a
        layer a live update turns off keeps its totals). The gauges of
        configured limits that no layer moves are set here too: the rate
        limit's rate and burst.
        """
        for name, values in series_of(policy).items():
            if name in self.UNLABELLED:
                getattr(self, name)
            else:
                for value in values:
                    self._child(name, value)
        if policy.rate_limit is not None:  # the configured limit, here as a policy is made or updated
            self.rate_limit_per_second.set(policy.rate_limit.rate)
            self.rate_limit_burst.set(policy.rate_limit.burst)

    def _child(self, name: str, value: str) -> Any:
        series = self._labelled[name]
        child = series.get(value)
        if child is None:
            child = series[value] = self._owner.series(name, (*self.labels, value))
        return child

    def values(self, name: str) -> Iterator[tuple[tuple[str, ...], Any]]:
        """``(label values, value)`` of every series of metric ``name`` for this host."""
        if name in self.UNLABELLED:
            found = self._plain.get(name)
            if found is not None:
                yield self.labels, found
            return
        for value, child in list(self._labelled[name].items()):
            yield (*self.labels, value), child

    def labelled(self, name: str, value: str) -> Any:
        """The series of metric ``name`` for this host and the second label ``value``."""
        return self._child(name, value)

    def request(self, outcome: str, seconds: float, replaced: str | None = None) -> None:
        """A call ended: its outcome label, its duration, and what failed in place of a stale or fallback answer."""
        child = self._requests.get(outcome)
        if child is None:
            child = self._child("requests", outcome)
        if self._fast:  # Value.inc and Buckets.observe, without their frames
            child.value += 1.0
            histogram = self.request_duration
            histogram.counts[bisect_left(histogram.bounds, seconds)] += 1
            histogram.sum += seconds
        else:
            child.inc()
            self.request_duration.observe(seconds)
        shed = outcome if outcome in SHED else replaced if replaced in SHED else None
        if shed is not None:
            child = self._shed.get(shed)
            if child is None:
                child = self._child("shed", shed)
            child.inc()

    def answered(self, status: int, seconds: float) -> None:
        """A call ended with the server's answer ``status`` (not stale, nothing shed): :meth:`request`, cheaper."""
        child = self._answered.get(status)
        if child is None:
            outcome = outcome_of_status(status)
            self.request(outcome, seconds)
            if self._fast:
                self._answered[status] = self._requests[outcome]
            return
        child.value += 1.0
        histogram = self.request_duration
        histogram.counts[bisect_left(histogram.bounds, seconds)] += 1
        histogram.sum += seconds

    def tried(self, status: int, seconds: float) -> None:
        """A try got the server's answer ``status``: :meth:`attempt`, cheaper."""
        child = self._tried.get(status)
        if child is None:
            outcome = outcome_of_status(status)
            self.attempt(outcome, seconds)
            if self._fast:
                self._tried[status] = self._attempts[outcome]
            return
        child.value += 1.0
        histogram = self.attempt_duration
        histogram.counts[bisect_left(histogram.bounds, seconds)] += 1
        histogram.sum += seconds

    def attempt(self, outcome: str, seconds: float) -> None:
        child = self._attempts.get(outcome)
        if child is None:
            child = self._child("attempts", outcome)
        if self._fast:
            child.value += 1.0
            histogram = self.attempt_duration
            histogram.counts[bisect_left(histogram.bounds, seconds)] += 1
            histogram.sum += seconds
        else:
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
        for value in list(self._plain.values()):
            if isinstance(value, SharedGauge):
                value.detach()
        for series in self._labelled.values():
            for child in series.values():
                if isinstance(child, SharedGauge):
                    child.detach()


#: The series every host has, whatever its policy: each call's outcome and duration.
ALWAYS = ("request_duration", "attempt_duration")
#: Outcomes of calls and of tries that any host may see (``1xx`` and ``other`` are made when seen).
_ANSWERS = ("2xx", "3xx", "4xx", "5xx", "timeout", "error", "cancelled")


def series_of(policy: Policy) -> dict[str, tuple[str, ...]]:
    """Every metric ``policy`` can write, with the values of its second label (``()`` for none)."""
    # Which local refusal each layer makes: the outcome, stale reason and shed reason it writes.
    # A layer in dry run refuses nothing: it counts what it would have blocked instead.
    refusing = {"circuit_breaker": "circuit_open", "rate_limit": "rate_limited", "bulkhead": "bulkhead_full"}
    layers = {layer: getattr(policy, layer) for layer in refusing}
    refusals = tuple(refusing[layer] for layer, on in layers.items() if on is not None and not on.dry_run)
    dry = tuple(layer for layer, on in layers.items() if on is not None and on.dry_run)
    found: dict[str, tuple[str, ...]] = {
        "requests": (*_ANSWERS, *refusals, *(("stale",) if policy.stale_cache is not None else ())),
        "attempts": _ANSWERS,
        **{name: () for name in ALWAYS},
        "shed": refusals,
    }
    if dry:
        found["dry_run_blocked"] = dry
    if policy.timeout is not None:
        kinds = ("attempt", "total", "idle")
        found["timeouts"] = tuple(kind for kind in kinds if getattr(policy.timeout, kind) is not None)
    if policy.retry is not None:
        statuses = tuple(f"status_{status}" for status in sorted(policy.retry.statuses))
        found["retries"] = (*statuses, "timeout", "connect_error", "network_error")
        found["budget_exhausted"] = ()  # a single call's own retry policy may bring a budget
    if policy.circuit_breaker is not None:
        found["circuit_state"] = CIRCUIT_STATES
        found["circuit_opened"] = ()
    if policy.rate_limit is not None:
        for name in ("rate_limit_wait", "cooldown", "rate_limit_per_second", "rate_limit_burst"):
            found[name] = ()
        if not policy.rate_limit.dry_run:
            found["rate_limited"] = ()
    if policy.bulkhead is not None:
        for name in ("bulkhead_in_flight", "bulkhead_queued", "bulkhead_limit"):
            found[name] = ()
        if not policy.bulkhead.dry_run:
            from ._call import PRIORITIES

            found["bulkhead_rejected"] = PRIORITIES
    if policy.stale_cache is not None:
        found["stale_served"] = ("server_error", "timeout", "error", *refusals)
        found["cache_entries"] = found["cache_bytes"] = ()
    if policy.coalesce is not None:
        found["coalesced"] = ("response", "error", "unshared")
    return found


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
#: The outcome label of every status from 0 to 599, for the hot path: ``OUTCOMES[status]``.
OUTCOMES: tuple[str, ...] = tuple(_STATUS_CLASSES[status // 100] if status >= 100 else "other" for status in range(600))


def outcome_of_status(status: int) -> str:
    """The outcome label of a response: its status class."""
    return OUTCOMES[status] if 0 <= status < 600 else "other"
