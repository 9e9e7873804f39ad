"""The Redis store against a real redis-server, and the semantics both stores share.

The contract tests run on both stores: the in-memory one on the fake clock,
the Redis one on real time (its clock is the server's ``TIME``), with short
durations and tolerances for the round trips. The Redis-only tests check
what only a real server shows: GCRA exactness across concurrent clients,
workers' clocks not mattering, trial claims under contention, heartbeats,
and the key layout.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.crc import key_slot
from redis_server import RedisServer, needs_redis, redis_server

from resilient_http.store import UNAVAILABLE, Admission, Circuit, MemoryStore, RedisStore, Store
from resilient_http.testing import FakeClock

pytestmark = needs_redis

UP = "api.example.com:443"
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis")) as found:
        yield found


@pytest.fixture
async def admin(server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(server.url)
    yield client
    await client.aclose()


StoreFactory = Callable[..., RedisStore]


@pytest.fixture
async def make_store(server: RedisServer, registry: CollectorRegistry) -> AsyncIterator[StoreFactory]:
    """RedisStores on the test's server, under a prefix of the test's own (so tests share nothing)."""
    prefix = f"t{next(_prefixes)}"
    made: list[RedisStore] = []

    def make(**options: Any) -> RedisStore:
        options = {"prefix": prefix, "timeout": 1.0, "registry": registry, **options}
        store = RedisStore.from_url(server.url, **options)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.aclose()


class Fleet:
    """A store and the way time passes for it: the fake clock for memory, real time for Redis."""

    def __init__(self, store: Store, pass_time: Callable[[float], Awaitable[None]], exact: bool) -> None:
        self.store = store
        self.pass_time = pass_time
        self.exact = exact

    def about(self, seconds: float) -> Any:
        """``seconds``, exactly in memory, within a few round trips in Redis."""
        return pytest.approx(seconds, abs=1e-9 if self.exact else 0.05)


@pytest.fixture(params=["memory", "redis"])
async def fleet(request: pytest.FixtureRequest, clock: FakeClock, make_store: StoreFactory) -> Fleet:
    if request.param == "memory":

        async def advance(seconds: float) -> None:
            clock.advance(seconds)

        return Fleet(MemoryStore(clock=clock), advance, exact=True)
    return Fleet(make_store(), asyncio.sleep, exact=False)


# Both stores


async def test_gcra_denies_past_the_burst_and_says_for_how_long(fleet: Fleet) -> None:
    """burst calls pass at once; the next is denied for one interval, and asking again takes nothing."""
    store = fleet.store
    for _ in range(3):
        assert await store.admit(UP, rate=5, burst=3) == Admission(True, 0.0, 0.0)
    denied = await store.admit(UP, rate=5, burst=3)
    assert denied == Admission(False, fleet.about(0.2), 0.0)
    await fleet.pass_time(0.25)
    assert await store.admit(UP, rate=5, burst=3) == Admission(True, 0.0, 0.0)


async def test_refused_callers_are_given_turns_one_interval_apart_and_go_at_them(fleet: Fleet) -> None:
    """Each refusal's turn is an interval after the last; at its turn a caller goes, and learns its next turn."""
    store = fleet.store
    assert await store.admit(UP, rate=5, burst=1) == Admission(True, 0.0, 0.0)
    turns = [await store.admit(UP, rate=5, burst=1) for _ in range(3)]
    assert turns == [Admission(False, fleet.about(t), 0.0) for t in (0.2, 0.4, 0.6)]
    await fleet.pass_time(0.2)
    answer = await store.admit(UP, rate=5, burst=1, next_turn=True)
    assert answer == Admission(True, 0.0, 0.0, fleet.about(0.6))  # behind the turns at 0.4 and 0.6


async def test_a_caller_that_takes_no_turn_learns_when_a_slot_is_free_and_leaves_the_line_alone(
    fleet: Fleet,
) -> None:
    """turn=False: refused with the time until a slot is free; the next caller's turn is not pushed back by it."""
    store = fleet.store
    assert await store.admit(UP, rate=5, burst=1) == Admission(True, 0.0, 0.0)
    for _ in range(3):
        assert await store.admit(UP, rate=5, burst=1, turn=False) == Admission(False, fleet.about(0.2), 0.0)
    assert await store.admit(UP, rate=5, burst=1) == Admission(False, fleet.about(0.2), 0.0)


async def test_a_burst_at_once_is_never_refused_by_rounding(fleet: Fleet) -> None:
    """For rates whose interval is no exact number of seconds, burst calls at once all pass, and one more does not."""
    for rate in (3, 6, 7, 9, 11, 13, 0.3, 0.7, 100 / 3):
        upstream = f"rate-{rate}:443"
        answers = [await fleet.store.admit(upstream, rate=rate, burst=6) for _ in range(7)]
        assert [answer.allowed for answer in answers if answer is not UNAVAILABLE] == [True] * 6 + [False], rate


async def test_a_hold_is_shared_and_the_later_end_wins(fleet: Fleet) -> None:
    """hold() keeps the later end; held() and admit() report what is left of it."""
    store = fleet.store
    assert await store.hold(UP, 10.0) == fleet.about(10.0)
    assert await store.hold(UP, 1.0) == fleet.about(10.0)
    assert await store.held(UP) == fleet.about(10.0)
    answer = await store.admit(UP, rate=100, burst=10)
    assert answer == Admission(False, fleet.about(10.0), fleet.about(10.0))
    assert await store.held("other:443") == 0.0
    assert await store.hold("other:443", 1e12) == fleet.about(86_400.0)  # a server's word, within reason
    assert await store.open_circuit("other:443", 1e12, after_round=0) == Circuit("open", 1, fleet.about(86_400.0))


async def test_breaker_rounds_open_half_open_and_close(fleet: Fleet) -> None:
    """Open; a late peer adopts the round; half-open; exactly `slots` trials; their successes close it."""
    store = fleet.store
    assert await store.circuit(UP) == Circuit("closed", 0, 0.0)
    assert await store.open_circuit(UP, 0.2, after_round=0) == Circuit("open", 1, fleet.about(0.2))
    assert (await store.open_circuit(UP, 60.0, after_round=0)) == Circuit("open", 1, fleet.about(0.2))
    assert await store.claim_trial(UP, 1, slots=2, ttl=30) is False
    await fleet.pass_time(0.25)
    assert await store.circuit(UP) == Circuit("half_open", 1, 0.0)
    assert [await store.claim_trial(UP, 1, slots=2, ttl=30) for _ in range(4)] == [True, True, False, False]
    assert await store.release_trial(UP, 1) is True
    assert await store.claim_trial(UP, 1, slots=2, ttl=30) is True
    assert await store.trial_succeeded(UP, 1, slots=2) == Circuit("half_open", 1, 0.0)
    assert await store.trial_succeeded(UP, 1, slots=2) == Circuit("closed", 1, 0.0)
    assert await store.open_circuit(UP, 5.0, after_round=0) == Circuit("open", 2, fleet.about(5.0))


async def test_a_failed_trial_opens_the_next_round(fleet: Fleet) -> None:
    """open_circuit after the round it knows opens round + 1; a success of the old round is ignored."""
    store = fleet.store
    await store.open_circuit(UP, 0.1, after_round=0)
    await fleet.pass_time(0.15)
    assert await store.claim_trial(UP, 1, slots=1, ttl=30)
    assert await store.open_circuit(UP, 30.0, after_round=1) == Circuit("open", 2, fleet.about(30.0))
    assert await store.trial_succeeded(UP, 1, slots=1) == Circuit("open", 2, fleet.about(30.0))
    assert await store.release_trial(UP, 1) is False


# Redis only


async def test_gcra_is_exact_across_concurrent_clients(make_store: StoreFactory) -> None:
    """Four clients asking for 2.05 s get, together, burst + rate x elapsed slots (to within one), never more.

    Elapsed runs from just before the first decision was asked to just after
    the last one was answered, so it exceeds the span of the decisions by a
    round trip or two; 2.05 s keeps the end off a token's boundary, where
    those few milliseconds could tip the count.
    """
    stores = [make_store(worker_id=f"w{i}") for i in range(4)]
    allowed = 0
    first = last = 0.0
    ends = time.monotonic() + 2.05

    async def ask(store: RedisStore) -> None:
        nonlocal allowed, first, last
        while time.monotonic() < ends:
            asked = time.monotonic()
            answer = await store.admit(UP, rate=10, burst=5)
            assert answer is not UNAVAILABLE
            if not first:
                first = asked
            last = time.monotonic()
            allowed += answer.allowed
            await asyncio.sleep(0.003)

    async with asyncio.TaskGroup() as group:
        for store in stores:
            group.create_task(ask(store))
    elapsed = last - first
    limit = 5 + 10 * elapsed
    assert allowed <= limit, (allowed, elapsed)  # never more than the limit allows
    assert abs(allowed - limit) <= 1, (allowed, elapsed)


async def test_workers_clocks_do_not_enter_a_decision(
    make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clients whose clocks are hours apart read the same hold and the same denial: all time is the server's."""
    ahead = FakeClock(start=time.monotonic() + 7200, wall=time.time() + 7200)
    behind = FakeClock(start=time.monotonic() - 7200, wall=time.time() - 7200)
    first, second = make_store(clock=ahead), make_store(clock=behind)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 7200)  # and this process's wall clock is off too
    assert await first.hold(UP, 2.0) == pytest.approx(2.0, abs=0.01)
    assert await second.held(UP) == pytest.approx(2.0, abs=0.05)
    for _ in range(3):
        assert (await first.admit("b:443", rate=2, burst=3)) == Admission(True, 0.0, 0.0)
    one = await first.admit("b:443", rate=2, burst=3)
    other = await second.admit("b:443", rate=2, burst=3)
    assert one != UNAVAILABLE and other != UNAVAILABLE
    assert (one.allowed, other.allowed) == (False, False)
    assert one.wait == pytest.approx(0.5, abs=0.05)
    assert other.wait == pytest.approx(one.wait + 0.5, abs=0.05)  # the next turn, whatever the clocks say


async def test_exactly_half_open_calls_claims_succeed_among_many_concurrent_claimers(
    make_store: StoreFactory,
) -> None:
    """Five workers, forty claims at once on a half-open round: exactly three slots are granted."""
    stores = [make_store() for _ in range(5)]
    await stores[0].open_circuit(UP, 0.05, after_round=0)
    await asyncio.sleep(0.1)
    claims = await asyncio.gather(*(stores[i % 5].claim_trial(UP, 1, slots=3, ttl=30) for i in range(40)))
    assert claims.count(True) == 3 and claims.count(False) == 37


async def test_heartbeats_count_live_workers_and_expire(make_store: StoreFactory) -> None:
    """Each worker counts for its heartbeat's ttl; one that leaves, or stops beating, drops out."""
    a, b, c = make_store(worker_id="a"), make_store(worker_id="b"), make_store(worker_id="c")
    assert await a.heartbeat(0.3) == 1
    assert await b.heartbeat(5.0) == 2
    assert await c.heartbeat(5.0) == 3
    assert await b.heartbeat(5.0) == 3  # a repeated heartbeat is still one worker
    await c.leave()
    await asyncio.sleep(0.35)
    assert await b.heartbeat(5.0) == 1
    await b.aclose()  # a closed store leaves too
    assert await make_store(worker_id="d").heartbeat(5.0) == 1


async def test_every_key_of_an_upstream_has_one_hash_tag_and_every_key_a_ttl(
    make_store: StoreFactory, admin: Redis
) -> None:
    """After every operation on three upstreams (one with braces in its name), keys group by hash tag and expire."""
    store = make_store()
    upstreams = [UP, "[::1]:8443", "we}ird{:80"]
    for upstream in upstreams:
        await store.admit(upstream, rate=1, burst=1)
        await store.admit(upstream, rate=1, burst=1)  # refused: a turn
        await store.admit(upstream, rate=1, burst=1, limit="writes")
        await store.hold(upstream, 30)
        await store.open_circuit(upstream, 0.01, after_round=0)
        await asyncio.sleep(0.02)
        await store.claim_trial(upstream, 1, slots=2, ttl=10)
        await store.trial_succeeded(upstream, 1, slots=2)
    await store.heartbeat(10)
    keys = [key.decode() async for key in admin.scan_iter(match=f"*{store._prefix}*")]
    assert len(keys) == 3 * 5 + 1
    for key in keys:
        assert await admin.pttl(key) > 0, key
    tags = {key[: key.index("}") + 1] for key in keys}
    assert len(tags) == 4  # one per upstream, one for the workers
    for found in tags:
        group = [key for key in keys if key.startswith(found)]
        assert len({key_slot(key.encode()) for key in group}) == 1
        assert found.startswith("{" + store._prefix + ":") or found == "{" + store._prefix + "}"


async def test_garbled_values_count_as_absent_and_garbled_replies_as_failures(
    make_store: StoreFactory, admin: Redis, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the server holds or answers is checked: nonsense is never taken for a number or raised to the caller."""
    store = make_store()
    await admin.set(f"{{{store._prefix}:{UP}}}:rate:rate", "not a number")
    await admin.set(f"{{{store._prefix}:{UP}}}:hold", "-")
    assert await store.admit(UP, rate=1, burst=1) == Admission(True, 0.0, 0.0)

    async def nonsense(**_: Any) -> Any:
        return [b"1", "x"]

    monkeypatch.setattr(store, "_gcra", nonsense)
    assert await store.admit(UP, rate=1, burst=1) is UNAVAILABLE
    assert (
        registry.get_sample_value("resilient_http_store_fallbacks_total", {"operation": "admit", "reason": "error"})
        == 1
    )


async def test_a_store_is_refused_under_trio(server: RedisServer) -> None:
    """redis-py's client is asyncio's: under trio the store is a ConfigurationError, made there or used there."""
    import anyio

    from resilient_http import ConfigurationError

    made_here = RedisStore.from_url(server.url, registry=CollectorRegistry())

    async def use() -> None:
        await made_here.admit(UP, rate=1, burst=1)

    async def make() -> None:
        RedisStore.from_url(server.url, registry=CollectorRegistry())

    for main in (use, make):
        with pytest.raises(ConfigurationError, match="asyncio"):
            await asyncio.to_thread(functools.partial(anyio.run, main, backend="trio"))
    await made_here.aclose()


def test_the_server_keeps_nothing_on_disk(server: RedisServer) -> None:
    """The test server was started without persistence, in its own directory."""
    assert not any(Path(server.directory).glob("*.rdb"))
