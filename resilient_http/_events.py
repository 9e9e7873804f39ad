"""The decisions the layers make, as small typed events, and where they go.

Every event is a frozen, slotted dataclass carrying the ``transport`` (its
``name=``) and the ``host`` label (``host:port``) beside its own fields; its
``kind`` names it (``"retry_scheduled"``) and its ``level`` is the
``logging`` level it is logged at. One stream, three listeners, fanned out
by the transport's :class:`Events`:

- the ``on_event`` callback given to ``ResilientTransport`` (a hook that
  raises is logged and ignored: it never breaks a call);
- the ``resilient_http`` logger, with the event's fields as structured
  ``extra`` (``event``, ``transport``, ``host`` and the event's own);
- the call's OpenTelemetry span, as a span event (see :mod:`._tracing`).

No event carries a URL, a header or a body: a host label, a reason, a
number of seconds. So a log line or a span event can never leak a
credential, a query string or a payload.

Emitting costs nothing when nobody listens: a layer asks
:meth:`HostEvents.wants` (a hook? a recording span? the logger enabled at
that level?) before it builds an event, and the layers emit only at
decisions off the happy path (a retry, a refusal, a change of state).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from ._call import Call

logger = logging.getLogger("resilient_http")

DEBUG, INFO, WARNING = logging.DEBUG, logging.INFO, logging.WARNING


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """What every event carries: the transport's ``name`` and the ``host:port`` label."""

    kind: ClassVar[str] = "event"
    #: The logging level of the event.
    level: ClassVar[int] = DEBUG
    #: What made the decision: the event is logged by ``resilient_http.<source>``.
    source: ClassVar[str] = "transport"

    transport: str
    host: str

    def fields(self) -> dict[str, Any]:
        """The event's fields by name, ``transport`` and ``host`` included."""
        return asdict(self)

    def severity(self) -> int:
        """The ``logging`` level of this event (``level``, unless the event's fields raise it)."""
        return self.level

    def origin(self) -> str:
        """The layer that made the decision (``source``, unless the event's fields say which)."""
        return self.source

    def describe(self) -> str:
        """One line for a log record."""
        return self.kind


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryScheduled(Event):
    """A retry will be sent after waiting ``delay`` seconds (its ``wait``: ``backoff`` or ``retry_after``).

    ``attempt`` is the number of the try that failed. A rate limiter that
    books the retry a later turn adds a :class:`Waited` (``rate_limit``):
    the two are the call's ``CallInfo.waits``.
    """

    kind: ClassVar[str] = "retry_scheduled"
    source: ClassVar[str] = "retry"

    reason: str  # "status_503", "timeout", "connect_error", "network_error"
    delay: float
    attempt: int
    wait: str  # "backoff" or "retry_after"

    def describe(self) -> str:
        return f"retry {self.attempt + 1} to {self.host} in {self.delay:.3f}s after {self.reason}"


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryStopped(Event):
    """No further attempt: the last outcome was retryable but ``reason`` says why not (``CallInfo.retry_stop``)."""

    kind: ClassVar[str] = "retry_stopped"
    source: ClassVar[str] = "retry"

    reason: str
    attempts: int

    def describe(self) -> str:
        return f"no retry to {self.host} after {self.attempts} attempt(s): {self.reason}"


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetRefused(Event):
    """The host's retry budget refused a retry (``retry_budget_exhausted_total``)."""

    kind: ClassVar[str] = "budget_refused"
    source: ClassVar[str] = "retry"
    level: ClassVar[int] = INFO

    def describe(self) -> str:
        return f"retry budget of {self.host} spent: retry refused"


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerStateChanged(Event):
    """The circuit breaker went from ``old`` to ``new`` (``closed``, ``open``, ``half_open``)."""

    kind: ClassVar[str] = "breaker_state_changed"
    source: ClassVar[str] = "circuit_breaker"
    level: ClassVar[int] = INFO  # WARNING when it opens

    old: str
    new: str
    break_seconds: float | None = None  # how long it stays open, when ``new`` is "open"

    def severity(self) -> int:
        return WARNING if self.new == "open" else INFO

    def describe(self) -> str:
        after = "" if self.break_seconds is None else f" for {self.break_seconds:.3f}s"
        return f"circuit of {self.host}: {self.old} -> {self.new}{after}"


@dataclass(frozen=True, slots=True, kw_only=True)
class CallRejected(Event):
    """A layer refused the call before the network: ``layer`` is ``circuit_breaker``, ``rate_limit`` or ``bulkhead``."""

    kind: ClassVar[str] = "call_rejected"
    source: ClassVar[str] = "rejected"

    layer: str
    retry_after: float | None
    reason: str = ""  # "open", "half_open", "full", "queue_timeout", "shed", "cooldown", "no_turn"

    def origin(self) -> str:
        return self.layer

    def describe(self) -> str:
        after = "" if self.retry_after is None else f", retry after {self.retry_after:.3f}s"
        return f"call to {self.host} rejected by the {self.layer} ({self.reason}){after}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Waited(Event):
    """The call waited ``seconds`` for a turn: ``reason`` is ``rate_limit`` or ``bulkhead`` (a slot in the queue)."""

    kind: ClassVar[str] = "waited"
    source: ClassVar[str] = "wait"

    reason: str
    seconds: float

    def origin(self) -> str:
        return self.reason

    def describe(self) -> str:
        return f"call to {self.host} waited {self.seconds:.3f}s ({self.reason})"


@dataclass(frozen=True, slots=True, kw_only=True)
class StaleServed(Event):
    """A stale answer, ``age`` seconds old, was served in place of ``reason`` (``stale_served_total``'s label)."""

    kind: ClassVar[str] = "stale_served"
    source: ClassVar[str] = "stale_cache"

    reason: str
    age: float

    def describe(self) -> str:
        return f"stale answer from {self.host}, {self.age:.0f}s old, served after {self.reason}"


@dataclass(frozen=True, slots=True, kw_only=True)
class TimedOut(Event):
    """A timeout of the policy ran out: ``timeout_kind`` is ``attempt``, ``total`` or ``idle``."""

    kind: ClassVar[str] = "timed_out"
    source: ClassVar[str] = "timeout"

    timeout_kind: str
    seconds: float
    phase: str | None = None  # the httpx operation in progress: connect, pool, write, read

    def describe(self) -> str:
        during = "" if self.phase is None else f" ({self.phase})"
        return f"{self.timeout_kind} timeout of {self.seconds}s for {self.host} ran out{during}"


@dataclass(frozen=True, slots=True, kw_only=True)
class CooldownStarted(Event):
    """The server asked for a pause: nothing is sent to the host for ``seconds`` (after a ``status``)."""

    kind: ClassVar[str] = "cooldown_started"
    source: ClassVar[str] = "rate_limit"
    level: ClassVar[int] = INFO

    seconds: float
    status: int

    def describe(self) -> str:
        return f"cooldown of {self.seconds:.3f}s for {self.host} after a {self.status}"


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitChanged(Event):
    """The adaptive bulkhead limit went from ``old`` to ``new`` after a ``why`` (``drop`` or ``success``)."""

    kind: ClassVar[str] = "limit_changed"
    source: ClassVar[str] = "bulkhead"

    old: int
    new: int
    why: str
    cause: str | None = None  # the status or the exception class that caused a drop

    def describe(self) -> str:
        detail = "" if self.cause is None else f" ({self.cause})"
        return f"bulkhead of {self.host}: limit {self.old} -> {self.new} after a {self.why}{detail}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Coalesced(Event):
    """The call sent nothing and took an identical call's ``result``: ``response``, ``error`` or ``unshared``."""

    kind: ClassVar[str] = "coalesced"
    source: ClassVar[str] = "coalesce"

    result: str

    def describe(self) -> str:
        return f"call to {self.host} coalesced ({self.result})"


@dataclass(frozen=True, slots=True, kw_only=True)
class Hedged(Event):
    """A hedged copy of the call was sent ``delay`` seconds after the first (for :mod:`.layers.hedge`)."""

    kind: ClassVar[str] = "hedged"
    source: ClassVar[str] = "hedge"

    attempt: int
    delay: float

    def describe(self) -> str:
        return f"hedge {self.attempt} to {self.host} after {self.delay:.3f}s"


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreFallback(Event):
    """The fleet's store did not answer ``operation`` and ``layer`` decided with this worker's own state.

    ``layer`` is ``rate_limit`` (its share of the quota) or
    ``circuit_breaker`` (its own breaker); ``operation`` the store's
    (``admit``, ``hold``, ``circuit``, ``claim_trial``, ...). Why the store
    did not answer (its timeout, an error, or being skipped after failures)
    is the ``reason`` of ``resilient_http_store_fallbacks_total``; the store
    logs an outage once, at WARNING, when it begins.
    """

    kind: ClassVar[str] = "store_fallback"
    source: ClassVar[str] = "store"

    layer: str
    operation: str

    def describe(self) -> str:
        return f"store did not answer {self.operation} for the {self.layer} of {self.host}: decided locally"


@dataclass(frozen=True, slots=True, kw_only=True)
class HedgeWon(Event):
    """The call's answer came from hedge ``attempt``, ``after`` seconds after its first copy went."""

    kind: ClassVar[str] = "hedge_won"
    source: ClassVar[str] = "hedge"

    attempt: int
    after: float

    def describe(self) -> str:
        return f"hedge {self.attempt} to {self.host} won after {self.after:.3f}s"


Hook = Callable[[Event], object]


class Spans(Protocol):
    """Where events become span events: the call's span, or the current one for an event about no call."""

    def recording(self, call: Call | None) -> bool: ...

    def add(self, call: Call | None, event: Event) -> None: ...


class Events:
    """The transport's listeners: its ``on_event`` hook, the logger, and its spans when tracing."""

    __slots__ = ("hook", "spans", "transport")

    def __init__(self, transport: str, hook: Hook | None, spans: Spans | None) -> None:
        self.transport = transport
        self.hook = hook
        self.spans = spans

    def host(self, label: str) -> HostEvents:
        return HostEvents(self, label)


class HostEvents:
    """What the layers of one host emit through: ``wants`` before building an event, ``emit`` to send it."""

    __slots__ = ("_hook", "_spans", "host", "transport")

    def __init__(self, events: Events, host: str) -> None:
        self._hook = events.hook
        self._spans = events.spans
        self.transport = events.transport
        self.host = host

    def wants(self, level: int, source: str, call: Call | None = None) -> bool:
        """Whether anyone would read an event of ``level`` from ``source`` (about ``call``, if any)."""
        if self._hook is not None or _logger(source).isEnabledFor(level):
            return True
        spans = self._spans
        return spans is not None and spans.recording(call)

    def emit(self, event: Event, call: Call | None = None) -> None:
        """Hand ``event`` to every listener; none of them can make the call fail."""
        hook = self._hook
        if hook is not None:
            try:
                hook(event)
            except Exception:
                logger.warning("on_event hook raised on %s", event.kind, exc_info=True, extra=_extra(event))
        level = event.severity()
        log = _logger(event.origin())
        if log.isEnabledFor(level):
            log.log(level, event.describe(), extra=_extra(event))
        spans = self._spans
        if spans is not None and spans.recording(call):
            spans.add(call, event)


_LOGGERS: dict[str, logging.Logger] = {}


def _logger(source: str) -> logging.Logger:
    """``resilient_http.<source>``, a child of the ``resilient_http`` logger (looked up once)."""
    found = _LOGGERS.get(source)
    if found is None:
        found = _LOGGERS[source] = logging.getLogger(f"{logger.name}.{source}")
    return found


def _extra(event: Event) -> dict[str, Any]:
    return {"event": event.kind, **event.fields()}
