"""Hedging: what is hedged, when, within which budgets and gates, and that the losers leave nothing behind.

The timing rules run under trio's virtual time (``MockClock`` jumps to the
next deadline), where concurrent sleeps overlap as real ones do: a copy that
"takes 1 s" answers 1 s after it was sent, and the hedge's delay is measured
on the same clock. Cancellation is checked under asyncio and trio.
"""

from __future__ import annotations

import io
import logging
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
import trio
import trio.testing
from conftest import LeftOpen, only, where
from prometheus_client import CollectorRegistry

from resilient_http import (
    BulkheadPolicy,
    CallInfo,
    CircuitBreakerPolicy,
    ConfigurationError,
    DeadlineExceededError,
    HedgePolicy,
    Policy,
    RateLimitPolicy,
    ResilientTransport,
    RetryBudget,
    RetryPolicy,
    TimeoutPolicy,
    call_info,
)
from resilient_http._pipeline import ORDER
from resilient_http._toml import parse_policies
from resilient_http.events import Event, Hedged, HedgeWon
from resilient_http.layers.hedge import Allowance, Latencies, delay_of, replays_at_once

HOST = "api.example.com:443"
FIXED = HedgePolicy(delay=0.05, budget=1.0)
#: Hedging alone, with a budget that never refuses (the budget has tests of its own).
HEDGED = only(hedge=FIXED)


class VirtualClock:
    """trio's virtual time as the transport's clock."""

    def now(self) -> float:
        return trio.current_time()

    def wall(self) -> float:
        return 1_700_000_000.0 + trio.current_time()

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


class Upstream:
    """A MockTransport handler whose answers take virtual time: ``steps[i]`` is (seconds, status) of request i."""

    def __init__(self, *steps: tuple[float, int | type[Exception]]) -> None:
        self.steps = steps
        self.arrivals: list[float] = []
        self.requests: list[httpx.Request] = []
        self.cancelled = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        index = len(self.arrivals)
        self.arrivals.append(trio.current_time())
        self.requests.append(request)
        seconds, answer = self.steps[min(index, len(self.steps) - 1)]
        try:
            await trio.sleep(seconds)
        except trio.Cancelled:
            self.cancelled += 1
            raise
        if isinstance(answer, int):
            return httpx.Response(answer, content=f"copy {index}".encode())
        raise answer(f"copy {index} failed")


def run(main: Callable[[], Awaitable[None]]) -> None:
    """Run ``main`` under trio with virtual time."""
    anyio.run(main, backend="trio", backend_options={"clock": trio.testing.MockClock(autojump_threshold=0)})


def transport(handler: Any, policy: Policy = HEDGED, registry: CollectorRegistry | None = None) -> ResilientTransport:
    return ResilientTransport(
        default=policy,
        inner=httpx.MockTransport(handler),
        registry=CollectorRegistry() if registry is None else registry,
        clock=VirtualClock(),
        random=random.Random(0),
    )


def client(handler: Any, policy: Policy = HEDGED, registry: CollectorRegistry | None = None) -> httpx.AsyncClient:
    """A client whose transport stays open when it closes, so that its metrics can be read afterwards."""
    return httpx.AsyncClient(
        transport=LeftOpen(transport(handler, policy, registry)), base_url="https://api.example.com"
    )


def info(response: httpx.Response) -> CallInfo:
    found = call_info(response)
    assert found is not None
    return found


def hedges(registry: CollectorRegistry, result: str) -> float:
    return (
        registry.get_sample_value(
            "resilient_http_hedges_total", {"transport": "default", **where(HOST), "result": result}
        )
        or 0.0
    )


# ---------------------------------------------------------------- when


def test_a_slow_first_copy_is_hedged_after_the_delay_and_the_faster_hedge_wins() -> None:
    """The hedge goes at 50 ms, answers 10 ms later, and its answer is the call's; the first copy is cancelled."""
    upstream = Upstream((1.0, 200), (0.01, 200))
    registry = CollectorRegistry()

    async def main() -> None:
        async with client(upstream, registry=registry) as c:
            started = trio.current_time()
            response = await c.get("/")
            assert trio.current_time() - started == pytest.approx(0.06)
        assert response.content == b"copy 1"
        assert upstream.arrivals[1] - upstream.arrivals[0] == pytest.approx(0.05)
        assert upstream.cancelled == 1
        story = info(response)
        assert (story.attempts, story.hedges, story.hedge_won, story.hedge_stop) == (2, 1, True, None)
        assert (hedges(registry, "won"), hedges(registry, "lost")) == (1, 0)

    run(main)


def test_an_answer_before_the_delay_sends_no_hedge() -> None:
    """A copy that answers within the delay is the only one sent."""
    upstream = Upstream((0.04, 200))

    async def main() -> None:
        async with client(upstream) as c:
            response = await c.get("/")
        assert len(upstream.arrivals) == 1
        assert (info(response).hedges, info(response).hedge_won) == (0, False)

    run(main)


def test_the_first_copy_still_wins_when_it_answers_before_the_hedge() -> None:
    """The hedge is sent, the first copy answers first: the hedge is cancelled and counted as lost."""
    upstream = Upstream((0.08, 200), (1.0, 200))
    registry = CollectorRegistry()

    async def main() -> None:
        async with client(upstream, registry=registry) as c:
            started = trio.current_time()
            response = await c.get("/")
            assert trio.current_time() - started == pytest.approx(0.08)
        assert response.content == b"copy 0"
        assert upstream.cancelled == 1
        assert (info(response).hedges, info(response).hedge_won) == (1, False)
        assert (hedges(registry, "won"), hedges(registry, "lost")) == (0, 1)

    run(main)


def test_each_further_hedge_waits_the_delay_again() -> None:
    """With max_hedges=2, copies go at 0, 50 and 100 ms, and no more."""
    upstream = Upstream((0.0, 200), (1.0, 200), (1.0, 200), (0.01, 200))
    policy = only(hedge=HedgePolicy(delay=0.05, max_hedges=2, budget=1.0))

    async def main() -> None:
        async with client(upstream, policy) as c:
            await c.get("/")  # a call earns a hedge's share of the budget: two calls, two hedges
            response = await c.get("/")
        assert response.content == b"copy 3"
        assert [round(t - upstream.arrivals[1], 6) for t in upstream.arrivals[1:]] == [0, 0.05, 0.1]
        assert (info(response).hedges, upstream.cancelled) == (2, 2)

    run(main)


def test_each_hedge_sent_is_announced_with_its_delay_and_the_winner_too(caplog: pytest.LogCaptureFixture) -> None:
    """A Hedged event for every hedge that goes (not for the first copy), a HedgeWon for the one that answered."""
    upstream = Upstream((0.0, 200), (1.0, 200), (1.0, 200), (0.01, 200))
    policy = only(hedge=HedgePolicy(delay=0.05, max_hedges=2, budget=1.0))
    seen: list[Event] = []

    async def main() -> None:
        inner = ResilientTransport(
            default=policy,
            inner=httpx.MockTransport(upstream),
            registry=CollectorRegistry(),
            clock=VirtualClock(),
            random=random.Random(0),
            on_event=seen.append,
        )
        async with httpx.AsyncClient(transport=inner, base_url="https://api.example.com") as c:
            await c.get("/")
            await c.get("/")

    with caplog.at_level(logging.DEBUG, logger="resilient_http.hedge"):
        run(main)
    hedged = [e for e in seen if isinstance(e, Hedged)]
    assert [(e.host, e.attempt, round(e.delay, 6)) for e in hedged] == [(HOST, 1, 0.05), (HOST, 2, 0.1)]
    won = [e for e in seen if isinstance(e, HedgeWon)]
    assert [(e.host, e.attempt, round(e.after, 6)) for e in won] == [(HOST, 2, 0.11)]
    assert [r.getMessage() for r in caplog.records if r.name == "resilient_http.hedge"] == [
        f"hedge 1 to {HOST} after 0.050s",
        f"hedge 2 to {HOST} after 0.100s",
        f"hedge 2 to {HOST} won after 0.110s",
    ]


def test_a_hedge_that_loses_is_not_announced_as_won() -> None:
    """The first copy answers before its hedge: a Hedged event, no HedgeWon."""
    upstream = Upstream((0.08, 200), (1.0, 200))
    seen: list[Event] = []

    async def main() -> None:
        t = ResilientTransport(
            default=HEDGED,
            inner=httpx.MockTransport(upstream),
            registry=CollectorRegistry(),
            clock=VirtualClock(),
            on_event=seen.append,
        )
        async with httpx.AsyncClient(transport=t, base_url="https://api.example.com") as c:
            await c.get("/")

    run(main)
    assert [type(e) for e in seen] == [Hedged]


def test_a_retryable_failure_fires_the_next_copy_at_once() -> None:
    """A 503 after 10 ms sends the hedge then, not at 50 ms, and the hedge's 200 is the answer."""
    upstream = Upstream((0.01, 503), (0.01, 200))

    async def main() -> None:
        async with client(upstream) as c:
            response = await c.get("/")
        assert response.status_code == 200
        assert upstream.arrivals[1] - upstream.arrivals[0] == pytest.approx(0.01)
        assert info(response).hedge_won

    run(main)


def test_a_connection_error_fires_the_next_copy_at_once() -> None:
    """An error the retry layer would retry is a failure the next copy may escape."""
    upstream = Upstream((0.01, httpx.ConnectError), (0.01, 200))

    async def main() -> None:
        async with client(upstream) as c:
            response = await c.get("/")
        assert response.status_code == 200
        assert upstream.arrivals[1] - upstream.arrivals[0] == pytest.approx(0.01)

    run(main)


@pytest.mark.parametrize("headers", [{"Retry-After": "1"}, {}])
def test_a_server_asking_for_a_pause_gets_no_more_copies(headers: dict[str, str]) -> None:
    """A 429 (or a 503 with Retry-After) ends the hedging of the attempt: the answer is returned as is."""
    status = 429 if not headers else 503
    requests: list[float] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        requests.append(trio.current_time())
        await trio.sleep(0.01)
        return httpx.Response(status, headers=headers)

    async def main() -> None:
        async with client(handler) as c:
            response = await c.get("/")
        assert response.status_code == status
        assert len(requests) == 1

    run(main)


def test_when_every_copy_fails_the_last_answer_is_returned() -> None:
    """Both copies answer 503: the call gets the later 503 (the retry layer then decides), the earlier is closed."""
    upstream = Upstream((0.2, 503), (0.01, 503))

    async def main() -> None:
        async with client(upstream) as c:
            response = await c.get("/")
        assert (response.status_code, response.content) == (503, b"copy 0")
        assert len(upstream.arrivals) == 2

    run(main)


def test_a_response_is_preferred_to_an_error_when_every_copy_fails() -> None:
    """A 503 and then a reset: the 503 is returned, so raise_for_status() and the stale cache can read it."""
    upstream = Upstream((0.2, 502), (0.3, httpx.ReadError))

    async def main() -> None:
        async with client(upstream) as c:
            response = await c.get("/")
        assert response.status_code == 502

    run(main)


def test_an_error_no_copy_would_escape_ends_the_race() -> None:
    """An error the retry layer would not retry (a bad protocol) is raised at once; the other copy is cancelled."""
    upstream = Upstream((1.0, 200), (0.01, httpx.UnsupportedProtocol))

    async def main() -> None:
        async with client(upstream) as c:
            with pytest.raises(httpx.UnsupportedProtocol):
                await c.get("/")
        assert upstream.cancelled == 1

    run(main)


def test_the_race_stays_within_the_total_timeout() -> None:
    """Every copy hangs: the call ends at the total deadline, and no hedge is due after it."""
    upstream = Upstream(*[(0.0, 200)] * 3, (10.0, 200))
    policy = only(
        hedge=HedgePolicy(delay=0.4, max_hedges=5, budget=1.0), timeout=TimeoutPolicy(attempt=None, total=1.0)
    )

    async def main() -> None:
        async with client(upstream, policy) as c:
            for _ in range(3):  # earn the budget for more than two hedges
                await c.get("/")
            started = trio.current_time()
            with pytest.raises(DeadlineExceededError) as caught:
                await c.get("/")
            assert trio.current_time() - started == pytest.approx(1.0)
        assert caught.value.kind == "total"
        assert [round(t - started, 6) for t in upstream.arrivals[3:]] == [0, 0.4, 0.8]
        assert upstream.cancelled == 3  # each copy's own attempt timer ended it at the deadline

    run(main)


# ---------------------------------------------------------------- what


@pytest.mark.parametrize(
    ("method", "kwargs", "hedged"),
    [
        ("GET", {}, True),
        ("HEAD", {}, True),
        ("PUT", {"content": b"x"}, True),
        ("DELETE", {}, True),
        ("POST", {"content": b"x"}, False),
        ("PATCH", {"json": {"a": 1}}, False),
        ("POST", {"content": b"x", "headers": {"Idempotency-Key": "k1"}}, True),
        ("POST", {"data": {"a": "1"}, "headers": {"Idempotency-Key": "k1"}}, True),
    ],
)
def test_only_what_is_safe_to_send_twice_is_hedged(method: str, kwargs: dict[str, Any], hedged: bool) -> None:
    """Idempotent methods and requests with an Idempotency-Key; a POST without one is never sent twice."""
    upstream = Upstream((1.0, 200), (0.01, 200))

    async def main() -> None:
        async with client(upstream) as c:
            await c.request(method, "/", **kwargs)
        assert len(upstream.arrivals) == (2 if hedged else 1)
        if hedged and "content" in kwargs:
            assert [r.content for r in upstream.requests] == [kwargs["content"]] * 2

    run(main)


def test_a_method_the_retry_policy_declares_safe_is_hedged() -> None:
    """RetryPolicy.methods makes POST repeatable for a host: hedging follows it."""
    upstream = Upstream((1.0, 200), (0.01, 200))
    policy = only(hedge=FIXED, retry=RetryPolicy(methods={"POST"}, budget=None))

    async def main() -> None:
        async with client(upstream, policy) as c:
            await c.post("/", content=b"x")
        assert len(upstream.arrivals) == 2

    run(main)


def test_a_body_that_cannot_be_sent_twice_at_once_is_not_hedged() -> None:
    """A generator body cannot be replayed, and two copies of an open file would share its position."""

    async def body() -> AsyncIterator[bytes]:
        yield b"x"

    assert not replays_at_once(httpx.Request("PUT", "https://x", content=body()).stream)
    assert not replays_at_once(httpx.Request("PUT", "https://x", files={"f": io.BytesIO(b"x")}).stream)
    assert replays_at_once(httpx.Request("PUT", "https://x", files={"f": ("f.txt", b"x")}).stream)
    assert replays_at_once(httpx.Request("PUT", "https://x", json={"a": 1}).stream)
    upstream = Upstream((1.0, 200), (0.01, 200))

    async def main() -> None:
        async with client(upstream) as c:
            await c.put("/", content=body())
        assert len(upstream.arrivals) == 1

    run(main)


def test_a_call_can_turn_hedging_off() -> None:
    """extensions={"resilient_http": {"hedge": None}}: one copy, however slow."""
    upstream = Upstream((1.0, 200), (0.01, 200))

    async def main() -> None:
        async with client(upstream) as c:
            await c.get("/", extensions={"resilient_http": {"hedge": None}})
        assert len(upstream.arrivals) == 1

    run(main)


# ---------------------------------------------------------------- whether: budgets and gates


def test_hedges_add_at_most_the_budget_of_the_calls() -> None:
    """With budget 0.05, forty slow calls in the window get two hedges; the rest say "budget"."""
    upstream = Upstream((0.1, 200), (0.01, 200))
    registry = CollectorRegistry()
    policy = only(hedge=HedgePolicy(delay=0.05, budget=0.05))

    async def main() -> None:
        async with client(upstream, policy, registry) as c:
            stories = []
            for _ in range(40):
                upstream.arrivals.clear()
                stories.append(info(await c.get("/")))
        assert sum(s.hedges for s in stories) == 2
        assert [s.hedge_stop for s in stories].count("budget") == 38
        assert hedges(registry, "budget") == 38

    run(main)


def test_hedges_draw_on_the_retry_budget() -> None:
    """A spent retry budget refuses hedges too ("retry_budget"); the hedge budget's share is given back."""
    upstream = Upstream((0.1, 200), (0.01, 200))
    retry = RetryPolicy(budget=RetryBudget(ratio=0.1, min_per_second=0.0))
    policy = only(hedge=FIXED, retry=retry)

    async def main() -> None:
        async with client(upstream, policy) as c:
            stories = []
            for _ in range(20):
                upstream.arrivals.clear()
                stories.append(info(await c.get("/")))
        # The ratio is 0.1 of the calls so far: a hedge on call 10 and on call 20.
        assert [i for i, s in enumerate(stories, 1) if s.hedges] == [10, 20]
        assert {s.hedge_stop for s in stories if not s.hedges} == {"retry_budget"}

    run(main)


def test_no_hedge_while_the_circuit_is_not_closed() -> None:
    """A call already in flight when the breaker opens gets no hedge: "circuit_open"."""
    breaker = CircuitBreakerPolicy(minimum_calls=1, failure_ratio=0.5)
    policy = only(hedge=HedgePolicy(delay=0.05, budget=1.0), circuit_breaker=breaker)

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/fail":
            await trio.sleep(0.01)
            return httpx.Response(500)
        await trio.sleep(0.2)
        return httpx.Response(200)

    async def main() -> None:
        async with client(handler, policy) as c:
            slow: list[httpx.Response] = []

            async def slow_call() -> None:
                slow.append(await c.get("/slow"))

            async with anyio.create_task_group() as tg:
                tg.start_soon(slow_call)
                await trio.sleep(0.001)
                await c.get("/fail")  # opens the circuit at 11 ms
        assert (info(slow[0]).hedges, info(slow[0]).hedge_stop) == (0, "circuit_open")

    run(main)


def test_no_hedge_during_a_cooldown_the_server_imposed() -> None:
    """After a 429 with Retry-After on another call, the slow call's hedge is refused: "cooldown"."""
    policy = only(hedge=HedgePolicy(delay=0.05, budget=1.0), rate_limit=RateLimitPolicy(rate=100, burst=10))
    sent: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        if request.url.path == "/quota":
            return httpx.Response(429, headers={"Retry-After": "5"})
        await trio.sleep(0.2)
        return httpx.Response(200)

    async def main() -> None:
        async with client(handler, policy) as c:
            slow: list[httpx.Response] = []

            async def slow_call() -> None:
                slow.append(await c.get("/slow"))

            async with anyio.create_task_group() as tg:
                tg.start_soon(slow_call)
                await trio.sleep(0.001)
                await c.get("/quota")
        assert (info(slow[0]).hedges, info(slow[0]).hedge_stop) == (0, "cooldown")
        assert sent == ["/slow", "/quota"]

    run(main)


def test_a_hedge_takes_a_rate_limit_token_only_if_one_is_free_at_once() -> None:
    """At one call a second, the hedge finds no token: it is refused and books none, so the next call is on time."""
    upstream = Upstream((1.0, 200))
    policy = only(hedge=FIXED, rate_limit=RateLimitPolicy(rate=1, burst=1))

    async def main() -> None:
        async with client(upstream, policy) as c:
            first = await c.get("/")
            started = trio.current_time()  # 1.0: the bucket's next token is due now
            second = await c.get("/")
        assert info(first).hedge_stop == "rate_limit"
        assert upstream.arrivals[1] == pytest.approx(started)  # no token was booked for the refused hedge
        assert info(second).hedge_stop == "rate_limit"

    run(main)


def test_a_hedge_takes_a_token_when_one_is_free() -> None:
    """With a burst to spare, the hedge takes a token and goes."""
    upstream = Upstream((1.0, 200), (0.01, 200))
    policy = only(hedge=FIXED, rate_limit=RateLimitPolicy(rate=1, burst=2))

    async def main() -> None:
        async with client(upstream, policy) as c:
            response = await c.get("/")
        assert info(response).hedge_won

    run(main)


def test_a_hedge_never_queues_for_a_bulkhead_slot() -> None:
    """With every slot taken the hedges are refused ("bulkhead_full"); the call queued for a slot is not shed.

    The delay runs from the moment a copy is handed to the bulkhead, so the
    queued call's own hedge is due while it waits, and is refused too.
    """
    bulkhead = BulkheadPolicy(max_concurrent=2, max_queue=1)
    policy = only(hedge=HedgePolicy(delay=0.05, budget=1.0), bulkhead=bulkhead)
    upstream = Upstream((0.2, 200))

    async def main() -> None:
        async with client(upstream, policy) as c:
            responses: dict[str, httpx.Response] = {}

            async def one(name: str) -> None:
                responses[name] = await c.get("/")

            async with anyio.create_task_group() as tg:
                for name in "abc":  # c waits for a slot
                    tg.start_soon(one, name)
                    await trio.sleep(0.001)
        assert [responses[name].status_code for name in "abc"] == [200, 200, 200]
        assert [info(responses[name]).hedge_stop for name in "abc"] == ["bulkhead_full"] * 3
        assert len(upstream.arrivals) == 3

    run(main)


def test_each_hedge_holds_a_bulkhead_slot_of_its_own() -> None:
    """While both copies are in flight, the host has two slots taken; none once the race is over."""
    registry = CollectorRegistry()
    policy = only(hedge=FIXED, bulkhead=BulkheadPolicy(max_concurrent=4))
    peak: list[float] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        await trio.sleep(0.06)
        peak.append(
            registry.get_sample_value("resilient_http_bulkhead_in_flight", {"transport": "default", **where(HOST)}) or 0
        )
        return httpx.Response(200)

    async def main() -> None:
        async with client(handler, policy, registry) as c:
            await c.get("/")
        assert peak[0] == 2
        assert (
            registry.get_sample_value("resilient_http_bulkhead_in_flight", {"transport": "default", **where(HOST)}) == 0
        )

    run(main)


# ---------------------------------------------------------------- the adaptive delay


def test_nothing_is_hedged_before_the_warm_up_then_the_delay_is_the_p95() -> None:
    """Twenty latencies first; then the hedge goes at their p95 (nearest rank), measured on the first copy."""
    latencies = [0.01 * (i + 1) for i in range(20)]  # 10 ms ... 200 ms; p95 of 20 is the 19th: 190 ms
    steps = [(seconds, 200) for seconds in latencies]
    upstream = Upstream(*steps, (1.0, 200), (0.01, 200))
    policy = only(hedge=HedgePolicy(budget=1.0))

    async def main() -> None:
        async with client(upstream, policy) as c:
            for _ in range(20):
                assert info(await c.get("/")).hedges == 0
            response = await c.get("/")
        assert info(response).hedge_won
        assert upstream.arrivals[21] - upstream.arrivals[20] == pytest.approx(0.19)

    run(main)


def test_the_adaptive_delay_has_a_floor() -> None:
    """Latencies of a millisecond give a delay of min_delay, not a copy of every call."""
    upstream = Upstream(*[(0.001, 200)] * 20, (1.0, 200), (0.01, 200))
    policy = only(hedge=HedgePolicy(budget=1.0, min_delay=0.02))

    async def main() -> None:
        async with client(upstream, policy) as c:
            for _ in range(21):
                await c.get("/")
        assert upstream.arrivals[21] - upstream.arrivals[20] == pytest.approx(0.02)

    run(main)


def test_latencies_keep_a_window_and_a_nearest_rank_quantile() -> None:
    """The ring keeps the last 200 latencies; the delay follows them, computed again as they change."""
    latencies = Latencies()
    for i in range(1, 101):
        latencies.add(i / 1000)
    assert latencies.delay(0.95) == pytest.approx(0.095)
    for _ in range(200):
        latencies.add(1.0)
    assert len(latencies) == 200
    assert latencies.delay(0.95) == 1.0


def bimodal(slow: int, n: int = 200, seed: int = 0) -> list[float]:
    """``n`` latencies, sorted: ``slow`` of them 90-110 ms, the others 9-11 ms."""
    rng = random.Random(seed)
    return sorted([rng.uniform(0.09, 0.11) for _ in range(slow)] + [rng.uniform(0.009, 0.011) for _ in range(n - slow)])


@pytest.mark.parametrize("slow", [4, 8, 10, 11, 12, 16])
def test_the_delay_sits_in_the_gap_when_the_p95_is_on_its_edge(slow: int) -> None:
    """With about 5 % slow, the p95 is a fast or a slow answer by luck: the delay is half a median past the fast."""
    ordered = bimodal(slow)
    fast_top, median = ordered[-slow - 1], ordered[99]
    assert delay_of(ordered, 0.95) == pytest.approx(fast_top + median / 2)


def test_a_gap_beyond_the_sampling_error_leaves_the_quantile_alone() -> None:
    """With 20 % slow the p95 really is a slow answer: the gap far below it is not taken."""
    ordered = bimodal(40)
    assert delay_of(ordered, 0.95) == ordered[189] > 0.09


def test_a_smooth_tail_gets_its_quantile() -> None:
    """Log-normal latencies have no gap wider than the median near the p95: the delay is the p95."""
    rng = random.Random(1)
    ordered = sorted(0.01 * rng.lognormvariate(0, 0.5) for _ in range(200))
    assert delay_of(ordered, 0.95) == ordered[189]


def test_first_copies_beaten_by_a_hedge_count_as_longer_than_any() -> None:
    """Beaten copies (infinite) above the fast answers form the gap; when most copies were beaten, no delay is known."""
    assert delay_of(sorted([0.01] * 190 + [math.inf] * 10), 0.95) == pytest.approx(0.015)
    assert math.isinf(delay_of([0.01] * 80 + [math.inf] * 120, 0.95))


class Bimodal:
    """95 % of answers in 9-11 ms, 5 % in 100 ms (a seeded draw per request); counts the requests it got."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)
        self.requests = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        slow = self.random.random() < 0.05
        await trio.sleep(0.1 if slow else self.random.uniform(0.009, 0.011))
        return httpx.Response(200)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_on_a_bimodal_upstream_the_delay_settles_in_the_gap_and_the_load_within_the_budget(seed: int) -> None:
    """4,000 calls, 5 % of answers 10x slower: hedges go in the gap (never among the slow), within 5 %; p99 halved."""
    upstream = Bimodal(seed)
    seen: list[tuple[float, Event]] = []
    took: list[float] = []
    calls = 4000

    async def main() -> None:
        t = ResilientTransport(
            default=only(hedge=HedgePolicy()),
            inner=httpx.MockTransport(upstream),
            registry=CollectorRegistry(),
            clock=VirtualClock(),
            on_event=lambda event: seen.append((trio.current_time(), event)),
        )

        async def one() -> None:
            started = trio.current_time()
            await c.get("/")
            took.append(trio.current_time() - started)

        async with httpx.AsyncClient(transport=t, base_url="https://api.example.com") as c:
            async with trio.open_nursery() as calls_in_flight:  # open loop: one call every 10 ms
                for _ in range(calls):
                    calls_in_flight.start_soon(one)
                    await trio.sleep(0.01)

    run(main)
    hedged = [(at, e.delay) for at, e in seen if isinstance(e, Hedged)]
    settled = [delay for at, delay in hedged if at > 2.0]  # 200 calls in: the ring is full
    assert all(delay < 0.05 for delay in settled)
    # A few go at a fast p95 when the last 200 answers held only 1 % of slow ones.
    assert sum(0.011 < delay for delay in settled) >= 0.9 * len(settled)
    assert upstream.requests - calls == len(hedged) <= 0.05 * calls
    assert sorted(took)[int(0.99 * calls)] < 0.05  # without hedges, 100 ms


def test_the_budget_saves_up_for_a_burst_and_never_exceeds_its_share() -> None:
    """Each call earns 5 % of a hedge, saved up to ten: a burst of slow answers after quiet calls is hedged."""
    allowance = Allowance(0.05)
    for _ in range(19):
        allowance.deposit()
    assert not allowance.withdraw()  # 0.95 of a hedge
    for _ in range(1000):
        allowance.deposit()
    assert [allowance.withdraw() for _ in range(11)] == [True] * 10 + [False]
    allowance.refund()
    assert allowance.withdraw()


def test_over_a_long_run_hedges_stay_within_the_budget() -> None:
    """Whatever the demand, the hedges granted never pass 5 % of the calls seen so far."""
    rng = random.Random(3)
    allowance = Allowance(0.05)
    granted = 0
    for calls in range(1, 20_001):
        allowance.deposit()
        if rng.random() < 0.08 and allowance.withdraw():
            granted += 1
        assert granted <= 0.05 * calls + 1e-9
    assert granted > 0.049 * 20_000


def test_a_new_budget_keeps_what_was_saved_up_to_its_own_cap() -> None:
    """Lowering the budget to 1 % caps the savings at two hedges; the earned ones are not lost below it."""
    allowance = Allowance(0.05)
    for _ in range(400):
        allowance.deposit()
    allowance.limit(0.01)
    assert [allowance.withdraw() for _ in range(3)] == [True, True, False]


# ---------------------------------------------------------------- losers leave nothing behind


class Tracked(httpx.AsyncByteStream):
    """A streamed body that records whether it was closed."""

    def __init__(self, closed: list[int], index: int) -> None:
        self.closed = closed
        self.index = index

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in (b"stream", b"ed"):
            await anyio.lowlevel.checkpoint()
            yield piece

    async def aclose(self) -> None:
        self.closed.append(self.index)


def streamed_race(backend: str) -> None:
    """Two copies answer with streamed bodies in one turn: one is returned and reads in full, the other is closed."""
    closed: list[int] = []
    requests = 0
    both_sent = anyio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal requests
        index = requests
        requests += 1
        if index == 1:
            both_sent.set()
        await both_sent.wait()
        return httpx.Response(200, stream=Tracked(closed, index))

    async def main() -> None:
        policy = only(hedge=HedgePolicy(delay=0.001, budget=1.0), bulkhead=BulkheadPolicy())
        registry = CollectorRegistry()
        t = ResilientTransport(default=policy, inner=httpx.MockTransport(handler), registry=registry)
        async with httpx.AsyncClient(transport=t, base_url="https://api.example.com") as c:
            async with c.stream("GET", "/") as response:
                assert len(closed) == 1  # the loser, closed before the winner was returned
                assert await response.aread() == b"streamed"
            assert sorted(closed) == [0, 1]
            assert (
                registry.get_sample_value("resilient_http_bulkhead_in_flight", {"transport": "default", **where(HOST)})
                == 0
            )

    anyio.run(main, backend=backend)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_losers_response_is_closed_and_the_winners_body_streams_after_the_race(backend: str) -> None:
    """No task group holds the winner's body; the loser's connection (here its stream) is closed."""
    streamed_race(backend)


def cancelled_race(backend: str) -> None:
    """The caller gives up while two copies are in flight: both are cancelled and awaited, every slot is back."""
    started = 0
    cancelled = 0
    both_sent = anyio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal started, cancelled
        started += 1
        if started == 2:
            both_sent.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled += 1
            raise
        raise AssertionError("unreachable")

    async def main() -> None:
        registry = CollectorRegistry()
        policy = only(hedge=HedgePolicy(delay=0.001, budget=1.0), bulkhead=BulkheadPolicy())
        t = ResilientTransport(default=policy, inner=httpx.MockTransport(handler), registry=registry)
        async with httpx.AsyncClient(transport=t, base_url="https://api.example.com") as c:
            async with anyio.create_task_group() as tg:
                tg.start_soon(c.get, "/")
                await both_sent.wait()
                tg.cancel_scope.cancel()
            assert (started, cancelled) == (2, 2)
            # Read while the transport is open: a closed transport's series leave the registry.
            assert (
                registry.get_sample_value("resilient_http_bulkhead_in_flight", {"transport": "default", **where(HOST)})
                == 0
            )
            assert (
                registry.get_sample_value(
                    "resilient_http_hedges_total", {"transport": "default", **where(HOST), "result": "lost"}
                )
                == 1
            )

    anyio.run(main, backend=backend)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_cancelled_call_cancels_and_awaits_every_copy(backend: str) -> None:
    """Cancellation reaches every copy in flight; their slots are given back."""
    cancelled_race(backend)


@pytest.mark.parametrize(
    ("layers", "reason"),
    [
        ({"bulkhead": BulkheadPolicy(max_concurrent=1, dry_run=True)}, "bulkhead_full"),
        ({"rate_limit": RateLimitPolicy(rate=1, burst=1, dry_run=True)}, "rate_limit"),
    ],
)
def test_a_layer_in_dry_run_mode_still_keeps_hedges_within_its_limit(layers: dict[str, Any], reason: str) -> None:
    """Dry run lets calls through, not the library's own extra load: the hedge is not sent, and no call was blocked."""
    upstream = Upstream((0.1, 200), (0.01, 200))

    async def main() -> None:
        async with client(upstream, only(hedge=FIXED, **layers)) as c:
            story = info(await c.get("/"))
        assert (story.hedges, story.hedge_stop, story.dry_run) == (0, reason, ())
        assert len(upstream.arrivals) == 1

    run(main)


# ---------------------------------------------------------------- live policy changes


def test_the_latencies_seen_survive_a_new_hedge_policy() -> None:
    """A new HedgePolicy keeps the layer's latencies: no second warm-up, the next slow call is hedged at the p95."""
    latencies = [0.01 * (i + 1) for i in range(20)]
    upstream = Upstream(*[(seconds, 200) for seconds in latencies], (1.0, 200), (0.01, 200))

    async def main() -> None:
        t = transport(upstream, only(hedge=HedgePolicy(budget=1.0)))
        async with httpx.AsyncClient(transport=t, base_url="https://api.example.com") as c:
            for _ in range(20):
                assert info(await c.get("/")).hedges == 0
            t.update_policies(default=only(hedge=HedgePolicy(budget=0.5, min_delay=0.02)))
            response = await c.get("/")
        assert info(response).hedge_won
        assert upstream.arrivals[21] - upstream.arrivals[20] == pytest.approx(0.19)

    run(main)


def test_a_breaker_turned_off_and_on_again_leaves_no_gate_behind() -> None:
    """The dropped breaker, open when it went, no longer refuses hedges: the fresh one, closed, lets them go."""
    breaker = CircuitBreakerPolicy(minimum_calls=1, failure_ratio=0.5, break_duration=100, max_break_duration=200)
    policy = only(hedge=FIXED, circuit_breaker=breaker)
    sent = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal sent
        if request.url.path == "/fail":
            return httpx.Response(500)
        sent += 1
        await trio.sleep(0.2 if sent == 1 else 0.01)
        return httpx.Response(200)

    async def main() -> None:
        t = transport(handler, policy)
        async with httpx.AsyncClient(transport=t, base_url="https://api.example.com") as c:
            assert info(await c.get("/fail")).circuit_state == "open"
            t.update_policies(default=HEDGED)
            t.update_policies(default=policy)
            story = info(await c.get("/"))
            assert (story.circuit_state, story.hedges, story.hedge_won, story.hedge_stop) == ("closed", 1, True, None)
            (host,) = t._hosts.values()
            assert len(host.hedge_gates) == 1

    run(main)


def test_layers_turned_off_take_their_hedge_gates_with_them() -> None:
    """Retry, breaker and bulkhead each ask hedges for their share; dropped by a new policy, none is asked again."""
    every = only(hedge=FIXED, retry=RetryPolicy(), circuit_breaker=CircuitBreakerPolicy(), bulkhead=BulkheadPolicy())

    async def main() -> None:
        t = transport(Upstream((0.01, 200)), every)
        async with httpx.AsyncClient(transport=t, base_url="https://api.example.com") as c:
            await c.get("/")
            (host,) = t._hosts.values()
            assert len(host.hedge_gates) == 3
            t.update_policies(default=HEDGED)
            assert host.hedge_gates == []
            t.update_policies(default=every)
            await c.get("/")
            assert len(host.hedge_gates) == 3

    run(main)


# ---------------------------------------------------------------- configuration


def test_hedging_sits_between_retry_and_the_bulkhead() -> None:
    """The breaker and retry judge the race as one attempt; each copy takes its own bulkhead slot."""
    names = [name for name, _ in ORDER]
    assert names.index("circuit_breaker") < names.index("retry") < names.index("hedge") < names.index("bulkhead")


def test_hedging_is_off_by_default() -> None:
    """Policy() sends one copy; hedging is opt-in per host."""
    assert Policy().hedge is None
    assert HedgePolicy().delay is None  # and adaptive when on


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"delay": 0}, "HedgePolicy.delay"),
        ({"delay": -1}, "HedgePolicy.delay"),
        ({"quantile": 1.0}, "HedgePolicy.quantile"),
        ({"quantile": 0.2}, "HedgePolicy.quantile"),
        ({"min_delay": float("nan")}, "HedgePolicy.min_delay"),
        ({"warmup": 0}, "HedgePolicy.warmup"),
        ({"warmup": 201}, "HedgePolicy.warmup"),
        ({"max_hedges": 0}, "HedgePolicy.max_hedges"),
        ({"max_hedges": 11}, "HedgePolicy.max_hedges"),
        ({"budget": 0}, "HedgePolicy.budget"),
        ({"budget": 1.5}, "HedgePolicy.budget"),
    ],
)
def test_bad_hedge_settings_are_refused_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    """Each bound raises ConfigurationError with the field and the value."""
    with pytest.raises(ConfigurationError) as caught:
        HedgePolicy(**kwargs)
    assert caught.value.field == field
    assert caught.value.value == next(iter(kwargs.values())) or field == "HedgePolicy.min_delay"


def test_a_fixed_delay_must_be_below_the_total_timeout() -> None:
    """A hedge that could never be sent is a configuration error."""
    with pytest.raises(ConfigurationError, match=r"HedgePolicy.delay.*TimeoutPolicy.total"):
        Policy(hedge=HedgePolicy(delay=30), timeout=TimeoutPolicy(total=30))
    Policy(hedge=HedgePolicy(delay=29), timeout=TimeoutPolicy(total=30))


def test_hedging_in_toml() -> None:
    """`hedge = true` adapts the delay; a table sets its fields; bad keys name their path."""
    policies, default = parse_policies(
        {"default": {"hedge": True}, "hosts": {"api.x": {"hedge": {"delay": 0.05, "max_hedges": 2}}}}
    )
    assert default.hedge == HedgePolicy()
    assert policies["api.x"].hedge == HedgePolicy(delay=0.05, max_hedges=2)
    with pytest.raises(ConfigurationError) as caught:
        parse_policies({"default": {"hedge": {"dealy": 0.05}}})
    assert caught.value.field == "default.hedge.dealy"
