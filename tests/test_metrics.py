"""Metrics: the documented names and labels, what they count, and what never becomes a label."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
from conftest import HOST, Harness, Script, only
from prometheus_client import CollectorRegistry

from resilient_http import (
    CircuitBreakerPolicy,
    CircuitOpenError,
    DeadlineExceededError,
    ResilientTransport,
    RetryBudget,
    RetryPolicy,
    TimeoutPolicy,
)
from resilient_http.testing import FakeClock

#: The core metrics and the label each carries besides ``host`` (README, "Metrics").
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
#: The other layers' metrics, labelled by ``host`` alone: a series appears with the host.
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
    """Each core metric is exported with exactly `host` and its one documented extra label."""
    await _exercise_every_core_metric(harness)
    found = _labels(harness.registry)
    for name, extra in CORE.items():
        sample = f"{name}_count" if name in HISTOGRAMS else name
        assert sample in found, name
        for labels in found[sample]:
            assert set(labels) == {"host", *extra}, (name, labels)


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
    """The other layers' metrics are on the injected registry too, each series labelled by host."""
    await harness.client(Script(200), only()).get("/")
    found = _labels(harness.registry)
    for name in OTHERS_BY_HOST:
        assert found.get(name) == [{"host": HOST}], name
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


async def test_two_transports_on_one_registry_do_not_collide() -> None:
    """A second transport on a registry reuses its collectors instead of failing, and both count."""
    registry = CollectorRegistry()
    first = ResilientTransport(inner=httpx.MockTransport(lambda r: httpx.Response(200)), registry=registry)
    second = ResilientTransport(
        default=only(), inner=httpx.MockTransport(lambda r: httpx.Response(204)), registry=registry
    )
    async with httpx.AsyncClient(transport=first) as a, httpx.AsyncClient(transport=second) as b:
        await a.get("https://one.example/")
        await b.get("https://two.example/")
        await b.get("https://one.example/")
    value = registry.get_sample_value
    assert value("resilient_http_requests_total", {"host": "one.example:443", "outcome": "2xx"}) == 2
    assert value("resilient_http_requests_total", {"host": "two.example:443", "outcome": "2xx"}) == 1


async def test_evicting_a_host_in_one_transport_keeps_another_transports_counts() -> None:
    """Host eviction in one transport never detaches the series another transport on the registry still writes."""
    registry = CollectorRegistry()

    def make(max_hosts: int) -> ResilientTransport:
        inner = httpx.MockTransport(lambda r: httpx.Response(200))
        return ResilientTransport(default=only(), inner=inner, registry=registry, max_hosts=max_hosts)

    small, large = make(1), make(10)
    async with httpx.AsyncClient(transport=small) as a, httpx.AsyncClient(transport=large) as b:
        await a.get("https://x.example/")
        await b.get("https://x.example/")
        await a.get("https://y.example/")  # the small transport evicts x
        for _ in range(5):
            await b.get("https://x.example/")
    count = registry.get_sample_value("resilient_http_requests_total", {"host": "x.example:443", "outcome": "2xx"})
    assert count is not None
    assert count >= 5


async def test_transports_on_separate_registries_are_independent(clock: FakeClock) -> None:
    """Each registry gets its own collectors: counts never leak from one to another."""
    registries = [CollectorRegistry(), CollectorRegistry()]
    for registry, calls in zip(registries, (1, 3), strict=True):
        harness = Harness(registry, clock)
        client = harness.client(Script(200), only())
        for _ in range(calls):
            await client.get("/")
        await harness.aclose()
    counts = [
        r.get_sample_value("resilient_http_requests_total", {"host": "api.example.com:443", "outcome": "2xx"})
        for r in registries
    ]
    assert counts == [1, 3]


def test_a_transport_without_a_registry_uses_the_global_one_and_can_be_made_twice() -> None:
    """Omitting registry= registers on prometheus_client's global registry once, however many transports."""
    from prometheus_client import REGISTRY

    for _ in range(2):
        ResilientTransport(inner=httpx.MockTransport(lambda r: httpx.Response(200)))
    assert "resilient_http_requests" in {family.name for family in REGISTRY.collect()}
