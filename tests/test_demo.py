"""The demo's bookkeeping: one definition of "shed", a bounded backlog per side, and the lines that explain the table.

The demo itself runs in subprocesses (see ``test_cli.py``); here its parts
run in-process, with ``httpx.MockTransport`` and the fake clock.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import httpx
import pytest
from conftest import Harness, only

from resilient_http import (
    BulkheadPolicy,
    CircuitBreakerPolicy,
    Policy,
    RateLimitPolicy,
    RetryPolicy,
    StaleCachePolicy,
    call_info,
)
from resilient_http._demo_report import API, SEARCH, SHED, Record, Summary, shed_by, why_fewer_fresh
from resilient_http._demo_scenario import MAX_IN_FLIGHT, demo_policies, policies_from_wire, policies_to_wire
from resilient_http._demo_side import Side, record
from resilient_http._upstream import Upstream

CACHE = StaleCachePolicy()
POLICIES = {
    "breaker.test": only(stale_cache=CACHE, circuit_breaker=CircuitBreakerPolicy(minimum_calls=1, failure_ratio=0.5)),
    "limiter.test": only(stale_cache=CACHE, rate_limit=RateLimitPolicy(rate=1, burst=1, max_wait=0)),
    "bulkhead.test": only(stale_cache=CACHE, bulkhead=BulkheadPolicy(max_concurrent=1, max_queue=0)),
    "down.test": only(stale_cache=CACHE),
}


def sample_sum(harness: Harness, name: str, label: str) -> float:
    return sum(
        sample.value
        for family in harness.registry.collect()
        for sample in family.samples
        if sample.name == name and sample.labels.get(label) in SHED
    )


async def test_stale_answers_say_what_failed_in_their_place(harness: Harness) -> None:
    """CallInfo.stale_reason names the failure a stale answer stands in for: a 5xx, or the layer that refused."""
    steps = iter([200, 503])
    client = harness.client(lambda request: httpx.Response(next(steps, 200)), policies=POLICIES)
    await client.get("https://breaker.test/a")  # kept
    server_error = await client.get("https://breaker.test/a")  # a 503 answered stale; opens the circuit
    refused = await client.get("https://breaker.test/a")
    assert [call_info(r) for r in (server_error, refused)] == [
        call_info(server_error)._replace(stale=True, stale_reason="server_error"),  # type: ignore[union-attr]
        call_info(refused)._replace(stale=True, stale_reason="circuit_open"),  # type: ignore[union-attr]
    ]


async def test_shed_counts_every_local_refusal_once_answered_stale_or_not(harness: Harness) -> None:
    """Breaker, limiter and bulkhead refusals are shed whether raised or answered stale; failures elsewhere are not.

    The count from each call's own outcome equals the count from the metrics,
    so the demo's table and the dashboard agree.
    """
    release = asyncio.Event()
    served = {"breaker.test": iter([200, 503])}

    async def upstream(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host == "down.test" and request.url.path == "/a" and release.is_set():
            raise httpx.ConnectError("refused", request=request)
        if request.url.path == "/slow":
            await release.wait()
        return httpx.Response(next(served.get(host, iter(())), 200))

    client = harness.client(upstream, policies=POLICIES)
    outcomes: list[httpx.Response | Exception] = []

    async def get(url: str) -> None:
        try:
            outcomes.append(await client.get(url))
        except httpx.TransportError as exc:
            outcomes.append(exc)

    for host in POLICIES:
        await client.get(f"https://{host}/a")  # every /a is kept, none of these calls is counted
    await get("https://breaker.test/a")  # 503, answered stale: not shed; the circuit opens
    await get("https://breaker.test/a")  # refused, answered stale: shed
    await get("https://breaker.test/b")  # refused, nothing kept: shed
    await get("https://limiter.test/a")  # refused, answered stale: shed
    await get("https://limiter.test/b")  # refused: shed
    slow = asyncio.create_task(client.get("https://bulkhead.test/slow"))
    await asyncio.sleep(0)
    await get("https://bulkhead.test/a")  # refused, answered stale: shed
    await get("https://bulkhead.test/b")  # refused: shed
    release.set()
    await slow
    await get("https://down.test/a")  # the connection failed, answered stale: not shed
    records = [record("h", 0.0, 0.0, outcome) for outcome in outcomes]
    assert Counter(r.shed for r in records) == {
        None: 2,
        "circuit_open": 2,
        "rate_limited": 2,
        "bulkhead_full": 2,
    }
    assert [r.stale for r in records] == [True, True, False, True, False, True, False, True]
    from_metrics = sample_sum(harness, "resilient_http_requests_total", "outcome") + sample_sum(
        harness, "resilient_http_stale_served_total", "reason"
    )
    assert from_metrics == sum(r.shed is not None for r in records) == 6


def test_shed_is_read_from_the_outcome_and_the_stale_reason() -> None:
    """shed_by: a refusal label, as the outcome or as the reason of a stale answer; anything else is not shed."""
    assert [shed_by(label) for label in ("circuit_open", "rate_limited", "bulkhead_full")] == list(SHED)
    assert shed_by("stale", "rate_limited") == "rate_limited"
    assert shed_by("stale", "server_error") is None
    assert shed_by("timeout") is shed_by("2xx") is shed_by("error") is None


async def test_a_side_never_has_more_than_its_cap_in_flight() -> None:
    """Calls due while MAX_IN_FLIGHT are in flight are not started, and counted as due: the backlog stays bounded."""
    hold = asyncio.Event()

    async def hung(request: httpx.Request) -> httpx.Response:
        await hold.wait()
        return httpx.Response(200)

    upstreams = {API: Upstream(API), SEARCH: Upstream(SEARCH)}  # never started: the mock answers
    async with httpx.AsyncClient(transport=httpx.MockTransport(hung)) as client:
        side = Side(client, upstreams, start=0.0)
        for _ in range(MAX_IN_FLIGHT + 50):
            side.launch(API, "/catalog/1", due=0.0)
        assert (side.due, side.started, len(side.tasks)) == (MAX_IN_FLIGHT + 50, MAX_IN_FLIGHT, MAX_IN_FLIGHT)
        hold.set()
        await asyncio.gather(*side.tasks)
    assert len(side.records) == MAX_IN_FLIGHT
    report = side.report()
    assert (report["due"], report["started"], len(report["records"])) == (
        MAX_IN_FLIGHT + 50,
        MAX_IN_FLIGHT,
        MAX_IN_FLIGHT,
    )
    assert side.report()["records"] == []  # each record is written out once


def rec(started: float, *, fresh: bool = True, stale_reason: str | None = None) -> Record:
    stale = stale_reason is not None
    return Record(API, started, started + 0.01, fresh or stale, stale, "stale" if stale else "200", None, stale_reason)


PHASES = [("healthy", 0.0, 10.0), ("errors", 10.0, 20.0)]


def test_fewer_fresh_answers_are_explained_by_phase_and_reason() -> None:
    """A phase where resilient_http gave fewer fresh answers gets a line with its stale answers' reasons."""
    bare = [rec(t) for t in range(10)] + [rec(10 + t, fresh=t % 2 == 0) for t in range(10)]
    resilient = [rec(t) for t in range(10)] + [rec(10.0), *(rec(11 + t, stale_reason="rate_limited") for t in range(8))]
    resilient.append(rec(19.5, stale_reason="circuit_open"))
    lines = why_fewer_fresh(bare, resilient, PHASES)
    assert lines[0].startswith("why resilient_http gave fewer fresh answers than bare httpx")
    assert lines[1].split() == "errors 10 % fresh against 50 %; stale: 8 (rate limiter), 1 (breaker open)".split()
    assert not any("healthy" in line for line in lines)
    assert "Retry-After" in " ".join(lines[2:]) and "max_wait" in " ".join(lines[2:])


@pytest.mark.parametrize("resilient_fresh", [5, 10])
def test_nothing_is_explained_when_resilient_http_is_as_fresh(resilient_fresh: int) -> None:
    """No line when resilient_http's share of fresh answers is as high as bare httpx's, or higher."""
    bare = [rec(10 + t, fresh=t % 2 == 0) for t in range(10)]
    resilient = [rec(10 + t, fresh=t < resilient_fresh) for t in range(10)]
    assert why_fewer_fresh(bare, resilient, PHASES) == []


def test_the_table_counts_shed_calls_answered_stale_and_calls_not_started() -> None:
    """calls shed includes refusals answered stale; calls due, not started and unfinished each have a row."""
    records = [
        Record(API, 0.0, 0.1, True, True, "stale", "rate_limited", "rate_limited"),
        Record(API, 0.0, 0.1, False, False, "CircuitOpenError", "circuit_open"),
        Record(API, 0.0, 0.1, True, True, "stale", None, "server_error"),
        Record(SEARCH, 0.0, 0.1, True, False, "200"),
    ]
    rows = Summary("resilient_http", 10, 6, records, 3, Counter(), 1, "n/a").rows()
    assert (rows["calls"], rows["  not started (demo's cap)"], rows["  unfinished at the end"]) == ("10", "4", "2")
    assert (rows["calls shed"], rows["stale answers"]) == ("2", "2")
    assert Summary("bare httpx", 10, 10, records, 3, Counter(), None, "n/a").rows()["calls shed"] == "-"


def test_policies_reach_the_side_as_they_were() -> None:
    """The resilient side rebuilds exactly the policies the demo was given, sets, budgets and layers off included."""
    named, default = demo_policies()
    named["*.other"] = Policy(
        retry=RetryPolicy(statuses=frozenset({503}), budget=None),
        circuit_breaker=None,
        stale_cache=StaleCachePolicy(identity_headers=("X-Api-Key",)),
    )
    wire = json.loads(json.dumps(policies_to_wire(named, default)))
    assert policies_from_wire(wire) == (named, default)
