"""The in-memory store, on the fake clock: GCRA, holds, breaker rounds, trials, heartbeats, expiry; open_store."""

from __future__ import annotations

import sys
from collections.abc import Callable

import anyio
import pytest
from prometheus_client import CollectorRegistry

from resilient_http import ConfigurationError
from resilient_http.store import (
    UNAVAILABLE,
    Admission,
    Circuit,
    MemoryStore,
    Store,
    open_store,
    open_store_table,
)
from resilient_http.testing import FakeClock

UP = "api.example.com:443"


@pytest.fixture
def store(clock: FakeClock) -> MemoryStore:
    return MemoryStore(clock=clock, worker_id="w1")


async def test_gcra_allows_burst_plus_rate_times_elapsed(store: MemoryStore, clock: FakeClock) -> None:
    """Asked every ms or so for 10 s (steps exact in binary), the limit lets through exactly burst + rate x 10."""
    allowed = 0
    for _ in range(10 * 1024 + 1):
        answer = await store.admit(UP, rate=8, burst=3)
        assert answer is not UNAVAILABLE
        allowed += answer.allowed
        clock.advance(1 / 1024)
    assert allowed == 3 + 80


async def test_a_denial_takes_no_token_and_gives_turns_one_interval_apart(store: MemoryStore, clock: FakeClock) -> None:
    """Denied: the first caller's turn is when a token is back, the next one's an interval later; both go then."""
    for _ in range(2):
        assert await store.admit(UP, rate=4, burst=2) == Admission(True, 0.0, 0.0)
    assert await store.admit(UP, rate=4, burst=2) == Admission(False, 0.25, 0.0)
    assert await store.admit(UP, rate=4, burst=2) == Admission(False, 0.5, 0.0)
    clock.advance(0.25)
    assert await store.admit(UP, rate=4, burst=2) == Admission(True, 0.0, 0.0)  # the denials took no token
    clock.advance(0.25)
    assert await store.admit(UP, rate=4, burst=2) == Admission(True, 0.0, 0.0)


async def test_an_allowed_caller_asking_for_its_next_turn_gets_it_after_the_turns_given(
    store: MemoryStore, clock: FakeClock
) -> None:
    """next_turn: with its slot, the caller learns its next turn, behind the callers refused before it."""
    assert await store.admit(UP, rate=4, burst=1) == Admission(True, 0.0, 0.0)
    assert await store.admit(UP, rate=4, burst=1) == Admission(False, 0.25, 0.0)  # B
    assert await store.admit(UP, rate=4, burst=1) == Admission(False, 0.5, 0.0)  # C
    clock.advance(0.25)
    assert await store.admit(UP, rate=4, burst=1, next_turn=True) == Admission(True, 0.0, 0.0, 0.5)  # B, then at 0.75
    clock.advance(0.25)
    assert await store.admit(UP, rate=4, burst=1) == Admission(True, 0.0, 0.0)  # C at its turn
    assert await store.admit(UP, rate=4, burst=1) == Admission(False, 0.5, 0.0)  # D: behind B's turn at 0.75


async def test_turns_start_after_a_hold(store: MemoryStore, clock: FakeClock) -> None:
    """During a hold, refused callers are given turns from its end, one interval apart."""
    await store.hold(UP, 2.0)
    assert await store.admit(UP, rate=10, burst=5) == Admission(False, 2.0, 2.0)
    second = await store.admit(UP, rate=10, burst=5)
    assert second != UNAVAILABLE and (second.allowed, second.hold) == (False, 2.0)
    assert second.wait == pytest.approx(2.1)


async def test_max_wait_reserves_a_later_slot(store: MemoryStore) -> None:
    """With max_wait, a slot that near is taken and its wait returned; one further away is refused."""
    assert (await store.admit(UP, rate=8, burst=1)) == Admission(True, 0.0, 0.0)
    assert await store.admit(UP, rate=8, burst=1, max_wait=0.2) == Admission(True, 0.125, 0.0)
    assert await store.admit(UP, rate=8, burst=1, max_wait=0.2) == Admission(False, 0.25, 0.0)


async def test_cost_takes_that_many_tokens(store: MemoryStore) -> None:
    """A call of cost 3 empties a bucket of 4 but one token."""
    assert (await store.admit(UP, rate=1, burst=4, cost=3)).allowed  # type: ignore[union-attr]
    assert (await store.admit(UP, rate=1, burst=4)).allowed  # type: ignore[union-attr]
    assert not (await store.admit(UP, rate=1, burst=4)).allowed  # type: ignore[union-attr]


async def test_limits_of_one_upstream_are_separate(store: MemoryStore) -> None:
    """Two named limits, and two upstreams, each have their own bucket."""
    assert (await store.admit(UP, rate=1, burst=1)).allowed  # type: ignore[union-attr]
    assert (await store.admit(UP, rate=1, burst=1, limit="writes")).allowed  # type: ignore[union-attr]
    assert (await store.admit("other:443", rate=1, burst=1)).allowed  # type: ignore[union-attr]
    assert not (await store.admit(UP, rate=1, burst=1)).allowed  # type: ignore[union-attr]


async def test_a_hold_keeps_the_later_end_and_delays_every_slot(store: MemoryStore, clock: FakeClock) -> None:
    """hold() keeps the later of two holds; admit() reports it and gives slots only after it."""
    assert await store.hold(UP, 5.0) == 5.0
    assert await store.hold(UP, 2.0) == 5.0
    clock.advance(1.0)
    assert await store.held(UP) == 4.0
    assert await store.admit(UP, rate=10, burst=5) == Admission(False, 4.0, 4.0)
    assert await store.admit(UP, rate=10, burst=5, max_wait=4.0) == Admission(True, 4.0, 4.0)
    clock.advance(4.0)
    assert await store.held(UP) == 0.0
    assert await store.hold(UP, 0) == 0.0


async def test_a_circuit_is_closed_until_someone_opens_it(store: MemoryStore, clock: FakeClock) -> None:
    """Open for its time, then half-open in the same round."""
    assert await store.circuit(UP) == Circuit("closed", 0, 0.0)
    assert await store.open_circuit(UP, 10.0, after_round=0) == Circuit("open", 1, 10.0)
    clock.advance(4.0)
    assert await store.circuit(UP) == Circuit("open", 1, 6.0)
    clock.advance(6.0)
    assert await store.circuit(UP) == Circuit("half_open", 1, 0.0)


async def test_a_peer_that_opens_too_late_adopts_the_round(store: MemoryStore, clock: FakeClock) -> None:
    """A second opening from the same known round changes nothing; a failed trial opens the next round."""
    await store.open_circuit(UP, 10.0, after_round=0)
    clock.advance(1.0)
    assert await store.open_circuit(UP, 30.0, after_round=0) == Circuit("open", 1, 9.0)
    clock.advance(9.0)
    assert await store.open_circuit(UP, 20.0, after_round=0) == Circuit("half_open", 1, 0.0)  # a trial round runs
    assert await store.open_circuit(UP, 20.0, after_round=1) == Circuit("open", 2, 20.0)  # its trial failed


async def test_exactly_slots_trials_are_claimed_per_round(store: MemoryStore, clock: FakeClock) -> None:
    """Of many claims, exactly `slots` succeed; none before half-open, none for another round."""
    await store.open_circuit(UP, 1.0, after_round=0)
    assert await store.claim_trial(UP, 1, slots=2, ttl=30) is False  # still open
    clock.advance(1.0)
    assert await store.claim_trial(UP, 2, slots=2, ttl=30) is False  # no such round
    claims = [await store.claim_trial(UP, 1, slots=2, ttl=30) for _ in range(10)]
    assert claims.count(True) == 2


async def test_a_released_trial_slot_can_be_claimed_again(store: MemoryStore, clock: FakeClock) -> None:
    """A cancelled trial gives its slot back; releasing with none out does nothing."""
    await store.open_circuit(UP, 1.0, after_round=0)
    clock.advance(1.0)
    assert await store.claim_trial(UP, 1, slots=1, ttl=30)
    assert not await store.claim_trial(UP, 1, slots=1, ttl=30)
    assert await store.release_trial(UP, 1)
    assert not await store.release_trial(UP, 1)
    assert await store.claim_trial(UP, 1, slots=1, ttl=30)


async def test_trial_slots_of_a_vanished_worker_free_up_after_their_ttl(store: MemoryStore, clock: FakeClock) -> None:
    """Slots neither released nor reported are free again ttl seconds after the batch's first claim."""
    await store.open_circuit(UP, 1.0, after_round=0)
    clock.advance(1.0)
    assert await store.claim_trial(UP, 1, slots=1, ttl=5)
    clock.advance(4.9)
    assert not await store.claim_trial(UP, 1, slots=1, ttl=5)
    clock.advance(0.1)
    assert await store.claim_trial(UP, 1, slots=1, ttl=5)


async def test_the_last_trial_success_closes_the_round(store: MemoryStore, clock: FakeClock) -> None:
    """`slots` successes close the circuit; a success from an earlier round changes nothing; a used slot stays used."""
    await store.open_circuit(UP, 1.0, after_round=0)
    clock.advance(1.0)
    assert await store.claim_trial(UP, 1, slots=2, ttl=30)
    assert await store.trial_succeeded(UP, 1, slots=2) == Circuit("half_open", 1, 0.0)
    assert await store.claim_trial(UP, 1, slots=2, ttl=30)
    assert not await store.claim_trial(UP, 1, slots=2, ttl=30)  # one succeeded, one out
    assert await store.trial_succeeded(UP, 1, slots=2) == Circuit("closed", 1, 0.0)
    assert await store.trial_succeeded(UP, 1, slots=2) == Circuit("closed", 1, 0.0)
    assert await store.open_circuit(UP, 5.0, after_round=0) == Circuit("open", 2, 5.0)  # rounds keep counting
    assert await store.trial_succeeded(UP, 1, slots=2) == Circuit("open", 2, 5.0)


async def test_a_breaker_record_expires_after_its_ttl(clock: FakeClock) -> None:
    """A record untouched for circuit_ttl after its open period is forgotten: closed, round 0."""
    store = MemoryStore(clock=clock, circuit_ttl=60.0)
    await store.open_circuit(UP, 10.0, after_round=0)
    clock.advance(69.9)
    assert await store.circuit(UP) == Circuit("half_open", 1, 0.0)
    clock.advance(0.1)
    assert await store.circuit(UP) == Circuit("closed", 0, 0.0)


async def test_heartbeats_count_live_workers_until_they_expire(store: MemoryStore, clock: FakeClock) -> None:
    """A heartbeat counts the worker for its ttl; leave() takes it out at once."""
    assert await store.heartbeat(10.0) == 1
    clock.advance(10.0)
    assert await store.heartbeat(10.0) == 1
    await store.leave()
    assert store._workers == {}


async def test_expired_entries_are_swept_as_time_passes(store: MemoryStore, clock: FakeClock) -> None:
    """A thousand upstreams seen once leave nothing behind a minute after their state expired."""
    for i in range(1000):
        await store.admit(f"host-{i}:443", rate=10, burst=1)
        await store.hold(f"host-{i}:443", 1.0)
    assert len(store) == 2000
    clock.advance(61.0)
    await store.held(UP)
    assert len(store) == 0


async def test_bad_arguments_raise_configuration_errors(store: MemoryStore) -> None:
    """Arguments no answer could make sense of are refused, naming the argument and the value."""
    for kwargs, field in (
        ({"rate": 0, "burst": 1}, "rate"),
        ({"rate": float("inf"), "burst": 1}, "rate"),
        ({"rate": 1, "burst": 0}, "burst"),
        ({"rate": 1, "burst": 2, "cost": 3}, "cost"),
        ({"rate": 1, "burst": 2, "max_wait": -1}, "max_wait"),
    ):
        with pytest.raises(ConfigurationError) as caught:
            await store.admit(UP, **kwargs)
        assert caught.value.field == field
    with pytest.raises(ConfigurationError, match="seconds"):
        await store.hold(UP, float("nan"))
    with pytest.raises(ConfigurationError, match="slots"):
        await store.claim_trial(UP, 1, slots=0, ttl=1)


def test_the_memory_store_works_under_trio(clock: FakeClock) -> None:
    """Nothing in the memory store is asyncio's."""

    async def main() -> bool:
        store = MemoryStore(clock=clock)
        answer = await store.admit(UP, rate=1, burst=1)
        return answer is not UNAVAILABLE and answer.allowed

    assert anyio.run(main, backend="trio")


def test_open_store_gives_a_memory_store_by_default(clock: FakeClock) -> None:
    """None and memory:// give a MemoryStore on the given clock; a store object comes back as it is."""
    assert isinstance(open_store(None, clock=clock), MemoryStore)
    memory = open_store("memory://", clock=clock, worker_id="me")
    assert isinstance(memory, MemoryStore) and memory.worker_id == "me"
    assert open_store(memory) is memory
    assert isinstance(memory, Store)


def test_open_store_refuses_what_it_cannot_open() -> None:
    """Unknown schemes and settings, and bad setting values, are ConfigurationErrors naming the field."""
    cases: tuple[tuple[Callable[[], object], str], ...] = (
        (lambda: open_store("http://localhost:6379"), "store.url"),
        (lambda: open_store("redis://127.0.0.1:1", timout=1), "store.timout"),
        (lambda: open_store("redis://127.0.0.1:1", timeout=0), "store.timeout"),
        (lambda: open_store("redis://127.0.0.1:1", failures=0), "store.failures"),
        (lambda: open_store("redis://127.0.0.1:1", cooldown=-1), "store.cooldown"),
        (lambda: open_store("redis://127.0.0.1:1", prefix="a{b}"), "store.prefix"),
        (lambda: open_store("redis://127.0.0.1:1", cluster="yes"), "store.cluster"),
        (lambda: open_store("unix:///tmp/redis.sock", cluster=True), "store.cluster"),
        (lambda: open_store(MemoryStore(), timeout=1), "store.timeout"),
        (lambda: open_store(42), "store"),  # type: ignore[arg-type]
        (lambda: open_store_table({"timeout": 1}), "store.url"),
    )
    for make, field in cases:
        with pytest.raises(ConfigurationError) as caught:
            make()
        assert caught.value.field == field, (field, caught.value)


async def test_open_store_table_reads_a_policy_files_store_table() -> None:
    """A [store] table's url and settings open the store they name (no connection until first use)."""
    store = open_store_table(
        {"url": "redis://127.0.0.1:1/0", "prefix": "svc", "timeout": 0.02, "failures": 2, "cooldown": 1.0},
        registry=CollectorRegistry(),
    )
    try:
        assert type(store).__name__ == "RedisStore"
        assert store.name == "redis://127.0.0.1:1/0"  # type: ignore[attr-defined]
    finally:
        await store.aclose()


def test_open_store_explains_a_missing_redis_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the redis package, a redis:// URL says which extra to install."""
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    with pytest.raises(ConfigurationError, match=r"resilient-http-transport\[redis\]"):
        open_store("redis://127.0.0.1:6379/0")


async def test_a_store_url_names_no_password() -> None:
    """The name a Redis store logs under hides the password of its URL, in the userinfo or the query."""
    store = open_store("redis://user:secret@127.0.0.1:1/0?password=secret2", registry=CollectorRegistry())
    try:
        assert "secret" not in store.name  # type: ignore[attr-defined]
    finally:
        await store.aclose()
