"""The stale cache's memory: entries of every host of a transport, bounded per host and in total.

Each host's entries are bounded by its own policy's ``max_entries`` and
``max_bytes``; all hosts' entries together by the largest ``max_entries``
and the largest ``max_bytes`` among the policies that have stored anything.
A host that goes over its own bounds gives up its own least recently used
entries, never another host's: a host with a small policy cannot empty the
store of a host with a big one. Only when the whole store is over its
bounds does the least recently used entry of any host go.

A host's bookkeeping (its :class:`Shelf`) exists while the host has entries
and leaves with the last one, so the store keeps nothing for hosts it no
longer holds answers for. The store belongs to the transport, not to a
host: an answer survives the host's eviction from the host table, and a
host made again reports the entries it still has.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import httpx

from .._config import StaleCachePolicy
from .._metrics import HostMetrics
from .cache_key import Key

#: (header name, the request's value or ``None``) for each header the answer varies on.
Vary = tuple[tuple[str, str | None], ...]
Slot = tuple[Key, Vary]


@dataclass(slots=True, eq=False)
class Entry:
    """One stored answer; ``limit`` is the age up to which it may be served.

    ``received`` is the answer's header fields as they came (``_headers.fields``,
    a copy): an answer that comes again with the same status, fields and body
    is the same answer, as storable as this one was.
    """

    key: Key
    host: str
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    http_version: bytes
    vary: Vary
    stored: float  # host clock
    initial_age: float
    limit: float
    received: list[Any]
    size: int = 0
    slot: Slot = field(init=False)
    shelf: Shelf = field(init=False)  # set when stored

    def __post_init__(self) -> None:
        self.slot = (self.key, self.vary)

    def measure(self) -> None:
        self.size = len(self.body) + sum(len(k) + len(v) for k, v in self.headers)


@dataclass(slots=True, eq=False)
class Shelf:
    """One host's part of the store; it exists only while the host has entries."""

    metrics: HostMetrics
    entries: OrderedDict[Entry, None] = field(default_factory=OrderedDict)  # least recently used first
    bytes: int = 0


class Store:
    """Entries of every host of a transport, bounded per host and in total."""

    def __init__(self) -> None:
        self.entries: dict[Slot, Entry] = {}  # by the request they answer
        # Least recently used first. Keyed by the entries themselves, which hash by identity:
        # an entry used again moves to the end without hashing its key again.
        self.order: OrderedDict[Entry, None] = OrderedDict()
        self.shelves: dict[str, Shelf] = {}
        self.by_key: dict[Key, list[Entry]] = {}
        self.total_bytes = 0
        # The bounds of all hosts together: the largest of the policies that stored anything.
        self.max_entries = 0
        self.max_bytes = 0

    def adopt(self, host: str, metrics: HostMetrics) -> None:
        """``metrics`` report ``host``'s entries from now on (a host made again after its eviction)."""
        shelf = self.shelves.get(host)
        if shelf is not None:
            shelf.metrics = metrics
            self._report(shelf)

    def find(self, key: Key, request: httpx.Request) -> Entry | None:
        """The entry for ``key`` whose varied headers match ``request``'s, now the most recently used."""
        for entry in self.by_key.get(key, ()):
            if all(request.headers.get(name) == value for name, value in entry.vary):
                self._touch(entry)
                return entry
        return None

    def put(self, entry: Entry, policy: StaleCachePolicy, metrics: HostMetrics) -> None:
        """Keep ``entry`` in place of any for the same request, then trim this host, then the store."""
        slot = entry.slot
        entry.measure()
        self.max_entries = max(self.max_entries, policy.max_entries)
        self.max_bytes = max(self.max_bytes, policy.max_bytes)
        shelf = self.shelves.get(entry.host)
        if shelf is None:
            shelf = self.shelves[entry.host] = Shelf(metrics)
        entry.shelf = shelf
        old = self.entries.get(slot)
        self.entries[slot] = entry
        self.order[entry] = shelf.entries[entry] = None  # the most recently used
        if old is not None:
            # The same resource again (the usual case): replace it (a slot's host is the entry's).
            del self.order[old], shelf.entries[old]
            variants = self.by_key[entry.key]
            variants[variants.index(old)] = entry
            self._count(shelf, entry.size - old.size)
        else:
            self.by_key.setdefault(entry.key, []).append(entry)
            self._count(shelf, entry.size)
        own = shelf.entries
        while len(own) > 1 and (len(own) > policy.max_entries or shelf.bytes > policy.max_bytes):
            self.remove(next(iter(own)))
        order = self.order
        while len(order) > 1 and (len(order) > self.max_entries or self.total_bytes > self.max_bytes):
            self.remove(next(iter(order)))

    def remove(self, entry: Entry) -> None:
        """Forget ``entry`` (nothing if it was replaced meanwhile); its host's shelf goes with its last entry."""
        slot = entry.slot
        if self.entries.get(slot) is not entry:
            return
        del self.entries[slot], self.order[entry]
        shelf = self.shelves[entry.host]
        del shelf.entries[entry]
        variants = self.by_key[entry.key]
        variants.remove(entry)
        if not variants:
            del self.by_key[entry.key]
        self._count(shelf, -entry.size)
        if not shelf.entries:
            del self.shelves[entry.host]

    def forget(self, host: str) -> None:
        """Forget every entry of ``host`` (its policy no longer has a stale cache)."""
        shelf = self.shelves.get(host)
        if shelf is not None:
            for entry in list(shelf.entries):
                self.remove(entry)

    def _touch(self, entry: Entry) -> None:
        """``entry`` is now the most recently used (StaleCache does the same inline for an answer seen again)."""
        self.order.move_to_end(entry)
        entry.shelf.entries.move_to_end(entry)

    def _count(self, shelf: Shelf, size: int) -> None:
        shelf.bytes += size
        self.total_bytes += size
        self._report(shelf)

    @staticmethod
    def _report(shelf: Shelf) -> None:
        shelf.metrics.cache_entries.set(len(shelf.entries))
        shelf.metrics.cache_bytes.set(shelf.bytes)
