"""Numbers from servers: the bounded parsers, and the layers that read through them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from email.utils import formatdate

import anyio
import httpx
import pytest
from conftest import Harness, Script, only
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_http import (
    CallInfo,
    CircuitBreakerPolicy,
    CircuitOpenError,
    RateLimitedError,
    RateLimitPolicy,
    RetryPolicy,
    StaleCachePolicy,
    TimeoutPolicy,
    _headers,
)
from resilient_http._headers import (
    MAX_DELTA,
    _year_of,
    age_value,
    announces_quota,
    delta_seconds,
    fields,
    http_date,
    non_negative,
    pick,
    quota,
    retry_after,
)

WALL = 1_700_000_000.0  # 2023-11-14, the FakeClock's wall time
NOV_6_1994 = 784111777.0  # Sun, 06 Nov 1994 08:49:37 GMT, the example of RFC 9110


def _info(response: httpx.Response) -> CallInfo:
    info = response.extensions["resilient_http"]
    assert isinstance(info, CallInfo)
    return info


# delta-seconds


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("5", 5.0),
        (" 5\t", 5.0),
        ("007", 7.0),
        ("0" * 5000 + "7", 7.0),
        ("2147483647", 2147483647.0),
        ("2147483648", float(MAX_DELTA)),
        ("2147483649", float(MAX_DELTA)),
        ("99999999999", float(MAX_DELTA)),
        ("9" * 5000, float(MAX_DELTA)),  # int() would refuse it; float() would make it inf
    ],
)
def test_delta_seconds_are_ascii_digits_clamped_at_2_to_the_31(text: str, seconds: float) -> None:
    """Digits (spaces or tabs around) are seconds; past 2^31 they are 2^31 (RFC 9111 §1.2.2)."""
    assert delta_seconds(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        *("", " ", "-1", "-0", "+5", "1.5", "1e3", "inf", "nan", "0x10", "1_000", "5 5", "5,", "5\n", "\x005", "5\x00"),
        *("\u0663", "\uff15", "\u00b2", "\u00a05"),  # Arabic-Indic 3, fullwidth 5, superscript 2, no-break space
    ],
)
def test_anything_but_digits_is_not_delta_seconds(text: str) -> None:
    """Signs, fractions, exponents, non-ASCII digits, NUL and inner spaces make the value malformed."""
    assert delta_seconds(text) is None


def test_a_count_is_clamped_at_its_ceiling() -> None:
    """non_negative reads the same digits as delta-seconds, up to any ceiling."""
    assert non_negative("1048577", 1048577) == 1048577
    assert non_negative("1048578", 1048577) == 1048577
    assert non_negative("٣", 10) is None


# HTTP-dates


@pytest.mark.parametrize(
    "text",
    [
        "Sun, 06 Nov 1994 08:49:37 GMT",
        "Sunday, 06-Nov-94 08:49:37 GMT",
        "Sun Nov  6 08:49:37 1994",
        " Sun Nov  6 08:49:37 1994\t",
    ],
    ids=["imf-fixdate", "rfc850", "asctime", "asctime-padded"],
)
def test_all_three_http_date_forms_are_read(text: str) -> None:
    """IMF-fixdate, the obsolete RFC 850 form and asctime name the same instant (RFC 9110 §5.6.7)."""
    assert http_date(text, WALL) == NOV_6_1994


@given(st.integers(min_value=-62135596800, max_value=253402300799))
@settings(max_examples=300, deadline=None, derandomize=True, database=None)
def test_imf_fixdate_reads_back_what_formatdate_writes(timestamp: int) -> None:
    """Any second from year 1 to 9999, written as an IMF-fixdate, reads back exactly."""
    assert http_date(formatdate(timestamp, usegmt=True), WALL) == timestamp


@pytest.mark.parametrize(
    ("text", "timestamp"),
    [
        ("Fri, 31 Dec 9999 23:59:59 GMT", 253402300799.0),
        ("Sat, 01 Jan 0000 00:00:00 GMT", -62167219200.0),  # proleptic Gregorian year 0
        ("Thu, 29 Feb 2024 00:00:00 GMT", 1709164800.0),
        ("Sat, 31 Dec 2016 23:59:60 GMT", 1483228800.0),  # a leap second is the next minute's first
        ("Mon, 01 Jan 2024 00:00:00 GMT", 1704067200.0),  # the day name is not checked
    ],
)
def test_every_valid_date_of_years_0000_to_9999_is_a_finite_timestamp(text: str, timestamp: float) -> None:
    """Extreme years, leap days and leap seconds read as what they say."""
    assert http_date(text, WALL) == timestamp


@pytest.mark.parametrize(
    "text",
    [
        "Fri, 30 Feb 2024 00:00:00 GMT",
        "Thu, 29 Feb 2023 00:00:00 GMT",
        "Thu, 31 Apr 2024 00:00:00 GMT",
        "Thu, 00 Jan 2024 00:00:00 GMT",
        "Thu, 01 Jan 2024 24:00:00 GMT",
        "Thu, 01 Jan 2024 00:60:00 GMT",
        "Thu, 01 Jan 2024 00:00:61 GMT",
        "Thu, 01 Jan 2024 00:00:00 gmt",  # HTTP-date is case-sensitive
        "thu, 01 Jan 2024 00:00:00 GMT",
        "Thu, 01 jan 2024 00:00:00 GMT",
        "Thu, 01 Jan 2024 00:00:00 UTC",
        "Thu, 01 Jan 2024 00:00:00 +0000",  # email.utils reads these four; RFC 9110 does not
        "Thu, 1 Jan 2024 00:00:00 GMT",
        "01 Jan 2024 00:00:00 GMT",
        "Thu, 01 Jan 24 00:00:00 GMT",
        "Thu, 01 Jan 12024 00:00:00 GMT",
        "Thu, \u0660\u0661 Jan 2024 00:00:00 GMT",
        "Thu, 01 Jan 2024 00:00:00 GMT\x00",
        "Thu, 01 Jan 2024 00:00:00 GMT\n",
        "Thu,  01 Jan 2024 00:00:00 GMT",
        "Thursday, 01-Jan-2024 00:00:00 GMT",
        "Thu, 01-Jan-24 00:00:00 GMT",
        "Thu Jan 01 00:00:00 2024 GMT",
        "Thu Jan 1 00:00:00 2024",
        "",
        "Thu, 01 Jan 2024 00:00:00 GMT" + " " * 10 + "x",
    ],
)
def test_anything_outside_the_three_forms_is_not_a_date(text: str) -> None:
    """Impossible dates, other zones, other spellings and stray characters are malformed."""
    assert http_date(text, WALL) is None


@pytest.mark.parametrize(
    ("two_digits", "year"),
    [("94", 1994), ("23", 2023), ("73", 2073), ("74", 1974), ("00", 2000)],
)
def test_an_rfc850_year_is_never_more_than_50_years_ahead(two_digits: str, year: int) -> None:
    """A two-digit year that would be more than 50 years in the future is the century before."""
    date = http_date(f"Monday, 01-Jan-{two_digits} 00:00:00 GMT", WALL)
    assert date == http_date(f"Mon, 01 Jan {year} 00:00:00 GMT", WALL)


def test_an_rfc850_year_near_a_century_turn_is_placed_by_the_50_year_rule() -> None:
    """In 2080, '20' is 2120 (40 years ahead), not 2020; '31' is 2031 (2131 is 51 years ahead)."""
    in_2080 = http_date("Mon, 01 Jul 2080 00:00:00 GMT", WALL)
    assert in_2080 is not None
    assert http_date("Monday, 01-Jan-20 00:00:00 GMT", in_2080) == http_date("Mon, 01 Jan 2120 00:00:00 GMT", WALL)
    assert http_date("Monday, 01-Jan-31 00:00:00 GMT", in_2080) == http_date("Mon, 01 Jan 2031 00:00:00 GMT", WALL)


@given(st.integers(min_value=-62135596800, max_value=253402300799))
@settings(max_examples=300, deadline=None, derandomize=True, database=None)
def test_the_year_of_a_time_is_its_utc_year(timestamp: int) -> None:
    """The year RFC 850 dates are placed against is the calendar's, around New Year included."""
    assert _year_of(timestamp) == datetime.fromtimestamp(timestamp, UTC).year
    assert _year_of(timestamp + 0.5) == datetime.fromtimestamp(timestamp, UTC).year


# Retry-After and Date


def _after(*headers: tuple[str, str]) -> float | None:
    return retry_after(httpx.Headers(list(headers)), WALL)


def test_retry_after_in_the_far_future_is_clamped() -> None:
    """A date in year 9999, or a Date header in year 0000, asks for 2^31 s at most."""
    assert _after(("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT")) == MAX_DELTA
    assert (
        _after(("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT"), ("date", "Sat, 01 Jan 0000 00:00:00 GMT")) == MAX_DELTA
    )


def test_retry_after_in_the_past_is_now() -> None:
    """A date before the response's Date (or before now) asks for no wait."""
    assert _after(("retry-after", "Sat, 01 Jan 0000 00:00:00 GMT")) == 0.0


def test_a_repeated_retry_after_counts_only_when_its_copies_agree() -> None:
    """Two identical Retry-After fields are one; two different ones are ignored, not guessed between."""
    assert _after(("retry-after", "5"), ("retry-after", "5")) == 5.0
    assert _after(("retry-after", "5"), ("retry-after", "6")) is None


def test_a_date_header_whose_copies_disagree_is_ignored() -> None:
    """A Retry-After date is then measured from our own wall clock."""
    date = formatdate(WALL + 7, usegmt=True)
    headers = [("retry-after", date), ("date", formatdate(WALL, usegmt=True)), ("date", formatdate(0, usegmt=True))]
    assert _after(*headers) == 7.0


def test_age_reads_its_first_member() -> None:
    """A list-based Age uses its first member (RFC 9111 §5.1); an invalid one is ignored."""
    assert age_value("5, 10") == 5.0
    assert age_value("x, 5") is None
    assert age_value("9" * 400) == MAX_DELTA
    assert age_value(None) is None


# RateLimit fields


def _quota(**headers: str) -> tuple[int, int] | None:
    return quota(httpx.Headers({name.replace("_", "-"): value for name, value in headers.items()}))


def test_ratelimit_seconds_are_clamped_at_2_to_the_31() -> None:
    """t and w up to 15 digits (an sf-integer) are read, and clamped like delta-seconds."""
    assert _quota(ratelimit='"q";r=0;t=999999999999999') == (0, MAX_DELTA)
    assert _quota(ratelimit='"q";r=999999999999999;t=10') == (999999999999999, 10)
    assert _quota(ratelimit='"q";r=0', ratelimit_policy='"q";q=1;w=999999999999999') == (0, MAX_DELTA)
    assert _quota(ratelimit_remaining="0", ratelimit_reset="999999999999999") == (0, MAX_DELTA)


def test_an_overlong_ratelimit_field_is_ignored_unread() -> None:
    """A field longer than 4 KiB is malformed, however well formed its members."""
    many = ", ".join(f'"p{i}";r=5;t=10' for i in range(400))
    assert _quota(ratelimit=many) is None
    assert _quota(ratelimit=many[:200].rpartition(",")[0]) == (5, 10)


# The layers, reading through the parsers


async def test_a_retry_after_of_400_digits_pauses_the_host_without_hanging(harness: Harness) -> None:
    """The rate limiter's cooldown is max_cooldown, not infinite: later calls fail at once with a finite retry_after."""
    policy = only(rate_limit=RateLimitPolicy(rate=10), timeout=TimeoutPolicy(attempt=5, total=30))
    client = harness.client(Script((429, {"Retry-After": "9" * 400}), 200), policy)
    assert (await client.get("/")).status_code == 429
    with anyio.fail_after(10), pytest.raises(RateLimitedError) as refused:  # a guard: it used to spin on NaN
        await client.get("/")
    # max_cooldown, then the token the first call took: the bucket does not refill during a cooldown.
    assert refused.value.retry_after == pytest.approx(RateLimitPolicy(rate=10).max_cooldown + 1 / 10)
    assert harness.clock.sleeps == []


@pytest.mark.parametrize(
    "retry_after",
    ["Sunday, 06-Nov-94 08:49:47 GMT", "Sun Nov  6 08:49:47 1994"],
    ids=["rfc850", "asctime"],
)
async def test_retry_after_in_the_obsolete_date_forms_is_honoured(harness: Harness, retry_after: str) -> None:
    """A Retry-After in the RFC 850 or asctime form, 10 s after the response's Date, waits 10 s."""
    policy = RetryPolicy(attempts=2, backoff=0.1, budget=None)
    headers = {"Date": "Sun, 06 Nov 1994 08:49:37 GMT", "Retry-After": retry_after}
    response = await harness.client(Script((503, headers), 200), only(retry=policy)).get("/")
    assert response.status_code == 200
    [slept] = harness.clock.sleeps
    assert 10.0 <= slept <= 10.1
    assert _info(response).waits[0].reason == "retry_after"


async def test_a_503_with_a_huge_retry_after_opens_the_circuit_for_the_policy_maximum(harness: Harness) -> None:
    """The breaker takes the server's hint only up to max_break_duration."""
    breaker = CircuitBreakerPolicy(minimum_calls=1, break_duration=5, max_break_duration=60)
    client = harness.client(Script((503, {"Retry-After": "9" * 5000}), 200), only(circuit_breaker=breaker))
    await client.get("/")
    harness.clock.advance(59)
    with pytest.raises(CircuitOpenError):
        await client.get("/")
    harness.clock.advance(1)
    assert (await client.get("/")).status_code == 200


async def test_huge_cache_numbers_still_serve_a_stale_answer_with_a_finite_age(harness: Harness) -> None:
    """max-age, stale-if-error and Age of 400 digits are 2^31 each: the answer is served, aged 2^31 s."""
    huge = "9" * 400
    first = httpx.Response(200, headers={"Cache-Control": f"max-age={huge}, stale-if-error={huge}", "Age": huge})
    script = Script(lambda request: first, 503)
    client = harness.client(script, only(stale_cache=StaleCachePolicy()))
    await client.get("/")
    stale = await client.get("/")
    assert stale.status_code == 200
    assert stale.headers["age"] == str(MAX_DELTA)
    assert _info(stale).stale


async def test_a_non_ascii_content_length_is_streamed_not_fatal(harness: Harness) -> None:
    """A Content-Length of '²' (a digit to str.isdigit, not to int) leaves the body streamed to the caller."""

    async def body() -> AsyncIterator[bytes]:
        yield b"ok"

    for length in ["\u00b2", "9" * 5000]:
        answer = httpx.Response(200, headers=[(b"content-length", length.encode())], content=body())
        response = await harness.client(Script(lambda request, a=answer: a), only(timeout=TimeoutPolicy())).get("/")
        assert response.status_code == 200


# Reading header fields: httpx's own triples, or its public API


@pytest.mark.parametrize("triples", [True, False], ids=["httpx internals", "public API"])
def test_header_fields_read_the_same_either_way(triples: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """pick, announces_quota and fields answer alike from httpx's (raw, lower, value) triples and from Headers.raw."""
    monkeypatch.setattr(_headers, "TRIPLES", triples)
    headers = httpx.Headers([("Host", "a.example"), ("RateLimit-Remaining", "1"), ("X-A", "1"), ("x-a", "2")])
    assert pick(headers, frozenset({b"host", b"x-a", b"cookie"})) == {b"host": "a.example", b"x-a": "1, 2"}
    assert announces_quota(headers)
    assert not announces_quota(httpx.Headers([("RateLimit-Policy", '"a";q=5;w=1'), ("X-RateLimit-Remaining", "0")]))
    assert fields(headers) == fields(httpx.Headers(headers.raw))
    assert fields(headers) != fields(httpx.Headers([*headers.raw[:3], (b"x-a", b"3")]))
    assert fields(headers) != fields(httpx.Headers([(b"HOST", b"a.example"), *headers.raw[1:]]))
