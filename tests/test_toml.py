"""Policy files: [default] and [hosts."pattern"], inheritance key by key, and errors that name the key path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import httpx
import pytest
from conftest import Harness, Script

from resilient_http import (
    CircuitBreakerPolicy,
    ConfigurationError,
    Policy,
    RateLimitPolicy,
    ResilientTransport,
    RetryBudget,
    RetryPolicy,
    TimeoutPolicy,
)
from resilient_http._toml import load_policies


@pytest.fixture
def write(tmp_path: Path) -> Writer:
    return Writer(tmp_path)


class Writer:
    """Writes TOML text, dedented, to a file and returns its path."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "policies.toml"

    def __call__(self, text: str) -> Path:
        self.path.write_text(textwrap.dedent(text), encoding="utf-8")
        return self.path


def test_default_and_host_tables_are_read(write: Writer) -> None:
    """[default] becomes the default policy and each [hosts."pattern"] a policy for that pattern."""
    path = write("""
        [default]
        timeout = { attempt = 5, total = 20 }

        [default.retry]
        attempts = 4

        [hosts."api.payments.example"]
        retry = { attempts = 2, statuses = [429, 503] }

        [hosts."*.internal.example".circuit_breaker]
        failure_ratio = 0.25
    """)
    policies, default = load_policies(path)
    assert default.timeout == TimeoutPolicy(attempt=5, total=20)
    assert default.retry == RetryPolicy(attempts=4)
    assert set(policies) == {"api.payments.example", "*.internal.example"}
    payments = policies["api.payments.example"]
    assert payments.retry == RetryPolicy(attempts=2, statuses=frozenset({429, 503}))
    assert policies["*.internal.example"].circuit_breaker == CircuitBreakerPolicy(failure_ratio=0.25)


def test_layers_not_mentioned_keep_their_library_defaults(write: Writer) -> None:
    """A file that says nothing about a layer leaves it as Policy() has it."""
    policies, default = load_policies(write("[default]\n"))
    assert policies == {}
    assert default == Policy()


def test_an_empty_file_gives_the_default_policy(write: Writer) -> None:
    """An empty file is valid: every host gets Policy()."""
    policies, default = load_policies(write(""))
    assert (policies, default) == ({}, Policy())


def test_host_tables_inherit_from_default_key_by_key(write: Writer) -> None:
    """What a host table does not say it inherits from [default], down to single keys of a layer."""
    path = write("""
        [default]
        timeout = { attempt = 5, total = 20 }
        retry = { attempts = 4, backoff = 0.5, statuses = [503] }

        [hosts."api.example.com".retry]
        attempts = 2

        [hosts."api.example.com".timeout]
        total = 8
    """)
    policies, default = load_policies(path)
    host = policies["api.example.com"]
    assert host.retry == RetryPolicy(attempts=2, backoff=0.5, statuses=[503])
    assert host.timeout == TimeoutPolicy(attempt=5, total=8)
    assert default.retry == RetryPolicy(attempts=4, backoff=0.5, statuses=[503])


def test_a_host_may_replace_a_list_without_merging_it(write: Writer) -> None:
    """Lists are values, not tables: a host's statuses replace the default's."""
    path = write("""
        [default.retry]
        statuses = [502, 503]

        [hosts."api.example.com".retry]
        statuses = [429]
    """)
    policies, _ = load_policies(path)
    retry = policies["api.example.com"].retry
    assert retry is not None
    assert retry.statuses == frozenset({429})


def test_a_host_declares_its_posts_safe_to_retry(write: Writer) -> None:
    """`methods` is read as the dataclass has it, and like `statuses` a host's list replaces the default's."""
    path = write("""
        [default.retry]
        methods = ["PATCH"]

        [hosts."api.llm.example".retry]
        methods = ["POST"]
    """)
    policies, default = load_policies(path)
    assert default.retry is not None and default.retry.methods == frozenset({"PATCH"})
    retry = policies["api.llm.example"].retry
    assert retry == RetryPolicy(methods={"POST"})


def test_false_turns_a_layer_off(write: Writer) -> None:
    """`layer = false` turns a layer off, in [default] and in a host table over an inherited one."""
    path = write("""
        [default]
        circuit_breaker = false
        retry = { attempts = 5 }

        [hosts."api.example.com"]
        retry = false
    """)
    policies, default = load_policies(path)
    assert default.circuit_breaker is None
    assert default.retry == RetryPolicy(attempts=5)
    assert policies["api.example.com"].retry is None
    assert policies["api.example.com"].circuit_breaker is None


def test_true_turns_a_layer_on_with_its_defaults(write: Writer) -> None:
    """`layer = true` turns a layer on with the library's defaults, even when [default] turned it off."""
    path = write("""
        [default]
        circuit_breaker = false
        bulkhead = false

        [hosts."api.example.com"]
        circuit_breaker = true
    """)
    policies, default = load_policies(path)
    assert default.circuit_breaker is None
    assert default.bulkhead is None
    assert policies["api.example.com"].circuit_breaker == CircuitBreakerPolicy()
    assert policies["api.example.com"].bulkhead is None


def test_true_in_a_host_table_keeps_the_default_tables_settings(write: Writer) -> None:
    """`layer = true` where [default] configures that layer means "on, as [default] has it"."""
    path = write("""
        [default.retry]
        attempts = 5

        [hosts."api.example.com"]
        retry = true
    """)
    policies, _ = load_policies(path)
    assert policies["api.example.com"].retry == RetryPolicy(attempts=5)


def test_a_host_table_turns_on_a_layer_that_default_turned_off(write: Writer) -> None:
    """A host table with settings for a layer [default] turned off gets that layer."""
    path = write("""
        [default]
        retry = false

        [hosts."api.example.com".retry]
        attempts = 6
    """)
    policies, default = load_policies(path)
    assert default.retry is None
    assert policies["api.example.com"].retry == RetryPolicy(attempts=6)


def test_opt_in_layers_are_read(write: Writer) -> None:
    """The rate limit, which needs a rate, is read from its table."""
    path = write("""
        [hosts."api.example.com".rate_limit]
        rate = 5
        burst = 10
    """)
    policies, _ = load_policies(path)
    assert policies["api.example.com"].rate_limit == RateLimitPolicy(rate=5, burst=10)


def test_nested_retry_budget_is_read_and_inherited(write: Writer) -> None:
    """[hosts."x".retry.budget] is a RetryBudget, laid over [default.retry.budget] key by key."""
    path = write("""
        [default.retry.budget]
        window = 20

        [hosts."api.example.com".retry.budget]
        ratio = 0.5

        [hosts."quiet.example.com".retry]
        budget = false
    """)
    policies, default = load_policies(path)
    assert default.retry is not None
    assert default.retry.budget == RetryBudget(window=20)
    host = policies["api.example.com"].retry
    assert host is not None
    assert host.budget == RetryBudget(ratio=0.5, window=20)
    quiet = policies["quiet.example.com"].retry
    assert quiet is not None
    assert quiet.budget is None


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("[defaults]\n", "defaults"),
        ("[default]\nretries = 3\n", "default.retries"),
        ("[default.retry]\ntries = 3\n", "default.retry.tries"),
        ("[default.retry.budget]\nrate = 1\n", "default.retry.budget.rate"),
        ('[hosts."api.example.com"]\nretries = {}\n', 'hosts."api.example.com".retries'),
        (
            '[hosts."api.example.com".circuit_breaker]\nthreshold = 1\n',
            'hosts."api.example.com".circuit_breaker.threshold',
        ),
        ('[hosts."api.example.com".retry.budget]\nsize = 1\n', 'hosts."api.example.com".retry.budget.size'),
        ("[default.timeout]\nconnect = 1\n", "default.timeout.connect"),
    ],
)
def test_unknown_keys_raise_naming_the_key_path(write: Writer, text: str, path: str) -> None:
    """A misspelt key at any level is an error naming its full key path, never silently ignored."""
    with pytest.raises(ConfigurationError) as caught:
        load_policies(write(text))
    assert caught.value.field == path
    assert path in str(caught.value)


@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        ('[hosts."api.example.com".retry]\nattempts = 0\n', 'hosts."api.example.com".retry.attempts', 0),
        ("[default.timeout]\nattempt = true\n", "default.timeout.attempt", True),
        ("[default.retry.budget]\nratio = 2\n", "default.retry.budget.ratio", 2),
        ("[default.retry]\nstatuses = [700]\n", "default.retry.statuses", [700]),
        ('[default.retry]\nmethods = ["post"]\n', "default.retry.methods", ["post"]),
        ('[default.retry]\nmethods = "POST"\n', "default.retry.methods", "POST"),
        ("[default]\nretry = 3\n", "default.retry", 3),
        ("[default.timeout]\nattempt = 50\n", "default.timeout.attempt", 50),
        ("[default.timeout]\ntotal = inf\n", "default.timeout.total", float("inf")),
        ("[default.retry]\nbackoff = 1e300\n", "default.retry.backoff", 1e300),
        ("[default.circuit_breaker]\nwindow = nan\n", "default.circuit_breaker.window", float("nan")),
        ("[default.retry.budget]\nwindow = 1e-320\n", "default.retry.budget.window", 1e-320),
        ("[default.retry]\nattempts = 9223372036854775807\n", "default.retry.attempts", 9223372036854775807),
        ('[hosts."a.example".rate_limit]\nrate = 1e-300\n', 'hosts."a.example".rate_limit.rate', 1e-300),
    ],
)
def test_bad_values_raise_naming_the_key_path_and_value(write: Writer, text: str, path: str, value: object) -> None:
    """A value a policy refuses is reported with its key path in the file and the value itself."""
    with pytest.raises(ConfigurationError) as caught:
        load_policies(write(text))
    assert caught.value.field == path
    assert path in str(caught.value)
    assert repr(value) in str(caught.value)


def test_a_host_value_made_invalid_by_inheritance_names_the_host(write: Writer) -> None:
    """A cross-field rule broken by merging (attempt above the host's total) names the host's key path."""
    path = write("""
        [default.timeout]
        attempt = 10

        [hosts."api.example.com".timeout]
        total = 5
    """)
    with pytest.raises(ConfigurationError) as caught:
        load_policies(path)
    assert caught.value.field == 'hosts."api.example.com".timeout.attempt'


def test_a_layer_without_its_required_setting_raises(write: Writer) -> None:
    """`rate_limit = true` cannot work without a rate, and the error says so."""
    with pytest.raises(ConfigurationError) as caught:
        load_policies(write("[default]\nrate_limit = true\n"))
    assert caught.value.field == "default.rate_limit"
    assert "rate" in caught.value.reason


def test_a_toml_syntax_error_names_the_line(write: Writer) -> None:
    """A file that is not TOML raises ConfigurationError mentioning the line of the mistake."""
    path = write("""\
        [default]
        retry = { attempts = 3 }
        timeout = { attempt = 5, total = }
    """)
    with pytest.raises(ConfigurationError) as caught:
        load_policies(path)
    assert "line 3" in str(caught.value)
    assert str(path) in str(caught.value)


def test_a_bad_setting_from_a_file_names_the_file_and_its_line(write: Writer) -> None:
    """from_file's errors say where: the file, the line, the key path and the value."""
    path = write("""\
        [default]
        timeout = { attempt = 5 }

        [hosts."api.example.com".retry]
        atempts = 4
    """)
    with pytest.raises(ConfigurationError) as caught:
        ResilientTransport.from_file(path)
    key = 'hosts."api.example.com".retry.atempts'
    assert str(caught.value) == f"{path}: line 5: {key}: is not a RetryPolicy setting (got 4)"
    assert caught.value.where == f"{path}: line 5"


def test_a_missing_file_raises_a_clear_error(tmp_path: Path) -> None:
    """A path that cannot be read raises ConfigurationError naming the path, not a bare OSError."""
    missing = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigurationError) as caught:
        load_policies(missing)
    assert str(missing) in str(caught.value)
    assert "cannot be read" in str(caught.value)


def test_hosts_must_be_a_table_of_patterns(write: Writer) -> None:
    """`hosts = 3` is refused with a message about host patterns."""
    with pytest.raises(ConfigurationError) as caught:
        load_policies(write("hosts = 3\n"))
    assert caught.value.field == "hosts"


def test_from_file_rejects_a_bad_host_pattern(write: Writer) -> None:
    """A pattern that is not a host pattern fails when the transport is built."""
    path = write('[hosts."api.*.example.com"]\nretry = false\n')
    with pytest.raises(ConfigurationError, match=r"api\.\*\.example\.com"):
        ResilientTransport.from_file(path, inner=httpx.MockTransport(lambda request: httpx.Response(200)))


async def test_from_file_builds_a_transport_that_applies_the_file(write: Writer, harness: Harness) -> None:
    """from_file passes keyword arguments on, and calls to a host get the policy its pattern names."""
    path = write("""
        [default]
        retry = false
        circuit_breaker = false
        bulkhead = false

        [hosts."*.example.com".retry]
        attempts = 2
        budget = false
    """)
    script = Script(503)
    transport = ResilientTransport.from_file(
        str(path), inner=httpx.MockTransport(script), registry=harness.registry, clock=harness.clock
    )
    retry = transport.policy_for("api.example.com").retry
    assert retry is not None
    assert retry.attempts == 2
    assert transport.policy_for("example.org").retry is None
    async with httpx.AsyncClient(transport=transport) as client:
        assert (await client.get("https://api.example.com/")).status_code == 503
        assert script.calls == 2
        assert (await client.get("https://example.org/")).status_code == 503
        assert script.calls == 3


def test_two_host_tables_for_the_same_host_are_refused_with_the_line(write: Writer) -> None:
    """Spellings of one host (case, trailing dot, punycode) are one host: the second is an error at its line."""
    path = write("""\
        [default]
        retry = false

        [hosts."bücher.example"]
        retry = { attempts = 2 }

        [hosts."XN--BCHER-KVA.example."]
        retry = { attempts = 3 }
    """)
    with pytest.raises(ConfigurationError) as caught:
        load_policies(path)
    assert caught.value.where == f"{path}: line 7"
    assert caught.value.field == 'hosts."XN--BCHER-KVA.example."'
    assert "'bücher.example'" in str(caught.value)


@pytest.mark.parametrize(
    ("key", "shown"),
    [
        ('"a.com:80:90"', '"a.com:80:90"'),
        ('"a\\u0000.com"', '"a\\u0000.com"'),
        ('"user@a.com"', '"user@a.com"'),
        ('"a..com"', '"a..com"'),
        ('"bü..example"', '"bü..example"'),
    ],
)
def test_a_bad_host_pattern_is_reported_with_its_line(write: Writer, key: str, shown: str) -> None:
    """A host table whose name is not a host pattern names the file, the line and the pattern."""
    path = write(f"""\
        [default]
        retry = false

        [hosts.{key}.retry]
        attempts = 2
    """)
    with pytest.raises(ConfigurationError) as caught:
        load_policies(path)
    assert caught.value.where == f"{path}: line 4"
    assert caught.value.field == f"hosts.{shown}"
