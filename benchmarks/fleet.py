"""A fleet of worker processes on one Redis: quota, server back-off, breaker trials, Redis killed, cost.

    python -m benchmarks.fleet [--smoke] [--parts PART,...] [--json PATH] [--plot PATH]

Every worker is a process of its own (``tests/fleet_worker.py``: its own
event loop, its own ``ResilientTransport(store=...)``) offering calls open
loop to one real HTTP/1.1 server on 127.0.0.1 (the demo's
``resilient_http._upstream``), which records every arrival on
``time.monotonic()``, the clock all the machine's processes share. The
benchmark starts its own ``redis-server`` on a free loopback port.

1. **Quota**: ``workers`` workers share ``rate`` calls a second (burst
   ``burst``, ``max_wait=0``), each offered ``2 x rate``; arrivals at the
   server, with the shared store and without (each worker then has the whole
   rate).
2. **Hold**: a generous limit; one worker hears ``429 Retry-After: 3``;
   arrivals from every worker during those seconds.
3. **Outage**: the server answers 503 to everything; breakers with
   ``half_open_calls=2`` and one-second breaks; trials per break, counted at
   the server, with the shared store and without. Twice: failures that come
   at once (a failed trial reopens the circuit before a second trial is
   asked for, so a break sees one) and failures that take ``slow_failure``
   seconds (the first trial is still in flight when the second slot is
   claimed: a break sees exactly ``half_open_calls``). Its server is
   ``benchmarks/_faults.py``'s, which can hold a failure.
4. **Redis killed** for a few seconds in a quota run: errors that reach the
   callers, the longest call, the aggregate rate meanwhile, and when the
   workers use Redis again after it returns.
5. **Cost**: one process, sequential calls to the server with a rate limiter
   and a breaker, without a store and with the Redis store: Redis commands
   per call (from Redis's own ``INFO commandstats``), and the latency per
   call at p50 and p99.

``--parts outage`` (say) runs only those parts, and with ``--json`` of a
file that exists, puts their results into it in place of the old ones,
keeping the others (with the machine and command of the run that made
them; the new parts' own are under ``reruns``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from resilient_http import CircuitBreakerPolicy, Policy, RateLimitPolicy, ResilientTransport
from resilient_http._upstream import Upstream

from ._common import HERE, machine, percentile, table, verdict, write_json
from ._faults import FaultServer

WORKER = HERE.parent / "tests" / "fleet_worker.py"
REDIS_SERVER = shutil.which("redis-server")
OFF = {"timeout": {"attempt": 5, "total": 10}, "retry": False, "bulkhead": False, "circuit_breaker": False}
#: "The store timeout plus a few milliseconds".
SLACK = 0.02
#: The workers' loop-lag probe's tick (tests/fleet_worker.py).
TICK = 0.005


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    workers: int = 8
    rate: int = 20
    burst: int = 3
    seconds: float = 10.0
    retry_after: float = 3.0
    outage: float = 8.0
    down: tuple[float, float] = (3.0, 6.0)
    cost_calls: int = 2000
    #: Seconds the server holds each failure in the outage's second run.
    slow_failure: float = 0.3
    #: The store's timeout per operation in the quota, hold and outage runs (the store's default: 50 ms).
    store_timeout: float = 0.05


SMOKE = Settings(workers=2, rate=20, burst=2, seconds=1.5, retry_after=1.0, outage=2.0, down=(0.3, 0.6), cost_calls=50)


class RedisProcess:
    """This benchmark's own ``redis-server`` on a free loopback port, keeping nothing on disk."""

    def __init__(self, directory: str) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port: int = sock.getsockname()[1]
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen([*args, "--dir", self.directory], stdout=subprocess.DEVNULL)
        for _ in range(500):
            if self.command("PING") == "+PONG":
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def command(self, *words: str) -> str:
        """One inline command's reply as text; empty when the server cannot be reached."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(" ".join(words).encode() + b"\r\n")
                reply = b""
                while not reply.endswith(b"\r\n") or (reply.startswith(b"$") and reply.count(b"\r\n") < 2):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    reply += chunk
                return reply.decode().strip()
        except OSError:
            return ""

    @contextlib.contextmanager
    def probed(self) -> Iterator[list[float]]:
        """Round trips of a PING sent every 10 ms from a thread of this process, while the block runs."""
        rtts: list[float] = []
        stop = threading.Event()

        def probe() -> None:
            sock: socket.socket | None = None
            while not stop.wait(0.01):
                try:
                    if sock is None:
                        sock = socket.create_connection(("127.0.0.1", self.port), timeout=1)
                    began = time.perf_counter()
                    sock.sendall(b"PING\r\n")
                    sock.recv(16)
                    rtts.append(time.perf_counter() - began)
                except OSError:
                    if sock is not None:
                        sock.close()
                    sock = None
            if sock is not None:
                sock.close()

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        try:
            yield rtts
        finally:
            stop.set()
            thread.join()

    def commands(self) -> int:
        """Round trips the server has answered for the stores: scripts run (the commands inside them not counted).

        Every store operation the layers use is a script (``held``, a bare
        PTTL, is not used; and PTTL runs inside the heartbeat's script too,
        where Redis counts it as a command of its own but it is no round trip).
        """
        total = 0
        for line in self.command("INFO", "commandstats").splitlines():
            if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:", "cmdstat_script|load:")):
                total += int(line.split("calls=")[1].split(",")[0])
        return total


async def workers(
    count: int, on_start: Callable[[float], Awaitable[None]] | None = None, **settings: Any
) -> tuple[list[dict[str, Any]], float]:
    """Run ``count`` workers started together; their reports and the moment they started.

    ``on_start``, given that moment, runs beside them.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE.parent / "tests")])}
    processes = []
    for i in range(count):
        config = {**settings, "phase": i / (count * settings["rate"])}
        if i and config.get("inject_429"):
            config["inject_429"] = None
        processes.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                str(WORKER),
                json.dumps(config),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
            )
        )
    for process in processes:
        assert process.stdout is not None
        if await process.stdout.readline() != b"ready\n":
            raise RuntimeError("a worker did not start")
    start = time.monotonic() + 0.3
    for process in processes:
        assert process.stdin is not None
        process.stdin.write(f"{start!r}\n".encode())
        await process.stdin.drain()
    beside = None if on_start is None else asyncio.ensure_future(on_start(start))
    reports = [json.loads((await process.communicate())[0]) for process in processes]
    if beside is not None:
        await beside
    return reports, start


def _outcomes(reports: list[dict[str, Any]]) -> dict[str, int]:
    counted: dict[str, int] = {}
    for report in reports:
        for call in report["calls"]:
            counted[call[2]] = counted.get(call[2], 0) + 1
    return counted


def _lagged(lags: list[list[float]], began: float, ended: float) -> float:
    """How long, within ``[began, ended]``, a worker's loop ran late (the late part of each probe's sleep)."""
    total = 0.0
    for slept, lag in lags:
        late_from = slept + TICK
        total += max(0.0, min(ended, late_from + lag) - max(began, late_from))
    return total


def _latencies(reports: list[dict[str, Any]]) -> list[float]:
    return [call[1] - call[0] for r in reports for call in r["calls"]]


def diagnose(reports: list[dict[str, Any]], timeout: float, probe: list[float] | None = None) -> dict[str, Any]:
    """Where a run's time went: the workers' loop lag, the store's operations, the calls' waits for the store.

    A store operation that was not answered counts as *during a lag* when
    its worker's loop ran late by at least half the store's timeout while it
    was in flight: its answer may well have been there, unread. A call that
    awaited the store longer than the timeout plus :data:`SLACK` is
    *explained* by its loop when, during the call, the loop ran late for at
    least the excess: that time was the process's, not the store's. A send
    is *later than its slot* by the time from the slot the store gave (when
    the worker asked, plus the wait the store named: the decision came
    after the question) to the moment the request reached the network: the
    store's decisions keep the limit, and a process that stalls in between
    delays its send into another second.
    ``probe``: round trips of a PING sent to Redis every 10 ms from a thread
    of the benchmark's own process.
    """
    lags = [lag for r in reports for _, lag in r["lags"]]
    operations = [op for r in reports for op in r["operations"]]
    answered = [op[2] for op in operations if op[3]]
    unanswered = [op for op in operations if not op[3]]
    lagged = 0
    for r in reports:
        spans = [(began, began + lag + 0.005) for began, lag in r["lags"] if lag >= timeout / 2]
        for _, began, seconds, ok, *_ in r["operations"]:
            if not ok and any(a < began + seconds and began < b for a, b in spans):
                lagged += 1
    awaited = [call[4] for r in reports for call in r["calls"]]
    bound = timeout + SLACK
    over = unexplained = 0
    for r in reports:
        for call in r["calls"]:
            if call[4] <= bound:
                continue
            over += 1
            if _lagged(r["lags"], call[0], call[1]) < call[4] - timeout:
                unexplained += 1
    given = [call for r in reports for call in r["calls"] if call[5] is not None and call[3] is not None]
    late = [call[3] - call[5] for call in given]
    reasons: dict[str, float] = {}
    for r in reports:
        for reason, n in r.get("fallback_reasons", {}).items():
            reasons[reason] = reasons.get(reason, 0.0) + n
    return {
        "loop_lag_max_ms": max(lags, default=0.0) * 1e3,
        "loop_lags_over_timeout": sum(1 for lag in lags if lag >= timeout),
        "loop_lags_over_half_timeout": sum(1 for lag in lags if lag >= timeout / 2),
        "store_operations": len(operations),
        "store_answered_p50_ms": percentile(answered, 50) * 1e3,
        "store_answered_p99_ms": percentile(answered, 99) * 1e3,
        "store_answered_max_ms": max(answered, default=float("nan")) * 1e3,
        "store_unanswered": len(unanswered),
        "store_unanswered_during_a_lag": lagged,
        "fallback_reasons": reasons,
        "call_store_wait_p99_ms": percentile(awaited, 99) * 1e3,
        "call_store_wait_max_ms": max(awaited, default=float("nan")) * 1e3,
        "calls_waiting_on_the_store_over_timeout_plus_slack": over,
        "of_which_not_during_a_loop_lag_as_long": unexplained,
        "most_on_time_sends_in_one_second": _most_in_one_second([c[3] for c in given if c[3] - c[5] <= SLACK]),
        "sends_later_than_their_slot_by_over_20_ms": sum(1 for gap in late if gap > SLACK),
        "send_after_slot_max_ms": max(late, default=float("nan")) * 1e3,
        "redis_ping_p99_ms": percentile(probe or [], 99) * 1e3,
        "redis_ping_max_ms": max(probe or [float("nan")]) * 1e3,
    }


def _most_in_one_second(times: list[float]) -> int:
    ordered = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(ordered):
        while ordered[j] < t - 1.0:
            j += 1
        best = max(best, i - j + 1)
    return best


def _timeline(arrivals: list[float], start: float, seconds: float, width: float) -> list[int]:
    bins = [0] * max(1, round(seconds / width))
    for t in arrivals:
        i = int((t - start) / width)
        if 0 <= i < len(bins):
            bins[i] += 1
    return bins


async def quota(upstream: Upstream, redis: RedisProcess, s: Settings, shared: bool) -> dict[str, Any]:
    policy = {**OFF, "rate_limit": {"rate": s.rate, "burst": s.burst, "max_wait": 0}}
    before, commands = len(upstream.arrivals), redis.commands()
    store = {"url": redis.url, "timeout": s.store_timeout} if shared else None
    with redis.probed() as probe:
        reports, start = await workers(
            s.workers,
            url=upstream.url + "/search",
            store=store,
            policy=policy,
            duration=s.seconds,
            rate=2 * s.rate,
        )
    arrivals = upstream.arrivals[before:]
    total = redis.commands()
    calls = sum(len(r["calls"]) for r in reports)
    sent = sum(1 for r in reports for call in r["calls"] if call[2] == "200")
    later = [call for r in reports for call in r["calls"] if call[0] >= start + 1.0]
    sent_later = sum(1 for call in later if call[2] == "200")
    # Counted by the workers (Redis's own count after a moment would include the questions asked before it
    # and answered after it, which a stalled start makes many): every rate step begun after the first second.
    on_calls = sum(1 for r in reports for op in r["operations"] if op[0] == "admit" and op[1] >= start + 1.0)
    latencies = _latencies(reports)
    return {
        "shared": shared,
        "offered_per_second": 2 * s.rate * s.workers,
        "arrivals": len(arrivals),
        "arrivals_per_second": len(arrivals) / s.seconds,
        "most_in_one_second": _most_in_one_second(arrivals),
        "after_first_second_per_second": sum(1 for t in arrivals if t >= start + 1) / (s.seconds - 1),
        "most_in_one_second_after_first": _most_in_one_second([t for t in arrivals if t >= start + 1]),
        "outcomes": _outcomes(reports),
        "redis_commands": total - commands if shared else 0,
        "redis_commands_per_call": (total - commands) / calls if shared else 0.0,
        "redis_commands_per_call_sent": (total - commands) / max(1, sent) if shared else 0.0,
        "after_first_second_redis_commands_per_call": on_calls / len(later) if shared else 0.0,
        "after_first_second_redis_commands_per_call_sent": on_calls / max(1, sent_later) if shared else 0.0,
        "fallbacks": sum(r["fallbacks"] for r in reports),
        "latency_p99": percentile(latencies, 99),
        "latency_max": max(latencies),
        "late_seconds": max(call[0] for r in reports for call in r["calls"]) - (start + s.seconds),
        "diagnosis": diagnose(reports, s.store_timeout, probe),
        "timeline": _timeline(arrivals, start, s.seconds, 0.25),
        "bin": 0.25,
    }


async def hold(upstream: Upstream, redis: RedisProcess, s: Settings) -> dict[str, Any]:
    """One worker hears a 429: arrivals at the server meanwhile, and the sends that began once the fleet knew.

    A request already on the wire when the 429 was heard cannot be recalled,
    and one decided before the hold reached the store was decided on what
    the fleet knew then: what counts against the fleet is a send that
    *began* after the hold was published (the store's answer reached the
    worker that heard it) and before it ended.
    """
    policy = {**OFF, "rate_limit": {"rate": 100 * s.rate, "burst": s.rate, "max_wait": 0}}
    before = len(upstream.arrivals)
    seconds = 2 * s.retry_after + 1
    with redis.probed() as probe:
        reports, start = await workers(
            s.workers,
            url=upstream.url + "/search",
            store={"url": redis.url, "timeout": s.store_timeout},
            policy=policy,
            duration=seconds,
            rate=s.rate / 2,
            inject_429=[1.0, s.retry_after],
        )
    arrivals = upstream.arrivals[before:]
    heard, published = reports[0]["injected"], reports[0]["published"]
    ends = heard + s.retry_after
    during = [t for t in arrivals if heard + 0.005 <= t < ends]
    sends = [call[3] for r in reports for call in r["calls"] if call[3] is not None]
    after_published = [t for t in sends if published is not None and published <= t < ends]
    return {
        "retry_after": s.retry_after,
        "heard_at": heard - start,
        "published_after": None if published is None else published - heard,
        "arrivals_during_hold": len(during),
        "arrivals_during_hold_at": [t - heard for t in during],
        "sends_begun_once_published": len(after_published),
        "sends_begun_between_heard_and_published": sum(
            1 for t in sends if published is not None and heard <= t < published
        ),
        "first_after_hold": min((t - heard for t in arrivals if t >= ends), default=None),
        "fallbacks": sum(r["fallbacks"] for r in reports),
        "outcomes": _outcomes(reports),
        "diagnosis": diagnose(reports, s.store_timeout, probe),
        "timeline": _timeline(arrivals, start, seconds, 0.1),
        "bin": 0.1,
    }


async def outage(server: FaultServer, redis: RedisProcess, s: Settings, shared: bool, slow: bool) -> dict[str, Any]:
    """Trials per break, counted at the server: failures at once, or each held ``slow_failure`` seconds."""
    breaker = {"minimum_calls": 5, "failure_ratio": 0.5, "break_duration": 1.0, "max_break_duration": 1.0}
    policy = {**OFF, "circuit_breaker": {**breaker, "half_open_calls": 2}}
    server.reset_share = 0.0
    server.outage_latency = s.slow_failure if slow else 0.0
    server.set_mode("outage")
    redis.command("FLUSHALL")  # an earlier run's circuit, for the same host, must not be this one's start
    before = len(server.arrivals)
    try:
        reports, start = await workers(
            s.workers,
            url=server.url + "/search",
            store={"url": redis.url, "timeout": s.store_timeout} if shared else None,
            policy=policy,
            duration=s.outage,
            rate=s.rate / 2,
        )
    finally:
        server.set_mode("healthy")
    arrivals = sorted(a.at for a in server.arrivals[before:])
    groups: list[list[float]] = [[arrivals[0]]] if arrivals else []
    for t in arrivals[1:]:
        if t - groups[-1][-1] > 0.4:  # a break is 0.8 s at least
            groups.append([])
        groups[-1].append(t)
    trials = [len(g) for g in groups[1:]]
    return {
        "shared": shared,
        "failure": "slow" if slow else "fast",
        "failure_seconds": server.outage_latency,
        "before_first_break": len(groups[0]) if groups else 0,
        "trials_per_break": trials,
        "max_trials_per_break": max(trials, default=0),
        "min_trials_per_break": min(trials, default=0),
        "fallbacks": sum(r["fallbacks"] for r in reports),
        "arrivals": [t - start for t in arrivals],
        "outcomes": _outcomes(reports),
    }


async def redis_down(upstream: Upstream, redis: RedisProcess, s: Settings) -> dict[str, Any]:
    policy = {**OFF, "rate_limit": {"rate": s.rate, "burst": s.burst, "max_wait": 0}}
    timeout, cooldown = s.store_timeout, 1.0
    store = {"url": redis.url, "timeout": timeout, "failures": 3, "cooldown": cooldown}
    before = len(upstream.arrivals)
    down, up = s.down
    marks: dict[str, float] = {}

    async def kill_and_restart(start: float) -> None:
        await asyncio.sleep(start + down - time.monotonic())
        await asyncio.to_thread(redis.stop)  # not on the loop that serves the workers' calls
        marks["killed"] = time.monotonic()
        await asyncio.sleep(up - down)
        await asyncio.to_thread(redis.start)
        marks["back"] = time.monotonic()
        for _ in range(1000):
            if await asyncio.to_thread(redis.commands) > 0:
                marks["resumed"] = time.monotonic()
                return
            await asyncio.sleep(0.01)

    with redis.probed() as probe:
        reports, start = await workers(
            s.workers,
            kill_and_restart,
            url=upstream.url + "/search",
            store=store,
            policy=policy,
            duration=s.seconds,
            rate=2 * s.rate / s.workers,
        )
    arrivals = upstream.arrivals[before:]
    latencies = _latencies(reports)
    killed, back = marks["killed"], marks["back"]
    outage = [t for t in arrivals if killed <= t < back]
    outcomes = _outcomes(reports)
    return {
        "store_timeout": timeout,
        "cooldown": cooldown,
        "killed_at": killed - start,
        "back_at": back - start,
        "resumed_after": marks.get("resumed", float("nan")) - back,
        "errors": sum(n for outcome, n in outcomes.items() if outcome not in ("200", "RateLimitedError")),
        "outcomes": outcomes,
        "latency_max": max(latencies),
        "latency_p99": percentile(latencies, 99),
        "latency_p50": percentile(latencies, 50),
        "arrivals_per_second_while_down": len(outage) / (back - killed),
        "most_in_one_second_while_down": _most_in_one_second(outage),
        "fallbacks": sum(r["fallbacks"] for r in reports),
        "diagnosis": diagnose(reports, timeout, probe),
        "timeline": _timeline(arrivals, start, s.seconds, 0.25),
        "bin": 0.25,
    }


async def cost(upstream: Upstream, redis: RedisProcess, s: Settings) -> list[dict[str, Any]]:
    """Sequential calls in this process: no store, then the Redis store; commands and latency per call."""
    policy = Policy(
        retry=None,
        bulkhead=None,
        rate_limit=RateLimitPolicy(rate=100_000, burst=1000),
        circuit_breaker=CircuitBreakerPolicy(),
    )
    rows = []
    for name, store in (("no store (in memory)", None), ("Redis store", redis.url)):
        transport = ResilientTransport(default=policy, registry=CollectorRegistry(), store=store)
        async with httpx.AsyncClient(transport=transport, base_url=upstream.url) as client:
            for _ in range(50):
                await client.get("/search")
            commands = redis.commands()
            latencies = []
            for _ in range(s.cost_calls):
                began = time.perf_counter()
                await client.get("/search")
                latencies.append(time.perf_counter() - began)
            per_call = (redis.commands() - commands) / s.cost_calls
        rows.append(
            {
                "store": name,
                "calls": s.cost_calls,
                "redis_commands_per_call": per_call,
                "p50_ms": percentile(latencies, 50) * 1e3,
                "p99_ms": percentile(latencies, 99) * 1e3,
            }
        )
    return rows


PARTS = ("quota", "hold", "outage", "redis_down", "cost")


def targets(result: dict[str, Any], s: Settings) -> list[dict[str, Any]]:
    """Each target of the parts the result holds, measured and judged."""
    found = []
    if "quota" in result:
        shared, alone = result["quota"]
        found += [
            {
                "target": f"shared quota: arrivals within ±5 % of {s.rate}/s",
                "measured": f"{shared['arrivals_per_second']:.1f}/s",
                "met": abs(shared["arrivals_per_second"] - s.rate) <= 0.05 * s.rate,
            },
            {
                "target": f"shared quota: never more than {s.rate} + {s.burst} in one second",
                "measured": f"{shared['most_in_one_second']} at the server (after the first second: "
                f"{shared['most_in_one_second_after_first']}); "
                f"{shared['diagnosis']['sends_later_than_their_slot_by_over_20_ms']} sends a stalled worker delayed"
                f" over 20 ms past their slot; without them, at most "
                f"{shared['diagnosis']['most_on_time_sends_in_one_second']} in one second",
                "met": shared["most_in_one_second"] <= s.rate + s.burst,
            },
            {
                "target": f"without a shared store: about {s.workers} x {s.rate}/s",
                "measured": f"{alone['arrivals_per_second']:.1f}/s",
                "met": alone["arrivals_per_second"] >= 0.9 * s.workers * s.rate,
            },
        ]
    if "hold" in result:
        h = result["hold"]
        found.append(
            {
                "target": f"429 Retry-After: {s.retry_after:g} heard by one worker: no send begun by any worker"
                " once the fleet knew, until it ends",
                "measured": f"{h['sends_begun_once_published']} (published {_ms(h['published_after'])} after the"
                f" 429; {h['arrivals_during_hold']} arrivals in the hold)",
                "met": h["sends_begun_once_published"] == 0,
            }
        )
    if "outage" in result:
        runs = {(r["shared"], r.get("failure", "fast")): r for r in result["outage"]}
        fast = runs[True, "fast"]
        found.append(
            {
                "target": "outage, failures at once: at most half_open_calls (2) trials per break, fleet-wide",
                "measured": f"{_trials(fast['trials_per_break'])} (without the store: "
                f"{_trials(runs[False, 'fast']['trials_per_break'])})",
                "met": fast["max_trials_per_break"] <= 2,
            }
        )
        if (True, "slow") in runs:
            slow = runs[True, "slow"]
            found.append(
                {
                    "target": f"outage, failures after {s.slow_failure * 1e3:.0f} ms: exactly half_open_calls (2)"
                    " trials per break, fleet-wide",
                    "measured": f"{_trials(slow['trials_per_break'])} (without the store: "
                    f"{_trials(runs[False, 'slow']['trials_per_break'])})",
                    "met": bool(slow["trials_per_break"]) and set(slow["trials_per_break"]) == {2},
                }
            )
    if "redis_down" in result:
        down = result["redis_down"]
        waits = down["diagnosis"]
        found += [
            {
                "target": "Redis killed: no error reaches a caller",
                "measured": down["errors"],
                "met": down["errors"] == 0,
            },
            {
                "target": f"Redis killed: no call awaits the store longer than its timeout + {SLACK * 1e3:.0f} ms,"
                " but for the time its own loop ran late",
                "measured": f"max {waits['call_store_wait_max_ms']:.0f} ms,"
                f" p99 {waits['call_store_wait_p99_ms']:.1f} ms;"
                f" {waits['calls_waiting_on_the_store_over_timeout_plus_slack']} over,"
                f" {waits['of_which_not_during_a_loop_lag_as_long']} not explained by a loop lag "
                f"(max lag {waits['loop_lag_max_ms']:.0f} ms)",
                "met": waits["of_which_not_during_a_loop_lag_as_long"] == 0,
            },
            {
                "target": f"Redis killed: aggregate rate within the local shares ({s.rate}/s + a token each)",
                "measured": down["most_in_one_second_while_down"],
                "met": down["most_in_one_second_while_down"] <= s.rate + s.workers,
            },
            {
                "target": "Redis back: sharing resumes within the store's cooldown",
                "measured": f"{down['resumed_after']:.2f} s (cooldown {down['cooldown']:g} s)",
                "met": down["resumed_after"] <= down["cooldown"] + 0.1,
            },
        ]
    if "cost" in result and "quota" in result:
        costs, shared = result["cost"], result["quota"][0]
        found.append(
            {
                "target": "Redis round trips per call: at most one unsaturated; saturated far fewer, about one per"
                " call sent (at most 1.2 after the first second, heartbeats aside)",
                "measured": f"{costs[1]['redis_commands_per_call']:.3f} unsaturated; saturated "
                f"{shared['redis_commands_per_call']:.3f} per call, {shared['redis_commands_per_call_sent']:.2f} per"
                f" call sent, heartbeats included; after the first second, heartbeats aside (counted by the workers):"
                f" {shared['after_first_second_redis_commands_per_call']:.3f} and "
                f"{shared['after_first_second_redis_commands_per_call_sent']:.2f}",
                "met": costs[1]["redis_commands_per_call"] <= 1.05
                and shared["after_first_second_redis_commands_per_call_sent"] <= 1.2,
            }
        )
    return found


def _trials(per_break: list[int]) -> str:
    return ", ".join(map(str, per_break)) or "no break ended"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


async def run(s: Settings, parts: tuple[str, ...] = PARTS) -> dict[str, Any]:
    """The parts named, in their usual order, each on this benchmark's own Redis and servers."""
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as directory:
        redis = RedisProcess(directory)
        redis.start()
        try:
            async with Upstream("fleet-bench") as upstream, FaultServer(reset_share=0.0) as faults:
                if "quota" in parts:
                    result["quota"] = [await quota(upstream, redis, s, True), await quota(upstream, redis, s, False)]
                if "hold" in parts:
                    result["hold"] = await hold(upstream, redis, s)
                if "outage" in parts:
                    result["outage"] = [
                        await outage(faults, redis, s, shared, slow)
                        for slow in (False, True)
                        for shared in (True, False)
                    ]
                if "redis_down" in parts:
                    result["redis_down"] = await redis_down(upstream, redis, s)
                if "cost" in parts:
                    result["cost"] = await cost(upstream, redis, s)
        finally:
            redis.stop()
    result["settings"] = dataclasses.asdict(s)
    result["targets"] = targets(result, s)
    return result


def report(result: dict[str, Any]) -> str:
    """The tables of the parts the result holds, and the targets."""
    sections = []
    if "quota" in result:
        q = table(
            [
                "store",
                "offered/s",
                "arrivals/s",
                "most in 1 s",
                "after 1 s: /s",
                "after 1 s: most in 1 s",
                "round trips per call",
                "fallbacks",
                "p99 ms",
                "max ms",
            ],
            [
                [
                    "shared" if r["shared"] else "none",
                    r["offered_per_second"],
                    r["arrivals_per_second"],
                    r["most_in_one_second"],
                    r["after_first_second_per_second"],
                    r["most_in_one_second_after_first"],
                    r["redis_commands_per_call"],
                    r["fallbacks"],
                    r["latency_p99"] * 1e3,
                    r["latency_max"] * 1e3,
                ]
                for r in result["quota"]
            ],
        )
        sections.append(f"## Quota\n\n{q}")
    if "hold" in result:
        h = result["hold"]
        sections.append(
            f"## Hold\n\nRetry-After {h['retry_after']:g} s heard at {h['heard_at']:.2f} s, published to the store "
            f"{_ms(h['published_after'])} later: {h['sends_begun_once_published']} sends begun once published, "
            f"{h['sends_begun_between_heard_and_published']} between the 429 and its publication; "
            f"{h['arrivals_during_hold']} arrivals at the server during the hold "
            f"(at {', '.join(f'{t * 1e3:.0f}' for t in h['arrivals_during_hold_at']) or '-'} ms); "
            f"the first after it {h['first_after_hold']} s after the 429; {h['fallbacks']} store fallbacks."
        )
    if "outage" in result:
        o = table(
            ["failures", "store", "calls before the first break", "trials per break"],
            [
                [
                    _failure(r),
                    "shared" if r["shared"] else "none",
                    r["before_first_break"],
                    _trials(r["trials_per_break"]),
                ]
                for r in result["outage"]
            ],
        )
        sections.append(f"## Outage\n\n{o}")
    if "redis_down" in result:
        d = result["redis_down"]
        down = table(
            [
                "errors",
                "p50 ms",
                "p99 ms",
                "max ms",
                "arrivals/s while down",
                "most in 1 s while down",
                "resumed after s",
            ],
            [
                [
                    d["errors"],
                    d["latency_p50"] * 1e3,
                    d["latency_p99"] * 1e3,
                    d["latency_max"] * 1e3,
                    d["arrivals_per_second_while_down"],
                    d["most_in_one_second_while_down"],
                    d["resumed_after"],
                ]
            ],
        )
        sections.append(f"## Redis killed\n\n{down}")
    if "cost" in result:
        c = table(
            ["store", "calls", "Redis round trips per call", "p50 ms", "p99 ms"],
            [[r["store"], r["calls"], r["redis_commands_per_call"], r["p50_ms"], r["p99_ms"]] for r in result["cost"]],
        )
        sections.append(f"## Cost per call (sequential, one process)\n\n{c}")
    runs = [
        (name, result[key][index] if index is not None else result[key])
        for name, key, index in (
            ("quota, shared", "quota", 0),
            ("quota, no store", "quota", 1),
            ("hold", "hold", None),
            ("Redis killed", "redis_down", None),
        )
        if key in result
    ]
    if runs:
        lag = table(
            [
                "run",
                "loop lag max ms",
                "lags ≥ timeout",
                "store ops",
                "answered p50 / p99 / max ms",
                "unanswered (during a lag)",
                "Redis PING p99 / max ms",
                "call's store wait p99 / max ms",
                "calls awaiting it > timeout + 20 ms (not explained by loop lag)",
                "sends > 20 ms after their slot (max ms)",
            ],
            [
                [
                    name,
                    g["loop_lag_max_ms"],
                    g["loop_lags_over_timeout"],
                    g["store_operations"],
                    f"{g['store_answered_p50_ms']:.2f} / {g['store_answered_p99_ms']:.1f}"
                    f" / {g['store_answered_max_ms']:.0f}",
                    f"{g['store_unanswered']} ({g['store_unanswered_during_a_lag']})",
                    f"{g['redis_ping_p99_ms']:.1f} / {g['redis_ping_max_ms']:.1f}",
                    f"{g['call_store_wait_p99_ms']:.1f} / {g['call_store_wait_max_ms']:.0f}",
                    f"{g['calls_waiting_on_the_store_over_timeout_plus_slack']}"
                    f" ({g['of_which_not_during_a_loop_lag_as_long']})",
                    f"{g['sends_later_than_their_slot_by_over_20_ms']} ({g['send_after_slot_max_ms']:.0f})",
                ]
                for name, r in runs
                for g in (r["diagnosis"],)
            ],
        )
        sections.append(f"## Where the time went\n\n{lag}")
    goals = table(
        ["target", "measured", "verdict"], [[t["target"], t["measured"], verdict(t["met"])] for t in result["targets"]]
    )
    sections.append(f"## Targets\n\n{goals}")
    return "\n\n".join(sections) + "\n"


def _failure(outage: dict[str, Any]) -> str:
    """How an outage run's server failed: at once (a run from before there were two has no word for it)."""
    seconds = outage.get("failure_seconds", 0.0)
    return f"after {seconds * 1e3:.0f} ms" if seconds else "at once"


def plot(result: dict[str, Any], path: str) -> None:
    """Four panels: the quota, the hold, the trials of an outage, Redis killed (blank for a part not run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["settings"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    ax = axes[0][0]
    if "quota" in result:
        for r, colour in zip(result["quota"], ("#1f77b4", "#d62728"), strict=True):
            xs = [i * r["bin"] for i in range(len(r["timeline"]))]
            label = "shared store" if r["shared"] else "no shared store"
            ax.step(xs, [n / r["bin"] for n in r["timeline"]], where="post", color=colour, label=label)
        ax.axhline(s["rate"], color="black", linestyle=":", label=f"quota {s['rate']}/s")
        ax.set(title=f"{s['workers']} workers offered 2 x quota each", xlabel="s", ylabel="arrivals/s at the server")
        ax.legend()
    ax = axes[0][1]
    if "hold" in result:
        h = result["hold"]
        xs = [i * h["bin"] for i in range(len(h["timeline"]))]
        ax.step(xs, [n / h["bin"] for n in h["timeline"]], where="post", color="#1f77b4")
        ax.axvspan(h["heard_at"], h["heard_at"] + h["retry_after"], color="#ff7f0e", alpha=0.2, label="Retry-After")
        ax.set(title="one worker hears 429 Retry-After", xlabel="s", ylabel="arrivals/s at the server")
        ax.legend()
    ax = axes[1][0]
    if "outage" in result:
        rows = result["outage"]
        for row, r in enumerate(rows):
            colour = "#1f77b4" if r["shared"] else "#d62728"
            ax.plot(r["arrivals"], [row] * len(r["arrivals"]), "|", markersize=14, color=colour)
        names = [f"failing {_failure(r)}, {'shared store' if r['shared'] else 'no store'}" for r in rows]
        ax.set_yticks(range(len(rows)), names)
        ax.invert_yaxis()
        ax.set(title="outage: every arrival (half_open_calls=2)", xlabel="s")
    ax = axes[1][1]
    if "redis_down" in result:
        d = result["redis_down"]
        xs = [i * d["bin"] for i in range(len(d["timeline"]))]
        ax.step(xs, [n / d["bin"] for n in d["timeline"]], where="post", color="#1f77b4")
        ax.axvspan(d["killed_at"], d["back_at"], color="#7f7f7f", alpha=0.25, label="Redis down")
        ax.axhline(s["rate"], color="black", linestyle=":", label=f"quota {s['rate']}/s")
        ax.set(title="Redis killed mid-run", xlabel="s", ylabel="arrivals/s at the server")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def earlier(path: str, s: Settings) -> dict[str, Any]:
    """An earlier run's results, to merge new parts into; refused when its settings differ from ``s``.

    With other settings, the targets would judge one part by another's
    numbers. A setting the earlier run did not have yet is not a difference.
    """
    with open(path, encoding="utf-8") as file:
        found: dict[str, Any] = json.load(file)
    settings = json.loads(json.dumps(dataclasses.asdict(s)))  # as JSON has them: lists, not tuples
    differ = {k: (v, settings.get(k)) for k, v in found["settings"].items() if settings.get(k) != v}
    if differ:
        raise SystemExit(f"{path} was run with other settings (there, here): {differ}")
    return found


def merge(earlier: dict[str, Any], result: dict[str, Any], s: Settings) -> dict[str, Any]:
    """An earlier run's results with the parts of ``result`` put in place of its own.

    The earlier run's other parts, machine and command stay; the new parts'
    machine and command go under ``reruns``.
    """
    for part in PARTS:
        if part in result:
            earlier[part] = result[part]
            earlier.setdefault("reruns", {})[part] = {"machine": result["machine"], "command": result["command"]}
    earlier["settings"] = result["settings"]
    earlier["targets"] = targets(earlier, s)
    return earlier


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="two workers, seconds each: every path once")
    parser.add_argument("--json", metavar="PATH", help="write the results there")
    parser.add_argument("--plot", metavar="PATH", help="draw the figure there (needs matplotlib)")
    parser.add_argument("--store-timeout", type=float, help="the store's timeout in the quota, hold and outage runs")
    parser.add_argument("--replot", metavar="JSON", help="report and draw an earlier run's results, without running")
    parser.add_argument(
        "--parts",
        type=_parts,
        default=PARTS,
        metavar="PART,...",
        help=f"run only these ({', '.join(PARTS)}); with --json of an existing file, merge them into it",
    )
    args = parser.parse_args(argv)
    if args.replot:  # the targets are judged again: their wording may have changed since
        result = json.loads(open(args.replot, encoding="utf-8").read())
        result["targets"] = targets(
            result, Settings(**{**result["settings"], "down": tuple(result["settings"]["down"])})
        )
        if args.json:
            write_json(args.json, result)
        print(report(result))
        if args.plot:
            plot(result, args.plot)
        return 0
    if REDIS_SERVER is None:
        print("redis-server is not installed (Debian: apt-get install redis-server)", file=sys.stderr)
        return 2
    settings = SMOKE if args.smoke else Settings()
    if args.store_timeout is not None:
        settings = dataclasses.replace(settings, store_timeout=args.store_timeout)
    into = None
    if args.parts != PARTS and args.json and os.path.exists(args.json):
        into = earlier(args.json, settings)
    result = asyncio.run(run(settings, args.parts))
    result["machine"] = machine()
    result["command"] = "python -m benchmarks.fleet " + " ".join(argv if argv is not None else sys.argv[1:])
    if into is not None:
        result = merge(into, result, settings)
    if args.json:
        write_json(args.json, result)
    print(report(result))
    if args.plot:
        plot(result, args.plot)
    return 0


def _parts(text: str) -> tuple[str, ...]:
    """``--parts``: names from :data:`PARTS`, comma-separated, run in :data:`PARTS`' order."""
    named = {name.strip() for name in text.split(",") if name.strip()}
    if not named or named - set(PARTS):
        raise argparse.ArgumentTypeError(f"parts are {', '.join(PARTS)} (got {text!r})")
    return tuple(part for part in PARTS if part in named)


if __name__ == "__main__":
    raise SystemExit(main())
