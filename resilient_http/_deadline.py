"""Cancel a block of code when its deadline passes, for the price of a heap push.

Every attempt needs a timer, and a timer per attempt is not free: an anyio
cancel scope costs about 10 µs and ``asyncio.timeout`` about 5 µs, a real
share of a ~150 µs httpx call. Under asyncio, :func:`move_on_after` instead
registers the deadline with one watchdog per event loop, which keeps a
single ``loop.call_at`` timer for the earliest deadline of all blocks in
flight and cancels the tasks whose deadline has passed, the way
``asyncio.timeout`` does (``Task.cancel`` then ``Task.uncancel``, so an
outer cancellation is never swallowed). A block that ends in time only
marks its entry done; the watchdog drops done entries when its timer next
fires.

Under any other event loop (trio), :func:`move_on_after` is an anyio cancel
scope: correct everywhere, faster where it matters most.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import weakref
from types import TracebackType

import anyio

_get_running_loop = asyncio._get_running_loop
current_task = asyncio.current_task


class _Entry:
    __slots__ = ("expired", "task")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task: asyncio.Task[object] | None = task
        self.expired = False


class _Watchdog:
    """All the deadlines of one event loop, behind a single timer."""

    __slots__ = ("__weakref__", "_heap", "_loop", "_order", "_timer", "_timer_at")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # (deadline, order, entry): tuples compare in C, and order breaks ties.
        self._heap: list[tuple[float, int, _Entry]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def watch(self, deadline: float, entry: _Entry) -> None:
        heapq.heappush(self._heap, (deadline, next(self._order), entry))
        if deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        heap = self._heap
        now = self._loop.time()
        while heap and (heap[0][2].task is None or heap[0][0] <= now):
            entry = heapq.heappop(heap)[2]
            if entry.task is not None:
                entry.expired = True
                entry.task.cancel()
                entry.task = None
        if heap:
            self._timer_at = heap[0][0]
            self._timer = self._loop.call_at(self._timer_at, self._fire)
        else:
            self._timer_at = math.inf
            self._timer = None


_watchdogs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Watchdog] = weakref.WeakKeyDictionary()


def _watchdog(loop: asyncio.AbstractEventLoop) -> _Watchdog:
    watchdog = _watchdogs.get(loop)
    if watchdog is None:
        watchdog = _watchdogs[loop] = _Watchdog(loop)
    return watchdog


class _AsyncioScope:
    __slots__ = ("_cancelling", "_entry", "_loop", "_seconds", "_task", "_watchdog", "expired")

    def __init__(self, loop: asyncio.AbstractEventLoop, watchdog: _Watchdog, seconds: float) -> None:
        self._loop = loop
        self._watchdog = watchdog
        self._seconds = seconds
        self.expired = False

    def __enter__(self) -> _AsyncioScope:
        loop = self._loop
        task = current_task(loop)
        if task is None:
            raise RuntimeError("move_on_after() must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._entry = entry = _Entry(task)
        self._watchdog.watch(loop.time() + self._seconds, entry)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> bool:
        entry = self._entry
        entry.task = None
        if entry.expired and self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            self.expired = True
            return True
        return False


class _AnyioScope:
    __slots__ = ("_scope",)

    def __init__(self, seconds: float) -> None:
        self._scope = anyio.move_on_after(seconds)

    def __enter__(self) -> _AnyioScope:
        self._scope.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> bool:
        return bool(self._scope.__exit__(exc_type, exc, traceback))

    @property
    def expired(self) -> bool:
        return self._scope.cancelled_caught


#: What :func:`move_on_after` returns.
Scope = _AsyncioScope | _AnyioScope

_last: tuple[asyncio.AbstractEventLoop | None, _Watchdog | None] = (None, None)


def move_on_after(seconds: float) -> Scope:
    """A ``with`` block that is cancelled after ``seconds``; ``.expired`` tells whether it was."""
    global _last
    loop = _get_running_loop()
    if loop is None:
        return _AnyioScope(seconds)
    last_loop, watchdog = _last
    if last_loop is not loop or watchdog is None:
        watchdog = _watchdog(loop)
        _last = (loop, watchdog)
    return _AsyncioScope(loop, watchdog, seconds)
