"""The exceptions resilient_http raises.

Every runtime error is an ``httpx.TransportError``, so code that already
catches ``httpx.HTTPError`` or ``httpx.TransportError`` keeps working when the
transport is swapped in::

    httpx.TransportError
     └── ResilienceError
          ├── RejectedError           (refused before the network; carries retry_after)
          │    ├── CircuitOpenError
          │    ├── RateLimitedError
          │    └── BulkheadFullError
          └── DeadlineExceededError   (also an httpx.TimeoutException)
               ├── ConnectDeadlineExceededError   (also an httpx.ConnectTimeout)
               ├── PoolDeadlineExceededError      (also an httpx.PoolTimeout)
               ├── WriteDeadlineExceededError     (also an httpx.WriteTimeout)
               └── ReadDeadlineExceededError      (also an httpx.ReadTimeout)

    ValueError
     └── ConfigurationError           (a bad policy, raised at construction)

A rejection means the request never reached the network: it is always safe
to send it again later, and ``retry_after`` says when that is worth trying
(``None`` when nobody knows).

A policy timeout that ran out during one operation of httpx's is also that
operation's httpx class, so ``except httpx.ConnectTimeout`` and the rule
"nothing was sent, retry any method" keep their meaning; the base class is
raised when the operation is unknown (a wait outside the network, or an
inner transport that does not enforce httpx's timeouts).
"""

from __future__ import annotations

from typing import Literal

import httpx

from ._errors import ConfigurationError as ConfigurationError

TimeoutKind = Literal["attempt", "total", "idle"]
#: The httpx operation a timeout interrupted, as the keys of ``request.extensions["timeout"]``.
Phase = Literal["connect", "pool", "write", "read"]


class ResilienceError(httpx.TransportError):
    """Base of every error raised by a resilience layer."""

    def __init__(self, message: str, *, request: httpx.Request | None = None) -> None:
        super().__init__(message, request=request)


class RejectedError(ResilienceError):
    """A call refused before it reached the network."""

    def __init__(
        self,
        message: str,
        *,
        host: str,
        retry_after: float | None = None,
        request: httpx.Request | None = None,
    ) -> None:
        super().__init__(message, request=request)
        self.host = host
        self.retry_after = retry_after


class CircuitOpenError(RejectedError):
    """The host's circuit breaker is open (or its half-open trials are taken)."""


class RateLimitedError(RejectedError):
    """The host's rate limiter could not give the call a slot in time."""


class BulkheadFullError(RejectedError):
    """The host's bulkhead had no free slot and no room left in its queue."""


class DeadlineExceededError(ResilienceError, httpx.TimeoutException):
    """A timeout of the policy ran out.

    ``kind`` is ``"attempt"`` (one try took too long; another may be made),
    ``"total"`` (the whole call took too long) or ``"idle"`` (a streamed
    body paused longer than ``TimeoutPolicy.idle``); ``timeout`` is that
    policy value in seconds. Subclasses say which httpx operation it cut.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: TimeoutKind,
        timeout: float,
        request: httpx.Request | None = None,
    ) -> None:
        super().__init__(message, request=request)
        self.kind: TimeoutKind = kind
        self.timeout = timeout


class ConnectDeadlineExceededError(DeadlineExceededError, httpx.ConnectTimeout):
    """A policy timeout ran out while connecting: nothing was sent."""


class PoolDeadlineExceededError(DeadlineExceededError, httpx.PoolTimeout):
    """A policy timeout ran out while waiting for a pool connection: nothing was sent."""


class WriteDeadlineExceededError(DeadlineExceededError, httpx.WriteTimeout):
    """A policy timeout ran out while sending the request."""


class ReadDeadlineExceededError(DeadlineExceededError, httpx.ReadTimeout):
    """A policy timeout ran out while waiting for the response, its headers or its body."""


_BY_PHASE: dict[Phase | None, type[DeadlineExceededError]] = {
    "connect": ConnectDeadlineExceededError,
    "pool": PoolDeadlineExceededError,
    "write": WriteDeadlineExceededError,
    "read": ReadDeadlineExceededError,
    None: DeadlineExceededError,
}


def deadline_error(
    message: str, *, phase: Phase | None, kind: TimeoutKind, timeout: float, request: httpx.Request | None = None
) -> DeadlineExceededError:
    """The error for a policy timeout that cut ``phase`` (``None``: an unknown one)."""
    return _BY_PHASE[phase](message, kind=kind, timeout=timeout, request=request)
