"""Bulkhead: a slow host only ever uses its own slots, and overload is shed, never queued without end.

Each host gets at most ``max_concurrent`` attempts in flight and at most
``max_queue`` calls waiting for one; a call beyond that fails at once with
:class:`BulkheadFullError`. The bulkhead sits inside retry, so every attempt
takes a slot: a call waiting out a backoff holds nothing. It sits outside the
per-attempt timeout, so time spent queueing never eats into an attempt's time.
State lives on the layer, one per host: a hung host fills its own slots and no
other host's.

A slot is a connection: it is held as long as the attempt's connection is.
An attempt that fails, or whose body was read inside the attempt (small
bodies are), gives its slot back when it returns. A streamed body (unsized,
or large) keeps the slot until it is read to the end, closed, or cancelled
mid-read; a body dropped without being closed is closed, and its slot freed,
on its event loop once the garbage collector finds it. Each way settles the
slot exactly once.

A waiting call gives up after ``queue_timeout`` seconds with
:class:`BulkheadFullError`, and always when the call's total deadline comes,
with :class:`DeadlineExceededError` (``kind="total"``).

Priorities decide who is shed when the host is saturated. The queue is
ordered ``critical``, ``high``, ``normal``, ``low``, first come first served
within each; a freed slot goes straight to the head of the queue. When the
queue is full, a newcomer takes the place of the most recently queued of the
lowest-priority waiters, if that waiter ranks below it; otherwise the newcomer
is refused. So critical calls may wait, but are never shed while a
lower-priority call waits.

With an adaptive limit (``BulkheadPolicy.adaptive``, see
:mod:`resilient_http.layers.adaptive`), the number of slots follows each
attempt's outcome. Nothing else changes: when the limit shrinks below the
attempts in flight, none is cancelled, and slots given back are not handed
on until the count is under the limit; when it grows, waiters are granted
at once, head of the queue first.

Slots are counted, not locked: taking a free slot when nobody waits is a
compare and an increment. Only a call that must wait pays for an
``anyio.Event`` and a timer. A slot passes from hand to hand without ever
being counted free, and every way out of the queue (granted, shed, timed out,
cancelled before or after being granted) settles the counts exactly once.

A new policy (:meth:`Bulkhead.reconfigure`) keeps the slots and the queue:
attempts in flight are never cancelled and waiters keep their place. A
lower ``max_concurrent`` works as a shrunk adaptive limit (slots given back
are not handed on until the count is under it); a higher one grants waiters
at once. An adaptive limit whose settings are unchanged keeps what it
learnt; a changed one starts again from its ``initial``. In dry-run mode an
attempt that finds no free slot is sent anyway, counted in flight, and
reported as blocked.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx

from .._call import PRIORITIES, Call, Host, Next
from .._clock import Clock
from .._config import BulkheadPolicy
from .._events import DEBUG, CallRejected, LimitChanged, Waited
from .._exceptions import BulkheadFullError, DeadlineExceededError
from .._metrics import HostMetrics
from .._series import Value
from .adaptive import AdaptiveSlots
from .timeout import IN_MEMORY, expired

_RANK = {name: rank for rank, name in enumerate(PRIORITIES)}
_WAITING, _GRANTED, _SHED = 0, 1, 2


class _Waiter:
    """A call waiting for a slot; made only when the host is saturated."""

    __slots__ = ("event", "rank", "state")

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.state = _WAITING
        self.event = anyio.Event()


class _SlotStream(httpx.AsyncByteStream):
    """A streamed body that holds its attempt's slot until it is read to the end, closed, or dropped."""

    __slots__ = ("_bulkhead", "_home", "_inner")

    def __init__(self, inner: httpx.AsyncByteStream, bulkhead: Bulkhead) -> None:
        self._inner = inner
        self._home = _home()
        self._bulkhead: Bulkhead | None = bulkhead  # None once the slot is given back

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        finally:  # read to the end, failed, cancelled, or abandoned mid-read
            await self.aclose()

    async def aclose(self) -> None:
        bulkhead = self._bulkhead
        if bulkhead is None:
            return
        self._bulkhead = None
        try:
            with anyio.CancelScope(shield=True):
                await self._inner.aclose()
        finally:
            bulkhead._release()

    def __del__(self) -> None:
        bulkhead = self._bulkhead
        if bulkhead is not None:
            self._bulkhead = None
            bulkhead._dropped(self._inner, self._home)


def _total_ran_out(exc: BaseException) -> bool:
    """The call's own total deadline ended the attempt: its budget, not the host, ran out."""
    return isinstance(exc, DeadlineExceededError) and exc.kind == "total"


def _home() -> Any:
    """The running event loop (asyncio) or its token (trio): where a dropped body must be closed."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        import trio

        return trio.lowlevel.current_trio_token()


class Bulkhead:
    """The bulkhead layer of one host."""

    __slots__ = (
        "_adaptive",
        "_clock",
        "_closing",
        "_drop_statuses",
        "_dry_run",
        "_events",
        "_free_below",
        "_in_flight",
        "_in_flight_gauge",
        "_limit",
        "_limit_gauge",
        "_max_queue",
        "_metrics",
        "_now",
        "_plain",
        "_policy",
        "_queue_timeout",
        "_queued",
        "_queued_gauge",
        "_queues",
    )

    def __init__(self, host: Host) -> None:
        policy = host.policy.bulkhead
        assert policy is not None
        self._limit_gauge = host.metrics.bulkhead_limit
        self._clock: Clock = host.clock
        self._now = host.clock.now
        self._metrics: HostMetrics = host.metrics
        self._events = host.events
        self._in_flight_gauge = host.metrics.bulkhead_in_flight
        # A plain number (not a multiprocess gauge, which must write its file): the short way adds to it in place.
        self._plain = isinstance(self._in_flight_gauge, Value)
        self._queued_gauge = host.metrics.bulkhead_queued
        self._in_flight = 0
        self._queued = 0
        self._queues: tuple[deque[_Waiter], ...] = tuple(deque() for _ in PRIORITIES)
        self._closing: set[asyncio.Task[None]] = set()  # dropped bodies being closed (asyncio keeps weak refs)
        self._adaptive: AdaptiveSlots | None = None
        self._policy: BulkheadPolicy | None = None
        self.reconfigure(policy)
        host.hedge_gates.append(self._hedge_gate)

    def reconfigure(self, policy: BulkheadPolicy) -> None:
        """Take ``policy``'s limits for the attempts to come, keeping slots and queue (see the module docstring)."""
        old, self._policy = self._policy, policy
        adaptive = policy.adaptive
        if adaptive is None:
            self._adaptive = None
            self._drop_statuses: frozenset[int] = frozenset()
        elif old is None or old.adaptive != adaptive or old.max_concurrent != policy.max_concurrent:
            self._adaptive = AdaptiveSlots(adaptive, policy.max_concurrent)
            self._drop_statuses = frozenset(adaptive.drop_statuses)
        self._max_queue = policy.max_queue
        self._queue_timeout = policy.queue_timeout
        self._dry_run = policy.dry_run
        self._set_limit(policy.max_concurrent if self._adaptive is None else self._adaptive.limit)

    def _set_limit(self, limit: int) -> None:
        """Take ``limit`` as the number of slots: waiters are granted at once when it grew."""
        self._limit = limit
        # The limit again when an attempt that finds a free slot may take the short way in __call__
        # (no adaptive limit to sample, a plain gauge), else 0: so the common path makes one comparison.
        self._free_below = limit if self._adaptive is None and self._plain else 0
        self._limit_gauge.set(limit)
        while self._queued and self._in_flight < limit:
            for queue in self._queues:
                if queue:
                    self._wake(queue.popleft(), _GRANTED)
                    self._in_flight += 1
                    self._in_flight_gauge.inc()
                    break

    def detach(self, host: Host) -> None:
        """The host's policy dropped the bulkhead: hedges no longer ask it for a slot."""
        host.hedge_gates.remove(self._hedge_gate)

    def _hedge_gate(self, call: Call) -> str | None:
        """A hedge takes a free slot at once or is not sent: it never queues, nor sheds a waiting call.

        In dry-run mode too: a hedge is load the library adds on its own, so
        it never goes over the limit, and it is not a call the bulkhead blocked.
        """
        if call.policy.bulkhead is None or self._in_flight < self._limit:
            return None
        return "bulkhead_full"

    async def __call__(self, call: Call, call_next: Next) -> httpx.Response:
        # A slot is free only when nobody waits: a freed slot is handed to the
        # head of the queue rather than counted free.
        if self._in_flight < self._free_below:  # the common path, with Value.inc/dec inline
            self._in_flight += 1
            self._in_flight_gauge.value += 1.0
            try:
                response = await call_next(call)
            except BaseException:
                self._release()
                raise
            if not self._queued and isinstance(response.stream, IN_MEMORY):
                self._in_flight -= 1
                self._in_flight_gauge.value -= 1.0
                return response
            return self._settle(response)
        if self._in_flight < self._limit:
            self._in_flight += 1
            self._in_flight_gauge.inc()
        elif self._dry_run:  # no slot, but sent: counted in flight, so the gauges show how far over it goes
            call.blocked_in_dry_run("bulkhead")
            self._in_flight += 1
            self._in_flight_gauge.inc()
        else:
            await self._wait(call)
        slots = self._adaptive
        if slots is not None:  # the attempt is numbered and timed for the adaptive limit
            number, in_flight, started = slots.sent(), self._in_flight, self._now()
        try:
            response = await call_next(call)
        except BaseException as exc:
            try:
                if slots is not None:
                    self._failed(slots, number, exc)
            finally:
                self._release()
            raise
        if slots is not None:
            try:
                self._answered(slots, number, in_flight, started, response.status_code)
            except BaseException:
                self._release()
                raise
        stream = response.stream
        if isinstance(stream, IN_MEMORY) and not self._queued:  # _settle() and _release(), the usual case inline
            self._in_flight -= 1
            self._in_flight_gauge.dec()
            return response
        return self._settle(response)

    def _failed(self, slots: AdaptiveSlots, number: int, exc: BaseException) -> None:
        """Attempt ``number`` raised: a timeout or a refused connection is a drop, before the slot is settled."""
        if isinstance(exc, httpx.TimeoutException | httpx.ConnectError) and not _total_ran_out(exc):
            self._adapt(slots, slots.drop(number), "drop", exc)

    def _answered(self, slots: AdaptiveSlots, number: int, in_flight: int, started: float, status: int) -> None:
        """Attempt ``number``, sent with ``in_flight`` in flight at ``started``, got ``status``: move the limit."""
        if status in self._drop_statuses:
            self._adapt(slots, slots.drop(number), "drop", status)
        elif status < 500:  # other server errors say nothing of load, and are often fast
            self._adapt(slots, slots.success(in_flight, self._now() - started), "success", None)

    def _settle(self, response: httpx.Response) -> httpx.Response:
        """Give the slot back now, or when a streamed body is done with."""
        stream = response.stream
        if isinstance(stream, IN_MEMORY) or not isinstance(stream, httpx.AsyncByteStream):
            self._release()
        else:  # the connection stays busy until the body is done with: so does the slot
            response.stream = _SlotStream(stream, self)
        return response

    def _adapt(self, slots: AdaptiveSlots, changed: bool, why: str, cause: object) -> None:
        """Follow the adaptive limit after a sample: grant waiters when it grew.

        ``slots`` is the limit the attempt was sent under: one a new policy
        replaced since moves nothing.
        """
        if not changed or slots is not self._adaptive:
            return
        old, new = self._limit, slots.limit
        self._set_limit(new)
        self._limit_changed(old, new, why, cause)

    def _limit_changed(self, old: int, new: int, why: str, cause: object) -> None:
        """The one place the "limit changed" event is emitted."""
        events = self._events
        if events.wants(DEBUG, "bulkhead"):
            if isinstance(cause, BaseException):
                cause = type(cause).__name__
            events.emit(
                LimitChanged(
                    transport=events.transport,
                    host=events.host,
                    old=old,
                    new=new,
                    why=why,
                    cause=None if cause is None else str(cause),
                )
            )

    def _rejected(self, call: Call, reason: str) -> None:
        events = self._events
        if events.wants(DEBUG, "bulkhead", call):
            event = CallRejected(
                transport=events.transport, host=events.host, layer="bulkhead", retry_after=None, reason=reason
            )
            events.emit(event, call)

    def _dropped(self, body: httpx.AsyncByteStream, home: Any) -> None:
        """A streamed body was dropped unclosed: close it and free its slot on its own event loop.

        Called by the garbage collector, perhaps in another thread, perhaps in
        the middle of this layer's own bookkeeping: so nothing is done here
        but asking the loop to do it.
        """
        try:
            if isinstance(home, asyncio.AbstractEventLoop):
                home.call_soon_threadsafe(self._close_later, home, body)
            else:
                home.run_sync_soon(self._close_later, None, body)
        except RuntimeError:  # the loop is gone, and every waiter with it
            self._release()

    def _close_later(self, loop: asyncio.AbstractEventLoop | None, body: httpx.AsyncByteStream) -> None:
        """On the body's own loop: start closing it (in a task: closing may wait on the network)."""
        if loop is not None:
            task = loop.create_task(self._close_dropped(body))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
            return
        import trio

        try:
            trio.lowlevel.spawn_system_task(self._close_dropped, body)
        except RuntimeError:  # trio is shutting down: nobody is left waiting
            self._release()

    async def _close_dropped(self, body: httpx.AsyncByteStream) -> None:
        try:
            with contextlib.suppress(Exception), anyio.CancelScope(shield=True):  # nobody is left to tell
                await body.aclose()
        finally:
            self._release()

    def _release(self) -> None:
        """Hand the slot to the head of the queue, or free it (always, while above a shrunk limit)."""
        if self._queued and self._in_flight <= self._limit:
            for queue in self._queues:
                if queue:
                    self._wake(queue.popleft(), _GRANTED)
                    return
        self._in_flight -= 1
        self._in_flight_gauge.dec()

    def _wake(self, waiter: _Waiter, state: int) -> None:
        """Take ``waiter`` off the count of the queue (it is already out of it) and tell it its fate."""
        self._queued -= 1
        self._queued_gauge.dec()
        waiter.state = state
        waiter.event.set()

    def _leave(self, waiter: _Waiter) -> None:
        self._queues[waiter.rank].remove(waiter)
        self._queued -= 1
        self._queued_gauge.dec()

    def _reject(self, call: Call, priority: str, why: str, reason: str) -> BulkheadFullError:
        self._metrics.labelled("bulkhead_rejected", priority).inc()
        self._rejected(call, reason)
        host = self._metrics.host
        return BulkheadFullError(f"bulkhead of {host} {why}", host=host, retry_after=None, request=call.request)

    def _make_room(self, call: Call, rank: int) -> None:
        """Shed the newest of the lowest-ranked waiters below ``rank``, or refuse the newcomer."""
        for lower in range(len(PRIORITIES) - 1, rank, -1):
            queue = self._queues[lower]
            if queue:
                self._wake(queue.pop(), _SHED)
                self._metrics.labelled("bulkhead_rejected", PRIORITIES[lower]).inc()
                return
        raise self._reject(call, call.priority, f"is full ({self._limit} in flight, {self._max_queue} waiting)", "full")

    async def _wait(self, call: Call) -> None:
        """Queue until a slot is handed over; return holding it, or raise."""
        clock = self._clock
        started = clock.now()
        timeout = self._queue_timeout
        by_deadline = False
        if call.deadline is not None:
            left = call.deadline - started
            if left <= 0:
                raise expired(call, "total", " while waiting for a bulkhead slot")
            if timeout is None or left <= timeout:
                timeout, by_deadline = left, True
        rank = _RANK[call.priority]
        if self._queued >= self._max_queue:
            self._make_room(call, rank)
        waiter = _Waiter(rank)
        self._queues[rank].append(waiter)
        self._queued += 1
        self._queued_gauge.inc()
        try:
            with anyio.move_on_after(timeout):
                await waiter.event.wait()
        except BaseException:  # cancelled
            if waiter.state == _GRANTED:  # handed a slot it will not use: pass it on
                self._release()
            elif waiter.state == _WAITING:
                self._leave(waiter)
            raise
        finally:
            waited = clock.now() - started
            if waited > 0:
                call.waited("bulkhead", waited)
                events = self._events
                if events.wants(DEBUG, "bulkhead", call):
                    events.emit(
                        Waited(transport=events.transport, host=events.host, reason="bulkhead", seconds=waited), call
                    )
        # The state, not the timer, decides: a slot handed over as the timer
        # fired is still the call's to use.
        if waiter.state == _GRANTED:
            return
        if waiter.state == _SHED:
            self._rejected(call, "shed")
            host = self._metrics.host
            raise BulkheadFullError(
                f"bulkhead of {host} shed this {call.priority} call for a higher-priority one",
                host=host,
                retry_after=None,
                request=call.request,
            )
        self._leave(waiter)
        if by_deadline:
            raise expired(call, "total", " while waiting for a bulkhead slot")
        raise self._reject(call, call.priority, f"had no free slot within {self._queue_timeout}s", "queue_timeout")
