"""What resilient_http costs per call, against bare httpx and against peers that do less.

    python -m benchmarks.overhead [--smoke] [--profile] [--json PATH]

Four measurements, all in one run:

1. **In process**: every client calls the same ``httpx.MockTransport``
   returning a small JSON 200 (with ``Content-Length``), so what is timed is
   the client stack alone. Subjects: a bare ``httpx.AsyncClient``;
   resilient_http with ``Policy()`` and with all six layers on (the rate
   limiter at a rate that never limits); httpx-retries' ``RetryTransport``;
   stamina's ``@stamina.retry``; tenacity's ``AsyncRetrying``; hishel's
   ``AsyncCacheTransport``. Each repetition runs N sequential calls per
   subject (the subjects' order rotating between repetitions), timed with
   ``time.perf_counter`` with the garbage collector off; a subject's ratio
   is the median over repetitions of its time divided by bare httpx's time
   in the same repetition.
2. **Per layer**: the same, for a transport with no layer at all and with
   each layer alone, so that each layer's own cost shows without a profiler.
3. **Throughput over a socket**: a minimal asyncio HTTP/1.1 keep-alive
   server in its own process on 127.0.0.1 (``benchmarks/_server.py``) and W
   concurrent workers calling it for D seconds; calls per second, bare
   versus resilient (median of the repetitions; the garbage collector on),
   and the CPU time the client process spent per call.
4. **Profile** (``--profile``): cProfile of the all-six chain and of bare
   httpx over the same calls, in process and over the socket; the
   functions whose own time differs most, in microseconds per call. The
   profiler inflates small functions, so read it for where the time goes,
   and the per-layer table for how much.

``--smoke`` runs every measurement and every subject with tiny N, in seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import re
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hishel
import httpx
import stamina
import tenacity
from hishel.httpx import AsyncCacheTransport
from httpx_retries import Retry, RetryTransport
from prometheus_client import CollectorRegistry

from resilient_http import Policy, RateLimitPolicy, ResilientTransport, StaleCachePolicy
from resilient_http._pipeline import ORDER

from ._common import interval_verdict, machine, median, median_interval, percentile, table, verdict, write_json
from ._server import Server

URL = "http://api.bench.example/v1/items"
BODY = b'{"ok": true, "items": [1, 2, 3]}'
# max-age=0 makes hishel store every answer and revalidate every call, so that
# every call of every subject reaches the transport (and the stale cache stores
# every answer, as it would in production).
HEADERS = {"content-type": "application/json", "cache-control": "max-age=0"}

BARE = "httpx (bare)"
DEFAULT = "resilient_http Policy()"
ALL_SIX = "resilient_http all six"
HISHEL = "hishel (sqlite :memory:)"
PEERS = ("httpx-retries", "stamina", "tenacity", HISHEL)
SUBJECTS = (BARE, DEFAULT, ALL_SIX, *PEERS)

OVERHEAD_TARGET = 1.10  # all six layers, in process
THROUGHPUT_TARGET = 0.97  # resilient over a socket, as a share of bare


def all_six() -> Policy:
    """Every layer on; the rate limiter at a rate that never makes a call wait."""
    return Policy(rate_limit=RateLimitPolicy(rate=1e6, burst=10**6), stale_cache=StaleCachePolicy())


NO_LAYERS = Policy(timeout=None, retry=None, circuit_breaker=None, bulkhead=None)
LAYER_ALONE: dict[str, Policy] = {
    "timeout (attempt + total)": Policy(retry=None, circuit_breaker=None, bulkhead=None),
    "retry": Policy(timeout=None, circuit_breaker=None, bulkhead=None),
    "circuit breaker": Policy(timeout=None, retry=None, bulkhead=None),
    "bulkhead": Policy(timeout=None, retry=None, circuit_breaker=None),
    "rate limiter": Policy(
        timeout=None, retry=None, circuit_breaker=None, bulkhead=None, rate_limit=RateLimitPolicy(rate=1e6, burst=10**6)
    ),
    "stale cache": Policy(
        timeout=None, retry=None, circuit_breaker=None, bulkhead=None, stale_cache=StaleCachePolicy()
    ),
}


def chain_layers(policy: Policy) -> list[str]:
    """The layers ``policy`` puts in the chain, outermost first, as the pipeline builds it."""
    names = [name for name, _ in ORDER if getattr(policy, name) is not None]
    if policy.timeout is not None:
        names.append("attempt_timeout")
    return names


def missing_layers(policy: Policy) -> list[str]:
    """Layers ``policy`` turns on that this version of the pipeline does not have (yet)."""
    known = {name for name, _ in ORDER}
    return [name for name in ("rate_limit", "stale_cache") if getattr(policy, name) is not None and name not in known]


def _handler(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, headers=HEADERS, content=BODY)


def _retryable(exc: Exception) -> bool:
    """What a careful stamina or tenacity user retries: transport errors, 429 and 502-504."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in (429, 502, 503, 504)
    return isinstance(exc, httpx.TransportError)


Caller = Callable[[], Awaitable[httpx.Response]]


@dataclass
class Subject:
    name: str
    client: httpx.AsyncClient
    call: Caller
    transport: ResilientTransport | None = None
    times: list[float] = field(default_factory=list)  # seconds per call, one per repetition
    cpu: list[float] = field(default_factory=list)  # CPU seconds of this process per call, likewise


def make_subject(name: str, inner: httpx.AsyncBaseTransport, url: str = URL, policy: Policy | None = None) -> Subject:
    """A client of kind ``name`` whose network is ``inner``; ``policy`` only for resilient_http ones."""
    resilient: ResilientTransport | None = None
    if policy is not None or name in (DEFAULT, ALL_SIX):
        if policy is None:
            policy = Policy() if name == DEFAULT else all_six()
        resilient = ResilientTransport(inner=inner, default=policy, registry=CollectorRegistry())
        client = httpx.AsyncClient(transport=resilient)
    elif name == BARE:
        client = httpx.AsyncClient(transport=inner)
    elif name == "httpx-retries":
        client = httpx.AsyncClient(transport=RetryTransport(transport=inner, retry=Retry(total=2, backoff_factor=0.1)))
    elif name.startswith("hishel"):
        storage = hishel.AsyncSqliteStorage(database_path=":memory:")
        client = httpx.AsyncClient(transport=AsyncCacheTransport(inner, storage=storage, rfc=True))
    elif name == "stamina":
        client = httpx.AsyncClient(transport=inner)

        @stamina.retry(on=_retryable, attempts=3, wait_initial=0.1)
        async def stamina_call() -> httpx.Response:
            response = await client.get(url)
            response.raise_for_status()
            return response

        return Subject(name, client, stamina_call)
    elif name == "tenacity":
        client = httpx.AsyncClient(transport=inner)

        async def tenacity_call() -> httpx.Response:
            async for attempt in tenacity.AsyncRetrying(
                stop=tenacity.stop_after_attempt(3),
                wait=tenacity.wait_random_exponential(multiplier=0.1, max=10),
                retry=tenacity.retry_if_exception(lambda exc: isinstance(exc, Exception) and _retryable(exc)),
                reraise=True,
            ):
                with attempt:
                    response = await client.get(url)
                    response.raise_for_status()
            return response

        return Subject(name, client, tenacity_call)
    else:
        raise ValueError(f"unknown subject {name!r}")

    async def plain_call() -> httpx.Response:
        return await client.get(url)

    return Subject(name, client, plain_call, resilient)


async def _timed(call: Caller, calls: int) -> tuple[float, float]:
    """Seconds and CPU seconds per call over ``calls`` sequential calls, the garbage collector off.

    CPU time (``time.process_time``) does not count the time this process
    waited for a core, so it moves far less than wall time when other
    processes share the machine.
    """
    gc.collect()
    gc.disable()
    try:
        cpu = time.process_time()
        started = time.perf_counter()
        for _ in range(calls):
            await call()
        elapsed = time.perf_counter() - started
        return elapsed / calls, (time.process_time() - cpu) / calls
    finally:
        gc.enable()


async def _compare(subjects: list[Subject], calls: int, repeats: int, warmup: int) -> None:
    """Fill every subject's ``times``: repetitions interleaved, the order rotating."""
    for subject in subjects:
        response = None
        for _ in range(warmup):
            response = await subject.call()
        assert response is not None and response.status_code == 200, (subject.name, response)
    for rep in range(repeats):
        shift = rep % len(subjects)
        for subject in subjects[shift:] + subjects[:shift]:
            wall, cpu = await _timed(subject.call, _calls_for(subject.name, calls))
            subject.times.append(wall)
            subject.cpu.append(cpu)


def _calls_for(name: str, calls: int) -> int:
    """hishel's SQLite storage costs milliseconds a call: fewer calls keep its runs as long as the others'."""
    return max(5, calls // 20) if name.startswith("hishel") else calls


def _quartiles(values: list[float]) -> tuple[float, float]:
    return percentile(values, 25), percentile(values, 75)


def _paired_ratio(subject: Subject, bare: Subject, cpu: bool = False) -> float:
    """The median over repetitions of the subject's time over bare httpx's time in the same repetition."""
    if cpu:
        return median(t / b for t, b in zip(subject.cpu, bare.cpu, strict=True))
    return median(t / b for t, b in zip(subject.times, bare.times, strict=True))


async def in_process(calls: int, repeats: int, warmup: int) -> dict[str, Any]:
    """Measurement 1: every subject over the same MockTransport."""
    subjects = [make_subject(name, httpx.MockTransport(_handler)) for name in SUBJECTS if name != HISHEL]
    # hishel apart, after the others: its SQLite work runs in threads, and CPU time (which counts
    # every thread of the process) would bill what it leaves running to whoever came next.
    cache = make_subject(HISHEL, httpx.MockTransport(_handler))
    try:
        await _compare(subjects, calls, repeats, warmup)
        await _compare([cache], calls, repeats, warmup)
        await asyncio.sleep(0.2)
    finally:
        for subject in [*subjects, cache]:
            await subject.client.aclose()
    bare = subjects[0]
    bare_us = median(bare.times) * 1e6
    rows = []
    for subject in [*subjects, cache]:
        us = median(subject.times) * 1e6
        rows.append(
            {
                "name": subject.name,
                "calls": _calls_for(subject.name, calls),
                "us_per_call": us,
                "min_us": min(subject.times) * 1e6,
                "max_us": max(subject.times) * 1e6,
                "ratio": _paired_ratio(subject, bare),
                "ratio_p25_p75": _quartiles([t / b for t, b in zip(subject.times, bare.times, strict=True)]),
                "overhead_us": us - bare_us,
                "cpu_us_per_call": median(subject.cpu) * 1e6,
                "cpu_ratio": _paired_ratio(subject, bare, cpu=True),
                "runs": [t * 1e6 for t in subject.times],
            }
        )
    return {"calls": calls, "repeats": repeats, "warmup": warmup, "gc": "disabled while timed", "rows": rows}


async def per_layer(calls: int, repeats: int, warmup: int) -> dict[str, Any]:
    """Measurement 2: the transport with no layer, each layer alone, Policy() and all six."""
    configs: dict[str, Policy] = {"no layer (transport only)": NO_LAYERS, **LAYER_ALONE}
    configs["Policy() (timeout, breaker, retry, bulkhead)"] = Policy()
    configs["all six"] = all_six()
    subjects = [make_subject(BARE, httpx.MockTransport(_handler))]
    subjects += [make_subject(name, httpx.MockTransport(_handler), policy=policy) for name, policy in configs.items()]
    try:
        await _compare(subjects, calls, repeats, warmup)
    finally:
        for subject in subjects:
            await subject.client.aclose()
    bare, base = subjects[0], subjects[1]
    base_us = median(base.times) * 1e6
    bare_us = median(bare.times) * 1e6
    rows = []
    for subject, policy in zip(subjects[1:], configs.values(), strict=True):
        us = median(subject.times) * 1e6
        rows.append(
            {
                "name": subject.name,
                "layers": chain_layers(policy),
                "missing": missing_layers(policy),
                "us_per_call": us,
                "over_bare_us": us - bare_us,
                "over_transport_us": us - base_us,
                # Minimum over repetitions (timeit's estimator): interference from other
                # processes only ever adds, so the fastest run is the least disturbed one.
                "min_us_per_call": min(subject.times) * 1e6,
                "min_over_bare_us": (min(subject.times) - min(bare.times)) * 1e6,
                "min_over_transport_us": (min(subject.times) - min(base.times)) * 1e6,
                "ratio": _paired_ratio(subject, bare),
                "cpu_us_per_call": median(subject.cpu) * 1e6,
                "cpu_over_bare_us": (median(subject.cpu) - median(bare.cpu)) * 1e6,
                "cpu_ratio": _paired_ratio(subject, bare, cpu=True),
            }
        )
    return {
        "calls": calls,
        "repeats": repeats,
        "bare_us": bare_us,
        "bare_min_us": min(bare.times) * 1e6,
        "bare_cpu_us": median(bare.cpu) * 1e6,
        "rows": rows,
    }


async def _run_for(client_call: Caller, workers: int, seconds: float) -> tuple[int, float, float]:
    """Calls made, wall seconds and CPU seconds of this process."""
    count = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < stop:
            response = await client_call()
            assert response.status_code == 200
            count += 1

    cpu = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return count, time.perf_counter() - started, time.process_time() - cpu


async def throughput(workers: int, seconds: float, repeats: int) -> dict[str, Any]:
    """Measurement 3: calls per second against a real server in another process."""
    names = (BARE, DEFAULT, ALL_SIX)
    with Server() as port:
        url = f"http://127.0.0.1:{port}/v1/items"
        subjects = [make_subject(name, httpx.AsyncHTTPTransport(), url=url) for name in names]
        rates: dict[str, list[float]] = {name: [] for name in names}
        cpu: dict[str, list[float]] = {name: [] for name in names}
        try:
            for subject in subjects:  # open the connections, warm up
                await _run_for(subject.call, workers, min(0.5, seconds))
            for rep in range(repeats):
                shift = rep % len(subjects)
                for subject in subjects[shift:] + subjects[:shift]:
                    count, elapsed, used = await _run_for(subject.call, workers, seconds)
                    rates[subject.name].append(count / elapsed)
                    cpu[subject.name].append(used / count)
        finally:
            for subject in subjects:
                await subject.client.aclose()
    rows = [_throughput_row(name, rates[name], rates[BARE], cpu[name], cpu[BARE]) for name in names]
    return {"workers": workers, "seconds": seconds, "repeats": repeats, "gc": "enabled", "rows": rows}


def _throughput_row(
    name: str, rates: list[float], bare: list[float], cpu: list[float] | None, bare_cpu: list[float] | None
) -> dict[str, Any]:
    """One client's throughput over the repetitions, against bare httpx's in the same repetitions."""
    ratios = [r / b for r, b in zip(rates, bare, strict=True)]
    row: dict[str, Any] = {
        "name": name,
        "calls_per_second": median(rates),
        "runs": rates,
        "ratio": median(ratios),
        # The spread of the paired ratios: how far one repetition may stray on this machine.
        "ratio_p25_p75": _quartiles(ratios),
        # Where the median ratio lies, 95 % sure: what the verdict is read from.
        "ratio_interval": median_interval(ratios),
    }
    if cpu is not None and bare_cpu is not None:
        # Calls per client CPU-second, relative to bare: what the throughput would be if the
        # client had its core to itself (it is the bottleneck: the server does far less per call).
        cpu_ratios = [b / c for c, b in zip(cpu, bare_cpu, strict=True)]
        row |= {
            "cpu_runs_us": [c * 1e6 for c in cpu],
            "client_cpu_us_per_call": median(cpu) * 1e6,
            "cpu_ratio": median(cpu_ratios),
            "cpu_ratio_interval": median_interval(cpu_ratios),
        }
    return row


def _where(path: str) -> str:
    """A profiled function's file, from its package (``httpx/_models.py``, ``stdlib/asyncio/events.py``)."""
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    root = str(Path(__file__).resolve().parent.parent) + "/"
    if path.startswith(root):
        return path[len(root) :]
    found = re.search(r"/lib/python3\.\d+/(.*)$", path)
    return "stdlib/" + found.group(1) if found else path


async def _profile_calls(subject: Subject, calls: int, warmup: int, workers: int = 1) -> pstats.Stats:
    """cProfile of ``calls`` calls made by ``workers`` concurrent workers, the garbage collector off."""

    async def worker(count: int) -> None:
        for _ in range(count):
            await subject.call()

    await asyncio.gather(*(worker(warmup // workers) for _ in range(workers)))
    profiler = cProfile.Profile()
    gc.disable()
    try:
        profiler.enable()
        await asyncio.gather(*(worker(calls // workers) for _ in range(workers)))
        profiler.disable()
    finally:
        gc.enable()
    return pstats.Stats(profiler)


Key = tuple[str, int, str]


def _own_times(stats: pstats.Stats) -> dict[Key, tuple[int, float, float]]:
    raw: dict[Key, tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
    return {key: (ncalls, tottime, cumtime) for key, (_, ncalls, tottime, cumtime, _) in raw.items()}


async def profile(calls: int, warmup: int, top: int = 30) -> dict[str, Any]:
    """Measurement 4: which functions the all-six chain adds, in µs per call (cProfile), in process."""
    bare = make_subject(BARE, httpx.MockTransport(_handler))
    resilient = make_subject(ALL_SIX, httpx.MockTransport(_handler))
    try:
        bare_stats = _own_times(await _profile_calls(bare, calls, warmup))
        resilient_stats = _own_times(await _profile_calls(resilient, calls, warmup))
    finally:
        await bare.client.aclose()
        await resilient.client.aclose()
    return _difference(bare_stats, resilient_stats, calls, top) | {"where": "in process (MockTransport), sequential"}


async def profile_socket(calls: int, warmup: int, workers: int, top: int = 30) -> dict[str, Any]:
    """The same over a socket, ``workers`` concurrent workers, against the server in its own process."""
    calls -= calls % workers
    with Server() as port:
        url = f"http://127.0.0.1:{port}/v1/items"
        bare = make_subject(BARE, httpx.AsyncHTTPTransport(), url=url)
        resilient = make_subject(ALL_SIX, httpx.AsyncHTTPTransport(), url=url)
        try:
            bare_stats = _own_times(await _profile_calls(bare, calls, warmup, workers))
            resilient_stats = _own_times(await _profile_calls(resilient, calls, warmup, workers))
        finally:
            await bare.client.aclose()
            await resilient.client.aclose()
    where = f"over a socket, {workers} concurrent workers"
    return _difference(bare_stats, resilient_stats, calls, top) | {"where": where}


def _difference(
    bare_stats: dict[Key, tuple[int, float, float]],
    resilient_stats: dict[Key, tuple[int, float, float]],
    calls: int,
    top: int,
) -> dict[str, Any]:
    """Per function and per module: the own time the all-six chain adds to bare httpx, µs per call."""
    rows: list[dict[str, Any]] = []
    for key in set(bare_stats) | set(resilient_stats):
        n_r, own_r, cum_r = resilient_stats.get(key, (0, 0.0, 0.0))
        n_b, own_b, _ = bare_stats.get(key, (0, 0.0, 0.0))
        filename, line, name = key
        rows.append(
            {
                "function": f"{_where(filename)}:{line}({name})" if line else name,
                "calls_per_call": n_r / calls,
                "extra_calls_per_call": (n_r - n_b) / calls,
                "own_us": own_r / calls * 1e6,
                "extra_own_us": (own_r - own_b) / calls * 1e6,
                "cumulative_us": cum_r / calls * 1e6,
            }
        )
    rows.sort(key=lambda row: row["extra_own_us"], reverse=True)
    total_r = sum(own for _, own, _ in resilient_stats.values()) / calls * 1e6
    total_b = sum(own for _, own, _ in bare_stats.values()) / calls * 1e6
    by_package: dict[str, float] = {}
    for row in rows:
        package = _package(row["function"])
        by_package[package] = by_package.get(package, 0.0) + row["extra_own_us"]
    return {
        "calls": calls,
        "profiled_us_per_call": {"bare": total_b, "all six": total_r},
        "extra_by_package_us": dict(sorted(by_package.items(), key=lambda item: -item[1])),
        "rows": rows[:top],
    }


def _package(function: str) -> str:
    if function.startswith(("resilient_http/", "stdlib/asyncio/")):
        return function.split(":")[0]
    if function.startswith(("<", "{")):
        return "builtins"
    return function.split("/")[0].split(".")[0].split(":")[0]


def _targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    targets = []
    six = next(row for row in result["in_process"]["rows"] if row["name"] == ALL_SIX)
    for key, what in (("ratio", "wall time"), ("cpu_ratio", "CPU time")):
        targets.append(
            {
                "target": f"all six layers ≤ {OVERHEAD_TARGET}x a bare call (in process, {what})",
                "value": f"{six[key]:.2f}x",
                "met": six[key] <= OVERHEAD_TARGET,
            }
        )
    for row in result["throughput"]["rows"]:
        if row["name"] == BARE:
            continue
        for key, what in (("ratio", "calls/s"), ("cpu_ratio", "calls per client CPU-second")):
            target = {
                "target": f"{row['name']} ≥ {THROUGHPUT_TARGET}x bare throughput (socket, {what})",
                "value": f"{row[key]:.3f}x",
                "met": row[key] >= THROUGHPUT_TARGET,
            }
            if f"{key}_interval" in row:  # met only when the whole 95 % interval of the median is above it
                low, high = row[f"{key}_interval"]
                target["value"] += f" (95 %: {low:.3f} to {high:.3f})"
                target["met"] = low >= THROUGHPUT_TARGET
                target["verdict"] = interval_verdict(low, high, THROUGHPUT_TARGET)
            targets.append(target)
    return targets


@dataclass(frozen=True)
class Settings:
    calls: int = 500
    repeats: int = 40
    warmup: int = 300
    workers: int = 16
    seconds: float = 1.0
    throughput_repeats: int = 25
    profile_calls: int = 3000


SMOKE = Settings(calls=20, repeats=2, warmup=8, workers=4, seconds=0.2, throughput_repeats=1, profile_calls=20)


async def run(settings: Settings, *, with_profile: bool = False) -> dict[str, Any]:
    """Every measurement; the result is what ``--json`` writes."""
    s = settings
    result: dict[str, Any] = {"benchmark": "overhead", "settings": vars(s) | {"profile": with_profile}}
    result["missing_layers"] = missing_layers(all_six())
    result["in_process"] = await in_process(s.calls, s.repeats, s.warmup)
    result["per_layer"] = await per_layer(s.calls, s.repeats, s.warmup)
    result["throughput"] = await throughput(s.workers, s.seconds, s.throughput_repeats)
    if with_profile:
        result["profile"] = await profile(s.profile_calls, s.warmup)
        result["profile_socket"] = await profile_socket(s.profile_calls, s.warmup, s.workers)
    result["targets"] = _targets(result)
    return result


def _profile_report(pr: dict[str, Any]) -> str:
    totals = pr["profiled_us_per_call"]
    out = [
        f"\n### Profile, {pr.get('where', 'in process')}: all six vs bare, {pr['calls']} calls under cProfile "
        f"(profiled: bare {totals['bare']:.0f} µs/call, all six {totals['all six']:.0f} µs/call; "
        "the profiler inflates every function call, so read it for where, the per-layer table for how much)\n",
        "Extra own time by module, µs per call:\n",
        table(("module", "+µs/call"), list(pr["extra_by_package_us"].items())[:14]),
        "\nFunctions by extra own time, µs per call:\n",
        table(
            ("function", "+own µs", "own µs", "cumulative µs", "calls/call", "+calls/call"),
            (
                (
                    r["function"],
                    r["extra_own_us"],
                    r["own_us"],
                    r["cumulative_us"],
                    f"{r['calls_per_call']:.1f}",
                    f"{r['extra_calls_per_call']:+.1f}",
                )
                for r in pr["rows"]
            ),
        ),
    ]
    return "\n".join(out)


def report(result: dict[str, Any]) -> str:
    """The result as Markdown tables."""
    out = []
    ip = result["in_process"]
    out.append(
        f"### In process (httpx.MockTransport), {ip['calls']} sequential calls x {ip['repeats']} repetitions, "
        f"GC {ip['gc']}\n"
    )
    out.append(
        table(
            (
                "client",
                "µs/call (median)",
                "min",
                "max",
                "x bare",
                "x bare, p25-p75",
                "+µs/call",
                "CPU µs/call",
                "x bare (CPU)",
                "calls per run",
            ),
            (
                (
                    r["name"],
                    r["us_per_call"],
                    r["min_us"],
                    r["max_us"],
                    f"{r['ratio']:.2f}",
                    "{:.2f}-{:.2f}".format(*r["ratio_p25_p75"]),
                    r["overhead_us"],
                    r["cpu_us_per_call"],
                    f"{r['cpu_ratio']:.2f}",
                    r.get("calls", ip["calls"]),
                )
                for r in ip["rows"]
            ),
        )
    )
    if result.get("missing_layers"):
        out.append(
            f"\nNot in this version's pipeline, so not measured: {', '.join(result['missing_layers'])} "
            "(the policy field is accepted but no layer exists yet)."
        )
    pl = result["per_layer"]
    out.append(
        f"\n### Per layer: ResilientTransport with one layer alone, {pl['calls']} calls x {pl['repeats']} repetitions "
        f"(bare httpx: {pl['bare_us']:.1f} µs/call median, {pl.get('bare_min_us', float('nan')):.1f} min)\n"
    )
    out.append(
        table(
            (
                "configuration",
                "µs/call (median)",
                "+µs over bare (median)",
                "x bare (median)",
                "µs/call (min)",
                "+µs over bare (min)",
                "+µs over transport alone (min)",
                "chain",
            ),
            (
                (
                    r["name"],
                    r["us_per_call"],
                    r["over_bare_us"],
                    f"{r['ratio']:.2f}",
                    r["min_us_per_call"],
                    r["min_over_bare_us"],
                    r["min_over_transport_us"],
                    " → ".join(r["layers"]) + (f" (absent: {', '.join(r['missing'])})" if r["missing"] else ""),
                )
                for r in pl["rows"]
            ),
        )
    )
    tp = result["throughput"]
    out.append(
        f"\n### Over a socket: server in its own process, {tp['workers']} concurrent workers, "
        f"{tp['seconds']} s x {tp['repeats']} repetitions, GC {tp['gc']}\n"
    )
    out.append(
        table(
            (
                "client",
                "calls/s (median)",
                "runs",
                "x bare",
                "x bare, p25-p75 of runs",
                "client CPU µs/call",
                "x bare (calls per CPU-second)",
            ),
            (
                (
                    r["name"],
                    r["calls_per_second"],
                    ", ".join(f"{x:.0f}" for x in r["runs"]),
                    f"{r['ratio']:.3f}",
                    "{:.2f}-{:.2f}".format(*r["ratio_p25_p75"]),
                    r["client_cpu_us_per_call"],
                    f"{r['cpu_ratio']:.3f}",
                )
                for r in tp["rows"]
            ),
        )
    )
    for key in ("profile", "profile_socket"):
        if key in result:
            out.append(_profile_report(result[key]))
    out.append("\n### Targets\n")
    out.append(
        table(
            ("target", "measured", "verdict"),
            ((t["target"], t["value"], t.get("verdict") or verdict(t["met"])) for t in result["targets"]),
        )
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="tiny N: every path once, in seconds")
    parser.add_argument("--profile", action="store_true", help="also profile the all-six chain against bare httpx")
    parser.add_argument("--json", metavar="PATH", help="write the results there")
    parser.add_argument("--calls", type=int, help="sequential calls per repetition (in process)")
    parser.add_argument("--repeats", type=int, help="repetitions (in process)")
    parser.add_argument("--workers", type=int, help="concurrent workers (socket)")
    parser.add_argument("--seconds", type=float, help="seconds per throughput run (socket)")
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else Settings()
    changes = {name: getattr(args, name) for name in ("calls", "repeats", "workers", "seconds")}
    settings = Settings(**(vars(settings) | {k: v for k, v in changes.items() if v is not None}))
    result = asyncio.run(run(settings, with_profile=args.profile))
    result["machine"] = machine()
    result["command"] = "python -m benchmarks.overhead " + " ".join(argv if argv is not None else sys.argv[1:])
    print(report(result))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
