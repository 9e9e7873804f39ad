"""Host patterns and per-host state: the most specific pattern wins, state is per host:port, memory is bounded."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest
from conftest import Harness, Script, only
from prometheus_client import CollectorRegistry

from resilient_http import (
    BulkheadFullError,
    BulkheadPolicy,
    CircuitBreakerPolicy,
    CircuitOpenError,
    ConfigurationError,
    Policy,
    ResilientTransport,
    RetryPolicy,
)

HOST_PORT = Policy(retry=RetryPolicy(attempts=2))
HOST = Policy(retry=RetryPolicy(attempts=3))
WILDCARD = Policy(retry=RetryPolicy(attempts=4))
WILDCARD_PORT = Policy(retry=RetryPolicy(attempts=5))
LONG_WILDCARD = Policy(retry=RetryPolicy(attempts=6))
DEFAULT = Policy(retry=RetryPolicy(attempts=7))

POLICIES = {
    "api.example.com:8443": HOST_PORT,
    "api.example.com": HOST,
    "*.example.com": WILDCARD,
    "*.example.com:8443": WILDCARD_PORT,
    "*.eu.example.com": LONG_WILDCARD,
}


def _transport(policies: dict[str, Policy] | None = None, default: Policy | None = DEFAULT) -> ResilientTransport:
    return ResilientTransport(
        POLICIES if policies is None else policies,
        default=default,
        inner=httpx.MockTransport(lambda request: httpx.Response(200)),
        registry=CollectorRegistry(),
    )


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("api.example.com", 8443, HOST_PORT),
        ("api.example.com", 443, HOST),
        ("api.example.com", 80, HOST),
        ("www.example.com", 443, WILDCARD),
        ("a.b.c.example.com", 443, WILDCARD),
        ("www.example.com", 8443, WILDCARD_PORT),
        ("api.eu.example.com", 443, LONG_WILDCARD),
        ("api.eu.example.com", 8443, LONG_WILDCARD),
        ("example.com", 443, DEFAULT),
        ("example.com", 8443, DEFAULT),
        ("example.org", 443, DEFAULT),
        ("notexample.com", 443, DEFAULT),
        ("api.example.com.evil.org", 443, DEFAULT),
    ],
)
def test_the_most_specific_pattern_wins(host: str, port: int, expected: Policy) -> None:
    """host:port beats host, host beats any wildcard, the longest wildcard wins, then the default."""
    assert _transport().policy_for(host, port) is expected


def test_a_wildcard_does_not_match_the_bare_domain() -> None:
    """`*.example.com` is for subdomains only: example.com itself gets the default."""
    transport = _transport({"*.example.com": WILDCARD})
    assert transport.policy_for("example.com") is DEFAULT
    assert transport.policy_for("x.example.com") is WILDCARD


def test_patterns_and_hosts_match_without_regard_to_case() -> None:
    """Host names are case-insensitive, in patterns and in lookups."""
    transport = _transport({"API.Example.COM": HOST, "*.Internal.Example": WILDCARD})
    assert transport.policy_for("api.example.com") is HOST
    assert transport.policy_for("Api.EXAMPLE.com") is HOST
    assert transport.policy_for("db.internal.example") is WILDCARD


def test_ip_addresses_are_patterns_too() -> None:
    """IPv4 and bracketed IPv6 addresses, with or without a port, are valid patterns."""
    transport = _transport({"10.0.0.1": HOST, "[::1]:8080": HOST_PORT, "10.0.0.2:9000": WILDCARD})
    assert transport.policy_for("10.0.0.1", 80) is HOST
    assert transport.policy_for("::1", 8080) is HOST_PORT
    assert transport.policy_for("::1", 8081) is DEFAULT
    assert transport.policy_for("10.0.0.2", 9000) is WILDCARD


def test_without_a_default_unmatched_hosts_get_policy() -> None:
    """Hosts no pattern matches get Policy() when no default is given."""
    assert _transport({}, default=None).policy_for("example.org") == Policy()


@pytest.mark.parametrize(
    "pattern",
    [
        "",
        "*",
        "*.",
        "api.*.example.com",
        "*.*.example.com",
        "**.example.com",
        "api.example.com:http",
        "api.example.com:",
        "api.example.com:0",
        "api.example.com:65536",
        ":443",
        "api.example.com/v1",
        "https://api.example.com/",
        "api example.com",
        "[::1]x",
    ],
)
def test_bad_patterns_raise(pattern: str) -> None:
    """A key that is not host, host:port or *.domain is refused when the transport is built, naming it."""
    with pytest.raises(ConfigurationError) as caught:
        _transport({pattern: HOST})
    assert repr(pattern) in str(caught.value)


@pytest.mark.parametrize(
    ("policies", "default"),
    [({1: HOST}, None), ({"api.example.com": RetryPolicy()}, None), ({}, RetryPolicy())],
    ids=["non-string pattern", "non-policy value", "non-policy default"],
)
def test_bad_policy_tables_raise(policies: Any, default: Any) -> None:
    """Patterns must be strings and policies must be Policy objects."""
    with pytest.raises(ConfigurationError):
        ResilientTransport(policies, default=default, inner=httpx.MockTransport(lambda r: httpx.Response(200)))


@pytest.mark.parametrize("max_hosts", [0, -1, True, 2.0, "10"])
def test_max_hosts_must_be_a_positive_whole_number(max_hosts: Any) -> None:
    """max_hosts below 1 or not an integer is refused."""
    with pytest.raises(ConfigurationError, match="max_hosts"):
        ResilientTransport(inner=httpx.MockTransport(lambda r: httpx.Response(200)), max_hosts=max_hosts)


async def test_calls_get_the_policy_of_their_host(harness: Harness) -> None:
    """A call is handled by the policy its URL's host and port resolve to."""
    script = Script(503)
    policies = {
        "api.example.com": only(retry=RetryPolicy(attempts=2, budget=None)),
        "*.example.com:8443": only(retry=RetryPolicy(attempts=3, budget=None)),
    }
    client = harness.client(script, only(), policies=policies)
    expectations = [
        ("https://api.example.com/", 2),
        ("https://x.example.com:8443/", 3),
        ("https://x.example.com/", 1),
        ("http://api.example.com:8080/", 2),
    ]
    for url, attempts in expectations:
        before = script.calls
        await client.get(url)
        assert script.calls - before == attempts, url


def _tripping_breaker() -> Policy:
    return only(circuit_breaker=CircuitBreakerPolicy(minimum_calls=1, failure_ratio=1.0))


async def test_hosts_matching_one_wildcard_get_separate_breakers(harness: Harness) -> None:
    """State is per host, never per pattern: opening one host's breaker leaves its sibling working."""
    script = Script(lambda request: httpx.Response(503 if request.url.host == "a.example.com" else 200))
    client = harness.client(script, only(), policies={"*.example.com": _tripping_breaker()})
    assert (await client.get("https://a.example.com/")).status_code == 503
    with pytest.raises(CircuitOpenError) as caught:
        await client.get("https://a.example.com/")
    assert caught.value.host == "a.example.com:443"
    assert (await client.get("https://b.example.com/")).status_code == 200
    assert script.calls == 2
    assert harness.value("resilient_http_circuit_state", "a.example.com:443", state="open") == 1
    assert harness.value("resilient_http_circuit_state", "b.example.com:443", state="closed") == 1


async def test_ports_of_one_host_get_separate_breakers(harness: Harness) -> None:
    """api.example.com:443 and api.example.com:8443 are different hosts for every layer."""
    script = Script(lambda request: httpx.Response(503 if request.url.port is None else 200))
    client = harness.client(script, _tripping_breaker())
    await client.get("https://api.example.com/")
    with pytest.raises(CircuitOpenError):
        await client.get("https://api.example.com/")
    assert (await client.get("https://api.example.com:8443/")).status_code == 200


async def test_the_least_recently_used_host_is_evicted_with_its_metric_series(harness: Harness) -> None:
    """Past max_hosts the host used longest ago is dropped, and its series leave the registry."""
    script = Script(200)
    client = harness.client(script, only(circuit_breaker=CircuitBreakerPolicy()), max_hosts=2)
    await client.get("https://a.example.com/")
    await client.get("https://b.example.com/")
    await client.get("https://a.example.com/")  # a is now the most recently used
    await client.get("https://c.example.com/")  # evicts b
    assert _hosts_with_series(harness) == {"a.example.com:443", "c.example.com:443"}
    assert harness.value("resilient_http_requests_total", "a.example.com:443", outcome="2xx") == 2
    assert harness.value("resilient_http_requests_total", "b.example.com:443", outcome="2xx") is None
    assert harness.value("resilient_http_circuit_state", "b.example.com:443", state="closed") is None


async def test_an_evicted_host_comes_back_with_fresh_series(harness: Harness) -> None:
    """A host called again after eviction counts from zero instead of resurrecting its old series."""
    client = harness.client(Script(200), only(), max_hosts=1)
    await client.get("https://a.example.com/")
    await client.get("https://a.example.com/")
    await client.get("https://b.example.com/")
    await client.get("https://a.example.com/")
    assert harness.value("resilient_http_requests_total", "a.example.com:443", outcome="2xx") == 1
    assert harness.value("resilient_http_requests_total", "b.example.com:443", outcome="2xx") is None


# One host, one name: every spelling httpx accepts reaches the same policy and the same state.


@pytest.mark.parametrize(
    ("pattern", "spellings"),
    [
        ("api.example.com", ["api.example.com.", "API.Example.COM.", " api.example.com "]),
        ("api.example.com.", ["api.example.com", "Api.Example.Com."]),
        ("bücher.example", ["xn--bcher-kva.example", "BÜCHER.example", "xn--bcher-kva.example."]),
        ("xn--bcher-kva.example", ["bücher.example", "Bücher.Example."]),
        ("XN--BCHER-KVA.example.", ["bücher.example"]),
        ("*.bücher.example", ["www.xn--bcher-kva.example", "www.bücher.example.", "a.b.BÜCHER.example"]),
        ("[::1]:8080", ["::1", "0:0:0:0:0:0:0:1", "[0::1]"]),
    ],
)
def test_every_spelling_of_a_host_gets_its_policy(pattern: str, spellings: list[str]) -> None:
    """Case, a trailing dot, Unicode or punycode, IPv6 notation: one host, one policy."""
    transport = _transport({pattern: HOST})
    for spelling in spellings:
        assert transport.policy_for(spelling, 8080) is HOST, spelling


@pytest.mark.parametrize(
    ("pattern", "first", "second"),
    [
        ("api.example.com", "https://api.example.com./", "https://API.example.com/"),
        ("xn--bcher-kva.example", "https://bücher.example/", "https://xn--bcher-kva.example./"),
        ("bücher.example", "https://BÜCHER.example./", "https://xn--bcher-kva.example/"),
        ("*.bücher.example", "https://www.bücher.example/", "https://www.xn--bcher-kva.example./"),
        ("[::1]", "https://[::1]/", "https://[0:0:0:0:0:0:0:1]/"),
    ],
)
async def test_every_spelling_of_a_host_shares_its_state(
    harness: Harness, pattern: str, first: str, second: str
) -> None:
    """A breaker opened through one spelling of a host is open for every other spelling."""
    script = Script(503)
    client = harness.client(script, only(), policies={pattern: _tripping_breaker()})
    assert (await client.get(first)).status_code == 503
    with pytest.raises(CircuitOpenError):
        await client.get(second)
    assert script.calls == 1


async def test_a_host_named_in_malformed_punycode_is_a_host_not_a_crash(harness: Harness) -> None:
    """An `xn--` label that cannot be decoded (httpx sends it when the Host header is given) gets its state."""
    client = harness.client(Script(200), only(), policies={"xn--a.example": _tripping_breaker()})
    response = await client.get("https://xn--a.example./", headers={"Host": "xn--a.example"})
    assert response.status_code == 200
    assert harness.value("resilient_http_circuit_state", "xn--a.example:443", state="closed") == 1


@pytest.mark.parametrize(
    "pattern",
    [
        "a.com:80:90",
        "::1",
        "a\x00.com",
        "a\n.com",
        "a\t.com",
        "a.com?x",
        "a.com#x",
        "user@a.com",
        "a.com/",
        "a%2e.com",
        "[::1",
        "[::1]8080",
        "[::g]:80",
        "[a.com]",
        ".a.com",
        "a..com",
        "a.com..",
        "*..a.com",
        "*.a.com.:80:80",
        "-a.com",
        "a-.com",
        "x" * 64 + ".com",
        ".".join(["a" * 63] * 4),
        "999.1.1.1",
        "ﬀ.com",
        "a.com:\u0668\u0660",
        "a.com:99999999999999999999999",
    ],
)
def test_patterns_must_be_host_names(pattern: str) -> None:
    """Separators, control characters, empty or long labels, bad addresses and ports are refused, naming the pattern."""
    with pytest.raises(ConfigurationError) as caught:
        _transport({pattern: HOST})
    assert caught.value.field == "policies"
    assert caught.value.value == pattern


@pytest.mark.parametrize(
    "pattern",
    ["a_b.example", "x" * 63 + ".com", "bücher.example", "*.xn--bcher-kva.example", "api.example.com.:8443", "[::1]"],
)
def test_valid_host_names_are_patterns(pattern: str) -> None:
    """Underscores, 63-character labels, international names and fully qualified names are accepted."""
    _transport({pattern: HOST})


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("api.example.com", "API.Example.COM"),
        ("api.example.com", " api.example.com "),
        ("api.example.com", "api.example.com."),
        ("api.example.com:80", "api.example.com:080"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("bücher.example", "BÜCHER.example."),
        ("*.bücher.example", "*.XN--BCHER-KVA.example."),
        ("[::1]:8080", "[0:0:0:0:0:0:0:1]:8080"),
    ],
)
def test_two_patterns_for_the_same_hosts_are_refused(first: str, second: str) -> None:
    """Patterns that differ only in spelling would have one silently win: both are named instead."""
    with pytest.raises(ConfigurationError) as caught:
        _transport({first: HOST, second: WILDCARD})
    assert caught.value.value == second
    assert repr(first) in str(caught.value)


def test_patterns_that_only_look_alike_are_not_duplicates() -> None:
    """A host and the host on a port, a domain and its subdomains, are different patterns."""
    transport = _transport({"example.com": HOST, "example.com:443": HOST_PORT, "*.example.com": WILDCARD})
    assert transport.policy_for("example.com", 443) is HOST_PORT
    assert transport.policy_for("example.com", 80) is HOST
    assert transport.policy_for("www.example.com", 80) is WILDCARD


# Eviction: a host with calls in flight keeps its state.


class Held:
    """A handler that holds requests to the paths in ``held`` until ``release()``, and answers the rest at once."""

    def __init__(self, *held: str, status: int = 200) -> None:
        self.held = set(held)
        self.status = status
        self.entered = anyio.Event()
        self.in_flight: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self._release = anyio.Event()

    def release(self) -> None:
        self._release.set()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.in_flight[host] = self.in_flight.get(host, 0) + 1
        self.peak[host] = max(self.peak.get(host, 0), self.in_flight[host])
        try:
            if request.url.path in self.held:
                self.entered.set()
                await self._release.wait()
        finally:
            self.in_flight[host] -= 1
        return httpx.Response(200 if request.url.path in self.held else self.status)


def _hosts_with_series(harness: Harness) -> set[str]:
    return {
        f"{sample.labels['server_address']}:{sample.labels['server_port']}"
        for family in harness.registry.collect()
        for sample in family.samples
        if family.name.startswith("resilient_http_") and "server_address" in sample.labels
    }


async def test_a_busy_host_is_not_evicted_so_its_bulkhead_cap_holds(harness: Harness) -> None:
    """With max_hosts=1, a call to B while A has a call in flight must not give A a second, empty bulkhead."""
    handler = Held("/slow")
    client = harness.client(handler, only(bulkhead=BulkheadPolicy(max_concurrent=1, max_queue=0)), max_hosts=1)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(client.get, "https://a.example.com/slow")
            await handler.entered.wait()
            assert (await client.get("https://b.example.com/")).status_code == 200
            with pytest.raises(BulkheadFullError):
                await client.get("https://a.example.com/")
            handler.release()
    assert handler.peak["a.example.com"] == 1


async def test_a_busy_host_is_not_evicted_so_its_open_breaker_stays_open(harness: Harness) -> None:
    """With max_hosts=1, a call to B while A has a call in flight must not close A's open breaker."""
    handler = Held("/slow", status=503)
    client = harness.client(handler, _tripping_breaker(), max_hosts=1)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(client.get, "https://a.example.com/slow")
            await handler.entered.wait()
            assert (await client.get("https://a.example.com/")).status_code == 503  # opens A's breaker
            await client.get("https://b.example.com/")
            with pytest.raises(CircuitOpenError):
                await client.get("https://a.example.com/")
            handler.release()


async def test_the_table_grows_while_hosts_are_busy_and_shrinks_once_they_are_idle(harness: Harness) -> None:
    """Busy hosts are all kept, past max_hosts; once their calls end, the table is back to max_hosts."""
    handler = Held("/slow")
    client = harness.client(handler, only(), max_hosts=1)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            for host in ("a", "b"):
                handler.entered = anyio.Event()
                tasks.start_soon(client.get, f"https://{host}.example.com/slow")
                await handler.entered.wait()
            await client.get("https://c.example.com/")  # idle once answered: evicted at once
            assert _hosts_with_series(harness) == {"a.example.com:443", "b.example.com:443"}
            handler.release()
    assert len(_hosts_with_series(harness)) == 1


@pytest.mark.parametrize("ending", ["cancelled", "bad override", "error"])
async def test_a_call_that_ends_badly_leaves_its_host_idle(harness: Harness, ending: str) -> None:
    """A call cancelled, refused before the chain or failing in it still stops counting as in flight."""
    handler = Held("/slow")

    async def fail(request: httpx.Request) -> httpx.Response:
        if request.url.host == "a.example.com" and ending == "error":
            raise httpx.ConnectError("refused", request=request)
        return await handler(request)

    client = harness.client(fail, only(), max_hosts=1)
    with anyio.fail_after(5):
        if ending == "cancelled":
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(client.get, "https://a.example.com/slow")
                await handler.entered.wait()
                tasks.cancel_scope.cancel()
        elif ending == "bad override":
            with pytest.raises(ConfigurationError):
                await client.get("https://a.example.com/", extensions={"resilient_http": {"retry": 3}})
        else:
            with pytest.raises(httpx.ConnectError):
                await client.get("https://a.example.com/")
        await client.get("https://b.example.com/")
    assert _hosts_with_series(harness) == {"b.example.com:443"}
