"""Circuit breaker: stop calling a host that is failing, and let it back in carefully.

It sits outside the retry layer, so it judges whole calls (after their
retries) and an open circuit fails at once, without retrying and without
touching the network.

Closed: outcomes are counted in a sliding time window of ten buckets. The
circuit opens when at least ``minimum_calls`` calls finished in the window
and the failed share reaches ``failure_ratio``. Failures are connection
errors, timeouts and the statuses in ``failure_statuses`` (500, 502, 503,
504 by default).

Open: calls fail with :class:`CircuitOpenError` carrying ``retry_after``.
A 503 whose Retry-After opened the circuit keeps it open at least that long
(up to ``max_break_duration``: a server cannot switch a host off for days).

Half-open: after the break, exactly ``half_open_calls`` trial calls are let
through however many callers arrive at once; the others fail at once. When
all trials succeed the circuit closes and its next break is back to
``break_duration``; the first trial that fails opens it again for twice the
previous break, jittered by ±20 % and capped at ``max_break_duration``. A
trial that is cancelled, or ends in an error that says nothing about the
host (an invalid URL, say), gives its slot back.

An outcome counts only in the period it started in. Every change of state
begins a new period, and a call carries the number of the period that let
it through: a call that started before the circuit opened and ends after it
closed again is not counted in the new window (it cannot re-open a host that
has recovered), and a trial of an earlier half-open round neither frees a
slot nor decides the next round.

A new policy (:meth:`CircuitBreaker.reconfigure`) keeps the state: an open
circuit stays open until the time it was given, a half-open round goes on
with its trials, and closed counts stay, unless ``window`` changed (counts
bucketed by the old window say nothing about the new one: they restart).
The new thresholds apply from the next outcome. In dry-run mode the breaker
decides as usual, but a call it would have refused goes through, without a
period: its outcome is not counted, since a real breaker would not have
seen it.

With a shared store (``ResilientTransport(store=...)``), an open circuit
and the half-open trials are the fleet's: see :mod:`.fleet_circuit`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import httpx

from .._call import Call, Host, Next
from .._clock import Clock
from .._config import CircuitBreakerPolicy
from .._events import DEBUG, INFO, BreakerStateChanged, CallRejected, HostEvents
from .._exceptions import CircuitOpenError, DeadlineExceededError, ResilienceError
from .._headers import retry_after
from .._metrics import HostMetrics
from ..store._fleet import FLEET
from ._epochs import bucket_end
from .fleet_circuit import FleetCircuit

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
_BUCKETS = 10
_HOST_FAILURES = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


class CircuitBreaker:
    """The state machine, with no I/O: every method takes the current time."""

    __slots__ = (
        "_break",
        "_epoch",
        "_epochs",
        "_events",
        "_failures",
        "_metrics",
        "_ok",
        "_opened_until",
        "_random",
        "_slot",
        "_successes",
        "_trial_successes",
        "_trials_out",
        "_until",
        "_width",
        "closed",
        "failure_statuses",
        "on_open",
        "period",
        "policy",
        "shared",
        "state",
    )

    def __init__(
        self, policy: CircuitBreakerPolicy, rng: random.Random, metrics: HostMetrics, events: HostEvents | None = None
    ) -> None:
        self.policy = policy
        self._events = events
        self._random = rng
        self._metrics = metrics
        self._width = policy.window / _BUCKETS
        self._empty()
        #: The statuses that count as failures (the policy's, as a set).
        self.failure_statuses = frozenset(policy.failure_statuses)
        self._break = policy.break_duration
        self._opened_until = 0.0
        self._trials_out = 0
        self._trial_successes = 0
        #: Numbers the states the breaker has been in (see the module docstring).
        self.period = 1
        #: The current period's number while the breaker is closed and decides alone, else 0: all
        #: that a call on the common path reads (see CircuitBreakerLayer.__call__).
        self.closed = 1
        #: A fleet's circuit is read on every call (see share()).
        self.shared = False
        self.on_open: Callable[[float], None] | None = None  # told the break's length when the counts open it
        self.state = CLOSED
        metrics.circuit(CLOSED)

    def reconfigure(self, policy: CircuitBreakerPolicy) -> None:
        """Take ``policy``'s thresholds from the next outcome on, keeping the state (see the module docstring)."""
        old, self.policy = self.policy, policy
        self.failure_statuses = frozenset(policy.failure_statuses)
        if policy.window != old.window:
            self._width = policy.window / _BUCKETS
            self._empty()
        if self.state == CLOSED:
            self._break = policy.break_duration
        else:
            self._break = min(max(self._break, policy.break_duration), policy.max_break_duration)

    def _empty(self) -> None:
        """Forget the closed state's counts."""
        # Counts too, not only epochs: an epoch of -1 is inside the window while the clock is young.
        self._epochs = [-1] * _BUCKETS
        self._successes = [0] * _BUCKETS
        self._failures = [0] * _BUCKETS
        # The bucket of the last outcome counted (its slot, its epoch, and the time its successor
        # starts: none yet), and the successes counted in it since, not yet in _successes: see _bucket().
        self._slot = self._epoch = 0
        self._until = -math.inf
        self._ok = 0

    def share(self) -> None:
        """A fleet's circuit stands behind this breaker: no call, even while closed, takes the short way."""
        self.shared = True
        self.closed = 0

    def _set(self, state: str, break_seconds: float | None = None) -> None:
        old = self.state
        self.state = state
        self.period += 1
        self.closed = self.period if state == CLOSED and not self.shared else 0
        self._metrics.circuit(state)
        events = self._events
        if events is not None and events.wants(INFO, "circuit_breaker"):
            events.emit(
                BreakerStateChanged(
                    transport=events.transport, host=events.host, old=old, new=state, break_seconds=break_seconds
                )
            )

    def acquire(self, now: float) -> int:
        """Let a call through, returning the number of the period it starts in; raise if refused."""
        state = self.state
        if state == CLOSED:
            return self.period
        if state == OPEN:
            if now < self._opened_until:
                raise CircuitOpenError(
                    f"circuit open for {self._metrics.host}",
                    host=self._metrics.host,
                    retry_after=self._opened_until - now,
                )
            self._set(HALF_OPEN)
            self._trials_out = self._trial_successes = 0
        if self._trials_out + self._trial_successes >= self.policy.half_open_calls:
            raise CircuitOpenError(
                f"circuit half-open for {self._metrics.host}: trial calls in flight",
                host=self._metrics.host,
                retry_after=None,
            )
        self._trials_out += 1
        return self.period

    def trial_due(self, now: float) -> bool:
        """Whether the next call would be a half-open trial."""
        return self.state == HALF_OPEN or (self.state == OPEN and now >= self._opened_until)

    def adopt(self, now: float, retry_after: float) -> None:
        """Be open for ``retry_after`` more seconds because the fleet's circuit is (its break, not this one's)."""
        if self.state != OPEN:
            self._trials_out = self._trial_successes = 0
            self._set(OPEN, retry_after)
        self._opened_until = now + retry_after

    def close(self) -> None:
        """Close now: the fleet's trials succeeded."""
        if self.state != CLOSED:
            self._close()

    def release(self, period: int) -> None:
        """A call ended without a verdict on the host: give back its trial slot if it is a trial."""
        if period == self.period and self.state == HALF_OPEN:
            self._trials_out -= 1

    def record(self, now: float, period: int, failure: bool, hinted: float | None = None) -> None:
        """Count a call that ended in ``period``'s state; open or close the circuit when the counts say so."""
        if period != self.period:  # it started in an earlier state: its outcome is about a host that changed since
            return
        if self.state == HALF_OPEN:
            self._trials_out -= 1
            if failure:
                self._break = min(self.policy.max_break_duration, self._break * 2)
                self._open(now, hinted)
            else:
                self._trial_successes += 1
                if self._trial_successes >= self.policy.half_open_calls:
                    self._close()
            return
        # Time never goes back (a clock is monotonic): before ``_until``, ``now`` is in the bucket
        # of the last outcome, as nearly every outcome is.
        if not failure:
            if now < self._until:
                self._ok += 1
            else:
                self._successes[self._bucket(now)] += 1
            return
        slot = self._slot if now < self._until else self._bucket(now)
        self._failures[slot] += 1
        oldest = self._epoch - _BUCKETS
        failed, total = 0, self._ok
        for i, seen in enumerate(self._epochs):
            if seen > oldest:
                failed += self._failures[i]
                total += self._failures[i] + self._successes[i]
        policy = self.policy
        if total >= policy.minimum_calls and failed >= policy.failure_ratio * total:
            self._open(now, hinted)

    def _bucket(self, now: float) -> int:
        """The slot of ``now``'s bucket, its counts brought up to date; remembered for the next outcome."""
        if self._ok:
            self._successes[self._slot] += self._ok
            self._ok = 0
        epoch = int(now / self._width)
        slot = epoch % _BUCKETS
        if self._epochs[slot] != epoch:
            self._epochs[slot] = epoch
            self._successes[slot] = self._failures[slot] = 0
        self._slot, self._epoch, self._until = slot, epoch, bucket_end(epoch, self._width)
        return slot

    def _open(self, now: float, hinted: float | None) -> None:
        duration = self._break * self._random.uniform(0.8, 1.2)
        duration = min(duration, self.policy.max_break_duration)
        if hinted is not None:  # the server's own estimate, within the policy's bound
            duration = max(duration, min(hinted, self.policy.max_break_duration))
        self._opened_until = now + duration
        self._trials_out = self._trial_successes = 0
        self._set(OPEN, duration)
        self._metrics.circuit_opened.inc()
        if self.on_open is not None:
            self.on_open(duration)

    def _close(self) -> None:
        self._break = self.policy.break_duration
        self._empty()
        self._set(CLOSED)


def _is_host_failure(exc: Exception, call: Call) -> bool:
    if isinstance(exc, DeadlineExceededError):
        # A deadline that ran out before any attempt reached the network (in a
        # queue, say) says nothing about the host.
        return call.attempts > 0
    if isinstance(exc, ResilienceError):  # a rejection made on this side
        return False
    return isinstance(exc, _HOST_FAILURES)


class CircuitBreakerLayer:
    """The breaker layer of one host."""

    __slots__ = ("_clock", "_events", "_fleet", "_now", "breaker")

    def __init__(self, host: Host) -> None:
        policy = host.policy.circuit_breaker
        assert policy is not None
        self._clock: Clock = host.clock
        self._now = host.clock.now
        self._events = host.events
        self.breaker = CircuitBreaker(policy, host.random, host.metrics, host.events)
        fleet = host.shared.get(FLEET)
        self._fleet = None if fleet is None else FleetCircuit(fleet, host.label, self.breaker, host.clock, host.events)
        if fleet is not None:
            self.breaker.share()
        host.hedge_gates.append(self._hedge_gate)

    def _hedge_gate(self, call: Call) -> str | None:
        """No extra copies to a host the breaker does not trust, or is trying out (in dry-run mode too)."""
        if call.policy.circuit_breaker is None or self.breaker.state == CLOSED:
            return None
        return "circuit_open"

    def reconfigure(self, policy: CircuitBreakerPolicy) -> None:
        self.breaker.reconfigure(policy)

    def _rejected(self, call: Call, exc: CircuitOpenError) -> None:
        events = self._events
        if events.wants(DEBUG, "circuit_breaker", call):
            event = CallRejected(
                transport=events.transport,
                host=events.host,
                layer="circuit_breaker",
                retry_after=exc.retry_after,
                reason=self.breaker.state,
            )
            events.emit(event, call)

    def detach(self, host: Host) -> None:
        """The host's policy dropped the breaker: its state gauge no longer says anything, nor does it gate hedges."""
        host.metrics.circuit("")
        host.hedge_gates.remove(self._hedge_gate)

    async def __call__(self, call: Call, call_next: Next) -> httpx.Response:
        breaker = self.breaker
        closed = breaker.closed
        if closed:  # the common path: acquire() and record() of a success, inline
            try:
                response = await call_next(call)
            except BaseException as exc:
                call.circuit_state = CLOSED
                self._raised(call, closed, None, exc)
                raise
            if response.status_code in breaker.failure_statuses or closed != breaker.closed:
                return self._answered(call, closed, None, response)
            # Still the same closed period: the success is counted, nearly always in the bucket of the last outcome.
            now = self._now()
            if now < breaker._until:
                breaker._ok += 1
            else:
                breaker.record(now, closed, False)
            call.circuit_state = CLOSED
            return response
        # Open, half-open, or a fleet's circuit to consult: a trial, a refusal, or a count.
        fleet = self._fleet
        trial: int | None = None  # the fleet's round, when this call is one of its trials (read only with a fleet)
        period: int | None
        try:
            now = self._now()
            if fleet is None:
                period = breaker.acquire(now)
            else:
                fleet.tick(now)
                if fleet.fresh or breaker.trial_due(now):
                    period, trial = await fleet.acquire(call)
                else:
                    period = breaker.acquire(now)
        except CircuitOpenError as exc:
            call.circuit_state = breaker.state
            if not breaker.policy.dry_run:
                self._rejected(call, exc)
                raise
            call.blocked_in_dry_run("circuit_breaker")
            period = None
        call.circuit_state = breaker.state
        if period is None:  # sent only because the breaker runs dry: its outcome is not counted
            return await self._unseen(call, call_next)
        try:
            response = await call_next(call)
        except BaseException as exc:
            self._raised(call, period, trial, exc)
            raise
        return self._answered(call, period, trial, response)

    def _raised(self, call: Call, period: int, trial: int | None, exc: BaseException) -> None:
        """The call let through in ``period`` (as the fleet's ``trial``, if one) raised ``exc``: count it or not."""
        breaker = self.breaker
        if isinstance(exc, Exception) and _is_host_failure(exc, call):
            breaker.record(self._now(), period, failure=True)
        else:  # no verdict on the host: an error made on this side, or cancelled
            breaker.release(period)
            if trial is not None:
                assert self._fleet is not None
                self._fleet.released(trial)
        if isinstance(exc, Exception):
            call.circuit_state = breaker.state

    def _answered(self, call: Call, period: int, trial: int | None, response: httpx.Response) -> httpx.Response:
        """Count the answer to a call let through in ``period`` (as the fleet's ``trial``, if one)."""
        breaker = self.breaker
        status = response.status_code
        if status in breaker.failure_statuses:
            hinted = None
            if status == 503:
                hinted = retry_after(response.headers, self._clock.wall())
            breaker.record(self._now(), period, True, hinted)
        else:
            breaker.record(self._now(), period, False)
            if trial is not None:
                assert self._fleet is not None
                self._fleet.succeeded(trial)
        call.circuit_state = breaker.state
        return response

    async def _unseen(self, call: Call, call_next: Next) -> httpx.Response:
        """A call a dry-run breaker would have refused: sent, and its outcome not counted."""
        try:
            return await call_next(call)
        finally:
            call.circuit_state = self.breaker.state
