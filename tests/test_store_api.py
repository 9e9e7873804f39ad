"""resilient_http.store's public names, and both stores answering to the Store protocol."""

from __future__ import annotations

import types

from prometheus_client import CollectorRegistry

import resilient_http.store as store_package
from resilient_http.store import MemoryStore, RedisStore, Store


def test_all_is_exactly_the_public_names() -> None:
    """store.__all__ lists every public name of the package and nothing else (ruff keeps it sorted, constants first)."""
    public = sorted(
        name
        for name in dir(store_package)
        if not name.startswith("_") and not isinstance(getattr(store_package, name), types.ModuleType)
    )
    assert sorted(store_package.__all__) == public


async def test_both_stores_are_stores() -> None:
    """The memory and Redis stores satisfy the Store protocol, statically (mypy) and at run time."""
    memory: Store = MemoryStore()
    redis: Store = RedisStore.from_url("redis://127.0.0.1:1/0", registry=CollectorRegistry())
    assert isinstance(memory, Store) and isinstance(redis, Store)
    await redis.aclose()


def test_importing_the_store_does_not_import_redis() -> None:
    """The redis package is an optional extra: only a Redis store made from a URL imports it."""
    import subprocess
    import sys

    code = "import sys, resilient_http.store; print('redis' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
