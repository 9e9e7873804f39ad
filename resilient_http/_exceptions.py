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

    ValueError
     └── ConfigurationError           (a bad policy, raised at construction)

A rejection means the request never reached the network: it is always safe
to send it again later, and ``retry_after`` says when that is worth trying
(``None`` when nobody knows).
"""

from __future__ import annotations

from typing import Literal

import httpx

from ._errors import ConfigurationError as ConfigurationError

TimeoutKind = Literal["attempt", "total"]


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
    """A per-attempt or total timeout of the policy ran out.

    ``kind`` is ``"attempt"`` (one try took too long; another may be made) or
    ``"total"`` (the whole call, waits and body included, took too long).
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
