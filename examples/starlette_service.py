"""A Starlette service that calls a flaky dependency through ResilientTransport and serves /metrics.

    pip install -e '.[examples]'
    python examples/starlette_service.py              # serve on 127.0.0.1, a free port, until Ctrl-C
    python examples/starlette_service.py --port 8000
    python examples/starlette_service.py --smoke      # make a few calls through real sockets, print, exit

    curl http://127.0.0.1:8000/price/42
    curl -L http://127.0.0.1:8000/metrics

``GET /price/{sku}`` asks a pricing service (started alongside, on another
local port) for a price. The pricing service fails one request in three
with a 503; the transport retries those, so callers see none of them. When
pricing is down altogether, a price answered before is served stale
(``"stale": true``); one never answered becomes our own 503, with a
``Retry-After`` when the circuit breaker knows how long it will stay open.

``/metrics`` is prometheus-client's ASGI app (a mount: ``/metrics``
redirects to ``/metrics/``, which Prometheus follows). Under several worker
processes (``PROMETHEUS_MULTIPROC_DIR`` set), it serves what a
``MultiProcessCollector`` gathers from every worker: see
``dashboards/README.md``.

:func:`create_app` builds the service without starting anything, so a test
can drive it in-process through ``httpx.ASGITransport``, with the pricing
service in-process too (``inner=httpx.ASGITransport(create_upstream())``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import socket
from collections.abc import AsyncIterator, Sequence

import httpx
import uvicorn
from prometheus_client import CollectorRegistry, make_asgi_app
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from resilient_http import (
    Policy,
    RejectedError,
    ResilientTransport,
    RetryPolicy,
    StaleCachePolicy,
    TimeoutPolicy,
    call_info,
)

PRICES = {"42": 9.99, "7": 3.50, "99": 120.00}

#: What the service gives the pricing dependency. Short timeouts: a price
#: that takes more than a second is no use to a page being rendered.
POLICY = Policy(
    timeout=TimeoutPolicy(attempt=1.0, total=3.0),
    retry=RetryPolicy(attempts=3, backoff=0.02),
    stale_cache=StaleCachePolicy(max_stale=300.0),
)


def create_upstream() -> Starlette:
    """The flaky pricing service: every third request answers 503; all do while ``state.down``."""

    async def price(request: Request) -> JSONResponse:
        app.state.requests += 1
        if app.state.down or app.state.requests % 3 == 0:
            return JSONResponse({"error": "overloaded"}, status_code=503)
        sku = request.path_params["sku"]
        if sku not in PRICES:
            return JSONResponse({"error": "no such sku"}, status_code=404)
        return JSONResponse({"sku": sku, "price": PRICES[sku]}, headers={"cache-control": "max-age=10"})

    app = Starlette(routes=[Route("/prices/{sku}", price)])
    app.state.requests = 0
    app.state.down = False
    return app


def metrics_app(registry: CollectorRegistry) -> Mount:
    """``/metrics``: this process's registry, or every worker's under multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Each worker writes its samples to files in that directory; a scrape
        # must read all of them, not this worker's registry.
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return Mount("/metrics", app=make_asgi_app(registry))


def create_app(
    upstream_url: str,
    *,
    inner: httpx.AsyncBaseTransport | None = None,
    registry: CollectorRegistry | None = None,
) -> Starlette:
    """The service, calling the pricing service at ``upstream_url`` through ``inner`` (the network by default).

    Metrics go to ``registry``, a fresh one when omitted (pass
    ``prometheus_client.REGISTRY`` to share the process-wide one).
    """
    registry = CollectorRegistry() if registry is None else registry
    transport = ResilientTransport(default=POLICY, inner=inner, registry=registry)
    # One client for the life of the service: its pool, and the transport's
    # breakers, budgets and stale answers, are shared by every request.
    client = httpx.AsyncClient(transport=transport, base_url=upstream_url)

    async def price(request: Request) -> JSONResponse:
        sku = request.path_params["sku"]
        try:
            response = await client.get(f"/prices/{sku}")
        except RejectedError as exc:  # refused before the network: the breaker, a bulkhead, a rate limit
            headers = {} if exc.retry_after is None else {"retry-after": str(max(1, math.ceil(exc.retry_after)))}
            return JSONResponse({"error": f"pricing unavailable: {exc}"}, status_code=503, headers=headers)
        except httpx.HTTPError as exc:  # timeouts, resets, refused connections, after the retries
            return JSONResponse({"error": f"pricing unavailable: {type(exc).__name__}"}, status_code=503)
        if response.status_code == 404:
            return JSONResponse({"error": "no such sku"}, status_code=404)
        if response.status_code != 200:
            return JSONResponse({"error": f"pricing answered {response.status_code}"}, status_code=503)
        info = call_info(response)
        assert info is not None
        return JSONResponse(
            {
                **response.json(),
                "stale": info.stale,
                "age": None if info.age is None else round(info.age, 2),
                "attempts": info.attempts,
            },
            headers={"age": response.headers["age"]} if info.stale else None,
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with client:  # closed, with its connections, when the service stops
            yield

    app = Starlette(routes=[Route("/price/{sku}", price), metrics_app(registry)], lifespan=lifespan)
    app.state.client = client
    return app


def listening_socket(port: int) -> socket.socket:
    """A socket listening on 127.0.0.1:``port`` (0: any free port), for uvicorn to serve on.

    It listens before uvicorn has started: connections made meanwhile wait in
    its backlog, so callers need not wait for the server to be ready.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


async def smoke(base_url: str, upstream: Starlette) -> None:
    """A few calls through real sockets: retried 503s, then stale prices while pricing is down."""
    async with httpx.AsyncClient(base_url=base_url) as client:
        for sku in ("42", "7", "42", "7"):
            response = await client.get(f"/price/{sku}")
            print(f"GET /price/{sku} -> {response.status_code} {response.json()}")
        upstream.state.down = True
        for sku in ("42", "99"):
            response = await client.get(f"/price/{sku}")
            print(f"GET /price/{sku} -> {response.status_code} {response.json()} (pricing down)")
        metrics = await client.get("/metrics", follow_redirects=True)
    source = (
        "every worker's, from PROMETHEUS_MULTIPROC_DIR"
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        else "this process's"
    )
    print(f"\nmetrics ({source}):")
    for line in metrics.text.splitlines():
        if line.startswith(("resilient_http_requests_total", "resilient_http_retries_total")) and line[-4:] != " 0.0":
            print(f"  {line}")


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="the service's port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--smoke", action="store_true", help="make a few calls, print what happened, and exit")
    args = parser.parse_args(argv)

    upstream_socket, service_socket = listening_socket(0), listening_socket(args.port)
    upstream_url = f"http://127.0.0.1:{upstream_socket.getsockname()[1]}"
    service_url = f"http://127.0.0.1:{service_socket.getsockname()[1]}"
    upstream_app = create_upstream()
    upstream = uvicorn.Server(uvicorn.Config(upstream_app, log_level="warning"))
    service = uvicorn.Server(uvicorn.Config(create_app(upstream_url), log_level="warning"))

    servers = (upstream, service)
    tasks = [
        asyncio.create_task(upstream.serve(sockets=[upstream_socket])),
        asyncio.create_task(service.serve(sockets=[service_socket])),
    ]
    try:
        if args.smoke:
            await smoke(service_url, upstream_app)
        else:
            print(f"pricing (flaky) on {upstream_url}; the service on {service_url}: try {service_url}/price/42")
            # Ctrl-C reaches whichever server set its signal handlers last; when one stops, stop both.
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for server in servers:
            server.should_exit = True
        await asyncio.gather(*tasks)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn passes Ctrl-C on once it has shut down
        asyncio.run(main())
