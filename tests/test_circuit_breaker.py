"""Circuit breaker: when it opens, what it refuses, how it lets a host back in, and what it reports."""

from __future__ import annotations

import math
import random
from typing import Any

import anyio
import httpx
import pytest
from conftest import Harness, Script, only
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from resilient_http import CallInfo, CircuitBreakerPolicy, CircuitOpenError, Policy
from resilient_http._metrics import TransportMetrics
from resilient_http.layers._epochs import bucket_end
from resilient_http.layers.circuit_breaker import CircuitBreaker
from resilient_http.testing import FakeClock


def _breaker(**settings: Any) -> Policy:
    return only(circuit_breaker=CircuitBreakerPolicy(**settings))


#: Opens on the first failure, so a test can get to the open state in one call.
TRIGGER_HAPPY = {"minimum_calls": 1, "failure_ratio": 1.0, "break_duration": 10.0, "max_break_duration": 100.0}


def _state(response: httpx.Response) -> str | None:
    info = response.extensions["resilient_http"]
    assert isinstance(info, CallInfo)
    return info.circuit_state


async def _open_for(client: httpx.AsyncClient) -> float:
    """The seconds the just-opened circuit of ``client``'s host refuses calls for."""
    with pytest.raises(CircuitOpenError) as caught:
        await client.get("/")
    assert caught.value.retry_after is not None
    return caught.value.retry_after


def _gauge(harness: Harness) -> dict[str, float | None]:
    return {
        state: harness.value("resilient_http_circuit_state", state=state) for state in ("closed", "open", "half_open")
    }


# When it opens


async def test_it_stays_closed_under_minimum_calls(harness: Harness) -> None:
    """However many fail, fewer than minimum_calls calls in the window never open the circuit."""
    script = Script(503)
    client = harness.client(script, _breaker(minimum_calls=5, failure_ratio=0.5))
    for _ in range(4):
        response = await client.get("/")
        assert _state(response) == "closed"
    assert script.calls == 4
    response = await client.get("/")  # the fifth failure reaches minimum_calls
    assert _state(response) == "open"
    with pytest.raises(CircuitOpenError):
        await client.get("/")
    assert script.calls == 5


async def test_it_opens_when_the_failed_share_reaches_the_ratio(harness: Harness) -> None:
    """Two failures in five calls stay under 0.5; the third failure in six reaches it and opens the circuit."""
    script = Script(200, 200, 200, 503, 503, 503)
    client = harness.client(script, _breaker(minimum_calls=4, failure_ratio=0.5))
    states = [_state(await client.get("/")) for _ in range(6)]
    assert states == ["closed"] * 5 + ["open"]
    with pytest.raises(CircuitOpenError):
        await client.get("/")


async def test_old_outcomes_slide_out_of_the_window(harness: Harness) -> None:
    """Failures older than the window no longer count towards opening the circuit."""
    script = Script(503, 503, 503, 200, 200, 200, 503, 200)
    client = harness.client(script, _breaker(minimum_calls=4, failure_ratio=0.5, window=10))
    for _ in range(3):
        await client.get("/")
    harness.clock.advance(11)
    states = [_state(await client.get("/")) for _ in range(4)]
    assert states == ["closed"] * 4  # 1 failure in 4 calls; with the old three it would be 4 in 7
    assert (await client.get("/")).status_code == 200
    assert script.calls == 8


async def test_outcomes_inside_the_window_still_count(harness: Harness) -> None:
    """Failures a little younger than the window are still remembered."""
    script = Script(503)
    client = harness.client(script, _breaker(minimum_calls=4, failure_ratio=0.5, window=10))
    for _ in range(3):
        await client.get("/")
    harness.clock.advance(7)
    assert _state(await client.get("/")) == "open"


@pytest.mark.parametrize("status", [429, 400, 401, 404, 422])
async def test_429_and_other_4xx_are_not_failures(harness: Harness, status: int) -> None:
    """Quota signals and client mistakes say nothing about the host's health: they never open the circuit."""
    script = Script(status)
    client = harness.client(script, _breaker(minimum_calls=3, failure_ratio=0.5))
    for _ in range(10):
        assert _state(await client.get("/")) == "closed"
    assert script.calls == 10
    assert harness.value("resilient_http_circuit_opened_total") == 0


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_5xx_failure_statuses_are_failures(harness: Harness, status: int) -> None:
    """Each default failure status counts against the host."""
    client = harness.client(Script(status), _breaker(**TRIGGER_HAPPY))
    assert _state(await client.get("/")) == "open"


async def test_failure_statuses_are_configurable(harness: Harness) -> None:
    """With failure_statuses={500}, a 503 is no longer a failure."""
    policy = only(circuit_breaker=CircuitBreakerPolicy(minimum_calls=1, failure_ratio=0.5, failure_statuses={500}))
    client = harness.client(Script(503, 500), policy)
    assert _state(await client.get("/")) == "closed"
    assert _state(await client.get("/")) == "open"


@pytest.mark.parametrize("error", [httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadTimeout, httpx.ReadError])
async def test_connection_errors_and_timeouts_are_failures(harness: Harness, error: type[httpx.TransportError]) -> None:
    """A host that cannot be reached, or does not answer in time, counts as failing."""
    client = harness.client(Script(error), _breaker(**TRIGGER_HAPPY))
    with pytest.raises(error):
        await client.get("/")
    with pytest.raises(CircuitOpenError):
        await client.get("/")


async def test_errors_made_on_this_side_are_not_failures(harness: Harness) -> None:
    """An error that says nothing about the host (an unsupported protocol, say) never opens the circuit."""
    script = Script(httpx.UnsupportedProtocol)
    client = harness.client(script, _breaker(**TRIGGER_HAPPY))
    for _ in range(3):
        with pytest.raises(httpx.UnsupportedProtocol):
            await client.get("/")
    assert script.calls == 3


# While it is open


async def test_an_open_circuit_refuses_calls_without_touching_the_network(harness: Harness) -> None:
    """While open, calls raise CircuitOpenError carrying retry_after, and the inner transport is never called."""
    script = Script(503)
    client = harness.client(script, _breaker(**TRIGGER_HAPPY))
    await client.get("/")
    first = await _open_for(client)
    assert 8.0 <= first <= 12.0
    harness.clock.advance(3)
    with pytest.raises(CircuitOpenError) as caught:
        await client.post("/", content=b"x")
    assert caught.value.retry_after == pytest.approx(first - 3)
    assert caught.value.host == "api.example.com:443"
    assert script.calls == 1
    assert harness.value("resilient_http_requests_total", outcome="circuit_open") == 2


async def test_circuit_open_is_an_http_error(harness: Harness) -> None:
    """Code that already handles httpx.HTTPError handles an open circuit too."""
    client = harness.client(Script(503), _breaker(**TRIGGER_HAPPY))
    await client.get("/")
    try:
        await client.get("/")
    except httpx.HTTPError as exc:
        assert isinstance(exc, CircuitOpenError)
    else:
        pytest.fail("an open circuit let a call through")


@pytest.mark.parametrize("seed", range(20))
async def test_the_break_is_jittered_by_twenty_percent(harness: Harness, seed: int) -> None:
    """The first break lasts break_duration ±20 %."""
    client = harness.client(Script(503), _breaker(**TRIGGER_HAPPY), seed=seed)
    await client.get("/")
    assert 8.0 <= await _open_for(client) <= 12.0


async def test_breaks_are_spread_over_the_whole_jitter_range() -> None:
    """Different random draws give breaks across the ±20 % range, not one fixed length."""
    breaks = []
    for seed in range(40):
        harness = Harness(CollectorRegistry(), FakeClock())
        client = harness.client(Script(503), _breaker(**TRIGGER_HAPPY), seed=seed)
        await client.get("/")
        breaks.append(await _open_for(client))
        await harness.aclose()
    assert min(breaks) < 8.5
    assert max(breaks) > 11.5


# How it lets the host back in


async def test_after_the_break_exactly_half_open_calls_trials_go_through(harness: Harness) -> None:
    """However many callers arrive together after the break, half_open_calls reach the host; the rest fail at once."""
    release = anyio.Event()
    entered = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal entered
        if request.url.path == "/fail":
            return httpx.Response(503)
        entered += 1
        await release.wait()
        return httpx.Response(200)

    client = harness.client(Script(handler), _breaker(**TRIGGER_HAPPY, half_open_calls=3))
    await client.get("/fail")
    harness.clock.advance(await _open_for(client))
    answered: list[httpx.Response] = []
    refused: list[CircuitOpenError] = []

    async def call() -> None:
        try:
            answered.append(await client.get("/"))
        except CircuitOpenError as exc:
            refused.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(call)
        await anyio.wait_all_tasks_blocked()
        assert entered == 3
        assert len(refused) == 7
        assert answered == []
        assert _gauge(harness) == {"closed": 0, "open": 0, "half_open": 1}
        release.set()

    assert [response.status_code for response in answered] == [200] * 3
    assert _gauge(harness) == {"closed": 1, "open": 0, "half_open": 0}
    assert (await client.get("/")).status_code == 200  # closed: everyone is let through again


async def test_all_trials_succeeding_closes_the_circuit(harness: Harness) -> None:
    """The circuit closes only once every one of the half_open_calls trials has succeeded."""
    script = Script(503, 200)
    client = harness.client(script, _breaker(**TRIGGER_HAPPY, half_open_calls=2))
    await client.get("/")
    harness.clock.advance(await _open_for(client))
    assert _state(await client.get("/")) == "half_open"
    assert _state(await client.get("/")) == "closed"
    for _ in range(5):
        assert _state(await client.get("/")) == "closed"


@pytest.mark.parametrize("seed", range(8))
async def test_a_failing_trial_reopens_for_about_twice_as_long(harness: Harness, seed: int) -> None:
    """Each failed trial doubles the break (±20 % jitter) up to max_break_duration, jitter included."""
    client = harness.client(Script(503), _breaker(**{**TRIGGER_HAPPY, "max_break_duration": 35.0}), seed=seed)
    await client.get("/")
    breaks = []
    for _ in range(4):
        breaks.append(await _open_for(client))
        harness.clock.advance(breaks[-1])
        assert _state(await client.get("/")) == "open"  # the trial failed
    first, second, third, fourth = breaks
    assert 8.0 <= first <= 12.0
    assert 16.0 <= second <= 24.0
    assert 28.0 <= third <= 35.0  # 40 s, jittered, but never above the cap
    assert 28.0 <= fourth <= 35.0
    assert harness.value("resilient_http_circuit_opened_total") == 5


async def test_closing_resets_the_break_to_its_start(harness: Harness) -> None:
    """After the host recovers, the next break is break_duration again, not the doubled one."""
    script = Script(503, 503, 200, 503)
    client = harness.client(script, _breaker(**TRIGGER_HAPPY))
    await client.get("/")
    harness.clock.advance(await _open_for(client))
    await client.get("/")  # failed trial: about 20 s
    doubled = await _open_for(client)
    assert doubled >= 16.0
    harness.clock.advance(doubled)
    assert _state(await client.get("/")) == "closed"
    assert _state(await client.get("/")) == "open"
    assert 8.0 <= await _open_for(client) <= 12.0


async def test_a_503_retry_after_longer_than_the_break_keeps_it_open_that_long(harness: Harness) -> None:
    """A 503 that asks for 30 s keeps a 10 s breaker open for the full 30 s."""
    script = Script((503, {"Retry-After": "30"}), 200)
    client = harness.client(script, _breaker(**TRIGGER_HAPPY))
    await client.get("/")
    assert await _open_for(client) == pytest.approx(30.0)
    harness.clock.advance(29.9)
    with pytest.raises(CircuitOpenError):
        await client.get("/")
    harness.clock.advance(0.1)
    assert (await client.get("/")).status_code == 200


async def test_a_503_retry_after_is_held_within_max_break_duration(harness: Harness) -> None:
    """A server asking for a day keeps the breaker open max_break_duration, no longer."""
    client = harness.client(Script((503, {"Retry-After": "86400"}), 200), _breaker(**TRIGGER_HAPPY))
    await client.get("/")
    assert await _open_for(client) == pytest.approx(100.0)
    harness.clock.advance(100.0)
    assert (await client.get("/")).status_code == 200


async def test_a_503_retry_after_shorter_than_the_break_does_not_shorten_it(harness: Harness) -> None:
    """The server's hint only ever lengthens the break."""
    client = harness.client(Script((503, {"Retry-After": "1"})), _breaker(**TRIGGER_HAPPY))
    await client.get("/")
    assert 8.0 <= await _open_for(client) <= 12.0


async def test_a_cancelled_trial_gives_its_slot_back(harness: Harness) -> None:
    """A trial call cancelled before its verdict frees the half-open slot, so another call can be the trial."""

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/fail":
            return httpx.Response(503)
        if request.url.path == "/hang":
            await anyio.sleep_forever()
        return httpx.Response(200)

    client = harness.client(Script(handler), _breaker(**TRIGGER_HAPPY))
    await client.get("/fail")
    harness.clock.advance(await _open_for(client))

    async with anyio.create_task_group() as tg:
        tg.start_soon(client.get, "/hang")
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(CircuitOpenError):  # the one slot is taken
            await client.get("/")
        tg.cancel_scope.cancel()

    assert _gauge(harness)["half_open"] == 1
    response = await client.get("/")
    assert response.status_code == 200
    assert _state(response) == "closed"
    assert harness.value("resilient_http_requests_total", outcome="cancelled") == 1
    assert harness.value("resilient_http_attempts_total", outcome="cancelled") == 1


async def test_a_trial_from_an_earlier_round_does_not_count_in_the_next(harness: Harness) -> None:
    """A trial still running when its round failed neither frees a slot nor closes the circuit in the next round."""
    gates = {path: anyio.Event() for path in ("/a", "/b", "/c")}

    async def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path in gates:
            await gates[path].wait()
        return httpx.Response(503 if path in ("/fail", "/a") else 200)

    client = harness.client(Script(handler), _breaker(**TRIGGER_HAPPY, half_open_calls=2))
    answered: list[str] = []
    refused: list[str] = []

    async def call(path: str) -> None:
        try:
            await client.get(path)
            answered.append(path)
        except CircuitOpenError:
            refused.append(path)

    await client.get("/fail")
    async with anyio.create_task_group() as tg:
        harness.clock.advance(await _open_for(client))
        tg.start_soon(call, "/a")  # round 1: trials a and b
        tg.start_soon(call, "/b")
        await anyio.wait_all_tasks_blocked()
        gates["/a"].set()  # a fails: open again, b is still out
        await anyio.wait_all_tasks_blocked()
        harness.clock.advance(await _open_for(client))
        tg.start_soon(call, "/c")  # round 2: first trial
        await anyio.wait_all_tasks_blocked()
        gates["/b"].set()  # the round-1 trial ends well, late
        await anyio.wait_all_tasks_blocked()
        await call("/d")  # round 2: second and last trial
        await call("/e")  # both round-2 slots are taken (c out, d done): refused
        assert _gauge(harness)["half_open"] == 1  # c has not answered yet: not closed
        gates["/c"].set()
    assert refused == ["/e"]
    assert _gauge(harness)["closed"] == 1


async def test_a_call_from_before_the_circuit_opened_cannot_reopen_it_once_closed(harness: Harness) -> None:
    """A closed-state call still out when the circuit opened, ending after it closed again, is not counted."""
    slow = anyio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/slow":
            await slow.wait()
            return httpx.Response(503)
        return httpx.Response(503 if request.url.path == "/fail" else 200)

    client = harness.client(Script(handler), _breaker(**TRIGGER_HAPPY))
    late: list[int] = []

    async def call_slow() -> None:
        late.append((await client.get("/slow")).status_code)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call_slow)  # starts while closed
        await anyio.wait_all_tasks_blocked()
        await client.get("/fail")  # opens
        harness.clock.advance(await _open_for(client))
        assert _state(await client.get("/")) == "closed"  # the trial succeeds: the host has recovered
        slow.set()  # the old call's failure arrives in the new closed period
    assert late == [503]
    response = await client.get("/")
    assert (response.status_code, _state(response)) == (200, "closed")
    assert harness.value("resilient_http_circuit_opened_total") == 1


def _slow_and_fail(**gates: anyio.Event) -> Script:
    """A server answering ``/fail`` with 503, ``/<gate>`` with 200 once that gate is set, anything else with 200."""

    async def handler(request: httpx.Request) -> httpx.Response:
        gate = gates.get(request.url.path.strip("/"))
        if gate is not None:
            await gate.wait()
        return httpx.Response(503 if request.url.path == "/fail" else 200)

    return Script(handler)


async def test_a_success_from_before_the_circuit_opened_reports_it_open(harness: Harness) -> None:
    """A closed-state call that succeeds once the circuit has opened reports the state it ended in: open."""
    slow = anyio.Event()
    client = harness.client(_slow_and_fail(slow=slow), _breaker(**TRIGGER_HAPPY))
    late: list[str | None] = []

    async def call_slow() -> None:
        late.append(_state(await client.get("/slow")))

    async with anyio.create_task_group() as tg:
        tg.start_soon(call_slow)  # starts while closed
        await anyio.wait_all_tasks_blocked()
        await client.get("/fail")  # opens
        slow.set()
    assert late == ["open"]


async def test_a_success_from_before_the_circuit_opened_does_not_count_once_it_closed(harness: Harness) -> None:
    """A closed-state call that succeeds after the circuit opened and closed again is not counted in the new window."""
    slow = anyio.Event()
    client = harness.client(
        _slow_and_fail(slow=slow), _breaker(**{**TRIGGER_HAPPY, "minimum_calls": 2, "failure_ratio": 0.5})
    )
    late: list[str | None] = []

    async def call_slow() -> None:
        late.append(_state(await client.get("/slow")))

    async with anyio.create_task_group() as tg:
        tg.start_soon(call_slow)  # starts while closed
        await anyio.wait_all_tasks_blocked()
        await client.get("/fail")
        await client.get("/fail")  # opens
        harness.clock.advance(await _open_for(client))
        assert _state(await client.get("/")) == "closed"  # the trial succeeds: a new, empty window
        await client.get("/")  # one success in it
        slow.set()  # the old call's success arrives in it too
    assert late == ["closed"]
    assert _state(await client.get("/fail")) == "open"  # one failure in two calls: the late success is not a third


async def test_a_trial_ending_in_an_error_made_on_this_side_gives_its_slot_back(harness: Harness) -> None:
    """A trial that fails for a reason that says nothing about the host neither reopens nor blocks the circuit."""
    script = Script(503, httpx.UnsupportedProtocol, 200)
    client = harness.client(script, _breaker(**TRIGGER_HAPPY))
    await client.get("/")
    harness.clock.advance(await _open_for(client))
    with pytest.raises(httpx.UnsupportedProtocol):
        await client.get("/")
    response = await client.get("/")
    assert (response.status_code, _state(response)) == (200, "closed")


async def test_closing_starts_a_fresh_window(harness: Harness) -> None:
    """Outcomes from before the circuit opened do not count once it has closed again (even early on the clock)."""
    harness.clock = FakeClock(start=0.0)
    script = Script(200, 503, 503, 200, 503, 200)
    client = harness.client(
        script, _breaker(minimum_calls=3, failure_ratio=0.5, window=10, break_duration=1, max_break_duration=1)
    )
    states = [_state(await client.get("/")) for _ in range(3)]
    assert states == ["closed", "closed", "open"]
    harness.clock.advance(await _open_for(client))
    assert _state(await client.get("/")) == "closed"
    assert _state(await client.get("/")) == "closed"  # one failure since closing: under minimum_calls
    assert (await client.get("/")).status_code == 200


# What it reports


async def test_the_state_gauge_and_opened_counter_follow_the_circuit(harness: Harness) -> None:
    """circuit_state is 1 for the current state only, and circuit_opened_total counts every opening."""
    script = Script(503, 503, 200)
    client = harness.client(script, _breaker(**TRIGGER_HAPPY))
    assert harness.value("resilient_http_circuit_state", state="closed") is None  # no host yet
    await client.get("/")
    assert _gauge(harness) == {"closed": 0, "open": 1, "half_open": 0}
    assert harness.value("resilient_http_circuit_opened_total") == 1
    harness.clock.advance(await _open_for(client))
    await client.get("/")  # failed trial
    assert _gauge(harness) == {"closed": 0, "open": 1, "half_open": 0}
    assert harness.value("resilient_http_circuit_opened_total") == 2
    harness.clock.advance(await _open_for(client))
    await client.get("/")
    assert _gauge(harness) == {"closed": 1, "open": 0, "half_open": 0}
    assert harness.value("resilient_http_circuit_opened_total") == 2


async def test_a_host_starts_closed(harness: Harness) -> None:
    """The first call to a host finds a closed circuit, reported as such."""
    response = await harness.client(Script(200), _breaker()).get("/")
    assert _state(response) == "closed"
    assert _gauge(harness) == {"closed": 1, "open": 0, "half_open": 0}
    assert harness.value("resilient_http_circuit_opened_total") == 0


async def test_without_a_breaker_calls_report_no_circuit_state(harness: Harness) -> None:
    """circuit_state is None when the host has no breaker, and no gauge is exported for it."""
    response = await harness.client(Script(503), only()).get("/")
    assert _state(response) is None
    assert harness.value("resilient_http_circuit_state", state="closed") is None


# The window's buckets, counted with a shortcut for the usual case (the bucket of the outcome before)

WINDOW_CASES = settings(max_examples=300, deadline=None, derandomize=True, database=None)


@WINDOW_CASES
@given(width=st.sampled_from([0.1, 1 / 3, 0.7, 1.0, 3.0]), epoch=st.integers(min_value=0, max_value=10**12))
def test_a_bucket_ends_where_the_division_says_the_next_begins(width: float, epoch: int) -> None:
    """bucket_end is the very first float whose bucket, int(t / width), comes after ``epoch``'s."""
    end = bucket_end(epoch, width)
    assert int(end / width) > epoch
    assert int(math.nextafter(end, -math.inf) / width) <= epoch


@WINDOW_CASES
@given(
    window=st.sampled_from([1.0, 10 / 3, 7.0, 10.0, 30.0]),
    start=st.sampled_from([0.0, 0.05, 1000.0, 1e6 + 0.3]),
    minimum_calls=st.integers(min_value=1, max_value=6),
    failure_ratio=st.sampled_from([0.25, 0.5, 1.0]),
    steps=st.lists(
        st.tuples(st.sampled_from([0.0, 0.0, 0.025, 0.25, 0.5, 1.0, 2.5, 9.0, 40.0]), st.booleans()), max_size=60
    ),
)
def test_a_closed_breaker_opens_exactly_when_its_window_of_buckets_says_so(
    window: float, start: float, minimum_calls: int, failure_ratio: float, steps: list[tuple[float, bool]]
) -> None:
    """Outcomes count in bucket int(now / (window / 10)); the ten latest buckets decide, shortcut or not."""
    policy = CircuitBreakerPolicy(window=window, minimum_calls=minimum_calls, failure_ratio=failure_ratio)
    metrics = TransportMetrics(CollectorRegistry(), "window").host("api.example", 443)
    breaker = CircuitBreaker(policy, random.Random(0), metrics)
    width = window / 10
    counted: dict[int, list[int]] = {}  # epoch -> [successes, failures]: the plain model
    now = start
    for step, (seconds, failure) in enumerate(steps):
        now += seconds * width
        period = breaker.acquire(now)
        breaker.record(now, period, failure)
        epoch = int(now / width)
        counted.setdefault(epoch, [0, 0])[failure] += 1
        recent = [counts for seen, counts in counted.items() if seen > epoch - 10]
        total = sum(successes + failures for successes, failures in recent)
        failed = sum(failures for _, failures in recent)
        should_open = failure and total >= minimum_calls and failed >= failure_ratio * total
        assert breaker.state == ("open" if should_open else "closed"), f"step {step} at {now}"
        if should_open:
            break
