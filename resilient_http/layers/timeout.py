"""Timeouts: the attempt that goes to the network, and the body that streams on after it.

Three bounds, each a policy field of :class:`~resilient_http.TimeoutPolicy`:

- ``attempt`` bounds one try with one timer that cancels the way an anyio
  cancel scope does, never through a shield, but at a fraction of its cost
  (:mod:`resilient_http._watchdog`): the pool wait, connecting, sending, the
  response headers, and the first bytes of a small body.
- ``total`` is not a timer of its own: it is a deadline on the call, set when
  the call enters the transport, that every wait respects and that the
  attempt folds into its own timer (whichever ends first).
- ``idle`` bounds each pause of a body that streams on after the response
  was returned; ``total`` bounds it too only with ``stream_total``, so a
  download or an event stream that keeps flowing is never cut.

httpx reads a response body only after the transport has returned, which
would put the body beyond every timeout and every retry. So the attempt
waits, inside its timer, for the first bytes of a body that announces a
``Content-Length`` of at most :data:`PREREAD_LIMIT`: a stall or an error
before them is an attempt failure the retry layer sees. A body complete in
those first bytes (the usual small answer) is kept in memory and its
connection goes back to the pool at once; otherwise the first bytes are
handed over as soon as they came, and the rest streams. The attempt never
waits for a later chunk, so ``client.stream()`` sees every byte as it
arrives.

A timeout that ran out during an httpx operation is raised as that
operation's class (``ConnectTimeout``, ``PoolTimeout``, ``WriteTimeout``,
``ReadTimeout``) as well as :class:`DeadlineExceededError`.
"""

from __future__ import annotations

import asyncio
from asyncio import CancelledError
from collections.abc import AsyncIterator

import anyio
import httpx

from .._call import Call, Host
from .._deadline import Operations, derive, operations
from .._events import DEBUG, TimedOut
from .._exceptions import DeadlineExceededError, Phase, TimeoutKind, deadline_error
from .._headers import non_negative
from .._pool import reap
from .._watchdog import Timer

PREREAD_LIMIT = 1 << 20
_get_running_loop = asyncio._get_running_loop


def current_time() -> float:
    """The clock of anyio's deadlines: the event loop's, read directly under asyncio (0.1 µs against 0.8 µs)."""
    loop = _get_running_loop()
    return anyio.current_time() if loop is None else loop.time()


class BufferedStream(httpx.AsyncByteStream):
    """A body read in full inside the attempt; ``body`` holds the raw (still encoded) bytes."""

    __slots__ = ("body",)

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.body:
            yield self.body


IN_MEMORY = (BufferedStream, httpx.ByteStream)


class _Resumed(httpx.AsyncByteStream):
    """A body whose first bytes were read inside the attempt, and whose rest streams."""

    __slots__ = ("_first", "_rest", "_stream")

    def __init__(self, first: bytes, rest: AsyncIterator[bytes], stream: httpx.AsyncByteStream) -> None:
        self._first = first
        self._rest = rest
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        first, self._first = self._first, b""
        if first:
            yield first
        async for chunk in self._rest:
            yield chunk

    async def aclose(self) -> None:
        close = getattr(self._rest, "aclose", None)
        try:
            if close is not None:
                await close()
        finally:
            await self._stream.aclose()


class BodyStream(httpx.AsyncByteStream):
    """A streamed body whose every chunk must come within ``idle`` (and, with ``stream_total``, the deadline)."""

    __slots__ = ("_call", "_idle", "_inner", "_total")

    def __init__(self, inner: httpx.AsyncByteStream, call: Call, idle: float | None, total: bool) -> None:
        self._inner = inner
        self._call = call
        self._idle = idle
        self._total = total

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunks = self._inner.__aiter__()
        call = self._call
        clock = call.host.clock
        idle = self._idle
        deadline = call.deadline if self._total else None
        while True:
            kind: TimeoutKind = "idle"
            wait = idle
            if deadline is not None:
                left = deadline - clock.now()
                if wait is None or left <= wait:
                    kind, wait = "total", left
            if wait is None:
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    return
            else:
                if wait <= 0:
                    raise expired(call, kind, " while reading the body", phase="read")
                with anyio.CancelScope(deadline=current_time() + wait) as scope:
                    try:
                        chunk = await chunks.__anext__()
                    except StopAsyncIteration:
                        return
                if scope.cancelled_caught:
                    raise expired(call, kind, " while reading the body", phase="read")
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


def expired(call: Call, kind: TimeoutKind, during: str = "", *, phase: Phase | None = None) -> DeadlineExceededError:
    """The error for a timeout of the call's policy that ran out during ``phase`` (and count it)."""
    host = call.host
    host.metrics.timeout(kind)
    timeouts = call.policy.timeout
    timeout = None if timeouts is None else getattr(timeouts, kind)
    events = host.events
    if events.wants(DEBUG, "timeout", call):
        event = TimedOut(
            transport=events.transport, host=events.host, timeout_kind=kind, seconds=timeout or 0.0, phase=phase
        )
        events.emit(event, call)
    if phase and not during:
        during = f" ({phase})"
    return deadline_error(
        f"{kind} timeout of {timeout}s ran out{during}",
        phase=phase,
        kind=kind,
        timeout=timeout or 0.0,
        request=call.request,
    )


def guard_body(call: Call, response: httpx.Response) -> None:
    """Bound a streamed body by the policy's ``idle`` (and ``total`` with ``stream_total``)."""
    timeouts = call.policy.timeout
    stream = response.stream
    if timeouts is None or not isinstance(stream, httpx.AsyncByteStream) or isinstance(stream, IN_MEMORY):
        return
    total = timeouts.stream_total and call.deadline is not None
    if timeouts.idle is not None or total:
        response.stream = BodyStream(stream, call, timeouts.idle, total)


async def first_bytes(response: httpx.Response) -> None:
    """Wait for the first bytes of a small sized body; keep the body in memory if they complete it."""
    length = response.headers.get("content-length")
    size = None if length is None else non_negative(length, PREREAD_LIMIT + 1)
    if size is None or size > PREREAD_LIMIT:
        return
    stream = response.stream
    assert isinstance(stream, httpx.AsyncByteStream)
    chunks = stream.__aiter__()
    try:
        try:
            body = await chunks.__anext__()
        except StopAsyncIteration:
            body = b""
        else:
            if len(body) < int(length):  # more to come: never wait for a later chunk here
                response.stream = _Resumed(body, chunks, stream)
                return
            async for extra in chunks:  # the end of a complete body is already buffered
                body += extra
    except BaseException:
        with anyio.CancelScope(shield=True):
            await stream.aclose()
        raise
    await stream.aclose()
    response.stream = BufferedStream(body)


async def after_headers(response: httpx.Response, timeouts: Operations | None) -> None:
    """After the headers, inside the attempt's timer: the first bytes of a body that is not in memory yet."""
    if timeouts is not None:
        timeouts.phase = "read"
    await first_bytes(response)


async def try_failed(host: Host, exc: BaseException, seconds: float) -> None:
    """Count a try that ended in ``exc``; after a timeout or a cancellation, free what the pool left behind."""
    if isinstance(exc, httpx.TimeoutException):
        host.metrics.attempt("timeout", seconds)
    elif isinstance(exc, Exception):
        host.metrics.attempt("error", seconds)
        return
    else:
        host.metrics.attempt("cancelled", seconds)
    await reap(host.inner)


#: What bounds an attempt: the transport's timer, a real anyio scope (not under asyncio), or nothing.
Guard = Timer | anyio.CancelScope | None


def arm(
    call: Call, started: float, traced: bool = False
) -> tuple[Guard, httpx.Request, Operations | None, TimeoutKind]:
    """What bounds an attempt starting at ``started``, the request it sends, its httpx timeouts, and its timeout kind.

    The request sent is a copy carrying the caller's own httpx timeouts
    (:mod:`resilient_http._deadline`) unless the policy has no timeouts,
    and the trace context when ``traced``. Raises the timeout's error when
    no time is left. The timer starts last: nothing that may fail comes
    between it and the attempt's ``try``, or a timer nobody ends would
    cancel the task later, in whatever it then does.
    """
    timeouts = call.policy.timeout
    request = call.request
    if timeouts is None:
        return None, call.host.tracing.carry(request, derived=False) if traced else request, None, "attempt"
    ops = operations(request.extensions.get("timeout"))
    sent = derive(request, ops)
    if traced:
        sent = call.host.tracing.carry(sent, derived=True)
    kind: TimeoutKind = "attempt"
    limit = None if timeouts.attempt is None else started + timeouts.attempt
    if call.deadline is not None and (limit is None or call.deadline <= limit):
        limit, kind = call.deadline, "total"
    guard: Guard = None
    if limit is not None:
        remaining = limit - started
        if remaining <= 0:
            raise expired(call, kind)
        guard = call.host.watchdog.start(remaining)
        if guard is None:  # trio: a real cancel scope
            guard = anyio.CancelScope(deadline=anyio.current_time() + remaining)
    return guard, sent, ops, kind


def landed(call: Call, response: httpx.Response, started: float) -> float:
    """An attempt that started at ``started`` got ``response``: count it, show it to the host's observers; the time."""
    host = call.host
    response.request = call.request
    finished = host.clock.now()
    host.metrics.tried(response.status_code, finished - started)
    for observe in host.observers:
        observe(response, finished)
    return finished


async def attempt(call: Call, traced: bool = False) -> httpx.Response:
    """One try on the network, inside one timer: the end of the layers' chain.

    A traced call's attempt runs inside its span (``traced``), and sends
    the span's trace context (see :mod:`resilient_http._tracing`). The
    fused segment (:mod:`resilient_http._fused`) runs the same steps inline.
    """
    if call.span is not None and not traced:
        return await call.host.tracing.attempt(call, attempt)  # type: ignore[no-any-return]
    host = call.host
    started = host.clock.now()
    guard, sent, ops, kind = arm(call, started, traced)
    call.attempts += 1
    try:
        if type(guard) is Timer:
            try:
                response = await host.inner.handle_async_request(sent)
                if not isinstance(response.stream, IN_MEMORY):
                    await after_headers(response, ops)
            except BaseException as exc:
                if guard.finish(isinstance(exc, CancelledError)):
                    raise expired(call, kind, phase=None if ops is None else ops.phase) from None
                raise
            guard.done = True
            if guard.delivered:  # the deadline's cancellation came, and something swallowed it
                guard.finish(False)
        elif guard is None:
            response = await host.inner.handle_async_request(sent)
            if not isinstance(response.stream, IN_MEMORY):
                await after_headers(response, ops)
        else:  # trio: a real anyio scope
            assert isinstance(guard, anyio.CancelScope)
            with guard:
                response = await host.inner.handle_async_request(sent)
                if not isinstance(response.stream, IN_MEMORY):
                    await after_headers(response, ops)
            if guard.cancelled_caught:
                raise expired(call, kind, phase=None if ops is None else ops.phase)
    except BaseException as exc:
        await try_failed(host, exc, host.clock.now() - started)
        raise
    response.request = call.request  # landed(), inline
    finished = host.clock.now()
    host.metrics.tried(response.status_code, finished - started)
    for observe in host.observers:
        observe(response, finished)
    return response
