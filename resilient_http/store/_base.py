"""What every store answers, the interface the layers program against, and the key layout.

Times crossing this interface are durations in seconds measured from the
store's own "now" (Redis ``TIME``, or the transport's clock in memory),
never instants: workers' clocks differ, a duration does not care. A caller
that caches an answer adds it to its own clock when it receives it.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from typing import Final, Literal, Protocol, TypeAlias, TypeVar, runtime_checkable
from urllib.parse import quote

from .._errors import ConfigurationError


class Unavailable(enum.Enum):
    """The store could not answer in time (or is being skipped): use local state instead."""

    UNAVAILABLE = "unavailable"

    def __repr__(self) -> str:
        return "UNAVAILABLE"


#: The answer of every operation of a store that cannot answer now.
UNAVAILABLE: Final = Unavailable.UNAVAILABLE

T = TypeVar("T")
#: An operation's answer, or :data:`UNAVAILABLE`.
Maybe: TypeAlias = T | Literal[Unavailable.UNAVAILABLE]

CircuitState = Literal["closed", "open", "half_open"]


@dataclass(frozen=True, slots=True)
class Admission:
    """The rate step's answer for one call.

    ``allowed``: the call has a slot, to be used ``wait`` seconds from now (0:
    at once); the slot is taken. Otherwise nothing was taken, and ``wait`` is
    how long until the caller's *turn*: the first moment a slot may be free
    for it, after the turns already given to the callers refused before it
    (one token's interval apart). The caller does not ask again before
    ``now + wait - max_wait``: refused calls are answered locally meanwhile.
    ``turn``: when a call is allowed and its caller asked for its next turn
    (it had calls refused), how long until that turn; 0 otherwise. ``hold``
    is the upstream's server-imposed cooldown left (0 when none), read in the
    same round trip.
    """

    allowed: bool
    wait: float
    hold: float
    turn: float = 0.0


@dataclass(frozen=True, slots=True)
class Circuit:
    """The fleet's view of an upstream's breaker.

    ``round`` numbers the times the circuit opened (0: it never did, or the
    record expired); trials and successes are counted per round, so a late
    answer from an earlier round changes nothing. ``retry_after`` is the time
    left before an open circuit turns half-open (0 in the other states).
    """

    state: CircuitState
    round: int
    retry_after: float


CLOSED: Final = Circuit("closed", 0, 0.0)


@runtime_checkable
class Store(Protocol):
    """State shared by every worker that talks to the same upstreams.

    Every operation is one short step (one round trip to Redis), never
    raises because the store failed, and returns :data:`UNAVAILABLE` when it
    cannot answer within the store's timeout: the caller then decides with
    its local state. ``upstream`` names one host and port, as in the metric
    labels (``api.example.com:443``); all its state expires by itself.
    """

    #: This worker's name in :meth:`heartbeat`.
    worker_id: str
    #: How many workers the fleet is taken to have until the store has counted them (see :class:`.Fleet`).
    workers: int

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
        """Take ``cost`` tokens of the upstream's limit ``limit`` (GCRA: ``rate`` a second, ``burst`` at once).

        A slot at most ``max_wait`` seconds away is reserved and ``allowed``;
        a later one is refused without taking a token, and the caller is
        given a turn (see :class:`Admission`), unless ``turn`` is false (it
        has one coming: another of its questions is on its way), when
        ``wait`` is the time until a slot is free. With ``next_turn``, an
        allowed caller is given its next turn too. Calls during a
        :meth:`hold` are given slots and turns from its end.
        """
        ...

    async def hold(self, upstream: str, seconds: float) -> Maybe[float]:
        """No sends to the upstream for ``seconds`` (or longer if a hold already says so); the hold left.

        ``seconds`` often comes from a server's ``Retry-After``: more than a day is taken as a day.
        """
        ...

    async def held(self, upstream: str) -> Maybe[float]:
        """Seconds left of the upstream's hold (0 when none)."""
        ...

    async def circuit(self, upstream: str) -> Maybe[Circuit]:
        """The fleet's view of the upstream's breaker."""
        ...

    async def open_circuit(self, upstream: str, seconds: float, *, after_round: int) -> Maybe[Circuit]:
        """Open the circuit for ``seconds`` (a day at most), as the round after ``after_round`` (the last it knows).

        If a peer opened it already (a later round than ``after_round`` that is
        not closed, or a round still open), nothing changes: the answer is the
        fleet's circuit, which the caller adopts.
        """
        ...

    async def claim_trial(self, upstream: str, round: int, *, slots: int, ttl: float) -> Maybe[bool]:
        """Take one of the ``slots`` trial calls of a half-open ``round``, fleet-wide; ``False`` when none is left.

        Slots that are neither released nor reported within ``ttl`` seconds of
        the first claim of a batch are free again (their worker may be gone).
        """
        ...

    async def release_trial(self, upstream: str, round: int) -> Maybe[bool]:
        """Give back a trial slot of ``round`` whose call ended without a verdict (it was cancelled)."""
        ...

    async def trial_succeeded(self, upstream: str, round: int, *, slots: int) -> Maybe[Circuit]:
        """Count a successful trial of ``round``; the ``slots``-th success closes the circuit.

        A failed trial is :meth:`open_circuit` with ``after_round=round``.
        """
        ...

    async def heartbeat(self, ttl: float) -> Maybe[int]:
        """Say this worker is alive for ``ttl`` seconds; the number of live workers, this one included."""
        ...

    async def leave(self) -> None:
        """Take this worker out of the live workers at once (on shutdown)."""
        ...

    async def aclose(self) -> None:
        """Release what the store holds (connections it opened)."""
        ...


# Keys: every key of one upstream starts with the same Redis Cluster hash tag,
# ``{prefix:upstream}``, so the upstream's scripts touch a single slot.
_SAFE = re.compile(r"[A-Za-z0-9._:\[\]-]+")
_PREFIX = re.compile(r"[A-Za-z0-9._:-]+")


def check_prefix(prefix: object) -> str:
    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
        raise ConfigurationError("store.prefix", prefix, "must be letters, digits and . _ : - (no braces)")
    return prefix


def tag(prefix: str, upstream: str) -> str:
    """The hash tag of every key of ``upstream``; the name is escaped so that it cannot end the tag."""
    name = upstream if _SAFE.fullmatch(upstream) else quote(upstream, safe="._:[]-")
    return f"{{{prefix}:{name}}}"


def workers_key(prefix: str) -> str:
    return f"{{{prefix}}}:workers"


#: The most calls a second a limit may allow: the Redis store counts time in whole microseconds.
MAX_RATE = 1_000_000


def check_admit(rate: float, burst: int, cost: int, max_wait: float) -> None:
    """Refuse a rate step that could never be answered sensibly."""
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= MAX_RATE:
        raise ConfigurationError("rate", rate, f"must be a positive number of calls a second, at most {MAX_RATE}")
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise ConfigurationError("burst", burst, "must be a whole number, at least 1")
    if isinstance(cost, bool) or not isinstance(cost, int) or not 1 <= cost <= burst:
        raise ConfigurationError("cost", cost, f"must be a whole number from 1 to burst ({burst})")
    check_seconds("max_wait", max_wait, zero=True)


#: The longest hold or open period a store keeps: a server's word is trusted no further.
MAX_SECONDS = 86_400.0


def check_seconds(name: str, value: object, *, zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(name, value, "must be a finite number of seconds")
    if value < 0 or (value == 0 and not zero):
        raise ConfigurationError(name, value, "must be zero or more" if zero else "must be more than zero")
    return float(value)


def check_workers(workers: object) -> int:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigurationError("store.workers", workers, "must be a whole number of workers, at least 1")
    return workers


def check_slots(slots: object) -> int:
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise ConfigurationError("slots", slots, "must be a whole number, at least 1")
    return slots
