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

AdaptiveLimit = _impl.AdaptiveLimit
BulkheadFullError = _impl.BulkheadFullError
BulkheadPolicy = _impl.BulkheadPolicy
CallInfo = _impl.CallInfo
CircuitBreakerPolicy = _impl.CircuitBreakerPolicy
CircuitOpenError = _impl.CircuitOpenError
CoalescePolicy = _impl.CoalescePolicy
ConfigurationError = _impl.ConfigurationError
ConnectDeadlineExceededError = _impl.ConnectDeadlineExceededError
DeadlineExceededError = _impl.DeadlineExceededError
HedgePolicy = _impl.HedgePolicy
Policy = _impl.Policy
PoolDeadlineExceededError = _impl.PoolDeadlineExceededError
RateLimitPolicy = _impl.RateLimitPolicy
RateLimitedError = _impl.RateLimitedError
ReadDeadlineExceededError = _impl.ReadDeadlineExceededError
RejectedError = _impl.RejectedError
ResilienceError = _impl.ResilienceError
ResilientClient = _impl.ResilientClient
ResilientTransport = _impl.ResilientTransport
RetryBudget = _impl.RetryBudget
RetryPolicy = _impl.RetryPolicy
StaleCachePolicy = _impl.StaleCachePolicy
TimeoutPolicy = _impl.TimeoutPolicy
Wait = _impl.Wait
WriteDeadlineExceededError = _impl.WriteDeadlineExceededError
call_info = _impl.call_info

__all__ = [
    "AdaptiveLimit",
    "BulkheadFullError",
    "BulkheadPolicy",
    "CallInfo",
    "CircuitBreakerPolicy",
    "CircuitOpenError",
    "CoalescePolicy",
    "ConfigurationError",
    "ConnectDeadlineExceededError",
    "DeadlineExceededError",
    "HedgePolicy",
    "Policy",
    "PoolDeadlineExceededError",
    "RateLimitPolicy",
    "RateLimitedError",
    "ReadDeadlineExceededError",
    "RejectedError",
    "ResilienceError",
    "ResilientClient",
    "ResilientTransport",
    "RetryBudget",
    "RetryPolicy",
    "StaleCachePolicy",
    "TimeoutPolicy",
    "Wait",
    "WriteDeadlineExceededError",
    "call_info",
]
