"""Every public signature used the way a user would: checked by mypy --strict, never run (pytest skips it)."""

from __future__ import annotations

import random
import ssl
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal, assert_type

import httpx
from prometheus_client import CollectorRegistry

import resilient_http
from resilient_http import (
    AdaptiveLimit,
    BulkheadFullError,
    BulkheadPolicy,
    CallInfo,
    CircuitBreakerPolicy,
    CircuitOpenError,
    CoalescePolicy,
    ConfigurationError,
    DeadlineExceededError,
    HedgePolicy,
    Policy,
    RateLimitedError,
    RateLimitPolicy,
    RejectedError,
    ResilienceError,
    ResilientClient,
    ResilientTransport,
    RetryBudget,
    RetryPolicy,
    StaleCachePolicy,
    TimeoutPolicy,
    Wait,
    call_info,
)
from resilient_http.events import RetryScheduled
from resilient_http.store import MemoryStore
from resilient_http.testing import FakeClock


def every_policy() -> Policy:
    timeout = TimeoutPolicy(attempt=1.5, total=None)
    assert_type(timeout.attempt, float | None)
    assert_type(timeout.total, float | None)
    budget = RetryBudget(ratio=0.1, min_per_second=1, window=5.0)
    assert_type(budget.ratio, float)
    retry = RetryPolicy(
        attempts=3,
        backoff=0.1,
        max_backoff=2,
        statuses={429, 503},
        max_retry_after=30,
        budget=budget,
        methods={"POST"},
    )
    assert_type(retry.attempts, int)
    assert_type(retry.methods, Collection[str])
    assert_type(retry.budget, RetryBudget | None)
    RetryPolicy(statuses=[503], budget=None)
    RetryPolicy(statuses=range(500, 505))
    breaker = CircuitBreakerPolicy(
        failure_ratio=0.5,
        minimum_calls=10,
        window=10,
        break_duration=5,
        max_break_duration=60,
        half_open_calls=2,
        failure_statuses=(500, 503),
    )
    assert_type(breaker.half_open_calls, int)
    rate_limit = RateLimitPolicy(rate=10, burst=5, max_wait=None, max_cooldown=30.0)
    assert_type(rate_limit.max_wait, float | None)
    assert_type(rate_limit.max_cooldown, float)
    adaptive = AdaptiveLimit(
        mode="gradient", initial=5, min=2, backoff=0.8, drop_statuses={503}, smoothing=0.2, tolerance=1.5
    )
    assert_type(adaptive.mode, Literal["aimd", "gradient"])
    bulkhead = BulkheadPolicy(max_concurrent=10, max_queue=0, queue_timeout=1.0, adaptive=adaptive)
    assert_type(bulkhead.queue_timeout, float | None)
    assert_type(bulkhead.adaptive, AdaptiveLimit | None)
    stale_cache = StaleCachePolicy(
        max_stale=60, max_entries=10, max_bytes=1000, max_body_bytes=100, identity_headers=("X-Api-Key",)
    )
    assert_type(stale_cache.max_bytes, int)
    coalesce = CoalescePolicy(max_body_bytes=1 << 20, identity_headers=["X-Api-Key"])
    assert_type(coalesce.max_body_bytes, int)
    CircuitBreakerPolicy(dry_run=True)
    RateLimitPolicy(rate=1, dry_run=True)
    assert_type(BulkheadPolicy(dry_run=True).dry_run, bool)
    hedge = HedgePolicy(delay=None, quantile=0.95, min_delay=0.01, warmup=20, max_hedges=1, budget=0.05)
    assert_type(hedge.delay, float | None)
    assert_type(hedge.max_hedges, int)
    Policy(timeout=None, retry=None, circuit_breaker=None, rate_limit=None, bulkhead=None, stale_cache=None)
    policy = Policy(
        timeout=timeout,
        retry=retry,
        circuit_breaker=breaker,
        rate_limit=rate_limit,
        bulkhead=bulkhead,
        stale_cache=stale_cache,
        coalesce=coalesce,
        hedge=hedge,
    )
    assert_type(policy.coalesce, CoalescePolicy | None)
    assert_type(policy.hedge, HedgePolicy | None)
    assert_type(policy.retry, RetryPolicy | None)
    assert_type(policy.timeout, TimeoutPolicy | None)
    return policy


async def the_transport(policy: Policy) -> None:
    transport = ResilientTransport(
        {"api.example.com": policy, "*.example.com:8443": Policy()},
        default=Policy(),
        inner=httpx.AsyncHTTPTransport(),
        registry=CollectorRegistry(),
        max_hosts=100,
        clock=FakeClock(),
        random=random.Random(1),
        name="payments",
    )
    ResilientTransport()
    ResilientTransport(None, default=None, inner=None, registry=None, clock=None, random=None)
    ResilientTransport(store="redis://127.0.0.1:6379/0")
    ResilientTransport(store={"url": "redis://127.0.0.1:6379/0", "timeout": 0.02})
    ResilientTransport(store=MemoryStore(), max_hosts=10)
    ResilientTransport(store=MemoryStore(workers=4, circuit_ttl=60.0))
    ResilientTransport(on_event=print, tracer_provider=None)
    ResilientTransport(on_event=lambda event: event.host if isinstance(event, RetryScheduled) else None)
    assert_type(ResilientTransport.from_file("policies.toml"), ResilientTransport)
    ResilientTransport.from_file(Path("policies.toml"), registry=CollectorRegistry(), max_hosts=10)
    assert_type(transport.policy_for("api.example.com"), Policy)
    assert_type(transport.policy_for("api.example.com", 8443), Policy)
    assert_type(await transport.handle_async_request(httpx.Request("GET", "https://api.example.com/")), httpx.Response)
    async with ResilientTransport() as entered:
        assert_type(entered, ResilientTransport)
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.get(
            "https://api.example.com/",
            extensions={"resilient_http": {"retry": None, "timeout": TimeoutPolicy(total=2), "priority": "critical"}},
        )
        info = response.extensions["resilient_http"]
        if isinstance(info, CallInfo):
            the_story(info)
        assert_type(call_info(response), CallInfo | None)
        assert_type(call_info(httpx.ConnectError("refused")), CallInfo | None)
    await transport.aclose()


async def the_network_settings(context: ssl.SSLContext) -> None:
    ResilientTransport(
        verify=context,
        cert=("client.pem", "client.key"),
        trust_env=False,
        http1=False,
        http2=True,
        limits=httpx.Limits(max_connections=10),
        proxy=httpx.Proxy("http://proxy.example:3128"),
        uds=None,
        local_address="0.0.0.0",
        retries=1,
        socket_options=[(6, 1, 1)],
    )
    ResilientTransport(verify=False, proxy="http://proxy.example:3128", limits=None)
    client = ResilientClient(
        {"api.example.com": Policy()},
        default=Policy(),
        registry=CollectorRegistry(),
        max_hosts=100,
        verify=context,
        http2=True,
        proxy=httpx.URL("http://proxy.example:3128"),
        mounts={"all://internal.example": httpx.AsyncHTTPTransport(uds="/run/api.sock"), "all://localhost": None},
        limits=httpx.Limits(max_connections=10),
        trust_env=False,
        base_url="https://api.example.com",
        timeout=5,
        headers={"user-agent": "typing"},
    )
    assert_type(client, ResilientClient)
    assert_type(ResilientClient.from_file("policies.toml", http2=True), ResilientClient)
    async with client as entered:
        assert_type(entered, ResilientClient)
        assert_type(await entered.get("/"), httpx.Response)
    the_client: httpx.AsyncClient = ResilientClient()
    await the_client.aclose()


def the_story(info: CallInfo) -> None:
    assert_type(info.host, str)
    assert_type(info.attempts, int)
    assert_type(info.stale, bool)
    assert_type(info.age, float | None)
    assert_type(info.waits, tuple[Wait, ...])
    assert_type(info.circuit_state, str | None)
    assert_type(info.retry_stop, str | None)
    assert_type(info.coalesced, bool)
    assert_type(info.stale_reason, str | None)
    assert_type(info.dry_run, tuple[str, ...])
    assert_type(info.fallback, bool)
    assert_type(info.hedges, int)
    assert_type(info.hedge_won, bool)
    assert_type(info.hedge_stop, str | None)
    for wait in info.waits:
        assert_type(wait.reason, str)
        assert_type(wait.seconds, float)
    CallInfo(host="api.example.com:443", attempts=1)
    CallInfo(
        host="api.example.com:443",
        attempts=2,
        stale=False,
        age=None,
        waits=(Wait("backoff", 0.1), Wait(reason="retry_after", seconds=2.0)),
        circuit_state="closed",
        retry_stop=None,
        coalesced=False,
        dry_run=("bulkhead",),
        fallback=False,
        hedges=1,
        hedge_won=True,
        hedge_stop=None,
    )


def a_fallback(request: httpx.Request, failure: Exception | httpx.Response, info: CallInfo) -> httpx.Response:
    if isinstance(failure, Exception):
        raise failure
    return httpx.Response(200, json={"default": True}, request=request)


async def an_async_fallback(
    request: httpx.Request, failure: Exception | httpx.Response, info: CallInfo
) -> httpx.Response:
    return httpx.Response(503, text="try again later")


async def policies_at_run_time(policy: Policy) -> None:
    transport = ResilientTransport(fallback=a_fallback)
    ResilientTransport(fallback=an_async_fallback)
    ResilientTransport(fallback=lambda request, failure, info: httpx.Response(204))
    assert_type(transport.update_policies({"api.example.com": policy}, default=policy), None)
    transport.update_policies()
    assert_type(ResilientTransport.from_file("policies.toml", fallback=a_fallback).reload(), None)


def the_exceptions(request: httpx.Request) -> None:
    errors: list[Exception] = [
        ResilienceError("failed", request=request),
        RejectedError("refused", host="api.example.com:443", retry_after=None, request=None),
        CircuitOpenError("open", host="api.example.com:443", retry_after=1.0),
        RateLimitedError("limited", host="api.example.com:443"),
        BulkheadFullError("full", host="api.example.com:443", retry_after=0.5, request=request),
        DeadlineExceededError("late", kind="attempt", timeout=1.0),
        DeadlineExceededError("late", kind="total", timeout=30.0, request=request),
        ConfigurationError("RetryPolicy.attempts", 0, "must be at least 1"),
    ]
    for error in errors:
        try:
            raise error
        except RejectedError as exc:
            assert_type(exc.retry_after, float | None)
            assert_type(exc.host, str)
        except DeadlineExceededError as exc:
            assert_type(exc.kind, Literal["attempt", "total", "idle"])
            assert_type(exc.timeout, float)
        except httpx.TransportError:
            pass
        except ConfigurationError as exc:
            assert_type(exc.field, str)
            assert_type(exc.value, Any)
            assert_type(exc.reason, str)


async def the_fake_clock() -> None:
    clock = FakeClock()
    FakeClock(start=0.0, wall=1_700_000_000.0)
    assert_type(clock.now(), float)
    assert_type(clock.wall(), float)
    clock.advance(1.5)
    await clock.sleep(0.5)
    assert_type(clock.sleeps, list[float])


def the_version() -> None:
    assert_type(resilient_http.__version__, str)
    assert_type(resilient_http.__all__, list[str])
