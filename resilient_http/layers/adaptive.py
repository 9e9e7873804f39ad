"""The adaptive limit of a bulkhead: how many attempts a host gets at once, learnt from its answers.

A fixed ``max_concurrent`` is too high for a struggling host and too low for
a healthy one. :class:`AdaptiveSlots` keeps a limit between the policy's
``min`` and the bulkhead's ``max_concurrent`` and moves it with each
attempt's outcome; the bulkhead only asks it for the limit and tells it
what happened. It knows nothing of queues, slots or httpx: it is plain
arithmetic, tested on its own.

Two signals, after Netflix's concurrency-limits (AIMDLimit, Gradient2Limit):

- A **drop** (a timeout, a connect error, a 429 or a 503) multiplies the
  limit by ``backoff``, at most once per round trip. Each attempt is
  numbered when it is sent; a drop of an attempt numbered at or before the
  last decrease was sent under the old limit, so it is not counted again.
  Without this, the 503s of one overload, arriving together, would each
  take 10 % off and drive the limit to ``min`` (QUIC's recovery period,
  RFC 9002 §7.3.2, for the same reason).
- A **success** moves the limit only while the limit is in use: at least
  half of it was in flight when the attempt was sent (Netflix's rule; an
  idle host tells nothing about its capacity). ``"aimd"`` adds one for
  every ``limit`` such answers (one per round trip, which balances the once-per-round-trip
  decrease: adding one per answer, as Netflix's AIMDLimit does, would add a
  whole limit per round trip and outgrow the decrease). ``"gradient"``
  compares the answer's latency with a long-run average (Gradient2Limit:
  smoothing 0.2, tolerance 1.5, a queue allowance of 4, an average over
  about 600 answers).
"""

from __future__ import annotations

import math

from .._config import AdaptiveLimit

#: Answers averaged by the gradient's long-run latency, and the first ones averaged plainly.
LONG_WINDOW, WARMUP = 600, 10
#: How far above the gradient's estimate the limit may grow while latency holds (Gradient2's queue size).
QUEUE_ALLOWANCE = 4.0


class AdaptiveSlots:
    """The current limit of one host's bulkhead, and the arithmetic that moves it."""

    __slots__ = (
        "_backoff",
        "_ceiling",
        "_credit",
        "_estimate",
        "_floor",
        "_gradient",
        "_long",
        "_recovery",
        "_samples",
        "_sent",
        "_smoothing",
        "_tolerance",
        "limit",
    )

    def __init__(self, policy: AdaptiveLimit, ceiling: int) -> None:
        self._floor = policy.min
        self._ceiling = ceiling
        self._backoff = policy.backoff
        self._gradient = policy.mode == "gradient"
        self._smoothing = policy.smoothing
        self._tolerance = policy.tolerance
        self._estimate = float(max(self._floor, min(ceiling, policy.initial)))
        #: The number of attempts the bulkhead may have in flight now.
        self.limit = int(self._estimate)
        self._credit = 0  # answers in use since AIMD last grew the limit
        self._sent = 0  # attempts numbered so far
        self._recovery = 0  # attempts numbered up to here were sent before the last decrease
        self._long = 0.0  # the gradient's long-run latency
        self._samples = 0

    def sent(self) -> int:
        """Number an attempt as it is sent (the number a later :meth:`drop` needs)."""
        self._sent += 1
        return self._sent

    def drop(self, number: int) -> bool:
        """Attempt ``number`` was dropped: shrink, unless a drop since it was sent already did. True if changed."""
        if number <= self._recovery:
            return False
        self._recovery = self._sent
        limit = self.limit
        # Rounded down: at least one less (backoff is at most 0.99), as Netflix's AIMDLimit.
        self._estimate = float(max(self._floor, math.floor(self._estimate * self._backoff)))
        self.limit = int(self._estimate)
        return self.limit != limit

    def success(self, in_flight: int, latency: float) -> bool:
        """An answer that was not a drop, to an attempt sent with ``in_flight`` in flight. True if changed."""
        if self._gradient:
            self._learn(latency)
        if in_flight * 2 < self.limit:
            return False
        limit = self.limit
        if self._gradient:
            estimate = self._estimate
            ratio = self._tolerance * self._long / latency if latency > 0 else 1.0
            target = estimate * max(0.5, min(1.0, ratio)) + QUEUE_ALLOWANCE
            estimate += (target - estimate) * self._smoothing
        else:
            self._credit += 1
            if self._credit < limit:
                return False
            self._credit = 0
            estimate = self._estimate + 1
        self._estimate = max(float(self._floor), min(float(self._ceiling), estimate))
        self.limit = int(self._estimate)
        return self.limit != limit

    def _learn(self, latency: float) -> None:
        """Fold ``latency`` into the long-run average (plain over the first answers, then exponential)."""
        if self._samples < WARMUP:
            self._samples += 1
            self._long += (latency - self._long) / self._samples
        else:
            self._long += (latency - self._long) * (2 / (LONG_WINDOW + 1))
        # Much faster than usual again, after an overload: let the average fall faster (Gradient2).
        if latency > 0 and self._long > 2 * latency:
            self._long *= 0.95
