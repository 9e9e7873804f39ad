"""Time and randomness, injectable so that every wait can be tested without waiting.

Production code reads ``time.monotonic`` for intervals and deadlines,
``time.time`` only to read HTTP dates, and sleeps through anyio so that the
library works under asyncio and trio alike. Tests hand the transport a
:class:`resilient_http.testing.FakeClock` instead.
"""

from __future__ import annotations

import random
import time
from typing import Protocol

import anyio


class Clock(Protocol):
    """Where resilient_http reads the time and waits."""

    def now(self) -> float:
        """Monotonic seconds: deadlines, windows and buckets are measured on it."""
        ...

    def wall(self) -> float:
        """Seconds since the epoch: only to read HTTP-date headers."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``; cancellable."""
        ...


class SystemClock:
    """The real clock."""

    __slots__ = ()

    # The C functions themselves, not Python methods around them: ``now`` is
    # read several times on every call.
    now = staticmethod(time.monotonic)
    wall = staticmethod(time.time)

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


def default_random() -> random.Random:
    """A fresh random source for jitter (not for security)."""
    return random.Random()
