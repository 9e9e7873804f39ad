"""What travels through the chain: the call, its host, and the story it leaves on the response."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, Protocol

import httpx

from ._clock import Clock
from ._config import Policy
from ._events import Events, HostEvents
from ._metrics import HostMetrics
from ._watchdog import Watchdog

Next = Callable[["Call"], Awaitable[httpx.Response]]

#: Bulkhead priorities, highest first; a call sets one through its request extensions.
PRIORITIES = ("critical", "high", "normal", "low")


class Layer(Protocol):
    """One resilience layer: it may act before, after or instead of ``call_next``.

    Usually an ``async def``. A layer with nothing to do once the answer
    comes may instead decide at once and hand back ``call_next(call)``
    itself, to be awaited by its caller straight away (the rate limiter
    does, when a token is free): then no frame of its own stays while the
    call runs.
    """

    def __call__(self, call: Call, call_next: Next) -> Awaitable[httpx.Response]: ...


class Wait(NamedTuple):
    """A pause the call made: ``reason`` is ``"backoff"``, ``"retry_after"``, ``"rate_limit"`` or ``"bulkhead"``."""

    reason: str
    seconds: float


class CallInfo(NamedTuple):
    """What happened to a call, found in ``response.extensions["resilient_http"]``.

    ``attempts`` counts the tries that reached, or tried to reach, the
    network (0 for a stale answer given without trying). ``stale`` is true
    when the response came from the stale cache, ``age`` then saying how old
    it is and ``stale_reason`` what failed in its place: the ``reason`` label
    of ``resilient_http_stale_served_total`` (``"server_error"``,
    ``"timeout"``, ``"error"``, or a local refusal: ``"circuit_open"``,
    ``"rate_limited"``, ``"bulkhead_full"``). ``waits`` lists every pause in
    order. ``circuit_state`` is the breaker's state when the call ended
    (``None`` without a breaker). ``retry_stop`` says why no further attempt
    was made when the last outcome was retryable: ``"attempts"``,
    ``"budget"``, ``"deadline"``, ``"retry_after_too_long"``,
    ``"not_idempotent"``, ``"body_not_replayable"`` or ``"rate_limit"``.
    ``coalesced`` is true when the call sent nothing and got a copy of the
    answer (or the error) of an identical call in flight (see
    :mod:`resilient_http.layers.coalesce`).
    ``dry_run`` names the layers in dry-run mode that would have blocked the
    call (and let it through). ``fallback`` is true when the transport's
    fallback function gave the response. ``hedges`` counts the extra copies
    sent (see :mod:`resilient_http.layers.hedge`), ``hedge_won`` is true
    when the answer came from one of them, and ``hedge_stop`` says why a
    hedge that was due was not sent: ``"budget"``, ``"retry_budget"``,
    ``"rate_limit"``, ``"cooldown"``, ``"circuit_open"``,
    ``"bulkhead_full"`` or ``"deadline"``.

    A named tuple: immutable, and cheap to make on every call.
    """

    host: str
    attempts: int
    stale: bool = False
    age: float | None = None
    waits: tuple[Wait, ...] = ()
    circuit_state: str | None = None
    retry_stop: str | None = None
    coalesced: bool = False
    stale_reason: str | None = None
    dry_run: tuple[str, ...] = ()
    fallback: bool = False
    hedges: int = 0
    hedge_won: bool = False
    hedge_stop: str | None = None


class Host:
    """Everything the layers of one ``host:port`` share: its policy, clock, metrics and state.

    A layer keeps its own state on itself; the host only owns the layer
    instances (made on first use) and the chains composed of them.
    """

    __slots__ = (
        "calls",
        "chains",
        "clock",
        "direct",
        "events",
        "head",
        "hedge_gates",
        "holds",
        "host",
        "infos",
        "inner",
        "label",
        "layers",
        "metrics",
        "observers",
        "policy",
        "port",
        "random",
        "retry_gates",
        "shared",
        "tracing",
        "watchdog",
    )

    def __init__(
        self,
        *,
        host: str,
        port: int,
        policy: Policy,
        clock: Clock,
        rng: random.Random,
        metrics: HostMetrics,
        inner: httpx.AsyncBaseTransport,
        shared: dict[str, Any] | None = None,
        events: Events | None = None,
        tracing: Any = None,
        watchdog: Watchdog | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.label = metrics.host
        self.policy = policy
        self.clock = clock
        self.random = rng
        self.metrics = metrics
        self.inner = inner
        # What the layers emit their decisions through (see _events); ``tracing``
        # is the transport's resilient_http._tracing.Tracing, or None.
        self.events: HostEvents = (Events("", None, None) if events is None else events).host(self.label)
        self.tracing = tracing
        self.watchdog = Watchdog() if watchdog is None else watchdog  # the attempts' timers: the transport's
        self.layers: dict[str, Any] = {}
        self.calls = 0  # calls in flight, counted by the host table: a busy host is never evicted
        self.shared: dict[str, Any] = {} if shared is None else shared  # one dict for all hosts of a transport
        # Per set of active layers: the outermost layer's __call__ and the chain inside it (see _pipeline).
        self.chains: dict[tuple[bool, ...], tuple[Callable[[Call, Next], Awaitable[httpx.Response]], Next, Next]] = {}
        # The CallInfo of a call that made one attempt, waited for nothing and
        # noted nothing, by the breaker's state as it ended: one record shared
        # by every such call (a CallInfo is immutable), rather than one each.
        self.infos: dict[str | None, CallInfo] = {}
        # ``policy``'s chain, once made: see _pipeline.head_for
        self.head: tuple[Callable[[Call, Next], Awaitable[httpx.Response]], Next, Next]
        self.direct = False  # no layer at all in ``policy``: its calls skip the chain (see the transport)
        # Called with every response an attempt receives (a rate limiter reads
        # the server's Retry-After and RateLimit hints here); empty costs nothing.
        self.observers: list[Callable[[httpx.Response, float], None]] = []
        # Asked before every retry with (call, earliest send time); each returns
        # the time the retry may be sent, or None to refuse it. A rate limiter
        # reserves retries here so that they count against the host's rate too.
        self.retry_gates: list[Callable[[Call, float], float | None]] = []
        # Asked again once a retry's wait is over: the time before which the
        # host must not be sent anything (a cooldown the server imposed
        # while the retry was waiting). Empty costs nothing.
        self.holds: list[Callable[[], float]] = []
        # Asked, in order, right before a hedge (an extra copy of an attempt) is
        # sent: None to let it go, a reason to refuse it ("circuit_open",
        # "bulkhead_full", "retry_budget"), or a function that gives back what
        # the gate took (a share of the retry budget) if another gate refuses.
        self.hedge_gates: list[Callable[[Call], str | Callable[[], None] | None]] = []


class Call:
    """One call's mutable state, read and written by the layers it passes.

    What every call has is set when it is made; what a layer notes only when
    it happens (a stale answer, a retry's stop, a hedge) is read from the
    class until a layer writes it on the call, so that a plain call pays for
    none of it. A layer that writes one of these notes (``circuit_state``
    aside, which the breaker writes on every call) also sets ``noted``, so
    that :meth:`info` knows the call's story is more than its host's usual one.
    """

    # A layer's notes: these defaults until it writes its own on the call.
    noted: bool = False
    waits: tuple[Wait, ...] = ()  # every pause, in order: see waited()
    age: float | None = None
    circuit_state: str | None = None
    coalesced: bool = False
    dry_run: tuple[str, ...] = ()
    fallback: bool = False
    hedge_stop: str | None = None
    hedge_won: bool = False
    hedges: int = 0
    retry_stop: str | None = None
    span: Any = None  # the call's OpenTelemetry span while it runs and is traced (see _tracing)
    stale: bool = False
    stale_reason: str | None = None

    def __init__(
        self, request: httpx.Request, host: Host, policy: Policy, started: float, priority: str = "normal"
    ) -> None:
        self.request = request
        self.priority = priority
        self.host = host
        self.policy = policy
        self.started = started
        timeout = policy.timeout
        # The total timeout runs from the moment the call enters the transport,
        # so that it also bounds waiting in the rate limiter in front of it.
        self.deadline: float | None = None if timeout is None or timeout.total is None else started + timeout.total
        self.attempts = 0

    def waited(self, reason: str, seconds: float) -> None:
        """Note a pause of the call (``reason`` as :class:`Wait` names them)."""
        self.waits += (Wait(reason, seconds),)

    def blocked_in_dry_run(self, layer: str) -> None:
        """``layer``, in dry-run mode, would have blocked this call: say so, and count it once per call."""
        if layer not in self.dry_run:
            self.dry_run += (layer,)
            self.noted = True
            self.host.metrics.labelled("dry_run_blocked", layer).inc()

    def info(self) -> CallInfo:
        """What happened to this call, as it stands."""
        if self.attempts == 1 and not self.noted and not self.waits:  # the usual story: shared
            infos = self.host.infos
            info = infos.get(self.circuit_state)
            if info is None:
                info = infos[self.circuit_state] = CallInfo(self.host.label, 1, circuit_state=self.circuit_state)
            return info
        return _tuple_new(
            CallInfo,
            (
                self.host.label,
                self.attempts,
                self.stale,
                self.age,
                self.waits,
                self.circuit_state,
                self.retry_stop,
                self.coalesced,
                self.stale_reason,
                self.dry_run,
                self.fallback,
                self.hedges,
                self.hedge_won,
                self.hedge_stop,
            ),
        )


_tuple_new = tuple.__new__  # a CallInfo made from its fields in order, without the named tuple's own __new__
