"""The fleet's view of one host's breaker: verdicts shared, decisions local.

Each worker's breaker still counts only its own outcomes: one worker's bad
network does not mix into another's counts. What the fleet shares is the
verdict. When this worker's breaker opens, it tells the store (in the
background); the store opens the fleet's circuit as a new round, or, if a
peer opened it already, answers with the peer's round, which this worker
adopts, break included. Every worker reads the fleet's circuit before its
first call to a host, and then at most once a second per host (in the
background, never per call), so the others learn of an open circuit within
a second and stop calling.

When a break ends, the trials are the fleet's: a worker whose breaker
would let a trial through first asks the store for the circuit, and then
claims one of its ``half_open_calls`` trial slots; a worker that finds
none left fails the call at once, as a half-open breaker does when its own
trials are out. A trial's success is counted in the store (the last one
closes the fleet's circuit, and every worker closes its own when it
learns it); a failed trial opens the next round for everyone; a cancelled
one gives its slot back. Those two round trips are made only around a
trial, a few per break, never on the ordinary path.

When the store cannot answer, the worker decides alone, as without a
store: its own trials, its own break (and a ``StoreFallback`` event says so).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._call import Call
from .._clock import Clock
from .._events import HostEvents
from .._exceptions import CircuitOpenError
from ..store._base import UNAVAILABLE, Circuit
from ..store._fleet import Fleet, fell_back

if TYPE_CHECKING:
    from .circuit_breaker import CircuitBreaker

CLOSED, HALF_OPEN = "closed", "half_open"  # as in .circuit_breaker, which imports this module

#: Seconds between two reads of the fleet's circuit by one worker, per host.
SYNC_EVERY = 1.0
#: How long a trial slot stays taken when the call has no total timeout to bound it.
TRIAL_TTL = 60.0


class FleetCircuit:
    """One host's breaker, kept in step with the fleet's record of it."""

    __slots__ = (
        "_breaker",
        "_clock",
        "_events",
        "_fleet",
        "_next_sync",
        "_pending",
        "_store",
        "_upstream",
        "fresh",
        "round",
    )

    def __init__(self, fleet: Fleet, upstream: str, breaker: CircuitBreaker, clock: Clock, events: HostEvents) -> None:
        self._fleet = fleet
        self._store = fleet.store
        self._upstream = upstream
        self._events = events
        self._breaker = breaker
        self._clock = clock
        self._next_sync = -float("inf")
        self.fresh = True  # no call yet: the first one reads the fleet's circuit before it goes
        self._pending = False  # this worker opened its breaker and the store has not answered yet
        self.round = 0  # the fleet's last round this worker knows of
        breaker.on_open = self._opened

    def tick(self, now: float) -> None:
        """A call passes: read the fleet's circuit if this worker has not for a second."""
        fleet = self._fleet
        fleet.tick(now)
        if now >= self._next_sync and not self.fresh:  # a fresh worker's first call reads it anyway
            self._next_sync = now + SYNC_EVERY
            fleet.soon(self._sync())

    def _fell_back(self, operation: str, call: Call | None = None) -> None:
        fell_back(self._events, "circuit_breaker", operation, call)

    async def _sync(self) -> None:
        found = await self._store.circuit(self._upstream)
        if found is UNAVAILABLE:
            self._fell_back("circuit")
        else:
            self._adopt(found)

    def _adopt(self, found: Circuit) -> None:
        """Bring the local breaker in line with the fleet's circuit."""
        breaker = self._breaker
        if breaker.state == CLOSED:
            self._pending = False
        if found.state == "closed":
            # Round 0: the store has no record (expired, or a new Redis); the worker decides alone.
            if found.round and found.round >= self.round and breaker.state != CLOSED and not self._pending:
                breaker.close()
            self.round = max(self.round, found.round)
            return
        self._pending = False
        if found.state == "open":
            breaker.adopt(self._clock.now(), found.retry_after)
        elif breaker.state != HALF_OPEN or found.round != self.round:
            breaker.adopt(self._clock.now(), 0.0)  # the break is over: the next call asks for a trial
        self.round = found.round

    def _opened(self, duration: float) -> None:
        """The local breaker opened on this worker's outcomes: open the fleet's circuit too."""
        if self._breaker.policy.dry_run:  # a breaker running dry must not stop the real ones
            return
        self._pending = True
        self._fleet.soon(self._publish(duration, self.round))

    async def _publish(self, duration: float, after: int) -> None:
        found = await self._store.open_circuit(self._upstream, duration, after_round=after)
        if found is UNAVAILABLE:
            self._fell_back("open_circuit")
        else:
            self._pending = False
            self._adopt(found)

    async def acquire(self, call: Call) -> tuple[int, int | None]:
        """Let a call through after reading the fleet's circuit: ``(period, fleet round)`` of a fleet trial.

        For the first call, and for calls once the local break is over.

        The round is ``None`` when the store could not answer or has no
        record: the local breaker decided alone. Raises
        :class:`CircuitOpenError` when the fleet's circuit is open or its
        trial slots are taken.
        """
        breaker, store, clock = self._breaker, self._store, self._clock
        self.fresh = False
        self._next_sync = clock.now() + SYNC_EVERY
        found = await store.circuit(self._upstream)
        if found is UNAVAILABLE:
            self._fell_back("circuit", call)
            return breaker.acquire(clock.now()), None
        self._adopt(found)
        if breaker.state == CLOSED or found.state != "half_open":
            return breaker.acquire(clock.now()), None
        now = clock.now()
        ttl = TRIAL_TTL if call.deadline is None else max(1.0, call.deadline - now)
        slots = breaker.policy.half_open_calls
        claimed = await store.claim_trial(self._upstream, found.round, slots=slots, ttl=ttl)
        if claimed is UNAVAILABLE:
            self._fell_back("claim_trial", call)
            return breaker.acquire(clock.now()), None
        if not claimed:
            raise CircuitOpenError(
                f"circuit half-open for {self._upstream}: the fleet's trial calls are in flight",
                host=self._upstream,
                retry_after=None,
            )
        try:
            return breaker.acquire(clock.now()), found.round
        except BaseException:
            self.released(found.round)
            raise

    def released(self, round: int) -> None:
        """A fleet trial ended without a verdict on the host: give its slot back."""
        self._fleet.soon(self._release(round))

    async def _release(self, round: int) -> None:
        if await self._store.release_trial(self._upstream, round) is UNAVAILABLE:
            self._fell_back("release_trial")

    def succeeded(self, round: int) -> None:
        """A fleet trial succeeded: count it; the fleet's last success closes every worker's breaker."""
        self._fleet.soon(self._succeeded(round))

    async def _succeeded(self, round: int) -> None:
        found = await self._store.trial_succeeded(self._upstream, round, slots=self._breaker.policy.half_open_calls)
        if found is UNAVAILABLE:
            self._fell_back("trial_succeeded")
        else:
            self._adopt(found)
