"""The demo: one stream of traffic, two clients, a dependency that fails in every common way.

``python -m resilient_http demo`` starts four embedded upstreams (see
:mod:`resilient_http._upstream`): an "api" and a "search" host for a bare
``httpx.AsyncClient(timeout=5)``, and another such pair for an
``httpx.AsyncClient`` over :class:`~resilient_http.ResilientTransport`. Each
client has upstreams of its own, so that one client's retries cannot
distort what the other's dependency goes through; both receive the same
calls at the same moments, and both dependencies are switched through the
same phases at the same moments:

    healthy    both hosts answer
    errors     half the requests get 503 with Retry-After: 1
    quota      api traffic doubles, and api serves at most 50 requests a second (429 beyond)
    hang       api stops answering; search is fine
    outage     both hosts: 503 without Retry-After, or a connection reset
    recovery   both hosts answer again

The traffic is open-loop, like users: calls start on a fixed schedule
(40 a second to api, 10 to search) whether or not earlier ones have
finished, each in its own task, up to a cap that protects the demo itself.
A line a second shows how each client is doing; the run ends with a table
that compares them: success, the load put on the dependency (measured at
the server), latency, stale answers, breaker openings, calls shed, and how
long each took to recover once the outage ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import signal
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, TextIO

import httpx
from prometheus_client import CollectorRegistry

from ._call import CallInfo
from ._config import (
    BulkheadPolicy,
    CircuitBreakerPolicy,
    Policy,
    RateLimitPolicy,
    RetryPolicy,
    StaleCachePolicy,
    TimeoutPolicy,
)
from ._demo_report import API, SEARCH, Record, Summary, final_table, summarise
from ._hosts import PolicyTable
from ._transport import ResilientTransport
from ._upstream import Mode, Upstream

RATES = {API: 40.0, SEARCH: 10.0}  # calls a second, per client
QUOTA = 50  # requests a second api serves in the quota phase
SURGE = 2.0  # api traffic is multiplied by this in the quota phase
MAX_OUTSTANDING = 2000  # calls in flight per client, beyond which the demo skips calls


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    share: float  # of the run's duration
    api: Mode
    search: Mode
    what: str
    surge: bool = False


PHASES = (
    Phase("healthy", 0.15, "healthy", "healthy", "both hosts answer at once"),
    Phase("errors", 0.15, "errors", "errors", "half the requests get 503 with Retry-After: 1"),
    Phase("quota", 0.15, "quota", "healthy", f"api traffic doubles; api serves {QUOTA}/s, 429 beyond", surge=True),
    Phase("hang", 0.20, "hang", "healthy", "api stops answering; search is healthy"),
    Phase("outage", 0.15, "outage", "outage", "both hosts: 503 without Retry-After, or a reset"),
    Phase("recovery", 0.20, "healthy", "healthy", "both hosts answer again"),
)


def demo_policies() -> tuple[dict[str, Policy], Policy]:
    """The resilient client's policies, named as a policy file would name them."""
    breaker = CircuitBreakerPolicy(failure_ratio=0.5, window=5.0, break_duration=1.0, max_break_duration=2.0)
    timeout = TimeoutPolicy(attempt=0.5, total=2.5)
    retry = RetryPolicy(attempts=3, backoff=0.05, max_backoff=0.5, max_retry_after=2.0)
    api = Policy(
        timeout=timeout,
        retry=retry,
        circuit_breaker=dataclasses.replace(breaker, minimum_calls=20),
        rate_limit=RateLimitPolicy(rate=QUOTA, burst=5, max_wait=0.2),
        bulkhead=BulkheadPolicy(max_concurrent=25, max_queue=25, queue_timeout=0.2),
        stale_cache=StaleCachePolicy(max_stale=60.0),
    )
    search = Policy(
        timeout=timeout,
        retry=retry,
        circuit_breaker=dataclasses.replace(breaker, minimum_calls=10),
        bulkhead=BulkheadPolicy(max_concurrent=10, max_queue=10, queue_timeout=0.2),
    )
    return {API: api, SEARCH: search}, Policy()


class Side:
    """One client, its own pair of upstreams, and what its calls did."""

    def __init__(self, name: str, client: httpx.AsyncClient, upstreams: Mapping[str, Upstream]) -> None:
        self.name = name
        self.client = client
        self.upstreams = upstreams
        self.records: list[Record] = []
        self.finish_times: list[float] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.started = 0
        self.skipped = 0

    def launch(self, host: str, target: str) -> None:
        """Start one call in its own task, unless the demo's own cap is reached."""
        if len(self.tasks) >= MAX_OUTSTANDING:
            self.skipped += 1
            return
        task = asyncio.create_task(self._call(host, self.upstreams[host].url + target))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        self.started += 1

    async def _call(self, host: str, url: str) -> None:
        started = time.monotonic()
        stale = False
        try:
            response = await self.client.get(url)
        except Exception as exc:  # every failure is a data point; the table lists them by name
            ok, outcome = False, type(exc).__name__
        else:
            info = response.extensions.get("resilient_http")
            stale = isinstance(info, CallInfo) and info.stale
            ok, outcome = response.is_success, "stale" if stale else str(response.status_code)
        finished = time.monotonic()
        self.records.append(Record(host, started, finished, ok, stale, outcome))
        self.finish_times.append(finished)

    def summary(self, registry: CollectorRegistry | None, outage_end: float, ended: float) -> Summary:
        """This side's column of the final table."""
        answered: Counter[str] = Counter()
        for upstream in self.upstreams.values():
            answered += upstream.answered
        return summarise(self.name, self.started, self.records, self.received(), answered, registry, outage_end, ended)

    def received(self, since: float = -math.inf, until: float = math.inf) -> int:
        """Requests this side's upstreams received in ``[since, until)``."""
        return sum(upstream.received(since, until) for upstream in self.upstreams.values())


class Timeline:
    """The phases laid on the clock, from ``start`` over ``duration`` seconds."""

    def __init__(self, start: float, duration: float) -> None:
        self.start = start
        self.bounds: list[tuple[float, float, Phase]] = []
        at = start
        for phase in PHASES:
            end = at + phase.share * duration
            self.bounds.append((at, end, phase))
            at = end
        self.end = at

    def at(self, moment: float) -> Phase | None:
        for begin, end, phase in self.bounds:
            if begin <= moment < end:
                return phase
        return None

    def ends(self, name: str) -> float:
        return next(end for _, end, phase in self.bounds if phase.name == name)


async def _switch_phases(timeline: Timeline, sides: list[Side]) -> None:
    for begin, _, phase in timeline.bounds:
        await asyncio.sleep(max(0.0, begin - time.monotonic()))
        for side in sides:
            side.upstreams[API].set_mode(phase.api)
            side.upstreams[SEARCH].set_mode(phase.search)
    await asyncio.sleep(max(0.0, timeline.end - time.monotonic()))


async def _drive(host: str, timeline: Timeline, sides: list[Side]) -> None:
    """Start calls to ``host`` on schedule, late or not: open loop."""
    due, number = timeline.start, 0
    while (phase := timeline.at(due)) is not None:
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        target = f"/catalog/{number % 20}" if host == API else f"/search?q=term{number % 7}"
        for side in sides:
            side.launch(host, target)
        number += 1
        rate = RATES[host] * (SURGE if phase.surge and host == API else 1.0)
        due += 1.0 / rate


def _live_line(second: int, phase: str, sides: list[Side], since: float, until: float) -> str:
    """Per client, over ``[since, until)``: calls finished, the share answered 2xx, stale answers, upstream requests."""
    parts = [f"{second:4d}s {phase:<10}"]
    for side in sides:
        first = bisect_left(side.finish_times, since)
        last = bisect_left(side.finish_times, until)
        done = side.records[first:last]
        ok = sum(record.ok for record in done)
        stale = sum(record.stale for record in done)
        share = f"{100 * ok / len(done):3.0f}%" if done else "   -"
        parts.append(f"{len(done):5d} {share} {stale:5d} {side.received(since, until):6d}")
    return " | ".join(parts)


async def _report(timeline: Timeline, sides: list[Side], out: TextIO) -> None:
    """A line a second for every whole second of the run, and a banner when a phase begins."""
    _print(out, f"{'':16}" + "".join(f" | {side.name:^23}" for side in sides))
    _print(out, f"{'time  phase':16}" + " | calls  ok% stale  att/s" * len(sides))
    announced = 0

    def announce(before: float) -> None:
        """Banners of the phases that began before ``before``, not yet announced."""
        nonlocal announced
        for begin, _, phase in timeline.bounds[announced:]:
            if begin >= before:
                break
            _print(out, f"-- {begin - timeline.start:4.1f}s {phase.name}: {phase.what}")
            announced += 1

    announce(timeline.start + 1e-3)
    for second in range(1, math.floor(timeline.end - timeline.start + 1e-6) + 1):
        until = timeline.start + second
        await asyncio.sleep(max(0.0, until - time.monotonic()))
        announce(until - 1e-3)  # a phase that begins on the second is announced after its line
        phase = timeline.at(until - 0.5)
        _print(out, _live_line(second, phase.name if phase else "", sides, until - 1.0, until))


def _print(out: TextIO, line: str = "") -> None:
    print(line, file=out, flush=True)


class Stalls:
    """The worst lateness of the event loop: both clients share it, so the table should say when it was busy."""

    NOTABLE = 0.1  # seconds of stall worth a line under the table
    TICK = 0.05

    def __init__(self) -> None:
        self.worst = 0.0
        self.at = 0.0

    async def watch(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(self.TICK)
            late = time.monotonic() - before - self.TICK
            if late > self.worst:
                self.worst, self.at = late, before


async def _until(interrupted: asyncio.Event, tasks: list[asyncio.Task[None]], within: float | None = None) -> None:
    """Wait until ``tasks`` are done, the run is interrupted, or ``within`` seconds pass."""
    if not tasks:
        return
    stop = asyncio.ensure_future(interrupted.wait())
    waiting: list[asyncio.Future[Any]] = [asyncio.gather(*tasks, return_exceptions=True), stop]
    await asyncio.wait(waiting, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()


async def _end(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait for them; a task that failed is a bug in the demo: raise it."""
    for task in tasks:
        task.cancel()
    for result in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(result, Exception):
            raise result


async def run_demo(
    duration: float,
    policies: tuple[Mapping[str, Policy], Policy] | None = None,
    *,
    registry: CollectorRegistry | None = None,
    out: TextIO,
) -> bool:
    """Run the demo for ``duration`` seconds and print its table; ``True`` when it was interrupted.

    ``policies`` are the resilient client's, with its hosts named ``api.demo``
    and ``search.demo`` (port 80); :func:`demo_policies` when omitted. SIGINT
    ends the run early, with the table of the calls made so far.
    """
    named, default = demo_policies() if policies is None else policies
    table = PolicyTable(named, default)
    registry = CollectorRegistry() if registry is None else registry
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread, or Windows
        loop.add_signal_handler(signal.SIGINT, interrupted.set)
    try:
        async with AsyncExitStack() as stack:
            pairs = {
                name: {host: await stack.enter_async_context(Upstream(host, quota=QUOTA, seed=seed)) for host in RATES}
                for seed, name in enumerate(("bare httpx", "resilient_http"))
            }
            transport = ResilientTransport(
                {f"127.0.0.1:{up.port}": table.resolve(host, 80) for host, up in pairs["resilient_http"].items()},
                default=default,
                registry=registry,
            )
            clients = {
                "bare httpx": httpx.AsyncClient(timeout=5),
                "resilient_http": httpx.AsyncClient(transport=transport),
            }
            sides = [Side(name, await stack.enter_async_context(clients[name]), pairs[name]) for name in clients]
            for side in sides:
                hosts = ", ".join(f"{host} at {upstream.url}" for host, upstream in side.upstreams.items())
                _print(out, f"{side.name:>14}: {hosts}")
            timeline = Timeline(time.monotonic(), duration)
            background = [
                asyncio.create_task(_switch_phases(timeline, sides)),
                asyncio.create_task(_report(timeline, sides, out)),
                *(asyncio.create_task(_drive(host, timeline, sides)) for host in RATES),
            ]
            stalls = Stalls()
            watch = asyncio.create_task(stalls.watch())
            await _until(interrupted, background)
            outstanding = [task for side in sides for task in side.tasks]
            await _until(interrupted, outstanding, within=6.0)
            ended = time.monotonic()
            await _end([*background, watch, *outstanding])
            # Before the transport closes and its series leave the registry.
            outage_end = timeline.ends("outage")
            bare, resilient = sides
            summaries = [bare.summary(None, outage_end, ended), resilient.summary(registry, outage_end, ended)]
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGINT)
    if interrupted.is_set():
        _print(out, f"\ninterrupted after {ended - timeline.start:.1f}s: the table covers the calls made so far")
    _print(out)
    for line in final_table(summaries):
        _print(out, line)
    skipped = {side.name: side.skipped for side in sides if side.skipped}
    if skipped:
        _print(out, f"calls not started (more than {MAX_OUTSTANDING} in flight): {skipped}")
    if stalls.worst >= Stalls.NOTABLE:
        when = stalls.at - timeline.start
        _print(out, f"the demo's event loop stalled for up to {stalls.worst:.2f}s (at {when:.1f}s); both clients")
        _print(out, " share it, so a stall delays the calls of both")
    return interrupted.is_set()
