"""Retry: try again when it is safe, responsible, and still worth it.

Safe: only idempotent methods (RFC 9110 §9.2.2), requests carrying an
``Idempotency-Key`` and the methods a policy declares safe for its host
(``RetryPolicy.methods``) are retried after they may have reached the
server. Two answers are safe to retry for every method, because the
server did not act: a connection that could not be opened
(``ConnectError``, ``ConnectTimeout``, ``PoolTimeout``), and a 429 (the
server refusing the request; the AWS, Azure, OpenAI and Anthropic SDKs
retry it for every method too). A body is retried only if it can be sent
again: bytes, and multipart forms whose files can be rewound (httpx rewinds
them itself); a generator body never is.

Responsible: exponential backoff with full jitter; a server's
``Retry-After`` is the least wait (jitter only adds), and so is the reset
time of a ``RateLimit`` quota the answer says is spent (``r=0``) when it
has no Retry-After; a per-host retry budget caps the extra load retries
may add, so a failing dependency sees at most ``1 + ratio`` times its
normal traffic instead of ``attempts`` times. The budget is this
process's (a ratio that holds per process holds for the fleet); with a
shared store, only its floor, ``min_per_second``, is divided among the live
workers the store counts, since floors add up across workers. A
retry takes its share of the budget when it is scheduled and gives it back
if it is never sent (a rate limiter refused it, the call was cancelled
during the backoff, the bulkhead shed it); ``retries_total`` counts a retry
once its attempt has reached the network, so that attempts minus calls is
retries. Hedges (:mod:`.hedge`) take their share of the same budget.

Still worth it: a wait that would not end before the total deadline, or a
Retry-After above ``max_retry_after``, ends the call at once with its last
outcome. When retries run out the last response is returned (so
``raise_for_status()`` works) or the last exception is raised;
``CallInfo.retry_stop`` says why no further attempt was made.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import httpx
from httpx._multipart import FileField, MultipartStream  # httpx's form body; no public module exports it

from .._call import Call, Host, Next
from .._clock import Clock
from .._config import IDEMPOTENT_METHODS, RetryBudget, RetryPolicy
from .._events import DEBUG, INFO, BudgetRefused, CallRejected, RetryScheduled, RetryStopped, Waited
from .._exceptions import DeadlineExceededError, RateLimitedError, ResilienceError
from .._headers import quota, retry_after
from ..store._fleet import FLEET
from ._epochs import bucket_end
from .timeout import IN_MEMORY

_NOTHING_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_MAYBE_SENT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
#: A retry to make: its reason, what its wait is for, the backoff, the whole delay, and its budget receipt.
_Plan = tuple[str, str, float, float, int | None]


class Budget:
    """Counts calls and retries over a sliding window of one-second buckets.

    The counts are the host's; the limits come with each retry, so that a
    call that overrides its retry policy is held to its own budget.
    """

    __slots__ = ("_calls", "_current", "_epochs", "_pending", "_retries", "_until", "_width", "window")

    def __init__(self, window: float) -> None:
        self.window = window
        size = max(1, math.ceil(window))
        self._width = window / size
        self._epochs = [-1] * size
        self._calls = [0] * size
        self._retries = [0] * size
        # The bucket last used (its slot, and the time its successor starts: none yet), and
        # the calls deposited in it since, not yet added to its count: see _slot().
        self._current = 0
        self._until = -math.inf
        self._pending = 0

    def _slot(self, now: float) -> int:
        """The slot of ``now``'s bucket, its counts brought up to date; remembered for the next deposit."""
        if self._pending:
            self._calls[self._current] += self._pending
            self._pending = 0
        epoch = int(now / self._width)
        slot = epoch % len(self._epochs)
        if self._epochs[slot] != epoch:
            self._epochs[slot] = epoch
            self._calls[slot] = 0
            self._retries[slot] = 0
        self._current, self._until = slot, bucket_end(epoch, self._width)
        return slot

    def deposit(self, now: float) -> None:
        """Count a call: each one earns ``ratio`` of a retry."""
        # Time never goes back (a clock is monotonic): before ``_until``, ``now`` is in the bucket
        # last used, as nearly every call is; counted on its own, the slot's count is updated later.
        if now < self._until:
            self._pending += 1
        else:
            self._calls[self._slot(now)] += 1

    def withdraw(self, now: float, policy: RetryBudget, workers: int = 1) -> int | None:
        """Take one retry if ``policy`` allows it and return a receipt for :meth:`refund`; ``None`` when spent.

        The floor is shared by ``workers`` live workers.
        """
        slot = self._slot(now)
        oldest = int(now / self._width) - len(self._epochs)
        calls = retries = 0
        for i, epoch in enumerate(self._epochs):
            if epoch > oldest:
                calls += self._calls[i]
                retries += self._retries[i]
        if retries + 1 > policy.ratio * calls + policy.min_per_second / workers * self.window:
            return None
        self._retries[slot] += 1
        return self._epochs[slot]

    def refund(self, receipt: int | None) -> None:
        """Give back a retry that was never sent; nothing once its bucket has left the window."""
        if receipt is None:
            return
        slot = receipt % len(self._epochs)
        if self._epochs[slot] == receipt and self._retries[slot] > 0:
            self._retries[slot] -= 1


def replayable(stream: object) -> bool:
    """Whether a request body can be sent again: bytes, or a multipart form whose files rewind."""
    if isinstance(stream, httpx.ByteStream):
        return True
    if isinstance(stream, MultipartStream):
        # httpx seeks every file field back to 0 each time it renders the form.
        for field in stream.fields:
            if isinstance(field, FileField):
                file = field.file
                if not isinstance(file, str | bytes) and not _seekable(file):
                    return False
        return True
    return False


def _seekable(file: object) -> bool:
    seekable = getattr(file, "seekable", None)
    if seekable is None:
        return False
    try:
        return bool(seekable())
    except (OSError, ValueError):  # closed, or not a real file after all
        return False


def _error_reason(exc: Exception, retry_safe: bool) -> str | None:
    """Why ``exc`` deserves another attempt, or ``None`` if it does not."""
    if isinstance(exc, _NOTHING_SENT):
        return "connect_error"
    if isinstance(exc, DeadlineExceededError):
        return "timeout" if retry_safe and exc.kind == "attempt" else None
    if isinstance(exc, ResilienceError) or not retry_safe:
        return None
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, _MAYBE_SENT):
        return "network_error"
    return None


def _server_wait(headers: httpx.Headers, wall_now: float) -> float | None:
    """The least wait the server asks for: its ``Retry-After``, else the reset of a spent ``RateLimit`` quota."""
    hinted = retry_after(headers, wall_now)
    if hinted is None:
        found = quota(headers)
        if found is not None and found[0] == 0:
            return float(found[1])
    return hinted


async def discard(response: httpx.Response) -> None:
    """Close a response that will not be returned, freeing its connection."""
    if not isinstance(response.stream, IN_MEMORY):
        await response.aclose()


def _retry_safe(request: httpx.Request, policy: RetryPolicy) -> bool:
    """Whether ``request`` may be sent again after it may have reached the server (see the module docstring)."""
    method = request.method
    return method in IDEMPOTENT_METHODS or method in policy.methods or "idempotency-key" in request.headers


def _window(policy: RetryPolicy | None) -> float:
    budget = None if policy is None else policy.budget
    return RetryBudget().window if budget is None else budget.window


class Retry:
    """The retry layer of one host."""

    __slots__ = ("_budget", "_clock", "_events", "_fleet", "_gates", "_holds", "_label", "_metrics", "_now", "_random")

    def __init__(self, host: Host) -> None:
        self._clock: Clock = host.clock
        self._now = host.clock.now
        self._random = host.random
        self._metrics = host.metrics
        self._label = host.label
        self._gates = host.retry_gates
        self._holds = host.holds
        self._fleet = host.shared.get(FLEET)
        self._events = host.events
        self._budget = Budget(_window(host.policy.retry))
        host.hedge_gates.append(self._hedge_gate)

    def reconfigure(self, policy: RetryPolicy) -> None:
        """Keep the budget's history, unless its window changed (the counts are per slice of the old window)."""
        if _window(policy) != self._budget.window:
            self._budget = Budget(_window(policy))

    def detach(self, host: Host) -> None:
        """The host's policy dropped retries: hedges no longer draw on this layer's budget."""
        host.hedge_gates.remove(self._hedge_gate)

    def _hedge_gate(self, call: Call) -> str | Callable[[], None] | None:
        """A hedge is extra load as a retry is: it takes a share of the retry budget (given back if not sent)."""
        budget = call.policy.retry.budget if call.policy.retry is not None else None
        if budget is None:
            return None
        receipt = self._budget.withdraw(self._clock.now(), budget)
        return "retry_budget" if receipt is None else partial(self._budget.refund, receipt)

    def _backoff(self, policy: RetryPolicy, attempt: int) -> float:
        # 2.0**1023 is the largest power of two a float holds; the product may be inf, which min() caps.
        ceiling = min(policy.max_backoff, policy.backoff * 2.0 ** min(attempt - 1, 1023))
        return self._random.uniform(0.0, ceiling)

    def _schedule(self, call: Call, now: float, delay: float) -> tuple[float, int | None] | str:
        """When the retry after ``delay`` seconds may go and its budget receipt, or why it may not (and count that)."""
        if call.deadline is not None and now + delay >= call.deadline:
            return "deadline"
        budget = call.policy.retry.budget if call.policy.retry is not None else None
        receipt = None
        if budget is not None:
            fleet = self._fleet
            if fleet is None:
                receipt = self._budget.withdraw(now, budget)
            else:
                fleet.tick(now)
                receipt = self._budget.withdraw(now, budget, fleet.workers)
            if receipt is None:
                self._metrics.budget_exhausted.inc()
                events = self._events
                if events.wants(INFO, "retry", call):
                    events.emit(BudgetRefused(transport=events.transport, host=self._label), call)
                return "budget"
        earliest = when = now + delay
        for gate in self._gates:
            allowed = gate(call, when)
            if allowed is None:
                self._budget.refund(receipt)
                return "rate_limit"
            when = allowed
        # Not ``when - now``: float rounding would make it differ from ``delay``
        # with no gate at all, and a phantom "rate_limit" wait would be recorded.
        return delay + (when - earliest), receipt

    async def __call__(self, call: Call, call_next: Next) -> httpx.Response:
        policy = call.policy.retry
        assert policy is not None
        stream = call.request.stream  # as it is before the first attempt: sending may replace it (with its bytes)
        budget = self._budget
        now = self._now()
        # Budget.deposit(), inline: nearly every call falls in the bucket last used.
        if now < budget._until:
            budget._pending += 1
        else:
            budget.deposit(now)
        try:
            response = await call_next(call)
        except Exception as exc:
            plan = self._after_error(call, policy, exc, 1, stream)
            if plan is None:
                raise
        else:
            if response.status_code not in policy.statuses:
                return response
            plan = await self._after_answer(call, policy, response, 1, stream)
            if plan is None:
                return response
        return await self._retry(call, call_next, policy, plan, stream)

    async def _retry(
        self, call: Call, call_next: Next, policy: RetryPolicy, plan: _Plan, stream: object
    ) -> httpx.Response:
        """Wait and try again, for as long as each outcome deserves another attempt (the first one's is ``plan``)."""
        attempt = 1
        while True:
            reason, wait, backoff, delay, receipt = plan
            call.waited(wait, backoff)
            if delay > backoff:
                call.waited("rate_limit", delay - backoff)
            if self._events.wants(DEBUG, "retry", call):
                self._scheduled(call, reason, wait, attempt, backoff, delay)
            try:
                await self._clock.sleep(delay)
                if self._holds:
                    await self._hold_back(call)
            except BaseException:  # cancelled, or held back past the deadline: never sent
                self._budget.refund(receipt)
                raise
            attempt += 1
            try:
                response = await self._resend(call, call_next, reason, receipt)
            except Exception as exc:
                again = self._after_error(call, policy, exc, attempt, stream)
                if again is None:
                    raise
            else:
                if response.status_code not in policy.statuses:
                    return response
                again = await self._after_answer(call, policy, response, attempt, stream)
                if again is None:
                    return response
            plan = again

    def _after_error(
        self, call: Call, policy: RetryPolicy, exc: Exception, attempt: int, stream: object
    ) -> _Plan | None:
        """The retry that attempt ``attempt``'s ``exc`` calls for, or ``None`` if the call ends with it.

        ``stream`` is the request's body as the call found it.
        """
        reason = _error_reason(exc, _retry_safe(call.request, policy))
        if reason is None:
            if _error_reason(exc, True) is not None:
                self._stopped(call, "not_idempotent", attempt)
            return None
        stop = self._stop(policy, attempt, stream)
        if stop is not None:
            self._stopped(call, stop, attempt)
            return None
        backoff = self._backoff(policy, attempt)
        scheduled = self._schedule(call, self._now(), backoff)
        if isinstance(scheduled, str):
            self._stopped(call, scheduled, attempt)
            return None
        return reason, "backoff", backoff, *scheduled

    async def _after_answer(
        self, call: Call, policy: RetryPolicy, response: httpx.Response, attempt: int, stream: object
    ) -> _Plan | None:
        """The retry that attempt ``attempt``'s answer, a status ``policy`` retries, calls for; ``None``: return it."""
        status = response.status_code
        if status != 429 and not _retry_safe(call.request, policy):  # a 429 is a refusal: nothing was done
            self._stopped(call, "not_idempotent", attempt)
            return None
        stop = self._stop(policy, attempt, stream)
        if stop is not None:
            self._stopped(call, stop, attempt)
            return None
        now = self._now()
        hinted = _server_wait(response.headers, self._clock.wall())
        if hinted is not None and hinted > policy.max_retry_after:
            self._stopped(call, "retry_after_too_long", attempt)
            return None
        backoff = self._backoff(policy, attempt) + (hinted or 0.0)
        scheduled = self._schedule(call, now, backoff)
        if isinstance(scheduled, str):
            self._stopped(call, scheduled, attempt)
            return None
        try:
            await discard(response)
        except BaseException:
            self._budget.refund(scheduled[1])
            raise
        return f"status_{status}", "backoff" if hinted is None else "retry_after", backoff, *scheduled

    async def _resend(self, call: Call, call_next: Next, reason: str, receipt: int | None) -> httpx.Response:
        """Make a retry's attempt: count it if it reached the network, else give its budget back."""
        before = call.attempts
        try:
            return await call_next(call)
        finally:
            if call.attempts > before:
                self._metrics.retry(reason)
            else:  # refused on the way (a full bulkhead, the deadline in its queue)
                self._budget.refund(receipt)

    async def _hold_back(self, call: Call) -> None:
        """Wait out a cooldown the server imposed while this retry was waiting for its turn."""
        clock = self._clock
        now = clock.now()
        until = max(hold() for hold in self._holds)
        if until <= now:
            return
        events = self._events
        if call.deadline is not None and until >= call.deadline:
            call.retry_stop = "rate_limit"
            call.noted = True
            self._metrics.rate_limited.inc()  # refused for the rate limit, as the limiter's own refusals
            if events.wants(DEBUG, "rate_limit", call):
                events.emit(
                    CallRejected(
                        transport=events.transport,
                        host=self._label,
                        layer="rate_limit",
                        retry_after=until - now,
                        reason="cooldown",
                    ),
                    call,
                )
            raise RateLimitedError(
                f"rate limit of {self._label}: the server's cooldown outlasts this call",
                host=self._label,
                retry_after=until - now,
                request=call.request,
            )
        call.waited("rate_limit", until - now)
        if events.wants(DEBUG, "rate_limit", call):
            events.emit(
                Waited(transport=events.transport, host=self._label, reason="rate_limit", seconds=until - now), call
            )
        await clock.sleep(until - now)

    def _stopped(self, call: Call, stop: str, attempt: int) -> None:
        """No further attempt, for ``stop`` (``CallInfo.retry_stop``)."""
        call.retry_stop = stop
        call.noted = True
        events = self._events
        if events.wants(DEBUG, "retry", call):
            events.emit(RetryStopped(transport=events.transport, host=self._label, reason=stop, attempts=attempt), call)

    def _scheduled(self, call: Call, reason: str, wait: str, attempt: int, backoff: float, delay: float) -> None:
        """Tell the listeners of a retry scheduled (and of the rate limiter's share of its wait)."""
        events = self._events
        transport, host = events.transport, self._label
        events.emit(
            RetryScheduled(transport=transport, host=host, reason=reason, delay=backoff, attempt=attempt, wait=wait),
            call,
        )
        if delay > backoff:
            events.emit(Waited(transport=transport, host=host, reason="rate_limit", seconds=delay - backoff), call)

    @staticmethod
    def _stop(policy: RetryPolicy, attempt: int, stream: object) -> str | None:
        if attempt >= policy.attempts:
            return "attempts"
        if not replayable(stream):
            return "body_not_replayable"
        return None
