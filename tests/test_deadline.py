"""The shared deadline watchdog: one timer per event loop, exact as a cancel scope."""

from __future__ import annotations

import asyncio
import time

import anyio
import pytest

from resilient_http._deadline import move_on_after


async def test_a_block_past_its_deadline_is_cancelled() -> None:
    """The block stops at its deadline and says so."""
    started = time.monotonic()
    with move_on_after(0.02) as scope:
        await asyncio.sleep(5)
    assert scope.expired
    assert time.monotonic() - started < 1.0


async def test_a_block_that_ends_in_time_leaves_no_cancellation_behind() -> None:
    """A finished block's deadline passing later cancels nothing."""
    with move_on_after(0.02) as scope:
        await asyncio.sleep(0)
    assert not scope.expired
    await asyncio.sleep(0.05)  # would raise CancelledError if the watchdog still held the task
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_an_outer_cancellation_is_never_swallowed() -> None:
    """Cancelling the task from outside propagates even while a deadline is pending."""

    async def victim() -> None:
        with move_on_after(10):
            await asyncio.sleep(5)

    task = asyncio.ensure_future(victim())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_outer_cancellation_at_the_deadline_still_propagates() -> None:
    """When the deadline and an outer cancel land before the task wakes, the outer one wins."""

    async def victim() -> None:
        task = asyncio.current_task()
        assert task is not None
        with move_on_after(0):  # the watchdog fires on the next loop iteration...
            asyncio.get_running_loop().call_soon(task.cancel)  # ...right after this outer cancel
            await asyncio.sleep(5)

    with pytest.raises(asyncio.CancelledError):
        await asyncio.ensure_future(victim())


async def test_many_deadlines_fire_each_at_its_own_time() -> None:
    """Concurrent blocks with different deadlines expire in deadline order, the short ones first."""
    expired: list[float] = []

    async def block(seconds: float) -> None:
        with move_on_after(seconds) as scope:
            await asyncio.sleep(5)
        assert scope.expired
        expired.append(seconds)

    seconds = [0.05, 0.01, 0.03, 0.02, 0.04]
    await asyncio.gather(*(block(s) for s in seconds))
    assert expired == sorted(seconds)


async def test_an_asyncio_timeout_inside_is_not_confused_with_ours() -> None:
    """An inner asyncio.timeout firing first raises its own TimeoutError; our block is not expired."""
    with move_on_after(5) as scope:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await asyncio.sleep(5)
    assert not scope.expired


def test_under_trio_the_block_is_an_anyio_cancel_scope() -> None:
    """Under trio (no asyncio loop) the same block works through anyio."""

    async def main() -> bool:
        with move_on_after(0.01) as scope:
            await anyio.sleep(5)
        return scope.expired

    assert anyio.run(main, backend="trio")
