"""Hedged requests against an upstream with a long tail: p99 and p99.9 with and without, and the load they add.

    python -m benchmarks.hedge [--smoke] [--draw] [--subjects NAME ...] [--json PATH] [--plot PATH]

The upstream (``benchmarks/_tail.py``, its own process) answers in
``median`` seconds (±20 %), and 5 % of requests (exactly: dealt at random
from decks of 1,000) in ten times that. Calls are offered open-loop at
``rate`` a second (GETs, one client per subject, a warm-up of ``warmup``
calls first that is not measured); the latency of a call runs from its scheduled start to its body
read. The extra load is counted at the server: requests received during the
measured calls, over the calls, minus one.

Subjects: bare httpx; resilient_http with hedging only (adaptive, the
default ``HedgePolicy()``; a fixed delay of twice the median; adaptive with
twice the default budget), and
with the default ``Policy()`` plus adaptive hedging; httpx-hedged
(``HedgedTransport``) with its defaults (p90, a 10 % budget) and set like
ours (p95, 5 %). Every subject's inner transport is a plain
``httpx.AsyncHTTPTransport``.

Target (the issue's): the adaptive default at least halves p99 for at most
5 % extra requests.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from resilient_http import HedgePolicy, Policy, ResilientTransport

from ._common import machine, percentile, table, verdict, write_json
from ._tail import TailServer

BARE = "bare httpx"
ADAPTIVE = "resilient_http, HedgePolicy()"
FIXED = "resilient_http, HedgePolicy(delay=2 x median)"
WIDER = "resilient_http, HedgePolicy(budget=0.1)"
FULL = "resilient_http, Policy() + HedgePolicy()"
PEER = "httpx-hedged, defaults (p90, 10 %)"
PEER_LIKE = "httpx-hedged, p95, 5 %"
SUBJECTS = (BARE, ADAPTIVE, FIXED, WIDER, FULL, PEER, PEER_LIKE)


@dataclass(frozen=True)
class Settings:
    median: float = 0.01
    slow_share: float = 0.05
    slow_factor: float = 10.0
    rate: float = 100.0
    calls: int = 5_000
    warmup: int = 400
    deck: bool = True  # exactly slow_share of each 1,000 requests; False draws each request's luck on its own


SMOKE = Settings(rate=100.0, calls=200, warmup=40)


def _only_hedge(hedge: HedgePolicy) -> Policy:
    return Policy(timeout=None, retry=None, circuit_breaker=None, bulkhead=None, hedge=hedge)


def make_transport(name: str, settings: Settings) -> httpx.AsyncBaseTransport:
    inner = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=None, max_keepalive_connections=200))
    if name == BARE:
        return inner
    if name in (ADAPTIVE, FIXED, WIDER, FULL):
        policy = {
            ADAPTIVE: _only_hedge(HedgePolicy()),
            FIXED: _only_hedge(HedgePolicy(delay=2 * settings.median)),
            WIDER: _only_hedge(HedgePolicy(budget=0.1)),
            FULL: Policy(hedge=HedgePolicy()),
        }[name]
        return ResilientTransport(default=policy, inner=inner, registry=CollectorRegistry())
    from httpx_hedged import HedgeConfig, HedgedTransport

    config = HedgeConfig() if name == PEER else HedgeConfig(percentile=0.95, budget_percent=5.0)
    peer: httpx.AsyncBaseTransport = HedgedTransport(inner=inner, default_config=config)
    return peer


async def _offer(client: httpx.AsyncClient, calls: int, rate: float) -> list[float | None]:
    """``calls`` GETs at ``rate`` a second; each one's latency, ``None`` for a failure."""
    latencies: list[float | None] = [None] * calls

    async def one(i: int, at: float) -> None:
        try:
            response = await client.get("/item")
            await response.aread()
            if response.status_code == 200:
                latencies[i] = time.perf_counter() - at
        except httpx.HTTPError:
            pass

    start = time.perf_counter() + 0.01
    tasks = []
    for i in range(calls):
        at = start + i / rate
        wait = at - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(one(i, at)))
    await asyncio.gather(*tasks)
    return latencies


async def _server_requests(client: httpx.AsyncClient, path: str) -> int:
    async with httpx.AsyncClient(base_url=str(client.base_url)) as plain:
        count: int = (await plain.get(path)).json().get("requests", 0)
        return count


async def measure(name: str, port: int, settings: Settings) -> dict[str, Any]:
    transport = make_transport(name, settings)
    async with httpx.AsyncClient(transport=transport, base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        await _offer(client, settings.warmup, settings.rate)
        await asyncio.sleep(2 * settings.median * settings.slow_factor)  # hedges of the warm-up are over
        await _server_requests(client, "/reset")
        latencies = await _offer(client, settings.calls, settings.rate)
        received = await _server_requests(client, "/stats")
    done = [x for x in latencies if x is not None]
    return {
        "calls": settings.calls,
        "failed": settings.calls - len(done),
        "server_requests": received,
        "extra_load": received / settings.calls - 1,
        "ms": {q: percentile(done, float(q[1:])) * 1000 for q in ("p50", "p90", "p99", "p99.9")}
        | {"max": max(done) * 1000},
        "cdf": _cdf(done),
    }


def _cdf(values: list[float], points: int = 200) -> list[tuple[float, float]]:
    """(latency in ms, share of calls at most that slow), on a log-spaced grid of shares up to p99.99."""
    ordered = sorted(values)
    n = len(ordered)
    shares = sorted({min(n - 1, int(n * (1 - 10 ** (-4 * k / points)))) for k in range(points + 1)})
    return [(ordered[i] * 1000, (i + 1) / n) for i in shares]


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    if BARE not in result["subjects"] or ADAPTIVE not in result["subjects"]:
        return []
    bare, ours = result["subjects"][BARE], result["subjects"][ADAPTIVE]
    ratio = ours["ms"]["p99"] / bare["ms"]["p99"]
    return [
        {
            "target": "HedgePolicy(): p99 at most half of bare httpx's",
            "measured": f"{ours['ms']['p99']:.1f} ms vs {bare['ms']['p99']:.1f} ms ({ratio:.2f}x)",
            "met": ratio <= 0.5,
        },
        {
            "target": "HedgePolicy(): at most 5 % extra requests at the server",
            "measured": f"{ours['extra_load']:.2%}",
            "met": ours["extra_load"] <= 0.05,
        },
    ]


async def run(settings: Settings, subjects: tuple[str, ...] = SUBJECTS) -> dict[str, Any]:
    measured: dict[str, Any] = {}
    for name in subjects:
        # A fresh upstream (same seed) for each subject: the same luck, and no connection inherited.
        with TailServer(
            median=settings.median,
            slow_share=settings.slow_share,
            slow_factor=settings.slow_factor,
            deck=settings.deck,
        ) as port:
            measured[name] = await measure(name, port, settings)
    result: dict[str, Any] = {"settings": asdict(settings), "subjects": measured}
    result["targets"] = targets(result)
    return result


def report(result: dict[str, Any]) -> str:
    s = result["settings"]
    rows = [
        [
            name,
            r["ms"]["p50"],
            r["ms"]["p90"],
            r["ms"]["p99"],
            r["ms"]["p99.9"],
            r["ms"]["max"],
            f"{r['extra_load']:.2%}",
            r["failed"],
        ]
        for name, r in result["subjects"].items()
    ]
    latencies = table(["subject", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "extra requests", "failed"], rows)
    goals = table(
        ["target", "measured", "verdict"], [[t["target"], t["measured"], verdict(t["met"])] for t in result["targets"]]
    )
    title = (
        f"{s['calls']} GETs at {s['rate']:.0f}/s; upstream median {s['median'] * 1000:.0f} ms (±20 %), "
        f"{s['slow_share']:.0%} of requests {s['slow_factor']:.0f}x slower"
        f" ({'dealt from decks' if s.get('deck', True) else 'drawn one by one'})"
    )
    return f"## {title}\n\n{latencies}\n\n## Targets\n\n{goals}\n"


def plot(result: dict[str, Any], path: str) -> None:
    """Each subject's latency distribution: the share of calls slower than x, on log scales."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for name, subject in result["subjects"].items():
        cdf = subject["cdf"]
        ax.step([x for x, _ in cdf], [max(1e-4, 1 - share) for _, share in cdf], where="post", label=name)
    for q in (0.01, 0.001):
        ax.axhline(q, color="0.8", lw=0.8)
        ax.text(0.01, q * 1.1, f"p{100 * (1 - q):g}", fontsize=7, color="0.4", transform=ax.get_yaxis_transform())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("call latency (ms)")
    ax.set_ylabel("share of calls slower")
    s = result["settings"]
    ax.set_title(
        f"{s['slow_share']:.0%} of requests {s['slow_factor']:.0f}x the median ({s['median'] * 1000:.0f} ms), "
        f"{s['calls']} calls at {s['rate']:.0f}/s",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="every subject, a few hundred calls")
    parser.add_argument("--json", metavar="PATH", help="write the results there")
    parser.add_argument("--plot", metavar="PATH", help="draw the latency distributions there (needs matplotlib)")
    parser.add_argument("--draw", action="store_true", help="draw each request's luck on its own (5 %% on average)")
    parser.add_argument("--subjects", nargs="+", choices=SUBJECTS, default=SUBJECTS, help="run these only")
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else Settings()
    if args.draw:
        settings = replace(settings, deck=False)
    result = asyncio.run(run(settings, tuple(args.subjects)))
    result["machine"] = machine()
    result["command"] = "python -m benchmarks.hedge " + " ".join(argv if argv is not None else sys.argv[1:])
    print(report(result))
    if args.json:
        write_json(args.json, result)
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
