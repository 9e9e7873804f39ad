"""A client's network settings survive the resilience layers: TLS, HTTP/2, pool limits, proxies, mounts.

Each setting is tried three ways against real peers on 127.0.0.1
(:mod:`settings_peers`: an origin with its own CA, speaking HTTP/1.1 and
HTTP/2, and a forward proxy): through a bare ``httpx.AsyncClient`` (what
the user expects), through :class:`ResilientClient`, and through
``httpx.AsyncClient(transport=ResilientTransport(<settings>))``. The three
must behave the same. Proxies from the environment are the client's
business: a custom transport turns them off in httpx, so they are compared
between the bare client and :class:`ResilientClient` only.
"""

from __future__ import annotations

import asyncio
import inspect
import ssl
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import trustme
from flaky_server import FlakyServer, delay, free_port, hang, respond
from prometheus_client import CollectorRegistry
from settings_peers import ForwardProxy, Origin

from resilient_http import ConfigurationError, Policy, ResilientClient, ResilientTransport, TimeoutPolicy, call_info

# A refused handshake is a connect error: fail at once rather than after backoff.
NO_RETRY = Policy(retry=None)
KINDS = ("bare", "client", "transport")
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "SSL_CERT_FILE", "SSL_CERT_DIR")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy or CA settings leak in from the machine running the tests."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def trusting(ca: trustme.CA) -> ssl.SSLContext:
    """A client context that trusts the test's CA, and nothing else."""
    return ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())


def server_context(ca: trustme.CA, *, client_certs: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "origin.test", "other.test").configure_cert(context)
    context.set_alpn_protocols(["h2", "http/1.1"])
    if client_certs:
        context.verify_mode = ssl.CERT_REQUIRED
        ca.configure_trust(context)
    return context


@pytest.fixture
async def origin(ca: trustme.CA) -> AsyncIterator[Origin]:
    async with Origin(server_context(ca)) as running:
        yield running


@pytest.fixture
async def plain() -> AsyncIterator[Origin]:
    async with Origin() as running:
        yield running


@pytest.fixture
async def proxy() -> AsyncIterator[ForwardProxy]:
    async with ForwardProxy({"origin.test": "127.0.0.1", "other.test": "127.0.0.1"}) as running:
        yield running


def make(kind: str, registry: CollectorRegistry, **settings: Any) -> httpx.AsyncClient:
    """A client with ``settings``: bare, a ResilientClient, or a bare client over a ResilientTransport with them."""
    if kind == "bare":
        return httpx.AsyncClient(**settings)
    if kind == "client":
        return ResilientClient(default=NO_RETRY, registry=registry, **settings)
    return httpx.AsyncClient(transport=ResilientTransport(default=NO_RETRY, registry=registry, **settings))


def host_of_call(kind: str, response: httpx.Response) -> str | None:
    """The host the layers saw (None for a bare client, which has no layers)."""
    info = call_info(response)
    assert (info is None) == (kind == "bare")
    return None if info is None else info.host


# -- TLS -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_a_custom_ca_is_trusted(
    kind: str, registry: CollectorRegistry, origin: Origin, trusting: ssl.SSLContext
) -> None:
    """verify=<context with the test's CA> reaches the TLS origin."""
    async with make(kind, registry, verify=trusting) as client:
        response = await client.get(origin.url("/ca"))
    assert (response.status_code, response.text) == (200, "HTTP/1.1 GET /ca")


@pytest.mark.parametrize("kind", KINDS)
async def test_the_default_trust_store_refuses_an_unknown_ca(
    kind: str, registry: CollectorRegistry, origin: Origin
) -> None:
    """Without verify=, an origin signed by an unknown CA fails the handshake, as with a bare client."""
    async with make(kind, registry) as client:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.get(origin.url())
    assert origin.seen == []


@pytest.mark.parametrize("kind", KINDS)
async def test_verify_false_accepts_an_unknown_ca(kind: str, registry: CollectorRegistry, origin: Origin) -> None:
    """verify=False skips verification, as with a bare client."""
    async with make(kind, registry, verify=False) as client:
        response = await client.get(origin.url("/unverified"))
    assert response.text == "HTTP/1.1 GET /unverified"


@pytest.mark.parametrize("trust_env", [True, False])
@pytest.mark.parametrize("kind", KINDS)
async def test_ssl_cert_file_is_read_only_with_trust_env(
    kind: str,
    trust_env: bool,
    registry: CollectorRegistry,
    origin: Origin,
    ca: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SSL_CERT_FILE names the trusted CAs when trust_env is true, and is ignored when it is false."""
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    async with make(kind, registry, trust_env=trust_env) as client:
        if trust_env:
            assert (await client.get(origin.url())).status_code == 200
        else:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.get(origin.url())


@pytest.mark.parametrize("kind", KINDS)
async def test_a_client_certificate_is_presented(
    kind: str, registry: CollectorRegistry, ca: trustme.CA, trusting: ssl.SSLContext, tmp_path: Path
) -> None:
    """cert= is presented to an origin that demands one (httpx deprecates cert= for verify=<context>)."""
    ca.issue_cert("client.test").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
    async with Origin(server_context(ca, client_certs=True)) as demanding:
        async with make(kind, registry, verify=ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())) as anon:
            with pytest.raises(httpx.TransportError):
                await anon.get(demanding.url())
        with pytest.warns(DeprecationWarning, match="cert"):
            client = make(kind, registry, verify=trusting, cert=str(tmp_path / "client.pem"))
        async with client:
            response = await client.get(demanding.url("/mtls"))
    assert response.text == "HTTP/1.1 GET /mtls"


# -- HTTP/2 --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "protocol"),
    [({}, "HTTP/1.1"), ({"http2": True}, "HTTP/2"), ({"http1": False, "http2": True}, "HTTP/2")],
)
@pytest.mark.parametrize("kind", KINDS)
async def test_http2_is_spoken_when_asked(
    kind: str,
    settings: dict[str, bool],
    protocol: str,
    registry: CollectorRegistry,
    origin: Origin,
    trusting: ssl.SSLContext,
) -> None:
    """http1/http2 choose the protocol ALPN offers: the origin sees HTTP/2 only when asked."""
    async with make(kind, registry, verify=trusting, **settings) as client:
        responses = await asyncio.gather(*(client.get(origin.url(f"/{n}")) for n in range(3)))
    assert {response.http_version for response in responses} == {protocol}
    assert {seen.protocol for seen in origin.seen} == {protocol}


def test_http2_without_h2_fails_when_made(monkeypatch: pytest.MonkeyPatch, registry: CollectorRegistry) -> None:
    """http2=True without the h2 package raises ImportError at construction, not at the first request."""
    monkeypatch.setitem(sys.modules, "h2", None)
    with pytest.raises(ImportError, match="h2"):
        ResilientTransport(http2=True, registry=registry)
    with pytest.raises(ImportError, match="h2"):
        ResilientClient(http2=True, registry=registry)


# -- Pool limits ---------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_keep_alive_limits_are_honoured(kind: str, registry: CollectorRegistry) -> None:
    """limits=Limits(max_keepalive_connections=0) opens a connection per request; the default reuses one."""
    async with FlakyServer() as server:
        server.default("/", respond(200))
        for limits, connections in ((None, 1), (httpx.Limits(max_keepalive_connections=0), 2)):
            before = server.connections_accepted
            async with make(kind, registry, **({} if limits is None else {"limits": limits})) as client:
                for _ in range(2):
                    assert (await client.get(server.url())).status_code == 200
            assert server.connections_accepted - before == connections


@pytest.mark.parametrize(("limits", "connections"), [(None, 2), (httpx.Limits(max_connections=1), 1)])
@pytest.mark.parametrize("kind", KINDS)
async def test_a_connection_cap_is_honoured(
    kind: str, limits: httpx.Limits | None, connections: int, registry: CollectorRegistry
) -> None:
    """limits=Limits(max_connections=1) makes two concurrent calls wait for one connection; without it they do not."""
    async with FlakyServer() as server:
        server.default("/slow", delay(0.2))
        async with make(kind, registry, **({} if limits is None else {"limits": limits})) as client:
            await asyncio.gather(client.get(server.url("/slow")), client.get(server.url("/slow")))
        assert (server.connections_accepted, server.connections_peak) == (connections, connections)


async def test_without_limits_a_hung_host_cannot_take_every_connection(registry: CollectorRegistry) -> None:
    """ResilientClient keeps the default inner transport's rule: no cap across hosts unless limits= sets one.

    A bare client's pool holds at most 100 connections across all hosts, as
    many as a host's default bulkhead lets in: 100 calls stuck on one host
    would leave none for another.
    """
    policy = Policy(timeout=TimeoutPolicy(attempt=20, total=20), retry=None)
    async with FlakyServer() as hung, FlakyServer() as healthy:
        hung.default("/", hang())
        healthy.default("/", respond(200))
        async with ResilientClient(default=policy, registry=registry) as client, anyio.create_task_group() as stuck:
            for _ in range(100):
                stuck.start_soon(client.get, hung.url())
            with anyio.fail_after(10):
                await hung.wait_for_requests(100)
            with anyio.fail_after(5):
                assert (await client.get(healthy.url())).status_code == 200
            stuck.cancel_scope.cancel()


# -- Proxies -------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_a_proxy_tunnels_https_and_the_layers_see_the_target(
    kind: str, registry: CollectorRegistry, origin: Origin, proxy: ForwardProxy, trusting: ssl.SSLContext
) -> None:
    """proxy= sends HTTPS through a CONNECT tunnel; the host the layers key their state on is the target."""
    async with make(kind, registry, proxy=proxy.url, verify=trusting) as client:
        response = await client.get(origin.url("/tunnelled", host="origin.test"))
    assert response.text == "HTTP/1.1 GET /tunnelled"
    assert proxy.seen == [("CONNECT", f"origin.test:{origin.port}")]
    assert host_of_call(kind, response) in (None, f"origin.test:{origin.port}")


@pytest.mark.parametrize("kind", KINDS)
async def test_a_proxy_forwards_plain_http(
    kind: str, registry: CollectorRegistry, plain: Origin, proxy: ForwardProxy
) -> None:
    """proxy= sends plain HTTP to the proxy as an absolute URI."""
    async with make(kind, registry, proxy=proxy.url) as client:
        response = await client.get(plain.url("/forwarded", host="origin.test"))
    assert response.text == "HTTP/1.1 GET /forwarded"
    assert proxy.seen == [("GET", f"http://origin.test:{plain.port}/forwarded")]
    assert host_of_call(kind, response) in (None, f"origin.test:{plain.port}")


@pytest.mark.parametrize("kind", KINDS)
async def test_http2_through_a_proxy_with_a_custom_ca(
    kind: str, registry: CollectorRegistry, origin: Origin, proxy: ForwardProxy, trusting: ssl.SSLContext
) -> None:
    """http2=True, verify=<CA> and proxy= together: HTTP/2 inside the tunnel, the test's CA trusted."""
    async with make(kind, registry, proxy=proxy.url, verify=trusting, http2=True) as client:
        response = await client.get(origin.url("/h2", host="origin.test"))
    assert (response.http_version, response.text) == ("HTTP/2", "HTTP/2 GET /h2")
    assert proxy.seen == [("CONNECT", f"origin.test:{origin.port}")]


@pytest.mark.parametrize("kind", ["bare", "client"])
async def test_proxies_from_the_environment_route_as_for_a_bare_client(
    kind: str,
    registry: CollectorRegistry,
    origin: Origin,
    plain: Origin,
    proxy: ForwardProxy,
    trusting: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HTTPS_PROXY and HTTP_PROXY are used, and NO_PROXY hosts are reached directly."""
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    async with make(kind, registry, verify=trusting) as client:
        tunnelled = await client.get(origin.url("/a", host="origin.test"))
        forwarded = await client.get(plain.url("/b", host="origin.test"))
        direct = await client.get(origin.url("/c"))
    assert (tunnelled.text, forwarded.text, direct.text) == ("HTTP/1.1 GET /a", "HTTP/1.1 GET /b", "HTTP/1.1 GET /c")
    assert proxy.seen == [("CONNECT", f"origin.test:{origin.port}"), ("GET", f"http://origin.test:{plain.port}/b")]
    assert [host_of_call(kind, r) for r in (tunnelled, direct)] in (
        [None, None],
        [f"origin.test:{origin.port}", f"127.0.0.1:{origin.port}"],
    )


@pytest.mark.parametrize("kind", ["bare", "client"])
async def test_trust_env_false_ignores_proxies_from_the_environment(
    kind: str,
    registry: CollectorRegistry,
    origin: Origin,
    proxy: ForwardProxy,
    trusting: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With trust_env=False, HTTPS_PROXY is not used."""
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    async with make(kind, registry, verify=trusting, trust_env=False) as client:
        assert (await client.get(origin.url())).status_code == 200
    assert proxy.seen == []


@pytest.mark.parametrize("kind", ["bare", "client"])
async def test_an_explicit_proxy_wins_over_the_environment(
    kind: str,
    registry: CollectorRegistry,
    origin: Origin,
    proxy: ForwardProxy,
    trusting: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """proxy= is used even where HTTPS_PROXY names another proxy (here one nobody listens on)."""
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{free_port()}")
    async with make(kind, registry, verify=trusting, proxy=proxy.url) as client:
        assert (await client.get(origin.url())).status_code == 200
    assert proxy.seen == [("CONNECT", f"127.0.0.1:{origin.port}")]


async def test_a_bare_client_over_a_resilient_transport_ignores_proxies_from_the_environment(
    registry: CollectorRegistry,
    origin: Origin,
    proxy: ForwardProxy,
    trusting: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """httpx turns environment proxies off for any transport= (the reason ResilientClient exists)."""
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    async with make("transport", registry, verify=trusting) as client:
        assert (await client.get(origin.url())).status_code == 200
    assert proxy.seen == []


async def test_each_target_behind_one_proxy_gets_its_own_policy(
    registry: CollectorRegistry,
    origin: Origin,
    proxy: ForwardProxy,
    trusting: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Hosts reached through the same proxy are told apart: each gets its own pattern's policy."""
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    policies = {"other.test": Policy(retry=None, circuit_breaker=None)}
    async with ResilientClient(policies, default=NO_RETRY, registry=registry, verify=trusting) as client:
        first = await client.get(origin.url(host="origin.test"))
        second = await client.get(origin.url(host="other.test"))
    one, other = call_info(first), call_info(second)
    assert one is not None and other is not None
    assert (one.host, one.circuit_state) == (f"origin.test:{origin.port}", "closed")
    assert (other.host, other.circuit_state) == (f"other.test:{origin.port}", None)
    assert [method for method, _ in proxy.seen] == ["CONNECT", "CONNECT"]


# -- Mounts --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bare", "client"])
async def test_mounts_choose_the_network_and_the_layers_wrap_every_route(
    kind: str, registry: CollectorRegistry, origin: Origin, proxy: ForwardProxy, trusting: ssl.SSLContext
) -> None:
    """A mounted transport answers its pattern; a pattern mounted to None goes direct despite proxy=."""
    mocked = httpx.MockTransport(lambda request: httpx.Response(200, text="mocked"))
    mounts = {"all://mocked.test": mocked, f"all://127.0.0.1:{origin.port}": None}
    async with make(kind, registry, verify=trusting, proxy=proxy.url, mounts=mounts) as client:
        from_mount = await client.get("http://mocked.test/")
        direct = await client.get(origin.url())
        proxied = await client.get(origin.url(host="origin.test"))
    assert (from_mount.text, direct.status_code, proxied.status_code) == ("mocked", 200, 200)
    assert proxy.seen == [("CONNECT", f"origin.test:{origin.port}")]
    assert [host_of_call(kind, r) for r in (from_mount, direct)] in (
        [None, None],
        ["mocked.test:80", f"127.0.0.1:{origin.port}"],
    )


class Recording(httpx.AsyncBaseTransport):
    """A transport that counts how often it is closed, and may fail to close."""

    def __init__(self, fails: bool = False) -> None:
        self.closed = 0
        self.fails = fails

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200)

    async def aclose(self) -> None:
        self.closed += 1
        if self.fails:
            raise RuntimeError("cannot close")


async def test_closing_the_client_closes_each_route_once(registry: CollectorRegistry) -> None:
    """Every mounted transport is closed once, however many patterns it serves, even when one fails to close."""
    one, failing, other = Recording(), Recording(fails=True), Recording()
    mounts = {"all://a.test": one, "all://b.test": failing, "all://c.test": other, "all://d.test": one}
    client = ResilientClient(registry=registry, mounts=mounts)
    with pytest.raises(RuntimeError, match="cannot close"):
        await client.aclose()
    assert (one.closed, failing.closed, other.closed) == (1, 1, 1)


async def test_leaving_the_client_closes_each_route(registry: CollectorRegistry) -> None:
    """async with ResilientClient(...) closes its mounted transports on the way out."""
    one, other = Recording(), Recording()
    async with ResilientClient(registry=registry, mounts={"all://a.test": one, "https://": other}) as client:
        assert (await client.get("https://a.test/")).status_code == 200
    assert (one.closed, other.closed) == (1, 1)


# -- Construction --------------------------------------------------------------


def test_the_transport_takes_every_setting_of_httpxs_own() -> None:
    """ResilientTransport accepts each of httpx.AsyncHTTPTransport's settings, with the same default but limits."""
    ours = inspect.signature(ResilientTransport).parameters
    for name, parameter in inspect.signature(httpx.AsyncHTTPTransport).parameters.items():
        assert name in ours, name
        assert ours[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        if name != "limits":
            assert ours[name].default == parameter.default, name
    assert ours["limits"].default is None


def test_the_client_takes_every_setting_of_httpxs_own() -> None:
    """ResilientClient accepts each of httpx.AsyncClient's arguments except transport."""
    ours = inspect.signature(ResilientClient).parameters
    theirs = set(inspect.signature(httpx.AsyncClient).parameters) - {"transport"}
    explicit = {"verify", "cert", "http1", "http2", "proxy", "mounts", "limits", "trust_env"}
    assert explicit <= theirs and explicit <= set(ours)
    assert any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in ours.values())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("verify", False),
        ("http2", True),
        ("http1", False),
        ("limits", httpx.Limits(max_connections=3)),
        ("proxy", "http://127.0.0.1:3128"),
        ("trust_env", False),
        ("retries", 2),
        ("uds", "/tmp/socket"),
    ],
)
def test_network_settings_beside_an_inner_transport_are_refused(
    field: str, value: Any, registry: CollectorRegistry
) -> None:
    """A network setting would be lost on a given inner transport: ConfigurationError names it."""
    inner = httpx.MockTransport(lambda request: httpx.Response(200))
    with pytest.raises(ConfigurationError, match=f"^{field}: configures the default inner") as raised:
        ResilientTransport(inner=inner, registry=registry, **{field: value})
    assert (raised.value.field, raised.value.value) == (field, value)


def test_the_client_refuses_a_transport(registry: CollectorRegistry) -> None:
    """ResilientClient makes its own transport; transport= is refused with a pointer to inner=."""
    with pytest.raises(ConfigurationError, match=r"^transport: .*inner="):
        ResilientClient(registry=registry, transport=httpx.MockTransport(lambda request: httpx.Response(200)))


@pytest.fixture
def policy_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "policies.toml"
    path.write_text('[default]\nretry = false\n\n[hosts."plain.test"]\ncircuit_breaker = false\n')
    yield path


async def test_a_client_from_a_policy_file(registry: CollectorRegistry, policy_file: Path) -> None:
    """ResilientClient.from_file takes its policies from TOML, and every other argument as the constructor does."""
    network = httpx.MockTransport(lambda request: httpx.Response(200))
    async with ResilientClient.from_file(policy_file, registry=registry, mounts={"all://": network}) as client:
        plain = call_info(await client.get("https://plain.test/"))
        other = call_info(await client.get("https://other.test/"))
    assert plain is not None and other is not None
    assert (plain.circuit_state, other.circuit_state) == (None, "closed")


async def test_the_client_passes_on_every_transport_setting(tmp_path: Path) -> None:
    """name, on_event and the policy file reach the client's transport, which can then reload the file."""
    from resilient_http.events import Event, RetryScheduled

    answers = iter([503, 200])
    seen: list[Event] = []
    registry = CollectorRegistry()
    policies = tmp_path / "policies.toml"
    policies.write_text('[hosts."api.example.com".retry]\nattempts = 2\nbackoff = 0.001\n')
    mock = httpx.MockTransport(lambda request: httpx.Response(next(answers)))
    client = ResilientClient.from_file(
        policies, name="settings", on_event=seen.append, registry=registry, mounts={"all://": mock}
    )
    async with client:
        response = await client.get("https://api.example.com/")
        assert response.status_code == 200
        assert [type(event) for event in seen] == [RetryScheduled]
        labels = {"transport": "settings", "server_address": "api.example.com", "server_port": "443", "outcome": "2xx"}
        assert registry.get_sample_value("resilient_http_requests_total", labels) == 1.0
        transport = client.resilient_transport
        policies.write_text('[hosts."api.example.com".retry]\nattempts = 3\n')
        transport.reload()
        retry = transport.policy_for("api.example.com").retry
        assert retry is not None and retry.attempts == 3
