"""Hedging: when an attempt is slow, send a copy of it and take whichever answers first.

Dean and Barroso ("The Tail at Scale", CACM 2013) cut a service's 99.9th
percentile from 1,800 ms to 74 ms for 2 % more requests by sending a second
copy of a request once the first had been outstanding longer than a high
percentile of the usual latency. This layer does that per host, inside the
retry layer and outside the bulkhead: a hedge is one more concurrent
attempt, so it takes a bulkhead slot of its own, and the breaker and the
retry layer judge the race as a whole by its outcome.

**When.** After ``HedgePolicy.delay`` seconds, or, by default, after the
``quantile`` (p95) of the host's recent first-copy latencies, never sooner
than ``min_delay``, and not at all before ``warmup`` latencies were seen.
Both the delay and the latencies run from the moment a copy is handed to
the bulkhead (a queued copy is a slow one). The latencies are those of the
first copies only, the ones the delay is compared with: a hedge's own
latency is known only when it wins, and a first copy a hedge beat is kept
as longer than any (its length is unknown; kept as the time it ran, it
would sit just above the delay and pull the next delay up after it). They
are a ring of the last :data:`~resilient_http._config.HEDGE_SAMPLES`, and
the delay is computed again every few samples.

The delay is the quantile unless a *gap* lies within the quantile's
sampling error (two standard deviations of its rank, ±7 ranks of 200 at
p95): two neighbouring latencies further apart than the median. Then the
delay is half a median past the gap's lower edge. The case is the one
hedging exists for, an upstream whose slow answers are bad luck (a pause,
a lost packet) and about ``1 - quantile`` of the calls: the p95 then falls
among the fast or among the slow answers by the luck of the last 200
(among the slow about four times in ten with exactly 5 % slow, most of the
time with a little more),
and a delay among the slow answers sends copies that can beat none of
them. At the gap's lower edge a copy goes to every attempt slower than
the fast answers and to hardly any other, and answers about a median
later, long before the slow ones. A tail without such a gap near its
quantile (the usual smooth one) gets the quantile.

Each further hedge (up to ``max_hedges``) waits the delay again; a copy that
fails with a retryable failure (what the retry layer would retry) fires the
next one at once, unless the server asked for a pause (a 429, or a
``Retry-After``): then no more copies are sent.

**What.** Only what may be sent twice at the same time: a method the retry
layer may repeat (idempotent, or in ``RetryPolicy.methods``) or a request
with an ``Idempotency-Key``, with no body, a bytes body or a form without
open files (two copies would share the file's position). A copy counts as
answered when its attempt returns: the headers, and the first bytes of a
small body. From then on its body is the caller's and is never raced.

**Whether.** Right before a hedge is sent, synchronously with taking its
bulkhead slot, it must find: the call's deadline not passed; no cooldown
imposed by the server; a hedge earned in the hedge budget
(:class:`Allowance`: each call earns ``budget`` of a hedge, saved up to the
hedges of ``HEDGE_SAMPLES`` calls, so hedges add at most ``budget`` of the
calls in the long run, and a burst of slow answers after quiet calls is
hedged in full, where a count over a fixed window as tight as the demand
would refuse part of it); every gate of ``Host.hedge_gates`` open (the
breaker closed, a free bulkhead slot, a share of the retry budget); and a
rate-limit token free at once. A hedge never
waits for a token or a slot, so it never delays, queues behind or sheds a
real call. If one is refused, no further hedge is tried for that attempt
and ``CallInfo.hedge_stop`` says why. Shares taken are given back when a
later gate refuses. A layer in dry-run mode lets calls through, but not
hedges: they are load the library adds on its own, never sent past a limit.

**The race.** The copies run in an anyio task group. The first acceptable
answer (a response whose status the retry layer would not retry) wins; the
other copies are cancelled and awaited, and any response they had is closed
(shielded from cancellation), so no task or connection is left behind. An
error the retry layer would not retry ends the race at once. If every copy
fails, the last failure is the outcome, a response in preference to an
error. Each copy's attempt is bounded by the call's total deadline, so the
race is too. The winner's body is not tied to the task group, which has
exited by the time it is returned.

A hedge that wins is announced (:class:`~resilient_http.events.HedgeWon`,
besides ``CallInfo.hedge_won`` and ``resilient_http_hedges_total{result="won"}``).
A new policy (:meth:`Hedge.reconfigure`) keeps the latencies seen and the
hedges saved up.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import NamedTuple

import anyio
import httpx
from httpx._multipart import FileField, MultipartStream  # httpx's form body; no public module exports it

from .._call import Call, Host, Next
from .._clock import Clock
from .._config import HEDGE_SAMPLES, IDEMPOTENT_METHODS, HedgePolicy, RetryPolicy
from .._events import DEBUG, Hedged, HedgeWon
from .._exceptions import DeadlineExceededError
from .retry import _error_reason, discard

#: What a copy's answer fails with when the call has no retry policy: the default retried statuses.
_RETRYABLE = RetryPolicy().statuses
#: How many new latencies make the delay worth computing again.
_REFRESH = 10
#: A hedge takes a rate-limit token only if one is free within this (float rounding aside: at once).
_AT_ONCE = 1e-6


class Allowance:
    """The hedge budget: each call earns ``ratio`` of a hedge, saved up to the share of ``HEDGE_SAMPLES`` calls.

    Hedges never add more than ``ratio`` of the calls in the long run, and
    the savings let a burst of slow answers be hedged: a budget counted
    over a fixed window, as tight as the demand, would refuse those.
    """

    __slots__ = ("_cap", "_ratio", "tokens")

    def __init__(self, ratio: float) -> None:
        self.tokens = 0.0
        self._ratio = self._cap = 0.0
        self.limit(ratio)

    def limit(self, ratio: float) -> None:
        """Earn ``ratio`` per call from now on, keeping what was saved (up to the new cap)."""
        self._ratio = ratio
        self._cap = max(1.0, ratio * HEDGE_SAMPLES)
        self.tokens = min(self.tokens, self._cap)

    def deposit(self) -> None:
        """A call: it earns its share of a hedge."""
        tokens = self.tokens + self._ratio
        self.tokens = tokens if tokens < self._cap else self._cap

    def withdraw(self) -> bool:
        """Take a whole hedge, if one was earned."""
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    def refund(self) -> None:
        """Give back a hedge that was not sent."""
        self.tokens = min(self._cap, self.tokens + 1.0)


class Latencies:
    """A host's recent first-copy latencies (the last ``HEDGE_SAMPLES``) and the hedge delay they suggest.

    A first copy that a hedge beat is kept as ``math.inf``: longer than
    anything measured, its real length unknown.
    """

    __slots__ = ("_added", "_fresh", "_q", "_ring", "_value")

    def __init__(self) -> None:
        self._ring: list[float] = []
        self._added = 0
        self._fresh = 0  # samples added since the delay was last computed
        self._q = math.nan
        self._value = math.nan

    def __len__(self) -> int:
        return len(self._ring)

    def add(self, seconds: float) -> None:
        ring = self._ring
        if len(ring) < HEDGE_SAMPLES:
            ring.append(seconds)
        else:
            ring[self._added % HEDGE_SAMPLES] = seconds
        self._added += 1
        self._fresh += 1

    def delay(self, q: float) -> float:
        """The delay for quantile ``q`` (see :func:`delay_of`), computed again once enough latencies are new."""
        if self._fresh >= _REFRESH or q != self._q or math.isnan(self._value):
            self._value = delay_of(sorted(self._ring), q)
            self._q, self._fresh = q, 0
        return self._value


def delay_of(ordered: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``ordered``, or the lower edge of a gap within its sampling error.

    A gap is a stretch wider than the median between two neighbouring
    latencies. Ranks within two standard deviations of the quantile's
    (``2 * sqrt(n * q * (1 - q))``) are as likely to be the true quantile as
    its own: if a gap lies among them, the delay is half a median past its
    lower edge. A hedge sent then answers, about one median later, before
    any first copy beyond the gap would have; one sent at the upper edge
    could beat none of them. So an upstream whose slow answers are about
    ``1 - q`` of the calls gets its hedges at the start of the gap rather
    than, one time in two, among the slow answers themselves; a tail
    without a gap (the usual smooth one) gets its quantile.
    """
    n = len(ordered)
    rank = max(0, min(n, math.ceil(q * n)) - 1)
    median = ordered[(n - 1) // 2]
    spread = math.ceil(2 * math.sqrt(n * q * (1 - q)))
    for i in range(max(0, rank - spread), min(n - 2, rank + spread) + 1):
        if ordered[i + 1] - ordered[i] > median:  # the lowest gap in reach
            return ordered[i] + median / 2
    return ordered[rank]


def replays_at_once(stream: object) -> bool:
    """Whether two copies of a request body can be sent at the same time: bytes, or a form without open files."""
    if isinstance(stream, httpx.ByteStream):
        return True
    if isinstance(stream, MultipartStream):
        return all(not isinstance(f, FileField) or isinstance(f.file, str | bytes) for f in stream.fields)
    return False


def _safe(call: Call) -> bool:
    """Whether the call may be sent twice, at the same time."""
    request = call.request
    method = request.method
    retry = call.policy.retry
    if (
        method not in IDEMPOTENT_METHODS
        and (retry is None or method not in retry.methods)
        and "idempotency-key" not in request.headers
    ):
        return False
    return replays_at_once(request.stream)


class _Outcome(NamedTuple):
    """What one copy came back with: a response, an error, or why it was not sent."""

    copy: int  # 0 for the first
    result: httpx.Response | Exception | str
    seconds: float


class _Race:
    """The copies of one attempt: what they reported, in order, and how to wake the task that runs the race."""

    __slots__ = ("in_flight", "outcomes", "sent", "started", "wake")

    def __init__(self, started: float) -> None:
        self.started = started  # when the first copy went
        self.outcomes: list[_Outcome] = []
        self.in_flight = 0
        self.sent = 0  # hedges that passed their gates
        self.wake = anyio.CancelScope()

    def report(self, outcome: _Outcome) -> None:
        self.outcomes.append(outcome)
        self.wake.cancel()


async def _close_others(outcomes: list[_Outcome], kept: object) -> None:
    """Close every response the race got and does not return, shielded so that a cancellation skips none."""
    losers = [o.result for o in outcomes if isinstance(o.result, httpx.Response) and o.result is not kept]
    if losers:
        with anyio.CancelScope(shield=True):
            for response in losers:
                with contextlib.suppress(Exception):  # nobody is left to tell
                    await discard(response)


class Hedge:
    """The hedging layer of one host: its latencies and its budget."""

    __slots__ = ("_allowance", "_clock", "_events", "_gates", "_holds", "_latencies", "_metrics", "_rate_gates")

    def __init__(self, host: Host) -> None:
        self._clock: Clock = host.clock
        self._metrics = host.metrics
        self._events = host.events
        self._gates = host.hedge_gates
        self._holds = host.holds
        self._rate_gates = host.retry_gates
        self._latencies = Latencies()
        self._allowance = Allowance((host.policy.hedge or HedgePolicy()).budget)

    def reconfigure(self, policy: HedgePolicy) -> None:
        """Take ``policy``'s budget for the hedges to come, keeping the latencies seen and the hedges saved up.

        Everything else is read from each call's policy. The layer leaves
        nothing on the host: the gates it asks belong to the other layers.
        """
        self._allowance.limit(policy.budget)

    async def __call__(self, call: Call, call_next: Next) -> httpx.Response:
        policy = call.policy.hedge
        assert policy is not None
        if call.attempts == 0:  # the call's first attempt: it earns its share of a hedge
            self._allowance.deposit()
        delay = self._delay(policy)
        if delay is None or not _safe(call):
            if policy.delay is not None:
                return await call_next(call)
            return await self._timed(call, call_next)
        return await self._race(call, call_next, policy, delay)

    def _delay(self, policy: HedgePolicy) -> float | None:
        """How long a copy may be outstanding before the next is sent; ``None`` while warming up."""
        if policy.delay is not None:
            return policy.delay
        latencies = self._latencies
        if len(latencies) < policy.warmup:
            return None
        delay = latencies.delay(policy.quantile)
        if math.isinf(delay):  # most first copies were beaten: their lengths are unknown until some are not
            return None
        return max(policy.min_delay, delay)

    def _sample(self, result: httpx.Response | Exception | str, seconds: float) -> None:
        """Learn from a copy's latency: an answer's, or a timeout's (a lower bound); other errors say nothing."""
        if isinstance(result, httpx.Response) or (
            isinstance(result, httpx.TimeoutException)
            and not (isinstance(result, DeadlineExceededError) and result.kind == "total")
        ):
            self._latencies.add(seconds)

    async def _timed(self, call: Call, call_next: Next) -> httpx.Response:
        """An attempt that is not hedged, timed for the adaptive delay."""
        clock = self._clock
        started = clock.now()
        try:
            response = await call_next(call)
        except Exception as exc:
            self._sample(exc, clock.now() - started)
            raise
        self._sample(response, clock.now() - started)
        return response

    async def _race(self, call: Call, call_next: Next, policy: HedgePolicy, delay: float) -> httpx.Response:
        """Send the first copy, and the next ones when due, until an answer decides or every copy has failed."""
        clock = self._clock
        retry = call.policy.retry
        statuses = _RETRYABLE if retry is None else retry.statuses
        adaptive = policy.delay is None
        race = _Race(clock.now())
        decided: _Outcome | None = None  # the first acceptable answer, or an error no copy would escape
        failure: _Outcome | None = None  # the last failure, a response in preference to an error
        returned: _Outcome | None = None
        try:
            async with anyio.create_task_group() as tasks:
                started = race.started
                due: float | None = started  # when the next copy goes
                copies = seen = 0
                while True:
                    now = clock.now()
                    for outcome in race.outcomes[seen:]:
                        seen += 1
                        race.in_flight -= 1
                        result = outcome.result
                        if isinstance(result, str):  # a hedge its gates refused
                            call.hedge_stop = result
                            call.noted = True
                            self._metrics.labelled("hedges", result).inc()
                            due = None
                            continue
                        if adaptive and outcome.copy == 0:
                            self._sample(result, outcome.seconds)
                        if decided is not None:
                            continue
                        if isinstance(result, httpx.Response):
                            if result.status_code not in statuses:
                                decided = outcome
                                continue
                            if result.status_code == 429 or "retry-after" in result.headers:
                                due = None  # the server asked for a pause: no more copies
                            elif due is not None:
                                due = now  # a retryable failure fires the next copy at once
                            failure = outcome
                        elif _error_reason(result, True) is None:
                            decided = outcome
                        else:
                            if due is not None:
                                due = now
                            if failure is None or not isinstance(failure.result, httpx.Response):
                                failure = outcome
                    if decided is not None:
                        break
                    if due is not None and due <= now:
                        tasks.start_soon(self._copy, race, call, call_next, copies)
                        race.in_flight += 1
                        copies += 1
                        due = now + delay if copies <= policy.max_hedges else None
                    if race.in_flight == 0:
                        break
                    if due is not None and call.deadline is not None and due >= call.deadline:
                        due = None  # no copy could be sent in time
                    race.wake = anyio.CancelScope()
                    with race.wake:  # until a copy reports, or the next is due
                        if due is None:
                            await anyio.sleep_forever()
                        else:
                            await clock.sleep(due - now)
                tasks.cancel_scope.cancel()
            returned = decided or failure
            if adaptive and decided is not None and decided.copy and all(o.copy for o in race.outcomes):
                self._latencies.add(math.inf)  # the first copy lost: how long it would have taken is unknown
        finally:
            await _close_others(race.outcomes, None if returned is None else returned.result)
            self._settle(call, race, decided)
        assert returned is not None
        if isinstance(returned.result, httpx.Response):
            return returned.result
        assert isinstance(returned.result, Exception)
        raise returned.result

    async def _copy(self, race: _Race, call: Call, call_next: Next, copy: int) -> None:
        """One copy of the attempt (a hedge if ``copy`` > 0), reporting what it came back with."""
        if copy:
            refused = self._admit(call)
            if refused is not None:
                race.report(_Outcome(copy, refused, 0.0))
                return
            race.sent += 1
            call.hedges += 1
            call.noted = True
        clock = self._clock
        started = clock.now()
        if copy:
            self._event(call, copy, started - race.started)
        try:
            response = await call_next(call)
        except Exception as exc:
            race.report(_Outcome(copy, exc, clock.now() - started))
            return
        race.report(_Outcome(copy, response, clock.now() - started))

    def _admit(self, call: Call) -> str | None:
        """Let a hedge go now, taking its shares of the budgets and a rate-limit token; or say why not.

        Called right before the hedge's attempt, with no await in between, so
        that the free bulkhead slot a gate saw is the one the hedge takes.
        """
        now = self._clock.now()
        if call.deadline is not None and now >= call.deadline:
            return "deadline"
        for hold in self._holds:
            if hold() > now:
                return "cooldown"
        if not self._allowance.withdraw():
            return "budget"
        refunds: list[Callable[[], None]] = [self._allowance.refund]
        reason: str | None = None
        for gate in self._gates:
            granted = gate(call)
            if isinstance(granted, str):
                reason = granted
                break
            if granted is not None:
                refunds.append(granted)
        if reason is None and self._rate_gates:
            # Asked as for a call that must go at once: the limiter books a
            # turn only if one is free now, and never one behind its line. A
            # limiter in dry-run mode lets the prompt through but marks it: a
            # hedge is optional load, so it is not sent past the limit either.
            prompt = Call(call.request, call.host, call.policy, call.started, call.priority)
            prompt.deadline = now + _AT_ONCE
            for rate_gate in self._rate_gates:
                if rate_gate(prompt, now) is None or prompt.dry_run:
                    reason = "rate_limit"
                    break
        if reason is not None:
            for refund in refunds:
                refund()
        return reason

    def _settle(self, call: Call, race: _Race, decided: _Outcome | None) -> None:
        """Count the hedges sent as won or lost; a hedge that won is announced."""
        won = decided is not None and decided.copy > 0 and isinstance(decided.result, httpx.Response)
        if won:
            assert decided is not None
            call.hedge_won = True
            call.noted = True
            self._metrics.labelled("hedges", "won").inc()
            events = self._events
            if events.wants(DEBUG, "hedge", call):
                after = self._clock.now() - race.started
                won_by = HedgeWon(transport=events.transport, host=events.host, attempt=decided.copy, after=after)
                events.emit(won_by, call)
        if race.sent > won:
            self._metrics.labelled("hedges", "lost").inc(race.sent - won)

    def _event(self, call: Call, copy: int, delay: float) -> None:
        """A :class:`~resilient_http.events.Hedged` for a hedge sent, built only if someone listens."""
        events = self._events
        if events.wants(DEBUG, "hedge", call):
            events.emit(Hedged(transport=events.transport, host=events.host, attempt=copy, delay=delay), call)
