"""The fallback hook: the application's answer when the whole chain failed, marked and counted."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from conftest import BASE_URL, Harness, LeftOpen, Script, only
from prometheus_client import CollectorRegistry

from resilient_http import (
    CallInfo,
    CircuitBreakerPolicy,
    CircuitOpenError,
    ConfigurationError,
    ResilientClient,
    ResilientTransport,
    RetryPolicy,
    StaleCachePolicy,
    call_info,
)
from resilient_http.testing import FakeClock, Handler


class Recorder:
    """A fallback that records what it was asked and answers with ``answer`` (a status), or raises ``error``."""

    def __init__(self, answer: int | None = 200, error: BaseException | None = None) -> None:
        self.answer = answer
        self.error = error
        self.asked: list[tuple[httpx.Request, Exception | httpx.Response, CallInfo]] = []

    def __call__(self, request: httpx.Request, failure: Exception | httpx.Response, info: CallInfo) -> httpx.Response:
        self.asked.append((request, failure, info))
        if self.error is not None:
            raise self.error
        if self.answer is None:
            if isinstance(failure, Exception):
                raise failure
            return failure
        return httpx.Response(self.answer, json={"fallback": True})


def client(
    harness: Harness, handler: Handler, fallback: Any, policy: Any = None, registry: CollectorRegistry | None = None
) -> httpx.AsyncClient:
    transport = ResilientTransport(
        default=only() if policy is None else policy,
        inner=httpx.MockTransport(handler),
        registry=harness.registry if registry is None else registry,
        clock=harness.clock,
        random=random.Random(0),
        fallback=fallback,
    )
    # Left open: the tests read the transport's counters after the client has closed.
    return httpx.AsyncClient(transport=LeftOpen(transport), base_url=BASE_URL)


def info(outcome: httpx.Response | BaseException) -> CallInfo:
    found = call_info(outcome)
    assert found is not None
    return found


def fallbacks(harness: Harness, reason: str) -> float | None:
    return harness.value("resilient_http_fallbacks_total", reason=reason)


async def test_the_fallback_answers_an_error(harness: Harness) -> None:
    """A network error goes to the fallback, whose answer is the call's, marked and counted."""
    recorder = Recorder()
    async with client(harness, Script(httpx.ConnectError), recorder) as http:
        response = await http.get("/x")
    assert (response.status_code, response.json()) == (200, {"fallback": True})
    assert info(response).fallback and info(response).attempts == 1
    assert response.request.url == f"{BASE_URL}/x"
    request, failure, seen = recorder.asked[0]
    assert request is response.request and isinstance(failure, httpx.ConnectError)
    assert (seen.attempts, seen.fallback) == (1, False)
    assert fallbacks(harness, "error") == 1
    assert harness.value("resilient_http_requests_total", outcome="fallback") == 1
    assert harness.value("resilient_http_requests_total", outcome="error") is None


async def test_the_fallback_answers_a_final_server_error_and_closes_it(harness: Harness) -> None:
    """A final 503, after its retries, goes to the fallback; the replaced response is closed."""
    closed: list[bool] = []

    class Body(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b"upstream"

        async def aclose(self) -> None:
            closed.append(True)

    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(503, stream=Body())

    recorder = Recorder()
    policy = only(retry=RetryPolicy(attempts=2, budget=None))
    async with client(harness, handler, recorder, policy) as http:
        response = await http.get("/")
    assert response.status_code == 200 and info(response).fallback
    failure = recorder.asked[0][1]
    assert isinstance(failure, httpx.Response) and failure.status_code == 503
    assert calls == 2 and closed == [True, True]  # the retried response, then the one the fallback replaced
    assert fallbacks(harness, "server_error") == 1


async def test_the_answer_knows_its_request_without_a_client(harness: Harness) -> None:
    """Called as a bare transport, the fallback's answer still has the call's request set."""
    transport = ResilientTransport(
        default=only(), inner=httpx.MockTransport(Script(500)), registry=harness.registry, fallback=Recorder()
    )
    request = httpx.Request("GET", f"{BASE_URL}/bare")
    async with transport:
        response = await transport.handle_async_request(request)
    assert response.request is request


async def test_an_async_fallback_is_awaited(harness: Harness) -> None:
    """The fallback may be a coroutine function."""

    async def fallback(request: httpx.Request, failure: Exception | httpx.Response, info: CallInfo) -> httpx.Response:
        await anyio.lowlevel.checkpoint()
        return httpx.Response(203)

    async with client(harness, Script(httpx.ReadTimeout), fallback) as http:
        response = await http.get("/")
    assert response.status_code == 203 and info(response).fallback
    assert fallbacks(harness, "timeout") == 1


async def test_a_refusal_goes_to_the_fallback(harness: Harness) -> None:
    """An open circuit is a failure the fallback may answer, counted by what failed."""
    breaker = CircuitBreakerPolicy(minimum_calls=1, failure_ratio=1.0)
    recorder = Recorder()
    async with client(harness, Script(500), recorder, only(circuit_breaker=breaker)) as http:
        await http.get("/")
        response = await http.get("/")
    assert isinstance(recorder.asked[1][1], CircuitOpenError)
    assert info(response).fallback and info(response).circuit_state == "open"
    assert fallbacks(harness, "circuit_open") == 1 and fallbacks(harness, "server_error") == 1


async def test_re_raising_declines(harness: Harness) -> None:
    """A fallback that re-raises lets the original error through, with its CallInfo, uncounted."""
    recorder = Recorder(answer=None)
    async with client(harness, Script(httpx.ConnectError), recorder) as http:
        with pytest.raises(httpx.ConnectError) as caught:
            await http.get("/")
    assert not info(caught.value).fallback and info(caught.value).attempts == 1
    assert fallbacks(harness, "error") is None
    assert harness.value("resilient_http_requests_total", outcome="error") == 1


async def test_returning_the_failing_response_declines(harness: Harness) -> None:
    """A fallback that returns the response it was given passes it on, unmarked and open for reading."""
    recorder = Recorder(answer=None)
    async with client(harness, Script(502), recorder) as http:
        response = await http.get("/")
    assert response.status_code == 502 and not info(response).fallback
    assert fallbacks(harness, "server_error") is None
    assert harness.value("resilient_http_requests_total", outcome="5xx") == 1


async def test_the_fallback_s_own_errors_propagate(harness: Harness) -> None:
    """An exception the fallback raises reaches the caller as it is, the failure as its context, with CallInfo."""
    recorder = Recorder(error=RuntimeError("fallback broke"))
    async with client(harness, Script(httpx.ConnectError), recorder) as http:
        with pytest.raises(RuntimeError, match="fallback broke") as caught:
            await http.get("/")
    assert isinstance(caught.value.__context__, httpx.ConnectError)
    assert info(caught.value).attempts == 1
    assert harness.value("resilient_http_requests_total", outcome="error") == 1


async def test_a_fallback_that_returns_no_response_is_an_error(harness: Harness) -> None:
    """Returning anything but a response raises TypeError naming what came back."""
    async with client(harness, Script(500), lambda request, failure, info: None) as http:
        with pytest.raises(TypeError, match="returned None"):
            await http.get("/")


async def test_the_fallback_is_not_asked_about_answers(harness: Harness) -> None:
    """Successes, client errors and other statuses are answers: the fallback never sees them."""
    recorder = Recorder()
    async with client(harness, Script(200, 404, 501, 429), recorder) as http:
        statuses = [(await http.get("/")).status_code for _ in range(4)]
    assert statuses == [200, 404, 501, 429]
    assert recorder.asked == []


async def test_a_stale_answer_comes_before_the_fallback(harness: Harness) -> None:
    """The stale cache answers first; the fallback is asked only when it has nothing."""
    recorder = Recorder()
    policy = only(stale_cache=StaleCachePolicy())
    async with client(harness, Script(200, 503), recorder, policy) as http:
        await http.get("/a")
        stale = await http.get("/a")
        fallen = await http.get("/b")
    assert info(stale).stale and not info(stale).fallback
    assert info(fallen).fallback and len(recorder.asked) == 1


async def test_a_cancelled_call_is_never_given_to_the_fallback(harness: Harness) -> None:
    """Cancellation passes through: the fallback is not called, and the call counts as cancelled."""
    entered = anyio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        entered.set()
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    recorder = Recorder()
    async with client(harness, handler, recorder) as http:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(http.get, "/")
                await entered.wait()
                tg.cancel_scope.cancel()
    assert recorder.asked == []
    assert harness.value("resilient_http_requests_total", outcome="cancelled") == 1


async def test_a_cancelled_fallback_closes_the_failing_response(harness: Harness) -> None:
    """Cancelled while the fallback runs, the transport still closes the response it was deciding about."""
    closed: list[bool] = []
    entered = anyio.Event()

    class Body(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b""

        async def aclose(self) -> None:
            closed.append(True)

    async def fallback(request: httpx.Request, failure: Exception | httpx.Response, info: CallInfo) -> httpx.Response:
        entered.set()
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async with client(harness, lambda request: httpx.Response(500, stream=Body()), fallback) as http:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(http.get, "/")
                await entered.wait()
                tg.cancel_scope.cancel()
    assert closed == [True]


def test_a_fallback_must_be_callable(registry: CollectorRegistry, clock: FakeClock) -> None:
    """A fallback that is not a function is refused at construction."""
    with pytest.raises(ConfigurationError, match=r"fallback: must be a function .* \(got 'default'\)"):
        ResilientTransport(registry=registry, clock=clock, fallback="default")  # type: ignore[arg-type]


async def test_a_resilient_client_takes_a_fallback(registry: CollectorRegistry, clock: FakeClock) -> None:
    """ResilientClient(fallback=...) gives it to its transport."""
    mock = httpx.MockTransport(Script(httpx.ConnectError))
    async with ResilientClient(
        default=only(), registry=registry, clock=clock, mounts={"all://": mock}, fallback=Recorder(answer=299)
    ) as http:
        response = await http.get(f"{BASE_URL}/")
    assert response.status_code == 299 and info(response).fallback
