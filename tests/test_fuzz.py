"""Hostile numbers from servers: every header parser, and the whole chain, against generated input.

Deterministic (``derandomize=True``) and bounded (``max_examples``), so that
CI sees the same few hundred inputs every run, in a few seconds.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator

import anyio
import httpx
import trio
import trio.testing
from hypothesis import example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from resilient_http import (
    BulkheadPolicy,
    CircuitBreakerPolicy,
    Policy,
    RateLimitPolicy,
    ResilientTransport,
    RetryPolicy,
    StaleCachePolicy,
    TimeoutPolicy,
    call_info,
)
from resilient_http._headers import MAX_DELTA, age_value, delta_seconds, http_date, non_negative, quota, retry_after
from resilient_http.testing import FakeClock

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None)
TOTAL = 30.0

# Numbers as hostile servers write them: huge, signed, fractional, exponent,
# non-ASCII digits, padded, with NUL and control characters.
_HUGE = st.sampled_from(["2147483648", "9" * 20, "9" * 400, "9" * 5000, "1" + "0" * 309, "0" * 400 + "1"])
_DIGITS = st.one_of(st.sampled_from(["0", "1", "7", "60"]), _HUGE)
_ODD_NUMBERS = st.sampled_from(
    [
        "-1",
        "-0",
        "+5",
        "1.5",
        "1e9",
        "1e999",
        "inf",
        "nan",
        "Infinity",
        "0x10",
        "1_000",
        "\u0661\u0662",
        "\uff15",
        "\u00b2",
        "1\x00",
        " 1 ",
    ]
)
NUMBERS = st.one_of(
    _HUGE,
    _DIGITS,
    _ODD_NUMBERS,
    st.integers(min_value=-(10**20), max_value=10**40).map(str),
    st.tuples(
        st.sampled_from(["", " ", "\t", "\x00", "\n"]), _DIGITS, st.sampled_from(["", " ", "\t", ",", "\x00"])
    ).map("".join),
)

_DAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


@st.composite
def near_dates(draw: st.DrawFn) -> str:
    """HTTP-dates in the three forms of RFC 9110, with every part possibly out of range."""
    day = draw(st.sampled_from([*_DAYS, "Monday", "Xyz", "mon"]))
    mday = draw(st.integers(0, 99))
    month = draw(st.sampled_from([*_MONTHS, "Foo", "jan"]))
    year = draw(st.sampled_from([0, 1, 69, 70, 99, 1900, 1970, 2024, 2038, 2100, 9999]))
    hour, minute, second = draw(st.integers(0, 99)), draw(st.integers(0, 99)), draw(st.integers(0, 99))
    clock = f"{hour:02}:{minute:02}:{second:02}"
    form = draw(st.sampled_from(["imf", "rfc850", "asctime"]))
    if form == "imf":
        return f"{day}, {mday:02} {month} {year:04} {clock} GMT"
    if form == "rfc850":
        return f"{day}day, {mday:02}-{month}-{year % 100:02} {clock} GMT"
    return f"{day} {month} {mday:2} {clock} {year:04}"


HOSTILE = st.one_of(
    NUMBERS,
    near_dates(),
    st.text(max_size=40),
    st.binary(max_size=40).map(lambda raw: raw.decode("latin-1")),
)

_QUOTA = st.builds(
    lambda name, r, t, w: f'"{name}";r={r};t={t}' + (f', "{name}";r={r};w={w}' if w else ""),
    st.sampled_from(["default", "q"]),
    NUMBERS,
    NUMBERS,
    st.one_of(st.just(""), NUMBERS),
)
_CACHE_CONTROL = st.lists(
    st.builds(
        lambda name, value: f"{name}={value}",
        st.sampled_from(["max-age", "s-maxage", "stale-if-error"]),
        st.one_of(_HUGE, NUMBERS),
    ),
    max_size=3,
).map(", ".join)

_VALUES = {
    "retry-after": st.one_of(_HUGE, NUMBERS, near_dates(), HOSTILE),
    "date": st.one_of(near_dates(), HOSTILE),
    "age": st.one_of(_HUGE, NUMBERS, HOSTILE),
    "cache-control": st.one_of(_CACHE_CONTROL, HOSTILE),
    "ratelimit": st.one_of(_QUOTA, HOSTILE),
    "ratelimit-policy": st.one_of(_QUOTA, HOSTILE),
    "ratelimit-remaining": st.one_of(NUMBERS, HOSTILE),
    "ratelimit-reset": st.one_of(NUMBERS, HOSTILE),
    "content-length": NUMBERS,
}
HEADER = st.one_of(*(st.tuples(st.just(name), values) for name, values in _VALUES.items()))


def _everywhere(number: str) -> list[tuple[str, str]]:
    """One hostile number in every field that holds one, as a server with one bug in its arithmetic sends."""
    return [
        ("retry-after", number),
        ("age", number),
        ("cache-control", f"max-age={number}, s-maxage={number}, stale-if-error={number}"),
        ("ratelimit", f'"q";r={number};t={number}'),
        ("ratelimit-policy", f'"q";q={number};w={number}'),
        ("ratelimit-remaining", number),
        ("ratelimit-reset", number),
    ]


HEADERS = st.one_of(
    # Each header at most once, any of them possibly; then a few more, so that some come twice.
    st.tuples(st.fixed_dictionaries({}, optional=_VALUES), st.lists(HEADER, max_size=2)).map(
        lambda found: [*found[0].items(), *found[1]]
    ),
    NUMBERS.map(_everywhere),
)
ANSWER = st.tuples(HEADERS, st.booleans())  # headers, and whether the body is streamed (not held in memory)
#: The statuses the server cycles through, whatever the headers: every hostile header meets each of them.
STATUSES = st.permutations([200, 429, 503, 500])


def _chain_policy() -> Policy:
    return Policy(
        timeout=TimeoutPolicy(attempt=10.0, total=TOTAL),
        retry=RetryPolicy(attempts=4, max_retry_after=31_536_000, budget=None),
        circuit_breaker=CircuitBreakerPolicy(minimum_calls=2, failure_ratio=0.5),
        rate_limit=RateLimitPolicy(rate=10.0, burst=2),
        bulkhead=BulkheadPolicy(max_concurrent=2, max_queue=10),
        stale_cache=StaleCachePolicy(max_stale=31_536_000),
    )


def _response(status: int, headers: list[tuple[str, str]], streamed: bool) -> httpx.Response:
    raw = [(name.encode(), value.encode("utf-8", "surrogatepass")) for name, value in headers]
    if not streamed:
        return httpx.Response(status, headers=raw, content=b"body")

    return httpx.Response(status, headers=raw, stream=_OneChunk())


class _OneChunk(httpx.AsyncByteStream):
    """A streamed body of one chunk whose iterator closes with it (an async generator given as content would not)."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"body"


Answer = tuple[list[tuple[str, str]], bool]


MAX_SLEEPS = 1000  # far more than 4 calls of 4 attempts can need: beyond it, a call is spinning


class SequentialClock(FakeClock):
    """The FakeClock, failing a call that keeps sleeping instead of letting it spin forever.

    Right for calls made one after the other: its every sleep moves time for
    all tasks, so concurrent sleeps would add up instead of overlapping.
    """

    async def sleep(self, seconds: float) -> None:
        assert len(self.sleeps) < MAX_SLEEPS, "the chain keeps sleeping: a call would never end"
        await super().sleep(seconds)


class ConcurrentClock:
    """Virtual time that stays right for concurrent calls: trio's MockClock jumps to the next deadline."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    def now(self) -> float:
        return trio.current_time()

    def wall(self) -> float:
        return 1_700_000_000.0 + trio.current_time()

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        assert len(self.sleeps) < MAX_SLEEPS, "the chain keeps sleeping: a call would never end"
        await trio.sleep(seconds)


async def _run_calls(
    answers: list[Answer], statuses: tuple[int, ...], clock: SequentialClock | ConcurrentClock
) -> None:
    """Four calls through the whole chain; each must end in a response or an httpx.HTTPError in time.

    Request *i* gets the headers of ``answers[i % n]`` with ``statuses[(i + i // n) % 4]``, so that
    each set of headers comes with every status in turn. The calls are made one after the other on
    the FakeClock, or all at once under trio's virtual time.
    """
    requests = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal requests
        headers, streamed = answers[requests % len(answers)]
        status = statuses[(requests + requests // len(answers)) % len(statuses)]
        requests += 1
        return _response(status, headers, streamed)

    transport = ResilientTransport(
        default=_chain_policy(),
        inner=httpx.MockTransport(handler),
        registry=CollectorRegistry(),
        clock=clock,
        random=random.Random(0),
    )

    async def one(client: httpx.AsyncClient, path: str) -> None:
        started = clock.now()
        try:
            response = await client.get(path)
        except httpx.HTTPError as exc:
            hint = getattr(exc, "retry_after", None)
            # A refusal's hint is the server's (at most 2^31 s) plus this side's queue: finite, never negative.
            assert hint is None or 0 <= hint <= 2 * MAX_DELTA, hint
            info = call_info(exc)
        else:
            info = call_info(response)
            assert info is not None
            assert info.age is None or 0 <= info.age <= 2 * MAX_DELTA + TOTAL, info.age
        elapsed = clock.now() - started
        assert math.isfinite(elapsed) and elapsed <= TOTAL + 1e-6, (path, elapsed)
        if info is not None:
            assert all(0 <= wait.seconds <= TOTAL for wait in info.waits), info.waits

    async with httpx.AsyncClient(transport=transport, base_url="https://fuzz.example") as client:
        if isinstance(clock, ConcurrentClock):
            async with anyio.create_task_group() as group:
                for i in range(4):
                    group.start_soon(one, client, f"/{i % 2}")
        else:
            for i in range(4):
                await one(client, f"/{i % 2}")
    assert all(math.isfinite(s) and 0 <= s <= TOTAL for s in clock.sleeps), clock.sleeps


@FUZZ
@given(answers=st.lists(ANSWER, min_size=1, max_size=3), statuses=STATUSES, concurrent=st.booleans())
@example(answers=[([("retry-after", "9" * 400)], False)], statuses=[429, 200, 503, 500], concurrent=False)
@example(answers=[([("retry-after", "1" + "0" * 309)], False)], statuses=[503, 200, 429, 500], concurrent=True)
@example(
    answers=[([("cache-control", f"max-age={'9' * 400}, stale-if-error={'9' * 400}"), ("age", "9" * 400)], False)],
    statuses=[200, 503, 429, 500],
    concurrent=False,
)
@example(answers=[([("content-length", "\u00b2")], True)], statuses=[200, 429, 503, 500], concurrent=False)
@example(answers=[([("content-length", "9" * 5000)], True)], statuses=[200, 429, 503, 500], concurrent=False)
def test_the_chain_ends_every_call_in_time_whatever_the_headers(
    answers: list[Answer], statuses: list[int], concurrent: bool
) -> None:
    """All six layers over hostile answers: a response or an httpx.HTTPError, within the total timeout."""
    if concurrent:
        clock = ConcurrentClock()
        trio.run(_run_calls, answers, tuple(statuses), clock, clock=trio.testing.MockClock(autojump_threshold=0))
    else:
        asyncio.run(_run_calls(answers, tuple(statuses), SequentialClock()))


# Every parser, alone: total (never raises) and bounded (None or a finite number in range).

YEAR_0000 = -62167219200.0
YEAR_10000 = 253402300800.0  # the first second after 9999-12-31 23:59:59, reached by a leap second


@FUZZ
@given(text=HOSTILE)
def test_numbers_are_none_or_bounded_whole_seconds(text: str) -> None:
    """delta_seconds, non_negative and age_value never raise, and stay within [0, 2^31]."""
    for value in (delta_seconds(text), age_value(text), non_negative(text, MAX_DELTA)):
        assert value is None or (0 <= value <= MAX_DELTA and value == int(value)), value


@FUZZ
@given(text=st.one_of(near_dates(), HOSTILE), wall_now=st.floats(allow_nan=True, allow_infinity=True))
def test_dates_are_none_or_within_years_0000_to_9999(text: str, wall_now: float) -> None:
    """http_date never raises, whatever the text and even on a wall clock that is not finite."""
    when = http_date(text, wall_now)
    assert when is None or YEAR_0000 <= when <= YEAR_10000, when


def _headers(fields: list[tuple[str, str]]) -> httpx.Headers:
    return httpx.Headers([(name.encode(), value.encode("utf-8", "surrogatepass")) for name, value in fields])


@FUZZ
@given(fields=HEADERS, wall_now=st.floats(min_value=0, max_value=4e9))
def test_header_readers_are_none_or_bounded(fields: list[tuple[str, str]], wall_now: float) -> None:
    """retry_after and quota never raise: a wait within [0, 2^31], a count and a reset within bounds."""
    headers = _headers(fields)
    wait = retry_after(headers, wall_now)
    assert wait is None or 0 <= wait <= MAX_DELTA, wait
    found = quota(headers)
    if found is not None:
        remaining, reset = found
        assert 0 <= remaining < 10**15 and 0 <= reset <= MAX_DELTA, found
