"""The attempt timer: anyio's cancellation rules at a fraction of a cancel scope's cost."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from resilient_http._watchdog import TASK_STATES, Timer, Watchdog


def timer(watchdog: Watchdog, seconds: float) -> Timer:
    scope = watchdog.scope(seconds)
    assert isinstance(scope, Timer)
    return scope


async def test_the_installed_anyio_is_read_so_timers_are_light() -> None:
    """The installed anyio is the one the watchdog knows how to read: attempts get light timers, not scopes."""
    assert TASK_STATES is not None
    assert isinstance(Watchdog().scope(1.0), Timer)


async def test_a_deadline_that_passes_ends_the_block_and_says_so() -> None:
    """A block still running at its deadline is cancelled, and the timer catches that cancellation."""
    watchdog = Watchdog()
    with timer(watchdog, 0.001) as ended:
        await asyncio.sleep(5)
    assert ended.cancelled_caught
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_block_that_ends_in_time_is_left_alone() -> None:
    """A block that ends before its deadline is not cancelled, then or later."""
    watchdog = Watchdog()
    with timer(watchdog, 0.01) as ended:
        await asyncio.sleep(0)
    await asyncio.sleep(0.03)  # past the deadline: nothing may land now
    assert not ended.cancelled_caught


async def test_a_deadline_waits_for_a_shielded_scope_inside_the_attempt() -> None:
    """Inside a shielded anyio scope (httpcore returning a connection) the deadline waits until it ends."""
    watchdog = Watchdog()
    steps = []
    with timer(watchdog, 0.001) as ended:
        with anyio.CancelScope(shield=True):
            await asyncio.sleep(0.02)  # well past the deadline
            steps.append("shielded work done")
        await asyncio.sleep(5)
        steps.append("never")
    assert steps == ["shielded work done"]
    assert ended.cancelled_caught


async def test_an_outer_shield_does_not_stop_the_attempts_own_deadline() -> None:
    """An attempt run inside a caller's shielded scope still ends at its own deadline."""
    watchdog = Watchdog()
    with anyio.CancelScope(shield=True), timer(watchdog, 0.001) as ended:
        await asyncio.sleep(5)
    assert ended.cancelled_caught


async def test_a_result_the_task_is_about_to_resume_with_is_never_lost() -> None:
    """When the deadline passes as the awaited future completes, the task gets its result and is cancelled later."""
    watchdog = Watchdog()
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()
    got: list[str] = []
    timers: list[Timer] = []

    async def attempt() -> None:
        with timer(watchdog, 60) as running:
            timers.append(running)
            got.append(await future)
            await asyncio.sleep(5)  # the cancellation lands here

    task = asyncio.create_task(attempt())
    await asyncio.sleep(0)  # the task now waits on the future
    future.set_result("answer")  # its wake-up is scheduled...
    timers[0].expire(loop)  # ...and the deadline passes in the same turn of the loop
    await task
    assert got == ["answer"]
    assert timers[0].cancelled_caught


async def test_a_callers_cancellation_goes_through_a_timer_that_also_fired() -> None:
    """A caller's cancellation arriving with the deadline is the caller's: the timer does not swallow it."""
    watchdog = Watchdog()
    loop = asyncio.get_running_loop()
    timers: list[Timer] = []

    async def attempt() -> None:
        with timer(watchdog, 60) as running:
            timers.append(running)
            await asyncio.sleep(5)

    task = asyncio.create_task(attempt())
    await asyncio.sleep(0)
    timers[0].expire(loop)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not timers[0].cancelled_caught


async def test_a_callers_cancellation_alone_is_not_a_timeout() -> None:
    """Cancelling the task before the deadline propagates, and leaves no cancellation behind to land later."""
    watchdog = Watchdog()

    async def attempt() -> None:
        with timer(watchdog, 0.01):
            await asyncio.sleep(5)

    task = asyncio.create_task(attempt())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.02)
    assert len(watchdog) == 0  # the ended timer was dropped when the loop timer fired


async def test_sequential_attempts_keep_one_entry_and_arm_the_loop_timer_once() -> None:
    """Sequential attempts with one timeout re-arm the loop timer once per period, and keep no backlog."""
    watchdog = Watchdog()
    armed = []
    for _ in range(1000):
        with timer(watchdog, 30):
            await asyncio.sleep(0)
        armed.append(watchdog._armed)
    assert len(set(armed)) == 1  # the first deadline stays armed: later ones come after it
    assert len(watchdog) == 1  # each ended timer leaves when the next one starts


async def test_an_earlier_deadline_rearms_the_loop_timer() -> None:
    """A shorter timeout after a longer one is not held back by the longer one's loop timer."""
    watchdog = Watchdog()
    with timer(watchdog, 30):
        with timer(watchdog, 0.001) as short:
            await asyncio.sleep(5)
        assert short.cancelled_caught


async def test_concurrent_attempts_each_end_at_their_own_deadline() -> None:
    """Many attempts in flight with different deadlines: the expired ones end, the others finish."""
    watchdog = Watchdog()
    outcomes: dict[int, bool] = {}

    async def attempt(i: int) -> None:
        seconds = 0.005 if i % 2 else 5.0
        with timer(watchdog, seconds) as running:
            await asyncio.sleep(0.05)
        outcomes[i] = running.cancelled_caught

    async with anyio.create_task_group() as tasks:
        for i in range(200):
            tasks.start_soon(attempt, i)
    assert outcomes == {i: bool(i % 2) for i in range(200)}


def test_a_watchdog_serves_a_new_event_loop() -> None:
    """A transport used from one event loop, then another: its timers work in both."""
    watchdog = Watchdog()

    async def once() -> bool:
        with timer(watchdog, 0.001) as ended:
            await asyncio.sleep(5)
        return ended.cancelled_caught

    assert asyncio.run(once())
    assert asyncio.run(once())


def test_under_trio_the_timer_is_an_anyio_scope() -> None:
    """Under trio every attempt gets a real anyio cancel scope, which ends the block at its deadline."""

    async def main() -> None:
        scope = Watchdog().scope(0.001)
        assert isinstance(scope, anyio.CancelScope)
        with scope:
            await anyio.sleep(5)
        assert scope.cancelled_caught

    anyio.run(main, backend="trio")
