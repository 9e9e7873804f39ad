"""What only a real socket shows: waits measured on the server, resets, trickled bodies, pool leaks.

Every test runs ``httpx.AsyncClient(transport=ResilientTransport(...))`` with the
real ``httpx.AsyncHTTPTransport`` against :class:`FlakyServer` on 127.0.0.1.
Timing assertions are protocol facts only: lower bounds on waits the server
measured, and generous upper bounds that prove a timeout fired.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
from flaky_server import (
    Behaviour,
    FlakyServer,
    close,
    delay,
    free_port,
    hang,
    http_date,
    reset,
    respond,
    trickle,
)
from prometheus_client import CollectorRegistry

from resilient_http import (
    CallInfo,
    CircuitBreakerPolicy,
    CircuitOpenError,
    DeadlineExceededError,
    Policy,
    ResilientTransport,
    RetryPolicy,
    TimeoutPolicy,
)

# Slack for "the timeout fired": wide enough for a loaded CI machine, far below what a missed timeout costs.
SLACK = 1.0
QUICK_RETRY = RetryPolicy(attempts=3, backoff=0.01, max_backoff=0.01, budget=None)


@pytest.fixture
async def server() -> AsyncIterator[FlakyServer]:
    async with FlakyServer() as running:
        yield running


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def policy(
    *,
    attempt: float | None = 2.0,
    total: float | None = 5.0,
    retry: RetryPolicy | None = QUICK_RETRY,
    circuit_breaker: CircuitBreakerPolicy | None = None,
) -> Policy:
    return Policy(
        timeout=TimeoutPolicy(attempt=attempt, total=total),
        retry=retry,
        circuit_breaker=circuit_breaker,
        bulkhead=None,
    )


def client(
    registry: CollectorRegistry,
    default: Policy,
    *,
    inner: httpx.AsyncBaseTransport | None = None,
    timeout: float | None = 5.0,
) -> httpx.AsyncClient:
    transport = ResilientTransport(default=default, inner=inner, registry=registry)
    return httpx.AsyncClient(transport=transport, timeout=timeout)


def info(response: httpx.Response) -> CallInfo:
    found = response.extensions["resilient_http"]
    assert isinstance(found, CallInfo)
    return found


def attempts_metric(registry: CollectorRegistry, server_port: int, outcome: str) -> float:
    value = registry.get_sample_value(
        "resilient_http_attempts_total",
        {"transport": "default", "host": f"127.0.0.1:{server_port}", "outcome": outcome},
    )
    return 0.0 if value is None else value


# -- the server itself ---------------------------------------------------------


async def test_server_keeps_connections_alive(server: FlakyServer, registry: CollectorRegistry) -> None:
    """Sequential calls share one keep-alive connection, so connection counts mean something."""
    server.default("/ok", respond(200, body=b"ok"))
    async with client(registry, policy()) as http:
        for _ in range(5):
            assert (await http.get(server.url("/ok"))).text == "ok"
    assert len(server.requests_to("/ok")) == 5
    assert server.connections_accepted == 1
    assert {r.connection for r in server.requests} == {1}


# -- Retry-After ---------------------------------------------------------------


async def test_retry_after_seconds_is_waited_in_full(server: FlakyServer, registry: CollectorRegistry) -> None:
    """A 503 with Retry-After: 1 is retried no earlier than 1 s after the first request arrived."""
    server.queue("/ra", respond(503, {"Retry-After": "1"}, b"busy"), respond(200, body=b"ok"))
    async with client(registry, policy()) as http:
        response = await http.get(server.url("/ra"))
    assert response.status_code == 200
    first, second = server.requests_to("/ra")
    assert second.arrived - first.arrived >= 1.0
    assert second.arrived - first.arrived < 1.0 + SLACK
    (wait,) = info(response).waits
    assert wait.reason == "retry_after"
    assert wait.seconds >= 1.0


async def test_retry_after_date_is_read_against_the_response_date(
    server: FlakyServer, registry: CollectorRegistry
) -> None:
    """An HTTP-date Retry-After is measured from the response's Date, so a server clock 1 h behind costs 1 s."""
    skewed = int(time.time()) - 3600
    headers = {"Date": http_date(skewed), "Retry-After": http_date(skewed + 1)}
    server.queue("/ra", respond(503, headers, b"busy"), respond(200, body=b"ok"))
    async with client(registry, policy()) as http:
        response = await http.get(server.url("/ra"))
    assert response.status_code == 200  # not given up as "1 h is too long"
    first, second = server.requests_to("/ra")
    assert second.arrived - first.arrived >= 1.0  # not "a date in the past means now"
    assert second.arrived - first.arrived < 1.0 + SLACK


async def test_retry_after_above_max_returns_the_503_at_once(server: FlakyServer, registry: CollectorRegistry) -> None:
    """A Retry-After above max_retry_after is not waited: the 503 comes back at once after one request."""
    server.default("/ra", respond(503, {"Retry-After": "120"}, b"busy"))
    retry = RetryPolicy(attempts=3, backoff=0.01, max_retry_after=60, budget=None)
    started = time.monotonic()
    async with client(registry, policy(retry=retry)) as http:
        response = await http.get(server.url("/ra"))
    assert time.monotonic() - started < SLACK
    assert response.status_code == 503
    assert response.text == "busy"
    assert len(server.requests_to("/ra")) == 1
    assert info(response).retry_stop == "retry_after_too_long"


async def test_retry_after_beyond_total_timeout_returns_the_503_at_once(
    server: FlakyServer, registry: CollectorRegistry
) -> None:
    """A Retry-After that would end after the total timeout is not waited: the 503 comes back at once."""
    server.default("/ra", respond(503, {"Retry-After": "5"}, b"busy"))
    started = time.monotonic()
    async with client(registry, policy(attempt=1.0, total=2.0)) as http:
        response = await http.get(server.url("/ra"))
    assert time.monotonic() - started < SLACK
    assert response.status_code == 503
    assert len(server.requests_to("/ra")) == 1
    assert info(response).retry_stop == "deadline"


# -- timeouts ------------------------------------------------------------------


async def test_hung_server_times_out_every_attempt_then_raises_attempt_deadline(
    server: FlakyServer, registry: CollectorRegistry
) -> None:
    """Against a server that never answers, each GET attempt times out and is retried; the last timeout is raised."""
    server.default("/hang", hang())
    started = time.monotonic()
    async with client(registry, policy(attempt=0.2, total=5.0)) as http:
        with pytest.raises(DeadlineExceededError) as caught:
            await http.get(server.url("/hang"))
        elapsed = time.monotonic() - started
        assert attempts_metric(registry, server.port, "timeout") == 3  # read before the transport closes
    assert caught.value.kind == "attempt"
    assert len(server.requests_to("/hang")) == 3
    assert 3 * 0.2 <= elapsed < 3 * 0.2 + SLACK


async def test_hung_server_under_tight_total_timeout_raises_total_deadline_in_time(
    server: FlakyServer, registry: CollectorRegistry
) -> None:
    """With total < attempts x attempt, the total timeout cuts the last attempt and the call ends on time."""
    server.default("/hang", hang())
    started = time.monotonic()
    async with client(registry, policy(attempt=0.3, total=0.5)) as http:
        with pytest.raises(DeadlineExceededError) as caught:
            await http.get(server.url("/hang"))
    elapsed = time.monotonic() - started
    assert caught.value.kind == "total"
    assert 0.5 <= elapsed < 0.5 + SLACK
    assert len(server.requests_to("/hang")) == 2  # 0.3 s, then the 0.2 s left


async def test_explicit_client_timeout_is_honoured_inside_the_attempt(
    server: FlakyServer, registry: CollectorRegistry
) -> None:
    """httpx.AsyncClient(timeout=0.05) keeps its httpx meaning: a 0.3 s answer is an httpx.ReadTimeout of the caller."""
    server.default("/slow", delay(0.3, 200, body=b"late"))
    started = time.monotonic()
    async with client(registry, policy(attempt=2.0, total=5.0, retry=None), timeout=0.05) as http:
        with pytest.raises(httpx.ReadTimeout) as caught:
            await http.get(server.url("/slow"))
    assert time.monotonic() - started < 0.3
    assert not isinstance(caught.value, DeadlineExceededError)  # the caller's timeout, not the policy's


async def test_with_stream_total_a_trickled_body_is_cut_by_the_total_timeout_on_get(
    server: FlakyServer, registry: CollectorRegistry
) -> None:
    """A body that trickles past the total timeout raises DeadlineExceededError(kind="total") from client.get."""
    server.default("/trickle", trickle(chunks=25, interval=0.2))
    started = time.monotonic()
    bounded = dataclasses.replace(policy(), timeout=TimeoutPolicy(attempt=0.5, total=1.0, stream_total=True))
    async with client(registry, bounded) as http:
        with pytest.raises(DeadlineExceededError) as caught:
            await http.get(server.url("/trickle"))
    elapsed = time.monotonic() - started
    assert caught.value.kind == "total"
    assert 1.0 <= elapsed < 1.0 + SLACK
    assert len(server.requests_to("/trickle")) == 1


async def test_with_stream_total_a_trickled_body_is_cut_by_the_total_timeout_while_streaming(
    server: FlakyServer, registry: CollectorRegistry
) -> None:
    """A trickled body read with client.stream raises DeadlineExceededError(kind="total") mid-iteration."""
    server.default("/trickle", trickle(chunks=25, interval=0.2, chunk=b"abcd"))
    received = b""
    started = time.monotonic()
    bounded = dataclasses.replace(policy(), timeout=TimeoutPolicy(attempt=0.5, total=1.0, stream_total=True))
    async with client(registry, bounded) as http:
        with pytest.raises(DeadlineExceededError) as caught:
            async with http.stream("GET", server.url("/trickle")) as response:
                assert response.status_code == 200
                async for chunk in response.aiter_bytes():
                    received += chunk
    elapsed = time.monotonic() - started
    assert caught.value.kind == "total"
    assert 1.0 <= elapsed < 1.0 + SLACK
    assert 0 < len(received) < 25 * 4  # some chunks came through, not all


async def test_small_sized_body_whose_first_bytes_stall_is_an_attempt_timeout_and_is_retried(
    server: FlakyServer, registry: CollectorRegistry
) -> None:
    """The first bytes of a small body with Content-Length are waited for inside the attempt: their stall is retried."""
    server.queue("/stall", trickle(chunks=2, interval=0.8, sized=True), respond(200, body=b"ok"))
    async with client(registry, policy(attempt=0.5, total=5.0)) as http:
        response = await http.get(server.url("/stall"))
    assert response.text == "ok"
    assert info(response).attempts == 2
    assert len(server.requests_to("/stall")) == 2


# -- resets, closes and refusals -----------------------------------------------


@pytest.mark.parametrize("failure", [reset(), close()], ids=["reset", "close"])
async def test_get_broken_connection_is_retried(
    server: FlakyServer, registry: CollectorRegistry, failure: Behaviour
) -> None:
    """A GET whose connection is reset (or closed unanswered) after sending is retried and succeeds."""
    server.queue("/get", failure, respond(200, body=b"ok"))
    async with client(registry, policy()) as http:
        response = await http.get(server.url("/get"))
    assert response.text == "ok"
    assert len(server.requests_to("/get")) == 2
    assert info(response).attempts == 2


@pytest.mark.parametrize(
    ("failure", "error"),
    [(reset(), httpx.ReadError), (close(), httpx.RemoteProtocolError)],
    ids=["reset", "close"],
)
async def test_post_without_idempotency_key_is_not_retried_after_a_broken_connection(
    server: FlakyServer, registry: CollectorRegistry, failure: Behaviour, error: type[httpx.TransportError]
) -> None:
    """A POST that may have reached the server is not sent twice: the network error propagates."""
    server.queue("/post", failure, respond(200, body=b"ok"))
    async with client(registry, policy()) as http:
        with pytest.raises(error):
            await http.post(server.url("/post"), content=b"charge 10 EUR")
    assert len(server.requests_to("/post")) == 1


async def test_post_with_idempotency_key_is_retried_with_the_same_key_and_body(
    server: FlakyServer, registry: CollectorRegistry
) -> None:
    """A POST carrying an Idempotency-Key is retried after resets, sending the same key and body every time."""
    server.queue("/post", reset(), reset(), respond(201, body=b"created"))
    async with client(registry, policy()) as http:
        response = await http.post(server.url("/post"), content=b"charge 10 EUR", headers={"Idempotency-Key": "k-42"})
    assert response.status_code == 201
    seen = server.requests_to("/post")
    assert len(seen) == 3
    assert [r.headers["idempotency-key"] for r in seen] == ["k-42"] * 3
    assert [r.body for r in seen] == [b"charge 10 EUR"] * 3


async def test_streamed_post_body_is_not_replayed_after_a_reset(
    server: FlakyServer, registry: CollectorRegistry
) -> None:
    """A generator body cannot be sent twice: even with an Idempotency-Key the reset propagates."""

    async def body() -> AsyncIterator[bytes]:
        yield b"part one, "
        yield b"part two"

    server.queue("/post", reset(), respond(201))
    async with client(registry, policy()) as http:
        with pytest.raises(httpx.ReadError):
            await http.post(server.url("/post"), content=body(), headers={"Idempotency-Key": "k-43"})
    (only,) = server.requests_to("/post")
    assert only.body == b"part one, part two"


async def test_connection_refused_is_retried_even_for_post(registry: CollectorRegistry) -> None:
    """A refused connection sent nothing, so even a POST is retried, ending in ConnectError after all attempts."""
    port = free_port()
    async with client(registry, policy()) as http:
        with pytest.raises(httpx.ConnectError):
            await http.post(f"http://127.0.0.1:{port}/post", content=b"payload")
        assert attempts_metric(registry, port, "error") == QUICK_RETRY.attempts


async def test_server_going_away_mid_call_ends_in_connect_error(registry: CollectorRegistry) -> None:
    """A GET cut off by the server shutting down is retried, and ends in ConnectError once nobody listens."""
    server = FlakyServer()
    await server.start()
    server.default("/hang", hang())

    async def call(http: httpx.AsyncClient) -> None:
        with pytest.raises(httpx.ConnectError):
            await http.get(server.url("/hang"))

    async with client(registry, policy(attempt=2.0, total=5.0)) as http:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(call, http)
            await server.wait_for_requests(1)
            await server.stop()  # ends the hung handler: the client sees the connection close unanswered
        assert attempts_metric(registry, server.port, "error") == QUICK_RETRY.attempts
    assert server.connections_open == 0
    assert len(server.requests) == 1


# -- the connection pool -------------------------------------------------------


async def test_retried_small_error_responses_do_not_leak_pool_connections(
    server: FlakyServer, registry: CollectorRegistry
) -> None:
    """30 calls of 503, 503, 200 through a pool of 2 all succeed, on reused keep-alive connections."""
    for _ in range(30):
        server.queue("/flaky", respond(503, body=b"busy"), respond(503, body=b"busy"), respond(200, body=b"ok"))
    inner = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=2))
    async with client(registry, policy(attempt=1.0, total=5.0), inner=inner) as http:
        for _ in range(30):
            response = await http.get(server.url("/flaky"))
            assert response.text == "ok"
            assert info(response).attempts == 3
            assert [w.reason for w in info(response).waits] == ["backoff", "backoff"]
    assert len(server.requests_to("/flaky")) == 90
    assert server.connections_accepted <= 2


async def test_discarded_chunked_error_bodies_do_not_leak_pool_connections(
    server: FlakyServer, registry: CollectorRegistry
) -> None:
    """Unread chunked 503 bodies are closed when retried, so a pool of 1 keeps serving."""
    for _ in range(10):
        server.queue("/big", respond(503, body=b"e" * 200_000, chunked=True), respond(200, body=b"ok"))
    inner = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1))
    async with client(registry, policy(attempt=1.0, total=5.0), inner=inner) as http:
        for _ in range(10):
            response = await http.get(server.url("/big"))
            assert response.text == "ok"
        await anyio.sleep(0.05)  # let the server notice the connections the client dropped
        assert server.connections_open <= 1


async def test_cancelled_call_leaves_the_pool_usable(server: FlakyServer, registry: CollectorRegistry) -> None:
    """Cancelling a call mid-attempt frees its connection: later calls through a pool of 1 still succeed."""
    server.default("/hang", hang())
    server.default("/ok", respond(200, body=b"ok"))
    inner = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1))
    async with client(registry, policy(attempt=2.0, total=5.0), inner=inner) as http:
        for _ in range(3):
            with anyio.move_on_after(0.2) as scope:
                await http.get(server.url("/hang"))
            assert scope.cancelled_caught
            response = await http.get(server.url("/ok"))
            assert response.text == "ok"
        assert attempts_metric(registry, server.port, "cancelled") == 3
    assert len(server.requests_to("/hang")) == 3


# -- the circuit breaker -------------------------------------------------------


@pytest.mark.parametrize(
    "failure", [respond(503, body=b"down"), reset(), close(), hang()], ids=["503", "reset", "close", "hang"]
)
async def test_breaker_opens_against_a_failing_server_and_stops_sending(
    server: FlakyServer, registry: CollectorRegistry, failure: Behaviour
) -> None:
    """After minimum_calls failed calls the circuit opens, and the next call fails fast without reaching the server."""
    server.default("/down", failure)
    breaker = CircuitBreakerPolicy(minimum_calls=3, failure_ratio=0.5, break_duration=30.0)
    retry = RetryPolicy(attempts=2, backoff=0.01, budget=None)
    async with client(registry, policy(attempt=0.2, total=2.0, retry=retry, circuit_breaker=breaker)) as http:
        for _ in range(3):
            try:
                response = await http.get(server.url("/down"))
            except httpx.TransportError as exc:
                assert not isinstance(exc, CircuitOpenError)
            else:
                assert response.status_code == 503
        sent = len(server.requests_to("/down"))
        assert sent == 3 * 2  # the breaker judges whole calls, retries included
        with pytest.raises(CircuitOpenError) as caught:
            await http.get(server.url("/down"))
    assert caught.value.retry_after is not None and caught.value.retry_after > 0
    assert len(server.requests_to("/down")) == sent
