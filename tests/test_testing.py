"""The public test helpers in resilient_http.testing."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client import CollectorRegistry

from resilient_http import Policy, ResilientTransport, RetryPolicy
from resilient_http.testing import FakeClock, Script


async def test_a_script_plays_its_steps_in_order_then_repeats_the_last() -> None:
    """Statuses, headers and exceptions come in order; the last step answers every request after."""
    script = Script((503, {"Retry-After": "2"}), httpx.ConnectError, 200)
    clock = FakeClock()
    policy = Policy(retry=RetryPolicy(attempts=3, backoff=0.1, budget=None))
    async with httpx.AsyncClient(
        transport=ResilientTransport(
            default=policy, inner=httpx.MockTransport(script), clock=clock, registry=CollectorRegistry()
        )
    ) as client:
        first = await client.get("https://api.example.com/")
        second = await client.get("https://api.example.com/")
    assert (first.status_code, second.status_code) == (200, 200)
    assert script.calls == 4 == len(script.requests)
    assert clock.sleeps[0] >= 2.0  # the scripted Retry-After was honoured, on the fake clock


def test_a_script_needs_a_step() -> None:
    """An empty script is a mistake, said at once."""
    with pytest.raises(ValueError, match="at least one step"):
        Script()
