"""One worker of a fleet, as a process of its own: the fleet tests and benchmarks/fleet.py start several.

    python tests/fleet_worker.py '{"url": ..., "store": {...} | null, "policy": {...}, "rate": ..., ...}'

It makes its own ``ResilientTransport`` (on the store the settings name),
prints ``ready``, reads the moment to start from its standard input (on
``time.monotonic()``: one clock for every process of the machine, and the
test's server's), and then, in its own event loop, offers ``rate`` calls a
second to ``url`` for ``duration`` seconds, the first ``phase`` seconds
after the start, open loop: a call starts on time whether or not the
previous ones have ended. ``inject_429`` (``[after, retry_after]``): the first call made
``after`` seconds in gets a ``429 Retry-After: retry_after`` from this
worker's inner transport, as if the server had sent it, without reaching
the server. It prints one JSON object: every call's start, end and
outcome (the status, or the exception's class), and the store's fallback
count. Under ``RESILIENT_HTTP_FLAVOUR=httpx2`` it runs the httpx2 flavour.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
import time
from typing import Any

from prometheus_client import CollectorRegistry

from resilient_http._toml import parse_policies

_HTTPX2 = os.environ.get("RESILIENT_HTTP_FLAVOUR") == "httpx2"
httpx: Any = importlib.import_module("httpx2" if _HTTPX2 else "httpx")
resilient: Any = importlib.import_module("resilient_http.httpx2" if _HTTPX2 else "resilient_http")


class Inject429(httpx.AsyncBaseTransport):  # type: ignore[misc]
    """The inner transport, but the first request at or after ``at`` gets a 429 with ``Retry-After``."""

    def __init__(self, inner: Any, at: float, retry_after: float) -> None:
        self.inner = inner
        self.at = at
        self.retry_after = retry_after
        self.sent: float | None = None

    async def handle_async_request(self, request: Any) -> Any:
        if self.sent is None and time.monotonic() >= self.at:
            self.sent = time.monotonic()
            return httpx.Response(429, headers={"Retry-After": f"{self.retry_after:g}"}, request=request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def run(settings: dict[str, Any], transport: Any, registry: CollectorRegistry, start: float) -> dict[str, Any]:
    duration, rate = settings["duration"], settings["rate"]
    start += settings.get("phase", 0.0)
    calls: list[tuple[float, float, str]] = []
    async with httpx.AsyncClient(transport=transport, timeout=10) as client:

        async def call() -> None:
            began = time.monotonic()
            try:
                response = await client.get(settings["url"])
                outcome = str(response.status_code)
            except Exception as exc:
                outcome = type(exc).__name__
            calls.append((began, time.monotonic(), outcome))

        await asyncio.sleep(max(0.0, start - time.monotonic()))
        tasks = []
        for i in range(round(duration * rate)):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(call()))
        await asyncio.gather(*tasks)
        fallbacks = sum(  # read before the store closes with the transport, and leaves the registry
            sample.value
            for metric in registry.collect()
            for sample in metric.samples
            if sample.name == "resilient_http_store_fallbacks_total"
        )
    return {"pid": os.getpid(), "calls": calls, "fallbacks": fallbacks}


def main() -> None:
    settings = json.loads(sys.argv[1])
    registry = CollectorRegistry()
    _, policy = parse_policies({"default": settings["policy"]})
    inner: Any = httpx.AsyncHTTPTransport()
    injected: Inject429 | None = None
    if settings.get("inject_429"):
        inner = injected = Inject429(inner, 0.0, settings["inject_429"][1])
    transport = resilient.ResilientTransport(default=policy, inner=inner, registry=registry, store=settings["store"])
    print("ready", flush=True)
    start = float(sys.stdin.readline())
    if injected is not None:
        injected.at = start + settings["inject_429"][0]
    result = asyncio.run(run(settings, transport, registry, start))
    result["injected"] = None if injected is None else injected.sent
    print(json.dumps(result))


if __name__ == "__main__":
    main()
