"""The real OpenAI and Anthropic SDK clients over resilient_http, against a local server playing their APIs.

The SDKs' own retries are off (``max_retries=0``) and resilient_http does
them: every request the server sees carries ``x-stainless-retry-count: 0``.
These SDKs send POSTs without an ``Idempotency-Key``, so a 429 is retried
(the server refused to act) and a 5xx, a hang or a reset only when the
policy declares the host's POSTs safe (``RetryPolicy(methods={"POST"})``).
What the SDK finally sees is what bare httpx2 would have given it.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import pytest
from flaky_server import Behaviour, FlakyServer, close, hang, reset
from llm_api import APIS, Api, sdk_client

from resilient_http.httpx2 import CircuitBreakerPolicy, CircuitOpenError, Policy, RetryPolicy, TimeoutPolicy

pytestmark = pytest.mark.parametrize("api", APIS, ids=lambda api: api.name)


def policy(attempt: float = 2.0, methods: Collection[str] = ()) -> Policy:
    """The default layers, with short backoffs so that only the server's own waits take time."""
    return Policy(
        timeout=TimeoutPolicy(attempt=attempt, total=10.0),
        retry=RetryPolicy(attempts=3, backoff=0.01, max_backoff=0.05, methods=methods),
    )


#: The host's POSTs declared safe to repeat (an LLM completion has no effect but its cost).
SAFE_POSTS = frozenset({"POST"})


def assert_resent_by_resilient_http(server: FlakyServer, api: Api, count: int) -> None:
    """``count`` identical keyless POSTs reached the server, none of them a retry of the SDK's own."""
    seen = server.requests_to(api.path)
    assert len(seen) == count
    assert {(request.method, request.body) for request in seen} == {("POST", seen[0].body)}
    assert all("idempotency-key" not in request.headers for request in seen)
    assert [request.headers["x-stainless-retry-count"] for request in seen] == ["0"] * count


# 429: retried for every method, never before the server's time


@pytest.mark.parametrize(
    "headers",
    [
        {"Retry-After": "1"},
        {"RateLimit": '"requests";r=0;t=1', "RateLimit-Policy": '"requests";q=60;w=60'},
    ],
    ids=["retry-after", "ratelimit"],
)
async def test_a_429_is_waited_out_and_the_sdk_sees_the_answer(api: Api, headers: dict[str, str]) -> None:
    """A keyless POST refused with 429 is sent again once the server's second is over; the SDK gets the answer."""
    async with FlakyServer() as server, sdk_client(api, server, policy()) as client:
        server.queue(api.path, api.error(429, headers), api.answer("hello"))
        assert await api.complete(client) == "hello"
    assert_resent_by_resilient_http(server, api, 2)
    first, second = server.requests_to(api.path)
    assert second.arrived - first.arrived >= 1.0


async def test_when_429s_run_out_the_sdk_sees_the_last_one(api: Api) -> None:
    """After `attempts` 429s the SDK raises its rate-limit error, with the server's headers and message."""
    async with FlakyServer() as server, sdk_client(api, server, policy()) as client:
        server.default(api.path, api.error(429, {"Retry-After": "0"}, message="quota"))
        with pytest.raises(api.status_error) as caught:
            await api.complete(client)
    assert caught.value.status_code == 429  # type: ignore[attr-defined]
    assert "quota" in str(caught.value)
    assert caught.value.response.headers["retry-after"] == "0"  # type: ignore[attr-defined]
    assert_resent_by_resilient_http(server, api, 3)


# Overload, hangs and resets: retried once the host's POSTs are declared safe


async def test_an_overloaded_answer_reaches_the_sdk_unless_posts_are_declared_safe(api: Api) -> None:
    """503 (OpenAI) or 529 (Anthropic) to a keyless POST: the SDK's error by default, retried with methods={"POST"}."""
    async with FlakyServer() as server:
        server.queue(api.path, api.error(api.overloaded), api.error(api.overloaded), api.answer("hello"))
        async with sdk_client(api, server, policy()) as client:
            with pytest.raises(api.status_error) as caught:
                await api.complete(client)
        assert caught.value.status_code == api.overloaded  # type: ignore[attr-defined]
        assert_resent_by_resilient_http(server, api, 1)
        async with sdk_client(api, server, policy(methods=SAFE_POSTS)) as client:
            assert await api.complete(client) == "hello"
        assert_resent_by_resilient_http(server, api, 3)


async def test_a_hung_attempt_is_cut_and_retried_once_posts_are_declared_safe(api: Api) -> None:
    """A server that never answers: the SDK's timeout error by default; with methods={"POST"}, the next try's answer."""
    async with FlakyServer() as server:
        server.queue(api.path, hang(), hang(), api.answer("hello"))
        async with sdk_client(api, server, policy(attempt=0.3)) as client:
            with pytest.raises(api.timeout_error):
                await api.complete(client)
        assert_resent_by_resilient_http(server, api, 1)
        async with sdk_client(api, server, policy(attempt=0.3, methods=SAFE_POSTS)) as client:
            assert await api.complete(client) == "hello"
        assert_resent_by_resilient_http(server, api, 3)


@pytest.mark.parametrize("fault", [reset(), close()], ids=["reset", "close"])
async def test_a_broken_connection_is_retried_once_posts_are_declared_safe(api: Api, fault: Behaviour) -> None:
    """A reset or a silent close after the POST was read: the SDK's connection error by default, else the answer."""
    async with FlakyServer() as server:
        server.queue(api.path, fault, fault, api.answer("hello"))
        async with sdk_client(api, server, policy()) as client:
            with pytest.raises(api.connection_error):
                await api.complete(client)
        assert_resent_by_resilient_http(server, api, 1)
        async with sdk_client(api, server, policy(methods=SAFE_POSTS)) as client:
            assert await api.complete(client) == "hello"
        assert_resent_by_resilient_http(server, api, 3)


# What the SDK sees


async def _outcome(api: Api, server: FlakyServer, chosen: Policy | None, behaviours: list[Behaviour]) -> Any:
    """What the SDK makes of ``behaviours``: the parsed answer, or its error's class, status, body and headers."""
    server.queue(api.path, *behaviours)
    async with sdk_client(api, server, chosen) as client:
        try:
            return (await api.create(client)).model_dump()
        except api.status_error as exc:
            response = exc.response  # type: ignore[attr-defined]
            headers = {key: value for key, value in response.headers.items() if key != "date"}
            return type(exc), exc.status_code, exc.body, str(exc), headers  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("script", "absorbed"),
    [
        (lambda api: [api.answer("hello", {"x-request-id": "req-1"})], 0),
        (lambda api: [api.error(400, message="bad prompt")], 0),
        (lambda api: [api.error(500, message="boom")], 0),
        (lambda api: [api.error(429, {"Retry-After": "0"}), api.answer("hello")], 1),
        (lambda api: [api.error(429, {"Retry-After": "0"}, message="quota")] * 3, 2),
    ],
    ids=["answer", "400", "500", "429-then-answer", "429-to-the-end"],
)
async def test_the_sdk_sees_what_bare_httpx2_gives_it_minus_what_was_absorbed(
    api: Api, script: Any, absorbed: int
) -> None:
    """The same parsed answer or the same error, headers and body, as over a bare httpx2 client."""
    behaviours: list[Behaviour] = script(api)
    async with FlakyServer() as server:
        resilient = await _outcome(api, server, policy(), behaviours)
        bare = await _outcome(api, server, None, behaviours[absorbed:])
        assert len(server.requests_to(api.path)) == len(behaviours) + len(behaviours) - absorbed
    assert resilient == bare


async def test_an_open_circuit_reaches_the_sdk_as_its_connection_error(api: Api) -> None:
    """A call the breaker refuses never reaches the server; the SDK wraps the CircuitOpenError it raised."""
    breaker = CircuitBreakerPolicy(minimum_calls=2, failure_ratio=0.5, break_duration=60)
    chosen = Policy(retry=None, circuit_breaker=breaker)
    async with FlakyServer() as server, sdk_client(api, server, chosen) as client:
        server.default(api.path, api.error(500))
        for _ in range(2):
            with pytest.raises(api.status_error):
                await api.complete(client)
        with pytest.raises(api.connection_error) as caught:
            await api.complete(client)
    assert isinstance(caught.value.__cause__, CircuitOpenError)
    assert len(server.requests_to(api.path)) == 2
