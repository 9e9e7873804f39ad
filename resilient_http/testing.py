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
:class:`Script` plays a server's answers, one per request, for an
``httpx.MockTransport``.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import anyio
import httpx


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


Handler = Callable[[httpx.Request], httpx.Response] | Callable[[httpx.Request], Coroutine[Any, Any, httpx.Response]]
#: One scripted answer: a status, a status with headers, an exception class raised
#: with the request, or a handler of its own.
Step = int | tuple[int, Mapping[str, str]] | type[httpx.TransportError] | Handler


class Script:
    """An ``httpx.MockTransport`` handler that plays its steps in order, repeating the last.

    ::

        script = Script(503, (429, {"Retry-After": "1"}), httpx.ConnectError, 200)
        transport = ResilientTransport(inner=httpx.MockTransport(script), clock=FakeClock())
        ...
        assert script.calls == 4

    A step is a status, a status with headers, an ``httpx.TransportError``
    subclass (raised with the request), or a handler of its own. Every request
    is kept in ``requests``.
    """

    def __init__(self, *steps: Step) -> None:
        if not steps:
            raise ValueError("a Script needs at least one step")
        self.steps = steps
        self.requests: list[httpx.Request] = []

    @property
    def calls(self) -> int:
        return len(self.requests)

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.steps[min(self.calls, len(self.steps)) - 1]
        if isinstance(step, int):
            return httpx.Response(step)
        if isinstance(step, tuple):
            status, headers = step
            return httpx.Response(status, headers=headers)
        if isinstance(step, type):
            raise step(f"scripted failure {self.calls}", request=request)
        response = step(request)
        return response if isinstance(response, httpx.Response) else await response
