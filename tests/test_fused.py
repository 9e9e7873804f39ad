"""The fused segment (breaker → retry → bulkhead → attempt as one coroutine) does what the layers do.

:mod:`resilient_http._fused` runs the usual call of those layers in one
frame and hands everything else to the layers' own code. These tests check
that it is used, and that a transport with it and one with each layer its
own coroutine (``_pipeline.FUSE = False``) are indistinguishable: the same
answers, errors, call records, events and metric samples for the same
random mix of answers, failures, streamed bodies and concurrent callers.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from conftest import BASE_URL, Harness, only
from prometheus_client import CollectorRegistry

from resilient_http import (
    BulkheadPolicy,
    CircuitBreakerPolicy,
    HedgePolicy,
    Policy,
    RateLimitPolicy,
    ResilientTransport,
    RetryBudget,
    RetryPolicy,
    StaleCachePolicy,
    TimeoutPolicy,
    _pipeline,
    call_info,
)
from resilient_http._fused import Fused
from resilient_http.layers.bulkhead import Bulkhead
from resilient_http.layers.circuit_breaker import CircuitBreakerLayer
from resilient_http.layers.retry import Retry
from resilient_http.testing import FakeClock


class _Trickle(httpx.AsyncByteStream):
    """A body of unknown length, streamed in two chunks: the attempt hands it over unread."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"part one, "
        await anyio.lowlevel.checkpoint()
        yield b"part two"


class _Network(httpx.AsyncBaseTransport):
    """Answers drawn from ``rng`` in the order tries arrive: statuses, failures, slow answers, streamed bodies."""

    def __init__(self, rng: random.Random, clock: FakeClock) -> None:
        self.rng = rng
        self.clock = clock

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await anyio.lowlevel.checkpoint()
        roll = self.rng.random()
        if roll < 0.40:
            return httpx.Response(200, content=b"fine")
        if roll < 0.50:
            return httpx.Response(200, stream=_Trickle())
        if roll < 0.62:
            return httpx.Response(503, content=b"busy")
        if roll < 0.66:
            return httpx.Response(503, headers={"Retry-After": "4"})
        if roll < 0.70:
            return httpx.Response(429, headers={"Retry-After": str(self.rng.choice((1, 2, 90)))})
        if roll < 0.74:
            return httpx.Response(404)
        if roll < 0.80:
            raise httpx.ConnectError("refused", request=request)
        if roll < 0.85:
            raise httpx.ReadError("reset", request=request)
        if roll < 0.88:
            raise httpx.ReadTimeout("stalled", request=request)
        self.clock.advance(self.rng.uniform(0, 2))  # slow: eats into the total deadline
        return httpx.Response(200, content=b"slow")


def _policy(full: bool | None) -> Policy:
    if full is None:  # the bulkhead alone in the fused segment
        return only(
            timeout=TimeoutPolicy(attempt=3.0, total=4.0),
            rate_limit=RateLimitPolicy(rate=20, burst=5),
            bulkhead=BulkheadPolicy(max_concurrent=2, max_queue=1),
        )
    core = Policy(
        timeout=TimeoutPolicy(attempt=3.0, total=4.0),
        retry=RetryPolicy(attempts=3, backoff=0.2, budget=RetryBudget(ratio=0.3, min_per_second=0.1, window=10)),
        circuit_breaker=CircuitBreakerPolicy(minimum_calls=5, failure_ratio=0.4, break_duration=3, window=10),
        bulkhead=BulkheadPolicy(max_concurrent=2, max_queue=1),
    )
    if not full:
        return core
    return Policy(
        timeout=core.timeout,
        retry=core.retry,
        circuit_breaker=core.circuit_breaker,
        bulkhead=core.bulkhead,
        rate_limit=RateLimitPolicy(rate=20, burst=5),
        stale_cache=StaleCachePolicy(max_stale=60),
    )


async def _story(seed: int, policy: Policy, fuse: bool, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Everything observable of a random run: each caller's outcome and record, the events and every sample."""
    monkeypatch.setattr(_pipeline, "FUSE", fuse)
    ran = []
    original = Fused.__call__

    def counted(self: Fused, call: Any, call_next: Any = None) -> Any:
        ran.append(call)
        return original(self, call, call_next)

    monkeypatch.setattr(Fused, "__call__", counted)
    rng = random.Random(seed)
    clock = FakeClock()
    registry = CollectorRegistry()
    events: list[Any] = []
    transport = ResilientTransport(
        default=policy,
        inner=_Network(random.Random(seed + 1), clock),
        registry=registry,
        clock=clock,
        random=random.Random(seed + 2),
        on_event=events.append,
    )
    outcomes: list[tuple[Any, ...]] = [()] * 200

    async def call(client: httpx.AsyncClient, number: int) -> None:
        method = "POST" if number % 7 == 0 else "GET"
        try:
            response = await client.request(method, f"/item/{number % 5}", content=b"x" if method == "POST" else None)
        except httpx.HTTPError as exc:
            outcomes[number] = (type(exc).__name__, str(exc), call_info(exc))
        else:
            outcomes[number] = (response.status_code, response.content, call_info(response))

    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        number = 0
        while number < 200:
            async with anyio.create_task_group() as tg:
                for _ in range(rng.choice((1, 1, 2, 4))):
                    if number < 200:
                        tg.start_soon(call, client, number)
                        number += 1
            clock.advance(rng.uniform(0, 1.5))
        samples = sorted(
            (sample.name, tuple(sorted(sample.labels.items())), sample.value)
            for family in registry.collect()
            for sample in family.samples
        )
    monkeypatch.setattr(Fused, "__call__", original)
    return {"outcomes": outcomes, "events": events, "samples": samples, "fused": len(ran)}


@pytest.mark.parametrize("full", [False, True, None], ids=["Policy()", "all six", "bulkhead alone"])
async def test_the_fused_segment_and_the_layers_own_chain_are_indistinguishable(
    full: bool | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    kinds: set[str] = set()
    records = []
    for seed in (1, 2, 3):
        fused = await _story(seed, _policy(full), True, monkeypatch)
        layered = await _story(seed, _policy(full), False, monkeypatch)
        assert fused["fused"] >= 20 and layered["fused"] == 0
        assert fused["outcomes"] == layered["outcomes"], seed
        assert fused["events"] == layered["events"], seed
        assert fused["samples"] == layered["samples"], seed
        kinds |= {type(event).__name__ for event in fused["events"]}
        records += [outcome[2] for outcome in fused["outcomes"]]
        assert any(outcome[:2] == (200, b"part one, part two") for outcome in fused["outcomes"])
    # Worth comparing only if the runs went through the paths the fused segment hands over.
    if full is None:
        assert {"CooldownStarted", "CallRejected"} <= kinds, kinds
        return
    assert {"RetryScheduled", "RetryStopped", "BreakerStateChanged", "CallRejected"} <= kinds, kinds
    assert any(record.attempts > 1 for record in records)
    assert any(record.circuit_state == "open" for record in records)


async def test_a_plain_call_runs_no_layer_coroutine(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Policy()'s usual call enters no layer's ``__call__``; its retry goes through the layers inside retry."""
    entered: list[str] = []
    for layer in (Retry, Bulkhead, CircuitBreakerLayer):
        original = layer.__call__

        def spy(self: Any, call: Any, call_next: Any, _original: Any = original, _name: str = layer.__name__) -> Any:
            entered.append(_name)
            return _original(self, call, call_next)

        monkeypatch.setattr(layer, "__call__", spy)
    answers = iter([200, 200, 503, 200])
    client = harness.client(lambda request: httpx.Response(next(answers)), Policy())
    assert [(await client.get("/a")).status_code for _ in range(2)] == [200, 200]
    assert entered == []
    assert (await client.get("/a")).status_code == 200  # after a 503: the retry goes through the layers inside retry
    assert entered == ["Bulkhead"]
    assert harness.value("resilient_http_retries_total", reason="status_503") == 1


async def test_a_hedged_policy_keeps_the_layers_own_chain(harness: Harness) -> None:
    transport = harness.transport(lambda request: httpx.Response(200), only(retry=RetryPolicy(), hedge=HedgePolicy()))
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        assert (await client.get("/a")).status_code == 200
    (host,) = transport._hosts.values()
    assert not isinstance(getattr(host.head[0], "__self__", None), Fused)
