"""A fleet for real: worker processes, each with its own event loop and transport, a real Redis, a real server.

The test process runs its own ``redis-server`` on a free loopback port
(tests/redis_server.py; the machine's own Redis is never used) and a
:class:`FlakyServer` on a thread of its own, which records every arrival on
``time.monotonic()``, the clock every process of the machine shares. The
workers are ``tests/fleet_worker.py`` processes that start together and
offer calls open loop. Each test runs for a few seconds; the long,
eight-worker runs are benchmarks/fleet.py's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flaky_server import delay, respond, server_on_its_own_thread
from redis_server import RedisServer, free_port, needs_redis, redis_cluster

pytestmark = needs_redis

WORKER = Path(__file__).with_name("fleet_worker.py")
ROOT = Path(__file__).resolve().parent.parent
#: Once every worker is ready, how long until they begin together.
LEAD = 0.3
#: The store for the tests that are not about its timeout: a loaded machine must not make them fall back.
PATIENT = 1.0
OFF = {"timeout": {"attempt": 5, "total": 10}, "retry": False, "bulkhead": False, "circuit_breaker": False}


def start_workers(count: int, **settings: Any) -> tuple[list[subprocess.Popen[str]], float]:
    """``count`` worker processes, ready and then started together; and the moment they start.

    Their calls are spread: worker ``i`` begins ``i / (count * rate)`` later.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    processes = []
    for i in range(count):
        config = {**settings, "phase": i / (count * settings["rate"])}
        if i and config.get("inject_429"):
            config["inject_429"] = None  # only the first worker hears the 429
        processes.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), json.dumps(config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                cwd=ROOT,
            )
        )
    for process in processes:
        assert process.stdout is not None
        if process.stdout.readline() != "ready\n":
            raise AssertionError(process.communicate()[1][-2000:])
    start = time.monotonic() + LEAD
    for process in processes:
        assert process.stdin is not None
        process.stdin.write(f"{start!r}\n")
        process.stdin.flush()
    return processes, start


def results(processes: list[subprocess.Popen[str]], timeout: float = 60) -> list[dict[str, Any]]:
    found = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        assert process.returncode == 0, err[-2000:]
        found.append(json.loads(out))
    return found


def most_in_one_second(times: list[float]) -> int:
    ordered = sorted(times)
    return max((sum(1 for t in ordered if start <= t < start + 1.0) for start in ordered), default=0)


def outcomes(found: list[dict[str, Any]]) -> dict[str, int]:
    counted: dict[str, int] = {}
    for worker in found:
        for call in worker["calls"]:
            counted[call[2]] = counted.get(call[2], 0) + 1
    return counted


def breaks(arrivals: list[float], gap: float) -> list[list[float]]:
    """Arrivals at the server grouped: a new group after a silence longer than ``gap`` (a break)."""
    ordered = sorted(arrivals)
    groups: list[list[float]] = [ordered[:1]]
    for t in ordered[1:]:
        if t - groups[-1][-1] > gap:
            groups.append([])
        groups[-1].append(t)
    return groups


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def test_the_workers_share_one_quota(redis: RedisServer) -> None:
    """4 workers offered twice the fleet's 20 calls a second: the server gets 20 a second, never 20 + burst more.

    But for the sends a stalled worker delayed: a process the machine does
    not schedule between the store's answer and the send moves that send
    into another second, and each such send may add one (none on an idle
    machine).
    """
    rate, burst, seconds = 20, 2, 2.0
    policy = {**OFF, "rate_limit": {"rate": rate, "burst": burst, "max_wait": 0}}
    with server_on_its_own_thread() as server:
        server.default("/", respond(200))
        processes, _ = start_workers(
            4,
            url=server.url("/"),
            store={"url": redis.url, "timeout": PATIENT},
            policy=policy,
            duration=seconds,
            rate=rate / 2,
        )
        found = results(processes)
    arrivals = [r.arrived for r in server.requests_to("/")]
    assert outcomes(found).keys() <= {"200", "RateLimitedError"}
    late = sum(1 for worker in found for call in worker["calls"] if call[5] is not None and call[3] - call[5] > 0.02)
    assert most_in_one_second(arrivals) <= rate + burst + late
    assert rate * seconds * 0.8 <= len(arrivals) <= rate * seconds + burst


def test_a_retry_after_heard_by_one_worker_holds_every_worker(redis: RedisServer) -> None:
    """One worker hears 429 Retry-After: 2; nobody sends to that upstream for those 2 seconds."""
    policy = {**OFF, "rate_limit": {"rate": 200, "burst": 10, "max_wait": 0}}
    with server_on_its_own_thread() as server:
        server.default("/", respond(200))
        processes, _ = start_workers(
            3,
            url=server.url("/"),
            store={"url": redis.url, "timeout": PATIENT},
            policy=policy,
            duration=3.0,
            rate=20,
            inject_429=[0.5, 2],
        )
        found = results(processes)
    heard = found[0]["injected"]
    assert heard is not None
    arrivals = [r.arrived for r in server.requests_to("/")]
    # Calls already on their way when the 429 was heard may land in its first few milliseconds.
    during = [t - heard for t in arrivals if heard + 0.05 <= t < heard + 2.0]
    assert during == []
    assert any(t >= heard + 2.0 for t in arrivals)  # and the fleet resumed
    assert outcomes(found).keys() <= {"200", "429", "RateLimitedError"}


def test_after_an_outage_the_fleet_sends_half_open_calls_trials_per_break(redis: RedisServer) -> None:
    """4 workers, a host that only fails: after the first break, each break lets at most 2 trials out, fleet-wide."""
    breaker = {"minimum_calls": 4, "failure_ratio": 0.5, "break_duration": 0.6, "max_break_duration": 0.6}
    policy = {**OFF, "circuit_breaker": {**breaker, "half_open_calls": 2}}
    with server_on_its_own_thread() as server:
        server.default("/", respond(503))
        processes, _ = start_workers(
            4, url=server.url("/"), store={"url": redis.url, "timeout": PATIENT}, policy=policy, duration=3.0, rate=20
        )
        found = results(processes)
    groups = breaks([r.arrived for r in server.requests_to("/")], gap=0.25)  # a break is 0.48 s at least
    assert len(groups) >= 3, groups
    trials = [len(group) for group in groups[1:]]
    assert all(n <= 2 for n in trials), trials  # without a shared store: up to 4 workers x 2 each
    assert outcomes(found).keys() <= {"503", "CircuitOpenError"}


def test_with_slow_failures_each_break_lets_exactly_half_open_calls_trials_out_fleet_wide(
    redis: RedisServer,
) -> None:
    """4 workers, a host that fails after 300 ms: each break after the first lets 2 trials out, fleet-wide, not 4 x 2.

    A failure that takes 300 ms keeps the first trial in flight while the
    fleet's other calls (80 a second) ask for the second slot, so the second
    is taken too and no third goes (with a failure that is quick, the first
    trial reopens the circuit before a second is asked for: the test above).
    On a loaded machine a worker may stall past those 300 ms and leave a
    slot unclaimed in some break, so each break must hold at most 2 and at
    least one exactly 2; a fleet whose workers each took their own trials
    would show up to 8.
    """
    breaker = {"minimum_calls": 4, "failure_ratio": 0.5, "break_duration": 0.6, "max_break_duration": 0.6}
    policy = {**OFF, "circuit_breaker": {**breaker, "half_open_calls": 2}}
    with server_on_its_own_thread() as server:
        server.default("/", delay(0.3, 503))
        processes, _ = start_workers(
            4, url=server.url("/"), store={"url": redis.url, "timeout": PATIENT}, policy=policy, duration=4.0, rate=20
        )
        found = results(processes)
    # Between two breaks' trials: 0.3 s for the failure and a 0.6 s break. The trials of one break arrive
    # within the fleet's 12.5 ms between calls, or a stalled worker's lag: half the silence tells them apart.
    groups = breaks([r.arrived for r in server.requests_to("/")], gap=0.45)
    assert len(groups) >= 3, groups
    trials = [len(group) for group in groups[1:]]
    assert all(n <= 2 for n in trials), trials
    assert 2 in trials, trials
    assert outcomes(found).keys() <= {"503", "CircuitOpenError"}


def test_a_killed_redis_costs_the_callers_nothing_and_sharing_resumes(redis: RedisServer) -> None:
    """Redis killed for a second mid-run: no error reaches a caller, no call hangs, each worker keeps its share."""
    rate, burst, timeout = 30, 3, 0.05
    policy = {**OFF, "rate_limit": {"rate": rate, "burst": burst, "max_wait": 0}}
    store = {"url": redis.url, "timeout": timeout, "failures": 2, "cooldown": 0.3}
    with server_on_its_own_thread() as server:
        server.default("/", respond(200))
        processes, start = start_workers(
            3, url=server.url("/"), store=store, policy=policy, duration=4.0, rate=rate / 2
        )
        time.sleep(max(0.0, start + 1.5 - time.monotonic()))
        redis.stop()
        killed = time.monotonic()
        time.sleep(1.0)
        redis.start()
        back = time.monotonic()
        found = results(processes)
    assert outcomes(found).keys() <= {"200", "RateLimitedError"}  # no store error, no timeout
    longest = max(call[1] - call[0] for worker in found for call in worker["calls"])
    assert longest < timeout + 0.25  # the store's timeout, and room for a loaded machine
    assert all(worker["fallbacks"] > 0 for worker in found)
    arrivals = [r.arrived for r in server.requests_to("/")]
    outage = [t for t in arrivals if killed <= t < back]
    # Each of the 3 workers at its share (10 a second, burst 1), for the second Redis was away.
    assert len(outage) <= rate + 3
    resumed = [t for t in arrivals if back + 0.5 <= t]
    assert most_in_one_second(resumed) <= rate + burst


def test_workers_that_never_reach_redis_send_the_quota_between_them() -> None:
    """No Redis from the start: 4 workers told to expect 4 (``workers``) each take a quarter, not the whole quota."""
    rate, seconds = 20, 2.0
    policy = {**OFF, "rate_limit": {"rate": rate, "burst": 4, "max_wait": 0}}
    store = {"url": f"redis://127.0.0.1:{free_port()}/0", "timeout": 0.05, "workers": 4}
    with server_on_its_own_thread() as server:
        server.default("/", respond(200))
        processes, _ = start_workers(4, url=server.url("/"), store=store, policy=policy, duration=seconds, rate=rate)
        found = results(processes)
    assert outcomes(found).keys() <= {"200", "RateLimitedError"}
    arrivals = [r.arrived for r in server.requests_to("/")]
    # Each worker at 5 a second, burst 1 (without the hint: 20 a second each, 80 in all).
    assert 0.8 * rate * seconds <= len(arrivals) <= rate * seconds + 4


def test_the_key_layout_works_on_a_three_node_cluster(tmp_path: Path) -> None:
    """A worker on a Redis Cluster: every key of an upstream in one slot, each expiring; the workers' key too.

    The keys are read while the worker runs (a rate key lives one token's
    interval, and a closed store leaves the live workers).
    """
    from redis import Redis
    from redis.crc import key_slot

    policy = {
        **OFF,
        "rate_limit": {"rate": 50, "burst": 5, "max_wait": 0},
        "circuit_breaker": {"minimum_calls": 2, "failure_ratio": 0.5, "break_duration": 5},
    }
    with redis_cluster(tmp_path) as nodes, server_on_its_own_thread() as server:
        server.queue("/", respond(429, {"Retry-After": "1"}))
        server.default("/", respond(503))
        store = {"url": nodes[0].url.rsplit("/", 1)[0], "cluster": True, "prefix": "svc"}
        processes, start = start_workers(1, url=server.url("/"), store=store, policy=policy, duration=1.5, rate=20)
        keys: dict[bytes, int] = {}
        clients = [Redis(port=node.port) for node in nodes]
        time.sleep(max(0.0, start - time.monotonic()))
        while time.monotonic() < start + 1.5:
            for client in clients:
                for key in client.scan_iter("*"):
                    keys[key] = client.pttl(key)
        for client in clients:
            client.close()
        found = results(processes)
    assert outcomes(found).keys() <= {"429", "503", "RateLimitedError", "CircuitOpenError"}
    upstream = [key for key in keys if key.startswith(b"{svc:127.0.0.1:")]
    assert {key.rsplit(b":", 1)[1] for key in upstream} >= {b"rate", b"hold", b"circuit"}
    assert len({key_slot(key) for key in upstream}) == 1
    assert b"{svc}:workers" in keys
    assert -1 not in keys.values(), keys  # -1: a key without an expiry (-2: it expired as it was read)
