"""Stale-cache fallback: a catalog that keeps answering while its upstream is down, and after it is gone.

    python examples/stale_fallback.py

A local catalog server answers ``GET /catalog/items/<id>`` while healthy;
the transport keeps each good answer. While the catalog answers, every call
still goes to it (this is a fallback, not a cache): a price change is seen
at once. Then the catalog fails (503) and, later, stops listening
altogether: calls for an item answered before get the last good answer,
with an ``Age`` header and ``CallInfo.stale``; calls for an item never
answered fail as they would without the layer. The metrics at the end say
how many answers were stale and why.
"""

from __future__ import annotations

import asyncio
import json

import httpx
from prometheus_client import CollectorRegistry

from resilient_http import Policy, ResilientTransport, RetryPolicy, StaleCachePolicy, TimeoutPolicy, call_info

PRICES = {"42": 9.99, "7": 3.50}


class Catalog:
    """A tiny HTTP/1.1 catalog server: ``healthy`` answers 200, otherwise 503."""

    def __init__(self) -> None:
        self.healthy = True
        self.connections: set[asyncio.StreamWriter] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                item = head.split(b" ", 2)[1].decode().rpartition("/")[2]
                if self.healthy and item in PRICES:
                    status, reason = 200, "OK"
                    body = json.dumps({"item": item, "price": PRICES[item]}).encode()
                    # Fresh for 30 s, as far as any HTTP cache is concerned; the
                    # stale cache ignores freshness and serves it up to max_stale.
                    extra = "cache-control: max-age=30\r\n"
                else:
                    status, reason = (503, "Service Unavailable") if not self.healthy else (404, "Not Found")
                    body, extra = b'{"error": "unavailable"}', ""
                writer.write(
                    f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(body)}\r\n{extra}\r\n".encode()
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.connections.discard(writer)
            writer.close()

    def hang_up(self) -> None:
        """Close every open connection (the client's pool notices on its next call)."""
        for writer in list(self.connections):
            writer.close()


def show(phase: str, path: str, response: httpx.Response) -> None:
    info = call_info(response)
    assert info is not None
    price = response.json().get("price") if response.status_code == 200 else None
    age = f" age={info.age:.1f}s Age: {response.headers['age']}" if info.stale and info.age is not None else ""
    print(
        f"{phase:<8} GET {path:<18} -> {response.status_code} price={price} "
        f"stale={info.stale}{age} attempts={info.attempts}"
    )


async def main() -> None:
    catalog = Catalog()
    server = await asyncio.start_server(catalog.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    registry = CollectorRegistry()
    transport = ResilientTransport(
        default=Policy(
            timeout=TimeoutPolicy(attempt=1.0, total=5.0),
            retry=RetryPolicy(attempts=2, backoff=0.05),
            # Serve an answer up to a minute old when the catalog cannot answer.
            stale_cache=StaleCachePolicy(max_stale=60.0),
        ),
        registry=registry,
    )
    async with httpx.AsyncClient(transport=transport, base_url=f"http://127.0.0.1:{port}") as client:
        # Healthy: answers come from the catalog and are kept.
        show("healthy", "/catalog/items/42", await client.get("/catalog/items/42"))
        PRICES["42"] = 10.49  # the price changes: the next call sees it, nothing stale is served
        show("healthy", "/catalog/items/42", await client.get("/catalog/items/42"))

        await asyncio.sleep(1.1)  # let the kept answer age a little

        # Outage: the catalog answers 503. After the retry, the last good answer stands in.
        catalog.healthy = False
        show("outage", "/catalog/items/42", await client.get("/catalog/items/42"))
        # Item 7 was never answered: nothing to fall back on, the 503 is the answer.
        show("outage", "/catalog/items/7", await client.get("/catalog/items/7"))

        # Gone: nothing listens any more. Connection errors are retried, then the stale answer is served.
        server.close()
        catalog.hang_up()
        await server.wait_closed()
        show("gone", "/catalog/items/42", await client.get("/catalog/items/42"))
        try:
            await client.get("/catalog/items/7")
        except httpx.ConnectError as exc:
            info = call_info(exc)
            assert info is not None
            print(f"{'gone':<8} GET {'/catalog/items/7':<18} -> ConnectError after {info.attempts} attempts")

        # Read before the client closes: a closed transport's series leave the registry.
        print("\nmetrics:")
        labels = {"transport": "default", "host": f"127.0.0.1:{port}"}
        for outcome in ("2xx", "5xx", "stale", "error"):
            value = registry.get_sample_value("resilient_http_requests_total", {**labels, "outcome": outcome})
            print(f'  resilient_http_requests_total{{outcome="{outcome}"}} {value or 0:.0f}')
        for reason in ("server_error", "error"):
            value = registry.get_sample_value("resilient_http_stale_served_total", {**labels, "reason": reason})
            print(f'  resilient_http_stale_served_total{{reason="{reason}"}} {value or 0:.0f}')
        entries = registry.get_sample_value("resilient_http_cache_entries", labels)
        print(f"  resilient_http_cache_entries {entries or 0:.0f}")


if __name__ == "__main__":
    asyncio.run(main())
