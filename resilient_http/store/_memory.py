"""The in-memory store: the same answers as the Redis store, for the workers of one process.

It is the default, and what the layers fall back to when they run alone:
one code path whether state is shared or not. Time is the transport's clock
(so a ``FakeClock`` drives it in tests); every entry expires as its Redis
twin would, and expired entries are swept as time passes, so an upstream
not seen for a while leaves nothing behind.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any

from .._clock import Clock, SystemClock
from ._base import (
    CLOSED,
    MAX_SECONDS,
    Admission,
    Circuit,
    Maybe,
    check_admit,
    check_seconds,
    check_slots,
    check_workers,
)

_SWEEP_EVERY = 60.0
_EPSILON = 1e-9


def default_worker_id() -> str:
    """A name for this worker that no other process shares: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(slots=True)
class _Breaker:
    round: int
    until: float
    closed: bool = False
    out: int = 0  # trial slots taken and not yet answered
    out_until: float = 0.0  # when the taken slots are free again
    ok: int = 0  # trials that succeeded this round

    def view(self, now: float) -> Circuit:
        if self.closed:
            return Circuit("closed", self.round, 0.0)
        if now < self.until:
            return Circuit("open", self.round, self.until - now)
        return Circuit("half_open", self.round, 0.0)


class MemoryStore:
    """A :class:`~resilient_http.store.Store` in this process's memory; it never answers ``UNAVAILABLE``.

    ``workers`` (1) is the fleet's size taken until the store has counted its
    workers: the transports sharing a memory store are one process, and it
    always answers.
    """

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        worker_id: str | None = None,
        circuit_ttl: float = 600.0,
        workers: int = 1,
    ) -> None:
        self._clock: Clock = SystemClock() if clock is None else clock
        self.worker_id = default_worker_id() if worker_id is None else worker_id
        self.workers = check_workers(workers)
        self._circuit_ttl = check_seconds("store.circuit_ttl", circuit_ttl)
        # key -> (expires at, value); keys are (kind, upstream[, name])
        self._entries: dict[tuple[str, ...], tuple[float, Any]] = {}
        self._workers: dict[str, float] = {}  # worker id -> expires at
        self._next_sweep = self._clock.now() + _SWEEP_EVERY

    def __len__(self) -> int:
        """Entries kept, expired ones not yet swept included (for tests and curiosity)."""
        return len(self._entries)

    def _now(self) -> float:
        now = self._clock.now()
        if now >= self._next_sweep:
            self._next_sweep = now + _SWEEP_EVERY
            self._entries = {key: entry for key, entry in self._entries.items() if entry[0] > now}
        return now

    def _get(self, key: tuple[str, ...], now: float) -> Any:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            del self._entries[key]
            return None
        return entry[1]

    def _hold_until(self, upstream: str, now: float) -> float:
        found = self._get(("hold", upstream), now)
        return now if found is None else max(now, found)

    async def admit(
        self,
        upstream: str,
        *,
        rate: float,
        burst: int,
        cost: int = 1,
        max_wait: float = 0.0,
        limit: str = "rate",
        turn: bool = True,
        next_turn: bool = False,
    ) -> Maybe[Admission]:
        check_admit(rate, burst, cost, max_wait)
        now = self._now()
        interval = 1.0 / rate
        arrival = self._hold_until(upstream, now)
        key = ("rate", upstream, limit)
        stored = self._get(key, now)
        tat = arrival if stored is None else max(stored, arrival)
        new_tat = tat + cost * interval
        free = max(arrival, new_tat - burst * interval)
        wait = free - now
        if wait < _EPSILON:  # a rounding error of the float arithmetic, not a wait
            wait = 0.0
        hold = arrival - now
        if wait > max_wait + _EPSILON:
            return Admission(False, self._turn(upstream, limit, free, interval, now) if turn else wait, hold)
        self._entries[key] = (new_tat, new_tat)  # a full bucket is the same as no key
        if not (turn and next_turn):
            return Admission(True, wait, hold)
        after = max(arrival, new_tat + interval - burst * interval)  # when one more token is free
        return Admission(True, wait, hold, self._turn(upstream, limit, after, interval, now))

    def _turn(self, upstream: str, limit: str, free: float, interval: float, now: float) -> float:
        """Give a caller the first turn at or after ``free``, one interval after the last given; seconds until it."""
        key = ("turn", upstream, limit)
        last = self._get(key, now)
        turn = free if last is None else max(free, last + interval)
        self._entries[key] = (turn + interval, turn)
        return turn - now

    async def hold(self, upstream: str, seconds: float) -> Maybe[float]:
        seconds = min(check_seconds("seconds", seconds, zero=True), MAX_SECONDS)
        now = self._now()
        until = max(self._hold_until(upstream, now), now + seconds)
        if until > now:
            self._entries[("hold", upstream)] = (until, until)
        return until - now

    async def held(self, upstream: str) -> Maybe[float]:
        now = self._now()
        return self._hold_until(upstream, now) - now

    def _breaker(self, upstream: str, now: float) -> _Breaker | None:
        found: _Breaker | None = self._get(("circuit", upstream), now)
        return found

    def _keep(self, upstream: str, breaker: _Breaker, now: float, ttl: float) -> None:
        self._entries[("circuit", upstream)] = (now + ttl, breaker)

    async def circuit(self, upstream: str) -> Maybe[Circuit]:
        now = self._now()
        breaker = self._breaker(upstream, now)
        return CLOSED if breaker is None else breaker.view(now)

    async def open_circuit(self, upstream: str, seconds: float, *, after_round: int) -> Maybe[Circuit]:
        seconds = min(check_seconds("seconds", seconds), MAX_SECONDS)
        now = self._now()
        breaker = self._breaker(upstream, now)
        if breaker is not None and not breaker.closed and (breaker.round > after_round or breaker.until > now):
            return breaker.view(now)
        last = 0 if breaker is None else breaker.round
        breaker = _Breaker(round=max(last, after_round) + 1, until=now + seconds)
        self._keep(upstream, breaker, now, seconds + self._circuit_ttl)
        return breaker.view(now)

    def _half_open(self, upstream: str, round: int, now: float) -> _Breaker | None:
        breaker = self._breaker(upstream, now)
        if breaker is None or breaker.round != round or breaker.closed or breaker.until > now:
            return None
        if breaker.out_until <= now:
            breaker.out = 0
        return breaker

    async def claim_trial(self, upstream: str, round: int, *, slots: int, ttl: float) -> Maybe[bool]:
        check_slots(slots)
        ttl = check_seconds("ttl", ttl)
        now = self._now()
        breaker = self._half_open(upstream, round, now)
        if breaker is None or breaker.out + breaker.ok >= slots:
            return False
        if breaker.out == 0:
            breaker.out_until = now + ttl
        breaker.out += 1
        self._keep(upstream, breaker, now, self._circuit_ttl)
        return True

    async def release_trial(self, upstream: str, round: int) -> Maybe[bool]:
        breaker = self._half_open(upstream, round, self._now())
        if breaker is None or breaker.out == 0:
            return False
        breaker.out -= 1
        return True

    async def trial_succeeded(self, upstream: str, round: int, *, slots: int) -> Maybe[Circuit]:
        check_slots(slots)
        now = self._now()
        breaker = self._half_open(upstream, round, now)
        if breaker is None:
            current = self._breaker(upstream, now)
            return CLOSED if current is None else current.view(now)
        breaker.out = max(0, breaker.out - 1)
        breaker.ok += 1
        if breaker.ok >= slots:
            breaker.closed = True
        self._keep(upstream, breaker, now, self._circuit_ttl)
        return breaker.view(now)

    async def heartbeat(self, ttl: float) -> Maybe[int]:
        ttl = check_seconds("ttl", ttl)
        now = self._now()
        self._workers[self.worker_id] = now + ttl
        self._workers = {worker: until for worker, until in self._workers.items() if until > now}
        return len(self._workers)

    async def leave(self) -> None:
        self._workers.pop(self.worker_id, None)

    async def aclose(self) -> None:
        self._entries.clear()
        self._workers.clear()
