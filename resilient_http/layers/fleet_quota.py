"""The fleet's quota for one host: the rate limiter's questions to the shared store.

With a shared store, ``rate`` and ``burst`` are the whole fleet's. A call
asks the store (one atomic GCRA step on the store's clock) for a slot at
most as far away as it may wait; the store is the line, first come first
served across every worker, and the call sleeps until its slot. Before its
first question, a worker joins the fleet (one heartbeat, awaited: see
:class:`~resilient_http.store._fleet.Fleet`).

**Turns.** A refusal gives the worker a *turn*: when to ask again. The
store hands turns out one token's interval apart, after the next free slot,
so that the workers it refused come back one at a time, each when a slot
may be free for it, rather than all at once, when one of them can have it.
Until its turn, the worker refuses locally, without asking, every call that
could not wait until then. A worker that has had calls refused asks for its
next turn with its next slot, in the same round trip. A worker holds one
turn at a time: of its questions on their way at once, only one takes a
turn (the others, if refused, learn when a slot is free), so a burst of
calls cannot fill the line; and while it has been refusing calls, a call
that arrives while its question is on its way waits for that answer (one
round trip) instead of asking too. So a saturated fleet makes about one
round trip per call *sent*, however many calls it refuses, even when a
stalled process wakes with many calls at once; and since every send is
still one atomic step in the store, the fleet never exceeds the quota:
turns change when workers ask, never what the store allows.

The server's word is shared too. A 429 or 503 ``Retry-After`` seen by this
worker is published to the store (in the background, coalesced per host:
at most one publication in flight); the store gives every later slot from
the end of that hold, and a worker that learns of a hold from an answer
applies it to its own limiter too, so that its retries wait it out. A call
that slept until its slot asks again if a hold became known meanwhile: the
slot it had was given before the hold, and is not used.

Retries are booked with the local limiter (the retry layer cannot wait for
the store when it schedules one); each booked retry is a debt that this
worker's next admissions pay by taking one more token each (at most
``burst - 1`` more), so that over time the fleet's quota counts retries too.

When the store cannot answer, the caller decides with the local limiter,
whose rate is then this worker's share: ``rate / live workers``, as last
known (see :meth:`RateLimiter._reshare`), and which counts the sends the
store allowed too, so that a worker falling back does not add its share on
top of what it just sent.
"""

from __future__ import annotations

import math

import anyio

from .._call import Call
from .._clock import Clock
from .._config import RateLimitPolicy
from .._events import HostEvents
from ..store._base import MAX_SECONDS, UNAVAILABLE, Admission, Maybe
from ..store._fleet import Fleet, fell_back

_REFUSED_NOW = Admission(False, 0.0, 0.0)


class FleetQuota:
    """One host's rate limit in the fleet's store, with what this worker remembers of it."""

    __slots__ = (
        "_answered",
        "_asking",
        "_burst",
        "_clock",
        "_debt",
        "_denied_until",
        "_events",
        "_max_wait",
        "_publishing",
        "_rate",
        "_refusing",
        "_store",
        "_to_publish",
        "_upstream",
        "fleet",
    )

    def __init__(self, fleet: Fleet, upstream: str, policy: RateLimitPolicy, clock: Clock, events: HostEvents) -> None:
        self.fleet = fleet
        self._store = fleet.store
        self._upstream = upstream
        self._events = events
        self._denied_until = -math.inf  # on the host's clock: this worker's turn
        self._refusing = False  # a call was refused since the last slot: ask for the next turn with the next one
        self._asking = False  # a question that takes a turn is on its way
        self._answered: anyio.Event | None = None  # set when it is answered, for the calls waiting for it
        self.reconfigure(policy)
        self._clock = clock
        self._debt = 0  # retries booked locally, not yet charged to the fleet
        self._to_publish = -math.inf  # the end of a hold not yet published
        self._publishing = False

    def reconfigure(self, policy: RateLimitPolicy) -> None:
        """Ask by ``policy`` from now on; in a dry run, only for a slot free now (nothing waits).

        A turn given under the old policy is forgotten: the new one may have a slot sooner.
        """
        self._denied_until = -math.inf
        self._rate = policy.rate
        self._burst = policy.burst
        if policy.dry_run:
            self._max_wait = 0.0
        else:
            self._max_wait = MAX_SECONDS if policy.max_wait is None else min(policy.max_wait, MAX_SECONDS)

    async def admit(self, call: Call, now: float, waited: float = 0.0) -> Admission | None:
        """A slot for ``call`` (taken when ``allowed``), a refusal, or ``None``: the store cannot answer.

        ``waited``: how long the call has waited already (its ``max_wait`` is
        what is left). Times in the answer are durations from the moment it
        returns.
        """
        fleet = self.fleet
        if not fleet.joined:
            await fleet.join()
            now = self._clock.now()
        fleet.tick(now)
        limit = max(0.0, self._max_wait - waited)
        if call.deadline is not None:
            limit = min(limit, call.deadline - now - 1e-6)  # a slot at the deadline leaves no time to send
            if limit < 0:
                return _REFUSED_NOW
        if now + limit < self._denied_until:
            self._refusing = True
            return Admission(False, self._denied_until - now, 0.0)
        while self._asking and self._refusing:
            # This worker has been refusing calls, and its question for a turn is on its way: the answer (one
            # round trip) says whether this call has a chance, without a question of its own.
            if self._answered is None:
                self._answered = anyio.Event()
            await self._answered.wait()
            now = self._clock.now()
            if now + limit < self._denied_until:
                return Admission(False, self._denied_until - now, 0.0)
        asking = not self._asking  # one question at a time takes a turn
        self._asking = True
        cost = 1 + min(self._debt, self._burst - 1)
        try:
            answer = await self._store.admit(
                self._upstream,
                rate=self._rate,
                burst=self._burst,
                cost=cost,
                max_wait=limit,
                turn=asking,
                next_turn=asking and self._refusing,
            )
            return self._learn(answer, call, cost, asking)
        finally:
            if asking:
                self._asking = False
                answered, self._answered = self._answered, None
                if answered is not None:
                    answered.set()

    def _learn(self, answer: Maybe[Admission], call: Call, cost: int, turn: bool) -> Admission | None:
        """Remember what the store's answer says about this worker's turn; ``None`` if there was none."""
        if answer is UNAVAILABLE:
            fell_back(self._events, "rate_limit", "admit", call)
            return None
        received = self._clock.now()
        if answer.allowed:
            self._debt -= cost - 1
            self._refusing = False
            if answer.turn > 0:
                self._denied_until = received + answer.turn
        else:
            self._refusing = True
            until = received + answer.wait
            self._denied_until = until if turn else max(self._denied_until, until)
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
                if seconds > 0 and await self._store.hold(self._upstream, seconds) is UNAVAILABLE:
                    fell_back(self._events, "rate_limit", "hold")
                if self._to_publish == until:
                    return
        finally:
            self._publishing = False
