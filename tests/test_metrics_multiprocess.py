"""Several worker processes (gunicorn, uvicorn workers) and prometheus-client's multiprocess mode."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from conftest import where
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

WORKER = textwrap.dedent(
    """
    import asyncio, os, sys
    import httpx
    from resilient_http import CircuitBreakerPolicy, Policy, RateLimitPolicy, ResilientTransport, RetryPolicy

    def handler(request):
        return httpx.Response(503 if request.url.path == "/down" else 200)

    async def main(calls):
        policy = Policy(
            retry=RetryPolicy(attempts=2, backoff=0.001, budget=None),
            circuit_breaker=CircuitBreakerPolicy(minimum_calls=1, failure_ratio=1.0),
            rate_limit=RateLimitPolicy(rate=1000, burst=100),
        )
        transport = ResilientTransport(default=policy, inner=httpx.MockTransport(handler))
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(calls):
                await client.get("http://api.example/ok")
            await client.get("http://down.example/down")  # opens that host's breaker
            print(os.getpid(), flush=True)
            await asyncio.to_thread(sys.stdin.read)  # open until the test has looked

    asyncio.run(main(int(sys.argv[1])))
    """
)


def start_worker(directory: Path, calls: int) -> tuple[subprocess.Popen[str], int]:
    """Start one worker; once it has made its calls, it and its process id (it waits for its stdin to close)."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(calls)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert worker.stdout is not None
    return worker, int(worker.stdout.readline())


def stop_worker(worker: subprocess.Popen[str]) -> None:
    """Let a worker close its transport and exit."""
    assert worker.stdin is not None and worker.stdout is not None
    worker.stdin.close()
    worker.stdout.close()
    assert worker.wait(timeout=60) == 0


def test_worker_processes_add_up_in_multiprocess_mode(tmp_path: Path) -> None:
    """Counters and histograms from every worker sum up, a breaker open in any shows as open, closing resets gauges."""
    workers = [start_worker(tmp_path, 3), start_worker(tmp_path, 4)]
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]

    def value(name: str, host: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"transport": "default", **where(host), **labels})

    try:
        assert value("resilient_http_requests_total", host="api.example:80", outcome="2xx") == 7
        assert value("resilient_http_attempts_total", host="down.example:80", outcome="5xx") == 4
        assert value("resilient_http_retries_total", host="down.example:80", reason="status_503") == 2
        assert value("resilient_http_request_duration_seconds_count", host="api.example:80") == 7
        assert value("resilient_http_rate_limit_wait_seconds_bucket", host="api.example:80", le="0.005") == 7
        assert value("resilient_http_circuit_opened_total", host="down.example:80") == 2
        assert value("resilient_http_circuit_state", host="down.example:80", state="open") == 1  # livemax
        assert value("resilient_http_bulkhead_in_flight", host="api.example:80") == 0  # livesum
    finally:
        for worker, _ in workers:
            stop_worker(worker)
    # A closed transport cannot take its series out of the files: its gauges read 0, its counters stay.
    assert value("resilient_http_circuit_state", host="down.example:80", state="open") == 0
    assert value("resilient_http_requests_total", host="api.example:80", outcome="2xx") == 7
    # What gunicorn's child_exit hook must do: the dead workers' gauges go, their counters stay.
    for _, pid in workers:
        mark_process_dead(pid, str(tmp_path))  # type: ignore[no-untyped-call]
    assert value("resilient_http_circuit_state", host="down.example:80", state="open") is None
    assert value("resilient_http_requests_total", host="api.example:80", outcome="2xx") == 7


EVICTING_WORKER = textwrap.dedent(
    """
    import asyncio, sys
    import httpx
    from resilient_http import ResilientTransport

    async def main():
        transport = ResilientTransport(inner=httpx.MockTransport(lambda r: httpx.Response(200)), max_hosts=1)
        async with httpx.AsyncClient(transport=transport) as client:
            await client.get("http://a.example/")
            await client.get("http://b.example/")  # evicts a.example
            await asyncio.to_thread(sys.stdin.read)  # open until the test has looked

    asyncio.run(main())
    """
)


def test_an_evicted_host_leaves_no_live_gauge_in_multiprocess_mode(tmp_path: Path) -> None:
    """Series cannot be removed from the files: an evicted host's gauges read 0, its counters stay, and no warning."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    command = [sys.executable, "-W", "error", "-c", EVICTING_WORKER]
    worker = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, text=True)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]
    state = "resilient_http_circuit_state"
    a, b = {"transport": "default", **where("a.example:80")}, {"transport": "default", **where("b.example:80")}
    try:
        for _ in range(600):  # until the worker has made its calls
            if registry.get_sample_value(state, {**b, "state": "closed"}) == 1:
                break
            time.sleep(0.05)
        assert registry.get_sample_value(state, {**a, "state": "closed"}) == 0
        assert registry.get_sample_value(state, {**b, "state": "closed"}) == 1
        assert registry.get_sample_value("resilient_http_requests_total", {**a, "outcome": "2xx"}) == 1
    finally:
        assert worker.stdin is not None
        worker.stdin.close()
        assert worker.wait(timeout=60) == 0


IN_FLIGHT_WORKER = textwrap.dedent(
    """
    import asyncio
    import httpx
    from resilient_http import BulkheadPolicy, Policy, ResilientTransport

    async def main():
        release = asyncio.Event()

        async def handler(request):
            if request.url.host == "a.example":
                await release.wait()
            return httpx.Response(200)

        policy = Policy(bulkhead=BulkheadPolicy(max_concurrent=1, max_queue=5), retry=None, circuit_breaker=None)

        def make(name):
            inner = httpx.MockTransport(handler)
            return ResilientTransport(default=policy, inner=inner, max_hosts=1, name=name)

        closing, evicting = make("closing"), make("evicting")
        calls = []
        for transport in (closing, evicting):
            for _ in range(2):  # one in flight, one queued
                call = transport.handle_async_request(httpx.Request("GET", "http://a.example/"))
                calls.append(asyncio.ensure_future(call))
        await asyncio.sleep(0.05)
        await closing.aclose()  # its gauges read 0 while its calls are still in flight
        await evicting.handle_async_request(httpx.Request("GET", "http://b.example/"))  # may evict a.example
        release.set()
        await asyncio.gather(*calls)
        await evicting.aclose()

    asyncio.run(main())
    """
)


def test_gauges_never_go_negative_when_calls_end_after_their_host_left(tmp_path: Path) -> None:
    """A call in flight or queued when its transport closes (or its host is evicted) cannot push a gauge below 0."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-W", "error", "-c", IN_FLIGHT_WORKER], env=env, check=True, timeout=60)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]
    gauges = [
        (sample.labels["transport"], sample.labels["server_address"], sample.name, sample.value)
        for family in registry.collect()
        for sample in family.samples
        if family.type == "gauge"
    ]
    assert ("closing", "a.example", "resilient_http_bulkhead_in_flight", 0.0) in gauges
    assert [gauge for gauge in gauges if gauge[3] < 0] == []


HOLDING_WORKER = textwrap.dedent(
    """
    import asyncio, sys
    import httpx
    from resilient_http import BulkheadPolicy, Policy, ResilientTransport

    async def main():
        entered, release = asyncio.Event(), asyncio.Event()

        async def handler(request):
            entered.set()
            await release.wait()
            return httpx.Response(200)

        policy = Policy(bulkhead=BulkheadPolicy(max_concurrent=2), retry=None, circuit_breaker=None)
        transport = ResilientTransport(default=policy, inner=httpx.MockTransport(handler))
        async with httpx.AsyncClient(transport=transport) as client:
            call = asyncio.ensure_future(client.get("http://api.example/"))
            await entered.wait()
            print("in flight", flush=True)
            await asyncio.to_thread(sys.stdin.readline)
            release.set()
            await call
            print("done", flush=True)
            await asyncio.to_thread(sys.stdin.read)  # open until the test has looked

    asyncio.run(main())
    """
)


def test_an_attempt_holding_a_free_slot_shows_in_flight_in_multiprocess_mode(tmp_path: Path) -> None:
    """bulkhead_in_flight, written to the worker's file, reads 1 while an attempt holds a slot and 0 once it is back."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    worker = subprocess.Popen(
        [sys.executable, "-W", "error", "-c", HOLDING_WORKER],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert worker.stdin is not None and worker.stdout is not None
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]
    labels = {"transport": "default", **where("api.example:80")}
    try:
        assert worker.stdout.readline() == "in flight\n"
        assert registry.get_sample_value("resilient_http_bulkhead_in_flight", labels) == 1
        worker.stdin.write("\n")
        worker.stdin.flush()
        assert worker.stdout.readline() == "done\n"
        assert registry.get_sample_value("resilient_http_bulkhead_in_flight", labels) == 0
    finally:
        worker.stdin.close()
        worker.stdout.close()
        assert worker.wait(timeout=60) == 0
