"""A soak over real sockets: tens of thousands of calls through every fault at once.

503s with Retry-After, resets, closes without an answer, hangs cut by the
attempt timeout, trickled bodies, and callers that give up mid-call. When
it is over and the client is idle, memory has stopped growing and the
server sees no connection beyond the bulkhead's slots: nothing leaked.
"""

from __future__ import annotations

import gc
import random

import anyio
import httpx
from flaky_server import Behaviour, FlakyServer, close, hang, reset, respond, trickle
from prometheus_client import CollectorRegistry

from resilient_http import (
    BulkheadPolicy,
    CircuitBreakerPolicy,
    Policy,
    RateLimitPolicy,
    ResilientTransport,
    RetryPolicy,
    StaleCachePolicy,
    TimeoutPolicy,
)

CALLS = 20_000
WORKERS = 32
SLOTS = 8
PATHS = [f"/item/{i}" for i in range(50)]


def _fault(rng: random.Random) -> Behaviour:
    roll = rng.random()
    if roll < 0.70:
        return respond(200, {"Cache-Control": "max-age=60"}, b"x" * rng.choice((10, 2_000, 70_000)))
    if roll < 0.80:
        return respond(503, {"Retry-After": "0"}, b"busy")
    if roll < 0.86:
        return reset()
    if roll < 0.91:
        return close()
    if roll < 0.95:
        return hang()
    return trickle(chunks=3, interval=0.002, chunk=b"y" * 100)


def _policy() -> Policy:
    return Policy(
        timeout=TimeoutPolicy(attempt=0.05, total=0.5),
        retry=RetryPolicy(attempts=3, backoff=0.001, max_backoff=0.005),
        circuit_breaker=CircuitBreakerPolicy(failure_ratio=0.9, minimum_calls=1_000),
        rate_limit=RateLimitPolicy(rate=100_000, burst=1_000),
        bulkhead=BulkheadPolicy(max_concurrent=SLOTS, max_queue=WORKERS),
        stale_cache=StaleCachePolicy(max_entries=100),
    )


def _live_objects() -> int:
    gc.collect()
    return len(gc.get_objects())


async def test_a_soak_of_mixed_faults_ends_with_flat_memory_and_no_leaked_connection() -> None:
    """20,000 calls through every fault: object count flat after warm-up, connections within the bulkhead."""
    rng = random.Random(7)
    outcomes: dict[str, int] = {}
    transport = ResilientTransport(default=_policy(), registry=CollectorRegistry(), random=random.Random(3))
    async with FlakyServer() as server, httpx.AsyncClient(transport=transport) as client:
        for path in PATHS:
            server.default(path, respond(200, body=b"ok"))
        for _ in range(CALLS * 2):
            server.queue(rng.choice(PATHS), _fault(rng))

        async def worker(calls: int, seed: int) -> None:
            local = random.Random(seed)
            for _ in range(calls):
                path = local.choice(PATHS)
                give_up = local.random() < 0.05
                with anyio.move_on_after(local.uniform(0, 0.03) if give_up else 5) as scope:
                    try:
                        response = await client.get(server.url(path))
                        await response.aread()
                        kind = str(response.status_code)
                    except httpx.HTTPError as exc:
                        kind = type(exc).__name__
                if scope.cancelled_caught:
                    kind = "gave_up"
                outcomes[kind] = outcomes.get(kind, 0) + 1

        async def run(calls: int, offset: int) -> None:
            async with anyio.create_task_group() as group:
                for n in range(WORKERS):
                    group.start_soon(worker, calls // WORKERS, offset + n)

        await run(CALLS // 5, 0)  # warm-up: caches, pools and metric series fill
        server.requests.clear()  # the server's own record of requests is not the client's memory
        warm = _live_objects()
        await run(CALLS - CALLS // 5, 1_000)
        arrived = len(server.requests)
        server.requests.clear()
        grown = _live_objects() - warm

        await anyio.sleep(0.3)  # let the server see every connection the client closed
        open_at_server = server.connections_open

    assert sum(outcomes.values()) == CALLS // WORKERS * WORKERS, outcomes
    assert arrived > CALLS // 2
    assert outcomes.get("200", 0) > CALLS // 2, outcomes
    for kind in outcomes:  # only answers, httpx errors and callers that gave up
        assert kind.isdigit() or kind == "gave_up" or hasattr(httpx, kind) or kind.endswith("Error"), outcomes
    assert grown < 2_000, f"{grown} more live objects after {CALLS - CALLS // 5} more calls"
    assert open_at_server <= SLOTS, f"{open_at_server} connections still open at the server, bulkhead {SLOTS}"
