"""on_event hooks: one small typed event for every decision a layer makes, and hooks never break a call."""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from conftest import BASE_URL, HOST, Script, only
from prometheus_client import CollectorRegistry

import resilient_http.layers.retry as retry_layer
from resilient_http import (
    BulkheadFullError,
    BulkheadPolicy,
    CircuitBreakerPolicy,
    CircuitOpenError,
    ConfigurationError,
    DeadlineExceededError,
    Policy,
    RateLimitedError,
    RateLimitPolicy,
    ResilientTransport,
    RetryBudget,
    RetryPolicy,
    StaleCachePolicy,
    TimeoutPolicy,
)
from resilient_http._events import DEBUG, Events
from resilient_http.events import (
    BreakerStateChanged,
    BudgetRefused,
    CallRejected,
    CooldownStarted,
    Event,
    RetryScheduled,
    RetryStopped,
    StaleServed,
    StoreFallback,
    TimedOut,
    Waited,
)
from resilient_http.store import UNAVAILABLE, MemoryStore
from resilient_http.testing import FakeClock, Handler

BREAKER = CircuitBreakerPolicy(minimum_calls=2, failure_ratio=0.5, break_duration=5.0)


@asynccontextmanager
async def client(
    handler: Handler, policy: Policy, clock: FakeClock | None = None, **options: Any
) -> AsyncIterator[httpx.AsyncClient]:
    transport = ResilientTransport(
        default=policy,
        inner=httpx.MockTransport(handler),
        registry=CollectorRegistry(),
        clock=FakeClock() if clock is None else clock,
        random=random.Random(0),
        name="events-test",
        **options,
    )
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
        yield http


def of(kind: type[Event], events: list[Event]) -> list[Any]:
    return [event for event in events if isinstance(event, kind)]


async def test_a_retry_is_announced_with_its_reason_and_delay() -> None:
    """Each retry scheduled gives one RetryScheduled: the reason, the wait it sleeps, the number of the failed try."""
    events: list[Event] = []
    clock = FakeClock()
    script = Script(503, (429, {"Retry-After": "2"}), 200)
    async with client(script, only(retry=RetryPolicy(attempts=3)), clock, on_event=events.append) as http:
        assert (await http.get("/")).status_code == 200
    scheduled = of(RetryScheduled, events)
    assert [(e.reason, e.attempt, e.wait) for e in scheduled] == [
        ("status_503", 1, "backoff"),
        ("status_429", 2, "retry_after"),
    ]
    assert [e.delay for e in scheduled] == clock.sleeps
    assert scheduled[1].delay >= 2.0
    assert all((e.transport, e.host) == ("events-test", HOST) for e in events)


async def test_retries_that_run_out_say_why() -> None:
    """When no further attempt is made, RetryStopped carries CallInfo.retry_stop and the tries made."""
    events: list[Event] = []
    async with client(Script(503), only(retry=RetryPolicy(attempts=2)), on_event=events.append) as http:
        await http.get("/")
    assert [(e.reason, e.attempts) for e in of(RetryStopped, events)] == [("attempts", 2)]


async def test_a_retry_refused_by_the_budget_is_announced() -> None:
    """A spent retry budget gives BudgetRefused, and the stop says "budget"."""
    events: list[Event] = []
    policy = only(retry=RetryPolicy(attempts=3, budget=RetryBudget(ratio=0.0, min_per_second=0.1, window=10.0)))
    async with client(Script(503), policy, on_event=events.append) as http:
        await http.get("/")  # the one retry the floor allows (0.1/s over 10 s)
        events.clear()
        await http.get("/")
    assert len(of(BudgetRefused, events)) == 1
    assert [e.reason for e in of(RetryStopped, events)] == ["budget"]
    assert of(RetryScheduled, events) == []


async def test_breaker_changes_of_state_and_rejections_are_announced() -> None:
    """Opening, half-opening and closing are BreakerStateChanged; an open circuit's refusal is CallRejected."""
    events: list[Event] = []
    clock = FakeClock()
    script = Script(500, 500, 200)
    async with client(script, only(circuit_breaker=BREAKER), clock, on_event=events.append) as http:
        await http.get("/")
        await http.get("/")
        with pytest.raises(CircuitOpenError):
            await http.get("/")
        clock.advance(10.0)
        await http.get("/")
    changes = of(BreakerStateChanged, events)
    assert [(e.old, e.new) for e in changes] == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    assert changes[0].break_seconds is not None and 4.0 <= changes[0].break_seconds <= 6.0
    (rejected,) = of(CallRejected, events)
    assert (rejected.layer, rejected.reason) == ("circuit_breaker", "open")
    assert rejected.retry_after == pytest.approx(changes[0].break_seconds)


async def test_rate_limit_refusals_and_cooldowns_are_announced() -> None:
    """A 429 with Retry-After starts a cooldown (CooldownStarted); a call that cannot wait for it is CallRejected."""
    events: list[Event] = []
    policy = only(rate_limit=RateLimitPolicy(rate=100.0, max_wait=1.0))
    async with client(Script((429, {"Retry-After": "30"}), 200), policy, on_event=events.append) as http:
        assert (await http.get("/")).status_code == 429
        with pytest.raises(RateLimitedError):
            await http.get("/")
    (cooldown,) = of(CooldownStarted, events)
    assert (cooldown.seconds, cooldown.status) == (30.0, 429)
    (rejected,) = of(CallRejected, events)
    assert (rejected.layer, rejected.reason) == ("rate_limit", "no_turn")
    assert rejected.retry_after is not None and rejected.retry_after > 1.0


async def test_a_rate_limit_wait_is_announced() -> None:
    """A call that waits for its turn gives Waited("rate_limit") with the seconds it waited."""
    events: list[Event] = []
    clock = FakeClock()
    async with client(Script(200), only(rate_limit=RateLimitPolicy(rate=2.0)), clock, on_event=events.append) as http:
        await http.get("/")
        await http.get("/")
    assert [(e.reason, e.seconds) for e in of(Waited, events)] == [("rate_limit", pytest.approx(0.5))]


async def test_bulkhead_refusals_are_announced() -> None:
    """A call refused by a full bulkhead gives CallRejected(layer="bulkhead", reason="full")."""
    events: list[Event] = []
    entered, release = anyio.Event(), anyio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        entered.set()
        await release.wait()
        return httpx.Response(200)

    policy = only(bulkhead=BulkheadPolicy(max_concurrent=1, max_queue=0))
    async with client(handler, policy, on_event=events.append) as http, anyio.create_task_group() as tg:
        tg.start_soon(http.get, "/")
        await entered.wait()
        with pytest.raises(BulkheadFullError):
            await http.get("/")
        release.set()
    (rejected,) = of(CallRejected, events)
    assert (rejected.layer, rejected.reason, rejected.retry_after) == ("bulkhead", "full", None)


async def test_a_stale_answer_is_announced() -> None:
    """A stale answer served after a 503 gives StaleServed with the reason and the age of the copy."""
    events: list[Event] = []
    clock = FakeClock()
    async with client(Script(200, 503), only(stale_cache=StaleCachePolicy()), clock, on_event=events.append) as http:
        await http.get("/")
        clock.advance(7.0)
        assert (await http.get("/")).headers["age"] == "7"
    assert [(e.reason, e.age) for e in of(StaleServed, events)] == [("server_error", 7.0)]


async def test_a_timeout_is_announced() -> None:
    """An attempt that runs out of time gives TimedOut with its kind and the policy's seconds."""
    events: list[Event] = []

    async def hang(request: httpx.Request) -> httpx.Response:
        await anyio.sleep_forever()
        raise AssertionError

    async with client(hang, only(timeout=TimeoutPolicy(attempt=0.01, total=None)), on_event=events.append) as http:
        with pytest.raises(DeadlineExceededError):
            await http.get("/")
    assert [(e.timeout_kind, e.seconds) for e in of(TimedOut, events)] == [("attempt", 0.01)]


async def test_a_store_that_cannot_answer_is_announced_by_each_layer_that_decides_alone() -> None:
    """The fleet's store answers nothing: the rate limiter and the breaker each say they decided locally."""

    class Down(MemoryStore):
        async def admit(self, upstream: str, **options: Any) -> Any:
            return UNAVAILABLE

        async def circuit(self, upstream: str) -> Any:
            return UNAVAILABLE

    events: list[Event] = []
    policy = only(rate_limit=RateLimitPolicy(rate=10.0), circuit_breaker=BREAKER)
    clock = FakeClock()
    async with client(Script(200), policy, clock, on_event=events.append, store=Down(clock=clock)) as http:
        assert (await http.get("/")).status_code == 200
    assert of(StoreFallback, events) == [
        StoreFallback(transport="events-test", host=HOST, layer="rate_limit", operation="admit"),
        StoreFallback(transport="events-test", host=HOST, layer="circuit_breaker", operation="circuit"),
    ]
    assert of(StoreFallback, events)[1].describe() == (
        f"store did not answer circuit for the circuit_breaker of {HOST}: decided locally"
    )


async def test_a_hook_that_raises_never_breaks_a_call(caplog: pytest.LogCaptureFixture) -> None:
    """A hook's exception is logged at WARNING and the call goes on: the retry is still made, the answer returned."""

    def broken(event: Event) -> None:
        raise RuntimeError("hook bug")

    script = Script(503, 200)
    with caplog.at_level(logging.WARNING, logger="resilient_http"):
        async with client(script, only(retry=RetryPolicy()), on_event=broken) as http:
            assert (await http.get("/")).status_code == 200
    assert script.calls == 2
    (record,) = [r for r in caplog.records if r.name == "resilient_http"]
    assert record.levelno == logging.WARNING
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)


async def test_no_event_is_made_when_nobody_listens(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a hook, a recording span or an enabled logger, the layers build no event at all."""

    def made(**fields: object) -> None:
        raise AssertionError("an event was built that nobody reads")

    monkeypatch.setattr(retry_layer, "RetryScheduled", made)
    monkeypatch.setattr(retry_layer, "RetryStopped", made)
    logging.getLogger("resilient_http").setLevel(logging.WARNING)
    try:
        async with client(Script(503), only(retry=RetryPolicy(attempts=2))) as http:
            assert (await http.get("/")).status_code == 503
    finally:
        logging.getLogger("resilient_http").setLevel(logging.NOTSET)


def test_who_listens_decides_whether_an_event_is_wanted() -> None:
    """An event is wanted with a hook, or with its layer's logger enabled at its level; otherwise not."""
    logging.getLogger("resilient_http").setLevel(logging.WARNING)
    try:
        assert not Events("t", None, None).host("h:1").wants(DEBUG, "retry")
        assert Events("t", print, None).host("h:1").wants(DEBUG, "retry")
        logging.getLogger("resilient_http.retry").setLevel(logging.DEBUG)
        assert Events("t", None, None).host("h:1").wants(DEBUG, "retry")
        assert not Events("t", None, None).host("h:1").wants(DEBUG, "bulkhead")
    finally:
        logging.getLogger("resilient_http").setLevel(logging.NOTSET)
        logging.getLogger("resilient_http.retry").setLevel(logging.NOTSET)


def test_an_on_event_that_is_not_callable_is_refused() -> None:
    """on_event must be callable: ConfigurationError names the field, at construction."""
    with pytest.raises(ConfigurationError, match="on_event"):
        ResilientTransport(on_event="print", registry=CollectorRegistry())  # type: ignore[arg-type]


def test_events_are_frozen_and_carry_no_request() -> None:
    """An event is immutable, and its fields are the host label, a reason and numbers: no URL, header or body."""
    event = RetryScheduled(transport="t", host="h:443", reason="timeout", delay=0.5, attempt=1, wait="backoff")
    with pytest.raises(AttributeError):
        event.delay = 1.0  # type: ignore[misc]
    assert event.fields() == {
        "transport": "t",
        "host": "h:443",
        "reason": "timeout",
        "delay": 0.5,
        "attempt": 1,
        "wait": "backoff",
    }
    assert (event.kind, event.level) == ("retry_scheduled", logging.DEBUG)
