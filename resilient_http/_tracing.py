"""OpenTelemetry traces of the calls, when ``opentelemetry-api`` is installed (the ``otel`` extra).

Nothing here imports OpenTelemetry unless it is installed, and then only
the API. Spans go to the ``tracer_provider`` given to ``ResilientTransport``
or, without one, to the global provider once the application sets one
(``trace.set_tracer_provider``): until then no span is started and a call
pays one look at the global provider.

**Spans.** One span per logical call, ``resilient_http {METHOD}``, kind
``INTERNAL``: it covers the whole call (rate-limit and bulkhead waits,
backoffs, every attempt) and is the current span while the layers run. It
is not a ``CLIENT`` span because it is no HTTP request on the wire: the
HTTP semantic conventions want one ``CLIENT`` span per request *sent*, and
a ``CLIENT`` span for the call as well would count every request twice in
span-derived metrics and service graphs. Under it, one span per attempt:

- a ``CLIENT`` span ``{METHOD}`` with the HTTP client attributes
  (``http.request.method``, ``server.address``, ``server.port``,
  ``url.full`` without its query string or user info,
  ``http.response.status_code``, ``error.type``), and
  ``http.request.resend_count`` on every attempt after the first;
- or, when ``opentelemetry-instrumentation-httpx`` instruments the inner
  transport (``HTTPXClientInstrumentor().instrument()``, or the
  ``HTTPX2ClientInstrumentor`` for httpx2), an ``INTERNAL`` span
  ``resilient_http attempt`` with the same resend count, and the
  instrumentation's own ``CLIENT`` span inside it: still exactly one
  ``CLIENT`` span per request sent. (``instrument_client()`` on a client
  over ``ResilientTransport`` wraps the whole call, not the attempts: use
  ``instrument()``.)

**Trace context** of the attempt's span is injected (the global
propagator, W3C ``traceparent`` by default) into a copy of the request
each attempt sends: the caller's request is never written to. An
instrumented inner transport injects its own ``CLIENT`` span's over it.

**Span events.** Every event of :mod:`._events` about a call is added to
the call's span (``resilient_http.retry_scheduled``, ``.call_rejected``,
``.waited``, ``.stale_served``, ``.budget_refused``, ...), with the event's
fields as attributes.

**End and status.** The spans end when the transport returns the response
headers, as ``requests_total`` counts a call: a body that fails later is
not a second outcome (its idle timeout is still logged and hooked). A
status of 400 or more, or an exception, sets the ``ERROR`` status and
``error.type`` (the status code, or the exception's class name); a
cancelled call or attempt sets no error (the semantic conventions: a
request cancelled on purpose is not a failure). A stale answer is the
call's answer: the call span ends ``OK`` with ``resilient_http.stale``.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import httpx

from ._events import Event

if TYPE_CHECKING:
    from ._call import Call, Next

#: An attempt without its span: ``send(call, traced)``, ``traced`` when trace context must be injected.
Send = Callable[["Call", bool], Awaitable[httpx.Response]]

try:
    from opentelemetry import context as _context
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace
except ImportError:  # the otel extra is not installed: tracing is off, and costs nothing
    _trace = None  # type: ignore[assignment]

#: Whether OpenTelemetry's API can be imported.
AVAILABLE = _trace is not None

# Whether no global provider is set is read from the API's module global: the
# public get_tracer_provider() reads os.environ on every call (2 us, a call's
# budget for all its tracing). A provider named by OTEL_PYTHON_TRACER_PROVIDER
# is loaded by get_tracer_provider(), so with that variable the public call is kept.
_UNKNOWN = object()
_UNSET = AVAILABLE and "OTEL_PYTHON_TRACER_PROVIDER" not in os.environ


class _Unknown:
    _TRACER_PROVIDER: object = _UNKNOWN


class _Untraced:
    _TRACER_PROVIDER = None


def probe(tracing: Tracing | None, fallback: object) -> Any:
    """What a transport reads on every call to know, without a call, that it need not trace.

    Its ``_TRACER_PROVIDER`` is ``None`` only while the call needs neither
    a span nor a fallback: no fallback and no tracing at all, or no provider
    of the transport's own and none set globally yet (OpenTelemetry's own
    module global). Otherwise :meth:`Tracing.tracer` decides.
    """
    if fallback is not None:
        return _Unknown
    if tracing is None:
        return _Untraced
    if tracing.given or not _UNSET or not hasattr(_trace, "_TRACER_PROVIDER"):
        return _Unknown
    return _trace


_METHODS = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE", "QUERY"})
_SCOPE = "resilient_http"


def _version() -> str:
    from . import __version__

    return __version__


def _instrumented(inner: object) -> bool:
    """Whether opentelemetry-instrumentation-httpx wraps ``inner.handle_async_request`` (wrapt sets ``__wrapped__``)."""
    return hasattr(getattr(inner, "handle_async_request", None), "__wrapped__")


def _url(url: httpx.URL) -> str:
    """``url`` without user info, query string or fragment: spans never carry credentials or query strings."""
    port = f":{url.port}" if url.port is not None else ""
    host = url.host if ":" not in url.host else f"[{url.host}]"
    return f"{url.scheme}://{host}{port}{url.path}"


def _method(request: httpx.Request, attributes: dict[str, Any]) -> str:
    method = request.method
    if method in _METHODS:
        attributes["http.request.method"] = method
        return method
    attributes["http.request.method"] = "_OTHER"
    attributes["http.request.method_original"] = method
    return "HTTP"


def _finish(span: Any, response: httpx.Response | None, error: BaseException | None) -> None:
    """Set the outcome on ``span``: ERROR for a status of 400 or more and for exceptions, nothing when cancelled."""
    if not span.is_recording():
        return
    if response is not None:
        status = response.status_code
        span.set_attribute("http.response.status_code", status)
        if status >= 400:
            span.set_attribute("error.type", str(status))
            span.set_status(_trace.StatusCode.ERROR)
    elif isinstance(error, Exception):
        span.set_attribute("error.type", type(error).__qualname__)
        span.set_status(_trace.StatusCode.ERROR, str(error))


def _end_call(call: Call, span: Any, response: httpx.Response | None, error: BaseException | None) -> None:
    """Record how the call ended on its span, and end it."""
    if span.is_recording():
        span.set_attribute("resilient_http.attempts", call.attempts)
        if call.retry_stop is not None:
            span.set_attribute("resilient_http.retry_stop", call.retry_stop)
        if call.coalesced:
            span.set_attribute("resilient_http.coalesced", True)
        if call.hedges:
            span.set_attribute("resilient_http.hedges", call.hedges)
            span.set_attribute("resilient_http.hedge_won", call.hedge_won)
        if call.stale and response is not None:
            span.set_attribute("resilient_http.stale", True)
            if call.stale_reason is not None:
                span.set_attribute("resilient_http.stale_reason", call.stale_reason)
            span.set_attribute("http.response.status_code", response.status_code)
            span.set_status(_trace.StatusCode.OK)
        else:
            _finish(span, response, error)
    span.end()


class Tracing:
    """One transport's tracer: the spans of its calls and attempts, and the span sink of its events."""

    __slots__ = ("_provider", "_seen", "_tracer", "given", "transport")

    def __init__(self, provider: Any, transport: str) -> None:
        self.transport = transport
        self._provider = provider
        self.given = provider is not None  # a provider of the transport's own, not the global one
        self._seen: Any = None  # the global provider the tracer was made from
        self._tracer: Any = None
        if provider is not None:
            self._tracer = provider.get_tracer(_SCOPE, _version())

    def tracer(self) -> Any:
        """The tracer to use now; ``None`` while no provider is given or set globally."""
        if self._provider is not None:
            return self._tracer
        if _UNSET and getattr(_trace, "_TRACER_PROVIDER", _UNKNOWN) is None:
            return None
        provider = _trace.get_tracer_provider()
        if provider is not self._seen:
            self._seen = provider
            proxy = isinstance(provider, _trace.ProxyTracerProvider)
            self._tracer = None if proxy else provider.get_tracer(_SCOPE, _version())
        return self._tracer

    async def run(self, tracer: Any, call: Call, chain: Next) -> httpx.Response:
        """Run the call's chain inside its span, current meanwhile; ``call.span`` holds it until it ends."""
        request = call.request
        host = call.host
        attributes: dict[str, Any] = {
            "server.address": host.host,
            "server.port": host.port,
            "url.scheme": request.url.scheme,
            "resilient_http.transport": self.transport,
            "resilient_http.host": host.label,
        }
        method = _method(request, attributes)
        span = tracer.start_span(f"resilient_http {method}", kind=_trace.SpanKind.INTERNAL, attributes=attributes)
        if not span.get_span_context().is_valid:  # a tracer that makes no spans
            return await chain(call)
        token = _context.attach(_trace.set_span_in_context(span))
        call.span = span
        try:
            response = await chain(call)
        except BaseException as exc:
            _end_call(call, span, None, exc)
            raise
        finally:
            call.span = None  # later events (a streamed body's) find no span to write to
            _context.detach(token)
        _end_call(call, span, response, None)
        return response

    async def attempt(self, call: Call, send: Send) -> httpx.Response:
        """Run one attempt inside its span (see the module docstring for its kind), current meanwhile."""
        tracer = self.tracer()
        if tracer is None:  # cannot happen once a call has a span; never ask ``send`` to start another
            return await send(call, True)
        request = call.request
        attributes: dict[str, Any] = {
            "server.address": call.host.host,
            "server.port": call.host.port,
            "url.full": _url(request.url),
        }
        method = _method(request, attributes)
        if call.attempts:  # the attempts made before this one
            attributes["http.request.resend_count"] = call.attempts
        if _instrumented(call.host.inner):
            name, kind = "resilient_http attempt", _trace.SpanKind.INTERNAL
        else:
            name, kind = method, _trace.SpanKind.CLIENT
        span = tracer.start_span(name, kind=kind, attributes=attributes)
        token = _context.attach(_trace.set_span_in_context(span))
        try:
            response = await send(call, True)
        except BaseException as exc:
            _finish(span, None, exc)
            raise
        else:
            _finish(span, response, None)
            return response
        finally:
            _context.detach(token)
            span.end()

    @staticmethod
    def carry(request: httpx.Request, derived: bool) -> httpx.Request:
        """``request`` with the current trace context in its headers: on a copy unless ``derived`` already is one."""
        if not derived:
            copy = object.__new__(type(request))
            copy.__dict__.update(request.__dict__)
            request = copy
        headers = request.headers.copy()
        _propagate.inject(headers)
        request.headers = headers
        return request

    @staticmethod
    def recording(call: Call | None) -> bool:
        """Whether an event about ``call`` (or, about no call in particular, now) has a recording span to go to."""
        span = _trace.get_current_span() if call is None else call.span
        return span is not None and bool(span.is_recording())

    @staticmethod
    def add(call: Call | None, event: Event) -> None:
        """Add ``event`` to the call's span (or, about no call in particular, to the current span)."""
        span = _trace.get_current_span() if call is None else call.span
        attributes = {
            name: value
            for name, value in event.fields().items()
            if value is not None and name != "transport" and name != "host"
        }
        span.add_event(f"resilient_http.{event.kind}", attributes=attributes)
