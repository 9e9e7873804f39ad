"""Shared fixtures: a fresh metrics registry, a fake clock, and clients over ResilientTransport.

Unit tests never touch a socket and never really sleep: ``httpx.MockTransport``
plays the server (usually through a :class:`Script`) and
:class:`~resilient_http.testing.FakeClock` makes every wait instant.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from resilient_http import Policy, ResilientTransport
from resilient_http.testing import FakeClock, Handler, Script, Step

__all__ = ["BASE_URL", "HOST", "Handler", "Harness", "LeftOpen", "Script", "Step", "only"]

#: The host every client talks to unless a test says otherwise, and its metric label.
BASE_URL = "https://api.example.com"
HOST = "api.example.com:443"


def only(**layers: Any) -> Policy:
    """A policy with every layer off except ``layers``, so a test sees one layer at a time."""
    off = {field.name: None for field in dataclasses.fields(Policy)}
    return Policy(**{**off, **layers})


class LeftOpen(httpx.AsyncBaseTransport):
    """Passes calls to ``transport``, and leaves it open when the client closes.

    A closed transport's series leave the registry: a test that reads the
    metrics after its ``async with`` block gives its client this, and the
    transport goes with the garbage after the test.
    """

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self.transport = transport

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.transport.handle_async_request(request)


class Harness:
    """Builds transports and clients on the test's registry and clock, and reads the metrics back."""

    def __init__(self, registry: CollectorRegistry, clock: FakeClock) -> None:
        self.registry = registry
        self.clock = clock
        self._clients: list[httpx.AsyncClient] = []
        self._transports = 0

    def transport(
        self,
        handler: Handler,
        default: Policy | None = None,
        *,
        policies: Mapping[str, Policy] | None = None,
        seed: int = 0,
        max_hosts: int = 1000,
    ) -> ResilientTransport:
        # Each transport on the registry needs its own name: the first is "default", which value() reads.
        self._transports += 1
        return ResilientTransport(
            policies,
            default=default,
            inner=httpx.MockTransport(handler),
            registry=self.registry,
            max_hosts=max_hosts,
            clock=self.clock,
            random=random.Random(seed),
            name="default" if self._transports == 1 else f"default-{self._transports}",
        )

    def client(
        self,
        handler: Handler,
        default: Policy | None = None,
        *,
        policies: Mapping[str, Policy] | None = None,
        seed: int = 0,
        max_hosts: int = 1000,
    ) -> httpx.AsyncClient:
        """A client on ``BASE_URL`` over a ResilientTransport whose inner transport runs ``handler``."""
        transport = self.transport(handler, default, policies=policies, seed=seed, max_hosts=max_hosts)
        client = httpx.AsyncClient(transport=transport, base_url=BASE_URL)
        self._clients.append(client)
        return client

    def value(self, name: str, host: str = HOST, **labels: str) -> float | None:
        """The sample ``name`` for ``host`` and ``labels`` (of the first transport unless ``transport=``).

        ``None`` when the series does not exist.
        """
        return self.registry.get_sample_value(name, {"transport": "default", "host": host, **labels})

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def harness(registry: CollectorRegistry, clock: FakeClock) -> AsyncIterator[Harness]:
    harness = Harness(registry, clock)
    yield harness
    await harness.aclose()
