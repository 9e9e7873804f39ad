"""Helpers for testing code that uses resilient_http, without waiting and without a network.

::

    clock = FakeClock()
    transport = ResilientTransport(inner=httpx.MockTransport(handler), clock=clock)
    ...
    assert clock.sleeps == [...]      # every backoff the calls waited, instantly

:class:`FakeClock` makes every ``sleep`` return at once after moving its
time forward; breaker windows, budgets, token buckets and backoffs run on it.
Per-attempt timeouts are the one exception: they are enforced by the event
loop's clock, so a test that needs one to fire must really wait for it.
"""

from __future__ import annotations

import anyio


class FakeClock:
    """A clock that moves only when told to, or when something sleeps on it."""

    def __init__(self, start: float = 1000.0, wall: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall - start
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go back (advance by {seconds!r})")
        self._now += seconds

    async def sleep(self, seconds: float) -> None:
        """Record the sleep, move time forward by it, and yield to the event loop once."""
        self.sleeps.append(seconds)
        self.advance(max(0.0, seconds))
        await anyio.lowlevel.checkpoint()
