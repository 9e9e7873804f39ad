"""Policies: frozen, validated at construction, one dataclass per layer.

A :class:`Policy` says which layers a host gets and how each behaves; a layer
set to ``None`` is off and costs nothing. Every dataclass checks its fields in
``__post_init__`` and raises :class:`ConfigurationError` naming the field,
the value and the bound it broke, so a bad policy fails when the transport
is built, not on the first call at three in the morning.

Every number has bounds (see :mod:`resilient_http._checks`): seconds from
a millisecond to a year, rates from one call a year to a million a second,
counts of calls up to a million, so that no value accepted here can make a
call crash or switch a layer off later.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Literal

from ._checks import (
    MAX_ATTEMPTS,
    MAX_BUDGET_WINDOW,
    MAX_BYTES,
    MAX_CALLS,
    check_choice,
    check_count,
    check_methods,
    check_number,
    check_rate,
    check_ratio,
    check_seconds,
    check_statuses,
    not_above,
    not_below,
)
from ._errors import ConfigurationError

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # a field name (RFC 9110 §5.1)


def _check_flag(owner: object, name: str) -> None:
    value = getattr(owner, name)
    if not isinstance(value, bool):
        raise ConfigurationError(f"{type(owner).__name__}.{name}", value, "must be true or false")


def _header_names(owner: str, name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Collection):
        raise ConfigurationError(f"{owner}.{name}", value, "must be a collection of header names")
    for header in value:
        if not isinstance(header, str) or not _TOKEN.fullmatch(header):
            raise ConfigurationError(f"{owner}.{name}", value, f"{header!r} is not a header name")
    return tuple(sorted({header.lower() for header in value}))


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutPolicy:
    """How long one attempt, the whole call, and a pause in a streamed body may take (seconds; ``None``: unbounded).

    ``attempt`` covers one try: waiting for a pool connection, connecting,
    sending, receiving the headers, and the first bytes of a small body
    (one that announces a ``Content-Length`` of at most 1 MiB). ``total``
    covers everything before the response is returned: queueing, every
    attempt, every backoff. A body that streams on after that is bounded by
    ``idle``, the longest pause allowed between two of its chunks, so a
    download or an event stream that keeps flowing is never cut; set
    ``stream_total`` to bound it by ``total`` as well.

    httpx's implicit 5 s default per operation is dropped, so that it cannot
    cut attempts shorter than the policy says; timeouts the caller sets
    explicitly keep their httpx meaning inside every attempt.
    """

    attempt: float | None = 10.0
    total: float | None = 30.0
    idle: float | None = 10.0
    stream_total: bool = False

    def __post_init__(self) -> None:
        check_seconds(self, "attempt", optional=True)
        check_seconds(self, "total", optional=True)
        check_seconds(self, "idle", optional=True)
        if not isinstance(self.stream_total, bool):
            raise ConfigurationError("TimeoutPolicy.stream_total", self.stream_total, "must be true or false")
        not_above(self, "attempt", "total")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryBudget:
    """How many retries a host may receive, so that an outage cannot become a retry storm.

    Over any ``window`` seconds, retries may add at most ``ratio`` of the
    calls made to the host, plus ``min_per_second`` retries each second so
    that a quiet host can still retry (Finagle's RetryBudget). The window
    is at most a minute (``MAX_BUDGET_WINDOW``, as Finagle's): the host
    keeps a count for each second of it.
    """

    ratio: float = 0.2
    min_per_second: float = 10.0
    window: float = 10.0

    def __post_init__(self) -> None:
        check_ratio(self, "ratio")
        check_rate(self, "min_per_second", zero=True)
        check_seconds(self, "window", high=MAX_BUDGET_WINDOW)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """When and how a failed attempt is tried again.

    ``attempts`` counts every try, the first included, up to
    100 (``MAX_ATTEMPTS``). The wait before try
    *n* + 1 is drawn uniformly from ``[0, min(max_backoff, backoff * 2**(n-1))]``
    ("full jitter"). A ``Retry-After`` on the response sets the least wait:
    the jitter is added to it, never taken from it. A Retry-After longer than
    ``max_retry_after``, or a wait that would not end before the total
    timeout, means the response is returned at once instead.

    ``statuses`` includes 529, which no RFC registers: the one meaning
    servers give it is "overloaded, try later" (Anthropic's API, whose SDK
    retries it). A host that never sends it loses nothing; a host that does
    is retried as for a 503, and the same rules of method apply to it.

    Which requests may be tried again once they may have reached the
    server: the idempotent methods (RFC 9110 §9.2.2), requests with an
    ``Idempotency-Key``, the ``methods`` added here for a host whose API
    makes them safe to repeat (``methods={"POST"}``), and a 429 for every
    method: it is the server refusing to act, as the AWS, Azure, OpenAI and
    Anthropic SDKs read it.
    """

    attempts: int = 3
    backoff: float = 0.1
    max_backoff: float = 10.0
    statuses: Collection[int] = frozenset({408, 429, 502, 503, 504, 529})
    max_retry_after: float = 60.0
    budget: RetryBudget | None = field(default_factory=RetryBudget)
    methods: Collection[str] = frozenset()

    def __post_init__(self) -> None:
        check_count(self, "attempts", 1, MAX_ATTEMPTS)
        check_seconds(self, "backoff")
        check_seconds(self, "max_backoff")
        not_below(self, "max_backoff", "backoff")
        check_statuses(self, "statuses")
        check_seconds(self, "max_retry_after", zero=True)
        check_methods(self, "methods")
        if self.budget is not None and not isinstance(self.budget, RetryBudget):
            raise ConfigurationError("RetryPolicy.budget", self.budget, "must be a RetryBudget or None")


@dataclass(frozen=True, slots=True, kw_only=True)
class CircuitBreakerPolicy:
    """When a host is cut off, and how it is let back in.

    The breaker opens when at least ``minimum_calls`` calls finished within
    the last ``window`` seconds and the share that failed reaches
    ``failure_ratio``. It then refuses calls for ``break_duration`` seconds,
    lets ``half_open_calls`` trial calls through, closes when they all
    succeed and opens again on the first that fails, each time for twice as
    long (jittered) up to ``max_break_duration``.

    With ``dry_run``, the breaker counts, opens and closes as it would, but
    lets every call through: a call it would have refused is counted in
    ``resilient_http_dry_run_blocked_total{layer="circuit_breaker"}`` and
    named in ``CallInfo.dry_run``, and its outcome is not counted (a real
    breaker would never have seen it).
    """

    failure_ratio: float = 0.5
    minimum_calls: int = 20
    window: float = 10.0
    break_duration: float = 5.0
    max_break_duration: float = 60.0
    half_open_calls: int = 1
    failure_statuses: Collection[int] = frozenset({500, 502, 503, 504})
    dry_run: bool = False

    def __post_init__(self) -> None:
        _check_flag(self, "dry_run")
        check_ratio(self, "failure_ratio", zero=False)
        check_count(self, "minimum_calls", 1, MAX_CALLS)
        check_seconds(self, "window")
        check_seconds(self, "break_duration")
        check_seconds(self, "max_break_duration")
        not_below(self, "max_break_duration", "break_duration")
        check_count(self, "half_open_calls", 1, MAX_CALLS)
        check_statuses(self, "failure_statuses")


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitPolicy:
    """A token bucket per host: ``rate`` calls a second, ``burst`` at once.

    A call waits its turn for at most ``max_wait`` seconds (``None``: as long
    as the total timeout allows; ``0``: never waits). ``rate`` lies between
    one call a year and a million a second (``MAX_RATE``). No single response
    holds the host back longer than ``max_cooldown`` seconds: a longer
    ``Retry-After`` or ``RateLimit`` reset, and a wider ``RateLimit``
    spacing between calls, are cut to it.

    With ``dry_run``, no call ever waits or is refused: a call whose turn has
    not come is sent at once, without taking a turn (as a policer, not a
    shaper), counted in ``resilient_http_dry_run_blocked_total{layer="rate_limit"}``
    and named in ``CallInfo.dry_run``.
    """

    rate: float
    burst: int = 1
    max_wait: float | None = None
    max_cooldown: float = 60.0
    dry_run: bool = False

    def __post_init__(self) -> None:
        _check_flag(self, "dry_run")
        check_rate(self, "rate")
        check_count(self, "burst", 1, MAX_CALLS)
        check_seconds(self, "max_wait", zero=True, optional=True)
        check_seconds(self, "max_cooldown")


#: How an adaptive limit learns: from drops alone (``"aimd"``), or from latency too (``"gradient"``).
AdaptiveMode = Literal["aimd", "gradient"]


@dataclass(frozen=True, slots=True, kw_only=True)
class AdaptiveLimit:
    """A bulkhead limit that follows what the host can take, between ``min`` and ``max_concurrent``.

    A *drop* is an attempt that timed out (an httpx timeout or the attempt
    timeout; the call's own total timeout says nothing of the host), could
    not connect, or got a status in ``drop_statuses`` (429 and 503: the
    server says it is overloaded). A drop multiplies the limit by ``backoff``, at most once per round trip:
    drops of attempts sent before the last decrease were sent under the old
    limit and say nothing about the new one (TCP's and QUIC's recovery
    period), so a burst of 503s shrinks the limit once, not to ``min``.

    Other answers below 500 move the limit by ``mode`` (other errors, and
    other server errors, move nothing), and only while it is in use
    (at least half of it in flight when the attempt was sent): an idle
    host says nothing about its capacity.

    - ``"aimd"`` (Netflix concurrency-limits' AIMDLimit, the default): the
      limit grows by one per round trip (one per ``limit`` answers), so that
      growth and the once-per-round-trip decrease balance near capacity.
    - ``"gradient"`` (Netflix's Gradient2Limit): each answer's latency is
      compared with a long-run average; the limit moves towards
      ``limit * clamp(tolerance * long / latency, 0.5, 1) + queue``
      (``queue`` = 4), by ``smoothing`` of the way each time. Rising latency
      shrinks it before the server starts refusing.

    The limit starts at ``initial`` (lowered to ``max_concurrent`` when above
    it). Calls beyond the limit queue as with a fixed one: priorities and
    shedding work on top of it.
    """

    mode: AdaptiveMode = "aimd"
    initial: int = 10
    min: int = 1
    backoff: float = 0.9
    drop_statuses: Collection[int] = frozenset({429, 503})
    smoothing: float = 0.2
    tolerance: float = 1.5

    def __post_init__(self) -> None:
        check_choice(self, "mode", ("aimd", "gradient"))
        check_count(self, "min", 1, MAX_CALLS)
        check_count(self, "initial", 1, MAX_CALLS)
        not_below(self, "initial", "min")
        check_number(self, "backoff", 0.5, 0.99)
        check_statuses(self, "drop_statuses")
        check_ratio(self, "smoothing", zero=False)
        check_number(self, "tolerance", 1, 10)


@dataclass(frozen=True, slots=True, kw_only=True)
class BulkheadPolicy:
    """At most ``max_concurrent`` attempts in flight per host, ``max_queue`` waiting.

    A slot is a connection: a streamed response body holds its slot until it
    is read to the end or closed. A waiting call gives up after ``queue_timeout`` seconds (``None``: the
    total timeout bounds the wait).

    With ``adaptive`` (an :class:`AdaptiveLimit`), the number of slots follows
    the host's answers, from ``adaptive.min`` up to ``max_concurrent``, which
    stays the hard ceiling.

    With ``dry_run``, an attempt that finds no free slot is sent at once
    instead of queueing (or being shed), counted in
    ``resilient_http_dry_run_blocked_total{layer="bulkhead"}`` and named in
    ``CallInfo.dry_run``; it still counts as in flight, so the gauges show
    how far above the limit the host really goes.
    """

    max_concurrent: int = 100
    max_queue: int = 100
    queue_timeout: float | None = None
    adaptive: AdaptiveLimit | None = None
    dry_run: bool = False

    def __post_init__(self) -> None:
        _check_flag(self, "dry_run")
        check_count(self, "max_concurrent", 1, MAX_CALLS)
        check_count(self, "max_queue", 0, MAX_CALLS)
        check_seconds(self, "queue_timeout", optional=True)
        if self.adaptive is not None:
            if not isinstance(self.adaptive, AdaptiveLimit):
                raise ConfigurationError("BulkheadPolicy.adaptive", self.adaptive, "must be an AdaptiveLimit or None")
            if self.adaptive.min > self.max_concurrent:
                raise ConfigurationError(
                    "BulkheadPolicy.adaptive",
                    self.adaptive,
                    f"its min ({self.adaptive.min}) must not exceed max_concurrent ({self.max_concurrent})",
                )


@dataclass(frozen=True, slots=True, kw_only=True)
class StaleCachePolicy:
    """Keep recent good answers, and serve them when the host cannot answer.

    ``max_stale`` seconds is how old a stored answer may be when served;
    ``max_entries`` and ``max_bytes`` bound this host's memory, and the
    largest of them among the transport's policies bounds all hosts together;
    bodies above ``max_body_bytes`` are never stored.

    The cache is shared by every caller of the transport, so it keeps only
    what the origin lets a shared cache keep (RFC 9111), and answers to
    requests with ``Authorization`` or ``Cookie`` only when the answer says
    ``public`` (or ``s-maxage``, ``must-revalidate``). ``identity_headers``
    names request headers that say who is asking (``X-Api-Key``, a tenant
    id, ``Authorization``): their values become part of the key, so answers
    are kept per identity and never reach another one.
    """

    max_stale: float = 300.0
    max_entries: int = 1000
    max_bytes: int = 50_000_000
    max_body_bytes: int = 1_000_000
    identity_headers: Collection[str] = ()

    def __post_init__(self) -> None:
        check_seconds(self, "max_stale")
        check_count(self, "max_entries", 1, MAX_CALLS)
        check_count(self, "max_bytes", 1, MAX_BYTES)
        check_count(self, "max_body_bytes", 0, MAX_BYTES)
        not_above(self, "max_body_bytes", "max_bytes")
        object.__setattr__(
            self, "identity_headers", _header_names("StaleCachePolicy", "identity_headers", self.identity_headers)
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class CoalescePolicy:
    """Identical GETs and HEADs in flight at once share one upstream call.

    Calls are identical when their requests have the stale cache's key
    (method, scheme, address, ``Host``, path and query) with the same
    ``Authorization`` and ``Cookie`` values and the same values of the
    ``identity_headers`` named here (``X-Api-Key``, a tenant id), and
    when they have the same policy and priority. Followers get a copy of
    the first call's answer if its body is in memory and at most
    ``max_body_bytes`` long (the attempt reads bodies up to 1 MiB with a
    ``Content-Length``; others stream), sets no cookie, and if the headers
    named by its ``Vary`` are equal in both requests; otherwise each sends
    its own. A follower waits at most until its own total deadline.
    """

    max_body_bytes: int = 1 << 20
    identity_headers: Collection[str] = ()

    def __post_init__(self) -> None:
        check_count(self, "max_body_bytes", 0, MAX_BYTES)
        object.__setattr__(
            self, "identity_headers", _header_names("CoalescePolicy", "identity_headers", self.identity_headers)
        )


#: How many recent attempt latencies an adaptive hedge delay is read from (its warm-up is at most this many).
HEDGE_SAMPLES = 200
#: The most hedges one attempt may add.
MAX_HEDGES = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class HedgePolicy:
    """Send another copy of a slow attempt, and take whichever answers first ("The Tail at Scale").

    When an attempt has been outstanding for ``delay`` seconds, a copy of
    it is sent; the first acceptable answer wins and the others are
    cancelled. A copy that fails with a retryable failure fires the next at
    once. At most ``max_hedges`` copies are added to one attempt.

    ``delay=None`` (the default) adapts it: the ``quantile`` (0.95) of the
    host's recent first-copy latencies (the last ``HEDGE_SAMPLES``), or,
    when a gap wider than the median lies within the quantile's sampling
    error, half a median past the gap's lower edge; never below
    ``min_delay``; nothing is hedged before ``warmup`` latencies were seen.
    A fixed ``delay`` is used as given.

    Each call earns ``budget`` (5 %) of a hedge, saved up to the hedges of
    ``HEDGE_SAMPLES`` calls: hedges add at most that share of the host's
    calls in the long run. Each also takes a share of the retry budget, a
    rate-limit token that is free at once and a free bulkhead slot: a hedge
    never waits for either. Only requests that are safe to send twice are
    hedged (the methods the retry layer may repeat, or an
    ``Idempotency-Key``, with a body that can be sent twice at once), and
    none while the circuit is not closed or the server asked for a pause.
    """

    delay: float | None = None
    quantile: float = 0.95
    min_delay: float = 0.01
    warmup: int = 20
    max_hedges: int = 1
    budget: float = 0.05

    def __post_init__(self) -> None:
        check_seconds(self, "delay", optional=True)
        check_number(self, "quantile", 0.5, 0.999)
        check_seconds(self, "min_delay")
        check_count(self, "warmup", 1, HEDGE_SAMPLES)
        check_count(self, "max_hedges", 1, MAX_HEDGES)
        check_ratio(self, "budget", zero=False)


LAYER_TYPES: dict[str, type] = {
    "timeout": TimeoutPolicy,
    "retry": RetryPolicy,
    "circuit_breaker": CircuitBreakerPolicy,
    "rate_limit": RateLimitPolicy,
    "bulkhead": BulkheadPolicy,
    "stale_cache": StaleCachePolicy,
    "coalesce": CoalescePolicy,
    "hedge": HedgePolicy,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """Which layers a host gets, and how each behaves; ``None`` turns a layer off.

    ``Policy()`` gives timeouts, retries, a circuit breaker and a bulkhead;
    the rate limiter (it needs a rate), the stale cache (it keeps
    responses in memory), coalescing (it answers one caller with
    another's upstream call) and hedging (it sends extra copies) are opt-in.
    """

    timeout: TimeoutPolicy | None = TimeoutPolicy()
    retry: RetryPolicy | None = RetryPolicy()
    circuit_breaker: CircuitBreakerPolicy | None = CircuitBreakerPolicy()
    rate_limit: RateLimitPolicy | None = None
    bulkhead: BulkheadPolicy | None = BulkheadPolicy()
    stale_cache: StaleCachePolicy | None = None
    coalesce: CoalescePolicy | None = None
    hedge: HedgePolicy | None = None

    def __post_init__(self) -> None:
        for name, kind in LAYER_TYPES.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise ConfigurationError(f"Policy.{name}", value, f"must be a {kind.__name__} or None")
        hedge, timeout = self.hedge, self.timeout
        if hedge is not None and hedge.delay is not None and timeout is not None and timeout.total is not None:
            if hedge.delay >= timeout.total:  # the hedge could never be sent
                raise ConfigurationError(
                    "HedgePolicy.delay", hedge.delay, f"must be below TimeoutPolicy.total ({timeout.total})"
                )
