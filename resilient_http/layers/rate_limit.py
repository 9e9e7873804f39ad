"""Rate limiter: never send a host more than it can take, and slow down when it says so.

A token bucket per host, ``rate`` calls a second with room for ``burst`` at
once (GCRA, in ``_bucket``), over the sends actually made: a call is let
through when the bucket holds a token at the moment it is sent, not at a
moment planned earlier. Over any one-second window the host receives at most
``rate + burst`` calls, retries included, however late the event loop wakes
a sleeper: the calls held up behind a late one cannot then go in a bunch.

Calls that find no token free queue first come, first served. Only the
first in line sleeps, until its turn; each send wakes the next. A call
cancelled or refused while it waits just leaves the line, and the calls
behind it move up: after hundreds of waiting calls are cancelled, a lone call
goes at once if the bucket holds a token.

A call waits at most ``max_wait`` seconds, and never past its total
deadline. One whose turn would come later fails at once with
:class:`RateLimitedError`, whose ``retry_after`` says when it would have
been its turn, instead of queueing for a turn it could not use; a waiting
call whose turn is pushed that far (by a cooldown, say) fails when that
becomes known.

Retries are calls too. The retry layer asks for a retry's send time when its
backoff begins (a retry gate); the retry is booked the first time, after its
backoff and behind the calls already queued, at which the host can take one
more call, and that booking is kept. Calls that arrive meanwhile go at once
while the bucket holds tokens that the booked retries do not need, and
wait only when sending them would leave a booked retry without its token.
(A retry cancelled during its backoff keeps its booking: the retry layer
does not say. The token it would have used goes unused.)

The server has the last word. A 429, or a 503 with ``Retry-After``, starts
a cooldown: nothing is sent to the host before the time it named (one token
interval for a 429 without it), whichever call received it. The bucket does
not refill during a cooldown, and waiting calls keep their order. The IETF
``RateLimit`` fields (and the older ``RateLimit-Remaining`` and
``RateLimit-Reset``) slow the host down before its quota runs out: with
``r`` units left for ``t`` seconds, calls are spaced at least ``t/r`` apart
until the reset, and ``r=0`` is a cooldown of ``t``. ``Retry-After`` wins
over them; malformed fields are ignored. No single response holds the host
back longer than ``max_cooldown``: longer cooldowns and wider spacings are
cut to it. A cooldown that begins while a retry waits out its backoff holds
the retry back too (the retry layer asks when its wait is over), though not
behind the calls that were paused: in that one race the host may see one
call more than the bound per such retry.

Metrics: every call let through observes its wait (0 included) in
``rate_limit_wait_seconds``; ``cooldown_seconds`` adds up the time the host
spent in server-imposed cooldown (its rate is the share of time the host
was paused, however many calls waited); every refusal counts in
``rate_limited``.
A retry's wait for its turn is recorded by the retry layer, in ``CallInfo.waits``.

A new policy (:meth:`RateLimiter.reconfigure`) keeps the bucket (the sends
made, the retries booked, the cooldown and pacing in force) and spaces the
turns to come by its rate and burst. The line is planned again: a call in
line that can no longer go within the ``max_wait`` it came with fails then.
The new ``max_cooldown`` bounds what the server says next.

In dry-run mode nothing waits and nothing is refused (a policer, not a
shaper): a call that finds a turn free takes it; one that does not (during
a cooldown too) is sent without taking one, and reported in
``CallInfo.dry_run`` and ``dry_run_blocked``. A retry is policed at the end
of its backoff, and booked if its turn is free then; no cooldown holds it
back. Turning dry run on sends the calls in line at once.

With a shared store (``ResilientTransport(store=...)``), the quota is the
fleet's: see :mod:`.fleet_quota`. Each call then asks the store, and uses
the line above only while the store cannot answer, at this worker's share
of the rate (``rate / workers``, ``burst / workers`` but at least 1). The
local bucket counts the sends the store allowed too, and starts spent: a
worker that falls back never adds a burst of its own to what the fleet
sent. In dry-run mode the store is asked for a slot free now only.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Awaitable
from typing import NoReturn

import anyio
import httpx

from .._call import Call, Host, Next
from .._clock import Clock
from .._config import RateLimitPolicy
from .._events import DEBUG, INFO, CallRejected, CooldownStarted, Waited
from .._exceptions import RateLimitedError
from .._headers import announces_quota, quota, retry_after
from .._series import Buckets
from ..store._fleet import FLEET
from ._bucket import NEVER, Bucket, State
from .fleet_quota import FleetQuota


class _Waiter:
    """A call in line. Its times are on the host's clock, except ``turn`` (virtual, as predicted)."""

    __slots__ = ("deadline", "gone", "limit", "refused", "scope", "turn")

    def __init__(self, limit: float, deadline: float) -> None:
        self.limit = limit
        self.deadline = deadline
        self.turn = NEVER
        self.refused: float | None = None  # set when it cannot go in time: how long it would have waited
        self.gone = False
        self.scope = anyio.CancelScope()  # the sleep in progress; cancelled to wake the call

    def too_late(self, target: float) -> bool:
        return target > self.limit or target >= self.deadline  # at the deadline there is no time left to send


class RateLimiter:
    """The rate limiter of one host.

    Times are on the host's clock, or *virtual* (the bucket's): virtual time
    stands still during a cooldown, so a virtual time ``v`` is the clock's
    ``v + shift``, ``shift`` being the length of every cooldown so far.
    """

    __slots__ = (
        "_bucket",
        "_clock",
        "_cooldown",
        "_cooldown_until",
        "_dry_run",
        "_events",
        "_hold_until",
        "_label",
        "_line",
        "_max_cooldown",
        "_max_wait",
        "_no_wait",
        "_now",
        "_pace_until",
        "_plan",
        "_policy",
        "_quota",
        "_rate_limited",
        "_share",
        "_shift",
        "_wait_seconds",
        "_waiting",
    )

    def __init__(self, host: Host) -> None:
        policy = host.policy.rate_limit
        assert policy is not None
        self._clock: Clock = host.clock
        self._now = host.clock.now
        self._label = host.label
        self._policy = policy
        self._events = host.events
        self._bucket = Bucket(policy.rate, policy.burst)
        self._max_wait = policy.max_wait
        self._max_cooldown = policy.max_cooldown
        self._dry_run = policy.dry_run
        self._line: deque[_Waiter] = deque()  # in arrival order; those gone are dropped when they reach the front
        self._waiting = 0  # calls in line and not gone
        self._plan: tuple[State, float] | None = None  # the bucket once the line has gone, and the last turn in it
        self._shift = 0.0
        self._cooldown_until = NEVER
        self._pace_until = NEVER
        self._hold_until = NEVER  # before this, the server has a say: no fast path
        metrics = host.metrics
        self._wait_seconds = metrics.rate_limit_wait
        # A wait of 0 falls in the first bucket (the bounds are positive): the fast path counts it
        # there itself, without Buckets.observe's frame (not with prometheus-client's multiprocess series).
        wait = self._wait_seconds
        self._no_wait: list[int] | None = wait.counts if isinstance(wait, Buckets) else None
        self._rate_limited = metrics.rate_limited
        self._cooldown = metrics.cooldown
        fleet = host.shared.get(FLEET)
        self._quota = None if fleet is None else FleetQuota(fleet, host.label, policy, host.clock, host.events)
        self._share = 1  # the live workers the local bucket's rate is divided among
        host.observers.append(self._observe if self._quota is None else self._observe_shared)
        host.retry_gates.append(self._gate)
        host.holds.append(self._hold)

    def reconfigure(self, policy: RateLimitPolicy) -> None:
        """Space the turns to come by ``policy``, keeping the bucket and the line (see the module docstring)."""
        self._policy = policy
        self._limit()
        if self._quota is not None:
            self._quota.reconfigure(policy)
        self._max_wait = policy.max_wait
        self._max_cooldown = policy.max_cooldown
        self._dry_run = policy.dry_run
        if not self._waiting:
            return
        if self._dry_run:  # nothing waits: every call in line goes now
            for waiter in self._line:
                waiter.scope.cancel()
            return
        self._replan(self._clock.now())
        self._wake_head()

    def detach(self, host: Host) -> None:
        """The host's policy dropped the limiter: it no longer reads answers nor holds retries back."""
        host.observers.remove(self._observe if self._quota is None else self._observe_shared)
        host.retry_gates.remove(self._gate)
        host.holds.remove(self._hold)

    def __call__(self, call: Call, call_next: Next) -> Awaitable[httpx.Response]:
        """Let ``call`` through at its turn: the rest of the chain's answer, to await.

        When a token is free now and nothing else has a say (no store, no
        cooldown or pacing, no call in line, no retry booked), the call
        takes it here and the rest of the chain is handed back as it is: no
        frame of this layer stays while the call runs (nothing is left to
        do once the answer comes; the server's hints are read by
        :meth:`_observe`). Otherwise :meth:`_admit` decides.
        """
        if self._quota is None:
            now = self._now()
            bucket = self._bucket
            tat = bucket.tat
            virtual = now - self._shift
            if (
                tat - bucket.tolerance <= virtual
                and now >= self._hold_until
                and not self._waiting
                and not bucket.bookings
            ):
                bucket.tat = (tat if tat > virtual else virtual) + bucket.interval
                bucket.last = virtual
                zero = self._no_wait
                if zero is None:
                    self._wait_seconds.observe(0.0)
                else:
                    zero[0] += 1
                return call_next(call)
        return self._admit(call, call_next)

    async def _admit(self, call: Call, call_next: Next) -> httpx.Response:
        """The rest of :meth:`__call__`: the fleet's slot, a dry run's policing, or a turn in line."""
        quota = self._quota
        if quota is not None and await self._fleet_turn(call, quota):
            return await call_next(call)
        now = self._clock.now()
        virtual = now - self._shift
        bucket = self._bucket
        tat = bucket.tat
        if tat - bucket.tolerance <= virtual and now >= self._hold_until and not self._waiting and not bucket.bookings:
            bucket.tat = (tat if tat > virtual else virtual) + bucket.interval
            bucket.last = virtual
            self._wait_seconds.observe(0.0)
            return await call_next(call)
        if self._dry_run:
            self._police(call, now, now)
            self._wait_seconds.observe(0.0)
            return await call_next(call)
        await self._wait_turn(call, now)
        return await call_next(call)

    def _police(self, call: Call, now: float, send: float) -> None:
        """Dry run: take the turn at ``send`` if it is free (booked if ahead); if not, take none and report the call."""
        shift, bucket = self._shift, self._bucket
        self._settle(now - shift)
        virtual = send - shift
        if bucket.fit(bucket.now, virtual)[0] > virtual:
            call.blocked_in_dry_run("rate_limit")
            return
        if send > now:
            bucket.book(virtual)
        else:
            bucket.send(virtual)
        self._plan = None

    # The fleet

    async def _fleet_turn(self, call: Call, quota: FleetQuota) -> bool:
        """Wait for the slot the fleet's store gives; ``False`` when it cannot answer (the local line decides)."""
        clock = self._clock
        arrival = now = clock.now()
        while True:
            answer = await quota.admit(call, now, now - arrival)
            if answer is None:
                self._reshare(quota.fleet.workers)
                bucket = self._bucket
                if bucket.tat == NEVER:  # nothing sent yet: the share starts spent, with no burst unearned
                    bucket.tat = clock.now() - self._shift + bucket.interval + bucket.tolerance
                return False
            now = clock.now()
            if answer.hold > 0:  # the fleet's hold: this worker's retries wait it out too
                self._cool(now, now + answer.hold)
            if self._dry_run:  # the store was asked for a slot free now only
                if not answer.allowed or self._cooldown_until > now:
                    call.blocked_in_dry_run("rate_limit")
                self._wait_seconds.observe(0.0)
                return True
            if not answer.allowed:
                self._refuse(call, answer.wait)
            # This worker's own cooldown may not have reached the store yet.
            wait = max(answer.wait, self._cooldown_until - now)
            if call.deadline is not None and now + wait >= call.deadline:
                self._refuse(call, wait)
            if wait > 0:
                await clock.sleep(wait)
                now = clock.now()
                if self._cooldown_until > now:  # a hold became known while it slept: its slot came before it
                    continue
            self._waited(call, now - arrival)
            self._count(now, quota.fleet.workers)
            return True

    def _count(self, now: float, workers: int) -> None:
        """Count a send the fleet allowed in the local bucket too (at this worker's share), owing at most one bucket.

        So a worker that must fall back to its share starts from what it
        has just sent, not from a full bucket on top of it.
        """
        if workers != self._share:
            self._reshare(workers)
        virtual = now - self._shift
        self._settle(virtual)
        bucket = self._bucket
        bucket.send(virtual)
        empty = virtual + bucket.interval + bucket.tolerance
        if bucket.tat > empty:
            bucket.tat = empty
        self._plan = None

    def _reshare(self, workers: int) -> None:
        """Run the local bucket at this worker's share of the fleet's quota: ``rate / workers``, ``burst / workers``."""
        if workers == self._share:
            return
        self._share = workers
        self._limit()
        self._plan = None
        self._wake_head()

    def _limit(self) -> None:
        """Space the local bucket's sends by the policy, at this worker's share of it."""
        policy, share = self._policy, self._share
        self._bucket.limit(policy.rate / share, max(1, policy.burst // share))

    # The line

    def _settle(self, virtual: float) -> None:
        """Count the retries' bookings due by now as sends (the plan counts from the first left)."""
        due = self._bucket.settle(virtual)
        plan = self._plan
        if due and plan is not None:
            (tat, last, i), tail = plan
            self._plan = None if i < due else ((tat, last, i - due), tail)

    def _planned(self, now: float) -> tuple[State, float]:
        """The bucket once every call in line has gone, and the virtual time the last of them goes."""
        if not self._waiting:
            return self._bucket.now, now - self._shift
        if self._plan is None:
            self._replan(now)
            assert self._plan is not None
        return self._plan

    def _replan(self, now: float) -> None:
        """Predict every waiting call's turn; those that cannot go in time are refused now."""
        bucket, shift = self._bucket, self._shift
        state, turn = bucket.now, now - shift
        for waiter in self._line:
            if waiter.gone or waiter.refused is not None:
                continue
            at, after = bucket.fit(state, turn)
            if waiter.too_late(at + shift):
                waiter.refused = at + shift - now
                waiter.scope.cancel()
                continue
            waiter.turn = turn = at
            state = after
        self._plan = (state, turn)

    def _head(self) -> _Waiter | None:
        """The first call in line."""
        line = self._line
        while line and line[0].gone:
            line.popleft()
        return line[0] if line else None

    def _wake_head(self) -> None:
        head = self._head()
        if head is not None:
            head.scope.cancel()

    async def _wait_turn(self, call: Call, now: float) -> None:
        arrival = now
        waiter = _Waiter(
            math.inf if self._max_wait is None else now + self._max_wait,
            math.inf if call.deadline is None else call.deadline,
        )
        shift = self._shift
        state, tail = self._planned(now)
        turn, state = self._bucket.fit(state, max(now - shift, tail))
        target = turn + shift
        if target <= now and not self._waiting:  # a token is free after all
            self._settle(now - shift)
            self._bucket.send(now - shift)
        else:
            if waiter.too_late(target):
                self._refuse(call, target - now)
            waiter.turn = turn
            self._line.append(waiter)
            self._waiting += 1
            self._plan = (state, turn)
            now = await self._wait_in_line(call, waiter, now)
        self._waited(call, now - arrival)

    def _waited(self, call: Call, waited: float) -> None:
        self._wait_seconds.observe(waited)
        if waited > 0:
            call.waited("rate_limit", waited)
            events = self._events
            if events.wants(DEBUG, "rate_limit", call):
                events.emit(
                    Waited(transport=events.transport, host=self._label, reason="rate_limit", seconds=waited), call
                )

    async def _wait_in_line(self, call: Call, waiter: _Waiter, now: float) -> float:
        """Wait until ``waiter`` is first in line and the bucket holds a token; count its send; return the time."""
        clock, bucket = self._clock, self._bucket
        sent = False
        try:
            while waiter.refused is None:
                if self._dry_run:  # turned on while this call waited
                    self._police(call, now, now)
                    return now
                if self._head() is waiter:
                    virtual = now - self._shift
                    self._settle(virtual)
                    target = bucket.fit(bucket.now, virtual)[0] + self._shift
                    if target <= now:
                        bucket.send(virtual)
                        sent = True
                        return now
                    if waiter.too_late(target):
                        waiter.refused = target - now
                        break
                    waiter.scope = anyio.CancelScope()
                    with waiter.scope:  # cancelled when the schedule changes
                        await clock.sleep(target - now)
                else:
                    waiter.scope = anyio.CancelScope()
                    with waiter.scope:  # cancelled when it is first in line, or refused
                        await anyio.sleep_forever()
                now = clock.now()
        finally:
            self._leave(waiter, sent)
        self._refuse(call, waiter.refused)

    def _leave(self, waiter: _Waiter, sent: bool) -> None:
        """Take ``waiter`` out of the line; the calls behind it move up."""
        first = self._head() is waiter
        waiter.gone = True
        self._waiting -= 1
        if not sent:
            self._plan = None  # the turn it would have taken is free
        if not self._waiting:
            self._line.clear()
            self._plan = None
        elif first:
            self._wake_head()

    def _refuse(self, call: Call, retry_after: float | None) -> NoReturn:
        self._rate_limited.inc()
        events = self._events
        if events.wants(DEBUG, "rate_limit", call):
            event = CallRejected(
                transport=events.transport,
                host=self._label,
                layer="rate_limit",
                retry_after=retry_after,
                reason="no_turn",
            )
            events.emit(event, call)
        raise RateLimitedError(
            f"rate limit of {self._label}: no turn within the time this call may wait",
            host=self._label,
            retry_after=retry_after,
            request=call.request,
        )

    # Retries

    def _hold(self) -> float:
        """The end of the server's current cooldown (in the past when there is none, or in a dry run)."""
        return NEVER if self._dry_run else self._cooldown_until

    def _gate(self, call: Call, earliest: float) -> float | None:
        """Book a retry's turn at or after ``earliest``: its send time, or ``None`` when too late."""
        if call.policy.rate_limit is None:  # this call turned the limiter off
            return earliest
        now = self._clock.now()
        if self._dry_run:
            self._police(call, now, earliest)
            return earliest
        shift = self._shift
        self._settle(now - shift)
        state, tail = self._planned(now)
        turn = self._bucket.fit(state, max(earliest - shift, tail))[0]
        send = max(turn + shift, earliest)
        max_wait = self._max_wait
        if (max_wait is not None and send - earliest > max_wait) or (
            call.deadline is not None and send >= call.deadline
        ):
            return None
        self._bucket.book(turn)
        self._plan = None
        if self._quota is not None:
            self._quota.retry_booked()
        return send

    # What the server says

    def _observe(self, response: httpx.Response, now: float) -> None:
        """Read what the server says about its limits from every response."""
        status = response.status_code
        headers = response.headers
        if status != 429 and status != 503 and not announces_quota(headers):
            return  # the usual answer: nothing to read
        if status == 429 or status == 503:
            hinted = retry_after(headers, self._clock.wall())
            if hinted is not None:  # Retry-After wins over the RateLimit fields
                self._cool(now, now + hinted, status)
                return
        found = quota(headers)
        if found is not None:
            remaining, reset = found
            if remaining == 0:
                self._cool(now, now + max(reset, self._bucket.interval if status == 429 else 0.0), status)
                return
            self._pace_for(now, reset / remaining, now + reset)
        if status == 429:
            self._cool(now, now + self._bucket.interval, status)

    def _observe_shared(self, response: httpx.Response, now: float) -> None:
        """:meth:`_observe`, and a cooldown that begins here is published to the fleet."""
        before = self._cooldown_until
        self._observe(response, now)
        if self._cooldown_until > before and self._quota is not None:
            self._quota.publish_hold(self._cooldown_until)

    def _pace_for(self, now: float, spacing: float, until: float) -> None:
        """Space calls ``spacing`` apart (at most ``max_cooldown``) until ``until``; wake the line if that is looser."""
        bucket = self._bucket
        pace, pace_until = bucket.pace, self._pace_until
        if spacing > bucket.interval:
            bucket.pace = min(spacing, self._max_cooldown)
            self._pace_until = until
        else:
            self._pace_until = NEVER
        bucket.pace_end = self._pace_until - self._shift
        self._hold_until = max(self._cooldown_until, self._pace_until)
        if self._pace_until < pace_until or (bucket.pace < pace and self._pace_until > now):
            self._plan = None  # turns may come earlier (a later one is found on waking)
            self._wake_head()

    def _cool(self, now: float, until: float, status: int | None = None) -> None:
        """Send nothing before ``until`` (at most ``max_cooldown`` away): pause the schedule, and wake the line.

        ``status`` is the answer that asked for it; ``None`` for the fleet's hold, which the worker that saw
        the answer reports.
        """
        until = min(until, now + self._max_cooldown)
        start = max(now, self._cooldown_until)
        if until <= start:
            return
        events = self._events
        if status is not None and events.wants(INFO, "rate_limit"):
            events.emit(
                CooldownStarted(transport=events.transport, host=self._label, seconds=until - now, status=status)
            )
        self._shift += until - start
        self._cooldown.inc(until - start)  # the host's time in cooldown, however many calls wait it out
        self._cooldown_until = until
        self._hold_until = max(until, self._pace_until)
        bucket = self._bucket
        bucket.floor = until - self._shift
        bucket.pace_end = self._pace_until - self._shift
        if self._waiting:
            self._replan(now)  # calls that cannot wait that long fail now
            self._wake_head()
