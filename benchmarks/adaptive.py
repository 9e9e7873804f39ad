"""The adaptive bulkhead limit against an upstream whose capacity halves and recovers.

    python -m benchmarks.adaptive [--smoke] [--json PATH] [--plot PATH] [--scale X]

The upstream (``benchmarks/_faults.py``, mode ``capacity``) serves
``capacity`` requests at once in ``base_latency`` seconds; above that its
answers slow down in proportion and a growing share of arrivals get an
immediate 503, all of them at 1.25 x capacity. Its capacity is C for the
first third of the run, C / 2 for the second, C again for the last. Traffic
is open-loop (``benchmarks/chaos.py``'s ``drive``) at 1.5 x what the full
capacity can serve, so every client must hold back or be refused.

Clients: bare httpx (a pool without a global cap, as resilient_http's own
inner transport); resilient_http with a fixed bulkhead of 100 (the
default), with a fixed bulkhead of C (tuned to the healthy upstream), and
with the adaptive limit (AIMD, and gradient). The resilient clients have
no retries and no breaker, so that only the bulkhead differs; their queue is
C deep and waits at most 0.5 s.

Targets, on the AIMD client's limit (sampled every 50 ms): it settles within
±30 % of C (median of the second half of the first third), follows the
halving into ±30 % of C / 2 within two seconds, and recovers to within
±30 % of C (median of the second half of the last third). Goodput (2xx
answers per second) and p99 of the successful calls are reported for every
client and phase.

``--smoke`` runs every client for a fraction of a second.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import httpx

from resilient_http import AdaptiveLimit, BulkheadPolicy, Policy

from ._common import machine, percentile, table, verdict, write_json
from ._faults import FaultServer
from .chaos import BARE, Client, Record, Stream, drive, make_client

FIXED_DEFAULT = "resilient_http, fixed 100"
FIXED_TUNED = "resilient_http, fixed C"
AIMD = "resilient_http, adaptive aimd"
GRADIENT = "resilient_http, adaptive gradient"
CLIENTS = (BARE, FIXED_DEFAULT, FIXED_TUNED, AIMD, GRADIENT)
PHASES = ("capacity C", "capacity C/2", "capacity C again")


@dataclass(frozen=True)
class Settings:
    capacity: int = 20
    base_latency: float = 0.1  # seconds per request within capacity
    phase: float = 6.0  # seconds of each of the three phases
    load: float = 1.5  # offered rate, as a multiple of what the full capacity serves
    sample: float = 0.05  # seconds between two readings of the limit
    drain: float = 2.0

    @property
    def rate(self) -> float:
        return self.load * self.capacity / self.base_latency


SMOKE = Settings(capacity=6, base_latency=0.04, phase=0.3, drain=0.3)


def policy_for(name: str, settings: Settings) -> Policy | None:
    c = settings.capacity
    queue = {"max_queue": c, "queue_timeout": 0.5}
    bulkheads = {
        FIXED_DEFAULT: BulkheadPolicy(**queue),  # type: ignore[arg-type]
        FIXED_TUNED: BulkheadPolicy(max_concurrent=c, **queue),  # type: ignore[arg-type]
        AIMD: BulkheadPolicy(adaptive=AdaptiveLimit(), **queue),  # type: ignore[arg-type]
        GRADIENT: BulkheadPolicy(adaptive=AdaptiveLimit(mode="gradient"), **queue),  # type: ignore[arg-type]
    }
    bulkhead = bulkheads.get(name)
    return None if bulkhead is None else Policy(bulkhead=bulkhead, retry=None, circuit_breaker=None)


def _bare() -> Client:
    """Bare httpx with the pool resilient_http's own inner transport has: no global cap on connections.

    With httpx's default cap (100), calls beyond it wait in httpcore's pool,
    whose every hand-off scans the whole queue: once an overloaded client
    falls behind, that scan eats the event loop and the run never recovers.
    """
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=100)
    http = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(limits=limits))

    async def send(url: str) -> httpx.Response:
        return await http.get(url)

    return Client(BARE, http, send)


async def _sample(client: Client, server: FaultServer, host: str, every: float, into: list[list[float]]) -> None:
    """Every ``every`` seconds: (time, limit, in flight, queued, upstream busy) into ``into``."""
    start = time.monotonic()
    while True:
        labels = {"transport": "default", "host": host}
        into.append(
            [
                time.monotonic() - start,
                client.metric("resilient_http_bulkhead_limit", labels),
                client.metric("resilient_http_bulkhead_in_flight", labels),
                client.metric("resilient_http_bulkhead_queued", labels),
                float(server.busy),
            ]
        )
        await asyncio.sleep(every)


def _phase_numbers(records: Sequence[Record], since: float, until: float) -> dict[str, Any]:
    offered = [r for r in records if since <= r.scheduled < until]
    ok = [r for r in offered if r.kind == "ok"]
    refused_here = sum(1 for r in offered if r.error is not None and "Bulkhead" in r.error)
    status_503 = sum(1 for r in offered if r.status == 503)
    seconds = until - since
    n = len(offered) or 1
    return {
        "offered": len(offered),
        "goodput": len(ok) / seconds,
        "success_share": len(ok) / n,
        "share_503": status_503 / n,
        "share_shed_locally": refused_here / n,
        "share_other_errors": (len(offered) - len(ok) - status_503 - refused_here) / n,
        "p50_ok": percentile([r.latency for r in ok], 50),
        "p99_ok": percentile([r.latency for r in ok], 99),
        "p99_all": percentile([r.latency for r in offered], 99),
    }


def _median_limit(samples: Sequence[Sequence[float]], since: float, until: float) -> float:
    values = [s[1] for s in samples if since <= s[0] < until]
    return statistics.median(values) if values else float("nan")


def _limit_numbers(samples: Sequence[Sequence[float]], settings: Settings) -> dict[str, Any]:
    c, p = settings.capacity, settings.phase
    halved_band = (0.7 * c / 2, 1.3 * c / 2)
    followed = next((s[0] - p for s in samples if s[0] >= p and halved_band[0] <= s[1] <= halved_band[1]), None)
    return {
        "settled": _median_limit(samples, p / 2, p),
        "halved": _median_limit(samples, 1.5 * p, 2 * p),
        "recovered": _median_limit(samples, 2.5 * p, 3 * p),
        "seconds_to_follow_halving": followed,
    }


async def _run(name: str, settings: Settings, server: FaultServer) -> dict[str, Any]:
    print(f"  {name}", file=sys.stderr, flush=True)
    server.capacity = settings.capacity
    server.reset_log()
    await server.drop_connections()
    client = _bare() if name == BARE else make_client(name, policy_for(name, settings))
    host = f"127.0.0.1:{server.port}"
    samples: list[list[float]] = []
    p = settings.phase

    def halve() -> None:
        server.capacity = max(1, settings.capacity // 2)

    def restore() -> None:
        server.capacity = settings.capacity

    try:
        sampler = asyncio.create_task(_sample(client, server, host, settings.sample, samples))
        stream = Stream("upstream", server.url + "/items", settings.rate)
        _, records = await drive(client, [stream], 3 * p, [(p, halve), (2 * p, restore)], settings.drain)
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    finally:
        await client.aclose()
    width = max(p / 10, 0.1)
    goodput = [0] * round(3 * p / width)
    for record in records:
        index = int(record.ended / width)
        if record.kind == "ok" and 0 <= index < len(goodput):
            goodput[index] += 1
    result: dict[str, Any] = {
        "goodput_timeline": goodput,
        "phases": {label: _phase_numbers(records, i * p, (i + 1) * p) for i, label in enumerate(PHASES)},
        "whole": _phase_numbers(records, 0, 3 * p),
        "samples": samples,
    }
    if client.policy is not None and client.policy.bulkhead is not None and client.policy.bulkhead.adaptive:
        result["limit"] = _limit_numbers(samples, settings)
    return result


async def run(settings: Settings, clients: Sequence[str] = CLIENTS) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with FaultServer(capacity=settings.capacity, base_latency=settings.base_latency, seed=3) as server:
        server.set_mode("capacity")
        for name in clients:
            # The drive's samples start 20 ms before its first call; close enough at 50 ms a sample.
            results[name] = await _run(name, settings, server)
    result: dict[str, Any] = {
        "benchmark": "adaptive",
        "settings": {**vars(settings), "rate": settings.rate},
        "clients": results,
    }
    result["targets"] = [vars(t) for t in targets(result, settings)]
    return result


@dataclass
class Target:
    target: str
    value: str
    met: bool


def targets(result: dict[str, Any], settings: Settings) -> list[Target]:
    mine = result["clients"].get(AIMD)
    if mine is None:
        return []
    c, limit = settings.capacity, mine["limit"]

    def near(value: float, of: float) -> bool:
        return 0.7 * of <= value <= 1.3 * of

    followed = limit["seconds_to_follow_halving"]
    return [
        Target(f"limit settles within ±30 % of C = {c}", f"{limit['settled']:.1f}", near(limit["settled"], c)),
        Target(
            "limit follows the halving into ±30 % of C/2 within 2 s",
            "never" if followed is None else f"{followed:.2f} s (then median {limit['halved']:.1f})",
            followed is not None and followed <= 2.0 and near(limit["halved"], c / 2),
        ),
        Target(f"limit recovers to within ±30 % of C = {c}", f"{limit['recovered']:.1f}", near(limit["recovered"], c)),
    ]


def report(result: dict[str, Any]) -> str:
    s = result["settings"]
    out = [
        f"Upstream capacity C = {s['capacity']} at once, {s['base_latency'] * 1000:.0f} ms each; "
        f"C/2 from {s['phase']:g} s to {2 * s['phase']:g} s; {s['rate']:.0f} calls/s offered.\n"
    ]
    rows = []
    for name, c in result["clients"].items():
        for phase, n in c["phases"].items():
            rows.append(
                (
                    name,
                    phase,
                    f"{n['goodput']:.0f}",
                    f"{n['success_share']:.1%}",
                    f"{n['share_503']:.1%}",
                    f"{n['share_shed_locally']:.1%}",
                    f"{n['p50_ok'] * 1000:.0f}",
                    f"{n['p99_ok'] * 1000:.0f}",
                    "-" if "limit" not in c else f"{_phase_limit(c, phase):.1f}",
                )
            )
    out.append(
        table(
            ("client", "phase", "goodput /s", "ok", "503", "shed here", "p50 ok ms", "p99 ok ms", "median limit"),
            rows,
        )
    )
    out.append("\n### Targets\n")
    out.append(
        table(
            ("target", "measured", "verdict"),
            ((t["target"], t["value"], verdict(t["met"])) for t in result["targets"]),
        )
    )
    return "\n".join(out)


def _phase_limit(client: dict[str, Any], phase: str) -> float:
    limit = client["limit"]
    return float({PHASES[0]: limit["settled"], PHASES[1]: limit["halved"], PHASES[2]: limit["recovered"]}[phase])


def plot(result: dict[str, Any], path: str) -> None:
    """The limit of each adaptive client against the capacity, and every client's goodput over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["settings"]
    c, p = s["capacity"], s["phase"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    top.step([0, p, 2 * p, 3 * p], [c, c / 2, c, c], where="post", color="black", label="upstream capacity")
    top.fill_between([0, p], 0.7 * c, 1.3 * c, color="0.9", step="post")
    top.fill_between([p, 2 * p], 0.35 * c, 0.65 * c, color="0.9")
    top.fill_between([2 * p, 3 * p], 0.7 * c, 1.3 * c, color="0.9", label="±30 % band")
    for name, client in result["clients"].items():
        samples = client["samples"]
        if "limit" in client:
            top.plot([x[0] for x in samples], [x[1] for x in samples], label=f"limit, {name.split(', ')[-1]}")
        if name in (AIMD, FIXED_TUNED, BARE):
            busy = [x[4] for x in samples]
            top.plot([x[0] for x in samples], busy, alpha=0.35, lw=0.8, label=f"upstream busy, {name}")
    top.set_ylabel("concurrent requests")
    top.set_ylim(0, 2.5 * c)
    top.legend(fontsize=7, ncol=2, loc="upper right")
    top.set_title("Adaptive bulkhead limit against an upstream whose capacity halves, then recovers")
    width = max(p / 10, 0.1)
    for name, client in result["clients"].items():
        bins = client["goodput_timeline"]
        bottom.step([i * width for i in range(len(bins))], [n / width for n in bins], where="post", label=name)
    bottom.set_ylabel("2xx answers / s")
    bottom.set_xlabel("seconds")
    bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="every client, for a fraction of a second")
    parser.add_argument("--json", metavar="PATH", help="write the results there")
    parser.add_argument("--plot", metavar="PATH", help="draw the limit and goodput there (needs matplotlib)")
    parser.add_argument("--clients", nargs="+", choices=CLIENTS, default=CLIENTS, help="run these clients only")
    parser.add_argument("--scale", type=float, help="multiply the phase length by this")
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else Settings()
    if args.scale is not None:
        settings = replace(settings, phase=settings.phase * args.scale)
    result = asyncio.run(run(settings, args.clients))
    result["machine"] = machine()
    result["command"] = "python -m benchmarks.adaptive " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.json:
        write_json(args.json, result)
    if args.plot:
        plot(result, args.plot)
    print(report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
