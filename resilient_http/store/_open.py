"""``open_store``: a store from a URL, a TOML ``[store]`` table, or a store object given as is."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from .._clock import Clock
from .._errors import ConfigurationError
from ._base import Store
from ._memory import MemoryStore
from ._redis import SCHEMES, RedisStore

#: The keys a ``[store]`` table may have, besides ``url``.
SETTINGS = ("prefix", "timeout", "failures", "cooldown", "circuit_ttl", "cluster", "worker_id", "workers")


def open_store(
    target: str | Store | None = None,
    *,
    registry: CollectorRegistry | None = None,
    clock: Clock | None = None,
    **settings: Any,
) -> Store:
    """The store for ``target``: a ``redis://``, ``rediss://`` or ``unix://`` URL, ``memory://``, a store, or ``None``.

    ``None`` and ``memory://`` give a :class:`MemoryStore` on ``clock``; a
    store object is returned as it is (its owner closes it). ``settings``
    are the :class:`RedisStore` options (``prefix``, ``timeout``,
    ``failures``, ``cooldown``, ``circuit_ttl``, ``cluster``, ``worker_id``,
    ``workers``);
    a store opened from a URL belongs to the caller, who closes it with
    ``aclose()``. Bad settings raise :class:`ConfigurationError` naming them.
    """
    for name, value in settings.items():
        if name not in SETTINGS:
            raise ConfigurationError(f"store.{name}", value, "is not a store setting")
    if target is None or target == "memory://":
        memory = {name: settings[name] for name in ("worker_id", "circuit_ttl", "workers") if name in settings}
        return MemoryStore(clock=clock, **memory)
    if isinstance(target, str):
        if not target.startswith(SCHEMES):
            raise ConfigurationError("store.url", target, "must start with redis://, rediss://, unix:// or memory://")
        cluster = settings.pop("cluster", False)
        if not isinstance(cluster, bool):
            raise ConfigurationError("store.cluster", cluster, "must be true or false")
        return RedisStore.from_url(target, cluster=cluster, registry=registry, clock=clock, **settings)
    if isinstance(target, Store):
        if settings:
            raise ConfigurationError(f"store.{next(iter(settings))}", None, "cannot be set on a store object")
        return target
    raise ConfigurationError("store", target, "must be a URL or a store object")


def open_store_table(
    table: Mapping[str, Any], *, registry: CollectorRegistry | None = None, clock: Clock | None = None
) -> Store:
    """The store a policy file's ``[store]`` table names: ``url`` and the settings of :func:`open_store`."""
    if not isinstance(table, Mapping):
        raise ConfigurationError("store", table, "must be a table")
    settings = dict(table)
    url = settings.pop("url", None)
    if not isinstance(url, str):
        raise ConfigurationError("store.url", url, "must be a URL string")
    return open_store(url, registry=registry, clock=clock, **settings)
