"""The fleet's quota for one host: the rate limiter's questions to the shared store.

With a shared store, ``rate`` and ``burst`` are the whole fleet's. Each call
asks the store once (one atomic GCRA step on the store's clock) for a slot
at most as far away as it may wait; the store is the line, first come first
served across every worker, and the call sleeps until its slot. A refusal
says when the next slot is free, ``T``: the worker remembers it and refuses
locally, without asking, every call that could not wait until ``T``; so a
saturated fleet makes far fewer round trips than calls.

The server's word is shared too. A 429 or 503 ``Retry-After`` seen by this
worker is published to the store (in the background, coalesced per host:
at most one publication in flight); the store gives every later slot from
the end of that hold, and a worker that learns of a hold from an answer
applies it to its own limiter too, so that its retries wait it out.

Retries are booked with the local limiter (the retry layer cannot wait for
the store when it schedules one); each booked retry is a debt that this
worker's next admissions pay by taking one more token each (at most
``burst - 1`` more), so that over time the fleet's quota counts retries too.

When the store cannot answer, the caller decides with the local limiter,
whose rate is then this worker's share: ``rate / live workers``, as last
known (see :meth:`RateLimiter._reshare`).
"""

from __future__ import annotations

import math

from .._call import Call
from .._clock import Clock
from .._config import RateLimitPolicy
from ..store._base import MAX_SECONDS, UNAVAILABLE, Admission
from ..store._fleet import Fleet

_REFUSED_NOW = Admission(False, 0.0, 0.0)


class FleetQuota:
    """One host's rate limit in the fleet's store, with what this worker remembers of it."""

    __slots__ = (
        "_burst",
        "_clock",
        "_debt",
        "_denied_until",
        "_max_wait",
        "_publishing",
        "_rate",
        "_store",
        "_to_publish",
        "_upstream",
        "fleet",
    )

    def __init__(self, fleet: Fleet, upstream: str, policy: RateLimitPolicy, clock: Clock) -> None:
        self.fleet = fleet
        self._store = fleet.store
        self._upstream = upstream
        self._denied_until = -math.inf  # on the host's clock: no slot is free before this
        self.reconfigure(policy)
        self._clock = clock
        self._debt = 0  # retries booked locally, not yet charged to the fleet
        self._to_publish = -math.inf  # the end of a hold not yet published
        self._publishing = False

    def reconfigure(self, policy: RateLimitPolicy) -> None:
        """Ask by ``policy`` from now on; in a dry run, only for a slot free now (nothing waits).

        A refusal remembered under the old policy is forgotten: the new one may have a slot sooner.
        """
        self._denied_until = -math.inf
        self._rate = policy.rate
        self._burst = policy.burst
        if policy.dry_run:
            self._max_wait = 0.0
        else:
            self._max_wait = MAX_SECONDS if policy.max_wait is None else min(policy.max_wait, MAX_SECONDS)

    async def admit(self, call: Call, now: float) -> Admission | None:
        """A slot for ``call`` (taken when ``allowed``), a refusal, or ``None``: the store cannot answer.

        Times in the answer are durations from the moment it returns.
        """
        self.fleet.tick(now)
        limit = self._max_wait
        if call.deadline is not None:
            limit = min(limit, call.deadline - now - 1e-6)  # a slot at the deadline leaves no time to send
            if limit < 0:
                return _REFUSED_NOW
        if now + limit < self._denied_until:
            return Admission(False, self._denied_until - now, 0.0)
        cost = 1 + min(self._debt, self._burst - 1)
        answer = await self._store.admit(self._upstream, rate=self._rate, burst=self._burst, cost=cost, max_wait=limit)
        if answer is UNAVAILABLE:
            return None
        if answer.allowed:
            self._debt -= cost - 1
        else:
            self._denied_until = self._clock.now() + answer.wait
        return answer

    def retry_booked(self) -> None:
        """A retry was booked with the local limiter: charge it to the fleet with the next admissions."""
        self._debt = min(self._debt + 1, self._burst)

    def publish_hold(self, until: float) -> None:
        """Tell the fleet that the server asked for nothing before ``until`` (the host's clock)."""
        if until <= self._to_publish:
            return
        self._to_publish = until
        self._denied_until = max(self._denied_until, until)
        if not self._publishing:
            self._publishing = True
            self.fleet.soon(self._publish())

    async def _publish(self) -> None:
        try:
            while True:
                until = self._to_publish
                seconds = until - self._clock.now()
                if seconds > 0:
                    await self._store.hold(self._upstream, seconds)
                if self._to_publish == until:
                    return
        finally:
            self._publishing = False
