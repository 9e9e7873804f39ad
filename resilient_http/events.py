"""The events an ``on_event`` hook receives: one small frozen class per kind of decision.

::

    from resilient_http.events import CallRejected, Event, RetryScheduled

    def on_event(event: Event) -> None:
        match event:
            case RetryScheduled(host=host, reason=reason, delay=delay):
                print(f"retrying {host} in {delay:.2f}s after {reason}")
            case CallRejected(layer="circuit_breaker", retry_after=after):
                ...

    transport = ResilientTransport(default=Policy(), on_event=on_event)

Every event has ``transport`` (the transport's ``name``), ``host``
(``host:port``), ``kind`` (``"retry_scheduled"``) and ``level`` (its
``logging`` level). No event holds a URL, a header or a body. The same
classes serve both flavours (httpx and httpx2). How events reach hooks,
logs and spans: :mod:`resilient_http._events`.
"""

from __future__ import annotations

from ._events import BreakerStateChanged as BreakerStateChanged
from ._events import BudgetRefused as BudgetRefused
from ._events import CallRejected as CallRejected
from ._events import Coalesced as Coalesced
from ._events import CooldownStarted as CooldownStarted
from ._events import Event as Event
from ._events import Hedged as Hedged
from ._events import HedgeWon as HedgeWon
from ._events import LimitChanged as LimitChanged
from ._events import RetryScheduled as RetryScheduled
from ._events import RetryStopped as RetryStopped
from ._events import StaleServed as StaleServed
from ._events import StoreFallback as StoreFallback
from ._events import TimedOut as TimedOut
from ._events import Waited as Waited

__all__ = [
    "BreakerStateChanged",
    "BudgetRefused",
    "CallRejected",
    "Coalesced",
    "CooldownStarted",
    "Event",
    "HedgeWon",
    "Hedged",
    "LimitChanged",
    "RetryScheduled",
    "RetryStopped",
    "StaleServed",
    "StoreFallback",
    "TimedOut",
    "Waited",
]
