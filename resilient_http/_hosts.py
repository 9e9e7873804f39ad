"""Host patterns, and the bounded table of per-host state.

Patterns are ``api.example.com``, ``api.example.com:8443`` and
``*.example.com`` (any subdomain, not ``example.com`` itself; a port may
follow). The most specific pattern wins: host with port, then host, then the
longest wildcard (with port before without), then the default policy.

State is kept per actual ``host:port``, never per pattern: two hosts matching
``*.example.com`` each get their own breaker and budget. The table keeps at
most ``max_hosts`` hosts; the least recently used one goes first, and its
metric series go with it, so a service calling many dynamic hosts keeps
bounded memory and bounded metric cardinality.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

from ._config import Policy
from ._exceptions import ConfigurationError

T = TypeVar("T")

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
DEFAULT_MAX_HOSTS = 1000


def _split_pattern(pattern: str) -> tuple[str, int | None]:
    text = pattern.strip().lower()
    port: int | None = None
    if text.startswith("["):  # [::1]:8080
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ConfigurationError("policies", pattern, "is not a host pattern")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text.isdigit():
            raise ConfigurationError("policies", pattern, "has a port that is not a number")
        port = int(port_text)
    else:
        host = text
    if port is not None and not 0 < port < 65536:
        raise ConfigurationError("policies", pattern, "has a port outside 1..65535")
    bare = host[2:] if host.startswith("*.") else host
    if not bare or "*" in bare or "/" in bare or " " in bare:
        raise ConfigurationError("policies", pattern, "is not a host pattern (use host, host:port or *.domain)")
    return host, port


class PolicyTable:
    """Finds the policy for a host; built once, asked once per new host."""

    __slots__ = ("_by_host", "_by_host_port", "_wildcards", "default")

    def __init__(self, policies: Mapping[str, Policy] | None, default: Policy | None) -> None:
        self.default = Policy() if default is None else default
        if not isinstance(self.default, Policy):
            raise ConfigurationError("default", default, "must be a Policy")
        self._by_host_port: dict[tuple[str, int], Policy] = {}
        self._by_host: dict[str, Policy] = {}
        self._wildcards: dict[tuple[str, int | None], Policy] = {}
        for pattern, policy in (policies or {}).items():
            if not isinstance(pattern, str):
                raise ConfigurationError("policies", pattern, "keys must be host patterns (strings)")
            if not isinstance(policy, Policy):
                raise ConfigurationError(f"policies[{pattern!r}]", policy, "must be a Policy")
            host, port = _split_pattern(pattern)
            if host.startswith("*."):
                self._wildcards[(host[2:], port)] = policy
            elif port is not None:
                self._by_host_port[(host, port)] = policy
            else:
                self._by_host[host] = policy

    def resolve(self, host: str, port: int) -> Policy:
        """The most specific policy for ``host:port``."""
        found = self._by_host_port.get((host, port)) or self._by_host.get(host)
        if found is not None:
            return found
        if self._wildcards:
            labels = host.split(".")
            for i in range(1, len(labels)):
                suffix = ".".join(labels[i:])
                found = self._wildcards.get((suffix, port)) or self._wildcards.get((suffix, None))
                if found is not None:
                    return found
        return self.default


class HostTable(Generic[T]):
    """At most ``max_hosts`` values keyed by ``(host, port)``, least recently used evicted."""

    __slots__ = ("_entries", "_evict", "_make", "max_hosts")

    def __init__(
        self,
        make: Callable[[str, int], T],
        evict: Callable[[T], None],
        max_hosts: int = DEFAULT_MAX_HOSTS,
    ) -> None:
        if isinstance(max_hosts, bool) or not isinstance(max_hosts, int) or max_hosts < 1:
            raise ConfigurationError("max_hosts", max_hosts, "must be a whole number of at least 1")
        self.max_hosts = max_hosts
        self._make = make
        self._evict = evict
        self._entries: OrderedDict[tuple[str, int], T] = OrderedDict()

    def get(self, host: str, port: int) -> T:
        key = (host, port)
        entries = self._entries
        value = entries.get(key)
        if value is not None:
            entries.move_to_end(key)
            return value
        value = entries[key] = self._make(host, port)
        if len(entries) > self.max_hosts:
            _, oldest = entries.popitem(last=False)
            self._evict(oldest)
        return value

    def __len__(self) -> int:
        return len(self._entries)
