"""Streamed answers (server-sent events) through the real OpenAI and Anthropic SDK clients over resilient_http.

A stream is returned to the SDK once its headers arrive and flows on from
there, past ``total``, for as long as no pause exceeds ``idle``: every
event reaches the SDK in order, the stream holds its bulkhead slot (its
connection) until the SDK has read it, and a 429 before it is retried like
any other.
"""

from __future__ import annotations

import anyio
import httpx2
import pytest
from flaky_server import FlakyServer
from llm_api import APIS, Api, sdk_client

from resilient_http.httpx2 import BulkheadPolicy, Policy, RetryPolicy, TimeoutPolicy

pytestmark = pytest.mark.parametrize("api", APIS, ids=lambda api: api.name)

WORDS = ["Hello", ",", " world", "!", " How", " can", " I", " help", "?"]


def policy(total: float = 10.0, idle: float = 10.0, bulkhead: BulkheadPolicy | None = None) -> Policy:
    return Policy(
        timeout=TimeoutPolicy(attempt=min(2.0, total), total=total, idle=idle),
        retry=RetryPolicy(backoff=0.01, max_backoff=0.05),
        bulkhead=bulkhead,
    )


async def test_a_streamed_answer_reaches_the_sdk_whole_and_in_order(api: Api) -> None:
    """Every delta of the event stream, as the server sent it."""
    async with FlakyServer() as server, sdk_client(api, server, policy()) as client:
        server.queue(api.path, api.streamed(WORDS, interval=0.01))
        assert await api.stream(client) == WORDS
    [request] = server.requests_to(api.path)
    assert b'"stream": true' in request.body or b'"stream":true' in request.body


async def test_a_429_before_a_stream_is_retried_and_the_stream_flows(api: Api) -> None:
    """The refusal never reaches the SDK; the stream that follows does, whole."""
    async with FlakyServer() as server, sdk_client(api, server, policy()) as client:
        server.queue(api.path, api.error(429, {"Retry-After": "0"}), api.streamed(WORDS, interval=0.01))
        assert await api.stream(client) == WORDS
    assert len(server.requests_to(api.path)) == 2


async def test_a_stream_holds_its_bulkhead_slot_until_the_sdk_has_read_it(api: Api) -> None:
    """With one slot, a call made while a stream flows is shed; once the SDK has read it, the next call goes."""
    one = BulkheadPolicy(max_concurrent=1, max_queue=0)
    async with FlakyServer() as server, sdk_client(api, server, policy(bulkhead=one)) as client:
        server.queue(api.path, api.streamed(WORDS, interval=0.05), api.answer("second"), api.answer("third"))
        async with anyio.create_task_group() as tasks:
            streamed: list[list[str]] = []

            async def read() -> None:
                streamed.append(await api.stream(client))

            tasks.start_soon(read)
            await server.wait_for_requests(1, api.path)
            with pytest.raises(api.connection_error):
                await api.complete(client)
        assert streamed == [WORDS]
        assert await api.complete(client) == "second"
    assert len(server.requests_to(api.path)) == 2


async def test_a_stream_that_flows_past_total_reaches_the_sdk_whole(api: Api) -> None:
    """`total` bounds the call until its answer is returned, not an event stream that keeps flowing after it."""
    async with FlakyServer() as server, sdk_client(api, server, policy(total=0.5)) as client:
        server.queue(api.path, api.streamed(WORDS, interval=0.1))  # about a second of events
        assert await api.stream(client) == WORDS


async def test_a_stream_that_falls_silent_longer_than_idle_ends_in_the_sdks_timeout(api: Api) -> None:
    """A stream whose next event does not come within `idle` fails as a read timeout does over bare httpx2."""
    async with FlakyServer() as server, sdk_client(api, server, policy(idle=0.3)) as client:
        server.queue(api.path, api.streamed(WORDS, interval=5.0))
        with pytest.raises(Exception) as caught:
            await api.stream(client)
    # OpenAI's stream wraps httpx2's timeouts in its APITimeoutError; Anthropic's lets them through.
    assert isinstance(caught.value, api.timeout_error | httpx2.TimeoutException), repr(caught.value)
