"""Timeouts as a real server on 127.0.0.1 sees them: pool slots, httpx's classes, redirects, streamed bodies."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import httpx
import pytest
from flaky_server import FlakyServer, delay, hang, respond, trickle
from prometheus_client import CollectorRegistry

from resilient_http import (
    ConnectDeadlineExceededError,
    DeadlineExceededError,
    Policy,
    PoolDeadlineExceededError,
    ReadDeadlineExceededError,
    ResilientTransport,
    RetryPolicy,
    TimeoutPolicy,
    WriteDeadlineExceededError,
    call_info,
)

SLACK = 1.0


@pytest.fixture
async def server() -> AsyncIterator[FlakyServer]:
    async with FlakyServer() as running:
        yield running


def policy(timeout: TimeoutPolicy | None, retry: RetryPolicy | None = None) -> Policy:
    return Policy(timeout=timeout, retry=retry, circuit_breaker=None, bulkhead=None)


def client(
    bounds: TimeoutPolicy,
    *,
    retry: RetryPolicy | None = None,
    inner: httpx.AsyncBaseTransport | None = None,
    policies: dict[str, Policy] | None = None,
    **kwargs: object,
) -> httpx.AsyncClient:
    transport = ResilientTransport(policies, default=policy(bounds, retry), inner=inner, registry=CollectorRegistry())
    return httpx.AsyncClient(transport=transport, **kwargs)  # type: ignore[arg-type]


# -- no leaks ------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [4, 16], ids=["within-the-pool", "queueing-for-the-pool"])
async def test_thousands_of_timed_out_attempts_leave_a_capped_pool_serving(
    server: FlakyServer, concurrency: int
) -> None:
    """2,000 attempts cut at 2 ms against a hung path through max_connections=4: calls still succeed, no leaks."""
    server.default("/hang", hang())
    server.default("/ok", respond(200, body=b"ok"))
    inner = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=4))
    async with client(TimeoutPolicy(attempt=0.002, total=60), inner=inner) as http:
        limiter = anyio.Semaphore(concurrency)

        async def one() -> None:
            async with limiter:
                with pytest.raises(DeadlineExceededError):
                    await http.get(server.url("/hang"))

        async with anyio.create_task_group() as tg:
            for _ in range(2000):
                tg.start_soon(one)
        await anyio.sleep(0.1)  # let the server see the connections the client dropped
        assert server.connections_open <= 4
        roomy = {"resilient_http": {"timeout": TimeoutPolicy(attempt=2, total=5)}}
        with anyio.fail_after(10):
            for _ in range(8):  # more calls than the pool has connections
                response = await http.get(server.url("/ok"), extensions=roomy)
                assert response.text == "ok"
    await anyio.sleep(0.1)
    assert server.connections_open == 0


# -- httpx's classes -----------------------------------------------------------


@pytest.fixture
def stalled_port() -> Iterator[int]:
    """A port whose listening socket never accepts and whose backlog is full: a new connection stalls."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):  # fill the accept queue; later SYNs are dropped
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.05)
    yield port
    for filler in fillers:
        filler.close()
    listener.close()


async def test_a_connect_stall_is_a_connect_timeout_retried_for_a_post(stalled_port: int) -> None:
    """Against a server that never completes the handshake, a POST times out as httpx.ConnectTimeout and is retried."""
    retry = RetryPolicy(attempts=2, backoff=0.01, max_backoff=0.01, budget=None)
    async with client(TimeoutPolicy(attempt=0.2, total=5), retry=retry) as http:
        with pytest.raises(httpx.ConnectTimeout) as caught:
            await http.post(f"http://127.0.0.1:{stalled_port}/", content=b"once")
    assert isinstance(caught.value, ConnectDeadlineExceededError)
    assert (caught.value.kind, caught.value.timeout) == ("attempt", 0.2)
    info = call_info(caught.value)
    assert info is not None and info.attempts == 2


async def test_a_pool_wait_is_a_pool_timeout(server: FlakyServer) -> None:
    """With the only connection held by a hung call, the next call's wait is an httpx.PoolTimeout."""
    server.default("/hang", hang())
    inner = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1))
    async with client(TimeoutPolicy(attempt=0.3, total=5), inner=inner) as http:
        unbounded = {"resilient_http": {"timeout": None}}

        async def holder() -> None:
            await http.get(server.url("/hang"), extensions=unbounded)

        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            await server.wait_for_requests(1, "/hang")
            with pytest.raises(httpx.PoolTimeout) as caught:
                await http.get(server.url("/hang"))
            tg.cancel_scope.cancel()
    assert isinstance(caught.value, PoolDeadlineExceededError)


async def test_a_hung_server_is_a_read_timeout(server: FlakyServer) -> None:
    """A server that reads the request and never answers: httpx.ReadTimeout, the policy's attempt timeout."""
    server.default("/hang", hang())
    async with client(TimeoutPolicy(attempt=0.2, total=5)) as http:
        with pytest.raises(httpx.ReadTimeout) as caught:
            await http.get(server.url("/hang"))
    assert isinstance(caught.value, ReadDeadlineExceededError)
    assert caught.value.kind == "attempt"


async def test_a_server_that_never_reads_is_a_write_timeout() -> None:
    """A request body larger than the socket buffers, to a server that never reads it: httpx.WriteTimeout."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # and never read

    listener = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with client(TimeoutPolicy(attempt=0.5, total=5)) as http:
            with pytest.raises(httpx.WriteTimeout) as caught:
                await http.post(f"http://127.0.0.1:{port}/", content=b"x" * (64 << 20))
        assert isinstance(caught.value, WriteDeadlineExceededError)
    finally:
        for writer in held:
            writer.close()
        listener.close()
        await listener.wait_closed()


# -- the caller's timeouts and redirects -----------------------------------------


async def test_a_redirect_to_another_host_is_still_bounded(server: FlakyServer) -> None:
    """127.0.0.1 redirects to localhost, whose policy has no timeout: the client's own timeout still ends the hang."""
    server.default("/hang", hang())
    server.default("/go", respond(302, {"Location": f"http://localhost:{server.port}/hang"}))
    others = {"localhost": policy(None)}
    started = time.monotonic()
    async with client(TimeoutPolicy(attempt=5, total=10), policies=others, timeout=0.3) as http:
        with anyio.fail_after(5):
            with pytest.raises(httpx.ReadTimeout) as caught:
                await http.get(server.url("/go"), follow_redirects=True)
    assert not isinstance(caught.value, DeadlineExceededError)
    assert time.monotonic() - started < 0.3 + SLACK
    assert len(server.requests_to("/hang")) == 1


async def test_httpx_implicit_default_does_not_cut_an_attempt_the_policy_allows(
    server: FlakyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """httpx's implicit default (here made 0.05 s) is not the caller's: a 0.3 s answer within attempt=2 s succeeds."""
    import resilient_http._deadline

    monkeypatch.setattr(resilient_http._deadline, "IMPLICIT", httpx.Timeout(0.05).as_dict())
    server.default("/slow", delay(0.3, 200, body=b"late but fine"))
    async with client(TimeoutPolicy(attempt=2, total=5), timeout=0.05) as http:
        response = await http.get(server.url("/slow"))
    assert response.text == "late but fine"


# -- streamed bodies -------------------------------------------------------------


async def test_a_stream_gets_its_first_bytes_before_a_trickled_small_body_ends(server: FlakyServer) -> None:
    """A 5-chunk sized body, one chunk every 0.2 s: client.stream() has the first chunk long before the last."""
    server.default("/trickle", trickle(chunks=5, interval=0.2, chunk=b"abcd", sized=True))
    async with client(TimeoutPolicy(attempt=2, total=5)) as http:
        started = time.monotonic()
        async with http.stream("GET", server.url("/trickle")) as response:
            arrivals = [time.monotonic() - started async for _ in response.aiter_raw()]
    assert arrivals[0] < 0.6  # the whole body takes 1.0 s
    assert arrivals[-1] >= 0.9


async def test_a_flowing_body_longer_than_total_is_not_cut(server: FlakyServer) -> None:
    """An event stream that keeps flowing for 1.2 s under total=0.5 s is read to its end."""
    server.default("/events", trickle(chunks=12, interval=0.1, chunk=b"data: x\n\n"))
    async with client(TimeoutPolicy(attempt=0.5, total=0.5, idle=0.5)) as http:
        started = time.monotonic()
        async with http.stream("GET", server.url("/events")) as response:
            body = b"".join([chunk async for chunk in response.aiter_raw()])
    assert body == b"data: x\n\n" * 12
    assert time.monotonic() - started >= 1.2


async def test_a_stalled_body_is_cut_by_the_idle_bound(server: FlakyServer) -> None:
    """A body that pauses 1 s between chunks, under idle=0.2 s: ReadDeadlineExceededError(kind="idle")."""
    server.default("/stall", trickle(chunks=3, interval=1.0))
    started = time.monotonic()
    async with client(TimeoutPolicy(attempt=2, total=5, idle=0.2)) as http:
        with pytest.raises(httpx.ReadTimeout) as caught:
            await http.get(server.url("/stall"))
    assert isinstance(caught.value, ReadDeadlineExceededError)
    assert (caught.value.kind, caught.value.timeout) == ("idle", 0.2)
    assert time.monotonic() - started < 0.2 + SLACK
