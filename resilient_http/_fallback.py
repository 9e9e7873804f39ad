"""The fallback hook: the application's own answer when the whole chain failed.

The transport calls ``fallback(request, failure, info)`` last, outside every
layer and after the stale cache, when the call:

- raised an ``httpx.HTTPError`` (every error of the network, every timeout,
  every refusal of a layer: an open circuit, a full bulkhead, a rate limit);
- or ended in a final 500, 502, 503 or 504 (the failures the stale cache
  answers, retries included).

``failure`` is the exception, or the failing response; ``info`` is the
call's :class:`~resilient_http.CallInfo` so far. The function, plain or
``async``, returns an ``httpx.Response`` (a default value, a friendly error
body) or raises (re-raising ``failure`` declines). Returning the failing
response itself also declines: it passes through unmarked. A response it
makes is the call's answer: ``CallInfo.fallback`` is true, its outcome in
``resilient_http_requests_total`` is ``"fallback"``, and
``resilient_http_fallbacks_total{reason}`` counts it by what failed. Its
own exceptions propagate to the caller as they are. It is never called for
a successful call, a 4xx, nor a cancelled call: cancellation is not a
failure to paper over.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import anyio
import httpx

from ._call import Call, CallInfo
from ._errors import ConfigurationError
from ._metrics import outcome_of_exception
from .layers.stale_cache import FAILURE_STATUSES

#: ``fallback(request, failure, info)``: an answer, or an exception.
Fallback = Callable[[httpx.Request, Exception | httpx.Response, CallInfo], httpx.Response | Awaitable[httpx.Response]]


def check_fallback(fallback: object) -> Fallback | None:
    """``fallback`` if it can be one; :class:`ConfigurationError` if it cannot."""
    if fallback is not None and not callable(fallback):
        raise ConfigurationError("fallback", fallback, "must be a function (request, failure, info) or None")
    return fallback


def failed(response: httpx.Response) -> bool:
    """Whether a final response is a failure the fallback is asked about."""
    return response.status_code in FAILURE_STATUSES


async def fall_back(fallback: Fallback, call: Call, failure: Exception | httpx.Response) -> httpx.Response:
    """The fallback's answer to ``failure``, marked and counted; a failing response it replaces is closed."""
    try:
        answer = fallback(call.request, failure, call.info())
        if inspect.isawaitable(answer):
            answer = await answer
        if not isinstance(answer, httpx.Response):
            raise TypeError(f"the fallback returned {answer!r}: it must return an httpx.Response or raise")
    except BaseException:
        if isinstance(failure, httpx.Response):
            await _close(failure)
        raise
    if answer is failure:  # declined
        return answer
    if isinstance(failure, httpx.Response):
        await _close(failure)
        reason = "server_error"
    else:
        reason = outcome_of_exception(failure)
    answer.request = call.request
    call.fallback = True
    call.noted = True
    call.host.metrics.labelled("fallbacks", reason).inc()
    return answer


async def _close(response: httpx.Response) -> None:
    """Close a response nobody will read, even while cancelled: its connection goes back to the pool."""
    with anyio.CancelScope(shield=True):
        await response.aclose()
