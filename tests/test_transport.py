"""The transport: what every response carries, per-call overrides, closing, exceptions, timeouts, and trio."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import anyio
import httpx
import pytest
from conftest import HOST, Harness, Script, only
from prometheus_client import CollectorRegistry

from resilient_http import (
    BulkheadFullError,
    CallInfo,
    CircuitBreakerPolicy,
    CircuitOpenError,
    ConfigurationError,
    DeadlineExceededError,
    Policy,
    RateLimitedError,
    RejectedError,
    ResilienceError,
    ResilientTransport,
    RetryPolicy,
    TimeoutPolicy,
    call_info,
)
from resilient_http.testing import FakeClock

PLAIN = RetryPolicy(attempts=3, budget=None)
OPENS_AT_ONCE = CircuitBreakerPolicy(minimum_calls=1, failure_ratio=1.0)


def _info(response: httpx.Response) -> CallInfo:
    info = response.extensions["resilient_http"]
    assert isinstance(info, CallInfo)
    return info


# What every response carries


@pytest.mark.parametrize("steps", [(200,), (404,), (503, 200), (503,)], ids=["200", "404", "retried", "exhausted"])
async def test_every_response_carries_a_frozen_call_info(harness: Harness, steps: tuple[int, ...]) -> None:
    """Whatever the outcome, response.extensions["resilient_http"] is a frozen CallInfo for the host."""
    response = await harness.client(Script(*steps), Policy()).get("/")
    info = _info(response)
    assert info.host == HOST
    assert info.attempts >= 1
    with pytest.raises(AttributeError):
        info.attempts = 99  # type: ignore[misc]


async def test_call_info_belongs_to_one_call(harness: Harness) -> None:
    """Each call gets its own record; a retried call does not leak its waits into the next."""
    client = harness.client(Script(503, 200), only(retry=PLAIN))
    first, second = _info(await client.get("/")), _info(await client.get("/"))
    assert (first.attempts, len(first.waits)) == (2, 1)
    assert (second.attempts, second.waits) == (1, ())


async def test_a_failed_call_carries_its_story_on_the_exception(harness: Harness) -> None:
    """call_info() reads the CallInfo off an exception as off a response: attempts, waits and why it stopped."""
    client = harness.client(Script(httpx.ConnectError), only(retry=PLAIN))
    with pytest.raises(httpx.ConnectError) as caught:
        await client.get("/")
    info = call_info(caught.value)
    assert info is not None
    assert (info.host, info.attempts, len(info.waits), info.retry_stop) == (HOST, 3, 2, "attempts")
    response = await harness.client(Script(200), only()).get("/")
    assert call_info(response) == response.extensions["resilient_http"]
    assert call_info(ValueError("not ours")) is None


async def test_ipv6_hosts_are_labelled_with_brackets(harness: Harness) -> None:
    """An IPv6 host's label is ``[addr]:port``, so the port cannot be read as part of the address."""
    response = await harness.client(Script(200), only()).get("http://[::1]:8080/")
    assert _info(response).host == "[::1]:8080"


async def test_the_response_knows_its_request(harness: Harness) -> None:
    """response.request is the request that was sent (httpx leaves it unset inside a transport)."""
    response = await harness.client(Script(200), Policy()).get("/items?page=2")
    assert response.request.url == "https://api.example.com/items?page=2"


async def test_calls_with_nothing_to_tell_share_one_call_info_and_the_others_get_their_own(harness: Harness) -> None:
    """A first try that waited for nothing shares its host's CallInfo; a retried call, or a noted one, has its own."""
    client = harness.client(Script(200, 200, 503, 200), only(retry=PLAIN))
    first, second, retried = [_info(await client.get("/")) for _ in range(3)]
    assert first is second and first == CallInfo(HOST, 1)
    assert (retried.attempts, len(retried.waits)) == (2, 1)
    post = harness.client(Script(503), only(retry=PLAIN))
    refused = _info(await post.post("/"))  # one try, but the retry layer noted why it stopped
    assert (refused.attempts, refused.retry_stop) == (1, "not_idempotent")


OFF = only()


async def test_a_host_with_every_layer_off_counts_each_call_and_its_try(harness: Harness) -> None:
    """Without any layer the call goes straight to the network, and is still counted as a call and as a try."""
    client = harness.client(Script(200, 503, httpx.ConnectError), OFF)
    ok = await client.get("/")
    assert _info(ok) == CallInfo(HOST, 1) and ok.request.url.path == "/"
    assert (await client.get("/")).status_code == 503
    with pytest.raises(httpx.ConnectError) as caught:
        await client.get("/")
    assert call_info(caught.value) == CallInfo(HOST, 1)
    for outcome, count in (("2xx", 1.0), ("5xx", 1.0), ("error", 1.0)):
        assert harness.value("resilient_http_requests_total", outcome=outcome) == count, outcome
        assert harness.value("resilient_http_attempts_total", outcome=outcome) == count, outcome
    assert harness.value("resilient_http_request_duration_seconds_count") == 3.0
    assert harness.value("resilient_http_attempt_duration_seconds_count") == 3.0


async def test_a_cancelled_call_on_a_host_with_every_layer_off_is_counted_and_leaves_the_host(
    harness: Harness,
) -> None:
    """Cancelled while the network holds it: counted cancelled, and the host no longer has it in flight."""
    entered = anyio.Event()

    async def hang(request: httpx.Request) -> httpx.Response:
        entered.set()
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    transport = harness.transport(hang, OFF)
    async with httpx.AsyncClient(transport=transport, base_url="https://api.example.com") as client:
        async with anyio.create_task_group() as group:
            group.start_soon(client.get, "/")
            await entered.wait()
            group.cancel_scope.cancel()
        assert harness.value("resilient_http_requests_total", outcome="cancelled") == 1.0
        assert harness.value("resilient_http_attempts_total", outcome="cancelled") == 1.0
    assert [host.calls for host in transport._hosts.values()] == [0]


async def test_one_host_however_its_urls_spell_it(harness: Harness) -> None:
    """Names that differ in case, a trailing dot or a default port share one host entry and its state."""
    transport = harness.transport(Script(200, 200, 200, 200), OFF)
    async with httpx.AsyncClient(transport=transport) as client:
        for url in ("https://api.example.com/", "https://API.example.com./", "https://api.example.com:443/"):
            assert _info(await client.get(url)).host == HOST
        assert _info(await client.get("http://api.example.com/")).host == "api.example.com:80"
    assert sorted(host.label for host in transport._hosts.values()) == ["api.example.com:443", "api.example.com:80"]


# Per-call overrides


async def test_a_call_can_turn_retries_off(harness: Harness) -> None:
    """extensions={"resilient_http": {"retry": None}} makes exactly one attempt."""
    script = Script(503, 200)
    response = await harness.client(script, only(retry=PLAIN)).get("/", extensions={"resilient_http": {"retry": None}})
    assert response.status_code == 503
    assert script.calls == 1


async def test_a_call_can_replace_the_retry_policy(harness: Harness) -> None:
    """A RetryPolicy in the extensions replaces the host's for that call only."""
    script = Script(503)
    client = harness.client(script, only(retry=PLAIN))
    five = RetryPolicy(attempts=5, budget=None)
    await client.get("/", extensions={"resilient_http": {"retry": five}})
    assert script.calls == 5
    await client.get("/")  # the host's own policy is untouched
    assert script.calls == 8


async def test_a_call_can_tighten_its_timeouts(harness: Harness) -> None:
    """A tighter TimeoutPolicy gives the call a shorter total deadline: a wait that no longer fits is not made."""
    script = Script((503, {"Retry-After": "10"}), (503, {"Retry-After": "10"}), 200)
    client = harness.client(script, only(retry=PLAIN, timeout=TimeoutPolicy(attempt=10, total=30)))
    tight = TimeoutPolicy(attempt=1, total=5)
    response = await client.get("/", extensions={"resilient_http": {"timeout": tight}})
    assert (response.status_code, _info(response).retry_stop, harness.clock.sleeps) == (503, "deadline", [])
    response = await client.get("/")  # the host's 30 s leave room for the wait
    assert response.status_code == 200
    assert harness.clock.sleeps[0] >= 10


@pytest.mark.parametrize("priority", ["critical", "high", "normal", "low"])
async def test_a_call_can_set_its_priority(harness: Harness, priority: str) -> None:
    """Each documented priority is accepted with the default policy."""
    response = await harness.client(Script(200), Policy()).get(
        "/", extensions={"resilient_http": {"priority": priority}}
    )
    assert response.status_code == 200


async def test_a_call_can_turn_the_breaker_off(harness: Harness) -> None:
    """A call that must go out can skip an open circuit with {"circuit_breaker": None}."""
    script = Script(503, 200)
    client = harness.client(script, only(circuit_breaker=OPENS_AT_ONCE))
    await client.get("/")
    with pytest.raises(CircuitOpenError):
        await client.get("/")
    response = await client.get("/", extensions={"resilient_http": {"circuit_breaker": None}})
    assert response.status_code == 200
    assert _info(response).circuit_state is None
    with pytest.raises(CircuitOpenError):  # the circuit itself is still open for everyone else
        await client.get("/")


async def test_a_call_can_turn_every_layer_off(harness: Harness) -> None:
    """With every layer off the call goes straight to the network."""
    script = Script(503)
    off = {name: None for name in ("timeout", "retry", "circuit_breaker", "rate_limit", "bulkhead", "stale_cache")}
    response = await harness.client(script, Policy()).get("/", extensions={"resilient_http": off})
    assert (response.status_code, script.calls, _info(response).attempts) == (503, 1, 1)


async def test_a_whole_policy_can_be_given_for_one_call(harness: Harness) -> None:
    """A Policy in the extensions replaces the host's for that call, within the same rules as a mapping."""
    script = Script(503)
    client = harness.client(script, only(retry=PLAIN, circuit_breaker=CircuitBreakerPolicy()))
    override = only(retry=RetryPolicy(attempts=2, budget=None), circuit_breaker=CircuitBreakerPolicy())
    await client.get("/", extensions={"resilient_http": override})
    assert script.calls == 2


async def test_a_whole_policy_cannot_add_a_layer_the_host_does_not_have(harness: Harness) -> None:
    """Per-host layers (breaker, bulkhead...) cannot be switched on for one call: ConfigurationError, not a crash."""
    script = Script(200)
    client = harness.client(script, only(retry=PLAIN))
    with pytest.raises(ConfigurationError, match="circuit_breaker"):
        await client.get("/", extensions={"resilient_http": only(circuit_breaker=CircuitBreakerPolicy())})
    assert script.calls == 0


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("fast", 'extensions["resilient_http"]'),
        ({"retries": None}, "retries"),
        ({"retry": 3}, '["retry"]'),
        ({"retry": TimeoutPolicy()}, '["retry"]'),
        ({"timeout": 5.0}, '["timeout"]'),
        ({"circuit_breaker": CircuitBreakerPolicy()}, '["circuit_breaker"]'),
        ({"bulkhead": True}, '["bulkhead"]'),
        ({"priority": "urgent"}, '["priority"]'),
        ({"priority": None}, '["priority"]'),
    ],
    ids=lambda value: repr(value)[:40],
)
async def test_bad_overrides_raise_before_anything_is_sent(harness: Harness, override: Any, named: str) -> None:
    """A malformed override is a ConfigurationError naming what is wrong, and the network is never touched."""
    script = Script(200)
    with pytest.raises(ConfigurationError) as caught:
        await harness.client(script, Policy()).get("/", extensions={"resilient_http": override})
    assert named in str(caught.value)
    assert script.calls == 0


# Closing


class ClosingTransport(httpx.MockTransport):
    """A mock inner transport that records how it is opened and closed."""

    def __init__(self) -> None:
        super().__init__(lambda request: httpx.Response(200))
        self.events: list[str] = []

    async def __aenter__(self) -> ClosingTransport:
        self.events.append("enter")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        self.events.append("exit")

    async def aclose(self) -> None:
        self.events.append("aclose")


async def test_aclose_closes_the_inner_transport() -> None:
    """Closing the transport (or the client around it) closes the transport that does the I/O."""
    inner = ClosingTransport()
    transport = ResilientTransport(inner=inner, registry=CollectorRegistry())
    async with httpx.AsyncClient(transport=transport) as client:
        await client.get("https://api.example.com/")
    assert inner.events == ["enter", "exit"]
    inner.events.clear()
    await transport.aclose()
    assert inner.events == ["aclose"]


async def test_the_transport_is_an_async_context_manager() -> None:
    """`async with ResilientTransport(...)` enters and exits the inner transport."""
    inner = ClosingTransport()
    async with ResilientTransport(inner=inner, registry=CollectorRegistry()) as transport:
        assert isinstance(transport, ResilientTransport)
    assert inner.events == ["enter", "exit"]


# Exceptions


def test_every_runtime_error_is_an_httpx_transport_error() -> None:
    """Existing `except httpx.TransportError` / `except httpx.HTTPError` code keeps working."""
    for kind in (ResilienceError, RejectedError, CircuitOpenError, RateLimitedError, BulkheadFullError):
        assert issubclass(kind, httpx.TransportError)
    for kind in (CircuitOpenError, RateLimitedError, BulkheadFullError):
        assert issubclass(kind, RejectedError)
    assert issubclass(DeadlineExceededError, ResilienceError)
    assert issubclass(DeadlineExceededError, httpx.TimeoutException)
    assert not issubclass(DeadlineExceededError, RejectedError)
    assert issubclass(ConfigurationError, ValueError)
    assert not issubclass(ConfigurationError, httpx.HTTPError)


def test_rejections_carry_their_host_and_retry_after() -> None:
    """A rejection says which host refused and when trying again is worth it."""
    exc = RateLimitedError("slow down", host=HOST, retry_after=1.5)
    assert (exc.host, exc.retry_after, str(exc)) == (HOST, 1.5, "slow down")
    assert BulkheadFullError("full", host=HOST).retry_after is None


async def test_an_open_circuit_is_caught_as_an_http_error(harness: Harness) -> None:
    """CircuitOpenError raised through a real client call is caught by `except httpx.HTTPError`."""
    client = harness.client(Script(503), only(circuit_breaker=OPENS_AT_ONCE))
    await client.get("/")
    caught: httpx.HTTPError | None = None
    try:
        await client.get("/")
    except httpx.HTTPError as exc:
        caught = exc
    assert isinstance(caught, CircuitOpenError)


# Timeouts


async def _hang_first(request: httpx.Request, answered: list[int]) -> httpx.Response:
    answered.append(1)
    if len(answered) == 1:
        await anyio.Event().wait()  # never set: only the timeout ends this attempt
    return httpx.Response(200)


async def test_a_per_attempt_timeout_fires_and_the_attempt_is_retried(harness: Harness) -> None:
    """An attempt stuck past `attempt` seconds is cut off (really, on the event loop's clock) and tried again."""
    answered: list[int] = []
    policy = only(retry=PLAIN, timeout=TimeoutPolicy(attempt=0.05, total=5))
    client = harness.client(Script(lambda request: _hang_first(request, answered)), policy)
    started = time.monotonic()
    response = await client.get("/")
    assert time.monotonic() - started < 2
    assert response.status_code == 200
    info = _info(response)
    assert (info.attempts, [wait.reason for wait in info.waits]) == (2, ["backoff"])
    assert harness.value("resilient_http_timeouts_total", kind="attempt") == 1
    assert harness.value("resilient_http_attempts_total", outcome="timeout") == 1
    assert harness.value("resilient_http_retries_total", reason="timeout") == 1


async def test_a_per_attempt_timeout_is_an_httpx_timeout(harness: Harness) -> None:
    """When the timed-out attempt may not be retried, DeadlineExceededError(kind="attempt") is raised as a timeout."""
    answered: list[int] = []
    policy = only(retry=PLAIN, timeout=TimeoutPolicy(attempt=0.05, total=5))
    client = harness.client(Script(lambda request: _hang_first(request, answered)), policy)
    with pytest.raises(httpx.TimeoutException) as caught:
        await client.post("/", content=b"once")
    assert isinstance(caught.value, DeadlineExceededError)
    assert (caught.value.kind, caught.value.timeout) == ("attempt", 0.05)
    assert len(answered) == 1
    assert harness.value("resilient_http_requests_total", outcome="timeout") == 1


async def test_httpx_implicit_default_timeouts_are_dropped_for_the_policy(harness: Harness) -> None:
    """httpx's implicit 5 s per operation becomes None for the attempt, so it cannot cut an attempt short."""
    seen: list[Any] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(dict(request.extensions["timeout"]))
        return httpx.Response(200)

    client = harness.client(Script(record), only(timeout=TimeoutPolicy()))
    await client.get("/")
    assert seen == [{"connect": None, "read": None, "write": None, "pool": None}]


class BrokenBody(httpx.AsyncByteStream):
    """A body that announces its length, then breaks off before its first bytes."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        raise httpx.ReadError("connection reset while reading the body")
        yield b""  # pragma: no cover


async def test_a_small_body_is_waited_for_inside_the_attempt_so_its_errors_are_retried(harness: Harness) -> None:
    """A small body that breaks off before its first bytes is an attempt failure the retry layer sees."""
    script = Script(lambda r: httpx.Response(200, headers={"Content-Length": "8"}, stream=BrokenBody()), 200)
    response = await harness.client(script, only(retry=PLAIN, timeout=TimeoutPolicy())).get("/")
    assert response.status_code == 200
    assert script.calls == 2
    assert harness.value("resilient_http_retries_total", reason="network_error") == 1


class EndlessBody(httpx.AsyncByteStream):
    """A streamed body whose next chunk never comes."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"first"
        await anyio.sleep_forever()
        yield b""  # pragma: no cover


async def test_with_stream_total_the_total_deadline_bounds_a_streamed_body(harness: Harness) -> None:
    """With stream_total, a body still trickling past the total deadline raises DeadlineExceededError("total")."""
    clock = harness.clock

    def late(request: httpx.Request) -> httpx.Response:
        clock.advance(3)  # the headers arrive with the deadline already spent
        return httpx.Response(200, stream=EndlessBody())

    client = harness.client(Script(late), only(timeout=TimeoutPolicy(attempt=1, total=2, stream_total=True)))
    async with client.stream("GET", "/") as response:
        with pytest.raises(DeadlineExceededError) as caught:
            await response.aread()
    assert caught.value.kind == "total"
    assert harness.value("resilient_http_timeouts_total", kind="total") == 1


class ChunkedBody(httpx.AsyncByteStream):
    """A streamed body that arrives in a few chunks, yielding to the event loop between them."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in (b"a", b"b", b"c"):
            await anyio.lowlevel.checkpoint()
            yield chunk


async def test_a_streamed_body_within_the_deadline_is_read_whole(harness: Harness) -> None:
    """The deadline wrapper passes every chunk through while there is time left."""
    client = harness.client(Script(lambda r: httpx.Response(200, stream=ChunkedBody())), only(timeout=TimeoutPolicy()))
    assert (await client.get("/")).content == b"abc"


# Trio


def test_the_same_calls_work_under_trio() -> None:
    """Timeouts, backoff, the breaker and cancellation use no asyncio-only primitive: they run under trio."""

    async def main() -> None:
        registry = CollectorRegistry()
        answered: list[int] = []
        harness = Harness(registry, FakeClock())
        policy = only(retry=PLAIN, timeout=TimeoutPolicy(attempt=0.05, total=5), circuit_breaker=OPENS_AT_ONCE)
        client = harness.client(Script(lambda request: _hang_first(request, answered)), policy)
        response = await client.get("/")  # the first attempt times out, the second answers
        assert (response.status_code, _info(response).attempts) == (200, 2)
        assert harness.value("resilient_http_timeouts_total", kind="attempt") == 1

        script = Script((503, {"Retry-After": "1"}), 503, 503)
        other = harness.client(script, policy)
        slept = len(harness.clock.sleeps)
        response = await other.get("https://other.example/")
        assert (response.status_code, script.calls) == (503, 3)
        assert harness.clock.sleeps[slept] >= 1
        with pytest.raises(CircuitOpenError):
            await other.get("https://other.example/")

        # The system clock's sleep goes through anyio as well.
        real = ResilientTransport(
            default=only(retry=RetryPolicy(backoff=0.001, max_backoff=0.001, budget=None)),
            inner=httpx.MockTransport(Script(503, 200)),
            registry=registry,
            name="real",  # the harness's first transport is "default"
        )
        async with httpx.AsyncClient(transport=real) as real_client:
            assert (await real_client.get("https://real.example/")).status_code == 200

        with anyio.move_on_after(0.05) as scope:
            await harness.client(Script(lambda request: _hang_first(request, [])), only()).get("/")
        assert scope.cancelled_caught
        await harness.aclose()

    anyio.run(main, backend="trio")
