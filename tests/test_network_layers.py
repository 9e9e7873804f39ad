"""The rate limiter and the stale cache as a real server on 127.0.0.1 sees them."""

from __future__ import annotations

import time

import anyio
import httpx
import pytest
from flaky_server import FlakyServer, respond
from prometheus_client import CollectorRegistry

from resilient_http import Policy, RateLimitPolicy, ResilientTransport, RetryPolicy, StaleCachePolicy, TimeoutPolicy

FAST = TimeoutPolicy(attempt=2, total=5)


def most_in_one_second(times: list[float], window: float = 1.0) -> int:
    """The most of ``times`` in any window of ``window`` seconds starting at one of them."""
    ordered = sorted(times)
    return max(sum(1 for t in ordered if start <= t < start + window) for start in ordered)


class _SendTimes(httpx.AsyncHTTPTransport):
    """The network, noting when each request to ``/`` is handed to it."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[float] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/":
            self.sent.append(time.monotonic())
        return await super().handle_async_request(request)


async def test_the_server_never_sees_more_than_rate_plus_burst_a_second() -> None:
    """Sixty calls at once against rate 40, burst 4: at most 44 in any second, as sent and as the server sees it.

    The schedule allows 44 in any second, and 45 in a second closed at both
    ends: the burst and the 40th send after it are exactly 1 s apart. So the
    windows are a little shorter than a second, allowing for the time between
    a send's turn and the moment it is written (10 ms, well under the 25 ms
    between turns), and for the server, which runs on the test's own loop and
    reads a request only when the loop gets to it (50 ms). A limiter that lets
    41 a second through, or the burst twice, still overflows them.
    """
    policy = Policy(timeout=FAST, rate_limit=RateLimitPolicy(rate=40, burst=4))
    network = _SendTimes()
    transport = ResilientTransport(default=policy, registry=CollectorRegistry(), inner=network)
    async with FlakyServer() as server, httpx.AsyncClient(transport=transport) as client:
        server.default("/", respond(200, body=b"ok"))
        server.default("/warm", respond(200))
        # Open the burst's connections first: a TCP handshake delays the first
        # arrivals behind the calls sent after them, which no limiter controls.
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(client.get, server.url("/warm"))
        await anyio.sleep(0.2)  # the bucket refills its burst
        async with anyio.create_task_group() as tg:
            for _ in range(60):
                tg.start_soon(client.get, server.url("/"))
    arrivals = [request.arrived for request in server.requests_to("/")]
    assert len(arrivals) == len(network.sent) == 60
    assert most_in_one_second(network.sent, 0.99) <= 40 + 4
    assert most_in_one_second(arrivals, 0.95) <= 40 + 4
    assert max(arrivals) - min(arrivals) >= (60 - 4) / 40 * 0.9  # they were spread, not refused


async def test_a_429_puts_the_whole_host_in_cooldown() -> None:
    """After a 429 with Retry-After: 1, no call to that host reaches the server before the second is over."""
    policy = Policy(timeout=FAST, retry=None, rate_limit=RateLimitPolicy(rate=100, burst=10))
    transport = ResilientTransport(default=policy, registry=CollectorRegistry())
    async with FlakyServer() as server, httpx.AsyncClient(transport=transport) as client:
        server.queue("/quota", respond(429, {"Retry-After": "1"}))
        server.default("/other", respond(200))
        assert (await client.get(server.url("/quota"))).status_code == 429
        assert (await client.get(server.url("/other"))).status_code == 200
    first, second = server.requests
    assert second.path == "/other"
    assert second.arrived - first.arrived >= 1.0


async def test_stale_answers_during_an_outage_and_after_the_host_is_gone() -> None:
    """A stored answer serves a 503 outage, then a host that no longer listens at all."""
    policy = Policy(
        timeout=FAST,
        retry=RetryPolicy(attempts=2, backoff=0.01, budget=None),
        circuit_breaker=None,
        stale_cache=StaleCachePolicy(max_stale=60),
    )
    transport = ResilientTransport(default=policy, registry=CollectorRegistry())
    async with httpx.AsyncClient(transport=transport) as client:
        async with FlakyServer() as server:  # once it stops, nobody listens on its port
            url = server.url("/catalog/42")
            server.queue("/catalog/42", respond(200, {"Cache-Control": "max-age=0"}, b'{"price": 10}'))
            server.default("/catalog/42", respond(503))
            fresh = await client.get(url)
            during = await client.get(url)
        with pytest.raises(httpx.ConnectError):
            await client.get(url.replace("/42", "/7"))  # never stored: the failure comes through
        after = await client.get(url)
    assert fresh.json() == during.json() == after.json() == {"price": 10}
    assert [r.extensions["resilient_http"].stale for r in (fresh, during, after)] == [False, True, True]
    assert "age" in after.headers
