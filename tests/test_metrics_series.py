"""Which series exist and when: labels that survive scraping, series made at zero, shed calls, limits, buckets."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest
from conftest import HOST, Harness, LeftOpen, Script, only, where
from prometheus_client import CollectorRegistry

from resilient_http import (
    BulkheadFullError,
    BulkheadPolicy,
    CircuitBreakerPolicy,
    CoalescePolicy,
    ConfigurationError,
    Policy,
    RateLimitedError,
    RateLimitPolicy,
    ResilientTransport,
    RetryPolicy,
    StaleCachePolicy,
    TimeoutPolicy,
    _demo_report,
    call_info,
)
from resilient_http._metrics import DURATION_BUCKETS, LABELS, SHED

#: Every layer on, each with what makes its refusals easy to cause.
EVERYTHING = Policy(
    timeout=TimeoutPolicy(),
    retry=RetryPolicy(budget=None),
    circuit_breaker=CircuitBreakerPolicy(minimum_calls=1, failure_ratio=1.0),
    rate_limit=RateLimitPolicy(rate=5, burst=2),
    bulkhead=BulkheadPolicy(max_concurrent=3, max_queue=0),
    stale_cache=StaleCachePolicy(),
    coalesce=CoalescePolicy(),
)
#: The metrics that every host exports whatever its policy, as sample names.
ALWAYS = {
    "resilient_http_requests_total",
    "resilient_http_attempts_total",
    "resilient_http_request_duration_seconds_bucket",
    "resilient_http_request_duration_seconds_count",
    "resilient_http_request_duration_seconds_sum",
    "resilient_http_attempt_duration_seconds_bucket",
    "resilient_http_attempt_duration_seconds_count",
    "resilient_http_attempt_duration_seconds_sum",
}
#: What each layer adds to :data:`ALWAYS` when it is the only one on (histograms by their count).
LAYERS: dict[str, tuple[Any, set[str]]] = {
    "timeout": (TimeoutPolicy(), {"resilient_http_timeouts_total"}),
    "retry": (RetryPolicy(), {"resilient_http_retries_total", "resilient_http_retry_budget_exhausted_total"}),
    "circuit_breaker": (
        CircuitBreakerPolicy(),
        {"resilient_http_circuit_state", "resilient_http_circuit_opened_total", "resilient_http_shed_total"},
    ),
    "rate_limit": (
        RateLimitPolicy(rate=10),
        {
            "resilient_http_rate_limit_wait_seconds_count",
            "resilient_http_rate_limited_total",
            "resilient_http_cooldown_seconds_total",
            "resilient_http_rate_limit_per_second",
            "resilient_http_rate_limit_burst",
            "resilient_http_shed_total",
        },
    ),
    "bulkhead": (
        BulkheadPolicy(),
        {
            "resilient_http_bulkhead_in_flight",
            "resilient_http_bulkhead_queued",
            "resilient_http_bulkhead_limit",
            "resilient_http_bulkhead_rejected_total",
            "resilient_http_shed_total",
        },
    ),
    "stale_cache": (
        StaleCachePolicy(),
        {"resilient_http_stale_served_total", "resilient_http_cache_entries", "resilient_http_cache_bytes"},
    ),
    "coalesce": (CoalescePolicy(), {"resilient_http_coalesced_total"}),
}


def samples(registry: CollectorRegistry) -> dict[str, list[dict[str, str]]]:
    """Every sample name on ``registry`` with the label sets it is exported with."""
    found: dict[str, list[dict[str, str]]] = {}
    for family in registry.collect():
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample.labels)
    return found


def names(registry: CollectorRegistry) -> set[str]:
    """The sample names on ``registry``, histograms' ``_bucket`` and ``_sum`` folded into ``_count``."""
    return {name for name in samples(registry) if not name.endswith(("_bucket", "_sum"))}


# ---------------------------------------------------------------- labels that survive a scrape


async def test_the_host_called_is_in_server_address_and_server_port(harness: Harness) -> None:
    """No series has a `host` label, which scrape configs set for the machine: the host is `server_*`."""
    await harness.client(Script(200), only()).get("/")
    for name, label_sets in samples(harness.registry).items():
        for labels in label_sets:
            assert "host" not in labels, name
            assert labels["server_address"] == "api.example.com" and labels["server_port"] == "443", name
    assert LABELS == ("transport", "server_address", "server_port")


async def test_an_ipv6_host_is_labelled_without_brackets(harness: Harness) -> None:
    """`server_address` is the address itself, as OpenTelemetry writes it; `CallInfo.host` keeps the brackets."""
    response = await harness.client(Script(200), only()).get("http://[0:0::1]:8080/")
    info = call_info(response)
    assert info is not None and info.host == "[::1]:8080"
    assert harness.value("resilient_http_requests_total", "[::1]:8080", outcome="2xx") == 1
    assert where("[::1]:8080") == {"server_address": "::1", "server_port": "8080"}


# ---------------------------------------------------------------- series made at zero


async def test_a_host_with_every_layer_off_exports_only_its_calls_and_tries(harness: Harness) -> None:
    """A layer that is off has no series at all: only calls, tries and their durations."""
    await harness.client(Script(200), only()).get("/")
    assert set(samples(harness.registry)) == ALWAYS


@pytest.mark.parametrize("layer", sorted(LAYERS))
async def test_each_layer_exports_its_series_when_on_and_only_then(harness: Harness, layer: str) -> None:
    """Turning one layer on adds exactly that layer's series, before anything has happened in it."""
    policy, added = LAYERS[layer]
    await harness.client(Script(200), only(**{layer: policy})).get("/")
    folded = {name for name in ALWAYS if not name.endswith(("_bucket", "_sum"))}
    assert names(harness.registry) == folded | added


async def test_every_label_set_a_policy_can_produce_exists_at_zero_before_its_first_event(harness: Harness) -> None:
    """`rate()` sees the first refusal, retry or stale answer: its series was exported at 0 beforehand."""
    await harness.client(Script(200), EVERYTHING).get("/")
    value = harness.value
    for outcome in ("5xx", "timeout", "error", "cancelled", "circuit_open", "rate_limited", "bulkhead_full", "stale"):
        assert value("resilient_http_requests_total", outcome=outcome) == 0, outcome
    for reason in SHED:
        assert value("resilient_http_shed_total", reason=reason) == 0, reason
        assert value("resilient_http_stale_served_total", reason=reason) == 0, reason
    for status in EVERYTHING.retry.statuses:  # type: ignore[union-attr]
        assert value("resilient_http_retries_total", reason=f"status_{status}") == 0, status
    for priority in ("critical", "high", "normal", "low"):
        assert value("resilient_http_bulkhead_rejected_total", priority=priority) == 0, priority
    for kind in ("attempt", "total", "idle"):
        assert value("resilient_http_timeouts_total", kind=kind) == 0, kind
    assert value("resilient_http_circuit_opened_total") == 0
    assert value("resilient_http_rate_limited_total") == 0
    assert value("resilient_http_coalesced_total", result="unshared") == 0
    assert value("resilient_http_requests_total", outcome="2xx") == 1


async def test_a_timeout_kind_that_is_off_has_no_series(harness: Harness) -> None:
    """Only the timeouts the policy sets can strike, so only theirs are exported."""
    await harness.client(Script(200), only(timeout=TimeoutPolicy(attempt=None, idle=None, total=5))).get("/")
    assert harness.value("resilient_http_timeouts_total", kind="total") == 0
    assert harness.value("resilient_http_timeouts_total", kind="attempt") is None


# ---------------------------------------------------------------- shed


async def test_a_call_refused_by_the_breaker_and_answered_stale_is_shed_once(harness: Harness) -> None:
    """Shed counts local refusals, stale or not: the open breaker's call answered stale is one shed call."""
    client = harness.client(
        Script(200, 503, 503),
        only(circuit_breaker=CircuitBreakerPolicy(minimum_calls=2, failure_ratio=0.5), stale_cache=StaleCachePolicy()),
    )
    assert (await client.get("/")).status_code == 200  # stored
    assert call_info(await client.get("/")).stale  # type: ignore[union-attr]  # 503: stale, breaker opens
    refused = await client.get("/")
    assert call_info(refused).stale_reason == "circuit_open"  # type: ignore[union-attr]
    assert harness.value("resilient_http_shed_total", reason="circuit_open") == 1
    assert harness.value("resilient_http_stale_served_total", reason="server_error") == 1  # reached the network


async def test_calls_refused_by_the_limiter_and_the_bulkhead_are_shed(harness: Harness) -> None:
    """A `RateLimitedError` and a `BulkheadFullError` each count once, by the refusing layer."""
    limited = harness.client(Script(200), only(rate_limit=RateLimitPolicy(rate=1, burst=1, max_wait=0)))
    await limited.get("/")
    with pytest.raises(RateLimitedError):
        await limited.get("/")
    assert harness.value("resilient_http_shed_total", reason="rate_limited") == 1

    release = anyio.Event()

    async def hold(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return httpx.Response(200)

    full = harness.client(Script(hold), only(bulkhead=BulkheadPolicy(max_concurrent=1, max_queue=0)))
    async with anyio.create_task_group() as tg:
        tg.start_soon(full.get, "/")
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(BulkheadFullError):
            await full.get("/")
        release.set()
    labels = {"transport": "default-2", **where(HOST), "reason": "bulkhead_full"}
    assert harness.registry.get_sample_value("resilient_http_shed_total", labels) == 1


async def test_failures_on_the_network_are_not_shed_even_when_answered_stale(harness: Harness) -> None:
    """A 5xx, an error or a timeout reached the network: stale or not, it is no shed call."""
    client = harness.client(
        Script(200, 503, httpx.ConnectError, httpx.ReadTimeout, 503), only(stale_cache=StaleCachePolicy())
    )
    for _ in range(5):
        await client.get("/")
    assert harness.value("resilient_http_requests_total", outcome="stale") == 4
    assert harness.value("resilient_http_shed_total", reason="circuit_open") is None  # no breaker, no series
    assert {name for name in samples(harness.registry) if "shed" in name} == set()


@pytest.mark.parametrize("outcome", ["2xx", "5xx", "timeout", "error", "cancelled", "stale", *SHED])
@pytest.mark.parametrize("stale_reason", [None, "server_error", "timeout", "error", *SHED])
def test_the_metrics_count_shed_as_the_demo_does(outcome: str, stale_reason: str | None) -> None:
    """`shed_total` and the demo's `shed_by` agree on every outcome and stale reason."""
    registry = CollectorRegistry()
    transport = ResilientTransport(registry=registry, inner=httpx.MockTransport(lambda r: httpx.Response(200)))
    metrics = transport._metrics.host("api.example.com", 443)
    metrics.request(outcome, 0.1, stale_reason if outcome == "stale" else None)
    counted = {
        sample.labels["reason"]
        for family in registry.collect()
        for sample in family.samples
        if sample.name == "resilient_http_shed_total" and sample.value
    }
    expected = _demo_report.shed_by(outcome, stale_reason if outcome == "stale" else None)
    assert counted == ({expected} if expected else set())
    assert _demo_report.SHED == SHED


# ---------------------------------------------------------------- configured limits


async def test_the_rate_limit_is_exported_as_configured(harness: Harness) -> None:
    """`rate_limit_per_second` and `rate_limit_burst` read the policy, so a panel can draw the limit."""
    await harness.client(Script(200), only(rate_limit=RateLimitPolicy(rate=2.5, burst=4))).get("/")
    assert harness.value("resilient_http_rate_limit_per_second") == 2.5
    assert harness.value("resilient_http_rate_limit_burst") == 4


async def test_the_bulkhead_limit_is_exported_as_configured(harness: Harness) -> None:
    """`bulkhead_limit` is `max_concurrent`, beside the calls in flight."""
    await harness.client(Script(200), only(bulkhead=BulkheadPolicy(max_concurrent=7))).get("/")
    assert harness.value("resilient_http_bulkhead_limit") == 7
    assert harness.value("resilient_http_bulkhead_in_flight") == 0


# ---------------------------------------------------------------- buckets


def _transport(registry: CollectorRegistry, name: str = "default", **kwargs: Any) -> ResilientTransport:
    inner = httpx.MockTransport(lambda r: httpx.Response(200))
    return ResilientTransport(default=only(), inner=inner, registry=registry, name=name, **kwargs)


def _bounds(registry: CollectorRegistry, name: str = "resilient_http_request_duration_seconds_bucket") -> list[str]:
    return [s.labels["le"] for family in registry.collect() for s in family.samples if s.name == name]


async def test_buckets_default_to_opentelemetrys_http_client_buckets() -> None:
    """The histograms' bounds are OpenTelemetry's for `http.client.request.duration`, in seconds."""
    assert DURATION_BUCKETS == (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
    registry = CollectorRegistry()
    async with _transport(registry) as transport:
        await transport.handle_async_request(httpx.Request("GET", "https://x.example/"))
        assert _bounds(registry) == [*(repr(float(bound)) for bound in DURATION_BUCKETS), "+Inf"]


async def test_buckets_can_be_chosen_per_registry() -> None:
    """`buckets=` sets every histogram's bounds; an observation lands in its bucket."""
    registry = CollectorRegistry()
    async with _transport(registry, buckets=[0.5, 2, 30]) as transport:
        await transport.handle_async_request(httpx.Request("GET", "https://x.example/"))
        for histogram in ("request_duration", "attempt_duration"):
            assert _bounds(registry, f"resilient_http_{histogram}_seconds_bucket") == ["0.5", "2.0", "30.0", "+Inf"]
        labels = {"transport": "default", **where("x.example:443"), "le": "0.5"}
        assert registry.get_sample_value("resilient_http_request_duration_seconds_bucket", labels) == 1


@pytest.mark.parametrize(
    "buckets",
    [[], [0.1, 0.1], [1, 0.5], [0, 1], [-1], [float("inf")], [float("nan")], ["1"], [True], "0.1", 5, [0.1] * 101],
)
def test_bad_buckets_are_refused_naming_the_field(buckets: Any) -> None:
    """Empty, unordered, repeated, non-positive, infinite or non-numeric bounds raise `ConfigurationError`."""
    with pytest.raises(ConfigurationError, match=r"^buckets: "):
        _transport(CollectorRegistry(), buckets=buckets)


def test_transports_on_one_registry_must_share_their_buckets() -> None:
    """A histogram's series must share bounds to be summed: a transport with other buckets is refused."""
    registry = CollectorRegistry()
    first = _transport(registry, "first", buckets=[1, 2])
    with pytest.raises(ConfigurationError, match=r"^buckets: .*differs"):
        _transport(registry, "second", buckets=[1, 3])
    same = _transport(registry, "second", buckets=(1.0, 2.0))
    elsewhere = _transport(CollectorRegistry(), "second", buckets=[1, 3])
    assert first is not None and same is not None and elsewhere is not None


async def test_a_shed_call_the_fallback_answered_is_still_shed(registry: CollectorRegistry) -> None:
    """Shed counts the refusal, whatever answered next: an open breaker's call given a fallback answer is shed."""
    breaker = only(circuit_breaker=CircuitBreakerPolicy(minimum_calls=1, failure_ratio=1.0))
    transport = ResilientTransport(
        default=breaker,
        inner=httpx.MockTransport(lambda r: httpx.Response(503)),
        registry=registry,
        fallback=lambda request, failure, info: httpx.Response(299),
    )
    async with httpx.AsyncClient(transport=transport, base_url="https://api.example.com") as client:
        assert (await client.get("/")).status_code == 299  # a 503 the fallback replaced: not shed
        assert (await client.get("/")).status_code == 299  # refused by the open breaker: shed
        labels = {"transport": "default", **where(HOST)}
        assert registry.get_sample_value("resilient_http_requests_total", {**labels, "outcome": "fallback"}) == 2
        assert registry.get_sample_value("resilient_http_shed_total", {**labels, "reason": "circuit_open"}) == 1


async def test_a_layer_in_dry_run_exports_what_it_would_block_and_no_refusals(harness: Harness) -> None:
    """A dry-run layer refuses nothing: no shed or refusal series for it, its would-be blocks at 0."""
    policy = only(
        circuit_breaker=CircuitBreakerPolicy(dry_run=True),
        rate_limit=RateLimitPolicy(rate=10, dry_run=True),
        bulkhead=BulkheadPolicy(dry_run=True),
    )
    await harness.client(Script(200), policy).get("/")
    exported = samples(harness.registry)
    assert "resilient_http_shed_total" not in exported
    assert "resilient_http_bulkhead_rejected_total" not in exported
    for layer in ("circuit_breaker", "rate_limit", "bulkhead"):
        assert harness.value("resilient_http_dry_run_blocked_total", layer=layer) == 0, layer
    for outcome in SHED:
        assert harness.value("resilient_http_requests_total", outcome=outcome) is None, outcome


async def test_the_rate_limit_gauges_follow_a_live_policy_update(harness: Harness) -> None:
    """`update_policies` with a new rate and burst shows them at once."""
    transport = harness.transport(Script(200), only(rate_limit=RateLimitPolicy(rate=2, burst=1)))
    async with httpx.AsyncClient(transport=LeftOpen(transport), base_url="https://api.example.com") as client:
        await client.get("/")
        transport.update_policies(default=only(rate_limit=RateLimitPolicy(rate=8, burst=3)))
        await client.get("/")
    assert harness.value("resilient_http_rate_limit_per_second") == 8
    assert harness.value("resilient_http_rate_limit_burst") == 3
