"""The attempt timer: one loop timer per transport, and cancellation that respects anyio's shields.

Every attempt runs inside a timer (:mod:`resilient_http.layers.timeout`),
so the timer is paid on every call. An anyio ``CancelScope`` with a
deadline is the safe choice, and it costs about 49,000 CPU instructions to
enter and leave under asyncio (the whole bare httpx call is about 620,000):
two sets, a weak-dictionary entry, a loop timer handle, and the bookkeeping
for cancellations it almost never delivers. ``asyncio.timeout`` is cheaper
but unsafe: its ``Task.cancel()`` pierces the anyio shields inside which
httpcore hands connections back to its pool, which orphans connections until
a capped pool wedges (issue 7's soak test).

A :class:`Timer` keeps what is safe about the scope and drops the rest:

- **Arming costs almost nothing.** The transport's :class:`Watchdog` keeps
  the deadlines of the attempts in flight and holds one loop timer, armed at
  or before the earliest of them. With one timeout per host, deadlines
  arrive in order (each is the loop's clock plus the same timeout), so a
  timer whose deadline is not earlier than the last one kept joins the end
  of a queue, a list linked through the timers themselves, without touching
  the loop timer: the queue's first deadline, which the loop timer already
  covers, comes no later. A timer that ends is merely marked done; the done
  timers at the front of the queue are dropped when the next timer joins
  it (and unlinked, so a timer kept elsewhere, in a traceback say, keeps no
  other). A deadline earlier than the queue's last goes into a heap
  instead. The loop timer is re-armed only when a timer that starts an
  empty queue or enters the heap has an earlier deadline than the armed
  one, or when it fires: sequential calls with one timeout re-arm once per
  timeout period, not once per call.
- **Cancelling is anyio's rule.** When a deadline passes, the task is
  cancelled only if, at that moment, no anyio scope the attempt entered is
  shielded, and the task is not about to resume with a result (the future
  it waits on is not done): exactly the conditions under which anyio's own
  scope delivers a cancellation. Otherwise the delivery is tried again on
  every turn of the loop until it succeeds or the attempt ends, as anyio
  does. The check reads anyio's record of each task's scopes; where that
  record is not what this module expects (another anyio), and under trio,
  :meth:`Watchdog.start` says so, and the attempt uses a real
  ``anyio.CancelScope`` instead.
- **Only its own cancellation is caught.** When the attempt ends, a timer
  that delivered a cancellation takes it back (``Task.uncancel``), and
  counts the ``CancelledError`` as the deadline's only when no other
  cancellation arrived meanwhile, as ``asyncio.timeout`` does: a caller's
  cancellation always goes through.
- **No context manager.** The attempt marks its timer done when it ends in
  time (an attribute store), and asks it only when it ends in an exception.

Lifecycle: the watchdog belongs to its transport and lives as long as it
does; it serves the event loop it was first used in, and starts afresh,
dropping the old loop's entries, when used from another. Its loop timer is
re-armed only for live deadlines: once the last attempt has ended, the armed
timer fires once more and stops (closing the transport does not cut short
the attempts still in flight). A timer holds its task until it ends in an
exception, or, when it ends in time, until the watchdog drops it (done
timers behind one still in flight wait for it). Nothing here is global
but the constant that stands for no timer, which is never written.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from heapq import heappop, heappush
from typing import Any

_get_running_loop = asyncio._get_running_loop
_Future = asyncio.Future
_CancelledError = asyncio.CancelledError

#: The message of the cancellations a timer delivers (anyio's own start "Cancelled via cancel scope").
MESSAGE = "resilient_http: the attempt's deadline passed"


def _anyio_task_states() -> Any:
    """anyio's per-task record of cancel scopes under asyncio, or ``None`` when it is not what we read."""
    try:
        from anyio._backends import _asyncio as backend
    except ImportError:  # pragma: no cover - anyio without its asyncio backend
        return None
    states = getattr(backend, "_task_states", None)
    state_type = getattr(backend, "TaskState", None)
    scope_type = getattr(backend, "CancelScope", None)
    slots = set(getattr(scope_type, "__slots__", ()))
    if (
        states is None
        or not callable(getattr(states, "get", None))
        or "cancel_scope" not in getattr(state_type, "__slots__", ())
        or not {"_parent_scope", "_shield"} <= slots
    ):
        return None  # pragma: no cover - another anyio
    return states


#: ``anyio._backends._asyncio._task_states``, checked; ``None`` makes every timer a real anyio scope.
TASK_STATES = _anyio_task_states()
#: The same, read without the weak dictionary's Python frame: ``_STATES.get(weakref.ref(task))``.
_STATES: Any = None if TASK_STATES is None else getattr(TASK_STATES, "data", None)
_ref = weakref.ref
#: The task running in each event loop; asyncio.current_task() is a Python function around it in 3.11.
_current_tasks: dict[asyncio.AbstractEventLoop, asyncio.Task[Any]] = asyncio.tasks._current_tasks  # type: ignore[attr-defined]


class Timer:
    """One attempt's deadline, kept by the transport's :class:`Watchdog` (see the module docstring).

    Made by :meth:`Watchdog.start`, already running. The attempt sets
    ``done`` when it ends in time, or calls :meth:`finish` when it ends in an
    exception (or when ``delivered`` says a cancellation was sent).
    """

    __slots__ = ("_cancelling", "_deadline", "_next", "_outer", "_task", "delivered", "done")

    _task: asyncio.Task[Any] | None
    _outer: Any
    _cancelling: int
    _deadline: float
    _next: Timer  # the next timer in the watchdog's queue (unset in the last)
    delivered: bool
    done: bool

    def finish(self, cancelled: bool) -> bool:
        """The attempt ended (``cancelled``: by a ``CancelledError``); whether it was this timer's alone.

        A cancellation this timer delivered is taken back (``Task.uncancel``);
        it was the attempt's end only when no other cancellation arrived while
        the attempt ran (``asyncio.timeout``'s rule): a caller's cancellation
        always goes through.
        """
        self.done = True
        task = self._task
        self._task = None
        if not self.delivered or task is None:
            return False
        return task.uncancel() <= self._cancelling and cancelled

    def expire(self, loop: asyncio.AbstractEventLoop) -> None:
        """The deadline passed: cancel the attempt now if anyio would, or on a later turn of the loop."""
        if not self._deliver():
            loop.call_soon(self.expire, loop)

    def _deliver(self) -> bool:
        """Cancel the task if nothing forbids it now; ``False`` to be asked again on the next turn."""
        task = self._task
        if self.done or task is None or task.done():
            return True
        if task._must_cancel:  # type: ignore[attr-defined]  # another cancellation is on its way: let it go first
            return False
        waiter = task._fut_waiter  # type: ignore[attr-defined]
        if isinstance(waiter, _Future) and waiter.done():
            return False  # about to resume with a result, which a cancellation would lose
        state = TASK_STATES.get(task)
        scope = None if state is None else state.cancel_scope
        outer = self._outer
        while scope is not None and scope is not outer:
            if scope._shield:  # e.g. httpcore handing a connection back to its pool
                return False
            scope = scope._parent_scope
        task.cancel(MESSAGE)
        self.delivered = True
        return True


_new_timer = object.__new__
#: "No timer": the ends of an empty queue, and what a timer dropped from the queue links to.
_NONE: Timer = _new_timer(Timer)
_NONE._deadline = math.inf
_NONE._task = _NONE._outer = None
_NONE._cancelling = 0
_NONE.delivered = False
_NONE.done = True


class Watchdog:
    """The attempt timers of one transport: deadlines in order, and one loop timer (see the module docstring)."""

    __slots__ = ("_armed", "_first", "_handle", "_heap", "_last", "_loop", "_order", "_tail")

    def __init__(self) -> None:
        # The timers whose deadlines came in order (the usual case), oldest first, linked by ``Timer._next``.
        self._first = self._tail = _NONE
        self._last = math.inf  # the tail's deadline; infinite when the queue is empty
        self._heap: list[tuple[float, int, Timer]] = []  # the timers whose deadlines came before the tail's
        self._order = 0  # breaks ties between equal deadlines in the heap
        self._handle: asyncio.TimerHandle | None = None
        self._armed = math.inf  # when the loop timer fires
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, seconds: float) -> Timer | None:
        """A timer of the running task that ends it ``seconds`` from now.

        ``None`` where the attempt needs a real anyio cancel scope instead:
        under trio, or with an anyio this module cannot read.
        """
        loop = _get_running_loop()
        if loop is None or loop is not self._loop:  # no loop (trio), the first use, another loop, or anyio unread
            return self._serve(loop, seconds)
        task = _current_tasks.get(loop)
        if task is None:
            return None
        timer: Timer = _new_timer(Timer)
        timer._deadline = deadline = loop.time() + seconds
        timer._task = task
        state = _STATES.get(_ref(task))
        timer._outer = None if state is None else state.cancel_scope  # the innermost anyio scope outside us
        timer._cancelling = task.cancelling()
        timer.delivered = timer.done = False
        if deadline >= self._last:  # in order: behind the tail, whose deadline the loop timer covers
            self._tail._next = timer
            self._tail = timer
            self._last = deadline
            first = self._first
            while first.done:  # ended in time: drop them (the new timer, not done, ends the walk)
                after = first._next
                first._next = _NONE  # a timer kept elsewhere must not keep the queue behind it
                first = after
            self._first = first
        else:
            self._add(timer, deadline)
        return timer

    def _serve(self, loop: asyncio.AbstractEventLoop | None, seconds: float) -> Timer | None:
        """:meth:`start` from a loop this watchdog does not serve yet, or from none."""
        if loop is None or _STATES is None:
            return None
        self._start(loop)
        return self.start(seconds)

    def _add(self, timer: Timer, deadline: float) -> None:
        """Keep a timer whose deadline comes before the tail's, or that finds the queue empty."""
        self._drop(-math.inf)
        if self._first is _NONE:
            self._first = self._tail = timer
            self._last = deadline
        else:
            heap = self._heap
            while heap and heap[0][2].done:
                heappop(heap)
            self._order += 1
            heappush(heap, (deadline, self._order, timer))
        if deadline < self._armed:
            self._arm(deadline)

    def _drop(self, now: float) -> None:
        """Drop the queue's first timers while they are done, or expired (cancelled) when their deadline is past."""
        first = self._first
        while first is not _NONE:
            if not first.done:
                if first._deadline > now:
                    break
                assert self._loop is not None
                first.expire(self._loop)
            if first is self._tail:
                first = self._tail = _NONE
                self._last = math.inf
            else:
                after = first._next
                first._next = _NONE
                first = after
        self._first = first

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        assert self._loop is not None
        self._handle = self._loop.call_at(when, self._fire)
        self._armed = when

    def _fire(self) -> None:
        self._handle = None
        self._armed = math.inf
        loop = self._loop
        assert loop is not None
        now = loop.time()
        self._drop(now)
        heap = self._heap
        while heap:
            timer = heap[0][2]
            if not timer.done:
                if timer._deadline > now:
                    break
                timer.expire(loop)
            heappop(heap)
        following = min(self._first._deadline, heap[0][0] if heap else math.inf)
        if following < math.inf:
            self._arm(following)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve ``loop`` from now on; the entries of a previous loop cannot fire any more."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._armed = math.inf
        self._first = self._tail = _NONE  # the old loop's timers are left to the garbage collector
        self._last = math.inf
        self._heap.clear()
        self._loop = loop

    def __len__(self) -> int:
        """Deadlines kept, in flight or ended but not yet dropped."""
        kept = len(self._heap)
        timer = self._first
        while timer is not _NONE:
            kept += 1
            timer = _NONE if timer is self._tail else timer._next
        return kept
