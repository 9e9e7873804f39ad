"""Retry: what is retried, how long it waits, when it gives up, and the budget that caps retry storms."""

from __future__ import annotations

import io
import math
import os
from collections.abc import AsyncIterator, Iterator
from email.utils import formatdate
from functools import partial
from typing import Any, BinaryIO

import anyio
import httpx
import pytest
from conftest import Harness, Script, Step, only
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_http import (
    BulkheadFullError,
    BulkheadPolicy,
    CallInfo,
    RateLimitPolicy,
    RetryBudget,
    RetryPolicy,
    TimeoutPolicy,
    Wait,
    call_info,
)
from resilient_http.layers.retry import Budget
from resilient_http.testing import FakeClock

#: Retries with no budget and no deadline, so a test sees one rule at a time.
PLAIN = RetryPolicy(attempts=3, backoff=0.1, max_backoff=10.0, budget=None)


def _info(response: httpx.Response) -> CallInfo:
    info = response.extensions["resilient_http"]
    assert isinstance(info, CallInfo)
    return info


def _retrying(retry: RetryPolicy = PLAIN, timeout: TimeoutPolicy | None = None) -> Any:
    return only(retry=retry, timeout=timeout)


# What is retried


@pytest.mark.parametrize("status", [408, 429, 502, 503, 504, 529])
async def test_retried_statuses_are_retried(harness: Harness, status: int) -> None:
    """Each status in the default `statuses` is tried again, and a later success is returned."""
    script = Script(status, 200)
    response = await harness.client(script, _retrying(RetryPolicy(budget=None))).get("/")
    assert response.status_code == 200
    assert script.calls == 2
    assert harness.value("resilient_http_retries_total", reason=f"status_{status}") == 1


@pytest.mark.parametrize("status", [200, 201, 204, 301, 400, 401, 404, 409, 500, 501, 505])
async def test_other_statuses_are_returned_at_once(harness: Harness, status: int) -> None:
    """A status outside `statuses` (500 included) is the answer: no second attempt, no wait."""
    script = Script(status, 200)
    response = await harness.client(script, _retrying()).get("/")
    assert response.status_code == status
    assert script.calls == 1
    assert harness.clock.sleeps == []
    assert _info(response).retry_stop is None


async def test_statuses_are_configurable(harness: Harness) -> None:
    """With statuses={500}, 500 is retried and 503 no longer is."""
    policy = _retrying(RetryPolicy(statuses={500}, budget=None))
    script = Script(500, 200)
    assert (await harness.client(script, policy).get("/")).status_code == 200
    assert script.calls == 2
    script = Script(503, 200)
    assert (await harness.client(script, policy).get("/")).status_code == 503
    assert script.calls == 1


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"])
async def test_idempotent_methods_are_retried_after_a_response(harness: Harness, method: str) -> None:
    """RFC 9110 idempotent methods are retried after a retryable status."""
    script = Script(503, 200)
    response = await harness.client(script, _retrying()).request(method, "/")
    assert response.status_code == 200
    assert [request.method for request in script.requests] == [method, method]


@pytest.mark.parametrize("status", [408, 502, 503, 504, 529])
@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_non_idempotent_methods_are_not_retried_after_a_response(
    harness: Harness, method: str, status: int
) -> None:
    """POST and PATCH may have had an effect: their 503 (every retried status but 429) is returned, not_idempotent."""
    script = Script(status, 200)
    response = await harness.client(script, _retrying(RetryPolicy(budget=None))).request(method, "/", content=b"x")
    assert response.status_code == status
    assert script.calls == 1
    assert _info(response).retry_stop == "not_idempotent"
    assert harness.clock.sleeps == []


@pytest.mark.parametrize("method", ["POST", "PATCH", "LOCK"])
async def test_a_429_is_retried_for_every_method(harness: Harness, method: str) -> None:
    """A 429 is the server refusing to act (nothing was done), so even a keyless POST is sent again, body and all."""
    script = Script((429, {"Retry-After": "2"}), 200)
    response = await harness.client(script, _retrying()).request(method, "/", content=b"summarise this")
    assert response.status_code == 200
    assert [(request.method, request.content) for request in script.requests] == [(method, b"summarise this")] * 2
    assert "idempotency-key" not in script.requests[1].headers
    assert _info(response).waits[0].reason == "retry_after"
    assert harness.value("resilient_http_retries_total", reason="status_429") == 1


async def test_a_429_to_a_body_that_cannot_be_replayed_is_still_returned(harness: Harness) -> None:
    """The 429 rule makes a POST safe to repeat, not its generator body sendable twice."""
    script = Script(429, 200)
    response = await harness.client(script, _retrying()).post("/", content=_body())
    assert response.status_code == 429
    assert script.calls == 1
    assert _info(response).retry_stop == "body_not_replayable"


async def test_a_429_is_not_retried_when_the_policy_leaves_it_out_of_statuses(harness: Harness) -> None:
    """The method rule says a 429 is safe to retry, not that it must be: `statuses` still decides."""
    script = Script(429, 200)
    response = await harness.client(script, _retrying(RetryPolicy(statuses={503}, budget=None))).post("/", content=b"x")
    assert response.status_code == 429
    assert script.calls == 1
    assert _info(response).retry_stop is None


@pytest.mark.parametrize("step", [503, 529, httpx.ReadError, httpx.RemoteProtocolError])
async def test_methods_a_policy_declares_safe_are_retried_after_they_may_have_been_sent(
    harness: Harness, step: Any
) -> None:
    """RetryPolicy(methods={"POST"}) says this host's POSTs may be repeated: after a 5xx or a broken connection too."""
    policy = RetryPolicy(methods={"POST"}, budget=None)
    script = Script(step, 200)
    response = await harness.client(script, _retrying(policy)).post("/", content=b"x")
    assert response.status_code == 200
    assert [request.content for request in script.requests] == [b"x", b"x"]


async def test_declared_methods_widen_the_idempotent_ones_and_no_others(harness: Harness) -> None:
    """With methods={"POST"}, GET is still retried and PATCH still is not."""
    policy = _retrying(RetryPolicy(methods={"POST"}, budget=None))
    get = Script(503, 200)
    assert (await harness.client(get, policy).get("/")).status_code == 200
    patch = Script(503, 200)
    response = await harness.client(patch, policy).patch("/", content=b"x")
    assert (response.status_code, patch.calls, _info(response).retry_stop) == (503, 1, "not_idempotent")


async def test_a_single_call_may_declare_its_post_safe(harness: Harness) -> None:
    """The retry policy a call brings in its extensions may name its own method safe."""
    script = Script(httpx.ReadError, 200)
    client = harness.client(script, _retrying())
    extensions = {"resilient_http": {"retry": RetryPolicy(methods={"POST"}, budget=None)}}
    response = await client.post("/", content=b"x", extensions=extensions)
    assert response.status_code == 200
    assert script.calls == 2


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (httpx.ReadError, "network_error"),
        (httpx.WriteError, "network_error"),
        (httpx.RemoteProtocolError, "network_error"),
        (httpx.ReadTimeout, "timeout"),
        (httpx.WriteTimeout, "timeout"),
    ],
)
async def test_errors_after_sending_are_retried_for_idempotent_methods(
    harness: Harness, error: type[httpx.TransportError], reason: str
) -> None:
    """A GET whose connection failed after it may have been sent is tried again."""
    script = Script(error, 200)
    response = await harness.client(script, _retrying()).get("/")
    assert response.status_code == 200
    assert script.calls == 2
    assert harness.value("resilient_http_retries_total", reason=reason) == 1


@pytest.mark.parametrize("error", [httpx.ReadError, httpx.RemoteProtocolError, httpx.ReadTimeout])
async def test_errors_after_sending_are_not_retried_for_post(
    harness: Harness, error: type[httpx.TransportError]
) -> None:
    """A POST that may have reached the server is not sent twice: the error is raised."""
    script = Script(error, 200)
    with pytest.raises(error):
        await harness.client(script, _retrying()).post("/", content=b"pay 100")
    assert script.calls == 1
    assert harness.clock.sleeps == []


@pytest.mark.parametrize("error", [httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout])
async def test_errors_before_sending_are_retried_for_every_method(
    harness: Harness, error: type[httpx.TransportError]
) -> None:
    """Nothing reached the server when the connection could not be made, so even a POST is retried."""
    script = Script(error, 200)
    response = await harness.client(script, _retrying()).post("/", content=b"pay 100")
    assert response.status_code == 200
    assert script.calls == 2
    assert [request.content for request in script.requests] == [b"pay 100", b"pay 100"]
    assert harness.value("resilient_http_retries_total", reason="connect_error") == 1


async def test_post_with_an_idempotency_key_is_retried_with_the_same_key(harness: Harness) -> None:
    """An Idempotency-Key makes a POST safe to repeat; every attempt carries the same key and body."""
    script = Script(503, httpx.ReadError, 200)
    response = await harness.client(script, _retrying()).post(
        "/", content=b"pay 100", headers={"Idempotency-Key": "k-7f3a"}
    )
    assert response.status_code == 200
    assert [request.headers["idempotency-key"] for request in script.requests] == ["k-7f3a"] * 3
    assert [request.content for request in script.requests] == [b"pay 100"] * 3


async def _body() -> AsyncIterator[bytes]:
    yield b"streamed "
    yield b"once"


@pytest.mark.parametrize("step", [503, httpx.ConnectError, httpx.ReadError])
async def test_a_body_that_cannot_be_replayed_is_never_retried(harness: Harness, step: Any) -> None:
    """A generator body can be sent only once: the first outcome is final, whatever it was."""
    script = Script(step, 200)
    client = harness.client(script, _retrying())
    if isinstance(step, int):
        response = await client.put("/", content=_body())
        assert response.status_code == step
        assert _info(response).retry_stop == "body_not_replayable"
    else:
        with pytest.raises(step):
            await client.put("/", content=_body())
    assert script.calls == 1
    assert harness.clock.sleeps == []


@pytest.mark.parametrize("error", [httpx.ConnectError, httpx.ConnectTimeout])
@pytest.mark.parametrize("file", [b"a,b\n1,2\n", io.BytesIO(b"a,b\n1,2\n")], ids=["bytes", "file"])
async def test_a_multipart_upload_is_retried_when_the_connection_was_never_opened(
    harness: Harness, error: type[httpx.TransportError], file: bytes | io.BytesIO
) -> None:
    """A files= form, whose files httpx rewinds, is sent again after a connection that was never opened."""
    script = Script(error, 200)
    response = await harness.client(script, _retrying()).post(
        "/", data={"kind": "report"}, files={"report": ("report.csv", file, "text/csv")}
    )
    assert response.status_code == 200
    assert script.calls == 2
    assert b"1,2" in script.requests[1].content
    assert harness.value("resilient_http_retries_total", reason="connect_error") == 1


@pytest.fixture
def pipe() -> Iterator[BinaryIO]:
    """A file that can be read once and not rewound: the read end of a pipe holding a line."""
    read_end, write_end = os.pipe()
    os.write(write_end, b"line\n")
    os.close(write_end)
    with open(read_end, "rb") as file:
        yield file


async def test_a_multipart_upload_of_a_file_that_cannot_rewind_is_not_retried(harness: Harness, pipe: BinaryIO) -> None:
    """A form whose file cannot be read twice (a pipe) is sent once, whatever happens."""
    script = Script(httpx.ConnectError, 200)
    with pytest.raises(httpx.ConnectError) as caught:
        await harness.client(script, _retrying()).put("/", files={"log": ("log.txt", pipe)})
    assert script.calls == 1
    info = call_info(caught.value)
    assert info is not None and info.retry_stop == "body_not_replayable"


async def test_retry_none_turns_retries_off(harness: Harness) -> None:
    """A policy without retry makes exactly one attempt."""
    script = Script(503, 200)
    response = await harness.client(script, only()).get("/")
    assert response.status_code == 503
    assert script.calls == 1
    assert _info(response).retry_stop is None


# When attempts run out


async def test_the_last_response_is_returned_when_attempts_run_out(harness: Harness) -> None:
    """After `attempts` tries the last response is returned as it is, so raise_for_status() still works."""
    script = Script((503, {"X-Try": "1"}), (503, {"X-Try": "2"}), (503, {"X-Try": "3"}))
    response = await harness.client(script, _retrying()).get("/")
    assert script.calls == 3
    assert response.status_code == 503
    assert response.headers["x-try"] == "3"
    assert _info(response).retry_stop == "attempts"
    with pytest.raises(httpx.HTTPStatusError):
        response.raise_for_status()


async def test_the_last_exception_is_raised_when_attempts_run_out(harness: Harness) -> None:
    """After `attempts` failed tries the last error is raised, not the first."""
    script = Script(httpx.ConnectError)
    with pytest.raises(httpx.ConnectError, match="scripted failure 3"):
        await harness.client(script, _retrying()).get("/")
    assert script.calls == 3
    assert len(harness.clock.sleeps) == 2


async def test_one_attempt_means_no_retry(harness: Harness) -> None:
    """attempts=1 sends once and says the attempts ran out."""
    script = Script(503)
    response = await harness.client(script, _retrying(RetryPolicy(attempts=1, budget=None))).get("/")
    assert script.calls == 1
    assert _info(response).retry_stop == "attempts"


# How long it waits


async def test_backoff_never_overflows_however_many_attempts(harness: Harness) -> None:
    """Past attempt 1025, backoff * 2**(n-1) no longer fits a float: the ceiling stays max_backoff instead.

    Policies refuse more than 100 attempts; the layer's own guard is tested past that check.
    """
    policy = RetryPolicy(attempts=100, backoff=0.001, max_backoff=0.002, budget=None)
    object.__setattr__(policy, "attempts", 10**100)
    script = Script(*([503] * 1100), 200)
    response = await harness.client(script, _retrying(policy)).get("/")
    assert response.status_code == 200
    assert script.calls == 1101
    assert 0 <= min(harness.clock.sleeps) and max(harness.clock.sleeps) <= 0.002


async def test_backoff_is_full_jitter_below_an_exponential_ceiling(harness: Harness) -> None:
    """Wait n is drawn from [0, min(max_backoff, backoff * 2**(n-1))], spread over all of it."""
    policy = RetryPolicy(attempts=6, backoff=1.0, max_backoff=6.0, budget=None)
    ceilings = [1.0, 2.0, 4.0, 6.0, 6.0]
    client = harness.client(Script(503), _retrying(policy), seed=1234)
    waits: list[list[float]] = [[] for _ in ceilings]
    for _ in range(150):
        info = _info(await client.get("/"))
        assert [wait.reason for wait in info.waits] == ["backoff"] * 5
        for n, wait in enumerate(info.waits):
            waits[n].append(wait.seconds)
    assert harness.clock.sleeps == [seconds for call in zip(*waits, strict=True) for seconds in call]
    for ceiling, drawn in zip(ceilings, waits, strict=True):
        assert all(0.0 <= seconds <= ceiling for seconds in drawn)
        assert max(drawn) > 0.9 * ceiling  # full jitter reaches the ceiling...
        assert min(drawn) < 0.1 * ceiling  # ...and goes all the way down to zero


async def test_the_injected_random_makes_backoff_reproducible(registry: Any) -> None:
    """Two transports with equally seeded random sources wait exactly the same."""
    sleeps = []
    for _ in range(2):
        harness = Harness(registry, FakeClock())
        client = harness.client(Script(503), _retrying(RetryPolicy(attempts=4, budget=None)), seed=99)
        await client.get("/")
        await harness.aclose()
        sleeps.append(harness.clock.sleeps)
    assert sleeps[0] == sleeps[1]
    assert len(sleeps[0]) == 3


async def test_retry_after_seconds_is_the_least_wait_and_jitter_only_adds(harness: Harness) -> None:
    """A Retry-After in seconds is never cut short, and jitter is spread on top of it so callers do not stampede."""
    steps: list[Step] = [(503, {"Retry-After": "3"}), 200] * 30
    script = Script(*steps)
    client = harness.client(script, _retrying(RetryPolicy(attempts=2, budget=None)))
    slept = []
    for _ in range(30):
        info = _info(await client.get("/"))
        assert info.waits == (Wait("retry_after", info.waits[0].seconds),)
        slept.append(info.waits[0].seconds)
    assert slept == harness.clock.sleeps
    assert all(3.0 <= seconds <= 3.0 + PLAIN.backoff for seconds in slept)
    assert max(slept) - min(slept) > PLAIN.backoff / 2


@pytest.mark.parametrize(
    "headers",
    [
        {"RateLimit": '"default";r=0;t=7', "RateLimit-Policy": '"default";q=100;w=60'},
        {"RateLimit": '"default";r=0', "RateLimit-Policy": '"default";q=100;w=7'},
        {"RateLimit-Remaining": "0", "RateLimit-Reset": "7"},
    ],
    ids=["ratelimit", "policy-window", "older-fields"],
)
async def test_a_spent_ratelimit_quota_is_the_least_wait_without_retry_after(
    harness: Harness, headers: dict[str, str]
) -> None:
    """A 429 saying r=0 until t=7 is not retried before those 7 s, even with no rate limiter to read it."""
    script = Script((429, headers), 200)
    response = await harness.client(script, _retrying()).post("/", content=b"x")
    assert response.status_code == 200
    [slept] = harness.clock.sleeps
    assert 7.0 <= slept <= 7.0 + PLAIN.backoff
    assert _info(response).waits[0].reason == "retry_after"


async def test_retry_after_wins_over_the_ratelimit_fields(harness: Harness) -> None:
    """Retry-After: 2 beside r=0;t=60 waits 2 s (and a bit), not a minute."""
    headers = {"Retry-After": "2", "RateLimit": '"default";r=0;t=60'}
    await harness.client(Script((429, headers), 200), _retrying()).get("/")
    [slept] = harness.clock.sleeps
    assert 2.0 <= slept <= 2.0 + PLAIN.backoff


@pytest.mark.parametrize(
    "headers",
    [{"RateLimit": '"default";r=5;t=60'}, {"RateLimit": '"default";r=0;t=x'}, {"RateLimit": "garbage;;"}],
    ids=["quota-left", "malformed-t", "malformed"],
)
async def test_a_quota_not_spent_or_malformed_adds_no_wait(harness: Harness, headers: dict[str, str]) -> None:
    """Only a spent quota (r=0) is a wait; one with units left, or unreadable, leaves the backoff alone."""
    await harness.client(Script((503, headers), 200), _retrying()).get("/")
    [slept] = harness.clock.sleeps
    assert 0.0 <= slept <= PLAIN.backoff


async def test_a_spent_quota_resetting_after_max_retry_after_returns_the_429(harness: Harness) -> None:
    """A daily quota spent (r=0;t=86400) is not waited out: the 429 is the answer, retry_after_too_long."""
    script = Script((429, {"RateLimit": '"day";r=0;t=86400'}), 200)
    response = await harness.client(script, _retrying()).post("/", content=b"x")
    assert response.status_code == 429
    assert script.calls == 1
    assert _info(response).retry_stop == "retry_after_too_long"


async def test_retry_after_date_is_read_against_the_response_date(harness: Harness) -> None:
    """An HTTP-date is measured from the response's Date header, cancelling clock skew with the server."""
    headers = {"Date": "Mon, 01 Jan 2024 00:00:00 GMT", "Retry-After": "Mon, 01 Jan 2024 00:00:10 GMT"}
    script = Script((503, headers), 200)
    response = await harness.client(script, _retrying()).get("/")
    [slept] = harness.clock.sleeps
    assert 10.0 <= slept <= 10.0 + PLAIN.backoff
    assert _info(response).waits[0].reason == "retry_after"


async def test_retry_after_date_without_date_header_is_read_against_the_wall_clock(harness: Harness) -> None:
    """Without a Date header the HTTP-date is measured from the clock's wall time."""
    headers = {"Retry-After": formatdate(harness.clock.wall() + 7, usegmt=True)}
    await harness.client(Script((503, headers), 200), _retrying()).get("/")
    [slept] = harness.clock.sleeps
    assert 7.0 <= slept <= 7.0 + PLAIN.backoff


async def test_retry_after_date_in_the_past_means_now(harness: Harness) -> None:
    """A date already past asks for no extra wait: only the jitter is waited."""
    headers = {"Date": "Mon, 01 Jan 2024 00:00:10 GMT", "Retry-After": "Mon, 01 Jan 2024 00:00:00 GMT"}
    response = await harness.client(Script((503, headers), 200), _retrying()).get("/")
    [slept] = harness.clock.sleeps
    assert 0.0 <= slept <= PLAIN.backoff
    assert _info(response).waits[0].reason == "retry_after"


@pytest.mark.parametrize("value", ["soon", "1.5", "-3", "", "3 seconds", "Mon, 99 Foo 2024 00:00:00 GMT", "+5", "1e3"])
async def test_a_malformed_retry_after_is_ignored(harness: Harness, value: str) -> None:
    """A Retry-After that is neither delay-seconds nor an HTTP-date is ignored: plain backoff applies."""
    script = Script((503, {"Retry-After": value}), 200)
    response = await harness.client(script, _retrying()).get("/")
    assert response.status_code == 200
    [slept] = harness.clock.sleeps
    assert 0.0 <= slept <= PLAIN.backoff
    assert _info(response).waits[0].reason == "backoff"


async def test_a_retry_after_above_the_maximum_returns_the_response_at_once(harness: Harness) -> None:
    """A server asking for more than max_retry_after gets its response handed back with no sleep."""
    policy = RetryPolicy(max_retry_after=60, budget=None)
    script = Script((503, {"Retry-After": "61"}), 200)
    response = await harness.client(script, _retrying(policy)).get("/")
    assert response.status_code == 503
    assert script.calls == 1
    assert harness.clock.sleeps == []
    assert _info(response).retry_stop == "retry_after_too_long"


async def test_a_retry_after_at_the_maximum_is_waited(harness: Harness) -> None:
    """max_retry_after itself is still an acceptable wait."""
    policy = RetryPolicy(max_retry_after=60, budget=None)
    response = await harness.client(Script((503, {"Retry-After": "60"}), 200), _retrying(policy)).get("/")
    assert response.status_code == 200
    assert harness.clock.sleeps[0] >= 60


async def test_a_wait_that_would_not_fit_in_the_deadline_is_not_started(harness: Harness) -> None:
    """When the wait would end at or after the total deadline, the response is returned without sleeping."""
    script = Script((503, {"Retry-After": "5"}), 200)
    timeout = TimeoutPolicy(attempt=1, total=5)
    response = await harness.client(script, _retrying(timeout=timeout)).get("/")
    assert response.status_code == 503
    assert script.calls == 1
    assert harness.clock.sleeps == []
    assert _info(response).retry_stop == "deadline"


async def test_the_deadline_counts_time_already_spent(harness: Harness) -> None:
    """A wait that fit at the start no longer fits once slow attempts have used the time."""
    clock = harness.clock

    def slow(request: httpx.Request) -> httpx.Response:
        clock.advance(2.0)
        return httpx.Response(503, headers={"Retry-After": "1"})

    script = Script(slow)
    timeout = TimeoutPolicy(attempt=3, total=5)
    response = await harness.client(script, _retrying(RetryPolicy(attempts=5, budget=None), timeout)).get("/")
    # t=2: 2 + 1 + jitter < 5, so wait; t≈5: no time left for another wait.
    assert script.calls == 2
    assert len(clock.sleeps) == 1
    assert _info(response).retry_stop == "deadline"


async def test_an_error_whose_backoff_would_outlive_the_deadline_is_raised(harness: Harness) -> None:
    """The deadline rule applies to errors too: the last error is raised instead of waiting in vain."""
    clock = harness.clock

    def refused(request: httpx.Request) -> httpx.Response:
        clock.advance(5.0)
        raise httpx.ConnectError("refused", request=request)

    policy = RetryPolicy(attempts=3, backoff=1.0, max_backoff=1.0, budget=None)
    with pytest.raises(httpx.ConnectError):
        await harness.client(Script(refused), _retrying(policy, TimeoutPolicy(attempt=5, total=5))).get("/")
    assert clock.sleeps == []


class RecordingStream(httpx.AsyncByteStream):
    """A response body that notes when it is closed."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"busy"

    async def aclose(self) -> None:
        self.events.append("closed")


class RecordingClock(FakeClock):
    """A fake clock that notes when it is slept on."""

    def __init__(self, events: list[str]) -> None:
        super().__init__()
        self.events = events

    async def sleep(self, seconds: float) -> None:
        self.events.append("sleep")
        await super().sleep(seconds)


async def test_a_discarded_response_is_closed_before_the_wait(harness: Harness) -> None:
    """A response that will be retried frees its connection before the backoff, not after."""
    events: list[str] = []
    harness.clock = RecordingClock(events)
    script = Script(lambda request: httpx.Response(503, stream=RecordingStream(events)), 200)
    response = await harness.client(script, _retrying()).get("/")
    assert response.status_code == 200
    assert events == ["closed", "sleep"]


async def test_the_returned_response_is_left_open_for_the_caller(harness: Harness) -> None:
    """The last response, returned when attempts run out, is not closed under the caller's feet."""
    events: list[str] = []
    script = Script(lambda request: httpx.Response(503, stream=RecordingStream(events)))
    client = harness.client(script, _retrying(RetryPolicy(attempts=2, budget=None)))
    async with client.stream("GET", "/") as response:
        assert events == ["closed"]  # only the first, discarded one
        assert await response.aread() == b"busy"


# The retry budget


async def test_the_budget_caps_retries_across_concurrent_calls(harness: Harness) -> None:
    """Retries stay within ratio * calls + min_per_second * window however many calls fail at once."""
    calls, budget = 20, RetryBudget(ratio=0.2, min_per_second=0.5, window=10)
    allowed = int(budget.ratio * calls + budget.min_per_second * budget.window)  # 9
    entered = 0
    all_in = anyio.Event()

    async def failing(request: httpx.Request) -> httpx.Response:
        nonlocal entered
        entered += 1
        if entered == calls:
            all_in.set()
        await all_in.wait()  # every call has started (and counted) before any retries
        return httpx.Response(503)

    policy = RetryPolicy(attempts=4, backoff=0.001, max_backoff=0.001, budget=budget)
    client = harness.client(Script(failing), _retrying(policy))
    infos: list[CallInfo] = []

    async def call() -> None:
        infos.append(_info(await client.get("/")))

    async with anyio.create_task_group() as tg:
        for _ in range(calls):
            tg.start_soon(call)

    retries = sum(info.attempts - 1 for info in infos)
    refused = sum(info.retry_stop == "budget" for info in infos)
    assert retries == allowed
    assert entered == calls + allowed
    assert refused >= calls - allowed // (policy.attempts - 1)
    assert harness.value("resilient_http_retry_budget_exhausted_total") == refused
    assert harness.value("resilient_http_retries_total", reason="status_503") == allowed


async def test_the_budget_recovers_as_the_window_slides(harness: Harness) -> None:
    """Once the window has passed, old calls and retries no longer count and retries are allowed again."""
    budget = RetryBudget(ratio=0.0, min_per_second=0.2, window=10)  # two retries per window
    script = Script(503)
    client = harness.client(script, _retrying(RetryPolicy(attempts=2, backoff=0.001, budget=budget)))
    stops = [_info(await client.get("/")).retry_stop for _ in range(4)]
    assert stops == ["attempts", "attempts", "budget", "budget"]
    assert harness.value("resilient_http_retry_budget_exhausted_total") == 2
    harness.clock.advance(5)
    assert _info(await client.get("/")).retry_stop == "budget"  # half a window: still spent
    harness.clock.advance(5.5)
    assert _info(await client.get("/")).retry_stop == "attempts"  # the first retries have slid out


async def test_calls_earn_retries_at_the_budget_ratio(harness: Harness) -> None:
    """With no per-second allowance, each call earns `ratio` of a retry."""
    budget = RetryBudget(ratio=0.25, min_per_second=0, window=10)
    script = Script(*([200] * 7), 503)
    client = harness.client(script, _retrying(RetryPolicy(attempts=2, backoff=0.001, budget=budget)))
    for _ in range(7):
        await client.get("/")
    # Calls 8, 9 and 10 have earned 2, 2.25 and 2.5 retries: the third retry is one too many.
    stops = [_info(await client.get("/")).retry_stop for _ in range(3)]
    assert stops == ["attempts", "attempts", "budget"]


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    window=st.sampled_from([0.3, 1.0, 2.5, 10.0]),
    start=st.sampled_from([0.0, 0.05, 1000.0, 1e6 + 0.3]),
    ratio=st.sampled_from([0.0, 0.2, 1.0]),
    min_per_second=st.sampled_from([0.0, 0.5]),
    steps=st.lists(
        st.tuples(
            st.sampled_from([0.0, 0.0, 0.01, 0.1, 0.25, 0.5, 1.0, 3.0, 20.0]),
            st.sampled_from(["deposit", "deposit", "withdraw", "refund"]),
        ),
        max_size=80,
    ),
)
def test_the_budget_counts_in_one_second_buckets_over_its_window(
    window: float, start: float, ratio: float, min_per_second: float, steps: list[tuple[float, str]]
) -> None:
    """Calls and retries count in bucket int(now / width), the window's latest buckets decide, shortcut or not."""
    policy = RetryBudget(ratio=ratio, min_per_second=min_per_second, window=window)
    budget = Budget(window)
    size = max(1, math.ceil(window))
    width = window / size
    calls: dict[int, int] = {}  # the plain model: epoch -> count
    retries: dict[int, int] = {}
    receipts: list[int | None] = []
    now = start
    for step, (seconds, action) in enumerate(steps):
        now += seconds * width
        epoch = int(now / width)
        if action == "deposit":
            budget.deposit(now)
            calls[epoch] = calls.get(epoch, 0) + 1
        elif action == "withdraw":
            earned = sum(n for seen, n in calls.items() if seen > epoch - size)
            spent = sum(n for seen, n in retries.items() if seen > epoch - size)
            allowed = spent + 1 <= ratio * earned + min_per_second * window
            receipt = budget.withdraw(now, policy)
            assert (receipt is not None) == allowed, f"step {step} at {now}"
            if allowed:
                assert receipt == epoch
                retries[epoch] = retries.get(epoch, 0) + 1
            receipts.append(receipt)
        elif receipts:
            receipt = receipts.pop()
            budget.refund(receipt)
            if receipt is not None and retries.get(receipt, 0) > 0:
                retries[receipt] -= 1


async def test_without_a_budget_retries_are_only_bounded_by_attempts(harness: Harness) -> None:
    """budget=None never refuses a retry."""
    client = harness.client(Script(503), _retrying(RetryPolicy(attempts=3, backoff=0.001, budget=None)))
    for _ in range(50):
        assert _info(await client.get("/")).retry_stop == "attempts"
    assert harness.value("resilient_http_retry_budget_exhausted_total") == 0


async def test_a_call_that_overrides_its_retry_policy_is_held_to_its_own_budget(harness: Harness) -> None:
    """A per-call RetryPolicy brings its budget: one that allows no retries stops the call after one attempt."""
    client = harness.client(Script(503), _retrying(RetryPolicy(attempts=3, backoff=0.001, budget=None)))
    stingy = RetryPolicy(attempts=3, backoff=0.001, budget=RetryBudget(ratio=0.0, min_per_second=0.0))
    response = await client.get("/", extensions={"resilient_http": {"retry": stingy}})
    assert (_info(response).attempts, _info(response).retry_stop) == (1, "budget")
    generous = await client.get("/")  # the host's own policy has no budget
    assert (_info(generous).attempts, _info(generous).retry_stop) == (3, "attempts")


# The story of the call


async def test_call_info_tells_attempts_and_waits_in_order(harness: Harness) -> None:
    """CallInfo lists every attempt and every wait with its reason, and no stop when the call succeeded."""
    script = Script(503, (503, {"Retry-After": "2"}), 200)
    response = await harness.client(script, _retrying(), seed=5).get("/")
    info = _info(response)
    assert info.attempts == 3
    assert [wait.reason for wait in info.waits] == ["backoff", "retry_after"]
    assert [wait.seconds for wait in info.waits] == harness.clock.sleeps
    assert info.retry_stop is None
    assert info.host == "api.example.com:443"
    assert info.stale is False


async def test_call_info_of_a_first_time_success(harness: Harness) -> None:
    """A call answered at once made one attempt and no wait."""
    info = _info(await harness.client(Script(200), _retrying()).get("/"))
    assert (info.attempts, info.waits, info.retry_stop) == (1, (), None)


async def test_the_budget_stop_is_reported(harness: Harness) -> None:
    """A retry refused by the budget ends the call with retry_stop == 'budget'."""
    budget = RetryBudget(ratio=0.0, min_per_second=0.0, window=1)
    response = await harness.client(Script(503), _retrying(RetryPolicy(budget=budget))).get("/")
    info = _info(response)
    assert (info.attempts, info.retry_stop, info.waits) == (1, "budget", ())


# A retry that is never sent


class HeldClock(FakeClock):
    """A fake clock whose sleeps never end while ``held``: a backoff the test can cancel."""

    def __init__(self) -> None:
        super().__init__()
        self.held = True

    async def sleep(self, seconds: float) -> None:
        if self.held:
            await anyio.sleep_forever()
        await super().sleep(seconds)


#: One retry per ten-second window, whatever the traffic.
ONE_RETRY = RetryBudget(ratio=0.0, min_per_second=0.1, window=10)


async def test_a_retry_the_rate_limiter_refuses_gives_its_budget_back(harness: Harness) -> None:
    """A retry charged to the budget, then refused by the rate limiter, leaves the budget as it was."""
    script = Script(503, 503, 200)
    policy = only(
        retry=RetryPolicy(attempts=2, backoff=0.01, budget=ONE_RETRY),
        rate_limit=RateLimitPolicy(rate=1, max_wait=0.5),
    )
    client = harness.client(script, policy)
    refused = await client.get("/")  # the retry's turn is a second away, past max_wait
    assert (_info(refused).attempts, _info(refused).retry_stop) == (1, "rate_limit")
    retried = await client.get("/", extensions={"resilient_http": {"rate_limit": None}})
    assert retried.status_code == 200
    assert (_info(retried).attempts, _info(retried).retry_stop) == (2, None)
    assert harness.value("resilient_http_retry_budget_exhausted_total") == 0


async def test_a_retry_cancelled_during_its_backoff_is_not_counted_and_gives_its_budget_back(
    harness: Harness,
) -> None:
    """A call cancelled while it waits to retry counts no retry, and the retry's budget is there for the next call."""
    clock = harness.clock = HeldClock()
    script = Script(503, 503, 200)
    client = harness.client(script, _retrying(RetryPolicy(attempts=2, backoff=0.01, budget=ONE_RETRY)))
    async with anyio.create_task_group() as tg:
        tg.start_soon(client.get, "/")
        await anyio.wait_all_tasks_blocked()
        assert script.calls == 1  # answered 503, now waiting out the backoff
        tg.cancel_scope.cancel()
    assert harness.value("resilient_http_retries_total", reason="status_503") == 0
    clock.held = False
    response = await client.get("/")
    assert (response.status_code, _info(response).attempts) == (200, 2)
    assert harness.value("resilient_http_retries_total", reason="status_503") == 1


async def test_a_retry_the_bulkhead_refuses_is_not_counted_and_gives_its_budget_back(harness: Harness) -> None:
    """A retry shed by a full bulkhead never reached the network: it is not a retry, and costs no budget."""
    go = anyio.Event()
    seen: dict[str, int] = {}

    async def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        seen[path] = seen.get(path, 0) + 1
        if path == "/hog":
            await anyio.sleep_forever()
        if path == "/a":
            await go.wait()
        return httpx.Response(503 if seen[path] == 1 else 200)

    policy = only(
        retry=RetryPolicy(attempts=2, backoff=0.01, budget=ONE_RETRY),
        bulkhead=BulkheadPolicy(max_concurrent=1, max_queue=1, queue_timeout=0.01),
    )
    client = harness.client(Script(handler), policy)
    refused = anyio.Event()

    async def call_a() -> None:
        with pytest.raises(BulkheadFullError):
            await client.get("/a")
        refused.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call_a)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(partial(client.get, "/hog", extensions={"resilient_http": {"retry": None}}))
            await anyio.wait_all_tasks_blocked()  # queued behind /a
            go.set()  # /a's 503 hands the slot to /hog; its retry waits in the queue, then gives up
            await refused.wait()
            tg.cancel_scope.cancel()
    assert seen["/a"] == 1
    assert harness.value("resilient_http_retries_total", reason="status_503") == 0
    response = await client.get("/c")
    assert (response.status_code, _info(response).attempts) == (200, 2)
