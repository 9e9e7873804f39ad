"""OpenTelemetry traces: a span per call, a span per attempt, span events, and trace context on the wire.

Spans are read back from the SDK's in-memory exporter, through a
``TracerProvider`` given to the transport (the global provider can be set
only once per process: the tests that need it run in a subprocess).
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from conftest import BASE_URL, HOST, Script, only
from flaky_server import FlakyServer, respond
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry

from resilient_http import (
    CircuitBreakerPolicy,
    CircuitOpenError,
    HedgePolicy,
    Policy,
    ResilientTransport,
    RetryPolicy,
    StaleCachePolicy,
    TimeoutPolicy,
)
from resilient_http.testing import FakeClock, Handler

BREAKER = CircuitBreakerPolicy(minimum_calls=1, failure_ratio=0.5, break_duration=5.0)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


@asynccontextmanager
async def client(
    handler: Handler, policy: Policy, provider: TracerProvider | None, clock: FakeClock | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    transport = ResilientTransport(
        default=policy,
        inner=httpx.MockTransport(handler),
        registry=CollectorRegistry(),
        clock=FakeClock() if clock is None else clock,
        random=random.Random(0),
        name="traced",
        tracer_provider=provider,
    )
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
        yield http


def calls(spans: Sequence[ReadableSpan]) -> list[ReadableSpan]:
    """The call spans: the only ones that name their transport."""
    return [span for span in spans if "resilient_http.transport" in (span.attributes or {})]


def children(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [span for span in spans if span.parent is not None and span.parent.span_id == parent.context.span_id]


def events(span: ReadableSpan) -> list[tuple[str, dict[str, Any]]]:
    return [(event.name, dict(event.attributes or {})) for event in span.events]


def traceparent(span: ReadableSpan) -> str:
    context = span.context
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


async def test_a_retried_call_is_one_span_with_a_client_span_per_attempt(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """One INTERNAL call span; under it a CLIENT span per attempt, resend_count from the second; the retry an event."""
    script = Script(503, 200)
    async with client(script, only(retry=RetryPolicy()), provider) as http:
        response = await http.get("/items")
    spans = exporter.get_finished_spans()
    (call,) = calls(spans)
    assert call.name == "resilient_http GET"
    assert call.attributes is not None
    assert call.attributes["resilient_http.transport"] == "traced"
    assert call.attributes["resilient_http.host"] == HOST
    assert (call.attributes["http.response.status_code"], call.attributes["resilient_http.attempts"]) == (200, 2)
    assert call.status.status_code == StatusCode.UNSET
    first, second = children(spans, call)
    assert (first.kind, second.kind, first.name) == (SpanKind.CLIENT, SpanKind.CLIENT, "GET")
    assert first.attributes is not None and second.attributes is not None
    assert "http.request.resend_count" not in first.attributes
    assert second.attributes["http.request.resend_count"] == 1
    assert (first.attributes["http.response.status_code"], first.attributes["error.type"]) == (503, "503")
    assert first.status.status_code == StatusCode.ERROR
    assert first.attributes["url.full"] == "https://api.example.com/items"
    ((name, attributes),) = events(call)
    assert name == "resilient_http.retry_scheduled"
    assert (attributes["reason"], attributes["attempt"], attributes["wait"]) == ("status_503", 1, "backoff")
    # Each attempt carried its own span's context; the caller's request was not written to.
    assert [r.headers["traceparent"] for r in script.requests] == [traceparent(first), traceparent(second)]
    assert "traceparent" not in response.request.headers


async def test_the_call_span_is_a_child_of_the_callers_span(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """A call made inside the application's span is traced as its child, in its trace."""
    async with client(Script(200), only(), provider) as http:
        with provider.get_tracer("app").start_as_current_span("handler") as outer:
            await http.get("/")
    (call,) = calls(exporter.get_finished_spans())
    assert call.parent is not None
    assert (call.parent.span_id, call.context.trace_id) == (
        outer.get_span_context().span_id,
        outer.get_span_context().trace_id,
    )


async def test_a_breaker_rejection_is_an_error_with_an_event_and_no_attempt(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """A call refused by an open circuit: its span ends in error with the rejection as an event, and has no attempt."""
    async with client(Script(500), only(circuit_breaker=BREAKER), provider) as http:
        await http.get("/")
        exporter.clear()
        with pytest.raises(CircuitOpenError):
            await http.get("/")
    spans = exporter.get_finished_spans()
    (call,) = calls(spans)
    assert children(spans, call) == []
    assert call.status.status_code == StatusCode.ERROR
    assert call.attributes is not None and call.attributes["error.type"] == "CircuitOpenError"
    ((name, attributes),) = events(call)
    assert (name, attributes["layer"], attributes["reason"]) == (
        "resilient_http.call_rejected",
        "circuit_breaker",
        "open",
    )
    assert attributes["retry_after"] > 0


async def test_a_stale_answer_is_an_ok_call_with_an_event(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """A stale answer after a 503: the call span ends OK and says stale; its attempt span keeps the 503 error."""
    clock = FakeClock()
    async with client(Script(200, 503), only(stale_cache=StaleCachePolicy()), provider, clock) as http:
        await http.get("/")
        exporter.clear()
        clock.advance(3.0)
        await http.get("/")
    spans = exporter.get_finished_spans()
    (call,) = calls(spans)
    assert call.status.status_code == StatusCode.OK
    assert call.attributes is not None
    assert (call.attributes["resilient_http.stale"], call.attributes["resilient_http.stale_reason"]) == (
        True,
        "server_error",
    )
    assert events(call) == [("resilient_http.stale_served", {"reason": "server_error", "age": 3.0})]
    (attempt,) = children(spans, call)
    assert attempt.status.status_code == StatusCode.ERROR


async def test_a_cancelled_call_sets_no_error(provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    """A call cancelled by its caller ends its spans without an error status or error.type."""
    entered = anyio.Event()

    async def hang(request: httpx.Request) -> httpx.Response:
        entered.set()
        await anyio.sleep_forever()
        raise AssertionError

    async with client(hang, only(), provider) as http, anyio.create_task_group() as tg:
        tg.start_soon(http.get, "/")
        await entered.wait()
        tg.cancel_scope.cancel()
    spans = exporter.get_finished_spans()
    (call,) = calls(spans)
    (attempt,) = children(spans, call)
    for span in (call, attempt):
        assert span.status.status_code == StatusCode.UNSET
        assert span.attributes is not None and "error.type" not in span.attributes


async def test_a_trace_context_that_cannot_be_sent_leaves_no_timer_behind(
    provider: TracerProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure writing the trace context fails the call; no attempt timer is left to cancel the caller later."""
    from resilient_http._tracing import Tracing

    def broken(request: httpx.Request, derived: bool) -> httpx.Request:
        raise RuntimeError("propagator failed")

    monkeypatch.setattr(Tracing, "carry", staticmethod(broken))
    policy = only(timeout=TimeoutPolicy(attempt=0.05))
    async with client(lambda request: httpx.Response(200), policy, provider) as http:
        with pytest.raises(RuntimeError, match="propagator failed"):
            await http.get("/")
        try:
            await asyncio.sleep(0.2)  # past the attempt's deadline: a timer left running would cancel this sleep
        except asyncio.CancelledError:
            pytest.fail("the failed attempt's timer cancelled its caller afterwards")


async def test_spans_hold_no_query_string_or_credential(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """url.full drops the query and the user info; no attribute or event of any span holds them or a header."""
    async with client(Script(503, 200), only(retry=RetryPolicy()), provider) as http:
        await http.get(
            "https://user:s3cr3t-password@api.example.com/a?key=s3cr3t-query",
            headers={"Authorization": "Bearer s3cr3t-token"},
        )
    spans = exporter.get_finished_spans()
    assert len(spans) == 3
    for span in spans:
        text = repr(dict(span.attributes or {})) + repr(events(span))
        for secret in ("s3cr3t-password", "s3cr3t-query", "s3cr3t-token", "?"):
            assert secret not in text


async def test_without_a_provider_nothing_is_traced_or_propagated(exporter: InMemorySpanExporter) -> None:
    """With no provider given and none set globally, no span is made and no traceparent is sent."""
    script = Script(200)
    async with client(script, only(), None) as http:
        await http.get("/")
    assert "traceparent" not in script.requests[0].headers
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)


def run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_without_opentelemetry_nothing_is_imported_and_a_provider_is_refused() -> None:
    """With OpenTelemetry not importable, calls work, no opentelemetry module is loaded, tracer_provider is refused."""
    out = run(
        """
        import sys
        sys.modules["opentelemetry"] = None  # as if the otel extra were not installed
        import asyncio, httpx
        from prometheus_client import CollectorRegistry
        from resilient_http import ConfigurationError, ResilientTransport

        async def main():
            inner = httpx.MockTransport(lambda request: httpx.Response(200))
            transport = ResilientTransport(inner=inner, registry=CollectorRegistry())
            async with httpx.AsyncClient(transport=transport) as http:
                assert (await http.get("https://a.example/")).status_code == 200
            try:
                ResilientTransport(tracer_provider=object(), registry=CollectorRegistry())
            except ConfigurationError as exc:
                print("refused:", exc)

        asyncio.run(main())
        print(sorted(name for name in sys.modules if name.startswith("opentelemetry.")))
        """
    )
    assert out.splitlines()[-1] == "[]"
    assert "tracer_provider" in out and "otel extra" in out


def test_the_global_provider_is_used_without_code_change() -> None:
    """A transport made before the application sets its global provider traces to it once it is set."""
    out = run(
        """
        import asyncio, httpx
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from prometheus_client import CollectorRegistry
        from resilient_http import ResilientTransport

        async def main():
            inner = httpx.MockTransport(lambda request: httpx.Response(200))
            transport = ResilientTransport(inner=inner, registry=CollectorRegistry())
            async with httpx.AsyncClient(transport=transport) as http:
                await http.get("https://a.example/")
                exporter = InMemorySpanExporter()
                provider = TracerProvider()
                provider.add_span_processor(SimpleSpanProcessor(exporter))
                trace.set_tracer_provider(provider)
                await http.get("https://a.example/")
            print(sorted(span.name for span in exporter.get_finished_spans()))

        asyncio.run(main())
        """
    )
    assert out == "['GET', 'resilient_http GET']"


def instrumentor() -> Any:
    """opentelemetry-instrumentation-httpx's instrumentor for the flavour under test (skip when it has none)."""
    if httpx.__name__ == "httpx2":
        try:
            from opentelemetry.instrumentation.httpx import HTTPX2ClientInstrumentor
        except ImportError:
            pytest.skip("this opentelemetry-instrumentation-httpx has no HTTPX2ClientInstrumentor")
        return HTTPX2ClientInstrumentor()
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    return HTTPXClientInstrumentor()


async def test_with_httpx_instrumentation_each_attempt_has_one_client_span_under_the_call(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """With the httpx instrumentation on, each attempt is our INTERNAL span with its CLIENT span inside: one CLIENT span
    per request sent, all under the call's span, and the server sees the CLIENT span's trace context."""
    instrumentation = instrumentor()
    instrumentation.instrument(tracer_provider=provider, skip_dep_check=True)
    try:
        async with FlakyServer() as server:
            server.queue("/a", respond(503), respond(200))
            transport = ResilientTransport(
                default=only(retry=RetryPolicy(backoff=0.001, max_backoff=0.001)),
                registry=CollectorRegistry(),
                clock=FakeClock(),
                tracer_provider=provider,
            )
            async with httpx.AsyncClient(transport=transport) as http:
                assert (await http.get(server.url("/a"))).status_code == 200
            sent = [request.headers["traceparent"] for request in server.requests_to("/a")]
    finally:
        instrumentation.uninstrument()
    spans = exporter.get_finished_spans()
    (call,) = calls(spans)
    attempts = children(spans, call)
    assert [(span.name, span.kind) for span in attempts] == [("resilient_http attempt", SpanKind.INTERNAL)] * 2
    client_spans = [span for span in spans if span.kind == SpanKind.CLIENT]
    assert len(client_spans) == 2
    for attempt, client_span in zip(attempts, client_spans, strict=True):
        assert children(spans, attempt) == [client_span]
    assert attempts[1].attributes is not None and attempts[1].attributes["http.request.resend_count"] == 1
    assert sent == [traceparent(span) for span in client_spans]


async def test_a_hedge_that_won_is_on_the_call_span(provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    """The first copy hangs, its hedge answers: the span says one hedge, won, with both events and two attempts."""
    requests = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal requests
        requests += 1
        if requests == 1:
            await anyio.sleep_forever()
        return httpx.Response(200)

    transport = ResilientTransport(
        default=only(hedge=HedgePolicy(delay=0.001, budget=1.0)),
        inner=httpx.MockTransport(handler),
        registry=CollectorRegistry(),
        tracer_provider=provider,
    )
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
        await http.get("/")
    (call,) = calls(exporter.get_finished_spans())
    assert call.attributes is not None
    assert (call.attributes["resilient_http.hedges"], call.attributes["resilient_http.hedge_won"]) == (1, True)
    assert [name for name, _ in events(call)] == ["resilient_http.hedged", "resilient_http.hedge_won"]
