"""Policies that change while the service runs: update_policies(), reload(), and what each host keeps."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.lowlevel import checkpoint
from conftest import BASE_URL, HOST, Harness, Script, only
from prometheus_client import CollectorRegistry

from resilient_http import (
    AdaptiveLimit,
    BulkheadFullError,
    BulkheadPolicy,
    CallInfo,
    CircuitBreakerPolicy,
    CircuitOpenError,
    CoalescePolicy,
    ConfigurationError,
    Policy,
    RateLimitPolicy,
    ResilientTransport,
    RetryBudget,
    RetryPolicy,
    StaleCachePolicy,
    Wait,
    call_info,
)
from resilient_http.testing import FakeClock

#: Opens on the first failure and stays open 100 s.
TRIGGER_HAPPY = CircuitBreakerPolicy(minimum_calls=1, failure_ratio=1.0, break_duration=100, max_break_duration=200)


def info(response: httpx.Response) -> CallInfo:
    found = call_info(response)
    assert found is not None
    return found


class Held:
    """A handler that holds every request until :meth:`free`, counting those in flight."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0
        self.entered = 0
        self._free = anyio.Event()

    def free(self) -> None:
        self._free.set()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.entered += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await self._free.wait()
        finally:
            self.in_flight -= 1
        return httpx.Response(200)


async def settle(condition: Any) -> None:
    """Let other tasks run until ``condition()`` holds."""
    for _ in range(1000):
        if condition():
            return
        await checkpoint()
    raise AssertionError("condition never held")


def transport(harness: Harness, handler: Any, default: Policy, **policies: Policy) -> ResilientTransport:
    return harness.transport(handler, default, policies=policies or None)


def client(transport: ResilientTransport) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=transport, base_url=BASE_URL)


# The breaker


async def test_an_open_breaker_stays_open_across_new_thresholds(harness: Harness) -> None:
    """A new breaker policy keeps the circuit open until its time; the new thresholds rule from then on."""
    script = Script(503, 200, 503, 503)
    t = transport(harness, script, only(circuit_breaker=TRIGGER_HAPPY))
    async with client(t) as http:
        assert info(await http.get("/")).circuit_state == "open"
        t.update_policies(default=only(circuit_breaker=CircuitBreakerPolicy(minimum_calls=2, failure_ratio=1.0)))
        with pytest.raises(CircuitOpenError) as caught:
            await http.get("/")
        assert caught.value.retry_after is not None and caught.value.retry_after > 50
        assert script.calls == 1
        harness.clock.advance(201)
        assert info(await http.get("/")).circuit_state == "closed"  # the trial succeeded
        assert info(await http.get("/")).circuit_state == "closed"  # one failure: under the new minimum_calls
        assert info(await http.get("/")).circuit_state == "open"


async def test_a_breaker_window_change_restarts_its_counts(harness: Harness) -> None:
    """Counts bucketed by the old window are dropped when the window changes, and kept when only the ratio does."""
    policy = CircuitBreakerPolicy(minimum_calls=2, failure_ratio=1.0, window=10)
    script = Script(503)
    t = transport(harness, script, only(circuit_breaker=policy))
    async with client(t) as http:
        assert info(await http.get("/")).circuit_state == "closed"
        t.update_policies(default=only(circuit_breaker=CircuitBreakerPolicy(minimum_calls=2, failure_ratio=0.9)))
        assert info(await http.get("/")).circuit_state == "open"  # the first failure still counted
    script = Script(503)
    t = transport(harness, script, only(circuit_breaker=policy))
    async with client(t) as http:
        assert info(await http.get("/")).circuit_state == "closed"
        t.update_policies(default=only(circuit_breaker=CircuitBreakerPolicy(minimum_calls=2, window=20)))
        assert info(await http.get("/")).circuit_state == "closed"  # counts restarted: one call in the window


# The rate limiter


async def test_a_rate_limiter_keeps_its_schedule_with_the_new_rate(harness: Harness) -> None:
    """Turns taken under the old rate stay; the turns after them are spaced by the new rate."""
    t = transport(harness, Script(200), only(rate_limit=RateLimitPolicy(rate=1)))
    async with client(t) as http:
        await http.get("/")  # takes the only token: the next turn is in 1 s
        t.update_policies(default=only(rate_limit=RateLimitPolicy(rate=0.5)))
        assert info(await http.get("/")).waits == (Wait("rate_limit", 1.0),)
        assert info(await http.get("/")).waits == (Wait("rate_limit", 2.0),)


async def test_a_removed_rate_limiter_no_longer_holds_retries_back(harness: Harness) -> None:
    """A dropped limiter takes its server cooldown with it: retries no longer wait it out."""
    script = Script((429, {"Retry-After": "50"}), 503, 200)
    policy = only(rate_limit=RateLimitPolicy(rate=100, burst=100), retry=RetryPolicy(attempts=2, budget=None))
    t = transport(harness, script, policy)
    async with client(t) as http:
        await http.get("/", extensions={"resilient_http": {"retry": None}})  # a 429: 50 s of cooldown
        t.update_policies(default=only(retry=RetryPolicy(attempts=2, budget=None, backoff=1, max_backoff=1)))
        harness.clock.sleeps.clear()
        assert (await http.get("/")).status_code == 200  # 503, then 200 after the backoff alone
        assert len(harness.clock.sleeps) == 1 and harness.clock.sleeps[0] <= 1


async def test_a_new_max_cooldown_bounds_what_the_server_says_next(harness: Harness) -> None:
    """The cooldown in force runs its course; a Retry-After received after the change is cut to the new max_cooldown."""
    script = Script((429, {"Retry-After": "50"}), (429, {"Retry-After": "50"}), 200)
    t = transport(harness, script, only(rate_limit=RateLimitPolicy(rate=100, burst=100, max_cooldown=10)))
    async with client(t) as http:
        await http.get("/")  # 50 s asked, 10 s kept
        t.update_policies(default=only(rate_limit=RateLimitPolicy(rate=100, burst=100, max_cooldown=2)))
        assert info(await http.get("/")).waits == (Wait("rate_limit", 10.0),)
        assert info(await http.get("/")).waits == (Wait("rate_limit", 2.0),)


async def test_a_limiter_dropped_and_added_again_reads_each_answer_once(harness: Harness) -> None:
    """A dropped limiter leaves no hook on the host: the fresh one alone counts the next cooldown."""
    script = Script((429, {"Retry-After": "5"}), 200)
    policy = only(rate_limit=RateLimitPolicy(rate=100, burst=100))
    t = transport(harness, script, policy)
    async with client(t) as http:
        t.update_policies(default=only())
        t.update_policies(default=policy)
        await http.get("/")
        assert harness.value("resilient_http_cooldown_seconds_total") == 5
        assert info(await http.get("/")).waits == (Wait("rate_limit", 5.0),)


# The bulkhead


async def test_a_lower_bulkhead_max_cancels_nothing_and_applies_to_new_calls(harness: Harness) -> None:
    """Calls in flight past a lowered max finish normally; new calls find the lower max."""
    held = Held()
    t = transport(harness, held, only(bulkhead=BulkheadPolicy(max_concurrent=3, max_queue=0)))
    responses: list[httpx.Response] = []

    async def get() -> None:
        responses.append(await http.get("/"))

    with anyio.fail_after(5):
        async with client(t) as http:
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(get)
                await settle(lambda: held.in_flight == 3)
                t.update_policies(default=only(bulkhead=BulkheadPolicy(max_concurrent=1, max_queue=0)))
                with pytest.raises(BulkheadFullError):
                    await http.get("/")
                assert harness.value("resilient_http_bulkhead_limit") == 1
                held.free()
            assert [r.status_code for r in responses] == [200] * 3
            assert harness.value("resilient_http_bulkhead_in_flight") == 0
        held2 = Held()
        t2 = transport(harness, held2, only(bulkhead=BulkheadPolicy(max_concurrent=2, max_queue=0)))
        async with client(t2) as http, anyio.create_task_group() as tg:
            tg.start_soon(get)
            await settle(lambda: held2.in_flight == 1)
            t2.update_policies(default=only(bulkhead=BulkheadPolicy(max_concurrent=1, max_queue=0)))
            with pytest.raises(BulkheadFullError):  # one in flight fills the new max
                await http.get("/")
            held2.free()


async def test_a_higher_bulkhead_max_grants_waiting_calls_at_once(harness: Harness) -> None:
    """Calls queued under the old max get the slots a raised max adds, without waiting for a release."""
    held = Held()
    t = transport(harness, held, only(bulkhead=BulkheadPolicy(max_concurrent=1, max_queue=5)))
    with anyio.fail_after(5):
        async with client(t) as http, anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(http.get, "/")
            await settle(lambda: held.in_flight == 1 and harness.value("resilient_http_bulkhead_queued") == 2)
            t.update_policies(default=only(bulkhead=BulkheadPolicy(max_concurrent=3, max_queue=5)))
            await settle(lambda: held.in_flight == 3)
            held.free()
    assert held.peak == 3


async def test_an_unchanged_adaptive_limit_keeps_what_it_learnt(harness: Harness) -> None:
    """A new policy that keeps the adaptive settings keeps the limit the host's answers set."""
    adaptive = AdaptiveLimit(initial=10, min=1)
    t = transport(harness, Script(503), only(bulkhead=BulkheadPolicy(max_concurrent=20, adaptive=adaptive)))
    async with client(t) as http:
        await http.get("/")  # a drop: 10 -> 9
        assert harness.value("resilient_http_bulkhead_limit") == 9
        t.update_policies(default=only(bulkhead=BulkheadPolicy(max_concurrent=20, max_queue=3, adaptive=adaptive)))
        assert harness.value("resilient_http_bulkhead_limit") == 9
        t.update_policies(default=only(bulkhead=BulkheadPolicy(max_concurrent=30, adaptive=adaptive)))
        assert harness.value("resilient_http_bulkhead_limit") == 10  # a new ceiling: learning starts again


@pytest.mark.parametrize(
    ("new", "limit"),
    [(BulkheadPolicy(max_concurrent=5), 5), (BulkheadPolicy(max_concurrent=5, adaptive=AdaptiveLimit(initial=4)), 4)],
    ids=["removed", "replaced"],
)
async def test_an_attempt_sent_under_a_replaced_adaptive_limit_moves_nothing(
    harness: Harness, new: BulkheadPolicy, limit: int
) -> None:
    """A drop of an attempt sent before the adaptive limit was replaced or removed leaves the new limit alone."""
    held = Held()

    async def handler(request: httpx.Request) -> httpx.Response:
        await held(request)
        return httpx.Response(503)

    old = BulkheadPolicy(max_concurrent=20, adaptive=AdaptiveLimit(initial=10))
    t = transport(harness, handler, only(bulkhead=old))
    with anyio.fail_after(5):
        async with client(t) as http:
            async with anyio.create_task_group() as tg:
                tg.start_soon(http.get, "/")
                await settle(lambda: held.in_flight == 1)
                t.update_policies(default=only(bulkhead=new))
                held.free()
            assert harness.value("resilient_http_bulkhead_limit") == limit
            assert harness.value("resilient_http_bulkhead_in_flight") == 0


# The retry budget and the stale cache


async def test_a_retry_budget_keeps_its_history_across_a_new_ratio(harness: Harness) -> None:
    """Retries already made still count against the budget after its ratio changes."""
    budget = RetryBudget(ratio=0.0, min_per_second=0.1, window=10)  # one retry per 10 s
    script = Script(503)
    t = transport(harness, script, only(retry=RetryPolicy(attempts=2, budget=budget)))
    async with client(t) as http:
        await http.get("/")  # 503, its one retry, 503
        assert script.calls == 2
        t.update_policies(
            default=only(retry=RetryPolicy(attempts=2, budget=RetryBudget(ratio=0.0, min_per_second=0.2, window=10)))
        )
        await http.get("/")  # the new floor allows two in the window: one is left
        await http.get("/")  # spent
        assert script.calls == 5
        assert info(await http.get("/")).retry_stop == "budget"


async def test_stale_answers_survive_a_new_stale_policy_and_go_with_the_layer(harness: Harness) -> None:
    """A changed stale cache keeps its answers; a policy without one forgets them, even if re-enabled later."""
    script = Script(200, 503)
    t = transport(harness, script, only(stale_cache=StaleCachePolicy(max_stale=60)))
    async with client(t) as http:
        await http.get("/")
        t.update_policies(default=only(stale_cache=StaleCachePolicy(max_stale=120)))
        assert info(await http.get("/")).stale
        assert harness.value("resilient_http_cache_entries") == 1
        t.update_policies(default=only())
        assert harness.value("resilient_http_cache_entries") == 0
        t.update_policies(default=only(stale_cache=StaleCachePolicy(max_stale=120)))
        assert (await http.get("/")).status_code == 503


async def test_an_evicted_host_s_stale_answers_go_when_its_new_policy_has_none(harness: Harness) -> None:
    """Answers kept for a host no longer in the host table are forgotten when its policy drops the stale cache."""
    t = harness.transport(Script(200), only(stale_cache=StaleCachePolicy()), max_hosts=1)
    async with httpx.AsyncClient(transport=t) as http:
        await http.get("https://a.example/")
        await http.get("https://b.example/")  # a.example is evicted; its answer stays in the store
        assert harness.value("resilient_http_cache_entries", "b.example:443") == 1
        t.update_policies({"b.example": only(stale_cache=StaleCachePolicy())}, default=only())
        store = t._shared["stale_cache"]
        assert set(store.shelves) == {"b.example:443"}


# Coalescing (no reconfigure: made afresh)


class Gate:
    """A handler that holds every request until :meth:`open`, counting them."""

    def __init__(self) -> None:
        self.requests = 0
        self._open = anyio.Event()

    def open(self) -> None:
        self._open.set()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        await self._open.wait()
        return httpx.Response(200, content=b"shared")


@pytest.mark.parametrize(("new", "requests"), [(CoalescePolicy(max_body_bytes=100), 2), (None, 3)])
async def test_a_flight_in_progress_lands_for_its_followers_across_a_new_coalesce_policy(
    harness: Harness, new: CoalescePolicy | None, requests: int
) -> None:
    """Calls that joined a flight before the change get its answer; later calls share a new layer's flights, if any."""
    gate = Gate()
    t = transport(harness, gate, only(coalesce=CoalescePolicy()))
    results: list[httpx.Response] = []
    with anyio.fail_after(5):
        async with client(t) as http, anyio.create_task_group() as tg:

            async def get() -> None:
                results.append(await http.get("/"))

            for _ in range(3):
                tg.start_soon(get)
            await anyio.wait_all_tasks_blocked()
            before = t._hosts.values()[0].layers["coalesce"]
            t.update_policies(default=only(coalesce=new))
            for _ in range(2):
                tg.start_soon(get)
            await anyio.wait_all_tasks_blocked()
            assert t._hosts.values()[0].layers.get("coalesce") is not before
            gate.open()
    assert gate.requests == requests
    assert [r.content for r in results] == [b"shared"] * 5
    assert sorted(info(r).coalesced for r in results) == [False] * requests + [True] * (5 - requests)


# Layers removed, added, and calls in flight


async def test_a_removed_breaker_s_state_is_gone(harness: Harness) -> None:
    """Turning the breaker off drops its state and its gauge; turning it back on starts closed."""
    script = Script(503, 200)
    t = transport(harness, script, only(circuit_breaker=TRIGGER_HAPPY))
    async with client(t) as http:
        await http.get("/")
        assert harness.value("resilient_http_circuit_state", state="open") == 1
        t.update_policies(default=only())
        assert harness.value("resilient_http_circuit_state", state="open") == 0
        assert info(await http.get("/")).circuit_state is None
        t.update_policies(default=only(circuit_breaker=TRIGGER_HAPPY))
        assert info(await http.get("/")).circuit_state == "closed"
        assert script.calls == 3


async def test_a_call_in_flight_keeps_the_policy_it_started_with(harness: Harness) -> None:
    """A call started with retries keeps retrying after an update turns retries off; new calls do not."""
    first = anyio.Event()
    go = anyio.Event()
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            first.set()
            await go.wait()
        return httpx.Response(503 if calls in (1, 3) else 200)

    t = transport(harness, handler, only(retry=RetryPolicy(attempts=2, budget=None)))
    results: list[httpx.Response] = []
    with anyio.fail_after(5):
        async with client(t) as http, anyio.create_task_group() as tg:

            async def get() -> None:
                results.append(await http.get("/"))

            tg.start_soon(get)
            await first.wait()
            t.update_policies(default=only())
            go.set()
            await settle(lambda: bool(results))
            response = await http.get("/")
    assert (results[0].status_code, info(results[0]).attempts) == (200, 2)
    assert (response.status_code, info(response).attempts) == (503, 1)


async def test_a_layer_turned_on_is_fresh_and_per_call_chains_follow(harness: Harness) -> None:
    """A layer the new policy adds starts empty, for calls with and without overrides."""
    script = Script(503)
    t = transport(harness, script, only())
    async with client(t) as http:
        await http.get("/", extensions={"resilient_http": {"retry": None}})
        t.update_policies(default=only(circuit_breaker=TRIGGER_HAPPY))
        assert info(await http.get("/", extensions={"resilient_http": {"retry": None}})).circuit_state == "open"
        with pytest.raises(CircuitOpenError):
            await http.get("/")


async def test_hosts_take_the_policy_of_their_new_pattern(harness: Harness) -> None:
    """Live hosts re-resolve their policy against the new patterns; policy_for answers from the new table."""
    t = transport(harness, Script(200), only(), **{"*.example.com": only(retry=RetryPolicy(attempts=4))})
    async with client(t) as http:
        await http.get("/")
        t.update_policies({"api.example.com": only(retry=RetryPolicy(attempts=5))})
        assert t.policy_for("api.example.com").retry == RetryPolicy(attempts=5)
        assert t.policy_for("other.example.com") == Policy()
        assert t._hosts.values()[0].policy.retry == RetryPolicy(attempts=5)


async def test_invalid_policies_change_nothing(harness: Harness) -> None:
    """One bad pattern or value raises ConfigurationError before any host or table changes."""
    script = Script(503, 200)
    t = transport(harness, script, only(circuit_breaker=TRIGGER_HAPPY))
    async with client(t) as http:
        await http.get("/")
        before = t.policy_for("api.example.com")
        with pytest.raises(ConfigurationError, match="policies"):
            t.update_policies({"api.example.com": only(), "bad pattern!": only()}, default=only())
        with pytest.raises(ConfigurationError, match="default"):
            t.update_policies(default="nope")  # type: ignore[arg-type]
        assert t.policy_for("api.example.com") is before
        with pytest.raises(CircuitOpenError):
            await http.get("/")


# Reloading the file


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    return tmp_path / "policies.toml"


def write(path: Path, text: str) -> None:
    path.write_text(textwrap.dedent(text), encoding="utf-8")


def spoil(path: Path, content: bytes | None) -> None:
    """Write ``content`` to ``path``, or remove it when ``None``."""
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content)


def from_file(path: Path, registry: CollectorRegistry, clock: FakeClock, handler: Any) -> ResilientTransport:
    return ResilientTransport.from_file(path, inner=httpx.MockTransport(handler), registry=registry, clock=clock)


async def test_reload_reads_the_file_again(policy_file: Path, registry: CollectorRegistry, clock: FakeClock) -> None:
    """reload() takes the file's new policies, for live hosts and new ones alike."""
    write(policy_file, "[default]\nretry = { attempts = 2 }\n")
    t = from_file(policy_file, registry, clock, Script(200))
    async with client(t) as http:
        await http.get("/")
        write(policy_file, '[default]\nretry = { attempts = 3 }\n[hosts."api.example.com"]\nretry = { attempts = 4 }\n')
        t.reload()
        assert t.policy_for("api.example.com").retry == RetryPolicy(attempts=4)
        assert t.policy_for("else.example.com").retry == RetryPolicy(attempts=3)
        assert t._hosts.values()[0].policy.retry == RetryPolicy(attempts=4)


async def test_a_bad_file_changes_nothing(policy_file: Path, registry: CollectorRegistry, clock: FakeClock) -> None:
    """A reload of an invalid or unreadable file raises, naming file and line, and keeps policies and state."""
    write(policy_file, "[default]\nretry = false\ncircuit_breaker = { minimum_calls = 1, failure_ratio = 1.0 }\n")
    script = Script(503, 200)
    t = from_file(policy_file, registry, clock, script)
    async with client(t) as http:
        await http.get("/")
        before = t.policy_for("api.example.com")
        write(policy_file, "[default.circuit_breaker]\nminimum_calls = 1\n\n[default.retry]\natempts = 2\n")
        with pytest.raises(ConfigurationError) as caught:
            t.reload()
        assert caught.value.where == f"{policy_file}: line 5"
        spoil(policy_file, b"\xff")
        with pytest.raises(ConfigurationError, match="UTF-8"):
            t.reload()
        spoil(policy_file, None)
        with pytest.raises(ConfigurationError, match="cannot be read"):
            t.reload()
        assert t.policy_for("api.example.com") is before
        with pytest.raises(CircuitOpenError):
            await http.get("/")
        assert script.calls == 1


async def test_reload_needs_a_file(harness: Harness) -> None:
    """A transport built from code has no file to reload."""
    with pytest.raises(ConfigurationError, match="update_policies"):
        harness.transport(Script(200)).reload()


async def test_the_metric_host_stays_one_series(harness: Harness) -> None:
    """An update keeps each host's metric series: the request count goes on from where it was."""
    t = transport(harness, Script(200), only())
    async with client(t) as http:
        await http.get("/")
        t.update_policies(default=only(retry=RetryPolicy()))
        await http.get("/")
        assert harness.value("resilient_http_requests_total", HOST, outcome="2xx") == 2
