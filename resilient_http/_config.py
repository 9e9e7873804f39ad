"""Policies: frozen, validated at construction, one dataclass per layer.

A :class:`Policy` says which layers a host gets and how each behaves; a layer
set to ``None`` is off and costs nothing. Every dataclass checks its fields in
``__post_init__`` and raises :class:`ConfigurationError` naming the field,
the value and the bound it broke, so a bad policy fails when the transport
is built, not on the first call at three in the morning.

Every number has bounds, whatever its type, because a value accepted here
must never make a call crash or a layer silently do nothing later: a rate of
``1e-300`` is an interval of ``1e300`` seconds, a window of ``1e-320``
divides by almost nothing, ``10**400`` does not fit in a float. Seconds lie
between :data:`MIN_SECONDS` (a millisecond) and :data:`MAX_SECONDS` (a
year); rates between one call a year and :data:`MAX_RATE` a second; counts
of calls up to :data:`MAX_CALLS`. Any real number is accepted (``int``,
``float``, ``Decimal``, ``Fraction``, numpy scalars) except ``bool``, NaN and
infinities; one that is not a plain ``int`` or ``float`` is stored as a
``float`` (an ``int`` for counts), so the layers only ever do plain arithmetic.

The ``check_*`` helpers validate one field of a policy in place; a new
policy field should use them rather than a rule of its own.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Collection
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from ._exceptions import ConfigurationError

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

#: The shortest duration any policy field accepts (0 aside, where 0 means "never").
MIN_SECONDS = 0.001
#: The longest: a year.
MAX_SECONDS = 365 * 24 * 3600.0
#: The highest rate (calls a second) any policy field accepts; the lowest is one a year.
MAX_RATE = 1_000_000.0
#: The most calls any count of calls accepts (burst, queue, concurrency, trials, entries).
MAX_CALLS = 1_000_000
#: The most tries a call may make: past about a thousand, the backoff ``backoff * 2**n`` no longer fits a float.
MAX_ATTEMPTS = 100
#: The most bytes a byte count accepts: 1 TiB.
MAX_BYTES = 1 << 40
#: The longest retry budget window (a count is kept for each of its seconds).
MAX_BUDGET_WINDOW = 60.0


def _name(policy: object, name: str) -> str:
    return f"{type(policy).__name__}.{name}"


def _bound(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:.3g}"


def _real(policy: object, name: str, value: Any) -> float:
    """``value`` as a float (``±inf`` when too big for one); refuses non-numbers and NaN."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real | Decimal):
        raise ConfigurationError(_name(policy, name), value, "must be a number")
    return _as_float(policy, name, value)


def _as_float(policy: object, name: str, value: Any) -> float:
    try:
        number = float(value)
    except OverflowError:  # an int or Decimal beyond a float's range
        number = math.inf if value > 0 else -math.inf
    except (ValueError, TypeError):  # a signalling NaN, an odd numeric type
        number = math.nan
    if math.isnan(number):
        raise ConfigurationError(_name(policy, name), value, "must be a number, not NaN")
    if number == 0 and value != 0:  # too small for a float: never silently zero
        number = math.ulp(0.0) if value > 0 else -math.ulp(0.0)
    return number


def _ranged(
    policy: object, name: str, low: float, high: float, unit: str, *, zero: bool = False, optional: bool = False
) -> None:
    value = getattr(policy, name)
    if value is None and optional:
        return
    number = _real(policy, name, value)
    if number < low and not (zero and number == 0):
        least = f"{'0 or ' if zero else ''}at least {_bound(low)}{unit}"
        raise ConfigurationError(_name(policy, name), value, f"must be {least}")
    if number > high:
        raise ConfigurationError(_name(policy, name), value, f"must be at most {_bound(high)}{unit}")
    if type(value) is not int and type(value) is not float:
        object.__setattr__(policy, name, number)


def check_seconds(
    policy: object,
    name: str,
    *,
    zero: bool = False,
    optional: bool = False,
    low: float = MIN_SECONDS,
    high: float = MAX_SECONDS,
) -> None:
    """Check that field ``name`` of ``policy`` is a duration within ``[low, high]`` and store it as a float.

    ``zero`` also allows 0 (for fields where 0 means "never wait");
    ``optional`` allows ``None``.
    """
    _ranged(policy, name, low, high, " seconds", zero=zero, optional=optional)


def check_rate(policy: object, name: str, *, zero: bool = False, high: float = MAX_RATE) -> None:
    """Check that field ``name`` is a rate (per second) from one a year to ``high``; store it as a float."""
    _ranged(policy, name, 1 / MAX_SECONDS, high, " a second", zero=zero)


def check_ratio(policy: object, name: str, *, zero: bool = True) -> None:
    """Check that field ``name`` is a ratio in ``[0, 1]`` (``(0, 1]`` without ``zero``); store it as a float."""
    value = getattr(policy, name)
    number = _real(policy, name, value)
    if not 0 <= number <= 1 or (number == 0 and not zero):
        raise ConfigurationError(_name(policy, name), value, f"must be {'from' if zero else 'above'} 0 and at most 1")
    if type(value) is not int and type(value) is not float:
        object.__setattr__(policy, name, number)


def check_count(policy: object, name: str, low: int, high: int, *, optional: bool = False) -> None:
    """Check that field ``name`` is a whole number within ``[low, high]``; store it as an ``int``.

    Integral types other than ``int`` (numpy's, say) are accepted; floats,
    even whole ones, and ``bool`` are not.
    """
    value = getattr(policy, name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigurationError(_name(policy, name), value, "must be a whole number")
    _store_index(policy, name, low, high)


def _store_index(policy: object, name: str, low: int, high: int) -> None:
    value = getattr(policy, name)
    number = operator.index(value)
    if number < low:
        raise ConfigurationError(_name(policy, name), value, f"must be at least {low}")
    if number > high:
        raise ConfigurationError(_name(policy, name), value, f"must be at most {high}")
    if type(value) is not int:
        object.__setattr__(policy, name, number)


def check_statuses(policy: object, name: str) -> None:
    """Check that field ``name`` is a collection of HTTP status codes; store it as a frozenset of ints."""
    value = getattr(policy, name)
    if isinstance(value, str | bytes) or not isinstance(value, Collection):
        raise ConfigurationError(_name(policy, name), value, "must be a collection of HTTP status codes")
    codes = set()
    for status in value:
        code = -1 if isinstance(status, bool) or not isinstance(status, numbers.Integral) else operator.index(status)
        if not 100 <= code <= 599:
            raise ConfigurationError(_name(policy, name), value, f"{status!r} is not an HTTP status code")
        codes.add(code)
    object.__setattr__(policy, name, frozenset(codes))


def _not_above(policy: object, name: str, other: str) -> None:
    """A cross-field rule: field ``name`` must not exceed field ``other``."""
    value, limit = getattr(policy, name), getattr(policy, other)
    if value is not None and limit is not None and value > limit:
        raise ConfigurationError(_name(policy, name), value, f"must not exceed {_name(policy, other)} ({limit})")


def _not_below(policy: object, name: str, other: str) -> None:
    """A cross-field rule: field ``name`` must not be below field ``other``."""
    value, limit = getattr(policy, name), getattr(policy, other)
    if value < limit:
        raise ConfigurationError(_name(policy, name), value, f"must not be below {_name(policy, other)} ({limit})")


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
        _not_above(self, "attempt", "total")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryBudget:
    """How many retries a host may receive, so that an outage cannot become a retry storm.

    Over any ``window`` seconds, retries may add at most ``ratio`` of the
    calls made to the host, plus ``min_per_second`` retries each second so
    that a quiet host can still retry (Finagle's RetryBudget). The window
    is at most :data:`MAX_BUDGET_WINDOW` (a minute, as Finagle's): the host
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
    :data:`MAX_ATTEMPTS`. The wait before try
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
        _not_below(self, "max_backoff", "backoff")
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
        _not_below(self, "max_break_duration", "break_duration")
        check_count(self, "half_open_calls", 1, MAX_CALLS)
        check_statuses(self, "failure_statuses")


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitPolicy:
    """A token bucket per host: ``rate`` calls a second, ``burst`` at once.

    A call waits its turn for at most ``max_wait`` seconds (``None``: as long
    as the total timeout allows; ``0``: never waits). ``rate`` lies between
    one call a year and :data:`MAX_RATE`.
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

    A waiting call gives up after ``queue_timeout`` seconds (``None``: the
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
    ``max_entries`` and ``max_bytes`` bound memory per host and across hosts;
    bodies above ``max_body_bytes`` are never stored.
    """

    max_stale: float = 300.0
    max_entries: int = 1000
    max_bytes: int = 50_000_000
    max_body_bytes: int = 1_000_000

    def __post_init__(self) -> None:
        check_seconds(self, "max_stale")
        check_count(self, "max_entries", 1, MAX_CALLS)
        check_count(self, "max_bytes", 1, MAX_BYTES)
        check_count(self, "max_body_bytes", 0, MAX_BYTES)
        _not_above(self, "max_body_bytes", "max_bytes")


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
