"""The stale cache as a shared cache, as a real server on 127.0.0.1 and its callers see it.

One transport serves several callers (their own ``AsyncClient`` each, as a
BFF or a multi-tenant service has them): what one caller was answered must
reach another only when the origin said anyone may have it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from flaky_server import FlakyServer, respond
from prometheus_client import CollectorRegistry

from resilient_http import Policy, ResilientTransport, StaleCachePolicy, TimeoutPolicy
from resilient_http.layers.stale_store import Store

FAST = TimeoutPolicy(attempt=2, total=5)


def cached(cache: StaleCachePolicy | None = None) -> Policy:
    """Timeouts and a stale cache only: every failure reaches the cache at once."""
    return Policy(
        timeout=FAST, retry=None, circuit_breaker=None, bulkhead=None, stale_cache=cache or StaleCachePolicy()
    )


def store_of(transport: ResilientTransport) -> Store:
    store: Store = transport._shared["stale_cache"]
    return store


@pytest.fixture
async def server() -> AsyncIterator[FlakyServer]:
    async with FlakyServer() as running:
        yield running


async def test_two_virtual_hosts_on_one_address_never_get_each_others_stale_answers(server: FlakyServer) -> None:
    """Host a.example and b.example behind 127.0.0.1:port each get their own answer back in an outage."""
    transport = ResilientTransport(default=cached(), registry=CollectorRegistry())
    server.queue("/page", respond(200, body=b"site a"), respond(200, body=b"site b"))
    server.default("/page", respond(503))
    async with httpx.AsyncClient(transport=transport) as client:
        url = server.url("/page")
        for site in ("a", "b"):
            assert (await client.get(url, headers={"Host": f"{site}.example"})).content == f"site {site}".encode()
        during = {site: await client.get(url, headers={"Host": f"{site}.example"}) for site in ("a", "b", "c")}
    assert [r.headers["host"] for r in server.requests_to("/page")][:2] == ["a.example", "b.example"]
    assert (during["a"].content, during["b"].content) == (b"site a", b"site b")
    assert during["c"].status_code == 503


async def test_an_answer_that_sets_a_cookie_never_reaches_another_caller(server: FlakyServer) -> None:
    """Alice's session answer is not kept; a public one is kept without its Set-Cookie, so Bob never gets her cookie."""
    transport = ResilientTransport(default=cached(), registry=CollectorRegistry())
    server.queue("/me", respond(200, {"Set-Cookie": "session=alice; Path=/"}, b"welcome alice"))
    server.default("/me", respond(503))
    cookie = {"Set-Cookie": "session=alice; Path=/", "Cache-Control": "public"}
    server.queue("/catalog", respond(200, cookie, b"catalogue"))
    server.default("/catalog", respond(503))
    async with httpx.AsyncClient(transport=transport) as alice, httpx.AsyncClient(transport=transport) as bob:
        assert (await alice.get(server.url("/me"))).content == b"welcome alice"
        assert (await bob.get(server.url("/me"))).status_code == 503
        assert alice.cookies["session"] == "alice"
        await alice.get(server.url("/catalog"))
        stale = await bob.get(server.url("/catalog"))
        assert (stale.content, stale.extensions["resilient_http"].stale) == (b"catalogue", True)
        assert "set-cookie" not in stale.headers
        assert not bob.cookies
        await bob.get(server.url("/catalog"))
    assert "cookie" not in server.requests_to("/catalog")[-1].headers


async def test_identity_headers_keep_each_tenants_answers_apart(server: FlakyServer) -> None:
    """With X-Api-Key named, each tenant gets its own stale answer, and a caller without a key gets none."""
    policy = cached(StaleCachePolicy(identity_headers=("X-Api-Key",)))
    transport = ResilientTransport(default=policy, registry=CollectorRegistry())
    server.queue("/orders", respond(200, body=b"orders of a"), respond(200, body=b"orders of b"))
    server.default("/orders", respond(503))
    async with httpx.AsyncClient(transport=transport) as client:
        url = server.url("/orders")
        for tenant in ("a", "b"):
            await client.get(url, headers={"X-Api-Key": tenant})
        during = [await client.get(url, headers=headers) for headers in ({"X-Api-Key": "a"}, {"X-Api-Key": "b"}, {})]
    assert [r.headers.get("x-api-key") for r in server.requests_to("/orders")][:2] == ["a", "b"]
    assert [r.content for r in during[:2]] == [b"orders of a", b"orders of b"]
    assert during[2].status_code == 503


async def test_a_small_policy_host_does_not_evict_a_big_policy_hosts_entries() -> None:
    """A host allowed 2 entries fills up behind a host allowed 50: the big host's answers all survive its outage."""
    async with FlakyServer() as big, FlakyServer() as small:
        policies = {f"127.0.0.1:{small.port}": cached(StaleCachePolicy(max_entries=2))}
        transport = ResilientTransport(
            policies, default=cached(StaleCachePolicy(max_entries=50)), registry=CollectorRegistry()
        )
        for server, count in ((big, 5), (small, 10)):
            for i in range(count):
                server.queue(f"/{i}", respond(200, body=b"%d" % i))
                server.default(f"/{i}", respond(503))
        async with httpx.AsyncClient(transport=transport) as client:
            for server, count in ((big, 5), (small, 10)):
                for i in range(count):
                    await client.get(server.url(f"/{i}"))
            outage_big = [await client.get(big.url(f"/{i}")) for i in range(5)]
            outage_small = [await client.get(small.url(f"/{i}")) for i in range(10)]
    assert [r.content for r in outage_big] == [b"%d" % i for i in range(5)]
    assert [r.status_code for r in outage_small] == [503] * 8 + [200] * 2


async def test_a_hosts_bookkeeping_leaves_with_its_last_entry() -> None:
    """A host whose last answer is pushed out by other hosts leaves nothing behind in the store."""
    registry = CollectorRegistry()
    async with FlakyServer() as first, FlakyServer() as second:
        transport = ResilientTransport(default=cached(StaleCachePolicy(max_entries=2)), registry=registry)
        first.default("/", respond(200, body=b"first"))
        second.default("/a", respond(200, body=b"a"))
        second.default("/b", respond(200, body=b"b"))
        async with httpx.AsyncClient(transport=transport) as client:
            await client.get(first.url("/"))
            label = f"127.0.0.1:{first.port}"
            assert label in store_of(transport).shelves
            await client.get(second.url("/a"))
            await client.get(second.url("/b"))
            # Read while the transport is open: a closed transport's series leave the registry.
            assert (
                registry.get_sample_value("resilient_http_cache_entries", {"transport": "default", "host": label}) == 0
            )
    assert list(store_of(transport).shelves) == [f"127.0.0.1:{second.port}"]
