"""Users' own respx mocks: respx patches httpcore, so the whole chain runs above the mock."""

from __future__ import annotations

import httpx
import respx
from prometheus_client import CollectorRegistry

from resilient_http import Policy, ResilientTransport, RetryPolicy, call_info


@respx.mock
async def test_a_respx_route_sees_every_attempt_of_the_chain() -> None:
    """A 503 then a 200 from a respx route: the call is retried above the mock and succeeds."""
    route = respx.get("https://api.example.com/items").mock(side_effect=[httpx.Response(503), httpx.Response(200)])
    policy = Policy(retry=RetryPolicy(attempts=3, backoff=0.001, budget=None))
    transport = ResilientTransport(default=policy, registry=CollectorRegistry())
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.get("https://api.example.com/items")
    info = call_info(response)
    assert response.status_code == 200
    assert route.call_count == 2
    assert info is not None and info.attempts == 2
