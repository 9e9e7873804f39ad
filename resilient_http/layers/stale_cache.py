"""Stale-cache fallback: when a call fails, answer with the last good response, marked stale.

This is not an HTTP cache: it never answers in place of the network,
however fresh its copy, and every call still goes to the network. It keeps
recent successful answers (200, 203, 204) to GET and HEAD and serves one
only when the whole chain failed: an exception, a final 500/502/503/504, an
open circuit, a refused rate-limit or bulkhead slot, the total deadline.
Client errors (4xx) are answers, not failures: they pass through.

One transport serves many callers, so this is an RFC 9111 *shared* cache:
one caller's answer must never reach another caller it was not meant for.
The rules are a small hand-written check rather than hishel: we need only
"may this be stored" and "may this be served on error" (RFC 5861), not
validation or heuristics, and hishel does not serve stale on error.

The key is :func:`.cache_key.request_key`'s (the effective request target,
then the request's values of the policy's ``identity_headers``), and the
request's values of the headers the answer ``Vary``s on.

Never stored: ``no-store`` (request or response), ``no-cache``, ``private``
(with or without field names), ``Vary: *``, bodies above ``max_body_bytes``.
Who an answer is for:

- A request with ``Authorization`` or ``Cookie`` (a cookie is a credential
  too) not named in ``identity_headers`` has its answer stored only when the
  answer says a shared cache may keep it: ``public``, ``s-maxage`` or
  ``must-revalidate`` (RFC 9111 §3.5). It is then kept for every caller of
  that target, as is any answer to a request without credentials: that is
  what the origin gives anyone, so a request with credentials may be
  answered with it too.
- A header named in ``identity_headers`` (``X-Api-Key``, a tenant id,
  ``Authorization`` itself) is part of the key: answers are kept per
  identity, and one identity never sees another's.
- ``Set-Cookie`` is never stored, so never replayed. An answer that sets a
  cookie may belong to one caller's session: it is kept (without the
  cookie) only when it says a shared cache may keep it, or when the request
  carried a named identity and it is kept for that identity alone.

How long: until ``max_stale`` seconds old or, when the answer says
``stale-if-error=N``, until ``max-age + N`` (the response's own word wins).
``must-revalidate``, ``proxy-revalidate`` and, in a shared cache,
``s-maxage`` forbid serving the answer once stale (RFC 9111 §4.2.4): such an
answer is served only while fresh, younger than its ``s-maxage`` (or else
its ``max-age``); ``Expires`` is not read. Served answers carry an ``Age``
header and ``CallInfo.stale`` / ``CallInfo.age`` / ``CallInfo.stale_reason``. An answer that arrives
already too old is not stored, and an entry found too old is dropped. How
memory is bounded is :mod:`.stale_store`'s story.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import httpx

from .._call import Call, Host, Next
from .._config import StaleCachePolicy
from .._events import DEBUG, StaleServed
from .._headers import TRIPLES, age_value, delta_seconds, fields, pick
from .._metrics import outcome_of_exception
from .cache_key import Key, request_key, vary_names
from .stale_store import Entry, Slot, Store
from .timeout import BufferedStream

STORABLE_STATUSES = frozenset({200, 203, 204})
FAILURE_STATUSES = frozenset({500, 502, 503, 504})
_METHODS = frozenset({"GET", "HEAD"})

#: Never stored.
_NEVER = frozenset({"no-store", "no-cache", "private"})
#: The answer says a shared cache may keep it, even for a request with credentials (RFC 9111 §3.5).
_SHAREABLE = frozenset({"public", "s-maxage", "must-revalidate"})
#: A shared cache may serve the answer only while it is fresh (RFC 9111 §4.2.4, §5.2.2).
_FRESH_ONLY = frozenset({"must-revalidate", "proxy-revalidate", "s-maxage"})
_CREDENTIALS = (b"authorization", b"cookie")
_SET_COOKIE = frozenset({b"set-cookie", b"set-cookie2"})
_RESPONSE_HEADERS = frozenset({b"cache-control", b"vary", b"age", *_SET_COOKIE})
_NOT_KEPT = frozenset({b"age", *_SET_COOKIE})
_UNSEEN = object()  # equal to nothing but itself
#: Whether __call__ can tell the previous request again by httpx's own fields and parsed URL.
_SEES = TRIPLES and getattr(httpx.URL("http://example.com/a?b"), "_uri_reference", None) is not None
#: Whether an httpx.ByteStream keeps its body in ``_stream``, where __call__ reads it without iterating.
_BODY_KEPT = getattr(httpx.ByteStream(b"body"), "_stream", None) == b"body"


def cache_control(value: str | None) -> dict[str, str]:
    """The directives of a Cache-Control header, lower-cased; malformed parts are dropped."""
    if not value:
        return {}
    directives: dict[str, str] = {}
    for part in value.split(","):
        name, _, argument = part.strip().partition("=")
        if name:
            directives[name.strip().lower()] = argument.strip().strip('"')
    return directives


def _seconds(directives: dict[str, str], name: str) -> float | None:
    value = directives.get(name)
    return None if value is None else delta_seconds(value)


class _TeeStream(httpx.AsyncByteStream):
    """Passes a streamed body through, keeping a copy while it stays under the limit."""

    def __init__(self, inner: httpx.AsyncByteStream, limit: int, store: StaleCache, entry: Entry) -> None:
        self._inner = inner
        self._limit = limit
        self._store = store
        self._entry = entry

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunks: list[bytes] | None = []
        size = 0
        async for chunk in self._inner:
            if chunks is not None:
                size += len(chunk)
                if size > self._limit:
                    chunks = None
                else:
                    chunks.append(chunk)
            yield chunk
        if chunks is not None:
            self._entry.body = b"".join(chunks)
            self._store.keep(self._entry)

    async def aclose(self) -> None:
        await self._inner.aclose()


class StaleCache:
    """The stale-cache layer of one host."""

    __slots__ = (
        "_clock",
        "_credentials",
        "_detached",
        "_entries",
        "_events",
        "_identity",
        "_label",
        "_metrics",
        "_now",
        "_order",
        "_policy",
        "_request_headers",
        "_secrets",
        "_seen_fields",
        "_seen_method",
        "_seen_slot",
        "_seen_target",
        "_store",
    )

    def __init__(self, host: Host) -> None:
        policy = host.policy.stale_cache
        assert policy is not None
        self._clock = host.clock
        self._now = host.clock.now
        self._label = host.label
        self._metrics = host.metrics
        self._events = host.events
        self._detached = False
        store = host.shared.get("stale_cache")
        if store is None:
            store = host.shared["stale_cache"] = Store()
        self._store: Store = store
        self._entries = store.entries
        self._order = store.order
        store.adopt(host.label, host.metrics)
        self.reconfigure(policy)

    def reconfigure(self, policy: StaleCachePolicy) -> None:
        """Store and serve by ``policy`` from now on; stored answers stay (each keeps the age it may be served to)."""
        self._policy = policy
        self._identity = tuple(name.encode("ascii") for name in policy.identity_headers)
        self._credentials = frozenset(_CREDENTIALS).difference(self._identity)
        self._request_headers = frozenset({b"cache-control", b"host", *_CREDENTIALS, *self._identity})
        self._secrets = frozenset({*_CREDENTIALS, *self._identity})
        self._forget_seen()

    def _forget_seen(self) -> None:
        # The last request read without credentials or identity (see __call__), and its slot.
        self._seen_method = ""
        self._seen_target: object = None
        self._seen_fields: list[Any] = [_UNSEEN]  # equal to no request's fields
        self._seen_slot: Slot = (("", "", "", None, b"", ()), ())

    def detach(self, host: Host) -> None:
        """The host's policy dropped the stale cache: its answers go, and calls still in flight store nothing."""
        self._detached = True
        self._store.forget(host.label)

    def keep(self, entry: Entry) -> None:
        if not self._detached:
            self._store.put(entry, self._policy, self._metrics)

    async def __call__(self, call: Call, call_next: Next) -> httpx.Response:
        request = call.request
        method = request.method
        if method not in _METHODS:
            return await call_next(call)
        # The usual request is the previous one again: the same method, target and header fields
        # make the same key (and a request with credentials or identity is never remembered).
        if (
            _SEES
            and request.headers._list == self._seen_fields
            and request.url._uri_reference == self._seen_target
            and method == self._seen_method
        ):
            slot = self._seen_slot
            credentialed = identified = False
        else:
            read = self._read(call)
            if read is None:
                return await call_next(call)
            slot, credentialed, identified = read
        try:
            response = await call_next(call)
        except Exception as exc:
            stale = self._stale(call, slot[0], outcome_of_exception(exc))
            if stale is None:
                raise
            return stale
        status = response.status_code
        if status in STORABLE_STATUSES:
            stream = response.stream
            if isinstance(stream, BufferedStream):
                body: bytes | None = stream.body
            elif type(stream) is httpx.ByteStream and _BODY_KEPT:
                body = stream._stream  # what iterating it would give
            elif isinstance(stream, httpx.ByteStream):
                body = b"".join(stream)
            else:
                body = None
            if body is not None and not credentialed:
                # The usual answer: the same as last time, status, header fields and body, so
                # just as storable (the same key means the same identity). Only its time moves.
                old = self._entries.get(slot)
                if (
                    old is not None
                    and old.body == body
                    and old.status == status
                    and old.received == (response.headers._list if TRIPLES else response.headers.raw)  # fields()
                ):
                    # As fresh as now, and the most recently used (Store._touch, inline).
                    old.stored = self._now()
                    self._order.move_to_end(old)
                    old.shelf.entries.move_to_end(old)
                    return response
            self._offer(call, slot[0], response, body, credentialed, identified)
        elif status in FAILURE_STATUSES:
            stale = self._stale(call, slot[0], "server_error")
            if stale is not None:
                await response.aclose()
                return stale
        return response

    def _read(self, call: Call) -> tuple[Slot, bool, bool] | None:
        """The slot of ``call``'s request (its key, no Vary), whether it carries credentials and an identity.

        ``None`` when the request says ``no-store``. A request without
        credentials or identity headers is remembered as the one
        :meth:`__call__` need not read again.
        """
        request = call.request
        found = pick(request.headers, self._request_headers)
        if "no-store" in cache_control(found.get(b"cache-control")):
            return None
        key = request_key(call, found, self._identity)
        slot: Slot = (key, ())
        if found.keys().isdisjoint(self._secrets):
            if _SEES:
                self._seen_method, self._seen_target = request.method, request.url._uri_reference
                self._seen_fields, self._seen_slot = list(request.headers._list), slot
            return slot, False, False
        return slot, not found.keys().isdisjoint(self._credentials), any(key[5])  # a digest is never empty

    def _offer(
        self, call: Call, key: Key, response: httpx.Response, body: bytes | None, credentialed: bool, identified: bool
    ) -> None:
        """Store ``response`` if the rules allow it (see the module docstring), deciding once."""
        headers = response.headers
        found = pick(headers, _RESPONSE_HEADERS)
        directives = cache_control(found.get(b"cache-control"))
        if not directives.keys().isdisjoint(_NEVER):
            return
        if directives.keys().isdisjoint(_SHAREABLE) and (
            credentialed or (not identified and not found.keys().isdisjoint(_SET_COOKIE))
        ):
            return
        names = vary_names(found.get(b"vary"))
        if "*" in names:
            return
        sie = _seconds(directives, "stale-if-error")
        limit = self._policy.max_stale if sie is None else (_seconds(directives, "max-age") or 0.0) + sie
        if not directives.keys().isdisjoint(_FRESH_ONLY):
            fresh = _seconds(directives, "s-maxage")
            if fresh is None:
                fresh = _seconds(directives, "max-age")
            if not fresh:
                return
            limit = math.nextafter(fresh, -math.inf)  # served while younger than ``fresh``, never as old
        raw = headers.raw
        kept = raw if found.keys().isdisjoint(_NOT_KEPT) else [(k, v) for k, v in raw if k.lower() not in _NOT_KEPT]
        entry = Entry(
            key=key,
            host=self._label,
            status=response.status_code,
            headers=kept,
            body=b"",
            http_version=response.extensions.get("http_version", b"HTTP/1.1"),
            vary=tuple((name, call.request.headers.get(name)) for name in names),
            stored=self._now(),
            initial_age=age_value(found.get(b"age")) or 0.0,
            limit=limit,
            received=list(fields(headers)),  # a copy: the caller may change the response's headers
        )
        if entry.initial_age > limit:
            return
        limit_bytes = self._policy.max_body_bytes
        if body is None:
            stream = response.stream
            if isinstance(stream, httpx.AsyncByteStream):
                response.stream = _TeeStream(stream, limit_bytes, self, entry)
            return
        if len(body) <= limit_bytes:
            entry.body = body
            self.keep(entry)

    def _stale(self, call: Call, key: Key, reason: str) -> httpx.Response | None:
        entry = self._store.find(key, call.request)
        if entry is None:
            return None
        age = self._clock.now() - entry.stored + entry.initial_age
        if age > entry.limit:
            self._store.remove(entry)  # it only grows older
            return None
        headers = [*entry.headers, (b"Age", str(int(age)).encode())]
        call.stale = True
        call.age = age
        call.stale_reason = reason
        call.noted = True
        self._metrics.labelled("stale_served", reason).inc()
        events = self._events
        if events.wants(DEBUG, "stale_cache", call):
            events.emit(StaleServed(transport=events.transport, host=events.host, reason=reason, age=age), call)
        return httpx.Response(
            entry.status,
            headers=headers,
            stream=BufferedStream(entry.body),
            request=call.request,
            extensions={"http_version": entry.http_version},
        )
