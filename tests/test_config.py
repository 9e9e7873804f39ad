"""Policies: every rule is checked at construction and names the field and the value it refused."""

from __future__ import annotations

import dataclasses
import math
import numbers
from decimal import Decimal
from fractions import Fraction
from typing import Any

import httpx
import pytest
from conftest import Harness, Script

from resilient_http import (
    BulkheadPolicy,
    CircuitBreakerPolicy,
    ConfigurationError,
    Policy,
    RateLimitPolicy,
    RetryBudget,
    RetryPolicy,
    StaleCachePolicy,
    TimeoutPolicy,
)

INVALID: list[tuple[type, dict[str, Any], str]] = [
    # (policy class, keyword arguments, the field the error must name; the value is the argument's)
    (TimeoutPolicy, {"attempt": 0}, "TimeoutPolicy.attempt"),
    (TimeoutPolicy, {"attempt": -1.5}, "TimeoutPolicy.attempt"),
    (TimeoutPolicy, {"attempt": math.inf}, "TimeoutPolicy.attempt"),
    (TimeoutPolicy, {"attempt": math.nan}, "TimeoutPolicy.attempt"),
    (TimeoutPolicy, {"attempt": True}, "TimeoutPolicy.attempt"),
    (TimeoutPolicy, {"attempt": "5"}, "TimeoutPolicy.attempt"),
    (TimeoutPolicy, {"total": 0.0}, "TimeoutPolicy.total"),
    (TimeoutPolicy, {"total": -30}, "TimeoutPolicy.total"),
    (TimeoutPolicy, {"total": False}, "TimeoutPolicy.total"),
    (TimeoutPolicy, {"attempt": 31, "total": 30}, "TimeoutPolicy.attempt"),
    (RetryBudget, {"ratio": -0.1}, "RetryBudget.ratio"),
    (RetryBudget, {"ratio": 1.5}, "RetryBudget.ratio"),
    (RetryBudget, {"ratio": True}, "RetryBudget.ratio"),
    (RetryBudget, {"ratio": math.nan}, "RetryBudget.ratio"),
    (RetryBudget, {"min_per_second": -1}, "RetryBudget.min_per_second"),
    (RetryBudget, {"min_per_second": math.inf}, "RetryBudget.min_per_second"),
    (RetryBudget, {"window": 0}, "RetryBudget.window"),
    (RetryBudget, {"window": "10"}, "RetryBudget.window"),
    (RetryPolicy, {"attempts": 0}, "RetryPolicy.attempts"),
    (RetryPolicy, {"attempts": -2}, "RetryPolicy.attempts"),
    (RetryPolicy, {"attempts": 2.0}, "RetryPolicy.attempts"),
    (RetryPolicy, {"attempts": True}, "RetryPolicy.attempts"),
    (RetryPolicy, {"backoff": 0}, "RetryPolicy.backoff"),
    (RetryPolicy, {"backoff": -0.1}, "RetryPolicy.backoff"),
    (RetryPolicy, {"max_backoff": 0}, "RetryPolicy.max_backoff"),
    (RetryPolicy, {"backoff": 2.0, "max_backoff": 1.0}, "RetryPolicy.max_backoff"),
    (RetryPolicy, {"statuses": "503"}, "RetryPolicy.statuses"),
    (RetryPolicy, {"statuses": 503}, "RetryPolicy.statuses"),
    (RetryPolicy, {"statuses": [99]}, "RetryPolicy.statuses"),
    (RetryPolicy, {"statuses": [503, 600]}, "RetryPolicy.statuses"),
    (RetryPolicy, {"statuses": [True]}, "RetryPolicy.statuses"),
    (RetryPolicy, {"statuses": [503.0]}, "RetryPolicy.statuses"),
    (RetryPolicy, {"statuses": ["503"]}, "RetryPolicy.statuses"),
    (RetryPolicy, {"max_retry_after": -1}, "RetryPolicy.max_retry_after"),
    (RetryPolicy, {"max_retry_after": True}, "RetryPolicy.max_retry_after"),
    (RetryPolicy, {"methods": "POST"}, "RetryPolicy.methods"),
    (RetryPolicy, {"methods": b"POST"}, "RetryPolicy.methods"),
    (RetryPolicy, {"methods": ["post"]}, "RetryPolicy.methods"),
    (RetryPolicy, {"methods": ["Post"]}, "RetryPolicy.methods"),
    (RetryPolicy, {"methods": ["POST", "GET "]}, "RetryPolicy.methods"),
    (RetryPolicy, {"methods": [""]}, "RetryPolicy.methods"),
    (RetryPolicy, {"methods": [b"POST"]}, "RetryPolicy.methods"),
    (RetryPolicy, {"methods": [None]}, "RetryPolicy.methods"),
    (RetryPolicy, {"methods": 1}, "RetryPolicy.methods"),
    (RetryPolicy, {"budget": {"ratio": 0.1}}, "RetryPolicy.budget"),
    (RetryPolicy, {"budget": False}, "RetryPolicy.budget"),
    (CircuitBreakerPolicy, {"failure_ratio": 0}, "CircuitBreakerPolicy.failure_ratio"),
    (CircuitBreakerPolicy, {"failure_ratio": 1.01}, "CircuitBreakerPolicy.failure_ratio"),
    (CircuitBreakerPolicy, {"failure_ratio": -0.5}, "CircuitBreakerPolicy.failure_ratio"),
    (CircuitBreakerPolicy, {"failure_ratio": True}, "CircuitBreakerPolicy.failure_ratio"),
    (CircuitBreakerPolicy, {"minimum_calls": 0}, "CircuitBreakerPolicy.minimum_calls"),
    (CircuitBreakerPolicy, {"minimum_calls": 10.0}, "CircuitBreakerPolicy.minimum_calls"),
    (CircuitBreakerPolicy, {"window": -10}, "CircuitBreakerPolicy.window"),
    (CircuitBreakerPolicy, {"break_duration": 0}, "CircuitBreakerPolicy.break_duration"),
    (CircuitBreakerPolicy, {"max_break_duration": math.inf}, "CircuitBreakerPolicy.max_break_duration"),
    (CircuitBreakerPolicy, {"break_duration": 10, "max_break_duration": 5}, "CircuitBreakerPolicy.max_break_duration"),
    (CircuitBreakerPolicy, {"half_open_calls": 0}, "CircuitBreakerPolicy.half_open_calls"),
    (CircuitBreakerPolicy, {"half_open_calls": False}, "CircuitBreakerPolicy.half_open_calls"),
    (CircuitBreakerPolicy, {"failure_statuses": [1000]}, "CircuitBreakerPolicy.failure_statuses"),
    (CircuitBreakerPolicy, {"failure_statuses": b"500"}, "CircuitBreakerPolicy.failure_statuses"),
    (RateLimitPolicy, {"rate": 0}, "RateLimitPolicy.rate"),
    (RateLimitPolicy, {"rate": True}, "RateLimitPolicy.rate"),
    (RateLimitPolicy, {"rate": 1, "burst": 0}, "RateLimitPolicy.burst"),
    (RateLimitPolicy, {"rate": 1, "burst": 1.5}, "RateLimitPolicy.burst"),
    (RateLimitPolicy, {"rate": 1, "max_wait": -1}, "RateLimitPolicy.max_wait"),
    (BulkheadPolicy, {"max_concurrent": 0}, "BulkheadPolicy.max_concurrent"),
    (BulkheadPolicy, {"max_concurrent": True}, "BulkheadPolicy.max_concurrent"),
    (BulkheadPolicy, {"max_queue": -1}, "BulkheadPolicy.max_queue"),
    (BulkheadPolicy, {"queue_timeout": 0}, "BulkheadPolicy.queue_timeout"),
    (StaleCachePolicy, {"max_stale": 0}, "StaleCachePolicy.max_stale"),
    (StaleCachePolicy, {"max_entries": 0}, "StaleCachePolicy.max_entries"),
    (StaleCachePolicy, {"max_bytes": 0}, "StaleCachePolicy.max_bytes"),
    (StaleCachePolicy, {"max_body_bytes": -1}, "StaleCachePolicy.max_body_bytes"),
    (StaleCachePolicy, {"max_bytes": 100, "max_body_bytes": 101}, "StaleCachePolicy.max_body_bytes"),
    # Bounds: whatever the type, a value that would overflow, divide by almost nothing or switch a layer off.
    (TimeoutPolicy, {"attempt": 10**400}, "TimeoutPolicy.attempt"),
    (TimeoutPolicy, {"attempt": 1e-320}, "TimeoutPolicy.attempt"),
    (TimeoutPolicy, {"attempt": 0.0005}, "TimeoutPolicy.attempt"),
    (TimeoutPolicy, {"total": 1e300}, "TimeoutPolicy.total"),
    (TimeoutPolicy, {"total": -math.inf}, "TimeoutPolicy.total"),
    (TimeoutPolicy, {"total": Decimal("NaN")}, "TimeoutPolicy.total"),
    (TimeoutPolicy, {"total": Decimal("sNaN")}, "TimeoutPolicy.total"),
    (TimeoutPolicy, {"total": Decimal("1e400")}, "TimeoutPolicy.total"),
    (TimeoutPolicy, {"total": Fraction(1, 10**400)}, "TimeoutPolicy.total"),
    (TimeoutPolicy, {"total": 1 + 2j}, "TimeoutPolicy.total"),
    (RetryBudget, {"window": 1e-320}, "RetryBudget.window"),
    (RetryBudget, {"window": 61}, "RetryBudget.window"),
    (RetryBudget, {"min_per_second": 1e300}, "RetryBudget.min_per_second"),
    (RetryBudget, {"min_per_second": 1e-320}, "RetryBudget.min_per_second"),
    (RetryPolicy, {"attempts": 10**30}, "RetryPolicy.attempts"),
    (RetryPolicy, {"attempts": 101}, "RetryPolicy.attempts"),
    (RetryPolicy, {"backoff": 1e300, "max_backoff": 1e300}, "RetryPolicy.backoff"),
    (RetryPolicy, {"backoff": 1e-320}, "RetryPolicy.backoff"),
    (RetryPolicy, {"max_backoff": 10**400}, "RetryPolicy.max_backoff"),
    (RetryPolicy, {"max_retry_after": math.inf}, "RetryPolicy.max_retry_after"),
    (RetryPolicy, {"max_retry_after": 1e-320}, "RetryPolicy.max_retry_after"),
    (CircuitBreakerPolicy, {"failure_ratio": math.nan}, "CircuitBreakerPolicy.failure_ratio"),
    (CircuitBreakerPolicy, {"window": 1e-320}, "CircuitBreakerPolicy.window"),
    (CircuitBreakerPolicy, {"minimum_calls": 10**30}, "CircuitBreakerPolicy.minimum_calls"),
    (CircuitBreakerPolicy, {"break_duration": 1e300}, "CircuitBreakerPolicy.break_duration"),
    (CircuitBreakerPolicy, {"half_open_calls": 10**30}, "CircuitBreakerPolicy.half_open_calls"),
    (RateLimitPolicy, {"rate": 1e-300}, "RateLimitPolicy.rate"),
    (RateLimitPolicy, {"rate": 1e300}, "RateLimitPolicy.rate"),
    (RateLimitPolicy, {"rate": 10**400}, "RateLimitPolicy.rate"),
    (RateLimitPolicy, {"rate": math.inf}, "RateLimitPolicy.rate"),
    (RateLimitPolicy, {"rate": 1, "burst": 10**30}, "RateLimitPolicy.burst"),
    (RateLimitPolicy, {"rate": 1, "max_wait": 1e-320}, "RateLimitPolicy.max_wait"),
    (RateLimitPolicy, {"rate": 1, "max_wait": math.nan}, "RateLimitPolicy.max_wait"),
    (BulkheadPolicy, {"max_concurrent": 10**30}, "BulkheadPolicy.max_concurrent"),
    (BulkheadPolicy, {"max_queue": 10**30}, "BulkheadPolicy.max_queue"),
    (BulkheadPolicy, {"queue_timeout": 1e-320}, "BulkheadPolicy.queue_timeout"),
    (StaleCachePolicy, {"max_stale": 1e300}, "StaleCachePolicy.max_stale"),
    (StaleCachePolicy, {"max_entries": 10**30}, "StaleCachePolicy.max_entries"),
    (StaleCachePolicy, {"max_bytes": 10**30}, "StaleCachePolicy.max_bytes"),
    (StaleCachePolicy, {"max_entries": 10.0}, "StaleCachePolicy.max_entries"),
    (Policy, {"timeout": RetryPolicy()}, "Policy.timeout"),
    (Policy, {"retry": 3}, "Policy.retry"),
    (Policy, {"retry": True}, "Policy.retry"),
    (Policy, {"circuit_breaker": {"failure_ratio": 0.5}}, "Policy.circuit_breaker"),
    (Policy, {"rate_limit": 10}, "Policy.rate_limit"),
    (Policy, {"bulkhead": "100"}, "Policy.bulkhead"),
    (Policy, {"stale_cache": TimeoutPolicy()}, "Policy.stale_cache"),
]

VALID_EDGES: list[tuple[type, dict[str, Any]]] = [
    (TimeoutPolicy, {"attempt": None, "total": None}),
    (TimeoutPolicy, {"attempt": 5, "total": 5}),
    (TimeoutPolicy, {"attempt": 60, "total": None}),
    (TimeoutPolicy, {"attempt": None, "total": 0.001}),
    (RetryBudget, {"ratio": 0, "min_per_second": 0}),
    (RetryBudget, {"ratio": 1, "window": 0.5}),
    (RetryPolicy, {"attempts": 1}),
    (RetryPolicy, {"backoff": 2, "max_backoff": 2}),
    (RetryPolicy, {"max_retry_after": 0}),
    (RetryPolicy, {"statuses": []}),
    (RetryPolicy, {"statuses": [100, 599]}),
    (RetryPolicy, {"budget": None}),
    (RetryPolicy, {"methods": []}),
    (RetryPolicy, {"methods": ["POST", "PATCH", "M-SEARCH"]}),
    (CircuitBreakerPolicy, {"failure_ratio": 1, "minimum_calls": 1, "half_open_calls": 1}),
    (CircuitBreakerPolicy, {"break_duration": 7, "max_break_duration": 7}),
    (RateLimitPolicy, {"rate": 0.01}),
    (RateLimitPolicy, {"rate": 100, "burst": 1, "max_wait": 0}),
    (BulkheadPolicy, {"max_concurrent": 1, "max_queue": 0}),
    (StaleCachePolicy, {"max_entries": 1, "max_bytes": 1, "max_body_bytes": 1}),
    (StaleCachePolicy, {"max_body_bytes": 0}),
    (Policy, {"timeout": None, "retry": None, "circuit_breaker": None, "bulkhead": None}),
    # The bounds themselves.
    (TimeoutPolicy, {"attempt": 0.001, "total": 365 * 24 * 3600}),
    (RetryBudget, {"window": 60, "min_per_second": 1_000_000}),
    (RetryPolicy, {"attempts": 100, "backoff": 0.001, "max_backoff": 365 * 24 * 3600}),
    (RateLimitPolicy, {"rate": 1 / (365 * 24 * 3600), "burst": 1_000_000}),
    (RateLimitPolicy, {"rate": 1_000_000, "max_wait": 365 * 24 * 3600}),
    (BulkheadPolicy, {"max_concurrent": 1_000_000, "max_queue": 1_000_000}),
    (StaleCachePolicy, {"max_entries": 1_000_000, "max_bytes": 1 << 40, "max_body_bytes": 1 << 40}),
]

ALL_POLICIES: list[Any] = [
    TimeoutPolicy(),
    RetryBudget(),
    RetryPolicy(),
    CircuitBreakerPolicy(),
    RateLimitPolicy(rate=1),
    BulkheadPolicy(),
    StaleCachePolicy(),
    Policy(),
]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:10]}...{len(text)} chars"


def _case_id(case: tuple[type, dict[str, Any], str] | tuple[type, dict[str, Any]]) -> str:
    return f"{case[0].__name__}({', '.join(f'{k}={_short(v)}' for k, v in case[1].items())})"


@pytest.mark.parametrize("case", INVALID, ids=_case_id)
def test_invalid_values_raise_naming_the_field_and_the_value(case: tuple[type, dict[str, Any], str]) -> None:
    """Every validation rule raises ConfigurationError whose message names the field and the refused value."""
    kind, kwargs, field = case
    with pytest.raises(ConfigurationError) as caught:
        kind(**kwargs)
    value = kwargs[field.rpartition(".")[2]]
    assert caught.value.field == field
    assert field in str(caught.value)
    assert repr(value) in str(caught.value)
    assert caught.value.value is value


@pytest.mark.parametrize("case", VALID_EDGES, ids=_case_id)
def test_valid_edge_values_are_accepted(case: tuple[type, dict[str, Any]]) -> None:
    """Values on the edge of what a rule allows make a policy that keeps them."""
    kind, kwargs = case
    made = kind(**kwargs)
    for name, value in kwargs.items():
        expected = frozenset(value) if name.endswith(("statuses", "methods")) else value
        assert getattr(made, name) == expected


def test_configuration_error_is_a_value_error_and_not_an_http_error() -> None:
    """A bad policy is a programming error, not something HTTP error handlers should swallow."""
    import httpx

    with pytest.raises(ConfigurationError) as caught:
        RetryPolicy(attempts=0)
    assert isinstance(caught.value, ValueError)
    assert not isinstance(caught.value, httpx.HTTPError)
    assert caught.value.reason
    assert caught.value.value == 0


@pytest.mark.parametrize(
    "statuses",
    [[503, 429], (503, 429), {503, 429}, frozenset({503, 429}), {503: "x", 429: "y"}.keys(), [503, 429, 503]],
    ids=["list", "tuple", "set", "frozenset", "dict_keys", "duplicates"],
)
def test_statuses_accept_any_collection_and_become_a_frozenset(statuses: Any) -> None:
    """Whatever collection is given, the policy holds an immutable frozenset of its statuses."""
    retry = RetryPolicy(statuses=statuses)
    breaker = CircuitBreakerPolicy(failure_statuses=statuses)
    assert retry.statuses == frozenset({503, 429})
    assert type(retry.statuses) is frozenset
    assert breaker.failure_statuses == frozenset({503, 429})
    assert type(breaker.failure_statuses) is frozenset


def test_statuses_accept_a_range() -> None:
    """A range is a collection of statuses too."""
    assert RetryPolicy(statuses=range(500, 505)).statuses == frozenset({500, 501, 502, 503, 504})


def test_whole_numbers_are_accepted_where_seconds_are_expected() -> None:
    """Integers are fine for every duration and ratio."""
    policy = TimeoutPolicy(attempt=1, total=2)
    assert (policy.attempt, policy.total) == (1, 2)
    assert RetryBudget(ratio=1, min_per_second=0, window=1).ratio == 1


@pytest.mark.parametrize("policy", ALL_POLICIES, ids=lambda p: type(p).__name__)
def test_policies_are_frozen(policy: Any) -> None:
    """No field of a policy can be changed once it is made, nor new ones added."""
    name = dataclasses.fields(policy)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(policy, name, getattr(policy, name))
    with pytest.raises((AttributeError, TypeError)):
        policy.unexpected = 1


@pytest.mark.parametrize("policy", ALL_POLICIES, ids=lambda p: type(p).__name__)
def test_policies_take_keyword_arguments_only(policy: Any) -> None:
    """Positional arguments are refused, so a reordered field can never silently change a policy."""
    kind = type(policy)
    args = [getattr(policy, dataclasses.fields(policy)[0].name)]
    with pytest.raises(TypeError):
        kind(*args)


def test_replace_revalidates() -> None:
    """A policy derived with dataclasses.replace is checked like a new one."""
    with pytest.raises(ConfigurationError, match=r"RetryPolicy\.attempts"):
        dataclasses.replace(RetryPolicy(), attempts=0)


def test_default_policy_turns_on_timeouts_retries_breaker_and_bulkhead_only() -> None:
    """Policy() has the always-safe layers on and the opt-in ones (rate limit, stale cache) off."""
    policy = Policy()
    assert policy.timeout == TimeoutPolicy()
    assert policy.retry == RetryPolicy()
    assert policy.circuit_breaker == CircuitBreakerPolicy()
    assert policy.bulkhead == BulkheadPolicy()
    assert policy.rate_limit is None
    assert policy.stale_cache is None


def test_documented_defaults() -> None:
    """The defaults are the documented ones (10 s attempt, 30 s total, 3 attempts, 20 % + 10/s budget)."""
    assert (TimeoutPolicy().attempt, TimeoutPolicy().total) == (10.0, 30.0)
    retry = RetryPolicy()
    assert (retry.attempts, retry.backoff, retry.max_backoff, retry.max_retry_after) == (3, 0.1, 10.0, 60.0)
    assert retry.statuses == frozenset({408, 429, 502, 503, 504, 529})
    assert retry.methods == frozenset()
    assert retry.budget == RetryBudget(ratio=0.2, min_per_second=10.0, window=10.0)
    breaker = CircuitBreakerPolicy()
    assert breaker.failure_statuses == frozenset({500, 502, 503, 504})
    assert 429 not in breaker.failure_statuses


@pytest.mark.parametrize(
    ("make", "bound"),
    [
        (lambda: TimeoutPolicy(attempt=1e-320), "must be at least 0.001 seconds"),
        (lambda: TimeoutPolicy(total=10**400), "must be at most 31536000 seconds"),
        (lambda: RateLimitPolicy(rate=1e-300), "must be at least 3.17e-08 a second"),
        (lambda: RateLimitPolicy(rate=1e300), "must be at most 1000000 a second"),
        (lambda: RateLimitPolicy(rate=1, max_wait=-1), "must be 0 or at least 0.001 seconds"),
        (lambda: RetryPolicy(attempts=10**30), "must be at most 100"),
        (lambda: RetryBudget(window=120), "must be at most 60 seconds"),
        (lambda: StaleCachePolicy(max_bytes=1 << 41), f"must be at most {1 << 40}"),
    ],
)
def test_an_out_of_range_value_is_refused_naming_the_bound(make: Any, bound: str) -> None:
    """The message says what the field accepts, not only that the value is wrong."""
    with pytest.raises(ConfigurationError) as caught:
        make()
    assert bound in str(caught.value)


class RealLike:
    """A real number of a foreign type, registered as ``numbers.Real`` as numpy's scalars are."""

    def __init__(self, value: float) -> None:
        self._value = value

    def __float__(self) -> float:
        return self._value

    def __eq__(self, other: object) -> bool:
        return self._value == other

    __hash__ = None  # type: ignore[assignment]


class IntegralLike:
    """A whole number of a foreign type, registered as ``numbers.Integral`` as numpy's integers are."""

    def __init__(self, value: int) -> None:
        self._value = value

    def __index__(self) -> int:
        return self._value


numbers.Real.register(RealLike)
numbers.Integral.register(IntegralLike)


@pytest.mark.parametrize(
    "value", [Decimal("2.5"), Fraction(5, 2), RealLike(2.5)], ids=["Decimal", "Fraction", "numpy-like"]
)
def test_other_real_numbers_are_accepted_and_stored_as_floats(value: Any) -> None:
    """A Decimal, a Fraction or a numpy-like scalar is a number of seconds too, kept as a plain float."""
    stored = [
        TimeoutPolicy(attempt=value).attempt,
        RetryPolicy(backoff=value).backoff,
        RateLimitPolicy(rate=value).rate,
    ]
    assert stored == [2.5, 2.5, 2.5]
    assert {type(number) for number in stored} == {float}


def test_other_whole_numbers_are_accepted_and_stored_as_ints() -> None:
    """A numpy-like integer is a count, kept as a plain int; statuses likewise."""
    policy = BulkheadPolicy(max_concurrent=IntegralLike(7))  # type: ignore[arg-type]
    assert policy.max_concurrent == 7
    assert type(policy.max_concurrent) is int
    statuses = RetryPolicy(statuses=[IntegralLike(503)]).statuses  # type: ignore[list-item]
    assert statuses == frozenset({503})
    assert {type(status) for status in statuses} == {int}


YEAR = 365 * 24 * 3600

AT_THE_BOUNDS = {
    "highest": Policy(
        timeout=TimeoutPolicy(attempt=YEAR, total=YEAR),
        retry=RetryPolicy(
            attempts=100,
            backoff=YEAR,
            max_backoff=YEAR,
            max_retry_after=YEAR,
            budget=RetryBudget(ratio=1, min_per_second=1_000_000, window=60),
        ),
        circuit_breaker=CircuitBreakerPolicy(
            minimum_calls=1_000_000,
            window=YEAR,
            break_duration=YEAR,
            max_break_duration=YEAR,
            half_open_calls=1_000_000,
        ),
        rate_limit=RateLimitPolicy(rate=1_000_000, burst=1_000_000, max_wait=YEAR),
        bulkhead=BulkheadPolicy(max_concurrent=1_000_000, max_queue=1_000_000, queue_timeout=YEAR),
        stale_cache=StaleCachePolicy(max_stale=YEAR, max_entries=1_000_000, max_bytes=1 << 40, max_body_bytes=1 << 40),
    ),
    "highest, without a total timeout or a budget": Policy(
        timeout=TimeoutPolicy(attempt=YEAR, total=None),
        retry=RetryPolicy(attempts=100, backoff=YEAR, max_backoff=YEAR, max_retry_after=YEAR, budget=None),
        rate_limit=RateLimitPolicy(rate=1 / YEAR, burst=1_000_000),
    ),
    "lowest": Policy(
        timeout=TimeoutPolicy(attempt=None, total=0.001),
        retry=RetryPolicy(
            attempts=2,
            backoff=0.001,
            max_backoff=0.001,
            max_retry_after=0,
            budget=RetryBudget(ratio=0, min_per_second=1 / YEAR, window=0.001),
        ),
        circuit_breaker=CircuitBreakerPolicy(
            failure_ratio=1e-9, minimum_calls=1, window=0.001, break_duration=0.001, max_break_duration=0.001
        ),
        rate_limit=RateLimitPolicy(rate=1 / YEAR, burst=1, max_wait=0),
        bulkhead=BulkheadPolicy(max_concurrent=1, max_queue=0, queue_timeout=0.001),
        stale_cache=StaleCachePolicy(max_stale=0.001, max_entries=1, max_bytes=1, max_body_bytes=0),
    ),
}


@pytest.mark.parametrize("policy", AT_THE_BOUNDS.values(), ids=AT_THE_BOUNDS.keys())
async def test_policies_at_their_bounds_never_crash_a_call(harness: Harness, policy: Policy) -> None:
    """Every field at its bound makes calls that answer or fail with an httpx error, never an arithmetic one."""
    script = Script(
        503,
        (429, {"Retry-After": str(10**12), "RateLimit": "a;r=0;t=999999999999"}),
        (503, {"Retry-After": "999999999999"}),
        (200, {"RateLimit": "a;r=1;t=999999999999", "Cache-Control": "max-age=999999999999"}),
        200,
    )
    client = harness.client(script, policy)
    for _ in range(4):
        try:
            await client.get("/")
        except httpx.TransportError:
            pass
        harness.clock.advance(YEAR)


async def test_the_most_attempts_with_the_longest_backoff_retry_to_the_end(harness: Harness) -> None:
    """100 tries a year apart, with no budget or deadline to stop them, end as "attempts", not in an overflow."""
    script = Script(503)
    policy = Policy(
        timeout=None,
        circuit_breaker=None,
        retry=RetryPolicy(attempts=100, backoff=YEAR, max_backoff=YEAR, budget=None),
    )
    client = harness.client(script, policy)
    response = await client.get("/")
    assert response.status_code == 503
    assert script.calls == 100
    info = response.extensions["resilient_http"]
    assert info.retry_stop == "attempts"
