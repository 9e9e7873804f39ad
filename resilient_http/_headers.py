"""Reading the numbers servers send: bounded, total, and never trusted.

``Retry-After``, ``Date``, ``Age``, the ``Cache-Control`` delta-seconds and
the ``RateLimit`` fields come from servers that may be buggy or hostile.
Every one is read here, by parsers that never raise for any ``str`` and
return either ``None`` (the value is ignored) or a finite number within
bounds: a server cannot make a call hang, overflow a float time or fail
with ``ValueError``.

- **delta-seconds** (RFC 9110 §10.2.3, RFC 9111 §1.2.2) are ASCII digits
  and nothing else, surrounded by optional spaces or tabs; larger values
  are clamped at 2^31 (``MAX_DELTA``) without converting a long digit
  string. A sign, a fraction, an exponent or a non-ASCII digit makes the
  value malformed.
- **HTTP-dates** (RFC 9110 §5.6.7) are read in their three forms, exactly
  and case-sensitively as the grammar has them: IMF-fixdate
  (``Sun, 06 Nov 1994 08:49:37 GMT``), the obsolete RFC 850 form
  (``Sunday, 06-Nov-94 08:49:37 GMT``, its two-digit year taken as the
  nearest year not more than 50 years ahead) and asctime
  (``Sun Nov  6 08:49:37 1994``). Impossible dates (Feb 30, hour 24) are
  malformed; the day name is not checked against the date. Years 0000 to
  9999 are all read, so every date is a finite number of seconds.
- **Repeated fields**: a singleton field (``Retry-After``, ``Date``) sent
  more than once is read only if every copy says the same; ``Age`` follows
  RFC 9111 §5.1 (its first member). The ``RateLimit`` fields are Lists,
  whose copies join.
"""

from __future__ import annotations

import re

import httpx

#: The largest delta-seconds (RFC 9111 §1.2.2): about 68 years.
MAX_DELTA = 2**31
_OWS = " \t"
_MAX_FIELD = 4096  # a RateLimit field longer than this is ignored unread


def non_negative(text: str, ceiling: int) -> int | None:
    """``1*DIGIT`` (ASCII digits, optional spaces or tabs around) clamped at ``ceiling``, or ``None``."""
    text = text.strip(_OWS)
    if not (text.isascii() and text.isdigit()):
        return None
    text = text.lstrip("0")
    if len(text) > len(str(ceiling)):  # never convert a long digit string
        return ceiling
    return min(int(text or "0"), ceiling)


def delta_seconds(text: str) -> float | None:
    """Seconds as delta-seconds, clamped at :data:`MAX_DELTA`; ``None`` when malformed."""
    value = non_negative(text, MAX_DELTA)
    return None if value is None else float(value)


_DAY = "(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_MONTHS = {name: i for i, name in enumerate("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), 1)}
_MONTH = f"({'|'.join(_MONTHS)})"
_TIME = "([0-9]{2}):([0-9]{2}):([0-9]{2})"
_IMF = re.compile(rf"{_DAY}, ([0-9]{{2}}) {_MONTH} ([0-9]{{4}}) {_TIME} GMT")
_RFC850 = re.compile(rf"(?:Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day, ([0-9]{{2}})-{_MONTH}-([0-9]{{2}}) {_TIME} GMT")
_ASCTIME = re.compile(rf"{_DAY} {_MONTH} ([0-9]{{2}}| [0-9]) {_TIME} ([0-9]{{4}})")
_LONGEST_DATE = len("Wednesday, 06-Nov-94 08:49:37 GMT")


def http_date(text: str, wall_now: float) -> float | None:
    """An HTTP-date as seconds since the epoch, or ``None``; ``wall_now`` places RFC 850's two-digit years."""
    text = text.strip(_OWS)
    if len(text) > _LONGEST_DATE:
        return None
    if (match := _IMF.fullmatch(text)) is not None:
        day, month, year, hour, minute, second = match.groups()
        full_year = int(year)
    elif (match := _ASCTIME.fullmatch(text)) is not None:
        month, day, hour, minute, second, year = match.groups()
        full_year = int(year)
    elif (match := _RFC850.fullmatch(text)) is not None:
        day, month, year, hour, minute, second = match.groups()
        now_year = _year_of(wall_now)
        full_year = now_year + (int(year) - now_year) % 100  # within [now, now + 99]
        if full_year > now_year + 50:
            full_year -= 100
    else:
        return None
    return _timestamp(full_year, _MONTHS[month], int(day), int(hour), int(minute), int(second))


def _timestamp(year: int, month: int, day: int, hour: int, minute: int, second: int) -> float | None:
    """Seconds since the epoch of a proleptic Gregorian UTC time, or ``None`` if there is no such time."""
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    days_in_month = (31, 29 if leap else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)[month - 1]
    if not 1 <= day <= days_in_month or hour > 23 or minute > 59 or second > 60:  # 60: a leap second
        return None
    # Days from 1970-01-01 (H. Hinnant's days_from_civil), exact for every year.
    y = year - (month <= 2)
    era, yoe = divmod(y, 400)
    doy = (153 * (month - 3 if month > 2 else month + 9) + 2) // 5 + day - 1
    days = era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468
    return float(days * 86400 + hour * 3600 + minute * 60 + second)


def _year_of(timestamp: float) -> int:
    """The UTC year of a time (H. Hinnant's civil_from_days); 1970 for a time that is not finite."""
    if not -1e15 < timestamp < 1e15:  # NaN included
        return 1970
    era, doe = divmod(int(timestamp // 86400) + 719468, 146097)
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    return era * 400 + yoe + ((5 * doy + 2) // 153 >= 10)  # January and February count in the next year


def singleton(headers: httpx.Headers, name: str) -> str | None:
    """The value of a field that must appear once; ``None`` when absent or repeated with different values."""
    values = headers.get_list(name)
    if not values or any(value != values[0] for value in values):
        return None
    return values[0]


def retry_after(headers: httpx.Headers, wall_now: float) -> float | None:
    """Seconds to wait according to ``Retry-After`` (RFC 9110 §10.2.3), or ``None``.

    Both forms are read: delay-seconds, and an HTTP-date. A date is measured
    against the response's own ``Date`` header when it has one, which cancels
    any skew between the server's clock and ours; a date in the past means
    now (0). The result is between 0 and :data:`MAX_DELTA`. Anything
    malformed is ``None``: the server's hint is ignored.
    """
    value = singleton(headers, "retry-after")
    if value is None:
        return None
    seconds = delta_seconds(value)
    if seconds is not None:
        return seconds
    when = http_date(value, wall_now)
    if when is None:
        return None
    date = singleton(headers, "date")
    sent = None if date is None else http_date(date, wall_now)
    wait = when - (wall_now if sent is None else sent)
    return min(float(MAX_DELTA), wait) if wait > 0 else 0.0  # NaN (a NaN wall clock) is 0


def age_value(value: str | None) -> float | None:
    """The ``Age`` field (RFC 9111's age_value): its first member (RFC 9111 §5.1) as delta-seconds, or ``None``."""
    return None if value is None else delta_seconds(value.partition(",")[0])


# RFC 8941 structured fields, as much as the RateLimit fields use: a List of
# Items with parameters. Anything else in a field makes the whole field malformed.
_KEY = r"[a-z*][a-z0-9_.*-]*"
_BARE = r'"(?:[^"\\]|\\["\\])*"|-?[0-9]+(?:\.[0-9]+)?|\?[01]|[A-Za-z*][A-Za-z0-9!#$%&\'*+.^_`|~:/-]*'
_MEMBER = re.compile(rf"[ \t]*({_BARE})((?:;[ ]*{_KEY}(?:=(?:{_BARE}))?)*)[ \t]*(,|\Z)")
_PARAM = re.compile(rf";[ ]*({_KEY})(?:=({_BARE}))?")
_COUNT = re.compile(r"[0-9]{1,15}")  # a non-negative sf-integer

_Item = tuple[str, dict[str, str]]


def _items(value: str) -> list[_Item] | None:
    """The members of a List field as (bare item, parameters), or ``None`` if it is malformed."""
    if len(value) > _MAX_FIELD:
        return None
    items: list[_Item] = []
    pos = 0
    while True:
        match = _MEMBER.match(value, pos)
        if match is None:
            return None
        params = {key: raw or "?1" for key, raw in _PARAM.findall(match.group(2))}
        items.append((match.group(1).strip('"'), params))
        if not match.group(3):
            return items
        pos = match.end()


def _count(raw: str | None) -> int | None:
    return int(raw) if raw is not None and _COUNT.fullmatch(raw) else None


def _delta(raw: str | None) -> int | None:
    """Seconds as a non-negative sf-integer, clamped at :data:`MAX_DELTA`."""
    count = _count(raw)
    return None if count is None else min(count, MAX_DELTA)


def _single(headers: httpx.Headers, name: str) -> str | None:
    value = headers.get(name)
    items = None if value is None else _items(value)
    return items[0][0] if items is not None and len(items) == 1 else None


#: The fields :func:`quota` starts from: without either, an answer announces no quota.
_QUOTA_FIELDS = frozenset({b"ratelimit", b"ratelimit-remaining"})


def quota(headers: httpx.Headers) -> tuple[int, int] | None:
    """The tightest (remaining, seconds to reset) that the response announces, or ``None``.

    Read from ``RateLimit`` (a policy's ``t`` defaults to the window ``w`` of
    the ``RateLimit-Policy`` item of the same name), else from the older
    ``RateLimit-Remaining`` and ``RateLimit-Reset``. Of several policies the
    tightest is the one that asks for the widest spacing. Counts are
    sf-integers (at most 15 digits); seconds are clamped at :data:`MAX_DELTA`.
    """
    items = _items(headers["ratelimit"]) if "ratelimit" in headers else None
    if items:
        windows: dict[str, int] | None = None  # read only when a policy lacks its t
        best: tuple[int, int] | None = None
        for name, params in items:
            remaining = _count(params.get("r"))
            reset = _delta(params.get("t"))
            if reset is None:
                if windows is None:
                    windows = _windows(headers)
                reset = windows.get(name)
            if remaining is None or reset is None:
                continue
            if best is None or _tightness(remaining, reset) > _tightness(*best):
                best = (remaining, reset)
        if best is not None:
            return best
    if "ratelimit-remaining" not in headers:
        return None
    remaining = _count(_single(headers, "ratelimit-remaining"))
    reset = _delta(_single(headers, "ratelimit-reset"))
    return None if remaining is None or reset is None else (remaining, reset)


def _windows(headers: httpx.Headers) -> dict[str, int]:
    """The window ``w`` of each policy named in ``RateLimit-Policy``."""
    policy = headers.get("ratelimit-policy")
    windows = {}
    for name, params in (None if policy is None else _items(policy)) or ():
        window = _delta(params.get("w"))
        if window is not None:
            windows[name] = window
    return windows


def _tightness(remaining: int, reset: int) -> tuple[bool, float]:
    """Sorts quotas by the spacing they ask for; an exhausted one is the tightest."""
    return (remaining == 0, reset if remaining == 0 else reset / remaining)


def _triples() -> bool:
    probe = httpx.Headers({"Name": "value"})
    return getattr(probe, "_list", None) == [(b"Name", b"name", b"value")]


#: Whether httpx keeps a Headers' fields as (raw name, lower-case name, value)
#: triples in ``_list``, where the hot paths read them; if not, they read the
#: public ``Headers.raw``. Reading the triples once beats a Headers.get per name,
#: each of which lower-cases, encodes and scans the whole list again.
TRIPLES = _triples()


def fields(headers: httpx.Headers) -> list[tuple[bytes, ...]]:
    """The header fields in the form cheapest to compare: httpx's own triples, else the raw pairs.

    Two answers' fields compare equal exactly when their raw headers do (the
    lower-case name in a triple follows from the raw one). The list may be
    the headers' own: copy it to keep it.
    """
    return headers._list if TRIPLES else headers.raw  # type: ignore[return-value]


def pick(headers: httpx.Headers, names: frozenset[bytes]) -> dict[bytes, str]:
    """The wanted headers (lower-case names) in one pass; repeated ones joined with ", "."""
    items = headers._list if TRIPLES else [(key, key.lower(), value) for key, value in headers.raw]
    found: dict[bytes, str] = {}
    for _, key, value in items:
        if key in names:
            text = value.decode("latin-1")
            found[key] = f"{found[key]}, {text}" if key in found else text
    return found


def announces_quota(headers: httpx.Headers) -> bool:
    """Whether ``headers`` hold a field :func:`quota` starts from (``RateLimit``, ``RateLimit-Remaining``).

    The rate limiter asks it of every answer, most of which announce
    nothing (and then :func:`quota` would find nothing either), so it only
    looks each name up in a set.
    """
    if TRIPLES:
        for field in headers._list:  # a plain loop: cheaper than map() and isdisjoint() for a dozen fields or fewer
            if field[1] in _QUOTA_FIELDS:
                return True
        return False
    return not _QUOTA_FIELDS.isdisjoint([key.lower() for key, _ in headers.raw])
