"""Timeouts: the total deadline of a call, and the attempt that goes to the network.

One timer per attempt, and a cheap one (see :mod:`resilient_http._deadline`).
The total deadline is not a timer of its own: it is a number on the call
(set when the call enters the transport) that every wait in the chain
respects, and that the attempt folds into its own timer (whichever of
"attempt" and "total" ends first). The client's httpx
timeouts are replaced by ``None`` for the attempt, so that httpcore starts
no timers of its own and cannot silently cut an attempt shorter than the
policy says.

httpx reads a response body only after the transport has returned, which
would put the body beyond every timeout and every retry. So the attempt
reads bodies that announce a ``Content-Length`` of at most
:data:`PREREAD_LIMIT` inside its own scope: an error or a stall there is an
attempt failure that the retry layer sees, and the connection goes back to
the pool at once. Longer or unsized bodies (downloads, event streams) are
streamed to the caller, each chunk bounded by the total deadline.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import httpx

from .._call import Call
from .._deadline import Scope, move_on_after
from .._exceptions import DeadlineExceededError, TimeoutKind
from .._headers import non_negative
from .._metrics import outcome_of_status

PREREAD_LIMIT = 1 << 20
_NO_HTTPX_TIMEOUTS = {"connect": None, "read": None, "write": None, "pool": None}


class BufferedStream(httpx.AsyncByteStream):
    """A body read in full inside the attempt; ``body`` holds the raw (still encoded) bytes."""

    __slots__ = ("body",)

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.body:
            yield self.body


IN_MEMORY = (BufferedStream, httpx.ByteStream)


class DeadlineStream(httpx.AsyncByteStream):
    """A streamed body whose every chunk must arrive before the call's deadline."""

    __slots__ = ("_call", "_inner")

    def __init__(self, inner: httpx.AsyncByteStream, call: Call) -> None:
        self._inner = inner
        self._call = call

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunks = self._inner.__aiter__()
        call = self._call
        assert call.deadline is not None
        clock = call.host.clock
        while True:
            with move_on_after(call.deadline - clock.now()) as scope:
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    return
            if scope.expired:
                raise expired(call, "total", " while reading the body")
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


def expired(call: Call, kind: TimeoutKind, during: str = "") -> DeadlineExceededError:
    """The error for a timeout of the call's policy that ran out (and count it)."""
    call.host.metrics.timeout(kind)
    timeouts = call.policy.timeout
    timeout = (timeouts.attempt if kind == "attempt" else timeouts.total) if timeouts is not None else None
    return DeadlineExceededError(
        f"{kind} timeout of {timeout}s ran out{during}", kind=kind, timeout=timeout or 0.0, request=call.request
    )


def guard_body(call: Call, response: httpx.Response) -> None:
    """Bound a streamed body by the call's total deadline (in-memory bodies need nothing)."""
    stream = response.stream
    if isinstance(stream, httpx.AsyncByteStream) and not isinstance(stream, IN_MEMORY):
        response.stream = DeadlineStream(stream, call)


async def _preread(response: httpx.Response) -> None:
    stream = response.stream
    length = response.headers.get("content-length")
    size = None if length is None else non_negative(length, PREREAD_LIMIT + 1)
    if size is None or size > PREREAD_LIMIT:
        return
    assert isinstance(stream, httpx.AsyncByteStream)
    chunks = []
    try:
        async for chunk in stream:
            chunks.append(chunk)
    finally:
        await stream.aclose()
    response.stream = BufferedStream(b"".join(chunks))


async def _close(response: httpx.Response) -> None:
    with anyio.CancelScope(shield=True):
        await response.aclose()


class _Unbounded:
    """The scope of an attempt without a timeout: nothing to enter, never expired."""

    __slots__ = ()
    expired = False

    def __enter__(self) -> _Unbounded:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None


_UNBOUNDED = _Unbounded()


async def attempt(call: Call) -> httpx.Response:
    """One try on the network, inside one timer: the end of every chain."""
    host = call.host
    clock = host.clock
    metrics = host.metrics
    request = call.request
    started = clock.now()
    timeouts = call.policy.timeout
    scope: _Unbounded | Scope = _UNBOUNDED
    kind: TimeoutKind = "attempt"
    if timeouts is not None:
        limit = None if timeouts.attempt is None else started + timeouts.attempt
        if call.deadline is not None and (limit is None or call.deadline <= limit):
            limit, kind = call.deadline, "total"
        if limit is not None:
            remaining = limit - started
            if remaining <= 0:
                raise expired(call, kind)
            request.extensions["timeout"] = _NO_HTTPX_TIMEOUTS
            scope = move_on_after(remaining)
    call.attempts += 1
    try:
        with scope:
            response = await host.inner.handle_async_request(request)
            if not isinstance(response.stream, IN_MEMORY):
                try:
                    await _preread(response)
                except BaseException:
                    await _close(response)
                    raise
        if scope.expired:
            raise expired(call, kind)
    except httpx.TimeoutException:
        metrics.attempt("timeout", clock.now() - started)
        raise
    except Exception:
        metrics.attempt("error", clock.now() - started)
        raise
    except BaseException:
        metrics.attempt("cancelled", clock.now() - started)
        raise
    response.request = request
    finished = clock.now()
    metrics.attempt(outcome_of_status(response.status_code), finished - started)
    for observe in host.observers:
        observe(response, finished)
    return response
