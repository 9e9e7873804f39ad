"""How clients behave when their dependency misbehaves: five scenarios, every client on the same traffic.

    python -m benchmarks.chaos [--smoke] [--json PATH] [--only SCENARIO ...]

Traffic is open-loop: calls start at a fixed rate whatever happens to the
calls before them, as a service's own callers would, so a client that
slows down or retries is seen piling up load, not politely waiting. The
server (``benchmarks/_faults.py``) runs on 127.0.0.1 in the same process and
counts what lands on it. Each client runs the scenario alone, one after
another, on a fresh connection pool.

Clients: bare httpx (no protection); naive retries (3 attempts, no backoff,
written by hand); httpx-retries (``RetryTransport``, 3 attempts, backoff
0.1 s, Retry-After honoured); stamina (``@stamina.retry``, 3 attempts,
Retry-After honoured through its backoff hook); hishel (only where a cache
applies); resilient_http (``Policy()``, plus the layer a scenario is about).

Scenarios:

- ``outage``: healthy, then every request fails (503, or a connection reset
  for 30 %), then healed. Upstream attempts per offered call during the
  outage; time from the heal to the first successful call.
- ``errors``: 20 % of requests get a 503. Success rate and amplification
  (upstream attempts per offered call).
- ``quota``: the server serves ``quota`` calls per one-second window and
  answers the rest 429 with Retry-After; the offered rate is above it. 429
  share of upstream attempts, and arrivals before a Retry-After ran out.
- ``hung``: one host never answers; a healthy host beside it, called by the
  same client. The healthy host's p99 latency, against its p99 alone.
- ``cached``: a cacheable resource (``max-age=1``) whose host goes down.
  Share of calls answered (stale or from cache) and failed.

``--smoke`` runs every scenario with every client for a fraction of a second.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import hishel
import httpx
import stamina
from hishel.httpx import AsyncCacheTransport
from httpx_retries import Retry, RetryTransport
from prometheus_client import CollectorRegistry

from resilient_http import (
    BulkheadPolicy,
    CircuitOpenError,
    Policy,
    RateLimitPolicy,
    ResilientTransport,
    StaleCachePolicy,
)

from ._common import machine, percentile, table, verdict, write_json
from ._faults import FaultServer

BARE = "bare httpx"
NAIVE = "naive retry"
HTTPX_RETRIES = "httpx-retries"
STAMINA = "stamina"
HISHEL = "hishel"
RESILIENT = "resilient_http"
RESILIENT_LIMITER = "resilient_http + limiter"
RESILIENT_BULKHEAD_20 = "resilient_http, bulkhead 20"
BARE_PER_HOST = "bare httpx, a client per host"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})

Send = Callable[[str], Awaitable[httpx.Response]]


# --------------------------------------------------------------------------- clients


@dataclass
class Client:
    """One kind of client: ``send(url)`` makes one offered call, however many attempts that takes."""

    name: str
    http: httpx.AsyncClient
    send: Send
    registry: CollectorRegistry | None = None
    policy: Policy | None = None
    others: list[httpx.AsyncClient] = field(default_factory=list)  # more pools to close

    async def aclose(self) -> None:
        for http in [self.http, *self.others]:
            await http.aclose()

    def metric(self, name: str, labels: dict[str, str]) -> float:
        if self.registry is None:
            return 0.0
        return self.registry.get_sample_value(name, labels) or 0.0


def _stamina_hook(exc: Exception) -> bool | float:
    """Retry what is retryable; a Retry-After in seconds is the wait (stamina's documented hook)."""
    if isinstance(exc, httpx.HTTPStatusError):
        if exc.response.status_code not in RETRY_STATUSES:
            return False
        hinted = exc.response.headers.get("retry-after", "")
        return float(hinted) if hinted.isdigit() else True
    return isinstance(exc, httpx.TransportError)


def make_client(name: str, policy: Policy | None = None) -> Client:
    """A client of kind ``name`` with a fresh connection pool; ``policy`` for resilient_http."""
    if name.startswith(RESILIENT):
        registry = CollectorRegistry()
        policy = Policy() if policy is None else policy
        http = httpx.AsyncClient(transport=ResilientTransport(default=policy, registry=registry))

        async def resilient_send(url: str) -> httpx.Response:
            return await http.get(url)

        return Client(name, http, resilient_send, registry, policy)
    if name == BARE_PER_HOST:
        # The isolation floor: nothing shared between hosts but the event loop.
        pools: dict[str, httpx.AsyncClient] = {}
        first = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport())
        per_host = Client(name, first, lambda url: first.get(url))

        async def per_host_send(url: str) -> httpx.Response:
            netloc = httpx.URL(url).netloc.decode()
            http = pools.get(netloc)
            if http is None:
                http = pools[netloc] = first if not pools else httpx.AsyncClient(transport=httpx.AsyncHTTPTransport())
                if http is not first:
                    per_host.others.append(http)
            return await http.get(url)

        per_host.send = per_host_send
        return per_host
    if name == HTTPX_RETRIES:
        retry = Retry(total=2, backoff_factor=0.1)
        http = httpx.AsyncClient(transport=RetryTransport(transport=httpx.AsyncHTTPTransport(), retry=retry))
    elif name == HISHEL:
        storage = hishel.AsyncSqliteStorage(database_path=":memory:")
        http = httpx.AsyncClient(transport=AsyncCacheTransport(httpx.AsyncHTTPTransport(), storage=storage, rfc=True))
    else:
        http = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport())

    if name == NAIVE:

        async def naive_send(url: str) -> httpx.Response:
            for attempt in (1, 2, 3):
                try:
                    response = await http.get(url)
                except httpx.TransportError:
                    if attempt == 3:
                        raise
                    continue
                if response.status_code not in RETRY_STATUSES or attempt == 3:
                    return response
            raise AssertionError("unreachable")

        return Client(name, http, naive_send)
    if name == STAMINA:

        @stamina.retry(on=_stamina_hook, attempts=3, wait_initial=0.1)
        async def stamina_send(url: str) -> httpx.Response:
            response = await http.get(url)
            response.raise_for_status()
            return response

        return Client(name, http, stamina_send)

    async def plain_send(url: str) -> httpx.Response:
        return await http.get(url)

    return Client(name, http, plain_send)


# --------------------------------------------------------------------------- open-loop traffic


@dataclass(frozen=True, slots=True)
class Record:
    """One offered call. Times are seconds since the scenario started."""

    target: str
    scheduled: float
    ended: float
    latency: float
    kind: str  # ok | stale | cached | status | error | unfinished
    status: int | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Stream:
    target: str
    url: str
    rate: float  # calls per second
    offset: float = 0.0  # of its first call, in seconds


async def _one(client: Client, stream: Stream, start: float, cutoff: list[float]) -> Record:
    began = time.monotonic()
    scheduled = began - start
    status: int | None = None
    error: str | None = None
    try:
        response = await client.send(stream.url)
    except httpx.HTTPStatusError as exc:  # stamina raises when its retries run out on a status
        kind, status = "status", exc.response.status_code
    except Exception as exc:
        kind, error = "error", type(exc).__name__
    except asyncio.CancelledError:
        kind = "unfinished"  # cancelled at the end of the scenario
    else:
        status = response.status_code
        info = response.extensions.get("resilient_http")
        caching = response.extensions.get("caching")
        if info is not None and info.stale:
            kind = "stale"
        elif caching is not None and caching["from_cache"] and not caching["revalidated"]:
            kind = "cached"
        else:
            kind = "ok" if 200 <= status < 300 else "status"
    # A cancelled call ends when it was cancelled, not when its clean-up (which may queue) is done.
    ended = cutoff[0] if kind == "unfinished" and cutoff else time.monotonic()
    return Record(stream.target, scheduled, ended - start, ended - began, kind, status, error)


Phase = tuple[float, Callable[[], None]]


async def drive(
    client: Client,
    streams: Sequence[Stream],
    duration: float,
    phases: Sequence[Phase] = (),
    drain: float = 10.0,
    wait_for: Callable[[Stream], bool] = lambda stream: True,
) -> tuple[float, list[Record]]:
    """Offer calls at each stream's rate for ``duration`` seconds; return the start time and every call.

    ``phases`` are (seconds after the start, action). After the last call is
    offered, calls of streams ``wait_for`` accepts get ``drain`` seconds to
    finish; the rest, and any still running then, are cancelled and recorded
    as unfinished.
    """
    schedule: list[tuple[float, Stream]] = []
    for stream in streams:
        count = int(duration * stream.rate)
        schedule += [(stream.offset + i / stream.rate, stream) for i in range(count)]
    schedule.sort(key=lambda item: item[0])
    loop = asyncio.get_running_loop()
    start = time.monotonic() + 0.02
    for at, action in phases:
        loop.call_at(start + at, action)
    tasks: list[tuple[Stream, asyncio.Task[Record]]] = []
    cutoff: list[float] = []  # when the calls still running were cancelled
    for at, stream in schedule:
        delay = start + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append((stream, asyncio.create_task(_one(client, stream, start, cutoff))))
    end = start + duration
    if end > time.monotonic():
        await asyncio.sleep(end - time.monotonic())
    waited = [task for stream, task in tasks if wait_for(stream)]
    if waited:
        await asyncio.wait(waited, timeout=drain)
    cutoff.append(time.monotonic())
    for _, task in tasks:
        task.cancel()
    records = await asyncio.gather(*(task for _, task in tasks))
    return start, list(records)


# --------------------------------------------------------------------------- measures


def latency_summary(records: Iterable[Record]) -> dict[str, float]:
    """Percentiles of every call's latency; a call still running at the end counts with its time so far."""
    values = [r.latency for r in records]
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values) if values else float("nan"),
    }


def kinds(records: Sequence[Record]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in records:
        key = record.kind if record.error is None else f"{record.kind}:{record.error}"
        if record.kind == "status":
            key = f"status:{record.status}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def share(records: Sequence[Record], *accepted: str) -> float:
    return sum(r.kind in accepted for r in records) / len(records) if records else float("nan")


def timeline(server: FaultServer, start: float, duration: float, width: float) -> list[int]:
    """Upstream arrivals per ``width``-second bin from ``start``."""
    bins = [0] * max(1, round(duration / width))
    for arrival in server.arrivals:
        index = int((arrival.at - start) / width)
        if 0 <= index < len(bins):
            bins[index] += 1
    return bins


@dataclass(frozen=True)
class Settings:
    scale: float = 1.0  # every duration is multiplied by it
    rate: float = 100.0  # offered calls per second (outage, errors)
    quota: int = 50
    quota_offered: float = 60.0
    hung_rate: float = 50.0  # to each host
    cached_rate: float = 50.0
    drain: float = 15.0
    bin: float = 0.25  # seconds per timeline bin

    def s(self, seconds: float) -> float:
        return seconds * self.scale


SMOKE = Settings(
    scale=0.02, rate=50.0, quota=10, quota_offered=15.0, hung_rate=25.0, cached_rate=50.0, drain=0.2, bin=0.05
)


async def _run_client(
    server: FaultServer, name: str, policy: Policy | None, body: Callable[[Client], Awaitable[Any]]
) -> Any:
    print(f"  {name}", file=sys.stderr, flush=True)
    server.set_mode("healthy")
    server.reset_log()
    await server.drop_connections()
    client = make_client(name, policy)
    try:
        return await body(client)
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- scenarios


async def outage(settings: Settings, clients: Sequence[str]) -> dict[str, Any]:
    """Healthy, total outage, healed: upstream load per offered call and time to recover."""
    healthy, down, healed = settings.s(2.0), settings.s(10.0), settings.s(14.0)
    duration = healthy + down + healed
    heal = healthy + down
    rate = settings.rate
    results: dict[str, Any] = {}
    async with FaultServer(reset_share=0.3) as server:
        stream = Stream("upstream", server.url + "/items", rate)
        host = f"127.0.0.1:{server.port}"
        for name in clients:

            async def body(client: Client) -> dict[str, Any]:
                opens_at_heal: list[float] = []

                def go_down() -> None:
                    server.set_mode("outage")

                def come_back() -> None:
                    opens_at_heal.append(
                        client.metric("resilient_http_circuit_opened_total", {"transport": "default", "host": host})
                    )
                    server.set_mode("healthy")

                start, records = await drive(
                    client, [stream], duration, [(healthy, go_down), (heal, come_back)], settings.drain
                )
                return _outage_result(client, server, start, records, settings, healthy, heal, duration, opens_at_heal)

            results[name] = await _run_client(server, name, None, body)
    return {
        "description": f"{rate:.0f} calls/s; healthy {healthy:g} s, outage {down:g} s (503, or a reset for 30 %), "
        f"healed {healed:g} s",
        "clients": results,
        "heal_at": heal,
        "outage_at": healthy,
        "bin": settings.bin,
    }


def _outage_result(
    client: Client,
    server: FaultServer,
    start: float,
    records: list[Record],
    settings: Settings,
    outage_at: float,
    heal: float,
    duration: float,
    opens_at_heal: list[float],
) -> dict[str, Any]:
    during = [r for r in records if outage_at <= r.scheduled < heal]
    arrivals = server.received(start + outage_at, start + heal)
    # "Once the breaker is open": from the first call it refused, or one second into the outage
    # for clients without a breaker, and for comparison.
    refused = [r.scheduled for r in records if r.error == CircuitOpenError.__name__]
    settled = min(refused) if refused else outage_at + min(1.0, (heal - outage_at) / 2)
    offered_after = [r for r in during if r.scheduled >= settled]
    arrivals_after = server.received(start + settled, start + heal)
    recovered = [r for r in records if r.kind == "ok" and r.ended >= heal]
    first = min(recovered, key=lambda r: r.ended) if recovered else None
    result: dict[str, Any] = {
        "offered": len(records),
        "offered_during_outage": len(during),
        "attempts_per_call_outage": len(arrivals) / len(during) if during else float("nan"),
        "settled_at": settled,
        "breaker_opened_at": min(refused) if refused else None,
        "attempts_per_call_settled": len(arrivals_after) / len(offered_after) if offered_after else float("nan"),
        "recovery_seconds": None if first is None else first.ended - heal,
        "success_share": share(records, "ok"),
        "failed_during_outage": share(during, "status", "error", "unfinished"),
        "latency": latency_summary(records),
        "latency_during_outage": latency_summary(during),
        "outcomes": kinds(records),
        "timeline": timeline(server, start, duration, settings.bin),
        "offered_timeline": [
            sum(1 for r in records if i * settings.bin <= r.scheduled < (i + 1) * settings.bin)
            for i in range(max(1, round(duration / settings.bin)))
        ],
    }
    if client.policy is not None and client.policy.circuit_breaker is not None:
        breaker = client.policy.circuit_breaker
        opens = opens_at_heal[0] if opens_at_heal else 0.0
        # The break in force at the heal: break_duration doubled by every failed trial, capped,
        # jittered by up to +20 %. The target: recovered within it plus one trial call.
        nominal = min(breaker.max_break_duration, breaker.break_duration * 2 ** max(0.0, opens - 1))
        trial = first.latency if first is not None else 0.0
        result["breaker"] = {
            "opened_before_heal": opens,
            "break_in_force": nominal,
            "recovery_bound": 1.2 * nominal + trial,
        }
    return result


async def errors(settings: Settings, clients: Sequence[str]) -> dict[str, Any]:
    """20 % of requests answered 503: success rate and amplification."""
    duration, rate = settings.s(10.0), settings.rate
    results: dict[str, Any] = {}
    async with FaultServer(error_share=0.2, seed=1) as server:
        stream = Stream("upstream", server.url + "/items", rate)
        for name in clients:

            async def body(client: Client) -> dict[str, Any]:
                server.set_mode("errors")
                _, records = await drive(client, [stream], duration, drain=settings.drain)
                arrivals = len(server.arrivals)
                return {
                    "offered": len(records),
                    "attempts": arrivals,
                    "amplification": arrivals / len(records),
                    "success_share": share(records, "ok"),
                    "latency": latency_summary(records),
                    "outcomes": kinds(records),
                }

            results[name] = await _run_client(server, name, None, body)
    return {
        "description": f"{rate:.0f} calls/s for {duration:g} s; 20 % of requests get 503 (no Retry-After)",
        "clients": results,
    }


async def quota(settings: Settings, clients: Sequence[str]) -> dict[str, Any]:
    """A quota of N calls per second, offered more: 429 share and calls sent before Retry-After."""
    duration, limit, offered = settings.s(10.0), settings.quota, settings.quota_offered
    results: dict[str, Any] = {}
    policies = {RESILIENT_LIMITER: Policy(rate_limit=RateLimitPolicy(rate=limit))}
    async with FaultServer(quota=limit) as server:
        stream = Stream("upstream", server.url + "/items", offered)
        for name in clients:

            async def body(client: Client) -> dict[str, Any]:
                server.set_mode("quota")
                _, records = await drive(client, [stream], duration, drain=settings.drain)
                arrivals = server.arrivals
                rejected = sum(a.status == 429 for a in arrivals)
                return {
                    "offered": len(records),
                    "attempts": len(arrivals),
                    "amplification": len(arrivals) / len(records),
                    "share_429": rejected / len(arrivals) if arrivals else float("nan"),
                    "early": sum(a.early for a in arrivals),
                    "success_share": share(records, "ok"),
                    "latency": latency_summary(records),
                    "outcomes": kinds(records),
                }

            results[name] = await _run_client(server, name, policies.get(name), body)
    return {
        "description": f"quota {limit} calls per one-second window, {offered:.0f} calls/s offered for {duration:g} s; "
        "over quota: 429 with Retry-After (whole seconds, at least 1); "
        f"'early' = arrivals before a Retry-After ran out, more than {server.grace * 1000:.0f} ms after it was sent",
        "policies": {name: repr(policy) for name, policy in policies.items()},
        "clients": results,
    }


async def hung(settings: Settings, clients: Sequence[str]) -> dict[str, Any]:
    """One host hangs; the healthy host beside it, same client: its p99 against its p99 alone."""
    duration, rate = settings.s(10.0), settings.hung_rate
    results: dict[str, Any] = {}
    policies = {RESILIENT_BULKHEAD_20: Policy(bulkhead=BulkheadPolicy(max_concurrent=20))}
    async with FaultServer() as healthy_server, FaultServer() as hung_server:
        healthy = Stream("healthy", healthy_server.url + "/items", rate)
        stuck = Stream("hung", hung_server.url + "/items", rate, offset=0.5 / rate)
        for name in clients:

            async def alone(client: Client) -> list[Record]:
                _, records = await drive(client, [healthy], duration, drain=settings.drain)
                return records

            async def beside(client: Client) -> list[Record]:
                hung_server.set_mode("hang")
                _, records = await drive(
                    client,
                    [healthy, stuck],
                    duration,
                    drain=settings.drain,
                    wait_for=lambda stream: stream.target == "healthy",
                )
                return records

            base = await _run_client(healthy_server, name, policies.get(name), alone)
            hung_server.reset_log()
            await hung_server.drop_connections()
            both = await _run_client(healthy_server, name, policies.get(name), beside)
            hung_server.set_mode("healthy")
            await hung_server.drop_connections()
            # The same run alone again: how much p99 moves between two identical runs on this machine.
            control = await _run_client(healthy_server, name, policies.get(name), alone)
            ok_alone = [r for r in base if r.target == "healthy"]
            ok_beside = [r for r in both if r.target == "healthy"]
            stuck_calls = [r for r in both if r.target == "hung"]
            p99_alone = latency_summary(ok_alone)["p99"]
            p99_beside = latency_summary(ok_beside)["p99"]
            p99_control = latency_summary(control)["p99"]
            results[name] = {
                "healthy_alone_again": latency_summary(control),
                "control_ratio": p99_control / p99_alone if p99_alone else float("nan"),
                "offered_healthy": len(ok_beside),
                "healthy_alone": latency_summary(ok_alone),
                "healthy_beside_hung": latency_summary(ok_beside),
                "p99_ratio": p99_beside / p99_alone if p99_alone else float("nan"),
                "healthy_success_alone": share(ok_alone, "ok"),
                "healthy_success_beside": share(ok_beside, "ok"),
                "healthy_outcomes": kinds(ok_beside),
                "hung_outcomes": kinds(stuck_calls),
                "hung_arrivals": len(hung_server.arrivals),
                "latency": latency_summary(ok_beside),
            }
    return {
        "description": f"{rate:.0f} calls/s to each of two hosts for {duration:g} s, one client; one host reads "
        "requests and never answers. Baseline: the healthy host alone, same client kind, run before; the same run "
        "again after shows the noise. Calls to the hung host still running at the end are cancelled",
        "policies": {name: repr(policy) for name, policy in policies.items()},
        "clients": results,
    }


async def cached(settings: Settings, clients: Sequence[str]) -> dict[str, Any]:
    """A cacheable resource whose host goes down: answered (stale, cached) against failed."""
    healthy, down = settings.s(2.0), settings.s(8.0)
    duration, rate = healthy + down, settings.cached_rate
    results: dict[str, Any] = {}
    policies = {RESILIENT: Policy(stale_cache=StaleCachePolicy())}
    async with FaultServer(cache_control="max-age=1", reset_share=0.3) as server:
        stream = Stream("upstream", server.url + "/catalog/1", rate)
        for name in clients:

            async def body(client: Client) -> dict[str, Any]:
                def go_down() -> None:
                    server.set_mode("outage")

                start, records = await drive(client, [stream], duration, [(healthy, go_down)], settings.drain)
                during = [r for r in records if r.scheduled >= healthy]
                return {
                    "offered": len(records),
                    "offered_during_outage": len(during),
                    "answered_fresh": share(during, "ok"),
                    "answered_stale": share(during, "stale"),
                    "answered_from_cache": share(during, "cached"),
                    "failed": share(during, "status", "error", "unfinished"),
                    "attempts_per_call_outage": len(server.received(start + healthy)) / len(during)
                    if during
                    else float("nan"),
                    "latency": latency_summary(during),
                    "outcomes": kinds(during),
                }

            results[name] = await _run_client(server, name, policies.get(name), body)
    return {
        "description": f"{rate:.0f} calls/s to one resource (Cache-Control: max-age=1); healthy {healthy:g} s, "
        f"then down {down:g} s (503, or a reset for 30 %); shares are of the calls offered during the outage",
        "policies": {name: repr(policy) for name, policy in policies.items()},
        "clients": results,
    }


RETRYING = (BARE, NAIVE, HTTPX_RETRIES, STAMINA, RESILIENT)
SCENARIOS: dict[str, tuple[Callable[[Settings, Sequence[str]], Awaitable[dict[str, Any]]], tuple[str, ...]]] = {
    "outage": (outage, RETRYING),
    "errors": (errors, RETRYING),
    "quota": (quota, (*RETRYING, RESILIENT_LIMITER)),
    "hung": (hung, (*RETRYING, RESILIENT_BULKHEAD_20, BARE_PER_HOST)),
    "cached": (cached, (BARE, NAIVE, HTTPX_RETRIES, STAMINA, HISHEL, RESILIENT)),
}


# --------------------------------------------------------------------------- targets and report


@dataclass
class Target:
    scenario: str
    target: str
    value: str
    met: bool


def targets(result: dict[str, Any]) -> list[Target]:
    found: list[Target] = []
    scenarios = result["scenarios"]
    if "outage" in scenarios:
        clients = scenarios["outage"]["clients"]
        naive = clients.get(NAIVE)
        if naive is not None:
            value = naive["attempts_per_call_outage"]
            found.append(
                Target(
                    "outage",
                    "naive retry: ~3.0 upstream attempts per offered call",
                    f"{value:.2f}",
                    2.5 <= value <= 3.0,
                )
            )
        mine = clients.get(RESILIENT)
        if mine is not None:
            value = mine["attempts_per_call_settled"]
            found.append(
                Target(
                    "outage",
                    "resilient_http: ≤ 0.1 attempts per offered call once the breaker is open",
                    f"{value:.3f}",
                    value <= 0.1,
                )
            )
            recovery, bound = mine["recovery_seconds"], mine.get("breaker", {}).get("recovery_bound")
            found.append(
                Target(
                    "outage",
                    "resilient_http: recovers within the break in force (≤ 1.2 x nominal, jitter) plus one trial",
                    "never" if recovery is None else f"{recovery:.2f} s (bound {bound:.2f} s)",
                    recovery is not None and bound is not None and recovery <= bound,
                )
            )
    if "errors" in scenarios and RESILIENT in scenarios["errors"]["clients"]:
        value = scenarios["errors"]["clients"][RESILIENT]["success_share"]
        found.append(Target("errors", "resilient_http: success rate ≥ 99 %", f"{value:.2%}", value >= 0.99))
    if "quota" in scenarios and RESILIENT_LIMITER in scenarios["quota"]["clients"]:
        mine = scenarios["quota"]["clients"][RESILIENT_LIMITER]
        found.append(
            Target(
                "quota",
                "resilient_http + limiter: 429 share < 1 %",
                f"{mine['share_429']:.2%}",
                mine["share_429"] < 0.01,
            )
        )
        found.append(
            Target(
                "quota",
                "resilient_http + limiter: 0 calls sent before Retry-After",
                str(mine["early"]),
                mine["early"] == 0,
            )
        )
    if "hung" in scenarios and RESILIENT in scenarios["hung"]["clients"]:
        value = scenarios["hung"]["clients"][RESILIENT]["p99_ratio"]
        found.append(
            Target(
                "hung",
                "resilient_http: healthy host's p99 within 10 % of its p99 alone",
                f"{value:.2f}x",
                value <= 1.10,
            )
        )
    return found


def report(result: dict[str, Any]) -> str:
    out: list[str] = []
    scenarios = result["scenarios"]
    pct = "{:.1%}".format

    def ms(value: float) -> str:
        return "-" if value != value else f"{value * 1000:.1f}"

    if "outage" in scenarios:
        sc = scenarios["outage"]
        out.append(f"### outage: {sc['description']}\n")
        rows = []
        for name, c in sc["clients"].items():
            recovery = c["recovery_seconds"]
            rows.append(
                (
                    name,
                    f"{c['attempts_per_call_outage']:.2f}",
                    f"{c['attempts_per_call_settled']:.3f}",
                    "-" if recovery is None else f"{recovery:.2f}",
                    "-" if "breaker" not in c else f"{c['breaker']['recovery_bound']:.2f}",
                    pct(c["failed_during_outage"]),
                    ms(c["latency_during_outage"]["p50"]),
                    ms(c["latency_during_outage"]["p99"]),
                )
            )
        out.append(
            table(
                (
                    "client",
                    "attempts/call (outage)",
                    "attempts/call (breaker open, or outage +1 s)",
                    "recovery after heal (s)",
                    "recovery bound (s)",
                    "failed in outage",
                    "p50 ms (outage)",
                    "p99 ms (outage)",
                ),
                rows,
            )
        )
    if "errors" in scenarios:
        sc = scenarios["errors"]
        out.append(f"\n### errors: {sc['description']}\n")
        out.append(
            table(
                ("client", "success", "attempts/call", "p50 ms", "p99 ms", "outcomes"),
                (
                    (
                        n,
                        pct(c["success_share"]),
                        f"{c['amplification']:.2f}",
                        ms(c["latency"]["p50"]),
                        ms(c["latency"]["p99"]),
                        _outcomes(c["outcomes"]),
                    )
                    for n, c in sc["clients"].items()
                ),
            )
        )
    if "quota" in scenarios:
        sc = scenarios["quota"]
        out.append(f"\n### quota: {sc['description']}\n")
        out.append(
            table(
                (
                    "client",
                    "429 share of attempts",
                    "early arrivals",
                    "attempts/call",
                    "success",
                    "p50 ms",
                    "p99 ms",
                    "outcomes",
                ),
                (
                    (
                        n,
                        pct(c["share_429"]),
                        c["early"],
                        f"{c['amplification']:.2f}",
                        pct(c["success_share"]),
                        ms(c["latency"]["p50"]),
                        ms(c["latency"]["p99"]),
                        _outcomes(c["outcomes"]),
                    )
                    for n, c in sc["clients"].items()
                ),
            )
        )
    if "hung" in scenarios:
        sc = scenarios["hung"]
        out.append(f"\n### hung: {sc['description']}\n")
        out.append(
            table(
                (
                    "client",
                    "healthy p99 alone ms",
                    "healthy p99 beside hung ms",
                    "ratio",
                    "alone again (noise): p99 ms, ratio",
                    "healthy p50 beside ms",
                    "healthy success beside",
                    "healthy outcomes",
                ),
                (
                    (
                        n,
                        ms(c["healthy_alone"]["p99"]),
                        ms(c["healthy_beside_hung"]["p99"]),
                        f"{c['p99_ratio']:.2f}",
                        f"{ms(c['healthy_alone_again']['p99'])}, {c['control_ratio']:.2f}",
                        ms(c["healthy_beside_hung"]["p50"]),
                        pct(c["healthy_success_beside"]),
                        _outcomes(c["healthy_outcomes"]),
                    )
                    for n, c in sc["clients"].items()
                ),
            )
        )
    if "cached" in scenarios:
        sc = scenarios["cached"]
        out.append(f"\n### cached: {sc['description']}\n")
        out.append(
            table(
                (
                    "client",
                    "answered fresh",
                    "answered stale",
                    "answered from cache",
                    "failed",
                    "attempts/call",
                    "p99 ms",
                ),
                (
                    (
                        n,
                        pct(c["answered_fresh"]),
                        pct(c["answered_stale"]),
                        pct(c["answered_from_cache"]),
                        pct(c["failed"]),
                        f"{c['attempts_per_call_outage']:.2f}",
                        ms(c["latency"]["p99"]),
                    )
                    for n, c in sc["clients"].items()
                ),
            )
        )
    out.append("\n### Targets\n")
    out.append(
        table(
            ("scenario", "target", "measured", "verdict"),
            ((t["scenario"], t["target"], t["value"], verdict(t["met"])) for t in result["targets"]),
        )
    )
    return "\n".join(out)


def _outcomes(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


async def run(settings: Settings, only: Sequence[str] = (), clients: Sequence[str] = ()) -> dict[str, Any]:
    """Every scenario (or ``only`` those) with every client (or ``clients``); what ``--json`` writes."""
    scenarios: dict[str, Any] = {}
    hooks = stamina.instrumentation.get_on_retry_hooks()
    stamina.instrumentation.set_on_retry_hooks([])  # no log line per retry
    try:
        for name, (scenario, names) in SCENARIOS.items():
            if only and name not in only:
                continue
            print(f"{name}:", file=sys.stderr, flush=True)
            scenarios[name] = await scenario(settings, [n for n in names if not clients or n in clients])
    finally:
        stamina.instrumentation.set_on_retry_hooks(hooks)
    result: dict[str, Any] = {"benchmark": "chaos", "settings": vars(settings), "scenarios": scenarios}
    result["targets"] = [vars(t) for t in targets(result)]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="every scenario and client, for a fraction of a second")
    parser.add_argument("--json", metavar="PATH", help="write the results there")
    parser.add_argument("--only", nargs="+", choices=sorted(SCENARIOS), default=(), help="run these scenarios only")
    parser.add_argument("--clients", nargs="+", metavar="CLIENT", default=(), help="run these clients only")
    parser.add_argument("--scale", type=float, help="multiply every duration by this")
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else Settings()
    if args.scale is not None:
        settings = replace(settings, scale=args.scale)
    result = asyncio.run(run(settings, args.only, args.clients))
    result["machine"] = machine()
    result["command"] = "python -m benchmarks.chaos " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.json:
        write_json(args.json, result)
    print(report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
