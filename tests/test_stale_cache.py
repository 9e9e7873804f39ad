"""Stale-cache fallback: what is kept, when it is served, to whom, and how much memory it may take."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest
from conftest import LeftOpen, where
from prometheus_client import CollectorRegistry

from resilient_http import (
    CircuitBreakerPolicy,
    CircuitOpenError,
    ConfigurationError,
    Policy,
    ResilientTransport,
    StaleCachePolicy,
    _headers,
)
from resilient_http._toml import parse_policies
from resilient_http.layers import stale_cache
from resilient_http.layers.stale_store import Store
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


#: How the modules read httpx at import, before a test turns the fast reads off.
FAST_READS = (_headers.TRIPLES, stale_cache._SEES, stale_cache._BODY_KEPT)


@pytest.fixture(autouse=True, params=["httpx internals", "public API"])
def reading(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs twice: with the fast reads of httpx's own fields, URL and body, and with its public API only."""
    if request.param == "public API":
        monkeypatch.setattr(_headers, "TRIPLES", False)
        monkeypatch.setattr(stale_cache, "TRIPLES", False)
        monkeypatch.setattr(stale_cache, "_SEES", False)
        monkeypatch.setattr(stale_cache, "_BODY_KEPT", False)
    return str(request.param)


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
            "resilient_http_stale_served_total", {"transport": "default", **where(HOST), "reason": "error"}
        )
        == 1
    )
    assert (
        registry.get_sample_value(
            "resilient_http_requests_total", {"transport": "default", **where(HOST), "outcome": "stale"}
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
        "resilient_http_stale_served_total", {"transport": "default", **where(HOST), "reason": "server_error"}
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
        "resilient_http_stale_served_total", {"transport": "default", **where(HOST), "reason": "circuit_open"}
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
    assert registry.get_sample_value("resilient_http_cache_entries", {"transport": "default", **where(HOST)}) == 0


async def test_request_no_store_is_neither_stored_nor_answered(clock: FakeClock, registry: CollectorRegistry) -> None:
    """A request that says ``Cache-Control: no-store`` is not kept, and gets no stale answer."""
    upstream = Upstream(ok(), down())
    async with client(upstream, clock, registry) as c:
        await c.get(URL, headers={"cache-control": "no-store"})
        with pytest.raises(httpx.ConnectError):
            await c.get(URL)


@pytest.mark.parametrize("directive", ["private", 'private="set-cookie"', "public, private", "private, max-age=60"])
async def test_private_answers_are_never_kept(directive: str, clock: FakeClock, registry: CollectorRegistry) -> None:
    """A shared cache never keeps ``private`` answers, qualified or not, whatever else they say."""
    upstream = Upstream(ok(**{"cache-control": directive}), down())
    async with client(upstream, clock, registry) as c:
        await c.get(URL)
        with pytest.raises(httpx.ConnectError):
            await c.get(URL)
    assert registry.get_sample_value("resilient_http_cache_entries", {"transport": "default", **where(HOST)}) == 0


@pytest.mark.parametrize("credential", [{"authorization": "Bearer alice"}, {"cookie": "session=alice"}])
@pytest.mark.parametrize("directive", [None, "max-age=60", "no-transform"])
async def test_answers_to_credentials_are_not_kept_unless_the_answer_is_shareable(
    credential: dict[str, str], directive: str | None, clock: FakeClock, registry: CollectorRegistry
) -> None:
    """An answer to Authorization or Cookie that does not say public/s-maxage/must-revalidate is kept for nobody."""
    headers = {} if directive is None else {"cache-control": directive}
    upstream = Upstream(ok(b"alice's", **headers), down())
    async with client(upstream, clock, registry) as c:
        await c.get(URL, headers=credential)
        for caller in (credential, {"authorization": "Bearer bob"}, {}):
            with pytest.raises(httpx.ConnectError):
                await c.get(URL, headers=caller)
    assert registry.get_sample_value("resilient_http_cache_entries", {"transport": "default", **where(HOST)}) == 0


@pytest.mark.parametrize("credential", [{"authorization": "Bearer alice"}, {"cookie": "session=alice"}])
@pytest.mark.parametrize("directive", ["public", "s-maxage=30", "must-revalidate, max-age=30"])
async def test_a_shareable_answer_to_credentials_is_kept_for_everyone(
    credential: dict[str, str], directive: str, clock: FakeClock, registry: CollectorRegistry
) -> None:
    """``public``, ``s-maxage``, ``must-revalidate`` let any caller have it: other credentials, and none."""
    upstream = Upstream(ok(b"catalogue", **{"cache-control": directive}), down())
    async with client(upstream, clock, registry) as c:
        await c.get(URL, headers=credential)
        for caller in (credential, {"authorization": "Bearer bob"}, {}):
            assert (await c.get(URL, headers=caller)).content == b"catalogue"


async def test_a_request_with_credentials_may_get_the_answer_kept_for_everyone(
    clock: FakeClock, registry: CollectorRegistry
) -> None:
    """What the origin gives a caller without credentials is no secret: it answers one with credentials too."""
    upstream = Upstream(ok(b"for anyone"), down())
    async with client(upstream, clock, registry) as c:
        await c.get(URL)
        stale = await c.get(URL, headers={"authorization": "Bearer alice"})
    assert (stale.content, stale.extensions["resilient_http"].stale) == (b"for anyone", True)


async def test_an_answer_to_credentials_does_not_renew_the_shared_copy(
    clock: FakeClock, registry: CollectorRegistry
) -> None:
    """The same bytes given to a caller with credentials are not storable, so they do not make the shared copy young."""
    upstream = Upstream(ok(b"same"), ok(b"same"), down())
    async with client(upstream, clock, registry, StaleCachePolicy(max_stale=60)) as c:
        await c.get(URL)
        clock.advance(100)
        await c.get(URL, headers={"authorization": "Bearer alice"})
        clock.advance(10)
        with pytest.raises(httpx.ConnectError):
            await c.get(URL)


@pytest.mark.parametrize("directive", ["s-maxage=30", "must-revalidate, max-age=30", "proxy-revalidate, max-age=30"])
async def test_answers_that_forbid_stale_use_are_served_only_while_fresh(
    directive: str, clock: FakeClock, registry: CollectorRegistry
) -> None:
    """``s-maxage``, ``must-revalidate``, ``proxy-revalidate``: served only while younger than their lifetime."""
    upstream = Upstream(ok(b"fresh", **{"cache-control": f"{directive}, stale-if-error=600"}), down())
    async with client(upstream, clock, registry) as c:
        await c.get(URL)
        clock.advance(29.5)
        assert (await c.get(URL)).content == b"fresh"
        clock.advance(0.5)  # 30 s old: stale, and stale use is forbidden
        with pytest.raises(httpx.ConnectError):
            await c.get(URL)


async def test_s_maxage_wins_over_max_age_in_a_shared_cache(clock: FakeClock, registry: CollectorRegistry) -> None:
    """``max-age=100, s-maxage=10``: a shared cache's lifetime is 10 s."""
    upstream = Upstream(ok(**{"cache-control": "max-age=100, s-maxage=10"}), down())
    async with client(upstream, clock, registry) as c:
        await c.get(URL)
        clock.advance(10)
        with pytest.raises(httpx.ConnectError):
            await c.get(URL)


async def test_an_answer_already_too_old_is_not_kept(clock: FakeClock, registry: CollectorRegistry) -> None:
    """``Age: 400`` against max_stale 300: it could never be served, so it takes no memory."""
    upstream = Upstream(ok(age="400"), down())
    async with client(upstream, clock, registry, StaleCachePolicy(max_stale=300)) as c:
        await c.get(URL)
        assert registry.get_sample_value("resilient_http_cache_entries", {"transport": "default", **where(HOST)}) == 0
        with pytest.raises(httpx.ConnectError):
            await c.get(URL)


async def test_an_answer_that_sets_a_cookie_is_not_kept(clock: FakeClock, registry: CollectorRegistry) -> None:
    """``Set-Cookie`` may start one caller's session: without ``public`` the answer is kept for nobody."""
    upstream = Upstream(ok(b"welcome alice", **{"set-cookie": "session=alice"}), down())
    async with client(upstream, clock, registry) as c:
        await c.get(URL)
        with pytest.raises(httpx.ConnectError):
            await c.get(URL)
    assert registry.get_sample_value("resilient_http_cache_entries", {"transport": "default", **where(HOST)}) == 0


async def test_set_cookie_is_never_replayed(clock: FakeClock, registry: CollectorRegistry) -> None:
    """A public answer that sets a cookie is kept without the cookie: another caller never receives it."""
    upstream = Upstream(ok(b"catalogue", **{"cache-control": "public", "set-cookie": "session=alice"}), down())
    transport = ResilientTransport(
        default=Policy(retry=None, circuit_breaker=None, bulkhead=None, stale_cache=StaleCachePolicy()),
        inner=httpx.MockTransport(upstream),
        registry=registry,
        clock=clock,
    )
    async with httpx.AsyncClient(transport=transport) as alice, httpx.AsyncClient(transport=transport) as bob:
        assert (await alice.get(URL)).headers["set-cookie"] == "session=alice"
        stale = await bob.get(URL)
        assert stale.content == b"catalogue"
        assert "set-cookie" not in stale.headers
        assert not bob.cookies


async def test_virtual_hosts_behind_one_address_are_kept_apart(clock: FakeClock, registry: CollectorRegistry) -> None:
    """The ``Host`` header is part of the key: one address serving two sites never mixes their answers."""
    upstream = Upstream(ok(b"site a"), down())
    async with client(upstream, clock, registry) as c:
        await c.get(URL, headers={"host": "a.example"})
        with pytest.raises(httpx.ConnectError):
            await c.get(URL, headers={"host": "b.example"})
        assert (await c.get(URL, headers={"host": "A.Example"})).content == b"site a"


IDENTITY = StaleCachePolicy(identity_headers=("X-Api-Key",))


async def test_identity_headers_keep_answers_per_identity(clock: FakeClock, registry: CollectorRegistry) -> None:
    """With X-Api-Key named, each key gets its own answers back, and no other's; no key is an identity too."""
    upstream = Upstream(ok(b"tenant a"), ok(b"tenant b"), ok(b"anonymous"), down())
    async with client(upstream, clock, registry, IDENTITY) as c:
        await c.get(URL, headers={"x-api-key": "a"})
        await c.get(URL, headers={"x-api-key": "b"})
        await c.get(URL)
        answers = [
            (await c.get(URL, headers=headers)).content for headers in ({"x-api-key": "a"}, {"x-api-key": "b"}, {})
        ]
        with pytest.raises(httpx.ConnectError):
            await c.get(URL, headers={"x-api-key": "c"})
    assert answers == [b"tenant a", b"tenant b", b"anonymous"]


async def test_a_named_credential_keeps_answers_per_credential(clock: FakeClock, registry: CollectorRegistry) -> None:
    """Naming Authorization keeps non-public answers per token; ``private`` ones still never."""
    policy = StaleCachePolicy(identity_headers=("authorization",))
    upstream = Upstream(ok(b"alice's"), ok(b"secret", **{"cache-control": "private"}), down())
    async with client(upstream, clock, registry, policy) as c:
        await c.get(URL, headers={"authorization": "Bearer alice"})
        await c.get(URL, headers={"authorization": "Bearer bob"})
        assert (await c.get(URL, headers={"authorization": "Bearer alice"})).content == b"alice's"
        for caller in ({"authorization": "Bearer bob"}, {}):
            with pytest.raises(httpx.ConnectError):
                await c.get(URL, headers=caller)


async def test_a_named_cookie_keeps_answers_per_cookie(clock: FakeClock, registry: CollectorRegistry) -> None:
    """Naming Cookie keeps answers per cookie, and one that refreshes the cookie is kept without Set-Cookie."""
    policy = StaleCachePolicy(identity_headers=("Cookie",))
    upstream = Upstream(ok(b"alice's cart", **{"set-cookie": "session=alice2"}), down())
    async with client(upstream, clock, registry, policy) as c:
        await c.get(URL, headers={"cookie": "session=alice"})
        c.cookies.clear()
        stale = await c.get(URL, headers={"cookie": "session=alice"})
        assert (stale.content, stale.headers.get("set-cookie")) == (b"alice's cart", None)
        with pytest.raises(httpx.ConnectError):
            await c.get(URL, headers={"cookie": "session=bob"})


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({}, {"x-a": ""}),
        ({}, {"x-a": "None"}),
        ({"x-a": "1", "x-b": "2"}, {"x-a": "1\x002"}),
        ({"x-a": "1", "x-b": "2"}, {"x-a": "1, 2"}),
        ({"x-a": "1", "x-b": "2"}, {"x-a": "1|2"}),
        ({"x-a": "1"}, {"x-b": "1"}),
    ],
)
async def test_identity_keys_never_collide(
    first: dict[str, str], second: dict[str, str], clock: FakeClock, registry: CollectorRegistry
) -> None:
    """Absent, empty and values with separators in them are all different identities."""
    policy = StaleCachePolicy(identity_headers=("x-a", "x-b"))
    upstream = Upstream(ok(b"first's"), down())
    async with client(upstream, clock, registry, policy) as c:
        await c.get(URL, headers=first)
        with pytest.raises(httpx.ConnectError):
            await c.get(URL, headers=second)
        assert (await c.get(URL, headers=first)).content == b"first's"


@pytest.mark.parametrize(
    "value", ["X-Api-Key", ["x api key"], ["x-api-key\n"], [""], [b"x-api-key"], ["clé"], 42, None]
)
def test_identity_headers_must_be_header_names(value: object) -> None:
    """A bare string, a non-token or a non-string is refused, naming the field."""
    with pytest.raises(ConfigurationError, match=r"StaleCachePolicy\.identity_headers"):
        StaleCachePolicy(identity_headers=value)  # type: ignore[arg-type]


def test_identity_headers_are_read_from_toml() -> None:
    """``identity_headers = [...]`` in a stale_cache table, names normalised to lower case."""
    policies, default = parse_policies(
        {"default": {"stale_cache": {"identity_headers": ["X-Api-Key", "X-Tenant"]}}, "hosts": {"a.example": {}}}
    )
    assert default.stale_cache is not None
    assert default.stale_cache.identity_headers == ("x-api-key", "x-tenant")
    assert policies["a.example"].stale_cache == default.stale_cache


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
    assert registry.get_sample_value("resilient_http_cache_entries", {"transport": "default", **where(HOST)}) == 3


async def test_bytes_are_bounded_per_host_and_across_hosts(clock: FakeClock, registry: CollectorRegistry) -> None:
    """max_bytes bounds one host's entries and all hosts' together."""
    body = b"x" * 400
    upstream = Upstream(ok(body))
    cache = StaleCachePolicy(max_bytes=1000, max_body_bytes=500)
    async with client(upstream, clock, registry, cache) as c:
        for host in ("a.example", "b.example", "c.example"):
            await c.get(f"https://{host}/item")
        total = sum(
            registry.get_sample_value("resilient_http_cache_bytes", {"transport": "default", **where(f"{h}:443")}) or 0
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
        before = registry.get_sample_value("resilient_http_cache_bytes", {"transport": "default", **where(HOST)})
        await c.get(URL)
        after = registry.get_sample_value("resilient_http_cache_bytes", {"transport": "default", **where(HOST)})
        stale = await c.get(URL)
    assert stale.content == b"newer"
    assert before is not None and after == before + 2
    assert registry.get_sample_value("resilient_http_cache_entries", {"transport": "default", **where(HOST)}) == 1


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


def test_the_installed_httpx_is_read_the_fast_way() -> None:
    """httpx keeps header fields, the parsed URL and in-memory bodies where the stale cache reads them on every call."""
    assert FAST_READS == (True, True, True)


async def test_a_no_store_request_right_after_the_same_request_is_not_kept(
    clock: FakeClock, registry: CollectorRegistry
) -> None:
    """The request just seen, now saying no-store, is read again: its answer does not replace the kept one."""
    upstream = Upstream(ok(b"kept"), ok(b"not kept"), down())
    async with client(upstream, clock, registry) as c:
        await c.get(URL)
        await c.get(URL, headers={"cache-control": "no-store"})
        assert (await c.get(URL)).content == b"kept"


async def test_a_request_with_credentials_right_after_the_same_one_without_is_read_again(
    clock: FakeClock, registry: CollectorRegistry
) -> None:
    """The answer to a request that adds Authorization to the one just seen is not taken for everyone's."""
    upstream = Upstream(ok(b"for anyone"), ok(b"alice's"), down())
    async with client(upstream, clock, registry) as c:
        await c.get(URL)
        await c.get(URL, headers={"authorization": "Bearer alice"})
        assert (await c.get(URL)).content == b"for anyone"


async def test_requests_that_differ_only_in_their_query_are_kept_apart(
    clock: FakeClock, registry: CollectorRegistry
) -> None:
    """``?page=1`` and ``?page=2`` are two resources, asked one after the other."""
    upstream = Upstream(ok(b"page 1"), down())
    async with client(upstream, clock, registry) as c:
        await c.get(URL, params={"page": "1"})
        with pytest.raises(httpx.ConnectError):
            await c.get(URL, params={"page": "2"})
        with pytest.raises(httpx.ConnectError):
            await c.get(URL)
        assert (await c.get(URL, params={"page": "1"})).content == b"page 1"


async def test_the_same_body_with_other_headers_replaces_the_kept_answer(
    clock: FakeClock, registry: CollectorRegistry
) -> None:
    """An answer is the same only if its headers are too: one with a new ETag is kept in place of the old."""
    upstream = Upstream(ok(b"same", etag='"1"'), ok(b"same", etag='"2"'), down())
    async with client(upstream, clock, registry) as c:
        await c.get(URL)
        await c.get(URL)
        assert (await c.get(URL)).headers["etag"] == '"2"'


async def test_an_answer_again_without_its_age_header_is_as_old_as_it_says(
    clock: FakeClock, registry: CollectorRegistry
) -> None:
    """The same answer without the Age it first came with is new from the origin: its age starts at zero."""
    upstream = Upstream(ok(b"same", age="50"), ok(b"same"), down())
    async with client(upstream, clock, registry, StaleCachePolicy(max_stale=60)) as c:
        await c.get(URL)
        clock.advance(5)
        await c.get(URL)
        clock.advance(10)
        assert (await c.get(URL)).headers["age"] == "10"


async def test_a_reload_that_stops_naming_an_identity_header_shares_answers_at_once(
    clock: FakeClock, registry: CollectorRegistry
) -> None:
    """Once X-Api-Key is no longer named, an answer to the request just seen again stands in for any key."""
    upstream = Upstream(ok(b"anonymous"), ok(b"for everyone"), down())
    transport = transport_for(upstream, clock, registry, default=IDENTITY)
    async with httpx.AsyncClient(transport=LeftOpen(transport)) as c:
        await c.get(URL)
        transport.update_policies(default=Policy(stale_cache=StaleCachePolicy(), retry=None, circuit_breaker=None))
        await c.get(URL)
        assert (await c.get(URL, headers={"x-api-key": "a"})).content == b"for everyone"


def store_of(transport: ResilientTransport) -> Store:
    """The transport's stale-cache store (what the bookkeeping tests look into)."""
    store: Store = transport._shared["stale_cache"]
    return store


def transport_for(
    upstream: Handler,
    clock: FakeClock,
    registry: CollectorRegistry,
    *,
    max_hosts: int = 1000,
    **caches: StaleCachePolicy,
) -> ResilientTransport:
    """A transport whose ``default`` host policy and named hosts (``a_example`` → ``a.example``) have stale caches."""
    off: dict[str, object] = {"retry": None, "circuit_breaker": None, "bulkhead": None}
    default = caches.pop("default", StaleCachePolicy())
    return ResilientTransport(
        {name.replace("_", "."): Policy(stale_cache=cache, **off) for name, cache in caches.items()},  # type: ignore[arg-type]
        default=Policy(stale_cache=default, **off),  # type: ignore[arg-type]
        inner=httpx.MockTransport(upstream),
        registry=registry,
        clock=clock,
        max_hosts=max_hosts,
    )


async def test_a_small_policy_evicts_only_its_own_entries(clock: FakeClock, registry: CollectorRegistry) -> None:
    """A host allowed 2 entries, filling up, never takes the entries of a host allowed 100."""
    upstream = Upstream(ok(b"x"))
    transport = transport_for(
        upstream,
        clock,
        registry,
        default=StaleCachePolicy(max_entries=100),
        small_example=StaleCachePolicy(max_entries=2),
    )
    async with httpx.AsyncClient(transport=LeftOpen(transport)) as c:
        for i in range(5):
            await c.get(f"https://big.example/{i}")
        for i in range(10):
            await c.get(f"https://small.example/{i}")
        upstream.behaviours = [down()]
        for i in range(5):
            assert (await c.get(f"https://big.example/{i}")).extensions["resilient_http"].stale is True
    assert (
        registry.get_sample_value("resilient_http_cache_entries", {"transport": "default", **where("big.example:443")})
        == 5
    )
    assert (
        registry.get_sample_value(
            "resilient_http_cache_entries", {"transport": "default", **where("small.example:443")}
        )
        == 2
    )


async def test_all_hosts_together_are_bounded_by_the_largest_policy(
    clock: FakeClock, registry: CollectorRegistry
) -> None:
    """Past the largest policy's max_entries across hosts, the least recently used entry of any host goes."""
    upstream = Upstream(ok(b"x"))
    transport = transport_for(
        upstream,
        clock,
        registry,
        default=StaleCachePolicy(max_entries=4),
        small_example=StaleCachePolicy(max_entries=2),
    )
    async with httpx.AsyncClient(transport=transport) as c:
        await c.get("https://small.example/0")
        for i in range(4):
            await c.get(f"https://big.example/{i}")
    assert len(store_of(transport).entries) == 4
    assert "small.example:443" not in store_of(transport).shelves


async def test_a_hosts_bookkeeping_leaves_with_its_last_entry(clock: FakeClock, registry: CollectorRegistry) -> None:
    """Evicted by other hosts, or found too old, a host's last entry takes its shelf along: nothing per host remains."""
    upstream = Upstream(ok(b"x"))
    transport = transport_for(upstream, clock, registry, default=StaleCachePolicy(max_entries=2, max_stale=60))
    async with httpx.AsyncClient(transport=LeftOpen(transport)) as c:
        for host in ("a", "b", "c", "d"):
            await c.get(f"https://{host}.example/")
        store = store_of(transport)
        assert sorted(store.shelves) == ["c.example:443", "d.example:443"]
        clock.advance(61)
        upstream.behaviours = [down()]
        for host in ("c", "d"):
            with pytest.raises(httpx.ConnectError):
                await c.get(f"https://{host}.example/")
    assert (store.shelves, store.entries, store.by_key, store.total_bytes) == ({}, {}, {}, 0)
    assert (
        registry.get_sample_value("resilient_http_cache_entries", {"transport": "default", **where("d.example:443")})
        == 0
    )


async def test_a_host_made_again_reports_the_entries_it_still_has(
    clock: FakeClock, registry: CollectorRegistry
) -> None:
    """After the host table evicted a host, its entries survive, and its new gauges count them at once."""
    upstream = Upstream(ok(b"x"))
    transport = transport_for(upstream, clock, registry, max_hosts=1)
    async with httpx.AsyncClient(transport=LeftOpen(transport)) as c:
        await c.get("https://a.example/")
        await c.get("https://b.example/")  # evicts a.example's host state and its series
        upstream.behaviours = [down()]
        assert (await c.get("https://a.example/")).extensions["resilient_http"].stale is True
    assert (
        registry.get_sample_value("resilient_http_cache_entries", {"transport": "default", **where("a.example:443")})
        == 1
    )
