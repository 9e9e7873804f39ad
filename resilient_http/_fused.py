"""The usual call through circuit breaker → retry → bulkhead → attempt, in one coroutine.

Each layer of the chain is a coroutine of its own: every call makes, runs
and unwinds one frame per layer, and every time the network I/O suspends,
resuming the call resumes each of those frames. For the usual call, what
these layers do fits in a few lines each: a closed breaker deciding alone
counts a success, retry counts the call in its budget, a bulkhead with a
fixed limit and a free slot takes it and gives it back. :class:`Fused`
does that in one frame and leaves everything else to the layers' own code:

- A call that cannot take the short way from the start runs the layers'
  chain itself: a breaker that is open, half-open or the fleet's; a
  bulkhead without a free slot, with an adaptive limit or a multiprocess
  gauge; a traced call.
- After the first attempt, an outcome that calls for more is handed to the
  layer that deals with it, in the layer's own code: an error or a status
  the retry policy retries goes to retry's plan and its further attempts
  (through the layers' chain inside retry), a failure status or an error
  to the breaker's count, a streamed body to the bulkhead's slot keeping.

The layers stay the one description of what happens; this skips their
frames and calls (a few thousand CPU instructions a call: the frames were
cheaper than expected, over a socket too; ``benchmarks/RESULTS.md``,
section 5). It is used wherever hedging is off (a hedge races copies of the
attempt inside retry, which is not the usual call) and one of the three
layers is on; :func:`~.layers.timeout.attempt` remains the end of every
other chain, and of the layers' own.
"""

from __future__ import annotations

from asyncio import CancelledError

import httpx

from ._call import Call, Next
from ._config import RetryPolicy
from ._watchdog import Timer
from .layers.bulkhead import Bulkhead
from .layers.circuit_breaker import CLOSED, CircuitBreakerLayer
from .layers.retry import Retry
from .layers.timeout import IN_MEMORY, after_headers, arm, attempt, expired, landed, try_failed


class Fused:
    """The breaker, retry and bulkhead of one host (each ``None`` when off), and the attempt, as one layer.

    ``layered`` is the same layers' own chain, which it runs instead when
    the short way does not apply (see the module docstring), and
    ``inside_retry`` the chain retry's further attempts go through. Called
    as a layer or as a chain: a ``call_next`` given is not used.
    """

    __slots__ = ("_breaker", "_bulkhead", "_inside_retry", "_layer", "_layered", "_retry")

    def __init__(
        self,
        breaker: CircuitBreakerLayer | None,
        retry: Retry | None,
        bulkhead: Bulkhead | None,
        inside_retry: Next,
        layered: Next,
    ) -> None:
        self._layer = breaker
        self._breaker = None if breaker is None else breaker.breaker
        self._retry = retry
        self._bulkhead = bulkhead
        self._inside_retry = inside_retry
        self._layered = layered

    async def __call__(self, call: Call, call_next: Next | None = None) -> httpx.Response:
        breaker = self._breaker
        closed = 1 if breaker is None else breaker.closed
        bulkhead = self._bulkhead
        if not closed or call.span is not None:
            return await self._layered(call)
        if bulkhead is not None and bulkhead._in_flight >= bulkhead._free_below:
            return await self._layered(call)
        host = call.host
        started = host.clock.now()  # the first attempt's start, and the time retry counts the call at
        retry = self._retry
        if retry is not None:
            # Not None: retry is on in the policy this chain was made for.
            policy: RetryPolicy = call.policy.retry  # type: ignore[assignment]
            stream = call.request.stream  # as it is before the first attempt (see Retry.__call__)
            budget = retry._budget
            if started < budget._until:  # Budget.deposit(), inline
                budget._pending += 1
            else:
                budget.deposit(started)
        if bulkhead is not None:  # the slot, as Bulkhead.__call__ takes a free one
            bulkhead._in_flight += 1
            bulkhead._in_flight_gauge.value += 1.0
        try:
            try:
                try:
                    guard, sent, ops, kind = arm(call, started)
                    if guard is None or type(guard) is Timer:  # attempt(), inline for the transport's timer or none
                        timer: Timer | None = guard
                        call.attempts += 1
                        try:
                            try:
                                response = await host.inner.handle_async_request(sent)
                                if not isinstance(response.stream, IN_MEMORY):
                                    await after_headers(response, ops)
                            except BaseException as exc:
                                if timer is not None and timer.finish(isinstance(exc, CancelledError)):
                                    raise expired(call, kind, phase=None if ops is None else ops.phase) from None
                                raise
                        except BaseException as exc:
                            await try_failed(host, exc, host.clock.now() - started)
                            raise
                        if timer is not None:
                            timer.done = True
                            if timer.delivered:  # the deadline's cancellation came, and something swallowed it
                                timer.finish(False)
                        finished = landed(call, response, started)
                    else:  # a real anyio scope (trio), made afresh by the attempt itself
                        response = await attempt(call)
                        finished = host.clock.now()
                except BaseException:
                    if bulkhead is not None:
                        bulkhead._release()
                    raise
                if bulkhead is not None:
                    if not bulkhead._queued and isinstance(response.stream, IN_MEMORY):
                        bulkhead._in_flight -= 1
                        bulkhead._in_flight_gauge.value -= 1.0
                    else:
                        bulkhead._settle(response)
            except Exception as exc:
                if retry is None:
                    raise
                plan = retry._after_error(call, policy, exc, 1, stream)
                if plan is None:
                    raise
                response = await retry._retry(call, self._inside_retry, policy, plan, stream)
                finished = host.clock.now()
            else:
                if retry is not None and response.status_code in policy.statuses:
                    plan = await retry._after_answer(call, policy, response, 1, stream)
                    if plan is not None:
                        response = await retry._retry(call, self._inside_retry, policy, plan, stream)
                        finished = host.clock.now()
        except BaseException as exc:
            if breaker is not None:
                assert self._layer is not None
                call.circuit_state = CLOSED
                self._layer._raised(call, closed, None, exc)
            raise
        if breaker is not None:
            assert self._layer is not None
            if response.status_code in breaker.failure_statuses or closed != breaker.closed:
                return self._layer._answered(call, closed, None, response)
            if finished < breaker._until:  # CircuitBreaker.record() of a success, inline
                breaker._ok += 1
            else:
                breaker.record(finished, closed, False)
            call.circuit_state = CLOSED
        return response
