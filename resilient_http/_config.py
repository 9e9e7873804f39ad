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
from typing import Any

from ._checks import (
    MAX_ATTEMPTS,
    MAX_BUDGET_WINDOW,
    MAX_BYTES,
    MAX_CALLS,
    check_count,
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


def _header_names(owner: str, name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Collection):
        raise ConfigurationError(f"{owner}.{name}", value, "must be a collection of header names")
    for header in value:
        if not isinstance(header, str) or not _TOKEN.fullmatch(header):
            raise ConfigurationError(f"{owner}.{name}", value, f"{header!r} is not a header name")
    return tuple(sorted({header.lower() for header in value}))


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
        check_seconds(self, "attempt", optional=True)
        check_seconds(self, "total", optional=True)
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
    """

    attempts: int = 3
    backoff: float = 0.1
    max_backoff: float = 10.0
    statuses: Collection[int] = frozenset({408, 429, 502, 503, 504})
    max_retry_after: float = 60.0
    budget: RetryBudget | None = field(default_factory=RetryBudget)

    def __post_init__(self) -> None:
        check_count(self, "attempts", 1, MAX_ATTEMPTS)
        check_seconds(self, "backoff")
        check_seconds(self, "max_backoff")
        not_below(self, "max_backoff", "backoff")
        check_statuses(self, "statuses")
        check_seconds(self, "max_retry_after", zero=True)
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
    one call a year and a million a second (``MAX_RATE``).
    """

    rate: float
    burst: int = 1
    max_wait: float | None = None

    def __post_init__(self) -> None:
        check_rate(self, "rate")
        check_count(self, "burst", 1, MAX_CALLS)
        check_seconds(self, "max_wait", zero=True, optional=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class BulkheadPolicy:
    """At most ``max_concurrent`` attempts in flight per host, ``max_queue`` waiting.

    A slot is a connection: a streamed response body holds its slot until it
    is read to the end or closed. A waiting call gives up after ``queue_timeout`` seconds (``None``: the
    total timeout bounds the wait).
    """

    max_concurrent: int = 100
    max_queue: int = 100
    queue_timeout: float | None = None

    def __post_init__(self) -> None:
        check_count(self, "max_concurrent", 1, MAX_CALLS)
        check_count(self, "max_queue", 0, MAX_CALLS)
        check_seconds(self, "queue_timeout", optional=True)


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


LAYER_TYPES: dict[str, type] = {
    "timeout": TimeoutPolicy,
    "retry": RetryPolicy,
    "circuit_breaker": CircuitBreakerPolicy,
    "rate_limit": RateLimitPolicy,
    "bulkhead": BulkheadPolicy,
    "stale_cache": StaleCachePolicy,
    "coalesce": CoalescePolicy,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """Which layers a host gets, and how each behaves; ``None`` turns a layer off.

    ``Policy()`` gives timeouts, retries, a circuit breaker and a bulkhead;
    the rate limiter (it needs a rate), the stale cache (it keeps
    responses in memory) and coalescing (it answers one caller with
    another's upstream call) are opt-in.
    """

    timeout: TimeoutPolicy | None = TimeoutPolicy()
    retry: RetryPolicy | None = RetryPolicy()
    circuit_breaker: CircuitBreakerPolicy | None = CircuitBreakerPolicy()
    rate_limit: RateLimitPolicy | None = None
    bulkhead: BulkheadPolicy | None = BulkheadPolicy()
    stale_cache: StaleCachePolicy | None = None
    coalesce: CoalescePolicy | None = None

    def __post_init__(self) -> None:
        for name, kind in LAYER_TYPES.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise ConfigurationError(f"Policy.{name}", value, f"must be a {kind.__name__} or None")
