"""Policies: frozen, validated at construction, one dataclass per layer.

A :class:`Policy` says which layers a host gets and how each behaves; a layer
set to ``None`` is off and costs nothing. Every dataclass checks its fields in
``__post_init__`` and raises :class:`ConfigurationError` naming the field and
the value, so a bad policy fails when the transport is built, not on the
first call at three in the morning.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from ._exceptions import ConfigurationError

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


def _number(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{owner}.{name}", value, "must be a number")
    if math.isnan(value):
        raise ConfigurationError(f"{owner}.{name}", value, "must be a number")
    return float(value)


def _positive(owner: str, name: str, value: Any) -> None:
    if _number(owner, name, value) <= 0 or math.isinf(value):
        raise ConfigurationError(f"{owner}.{name}", value, "must be a positive, finite number of seconds")


def _non_negative(owner: str, name: str, value: Any) -> None:
    if _number(owner, name, value) < 0 or math.isinf(value):
        raise ConfigurationError(f"{owner}.{name}", value, "must be zero or a positive, finite number")


def _ratio(owner: str, name: str, value: Any) -> None:
    if not 0.0 <= _number(owner, name, value) <= 1.0:
        raise ConfigurationError(f"{owner}.{name}", value, "must be between 0 and 1")


def _count(owner: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{owner}.{name}", value, "must be a whole number")
    if value < minimum:
        raise ConfigurationError(f"{owner}.{name}", value, f"must be at least {minimum}")


def _statuses(owner: str, name: str, value: Any) -> frozenset[int]:
    if isinstance(value, str | bytes) or not isinstance(value, Collection):
        raise ConfigurationError(f"{owner}.{name}", value, "must be a collection of HTTP status codes")
    for status in value:
        if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
            raise ConfigurationError(f"{owner}.{name}", value, f"{status!r} is not an HTTP status code")
    return frozenset(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutPolicy:
    """How long one attempt, and the whole call, may take (seconds; ``None``: unbounded).

    ``total`` covers everything the call does: queueing for a slot, every
    attempt, every backoff and reading the response body. ``attempt`` covers
    one try: connecting, sending, and receiving the headers (and the body when
    it is small enough to be read inside the attempt). These replace the
    client's own httpx timeouts, which would otherwise cut attempts short.
    """

    attempt: float | None = 10.0
    total: float | None = 30.0

    def __post_init__(self) -> None:
        if self.attempt is not None:
            _positive("TimeoutPolicy", "attempt", self.attempt)
        if self.total is not None:
            _positive("TimeoutPolicy", "total", self.total)
        if self.attempt is not None and self.total is not None and self.attempt > self.total:
            raise ConfigurationError(
                "TimeoutPolicy.attempt", self.attempt, f"must not exceed TimeoutPolicy.total ({self.total})"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryBudget:
    """How many retries a host may receive, so that an outage cannot become a retry storm.

    Over any ``window`` seconds, retries may add at most ``ratio`` of the
    calls made to the host, plus ``min_per_second`` retries each second so
    that a quiet host can still retry (Finagle's RetryBudget).
    """

    ratio: float = 0.2
    min_per_second: float = 10.0
    window: float = 10.0

    def __post_init__(self) -> None:
        _ratio("RetryBudget", "ratio", self.ratio)
        _non_negative("RetryBudget", "min_per_second", self.min_per_second)
        _positive("RetryBudget", "window", self.window)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """When and how a failed attempt is tried again.

    ``attempts`` counts every try, the first included. The wait before try
    *n* + 1 is drawn uniformly from ``[0, min(max_backoff, backoff * 2**(n-1))]``
    ("full jitter"). A ``Retry-After`` on the response sets the least wait:
    the jitter is added to it, never taken from it. A Retry-After longer than
    ``max_retry_after``, or a wait that would not end before the total
    timeout, means the response is returned at once instead.
    """

    attempts: int = 3
    backoff: float = 0.1
    max_backoff: float = 10.0
    statuses: Collection[int] = frozenset({408, 429, 502, 503, 504})
    max_retry_after: float = 60.0
    budget: RetryBudget | None = field(default_factory=RetryBudget)

    def __post_init__(self) -> None:
        _count("RetryPolicy", "attempts", self.attempts, 1)
        _positive("RetryPolicy", "backoff", self.backoff)
        _positive("RetryPolicy", "max_backoff", self.max_backoff)
        if self.max_backoff < self.backoff:
            raise ConfigurationError(
                "RetryPolicy.max_backoff", self.max_backoff, f"must not be below RetryPolicy.backoff ({self.backoff})"
            )
        object.__setattr__(self, "statuses", _statuses("RetryPolicy", "statuses", self.statuses))
        _non_negative("RetryPolicy", "max_retry_after", self.max_retry_after)
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
    """

    failure_ratio: float = 0.5
    minimum_calls: int = 20
    window: float = 10.0
    break_duration: float = 5.0
    max_break_duration: float = 60.0
    half_open_calls: int = 1
    failure_statuses: Collection[int] = frozenset({500, 502, 503, 504})

    def __post_init__(self) -> None:
        _ratio("CircuitBreakerPolicy", "failure_ratio", self.failure_ratio)
        if self.failure_ratio == 0:
            raise ConfigurationError("CircuitBreakerPolicy.failure_ratio", 0, "must be above 0")
        _count("CircuitBreakerPolicy", "minimum_calls", self.minimum_calls, 1)
        _positive("CircuitBreakerPolicy", "window", self.window)
        _positive("CircuitBreakerPolicy", "break_duration", self.break_duration)
        _positive("CircuitBreakerPolicy", "max_break_duration", self.max_break_duration)
        if self.max_break_duration < self.break_duration:
            raise ConfigurationError(
                "CircuitBreakerPolicy.max_break_duration",
                self.max_break_duration,
                f"must not be below CircuitBreakerPolicy.break_duration ({self.break_duration})",
            )
        _count("CircuitBreakerPolicy", "half_open_calls", self.half_open_calls, 1)
        object.__setattr__(
            self, "failure_statuses", _statuses("CircuitBreakerPolicy", "failure_statuses", self.failure_statuses)
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitPolicy:
    """A token bucket per host: ``rate`` calls a second, ``burst`` at once.

    A call waits its turn for at most ``max_wait`` seconds (``None``: as long
    as the total timeout allows; ``0``: never waits). No single response
    holds the host back longer than ``max_cooldown`` seconds: a longer
    ``Retry-After`` or ``RateLimit`` reset, and a wider ``RateLimit``
    spacing between calls, are cut to it.
    """

    rate: float
    burst: int = 1
    max_wait: float | None = None
    max_cooldown: float = 60.0

    def __post_init__(self) -> None:
        _positive("RateLimitPolicy", "rate", self.rate)
        _count("RateLimitPolicy", "burst", self.burst, 1)
        if self.max_wait is not None:
            _non_negative("RateLimitPolicy", "max_wait", self.max_wait)
        _positive("RateLimitPolicy", "max_cooldown", self.max_cooldown)


@dataclass(frozen=True, slots=True, kw_only=True)
class BulkheadPolicy:
    """At most ``max_concurrent`` attempts in flight per host, ``max_queue`` waiting.

    A waiting call gives up after ``queue_timeout`` seconds (``None``: the
    total timeout bounds the wait).
    """

    max_concurrent: int = 100
    max_queue: int = 100
    queue_timeout: float | None = None

    def __post_init__(self) -> None:
        _count("BulkheadPolicy", "max_concurrent", self.max_concurrent, 1)
        _count("BulkheadPolicy", "max_queue", self.max_queue, 0)
        if self.queue_timeout is not None:
            _positive("BulkheadPolicy", "queue_timeout", self.queue_timeout)


@dataclass(frozen=True, slots=True, kw_only=True)
class StaleCachePolicy:
    """Keep recent good answers, and serve them when the host cannot answer.

    ``max_stale`` seconds is how old a stored answer may be when served;
    ``max_entries`` and ``max_bytes`` bound memory per host and across hosts;
    bodies above ``max_body_bytes`` are never stored.
    """

    max_stale: float = 300.0
    max_entries: int = 1000
    max_bytes: int = 50_000_000
    max_body_bytes: int = 1_000_000

    def __post_init__(self) -> None:
        _positive("StaleCachePolicy", "max_stale", self.max_stale)
        _count("StaleCachePolicy", "max_entries", self.max_entries, 1)
        _count("StaleCachePolicy", "max_bytes", self.max_bytes, 1)
        _count("StaleCachePolicy", "max_body_bytes", self.max_body_bytes, 0)
        if self.max_body_bytes > self.max_bytes:
            raise ConfigurationError(
                "StaleCachePolicy.max_body_bytes",
                self.max_body_bytes,
                f"must not exceed StaleCachePolicy.max_bytes ({self.max_bytes})",
            )


LAYER_TYPES: dict[str, type] = {
    "timeout": TimeoutPolicy,
    "retry": RetryPolicy,
    "circuit_breaker": CircuitBreakerPolicy,
    "rate_limit": RateLimitPolicy,
    "bulkhead": BulkheadPolicy,
    "stale_cache": StaleCachePolicy,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """Which layers a host gets, and how each behaves; ``None`` turns a layer off.

    ``Policy()`` gives timeouts, retries, a circuit breaker and a bulkhead;
    the rate limiter (it needs a rate) and the stale cache (it keeps
    responses in memory) are opt-in.
    """

    timeout: TimeoutPolicy | None = TimeoutPolicy()
    retry: RetryPolicy | None = RetryPolicy()
    circuit_breaker: CircuitBreakerPolicy | None = CircuitBreakerPolicy()
    rate_limit: RateLimitPolicy | None = None
    bulkhead: BulkheadPolicy | None = BulkheadPolicy()
    stale_cache: StaleCachePolicy | None = None

    def __post_init__(self) -> None:
        for name, kind in LAYER_TYPES.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise ConfigurationError(f"Policy.{name}", value, f"must be a {kind.__name__} or None")
