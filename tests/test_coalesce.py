"""Request coalescing: identical calls in flight at once share one upstream call, and nothing leaks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path

import anyio
import httpx
import pytest
from conftest import HOST, Harness, Script, only, where
from prometheus_client import CollectorRegistry

from resilient_http import (
    CircuitOpenError,
    CoalescePolicy,
    ConfigurationError,
    DeadlineExceededError,
    Policy,
    ResilientTransport,
    StaleCachePolicy,
    TimeoutPolicy,
    call_info,
)
from resilient_http._pipeline import ORDER
from resilient_http._toml import load_policies
from resilient_http.layers import coalesce  # the package's attribute: the httpx2 flavour's module under httpx2
from resilient_http.testing import FakeClock

COALESCE = only(coalesce=CoalescePolicy())


class Gate:
    """A handler that holds every request until ``open()``, then answers with ``answer(request, n)``."""

    def __init__(self, answer: Callable[[httpx.Request, int], httpx.Response] | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.opened = anyio.Event()
        self._answer = answer or (lambda request, n: httpx.Response(200, content=b"shared body"))

    def open(self) -> None:
        self.opened.set()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        number = len(self.requests)
        await self.opened.wait()
        return self._answer(request, number)


def layer_of(client: httpx.AsyncClient) -> coalesce.Coalesce:
    transport = client._transport
    assert isinstance(transport, ResilientTransport)
    (host,) = transport._hosts.entries.values()
    layer: coalesce.Coalesce = host.layers["coalesce"]
    return layer


async def together(calls: Sequence[Callable[[], Awaitable[httpx.Response]]]) -> list[httpx.Response | BaseException]:
    """Run ``calls`` concurrently; each result or exception in order."""
    results: list[httpx.Response | BaseException] = [BaseException("not run")] * len(calls)

    async def run(i: int) -> None:
        try:
            results[i] = await calls[i]()
        except Exception as exc:
            results[i] = exc

    async with anyio.create_task_group() as tg:
        for i in range(len(calls)):
            tg.start_soon(run, i)
    return results


Calls = Sequence[Callable[[], Awaitable[httpx.Response]]]


async def gated(client: httpx.AsyncClient, gate: Gate, calls: Calls) -> list[httpx.Response | BaseException]:
    """``calls`` at once; the gate opens once every one of them has sent or joined."""
    results: list[httpx.Response | BaseException] = []

    async def run() -> None:
        results.extend(await together(calls))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await anyio.wait_all_tasks_blocked()
        gate.open()
    return results


def ok(results: list[httpx.Response | BaseException]) -> list[httpx.Response]:
    """The results, every one a response."""
    responses = [r for r in results if isinstance(r, httpx.Response)]
    assert len(responses) == len(results), results
    return responses


def get(client: httpx.AsyncClient, path: str = "/", **kwargs: object) -> Callable[[], Awaitable[httpx.Response]]:
    return lambda: client.get(path, **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------- sharing


async def test_identical_concurrent_gets_share_one_upstream_call(harness: Harness) -> None:
    """Fifty identical GETs make one request; every caller gets the answer, all but the leader coalesced."""
    gate = Gate()
    client = harness.client(gate, COALESCE)
    responses = await gated(client, gate, [get(client)] * 50)
    assert len(gate.requests) == 1
    assert all(isinstance(r, httpx.Response) and (r.status_code, r.content) == (200, b"shared body") for r in responses)
    infos = [call_info(r) for r in responses if isinstance(r, httpx.Response)]
    assert sorted(info.coalesced for info in infos if info is not None) == [False] + [True] * 49
    assert all(info is not None and info.attempts == (0 if info.coalesced else 1) for info in infos)
    assert harness.value("resilient_http_coalesced_total", result="response") == 49
    assert harness.value("resilient_http_attempts_total", outcome="2xx") == 1
    assert harness.value("resilient_http_requests_total", outcome="2xx") == 50


async def test_each_follower_gets_a_response_of_its_own(harness: Harness) -> None:
    """Own Response, own headers, own stream and own request: changing one changes no other."""
    gate = Gate(lambda request, n: httpx.Response(200, headers={"X-A": "1"}, content=b"body"))
    client = harness.client(gate, COALESCE)
    requests = [client.build_request("GET", "/", headers={"X-Trace": str(i)}) for i in range(3)]
    responses = ok(await gated(client, gate, [partial(client.send, r) for r in requests]))
    assert len({id(r.headers) for r in responses}) == 3 and len({id(r.stream) for r in responses}) == 3
    responses[1].headers["X-A"] = "changed"
    assert [r.headers["X-A"] for r in responses] == ["1", "changed", "1"]
    assert [r.request for r in responses] == requests
    assert [r.content for r in responses] == [b"body"] * 3


async def test_calls_that_differ_in_the_key_are_not_coalesced(harness: Harness) -> None:
    """Path, query, Host header, method, credentials, cookies and named identity headers each keep calls apart."""
    gate = Gate()
    client = harness.client(gate, only(coalesce=CoalescePolicy(identity_headers=("X-Api-Key",))))
    calls = [
        get(client, "/a"),
        get(client, "/b"),
        get(client, "/a?page=2"),
        get(client, "/a", headers={"Host": "other.example"}),
        lambda: client.head("/a"),
        get(client, "/a", headers={"Authorization": "Bearer alice"}),
        get(client, "/a", headers={"Authorization": "Bearer bob"}),
        get(client, "/a", headers={"Cookie": "session=1"}),
        get(client, "/a", headers={"X-Api-Key": "tenant-1"}),
        get(client, "/a", headers={"X-Api-Key": "tenant-2"}),
    ]
    await gated(client, gate, calls)
    assert len(gate.requests) == len(calls)
    assert harness.value("resilient_http_coalesced_total", result="response") == 0


async def test_one_upstream_call_per_credential(harness: Harness) -> None:
    """Thirty calls with three distinct Authorization values make three requests, each answered to its own."""
    gate = Gate(lambda request, n: httpx.Response(200, content=request.headers["Authorization"].encode()))
    client = harness.client(gate, COALESCE)
    tokens = [f"Bearer {i % 3}" for i in range(30)]
    responses = await gated(client, gate, [get(client, headers={"Authorization": t}) for t in tokens])
    assert len(gate.requests) == 3
    assert [r.content for r in responses if isinstance(r, httpx.Response)] == [t.encode() for t in tokens]


async def test_posts_and_gets_with_a_body_are_never_coalesced(harness: Harness) -> None:
    """Only bodiless GET and HEAD share: a POST or a GET with content goes out every time."""
    gate = Gate()
    client = harness.client(gate, COALESCE)
    calls = [lambda: client.post("/", content=b"x")] * 2 + [lambda: client.request("GET", "/", content=b"q")] * 2
    await gated(client, gate, calls)
    assert len(gate.requests) == 4


async def test_a_call_can_turn_coalescing_off(harness: Harness) -> None:
    """extensions {"coalesce": None} sends the call itself, beside a flight for the same key."""
    gate = Gate()
    client = harness.client(gate, COALESCE)
    off = {"resilient_http": {"coalesce": None}}
    await gated(client, gate, [get(client), get(client), get(client, extensions=off)])
    assert len(gate.requests) == 2


async def test_an_answer_is_shared_only_with_callers_who_agree_on_what_it_varies_on(harness: Harness) -> None:
    """Vary: Accept-Language: the French follower shares the French answer; the German one asks for its own."""
    vary = {"Vary": "Accept-Language"}
    gate = Gate(lambda r, n: httpx.Response(200, headers=vary, content=r.headers["accept-language"].encode()))
    client = harness.client(gate, COALESCE)
    languages = ["fr", "fr", "de", "fr"]
    responses = await gated(client, gate, [get(client, headers={"Accept-Language": lang}) for lang in languages])
    assert [r.content for r in responses if isinstance(r, httpx.Response)] == [b"fr", b"fr", b"de", b"fr"]
    assert len(gate.requests) == 2
    assert harness.value("resilient_http_coalesced_total", result="response") == 2
    assert harness.value("resilient_http_coalesced_total", result="unshared") == 1


@pytest.mark.parametrize(
    ("headers", "content"),
    [
        ({"Vary": "*"}, b"x"),
        ({"Set-Cookie": "session=leader"}, b"x"),
        ({}, b"x" * 101),
    ],
    ids=["vary-star", "set-cookie", "too-big"],
)
async def test_answers_that_must_not_be_shared_send_each_follower_on_its_own(
    harness: Harness, headers: dict[str, str], content: bytes
) -> None:
    """Vary: *, a Set-Cookie or a body above max_body_bytes: each follower makes its own request."""
    gate = Gate(lambda r, n: httpx.Response(200, headers=headers, content=content))
    client = harness.client(gate, only(coalesce=CoalescePolicy(max_body_bytes=100)))
    responses = await gated(client, gate, [get(client)] * 4)
    assert len(gate.requests) == 4
    assert all(isinstance(r, httpx.Response) and r.content == content for r in responses)
    assert harness.value("resilient_http_coalesced_total", result="unshared") == 3


class Endless(httpx.AsyncByteStream):
    """A streamed body of ten chunks, as a download without Content-Length."""

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        for _ in range(10):
            yield b"chunk"


async def test_a_streamed_answer_stays_the_leaders_and_followers_go_on_their_own(harness: Harness) -> None:
    """A body not in memory is never shared: the leader streams it, and each follower makes its own request."""
    gate = Gate(lambda r, n: httpx.Response(200, stream=Endless()))
    client = harness.client(gate, COALESCE)
    responses = await gated(client, gate, [get(client)] * 3)
    assert len(gate.requests) == 3
    assert all(isinstance(r, httpx.Response) and r.content == b"chunk" * 10 for r in responses)


# ---------------------------------------------------------------- errors


async def test_followers_get_their_own_copy_of_the_leaders_error(harness: Harness) -> None:
    """One ConnectError upstream: each caller raises a ConnectError object of its own, with its own request."""
    gate = Gate()

    async def refuse(request: httpx.Request) -> httpx.Response:
        await gate(request)
        raise httpx.ConnectError("refused", request=request)

    client = harness.client(refuse, COALESCE)
    requests = [client.build_request("GET", "/", headers={"X-N": str(i)}) for i in range(4)]
    errors = await gated(client, gate, [partial(client.send, r) for r in requests])
    assert len(gate.requests) == 1
    assert all(type(e) is httpx.ConnectError and str(e) == "refused" for e in errors)
    assert len({id(e) for e in errors}) == 4
    assert [e.request for e in errors if isinstance(e, httpx.ConnectError)] == requests
    infos = [call_info(e) for e in errors if isinstance(e, BaseException)]
    assert sorted(i.coalesced for i in infos if i is not None) == [False, True, True, True]
    assert harness.value("resilient_http_coalesced_total", result="error") == 3


def test_a_copied_error_keeps_its_class_and_attributes() -> None:
    """Errors whose __init__ takes keyword-only arguments copy too: kind, timeout, host, retry_after and notes."""
    old, new = httpx.Request("GET", "https://a.example/"), httpx.Request("GET", "https://a.example/")
    timeout = DeadlineExceededError("attempt timeout", kind="attempt", timeout=2.0, request=old)
    timeout.add_note("from the leader")
    copy = coalesce.copy_error(timeout, new)
    assert isinstance(copy, DeadlineExceededError) and copy is not timeout
    assert (copy.kind, copy.timeout, copy.args, copy.request, copy.__notes__) == (
        "attempt",
        2.0,
        timeout.args,
        new,
        ["from the leader"],
    )
    assert copy.__notes__ is not timeout.__notes__ and timeout.request is old
    refused = coalesce.copy_error(CircuitOpenError("open", host="h:443", retry_after=3.0), new)
    assert isinstance(refused, CircuitOpenError) and (refused.host, refused.retry_after) == ("h:443", 3.0)


async def test_a_leader_out_of_its_own_time_hands_the_call_to_a_follower(harness: Harness) -> None:
    """The leader's total deadline is not the followers': they go again, one leads, and all get the answer."""
    gate = Gate()

    async def first_times_out(request: httpx.Request) -> httpx.Response:
        await gate(request)
        if len(gate.requests) == 1:
            raise DeadlineExceededError("total timeout", kind="total", timeout=1.0, request=request)
        return httpx.Response(200, content=b"second")

    client = harness.client(first_times_out, COALESCE)
    results = await gated(client, gate, [get(client)] * 4)
    assert isinstance(results[0], DeadlineExceededError)
    assert [r.content for r in results[1:] if isinstance(r, httpx.Response)] == [b"second"] * 3
    assert len(gate.requests) == 2


# ---------------------------------------------------------------- cancellation


async def leader_cancelled(registry: CollectorRegistry) -> None:
    """The leader's caller cancels; the upstream call is made again for the followers, and nothing is left."""
    calls: list[httpx.Request] = []
    second = anyio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            await anyio.sleep_forever()
        await second.wait()
        return httpx.Response(200, content=b"for the followers")

    transport = ResilientTransport(
        default=COALESCE, inner=httpx.MockTransport(handler), registry=registry, clock=FakeClock()
    )
    async with httpx.AsyncClient(transport=transport, base_url="https://api.example.com") as client:
        answers: list[bytes] = []
        leader = anyio.CancelScope()

        async def lead() -> None:
            with leader:
                await client.get("/")

        async def follow() -> None:
            answers.append((await client.get("/")).content)

        async with anyio.create_task_group() as tg:
            tg.cancel_scope.deadline = anyio.current_time() + 10  # a follower left waiting fails, not hangs
            tg.start_soon(lead)
            await anyio.wait_all_tasks_blocked()
            for _ in range(3):
                tg.start_soon(follow)
            await anyio.wait_all_tasks_blocked()
            leader.cancel()
            await anyio.wait_all_tasks_blocked()
            second.set()
        assert leader.cancelled_caught
        assert (answers, len(calls)) == ([b"for the followers"] * 3, 2)
        assert layer_of(client)._flights == {}
        # Read while the transport is open: a closed transport's series leave the registry.
        assert (
            registry.get_sample_value(
                "resilient_http_coalesced_total", {"transport": "default", **where(HOST), "result": "response"}
            )
            == 2
        )
        assert (
            registry.get_sample_value(
                "resilient_http_attempts_total", {"transport": "default", **where(HOST), "outcome": "cancelled"}
            )
            == 1
        )


async def test_a_cancelled_leader_hands_the_call_to_its_followers(registry: CollectorRegistry) -> None:
    """Under asyncio: the followers are not failed; one of them leads a new upstream call."""
    await leader_cancelled(registry)


def test_under_trio_a_cancelled_leader_hands_the_call_to_its_followers() -> None:
    """The same under trio."""
    anyio.run(leader_cancelled, CollectorRegistry(), backend="trio")


async def follower_cancelled() -> None:
    """A follower's caller cancels: the leader and the other follower still get the one answer."""
    gate = Gate()
    transport = ResilientTransport(
        default=COALESCE, inner=httpx.MockTransport(gate), registry=CollectorRegistry(), clock=FakeClock()
    )
    async with httpx.AsyncClient(transport=transport, base_url="https://api.example.com") as client:
        answers: list[bytes] = []
        quitter = anyio.CancelScope()

        async def call() -> None:
            answers.append((await client.get("/")).content)

        async def quit() -> None:
            with quitter:
                await client.get("/")

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(quit)
            tg.start_soon(call)
            await anyio.wait_all_tasks_blocked()
            quitter.cancel()
            await anyio.wait_all_tasks_blocked()
            gate.open()
        assert quitter.cancelled_caught
        assert (answers, len(gate.requests)) == ([b"shared body"] * 2, 1)
        assert layer_of(client)._flights == {}


async def test_a_cancelled_follower_leaves_the_leader_alone() -> None:
    """Under asyncio."""
    await follower_cancelled()


def test_under_trio_a_cancelled_follower_leaves_the_leader_alone() -> None:
    """Under trio."""
    anyio.run(follower_cancelled, backend="trio")


class SettableClock(FakeClock):
    """A fake clock that may also be set back, to give calls any deadlines a test needs."""

    def set(self, now: float) -> None:
        self._now = now


async def test_a_follower_waits_no_longer_than_its_own_deadline(registry: CollectorRegistry) -> None:
    """After a hand-off, a follower whose deadline comes first times out alone; the new leader carries on."""
    clock = SettableClock()
    gate = Gate()

    async def handler(request: httpx.Request) -> httpx.Response:
        if not gate.requests:
            gate.requests.append(request)
            await anyio.sleep_forever()
        return await gate(request)

    policy = only(coalesce=CoalescePolicy(), timeout=TimeoutPolicy(attempt=None, total=10))
    transport = ResilientTransport(default=policy, inner=httpx.MockTransport(handler), registry=registry, clock=clock)
    async with httpx.AsyncClient(transport=transport, base_url="https://api.example.com") as client:
        results: dict[str, object] = {}
        leader = anyio.CancelScope()

        async def call(name: str, at: float) -> None:
            clock.set(at)
            try:
                results[name] = (await client.get("/")).content
            except DeadlineExceededError as exc:
                results[name] = exc.kind

        async def lead() -> None:
            with leader:
                await call("leader", 1000.0)

        async with anyio.create_task_group() as tg:
            tg.cancel_scope.deadline = anyio.current_time() + 10  # a follower left waiting fails, not hangs
            tg.start_soon(lead)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(call, "late", 1005.0)  # deadline 1015: leads after the hand-off
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(call, "early", 1001.0)  # deadline 1011
            await anyio.wait_all_tasks_blocked()
            clock.set(1010.95)
            leader.cancel()
            await anyio.sleep(0.2)  # "early" has 0.05 s left, on the event loop's clock
            assert results == {"early": "total"}  # and "late" is still waiting for its answer
            gate.open()
        assert results == {"early": "total", "late": b"shared body"}
        assert layer_of(client)._flights == {}


# ---------------------------------------------------------------- the stale cache outside


async def test_a_follower_falls_back_on_the_stale_cache_by_itself(harness: Harness) -> None:
    """A shared 503 reaches each follower's own stale cache: every caller gets the stale answer."""
    answers = iter([httpx.Response(200, content=b"old"), httpx.Response(503)])
    gate = Gate(lambda r, n: next(answers))
    gate.open()
    client = harness.client(gate, only(coalesce=CoalescePolicy(), stale_cache=StaleCachePolicy()))
    await client.get("/")
    gate.opened = anyio.Event()
    responses = await gated(client, gate, [get(client)] * 3)
    assert len(gate.requests) == 2
    assert all(isinstance(r, httpx.Response) and (r.status_code, r.content) == (200, b"old") for r in responses)
    assert harness.value("resilient_http_stale_served_total", reason="server_error") == 3


# ---------------------------------------------------------------- configuration


def test_coalescing_sits_inside_the_stale_cache_and_before_every_layer_that_costs() -> None:
    """Followers take no token, breaker count or slot; each still has its own stale fallback."""
    names = [name for name, _ in ORDER]
    assert names[:3] == ["stale_cache", "coalesce", "rate_limit"]


def test_coalescing_is_off_by_default() -> None:
    """Policy() does not coalesce; it is opt-in per host."""
    assert Policy().coalesce is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_body_bytes": -1}, "CoalescePolicy.max_body_bytes"),
        ({"max_body_bytes": 1.5}, "CoalescePolicy.max_body_bytes"),
        ({"max_body_bytes": 1 << 41}, "CoalescePolicy.max_body_bytes"),
        ({"identity_headers": "X-Api-Key"}, "CoalescePolicy.identity_headers"),
        ({"identity_headers": ["bad header"]}, "CoalescePolicy.identity_headers"),
    ],
)
def test_bad_coalesce_settings_are_refused_by_name(kwargs: dict[str, object], field: str) -> None:
    """Each bad value raises ConfigurationError naming the field and the value."""
    with pytest.raises(ConfigurationError) as raised:
        CoalescePolicy(**kwargs)  # type: ignore[arg-type]
    assert raised.value.field == field
    with pytest.raises(ConfigurationError, match=r"Policy\.coalesce"):
        Policy(coalesce=StaleCachePolicy())  # type: ignore[arg-type]


def test_identity_headers_are_kept_lower_case_and_sorted() -> None:
    """Header names are case-insensitive: one spelling is kept."""
    assert CoalescePolicy(identity_headers=["X-Tenant", "x-api-key", "X-API-Key"]).identity_headers == (
        "x-api-key",
        "x-tenant",
    )


def test_coalescing_is_configured_from_toml(tmp_path: Path) -> None:
    """``coalesce = true`` or a table turns it on per host; unknown keys are named with their line."""
    path = tmp_path / "policies.toml"
    path.write_text(
        '[default]\ncoalesce = true\n\n[hosts."api.example.com".coalesce]\n'
        'max_body_bytes = 4096\nidentity_headers = ["X-Api-Key"]\n\n[hosts."other.example"]\ncoalesce = false\n'
    )
    policies, default = load_policies(path)
    assert default.coalesce == CoalescePolicy()
    assert policies["api.example.com"].coalesce == CoalescePolicy(max_body_bytes=4096, identity_headers=("x-api-key",))
    assert policies["other.example"].coalesce is None
    path.write_text("[default.coalesce]\nmax_bodybytes = 1\n")
    with pytest.raises(ConfigurationError, match=r"line 2.*default\.coalesce\.max_bodybytes"):
        load_policies(path)


async def test_a_lone_call_pays_for_no_event(harness: Harness) -> None:
    """Without followers, no flight outlives its call and the answer is returned as it came."""
    client = harness.client(Script(200), COALESCE)
    for _ in range(3):
        response = await client.get("/")
        assert call_info(response) is not None and not call_info(response).coalesced  # type: ignore[union-attr]
    assert layer_of(client)._flights == {}
    assert harness.value("resilient_http_coalesced_total", result="response") == 0
