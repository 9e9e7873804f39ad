"""The store's own small breaker: a slow or absent Redis costs a few failures, then nothing.

Each operation has ``timeout`` seconds. After ``failures`` failures in a
row the store is skipped for ``cooldown`` seconds: operations answer
``UNAVAILABLE`` at once, without touching the network. Then one operation
is let through as a probe (the others are still skipped while it runs);
if it succeeds, sharing resumes, otherwise the store is skipped for another
cooldown. An outage is logged once, at WARNING, when it begins, and its end
at INFO; every answer not given is counted in
``resilient_http_store_fallbacks_total``.
"""

from __future__ import annotations

import logging

from .._clock import Clock
from .._errors import ConfigurationError
from ._base import check_seconds
from ._metrics import StoreMetrics

logger = logging.getLogger("resilient_http.store")

_CLOSED, _SKIPPING, _PROBING = "closed", "skipping", "probing"


class StoreGuard:
    """Decides whether an operation may use the store, and learns from how it went."""

    __slots__ = ("_clock", "_cooldown", "_failed", "_failures", "_lost", "_metrics", "_name", "_state", "_until")

    def __init__(self, *, name: str, failures: int, cooldown: float, clock: Clock, metrics: StoreMetrics) -> None:
        if isinstance(failures, bool) or not isinstance(failures, int) or failures < 1:
            raise ConfigurationError("store.failures", failures, "must be a whole number, at least 1")
        self._cooldown = check_seconds("store.cooldown", cooldown)
        self._failures = failures
        self._name = name
        self._clock = clock
        self._metrics = metrics
        self._state = _CLOSED
        self._failed = 0  # failures in a row
        self._until = 0.0  # end of the current skip
        self._lost = 0  # answers not given during the current outage

    @property
    def available(self) -> bool:
        """``False`` while the store is being skipped."""
        return self._state == _CLOSED

    def enter(self, operation: str) -> bool:
        """May ``operation`` use the store now? When not, the fallback is counted."""
        state = self._state
        if state == _CLOSED:
            return True
        if state == _SKIPPING and self._clock.now() >= self._until:
            self._state = _PROBING
            return True
        self._lost += 1
        self._metrics.fallback(operation, "skipped")
        return False

    def succeeded(self) -> None:
        self._failed = 0
        if self._state != _CLOSED:
            self._state = _CLOSED
            self._metrics.up.set(1)
            logger.info("store %s answers again: sharing resumed (%d answers were local)", self._name, self._lost)
            self._lost = 0

    def failed(self, operation: str, exc: Exception) -> None:
        self._lost += 1
        self._metrics.fallback(operation, "timeout" if isinstance(exc, TimeoutError) else "error")
        self._failed += 1
        if self._state == _PROBING or self._failed >= self._failures:
            if self._state == _CLOSED:
                self._metrics.up.set(0)
                logger.warning(
                    "store %s failed %d times in a row (last: %s: %s): using local state, trying again in %g s",
                    self._name,
                    self._failed,
                    type(exc).__name__,
                    exc,
                    self._cooldown,
                )
            self._state = _SKIPPING
            self._until = self._clock.now() + self._cooldown

    def abandoned(self) -> None:
        """The operation was cancelled by its caller: no verdict; a probe's turn goes to the next operation."""
        if self._state == _PROBING:
            self._state = _SKIPPING
            self._until = self._clock.now()
