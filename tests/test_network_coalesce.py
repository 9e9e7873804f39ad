"""Coalescing against a real server on 127.0.0.1: what the server receives, and the connections left behind."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import anyio
import httpx
import pytest
from flaky_server import FlakyServer, delay, hang, trickle
from prometheus_client import CollectorRegistry

from resilient_http import CoalescePolicy, Policy, ResilientTransport, TimeoutPolicy, call_info

POLICY = Policy(
    timeout=TimeoutPolicy(attempt=5, total=10),
    retry=None,
    circuit_breaker=None,
    bulkhead=None,
    coalesce=CoalescePolicy(),
)


@pytest.fixture
async def server() -> AsyncIterator[FlakyServer]:
    async with FlakyServer() as running:
        yield running


async def until(condition: Callable[[], bool]) -> None:
    """Return once ``condition()`` holds (the server learns of a closed socket a moment later)."""
    for _ in range(500):
        if condition():
            return
        await anyio.sleep(0.01)
    raise AssertionError("condition never held")


async def test_a_herd_of_identical_gets_reaches_the_server_once(server: FlakyServer) -> None:
    """200 concurrent GETs for an expired resource: one request, one connection, 200 answers."""
    server.queue("/popular", delay(0.2, 200, {"Content-Type": "application/json"}, b'{"v": 1}'))
    transport = ResilientTransport(default=POLICY, registry=CollectorRegistry())
    async with httpx.AsyncClient(transport=transport) as client:
        responses: list[httpx.Response] = []

        async def call() -> None:
            responses.append(await client.get(server.url("/popular")))

        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(call)
        assert [r.json() for r in responses] == [{"v": 1}] * 200
        assert sum(1 for r in responses if (info := call_info(r)) is not None and info.coalesced) == 199
        assert (len(server.requests_to("/popular")), server.connections_accepted) == (1, 1)
    await until(lambda: server.connections_open == 0)


async def test_one_request_per_credential(server: FlakyServer) -> None:
    """Sixty calls with four distinct tokens: four requests, one per token, and every caller answered."""
    server.default("/me", delay(0.2, 200, body=b"ok"))
    transport = ResilientTransport(default=POLICY, registry=CollectorRegistry())
    async with httpx.AsyncClient(transport=transport) as client:
        answered: list[bool] = []

        async def call(token: str) -> None:
            response = await client.get(server.url("/me"), headers={"Authorization": token})
            answered.append(response.status_code == 200)

        async with anyio.create_task_group() as tg:
            for i in range(60):
                tg.start_soon(call, f"Bearer {i % 4}")
        assert answered == [True] * 60
    tokens = sorted(r.headers["authorization"] for r in server.requests_to("/me"))
    assert tokens == [f"Bearer {i}" for i in range(4)]


async def test_a_cancelled_leader_leaves_no_connection_and_its_followers_are_answered(server: FlakyServer) -> None:
    """The leader's request hangs and its caller gives up: its connection is dropped, a follower asks again."""
    server.queue("/slow", hang(), delay(0.1, 200, body=b"second try"))
    transport = ResilientTransport(default=POLICY, registry=CollectorRegistry())
    async with httpx.AsyncClient(transport=transport) as client:
        answers: list[bytes] = []
        leader = anyio.CancelScope()

        async def lead() -> None:
            with leader:
                await client.get(server.url("/slow"))

        async def follow() -> None:
            answers.append((await client.get(server.url("/slow"))).content)

        async with anyio.create_task_group() as tg:
            tg.start_soon(lead)
            await server.wait_for_requests(1, "/slow")
            for _ in range(5):
                tg.start_soon(follow)
            await anyio.sleep(0.05)
            leader.cancel()
        assert answers == [b"second try"] * 5
        assert len(server.requests_to("/slow")) == 2
        await until(lambda: server.connections_open == 1)  # the hung one is gone; the second is kept alive
    await until(lambda: server.connections_open == 0)


async def test_a_streamed_answer_is_not_shared_and_every_follower_reads_its_own(server: FlakyServer) -> None:
    """A chunked body stays the leader's: each follower makes its own request and reads a whole body."""
    server.default("/feed", trickle(chunks=3, interval=0.05, chunk=b"abc"))
    transport = ResilientTransport(default=POLICY, registry=CollectorRegistry())
    async with httpx.AsyncClient(transport=transport) as client:
        bodies: list[bytes] = []

        async def call() -> None:
            bodies.append((await client.get(server.url("/feed"))).content)

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(call)
        assert bodies == [b"abcabcabc"] * 4
        assert len(server.requests_to("/feed")) == 4
    await until(lambda: server.connections_open == 0)
