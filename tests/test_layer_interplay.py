"""How the layers judge each other's outcomes: what one layer does must not mislead another."""

from __future__ import annotations

import anyio
import httpx
import pytest
from conftest import LeftOpen
from prometheus_client import CollectorRegistry

from resilient_http import (
    BulkheadPolicy,
    CircuitBreakerPolicy,
    DeadlineExceededError,
    Policy,
    ResilientTransport,
    TimeoutPolicy,
)

URL = "http://api.example/slow"
HOST = "api.example:80"


async def test_a_deadline_spent_queueing_does_not_count_against_the_host() -> None:
    """A call whose total timeout ran out in the bulkhead queue never reached the host: the breaker stays closed."""
    release = anyio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return httpx.Response(200)

    registry = CollectorRegistry()
    transport = ResilientTransport(
        default=Policy(
            retry=None,
            bulkhead=BulkheadPolicy(max_concurrent=1, max_queue=10),
            circuit_breaker=CircuitBreakerPolicy(minimum_calls=1, failure_ratio=0.5),
            timeout=TimeoutPolicy(attempt=5.0, total=5.0),
        ),
        inner=httpx.MockTransport(handler),
        registry=registry,
    )
    tight = {"resilient_http": {"timeout": TimeoutPolicy(attempt=0.05, total=0.05)}}
    async with httpx.AsyncClient(transport=LeftOpen(transport)) as client, anyio.create_task_group() as tg:
        tg.start_soon(client.get, URL)
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(DeadlineExceededError) as caught:
            await client.get(URL, extensions=tight)
        assert caught.value.kind == "total"
        release.set()
    assert (
        registry.get_sample_value(
            "resilient_http_circuit_state", {"transport": "default", "host": HOST, "state": "closed"}
        )
        == 1
    )
    assert registry.get_sample_value("resilient_http_circuit_opened_total", {"transport": "default", "host": HOST}) == 0
