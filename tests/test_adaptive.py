"""The adaptive bulkhead limit: its arithmetic on its own, then the bulkhead that follows it.

The arithmetic (:class:`AdaptiveSlots`) is tested with plain numbers. The
bulkhead tests hold calls in flight with the :class:`Gate` of
``test_bulkhead`` and read the gauges of a fresh registry; latency, where it
matters, is the fake clock's.
"""

from __future__ import annotations

import logging
import random
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest
from anyio.lowlevel import checkpoint
from prometheus_client import CollectorRegistry
from test_bulkhead import LIMIT, Gate, Outcome, client, fetch, gauge, rejected, settle, until_queued

from resilient_http import (
    AdaptiveLimit,
    BulkheadFullError,
    BulkheadPolicy,
    ConfigurationError,
    DeadlineExceededError,
    Policy,
    TimeoutPolicy,
)
from resilient_http._toml import load_policies
from resilient_http.layers.adaptive import AdaptiveSlots
from resilient_http.testing import FakeClock


def slots(ceiling: int = 100, **adaptive: object) -> AdaptiveSlots:
    return AdaptiveSlots(AdaptiveLimit(**adaptive), ceiling)  # type: ignore[arg-type]


# The arithmetic


def test_the_limit_starts_at_initial_lowered_to_the_ceiling() -> None:
    """The limit starts at ``initial``; a ceiling (max_concurrent) below it wins."""
    assert slots(initial=20).limit == 20
    assert slots(ceiling=5, initial=20).limit == 5


def test_a_drop_multiplies_the_limit_by_backoff_rounded_down() -> None:
    """One drop takes the limit from 20 to 18 (x0.9), and a small limit always loses at least one."""
    adaptive = slots(initial=20)
    assert adaptive.drop(adaptive.sent()) is True
    assert adaptive.limit == 18
    small = slots(initial=3, backoff=0.99)
    small.drop(small.sent())
    assert small.limit == 2


def test_drops_of_attempts_sent_before_a_decrease_shrink_the_limit_once() -> None:
    """A burst of drops from attempts sent together is one decrease; a drop sent after it is another."""
    adaptive = slots(initial=20)
    burst = [adaptive.sent() for _ in range(10)]
    changed = [adaptive.drop(number) for number in burst]
    assert changed == [True] + [False] * 9
    assert adaptive.limit == 18
    adaptive.drop(adaptive.sent())
    assert adaptive.limit == 16


def test_the_limit_never_falls_below_min_nor_grows_above_the_ceiling() -> None:
    """Drops stop at ``min``; growth stops at max_concurrent."""
    adaptive = slots(ceiling=12, initial=10, min=4)
    for _ in range(30):
        adaptive.drop(adaptive.sent())
    assert adaptive.limit == 4
    for _ in range(500):
        adaptive.success(in_flight=adaptive.limit, latency=0.01)
    assert adaptive.limit == 12


def test_aimd_grows_by_one_per_round_trip_while_at_least_half_the_limit_is_in_flight() -> None:
    """Ten answers at limit 10 with 5 in flight add one; with 4 in flight (idle) they add nothing."""
    idle = slots(initial=10)
    for _ in range(50):
        assert idle.success(in_flight=4, latency=0.01) is False
    assert idle.limit == 10
    busy = slots(initial=10)
    changes = [busy.success(in_flight=5, latency=0.01) for _ in range(10)]
    assert busy.limit == 11
    assert changes == [False] * 9 + [True]


def test_gradient_grows_while_latency_holds_and_shrinks_when_it_rises() -> None:
    """Steady latency lets the gradient limit grow; latency well above its long-run average brings it down."""
    adaptive = slots(mode="gradient", initial=20)
    for _ in range(20):
        adaptive.success(in_flight=20, latency=0.1)
    grown = adaptive.limit
    assert grown > 20
    for _ in range(20):
        adaptive.success(in_flight=grown, latency=0.4)
    assert adaptive.limit < 20


def test_gradient_does_not_grow_an_idle_limit_but_still_learns_latency() -> None:
    """Answers while less than half the limit is in flight leave the gradient limit where it is."""
    adaptive = slots(mode="gradient", initial=20)
    for _ in range(20):
        assert adaptive.success(in_flight=2, latency=0.1) is False
    assert adaptive.limit == 20


# The bulkhead that follows the limit


def adaptive_policy(
    max_concurrent: int = 100, max_queue: int = 10, timeout: TimeoutPolicy | None = None, **adaptive: object
) -> Policy:
    limit = AdaptiveLimit(**adaptive)  # type: ignore[arg-type]
    bulkhead = BulkheadPolicy(max_concurrent=max_concurrent, max_queue=max_queue, adaptive=limit)
    return Policy(bulkhead=bulkhead, timeout=timeout, retry=None, circuit_breaker=None)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


async def test_the_limit_gauge_shows_max_concurrent_or_the_adaptive_limit() -> None:
    """resilient_http_bulkhead_limit is max_concurrent for a fixed bulkhead, the current limit for an adaptive one."""
    fixed, adapting = CollectorRegistry(), CollectorRegistry()
    gate = Gate(statuses={"a": [503]})
    gate.free("a", "x")
    async with (
        client(gate, fixed, Policy(bulkhead=BulkheadPolicy(max_concurrent=7), circuit_breaker=None)) as one,
        client(gate, adapting, adaptive_policy(initial=10)) as other,
    ):
        await one.get("/x")
        assert gauge(fixed, "limit") == 7
        await other.get("/x")
        assert gauge(adapting, "limit") == 10
        await other.get("/a")
        assert gauge(adapting, "limit") == 9


async def test_a_burst_of_503s_shrinks_the_limit_once(registry: CollectorRegistry) -> None:
    """Ten attempts in flight together that all get 503 take the limit from 10 to 9, not to 3."""
    names = [f"c{i}" for i in range(10)]
    gate = Gate(statuses={name: [503] for name in names})
    outcomes: dict[str, Outcome] = {}
    with anyio.fail_after(LIMIT):
        async with client(gate, registry, adaptive_policy(initial=10)) as http, anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(fetch, http, name, outcomes)
            await settle(lambda: gate.in_flight == 10)
            gate.free(*names)
    assert gauge(registry, "limit") == 9


@pytest.mark.parametrize("error", [httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadTimeout, httpx.PoolTimeout])
async def test_timeouts_and_connect_errors_are_drops(
    registry: CollectorRegistry, error: type[httpx.TransportError]
) -> None:
    """An attempt that timed out or could not connect shrinks the limit."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise error("scripted", request=request)

    async with client(handler, registry, adaptive_policy(initial=10)) as http:
        with pytest.raises(error):
            await http.get("/")
    assert gauge(registry, "limit") == 9


@pytest.mark.parametrize("answer", [500, 502, 404, httpx.ReadError, httpx.RemoteProtocolError])
async def test_other_failures_are_not_drops(
    registry: CollectorRegistry, answer: int | type[httpx.TransportError]
) -> None:
    """A 500, a 404 or a read error says nothing about load: the limit stays."""

    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(answer, int):
            return httpx.Response(answer)
        raise answer("scripted", request=request)

    async with client(handler, registry, adaptive_policy(initial=10)) as http:
        for _ in range(5):
            try:
                await http.get("/")
            except httpx.HTTPError:
                pass
    assert gauge(registry, "limit") == 10


async def test_the_calls_own_total_deadline_running_out_is_not_a_drop(registry: CollectorRegistry) -> None:
    """An attempt cut short by the call's total timeout (its budget, not the host) leaves the limit alone."""

    async def handler(request: httpx.Request) -> httpx.Response:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    total = TimeoutPolicy(attempt=None, total=0.02)
    with anyio.fail_after(LIMIT):
        async with client(handler, registry, adaptive_policy(initial=10, timeout=total)) as http:
            with pytest.raises(DeadlineExceededError):
                await http.get("/")
    assert gauge(registry, "limit") == 10


async def test_drop_statuses_are_configurable(registry: CollectorRegistry) -> None:
    """With drop_statuses={502}, a 502 is a drop and a 503 is not."""
    gate = Gate(statuses={"bad": [502], "busy": [503]})
    gate.free("bad", "busy")
    async with client(gate, registry, adaptive_policy(initial=10, drop_statuses={502})) as http:
        await http.get("/busy")
        assert gauge(registry, "limit") == 10
        await http.get("/bad")
        assert gauge(registry, "limit") == 9


async def test_a_shrunk_limit_cancels_no_call_and_holds_back_waiters(registry: CollectorRegistry) -> None:
    """Below the calls in flight, the limit cancels nothing: slots given back are not handed on until under it."""
    gate = Gate(statuses={"a": [503]})
    outcomes: dict[str, Outcome] = {}
    with anyio.fail_after(LIMIT):
        async with client(gate, registry, adaptive_policy(initial=4)) as http, anyio.create_task_group() as tg:
            for name in ("a", "b", "c", "d", "w"):
                tg.start_soon(fetch, http, name, outcomes)
            await settle(lambda: gate.in_flight == 4 and gauge(registry, "queued") == 1)
            gate.free("a")  # a 503: the limit falls to 3, with 3 still in flight
            await settle(lambda: "a" in outcomes)
            for _ in range(20):
                await checkpoint()
            assert (gauge(registry, "limit"), gauge(registry, "in_flight"), gauge(registry, "queued")) == (3, 3, 1)
            assert gate.in_flight == 3
            assert "w" not in gate.entered
            gate.free("b")  # under the limit now: b's slot goes to w
            await settle(lambda: "w" in gate.entered)
            gate.free("c", "d", "w")
    assert all(isinstance(outcomes[name], httpx.Response) for name in "abcdw")
    assert (gauge(registry, "in_flight"), gauge(registry, "queued")) == (0, 0)


class OneChunk(httpx.AsyncByteStream):
    """An unsized streamed body: it holds its slot until read or closed."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"chunk"


class GatedStream:
    """A handler holding each request until its path is freed, then answering with an open streamed body."""

    def __init__(self) -> None:
        self.gate = Gate()
        self.entered = self.gate.entered

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        await self.gate(request)
        return httpx.Response(200, stream=OneChunk())


async def test_a_grown_limit_grants_waiters_at_once(registry: CollectorRegistry) -> None:
    """When the limit grows, a waiter gets a slot at once, though no slot was given back (a body still holds it)."""
    handler = GatedStream()
    with anyio.fail_after(LIMIT):
        async with client(handler, registry, adaptive_policy(initial=1)) as http, anyio.create_task_group() as tg:
            opened: list[httpx.Response] = []

            async def open_s() -> None:
                opened.append(await http.send(http.build_request("GET", "/s"), stream=True))

            tg.start_soon(open_s)
            await settle(lambda: handler.entered == ["s"])
            outcomes: dict[str, Outcome] = {}
            tg.start_soon(fetch, http, "w", outcomes)
            await until_queued(registry, 1)
            handler.gate.free("s", "w")  # s answers at limit 1, in use: the limit grows to 2
            await settle(lambda: "w" in outcomes)
            assert gauge(registry, "limit") == 2
            assert opened and not opened[0].is_closed
            await opened[0].aclose()
    assert (gauge(registry, "in_flight"), gauge(registry, "queued")) == (0, 0)


async def test_a_host_used_one_call_at_a_time_keeps_its_limit(registry: CollectorRegistry) -> None:
    """Calls made one after another never use half the limit: a hundred successes do not grow it."""
    gate = Gate()
    gate.free("x")
    async with client(gate, registry, adaptive_policy(initial=10)) as http:
        for _ in range(100):
            await http.get("/x")
    assert gauge(registry, "limit") == 10


async def test_priorities_and_shedding_work_on_a_shrunk_limit(registry: CollectorRegistry) -> None:
    """After a drop to a limit of 1, a critical arrival sheds the newest low waiter and is served first."""
    gate = Gate(statuses={"drop": [503]})
    gate.free("drop")
    outcomes: dict[str, Outcome] = {}
    with anyio.fail_after(LIMIT):
        async with client(gate, registry, adaptive_policy(initial=2, max_queue=2)) as http:
            await http.get("/drop")
            assert gauge(registry, "limit") == 1
            async with anyio.create_task_group() as tg:
                tg.start_soon(fetch, http, "a", outcomes)
                await settle(lambda: gate.entered[-1:] == ["a"])
                for queued, (name, priority) in enumerate((("n", "normal"), ("l", "low")), 1):
                    tg.start_soon(fetch, http, name, outcomes, priority)
                    await until_queued(registry, queued)
                tg.start_soon(fetch, http, "c", outcomes, "critical")
                await settle(lambda: "l" in outcomes)
                assert isinstance(outcomes["l"], BulkheadFullError)
                gate.free("a", "n", "c")
    assert gate.entered == ["drop", "a", "c", "n"]
    assert rejected(registry, "low") == 1


async def test_many_cancellations_and_drops_lose_no_slot(registry: CollectorRegistry) -> None:
    """Calls cancelled in every phase while 503s move the limit: the counts end at zero, and the limit holds."""
    rng = random.Random(11)
    names = [f"x{i}" for i in range(200)]
    gate = Gate(statuses={name: [503] for name in names if rng.random() < 0.3})
    outcomes: dict[str, Outcome] = {}

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
        async with client(gate, registry, adaptive_policy(initial=6, min=2, max_queue=20)) as http:
            async with anyio.create_task_group() as tg:
                for name in names:
                    priority = rng.choice(("critical", "high", "normal", "low"))
                    tg.start_soon(call, http, name, priority, rng.choice((None, *range(12))))
                    tg.start_soon(free_later, name, rng.randrange(12))
                    if rng.random() < 0.2:
                        await checkpoint()
            assert (gauge(registry, "in_flight"), gauge(registry, "queued")) == (0, 0)
            limit = int(gauge(registry, "limit"))
            assert 2 <= limit < 6
            # Exactly `limit` slots are left: that many calls get in, the next waits.
            gate.peak = 0
            extra = [f"y{i}" for i in range(limit + 1)]
            async with anyio.create_task_group() as tg:
                for name in extra:
                    tg.start_soon(fetch, http, name, outcomes)
                await settle(lambda: gate.in_flight == limit and gauge(registry, "queued") == 1)
                gate.free(*extra)
    assert (gauge(registry, "in_flight"), gauge(registry, "queued")) == (0, 0)


async def test_a_limit_change_is_logged_at_debug(registry: CollectorRegistry, caplog: pytest.LogCaptureFixture) -> None:
    """Each change of the limit is one DEBUG record naming the host, the old and new limits, and the cause."""
    caplog.set_level(logging.DEBUG, logger="resilient_http.bulkhead")
    gate = Gate(statuses={"a": [503]})
    gate.free("a")
    async with client(gate, registry, adaptive_policy(initial=10)) as http:
        await http.get("/a")
    messages = [record.getMessage() for record in caplog.records if record.name == "resilient_http.bulkhead"]
    assert messages == ["bulkhead of a.test:80: limit 10 -> 9 after a drop (503)"]


async def test_gradient_mode_shrinks_the_limit_when_latency_rises(registry: CollectorRegistry) -> None:
    """In gradient mode, rounds of calls answered much slower than usual (on the fake clock) bring the limit down."""
    clock = FakeClock()
    gate = Gate()

    async def burst(http: httpx.AsyncClient, latency: float) -> None:
        """As many calls as the limit, all in flight together, all answered after ``latency``."""
        gate.entered.clear()
        count = int(gauge(registry, "limit"))
        names = [f"r{i}" for i in range(count)]
        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(http.get, f"/{name}")
            await settle(lambda: gate.in_flight == count)
            clock.advance(latency)
            gate.free(*names)
        gate._gates.clear()

    with anyio.fail_after(LIMIT):
        async with client(gate, registry, adaptive_policy(mode="gradient", initial=4), clock) as http:
            gate.free("first")
            await http.get("/first")
            for _ in range(5):
                await burst(http, 0.05)
            grown = gauge(registry, "limit")
            assert grown > 4
            for _ in range(5):
                await burst(http, 0.5)
            assert gauge(registry, "limit") < grown


# Configuration, in code and in TOML


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"mode": "vegas"}, "AdaptiveLimit.mode"),
        ({"min": 0}, "AdaptiveLimit.min"),
        ({"initial": 0}, "AdaptiveLimit.initial"),
        ({"initial": 2, "min": 3}, "AdaptiveLimit.initial"),
        ({"backoff": 1.0}, "AdaptiveLimit.backoff"),
        ({"backoff": 0.4}, "AdaptiveLimit.backoff"),
        ({"backoff": True}, "AdaptiveLimit.backoff"),
        ({"drop_statuses": [503, 999]}, "AdaptiveLimit.drop_statuses"),
        ({"smoothing": 0}, "AdaptiveLimit.smoothing"),
        ({"tolerance": 0.5}, "AdaptiveLimit.tolerance"),
        ({"tolerance": float("nan")}, "AdaptiveLimit.tolerance"),
    ],
)
def test_bad_adaptive_settings_name_the_field_and_value(kwargs: dict[str, object], field: str) -> None:
    """Each bad AdaptiveLimit setting raises ConfigurationError naming the field, at construction."""
    with pytest.raises(ConfigurationError) as raised:
        AdaptiveLimit(**kwargs)  # type: ignore[arg-type]
    assert raised.value.field == field


def test_the_adaptive_min_must_not_exceed_max_concurrent() -> None:
    """max_concurrent is the hard ceiling: an adaptive min above it is refused; an initial above it is lowered."""
    with pytest.raises(ConfigurationError, match=r"BulkheadPolicy\.adaptive: its min \(5\) must not exceed"):
        BulkheadPolicy(max_concurrent=4, adaptive=AdaptiveLimit(min=5, initial=5))
    with pytest.raises(ConfigurationError, match="must be an AdaptiveLimit or None"):
        BulkheadPolicy(adaptive={"mode": "aimd"})  # type: ignore[arg-type]
    assert BulkheadPolicy(max_concurrent=4, adaptive=AdaptiveLimit(initial=50)).adaptive is not None


def test_adaptive_defaults_are_netflix_aimd() -> None:
    """By default: AIMD from 10, down to 1, x0.9 on a drop, drops on 429 and 503; off unless asked for."""
    limit = AdaptiveLimit()
    assert (limit.mode, limit.initial, limit.min, limit.backoff) == ("aimd", 10, 1, 0.9)
    assert limit.drop_statuses == frozenset({429, 503})
    assert (limit.smoothing, limit.tolerance) == (0.2, 1.5)
    assert BulkheadPolicy().adaptive is None


def test_toml_turns_the_adaptive_limit_on_per_host(tmp_path: Path) -> None:
    """``adaptive = true`` gives the defaults, a table sets fields, and hosts inherit [default]'s key by key."""
    path = tmp_path / "policies.toml"
    path.write_text(
        textwrap.dedent(
            """
            [default.bulkhead]
            max_concurrent = 50
            adaptive = true

            [hosts."a.example".bulkhead.adaptive]
            mode = "gradient"
            min = 4

            [hosts."b.example"]
            bulkhead = { adaptive = false }
            """
        ),
        encoding="utf-8",
    )
    policies, default = load_policies(path)
    assert default.bulkhead == BulkheadPolicy(max_concurrent=50, adaptive=AdaptiveLimit())
    a = policies["a.example"].bulkhead
    assert a is not None and a.max_concurrent == 50 and a.adaptive == AdaptiveLimit(mode="gradient", min=4)
    b = policies["b.example"].bulkhead
    assert b is not None and b.max_concurrent == 50 and b.adaptive is None


def test_toml_errors_in_the_adaptive_table_name_the_key_path_and_line(tmp_path: Path) -> None:
    """An unknown or bad key under bulkhead.adaptive is reported with its full path and line."""
    path = tmp_path / "policies.toml"
    path.write_text('[default.bulkhead]\nadaptive = { mode = "vegas" }\n', encoding="utf-8")
    with pytest.raises(ConfigurationError, match=r"line 2: default\.bulkhead\.adaptive\.mode: must be one of"):
        load_policies(path)
    path.write_text("[default.bulkhead.adaptive]\nminimum = 2\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match=r"default\.bulkhead\.adaptive\.minimum: is not a AdaptiveLimit"):
        load_policies(path)


async def test_fast_server_errors_do_not_count_as_quick_answers(registry: CollectorRegistry) -> None:
    """In gradient mode, a burst of instant 500s neither grows the limit nor teaches it a low latency."""
    clock = FakeClock()
    gate = Gate(statuses={f"r{i}": [500] for i in range(4)})
    with anyio.fail_after(LIMIT):
        async with client(gate, registry, adaptive_policy(mode="gradient", initial=4), clock) as http:
            async with anyio.create_task_group() as tg:
                for i in range(4):
                    tg.start_soon(http.get, f"/r{i}")
                await settle(lambda: gate.in_flight == 4)
                gate.free(*(f"r{i}" for i in range(4)))
    assert gauge(registry, "limit") == 4
