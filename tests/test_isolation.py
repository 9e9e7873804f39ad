"""One hung host beside a healthy one, over real sockets: the healthy host must not notice."""

from __future__ import annotations

import time

import anyio
import httpx
from flaky_server import FlakyServer, hang, respond
from prometheus_client import CollectorRegistry

from resilient_http import Policy, ResilientTransport, RetryPolicy, TimeoutPolicy


async def test_a_hung_host_cannot_take_the_healthy_hosts_connections() -> None:
    """With every bulkhead slot of the hung host stuck in a connection, the healthy host still answers at once.

    httpx's own pool caps connections across all hosts (100), as many as a
    host's default bulkhead lets in: the default inner transport must not
    share that cap, or the hung host would hold every connection.
    """
    policy = Policy(timeout=TimeoutPolicy(attempt=20, total=20), retry=RetryPolicy(attempts=1))
    transport = ResilientTransport(default=policy, registry=CollectorRegistry())
    async with FlakyServer() as hung, FlakyServer() as healthy, httpx.AsyncClient(transport=transport) as client:
        hung.default("/", hang())
        healthy.default("/", respond(200, body=b"ok"))
        async with anyio.create_task_group() as stuck:
            for _ in range(100):  # the default bulkhead's max_concurrent
                stuck.start_soon(client.get, hung.url("/"))
            with anyio.fail_after(10):
                await hung.wait_for_requests(100)
            started = time.monotonic()
            with anyio.fail_after(5):
                response = await client.get(healthy.url("/"))
            elapsed = time.monotonic() - started
            stuck.cancel_scope.cancel()
    assert response.status_code == 200
    assert elapsed < 1.0
