"""Stale-cache fallback: what is kept, when it is served, to whom, and how much memory it may take."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest
from conftest import LeftOpen
from prometheus_client import CollectorRegistry

from resilient_http import (
    CircuitBreakerPolicy,
    CircuitOpenError,
    Policy,
    ResilientTransport,
    StaleCachePolicy,
)
from resilient_http.testing import FakeClock

HOST = "api.example:443"
URL = "https://api.example/items"

Handler = Callable[[httpx.Request], httpx.Response]


class Upstream:
    """A scripted upstream: answers from a list, then repeats the last behaviour."""

    def __init__(self, *behaviours: httpx.Response | Exception) -> None:
        self.behaviours: list[httpx.Response | Exception] = list(behaviours)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        behaviour = self.behaviours.pop(0) if len(self.behaviours) > 1 else self.behaviours[0]
        if isinstance(behaviour, Exception):
            raise behaviour
        return behaviour


def ok(body: bytes = b'{"v": 1}', /, **headers: str) -> httpx.Response:
    return httpx.Response(200, content=body, headers={"content-type": "application/json", **headers})


def down() -> httpx.ConnectError:
    return httpx.ConnectError("connection refused")


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def client(
    upstream: Handler,
    clock: FakeClock,
    registry: CollectorRegistry,
    cache: StaleCachePolicy | None = None,
    **policy: object,
) -> httpx.AsyncClient:
    settings: dict[str, object] = {"retry": None, "circuit_breaker": None, "bulkhead": None}
    settings.update(policy)
    transport = ResilientTransport(
        default=Policy(stale_cache=cache or StaleCachePolicy(), **settings),  # type: ignore[arg-type]
        inner=httpx.MockTransport(upstream),
        registry=registry,
        clock=clock,
    )
    return httpx.AsyncClient(transport=LeftOpen(transport))


async def test_fresh_calls_always_go_to_the_network(clock: FakeClock, registry: CollectorRegistry) -> None:
    """A stored answer is never served while the upstream answers: this is a fallback, not a cache."""
    upstream = Upstream(ok(b"1"), ok(b"2"))
    async with client(upstream, clock, registry) as c:
        first = await c.get(URL)
        second = await c.get(URL)
    assert (first.content, second.content) == (b"1", b"2")
    assert len(upstream.requests) == 2
    assert second.extensions["resilient_http"].stale is False


async def test_connection_error_is_answered_from_the_stale_copy(clock: FakeClock, registry: CollectorRegistry) -> None:
    """When the host cannot be reached, the last good answer comes back, marked stale with an Age header."""
    upstream = Upstream(ok(b'{"v": 1}'), down())
    async with client(upstream, clock, registry) as c:
        await c.get(URL)
        clock.advance(42)
        stale = await c.get(URL)
    assert stale.status_code == 200
    assert stale.json() == {"v": 1}
    assert stale.headers["age"] == "42"
    info = stale.extensions["resilient_http"]
    assert info.stale is True
    assert info.age == pytest.approx(42)
    assert (
        registry.get_sample_value(
            "resilient_http_stale_served_total", {"transport": "default", "host": HOST, "reason": "error"}
        )
        == 1
    )
    assert (
        registry.get_sample_value(
            "resilient_http_requests_total", {"transport": "default", "host": HOST, "outcome": "stale"}
        )
        == 1
    )


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_final_server_errors_are_answered_from_the_stale_copy(
    status: int, clock: FakeClock, registry: CollectorRegistry
) -> None:
    """A final 500/502/503/504 is replaced by the stored answer."""
    upstream = Upstream(ok(b"good"), httpx.Response(status, content=b"bad"))
    async with client(upstream, clock, registry) as c:
        await c.get(URL)
        stale = await c.get(URL)
    assert (stale.status_code, stale.content) == (200, b"good")
    assert registry.get_sample_value(
        "resilient_http_stale_served_total", {"transport": "default", "host": HOST, "reason": "server_error"}
    )


@pytest.mark.parametrize("status", [400, 404, 429, 501])
async def test_client_errors_and_other_statuses_pass_through(
    status: int, clock: FakeClock, registry: CollectorRegistry
) -> None:
    """4xx are answers, not failures, and 501 is not a transient error: none is replaced."""
    upstream = Upstream(ok(b"good"), httpx.Response(status))
    async with client(upstream, clock, registry) as c:
        await c.get(URL)
        response = await c.get(URL)
    assert response.status_code == status
    assert response.extensions["resilient_http"].stale is False


async def test_without_a_stored_answer_the_failure_is_raised(clock: FakeClock, registry: CollectorRegistry) -> None:
    """No stored answer: the original exception reaches the caller."""
    async with client(Upstream(down()), clock, registry) as c:
        with pytest.raises(httpx.ConnectError):
            await c.get(URL)


async def test_open_circuit_is_answered_from_the_stale_copy(clock: FakeClock, registry: CollectorRegistry) -> None:
    """An open circuit's rejection is a failure the stale copy answers, without touching the network."""
    upstream = Upstream(ok(b"good"), httpx.Response(503))
    breaker = CircuitBreakerPolicy(minimum_calls=2, failure_ratio=0.5)
    async with client(upstream, clock, registry, circuit_breaker=breaker) as c:
        await c.get(URL)
        await c.get(URL)  # 503: opens the circuit, answered stale
        sent = len(upstream.requests)
        response = await c.get(URL)
    assert len(upstream.requests) == sent
    assert response.extensions["resilient_http"].stale is True
    assert response.extensions["resilient_http"].circuit_state == "open"
    assert registry.get_sample_value(
        "resilient_http_stale_served_total", {"transport": "default", "host": HOST, "reason": "circuit_open"}
    )


async def test_open_circuit_without_a_copy_still_raises(clock: FakeClock, registry: CollectorRegistry) -> None:
    """A URL never stored gets the breaker's rejection."""
    upstream = Upstream(httpx.Response(503))
    breaker = CircuitBreakerPolicy(minimum_calls=1)
    async with client(upstream, clock, registry, circuit_breaker=breaker) as c:
        await c.get(URL)
        with pytest.raises(CircuitOpenError):
            await c.get(URL)


async def test_answers_older_than_max_stale_are_not_served(clock: FakeClock, registry: CollectorRegistry) -> None:
    """Past max_stale the failure comes through."""
    upstream = Upstream(ok(), down())
    async with client(upstream, clock, registry, StaleCachePolicy(max_stale=60)) as c:
        await c.get(URL)
        clock.advance(60)
        assert (await c.get(URL)).extensions["resilient_http"].stale is True
        clock.advance(1)
        with pytest.raises(httpx.ConnectError):
            await c.get(URL)


async def test_stale_if_error_of_the_response_wins_over_max_stale(
    clock: FakeClock, registry: CollectorRegistry
) -> None:
    """``max-age=10, stale-if-error=20`` allows 30 s, even with max_stale at 300."""
    upstream = Upstream(ok(**{"cache-control": "max-age=10, stale-if-error=20"}), down())
    async with client(upstream, clock, registry, StaleCachePolicy(max_stale=300)) as c:
        await c.get(URL)
        clock.advance(30)
        assert (await c.get(URL)).extensions["resilient_http"].stale is True
        clock.advance(1)
        with pytest.raises(httpx.ConnectError):
            await c.get(URL)


async def test_the_responses_own_age_counts(clock: FakeClock, registry: CollectorRegistry) -> None:
    """An answer that arrived with ``Age: 50`` is 50 s old already."""
    upstream = Upstream(ok(age="50"), down())
    async with client(upstream, clock, registry, StaleCachePolicy(max_stale=60)) as c:
        await c.get(URL)
        clock.advance(5)
        response = await c.get(URL)
        assert response.headers["age"] == "55"
        clock.advance(6)
        with pytest.raises(httpx.ConnectError):
            await c.get(URL)


@pytest.mark.parametrize("directive", ["no-store", "no-cache", "must-revalidate", "private, no-store"])
async def test_responses_that_forbid_stale_use_are_never_served(
    directive: str, clock: FakeClock, registry: CollectorRegistry
) -> None:
    """``no-store``, ``no-cache`` and ``must-revalidate`` answers are never served stale."""
    upstream = Upstream(ok(**{"cache-control": directive}), down())
    async with client(upstream, clock, registry) as c:
        await c.get(URL)
        with pytest.raises(httpx.ConnectError):
            await c.get(URL)
    assert registry.get_sample_value("resilient_http_cache_entries", {"transport": "default", "host": HOST}) == 0


async def test_request_no_store_is_neither_stored_nor_answered(clock: FakeClock, registry: CollectorRegistry) -> None:
    """A request that says ``Cache-Control: no-store`` is not kept, and gets no stale answer."""
    upstream = Upstream(ok(), down())
    async with client(upstream, clock, registry) as c:
        await c.get(URL, headers={"cache-control": "no-store"})
        with pytest.raises(httpx.ConnectError):
            await c.get(URL)


async def test_other_credentials_never_see_an_entry(clock: FakeClock, registry: CollectorRegistry) -> None:
    """An answer given to one Authorization or Cookie value is never served to another, or to none."""
    upstream = Upstream(ok(b"alice's"), down())
    async with client(upstream, clock, registry) as c:
        await c.get(URL, headers={"authorization": "Bearer alice"})
        for headers in ({"authorization": "Bearer bob"}, {}, {"cookie": "session=alice"}):
            with pytest.raises(httpx.ConnectError):
                await c.get(URL, headers=headers)
        again = await c.get(URL, headers={"authorization": "Bearer alice"})
    assert again.content == b"alice's"


async def test_vary_is_honoured(clock: FakeClock, registry: CollectorRegistry) -> None:
    """An answer that varies by Accept-Language is served only for the same language."""
    upstream = Upstream(ok(b"bonjour", vary="Accept-Language"), ok(b"hello", vary="Accept-Language"), down())
    async with client(upstream, clock, registry) as c:
        await c.get(URL, headers={"accept-language": "fr"})
        await c.get(URL, headers={"accept-language": "en"})
        fr = await c.get(URL, headers={"accept-language": "fr"})
        en = await c.get(URL, headers={"accept-language": "en"})
        with pytest.raises(httpx.ConnectError):
            await c.get(URL, headers={"accept-language": "de"})
    assert (fr.content, en.content) == (b"bonjour", b"hello")


async def test_vary_star_is_not_stored(clock: FakeClock, registry: CollectorRegistry) -> None:
    """``Vary: *`` cannot be matched, so it is not kept."""
    upstream = Upstream(ok(vary="*"), down())
    async with client(upstream, clock, registry) as c:
        await c.get(URL)
        with pytest.raises(httpx.ConnectError):
            await c.get(URL)


async def test_only_get_and_head_are_kept_and_answered(clock: FakeClock, registry: CollectorRegistry) -> None:
    """A POST is never answered from the store, even for a stored URL."""
    upstream = Upstream(ok(), down())
    async with client(upstream, clock, registry) as c:
        await c.get(URL)
        with pytest.raises(httpx.ConnectError):
            await c.post(URL, content=b"x")


async def test_bodies_above_max_body_bytes_pass_through_unstored(clock: FakeClock, registry: CollectorRegistry) -> None:
    """A body larger than max_body_bytes reaches the caller whole and is not kept."""
    big = b"x" * 2000
    upstream = Upstream(ok(big), down())
    async with client(upstream, clock, registry, StaleCachePolicy(max_body_bytes=1000)) as c:
        assert (await c.get(URL)).content == big
        with pytest.raises(httpx.ConnectError):
            await c.get(URL)


class Chunks(httpx.AsyncByteStream):
    """An unsized, streamed body."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


async def test_streamed_bodies_are_kept_once_read_whole(clock: FakeClock, registry: CollectorRegistry) -> None:
    """An unsized body is copied while the caller reads it, and kept if it stayed under the limit."""
    upstream = Upstream(httpx.Response(200, stream=Chunks(b"ab", b"cd")), down())
    async with client(upstream, clock, registry) as c:
        assert (await c.get(URL)).content == b"abcd"
        assert (await c.get(URL)).content == b"abcd"


async def test_streamed_bodies_beyond_the_limit_pass_untouched(clock: FakeClock, registry: CollectorRegistry) -> None:
    """A streamed body that grows past max_body_bytes is passed through whole and not kept."""
    upstream = Upstream(httpx.Response(200, stream=Chunks(b"a" * 600, b"b" * 600)), down())
    async with client(upstream, clock, registry, StaleCachePolicy(max_body_bytes=1000)) as c:
        assert len((await c.get(URL)).content) == 1200
        with pytest.raises(httpx.ConnectError):
            await c.get(URL)


async def test_encoded_bodies_are_served_decoded_like_the_original(
    clock: FakeClock, registry: CollectorRegistry
) -> None:
    """The raw gzip bytes are kept with their Content-Encoding, so the stale answer decodes the same."""
    import gzip

    raw = gzip.compress(b'{"v": "zipped"}')
    upstream = Upstream(ok(raw, **{"content-encoding": "gzip"}), down())
    async with client(upstream, clock, registry) as c:
        assert (await c.get(URL)).json() == {"v": "zipped"}
        assert (await c.get(URL)).json() == {"v": "zipped"}


def urls(n: int) -> Iterator[str]:
    return (f"https://api.example/items/{i}" for i in range(n))


async def test_entries_per_host_are_bounded_least_recently_used_first(
    clock: FakeClock, registry: CollectorRegistry
) -> None:
    """Past max_entries the least recently used entry goes, and the gauges follow."""
    upstream = Upstream(ok(b"x"))
    async with client(upstream, clock, registry, StaleCachePolicy(max_entries=3)) as c:
        a, b, cc, d = list(urls(4))
        for url in (a, b, cc):
            await c.get(url)
        upstream.behaviours = [down()]
        await c.get(a)  # a is used again (answered stale): b is now the oldest
        upstream.behaviours = [ok(b"x")]
        await c.get(d)
        upstream.behaviours = [down()]
        for url in (a, cc, d):
            assert (await c.get(url)).extensions["resilient_http"].stale is True
        with pytest.raises(httpx.ConnectError):
            await c.get(b)
    assert registry.get_sample_value("resilient_http_cache_entries", {"transport": "default", "host": HOST}) == 3


async def test_bytes_are_bounded_per_host_and_across_hosts(clock: FakeClock, registry: CollectorRegistry) -> None:
    """max_bytes bounds one host's entries and all hosts' together."""
    body = b"x" * 400
    upstream = Upstream(ok(body))
    cache = StaleCachePolicy(max_bytes=1000, max_body_bytes=500)
    async with client(upstream, clock, registry, cache) as c:
        for host in ("a.example", "b.example", "c.example"):
            await c.get(f"https://{host}/item")
        total = sum(
            registry.get_sample_value("resilient_http_cache_bytes", {"transport": "default", "host": f"{h}:443"}) or 0
            for h in ("a.example", "b.example", "c.example")
        )
        assert 0 < total <= 1000
        upstream.behaviours = [down()]
        with pytest.raises(httpx.ConnectError):
            await c.get("https://a.example/item")  # the oldest, evicted to make room
        assert (await c.get("https://c.example/item")).content == body


async def test_head_answers_are_kept_apart_from_get(clock: FakeClock, registry: CollectorRegistry) -> None:
    """A stored HEAD answers a HEAD; it does not answer a GET with an empty body."""
    upstream = Upstream(httpx.Response(200, headers={"content-length": "5"}), down())
    async with client(upstream, clock, registry) as c:
        await c.head(URL)
        assert (await c.head(URL)).extensions["resilient_http"].stale is True
        with pytest.raises(httpx.ConnectError):
            await c.get(URL)


async def test_the_newest_good_answer_replaces_the_stored_one(clock: FakeClock, registry: CollectorRegistry) -> None:
    """Each good answer replaces the last one for that URL, and the byte gauge follows its size."""
    upstream = Upstream(ok(b"old"), ok(b"newer"), down())
    async with client(upstream, clock, registry) as c:
        await c.get(URL)
        before = registry.get_sample_value("resilient_http_cache_bytes", {"transport": "default", "host": HOST})
        await c.get(URL)
        after = registry.get_sample_value("resilient_http_cache_bytes", {"transport": "default", "host": HOST})
        stale = await c.get(URL)
    assert stale.content == b"newer"
    assert before is not None and after == before + 2
    assert registry.get_sample_value("resilient_http_cache_entries", {"transport": "default", "host": HOST}) == 1


async def test_the_same_answer_again_restarts_its_age(clock: FakeClock, registry: CollectorRegistry) -> None:
    """An unchanged answer received again counts as received now: its age starts over."""
    upstream = Upstream(ok(b"same"), ok(b"same"), down())
    async with client(upstream, clock, registry, StaleCachePolicy(max_stale=60)) as c:
        await c.get(URL)
        clock.advance(100)
        await c.get(URL)
        clock.advance(10)
        stale = await c.get(URL)
    assert stale.content == b"same"
    assert stale.headers["age"] == "10"
