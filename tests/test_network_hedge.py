"""Hedging as a real server on 127.0.0.1 sees it: the losers' connections are closed, the winners' reused."""

from __future__ import annotations

import anyio
import httpx
from conftest import where
from flaky_server import FlakyServer, delay, hang, respond, trickle
from prometheus_client import CollectorRegistry

from resilient_http import BulkheadPolicy, HedgePolicy, Policy, ResilientTransport, TimeoutPolicy, call_info

HEDGED = Policy(
    timeout=TimeoutPolicy(attempt=5, total=10),
    retry=None,
    circuit_breaker=None,
    bulkhead=BulkheadPolicy(max_concurrent=50),
    hedge=HedgePolicy(delay=0.05, budget=1.0),
)


async def open_connections_settle(server: FlakyServer, expected: int) -> int:
    """The server's count of open connections once it stops changing towards ``expected`` (at most 2 s)."""
    for _ in range(200):
        if server.connections_open == expected:
            break
        await anyio.sleep(0.01)
    return server.connections_open


async def test_a_hung_first_copy_is_beaten_by_its_hedge_and_its_connection_closed() -> None:
    """The first request hangs, the hedge answers: the call gets the hedge's answer and the hung connection ends."""
    registry = CollectorRegistry()
    transport = ResilientTransport(default=HEDGED, registry=registry)
    async with FlakyServer() as server, httpx.AsyncClient(transport=transport) as client:
        server.queue("/", hang(), respond(200, body=b"hedge"))
        response = await client.get(server.url("/"))
        info = call_info(response)
        assert info is not None and (info.hedges, info.hedge_won) == (1, True)
        assert response.content == b"hedge"
        assert server.connections_accepted == 2
        assert await open_connections_settle(server, 1) == 1  # the hedge's, kept alive in the pool
        assert (
            registry.get_sample_value(
                "resilient_http_bulkhead_in_flight", {"transport": "default", **where(f"127.0.0.1:{server.port}")}
            )
            == 0
        )
        server.queue("/", respond(200, body=b"again"))
        assert (await client.get(server.url("/"))).content == b"again"
        assert server.connections_accepted == 2  # the winner's connection was reused


async def test_many_races_leave_only_the_winners_connections() -> None:
    """Twenty concurrent calls whose first copies hang: twenty answers, and every hung connection is closed."""
    transport = ResilientTransport(default=HEDGED, registry=CollectorRegistry())
    async with FlakyServer() as server, httpx.AsyncClient(transport=transport) as client:
        server.queue("/", *[hang()] * 20)
        server.default("/", respond(200, body=b"ok"))
        responses: list[httpx.Response] = []

        async def one() -> None:
            responses.append(await client.get(server.url("/")))

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(one)
        assert [r.content for r in responses] == [b"ok"] * 20
        assert len(server.requests) == 40
        # A hedge may reuse a connection another hedge's answer freed; each hung one is closed.
        kept = server.connections_accepted - 20
        assert await open_connections_settle(server, kept) == kept <= 20


async def test_a_streamed_winner_reads_in_full_after_the_race() -> None:
    """The hedge's answer streams (chunked): its body is read after the layer returned, outside any task group."""
    transport = ResilientTransport(default=HEDGED, registry=CollectorRegistry())
    async with FlakyServer() as server, httpx.AsyncClient(transport=transport) as client:
        server.queue("/", delay(1.0, 200, body=b"late"), trickle(5, 0.02, chunk=b"ab"))
        async with client.stream("GET", server.url("/")) as response:
            body = await response.aread()
        assert body == b"ab" * 5
        info = call_info(response)
        assert info is not None and info.hedge_won
        assert await open_connections_settle(server, 1) == 1
