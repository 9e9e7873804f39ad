"""resilient_http in one minute, against a local server that misbehaves.

    python examples/quickstart.py

It starts a tiny HTTP server on 127.0.0.1 and calls it through
``ResilientTransport``: a 503 with Retry-After is retried after the wait the
server asked for, a dead dependency opens the circuit breaker (calls then
fail fast, without touching the network), and a stale copy answers while the
dependency is down. Breakers, budgets and caches are per host. The Prometheus metrics the calls produced are printed at
the end.
"""

from __future__ import annotations

import asyncio
import time

import httpx
from prometheus_client import CollectorRegistry, generate_latest

from resilient_http import (
    CircuitBreakerPolicy,
    CircuitOpenError,
    Policy,
    ResilientTransport,
    RetryPolicy,
    StaleCachePolicy,
    TimeoutPolicy,
)

# What the server does next, per path: a list of (status, extra headers), the last one repeats.
SCRIPT: dict[str, list[tuple[int, dict[str, str]]]] = {
    "/flaky": [(503, {"retry-after": "1"}), (200, {})],
    "/down": [(503, {})],
    "/catalog": [(200, {"cache-control": "max-age=0"}), (503, {})],
}


CONNECTIONS: set[asyncio.StreamWriter] = set()


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer HTTP/1.1 requests on one connection as SCRIPT says."""
    CONNECTIONS.add(writer)
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            steps = SCRIPT.get(path, [(404, {})])
            status, headers = steps.pop(0) if len(steps) > 1 else steps[0]
            body = f'{{"path": "{path}", "status": {status}}}'.encode()
            lines = [f"HTTP/1.1 {status} X", f"content-length: {len(body)}", "content-type: application/json"]
            lines += [f"{k}: {v}" for k, v in headers.items()]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        CONNECTIONS.discard(writer)
        writer.close()


async def main() -> None:
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    registry = CollectorRegistry()
    transport = ResilientTransport(
        default=Policy(
            timeout=TimeoutPolicy(attempt=2.0, total=10.0),
            retry=RetryPolicy(attempts=3, backoff=0.05),
            circuit_breaker=CircuitBreakerPolicy(minimum_calls=3, failure_ratio=0.5, break_duration=5.0),
            stale_cache=StaleCachePolicy(max_stale=60.0),
        ),
        registry=registry,
    )
    async with server, httpx.AsyncClient(transport=transport, base_url=base) as client:
        started = time.monotonic()
        response = await client.get("/flaky")
        info = response.extensions["resilient_http"]
        print(f"/flaky   -> {response.status_code} after {info.attempts} attempts in {time.monotonic() - started:.2f}s")
        print(f"            waits: {[(w.reason, round(w.seconds, 2)) for w in info.waits]}")

        for i in range(5):
            try:
                response = await client.get("/down", extensions={"resilient_http": {"retry": None}})
                state = response.extensions["resilient_http"].circuit_state
                print(f"/down #{i} -> {response.status_code} (circuit {state})")
            except CircuitOpenError as exc:
                print(f"/down #{i} -> CircuitOpenError, retry after {exc.retry_after:.1f}s (no request sent)")

        # Breakers are per host: "localhost" is another host than "127.0.0.1", and its circuit is closed.
        catalog = f"http://localhost:{port}/catalog"
        first = await client.get(catalog)
        second = await client.get(catalog, extensions={"resilient_http": {"retry": None}})
        info = second.extensions["resilient_http"]
        print(f"/catalog -> {first.status_code}, then upstream 503 answered with stale={info.stale} {second.json()}")
        for writer in list(CONNECTIONS):  # let the server's handlers end before it closes
            writer.close()
        await asyncio.sleep(0.01)

    print("\nmetrics:")
    for line in generate_latest(registry).decode().splitlines():
        if (
            line.startswith("resilient_http_")
            and "_bucket" not in line
            and "_created" not in line
            and not line.endswith(" 0.0")
        ):
            print("  " + line)


if __name__ == "__main__":
    asyncio.run(main())
