"""resilient_http for httpx2: the same public names, for ``httpx2.AsyncClient``.

::

    import httpx2
    from resilient_http.httpx2 import Policy, ResilientTransport

    client = httpx2.AsyncClient(transport=ResilientTransport(default=Policy()))

The transport, its exceptions (``CircuitOpenError`` is an
``httpx2.TransportError`` here), its streams and :func:`call_info` speak
httpx2; policies, ``ConfigurationError`` and TOML loading are the very
objects of :mod:`resilient_http`, shared by both. How the two flavours are
made from one implementation: :mod:`resilient_http._flavours`.
"""

from __future__ import annotations

from ._flavours import load as _load

_impl = _load()

BulkheadFullError = _impl.BulkheadFullError
BulkheadPolicy = _impl.BulkheadPolicy
CallInfo = _impl.CallInfo
CircuitBreakerPolicy = _impl.CircuitBreakerPolicy
CircuitOpenError = _impl.CircuitOpenError
CoalescePolicy = _impl.CoalescePolicy
ConfigurationError = _impl.ConfigurationError
DeadlineExceededError = _impl.DeadlineExceededError
Policy = _impl.Policy
RateLimitPolicy = _impl.RateLimitPolicy
RateLimitedError = _impl.RateLimitedError
RejectedError = _impl.RejectedError
ResilienceError = _impl.ResilienceError
ResilientTransport = _impl.ResilientTransport
RetryBudget = _impl.RetryBudget
RetryPolicy = _impl.RetryPolicy
StaleCachePolicy = _impl.StaleCachePolicy
TimeoutPolicy = _impl.TimeoutPolicy
Wait = _impl.Wait
call_info = _impl.call_info

__all__ = [
    "BulkheadFullError",
    "BulkheadPolicy",
    "CallInfo",
    "CircuitBreakerPolicy",
    "CircuitOpenError",
    "CoalescePolicy",
    "ConfigurationError",
    "DeadlineExceededError",
    "Policy",
    "RateLimitPolicy",
    "RateLimitedError",
    "RejectedError",
    "ResilienceError",
    "ResilientTransport",
    "RetryBudget",
    "RetryPolicy",
    "StaleCachePolicy",
    "TimeoutPolicy",
    "Wait",
    "call_info",
]
