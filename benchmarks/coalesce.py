"""Request coalescing: a thundering herd against a real server, and what coalescing costs per call.

    python -m benchmarks.coalesce [--smoke] [--json PATH]

1. **Herd over a socket**: a real HTTP/1.1 server on 127.0.0.1 (the demo's
   ``resilient_http._upstream``) holds every request (its ``hang`` mode, as
   an origin regenerating an expired resource would), while N identical
   concurrent GETs are sent through one ``ResilientTransport``; once the
   server has seen what it will see, it answers. Upstream requests are
   counted at the server. Then the same N calls spread over C distinct
   ``Authorization`` values, and the N identical calls with coalescing off.
2. **Per call, in process** (``httpx.MockTransport``, small JSON 200, the
   garbage collector off): sequential calls with ``Policy()`` and with
   ``Policy(coalesce=...)``, the price a lone call pays for the layer; and
   N concurrent identical calls, with and without coalescing, per call.
   Medians over the repetitions.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from resilient_http import BulkheadPolicy, CoalescePolicy, Policy, ResilientTransport, call_info
from resilient_http._upstream import Upstream

from ._common import machine, median, table, verdict, write_json

BODY = b'{"ok": true, "items": [1, 2, 3]}'
#: The bulkhead queue is deep enough that calls without coalescing are all sent, not shed.
BASE = Policy(bulkhead=BulkheadPolicy(max_concurrent=100, max_queue=100_000))
COALESCING = Policy(bulkhead=BASE.bulkhead, coalesce=CoalescePolicy())


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    herd: int = 1000
    credentials: int = 10
    sequential: int = 2000
    repeats: int = 15


SMOKE = Settings(herd=100, credentials=3, sequential=100, repeats=2)


async def _herd(upstream: Upstream, policy: Policy, calls: int, tokens: int | None) -> dict[str, Any]:
    """``calls`` concurrent GETs while the server holds them; what reached the server, and what came back."""
    transport = ResilientTransport(default=policy, registry=CollectorRegistry())
    before = upstream.received()
    upstream.set_mode("hang")
    async with httpx.AsyncClient(transport=transport, base_url=upstream.url) as client:
        headers = [{} if tokens is None else {"Authorization": f"Bearer {i % tokens}"} for i in range(calls)]
        started = time.perf_counter()
        tasks = [asyncio.ensure_future(client.get("/catalog/1", headers=h)) for h in headers]
        expected = 1 if tokens is None else tokens
        if policy.coalesce is None:  # every call goes out, as many at once as the bulkhead lets through
            assert policy.bulkhead is not None
            expected = min(calls, policy.bulkhead.max_concurrent)
        for _ in range(3000):  # at most 30 s: a client that never sends shows as fewer requests
            if upstream.received() - before >= expected:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # anything else on its way arrives now
        held = upstream.received() - before
        upstream.set_mode("healthy")
        responses = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    coalesced = sum(1 for r in responses if (info := call_info(r)) is not None and info.coalesced)
    return {
        "calls": calls,
        "credentials": 1 if tokens is None else tokens,
        "coalescing": policy.coalesce is not None,
        "upstream_requests": held,
        "upstream_requests_total": upstream.received() - before,
        "answered_200": sum(1 for r in responses if r.status_code == 200),
        "coalesced": coalesced,
        "seconds": elapsed,
    }


async def socket_herds(settings: Settings) -> list[dict[str, Any]]:
    async with Upstream("coalesce-bench") as upstream:
        return [
            await _herd(upstream, COALESCING, settings.herd, None),
            await _herd(upstream, COALESCING, settings.herd, settings.credentials),
            await _herd(upstream, BASE, settings.herd, None),
        ]


async def _handler(request: httpx.Request) -> httpx.Response:
    await asyncio.sleep(0)  # one turn of the loop, as any network answer takes, so that followers can join
    return httpx.Response(200, headers={"Content-Type": "application/json"}, content=BODY)


async def _timed(run: Callable[[], Awaitable[None]]) -> tuple[float, float]:
    gc.collect()
    gc.disable()
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        await run()
        return time.perf_counter() - wall, time.process_time() - cpu
    finally:
        gc.enable()


async def _costs(label: str, policy: Policy, settings: Settings) -> list[dict[str, Any]]:
    transport = ResilientTransport(default=policy, inner=httpx.MockTransport(_handler), registry=CollectorRegistry())
    async with httpx.AsyncClient(transport=transport, base_url="http://api.bench.example") as client:

        async def sequential() -> None:
            for _ in range(settings.sequential):
                await client.get("/v1/items")

        coalesced: list[int] = []

        async def herd() -> None:
            responses = await asyncio.gather(*(client.get("/v1/items") for _ in range(settings.herd)))
            coalesced.append(sum(1 for r in responses if (info := call_info(r)) is not None and info.coalesced))

        await sequential()  # warm up
        rows = []
        for name, run, n in (("sequential", sequential, settings.sequential), ("herd", herd, settings.herd)):
            times = [await _timed(run) for _ in range(settings.repeats)]
            rows.append(
                {
                    "policy": label,
                    "pattern": name,
                    "calls": n,
                    "us_per_call": median(t[0] for t in times) / n * 1e6,
                    "cpu_us_per_call": median(t[1] for t in times) / n * 1e6,
                    "coalesced": coalesced[-1] if name == "herd" else 0,
                }
            )
    return rows


async def per_call(settings: Settings) -> list[dict[str, Any]]:
    """Microseconds per call: sequential (no followers) and a concurrent herd, with and without coalescing."""
    rows = await _costs("Policy()", BASE, settings)
    return rows + await _costs("Policy(coalesce=CoalescePolicy())", COALESCING, settings)


def targets(herds: list[dict[str, Any]], settings: Settings) -> list[dict[str, Any]]:
    same, per_credential, _ = herds
    return [
        {
            "target": f"{settings.herd} identical concurrent GETs: 1 upstream request",
            "measured": same["upstream_requests_total"],
            "met": same["upstream_requests_total"] == 1 and same["answered_200"] == settings.herd,
        },
        {
            "target": f"{settings.credentials} distinct credentials: {settings.credentials} upstream requests",
            "measured": per_credential["upstream_requests_total"],
            "met": per_credential["upstream_requests_total"] == settings.credentials
            and per_credential["answered_200"] == settings.herd,
        },
    ]


async def run(settings: Settings) -> dict[str, Any]:
    herds = await socket_herds(settings)
    costs = await per_call(settings)
    return {
        "settings": dataclasses.asdict(settings),
        "herds": herds,
        "per_call": costs,
        "targets": targets(herds, settings),
    }


def report(result: dict[str, Any]) -> str:
    herds = table(
        ["calls", "credentials", "coalescing", "upstream requests", "answered 200", "coalesced", "seconds"],
        [
            [
                h["calls"],
                h["credentials"],
                "on" if h["coalescing"] else "off",
                h["upstream_requests_total"],
                h["answered_200"],
                h["coalesced"],
                h["seconds"],
            ]
            for h in result["herds"]
        ],
    )
    costs = table(
        ["policy", "pattern", "calls", "coalesced", "µs per call (wall)", "µs per call (CPU)"],
        [
            [r["policy"], r["pattern"], r["calls"], r["coalesced"], r["us_per_call"], r["cpu_us_per_call"]]
            for r in result["per_call"]
        ],
    )
    goals = table(
        ["target", "measured", "verdict"], [[t["target"], t["measured"], verdict(t["met"])] for t in result["targets"]]
    )
    return f"## Herd over a socket\n\n{herds}\n\n## Per call, in process\n\n{costs}\n\n## Targets\n\n{goals}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="tiny N: every path once, in seconds")
    parser.add_argument("--json", metavar="PATH", help="write the results there")
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else Settings()
    result = asyncio.run(run(settings))
    result["machine"] = machine()
    result["command"] = "python -m benchmarks.coalesce " + " ".join(argv if argv is not None else sys.argv[1:])
    print(report(result))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
