"""Logging under the ``resilient_http`` logger: levels, structured ``extra`` fields, and nothing secret."""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from conftest import BASE_URL, HOST, Script, only
from prometheus_client import CollectorRegistry

from resilient_http import (
    CircuitBreakerPolicy,
    CircuitOpenError,
    Policy,
    RateLimitPolicy,
    ResilientTransport,
    RetryPolicy,
    StaleCachePolicy,
)
from resilient_http.testing import FakeClock, Handler

BREAKER = CircuitBreakerPolicy(minimum_calls=2, failure_ratio=0.5, break_duration=5.0)


@asynccontextmanager
async def client(handler: Handler, policy: Policy, clock: FakeClock | None = None) -> AsyncIterator[httpx.AsyncClient]:
    transport = ResilientTransport(
        default=policy,
        inner=httpx.MockTransport(handler),
        registry=CollectorRegistry(),
        clock=FakeClock() if clock is None else clock,
        random=random.Random(0),
        name="logging-test",
    )
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
        yield http


def ours(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "resilient_http" or r.name.startswith("resilient_http.")]


async def test_a_breaker_that_opens_warns_and_one_that_closes_informs(caplog: pytest.LogCaptureFixture) -> None:
    """Opening is a WARNING, half-opening and closing INFO, from resilient_http.circuit_breaker, with extra fields."""
    caplog.set_level(logging.INFO, logger="resilient_http")
    clock = FakeClock()
    async with client(Script(500, 500, 200), only(circuit_breaker=BREAKER), clock) as http:
        await http.get("/")
        await http.get("/")
        with pytest.raises(CircuitOpenError):
            await http.get("/")
        clock.advance(10.0)
        await http.get("/")
    records = [r for r in ours(caplog) if r.name == "resilient_http.circuit_breaker"]
    assert [(r.levelno, r.old, r.new) for r in records] == [  # type: ignore[attr-defined]
        (logging.WARNING, "closed", "open"),
        (logging.INFO, "open", "half_open"),
        (logging.INFO, "half_open", "closed"),
    ]
    opened = records[0]
    assert (opened.event, opened.transport, opened.host) == ("breaker_state_changed", "logging-test", HOST)  # type: ignore[attr-defined]
    assert opened.getMessage().startswith(f"circuit of {HOST}: closed -> open for ")


async def test_a_cooldown_is_logged_at_info(caplog: pytest.LogCaptureFixture) -> None:
    """A server's cooldown is one INFO record from resilient_http.rate_limit with its seconds and status."""
    caplog.set_level(logging.INFO, logger="resilient_http")
    async with client(Script((429, {"Retry-After": "3"})), only(rate_limit=RateLimitPolicy(rate=10.0))) as http:
        await http.get("/")
    (record,) = ours(caplog)
    assert (record.name, record.levelno) == ("resilient_http.rate_limit", logging.INFO)
    assert (record.event, record.seconds, record.status) == ("cooldown_started", 3.0, 429)  # type: ignore[attr-defined]


async def test_each_retry_is_logged_at_debug_only(caplog: pytest.LogCaptureFixture) -> None:
    """Each retry is one DEBUG record with its reason and delay; at INFO, retries log nothing."""
    caplog.set_level(logging.INFO, logger="resilient_http")
    async with client(Script(503, 502, 200), only(retry=RetryPolicy())) as http:
        await http.get("/")
    assert ours(caplog) == []
    caplog.set_level(logging.DEBUG, logger="resilient_http")
    async with client(Script(503, 502, 200), only(retry=RetryPolicy())) as http:
        await http.get("/")
    records = [r for r in ours(caplog) if r.event == "retry_scheduled"]  # type: ignore[attr-defined]
    assert [(r.name, r.levelno, r.reason) for r in records] == [  # type: ignore[attr-defined]
        ("resilient_http.retry", logging.DEBUG, "status_503"),
        ("resilient_http.retry", logging.DEBUG, "status_502"),
    ]
    assert all(isinstance(r.delay, float) and r.delay >= 0 for r in records)  # type: ignore[attr-defined]


SECRETS = ("s3cr3t-query-value", "s3cr3t-token", "s3cr3t-body", "s3cr3t-password", "s3cr3t-cookie")


async def test_no_record_holds_a_credential_a_query_string_or_a_body(caplog: pytest.LogCaptureFixture) -> None:
    """Through retries, an open circuit and stale answers, no record holds a query, a credential or a body."""
    caplog.set_level(logging.DEBUG, logger="resilient_http")
    clock = FakeClock()
    body = b"s3cr3t-body"

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"Cache-Control": "public"})

    policy = only(
        retry=RetryPolicy(attempts=2),
        circuit_breaker=CircuitBreakerPolicy(minimum_calls=2, failure_ratio=0.5),
        stale_cache=StaleCachePolicy(),
    )
    script = Script(answer, 503, 503, 503, 503)
    async with client(script, policy, clock) as http:
        url = "https://user:s3cr3t-password@api.example.com/items?key=s3cr3t-query-value"
        headers = {"Authorization": "Bearer s3cr3t-token", "Cookie": "session=s3cr3t-cookie"}
        for _ in range(4):
            await http.get(url, headers=headers)
    records = ours(caplog)
    assert {r.event for r in records} >= {"retry_scheduled", "breaker_state_changed", "stale_served"}  # type: ignore[attr-defined]
    for record in records:
        text = record.getMessage() + repr(record.__dict__)
        for secret in SECRETS:
            assert secret not in text, (secret, record.__dict__)
        assert "?" not in record.getMessage()
