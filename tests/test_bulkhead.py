"""The bulkhead: per-host slots, a bounded priority queue, load shedding, exact counts.

Every test holds calls in flight deterministically with a :class:`Gate`
handler (each request waits on an ``anyio.Event`` named after its path) and
reads the Prometheus gauges of a fresh registry. Waits end through anyio
timers, so the few tests of a timeout really wait, 0.05 s at most.
"""

from __future__ import annotations

import gc
import random
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import anyio
import httpx
import pytest
from anyio.lowlevel import checkpoint
from conftest import LeftOpen
from prometheus_client import CollectorRegistry

from resilient_http import (
    BulkheadFullError,
    BulkheadPolicy,
    CallInfo,
    DeadlineExceededError,
    Policy,
    ResilientTransport,
    RetryPolicy,
    TimeoutPolicy,
    Wait,
)
from resilient_http.testing import FakeClock, Handler

HOST = "a.test:80"
# Bounds every test, so that a lost slot fails the test instead of hanging it.
LIMIT = 2.0

Outcome = httpx.Response | Exception


class Gate:
    """An async handler that holds each request, by path, until that path is freed.

    It records the order requests arrive in and the peak number held at once.
    """

    def __init__(self, statuses: dict[str, list[int]] | None = None) -> None:
        self.entered: list[str] = []
        self.in_flight = 0
        self.peak = 0
        self._gates: dict[str, anyio.Event] = {}
        self._statuses = statuses or {}
        self.before_return: dict[str, Callable[[], None]] = {}

    def _gate(self, name: str) -> anyio.Event:
        return self._gates.setdefault(name, anyio.Event())

    def free(self, *names: str) -> None:
        for name in names:
            self._gate(name).set()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        name = request.url.path.strip("/")
        self.entered.append(name)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await self._gate(name).wait()
        finally:
            self.in_flight -= 1
        hook = self.before_return.get(name)
        if hook is not None:
            hook()
        statuses = self._statuses.get(name)
        return httpx.Response(statuses.pop(0) if statuses else 200)


def policy(
    max_concurrent: int = 1,
    max_queue: int = 10,
    queue_timeout: float | None = None,
    *,
    timeout: TimeoutPolicy | None = None,
    retry: RetryPolicy | None = None,
) -> Policy:
    return Policy(
        bulkhead=BulkheadPolicy(max_concurrent=max_concurrent, max_queue=max_queue, queue_timeout=queue_timeout),
        timeout=timeout,
        retry=retry,
        circuit_breaker=None,
    )


def client(
    handler: Handler, registry: CollectorRegistry, default: Policy, clock: FakeClock | None = None
) -> httpx.AsyncClient:
    transport = ResilientTransport(
        default=default, inner=httpx.MockTransport(handler), registry=registry, clock=clock or FakeClock()
    )
    return httpx.AsyncClient(transport=LeftOpen(transport), base_url="http://a.test")


def gauge(registry: CollectorRegistry, name: str, host: str = HOST) -> float:
    value = registry.get_sample_value(f"resilient_http_bulkhead_{name}", {"transport": "default", "host": host})
    assert value is not None
    return value


def counted(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, {"transport": "default", "host": HOST, **labels}) or 0.0


def rejected(registry: CollectorRegistry, priority: str) -> float:
    return counted(registry, "resilient_http_bulkhead_rejected_total", priority=priority)


async def settle(condition: Callable[[], bool]) -> None:
    """Let other tasks run until ``condition`` holds."""
    for _ in range(1000):
        if condition():
            return
        await checkpoint()
    raise AssertionError("condition never held")


async def until_queued(registry: CollectorRegistry, count: int) -> None:
    await settle(lambda: gauge(registry, "queued") == count)


async def fetch(
    http: httpx.AsyncClient,
    name: str,
    outcomes: dict[str, Outcome],
    priority: str = "normal",
    **overrides: Any,
) -> None:
    """GET ``/name`` and keep the response or the error in ``outcomes[name]``."""
    try:
        outcomes[name] = await http.get(f"/{name}", extensions={"resilient_http": {"priority": priority, **overrides}})
    except httpx.HTTPError as exc:
        outcomes[name] = exc


def info(outcome: Outcome) -> CallInfo:
    assert isinstance(outcome, httpx.Response), outcome
    found = outcome.extensions["resilient_http"]
    assert isinstance(found, CallInfo)
    return found


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


async def test_attempts_in_flight_never_exceed_max_concurrent(registry: CollectorRegistry) -> None:
    """No more than max_concurrent attempts of a host reach the network at once; the rest queue."""
    gate = Gate()
    outcomes: dict[str, Outcome] = {}
    names = [f"c{i}" for i in range(8)]
    with anyio.fail_after(LIMIT):
        async with client(gate, registry, policy(max_concurrent=3)) as http, anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(fetch, http, name, outcomes)
            await settle(lambda: gate.in_flight == 3 and gauge(registry, "queued") == 5)
            gate.free(*names)
    assert gate.peak == 3
    assert [info(outcomes[name]).attempts for name in names] == [1] * 8


async def test_queued_calls_run_in_arrival_order_and_record_their_wait(registry: CollectorRegistry) -> None:
    """A freed slot goes to the call that has waited longest, and the wait shows in CallInfo.waits."""
    gate = Gate()
    clock = FakeClock()
    outcomes: dict[str, Outcome] = {}
    with anyio.fail_after(LIMIT):
        async with client(gate, registry, policy(), clock) as http, anyio.create_task_group() as tg:
            tg.start_soon(fetch, http, "a", outcomes)
            await settle(lambda: gate.entered == ["a"])
            for queued, name in enumerate("bcd", 1):
                tg.start_soon(fetch, http, name, outcomes)
                await until_queued(registry, queued)
            clock.advance(0.5)
            gate.free("a", "b", "c", "d")
    assert gate.entered == ["a", "b", "c", "d"]
    assert info(outcomes["a"]).waits == ()
    assert info(outcomes["b"]).waits == (Wait("bulkhead", 0.5),)


async def test_full_queue_rejects_at_once_and_counts_by_priority(registry: CollectorRegistry) -> None:
    """With every slot taken and the queue full, a call of no higher priority fails at once, counted by priority."""
    gate = Gate()
    outcomes: dict[str, Outcome] = {}
    with anyio.fail_after(LIMIT):
        async with client(gate, registry, policy(max_queue=1)) as http, anyio.create_task_group() as tg:
            tg.start_soon(fetch, http, "a", outcomes)
            await settle(lambda: gate.entered == ["a"])
            tg.start_soon(fetch, http, "b", outcomes, "critical")
            await until_queued(registry, 1)
            for name, priority in (("c", "normal"), ("d", "high"), ("e", "critical")):
                await fetch(http, name, outcomes, priority)
                assert isinstance(outcomes[name], BulkheadFullError)
            # Refused while "a" is still held: nothing waited.
            assert gate.entered == ["a"]
            gate.free("a", "b")
    refusal = outcomes["c"]
    assert isinstance(refusal, BulkheadFullError)
    assert refusal.host == HOST
    assert refusal.retry_after is None
    assert refusal.request.url.path == "/c"
    assert [rejected(registry, p) for p in ("critical", "high", "normal", "low")] == [1, 1, 1, 0]
    assert counted(registry, "resilient_http_requests_total", outcome="bulkhead_full") == 3
    assert gate.entered == ["a", "b"]


async def test_queue_timeout_gives_up_with_bulkhead_full(registry: CollectorRegistry) -> None:
    """A call that waits queue_timeout seconds without a slot fails with BulkheadFullError and leaves the queue."""
    gate = Gate()
    outcomes: dict[str, Outcome] = {}
    with anyio.fail_after(LIMIT):
        async with client(gate, registry, policy(queue_timeout=0.05)) as http, anyio.create_task_group() as tg:
            tg.start_soon(fetch, http, "a", outcomes)
            await settle(lambda: gate.entered == ["a"])
            started = anyio.current_time()
            await fetch(http, "b", outcomes, "low")
            waited = anyio.current_time() - started
            assert gauge(registry, "queued") == 0
            assert gauge(registry, "in_flight") == 1
            gate.free("a")
    assert isinstance(outcomes["b"], BulkheadFullError)
    assert waited >= 0.04
    assert rejected(registry, "low") == 1
    assert counted(registry, "resilient_http_timeouts_total", kind="total") == 0
    assert gate.entered == ["a"]


async def test_total_deadline_ends_the_wait_with_deadline_exceeded(registry: CollectorRegistry) -> None:
    """Without a queue_timeout, the call's total deadline ends its wait: DeadlineExceededError(kind="total")."""
    gate = Gate()
    outcomes: dict[str, Outcome] = {}
    with anyio.fail_after(LIMIT):
        async with client(gate, registry, policy()) as http, anyio.create_task_group() as tg:
            tg.start_soon(fetch, http, "a", outcomes)
            await settle(lambda: gate.entered == ["a"])
            await fetch(http, "b", outcomes, timeout=TimeoutPolicy(attempt=None, total=0.05))
            assert gauge(registry, "queued") == 0
            gate.free("a")
    error = outcomes["b"]
    assert isinstance(error, DeadlineExceededError)
    assert error.kind == "total"
    assert error.timeout == 0.05
    assert counted(registry, "resilient_http_timeouts_total", kind="total") == 1
    assert rejected(registry, "normal") == 0
    assert gate.entered == ["a"]


class StalledClock(FakeClock):
    """A fake clock whose sleeps last until ``wake`` is set, and then an hour: a stalled process."""

    def __init__(self) -> None:
        super().__init__()
        self.wake = anyio.Event()

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await self.wake.wait()
        self.advance(3600.0)


async def test_call_past_its_deadline_fails_without_taking_a_queue_place(registry: CollectorRegistry) -> None:
    """A call whose total deadline has passed gets DeadlineExceededError at once, shedding no waiter."""
    gate = Gate(statuses={"b": [503, 200]})
    clock = StalledClock()
    outcomes: dict[str, Outcome] = {}
    default = policy(
        max_queue=1,
        timeout=TimeoutPolicy(attempt=None, total=1.0),
        retry=RetryPolicy(attempts=2, backoff=0.01, budget=None),
    )
    with anyio.fail_after(LIMIT):
        async with client(gate, registry, default, clock) as http, anyio.create_task_group() as tg:
            tg.start_soon(fetch, http, "b", outcomes)
            await settle(lambda: gate.entered == ["b"])
            tg.start_soon(partial(fetch, http, "a", outcomes, timeout=None))
            await until_queued(registry, 1)
            gate.free("b")  # b's 503 hands the slot to a; b backs off until the clock wakes
            await settle(lambda: gate.entered == ["b", "a"] and bool(clock.sleeps))
            tg.start_soon(partial(fetch, http, "c", outcomes, "low", timeout=None))
            await until_queued(registry, 1)
            clock.wake.set()
            await settle(lambda: "b" in outcomes)
            assert (gauge(registry, "in_flight"), gauge(registry, "queued")) == (1, 1)
            gate.free("a", "c")
    error = outcomes["b"]
    assert isinstance(error, DeadlineExceededError)
    assert error.kind == "total"
    assert counted(registry, "resilient_http_timeouts_total", kind="total") == 1
    assert rejected(registry, "low") == 0
    assert gate.entered == ["b", "a", "c"]


async def test_queueing_does_not_eat_into_the_attempt_timeout(registry: CollectorRegistry) -> None:
    """The per-attempt timer starts once the slot is granted: a long wait is followed by a full attempt."""
    gate = Gate()
    outcomes: dict[str, Outcome] = {}
    quick = TimeoutPolicy(attempt=0.05, total=None)
    with anyio.fail_after(LIMIT):
        async with client(gate, registry, policy(timeout=quick)) as http, anyio.create_task_group() as tg:
            tg.start_soon(partial(fetch, http, "a", outcomes, timeout=None))
            await settle(lambda: gate.entered == ["a"])
            gate.free("b")
            tg.start_soon(fetch, http, "b", outcomes)
            await anyio.sleep(0.1)  # twice b's attempt timeout, spent waiting for a's slot
            gate.free("a")
    response = outcomes["b"]
    assert isinstance(response, httpx.Response)
    assert response.status_code == 200


async def test_critical_arrival_sheds_the_newest_lowest_waiter(registry: CollectorRegistry) -> None:
    """A critical call arriving at a full queue takes the place of the most recently queued low call."""
    gate = Gate()
    outcomes: dict[str, Outcome] = {}
    with anyio.fail_after(LIMIT):
        async with client(gate, registry, policy(max_queue=3)) as http, anyio.create_task_group() as tg:
            tg.start_soon(fetch, http, "a", outcomes)
            await settle(lambda: gate.entered == ["a"])
            for queued, (name, priority) in enumerate((("n", "normal"), ("l1", "low"), ("l2", "low")), 1):
                tg.start_soon(fetch, http, name, outcomes, priority)
                await until_queued(registry, queued)
            tg.start_soon(fetch, http, "c", outcomes, "critical")
            await settle(lambda: "l2" in outcomes)
            assert isinstance(outcomes["l2"], BulkheadFullError)
            assert gauge(registry, "queued") == 3
            gate.free("a", "n", "l1", "c")
    assert gate.entered == ["a", "c", "n", "l1"]
    assert rejected(registry, "low") == 1
    assert rejected(registry, "critical") == 0


async def test_arrival_is_refused_when_every_waiter_ranks_as_high_or_higher(registry: CollectorRegistry) -> None:
    """At a full queue, a call is refused rather than shedding waiters of its own or a higher priority."""
    gate = Gate()
    outcomes: dict[str, Outcome] = {}
    with anyio.fail_after(LIMIT):
        async with client(gate, registry, policy(max_queue=2)) as http, anyio.create_task_group() as tg:
            tg.start_soon(fetch, http, "a", outcomes)
            await settle(lambda: gate.entered == ["a"])
            for queued, (name, priority) in enumerate((("n", "normal"), ("h", "high")), 1):
                tg.start_soon(fetch, http, name, outcomes, priority)
                await until_queued(registry, queued)
            await fetch(http, "low", outcomes, "low")
            await fetch(http, "normal", outcomes, "normal")
            assert isinstance(outcomes["low"], BulkheadFullError)
            assert isinstance(outcomes["normal"], BulkheadFullError)
            assert gauge(registry, "queued") == 2
            gate.free("a", "n", "h")
    assert gate.entered == ["a", "h", "n"]
    assert rejected(registry, "low") == 1
    assert rejected(registry, "normal") == 1


async def test_critical_is_served_ahead_of_earlier_calls(registry: CollectorRegistry) -> None:
    """A freed slot goes to the highest priority waiting, first come first served within a priority."""
    gate = Gate()
    outcomes: dict[str, Outcome] = {}
    arrivals = (("n1", "normal"), ("l", "low"), ("n2", "normal"), ("h", "high"), ("c", "critical"))
    with anyio.fail_after(LIMIT):
        async with client(gate, registry, policy()) as http, anyio.create_task_group() as tg:
            tg.start_soon(fetch, http, "a", outcomes)
            await settle(lambda: gate.entered == ["a"])
            for queued, (name, priority) in enumerate(arrivals, 1):
                tg.start_soon(fetch, http, name, outcomes, priority)
                await until_queued(registry, queued)
            gate.free("a", *(name for name, _ in arrivals))
    assert gate.entered == ["a", "c", "h", "n1", "n2", "l"]


async def test_hung_host_does_not_take_other_hosts_slots(registry: CollectorRegistry) -> None:
    """A host whose calls all hang fills only its own slots; calls to another host go straight through."""
    gate = Gate()
    outcomes: dict[str, Outcome] = {}
    transport = ResilientTransport(
        default=policy(max_concurrent=2, max_queue=0), inner=httpx.MockTransport(gate), registry=registry
    )
    slow = httpx.AsyncClient(transport=LeftOpen(transport), base_url="http://slow.test")
    fast = httpx.AsyncClient(transport=LeftOpen(transport), base_url="http://fast.test")
    with anyio.fail_after(LIMIT):
        async with slow, fast, anyio.create_task_group() as tg:
            tg.start_soon(fetch, slow, "hung1", outcomes)
            tg.start_soon(fetch, slow, "hung2", outcomes)
            await settle(lambda: gate.in_flight == 2)
            await fetch(slow, "hung3", outcomes)
            assert isinstance(outcomes["hung3"], BulkheadFullError)
            gate.free("ok1", "ok2", "ok3", "ok4")
            for pair in (("ok1", "ok2"), ("ok3", "ok4")):
                async with anyio.create_task_group() as calls:
                    for name in pair:
                        calls.start_soon(fetch, fast, name, outcomes)
            assert [type(outcomes[f"ok{i}"]) for i in range(1, 5)] == [httpx.Response] * 4
            assert gauge(registry, "in_flight", "slow.test:80") == 2
            assert gauge(registry, "in_flight", "fast.test:80") == 0
            tg.cancel_scope.cancel()
    assert gauge(registry, "in_flight", "slow.test:80") == 0
    assert "hung1" not in outcomes


async def test_call_cancelled_while_queued_leaves_the_queue(registry: CollectorRegistry) -> None:
    """A waiter cancelled in the queue is removed from it; the slot goes to the next waiter."""
    gate = Gate()
    outcomes: dict[str, Outcome] = {}
    b_scope = anyio.CancelScope()

    async def b() -> None:
        with b_scope:
            await fetch(http, "b", outcomes)

    with anyio.fail_after(LIMIT):
        async with client(gate, registry, policy()) as http, anyio.create_task_group() as tg:
            tg.start_soon(fetch, http, "a", outcomes)
            await settle(lambda: gate.entered == ["a"])
            tg.start_soon(b)
            await until_queued(registry, 1)
            tg.start_soon(fetch, http, "c", outcomes)
            await until_queued(registry, 2)
            b_scope.cancel()
            await until_queued(registry, 1)
            assert gauge(registry, "in_flight") == 1
            gate.free("a", "b", "c")
    assert gate.entered == ["a", "c"]
    assert "b" not in outcomes
    assert (gauge(registry, "in_flight"), gauge(registry, "queued")) == (0, 0)


async def test_call_cancelled_after_being_granted_a_slot_passes_it_on(registry: CollectorRegistry) -> None:
    """A waiter handed a slot but cancelled before it could use it gives the slot to the next waiter."""
    gate = Gate()
    outcomes: dict[str, Outcome] = {}
    b_scope = anyio.CancelScope()

    async def b() -> None:
        with b_scope:
            await fetch(http, "b", outcomes)

    # "a" cancels "b" as it returns: the cancellation is pending, but "b" has
    # not run again when "a" hands it the slot.
    gate.before_return["a"] = b_scope.cancel
    with anyio.fail_after(LIMIT):
        async with client(gate, registry, policy()) as http, anyio.create_task_group() as tg:
            tg.start_soon(fetch, http, "a", outcomes)
            await settle(lambda: gate.entered == ["a"])
            tg.start_soon(b)
            await until_queued(registry, 1)
            tg.start_soon(fetch, http, "c", outcomes)
            await until_queued(registry, 2)
            gate.free("a", "b", "c")
    assert gate.entered == ["a", "c"]
    assert "b" not in outcomes
    assert (gauge(registry, "in_flight"), gauge(registry, "queued")) == (0, 0)


async def test_call_cancelled_mid_attempt_releases_its_slot(registry: CollectorRegistry) -> None:
    """Cancelling a call while its attempt is on the network frees its slot for the next waiter."""
    gate = Gate()
    outcomes: dict[str, Outcome] = {}
    a_scope = anyio.CancelScope()

    async def a() -> None:
        with a_scope:
            await fetch(http, "a", outcomes)

    with anyio.fail_after(LIMIT):
        async with client(gate, registry, policy()) as http, anyio.create_task_group() as tg:
            tg.start_soon(a)
            await settle(lambda: gate.entered == ["a"])
            tg.start_soon(fetch, http, "b", outcomes)
            await until_queued(registry, 1)
            a_scope.cancel()
            await settle(lambda: gate.entered == ["a", "b"])
            assert (gauge(registry, "in_flight"), gauge(registry, "queued")) == (1, 0)
            gate.free("b")
    assert "a" not in outcomes
    assert (gauge(registry, "in_flight"), gauge(registry, "queued")) == (0, 0)


async def test_many_cancellations_lose_no_slot_and_count_none_twice(registry: CollectorRegistry) -> None:
    """After calls cancelled in every phase, the gauges are back to zero and exactly max_concurrent slots remain."""
    rng = random.Random(7)
    gate = Gate()
    outcomes: dict[str, Outcome] = {}
    priorities = ("critical", "high", "normal", "low")

    async def call(http: httpx.AsyncClient, name: str, priority: str, cancel_after: int | None) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(fetch, http, name, outcomes, priority)
            if cancel_after is not None:
                for _ in range(cancel_after):
                    await checkpoint()
                tg.cancel_scope.cancel()

    async def free_later(name: str, after: int) -> None:
        for _ in range(after):
            await checkpoint()
        gate.free(name)

    with anyio.fail_after(LIMIT):
        async with client(gate, registry, policy(max_concurrent=3, max_queue=20)) as http:
            async with anyio.create_task_group() as tg:
                for i in range(200):
                    name = f"x{i}"
                    tg.start_soon(call, http, name, rng.choice(priorities), rng.choice((None, *range(12))))
                    tg.start_soon(free_later, name, rng.randrange(12))
                    if i % 5 == 0:
                        await checkpoint()
            assert (gauge(registry, "in_flight"), gauge(registry, "queued")) == (0, 0)
            assert gate.peak == 3
            # Exactly three slots are left: three calls get in, the fourth waits.
            gate.peak = 0
            async with anyio.create_task_group() as tg:
                for name in ("y1", "y2", "y3", "y4"):
                    tg.start_soon(fetch, http, name, outcomes)
                await settle(lambda: gate.in_flight == 3 and gauge(registry, "queued") == 1)
                gate.free("y1", "y2", "y3", "y4")
    assert gate.peak == 3
    assert (gauge(registry, "in_flight"), gauge(registry, "queued")) == (0, 0)
    cancelled = sum(1 for i in range(200) if f"x{i}" not in outcomes)
    assert 0 < cancelled < 200


async def test_retry_backoff_holds_no_slot(registry: CollectorRegistry) -> None:
    """Between attempts a retrying call gives its slot back, so a waiting call runs before its retry."""
    gate = Gate(statuses={"a": [503, 200]})
    outcomes: dict[str, Outcome] = {}
    retry = RetryPolicy(attempts=3, backoff=0.01, max_backoff=0.01, budget=None)
    with anyio.fail_after(LIMIT):
        async with client(gate, registry, policy(retry=retry)) as http, anyio.create_task_group() as tg:
            tg.start_soon(fetch, http, "a", outcomes)
            await settle(lambda: gate.entered == ["a"])
            tg.start_soon(fetch, http, "b", outcomes)
            await until_queued(registry, 1)
            gate.free("a")
            # "a" got a 503 and gave its slot to "b"; its retry now waits behind "b".
            await settle(lambda: gate.entered == ["a", "b"])
            await until_queued(registry, 1)
            assert gate.in_flight == 1
            gate.free("b")
    assert gate.entered == ["a", "b", "a"]
    assert gate.peak == 1
    assert info(outcomes["a"]).attempts == 2
    assert [wait.reason for wait in info(outcomes["a"]).waits] == ["backoff"]


async def test_gauges_follow_every_slot_and_waiter_exactly(registry: CollectorRegistry) -> None:
    """bulkhead_in_flight and bulkhead_queued equal the slots held and the calls waiting at every step."""
    gate = Gate()
    outcomes: dict[str, Outcome] = {}
    with anyio.fail_after(LIMIT):
        async with client(gate, registry, policy(max_concurrent=2)) as http, anyio.create_task_group() as tg:
            for name, in_flight, queued in (("a", 1, 0), ("b", 2, 0), ("c", 2, 1), ("d", 2, 2), ("e", 2, 3)):
                tg.start_soon(fetch, http, name, outcomes)
                await settle(lambda: gate.in_flight == in_flight and gauge(registry, "queued") == queued)  # noqa: B023
                assert gauge(registry, "in_flight") == in_flight
            for name, in_flight, queued in (("a", 2, 2), ("b", 2, 1), ("c", 2, 0), ("d", 1, 0), ("e", 0, 0)):
                gate.free(name)
                await settle(lambda: name in outcomes and gate.in_flight == in_flight)  # noqa: B023
                assert (gauge(registry, "in_flight"), gauge(registry, "queued")) == (in_flight, queued)
    assert (gauge(registry, "in_flight"), gauge(registry, "queued")) == (0, 0)


# Streamed bodies: the slot is the connection's, and lasts as long as the body


class Body(httpx.AsyncByteStream):
    """An unsized streamed body of two chunks, then a wait on ``hold`` if given; it counts its closings."""

    def __init__(self, hold: anyio.Event | None = None) -> None:
        self.hold = hold
        self.closed = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"first"
        if self.hold is not None:
            await self.hold.wait()
        yield b"last"

    async def aclose(self) -> None:
        self.closed += 1


class Streaming:
    """A handler answering ``/s...`` with a streamed :class:`Body` (kept in ``bodies``), anything else at once."""

    def __init__(self, hold: anyio.Event | None = None) -> None:
        self.hold = hold
        self.bodies: list[Body] = []
        self.entered: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        name = request.url.path.strip("/")
        self.entered.append(name)
        if not name.startswith("s"):
            return httpx.Response(200, content=b"small")
        body = Body(self.hold)
        self.bodies.append(body)
        return httpx.Response(200, stream=body)


def slots(registry: CollectorRegistry) -> tuple[float, float]:
    return gauge(registry, "in_flight"), gauge(registry, "queued")


async def open_stream(http: httpx.AsyncClient, path: str) -> httpx.Response:
    return await http.send(http.build_request("GET", path), stream=True)


async def test_a_streamed_body_holds_its_slot_until_it_is_closed(registry: CollectorRegistry) -> None:
    """While a streamed body is open its connection is busy: the slot is held and the next call waits."""
    handler = Streaming()
    outcomes: dict[str, Outcome] = {}
    with anyio.fail_after(LIMIT):
        async with client(handler, registry, policy()) as http, anyio.create_task_group() as tg:
            response = await open_stream(http, "/s1")
            assert slots(registry) == (1, 0)
            tg.start_soon(fetch, http, "next", outcomes)
            await until_queued(registry, 1)
            assert handler.entered == ["s1"]
            await response.aclose()
            await settle(lambda: "next" in outcomes)
    assert handler.entered == ["s1", "next"]
    assert handler.bodies[0].closed == 1
    assert slots(registry) == (0, 0)


async def test_a_body_read_to_its_end_frees_the_slot_without_being_closed(registry: CollectorRegistry) -> None:
    """Reading the last chunk closes the body and frees the slot, even if the caller never closes it."""
    handler = Streaming()
    with anyio.fail_after(LIMIT):
        async with client(handler, registry, policy()) as http:
            response = await open_stream(http, "/s1")
            assert isinstance(response.stream, httpx.AsyncByteStream)
            assert [chunk async for chunk in response.stream] == [b"first", b"last"]
            assert slots(registry) == (0, 0)
            assert handler.bodies[0].closed == 1
            assert (await http.get("/next")).status_code == 200


async def test_a_body_gives_its_slot_back_exactly_once(registry: CollectorRegistry) -> None:
    """Read to the end, then closed twice: one slot given back, and max_concurrent slots remain."""
    handler = Streaming()
    outcomes: dict[str, Outcome] = {}
    with anyio.fail_after(LIMIT):
        async with client(handler, registry, policy(max_concurrent=2)) as http:
            response = await open_stream(http, "/s1")
            await response.aread()
            await response.aclose()
            assert isinstance(response.stream, httpx.AsyncByteStream)
            await response.stream.aclose()
            assert slots(registry) == (0, 0)
            first, second = await open_stream(http, "/s2"), await open_stream(http, "/s3")
            async with anyio.create_task_group() as tg:
                tg.start_soon(fetch, http, "third", outcomes)
                await until_queued(registry, 1)
                await first.aclose()
            await second.aclose()
    assert slots(registry) == (0, 0)
    assert [body.closed for body in handler.bodies] == [1, 1, 1]


async def test_a_read_cancelled_mid_body_frees_the_slot(registry: CollectorRegistry) -> None:
    """A reader cancelled between two chunks, leaving the response unclosed, gives the slot back."""
    handler = Streaming(hold=anyio.Event())
    with anyio.fail_after(LIMIT):
        async with client(handler, registry, policy()) as http:
            response = await open_stream(http, "/s1")
            chunks: list[bytes] = []
            with anyio.move_on_after(0.01):
                async for chunk in response.aiter_raw():
                    chunks.append(chunk)
            assert chunks == [b"first"]
            assert slots(registry) == (0, 0)
            assert handler.bodies[0].closed == 1
            assert (await http.get("/next")).status_code == 200


async def test_a_body_dropped_without_being_closed_is_closed_and_frees_the_slot(registry: CollectorRegistry) -> None:
    """A streamed response the caller lets go of unread and unclosed is closed on its loop once collected."""
    handler = Streaming()
    outcomes: dict[str, Outcome] = {}
    with anyio.fail_after(LIMIT):
        async with client(handler, registry, policy()) as http, anyio.create_task_group() as tg:
            response = await open_stream(http, "/s1")
            tg.start_soon(fetch, http, "next", outcomes)
            await until_queued(registry, 1)
            del response
            gc.collect()
            await settle(lambda: "next" in outcomes)
    assert handler.bodies[0].closed == 1
    assert slots(registry) == (0, 0)


async def test_a_small_body_read_inside_the_attempt_holds_no_slot_afterwards(registry: CollectorRegistry) -> None:
    """A body with a small Content-Length is read by the attempt: its slot is free when the headers reach the caller."""
    handler = Streaming()
    with anyio.fail_after(LIMIT):
        async with client(handler, registry, policy()) as http:
            response = await open_stream(http, "/tiny")
            assert slots(registry) == (0, 0)
            assert (await http.get("/next")).status_code == 200
            await response.aclose()


async def test_a_streamed_answer_that_is_retried_frees_its_slot_before_the_backoff(registry: CollectorRegistry) -> None:
    """A streamed 503 the retry layer discards gives its slot back, so the retry is not stuck behind it."""
    bodies: list[Body] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(Body())
        return httpx.Response(503 if len(bodies) == 1 else 200, stream=bodies[-1])

    retry = RetryPolicy(attempts=2, backoff=0.01, budget=None)
    with anyio.fail_after(LIMIT):
        async with client(handler, registry, policy(retry=retry)) as http:
            response = await http.get("/")
    assert response.status_code == 200
    assert [body.closed for body in bodies] == [1, 1]
    assert slots(registry) == (0, 0)


def test_under_trio_a_dropped_body_is_closed_and_frees_the_slot() -> None:
    """The garbage-collected body's slot is given back on trio's loop too."""
    registry = CollectorRegistry()
    handler = Streaming()

    async def main() -> None:
        async with client(handler, registry, policy()) as http:
            response = await open_stream(http, "/s1")
            assert slots(registry) == (1, 0)
            del response
            gc.collect()
            with anyio.fail_after(LIMIT):
                await settle(lambda: slots(registry) == (0, 0))
                assert (await http.get("/next")).status_code == 200

    anyio.run(main, backend="trio")
    assert handler.bodies[0].closed == 1
