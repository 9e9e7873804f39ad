"""Dry-run layers (Envoy's shadow mode): each decides and reports as it would, and blocks nothing."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.lowlevel import checkpoint
from conftest import Harness, Script, only

from resilient_http import (
    BulkheadPolicy,
    CallInfo,
    CircuitBreakerPolicy,
    CircuitOpenError,
    ConfigurationError,
    RateLimitPolicy,
    RetryPolicy,
    call_info,
)
from resilient_http._toml import load_policies

#: Opens on the first failure, for 10 s.
TRIGGER_HAPPY: dict[str, Any] = {"minimum_calls": 1, "failure_ratio": 1.0, "break_duration": 10}


def info(response: httpx.Response) -> CallInfo:
    found = call_info(response)
    assert found is not None
    return found


def blocked(harness: Harness, layer: str) -> float | None:
    return harness.value("resilient_http_dry_run_blocked_total", layer=layer)


# The circuit breaker


async def test_a_dry_run_breaker_opens_but_lets_calls_through(harness: Harness) -> None:
    """An open dry-run breaker sends the calls it would refuse, reports them, and keeps its own state."""
    script = Script(503)
    client = harness.client(script, only(circuit_breaker=CircuitBreakerPolicy(dry_run=True, **TRIGGER_HAPPY)))
    first = await client.get("/")
    assert (info(first).circuit_state, info(first).dry_run) == ("open", ())
    second = await client.get("/")
    assert second.status_code == 503 and script.calls == 2
    assert (info(second).circuit_state, info(second).dry_run) == ("open", ("circuit_breaker",))
    await client.get("/")
    assert blocked(harness, "circuit_breaker") == 2
    assert harness.value("resilient_http_circuit_opened_total") == 1
    assert harness.value("resilient_http_circuit_state", state="open") == 1


async def test_calls_a_dry_run_breaker_would_refuse_are_not_counted(harness: Harness) -> None:
    """The failures of calls sent only because of the dry run do not reopen or extend the break."""
    script = Script(503, 503, 503, 200)
    client = harness.client(script, only(circuit_breaker=CircuitBreakerPolicy(dry_run=True, **TRIGGER_HAPPY)))
    await client.get("/")  # opens
    await client.get("/")  # would be refused: its 503 says nothing to the breaker
    await client.get("/")
    harness.clock.advance(12.1)  # the break (10 s, jittered by up to 20 %) is over
    trial = await client.get("/")
    assert (trial.status_code, info(trial).circuit_state, info(trial).dry_run) == (200, "closed", ())
    assert harness.value("resilient_http_circuit_opened_total") == 1


async def test_switching_dry_run_off_enforces_the_state_it_reached(harness: Harness) -> None:
    """A breaker rolled out in dry run refuses at once when dry_run is turned off, its state kept."""
    script = Script(503)
    transport = harness.transport(script, only(circuit_breaker=CircuitBreakerPolicy(dry_run=True, **TRIGGER_HAPPY)))
    async with httpx.AsyncClient(transport=transport, base_url="https://api.example.com") as client:
        await client.get("/")
        transport.update_policies(default=only(circuit_breaker=CircuitBreakerPolicy(**TRIGGER_HAPPY)))
        with pytest.raises(CircuitOpenError):
            await client.get("/")
    assert script.calls == 1


# The rate limiter


async def test_a_dry_run_rate_limiter_never_waits(harness: Harness) -> None:
    """Calls over the rate are sent at once and reported; the clock never sleeps."""
    client = harness.client(Script(200), only(rate_limit=RateLimitPolicy(rate=1, dry_run=True)))
    responses = [await client.get("/") for _ in range(3)]
    assert harness.clock.sleeps == []
    assert [info(r).dry_run for r in responses] == [(), ("rate_limit",), ("rate_limit",)]
    assert [info(r).waits for r in responses] == [(), (), ()]
    assert blocked(harness, "rate_limit") == 2
    assert harness.value("resilient_http_rate_limit_wait_seconds_count") == 3
    assert harness.value("resilient_http_rate_limited_total") == 0


async def test_calls_over_a_dry_run_rate_take_no_turn(harness: Harness) -> None:
    """As a policer: calls sent over the rate do not push the schedule back for the calls after them."""
    client = harness.client(Script(200), only(rate_limit=RateLimitPolicy(rate=1, dry_run=True)))
    for _ in range(5):
        await client.get("/")
    harness.clock.advance(1)
    assert info(await client.get("/")).dry_run == ()
    assert blocked(harness, "rate_limit") == 4


async def test_a_dry_run_rate_limiter_neither_delays_retries_nor_holds_them_back(harness: Harness) -> None:
    """A retry over the rate, or inside a cooldown the server imposed, waits only its backoff."""
    script = Script((429, {"Retry-After": "30"}), 503, 200)
    retry = RetryPolicy(attempts=2, backoff=1, max_backoff=1, budget=None)
    client = harness.client(script, only(rate_limit=RateLimitPolicy(rate=0.01, dry_run=True), retry=retry))
    await client.get("/", extensions={"resilient_http": {"retry": None}})  # 30 s of cooldown
    response = await client.get("/")  # in the cooldown, over the rate: a 503, and a retry after its backoff
    assert response.status_code == 200
    assert len(harness.clock.sleeps) == 1 and harness.clock.sleeps[0] <= 1
    assert info(response).dry_run == ("rate_limit",)
    assert [wait.reason for wait in info(response).waits] == ["backoff"]


async def test_a_dry_run_retry_whose_turn_is_free_takes_it(harness: Harness) -> None:
    """A retry policed as free is booked: the call after it is over the rate, as a real limiter would have it."""
    script = Script((502, {"Retry-After": "2"}), 200)
    retry = RetryPolicy(attempts=2, backoff=0.01, budget=None)
    client = harness.client(script, only(rate_limit=RateLimitPolicy(rate=1, dry_run=True), retry=retry))
    assert info(await client.get("/")).dry_run == ()  # the retry, 2 s on, found the token free
    assert info(await client.get("/")).dry_run == ("rate_limit",)  # it would have waited for the retry's
    harness.clock.advance(1)
    assert info(await client.get("/")).dry_run == ()


async def test_switching_a_rate_limiter_s_dry_run_off_enforces_the_bucket_it_kept(harness: Harness) -> None:
    """The turns a dry-run limiter took stay: once enforced, the next call waits for its turn."""
    transport = harness.transport(Script(200), only(rate_limit=RateLimitPolicy(rate=1, dry_run=True)))
    async with httpx.AsyncClient(transport=transport, base_url="https://api.example.com") as client:
        await client.get("/")
        await client.get("/")  # over the rate: took no turn
        transport.update_policies(default=only(rate_limit=RateLimitPolicy(rate=1)))
        response = await client.get("/")
    assert [wait.reason for wait in info(response).waits] == ["rate_limit"]
    assert info(response).waits[0].seconds == pytest.approx(1.0)
    assert info(response).dry_run == ()


# The bulkhead


async def test_a_dry_run_bulkhead_lets_calls_beyond_its_limit_through(harness: Harness) -> None:
    """With every slot taken, a dry-run bulkhead sends the call anyway, counted in flight and reported."""
    free = anyio.Event()
    in_flight = 0
    peak = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await free.wait()
        finally:
            in_flight -= 1
        return httpx.Response(200)

    client = harness.client(handler, only(bulkhead=BulkheadPolicy(max_concurrent=1, max_queue=0, dry_run=True)))
    responses: list[httpx.Response] = []

    async def get() -> None:
        responses.append(await client.get("/"))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(get)
            for _ in range(1000):
                if in_flight == 3:
                    break
                await checkpoint()
            assert harness.value("resilient_http_bulkhead_in_flight") == 3
            assert harness.value("resilient_http_bulkhead_queued") == 0
            free.set()
    assert peak == 3
    assert sorted(info(r).dry_run for r in responses) == [(), ("bulkhead",), ("bulkhead",)]
    assert blocked(harness, "bulkhead") == 2
    assert harness.value("resilient_http_bulkhead_in_flight") == 0
    assert harness.value("resilient_http_bulkhead_rejected_total", priority="normal") is None


async def test_a_call_is_reported_once_per_layer(harness: Harness) -> None:
    """Several dry-run layers each name the call once, however many attempts they would have blocked."""
    policy = only(
        circuit_breaker=CircuitBreakerPolicy(dry_run=True, **TRIGGER_HAPPY),
        rate_limit=RateLimitPolicy(rate=1, dry_run=True),
        retry=RetryPolicy(attempts=3, budget=None),
    )
    client = harness.client(Script(503), policy)
    await client.get("/")
    response = await client.get("/")
    assert info(response).attempts == 3
    assert info(response).dry_run == ("rate_limit", "circuit_breaker")
    assert blocked(harness, "rate_limit") == 2  # the first call's retries, then the second call
    assert blocked(harness, "circuit_breaker") == 1


# Configuration


def test_dry_run_must_be_a_boolean() -> None:
    """dry_run accepts true or false only, named in the error."""
    kinds: tuple[tuple[Any, dict[str, Any]], ...] = (
        (CircuitBreakerPolicy, {}),
        (RateLimitPolicy, {"rate": 1}),
        (BulkheadPolicy, {}),
    )
    for kind, args in kinds:
        with pytest.raises(ConfigurationError, match=rf"{kind.__name__}\.dry_run: must be true or false \(got 1\)"):
            kind(dry_run=1, **args)


def test_dry_run_is_read_from_a_policy_file(tmp_path: Path) -> None:
    """`dry_run = true` in a layer's table; a host table inherits it from [default] key by key."""
    path = tmp_path / "policies.toml"
    path.write_text(
        textwrap.dedent("""
            [default]
            circuit_breaker = { dry_run = true }
            rate_limit = { rate = 5, dry_run = true }

            [hosts."api.example.com"]
            bulkhead = { max_concurrent = 3, dry_run = true }
            rate_limit = { dry_run = false }
        """),
        encoding="utf-8",
    )
    policies, default = load_policies(path)
    assert default.circuit_breaker == CircuitBreakerPolicy(dry_run=True)
    assert default.rate_limit == RateLimitPolicy(rate=5, dry_run=True)
    host = policies["api.example.com"]
    assert host.bulkhead == BulkheadPolicy(max_concurrent=3, dry_run=True)
    assert host.rate_limit == RateLimitPolicy(rate=5)
    assert host.circuit_breaker == CircuitBreakerPolicy(dry_run=True)


def test_a_bad_dry_run_in_a_file_names_its_line(tmp_path: Path) -> None:
    """A dry_run that is not a boolean fails with the key path and line."""
    path = tmp_path / "policies.toml"
    path.write_text('[default]\n\n[default.bulkhead]\ndry_run = "yes"\n', encoding="utf-8")
    with pytest.raises(ConfigurationError) as caught:
        load_policies(path)
    assert caught.value.field == "default.bulkhead.dry_run"
    assert caught.value.where == f"{path}: line 4"
