"""The attempt timer: anyio's cancellation rules at a fraction of a cancel scope's cost."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable

import anyio
import pytest

from resilient_http._watchdog import TASK_STATES, Timer, Watchdog


async def timed(
    watchdog: Watchdog, seconds: float, body: Callable[[], Awaitable[object]], started: list[Timer] | None = None
) -> bool:
    """Run ``body`` under a timer the way an attempt does; whether the deadline ended it."""
    timer = watchdog.start(seconds)
    assert timer is not None
    if started is not None:
        started.append(timer)
    try:
        await body()
    except BaseException as exc:
        if timer.finish(isinstance(exc, asyncio.CancelledError)):
            return True
        raise
    timer.done = True
    if timer.delivered:
        timer.finish(False)
    return False


def sleeping(seconds: float) -> Callable[[], Awaitable[None]]:
    return lambda: asyncio.sleep(seconds)


async def test_the_installed_anyio_is_read_so_timers_are_light() -> None:
    """The installed anyio is the one the watchdog knows how to read: attempts get light timers, not scopes."""
    assert TASK_STATES is not None
    assert isinstance(Watchdog().start(1.0), Timer)


async def test_a_deadline_that_passes_ends_the_block_and_says_so() -> None:
    """A block still running at its deadline is cancelled, and the timer counts that cancellation as its own."""
    assert await timed(Watchdog(), 0.001, sleeping(5))
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_block_that_ends_in_time_is_left_alone() -> None:
    """A block that ends before its deadline is not cancelled, then or later."""
    watchdog = Watchdog()
    assert not await timed(watchdog, 0.01, sleeping(0))
    await asyncio.sleep(0.03)  # past the deadline: nothing may land now
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_deadline_waits_for_a_shielded_scope_inside_the_attempt() -> None:
    """Inside a shielded anyio scope (httpcore returning a connection) the deadline waits until it ends."""
    steps = []

    async def body() -> None:
        with anyio.CancelScope(shield=True):
            await asyncio.sleep(0.02)  # well past the deadline
            steps.append("shielded work done")
        await asyncio.sleep(5)
        steps.append("never")

    assert await timed(Watchdog(), 0.001, body)
    assert steps == ["shielded work done"]


async def test_an_outer_shield_does_not_stop_the_attempts_own_deadline() -> None:
    """An attempt run inside a caller's shielded scope still ends at its own deadline."""
    with anyio.CancelScope(shield=True):
        assert await timed(Watchdog(), 0.001, sleeping(5))


async def test_a_result_the_task_is_about_to_resume_with_is_never_lost() -> None:
    """When the deadline passes as the awaited future completes, the task gets its result and is cancelled later."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()
    got: list[str] = []
    timers: list[Timer] = []

    async def body() -> None:
        got.append(await future)
        await asyncio.sleep(5)  # the cancellation lands here

    task = asyncio.create_task(timed(Watchdog(), 60, body, timers))
    await asyncio.sleep(0)  # the task now waits on the future
    future.set_result("answer")  # its wake-up is scheduled...
    timers[0].expire(loop)  # ...and the deadline passes in the same turn of the loop
    assert await task
    assert got == ["answer"]


async def test_a_callers_cancellation_goes_through_a_timer_that_also_fired() -> None:
    """A caller's cancellation arriving with the deadline is the caller's: the timer does not swallow it."""
    loop = asyncio.get_running_loop()
    timers: list[Timer] = []
    task = asyncio.create_task(timed(Watchdog(), 60, sleeping(5), timers))
    await asyncio.sleep(0)
    timers[0].expire(loop)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_callers_cancellation_alone_is_not_a_timeout() -> None:
    """Cancelling the task before the deadline propagates, and leaves no cancellation behind to land later."""
    watchdog = Watchdog()
    task = asyncio.create_task(timed(watchdog, 0.01, sleeping(5)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.02)
    assert len(watchdog) == 0  # the ended timer was dropped when the loop timer fired


async def test_a_cancellation_swallowed_inside_is_taken_back() -> None:
    """Code that swallows the deadline's cancellation and returns leaves the task with no pending cancellation."""

    async def swallowing() -> None:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            pass

    assert not await timed(Watchdog(), 0.001, swallowing)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    await asyncio.sleep(0)  # would raise if a cancellation were still pending


async def test_sequential_attempts_keep_one_entry_and_arm_the_loop_timer_once() -> None:
    """Sequential attempts with one timeout re-arm the loop timer once per period, and keep no backlog."""
    watchdog = Watchdog()
    armed = []
    for _ in range(1000):
        await timed(watchdog, 30, sleeping(0))
        armed.append(watchdog._armed)
    assert len(set(armed)) == 1  # the first deadline stays armed: later ones come after it
    assert len(watchdog) == 1  # each ended timer leaves when the next one starts


async def test_ended_timers_behind_one_in_flight_are_dropped_when_it_ends() -> None:
    """Attempts that end while an earlier one is still in flight wait for it, then leave with the next start."""
    watchdog = Watchdog()
    release = asyncio.Event()
    slow = asyncio.create_task(timed(watchdog, 30, release.wait))
    await asyncio.sleep(0)
    for _ in range(100):
        await timed(watchdog, 30, sleeping(0))
    assert len(watchdog) == 101  # the first is in flight: those behind it wait
    release.set()
    assert not await slow
    await timed(watchdog, 30, sleeping(0))
    assert len(watchdog) == 1


async def test_an_ended_timer_keeps_no_other_timer() -> None:
    """A timer kept after its attempt (in a traceback, say) holds none of the timers that started after it."""
    watchdog = Watchdog()
    timers: list[Timer] = []
    for _ in range(3):
        await timed(watchdog, 30, sleeping(0), timers)
    for timer in timers[:-1]:
        assert not [other for other in gc.get_referents(timer) if other in timers]


async def test_a_deadline_after_the_loop_timer_stopped_arms_it_again() -> None:
    """Once every attempt has ended and the loop timer has stopped, the next attempt's deadline still ends it."""
    watchdog = Watchdog()
    assert not await timed(watchdog, 0.005, sleeping(0))
    await asyncio.sleep(0.02)  # the loop timer fires, finds nothing in flight, and stops
    assert len(watchdog) == 0
    assert await timed(watchdog, 0.001, sleeping(1))


async def test_deadlines_out_of_order_each_end_their_attempt() -> None:
    """A deadline earlier than those kept before it, and a later one after it: each ends its own attempt in time."""
    watchdog = Watchdog()
    loop = asyncio.get_running_loop()
    ended: dict[str, float] = {}
    started = loop.time()

    async def attempt(name: str, seconds: float) -> None:
        assert await timed(watchdog, seconds, sleeping(5))
        ended[name] = loop.time() - started

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(attempt, "long", 0.2)
        tasks.start_soon(attempt, "short", 0.01)  # earlier than the long one's
        tasks.start_soon(attempt, "longer", 0.25)
    assert ended["short"] < 0.2 <= ended["long"] < ended["longer"] < 1


async def test_an_earlier_deadline_rearms_the_loop_timer() -> None:
    """A shorter timeout after a longer one is not held back by the longer one's loop timer."""
    watchdog = Watchdog()
    results: list[bool] = []

    async def inner() -> None:
        results.append(await timed(watchdog, 0.001, sleeping(5)))

    assert not await timed(watchdog, 30, inner)
    assert results == [True]


async def test_concurrent_attempts_each_end_at_their_own_deadline() -> None:
    """Many attempts in flight with different deadlines: the expired ones end, the others finish."""
    watchdog = Watchdog()
    outcomes: dict[int, bool] = {}

    async def attempt(i: int) -> None:
        outcomes[i] = await timed(watchdog, 0.005 if i % 2 else 5.0, sleeping(0.05))

    async with anyio.create_task_group() as tasks:
        for i in range(200):
            tasks.start_soon(attempt, i)
    assert outcomes == {i: bool(i % 2) for i in range(200)}


def test_a_watchdog_serves_a_new_event_loop() -> None:
    """A transport used from one event loop, then another: its timers work in both."""
    watchdog = Watchdog()
    assert asyncio.run(timed(watchdog, 0.001, sleeping(5)))
    assert asyncio.run(timed(watchdog, 0.001, sleeping(5)))


def test_under_trio_the_attempt_is_told_to_use_an_anyio_scope() -> None:
    """Under trio there is no light timer: the attempt makes a real anyio cancel scope."""

    async def main() -> None:
        assert Watchdog().start(0.001) is None

    anyio.run(main, backend="trio")
