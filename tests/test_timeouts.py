"""Timeouts without a socket: httpx's classes, the caller's timeouts, redirects, loops and bookkeeping."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from conftest import Harness, Script, only
from prometheus_client import CollectorRegistry

import resilient_http._deadline
from resilient_http import (
    ConfigurationError,
    ConnectDeadlineExceededError,
    DeadlineExceededError,
    Policy,
    PoolDeadlineExceededError,
    ReadDeadlineExceededError,
    ResilienceError,
    ResilientTransport,
    RetryPolicy,
    TimeoutPolicy,
    WriteDeadlineExceededError,
    call_info,
)

QUICK = RetryPolicy(attempts=2, backoff=0.001, max_backoff=0.001, budget=None)


def stall_in(phase: str) -> Any:
    """A handler that asks for ``phase``'s timeout, as httpcore does when it starts that operation, then hangs."""

    async def handler(request: httpx.Request) -> httpx.Response:
        request.extensions["timeout"].get(phase)
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    return handler


# -- the classes ---------------------------------------------------------------


def test_each_phase_class_is_a_deadline_error_and_httpx_s_own_timeout() -> None:
    """`except httpx.ConnectTimeout` and `except DeadlineExceededError` both catch a policy's connect timeout."""
    pairs = [
        (ConnectDeadlineExceededError, httpx.ConnectTimeout),
        (PoolDeadlineExceededError, httpx.PoolTimeout),
        (WriteDeadlineExceededError, httpx.WriteTimeout),
        (ReadDeadlineExceededError, httpx.ReadTimeout),
    ]
    for ours, theirs in pairs:
        assert issubclass(ours, DeadlineExceededError)
        assert issubclass(ours, theirs)
        assert issubclass(ours, ResilienceError)


@pytest.mark.parametrize(
    ("phase", "kind"),
    [
        ("connect", ConnectDeadlineExceededError),
        ("pool", PoolDeadlineExceededError),
        ("write", WriteDeadlineExceededError),
        ("read", ReadDeadlineExceededError),
    ],
)
async def test_an_attempt_timeout_is_raised_as_the_class_of_the_stalled_operation(
    harness: Harness, phase: str, kind: type[DeadlineExceededError]
) -> None:
    """The operation the inner transport last asked a timeout for names the class; kind and value stay the policy's."""
    client = harness.client(stall_in(phase), only(timeout=TimeoutPolicy(attempt=0.05, total=5)))
    with pytest.raises(DeadlineExceededError) as caught:
        await client.post("/", content=b"x")
    assert type(caught.value) is kind
    assert (caught.value.kind, caught.value.timeout) == ("attempt", 0.05)
    info = call_info(caught.value)
    assert info is not None and info.attempts == 1


async def test_an_inner_transport_that_asks_nothing_gets_the_base_class(harness: Harness) -> None:
    """When no operation is known (a transport that ignores httpx's timeouts), the base class is raised."""

    async def hang(request: httpx.Request) -> httpx.Response:
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    client = harness.client(hang, only(timeout=TimeoutPolicy(attempt=0.05, total=5)))
    with pytest.raises(DeadlineExceededError) as caught:
        await client.get("/")
    assert type(caught.value) is DeadlineExceededError


@pytest.mark.parametrize("phase", ["connect", "pool"])
async def test_a_connect_or_pool_timeout_is_retried_for_a_post(harness: Harness, phase: str) -> None:
    """Nothing was sent, so a POST without an Idempotency-Key is tried again, as the README promises."""
    script = Script(stall_in(phase), 200)
    client = harness.client(script, only(timeout=TimeoutPolicy(attempt=0.05, total=5), retry=QUICK))
    response = await client.post("/", content=b"once")
    assert response.status_code == 200
    assert script.calls == 2
    assert harness.value("resilient_http_retries_total", reason="connect_error") == 1


async def test_a_read_timeout_of_a_post_is_not_retried(harness: Harness) -> None:
    """A stall after sending may have reached the server: a POST is not tried again."""
    script = Script(stall_in("read"), 200)
    client = harness.client(script, only(timeout=TimeoutPolicy(attempt=0.05, total=5), retry=QUICK))
    with pytest.raises(ReadDeadlineExceededError):
        await client.post("/", content=b"once")
    assert script.calls == 1


# -- the caller's timeouts -----------------------------------------------------


def recorder(seen: list[dict[str, Any]]) -> Any:
    def record(request: httpx.Request) -> httpx.Response:
        seen.append(dict(request.extensions["timeout"]))
        return httpx.Response(200)

    return record


async def test_an_explicit_client_timeout_reaches_the_inner_transport(harness: Harness) -> None:
    """client.get(url, timeout=0.5) keeps its per-operation meaning inside the attempt."""
    seen: list[dict[str, Any]] = []
    client = harness.client(Script(recorder(seen)), only(timeout=TimeoutPolicy()))
    await client.get("/", timeout=httpx.Timeout(0.5, connect=0.25))
    assert seen == [{"connect": 0.25, "read": 0.5, "write": 0.5, "pool": 0.5}]


async def test_the_caller_s_request_extensions_are_not_touched(harness: Harness) -> None:
    """The attempt derives its own extensions: the request httpx gave keeps its timeout dict, same object and value."""
    given: dict[str, Any] = {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}
    request = httpx.Request("GET", "https://api.example.com/", extensions={"timeout": given})
    transport = harness.transport(Script(200), only(timeout=TimeoutPolicy()))
    response = await transport.handle_async_request(request)
    assert response.request is request
    assert request.extensions["timeout"] is given
    assert given == {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}


async def test_a_redirect_to_another_host_keeps_the_caller_s_timeout(harness: Harness) -> None:
    """A 302 to a host without a policy timeout gets the client's timeout, not the first host's None."""
    seen: list[tuple[str, dict[str, Any]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.host, dict(request.extensions["timeout"])))
        if request.url.host == "api.example.com":
            return httpx.Response(302, headers={"Location": "https://other.example/landing"})
        return httpx.Response(200)

    policies = {"other.example": only(timeout=None)}
    client = harness.client(handler, only(timeout=TimeoutPolicy()), policies=policies)
    response = await client.get("/", timeout=0.5, follow_redirects=True)
    assert response.status_code == 200
    assert seen[1] == ("other.example", {"connect": 0.5, "read": 0.5, "write": 0.5, "pool": 0.5})


async def test_a_redirect_to_another_host_gets_that_host_s_policy_timeout(harness: Harness) -> None:
    """The redirected request is bounded by the other host's own attempt timeout."""

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "api.example.com":
            return httpx.Response(302, headers={"Location": "https://other.example/landing"})
        request.extensions["timeout"].get("read")
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    policies = {"other.example": only(timeout=TimeoutPolicy(attempt=0.05, total=1))}
    client = harness.client(handler, only(timeout=TimeoutPolicy(attempt=None, total=None)), policies=policies)
    with anyio.fail_after(5):
        with pytest.raises(ReadDeadlineExceededError) as caught:
            await client.get("/", follow_redirects=True)
    assert caught.value.timeout == 0.05


# -- the policy ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"idle": 0}, "TimeoutPolicy.idle"),
        ({"idle": "1"}, "TimeoutPolicy.idle"),
        ({"stream_total": 1}, "TimeoutPolicy.stream_total"),
    ],
)
def test_bad_body_bounds_are_refused_at_construction(fields: dict[str, Any], field: str) -> None:
    """idle must be a positive number of seconds or None; stream_total a bool."""
    with pytest.raises(ConfigurationError) as caught:
        TimeoutPolicy(**fields)
    assert caught.value.field == field


# -- what the timers leave behind ----------------------------------------------


class Flowing(httpx.AsyncByteStream):
    """``count`` chunks, each after a trip through the event loop."""

    def __init__(self, count: int) -> None:
        self.count = count

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.count):
            await anyio.lowlevel.checkpoint()
            yield b"x"


async def test_timer_bookkeeping_does_not_grow_with_the_chunks_streamed(harness: Harness) -> None:
    """Thousands of chunks, each under the idle bound and the total deadline, leave no timer state behind."""
    policy = only(timeout=TimeoutPolicy(attempt=10, total=30, idle=10, stream_total=True))

    async def stream(count: int) -> None:
        client = harness.client(Script(lambda request: httpx.Response(200, stream=Flowing(count))), policy)
        async with client.stream("GET", "/") as response:
            async for _ in response.aiter_raw():
                pass

    await stream(100)
    gc.collect()
    before = len(gc.get_objects())
    await stream(5000)
    gc.collect()
    assert len(gc.get_objects()) - before < 1000


def test_no_event_loop_outlives_asyncio_run() -> None:
    """After asyncio.run, nothing resilient_http keeps holds the loop: timed-out, answered and streamed calls alike."""
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def main() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))

        async def handler(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/hang":
                await anyio.sleep_forever()
            return httpx.Response(200, stream=Flowing(3))

        transport = ResilientTransport(
            default=Policy(timeout=TimeoutPolicy(attempt=0.01, total=60), retry=None),
            inner=httpx.MockTransport(handler),
            registry=CollectorRegistry(),
        )
        async with httpx.AsyncClient(transport=transport, base_url="https://api.example.com") as client:
            assert (await client.get("/")).content == b"xxx"
            with pytest.raises(DeadlineExceededError):
                await client.get("/hang")

    asyncio.run(main())
    gc.collect()
    assert loops[0]() is None


async def test_the_implicit_default_does_not_cut_an_attempt_short(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client timeout equal to httpx's implicit default is dropped: the inner transport sees no httpx timeout."""
    monkeypatch.setattr(resilient_http._deadline, "IMPLICIT", httpx.Timeout(0.05).as_dict())
    seen: list[dict[str, Any]] = []
    client = harness.client(Script(recorder(seen)), only(timeout=TimeoutPolicy()))
    await client.get("/", timeout=0.05)
    await client.get("/", timeout=0.06)
    assert seen == [
        dict.fromkeys(("connect", "read", "write", "pool")),
        dict.fromkeys(("connect", "read", "write", "pool"), 0.06),
    ]
