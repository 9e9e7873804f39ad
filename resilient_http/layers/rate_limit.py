"""Rate limiter: never send a host more than it can take, and slow down when it says so.

A token bucket per host, ``rate`` calls a second with room for ``burst`` at
once, kept as a schedule rather than a queue (GCRA, "virtual scheduling"):
a call reserves, on arrival, the first send time left free by the calls
before it, then sleeps until then. Reservation order is arrival order, so
calls go first come, first served and none can starve, and a call with a
token free costs a few float operations. Over any one-second window the
host receives at most ``rate + burst`` calls, retries included: the retry
layer asks this limiter for a send time before every retry (a retry gate).

A call waits at most ``max_wait`` seconds, and never past its total
deadline. One that could not be sent in time fails at once with
:class:`RateLimitedError`, whose ``retry_after`` says when it would have
been its turn, instead of queueing for a turn it could not use. A call
cancelled while it waits gives its turn back when nobody has reserved after
it; otherwise the turn stays empty, as moving later calls forward could
break the bound.

The server has the last word. A 429, or a 503 with ``Retry-After``, starts
a cooldown: nothing is sent to the host before the time it named (one token
interval for a 429 without it), whichever call received it. The schedule
is paused, not emptied: waiting calls keep their order and spacing and move
back by the length of the pause, the bucket does not refill meanwhile, and
waiting calls that cannot wait that long fail at once. The IETF
``RateLimit`` fields (and the older ``RateLimit-Remaining`` and
``RateLimit-Reset``) slow the host down before its quota runs out: with
``r`` units left for ``t`` seconds, calls reserved from then on are spaced at
least ``t/r`` apart until the reset, and ``r=0`` is a cooldown of ``t``.
``Retry-After`` wins over them; malformed fields are ignored.

A retry takes its turn when its backoff begins, as any call would on
arrival: calls that arrive during the backoff queue behind it. A cooldown
that begins while it waits still holds it back (the retry layer asks again
when its wait is over), though not behind the calls that were paused: in
that one race the host may see one call more than the bound per such retry.

Metrics: every call let through observes its wait (0 included) in
``rate_limit_wait_seconds``; ``cooldown_seconds`` adds up the time the host
spent in server-imposed cooldown (its rate is the share of time the host
was paused, however many calls waited); every refusal counts in
``rate_limited``.
A retry's wait for its turn is recorded by the retry layer, in ``CallInfo.waits``.

A new policy (:meth:`RateLimiter.reconfigure`) keeps the schedule, the
cooldown and the pacing: turns already taken stay, later ones are spaced by
the new rate. In dry-run mode nothing waits: a call (or a retry) whose turn
has not come is sent at once without taking a turn, as a policer counts
traffic over its rate, and is reported as blocked.
"""

from __future__ import annotations

import math

import anyio
import httpx

from .._call import Call, Host, Next, Wait
from .._clock import Clock
from .._config import RateLimitPolicy
from .._exceptions import RateLimitedError
from .._headers import mentions, quota, retry_after

_NEVER = -math.inf


class RateLimiter:
    """The rate limiter of one host.

    Times are on the host's clock. Reservations are kept in *virtual* time,
    which stands still during a cooldown: a reservation ``v`` is sent at
    ``v + shift``, ``shift`` being the length of every cooldown so far.
    """

    __slots__ = (
        "_clock",
        "_cooldown",
        "_cooldown_until",
        "_dry_run",
        "_hold_until",
        "_interval",
        "_label",
        "_last",
        "_max_wait",
        "_pace",
        "_pace_until",
        "_rate_limited",
        "_shift",
        "_sleepers",
        "_tat",
        "_tolerance",
        "_wait_seconds",
    )

    def __init__(self, host: Host) -> None:
        policy = host.policy.rate_limit
        assert policy is not None
        self._clock: Clock = host.clock
        self._label = host.label
        self._interval = 1.0 / policy.rate
        self._tolerance = (policy.burst - 1) * self._interval
        self._max_wait = policy.max_wait
        self._dry_run = policy.dry_run
        self._tat = _NEVER  # theoretical arrival time: the bucket is full while it is in the past
        self._last = _NEVER  # the latest reserved slot, from which pacing is measured
        self._shift = 0.0
        self._cooldown_until = _NEVER
        self._pace = 0.0
        self._pace_until = _NEVER
        self._hold_until = _NEVER  # before this, the server has a say: no fast path
        self._sleepers: set[anyio.CancelScope] = set()
        metrics = host.metrics
        self._wait_seconds = metrics.rate_limit_wait
        self._rate_limited = metrics.rate_limited
        self._cooldown = metrics.cooldown
        host.observers.append(self._observe)
        host.retry_gates.append(self._gate)
        host.holds.append(self._hold)

    def reconfigure(self, policy: RateLimitPolicy) -> None:
        """Space turns not yet taken by ``policy``'s rate, keeping the schedule (see the module docstring)."""
        self._interval = 1.0 / policy.rate
        self._tolerance = (policy.burst - 1) * self._interval
        self._max_wait = policy.max_wait
        self._dry_run = policy.dry_run

    def detach(self, host: Host) -> None:
        """The host's policy dropped the limiter: it no longer reads answers nor holds retries back."""
        host.observers.remove(self._observe)
        host.retry_gates.remove(self._gate)
        host.holds.remove(self._hold)

    async def __call__(self, call: Call, call_next: Next) -> httpx.Response:
        now = self._clock.now()
        virtual = now - self._shift
        tat = self._tat
        if now >= self._hold_until and tat - self._tolerance <= virtual:
            self._tat = (tat if tat > virtual else virtual) + self._interval
            self._last = virtual
            self._wait_seconds.observe(0.0)
            return await call_next(call)
        if self._dry_run:
            self._police(call, now)
            self._wait_seconds.observe(0.0)
            return await call_next(call)
        await self._wait_turn(call, now)
        return await call_next(call)

    def _police(self, call: Call, earliest: float) -> None:
        """Dry run: take the turn at ``earliest`` if it is free; if not, take none and report the call blocked."""
        tat_before, last_before = self._tat, self._last
        if max(self._reserve(earliest) + self._shift, self._cooldown_until) > earliest:
            self._tat, self._last = tat_before, last_before
            call.blocked_in_dry_run("rate_limit")

    def _reserve(self, earliest: float) -> float:
        """Take the first free slot at or after ``earliest``; return it in virtual time."""
        shift = self._shift
        slot = max(earliest, self._cooldown_until) - shift
        free = self._tat - self._tolerance
        if free > slot:
            slot = free
        if slot + shift < self._pace_until:
            paced = self._last + self._pace
            if paced > slot:
                slot = min(paced, self._pace_until - shift)
        self._tat = max(self._tat, slot) + self._interval
        self._last = slot
        return slot

    def _give_back(self, tat_after: float, tat_before: float, last_before: float) -> None:
        """Undo a reservation if nobody has reserved after it (else leave a hole)."""
        if self._tat == tat_after:
            self._tat = tat_before
            self._last = last_before

    async def _wait_turn(self, call: Call, now: float) -> None:
        clock = self._clock
        arrival = now
        limit = math.inf if self._max_wait is None else arrival + self._max_wait
        deadline = math.inf if call.deadline is None else call.deadline
        tat_before, last_before = self._tat, self._last
        slot = self._reserve(now)
        tat_after, shift = self._tat, self._shift
        refused = None
        try:
            while True:
                if self._shift != shift and slot + self._shift < self._cooldown_until:
                    # It was due when a cooldown began but had not gone yet: it
                    # takes a new turn, behind the calls that were paused.
                    self._give_back(tat_after, tat_before, last_before)
                    tat_before, last_before = self._tat, self._last
                    slot = self._reserve(now)
                    tat_after, shift = self._tat, self._shift
                target = max(slot + self._shift, self._cooldown_until)
                if target <= now:
                    break
                if target > limit or target >= deadline:  # at the deadline there is no time left to send
                    refused = target - now
                    break
                scope = anyio.CancelScope()
                self._sleepers.add(scope)
                try:
                    with scope:  # cancelled when a cooldown moves the schedule
                        await clock.sleep(target - now)
                finally:
                    self._sleepers.discard(scope)
                now = clock.now()
        except BaseException:
            self._give_back(tat_after, tat_before, last_before)
            raise
        if refused is not None:
            self._give_back(tat_after, tat_before, last_before)
            self._rate_limited.inc()
            raise RateLimitedError(
                f"rate limit of {self._label}: no turn within the time this call may wait",
                host=self._label,
                retry_after=refused,
                request=call.request,
            )
        waited = now - arrival
        self._wait_seconds.observe(waited)
        if waited > 0:
            call.waits.append(Wait("rate_limit", waited))

    def _hold(self) -> float:
        """The end of the server's current cooldown (in the past when there is none, or in a dry run)."""
        return _NEVER if self._dry_run else self._cooldown_until

    def _gate(self, call: Call, earliest: float) -> float | None:
        """A retry's turn: its send time at or after ``earliest``, or ``None`` when too late."""
        if call.policy.rate_limit is None:  # this call turned the limiter off
            return earliest
        if self._dry_run:
            self._police(call, earliest)
            return earliest
        tat_before, last_before = self._tat, self._last
        send = max(self._reserve(earliest) + self._shift, self._cooldown_until, earliest)
        max_wait = self._max_wait
        if (max_wait is not None and send - earliest > max_wait) or (
            call.deadline is not None and send >= call.deadline
        ):
            self._tat, self._last = tat_before, last_before
            return None
        return send

    def _observe(self, response: httpx.Response, now: float) -> None:
        """Read what the server says about its limits from every response."""
        status = response.status_code
        headers = response.headers
        if status != 429 and status != 503 and not mentions(headers, b"ratelimit"):
            return  # the usual answer: nothing to read
        if status == 429 or status == 503:
            hinted = retry_after(headers, self._clock.wall())
            if hinted is not None:  # Retry-After wins over the RateLimit fields
                self._cool(now, now + hinted)
                return
        found = quota(headers)
        if found is not None:
            remaining, reset = found
            if remaining == 0:
                self._cool(now, now + max(reset, self._interval if status == 429 else 0.0))
                return
            spacing = reset / remaining
            if spacing > self._interval:
                self._pace = spacing
                self._pace_until = now + reset
            else:
                self._pace_until = _NEVER
            self._hold_until = max(self._cooldown_until, self._pace_until)
        if status == 429:
            self._cool(now, now + self._interval)

    def _cool(self, now: float, until: float) -> None:
        """Send nothing before ``until``: pause the schedule, and wake waiting calls to re-check."""
        start = max(now, self._cooldown_until)
        if until <= start:
            return
        self._shift += until - start
        self._cooldown.inc(until - start)  # the host's time in cooldown, however many calls wait it out
        self._cooldown_until = until
        self._hold_until = max(until, self._pace_until)
        sleepers, self._sleepers = self._sleepers, set()
        for scope in sleepers:
            scope.cancel()
