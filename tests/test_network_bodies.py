"""Bodies on real sockets: a streamed response holds its bulkhead slot, a multipart upload replays.

``max_concurrent`` is the host's connection limit (the default inner transport
has no global cap): these tests count the connections :class:`FlakyServer`
sees while streamed bodies are held open, closed, cancelled mid-read or
dropped unclosed.
"""

from __future__ import annotations

import gc
import io
from collections.abc import AsyncIterator, Callable

import anyio
import httpx
import pytest
from flaky_server import Behaviour, FlakyServer, respond, trickle
from prometheus_client import CollectorRegistry

from resilient_http import BulkheadPolicy, Policy, ResilientTransport, RetryPolicy, TimeoutPolicy

LIMIT = 10.0
BIG = b"x" * (3 << 19)  # 1.5 MiB: above what an attempt reads itself


@pytest.fixture
async def server() -> AsyncIterator[FlakyServer]:
    async with FlakyServer() as running:
        yield running


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def two_slots(registry: CollectorRegistry) -> httpx.AsyncClient:
    policy = Policy(
        timeout=TimeoutPolicy(attempt=5, total=LIMIT),
        retry=None,
        circuit_breaker=None,
        bulkhead=BulkheadPolicy(max_concurrent=2, max_queue=10),
    )
    return httpx.AsyncClient(transport=ResilientTransport(default=policy, registry=registry))


def bulkhead(registry: CollectorRegistry, server: FlakyServer, name: str) -> float | None:
    return registry.get_sample_value(
        f"resilient_http_bulkhead_{name}", {"transport": "default", "host": f"127.0.0.1:{server.port}"}
    )


async def until(condition: Callable[[], bool]) -> None:
    """Wait (bounded by the test's own ``fail_after``) until ``condition`` holds; sockets need real time."""
    for _ in range(10_000):
        if condition():
            return
        await anyio.sleep(0.005)
    raise AssertionError("condition never held")


async def open_stream(client: httpx.AsyncClient, url: str) -> httpx.Response:
    return await client.send(client.build_request("GET", url), stream=True)


@pytest.mark.parametrize(
    "body", [respond(200, body=b"y" * 65536, chunked=True), respond(200, body=BIG)], ids=["chunked", "over-1MiB"]
)
async def test_open_bodies_hold_the_connection_limit(
    server: FlakyServer, registry: CollectorRegistry, body: Behaviour
) -> None:
    """With two streamed bodies held open the server sees two connections; a third call waits for one to finish."""
    server.default("/big", body)
    server.default("/small", respond(200, body=b"ok"))
    third: list[httpx.Response] = []

    async def call_third() -> None:
        third.append(await client.get(server.url("/small")))

    with anyio.fail_after(LIMIT):
        async with two_slots(registry) as client, anyio.create_task_group() as tg:
            first = await open_stream(client, server.url("/big"))
            second = await open_stream(client, server.url("/big"))
            tg.start_soon(call_third)
            await until(lambda: bulkhead(registry, server, "queued") == 1)
            assert [request.path for request in server.requests] == ["/big", "/big"]
            await first.aread()  # to the end: the connection is free again, and so is the slot
            await until(lambda: bool(third))
            await second.aclose()
    assert third[0].text == "ok"
    assert server.connections_accepted == 2  # the third call reused the first body's connection
    assert server.connections_peak == 2


async def test_a_body_dropped_unclosed_frees_its_connection_and_slot(
    server: FlakyServer, registry: CollectorRegistry
) -> None:
    """A streamed response let go of without reading or closing it is closed once collected: the third call goes."""
    server.default("/big", respond(200, body=b"y" * 65536, chunked=True))
    server.default("/small", respond(200, body=b"ok"))
    third: list[httpx.Response] = []

    async def call_third() -> None:
        third.append(await client.get(server.url("/small")))

    with anyio.fail_after(LIMIT):
        async with two_slots(registry) as client, anyio.create_task_group() as tg:
            first = await open_stream(client, server.url("/big"))
            second = await open_stream(client, server.url("/big"))
            tg.start_soon(call_third)
            await until(lambda: bulkhead(registry, server, "queued") == 1)
            del first
            gc.collect()
            await until(lambda: bool(third))
            await until(lambda: server.connections_open == 2)  # the dropped body's connection was closed
            assert bulkhead(registry, server, "in_flight") == 1  # the second body, still open
            await second.aclose()
    assert third[0].text == "ok"


async def test_a_read_cancelled_mid_body_frees_its_connection_and_slot(
    server: FlakyServer, registry: CollectorRegistry
) -> None:
    """A reader cancelled between two chunks of a trickled body, never closing it, lets the third call go."""
    server.default("/slow", trickle(chunks=100, interval=0.05))
    server.default("/small", respond(200, body=b"ok"))
    third: list[httpx.Response] = []

    async def call_third() -> None:
        third.append(await client.get(server.url("/small")))

    with anyio.fail_after(LIMIT):
        async with two_slots(registry) as client, anyio.create_task_group() as tg:
            first = await open_stream(client, server.url("/slow"))
            second = await open_stream(client, server.url("/slow"))
            tg.start_soon(call_third)
            await until(lambda: bulkhead(registry, server, "queued") == 1)
            with anyio.CancelScope() as reading:
                async for _ in first.aiter_raw():
                    reading.cancel()  # after the first chunk
            # httpx leaves the response open here; httpx2 closes it itself. Either way the slot must come back.
            assert first.is_closed == (httpx.__name__ == "httpx2")
            await until(lambda: bool(third))
            await until(lambda: server.connections_open == 2)
            await second.aclose()
            assert bulkhead(registry, server, "in_flight") == 0  # read while the transport is open
    assert third[0].text == "ok"


async def test_a_multipart_upload_is_sent_whole_again_on_retry(
    server: FlakyServer, registry: CollectorRegistry
) -> None:
    """A PUT of a files= form answered 503 is retried with the whole form: the file is read again from its start."""
    server.queue("/upload", respond(503), respond(201))
    policy = Policy(
        timeout=TimeoutPolicy(attempt=5, total=LIMIT),
        retry=RetryPolicy(attempts=2, backoff=0.01, budget=None),
        circuit_breaker=None,
    )
    report = io.BytesIO(b"a,b\n1,2\n" * 1000)
    with anyio.fail_after(LIMIT):
        async with httpx.AsyncClient(transport=ResilientTransport(default=policy, registry=registry)) as client:
            response = await client.put(server.url("/upload"), files={"report": ("report.csv", report, "text/csv")})
    assert response.status_code == 201
    first, second = server.requests_to("/upload")
    assert first.body == second.body
    assert first.body.count(b"1,2\n") == 1000
