"""What resilient_http costs per call in CPU instructions, against a bare httpx call and against peers.

    python -m benchmarks.instructions [--smoke] [--repeat] [--profile] [--flat] [--socket] [--socket-count]
                                      [--simulate] [--guarantees] [--json PATH]

Instructions are counted with valgrind's cachegrind (``benchmarks/_cachegrind.py``):
each subject runs in its own process twice, warm-up only and warm-up + N
calls, and the difference over N is its cost per call. Every call goes to
the same in-memory ``httpx.MockTransport`` returning a fixed 200 (the one
``benchmarks/overhead.py`` uses), so what is counted is the client stack
alone; metrics are on (a fresh ``CollectorRegistry``), the garbage
collector too (the heap left by start-up and warm-up is frozen first, so
a full collection of the imported modules does not land in one subject's
calls and not another's).

Subjects: bare ``httpx.AsyncClient``; ``ResilientTransport`` with every
layer off, with ``Policy()``, with all six layers, and with each of retry,
rate limiter, circuit breaker and stale cache alone; and peers each doing
one of those jobs (:data:`PEERS`). Beside the counts: wall-clock medians
over interleaved rounds, in this process (``overhead.py``'s method).

``--repeat`` counts everything twice and reports the largest difference.
``--profile`` adds where the instructions go (``benchmarks/_profile.py``).
``--flat`` counts the cost per call with 1 to 10,000 calls in flight and
1 to 10,000 hosts (``benchmarks/_flat.py``); ``--socket`` measures
throughput over a real socket at 1, 16 and 256 concurrent callers, and
``--socket-count`` counts instructions per call over that socket, and with
``--simulate`` the cache misses and mispredicted branches too.
``--guarantees`` counts what the metrics, the attempt timer and the
request copy cost in each configuration (``benchmarks/_guarantees.py``).
``--smoke`` runs every mode with tiny N and two subjects, in seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass, replace
from typing import Any

import httpx
from aiolimiter import AsyncLimiter
from purgatory import AsyncCircuitBreakerFactory

from resilient_http import BulkheadPolicy, Policy

from . import _cachegrind
from ._common import interval_verdict, machine, median, table, verdict, write_json
from ._server import Server
from .overhead import (
    BARE,
    HISHEL,
    LAYER_ALONE,
    NO_LAYERS,
    THROUGHPUT_TARGET,
    URL,
    Subject,
    _compare,
    _handler,
    _paired_ratio,
    _run_for,
    _throughput_row,
    all_six,
    chain_layers,
    make_subject,
)
from .overhead import _calls_for as calls_for

OFF = "transport, every layer off"
DEFAULT = "Policy()"
ALL_SIX = "all six"
RETRY = "retry only"
LIMITER = "rate limiter only"
BREAKER = "circuit breaker only"
STALE = "stale cache only"

#: Every configuration of the issue, with metrics on; ``None`` is bare httpx.
CONFIGS: dict[str, Policy | None] = {
    BARE: None,
    OFF: NO_LAYERS,
    DEFAULT: Policy(),
    ALL_SIX: all_six(),
    RETRY: LAYER_ALONE["retry"],
    LIMITER: LAYER_ALONE["rate limiter"],
    BREAKER: LAYER_ALONE["circuit breaker"],
    STALE: LAYER_ALONE["stale cache"],
}

#: Issue 12's targets: instructions per call at most this many times a bare call's.
TARGETS = {OFF: 1.015, DEFAULT: 1.05, ALL_SIX: 1.08, RETRY: 1.03, LIMITER: 1.03, BREAKER: 1.04, STALE: 1.05}

#: Each peer, the configuration that does its job, and what it does (and does not) do on this call.
PEERS: dict[str, tuple[str, str]] = {
    "httpx-retries": (RETRY, "RetryTransport(Retry(total=2)): a transport; no budget, no deadline, no metrics"),
    "stamina": (RETRY, "@stamina.retry around client.get + raise_for_status; no budget, no metrics by default"),
    "tenacity": (RETRY, "AsyncRetrying around client.get + raise_for_status, a new retrying object per call"),
    "aiolimiter": (LIMITER, "AsyncLimiter(1e6 per second) around client.get: a leaky bucket that never waits"),
    "purgatory": (BREAKER, "@factory(...) around client.get + raise_for_status: looks its breaker up per call"),
    HISHEL: (STALE, "AsyncCacheTransport, SQLite in memory, RFC 9111: stores and revalidates every call (max-age=0)"),
}

SUBJECTS = (*CONFIGS, *PEERS)

#: All six with one layer off, for the profile: what each layer costs inside the whole chain.
WITHOUT: dict[str, Policy] = {
    f"all six without {field}": replace(all_six(), **{field: None})
    for field in ("stale_cache", "rate_limit", "timeout", "circuit_breaker", "retry", "bulkhead")
}


def make(name: str, inner: httpx.AsyncBaseTransport, url: str = URL) -> Subject:
    """The subject called ``name``, sending to ``inner``."""
    if name in CONFIGS or name in WITHOUT:
        policy = CONFIGS[name] if name in CONFIGS else WITHOUT[name]
        return make_subject(BARE, inner, url) if policy is None else make_subject(name, inner, url, policy=policy)
    client = httpx.AsyncClient(transport=inner)
    if name == "aiolimiter":
        limiter = AsyncLimiter(max_rate=1e6, time_period=1)

        async def limited() -> httpx.Response:
            async with limiter:
                return await client.get(url)

        return Subject(name, client, limited)
    if name == "purgatory":
        breakers = AsyncCircuitBreakerFactory(default_threshold=20, default_ttl=5)

        @breakers("api.bench.example")  # type: ignore[untyped-decorator]
        async def guarded() -> httpx.Response:
            response = await client.get(url)
            response.raise_for_status()
            return response

        return Subject(name, client, guarded)
    return make_subject(name, inner, url)


# -- the worker: one subject in its own process, counted by cachegrind -------------------------------------------


async def _work(name: str, warmup: int, calls: int, url: str | None = None) -> None:
    inner: httpx.AsyncBaseTransport = httpx.MockTransport(_handler) if url is None else httpx.AsyncHTTPTransport()
    subject = make(name, inner) if url is None else make(name, inner, url)
    async with subject.client:
        for _ in range(warmup):
            response = await subject.call()
            assert response.status_code == 200, response
        with _cachegrind.frozen_heap():
            for _ in range(calls):
                await subject.call()


def worker(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--subject", required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--calls", type=int, required=True)
    parser.add_argument("--flat", choices=("in-flight", "hosts"))
    parser.add_argument("--level", type=int, default=1)
    parser.add_argument("--max-hosts", type=int, default=0)
    parser.add_argument("--url", help="call this server over a real socket instead of the in-memory transport")
    parser.add_argument("--stub", action="append", default=[], help="a guarantee taken away (see _guarantees)")
    args = parser.parse_args(argv)
    if args.stub:
        from ._guarantees import apply

        apply(args.stub)
    if args.flat:
        from ._flat import work

        asyncio.run(work(args.flat, args.subject, args.level, args.warmup, args.calls, args.max_hosts))
    else:
        asyncio.run(_work(args.subject, args.warmup, args.calls, args.url))
    return 0


# -- the measurements --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    calls: int = 1000
    warmup: int = 300
    wall_calls: int = 300
    wall_repeats: int = 20
    subjects: tuple[str, ...] = SUBJECTS
    socket_workers: tuple[int, ...] = (1, 16, 256)
    socket_seconds: float = 0.5
    socket_repeats: int = 30
    flat_levels: tuple[int, ...] = (1, 100, 10_000)
    socket_count_calls: int = 1000
    profile_calls: int = 300
    jobs: int = 1
    smoke: bool = False


SMOKE = Settings(
    calls=20,
    warmup=10,
    wall_calls=10,
    wall_repeats=2,
    subjects=(BARE, DEFAULT),
    socket_workers=(1, 4),
    socket_seconds=0.2,
    socket_repeats=1,
    flat_levels=(1, 4),
    socket_count_calls=20,
    profile_calls=10,
    smoke=True,
)


def count_subject(name: str, settings: Settings, *, functions: bool = False) -> _cachegrind.PerCall:
    calls = calls_for(name, settings.calls)
    warmup = calls_for(name, settings.warmup)
    return _cachegrind.per_call(["--subject", name, "--warmup", str(warmup)], calls, functions=functions)


def instructions(settings: Settings, repeat: bool) -> tuple[dict[str, Any], dict[str, _cachegrind.PerCall]]:
    """Instructions per call of every subject, counted once (twice with ``repeat``), and the counts themselves."""
    rows: dict[str, dict[str, Any]] = {}
    kept: dict[str, _cachegrind.PerCall] = {}
    times = 2 if repeat else 1

    def measure(name: str) -> _cachegrind.PerCall:
        found = count_subject(name, settings, functions=True)
        print(f"  {name}: {found.instructions:,.1f} instructions per call", file=sys.stderr)
        return found

    found = _cachegrind.parallel(measure, [n for n in settings.subjects for _ in range(times)], settings.jobs)
    for i, name in enumerate(settings.subjects):
        counted = found[i * times : (i + 1) * times]
        kept[name] = counted[0]
        rows[name] = {
            "name": name,
            "instructions": counted[0].instructions,
            "calls": counted[0].calls,
            "runs": [[c.warmup_only, c.with_calls] for c in counted],
        }
        if repeat:
            rows[name]["second_count"] = counted[1].instructions
    bare = rows[BARE]["instructions"]
    for name, row in rows.items():
        row["ratio"] = row["instructions"] / bare
        row["over_bare"] = row["instructions"] - bare
        if name in CONFIGS:
            policy = CONFIGS[name]
            row["chain"] = [] if policy is None else chain_layers(policy)
            if name in TARGETS:
                row["target"] = TARGETS[name]
                row["met"] = row["ratio"] <= TARGETS[name]
        else:
            row["compare_with"], row["what"] = PEERS[name]
    return {"calls": settings.calls, "warmup": settings.warmup, "rows": list(rows.values())}, kept


async def wall_clock(settings: Settings) -> dict[str, Any]:
    """Wall-clock and CPU medians over interleaved rounds, every subject in this process."""
    subjects = [make(name, httpx.MockTransport(_handler)) for name in settings.subjects]
    try:
        await _compare(subjects, settings.wall_calls, settings.wall_repeats, min(settings.warmup, 100))
    finally:
        for subject in subjects:
            await subject.client.aclose()
    bare = subjects[0]
    rows = {
        s.name: {
            "us_per_call": median(s.times) * 1e6,
            "ratio": _paired_ratio(s, bare),
            "cpu_us_per_call": median(s.cpu) * 1e6,
            "cpu_ratio": _paired_ratio(s, bare, cpu=True),
        }
        for s in subjects
    }
    return {"calls": settings.wall_calls, "repeats": settings.wall_repeats, "rows": rows}


def socket_policies() -> dict[str, Policy | None]:
    """Bare, ``Policy()`` and all six, the bulkhead's queue long enough that no caller is refused.

    100 slots, as httpx's pool has 100 connections: the other callers wait
    for a slot here as bare httpx's wait for a connection in its pool.
    """
    queue = BulkheadPolicy(max_queue=1000)
    return {BARE: None, DEFAULT: replace(Policy(), bulkhead=queue), ALL_SIX: replace(all_six(), bulkhead=queue)}


async def socket(settings: Settings) -> dict[str, Any]:
    """Calls per second over a real socket, bare against resilient, at each number of concurrent callers."""
    results = []
    with Server() as port:
        url = f"http://127.0.0.1:{port}/v1/items"
        for workers in settings.socket_workers:
            subjects = []
            for name, policy in socket_policies().items():
                if policy is None:
                    subjects.append(make_subject(BARE, httpx.AsyncHTTPTransport(), url))
                else:
                    subjects.append(make_subject(name, httpx.AsyncHTTPTransport(), url, policy=policy))
            rates: dict[str, list[float]] = {s.name: [] for s in subjects}
            cpu: dict[str, list[float]] = {s.name: [] for s in subjects}
            try:
                for subject in subjects:
                    await _run_for(subject.call, workers, min(0.5, settings.socket_seconds))
                for rep in range(settings.socket_repeats):
                    shift = rep % len(subjects)
                    for subject in subjects[shift:] + subjects[:shift]:
                        made, elapsed, used = await _run_for(subject.call, workers, settings.socket_seconds)
                        rates[subject.name].append(made / elapsed)
                        cpu[subject.name].append(used / made)
            finally:
                for subject in subjects:
                    await subject.client.aclose()
            rows = [
                _throughput_row(name, rates[name], rates[BARE], cpu[name], cpu[BARE])
                | {"ratio_of_medians": median(rates[name]) / median(rates[BARE])}
                for name in rates
            ]
            results.append({"workers": workers, "rows": rows})
    return {"seconds": settings.socket_seconds, "repeats": settings.socket_repeats, "levels": results}


#: The subjects counted over a socket.
SOCKET_COUNTED = (BARE, DEFAULT, ALL_SIX)


def socket_count(settings: Settings, simulate: bool = False) -> dict[str, Any]:
    """Instructions per call over a real socket, one caller at a time: the client's process, the kernel's work aside.

    The same count as the table's, each subject calling ``benchmarks/_server.py``
    in its own process instead of the in-memory transport: the network's
    own work in the client (httpcore, the event loop's I/O, the suspensions
    every layer's frame resumes from) is counted too, as the throughput
    rounds pay it; the kernel's is not, since cachegrind sees user space only.

    ``simulate`` also simulates the caches and the branch predictor, and
    weighs their misses into a rough count of cycles
    (:func:`~benchmarks._cachegrind.cycles`): whether the chain costs the
    client's CPU more than its instructions say. The counts over a socket
    move more between runs than in memory (how often the event loop turns
    depends on when the server's answer comes): compare rows of one run.
    """
    with Server() as port:
        url = f"http://127.0.0.1:{port}/v1/items"

        def measure(name: str) -> _cachegrind.PerCall:
            args = ["--subject", name, "--warmup", str(settings.warmup), "--url", url]
            found = _cachegrind.per_call(args, settings.socket_count_calls, simulate=simulate)
            print(f"  {name} over a socket: {found.instructions:,.1f} instructions per call", file=sys.stderr)
            return found

        subjects = [name for name in SOCKET_COUNTED if name in settings.subjects]
        found = _cachegrind.parallel(measure, subjects, settings.jobs)
    bare = found[0]
    rows = []
    for name, f in zip(subjects, found, strict=True):
        row: dict[str, Any] = {
            "name": name,
            "instructions": f.instructions,
            "ratio": f.instructions / bare.instructions,
            "over_bare": f.instructions - bare.instructions,
        }
        if simulate:
            row["events"] = f.events
            row["event_ratios"] = {k: v / bare.events[k] for k, v in f.events.items() if bare.events.get(k)}
            row["cycles"] = _cachegrind.cycles(f.events)
            row["cycles_ratio"] = row["cycles"] / _cachegrind.cycles(bare.events)
        rows.append(row)
    result: dict[str, Any] = {"calls": settings.socket_count_calls, "warmup": settings.warmup, "rows": rows}
    if simulate:
        result["cycles_per_event"] = _cachegrind.CYCLES
    return result


def run(
    settings: Settings,
    *,
    repeat: bool,
    profile: bool,
    flat: bool,
    with_socket: bool,
    table_too: bool = True,
    count_socket: bool = False,
    simulate: bool = False,
    guarantees: bool = False,
) -> dict[str, Any]:
    """Every measurement asked for (the profile needs the table); the result is what ``--json`` writes."""
    result: dict[str, Any] = {"benchmark": "instructions", "settings": vars(settings) | {"repeat": repeat}}
    if table_too:
        result["instructions"], counted = instructions(settings, repeat)
        result["wall_clock"] = asyncio.run(wall_clock(settings))
    if profile and table_too:
        from ._profile import profile as where

        result["profile"] = where(settings, counted, ablate=not settings.smoke)
    if flat:
        from ._flat import flatness

        result["flat"] = flatness(settings.flat_levels, counted=not settings.smoke, jobs=settings.jobs)
    if with_socket:
        result["socket"] = asyncio.run(socket(settings))
    if count_socket:
        result["socket_count"] = socket_count(settings, simulate)
    if guarantees:
        from ._guarantees import measure

        result["guarantees"] = measure(
            settings, [name for name in CONFIGS if name != BARE and name in settings.subjects]
        )
    return result


# -- the report ----------------------------------------------------------------------------------------------------


def report(result: dict[str, Any]) -> str:
    """The result as Markdown tables."""
    out = _table(result) if "instructions" in result else []
    if "profile" in result:
        from ._profile import report as profile_report

        out.append(profile_report(result["profile"]))
    if "flat" in result:
        from ._flat import report as flat_report

        out.append(flat_report(result["flat"]))
    if "socket" in result:
        out.append(_socket_report(result["socket"]))
    if "socket_count" in result:
        sc = result["socket_count"]
        out.append(
            f"\n### Instructions per call over a socket (cachegrind, one caller; warm-up {sc['warmup']}, "
            f"then {sc['calls']} calls; user space only)\n"
        )
        rows = [
            [r["name"], f"{r['instructions']:,.0f}", f"{r['ratio']:.4f}", f"{r['over_bare']:+,.0f}"] for r in sc["rows"]
        ]
        out.append(table(["subject", "instructions/call", "x bare", "+ over bare"], rows))
        if "cycles_per_event" in sc:
            out.append(_simulated_report(sc))
    if "guarantees" in result:
        from ._guarantees import report as guarantees_report

        out.append(guarantees_report(result["guarantees"]))
    return "\n".join(out)


def _table(result: dict[str, Any]) -> list[str]:
    ins = result["instructions"]
    wall = result["wall_clock"]["rows"]
    repeat = result["settings"]["repeat"]
    out = [
        f"### Instructions per call (cachegrind; warm-up {ins['warmup']}, then {ins['calls']} calls; "
        "hishel a twentieth of both), with wall-clock medians beside them "
        f"({result['wall_clock']['repeats']} interleaved rounds of {result['wall_clock']['calls']} calls)\n"
    ]
    headers = ["subject", "instructions/call", "x bare", "+ over bare", "target", "verdict"]
    headers += ["second count (Δ)"] if repeat else []
    headers += ["µs/call (wall)", "x bare (wall)", "x bare (CPU)", "chain, or what the peer does"]
    rows = []
    for row in ins["rows"]:
        line: list[object] = [row["name"], f"{row['instructions']:,.0f}", f"{row['ratio']:.3f}"]
        line += [f"{row['over_bare']:+,.0f}"]
        if "target" in row:
            line += [f"≤ {row['target']}x", verdict(row["met"])]
        elif "compare_with" in row:
            line += [f"(vs {row['compare_with']})", ""]
        else:
            line += ["", ""]
        if repeat:
            line += [f"{row['second_count']:,.1f} ({row['second_count'] - row['instructions']:+.1f})"]
        w = wall.get(row["name"], {})
        line += [w.get("us_per_call", float("nan")), f"{w.get('ratio', float('nan')):.2f}"]
        line += [f"{w.get('cpu_ratio', float('nan')):.2f}"]
        line += [" → ".join(row["chain"]) if "chain" in row else row["what"]]
        rows.append(line)
    out.append(table(headers, rows))
    return out


#: The simulated events shown, and what each counts.
SIMULATED = {
    "I1mr": "instruction cache misses",
    "D1mr": "data cache read misses",
    "D1mw": "data cache write misses",
    "Bcm": "conditional branches mispredicted",
    "Bim": "indirect branches mispredicted",
}


def _simulated_report(sc: dict[str, Any]) -> str:
    weights = ", ".join(f"{k} {v}" for k, v in sc["cycles_per_event"].items())
    out = [
        "\nThe same calls with the caches and the branch predictor simulated (per call; x bare beside each), "
        f"and a rough count of cycles (one per instruction, plus cycles per miss: {weights}):\n"
    ]
    headers = ["subject", *(f"{k} ({v})" for k, v in SIMULATED.items()), "modelled cycles", "x bare"]
    rows = []
    for r in sc["rows"]:
        line: list[object] = [r["name"]]
        line += [f"{r['events'].get(k, 0):,.0f} ({r['event_ratios'].get(k, float('nan')):.3f})" for k in SIMULATED]
        line += [f"{r['cycles']:,.0f}", f"{r['cycles_ratio']:.4f}"]
        rows.append(line)
    out.append(table(headers, rows))
    return "\n".join(out)


def _socket_report(sk: dict[str, Any]) -> str:
    header = (
        f"\n### Throughput over a socket (server in its own process; {sk['seconds']} s x {sk['repeats']} "
        "interleaved rounds; bulkhead 100 slots with a queue of 1000, as httpx's pool has 100 connections)\n\n"
        "x bare is the median over rounds of each round's ratio; its 95 % interval (two order statistics, "
        f"distribution-free) decides the verdict against ≥ {THROUGHPUT_TARGET}x: met only when the whole interval is "
        "above, NOT met only when the whole of it is below.\n"
    )
    rows = []
    for level in sk["levels"]:
        for r in level["rows"]:
            line: list[object] = [level["workers"], r["name"], r["calls_per_second"], f"{r['ratio']:.3f}"]
            line += ["{:.2f} to {:.2f}".format(*r["ratio_p25_p75"]) if "ratio_p25_p75" in r else ""]
            if "ratio_interval" in r and r["name"] != BARE:
                low, high = r["ratio_interval"]
                line += [f"{low:.3f} to {high:.3f}", interval_verdict(low, high, THROUGHPUT_TARGET)]
            else:
                line += ["", ""]
            line += [f"{r['ratio_of_medians']:.3f}" if "ratio_of_medians" in r else ""]
            line += [r["client_cpu_us_per_call"], f"{r['cpu_ratio']:.3f}"]
            line += ["{:.3f} to {:.3f}".format(*r["cpu_ratio_interval"]) if "cpu_ratio_interval" in r else ""]
            rows.append(line)
    headers = (
        "callers",
        "client",
        "calls/s",
        "x bare (median of rounds)",
        "p25 to p75 of rounds",
        "95 % interval of the median",
        "verdict",
        "x bare (of the medians)",
        "client CPU µs/call",
        "x bare (calls per CPU-second)",
        "its 95 % interval",
    )
    return header + "\n" + table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="tiny N, two subjects: every path once, in seconds")
    parser.add_argument("--repeat", action="store_true", help="count everything twice, to show it repeats")
    parser.add_argument("--profile", action="store_true", help="where the instructions of Policy() and all six go")
    parser.add_argument("--flat", action="store_true", help="cost per call from 1 to 10,000 calls in flight and hosts")
    parser.add_argument("--socket", action="store_true", help="throughput over a socket at 1, 16 and 256 callers")
    parser.add_argument("--socket-count", action="store_true", help="instructions per call over a socket, 1 caller")
    parser.add_argument(
        "--simulate", action="store_true", help="with --socket-count: simulate the caches and branches too (slower)"
    )
    parser.add_argument(
        "--guarantees", action="store_true", help="what the metrics, the attempt timer and the request copy cost"
    )
    parser.add_argument("--no-table", action="store_true", help="only the modes asked for, no count of each subject")
    parser.add_argument("--subjects", nargs="+", choices=SUBJECTS, help="only these (bare httpx always)")
    parser.add_argument("--calls", type=int, help="calls counted per subject")
    parser.add_argument("--jobs", type=int, default=1, help="cachegrind runs at once (counts do not change)")
    parser.add_argument("--json", metavar="PATH", help="write the results there")
    args = parser.parse_args(argv)
    if args.simulate and not args.socket_count:
        parser.error("--simulate simulates the caches of --socket-count's count: give --socket-count too")
    why = _cachegrind.missing()
    if why is not None:
        print(f"cannot count instructions: {why}", file=sys.stderr)
        return 2
    settings = SMOKE if args.smoke else Settings()
    if args.subjects:
        settings = replace(settings, subjects=(BARE, *(s for s in args.subjects if s != BARE)))
    if args.calls:
        settings = replace(settings, calls=args.calls)
    settings = replace(settings, jobs=args.jobs)
    modes = {"repeat": args.repeat, "profile": args.profile, "flat": args.flat, "with_socket": args.socket}
    modes["count_socket"] = args.socket_count
    modes["guarantees"] = args.guarantees
    modes["simulate"] = args.simulate
    result = run(settings, **modes, table_too=not args.no_table)
    result["machine"] = machine() | {"valgrind": _cachegrind.VALGRIND}
    result["command"] = "python -m benchmarks.instructions " + " ".join(argv)
    print(report(result))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
