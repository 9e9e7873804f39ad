"""An LLM API client for production: the OpenAI (or Anthropic) SDK over resilient_http.

    python examples/llm_client.py

The SDK keeps doing what it is good at (building requests, parsing answers
and event streams) and resilient_http does the rest, once for the whole
process:

- **One transport per process.** Every SDK client made with
  :func:`http_client` shares one :class:`ResilientTransport`, so the
  host's rate limiter is the process's quota: a 429 that one call receives
  (with ``Retry-After`` or the IETF ``RateLimit`` fields) holds back every
  call to that host until the server's time, instead of each call finding
  out for itself.
- **Retries honour the server.** The SDK's own retries are off
  (``max_retries=0``): resilient_http retries with jitter, a retry budget,
  and never before a ``Retry-After`` or the reset of a spent quota. A 429 is
  retried for every method (the server refused to act). These SDKs send
  POSTs without an ``Idempotency-Key``, so this policy declares the hosts'
  POSTs safe to repeat (``methods={"POST"}``): a completion has no effect
  but its cost. A client that also creates files, batches or fine-tuning
  jobs through the same host should leave ``methods`` out: then an overload
  (503, Anthropic's 529), a hang or a reset reaches the caller as the SDK's
  error rather than risking a duplicate.
- **A breaker** opens when most calls fail (5xx and 529, never 429), so a
  provider outage fails fast instead of stacking up calls.
- **Streaming is not cut.** An event stream is returned to the SDK when its
  headers arrive, flows on past ``total`` for as long as no pause between
  two events exceeds ``idle`` (a model may think a while before its first
  token), and holds its bulkhead slot until the SDK has read it.
  ``attempt`` bounds the wait for the headers (for a call without
  streaming, that is the whole generation, hence two minutes); ``total``
  bounds the call until its answer is returned, retries and waits included.

The demo below runs the OpenAI SDK against a local server that plays its
API: a 429, an overload, an event stream, and a cooldown every call shares.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from typing import Any

import httpx2
import openai

from resilient_http.httpx2 import (
    BulkheadPolicy,
    CircuitBreakerPolicy,
    Policy,
    RateLimitPolicy,
    ResilientTransport,
    RetryPolicy,
    TimeoutPolicy,
    call_info,
)

LLM_HOSTS = ("api.openai.com", "api.anthropic.com")


def llm_policy(requests_per_minute: int = 500) -> Policy:
    """The policy of an LLM API host whose quota is ``requests_per_minute`` for this process."""
    return Policy(
        rate_limit=RateLimitPolicy(rate=requests_per_minute / 60, burst=max(1, requests_per_minute // 60)),
        timeout=TimeoutPolicy(attempt=120.0, total=300.0, idle=120.0),
        retry=RetryPolicy(attempts=4, backoff=0.5, max_backoff=8.0, max_retry_after=60.0, methods={"POST"}),
        circuit_breaker=CircuitBreakerPolicy(
            failure_ratio=0.5,
            minimum_calls=10,
            window=30.0,
            break_duration=10.0,
            failure_statuses={500, 502, 503, 504, 529},
        ),
        bulkhead=BulkheadPolicy(max_concurrent=32, max_queue=256),
    )


def http_client(hosts: Iterable[str] = LLM_HOSTS, **transport: Any) -> httpx2.AsyncClient:
    """The process's one HTTP client for LLM APIs: give it to every SDK client as ``http_client``."""
    policies = {host: llm_policy() for host in hosts}
    return httpx2.AsyncClient(transport=ResilientTransport(policies, **transport))


def openai_client(http: httpx2.AsyncClient, base_url: str | None = None) -> openai.AsyncOpenAI:
    """An OpenAI client whose retries are resilient_http's (``anthropic.AsyncAnthropic`` takes the same arguments)."""
    return openai.AsyncOpenAI(base_url=base_url, api_key="sk-test", max_retries=0, http_client=http)


# The demo: a local server that plays the chat completions API.


def completion(text: str) -> bytes:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    body = {"id": "c-1", "object": "chat.completion", "created": 0, "model": "gpt-demo", "choices": [choice]}
    return json.dumps(body).encode()


def events(words: list[str]) -> list[bytes]:
    def chunk(delta: dict[str, str]) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": None}
        body = {"id": "c-2", "object": "chat.completion.chunk", "created": 0, "model": "gpt-demo", "choices": [choice]}
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    return [chunk({"content": word}) for word in words] + [b"data: [DONE]\n\n"]


class FakeAPI:
    """Answers each request with the next scripted answer: (status, headers, body or event stream)."""

    def __init__(self) -> None:
        self.script: list[tuple[int, dict[str, str], bytes | list[bytes]]] = []
        self.arrivals: list[float] = []
        self.arrived = asyncio.Event()
        self.connections: set[asyncio.Task[Any]] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).lower()
                sized = [line for line in head.split(b"\r\n") if line.startswith(b"content-length:")]
                await reader.readexactly(int(sized[0].partition(b":")[2]) if sized else 0)
                self.arrivals.append(time.monotonic())
                self.arrived.set()
                status, headers, body = self.script.pop(0) if self.script else (200, {}, completion("..."))
                if isinstance(body, bytes):
                    lines = {"content-type": "application/json", "content-length": str(len(body)), **headers}
                    writer.write(_head(status, lines) + body)
                else:  # an event stream, an event at a time
                    writer.write(_head(status, {"content-type": "text/event-stream", "transfer-encoding": "chunked"}))
                    for event in body:
                        await asyncio.sleep(0.02)
                        writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                        await writer.drain()
                    writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.connections.discard(task)

    async def closed(self) -> None:
        """Wait until every client connection has ended."""
        await asyncio.gather(*self.connections, return_exceptions=True)


def _head(status: int, headers: dict[str, str]) -> bytes:
    return (f"HTTP/1.1 {status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()


async def main() -> None:
    api = FakeAPI()
    server = await asyncio.start_server(api.serve, "127.0.0.1", 0)
    base_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    async with server:
        async with http_client(["127.0.0.1"]) as http:
            await demo(api, openai_client(http, base_url))
        await api.closed()


async def demo(api: FakeAPI, client: openai.AsyncOpenAI) -> None:
    prompt: Any = [{"role": "user", "content": "Say hello."}]
    api.script = [(429, {"retry-after": "1"}, completion("")), (200, {}, completion("Hello!"))]
    raw = await client.chat.completions.with_raw_response.create(model="gpt-demo", messages=prompt)
    info = call_info(raw.http_response)
    assert info is not None
    waits = " ".join(f"{wait.reason} {wait.seconds:.1f}s" for wait in info.waits)
    print(f"429 then 200   -> {raw.parse().choices[0].message.content!r} attempts={info.attempts} waits: {waits}")

    api.script = [(503, {}, completion("")), (200, {}, completion("Hello again!"))]
    raw = await client.chat.completions.with_raw_response.create(model="gpt-demo", messages=prompt)
    info = call_info(raw.http_response)
    assert info is not None
    print(f"503 then 200   -> {raw.parse().choices[0].message.content!r} attempts={info.attempts}")

    words = ["Once", " upon", " a", " time", ",", " a", " stream", " flowed", " to", " its", " end", "."]
    api.script = [(200, {}, events(words))]
    stream = await client.chat.completions.create(model="gpt-demo", messages=prompt, stream=True)
    received = [chunk.choices[0].delta.content or "" async for chunk in stream]
    print(f"event stream   -> {len(received)} events {''.join(received)!r}")

    # One call's 429 holds back the calls that come after it: the quota is the process's.
    api.script = [(429, {"ratelimit": '"minute";r=0;t=1'}, completion(""))]
    before = len(api.arrivals)
    api.arrived.clear()
    first = asyncio.create_task(client.chat.completions.create(model="gpt-demo", messages=prompt))
    await api.arrived.wait()  # the 429 is on its way
    await asyncio.sleep(0.05)
    others = [client.chat.completions.create(model="gpt-demo", messages=prompt) for _ in range(3)]
    answers = await asyncio.gather(first, *others)
    after = [arrival - api.arrivals[before] for arrival in api.arrivals[before + 1 :]]
    print(
        f"shared cooldown -> {len(answers)} answers; after a 429 saying r=0;t=1, "
        f"the next {len(after)} requests came {min(after):.2f}s or more later"
    )


if __name__ == "__main__":
    asyncio.run(main())
