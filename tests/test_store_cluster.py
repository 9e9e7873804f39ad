"""The Redis store on a three-node Redis Cluster on loopback: every script runs on one slot, none is CROSSSLOT.

Twenty upstreams spread over the three masters; each gets every operation,
through a cluster client that routes a script by its first key. A CROSSSLOT
error, or any other, would show as an ``UNAVAILABLE`` answer and a counted
fallback, so both are checked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from redis.crc import key_slot
from redis_server import RedisServer, needs_redis, redis_cluster

from resilient_http.store import UNAVAILABLE, Circuit, RedisStore, open_store

pytestmark = needs_redis


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    with redis_cluster(Path(tmp_path_factory.mktemp("cluster"))) as servers:
        yield servers


async def test_every_operation_runs_on_a_cluster_without_crossslot(
    cluster: list[RedisServer], registry: CollectorRegistry
) -> None:
    """Every operation answers for twenty upstreams spread over three masters; nothing falls back."""
    store = open_store(cluster[0].url, cluster=True, timeout=2.0, registry=registry)
    assert isinstance(store, RedisStore)
    upstreams = [f"host-{i}.example.com:443" for i in range(20)]
    slots = {key_slot(f"{{resilient_http:{upstream}}}".encode()) for upstream in upstreams}
    assert len({slot * 3 // 16384 for slot in slots}) == 3  # the tags land on every master's range
    try:
        for upstream in upstreams:
            assert (await store.admit(upstream, rate=5, burst=2)) != UNAVAILABLE
            assert await store.hold(upstream, 5.0) != UNAVAILABLE
            assert await store.held(upstream) != UNAVAILABLE
            refused = await store.admit(upstream, rate=5, burst=2, next_turn=True)  # held: a turn after the hold
            assert refused != UNAVAILABLE and not refused.allowed
            opened = await store.open_circuit(upstream, 0.05, after_round=0)
            assert opened != UNAVAILABLE and (opened.state, opened.round) == ("open", 1)
        await asyncio.sleep(0.1)
        for upstream in upstreams:
            assert await store.claim_trial(upstream, 1, slots=1, ttl=10) is True
            assert await store.release_trial(upstream, 1) is True
            assert await store.claim_trial(upstream, 1, slots=1, ttl=10) is True
            assert await store.trial_succeeded(upstream, 1, slots=1) == Circuit("closed", 1, 0.0)
            assert await store.circuit(upstream) == Circuit("closed", 1, 0.0)
        assert await store.heartbeat(5.0) == 1
        await store.leave()
        assert store.available
        assert (
            registry.get_sample_value("resilient_http_store_fallbacks_total", {"operation": "admit", "reason": "error"})
            is None
        )
    finally:
        await store.aclose()
