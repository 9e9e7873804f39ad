"""A fake LLM API for the SDK tests: what OpenAI's and Anthropic's servers answer, played by FlakyServer.

Each :class:`Api` knows how its SDK is called (a completion, a streamed
completion), what its API answers (a JSON completion, server-sent events,
an error body) and which exceptions its SDK raises. The faults (a hang, a
reset, a trickled stream) are tests/flaky_server.py's own. The SDKs are
driven through ``httpx2.AsyncClient``, which they require, whatever the
flavour of the test run::

    async with FlakyServer() as server, sdk_client(OPENAI, server, policy) as client:
        server.queue(OPENAI.path, OPENAI.error(429, {"Retry-After": "1"}), OPENAI.answer("hi"))
        assert await OPENAI.complete(client) == "hi"
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anthropic
import httpx2
import openai
from flaky_server import FlakyServer, HeadersLike, Respond, Trickle, respond, trickle
from prometheus_client import CollectorRegistry

from resilient_http.httpx2 import Policy, ResilientTransport

PROMPT = [{"role": "user", "content": "Say hello."}]


def _json(status: int, body: object, headers: HeadersLike | None) -> Respond:
    return respond(status, {"Content-Type": "application/json", **dict(headers or {})}, json.dumps(body).encode())


def _sse(events: Sequence[tuple[str | None, object]]) -> list[bytes]:
    out = []
    for name, data in events:
        text = data if isinstance(data, str) else json.dumps(data)
        out.append((f"event: {name}\n" if name else "").encode() + f"data: {text}\n\n".encode())
    return out


class Api:
    """One vendor's API and SDK; subclasses fill in the details."""

    name: str
    path: str
    #: The status its servers send when overloaded.
    overloaded: int
    timeout_error: type[Exception]
    connection_error: type[Exception]
    status_error: type[Exception]

    def client(self, base_url: str, http_client: httpx2.AsyncClient) -> Any:
        """The SDK's async client on ``base_url``, with its own retries off."""
        raise NotImplementedError

    async def create(self, client: Any) -> Any:
        """One completion through the SDK: the SDK's parsed object."""
        raise NotImplementedError

    async def complete(self, client: Any) -> str:
        """One completion through the SDK: its text."""
        raise NotImplementedError

    async def stream(self, client: Any) -> list[str]:
        """One streamed completion through the SDK: the text of each delta, as the SDK yields them."""
        raise NotImplementedError

    def answer(self, text: str, headers: HeadersLike | None = None) -> Respond:
        """A completion answering ``text``."""
        raise NotImplementedError

    def events(self, words: Sequence[str]) -> list[bytes]:
        """A streamed completion answering ``words``, one server-sent event (or more) a piece."""
        raise NotImplementedError

    def error(self, status: int, headers: HeadersLike | None = None, message: str = "try again") -> Respond:
        """An error answer with the API's error body."""
        raise NotImplementedError

    def streamed(self, words: Sequence[str], interval: float) -> Trickle:
        """The streamed completion of ``words`` sent a piece every ``interval`` seconds."""
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        return trickle(interval=interval, headers=headers, pieces=self.events(words))


class OpenAI(Api):
    name = "openai"
    path = "/v1/chat/completions"
    overloaded = 503
    timeout_error = openai.APITimeoutError
    connection_error = openai.APIConnectionError
    status_error = openai.APIStatusError

    def client(self, base_url: str, http_client: httpx2.AsyncClient) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="test", max_retries=0, http_client=http_client)

    async def create(self, client: Any) -> Any:
        return await client.chat.completions.create(model="gpt-test", messages=PROMPT)

    async def complete(self, client: Any) -> str:
        completion = await self.create(client)
        content = completion.choices[0].message.content
        assert isinstance(content, str)
        return content

    async def stream(self, client: Any) -> list[str]:
        stream = await client.chat.completions.create(model="gpt-test", messages=PROMPT, stream=True)
        pieces = []
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
        return pieces

    def answer(self, text: str, headers: HeadersLike | None = None) -> Respond:
        body = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": "gpt-test",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
        return _json(200, body, headers)

    def events(self, words: Sequence[str]) -> list[bytes]:
        def chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, object]:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return {
                "id": "c-1",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": "gpt-test",
                "choices": [choice],
            }

        events: list[tuple[str | None, object]] = [(None, chunk({"role": "assistant", "content": ""}))]
        events += [(None, chunk({"content": word})) for word in words]
        events += [(None, chunk({}, "stop")), (None, "[DONE]")]
        return _sse(events)

    def error(self, status: int, headers: HeadersLike | None = None, message: str = "try again") -> Respond:
        kind = {429: "rate_limit_exceeded", 400: "invalid_request_error"}.get(status, "server_error")
        return _json(status, {"error": {"message": message, "type": kind, "param": None, "code": kind}}, headers)


class Anthropic(Api):
    name = "anthropic"
    path = "/v1/messages"
    overloaded = 529
    timeout_error = anthropic.APITimeoutError
    connection_error = anthropic.APIConnectionError
    status_error = anthropic.APIStatusError

    def client(self, base_url: str, http_client: httpx2.AsyncClient) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(base_url=base_url, api_key="test", max_retries=0, http_client=http_client)

    async def create(self, client: Any) -> Any:
        return await client.messages.create(model="claude-test", max_tokens=64, messages=PROMPT)

    async def complete(self, client: Any) -> str:
        message = await self.create(client)
        text = message.content[0].text
        assert isinstance(text, str)
        return text

    async def stream(self, client: Any) -> list[str]:
        stream = await client.messages.create(model="claude-test", max_tokens=64, messages=PROMPT, stream=True)
        pieces = []
        async for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                pieces.append(event.delta.text)
        return pieces

    def _message(self, text: str) -> dict[str, object]:
        return {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-test",
            "content": [{"type": "text", "text": text}] if text else [],
            "stop_reason": "end_turn" if text else None,
            "stop_sequence": None,
            "usage": {"input_tokens": 3, "output_tokens": 1},
        }

    def answer(self, text: str, headers: HeadersLike | None = None) -> Respond:
        return _json(200, self._message(text), headers)

    def events(self, words: Sequence[str]) -> list[bytes]:
        block = {"type": "text", "text": ""}
        events: list[tuple[str | None, object]] = [
            ("message_start", {"type": "message_start", "message": self._message("")}),
            ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}),
        ]
        for word in words:
            delta = {"type": "text_delta", "text": word}
            events.append(("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}))
        end = {"stop_reason": "end_turn", "stop_sequence": None}
        events += [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": end, "usage": {"output_tokens": len(words)}}),
            ("message_stop", {"type": "message_stop"}),
        ]
        return _sse(events)

    def error(self, status: int, headers: HeadersLike | None = None, message: str = "try again") -> Respond:
        kind = {429: "rate_limit_error", 400: "invalid_request_error", 529: "overloaded_error"}.get(status, "api_error")
        return _json(status, {"type": "error", "error": {"type": kind, "message": message}}, headers)


OPENAI = OpenAI()
ANTHROPIC = Anthropic()
APIS = [OPENAI, ANTHROPIC]


@asynccontextmanager
async def sdk_client(api: Api, server: FlakyServer, policy: Policy | None) -> AsyncIterator[Any]:
    """The SDK's client over ``httpx2.AsyncClient(transport=ResilientTransport(default=policy))``.

    ``policy=None`` gives the bare ``httpx2.AsyncClient()``, for comparison.
    """
    if policy is None:
        http = httpx2.AsyncClient()
    else:
        http = httpx2.AsyncClient(transport=ResilientTransport(default=policy, registry=CollectorRegistry()))
    async with http:
        yield api.client(server.url(""), http)
