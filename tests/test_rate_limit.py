"""The rate limiter: the bound the host sees, fair queueing, refusals, and what the server says.

The server is an ``httpx.MockTransport`` handler that records, on the fake
clock, when each call reached it. A :class:`FakeClock` moves time forward
as each sleeper calls ``sleep``, which would squeeze concurrent waits
together; tests that run calls concurrently therefore use a
:class:`SteppedClock`, which wakes sleepers one at a time in deadline order
once every task is blocked (trio's autojump clock, for anyio on asyncio), so
that the arrival times the server records are the times the calls were sent.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import random
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from email.utils import formatdate
from typing import Any

import anyio
import httpx
import pytest
from conftest import LeftOpen, where
from prometheus_client import CollectorRegistry

from resilient_http import (
    CallInfo,
    ConfigurationError,
    Policy,
    RateLimitedError,
    RateLimitPolicy,
    ResilientTransport,
    RetryPolicy,
    TimeoutPolicy,
    Wait,
)
from resilient_http._call import Call
from resilient_http._pipeline import ORDER
from resilient_http._toml import parse_policies
from resilient_http.layers._bucket import Bucket
from resilient_http.testing import FakeClock

HOST = "api.example.com:443"
START = 1000.0  # FakeClock's first reading
# Sends recorded on the fake clock are sums of float intervals.
EPSILON = 1e-9

Answer = tuple[int, Mapping[str, str]]
Job = Callable[[], Coroutine[Any, Any, None]]


class SteppedClock(FakeClock):
    """A FakeClock whose sleepers wake one at a time, earliest deadline first, once all tasks are blocked."""

    def __init__(self) -> None:
        super().__init__()
        self._sleepers: list[tuple[float, int, anyio.Event]] = []
        self._cancelled: set[int] = set()
        self._order = itertools.count()
        #: Task id -> seconds by which its next sleep wakes late, as on a busy event loop.
        self.lag: dict[int, float] = {}

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        late = self.lag.pop(anyio.get_current_task().id, 0.0)
        entry = (self.now() + max(0.0, seconds) + late, next(self._order), anyio.Event())
        heapq.heappush(self._sleepers, entry)
        try:
            await entry[2].wait()
        except BaseException:
            self._cancelled.add(entry[1])
            raise

    async def drive(self) -> None:
        """Advance to the next deadline whenever nothing else can run; run beside the code under test."""
        while True:
            for _ in range(5):  # let woken tasks settle first: the fallback below polls every 0.1 s
                await anyio.lowlevel.checkpoint()
            await anyio.wait_all_tasks_blocked()
            while self._sleepers:
                when, order, event = heapq.heappop(self._sleepers)
                if order not in self._cancelled:
                    self.advance(max(0.0, when - self.now()))
                    event.set()
                    break

    async def run(self, *jobs: Job) -> None:
        """Run ``jobs`` concurrently on this clock until they all end."""
        with anyio.fail_after(10):  # real seconds: a lost wake-up fails instead of hanging
            async with anyio.create_task_group() as outer:
                outer.start_soon(self.drive)
                async with anyio.create_task_group() as group:
                    for job in jobs:
                        group.start_soon(job)
                outer.cancel_scope.cancel()


class ManualClock(FakeClock):
    """A FakeClock whose time moves only when the test advances it; a sleeper wakes once its deadline has passed."""

    def __init__(self) -> None:
        super().__init__()
        self._sleepers: list[tuple[float, anyio.Event]] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        event = anyio.Event()
        self._sleepers.append((self.now() + seconds, event))
        await event.wait()

    def advance(self, seconds: float) -> None:
        super().advance(seconds)
        for when, event in self._sleepers:
            if when <= self.now():
                event.set()


class Server:
    """Answers each path with its scripted answers in turn (then 200s), recording when each call arrived.

    A path in ``slow`` is answered that many seconds after it arrives.
    """

    def __init__(
        self,
        clock: FakeClock,
        answers: Mapping[str, Sequence[Answer]] | None = None,
        slow: Mapping[str, float] | None = None,
    ) -> None:
        self.clock = clock
        self.answers = {path: list(steps) for path, steps in (answers or {}).items()}
        self.slow = slow or {}
        self.sent: list[tuple[float, str]] = []

    @property
    def times(self) -> list[float]:
        return [when for when, _ in self.sent]

    @property
    def paths(self) -> list[str]:
        return [path for _, path in self.sent]

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.sent.append((self.clock.now(), path))
        delay = self.slow.get(path)
        if delay is not None:
            await self.clock.sleep(delay)
        steps = self.answers.get(path)
        if steps:
            status, headers = steps.pop(0)
            return httpx.Response(status, headers=headers)
        return httpx.Response(200)


def client(
    server: Server,
    registry: CollectorRegistry,
    *,
    rate: float,
    burst: int = 1,
    max_wait: float | None = None,
    max_cooldown: float = 60.0,
    **layers: Any,
) -> httpx.AsyncClient:
    """A client over a transport with the rate limiter and ``layers`` only."""
    off: dict[str, Any] = {"timeout": None, "retry": None, "circuit_breaker": None, "bulkhead": None}
    limit = RateLimitPolicy(rate=rate, burst=burst, max_wait=max_wait, max_cooldown=max_cooldown)
    policy = Policy(**{**off, **layers, "rate_limit": limit})
    transport = ResilientTransport(
        default=policy,
        inner=httpx.MockTransport(server),
        registry=registry,
        clock=server.clock,
        random=random.Random(0),
    )
    return httpx.AsyncClient(transport=LeftOpen(transport), base_url="https://api.example.com")


def most_in_one_second(times: Sequence[float]) -> int:
    """The most sends in any closed one-second window."""
    ordered = sorted(times)
    return max((sum(1 for t in ordered if start <= t <= start + 1.0 + EPSILON) for start in ordered), default=0)


def within_bucket(times: Sequence[float], rate: float, burst: int) -> bool:
    """Whether the sends fit a token bucket of ``rate`` and ``burst`` (GCRA), which implies the one-second bound."""
    interval = 1.0 / rate
    tat = -float("inf")
    for when in sorted(times):
        if when < tat - (burst - 1) * interval - EPSILON:
            return False
        tat = max(tat, when) + interval
    return True


def value(registry: CollectorRegistry, name: str) -> float:
    found = registry.get_sample_value(name, {"transport": "default", **where(HOST)})
    return 0.0 if found is None else found


def info(response: httpx.Response) -> CallInfo:
    found = response.extensions["resilient_http"]
    assert isinstance(found, CallInfo)
    return found


# The bucket


async def test_calls_within_the_burst_go_at_once_and_the_next_waits_one_interval(registry: CollectorRegistry) -> None:
    """`burst` calls go at once; the next waits 1/rate and records that wait on the call."""
    server = Server(FakeClock())
    async with client(server, registry, rate=2, burst=3) as http:
        responses = [await http.get(f"/{i}") for i in range(4)]
    assert server.times == [START, START, START, START + 0.5]
    assert [info(r).waits for r in responses] == [(), (), (), (Wait("rate_limit", 0.5),)]


@pytest.mark.parametrize(("rate", "burst"), [(5.0, 3), (2.5, 1), (40.0, 10)])
async def test_the_host_never_sees_more_than_rate_plus_burst_calls_in_any_second(
    registry: CollectorRegistry, rate: float, burst: int
) -> None:
    """Many concurrent calls, in bursts and trickles: every one-second window holds at most rate + burst sends."""
    clock = SteppedClock()
    server = Server(clock)
    rng = random.Random(7)
    crowd = 3 * (int(rate) + burst)  # enough at once to keep the limiter busy for seconds
    arrivals = [0.0] * crowd + [rng.uniform(0, 20) for _ in range(100)] + [10.0] * crowd
    async with client(server, registry, rate=rate, burst=burst) as http:

        def job(i: int, at: float) -> Job:
            async def run() -> None:
                await clock.sleep(at)
                await http.get(f"/{i}")

            return run

        await clock.run(*(job(i, at) for i, at in enumerate(arrivals)))
    assert len(server.sent) == len(arrivals)
    assert most_in_one_second(server.times) == int(rate) + burst  # at the bound, never beyond


async def test_queued_calls_are_sent_in_arrival_order(registry: CollectorRegistry) -> None:
    """Calls that queue are sent first come, first served, each 1/rate after the one before."""
    clock = SteppedClock()
    server = Server(clock)
    order = list(range(20))
    random.Random(3).shuffle(order)
    async with client(server, registry, rate=10) as http:

        def job(i: int, rank: int) -> Job:
            async def run() -> None:
                await clock.sleep(rank * 0.01)  # arrives well before its turn
                await http.get(f"/{i}")

            return run

        await clock.run(*(job(i, rank) for rank, i in enumerate(order)))
    assert server.paths == [f"/{i}" for i in order]
    assert server.times == pytest.approx([START + 0.1 * rank for rank in range(20)])


async def test_calls_woken_late_by_a_busy_loop_do_not_go_in_a_bunch(registry: CollectorRegistry) -> None:
    """Waiting calls whose wake-ups run late, so that they would all wake at once, still go within rate + burst."""
    clock = SteppedClock()
    server = Server(clock)
    async with client(server, registry, rate=2, burst=1) as http:

        def job(i: int) -> Job:
            async def run() -> None:
                await clock.sleep(i * 0.001)
                clock.lag[anyio.get_current_task().id] = max(0.0, 3.0 - 0.5 * i)  # due at +0.5 i, woken at +3
                await http.get(f"/{i}")

            return run

        await clock.run(*(job(i) for i in range(10)))
    assert server.paths == [f"/{i}" for i in range(10)]
    assert most_in_one_second(server.times) <= 2 + 1
    assert within_bucket(server.times, rate=2, burst=1)


async def test_a_call_that_finds_a_token_free_hands_back_the_rest_of_the_chain_itself(
    registry: CollectorRegistry,
) -> None:
    """A free token is taken without a frame of the limiter's around the call; a spent one, through its wait."""
    clock = FakeClock()
    transport = ResilientTransport(
        default=Policy(rate_limit=RateLimitPolicy(rate=1)),
        inner=httpx.MockTransport(Server(clock)),
        registry=registry,
        clock=clock,
    )
    async with httpx.AsyncClient(transport=transport, base_url="https://api.example.com") as http:
        request = (await http.get("/")).request  # the host and its limiter are made; the token is spent
    (host,) = transport._hosts.entries.values()
    limiter = host.layers["rate_limit"]
    answer = httpx.Response(200)
    handed: list[Awaitable[httpx.Response]] = []

    def rest(call: Call) -> Awaitable[httpx.Response]:
        async def send() -> httpx.Response:
            return answer

        handed.append(send())
        return handed[-1]

    clock.advance(1.0)  # a token is free again
    free = limiter(Call(request, host, host.policy, clock.now()), rest)
    assert handed == [free]
    assert await free is answer
    spent = limiter(Call(request, host, host.policy, clock.now()), rest)
    assert handed == [free]  # not sent before its turn
    assert await spent is answer
    assert clock.now() == START + 2.0 and len(handed) == 2


# The bucket's arithmetic (virtual seconds)


def test_a_booking_far_ahead_leaves_the_tokens_before_it_free() -> None:
    """With a retry booked at 5, a call at 2 fits at 2; one at 4.5 would starve the booking and goes after it."""
    bucket = Bucket(rate=1, burst=1)
    bucket.send(0.0)
    bucket.book(5.0)
    assert bucket.fit(bucket.now, 2.0)[0] == 2.0
    assert bucket.fit(bucket.now, 4.5)[0] == 6.0


def test_a_burst_fits_around_a_booking_as_far_as_its_tokens_go() -> None:
    """Burst 3 and a booking at 1: three calls fit at 0, a fourth would leave the booking short and goes after it."""
    bucket = Bucket(rate=1, burst=3)
    bucket.book(1.0)
    turns = []
    state = bucket.now
    for _ in range(4):
        turn, state = bucket.fit(state, 0.0)
        turns.append(turn)
    assert turns == [0.0, 0.0, 0.0, 2.0]
    assert within_bucket([*turns, 1.0], rate=1, burst=3)
    assert not within_bucket([0.0, 0.0, 0.0, 0.0, 1.0], rate=1, burst=3)


def test_due_bookings_count_as_sends() -> None:
    """Bookings due by now are counted, in order, and forgotten; the rest stay."""
    bucket = Bucket(rate=2, burst=1)
    for booked in (0.5, 1.0, 3.0):
        bucket.book(booked)
    assert bucket.settle(1.0) == 2
    assert bucket.bookings == [3.0]
    assert bucket.fit(bucket.now, 1.0)[0] == 1.5


# Refusals


async def test_call_whose_turn_is_beyond_max_wait_fails_at_once_with_retry_after(registry: CollectorRegistry) -> None:
    """A turn later than max_wait raises RateLimitedError with the time to that turn, and keeps no reservation."""
    clock = FakeClock()
    server = Server(clock)
    async with client(server, registry, rate=1, max_wait=0.5) as http:
        await http.get("/first")
        with pytest.raises(RateLimitedError) as refused:
            await http.get("/second")
        clock.advance(1.0)
        await http.get("/third")  # the refused call left the next turn free
    assert refused.value.retry_after == pytest.approx(1.0)
    assert refused.value.host == HOST
    assert server.sent == [(START, "/first"), (START + 1.0, "/third")]
    assert clock.sleeps == []
    assert value(registry, "resilient_http_rate_limited_total") == 1


async def test_max_wait_zero_fails_fast_without_waiting(registry: CollectorRegistry) -> None:
    """With max_wait=0 a call with no token free fails at once; it never sleeps."""
    clock = FakeClock()
    server = Server(clock)
    async with client(server, registry, rate=10, burst=2, max_wait=0) as http:
        await http.get("/1")
        await http.get("/2")
        with pytest.raises(RateLimitedError) as refused:
            await http.get("/3")
    assert refused.value.retry_after == pytest.approx(0.1)
    assert len(server.sent) == 2
    assert clock.sleeps == []


async def test_total_deadline_bounds_the_wait(registry: CollectorRegistry) -> None:
    """Without max_wait, a call whose turn comes at or after its total deadline is refused when it arrives."""
    clock = SteppedClock()
    server = Server(clock)
    outcomes: list[str] = []
    timeout = TimeoutPolicy(attempt=1.0, total=2.0)
    async with client(server, registry, rate=1, timeout=timeout) as http:

        def job(i: int) -> Job:
            async def run() -> None:
                try:
                    await http.get(f"/{i}")
                except RateLimitedError as exc:
                    outcomes.append(f"/{i} refused at +{clock.now() - START}, retry_after {exc.retry_after}")
                else:
                    outcomes.append(f"/{i} sent at +{clock.now() - START}")

            return run

        await clock.run(*(job(i) for i in range(4)))
    # Turns at +0, +1, then +2, the deadline itself: no time would be left to send.
    assert sorted(outcomes) == [
        "/0 sent at +0.0",
        "/1 sent at +1.0",
        "/2 refused at +0.0, retry_after 2.0",
        "/3 refused at +0.0, retry_after 2.0",  # /2 gave its turn back
    ]


# Cooldown: the server says when to come back


def _http_date(seconds_from_now: float, clock: FakeClock) -> str:
    return formatdate(clock.wall() + seconds_from_now, usegmt=True)


@pytest.mark.parametrize(
    ("status", "retry_after"),
    [(429, "5"), (503, "5"), (429, "date")],
)
async def test_retry_after_holds_back_every_call_to_the_host(
    registry: CollectorRegistry, status: int, retry_after: str
) -> None:
    """A 429, or a 503 with Retry-After (seconds or a date), sends nothing to the host before that time."""
    clock = FakeClock()
    if retry_after == "date":
        headers = {"Retry-After": _http_date(5, clock), "Date": _http_date(0, clock)}
    else:
        headers = {"Retry-After": retry_after}
    server = Server(clock, {"/hinted": [(status, headers)]})
    async with client(server, registry, rate=100, burst=10) as http:
        assert (await http.get("/hinted")).status_code == status
        other = await http.get("/other")
    assert server.sent == [(START, "/hinted"), (START + 5.0, "/other")]
    assert info(other).waits == (Wait("rate_limit", 5.0),)
    assert value(registry, "resilient_http_cooldown_seconds_total") == 5.0


async def test_503_without_retry_after_does_not_hold_the_host_back(registry: CollectorRegistry) -> None:
    """A bare 503 is the breaker's business, not a quota signal: the next call goes at once."""
    clock = FakeClock()
    server = Server(clock, {"/a": [(503, {})]})
    async with client(server, registry, rate=100, burst=10) as http:
        await http.get("/a")
        await http.get("/b")
    assert server.times == [START, START]


@pytest.mark.parametrize("retry_after", [None, "soon", "-3", "Fri, 99 Foo 2024"])
async def test_429_without_a_usable_retry_after_cools_down_one_token_interval(
    registry: CollectorRegistry, retry_after: str | None
) -> None:
    """A 429 with no (or a malformed) Retry-After holds the host back for 1/rate, never fails."""
    clock = FakeClock()
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    server = Server(clock, {"/a": [(429, headers)]})
    async with client(server, registry, rate=4, burst=10) as http:
        await http.get("/a")
        await http.get("/b")
    assert server.times == [START, START + 0.25]


async def test_call_that_cannot_wait_out_a_cooldown_fails_fast(registry: CollectorRegistry) -> None:
    """A cooldown longer than max_wait refuses later calls at once, with retry_after up to its end."""
    clock = FakeClock()
    server = Server(clock, {"/a": [(429, {"Retry-After": "30"})]})
    async with client(server, registry, rate=100, burst=10, max_wait=1.0) as http:
        await http.get("/a")
        clock.advance(10)
        with pytest.raises(RateLimitedError) as refused:
            await http.get("/b")
    assert refused.value.retry_after == pytest.approx(20.0)
    assert clock.sleeps == []
    assert server.paths == ["/a"]


async def test_waiting_calls_are_held_back_by_a_cooldown_and_keep_their_order_and_spacing(
    registry: CollectorRegistry,
) -> None:
    """A cooldown that begins while calls wait moves them all back: none is sent before it ends, and none early."""
    clock = SteppedClock()
    # /0 is answered 0.5 s after it is sent, by a 429 asking for 10 s; /1../3 wait their turn meanwhile.
    server = Server(clock, {"/0": [(429, {"Retry-After": "10"})]}, slow={"/0": 0.5})
    async with client(server, registry, rate=1) as http:

        def job(i: int) -> Job:
            async def run() -> None:
                await clock.sleep(i * 0.001)
                await http.get(f"/{i}")

            return run

        await clock.run(*(job(i) for i in range(4)))
    assert server.paths == ["/0", "/1", "/2", "/3"]
    held = server.times[1:]
    assert min(held) >= START + 10.5
    assert [b - a for a, b in itertools.pairwise(held)] == pytest.approx([1.0, 1.0])
    # Three calls waited out one 10 s pause: the host spent 10 s in cooldown.
    assert value(registry, "resilient_http_cooldown_seconds_total") == pytest.approx(10.0)


async def test_waiting_call_that_cannot_wait_out_a_new_cooldown_fails_when_it_begins(
    registry: CollectorRegistry,
) -> None:
    """A call already waiting is refused as soon as a cooldown pushes its turn past max_wait, not at its old turn."""
    clock = SteppedClock()
    server = Server(clock, {"/0": [(429, {"Retry-After": "30"})]}, slow={"/0": 0.5})
    refused: list[tuple[float, float | None]] = []
    async with client(server, registry, rate=1, max_wait=2.0) as http:

        async def first() -> None:
            await http.get("/0")

        async def second() -> None:
            await clock.sleep(0.001)
            try:
                await http.get("/1")
            except RateLimitedError as exc:
                refused.append((clock.now(), exc.retry_after))

        await clock.run(first, second)
    assert server.paths == ["/0"]
    [(when, retry_after)] = refused
    assert when == START + 0.5
    assert retry_after == pytest.approx(30.5)  # its turn moved from +1 to +31


async def test_calls_overdue_when_a_cooldown_begins_keep_their_place_in_line(registry: CollectorRegistry) -> None:
    """Calls whose turn had come but that a busy loop had not yet sent go first after the cooldown, in arrival order."""
    clock = SteppedClock()
    # /0 is answered at +2.2 by a 429 asking for 10 s. /1 and /2 were due at +1 and +2 but
    # their wake-ups run 1.5 s late; /3, due at +3, is simply waiting.
    server = Server(clock, {"/0": [(429, {"Retry-After": "10"})]}, slow={"/0": 2.2})
    async with client(server, registry, rate=1) as http:

        def job(i: int, late: float) -> Job:
            async def run() -> None:
                await clock.sleep(i * 0.001)
                clock.lag[anyio.get_current_task().id] = late
                await http.get(f"/{i}")

            return run

        await clock.run(job(0, 0.0), job(1, 1.5), job(2, 1.5), job(3, 0.0))
    assert server.paths == ["/0", "/1", "/2", "/3"]
    # The bucket had refilled before the cooldown began, and does not refill during it.
    assert server.times[1] == pytest.approx(START + 12.2)
    assert most_in_one_second(server.times) <= 2


# max_cooldown: no single response switches the host off for longer than the policy allows


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (429, {"Retry-After": "86400"}),
        (503, {"Retry-After": "86400"}),
        (200, {"RateLimit": '"default";r=0;t=86400'}),
        (200, {"RateLimit-Remaining": "0", "RateLimit-Reset": "86400"}),
    ],
    ids=["429", "503", "ratelimit-exhausted", "older-fields-exhausted"],
)
async def test_a_server_cooldown_is_cut_to_max_cooldown(
    registry: CollectorRegistry, status: int, headers: Mapping[str, str]
) -> None:
    """A day-long Retry-After or quota reset holds the host back for max_cooldown, no longer."""
    clock = FakeClock()
    server = Server(clock, {"/0": [(status, headers)]})
    async with client(server, registry, rate=100, burst=10, max_cooldown=30) as http:
        await http.get("/0")
        await http.get("/1")
    assert server.times == [START, START + 30.0]
    assert value(registry, "resilient_http_cooldown_seconds_total") == 30.0


async def test_max_cooldown_defaults_to_a_minute(registry: CollectorRegistry) -> None:
    """Without a max_cooldown of its own, a policy lets one response pause the host for at most 60 s."""
    clock = FakeClock()
    server = Server(clock, {"/0": [(429, {"Retry-After": "100000"})]})
    async with client(server, registry, rate=100, burst=10) as http:
        await http.get("/0")
        await http.get("/1")
    assert RateLimitPolicy(rate=1).max_cooldown == 60.0
    assert server.times == [START, START + 60.0]


async def test_ratelimit_spacing_is_cut_to_max_cooldown(registry: CollectorRegistry) -> None:
    """r=1 left for a day would space calls a day apart; they go max_cooldown apart instead."""
    clock = FakeClock()
    server = Server(clock, {"/0": [(200, {"RateLimit": '"day";r=2;t=86400'})]})
    async with client(server, registry, rate=100, burst=10, max_cooldown=30) as http:
        for i in range(3):
            await http.get(f"/{i}")
    assert server.times == [START, START + 30.0, START + 60.0]


async def test_a_cooldown_within_max_cooldown_is_kept_whole(registry: CollectorRegistry) -> None:
    """A Retry-After shorter than max_cooldown is obeyed to the second."""
    clock = FakeClock()
    server = Server(clock, {"/0": [(429, {"Retry-After": "29"})]})
    async with client(server, registry, rate=100, burst=10, max_cooldown=30) as http:
        await http.get("/0")
        await http.get("/1")
    assert server.times == [START, START + 29.0]


YEAR = 365 * 24 * 3600.0


@pytest.mark.parametrize("bad", [0, -1, 0.0009, YEAR * 2, float("inf"), float("nan"), True, "60"])
def test_max_cooldown_must_be_between_a_millisecond_and_a_year(bad: Any) -> None:
    """A bad max_cooldown fails when the policy is built, naming the field and the value."""
    with pytest.raises(ConfigurationError) as caught:
        RateLimitPolicy(rate=1, max_cooldown=bad)
    assert caught.value.field == "RateLimitPolicy.max_cooldown"
    assert caught.value.value is bad


@pytest.mark.parametrize("cap", [0.001, YEAR])
async def test_max_cooldown_at_its_bounds_holds_the_host_back_so_long(registry: CollectorRegistry, cap: float) -> None:
    """At a millisecond and at a year, the cap is exact arithmetic: no overflow, no early send."""
    clock = FakeClock()
    server = Server(clock, {"/0": [(429, {"Retry-After": str(int(YEAR * 10))})]})
    async with client(server, registry, rate=1_000_000, burst=10, max_cooldown=cap) as http:
        await http.get("/0")
        await http.get("/1")
    assert server.times == [START, START + cap]


def test_max_cooldown_is_read_from_toml_and_checked_there() -> None:
    """`max_cooldown` is a rate_limit key in TOML; a bad value names its key path."""
    policies, default = parse_policies(
        {"default": {"rate_limit": {"rate": 5, "max_cooldown": 15}}, "hosts": {"api.example.com": {}}}
    )
    assert default.rate_limit == RateLimitPolicy(rate=5, max_cooldown=15)
    assert policies["api.example.com"].rate_limit == RateLimitPolicy(rate=5, max_cooldown=15)
    with pytest.raises(ConfigurationError) as caught:
        parse_policies({"default": {"rate_limit": {"rate": 5, "max_cooldown": -3}}})
    assert caught.value.field == "default.rate_limit.max_cooldown"


# RateLimit fields: slowing down before the quota runs out


async def test_ratelimit_fields_space_calls_until_the_reset(registry: CollectorRegistry) -> None:
    """With r=2 left for t=10 s, calls go 5 s apart until the reset, then at the configured rate again."""
    clock = FakeClock()
    headers = {"RateLimit": '"default";r=2;t=10', "RateLimit-Policy": '"default";q=100;w=60'}
    server = Server(clock, {"/0": [(200, headers)]})
    async with client(server, registry, rate=100, burst=10) as http:
        for i in range(4):
            await http.get(f"/{i}")
    assert server.times == [START, START + 5.0, START + 10.0, START + 10.0]


@pytest.mark.parametrize(
    "headers",
    [
        {"RateLimit": '"default";r=0;t=7'},
        {"RateLimit": "default;r=0;t=7"},  # a token names the policy as well as a string
        {"RateLimit": '"default";r=0', "RateLimit-Policy": '"other";q=5;w=60, "default";q=100;w=7'},
        {"RateLimit": '"hour";r=500;t=3000, "minute";r=0;t=7'},
        {"RateLimit-Remaining": "0", "RateLimit-Reset": "7", "RateLimit-Limit": "100"},
        {"RateLimit": "r=0, t=7", "RateLimit-Remaining": "0", "RateLimit-Reset": "7"},
    ],
    ids=["string", "token", "window-from-policy", "tightest-policy", "older-fields", "older-after-malformed"],
)
async def test_quota_exhausted_cools_down_until_the_reset(
    registry: CollectorRegistry, headers: Mapping[str, str]
) -> None:
    """r=0, in each form the drafts use, holds the host back for t seconds, even on a 200."""
    clock = FakeClock()
    server = Server(clock, {"/0": [(200, headers)]})
    async with client(server, registry, rate=100, burst=10) as http:
        await http.get("/0")
        await http.get("/1")
    assert server.times == [START, START + 7.0]


async def test_the_tightest_of_several_quotas_sets_the_spacing(registry: CollectorRegistry) -> None:
    """Of two quotas, the one that asks for the wider spacing wins: r=2 for 100 s beats r=50 for 1 s."""
    clock = FakeClock()
    server = Server(clock, {"/0": [(200, {"RateLimit": '"second";r=50;t=1, "day";r=2;t=100'})]})
    async with client(server, registry, rate=100, burst=10) as http:
        await http.get("/0")
        await http.get("/1")
    assert server.times == [START, START + 50.0]


async def test_a_waiting_call_goes_earlier_when_the_server_loosens_its_pacing(registry: CollectorRegistry) -> None:
    """Paced 10 s apart, a waiting call goes as soon as another answer says the quota has room again."""
    clock = SteppedClock()
    server = Server(
        clock,
        {"/0": [(200, {"RateLimit": '"default";r=1;t=10'})], "/free": [(200, {"RateLimit": '"default";r=50;t=10'})]},
    )
    async with client(server, registry, rate=100, burst=10) as http:

        async def first() -> None:
            await http.get("/0")
            await http.get("/1")  # paced to +10

        async def free() -> None:  # not rate limited itself, but its answer is read for the host
            await clock.sleep(2.0)
            await http.get("/free", extensions={"resilient_http": {"rate_limit": None}})

        await clock.run(first, free)
    assert server.sent == [(START, "/0"), (START + 2.0, "/free"), (START + 2.0, "/1")]


async def test_retry_after_wins_over_ratelimit_fields(registry: CollectorRegistry) -> None:
    """A 429 with Retry-After: 3 and RateLimit r=0;t=60 holds the host back 3 s, not 60."""
    clock = FakeClock()
    headers = {"Retry-After": "3", "RateLimit": '"default";r=0;t=60'}
    server = Server(clock, {"/0": [(429, headers)]})
    async with client(server, registry, rate=100, burst=10) as http:
        await http.get("/0")
        await http.get("/1")
    assert server.times == [START, START + 3.0]


@pytest.mark.parametrize(
    "headers",
    [
        {"RateLimit": '"default";r=0;t=abc'},
        {"RateLimit": '"default";r=-1;t=10'},
        {"RateLimit": '"default";r=0.5;t=10'},
        {"RateLimit": '"default";r=0;t=10.0'},
        {"RateLimit": '"default";r=0;t="10"'},
        {"RateLimit": '"default";r=0;t=10,'},
        {"RateLimit": '"default;r=0;t=10'},
        {"RateLimit": '"default";R=0;T=10'},
        {"RateLimit": "r=0, t=10"},
        {"RateLimit": '"default";r=0;t=9999999999999999'},
        {"RateLimit": '"default";r=0'},
        {"RateLimit": '"default";r=0', "RateLimit-Policy": '"other";q=1;w=10'},
        {"RateLimit": ""},
        {"RateLimit": '"default";r=0;t=10 junk'},
        {"RateLimit": '"default"; ;r=0;t=10'},
        {"RateLimit": "\x00;r=0;t=10"},
        {"RateLimit-Remaining": "zero", "RateLimit-Reset": "10"},
        {"RateLimit-Remaining": "0", "RateLimit-Reset": "-5"},
        {"RateLimit-Remaining": "0"},
        {"RateLimit-Remaining": "0, 1", "RateLimit-Reset": "10"},
        {"RateLimit-Remaining": "0", "RateLimit-Reset": "Fri, 01 Jan 2100 00:00:00 GMT"},
    ],
)
async def test_malformed_ratelimit_fields_are_ignored(registry: CollectorRegistry, headers: Mapping[str, str]) -> None:
    """A malformed RateLimit field, close as it may be to r=0, neither fails the call nor slows the host."""
    clock = FakeClock()
    server = Server(clock, {"/0": [(200, headers)]})
    async with client(server, registry, rate=100, burst=10) as http:
        assert (await http.get("/0")).status_code == 200
        await http.get("/1")
    assert server.times == [START, START]
    assert clock.sleeps == []


# Retries are calls too


async def test_retries_take_tokens_too(registry: CollectorRegistry) -> None:
    """A retry waits for its own turn, after a short backoff, and the call records that wait."""
    clock = FakeClock()
    server = Server(clock, {"/a": [(503, {})]})
    retry = RetryPolicy(attempts=3, backoff=0.01, budget=None)
    async with client(server, registry, rate=1, retry=retry) as http:
        response = await http.get("/a")
        after = await http.get("/b")
    assert response.status_code == 200
    assert server.sent == [(START, "/a"), (pytest.approx(START + 1.0), "/a"), (pytest.approx(START + 2.0), "/b")]
    reasons = [wait.reason for wait in info(response).waits]
    assert reasons == ["backoff", "rate_limit"]
    assert sum(wait.seconds for wait in info(response).waits) == pytest.approx(1.0)
    [wait] = info(after).waits
    assert wait.reason == "rate_limit"
    assert wait.seconds == pytest.approx(1.0)


async def test_a_retry_waiting_out_its_retry_after_does_not_hold_back_calls_while_tokens_remain(
    registry: CollectorRegistry,
) -> None:
    """A retry booked 5 s ahead leaves the tokens it does not need to calls arriving meanwhile: first come, first go."""
    clock = SteppedClock()
    # A 502's Retry-After paces only the retry; it is no cooldown of the host.
    server = Server(clock, {"/a": [(502, {"Retry-After": "5"})]})
    retry = RetryPolicy(attempts=2, backoff=0.01, budget=None)
    results: dict[str, httpx.Response] = {}
    async with client(server, registry, rate=1, retry=retry) as http:

        def job(path: str, at: float) -> Job:
            async def run() -> None:
                await clock.sleep(at)
                results[path] = await http.get(path)

            return run

        await clock.run(job("/a", 0.0), job("/b", 2.0), job("/c", 4.5))
    assert server.paths == ["/a", "/b", "/a", "/c"]
    assert server.times[:2] == [START, START + 2.0]  # /b found a token free: it went at once
    assert info(results["/b"]).waits == ()
    retried = server.times[2]
    assert START + 5.0 <= retried <= START + 5.01
    # /c, at +4.5, would have left the retry no token: it goes after it.
    assert server.times[3] == pytest.approx(retried + 1.0)
    assert most_in_one_second(server.times) <= 2


async def test_calls_fit_between_retries_booked_ahead_without_breaking_the_bound(registry: CollectorRegistry) -> None:
    """Many retries booked seconds ahead, fresh calls arriving all along: all fit one token bucket."""
    clock = SteppedClock()
    server = Server(clock, {f"/r{i}": [(502, {"Retry-After": str(1 + i % 4)})] for i in range(20)})
    retry = RetryPolicy(attempts=2, backoff=0.3, budget=None)
    async with client(server, registry, rate=3, burst=2, retry=retry) as http:

        def job(path: str, at: float) -> Job:
            async def run() -> None:
                await clock.sleep(at)
                assert (await http.get(path)).status_code == 200

            return run

        rng = random.Random(5)
        retried = [job(f"/r{i}", i * 0.4) for i in range(20)]
        fresh = [job(f"/f{i}", rng.uniform(0, 10)) for i in range(40)]  # with the retries, twice the rate
        await clock.run(*retried, *fresh)
    assert len(server.sent) == 20 * 2 + 40
    assert within_bucket(server.times, rate=3, burst=2)


async def test_retries_keep_the_host_within_its_bound(registry: CollectorRegistry) -> None:
    """Concurrent calls whose attempts often fail and are retried still send at most rate + burst a second."""
    clock = SteppedClock()
    failures: dict[str, Sequence[Answer]] = {f"/{i}": [(503, {}), (502, {})] for i in range(0, 60, 2)}
    server = Server(clock, failures)
    retry = RetryPolicy(attempts=3, backoff=0.05, budget=None)
    async with client(server, registry, rate=5, burst=2, retry=retry) as http:

        def job(i: int) -> Job:
            async def run() -> None:
                await clock.sleep(i * 0.05)
                assert (await http.get(f"/{i}")).status_code == 200

            return run

        await clock.run(*(job(i) for i in range(60)))
    assert len(server.sent) == 60 + 2 * 30
    assert most_in_one_second(server.times) <= 5 + 2


async def test_a_cooldown_that_begins_during_a_retrys_backoff_holds_the_retry_back(registry: CollectorRegistry) -> None:
    """A 429 with Retry-After received by another call while a retry waits out its backoff delays that retry too."""
    clock = SteppedClock()
    server = Server(clock, {"/a": [(503, {})], "/b": [(429, {"retry-after": "5"})]})
    retry = RetryPolicy(attempts=2, backoff=1.0, max_backoff=1.0, budget=None)
    results: dict[str, httpx.Response] = {}
    async with client(server, registry, rate=100, burst=10, retry=retry) as http:

        async def first() -> None:
            results["a"] = await http.get("/a")

        async def second() -> None:
            await clock.sleep(0.001)  # inside /a's backoff (at least 0.001 s with this seed)
            results["b"] = await http.get("/b")

        await clock.run(first, second)
    retried = [when for when, path in server.sent if path == "/a"][1]
    assert retried >= START + 0.001 + 5.0 - EPSILON
    assert results["a"].status_code == 200
    assert [wait.reason for wait in info(results["a"]).waits] == ["backoff", "rate_limit"]


async def test_a_cooldown_past_the_deadline_ends_the_waiting_retry(registry: CollectorRegistry) -> None:
    """If the server's cooldown outlasts the call, the waiting retry fails with RateLimitedError instead of sending."""
    clock = SteppedClock()
    server = Server(clock, {"/a": [(503, {})], "/b": [(429, {"retry-after": "30"})]})
    retry = RetryPolicy(attempts=2, backoff=1.0, max_backoff=1.0, budget=None)
    errors: list[BaseException] = []
    async with client(
        server, registry, rate=100, burst=10, retry=retry, timeout=TimeoutPolicy(attempt=5, total=10)
    ) as http:

        async def first() -> None:
            try:
                await http.get("/a")
            except RateLimitedError as exc:
                errors.append(exc)

        async def second() -> None:
            await clock.sleep(0.001)
            await http.get("/b")

        await clock.run(first, second)
    assert [path for _, path in server.sent] == ["/a", "/b"]
    [error] = errors
    assert isinstance(error, RateLimitedError)
    assert error.retry_after is not None and error.retry_after > 25


@pytest.mark.parametrize(
    "limits",
    [{"max_wait": 0.5}, {"timeout": TimeoutPolicy(attempt=0.5, total=0.9)}],
    ids=["max_wait", "deadline"],
)
async def test_retry_whose_turn_comes_too_late_is_not_made(registry: CollectorRegistry, limits: dict[str, Any]) -> None:
    """When a retry's turn is past max_wait or the deadline, the last response is returned and says why."""
    clock = FakeClock()
    server = Server(clock, {"/a": [(503, {})]})
    retry = RetryPolicy(attempts=3, backoff=0.01, budget=None)
    async with client(server, registry, rate=1, retry=retry, **limits) as http:
        response = await http.get("/a")
        clock.advance(1.0)
        await http.get("/b")  # the refused retry left this turn free
    assert response.status_code == 503
    assert info(response).retry_stop == "rate_limit"
    assert server.sent == [(START, "/a"), (pytest.approx(START + 1.0), "/b")]


async def test_a_call_may_turn_the_rate_limiter_off_for_itself_and_its_retries(registry: CollectorRegistry) -> None:
    """With rate_limit=None in its extensions a call neither waits nor takes a token, not even for its retry."""
    clock = FakeClock()
    server = Server(clock, {"/free": [(503, {})]})
    retry = RetryPolicy(attempts=2, backoff=0.01, budget=None)
    async with client(server, registry, rate=1, retry=retry) as http:
        await http.get("/limited")
        free = await http.get("/free", extensions={"resilient_http": {"rate_limit": None}})
        await http.get("/limited")
    assert free.status_code == 200
    assert server.paths == ["/limited", "/free", "/free", "/limited"]
    assert server.times[:3] == pytest.approx([START, START, START], abs=0.011)
    assert server.times[3] == pytest.approx(START + 1.0)


# Cancellation


async def test_cancelled_waiting_call_gives_back_the_latest_turn(registry: CollectorRegistry) -> None:
    """A waiting call cancelled while nobody queued behind it frees its turn for the next arrival."""
    clock = SteppedClock()
    server = Server(clock)
    async with client(server, registry, rate=1) as http:

        async def first() -> None:
            await http.get("/first")

        async def cancelled() -> None:
            await clock.sleep(0.1)
            with scope:
                await http.get("/cancelled")

        async def canceller() -> None:
            await clock.sleep(0.2)
            scope.cancel()

        async def late() -> None:
            await clock.sleep(0.5)
            await http.get("/late")

        scope = anyio.CancelScope()
        await clock.run(first, cancelled, canceller, late)
    assert server.sent == [(START, "/first"), (START + 1.0, "/late")]


async def test_cancelled_call_in_the_middle_of_the_line_lets_the_calls_behind_it_move_up(
    registry: CollectorRegistry,
) -> None:
    """A waiting call cancelled with others queued behind it frees its turn for them, in order: no hole, no extra."""
    clock = SteppedClock()
    server = Server(clock)
    scope = anyio.CancelScope()
    async with client(server, registry, rate=1) as http:

        def job(i: int, at: float) -> Job:
            async def run() -> None:
                await clock.sleep(at)
                if i == 1:
                    with scope:
                        await http.get(f"/{i}")
                else:
                    await http.get(f"/{i}")

            return run

        async def canceller() -> None:
            await clock.sleep(0.2)
            scope.cancel()

        # /0 goes at +0, /1 waits for +1 and is cancelled, /2 moves up to +1; /3../5 arrive after.
        await clock.run(canceller, *(job(i, at) for i, at in enumerate([0, 0.01, 0.02, 0.5, 0.6, 0.7])))
    assert server.sent == [(START + i, f"/{path}") for i, path in enumerate([0, 2, 3, 4, 5])]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_hundreds_of_waiting_calls_cancelled_at_once_give_their_turns_back(backend: str) -> None:
    """300 calls waiting in line are cancelled together; a lone call afterwards is served at once (asyncio and trio)."""

    async def main() -> tuple[list[str], tuple[Wait, ...]]:
        clock = ManualClock()
        server = Server(clock)
        async with client(server, CollectorRegistry(), rate=1) as http:
            await http.get("/first")
            async with anyio.create_task_group() as group:
                for i in range(300):
                    group.start_soon(http.get, f"/{i}")
                await anyio.wait_all_tasks_blocked()
                group.cancel_scope.cancel()
            clock.advance(1.0)  # one interval: the bucket holds a token again
            with anyio.fail_after(5):  # real seconds: a turn never given back would hang here
                lone = await http.get("/lone")
        return server.paths, info(lone).waits

    paths, waits = anyio.run(main, backend=backend)
    assert paths == ["/first", "/lone"]
    assert waits == ()


async def test_cancelled_calls_never_let_the_host_exceed_its_bound(registry: CollectorRegistry) -> None:
    """Waiting calls cancelled at random points of a busy queue, arrivals going on: still rate + burst a second."""
    clock = SteppedClock()
    server = Server(clock)
    rng = random.Random(11)
    scopes: list[anyio.CancelScope] = []
    async with client(server, registry, rate=4, burst=2) as http:

        def job(i: int, at: float) -> Job:
            async def run() -> None:
                await clock.sleep(at)
                with anyio.CancelScope() as scope:
                    scopes.append(scope)
                    await http.get(f"/{i}")

            return run

        async def cancel_some() -> None:
            for _ in range(60):
                await clock.sleep(rng.uniform(0.0, 0.6))
                live = [scope for scope in scopes if not scope.cancel_called]
                if live:
                    rng.choice(live).cancel()

        arrivals = [rng.uniform(0, 20) for _ in range(150)]  # 7.5 a second against 4: a queue that keeps growing
        await clock.run(cancel_some, *(job(i, at) for i, at in enumerate(arrivals)))
    assert 0 < len(server.sent) < 150
    assert most_in_one_second(server.times) <= 4 + 2


# A new policy, and dry run: for calls in line and retries booked


def limit_to(http: httpx.AsyncClient, **limit: Any) -> None:
    """Give the client's transport a new rate limit, all else unchanged."""
    left_open = http._transport
    assert isinstance(left_open, LeftOpen)
    transport = left_open.transport
    assert isinstance(transport, ResilientTransport)
    policy = transport.policy_for("api.example.com")
    transport.update_policies(default=dataclasses.replace(policy, rate_limit=RateLimitPolicy(**limit)))


def line_of(http: httpx.AsyncClient, clock: SteppedClock, *paths: str, update: Callable[[], None]) -> list[Job]:
    """Jobs: ``paths`` requested at once, in order, and ``update`` made 0.5 s later."""

    def job(path: str) -> Job:
        async def run() -> None:
            await http.get(path)

        return run

    async def updater() -> None:
        await clock.sleep(0.5)
        update()

    return [*(job(path) for path in paths), updater]


async def test_a_larger_burst_sends_the_waiting_calls_at_once(registry: CollectorRegistry) -> None:
    """A new policy re-plans the line: calls waiting for the old rate go as soon as the new burst has room."""
    clock = SteppedClock()
    server = Server(clock)
    async with client(server, registry, rate=1) as http:
        await clock.run(*line_of(http, clock, "/0", "/1", "/2", "/3", update=lambda: limit_to(http, rate=1, burst=4)))
    assert server.sent == [(START, "/0"), (START + 0.5, "/1"), (START + 0.5, "/2"), (START + 0.5, "/3")]


async def test_a_lower_rate_refuses_the_waiting_calls_it_pushes_past_their_max_wait(
    registry: CollectorRegistry,
) -> None:
    """Turns taken stay; the line is spaced by the new rate, and a call that can no longer go in time fails then."""
    clock = SteppedClock()
    server = Server(clock)
    refused: list[tuple[float, RateLimitedError]] = []
    async with client(server, registry, rate=1, max_wait=3) as http:
        jobs = line_of(http, clock, "/0", "/1", "/2", update=lambda: limit_to(http, rate=0.5, max_wait=3))

        async def last() -> None:
            try:
                await http.get("/3")  # its turn, at +3, becomes +5
            except RateLimitedError as exc:
                refused.append((clock.now(), exc))

        await clock.run(*jobs, last)
    assert server.sent == [(START, "/0"), (START + 1.0, "/1"), (START + 3.0, "/2")]
    [(when, error)] = refused
    assert when == START + 0.5
    assert error.retry_after == pytest.approx(4.5)


async def test_a_retry_booked_before_a_new_rate_keeps_its_turn(registry: CollectorRegistry) -> None:
    """A booked retry goes when it was promised; a call that would take its token goes after it, at the new rate."""
    clock = SteppedClock()
    server = Server(clock, {"/a": [(502, {"Retry-After": "5"})]})
    retry = RetryPolicy(attempts=2, backoff=0.01, budget=None)
    async with client(server, registry, rate=1, retry=retry) as http:

        async def first() -> None:
            await http.get("/a")

        async def later() -> None:
            await clock.sleep(1.0)
            limit_to(http, rate=2)
            await clock.sleep(3.9)
            await http.get("/c")

        await clock.run(first, later)
    assert server.paths == ["/a", "/a", "/c"]
    retried = server.times[1]
    assert START + 5.0 <= retried <= START + 5.01
    assert server.times[2] == pytest.approx(retried + 0.5)


async def test_dry_run_turned_on_sends_the_waiting_calls_at_once(registry: CollectorRegistry) -> None:
    """Calls in line go when dry run begins, each reported as over the rate, with the wait they had."""
    clock = SteppedClock()
    server = Server(clock)
    responses: dict[str, httpx.Response] = {}
    async with client(server, registry, rate=1) as http:

        def job(path: str) -> Job:
            async def run() -> None:
                responses[path] = await http.get(path)

            return run

        async def updater() -> None:
            await clock.sleep(0.5)
            limit_to(http, rate=1, dry_run=True)

        await clock.run(job("/0"), job("/1"), job("/2"), updater)
    assert server.sent == [(START, "/0"), (START + 0.5, "/1"), (START + 0.5, "/2")]
    assert [info(responses[path]).dry_run for path in ("/0", "/1", "/2")] == [(), ("rate_limit",), ("rate_limit",)]
    assert info(responses["/2"]).waits == (Wait("rate_limit", 0.5),)
    assert (
        registry.get_sample_value(
            "resilient_http_dry_run_blocked_total", {"transport": "default", **where(HOST), "layer": "rate_limit"}
        )
        == 2
    )


# Metrics and wiring


async def test_metrics_count_waits_refusals_and_cooldown(registry: CollectorRegistry) -> None:
    """Every call let through observes its wait (0 included), refusals count, the host's cooldown time is summed."""
    clock = FakeClock()
    answers = {"/hinted": [(429, {"Retry-After": "2"})], "/2": [(429, {"Retry-After": "10"})]}
    server = Server(clock, answers)
    async with client(server, registry, rate=2, max_wait=3.0) as http:
        await http.get("/0")  # no wait
        await http.get("/1")  # 0.5 s for a token
        await http.get("/hinted")  # 0.5 s for a token; a 2 s cooldown begins
        await http.get("/2")  # 2 s of cooldown, then 0.5 s for a token; a 10 s cooldown begins
        with pytest.raises(RateLimitedError):
            await http.get("/3")  # cannot wait 10.5 s
    assert server.times == [START, START + 0.5, START + 1.0, START + 3.5]
    wait = "resilient_http_rate_limit_wait_seconds"
    assert value(registry, f"{wait}_count") == 4
    assert value(registry, f"{wait}_sum") == pytest.approx(3.5)
    assert registry.get_sample_value(f"{wait}_bucket", {"transport": "default", **where(HOST), "le": "0.005"}) == 1
    assert value(registry, "resilient_http_rate_limited_total") == 1
    assert value(registry, "resilient_http_cooldown_seconds_total") == pytest.approx(2.0 + 10.0)


def test_rate_limiter_comes_before_the_timeout_and_every_layer_that_costs() -> None:
    """Only the stale cache and coalescing (which sends nothing) are outside the rate limiter."""
    names = [name for name, _ in ORDER]
    assert set(names[: names.index("rate_limit")]) <= {"stale_cache", "coalesce"}
    assert names.index("rate_limit") < names.index("circuit_breaker") < names.index("retry")
