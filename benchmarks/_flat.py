"""Does the cost of a call stay flat with many calls in flight, and with many hosts?

Two sweeps, each counted in instructions per call (cachegrind, as in
``benchmarks/instructions.py``), for bare httpx and for resilient_http
with all six layers:

- **in flight**: rounds of K concurrent calls whose network (the same
  in-memory transport) holds every call until all K are inside it, then
  lets them all answer: each call runs the chain with K - 1 others in it.
  The bulkhead has 10,000 slots here (the default 100 would queue and then
  refuse what is beyond 200: that is its job, not a cost).
- **hosts**: calls spread round-robin over H hosts, every host made during
  the warm-up, with ``max_hosts`` and the stale cache's ``max_entries`` at
  least H (and one point at 10,000 hosts with both at their defaults of
  1,000, where every call makes its host anew and replaces a cached answer).

What is flat: the instructions per call at K (or H) over those at 1. Bare
httpx has its own slope (asyncio's task bookkeeping for K tasks), so the
resilient row is also shown as instructions over bare at the same level.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import replace
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from resilient_http import BulkheadPolicy, ResilientTransport
from resilient_http._hosts import DEFAULT_MAX_HOSTS

from . import _cachegrind
from ._common import table
from .overhead import _handler, all_six

SUBJECTS = ("bare httpx", "all six")
KINDS = ("in-flight", "hosts")


def _client(subject: str, inner: httpx.AsyncBaseTransport, max_hosts: int) -> httpx.AsyncClient:
    if subject == "bare httpx":
        return httpx.AsyncClient(transport=inner)
    policy = replace(all_six(), bulkhead=BulkheadPolicy(max_concurrent=10_000, max_queue=0))
    if max_hosts > DEFAULT_MAX_HOSTS:  # the stale cache sized to the hosts, as the table is: one answer each
        assert policy.stale_cache is not None
        policy = replace(policy, stale_cache=replace(policy.stale_cache, max_entries=max_hosts))
    transport = ResilientTransport(
        inner=inner, default=policy, registry=CollectorRegistry(), max_hosts=max_hosts or DEFAULT_MAX_HOSTS
    )
    return httpx.AsyncClient(transport=transport)


async def work(kind: str, subject: str, level: int, warmup: int, calls: int, max_hosts: int) -> float:
    """Make ``warmup`` then ``calls`` calls at ``level``; the CPU seconds of the measured calls."""
    if kind == "in-flight":
        return await _in_flight(subject, level, warmup, calls)
    return await _hosts(subject, level, warmup, calls, max_hosts)


async def _in_flight(subject: str, level: int, warmup: int, calls: int) -> float:
    arrived = 0
    all_in = asyncio.Event()
    gate = asyncio.Event()

    async def held(request: httpx.Request) -> httpx.Response:
        nonlocal arrived
        arrived += 1
        if arrived == level:
            all_in.set()
        await gate.wait()
        return _handler(request)

    async with _client(subject, httpx.MockTransport(held), 0) as client:

        async def one_round() -> None:
            nonlocal arrived
            arrived = 0
            all_in.clear()
            gate.clear()
            tasks = [asyncio.create_task(client.get("http://api.bench.example/v1/items")) for _ in range(level)]
            await all_in.wait()
            gate.set()
            for response in await asyncio.gather(*tasks):
                assert response.status_code == 200, response

        for _ in range(warmup // level):
            await one_round()
        with _cachegrind.frozen_heap():
            cpu = time.process_time()
            for _ in range(calls // level):
                await one_round()
            return time.process_time() - cpu


async def _hosts(subject: str, level: int, warmup: int, calls: int, max_hosts: int) -> float:
    urls = [f"http://h{i}.bench.example/v1/items" for i in range(level)]
    async with _client(subject, httpx.MockTransport(_handler), max_hosts) as client:
        for i in range(warmup):
            response = await client.get(urls[i % level])
            assert response.status_code == 200, response
        with _cachegrind.frozen_heap():
            cpu = time.process_time()
            for i in range(calls):
                await client.get(urls[i % level])
            return time.process_time() - cpu


def _sizes(kind: str, level: int) -> tuple[int, int]:
    """Warm-up and counted calls: whole rounds (or every host) at least once, a few hundred calls at least."""
    warmup = max(level, 200 - 200 % level)
    calls = max(level, 1000 - 1000 % level)
    return warmup, calls


def points(levels: tuple[int, ...]) -> list[tuple[str, str, int, int]]:
    """(kind, subject, level, max_hosts) of every point of both sweeps."""
    found = [
        (kind, subject, level, level if kind == "hosts" else 0)
        for kind in KINDS
        for level in levels
        for subject in SUBJECTS
    ]
    if max(levels) > DEFAULT_MAX_HOSTS:
        found.append(("hosts", "all six", max(levels), DEFAULT_MAX_HOSTS))
    return found


def flatness(levels: tuple[int, ...], *, counted: bool = True, jobs: int = 1) -> dict[str, Any]:
    """Both sweeps: instructions per call (``counted``) or, without valgrind, CPU µs per call in this process."""

    def measure(point: tuple[str, str, int, int]) -> dict[str, Any]:
        kind, subject, level, max_hosts = point
        warmup, calls = _sizes(kind, level)
        if counted:
            args = ["--flat", kind, "--subject", subject, "--level", str(level), "--max-hosts", str(max_hosts)]
            cost = _cachegrind.per_call([*args, "--warmup", str(warmup)], calls).instructions
        else:
            cost = asyncio.run(work(kind, subject, level, warmup, calls, max_hosts)) / calls * 1e6
        print(f"  {kind} {level} {subject} (max_hosts {max_hosts}): {cost:,.1f} per call", file=sys.stderr)
        return {"kind": kind, "subject": subject, "level": level, "max_hosts": max_hosts, "calls": calls, "cost": cost}

    rows = _cachegrind.parallel(measure, points(levels), jobs if counted else 1)
    for row in rows:
        first = next(r for r in rows if r["kind"] == row["kind"] and r["subject"] == row["subject"])
        bare = next(
            r for r in rows if r["kind"] == row["kind"] and r["level"] == row["level"] and r["subject"] == SUBJECTS[0]
        )
        row["x_level_1"] = row["cost"] / first["cost"]
        row["over_bare"] = row["cost"] - bare["cost"]
        row["over_bare_x_level_1"] = row["over_bare"] / first["over_bare"] if first["over_bare"] else float("nan")
    return {"unit": "instructions" if counted else "CPU µs (no valgrind)", "rows": rows}


def report(flat: dict[str, Any]) -> str:
    unit = flat["unit"]
    header = (
        f"\n### Flatness: {unit} per call with K calls in flight, and over H hosts "
        "(all six: bulkhead 10,000 slots; max_hosts = H unless shown)\n"
    )
    rows = (
        (
            r["kind"],
            f"{r['level']:,}"
            + (f" (max_hosts {r['max_hosts']:,})" if r["kind"] == "hosts" and r["max_hosts"] != r["level"] else ""),
            r["subject"],
            f"{r['cost']:,.1f}",
            f"{r['x_level_1']:.3f}",
            f"{r['over_bare']:+,.1f}",
            f"{r['over_bare_x_level_1']:.3f}",
        )
        for r in flat["rows"]
    )
    headers = ("sweep", "K or H", "subject", f"{unit}/call", "x at 1", "+ over bare", "+ over bare, x at 1")
    return header + "\n" + table(headers, rows)
