"""Stale-cache fallback: when a call fails, answer with the last good response, marked stale.

This is not an HTTP cache: a fresh response is never served from it, and
every call still goes to the network. It keeps recent successful answers
(200, 203, 204) to GET and HEAD and serves one only when the whole chain
failed: an exception, a final 500/502/503/504, an open circuit, a refused
rate-limit or bulkhead slot, the total deadline. Client errors (4xx) are
answers, not failures: they pass through.

What may be stored follows RFC 9111 for a private cache, with a small
hand-written check rather than hishel: we need only "may this be stored"
and "may this be served stale on error" (RFC 5861), not freshness,
validation or heuristics, and hishel does not serve stale on error. Not
stored: ``no-store`` (request or response), ``Vary: *``, bodies above
``max_body_bytes``. Never served stale: ``no-cache``, ``must-revalidate``.
A stored response may be served until it is ``max_stale`` seconds old, or,
when it says ``stale-if-error=N``, until ``max-age + N`` (the response's
own word wins). ``Vary`` is honoured by matching the request's values.

Entries are keyed by method, URL and the request's credentials
(``Authorization`` and ``Cookie``, hashed): a caller never sees an answer
given to other credentials. Served answers carry an ``Age`` header and
``CallInfo.stale`` / ``CallInfo.age``.

Memory is bounded by ``max_entries`` and ``max_bytes`` for each host and,
with the same numbers, for all hosts of the transport together (least
recently used go first). The store outlives the transport's per-host
state, so an answer survives the host's eviction from the host table.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from .._call import Call, Host, Next
from .._config import StaleCachePolicy
from .._headers import age_value, delta_seconds, pick
from .._metrics import HostMetrics, outcome_of_exception
from .timeout import BufferedStream

STORABLE_STATUSES = frozenset({200, 203, 204})
FAILURE_STATUSES = frozenset({500, 502, 503, 504})
_METHODS = frozenset({"GET", "HEAD"})

Key = tuple[str, str, str, bytes, str]  # method, host:port, scheme, path and query, credentials digest


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


@dataclass(slots=True)
class Entry:
    key: Key
    host: str
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    http_version: bytes
    vary: tuple[tuple[str, str | None], ...]  # (header name, the request's value)
    stored: float  # host clock
    initial_age: float
    limit: float  # seconds of age up to which it may be served stale
    size: int = 0

    def measure(self) -> None:
        self.size = len(self.body) + sum(len(k) + len(v) for k, v in self.headers)


Slot = tuple[Key, tuple[tuple[str, str | None], ...]]


class Store:
    """Entries of every host of a transport, bounded per host and in total."""

    def __init__(self) -> None:
        self.entries: OrderedDict[Slot, Entry] = OrderedDict()  # least recently used first
        self.hosts: dict[str, OrderedDict[Slot, Entry]] = {}
        self.host_bytes: dict[str, int] = {}
        self.by_key: dict[Key, list[Entry]] = {}
        self.total_bytes = 0
        self.metrics: dict[str, HostMetrics] = {}

    def find(self, key: Key, request: httpx.Request) -> Entry | None:
        for entry in self.by_key.get(key, ()):
            if all(request.headers.get(name) == value for name, value in entry.vary):
                slot = (entry.key, entry.vary)
                self.entries.move_to_end(slot)
                self.hosts[entry.host].move_to_end(slot)
                return entry
        return None

    def refresh(self, entry: Entry, now: float) -> None:
        """The same answer came again: it is as fresh as now, and the most recently used."""
        entry.stored = now
        slot = (entry.key, entry.vary)
        self.entries.move_to_end(slot)
        self.hosts[entry.host].move_to_end(slot)

    def put(self, entry: Entry, policy: StaleCachePolicy, metrics: HostMetrics) -> None:
        host = entry.host
        self.metrics[host] = metrics
        slot = (entry.key, entry.vary)
        entry.measure()
        old = self.entries.get(slot)
        if old is not None:
            # The same resource again (the usual case): replace it where it stands.
            own = self.hosts[host]
            self.entries[slot] = own[slot] = entry
            self.entries.move_to_end(slot)
            own.move_to_end(slot)
            variants = self.by_key[entry.key]
            variants[variants.index(old)] = entry
            if entry.size != old.size:
                self._count(entry, entry.size - old.size)
        else:
            own = self.hosts.setdefault(host, OrderedDict())
            self.entries[slot] = own[slot] = entry
            self.by_key.setdefault(entry.key, []).append(entry)
            self._count(entry, entry.size)
        # Least recently used go first: this host's own, then anyone's.
        while len(own) > 1 and (len(own) > policy.max_entries or self.host_bytes[host] > policy.max_bytes):
            self._remove(next(iter(own)))
        while len(self.entries) > 1 and (len(self.entries) > policy.max_entries or self.total_bytes > policy.max_bytes):
            self._remove(next(iter(self.entries)))

    def _remove(self, slot: Slot) -> None:
        entry = self.entries.pop(slot, None)
        if entry is None:
            return
        own = self.hosts[entry.host]
        del own[slot]
        variants = self.by_key[entry.key]
        variants.remove(entry)
        if not variants:
            del self.by_key[entry.key]
        self._count(entry, -entry.size)
        if not own:
            del self.hosts[entry.host]

    def _count(self, entry: Entry, size: int) -> None:
        host = entry.host
        self.host_bytes[host] = self.host_bytes.get(host, 0) + size
        self.total_bytes += size
        metrics = self.metrics.get(host)
        if metrics is not None:
            metrics.cache_entries.set(len(self.hosts.get(host, ())))
            metrics.cache_bytes.set(self.host_bytes[host])


_REQUEST_HEADERS = frozenset({b"cache-control", b"authorization", b"cookie"})
_RESPONSE_HEADERS = frozenset({b"cache-control", b"vary", b"age"})


def _credentials(found: dict[bytes, str]) -> str:
    authorization = found.get(b"authorization")
    cookie = found.get(b"cookie")
    if authorization is None and cookie is None:
        return ""
    return hashlib.sha256(f"{authorization}\x00{cookie}".encode()).hexdigest()


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

    __slots__ = ("_clock", "_metrics", "_policy", "_store")

    def __init__(self, host: Host) -> None:
        policy = host.policy.stale_cache
        assert policy is not None
        self._policy = policy
        self._clock = host.clock
        self._metrics = host.metrics
        store = host.shared.get("stale_cache")
        if store is None:
            store = host.shared["stale_cache"] = Store()
        self._store: Store = store

    def keep(self, entry: Entry) -> None:
        self._store.put(entry, self._policy, self._metrics)

    async def __call__(self, call: Call, call_next: Next) -> httpx.Response:
        request = call.request
        if request.method not in _METHODS:
            return await call_next(call)
        found = pick(request.headers, _REQUEST_HEADERS)
        if "no-store" in cache_control(found.get(b"cache-control")):
            return await call_next(call)
        url = request.url
        key: Key = (request.method, call.host.label, url.scheme, url.raw_path, _credentials(found))
        try:
            response = await call_next(call)
        except Exception as exc:
            stale = self._stale(call, key, outcome_of_exception(exc))
            if stale is None:
                raise
            return stale
        status = response.status_code
        if status in FAILURE_STATUSES:
            stale = self._stale(call, key, "server_error")
            if stale is not None:
                await response.aclose()
                return stale
        elif status in STORABLE_STATUSES:
            self._offer(call, key, response)
        return response

    def _offer(self, call: Call, key: Key, response: httpx.Response) -> None:
        headers = response.headers
        stream = response.stream
        if isinstance(stream, BufferedStream):
            body: bytes | None = stream.body
        elif isinstance(stream, httpx.ByteStream):
            body = b"".join(stream)
        else:
            body = None
        raw = headers.raw
        if body is not None:
            # The usual case: the same answer as last time, headers and all. Only its time moves.
            old = self._store.entries.get((key, ()))
            if old is not None and old.body == body and old.headers == raw and old.status == response.status_code:
                self._store.refresh(old, self._clock.now())
                return
        found = pick(headers, _RESPONSE_HEADERS)
        directives = cache_control(found.get(b"cache-control"))
        if "no-store" in directives or "no-cache" in directives or "must-revalidate" in directives:
            return
        vary = found.get(b"vary")
        vary_names = [name.strip().lower() for name in vary.split(",") if name.strip()] if vary else []
        if "*" in vary_names:
            return
        sie = _seconds(directives, "stale-if-error")
        limit = self._policy.max_stale if sie is None else (_seconds(directives, "max-age") or 0.0) + sie
        entry = Entry(
            key=key,
            host=call.host.label,
            status=response.status_code,
            headers=[(k, v) for k, v in raw if k.lower() != b"age"] if b"age" in found else raw,
            body=b"",
            http_version=response.extensions.get("http_version", b"HTTP/1.1"),
            vary=tuple((name, call.request.headers.get(name)) for name in vary_names),
            stored=self._clock.now(),
            initial_age=age_value(found.get(b"age")) or 0.0,
            limit=limit,
        )
        limit_bytes = self._policy.max_body_bytes
        if body is None:
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
            return None
        headers = [*entry.headers, (b"Age", str(int(age)).encode())]
        call.stale = True
        call.age = age
        self._metrics.labelled("stale_served", reason).inc()
        return httpx.Response(
            entry.status,
            headers=headers,
            stream=BufferedStream(entry.body),
            request=call.request,
            extensions={"http_version": entry.http_version},
        )
