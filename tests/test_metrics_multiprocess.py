"""Several worker processes (gunicorn, uvicorn workers) and prometheus-client's multiprocess mode."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

WORKER = textwrap.dedent(
    """
    import asyncio, os, sys
    import httpx
    from resilient_http import CircuitBreakerPolicy, Policy, ResilientTransport, RetryPolicy

    def handler(request):
        return httpx.Response(503 if request.url.path == "/down" else 200)

    async def main(calls):
        policy = Policy(
            retry=RetryPolicy(attempts=2, backoff=0.001, budget=None),
            circuit_breaker=CircuitBreakerPolicy(minimum_calls=1, failure_ratio=1.0),
        )
        transport = ResilientTransport(default=policy, inner=httpx.MockTransport(handler))
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(calls):
                await client.get("http://api.example/ok")
            await client.get("http://down.example/down")  # opens that host's breaker

    asyncio.run(main(int(sys.argv[1])))
    print(os.getpid())
    """
)


def run_worker(directory: Path, calls: int) -> int:
    """Run one worker to its end; its process id."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    done = subprocess.run(
        [sys.executable, "-c", WORKER, str(calls)], env=env, check=True, timeout=60, capture_output=True, text=True
    )
    return int(done.stdout.split()[-1])


def test_worker_processes_add_up_in_multiprocess_mode(tmp_path: Path) -> None:
    """Counters from every worker sum up, and a breaker open in any worker shows as open."""
    pids = [run_worker(tmp_path, 3), run_worker(tmp_path, 4)]
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("resilient_http_requests_total", host="api.example:80", outcome="2xx") == 7
    assert value("resilient_http_attempts_total", host="down.example:80", outcome="5xx") == 4
    assert value("resilient_http_retries_total", host="down.example:80", reason="status_503") == 2
    assert value("resilient_http_request_duration_seconds_count", host="api.example:80") == 7
    assert value("resilient_http_circuit_opened_total", host="down.example:80") == 2
    assert value("resilient_http_circuit_state", host="down.example:80", state="open") == 1  # livemax
    assert value("resilient_http_bulkhead_in_flight", host="api.example:80") == 0  # livesum
    # What gunicorn's child_exit hook must do: the dead workers' gauges go, their counters stay.
    for pid in pids:
        mark_process_dead(pid, str(tmp_path))  # type: ignore[no-untyped-call]
    assert value("resilient_http_circuit_state", host="down.example:80", state="open") is None
    assert value("resilient_http_requests_total", host="api.example:80", outcome="2xx") == 7


EVICTING_WORKER = textwrap.dedent(
    """
    import asyncio
    import httpx
    from resilient_http import ResilientTransport

    async def main():
        transport = ResilientTransport(inner=httpx.MockTransport(lambda r: httpx.Response(200)), max_hosts=1)
        async with httpx.AsyncClient(transport=transport) as client:
            await client.get("http://a.example/")
            await client.get("http://b.example/")  # evicts a.example

    asyncio.run(main())
    """
)


def test_an_evicted_host_leaves_no_live_gauge_in_multiprocess_mode(tmp_path: Path) -> None:
    """Series cannot be removed from the files: an evicted host's gauges read 0, its counters stay, and no warning."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    command = [sys.executable, "-W", "error", "-c", EVICTING_WORKER]
    subprocess.run(command, env=env, check=True, timeout=60, capture_output=True)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]
    state = "resilient_http_circuit_state"
    assert registry.get_sample_value(state, {"host": "a.example:80", "state": "closed"}) == 0
    assert registry.get_sample_value(state, {"host": "b.example:80", "state": "closed"}) == 1
    assert registry.get_sample_value("resilient_http_requests_total", {"host": "a.example:80", "outcome": "2xx"}) == 1
