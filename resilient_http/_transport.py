"""ResilientTransport: the only class that speaks httpx's transport protocol."""

from __future__ import annotations

import dataclasses
import random
import weakref
from collections.abc import Callable, Iterable, Mapping
from os import PathLike
from types import TracebackType
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from ._call import PRIORITIES, Call, CallInfo, Host, Next
from ._clock import Clock, SystemClock, default_random
from ._config import Policy, RetryPolicy, TimeoutPolicy
from ._events import Event, Events
from ._exceptions import ConfigurationError
from ._fallback import Fallback, check_fallback, failed, fall_back
from ._hosts import DEFAULT_MAX_HOSTS, DEFAULT_PORTS, HostTable, PolicyTable, canonical_host, host_of
from ._metrics import DEFAULT_NAME, TransportMetrics, outcome_of_exception, outcome_of_status
from ._network import CertTypes, ProxyTypes, SocketOption, VerifyTypes, default_inner, refuse_beside_inner
from ._pipeline import head_for, is_direct, update
from ._series import abandon
from ._tracing import AVAILABLE as TRACING_AVAILABLE
from ._tracing import Tracing, probe
from ._watchdog import Watchdog
from .layers.timeout import IN_MEMORY, first_bytes, guard_body, try_failed
from .store import Store, open_store, open_store_table
from .store._fleet import FLEET, Fleet

#: What a single call may change through ``request.extensions["resilient_http"]``.
OVERRIDABLE = {"timeout": TimeoutPolicy, "retry": RetryPolicy}
_OFF_ONLY = ("circuit_breaker", "rate_limit", "bulkhead", "stale_cache", "coalesce", "hedge")


def _override(policy: Policy, override: Any) -> tuple[Policy, str]:
    """``policy`` with a single call's changes applied, and the call's priority.

    Bad changes raise :class:`ConfigurationError` before anything is sent.
    """
    if isinstance(override, Policy):
        # The same rule as for a mapping: layers whose state is the host's can only be turned off.
        for name in _OFF_ONLY:
            value = getattr(override, name)
            if value is not None and value != getattr(policy, name):
                raise ConfigurationError(
                    f'extensions["resilient_http"].{name}', value, "a single call may only turn this layer off (None)"
                )
        return override, "normal"
    if not isinstance(override, Mapping):
        raise ConfigurationError('extensions["resilient_http"]', override, "must be a Policy or a mapping")
    changes: dict[str, Any] = {}
    priority = "normal"
    for name, value in override.items():
        if name == "priority":
            if value not in PRIORITIES:
                raise ConfigurationError(
                    'extensions["resilient_http"]["priority"]', value, f"must be one of {', '.join(PRIORITIES)}"
                )
            priority = value
            continue
        if name in OVERRIDABLE:
            if value is not None and not isinstance(value, OVERRIDABLE[name]):
                raise ConfigurationError(
                    f'extensions["resilient_http"]["{name}"]', value, f"must be a {OVERRIDABLE[name].__name__} or None"
                )
        elif name in _OFF_ONLY:
            if value is not None:
                raise ConfigurationError(
                    f'extensions["resilient_http"]["{name}"]',
                    value,
                    "a single call may only turn this layer off (None)",
                )
        else:
            raise ConfigurationError('extensions["resilient_http"]', name, "is not a policy field")
        changes[name] = value
    return (dataclasses.replace(policy, **changes) if changes else policy), priority


class ResilientTransport(httpx.AsyncBaseTransport):
    """An httpx transport that gives every call, per host, the layers its policy asks for.

    ``policies`` maps host patterns (``api.example.com``,
    ``api.example.com:8443``, ``*.example.com``) to :class:`Policy`;
    ``default`` serves hosts no pattern matches (``Policy()`` when omitted).
    ``inner`` does the network I/O and is closed by :meth:`aclose`; when it
    is omitted, ``httpx.AsyncHTTPTransport`` is made with the network
    settings given here (``verify``, ``cert``, ``trust_env``, ``http1``,
    ``http2``, ``limits``, ``proxy``, ``uds``, ``local_address``,
    ``retries``, ``socket_options``: httpx's, with the same meaning), but
    without httpx's global connection cap unless ``limits`` are given (see
    :func:`~resilient_http._network.default_inner`). Give your own ``inner``
    a pool without a global cap too, or one hung host can take every
    connection; network settings beside ``inner`` raise
    :class:`ConfigurationError`, as they would be lost. Like any custom
    transport, this one makes ``httpx.AsyncClient`` ignore proxies from the
    environment: :class:`~resilient_http.ResilientClient` keeps them. Metrics go
    to ``registry`` (the global registry when omitted), every series
    labelled ``transport=name``: two open transports on one registry need
    different names (the second is refused with :class:`ConfigurationError`),
    and a transport's series leave the registry when it is closed
    (``aclose``, the end of ``async with``, or garbage collection). Durations
    are counted in histograms whose ``buckets`` (upper bounds in seconds) are
    OpenTelemetry's HTTP client buckets unless given; transports on one
    registry must use the same. State is
    kept for at most ``max_hosts`` hosts, least
    recently used evicted first, and never for a host while it has calls in
    flight (the table may hold more hosts while more are busy at once).
    ``clock`` and ``random`` exist for tests.

    ``on_event`` is called with every decision a layer makes, as a small
    typed event (:mod:`resilient_http.events`); a hook that raises is logged
    and never breaks a call. The same events go to the ``resilient_http``
    logger and, with ``opentelemetry-api`` installed, to the call's span:
    spans go to ``tracer_provider``, or to the global provider when it is
    omitted (see :mod:`resilient_http._tracing`), named after ``name``.

    ``store`` shares the fleet-wide state (the rate limit, the server's
    back-off, the breaker's verdicts and trials, the live workers) with every
    worker using the same store: a ``redis://``, ``rediss://`` or ``unix://``
    URL, a ``[store]`` table (``{"url": ..., "timeout": 0.02}``), or a store
    object (:class:`~resilient_http.store.RedisStore`, or a
    :class:`~resilient_http.store.MemoryStore` shared by the transports of
    one process). Without it (or with ``"memory://"``) every layer decides
    alone, in memory, and never awaits a store. A store this transport opened
    from a URL or a table is closed by :meth:`aclose`; a store object belongs
    to its giver. See :mod:`resilient_http.store`.

    A single call may override its host's ``timeout`` and ``retry``, turn
    any layer off, and set its bulkhead priority (``critical``, ``high``,
    ``normal``, ``low``) through request extensions, e.g.
    ``extensions={"resilient_http": {"retry": None, "priority": "critical"}}``.

    ``fallback``, a function ``(request, failure, info)``, plain or async,
    may answer when a call fails after every layer, the stale cache
    included; see :mod:`resilient_http._fallback` for what it is asked
    about and how its answer is marked.

    Policies may change while calls are in flight: :meth:`update_policies`
    takes new ones, :meth:`reload` re-reads the file of a transport made by
    :meth:`from_file`. Either validates everything first and changes
    nothing when anything is wrong, then swaps in one step. Each host keeps
    the state of the layers that stay in its new policy: a breaker its
    state and open time (its counts too, unless its ``window`` changed), a
    rate limiter its schedule and the server's cooldown, a bulkhead its
    slots and queue, a retry budget its history (unless its ``window``
    changed), the stale cache its answers; each takes the new settings for
    what comes next. A layer the new policy turns off is dropped with its
    state (a host's stale answers too); a layer it turns on starts fresh.
    Calls in flight are never cancelled: each finishes with the policy it
    started with, the new limits applying to new calls and attempts.
    """

    def __init__(
        self,
        policies: Mapping[str, Policy] | None = None,
        *,
        default: Policy | None = None,
        inner: httpx.AsyncBaseTransport | None = None,
        registry: CollectorRegistry | None = None,
        max_hosts: int = DEFAULT_MAX_HOSTS,
        clock: Clock | None = None,
        random: random.Random | None = None,
        name: str = DEFAULT_NAME,
        buckets: Iterable[float] | None = None,
        on_event: Callable[[Event], object] | None = None,
        tracer_provider: Any = None,
        verify: VerifyTypes = True,
        cert: CertTypes | None = None,
        trust_env: bool = True,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits | None = None,
        proxy: ProxyTypes | None = None,
        uds: str | None = None,
        local_address: str | None = None,
        retries: int = 0,
        socket_options: Iterable[SocketOption] | None = None,
        fallback: Fallback | None = None,
        store: str | Store | Mapping[str, Any] | None = None,
    ) -> None:
        network: dict[str, Any] = {
            "verify": verify,
            "cert": cert,
            "trust_env": trust_env,
            "http1": http1,
            "http2": http2,
            "limits": limits,
            "proxy": proxy,
            "uds": uds,
            "local_address": local_address,
            "retries": retries,
            "socket_options": socket_options,
        }
        if inner is not None:
            refuse_beside_inner(network)
        if on_event is not None and not callable(on_event):
            raise ConfigurationError("on_event", on_event, "must be callable with an event")
        if tracer_provider is not None:
            if not TRACING_AVAILABLE:
                raise ConfigurationError("tracer_provider", tracer_provider, "needs opentelemetry-api (the otel extra)")
            if not callable(getattr(tracer_provider, "get_tracer", None)):
                raise ConfigurationError("tracer_provider", tracer_provider, "must be an OpenTelemetry TracerProvider")
        self._tracing = Tracing(tracer_provider, name) if TRACING_AVAILABLE else None
        self._events = Events(name, on_event, self._tracing)
        self._table = PolicyTable(policies, default)
        self._fallback = check_fallback(fallback)
        self._probe = probe(self._tracing, self._fallback)  # see handle_async_request
        self._source: str | PathLike[str] | None = None  # the policy file, for reload()
        self._inner = default_inner(**network) if inner is None else inner
        self._clock: Clock = SystemClock() if clock is None else clock
        self._random = default_random() if random is None else random
        self._hosts: HostTable[Host] = HostTable(self._make_host, self._evict_host, max_hosts)
        # (host, port, scheme) as a URL holds them -> the host table's key; see handle_async_request.
        self._aliases: dict[tuple[str, int | None, str], tuple[str, int]] = {}
        self._watchdog = Watchdog()  # every attempt's timer, whatever its host
        self._shared: dict[str, Any] = {}  # state layers keep across hosts (the stale cache's store, the fleet)
        self._fleet = self._open_fleet(store, registry)
        # Last, once nothing else can refuse the arguments: the name is taken until closed.
        self._metrics = TransportMetrics(registry, name, buckets)
        self._abandoned = weakref.finalize(self, abandon, self._metrics)  # dropped unclosed: released later
        self._abandoned.atexit = False

    def _open_fleet(
        self, store: str | Store | Mapping[str, Any] | None, registry: CollectorRegistry | None
    ) -> Fleet | None:
        if store is None or store == "memory://":
            return None
        if isinstance(store, Mapping):
            opened = open_store_table(store, registry=registry, clock=self._clock)
        else:
            opened = open_store(store, registry=registry, clock=self._clock)
        fleet = self._shared[FLEET] = Fleet(opened, clock=self._clock, owned=opened is not store)
        return fleet

    @classmethod
    def from_file(cls, path: str | PathLike[str], **kwargs: Any) -> ResilientTransport:
        """A transport whose ``policies``, ``default`` and ``store`` (a ``[store]`` table) come from a TOML file."""
        from ._toml import load_policies, load_store

        policies, default = load_policies(path)
        if kwargs.get("store") is None:
            kwargs["store"] = load_store(path)
        transport = cls(policies, default=default, **kwargs)
        transport._source = path
        return transport

    def update_policies(self, policies: Mapping[str, Policy] | None = None, *, default: Policy | None = None) -> None:
        """Replace every policy, as if the transport had been built with these; see the class docstring.

        Raises :class:`ConfigurationError`, changing nothing, when they are
        invalid. Call it from the event loop's thread.
        """
        table = PolicyTable(policies, default)
        resolved = [(host, table.resolve(host.host, host.port)) for host in self._hosts.values()]
        # From here on nothing can fail, and nothing awaits: no call sees half of the change.
        self._table = table
        for host, policy in resolved:
            update(host, policy)
        store = self._shared.get("stale_cache")
        if store is not None:  # answers of hosts no longer in the table, whose new policy keeps none
            live = {host.label for host, _ in resolved}
            for label in list(store.shelves):
                if label not in live and table.resolve(*_address(label)).stale_cache is None:
                    store.forget(label)

    def reload(self) -> None:
        """Read the policy file again and take its policies (see :meth:`update_policies`).

        A file that cannot be read or is invalid raises
        :class:`ConfigurationError` naming the file and line, and changes
        nothing. The file is read synchronously (it is small), so that
        ``loop.add_signal_handler(signal.SIGHUP, transport.reload)`` works.
        """
        if self._source is None:
            raise ConfigurationError(
                "reload", None, "this transport was not made from a policy file (use update_policies)"
            )
        from ._toml import load_policies

        policies, default = load_policies(self._source)
        self.update_policies(policies, default=default)

    def _make_host(self, host: str, port: int) -> Host:
        state = Host(
            host=host,
            port=port,
            policy=self._table.resolve(host, port),
            clock=self._clock,
            rng=self._random,
            metrics=self._metrics.host(host, port),
            inner=self._inner,
            shared=self._shared,
            events=self._events,
            tracing=self._tracing,
            watchdog=self._watchdog,
        )
        state.head = head_for(state, state.policy)
        state.direct = is_direct(state.policy)
        return state

    @staticmethod
    def _evict_host(host: Host) -> None:
        host.metrics.remove()

    def policy_for(self, host: str, port: int = 443) -> Policy:
        """The policy that calls to ``host:port`` get (``host`` spelt any way httpx accepts)."""
        return self._table.resolve(canonical_host(host), port)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        hosts = self._hosts
        # The host's key: from the URL's parts as httpx parsed them, through the
        # names already seen (canonicalising a name costs more than the lookup).
        try:
            parts = request.url._uri_reference
            key = self._aliases[parts.host, parts.port, parts.scheme]
        except (AttributeError, KeyError):
            key = self._key(request.url)
        # HostTable.enter and .leave, inlined for a host already in the table (the usual case).
        entries = hosts.entries
        host = entries.get(key)
        if host is None:
            host = hosts.enter(*key)
        else:
            entries.move_to_end(key)
            host.calls += 1
        try:
            override = request.extensions.get("resilient_http")
            untraced = self._probe._TRACER_PROVIDER is None or (
                self._fallback is None and self._tracing is not None and self._tracing.tracer() is None
            )
            if host.direct and override is None and untraced:
                return await self._direct(request, host)
            if override is None:
                call = Call(request, host, host.policy, self._clock.now())
                handle, chain, whole = host.head
            else:
                policy, priority = _override(host.policy, override)
                call = Call(request, host, policy, self._clock.now(), priority)
                handle, chain, whole = head_for(host, policy)
            if untraced:
                try:
                    response = await handle(call, chain)  # the outermost layer, and the chain inside it
                except BaseException as exc:
                    self._ended(call, exc)
                    raise
                if call.noted:  # a stale answer, say
                    outcome = "stale" if call.stale else outcome_of_status(response.status_code)
                    host.metrics.request(outcome, self._clock.now() - call.started, call.stale_reason)
                    info = call.info()
                else:
                    host.metrics.answered(response.status_code, self._clock.now() - call.started)
                    info = (
                        host.infos.get(call.circuit_state) or call.info()
                        if call.attempts == 1 and not call.waits
                        else call.info()
                    )
            else:
                response = await self._call_with_extras(call, whole)
                info = call.info()
            if not isinstance(response.stream, IN_MEMORY):
                guard_body(call, response)
            response.extensions["resilient_http"] = info
            return response
        finally:
            host.calls -= 1
            if hosts.crowded and not host.calls:
                hosts.shrink()

    async def _direct(self, request: httpx.Request, host: Host) -> httpx.Response:
        """A call on a host whose policy turns every layer off: one try, counted as the call and as its try.

        What ``attempt`` does without a timer, without making the call's
        record unless it fails. Nothing runs between the call's start and
        its try's, so one duration is both.
        """
        clock = self._clock
        started = clock.now()
        try:
            response = await host.inner.handle_async_request(request)
            if not isinstance(response.stream, IN_MEMORY):
                await first_bytes(response)
        except BaseException as exc:
            call = Call(request, host, host.policy, started)
            call.attempts = 1
            self._ended(call, exc)  # counted before anything is awaited
            await try_failed(host, exc, clock.now() - started)
            raise
        seconds = clock.now() - started
        status = response.status_code
        metrics = host.metrics
        metrics.tried(status, seconds)
        metrics.answered(status, seconds)
        response.request = request
        info = host.infos.get(None)
        if info is None:
            info = host.infos[None] = CallInfo(host.label, 1)
        response.extensions["resilient_http"] = info
        return response

    def _key(self, url: httpx.URL) -> tuple[str, int]:
        """The host table's key for ``url``'s host (canonical name, port), remembered under the URL's own parts."""
        key = (host_of(url.raw_host), url.port or DEFAULT_PORTS.get(url.scheme, 0))
        try:
            parts = url._uri_reference
            alias = (parts.host, parts.port, parts.scheme)
        except AttributeError:  # an httpx whose URL keeps its parts otherwise: every call canonicalises
            return key
        aliases = self._aliases
        if len(aliases) >= 4 * self._hosts.max_hosts:  # bounded like the table: start again
            aliases.clear()
        aliases[alias] = key
        return key

    async def _call_with_extras(self, call: Call, chain: Next) -> httpx.Response:
        """A call that is traced, or may get a fallback answer: the chain inside those, and the outcome counted."""
        tracing = self._tracing
        fallback = self._fallback
        replaced = None  # the outcome a fallback answer replaced: a shed call stays shed
        try:
            try:
                if tracing is None or (tracer := tracing.tracer()) is None:
                    response = await chain(call)
                else:
                    response = await tracing.run(tracer, call, chain)
            except httpx.HTTPError as exc:
                if fallback is None:
                    raise
                exc.resilient_http = call.info()  # type: ignore[attr-defined]
                replaced = outcome_of_exception(exc)
                response = await fall_back(fallback, call, exc)
            else:
                if fallback is not None and failed(response):
                    response = await fall_back(fallback, call, response)
        except BaseException as exc:
            self._ended(call, exc)
            raise
        if call.fallback:
            outcome = "fallback"
        else:
            outcome = "stale" if call.stale else outcome_of_status(response.status_code)
        call.host.metrics.request(outcome, self._clock.now() - call.started, call.stale_reason or replaced)
        return response

    def _ended(self, call: Call, exc: BaseException) -> None:
        """Count a call that ended in ``exc``, and leave its story on the exception."""
        call.host.metrics.request(outcome_of_exception(exc), self._clock.now() - call.started, call.stale_reason)
        if isinstance(exc, Exception):
            exc.resilient_http = call.info()  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        try:
            if self._fleet is not None:
                await self._fleet.aclose()
        finally:
            try:
                await self._inner.aclose()
            finally:
                self._close_metrics()

    async def __aenter__(self) -> ResilientTransport:
        await self._inner.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        try:
            if self._fleet is not None:
                await self._fleet.aclose()
        finally:
            try:
                await self._inner.__aexit__(exc_type, exc_value, traceback)
            finally:
                self._close_metrics()

    def _close_metrics(self) -> None:
        """Take this transport's series off the registry and free its name."""
        self._abandoned.detach()
        self._metrics.close()


def _address(label: str) -> tuple[str, int]:
    """``(host, port)`` of a host's label: ``api.example.com:443``, ``[::1]:8080``."""
    host, _, port = label.rpartition(":")
    return host.strip("[]"), int(port)


def call_info(outcome: httpx.Response | BaseException) -> CallInfo | None:
    """What happened to a call, from its response or from the exception it raised.

    ``None`` for a response or an exception that did not come through a
    :class:`ResilientTransport`.
    """
    if isinstance(outcome, httpx.Response):
        found = outcome.extensions.get("resilient_http")
    else:
        found = getattr(outcome, "resilient_http", None)
    return found if isinstance(found, CallInfo) else None
