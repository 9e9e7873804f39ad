"""Host names and patterns, and the bounded table of per-host state.

Patterns are ``api.example.com``, ``api.example.com:8443``, ``[::1]:8080``
and ``*.example.com`` (any subdomain, not ``example.com`` itself; a port may
follow). The most specific pattern wins: host with port, then host, then the
longest wildcard (with port before without), then the default policy.

One host, one name. Patterns and calls are matched on one canonical form of
the host: lower case, ASCII (an international name in punycode, as httpx
sends it), without the trailing dot of a fully qualified name, an IPv6
address compressed. So ``Bücher.example.``, ``bücher.example`` and
``xn--bcher-kva.example`` get one policy and share one breaker, budget and
bulkhead. A pattern must be a valid host name (labels of letters, digits,
``-`` and ``_``, 1 to 63 characters each; an IPv6 address in brackets; a port
from 1 to 65535), and two patterns that name the same hosts however they are
spelt are refused rather than one silently winning.

State is kept per actual ``host:port``, never per pattern: two hosts matching
``*.example.com`` each get their own breaker and budget. The table keeps at
most ``max_hosts`` hosts; the least recently used one goes first, and its
metric series go with it, so a service calling many dynamic hosts keeps
bounded memory and bounded metric cardinality.

Only an idle host is evicted. A call is in flight from the moment it enters
the transport until the transport returns its response or raises; evicting
its host then would give the next call a fresh bulkhead beside the old one
(the cap exceeded) and a closed breaker beside an open one. A streamed body
still being read does not keep its host in flight: by then the call's layers
have settled (its bulkhead slot is back, its breaker has its verdict), and a
response nobody closes must not pin a host for ever. When more than
``max_hosts`` hosts are busy at once the table holds them all, and it shrinks
back, least recently used first, as they become idle.
"""

from __future__ import annotations

import ipaddress
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Generic, Protocol, TypeVar

import idna

from ._config import Policy
from ._errors import ConfigurationError

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
DEFAULT_MAX_HOSTS = 1000

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?")
_IPV4 = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+")


def canonical_host(host: str) -> str:
    """The form of ``host`` that patterns and per-host state are keyed by; never raises.

    ``" Bücher.Example. "`` → ``"xn--bcher-kva.example"``, ``"[0:0::1]"`` → ``"::1"``.
    A name that cannot be put in that form is only trimmed and lower-cased.
    """
    name = host.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name.endswith("."):
        name = name.rstrip(".")
    if not name.isascii():
        try:
            name = _punycode(name)
        except UnicodeError:
            pass
    elif ":" in name:
        try:
            name = ipaddress.IPv6Address(name).compressed
        except ValueError:
            pass
    return name


def _punycode(name: str) -> str:
    """A lower-case international name in ASCII, encoded as httpx (and httpx2) encode it."""
    return idna.encode(name).decode("ascii")


def host_of(raw_host: bytes) -> str:
    """The canonical host of a request, from its URL's ``raw_host`` (see :func:`canonical_host`).

    httpx has already put the name in ASCII and lower case (``url.host`` would
    turn punycode back into Unicode, and fails on a malformed ``xn--`` label).
    """
    name = raw_host.decode("ascii", "replace")
    if name.endswith(".") or ":" in name:
        return canonical_host(name)
    return name


def _bad(pattern: str, reason: str) -> ConfigurationError:
    return ConfigurationError("policies", pattern, reason)


def _name(pattern: str, text: str) -> str:
    """The canonical form of the host name ``text`` of ``pattern``, or raise."""
    name = text.lower()
    if name.endswith("."):  # a fully qualified name; one dot only, "a.com.." has an empty label
        name = name[:-1]
    if not name:
        raise _bad(pattern, "has no host name")
    if not name.isascii():
        try:
            name = _punycode(name)
        except UnicodeError:
            raise _bad(pattern, "is not a valid international domain name") from None
    if len(name) > 253:
        raise _bad(pattern, "is longer than a host name may be (253 characters)")
    for label in name.split("."):
        if not label:
            raise _bad(pattern, "has an empty label (a leading dot or two dots in a row)")
        if len(label) > 63:
            raise _bad(pattern, "has a label longer than 63 characters")
        if not _LABEL.fullmatch(label):
            raise _bad(
                pattern,
                "is not a host pattern (use host, host:port, [IPv6]:port or *.domain; "
                "labels of letters, digits, '-' and '_')",
            )
    if _IPV4.fullmatch(name):
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            raise _bad(pattern, "is not a valid IPv4 address") from None
    return name


def parse_pattern(pattern: str) -> tuple[bool, str, int | None]:
    """``(wildcard, canonical host, port)`` of a host pattern; :class:`ConfigurationError` if it is not one."""
    text = pattern.strip()
    port_text: str | None = None
    if text.startswith("["):  # [::1]:8080
        address, closed, rest = text[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise _bad(pattern, "is not a host pattern (an IPv6 address goes in brackets: [::1]:8080)")
        try:
            host = ipaddress.IPv6Address(address).compressed
        except ValueError:
            raise _bad(pattern, "is not a valid IPv6 address") from None
        wildcard = False
        port_text = rest[1:] if rest else None
    else:
        if text.count(":") > 1:
            raise _bad(pattern, "has more than one ':' (an IPv6 address goes in brackets: [::1]:8080)")
        if ":" in text:
            text, _, port_text = text.partition(":")
        wildcard = text.startswith("*.")
        host = _name(pattern, text[2:] if wildcard else text)
    port: int | None = None
    if port_text is not None:
        if not (port_text.isascii() and port_text.isdigit()):
            raise _bad(pattern, "has a port that is not a number")
        port = int(port_text) if len(port_text) <= 10 else 0
        if not 0 < port < 65536:
            raise _bad(pattern, "has a port outside 1..65535")
    return wildcard, host, port


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
        seen: dict[tuple[bool, str, int | None], str] = {}
        for pattern, policy in (policies or {}).items():
            if not isinstance(pattern, str):
                raise ConfigurationError("policies", pattern, "keys must be host patterns (strings)")
            if not isinstance(policy, Policy):
                raise ConfigurationError(f"policies[{pattern!r}]", policy, "must be a Policy")
            key = parse_pattern(pattern)
            if key in seen:
                raise _bad(pattern, f"names the same hosts as {seen[key]!r}")
            seen[key] = pattern
            wildcard, host, port = key
            if wildcard:
                self._wildcards[(host, port)] = policy
            elif port is not None:
                self._by_host_port[(host, port)] = policy
            else:
                self._by_host[host] = policy

    def resolve(self, host: str, port: int) -> Policy:
        """The most specific policy for ``host:port``, ``host`` in canonical form."""
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


class Counted(Protocol):
    """A value of the host table: it counts the calls in flight on it."""

    calls: int


T = TypeVar("T", bound=Counted)


class HostTable(Generic[T]):
    """Values keyed by ``(host, port)``: at most ``max_hosts`` idle ones, least recently used evicted.

    :meth:`enter` and :meth:`leave` bracket every call, so that a host with
    calls in flight is never evicted (see the module's docstring).
    """

    __slots__ = ("_evict", "_make", "crowded", "entries", "max_hosts")

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
        self.entries: OrderedDict[tuple[str, int], T] = OrderedDict()
        self.crowded = False  # more entries than max_hosts (busy hosts kept): shrink once they are idle

    def enter(self, host: str, port: int) -> T:
        """The value of ``host:port`` (made if new), counted in flight until :meth:`leave`."""
        key = (host, port)
        entries = self.entries
        value = entries.get(key)
        if value is not None:
            entries.move_to_end(key)
            value.calls += 1
            return value
        value = entries[key] = self._make(host, port)
        value.calls += 1
        if len(entries) > self.max_hosts:
            self.shrink()
        return value

    def leave(self, value: T) -> None:
        """A call on ``value`` is over; evict idle hosts the table kept beyond ``max_hosts``."""
        value.calls -= 1
        if self.crowded and not value.calls:
            self.shrink()

    def shrink(self) -> None:
        """Evict the least recently used idle hosts, down to ``max_hosts`` if that many are idle."""
        entries = self.entries
        excess = len(entries) - self.max_hosts
        idle = []
        for key, value in entries.items():
            if not value.calls:
                idle.append(key)
                if len(idle) == excess:
                    break
        for key in idle:
            self._evict(entries.pop(key))
        self.crowded = len(entries) > self.max_hosts

    def __len__(self) -> int:
        return len(self.entries)

    def values(self) -> list[T]:
        """Every value held now, least recently used first."""
        return list(self.entries.values())
