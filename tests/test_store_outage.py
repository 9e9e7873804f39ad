"""The Redis store when Redis is slow or gone: bounded answers, no exceptions, and sharing resumes by itself.

Each test runs its own redis-server, killed (SIGKILL) or stalled
(``DEBUG SLEEP`` from another connection) in the middle of the test. The
time bounds are upper bounds with room for a loaded machine: an operation
must not outlast its timeout by more than ``SLACK``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from redis_server import RedisServer, needs_redis, stall

from resilient_http.store import UNAVAILABLE, RedisStore

pytestmark = needs_redis

UP = "api.example.com:443"
TIMEOUT = 0.1
SLACK = 0.05
FALLBACKS = "resilient_http_store_fallbacks_total"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    found = RedisServer(tmp_path)
    found.start()
    yield found
    found.stop()


@pytest.fixture
async def store(server: RedisServer, registry: CollectorRegistry) -> AsyncIterator[RedisStore]:
    made = RedisStore.from_url(server.url, timeout=TIMEOUT, failures=3, cooldown=0.5, registry=registry)
    yield made
    await made.aclose()


async def timed(operation: Any) -> tuple[Any, float]:
    started = time.monotonic()
    result = await operation
    return result, time.monotonic() - started


def fallbacks(registry: CollectorRegistry, operation: str, reason: str) -> float:
    return registry.get_sample_value(FALLBACKS, {"operation": operation, "reason": reason}) or 0.0


async def test_a_killed_redis_costs_a_few_bounded_failures_then_nothing_and_sharing_resumes(
    server: RedisServer, store: RedisStore, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """Killed: UNAVAILABLE within the timeout, then skipped at once; restarted: shared again after the cooldown."""
    caplog.set_level(logging.INFO, logger="resilient_http.store")
    assert (await store.hold(UP, 60.0)) != UNAVAILABLE
    server.stop()
    for _ in range(3):
        answer, took = await timed(store.admit(UP, rate=10, burst=1))
        assert answer is UNAVAILABLE
        assert took < TIMEOUT + SLACK
    assert not store.available
    for _ in range(100):
        answer, took = await timed(store.held(UP))
        assert answer is UNAVAILABLE
        assert took < 0.01  # skipped: no network at all
    assert fallbacks(registry, "admit", "timeout") + fallbacks(registry, "admit", "error") == 3
    assert fallbacks(registry, "held", "skipped") == 100
    assert registry.get_sample_value("resilient_http_store_up") == 0

    server.start()  # same port; it lost everything, having kept nothing on disk
    assert await store.held(UP) is UNAVAILABLE  # still in its cooldown
    await asyncio.sleep(0.5)
    assert await store.held(UP) == 0.0  # the probe went through
    assert store.available
    assert (await store.hold(UP, 5.0)) != UNAVAILABLE
    assert registry.get_sample_value("resilient_http_store_up") == 1
    levels = [record.levelname for record in caplog.records]
    assert levels == ["WARNING", "INFO"]


async def test_a_stalled_redis_is_bounded_by_the_operation_timeout(
    server: RedisServer, store: RedisStore, registry: CollectorRegistry
) -> None:
    """While Redis sleeps (DEBUG SLEEP), each operation answers UNAVAILABLE at its timeout, counted as a timeout."""
    assert (await store.admit(UP, rate=10, burst=5)) != UNAVAILABLE
    sleeping = await stall(server, 1.0)
    await asyncio.sleep(0.2)  # the server is asleep now
    for operation in (store.admit(UP, rate=10, burst=5), store.circuit(UP)):
        answer, took = await timed(operation)
        assert answer is UNAVAILABLE
        assert TIMEOUT <= took < TIMEOUT + SLACK
    await sleeping.wait()
    assert fallbacks(registry, "admit", "timeout") == 1
    assert fallbacks(registry, "circuit", "timeout") == 1
    assert (await store.admit(UP, rate=10, burst=5)) != UNAVAILABLE  # awake: two failures did not skip the store
    assert store.available


async def test_an_answer_that_came_while_the_loop_ran_late_is_read_not_thrown_away(
    server: RedisServer, registry: CollectorRegistry
) -> None:
    """Redis answered while this process's loop was blocked past the timeout: the answer is used, no fallback.

    Redis sleeps 0.4 s with the operation's command waiting in its socket;
    the loop is blocked for 0.6 s. When it wakes, the timer (0.2 s) is long
    due and Redis's answer is waiting to be read.
    """
    store = RedisStore.from_url(server.url, timeout=0.2, registry=registry)
    try:
        assert await store.hold(UP, 30.0) != UNAVAILABLE
        sleeping = await stall(server, 0.4)
        await asyncio.sleep(0.1)  # the server is asleep now
        task = asyncio.ensure_future(store.held(UP))
        await asyncio.sleep(0.05)  # the command is sent, and waits for the server
        time.sleep(0.6)  # noqa: ASYNC251 (the loop runs late on purpose, and the server answers meanwhile)
        assert await task == pytest.approx(30.0, abs=1.0)
        assert fallbacks(registry, "held", "timeout") == 0
        await sleeping.wait()
    finally:
        await store.aclose()


async def test_a_caller_that_cancels_an_operation_gets_its_cancellation_and_no_verdict(
    server: RedisServer, registry: CollectorRegistry
) -> None:
    """Cancelled from outside mid-operation: the cancellation propagates, is no failure, breaks no connection."""
    store = RedisStore.from_url(server.url, timeout=5.0, failures=1, registry=registry)
    try:
        await store.circuit(UP)
        sleeping = await stall(server, 0.5)
        await asyncio.sleep(0.2)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(store.circuit(UP), 0.1)
        await sleeping.wait()
        assert store.available
        assert registry.get_sample_value(FALLBACKS, {"operation": "circuit", "reason": "timeout"}) is None
        for _ in range(5):
            assert (await store.circuit(UP)) != UNAVAILABLE
    finally:
        await store.aclose()


async def test_a_redis_that_never_was_answers_unavailable_at_once(registry: CollectorRegistry) -> None:
    """Nobody listening on the port: UNAVAILABLE, never an exception, and the store is skipped after the failures."""
    from redis_server import free_port

    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout=TIMEOUT, failures=2, registry=registry)
    try:
        for _ in range(5):
            answer, took = await timed(store.heartbeat(10.0))
            assert answer is UNAVAILABLE
            assert took < TIMEOUT + SLACK
        await store.leave()  # no exception either
        assert fallbacks(registry, "heartbeat", "error") == 2
        assert fallbacks(registry, "heartbeat", "skipped") == 3
    finally:
        await store.aclose()
