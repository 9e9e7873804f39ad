"""A transport's side of the fleet: its store, its heartbeat, and the store operations nobody waits for.

A :class:`ResilientTransport` given a shared store (``store=`` a URL, a
``[store]`` table or a store object) makes one :class:`Fleet`, and the
layers whose meaning is fleet-wide (the rate limiter, the circuit breaker,
the retry budget's floor) find it in the host's shared state under
:data:`FLEET`. Without a shared store there is no fleet, and those layers
decide alone, exactly as before: the in-memory single-process path never
awaits a store.

**Heartbeats.** The store counts live workers by their heartbeats. Nobody
runs a timer for them: the calls do. The rate limiter's first question to
the store waits for the worker's first heartbeat (:meth:`Fleet.join`,
bounded by the store's timeout), so that the worker knows how many share
the quota before it decides; then a layer calls :meth:`Fleet.tick` as a
call passes, which at most once a second starts a heartbeat in the
background. The answer (the live workers) is kept for the
layers, and kept as it was last known while the store cannot answer. A
worker that makes no calls stops beating and drops out of the count after
``heartbeat`` seconds (5), which is what the count is for: the workers that
share a quota.

**Before the store has counted the fleet**, a worker never takes itself to
be alone: it takes the fleet to have the store's ``workers`` (the expected
size, 8 by default for Redis), until its first heartbeat is answered, and
at least that many for a heartbeat's lifetime after it, while workers
started with it may not have been counted yet. A worker that must decide
alone (the store cannot answer) then takes ``rate / workers``, a small
share, rather than the whole quota: eight workers that started while Redis
was away send the quota between them, not eight times it.

**Operations nobody waits for** (a heartbeat, publishing a server's
``Retry-After`` to the fleet, publishing that a breaker opened, giving back
a trial slot of a cancelled call) run as tasks the fleet owns: it keeps a
reference to each until it ends, and :meth:`Fleet.aclose` (called by the
transport's ``aclose``) cancels those still running and waits for them.
Each one is a single store operation, bounded by the store's own timeout,
so none outlives its call by more than that. If the event loop ends first,
asyncio cancels them with every other task. Under an event loop that is
not asyncio (trio, where only a store that never suspends can work, like
:class:`MemoryStore`), an operation is run to its end at once; one that
would suspend there is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Final

from .._clock import Clock
from .._events import DEBUG, HostEvents, StoreFallback
from ._base import UNAVAILABLE, Store

if TYPE_CHECKING:
    from .._call import Call

logger = logging.getLogger("resilient_http.store")

#: The key of a transport's :class:`Fleet` in ``Host.shared``.
FLEET: Final = "fleet"

#: Seconds a heartbeat keeps a worker counted among the live ones.
HEARTBEAT: Final = 5.0
#: Seconds between two heartbeats of a worker that is making calls.
BEAT_EVERY: Final = 1.0


class Fleet:
    """One transport's use of a shared store: the store, the live workers as last known, background operations.

    ``owned``: the store was opened by the transport (from a URL or a
    table) and is closed with it; a store object given as is belongs to its
    giver. ``workers`` is the number of live workers as this worker knows
    it (see the module docstring); ``joined`` says whether the first
    heartbeat was made.
    """

    __slots__ = (
        "_clock",
        "_closed",
        "_counted",
        "_expected",
        "_heartbeat",
        "_next_beat",
        "_owned",
        "_tasks",
        "joined",
        "store",
        "workers",
    )

    def __init__(self, store: Store, *, clock: Clock, owned: bool, heartbeat: float = HEARTBEAT) -> None:
        self.store = store
        self._expected = max(1, int(store.workers))
        self.workers = self._expected
        self.joined = False
        self._counted = math.inf  # when the store first answered this worker's heartbeat
        self._clock = clock
        self._owned = owned
        self._closed = False
        self._heartbeat = heartbeat
        self._next_beat = -math.inf
        self._tasks: set[asyncio.Task[Any]] = set()

    async def join(self) -> None:
        """The first use of the store: a heartbeat, awaited (the store's timeout bounds it), so the count is known.

        The rate limiter joins before its first question; a layer that only
        ticks (the breaker, the retry budget) starts the first heartbeat in
        the background instead.
        """
        self.joined = True
        self._next_beat = self._clock.now() + BEAT_EVERY
        await self._beat()

    def tick(self, now: float) -> None:
        """A call passes: start a heartbeat if one is due (at most one a second)."""
        if now >= self._next_beat:
            self.joined = True
            self._next_beat = now + BEAT_EVERY
            self.soon(self._beat())

    async def _beat(self) -> None:
        live = await self.store.heartbeat(self._heartbeat)
        if live is UNAVAILABLE:
            return  # the count stays as last known
        now = self._clock.now()
        self._counted = min(self._counted, now)
        if now < self._counted + self._heartbeat:  # workers started with this one may not be counted yet
            live = max(live, self._expected)
        self.workers = max(1, live)

    def soon(self, operation: Coroutine[Any, Any, Any]) -> None:
        """Run ``operation`` (one store operation and what follows from its answer) without waiting for it."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio: run it now if it never suspends (see the module docstring)
            try:
                operation.send(None)
            except StopIteration:
                return
            operation.close()
            logger.warning("store %r suspended outside asyncio: a background operation was dropped", self.store)
            return
        task = loop.create_task(operation)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("a background store operation failed", exc_info=task.exception())

    async def settle(self) -> None:
        """Wait until every background operation started so far has ended (for tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        """Cancel the background operations, wait for them, and close the store if the transport opened it."""
        for task in list(self._tasks):
            task.cancel()
        await self.settle()
        if self._owned and not self._closed:
            self._closed = True
            await self.store.aclose()


def fell_back(events: HostEvents, layer: str, operation: str, call: Call | None = None) -> None:
    """Tell the listeners that the store did not answer ``operation`` and ``layer`` decided locally."""
    if events.wants(DEBUG, "store", call):
        event = StoreFallback(transport=events.transport, host=events.host, layer=layer, operation=operation)
        events.emit(event, call)
