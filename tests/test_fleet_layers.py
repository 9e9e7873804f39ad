"""The layers with a shared store, on the fake clock: two transports sharing one MemoryStore are two workers.

What only real processes and a real Redis show is in test_fleet_network.py;
here, the logic: what is asked of the store, when, and what each worker
does with the answer or without one.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from conftest import BASE_URL, HOST, Script, only
from prometheus_client import CollectorRegistry

from resilient_http import (
    CircuitBreakerPolicy,
    CircuitOpenError,
    ConfigurationError,
    RateLimitedError,
    RateLimitPolicy,
    ResilientTransport,
    RetryBudget,
    RetryPolicy,
    call_info,
)
from resilient_http.store import UNAVAILABLE, Admission, Circuit, Maybe, MemoryStore, RedisStore, Unavailable
from resilient_http.testing import FakeClock

RATE = only(rate_limit=RateLimitPolicy(rate=2, burst=1, max_wait=0))
BREAKER = only(
    circuit_breaker=CircuitBreakerPolicy(minimum_calls=2, failure_ratio=0.5, break_duration=5, half_open_calls=1)
)


class CountingStore(MemoryStore):
    """A MemoryStore that counts the rate steps asked of it, can stop answering them, and says how many live.

    Transports sharing one MemoryStore share its worker id too, so the live
    workers it reports are the test's to set.
    """

    def __init__(self, live: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.admits = 0
        self.beats = 0
        self.down = False
        self.live = live

    async def heartbeat(self, ttl: float) -> Maybe[int]:
        self.beats += 1
        if self.down:
            return UNAVAILABLE
        await super().heartbeat(ttl)
        return self.live

    async def admit(self, upstream: str, **kwargs: Any) -> Maybe[Admission]:
        self.admits += 1
        if self.down:
            return UNAVAILABLE
        return await super().admit(upstream, **kwargs)


class ManualClock(FakeClock):
    """A fake clock whose sleeps wait until the test moves it (``FakeClock`` moves it by the sleep at once)."""

    def __init__(self) -> None:
        super().__init__(start=1000.0)
        self.sleeping = 0

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        until = self.now() + seconds
        self.sleeping += 1
        try:
            while self.now() < until:
                await anyio.lowlevel.checkpoint()
        finally:
            self.sleeping -= 1

    async def until(self, condition: Callable[[], bool]) -> None:
        """Let the other tasks run until ``condition`` holds (a bound for when it never does)."""
        with anyio.fail_after(5):
            while not condition():
                await anyio.lowlevel.checkpoint()
        for _ in range(20):  # and a little longer, for what follows from it
            await anyio.lowlevel.checkpoint()


Workers = Callable[..., list[httpx.AsyncClient]]


@pytest.fixture
async def workers(clock: FakeClock) -> AsyncIterator[Workers]:
    """``workers(n, policy, handler, store)``: n clients, each over its own transport, all on one store."""
    clients: list[httpx.AsyncClient] = []

    def make(n: int, policy: Any, handler: Any, store: Any) -> list[httpx.AsyncClient]:
        made = [
            httpx.AsyncClient(
                transport=ResilientTransport(
                    default=policy,
                    inner=httpx.MockTransport(handler),
                    registry=CollectorRegistry(),
                    clock=clock,
                    random=random.Random(i),
                    store=store,
                ),
                base_url=BASE_URL,
            )
            for i in range(n)
        ]
        clients.extend(made)
        return made

    yield make
    for client in clients:
        await client.aclose()


async def settle(*clients: httpx.AsyncClient) -> None:
    """Let every background store operation of the clients' transports end."""
    for client in clients:
        fleet = client._transport._fleet  # type: ignore[attr-defined]
        if fleet is not None:
            await fleet.settle()


# The rate limit


async def test_the_rate_limit_is_the_fleets(workers: Workers, clock: FakeClock) -> None:
    """Two workers, 2 calls a second between them: the second worker's call waits for the first's token."""
    store = MemoryStore(clock=clock)
    a, b = workers(2, RATE, Script(200), store)
    assert (await a.get("/")).status_code == 200
    with pytest.raises(RateLimitedError) as refused:
        await b.get("/")
    assert refused.value.retry_after == pytest.approx(0.5)
    clock.advance(0.5)
    assert (await b.get("/")).status_code == 200


async def test_without_a_store_each_worker_has_the_whole_rate(workers: Workers) -> None:
    """The default: no store, every transport decides alone."""
    a, b = workers(2, RATE, Script(200), None)
    assert (await a.get("/")).status_code == 200
    assert (await b.get("/")).status_code == 200


async def test_a_refusal_is_remembered_and_the_store_not_asked_again_before_it_ends(
    workers: Workers, clock: FakeClock
) -> None:
    """Denied until T: calls that cannot wait until T are refused without a round trip."""
    store = CountingStore(clock=clock)
    (a,) = workers(1, RATE, Script(200), store)
    await a.get("/")
    for _ in range(5):
        with pytest.raises(RateLimitedError):
            await a.get("/")
    assert store.admits == 2  # the call let through, and the first refusal
    clock.advance(0.5)
    await a.get("/")
    assert store.admits == 3


async def test_a_call_that_may_wait_sleeps_until_the_slot_the_fleet_gave_it(workers: Workers, clock: FakeClock) -> None:
    """With max_wait, the store reserves a later slot and the call is sent then."""
    policy = only(rate_limit=RateLimitPolicy(rate=2, burst=1, max_wait=2))
    sent: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(clock.now())
        return httpx.Response(200)

    a, b = workers(2, policy, handler, MemoryStore(clock=clock))
    start = clock.now()
    await a.get("/")
    await b.get("/")
    await a.get("/")
    assert [t - start for t in sent] == pytest.approx([0.0, 0.5, 1.0])


async def test_a_retry_after_seen_by_one_worker_holds_the_others(workers: Workers, clock: FakeClock) -> None:
    """A 429 Retry-After: 3 seen by A: B's calls get no slot for those 3 seconds."""
    policy = only(rate_limit=RateLimitPolicy(rate=100, burst=10, max_wait=0))
    a, b = workers(2, policy, Script((429, {"Retry-After": "3"}), 200), MemoryStore(clock=clock))
    assert (await a.get("/")).status_code == 429
    await settle(a)
    clock.advance(1)
    with pytest.raises(RateLimitedError) as refused:
        await b.get("/")
    assert refused.value.retry_after == pytest.approx(2)
    clock.advance(2)
    assert (await b.get("/")).status_code == 200


async def test_a_worker_that_learns_of_a_hold_holds_its_own_retries_too(workers: Workers, clock: FakeClock) -> None:
    """The hold in the store's answer becomes this worker's cooldown: its retry gate sends after it."""
    policy = only(
        rate_limit=RateLimitPolicy(rate=100, burst=10, max_wait=10),
        retry=RetryPolicy(attempts=2, backoff=0.01, max_backoff=0.01),
    )
    sent: list[float] = []
    answers = iter([httpx.Response(503), httpx.Response(200)])

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(clock.now())
        return next(answers)

    store = MemoryStore(clock=clock)
    (b,) = workers(1, policy, handler, store)
    await store.hold(HOST, 4)
    start = clock.now()
    assert (await b.get("/")).status_code == 200
    assert sent[0] - start == pytest.approx(4)
    assert sent[1] - start >= 4


async def test_when_the_store_cannot_answer_a_worker_keeps_its_share_of_the_rate(
    workers: Workers, clock: FakeClock, registry: CollectorRegistry
) -> None:
    """Store down, two live workers: each limits itself to rate / 2 (4 a second: one every half second)."""
    policy = only(rate_limit=RateLimitPolicy(rate=4, burst=2, max_wait=0))
    store = CountingStore(live=2, clock=clock)
    a, b = workers(2, policy, Script(200), store)
    await a.get("/")
    await b.get("/")
    await settle(a, b)  # both heartbeats counted: two live workers
    clock.advance(1)
    store.down = True
    assert (await a.get("/")).status_code == 200
    with pytest.raises(RateLimitedError) as refused:
        await a.get("/")
    assert refused.value.retry_after == pytest.approx(0.5)
    clock.advance(0.5)
    assert (await a.get("/")).status_code == 200
    store.down = False
    await a.get("/")  # the store answers again: it decides
    assert store.admits == 6  # every call asked; the unanswered ones were decided locally


async def test_a_worker_never_heard_by_the_store_takes_the_expected_fleet_size(
    workers: Workers, clock: FakeClock
) -> None:
    """Store down from the start, ``workers=4``: the worker falls back to rate / 4, never to the whole rate.

    Its share starts spent: its first token comes one share's interval in.
    """
    policy = only(rate_limit=RateLimitPolicy(rate=8, burst=4, max_wait=0))
    store = CountingStore(clock=clock, workers=4)
    store.down = True
    (a,) = workers(1, policy, Script(200), store)
    for _ in range(2):
        with pytest.raises(RateLimitedError) as refused:
            await a.get("/")
        assert refused.value.retry_after == pytest.approx(0.5)  # 2 a second, burst 1: its share
        clock.advance(0.5)
        assert (await a.get("/")).status_code == 200


async def test_the_first_call_awaits_the_workers_first_heartbeat(workers: Workers, clock: FakeClock) -> None:
    """The count is known before the first decision: with admits unanswered, the first call already uses rate / 3."""
    policy = only(rate_limit=RateLimitPolicy(rate=6, burst=1, max_wait=0))

    class NoAdmits(CountingStore):
        async def admit(self, upstream: str, **kwargs: Any) -> Maybe[Admission]:
            return UNAVAILABLE

    store = NoAdmits(live=3, clock=clock)
    (a,) = workers(1, policy, Script(200), store)
    with pytest.raises(RateLimitedError) as refused:  # its share starts spent
        await a.get("/")
    assert store.beats == 1
    assert refused.value.retry_after == pytest.approx(0.5)  # 2 a second (alone: 6 a second, 1/6 s)


async def test_while_the_fleet_starts_a_count_below_the_expected_size_is_not_trusted(
    workers: Workers, clock: FakeClock
) -> None:
    """The store counts 1 (the others have not beaten yet): the worker takes 4 for a heartbeat's life, then 1."""
    (a,) = workers(1, RATE, Script(200), CountingStore(live=1, clock=clock, workers=4))
    fleet = a._transport._fleet  # type: ignore[attr-defined]
    await a.get("/")
    assert fleet.workers == 4
    clock.advance(5)
    await a.get("/")  # its heartbeat is due
    await settle(a)
    assert fleet.workers == 1


async def test_sends_the_fleet_allowed_count_in_the_local_share_too(workers: Workers, clock: FakeClock) -> None:
    """Two sends through the store, then the store goes: the worker's share (1 a second) starts spent."""
    policy = only(rate_limit=RateLimitPolicy(rate=4, burst=2, max_wait=0))
    store = CountingStore(live=4, clock=clock)
    (a,) = workers(1, policy, Script(200), store)
    for _ in range(2):
        assert (await a.get("/")).status_code == 200
    store.down = True
    with pytest.raises(RateLimitedError) as refused:  # a full local bucket would have let it go
        await a.get("/")
    assert refused.value.retry_after == pytest.approx(1.0)
    clock.advance(1.0)
    assert (await a.get("/")).status_code == 200


async def test_a_saturated_fleet_asks_the_store_about_once_per_call_it_sends(
    workers: Workers, clock: FakeClock
) -> None:
    """Four workers offered ten times the fleet's rate: about one round trip per call sent, and never too many sent."""
    policy = only(rate_limit=RateLimitPolicy(rate=10, burst=2, max_wait=0))
    store = CountingStore(clock=clock)
    clients = workers(4, policy, Script(200), store)
    sent = 0
    for step in range(1000):  # 10 s, a call every 10 ms, each worker in turn
        try:
            await clients[step % 4].get("/")
            sent += 1
        except RateLimitedError:
            pass
        clock.advance(0.01)
    assert 95 <= sent <= 2 + 10 * 10
    assert store.admits <= 1.1 * sent  # one each and a few: without turns, each worker asked for every token


class OnTheWay(CountingStore):
    """A store whose rate steps take a moment: questions asked together are all on their way before any answer."""

    async def admit(self, upstream: str, **kwargs: Any) -> Maybe[Admission]:
        await anyio.lowlevel.checkpoint()
        return await super().admit(upstream, **kwargs)


async def together(calls: int, client: httpx.AsyncClient) -> list[int | float | None]:
    """``calls`` calls at once: the status of each, or the ``retry_after`` of its refusal."""
    outcomes: list[int | float | None] = []

    async def call() -> None:
        try:
            outcomes.append((await client.get("/")).status_code)
        except RateLimitedError as exc:
            outcomes.append(exc.retry_after)

    async with anyio.create_task_group() as group:
        for _ in range(calls):
            group.start_soon(call)
    return outcomes


async def test_of_a_workers_questions_on_their_way_at_once_only_one_takes_a_turn(
    workers: Workers, clock: FakeClock
) -> None:
    """Five calls of A are refused together: A takes one turn, so B's turn comes right after it, not five later."""
    a, b = workers(2, RATE, Script(200), OnTheWay(clock=clock))
    await a.get("/")
    assert await together(5, a) == pytest.approx([0.5] * 5)
    with pytest.raises(RateLimitedError) as turn:
        await b.get("/")
    assert turn.value.retry_after == pytest.approx(1.0)


async def test_a_refusing_workers_calls_wait_for_its_question_on_the_way_instead_of_asking(
    workers: Workers, clock: FakeClock
) -> None:
    """A has been refusing; at its turn five calls come at once: one asks and goes, four learn its answer and wait."""
    store = OnTheWay(clock=clock)
    (a,) = workers(1, RATE, Script(200), store)
    await a.get("/")
    with pytest.raises(RateLimitedError):
        await a.get("/")
    clock.advance(0.5)
    asked = store.admits
    assert sorted(await together(5, a), key=str) == [0.5, 0.5, 0.5, 0.5, 200]
    assert store.admits == asked + 1


async def test_a_call_that_slept_for_its_slot_asks_again_when_a_hold_became_known(workers: Workers) -> None:
    """B's slot was for 0.5 s; a hold until 3 s became known meanwhile: B asks again and goes after the hold."""
    clock = ManualClock()
    policy = only(rate_limit=RateLimitPolicy(rate=2, burst=1, max_wait=5))
    sent: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(clock.now())
        return httpx.Response(200)

    store = MemoryStore(clock=clock)
    transport = ResilientTransport(
        default=policy, inner=httpx.MockTransport(handler), registry=CollectorRegistry(), clock=clock, store=store
    )
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as a, anyio.create_task_group() as group:
        await a.get("/")  # at 0
        group.start_soon(a.get, "/")  # B: a slot at 0.5
        await clock.until(lambda: len(clock.sleeps) == 1)
        await store.hold(HOST, 3)
        group.start_soon(a.get, "/")  # C learns of the hold from the store's answer: a slot at 3
        await clock.until(lambda: len(clock.sleeps) == 2)
        clock.advance(0.5)  # B wakes, and asks again: a slot at 3.5
        await clock.until(lambda: len(clock.sleeps) == 3)
        clock.advance(2.5)
        await clock.until(lambda: len(sent) == 2)
        clock.advance(0.5)
        await clock.until(lambda: len(sent) == 3)
    assert [t - 1000.0 for t in sent] == [0.0, 3.0, 3.5]


async def test_a_dry_run_limiter_asks_the_fleet_for_a_slot_free_now_and_never_waits(
    workers: Workers, clock: FakeClock
) -> None:
    """Dry run: B finds the fleet's slot taken, is sent at once all the same, and is reported."""
    policy = only(rate_limit=RateLimitPolicy(rate=2, burst=1, max_wait=2, dry_run=True))
    a, b = workers(2, policy, Script(200), MemoryStore(clock=clock))
    start = clock.now()
    assert call_info(await a.get("/")).dry_run == ()  # type: ignore[union-attr]
    assert call_info(await b.get("/")).dry_run == ("rate_limit",)  # type: ignore[union-attr]
    assert clock.now() == start


async def test_a_new_policy_asks_the_fleet_by_its_rate_and_forgets_old_refusals(
    workers: Workers, clock: FakeClock
) -> None:
    """B refused at 2 a second; both take 4 a second with a burst of 3: B's next call goes at once."""
    a, b = workers(2, RATE, Script(200), MemoryStore(clock=clock))
    await a.get("/")
    with pytest.raises(RateLimitedError):
        await b.get("/")
    for client in (a, b):
        client._transport.update_policies(default=only(rate_limit=RateLimitPolicy(rate=4, burst=3, max_wait=0)))  # type: ignore[attr-defined]
    assert (await b.get("/")).status_code == 200


# The circuit breaker


async def _open_a(a: httpx.AsyncClient) -> None:
    for _ in range(2):
        assert (await a.get("/")).status_code == 503
    await settle(a)


async def test_once_one_worker_opens_its_breaker_the_others_learn_it(workers: Workers, clock: FakeClock) -> None:
    """A's failures open A's breaker; B, whose first call reads the fleet's circuit, fails fast too."""
    script = Script(503)
    a, b = workers(2, BREAKER, script, MemoryStore(clock=clock))
    await _open_a(a)
    with pytest.raises(CircuitOpenError) as refused:
        await b.get("/")
    assert refused.value.retry_after == pytest.approx(5, rel=0.2)
    assert script.calls == 2


async def test_a_worker_learns_of_an_open_circuit_within_a_second_on_its_own_calls(
    workers: Workers, clock: FakeClock
) -> None:
    """B was already calling: its next read of the fleet's circuit, a second later at most, stops it."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503 if request.url.path == "/fail" else 200)

    a, b = workers(2, BREAKER, handler, MemoryStore(clock=clock))
    await b.get("/")
    for _ in range(2):
        await a.get("/fail")
    await settle(a, b)
    assert (await b.get("/")).status_code == 200  # B read the fleet's circuit less than a second ago
    clock.advance(1)
    assert (await b.get("/")).status_code == 200  # the read due now is made in the background ...
    await settle(b)
    with pytest.raises(CircuitOpenError):  # ... and B stops
        await b.get("/")


async def test_after_the_break_exactly_half_open_calls_trials_go_out_fleet_wide(
    workers: Workers, clock: FakeClock
) -> None:
    """Three workers at the end of the break: one trial (half_open_calls=1) between them; its success closes all."""
    gate = anyio.Event()
    trials = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal trials
        if request.url.path == "/fail":
            return httpx.Response(503)
        trials += 1
        await gate.wait()
        return httpx.Response(200)

    store = MemoryStore(clock=clock)
    a, b, c = workers(3, BREAKER, handler, store)
    for client in (a, b, c):
        for _ in range(2):
            await client.get("/fail")
    await settle(a, b, c)
    clock.advance(6.1)  # past every jittered break
    outcomes: list[Any] = []

    async def call(client: httpx.AsyncClient) -> None:
        try:
            outcomes.append((await client.get("/")).status_code)
        except CircuitOpenError as exc:
            outcomes.append(exc)

    async with anyio.create_task_group() as group:
        for client in (a, b, c):
            group.start_soon(call, client)
        with anyio.fail_after(5):  # a bound for when the fleet lets more than one trial out
            while trials < 1 or len(outcomes) < 2:  # the trial in flight, the two others refused
                await anyio.lowlevel.checkpoint()
        gate.set()
    assert trials == 1
    assert sorted(str(o) if isinstance(o, int) else "refused" for o in outcomes) == ["200", "refused", "refused"]
    await settle(a, b, c)
    for client in (a, b, c):
        assert (await client.get("/")).status_code == 200
    assert await store.circuit(HOST) == Circuit("closed", 1, 0.0)


async def test_a_failed_fleet_trial_opens_the_next_round_for_everyone(workers: Workers, clock: FakeClock) -> None:
    """The one trial fails: the fleet's circuit opens again (round 2), and the other worker stays out."""
    store = MemoryStore(clock=clock)
    a, b = workers(2, BREAKER, Script(503), store)
    await _open_a(a)
    clock.advance(6.1)
    assert (await a.get("/")).status_code == 503  # the trial
    await settle(a)
    circuit = await store.circuit(HOST)
    assert not isinstance(circuit, Unavailable) and (circuit.state, circuit.round) == ("open", 2)
    with pytest.raises(CircuitOpenError):
        await b.get("/")


async def test_a_cancelled_fleet_trial_gives_its_slot_back(workers: Workers, clock: FakeClock) -> None:
    """While A's trial is in flight B is refused; once it is cancelled, its slot is free and B's trial may go."""
    arrived = anyio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/hang":
            arrived.set()
            await anyio.sleep_forever()
        return httpx.Response(503 if request.url.path == "/fail" else 200)

    store = MemoryStore(clock=clock)
    a, b = workers(2, BREAKER, handler, store)
    for _ in range(2):
        await a.get("/fail")
    await settle(a)
    clock.advance(6.1)
    async with anyio.create_task_group() as group:
        group.start_soon(a.get, "/hang")  # the trial
        with anyio.fail_after(5):
            await arrived.wait()
        with pytest.raises(CircuitOpenError):
            await b.get("/")
        group.cancel_scope.cancel()
    await settle(a)
    assert (await b.get("/")).status_code == 200


async def test_when_the_store_cannot_answer_the_breaker_decides_alone(workers: Workers, clock: FakeClock) -> None:
    """No fleet answer: the worker's own breaker opens and lets its own trial through."""

    class Down(MemoryStore):
        async def circuit(self, upstream: str) -> Any:
            return UNAVAILABLE

        async def open_circuit(self, upstream: str, seconds: float, *, after_round: int) -> Any:
            return UNAVAILABLE

    script = Script(503, 503, 200)
    (a,) = workers(1, BREAKER, script, Down(clock=clock))
    await _open_a(a)
    with pytest.raises(CircuitOpenError):
        await a.get("/")
    clock.advance(6.1)
    assert (await a.get("/")).status_code == 200


async def test_a_dry_run_breaker_does_not_open_the_fleets_circuit(workers: Workers, clock: FakeClock) -> None:
    """A's breaker runs dry and opens on its failures; B, a real breaker, is not stopped by it."""
    script = Script(503)
    dry = only(circuit_breaker=dataclasses.replace(BREAKER.circuit_breaker, dry_run=True))  # type: ignore[type-var]
    a, b = workers(2, dry, script, MemoryStore(clock=clock))
    b._transport.update_policies(default=BREAKER)  # type: ignore[attr-defined]
    await _open_a(a)
    assert (await b.get("/")).status_code == 503
    assert script.calls == 3


# The retry budget


async def test_the_retry_budgets_floor_is_divided_among_the_live_workers(workers: Workers, clock: FakeClock) -> None:
    """Floor 2 a second, ratio 0, two live workers: each may retry once a second, not twice."""
    policy = only(
        retry=RetryPolicy(attempts=2, backoff=0.001, budget=RetryBudget(ratio=0.0, min_per_second=2, window=1))
    )
    (a,) = workers(1, policy, Script(503), CountingStore(live=2, clock=clock))
    first = await a.get("/x")  # its retry beats: two live workers from now on
    assert first.extensions["resilient_http"].retry_stop == "attempts"
    await settle(a)
    second = await a.get("/x")
    assert second.extensions["resilient_http"].retry_stop == "budget"


# The transport


async def test_a_store_opened_from_a_url_is_closed_with_the_transport() -> None:
    """The transport owns what it opened; a store object stays its giver's."""
    pytest.importorskip("redis")
    transport = ResilientTransport(store="redis://127.0.0.1:1/0", registry=CollectorRegistry())
    store = transport._fleet.store  # type: ignore[union-attr]
    closed: list[bool] = []

    async def aclose() -> None:
        closed.append(True)

    store.aclose = aclose  # type: ignore[method-assign]
    await transport.aclose()
    assert closed == [True]

    given = MemoryStore()
    given.aclose = aclose  # type: ignore[method-assign]
    transport = ResilientTransport(store=given)
    await transport.aclose()
    assert closed == [True]


def test_memory_or_no_store_means_no_fleet() -> None:
    """The default and ``memory://`` keep every decision local: no store is asked, ever."""
    assert ResilientTransport()._fleet is None
    assert ResilientTransport(store="memory://")._fleet is None


def test_bad_store_settings_are_configuration_errors() -> None:
    """A bad URL or setting fails at construction, naming the field."""
    with pytest.raises(ConfigurationError, match=r"store\.url"):
        ResilientTransport(store="http://localhost")
    with pytest.raises(ConfigurationError, match=r"store\.timeout"):
        ResilientTransport(store={"url": "redis://127.0.0.1:1/0", "timeout": -1})
    with pytest.raises(ConfigurationError, match=r"store\.colour"):
        ResilientTransport(store={"url": "redis://127.0.0.1:1/0", "colour": "red"})
    with pytest.raises(ConfigurationError, match=r"store\.workers"):
        ResilientTransport(store={"url": "redis://127.0.0.1:1/0", "workers": 0})


async def test_a_policy_files_store_table_opens_the_store(tmp_path: Path) -> None:
    """``[store]`` in the TOML file: the transport opens it, with its settings."""
    pytest.importorskip("redis")
    path = tmp_path / "policies.toml"
    path.write_text(
        '[default]\nretry = false\n\n[store]\nurl = "redis://127.0.0.1:1/0"\nprefix = "svc"\ntimeout = 0.02\n'
        "workers = 6\n"
    )
    transport = ResilientTransport.from_file(path, registry=CollectorRegistry())
    store = transport._fleet.store  # type: ignore[union-attr]
    assert isinstance(store, RedisStore) and (store._prefix, store._timeout, store.workers) == ("svc", 0.02, 6)
    assert transport._fleet.workers == 6  # type: ignore[union-attr]
    await transport.aclose()


def test_a_policy_files_store_table_is_checked_with_the_file(tmp_path: Path) -> None:
    """An unknown key of ``[store]`` is an error of the file, with its line."""
    from resilient_http._toml import STORE_KEYS, load_policies
    from resilient_http.store._open import SETTINGS

    assert STORE_KEYS == ("url", *SETTINGS)
    path = tmp_path / "policies.toml"
    path.write_text('[store]\nurl = "redis://127.0.0.1:1/0"\ntimout = 1\n')
    with pytest.raises(ConfigurationError, match=r"line 3: store.timout: is not a store setting"):
        load_policies(path)
