"""Reading what servers say about when to come back; malformed values are ignored, never fatal."""

from __future__ import annotations

from email.utils import parsedate_to_datetime

import httpx


def _http_date(value: str) -> float | None:
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed is None or parsed.tzinfo is None:  # RFC 9110 dates are always GMT
        return None
    return parsed.timestamp()


def retry_after(headers: httpx.Headers, wall_now: float) -> float | None:
    """Seconds to wait according to ``Retry-After`` (RFC 9110 §10.2.3), or ``None``.

    Both forms are read: delay-seconds, and an HTTP-date. A date is measured
    against the response's own ``Date`` header when it has one, which cancels
    any skew between the server's clock and ours; a date in the past means
    now (0). Anything malformed is ``None``: the server's hint is ignored.
    """
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    when = _http_date(value)
    if when is None:
        return None
    date = headers.get("date")
    sent = _http_date(date) if date is not None else None
    return max(0.0, when - (wall_now if sent is None else sent))


def pick(headers: httpx.Headers, names: frozenset[bytes]) -> dict[bytes, str]:
    """The wanted headers (lower-case names) in one pass; repeated ones joined with ", "."""
    # httpx keeps (raw name, lower-case name, value) triples; reading them
    # once beats a Headers.get per name, each of which lower-cases, encodes
    # and scans the whole list again.
    items = getattr(headers, "_list", None)
    if items is None:
        items = [(key, key.lower(), value) for key, value in headers.raw]
    found: dict[bytes, str] = {}
    for _, key, value in items:
        if key in names:
            text = value.decode("latin-1")
            found[key] = f"{found[key]}, {text}" if key in found else text
    return found


def mentions(headers: httpx.Headers, prefix: bytes) -> bool:
    """Whether any header name starts with ``prefix`` (lower-case)."""
    items = getattr(headers, "_list", None)
    if items is None:
        return any(key.lower().startswith(prefix) for key, _ in headers.raw)
    return any(key.startswith(prefix) for _, key, _ in items)
