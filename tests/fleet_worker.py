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
the server. Under ``RESILIENT_HTTP_FLAVOUR=httpx2`` it runs the httpx2 flavour.

It prints one JSON object: every call's start, end, outcome (the status, or
the exception's class), the moment its request was handed to the network
(``null`` if it never was), the seconds it spent awaiting the store, and the
moment it asked for the slot it was given, plus the wait the store named
(``null`` if none: a send later than that was delayed by this process); the
store's fallbacks (in all, and by reason); every store operation (name, start, seconds, whether
it was answered, whether a call awaited it, and a rate step's answer: allowed, wait, turn); when this worker's hold was
published to the store (the store's answer to it, ``null`` if none); and how
late its event loop ran (a 5 ms tick measured all along: the lags over 5 ms
with their moments).
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
from resilient_http.store import UNAVAILABLE, Admission, Circuit, Maybe, Store, open_store_table

_HTTPX2 = os.environ.get("RESILIENT_HTTP_FLAVOUR") == "httpx2"
httpx: Any = importlib.import_module("httpx2" if _HTTPX2 else "httpx")
resilient: Any = importlib.import_module("resilient_http.httpx2" if _HTTPX2 else "resilient_http")

#: The loop-lag probe's tick, in seconds.
TICK = 0.005


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


class Recorder(httpx.AsyncBaseTransport):  # type: ignore[misc]
    """The inner transport, noting when each call's request is handed to the network."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.sent: dict[asyncio.Task[Any] | None, float] = {}

    async def handle_async_request(self, request: Any) -> Any:
        self.sent.setdefault(asyncio.current_task(), time.monotonic())
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


class TimedStore:
    """The store, timing every operation; those a call awaits are added up per call (its task)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.worker_id = store.worker_id
        self.workers = getattr(store, "workers", 1)
        self.operations: list[tuple[str, float, float, bool, bool, Any]] = []
        self.spent: dict[asyncio.Task[Any], float] = {}
        self.allowed: dict[asyncio.Task[Any], float] = {}  # when a call asked for the slot it got, plus its wait
        self.published: float | None = None

    async def _timed(self, name: str, operation: Any) -> Any:
        task = asyncio.current_task()
        began = time.monotonic()
        answer = await operation
        ended = time.monotonic()
        awaited = task in self.spent
        if awaited:
            self.spent[task] += ended - began  # type: ignore[index]
        detail = [answer.allowed, answer.wait, answer.turn] if isinstance(answer, Admission) else None
        if awaited and isinstance(answer, Admission) and answer.allowed:
            self.allowed[task] = began + answer.wait  # type: ignore[index]
        self.operations.append((name, began, ended - began, answer is not UNAVAILABLE, awaited, detail))
        return answer

    async def admit(self, upstream: str, **options: Any) -> Maybe[Admission]:
        answer: Maybe[Admission] = await self._timed("admit", self.store.admit(upstream, **options))
        return answer

    async def hold(self, upstream: str, seconds: float) -> Maybe[float]:
        answer: Maybe[float] = await self._timed("hold", self.store.hold(upstream, seconds))
        if answer is not UNAVAILABLE and self.published is None:
            self.published = time.monotonic()
        return answer

    async def held(self, upstream: str) -> Maybe[float]:
        answer: Maybe[float] = await self._timed("held", self.store.held(upstream))
        return answer

    async def circuit(self, upstream: str) -> Maybe[Circuit]:
        answer: Maybe[Circuit] = await self._timed("circuit", self.store.circuit(upstream))
        return answer

    async def open_circuit(self, upstream: str, seconds: float, *, after_round: int) -> Maybe[Circuit]:
        found = self.store.open_circuit(upstream, seconds, after_round=after_round)
        answer: Maybe[Circuit] = await self._timed("open_circuit", found)
        return answer

    async def claim_trial(self, upstream: str, round: int, *, slots: int, ttl: float) -> Maybe[bool]:
        claimed = self.store.claim_trial(upstream, round, slots=slots, ttl=ttl)
        answer: Maybe[bool] = await self._timed("claim_trial", claimed)
        return answer

    async def release_trial(self, upstream: str, round: int) -> Maybe[bool]:
        answer: Maybe[bool] = await self._timed("release_trial", self.store.release_trial(upstream, round))
        return answer

    async def trial_succeeded(self, upstream: str, round: int, *, slots: int) -> Maybe[Circuit]:
        found = self.store.trial_succeeded(upstream, round, slots=slots)
        answer: Maybe[Circuit] = await self._timed("trial_succeeded", found)
        return answer

    async def heartbeat(self, ttl: float) -> Maybe[int]:
        answer: Maybe[int] = await self._timed("heartbeat", self.store.heartbeat(ttl))
        return answer

    async def leave(self) -> None:
        await self.store.leave()

    async def aclose(self) -> None:
        await self.store.aclose()


async def lags(until: float, found: list[tuple[float, float]]) -> None:
    """How late the loop runs a 5 ms sleep, until ``until``: every lag over a tick, with its moment."""
    while time.monotonic() < until:
        began = time.monotonic()
        await asyncio.sleep(TICK)
        late = time.monotonic() - began - TICK
        if late > TICK:
            found.append((began, late))


async def run(
    settings: dict[str, Any], transport: Any, registry: CollectorRegistry, start: float, recorder: Recorder
) -> dict[str, Any]:
    duration, rate = settings["duration"], settings["rate"]
    store: TimedStore | None = transport._fleet.store if transport._fleet is not None else None
    calls: list[tuple[float, float, str, float | None, float, float | None]] = []
    lagged: list[tuple[float, float]] = []
    async with httpx.AsyncClient(transport=transport, timeout=10) as client:

        async def call() -> None:
            task = asyncio.current_task()
            assert task is not None
            if store is not None:
                store.spent[task] = 0.0
            began = time.monotonic()
            try:
                response = await client.get(settings["url"])
                outcome = str(response.status_code)
            except Exception as exc:
                outcome = type(exc).__name__
            spent = 0.0 if store is None else store.spent.pop(task)
            allowed = None if store is None else store.allowed.pop(task, None)
            calls.append((began, time.monotonic(), outcome, recorder.sent.pop(task, None), spent, allowed))

        await asyncio.sleep(max(0.0, start - time.monotonic()))
        probe = asyncio.create_task(lags(start + duration + 0.5, lagged))
        begin = start + settings.get("phase", 0.0)
        tasks = []
        for i in range(round(duration * rate)):
            await asyncio.sleep(max(0.0, begin + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(call()))
        await asyncio.gather(*tasks)
        probe.cancel()
        fallbacks: dict[str, float] = {}  # read before the store closes with the transport, and leaves the registry
        for metric in registry.collect():
            for sample in metric.samples:
                if sample.name == "resilient_http_store_fallbacks_total":
                    reason = sample.labels["reason"]
                    fallbacks[reason] = fallbacks.get(reason, 0.0) + sample.value
    if store is not None:
        await store.aclose()
    return {
        "pid": os.getpid(),
        "calls": calls,
        "fallbacks": sum(fallbacks.values()),
        "fallback_reasons": fallbacks,
        "operations": [] if store is None else store.operations,
        "published": None if store is None else store.published,
        "lags": lagged,
    }


def main() -> None:
    settings = json.loads(sys.argv[1])
    registry = CollectorRegistry()
    _, policy = parse_policies({"default": settings["policy"]})
    recorder = Recorder(httpx.AsyncHTTPTransport())
    inner: Any = recorder
    injected: Inject429 | None = None
    if settings.get("inject_429"):
        inner = injected = Inject429(inner, 0.0, settings["inject_429"][1])
    store = None if settings["store"] is None else TimedStore(open_store_table(settings["store"], registry=registry))
    transport = resilient.ResilientTransport(default=policy, inner=inner, registry=registry, store=store)
    print("ready", flush=True)
    start = float(sys.stdin.readline())
    if injected is not None:
        injected.at = start + settings["inject_429"][0]
    result = asyncio.run(run(settings, transport, registry, start, recorder))
    result["injected"] = None if injected is None else injected.sent
    print(json.dumps(result))


if __name__ == "__main__":
    main()
