"""Metrics: the documented names and labels, what they count, and what never becomes a label."""

from __future__ import annotations

import gc
import math
import random
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from conftest import HOST, Harness, Script, only
from prometheus_client import CollectorRegistry

from resilient_http import (
    BulkheadFullError,
    BulkheadPolicy,
    CircuitBreakerPolicy,
    CircuitOpenError,
    ConfigurationError,
    DeadlineExceededError,
    Policy,
    RateLimitPolicy,
    ResilientTransport,
    RetryBudget,
    RetryPolicy,
    StaleCachePolicy,
    TimeoutPolicy,
    call_info,
)
from resilient_http._call import PRIORITIES
from resilient_http._metrics import outcome_of_exception, outcome_of_status
from resilient_http.testing import FakeClock

#: The core metrics and the label each carries besides ``transport`` and ``host`` (README, "Metrics").
CORE = {
    "resilient_http_requests_total": {"outcome"},
    "resilient_http_attempts_total": {"outcome"},
    "resilient_http_request_duration_seconds": set(),
    "resilient_http_attempt_duration_seconds": set(),
    "resilient_http_retries_total": {"reason"},
    "resilient_http_retry_budget_exhausted_total": set(),
    "resilient_http_circuit_state": {"state"},
    "resilient_http_circuit_opened_total": set(),
    "resilient_http_timeouts_total": {"kind"},
}
HISTOGRAMS = {"resilient_http_request_duration_seconds", "resilient_http_attempt_duration_seconds"}
#: The other layers' metrics, labelled by ``transport`` and ``host`` alone: a series appears with the host.
OTHERS_BY_HOST = {
    "resilient_http_rate_limit_wait_seconds_count",
    "resilient_http_rate_limited_total",
    "resilient_http_cooldown_seconds_total",
    "resilient_http_bulkhead_in_flight",
    "resilient_http_bulkhead_limit",
    "resilient_http_bulkhead_queued",
    "resilient_http_cache_entries",
    "resilient_http_cache_bytes",
}
#: The other layers' metrics with a second label: registered, with no series until something happens.
OTHERS_LABELLED = {"resilient_http_bulkhead_rejected": "priority", "resilient_http_stale_served": "reason"}

FLAKY = "flaky.example:443"
SLOW = "slow.example:443"


class EndlessStream(httpx.AsyncByteStream):
    """A body whose first chunk never arrives."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        await anyio.sleep_forever()
        yield b""  # pragma: no cover


def _labels(registry: CollectorRegistry) -> dict[str, list[dict[str, str]]]:
    """Every sample name of the registry with the label sets it is exported with."""
    found: dict[str, list[dict[str, str]]] = {}
    for family in registry.collect():
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample.labels)
    return found


async def _exercise_every_core_metric(harness: Harness) -> None:
    """Calls that leave a sample in each core metric: a retry, a refused retry, an open circuit, a body timeout."""
    clock = harness.clock

    def flaky(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200 if len(flaky_calls) == 2 else 503)

    flaky_calls: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "slow.example":
            clock.advance(2)  # the headers come back after the total deadline has passed
            return httpx.Response(200, stream=EndlessStream())
        flaky_calls.append(request)
        return flaky(request)

    policies = {
        "flaky.example": only(
            retry=RetryPolicy(backoff=0.001, budget=RetryBudget(ratio=0, min_per_second=0.1, window=10)),
            circuit_breaker=CircuitBreakerPolicy(minimum_calls=2, failure_ratio=0.5),
        ),
        "slow.example": only(timeout=TimeoutPolicy(attempt=1, total=1, stream_total=True)),
    }
    client = harness.client(Script(handler), only(), policies=policies)
    assert (await client.get("https://flaky.example/")).status_code == 200  # 503, retried, 200
    assert (await client.get("https://flaky.example/")).status_code == 503  # retry refused: budget spent
    with pytest.raises(CircuitOpenError):  # 1 failure in 2 calls: open
        await client.get("https://flaky.example/")
    with pytest.raises(DeadlineExceededError):
        await client.get("https://slow.example/")


async def test_every_core_metric_exists_with_host_and_its_documented_label(harness: Harness) -> None:
    """Each core metric is exported with exactly `transport`, `host` and its one documented extra label."""
    await _exercise_every_core_metric(harness)
    found = _labels(harness.registry)
    for name, extra in CORE.items():
        sample = f"{name}_count" if name in HISTOGRAMS else name
        assert sample in found, name
        for labels in found[sample]:
            assert set(labels) == {"transport", "host", *extra}, (name, labels)


async def test_the_core_metrics_count_what_happened(harness: Harness) -> None:
    """The exercise above leaves exactly the counts it should."""
    await _exercise_every_core_metric(harness)
    value = harness.value
    assert value("resilient_http_requests_total", FLAKY, outcome="2xx") == 1
    assert value("resilient_http_requests_total", FLAKY, outcome="5xx") == 1
    assert value("resilient_http_requests_total", FLAKY, outcome="circuit_open") == 1
    assert value("resilient_http_attempts_total", FLAKY, outcome="5xx") == 2
    assert value("resilient_http_attempts_total", FLAKY, outcome="2xx") == 1
    assert value("resilient_http_attempts_total", FLAKY, outcome="circuit_open") is None
    assert value("resilient_http_request_duration_seconds_count", FLAKY) == 3
    assert value("resilient_http_attempt_duration_seconds_count", FLAKY) == 3
    assert value("resilient_http_retries_total", FLAKY, reason="status_503") == 1
    assert value("resilient_http_retry_budget_exhausted_total", FLAKY) == 1
    assert value("resilient_http_circuit_state", FLAKY, state="open") == 1
    assert value("resilient_http_circuit_state", FLAKY, state="closed") == 0
    assert value("resilient_http_circuit_opened_total", FLAKY) == 1
    assert value("resilient_http_timeouts_total", SLOW, kind="total") == 1
    assert value("resilient_http_timeouts_total", SLOW, kind="attempt") is None


async def test_every_documented_metric_is_registered(harness: Harness) -> None:
    """The other layers' metrics are on the injected registry too, each series labelled by transport and host."""
    await harness.client(Script(200), only()).get("/")
    found = _labels(harness.registry)
    for name in OTHERS_BY_HOST:
        assert found.get(name) == [{"transport": "default", "host": HOST}], name
    families = {family.name: family for family in harness.registry.collect()}
    for name in OTHERS_LABELLED:
        assert name in families, name


async def test_attempts_divided_by_requests_shows_the_retries(harness: Harness) -> None:
    """Two calls that took three tries each export six attempts for two requests."""
    client = harness.client(Script(503, 503, 200), only(retry=RetryPolicy(budget=None)))
    await client.get("/")
    await client.get("/")  # the script repeats its last step: 200 at once
    requests = harness.value("resilient_http_requests_total", outcome="2xx")
    attempts = sum(harness.value("resilient_http_attempts_total", outcome=o) or 0 for o in ("2xx", "5xx"))
    assert (requests, attempts) == (2, 4)
    assert harness.value("resilient_http_retries_total", reason="status_503") == 2


async def test_a_retry_cancelled_in_its_backoff_is_not_counted(harness: Harness) -> None:
    """A retry scheduled but never sent (the call was cancelled while it waited) is no retry."""
    with anyio.CancelScope() as scope:

        def refuse_then_cancel(request: httpx.Request) -> httpx.Response:
            scope.cancel()  # takes effect at the next wait: the backoff
            return httpx.Response(503)

        await harness.client(Script(refuse_then_cancel, 200), only(retry=RetryPolicy(budget=None))).get("/")
    assert harness.value("resilient_http_attempts_total", outcome="5xx") == 1
    assert harness.value("resilient_http_requests_total", outcome="cancelled") == 1
    assert harness.value("resilient_http_retries_total", reason="status_503") is None


async def test_a_retry_the_bulkhead_refuses_is_not_counted(harness: Harness) -> None:
    """A retry refused by a full bulkhead never reached the network: it is no retry."""
    release = anyio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/hold":
            await release.wait()
            return httpx.Response(200)
        tg.start_soon(client.get, "/hold")  # runs during the backoff, and takes the only slot
        return httpx.Response(503)

    policy = only(retry=RetryPolicy(budget=None), bulkhead=BulkheadPolicy(max_concurrent=1, max_queue=0))
    client = harness.client(Script(handler), policy)
    async with anyio.create_task_group() as tg:
        with pytest.raises(BulkheadFullError):
            await client.get("/flaky")
        release.set()
    attempts = sum(harness.value("resilient_http_attempts_total", outcome=o) or 0 for o in ("2xx", "5xx"))
    assert attempts == 2  # /flaky once, /hold once
    assert harness.value("resilient_http_retries_total", reason="status_503") is None
    assert harness.value("resilient_http_requests_total", outcome="bulkhead_full") == 1


@pytest.mark.parametrize(
    ("step", "outcome"),
    [
        (200, "2xx"),
        (302, "3xx"),
        (404, "4xx"),
        (500, "5xx"),
        (httpx.ConnectError, "error"),
        (httpx.ReadTimeout, "timeout"),
    ],
)
async def test_request_and_attempt_outcomes_are_status_classes_or_error_kinds(
    harness: Harness, step: int | type[httpx.TransportError], outcome: str
) -> None:
    """Outcomes are a small closed set: the status class, or what kind of error ended the call."""
    client = harness.client(Script(step), only())
    try:
        await client.get("/")
    except httpx.TransportError:
        pass
    assert harness.value("resilient_http_requests_total", outcome=outcome) == 1
    assert harness.value("resilient_http_attempts_total", outcome=outcome) == 1


async def test_durations_are_measured_on_the_injected_clock(harness: Harness) -> None:
    """Request and attempt durations come from the transport's clock, backoffs included in the request's."""
    clock = harness.clock

    def slow(request: httpx.Request) -> httpx.Response:
        clock.advance(0.25)
        return httpx.Response(503 if len(clock.sleeps) == 0 else 200)

    client = harness.client(Script(slow), only(retry=RetryPolicy(budget=None)))
    await client.get("/")
    [backoff] = clock.sleeps
    assert harness.value("resilient_http_attempt_duration_seconds_sum") == pytest.approx(0.5)
    assert harness.value("resilient_http_request_duration_seconds_sum") == pytest.approx(0.5 + backoff)
    assert harness.value("resilient_http_attempt_duration_seconds_bucket", le="0.25") == 2


async def test_labels_never_contain_paths_or_query_strings(harness: Harness) -> None:
    """Only host:port and closed sets of values become labels, whatever the URL carries."""
    client = harness.client(Script(503, 200, 404, httpx.ConnectError), only(retry=RetryPolicy(budget=None)))
    for path in ("/users/12345/orders?token=s3cr3t&page=2", "/search?q=secret#frag", "/users/67890"):
        try:
            await client.get(path)
        except httpx.ConnectError:
            pass
    values = {value for labels in _labels(harness.registry).values() for x in labels for value in x.values()}
    assert values
    for value in values:
        assert "/" not in value and "?" not in value and "users" not in value and "secret" not in value
        assert "s3cr3t" not in value and "12345" not in value
    assert {x["host"] for labels in _labels(harness.registry).values() for x in labels} == {"api.example.com:443"}
    assert {x["transport"] for labels in _labels(harness.registry).values() for x in labels} == {"default"}


def _transport(
    registry: CollectorRegistry, name: str = "default", status: int = 200, **kwargs: Any
) -> ResilientTransport:
    inner = httpx.MockTransport(lambda r: httpx.Response(status))
    return ResilientTransport(default=only(), inner=inner, registry=registry, name=name, **kwargs)


def _requests(registry: CollectorRegistry, transport: str, host: str, outcome: str = "2xx") -> float | None:
    labels = {"transport": transport, "host": host, "outcome": outcome}
    return registry.get_sample_value("resilient_http_requests_total", labels)


def _series_of(registry: CollectorRegistry, transport: str) -> list[tuple[str, dict[str, str]]]:
    """Every sample of the library that carries ``transport=...``."""
    return [
        (sample.name, sample.labels)
        for family in registry.collect()
        for sample in family.samples
        if sample.labels.get("transport") == transport
    ]


async def test_two_named_transports_on_one_registry_keep_their_own_series() -> None:
    """Transports on one registry count the same host apart, labelled by their names."""
    registry = CollectorRegistry()
    first, second = _transport(registry, "first"), _transport(registry, "second", status=204)
    async with httpx.AsyncClient(transport=first) as a, httpx.AsyncClient(transport=second) as b:
        await a.get("https://one.example/")
        await b.get("https://two.example/")
        await b.get("https://one.example/")
        assert _requests(registry, "first", "one.example:443") == 1
        assert _requests(registry, "second", "one.example:443") == 1
        assert _requests(registry, "second", "two.example:443") == 1


async def test_one_host_is_never_both_closed_and_open_on_one_registry() -> None:
    """A breaker open in one transport and closed in another shows as two series, never as one merged host."""
    registry = CollectorRegistry()
    breaking = only(circuit_breaker=CircuitBreakerPolicy(minimum_calls=1, failure_ratio=1.0))
    failing = ResilientTransport(
        default=breaking, inner=httpx.MockTransport(lambda r: httpx.Response(503)), registry=registry, name="a"
    )
    healthy = ResilientTransport(
        default=breaking, inner=httpx.MockTransport(lambda r: httpx.Response(200)), registry=registry, name="b"
    )
    async with httpx.AsyncClient(transport=failing) as a, httpx.AsyncClient(transport=healthy) as b:
        await a.get("https://x.example/")
        await b.get("https://x.example/")
        states: dict[str, dict[str, float]] = {}
        for family in registry.collect():
            for sample in family.samples:
                if sample.name == "resilient_http_circuit_state" and sample.value:
                    states.setdefault(sample.labels["host"], {})[sample.labels["transport"]] = 1
                    key = (sample.labels["transport"], sample.labels["host"])
                    assert sample.labels["state"] == {"a": "open", "b": "closed"}[key[0]], sample
        assert states == {"x.example:443": {"a": 1, "b": 1}}


def test_a_second_open_transport_with_the_same_name_is_refused() -> None:
    """Two open transports on one registry under one name would write the same series: the second is refused."""
    registry = CollectorRegistry()
    first = _transport(registry)
    with pytest.raises(ConfigurationError, match=r"name: .*pass name= .*\(got 'default'\)"):
        _transport(registry)
    other = _transport(registry, "other")
    with pytest.raises(ConfigurationError, match="name="):
        _transport(registry, "other")
    assert first is not None and other is not None  # alive, so their names are still taken


@pytest.mark.parametrize("name", ["", 7, "a\nb", "x" * 101])
def test_a_bad_transport_name_is_refused(name: Any) -> None:
    """A name must be a short printable string: it becomes a label value."""
    with pytest.raises(ConfigurationError, match=r"^name: "):
        _transport(CollectorRegistry(), name)


async def test_a_closed_transports_series_leave_the_registry_and_the_others_stay() -> None:
    """After aclose() a transport's hosts have no series left; another transport on the registry keeps its own."""
    registry = CollectorRegistry()
    leaving, staying = _transport(registry, "leaving"), _transport(registry, "staying")
    for transport in (leaving, staying):
        for host in ("x.example", "y.example"):
            await transport.handle_async_request(httpx.Request("GET", f"https://{host}/"))
    assert _series_of(registry, "leaving") and _series_of(registry, "staying")
    await leaving.aclose()
    assert _series_of(registry, "leaving") == []
    assert _requests(registry, "staying", "x.example:443") == 1
    assert _requests(registry, "staying", "y.example:443") == 1
    await leaving.aclose()  # twice is harmless
    await staying.aclose()
    assert [family.name for family in registry.collect()] == []  # the last one out takes the collector


async def test_leaving_async_with_removes_the_series_and_frees_the_name() -> None:
    """The end of `async with` closes the transport's metrics too; its name may then be used again."""
    registry = CollectorRegistry()
    async with _transport(registry) as transport:
        await transport.handle_async_request(httpx.Request("GET", "https://x.example/"))
        assert _requests(registry, "default", "x.example:443") == 1
    assert _series_of(registry, "default") == []
    async with _transport(registry) as again:  # the name is free again, and counting starts afresh
        await again.handle_async_request(httpx.Request("GET", "https://x.example/"))
        assert _requests(registry, "default", "x.example:443") == 1


async def test_calls_after_close_are_not_exported() -> None:
    """A closed transport that is still used writes to nothing on the registry."""
    registry = CollectorRegistry()
    transport, other = _transport(registry), _transport(registry, "other")
    await transport.aclose()
    await transport.handle_async_request(httpx.Request("GET", "https://x.example/"))
    assert _series_of(registry, "default") == []
    await other.aclose()


def test_an_abandoned_transport_frees_its_name_when_collected() -> None:
    """A transport dropped without aclose() leaves with the garbage: its name is free for the next one."""
    registry = CollectorRegistry()
    _transport(registry)  # never closed, never referenced again
    replacement = _transport(registry)
    assert replacement is not None


def test_no_state_outlives_the_transports_of_a_registry() -> None:
    """The table of registries in use is empty again once their transports are closed or gone."""
    from resilient_http import _series

    before = set(_series._exporters)
    registry = CollectorRegistry()
    transport = _transport(registry)
    assert registry in _series._exporters
    del transport
    gc.collect()
    assert [sample for family in registry.collect() for sample in family.samples] == []  # a scrape finishes it
    assert registry not in _series._exporters
    assert set(_series._exporters) <= before


ABANDONING = textwrap.dedent(
    """
    import gc
    import httpx
    from prometheus_client import CollectorRegistry
    from resilient_http import ResilientTransport

    gc.set_threshold(1)  # collect garbage at nearly every allocation, in the middle of anything
    for _ in range(100):
        ResilientTransport(inner=httpx.MockTransport(lambda r: httpx.Response(200)), registry=CollectorRegistry())
        ResilientTransport(inner=httpx.MockTransport(lambda r: httpx.Response(200)))
    """
)


def test_transports_collected_at_any_moment_never_deadlock_the_metrics() -> None:
    """Garbage collection may free a transport while another one is being registered: it must not hang."""
    subprocess.run([sys.executable, "-c", ABANDONING], check=True, timeout=60)


async def test_evicting_a_host_in_one_transport_keeps_another_transports_counts() -> None:
    """Host eviction in one transport never detaches the series another transport on the registry still writes."""
    registry = CollectorRegistry()
    small, large = _transport(registry, "small", max_hosts=1), _transport(registry, "large")
    async with httpx.AsyncClient(transport=small) as a, httpx.AsyncClient(transport=large) as b:
        await a.get("https://x.example/")
        await b.get("https://x.example/")
        await a.get("https://y.example/")  # the small transport evicts x
        for _ in range(5):
            await b.get("https://x.example/")
        assert _requests(registry, "large", "x.example:443") == 6
        assert _requests(registry, "small", "x.example:443") is None
        assert _requests(registry, "small", "y.example:443") == 1


async def test_transports_on_separate_registries_are_independent(clock: FakeClock) -> None:
    """Each registry gets its own collectors: counts never leak from one to another."""
    harnesses = [Harness(CollectorRegistry(), clock), Harness(CollectorRegistry(), clock)]
    for harness, calls in zip(harnesses, (1, 3), strict=True):
        client = harness.client(Script(200), only())
        for _ in range(calls):
            await client.get("/")
    assert [harness.value("resilient_http_requests_total", outcome="2xx") for harness in harnesses] == [1, 3]
    for harness in harnesses:
        await harness.aclose()


async def test_a_transport_without_a_registry_uses_the_global_one_and_can_be_made_twice() -> None:
    """Omitting registry= registers on prometheus_client's global registry once, however many transports."""
    from prometheus_client import REGISTRY

    for _ in range(2):
        async with ResilientTransport(inner=httpx.MockTransport(lambda r: httpx.Response(200))) as transport:
            assert transport is not None
            assert "resilient_http_requests" in {family.name for family in REGISTRY.collect()}


# ---------------------------------------------------------------- what the counters promise each other

FUZZ_HOSTS = ("a.example", "b.example", "c.example")


class FaultyNetwork(httpx.AsyncBaseTransport):
    """The network of the consistency test: random answers, faults and stalls, and a count of every try."""

    def __init__(self, rng: random.Random, clock: FakeClock) -> None:
        self.rng = rng
        self.clock = clock
        self.tries: Counter[str] = Counter()  # host -> tries that reached the network
        self.calls_reached: dict[str, set[str]] = {host: set() for host in FUZZ_HOSTS}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.tries[host] += 1
        self.calls_reached[host].add(request.headers["x-call"])
        roll = self.rng.random()
        if roll < 0.35:
            return httpx.Response(200, content=b"fine")
        if roll < 0.50:
            return httpx.Response(503, content=b"busy")
        if roll < 0.55:
            return httpx.Response(404)
        if roll < 0.62:
            return httpx.Response(429, headers={"Retry-After": str(self.rng.choice((1, 3, 30)))})
        if roll < 0.70:
            raise httpx.ConnectError("refused", request=request)
        if roll < 0.75:
            raise httpx.ReadTimeout("stalled", request=request)
        if roll < 0.85:
            self.clock.advance(self.rng.uniform(0, 3))  # slow: eats into the total deadline
            return httpx.Response(200, content=b"slow")
        await anyio.sleep(1)  # hangs until the attempt timeout (real time) ends it
        return httpx.Response(200)  # pragma: no cover


def _by_label(registry: CollectorRegistry, name: str, host: str) -> Counter[str]:
    """``{value of the metric's own label: sample}`` for one host of the default transport."""
    found: Counter[str] = Counter()
    for family in registry.collect():
        for sample in family.samples:
            labels = dict(sample.labels)
            if sample.name == name and labels.pop("transport") == "default" and labels.pop("host") == host:
                found[next(iter(labels.values()), "")] += int(sample.value)
    return found


async def _check_identities_after_random_calls(seed: int) -> Counter[str]:
    """Drive random calls through every layer, check the identities per host; what happened, by kind."""
    rng = random.Random(seed)
    clock = FakeClock()
    registry = CollectorRegistry()
    network = FaultyNetwork(rng, clock)
    policy = Policy(
        timeout=TimeoutPolicy(attempt=0.02, total=5.0),
        retry=RetryPolicy(attempts=3, backoff=0.2, budget=RetryBudget(ratio=0.5, min_per_second=2, window=10)),
        circuit_breaker=CircuitBreakerPolicy(minimum_calls=5, failure_ratio=0.3, break_duration=2, window=10),
        rate_limit=RateLimitPolicy(rate=50, burst=10),
        bulkhead=BulkheadPolicy(max_concurrent=2, max_queue=3),
        stale_cache=StaleCachePolicy(max_stale=60),
    )
    transport = ResilientTransport(default=policy, inner=network, registry=registry, clock=clock, random=rng)
    entered: Counter[str] = Counter()
    seen: dict[str, Counter[str]] = {host: Counter() for host in FUZZ_HOSTS}

    async def call(number: int, host: str, cancel_after: float | None) -> None:
        priority = rng.choice(PRIORITIES)
        request = httpx.Request(
            "GET",
            f"https://{host}/item/{number % 50}",
            headers={"x-call": str(number)},
            extensions={"resilient_http": {"priority": priority}},
        )
        with anyio.move_on_after(cancel_after if cancel_after is not None else math.inf):
            entered[host] += 1
            try:
                response = await transport.handle_async_request(request)
            except anyio.get_cancelled_exc_class():
                seen[host]["cancelled"] += 1
                raise
            except httpx.TransportError as exc:
                seen[host][outcome_of_exception(exc)] += 1
                return
            info = call_info(response)
            assert info is not None
            seen[host]["stale" if info.stale else outcome_of_status(response.status_code)] += 1
            await response.aread()

    async with transport:
        for wave in range(8):
            async with anyio.create_task_group() as tg:
                for number in range(wave * 40, wave * 40 + 40):
                    cancel = rng.uniform(0, 0.03) if rng.random() < 0.2 else None
                    tg.start_soon(call, number, rng.choice(FUZZ_HOSTS), cancel)
                    if rng.random() < 0.3:
                        await clock.sleep(rng.uniform(0, 0.5))
            clock.advance(rng.uniform(0, 5))

        happened: Counter[str] = Counter()
        for host in FUZZ_HOSTS:
            label = f"{host}:443"

            def count(name: str, host: str = label) -> Counter[str]:
                return _by_label(registry, f"resilient_http_{name}", host)

            requests, attempts, retries = count("requests_total"), count("attempts_total"), count("retries_total")
            stale, timeouts = count("stale_served_total"), count("timeouts_total")
            rejected, rate_limited = count("bulkhead_rejected_total"), count("rate_limited_total")[""]
            assert requests == seen[host], host  # every call once, with the outcome its caller saw
            assert sum(requests.values()) == entered[host] == count("request_duration_seconds_count")[""]
            assert sum(attempts.values()) == network.tries[host] == count("attempt_duration_seconds_count")[""]
            assert sum(attempts.values()) - sum(retries.values()) == len(network.calls_reached[host])
            assert requests["stale"] == sum(stale.values())
            assert requests["rate_limited"] + stale["rate_limited"] == rate_limited
            assert requests["bulkhead_full"] + stale["bulkhead_full"] <= sum(rejected.values())
            assert timeouts["attempt"] <= attempts["timeout"]
            assert requests["timeout"] + stale["timeout"] <= timeouts["total"] + attempts["timeout"]
            for status_class in ("4xx", "5xx"):
                by_status = sum(v for k, v in retries.items() if k.startswith(f"status_{status_class[0]}"))
                assert by_status <= attempts[status_class]
            failed_tries = attempts["timeout"] + attempts["error"]
            assert retries["timeout"] + retries["connect_error"] + retries["network_error"] <= failed_tries
            assert count("bulkhead_in_flight")[""] == count("bulkhead_queued")[""] == 0
            assert sum(count("circuit_state").values()) == 1
            happened.update(requests)
            happened.update({f"retry_{reason}": value for reason, value in retries.items()})
            happened.update({f"stale_{reason}": value for reason, value in stale.items()})
            happened["circuit_open"] += stale["circuit_open"]
            happened["calls_without_a_try"] += entered[host] - len(network.calls_reached[host])
    return happened


async def test_counters_agree_whatever_faults_cancellations_and_deadlines_do() -> None:
    """Random faults, stalls, 429s, cancellations and deadlines through every layer: the identities hold.

    Seeds are tried until the runs together went through every interesting
    path (the event loop's timing makes one seed's run vary).
    """
    events = ("cancelled", "stale", "timeout", "circuit_open", "bulkhead_full", "rate_limited", "retry_status_503")
    wanted = (*events, "retry_timeout", "retry_connect_error", "calls_without_a_try")
    happened: Counter[str] = Counter()
    for seed in range(1, 9):
        happened += await _check_identities_after_random_calls(seed)
        if seed >= 2 and all(happened[event] for event in wanted):
            break
    # The runs are only worth something if they went through the interesting paths.
    assert [event for event in wanted if not happened[event]] == [], sorted(happened.items())
