"""The rate limiter's bound as a real server on 127.0.0.1 sees it, from a client whose event loop runs late.

The server runs on a thread and an event loop of its own, so that the
arrival times it records (on ``time.monotonic()``) do not wait for the
client's loop: when the client's loop stalls, the requests it had already
sent are read at once, and only what the client sends after the stall can
bunch.
"""

from __future__ import annotations

import time

import anyio
import httpx
from flaky_server import respond, server_on_its_own_thread
from prometheus_client import CollectorRegistry

from resilient_http import Policy, RateLimitPolicy, ResilientTransport, TimeoutPolicy


def most_in_one_second(times: list[float]) -> int:
    """The most arrivals in any one-second window starting at an arrival."""
    ordered = sorted(times)
    return max(sum(1 for t in ordered if start <= t < start + 1.0) for start in ordered)


def stall(seconds: float) -> None:
    """Keep the event loop busy, as a CPU-bound callback would: every sleeper due meanwhile wakes late."""
    time.sleep(seconds)


async def test_late_wake_ups_never_let_more_than_rate_plus_burst_reach_the_server_in_a_second() -> None:
    """Twice the rate offered for 1.5 s, the client's loop stalling for 0.4 s now and then: at most 8 + 2 a second."""
    rate, burst, offered = 8, 2, 24
    policy = Policy(
        timeout=TimeoutPolicy(attempt=5, total=20),
        retry=None,
        circuit_breaker=None,
        bulkhead=None,
        rate_limit=RateLimitPolicy(rate=rate, burst=burst),
    )
    transport = ResilientTransport(default=policy, registry=CollectorRegistry())
    with server_on_its_own_thread() as server:
        server.default("/", respond(200, body=b"ok"))
        server.default("/warm", respond(200))
        async with httpx.AsyncClient(transport=transport) as client:
            # Open the connections a burst needs first: a handshake would hold the first
            # arrivals back behind the calls sent after them, which no limiter controls.
            async with anyio.create_task_group() as group:
                for _ in range(burst):
                    group.start_soon(client.get, server.url("/warm"))

            async def stalls() -> None:
                for _ in range(5):
                    await anyio.sleep(0.3)
                    stall(0.4)

            async with anyio.create_task_group() as group:
                group.start_soon(stalls)
                for _ in range(offered):
                    group.start_soon(client.get, server.url("/"))
                    await anyio.sleep(1.0 / (2 * rate))
    arrivals = [request.arrived for request in server.requests_to("/")]
    assert len(arrivals) == offered
    assert most_in_one_second(arrivals) <= rate + burst
