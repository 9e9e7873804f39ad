"""Policies from a TOML file.

::

    [default]                      # every host no pattern matches
    timeout = { attempt = 5, total = 20 }
    rate_limit = false             # off (the default for this layer anyway)

    [default.retry]
    attempts = 3

    [hosts."api.payments.example"]
    retry = { attempts = 4, statuses = [429, 503] }

    [hosts."*.internal.example".circuit_breaker]
    failure_ratio = 0.25

    [hosts."*.internal.example".bulkhead]
    max_concurrent = 50
    adaptive = { min = 2 }         # a limit that adapts (AIMD) from 2 to 50

    [store]                        # fleet state shared through Redis (see resilient_http.store)
    url = "redis://127.0.0.1:6379/0"
    timeout = 0.05                 # seconds per store operation
    workers = 8                    # the fleet's size, assumed until the store has counted it

Keys mirror the dataclasses. A host table is laid over ``[default]`` key by
key: what the host does not say, it inherits. ``layer = false`` turns a
layer off, ``layer = true`` turns it on (with ``[default]``'s settings for
it, or the dataclass defaults). Unknown keys and
bad values raise :class:`ConfigurationError` naming the key path and value.
The ``[store]`` table (read by :func:`load_store`) is handed to
:func:`resilient_http.store.open_store_table`, which checks it when the
transport is made. Host patterns are checked as in code: two host tables that name the same
host however spelt (``"api.example.com"`` and ``"API.example.com."``,
``"bücher.example"`` and ``"xn--bcher-kva.example"``) are an error at the
line of the second.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from os import PathLike
from pathlib import Path
from typing import Any

from ._config import LAYER_TYPES, AdaptiveLimit, Policy, RetryBudget
from ._errors import ConfigurationError
from ._hosts import PolicyTable

_NESTED: dict[tuple[str, str], type] = {("retry", "budget"): RetryBudget, ("bulkhead", "adaptive"): AdaptiveLimit}


def _merge(base: Any, over: Any) -> Any:
    """``over`` laid on ``base``: tables merge key by key, anything else replaces."""
    if isinstance(base, dict) and isinstance(over, dict):
        merged = dict(base)
        for key, value in over.items():
            merged[key] = _merge(base.get(key), value)
        return merged
    if over is True and isinstance(base, dict):  # "on", as [default] has it
        return base
    return over


def _build(kind: type, table: Any, path: str, layer: str) -> Any:
    if table is False:
        return None
    if table is True:
        table = {}
    if not isinstance(table, dict):
        raise ConfigurationError(path, table, "must be a table, true or false")
    names = {f.name for f in dataclasses.fields(kind)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in names:
            raise ConfigurationError(f"{path}.{key}", value, f"is not a {kind.__name__} setting")
        nested = _NESTED.get((layer, key))
        kwargs[key] = _build(nested, value, f"{path}.{key}", key) if nested is not None else value
    try:
        return kind(**kwargs)
    except ConfigurationError as exc:
        name = exc.field.rpartition(".")[2]
        raise ConfigurationError(f"{path}.{name}", exc.value, exc.reason) from None
    except TypeError as exc:  # a required setting is missing
        raise ConfigurationError(path, table, str(exc).partition("() ")[2] or str(exc)) from None


def _policy(table: Any, path: str) -> Policy:
    if not isinstance(table, dict):
        raise ConfigurationError(path, table, "must be a table")
    layers: dict[str, Any] = {}
    for name, value in table.items():
        kind = LAYER_TYPES.get(name)
        if kind is None:
            raise ConfigurationError(f"{path}.{name}", value, "is not a layer of Policy")
        layers[name] = _build(kind, value, f"{path}.{name}", name)
    return Policy(**layers)


#: The keys of a ``[store]`` table: ``url`` and the settings of ``resilient_http.store.open_store``.
STORE_KEYS = ("url", "prefix", "timeout", "failures", "cooldown", "circuit_ttl", "cluster", "worker_id", "workers")


def _check_store(table: Any) -> None:
    """The ``[store]`` table's shape; its values are checked when the store is opened."""
    if not isinstance(table, dict):
        raise ConfigurationError("store", table, "must be a table")
    for key, value in table.items():
        if key not in STORE_KEYS:
            raise ConfigurationError(f"store.{key}", value, "is not a store setting")
    if not isinstance(table.get("url"), str):
        raise ConfigurationError("store.url", table.get("url"), "must be a URL string (redis://, rediss://, unix://)")


def load_store(path: str | PathLike[str]) -> dict[str, Any] | None:
    """The ``[store]`` table of the policy file at ``path``, or ``None`` when it has none.

    Call it after :func:`load_policies`, which reports the file's errors.
    """
    data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    table = data.get("store")
    if table is None:
        return None
    _check_store(table)
    return dict(table)


def parse_policies(data: dict[str, Any]) -> tuple[dict[str, Policy], Policy]:
    """``(policies, default)`` from the parsed TOML document ``data``."""
    for key in data:
        if key not in ("default", "hosts", "store"):
            raise ConfigurationError(
                key, data[key], 'is not a top-level table (use [default], [hosts."pattern"] or [store])'
            )
    if "store" in data:
        _check_store(data["store"])
    default_table = data.get("default", {})
    default = _policy(default_table, "default")
    hosts = data.get("hosts", {})
    if not isinstance(hosts, dict):
        raise ConfigurationError("hosts", hosts, "must be a table of host patterns")
    policies = {
        pattern: _policy(_merge(default_table, table), f'hosts."{pattern}"') for pattern, table in hosts.items()
    }
    return policies, default


def load_policies(path: str | PathLike[str]) -> tuple[dict[str, Policy], Policy]:
    """``(policies, default)`` from the TOML file at ``path``.

    Every error is a :class:`ConfigurationError` that starts with the path
    and, where it can be told, the line: ``policies.toml: line 5:
    hosts."api.x".retry.atempts: is not a RetryPolicy setting (got 4)``.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(str(path), None, f"cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigurationError(str(path), None, f"is not UTF-8 text (byte {exc.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        found = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
        where = f"{path}" if found is None else f"{path}: line {found[1]}, column {found[2]}"
        reason = message if found is None else message[: found.start()]
        raise ConfigurationError("invalid TOML", None, reason, where=where) from None
    try:
        policies, default = parse_policies(data)
        PolicyTable(policies, default)  # checks the host patterns
    except ConfigurationError as exc:
        field, value = exc.field, exc.value
        if field == "policies":  # a bad pattern: name it as the file does
            field = f"hosts.{value if _BARE_KEY.fullmatch(str(value)) else json.dumps(str(value), ensure_ascii=False)}"
        line = _line_of(text, field)
        where = f"{path}" if line is None else f"{path}: line {line}"
        raise ConfigurationError(field, value, exc.reason, where=where) from None
    return policies, default


# Finding the line of a key. tomllib does not say where a value came from, so
# the file is scanned for table headers, ``key = value`` lines and the keys of
# inline tables; good enough for policy files, and only ever used for a message.

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SEGMENT = re.compile(r"""[ \t]*(?:"((?:[^"\\]|\\.)*)"|'([^']*)'|([A-Za-z0-9_-]+))[ \t]*""")


def _key(text: str, i: int) -> tuple[tuple[str, ...], int] | None:
    """The dotted key at ``text[i]`` (blanks around it allowed) and where it ends; ``None`` if there is none."""
    parts: list[str] = []
    while True:
        found = _SEGMENT.match(text, i)
        if found is None:
            return None
        basic, literal, bare = found.groups()
        if basic is not None:
            try:
                parts.append(json.loads(f'"{basic}"'))
            except ValueError:  # an escape TOML has and JSON lacks: close enough for a message
                parts.append(basic)
        else:
            parts.append(literal if literal is not None else bare)
        i = found.end()
        if not text.startswith(".", i):
            return tuple(parts), i
        i += 1


def _note(lines: dict[tuple[str, ...], int], path: tuple[str, ...], number: int) -> None:
    for n in range(1, len(path) + 1):
        lines.setdefault(path[:n], number)


def _inline(lines: dict[tuple[str, ...], int], path: tuple[str, ...], text: str, i: int, number: int) -> int:
    """Note the keys of the inline table opening at ``text[i]``; return where it closes."""
    i += 1
    while i < len(text):
        if text[i] in " \t,":
            i += 1
            continue
        if text[i] == "}":
            return i + 1
        found = _key(text, i)
        if found is None:
            return len(text)
        keys, i = found
        if not text.startswith("=", i):
            return len(text)
        i += 1
        while i < len(text) and text[i] in " \t":
            i += 1
        _note(lines, path + keys, number)
        if text.startswith("{", i):
            i = _inline(lines, path + keys, text, i, number)
            continue
        depth, quote = 0, ""
        while i < len(text):  # skip the value: up to a comma or brace outside strings and arrays
            char = text[i]
            if quote:
                quote = "" if char == quote else quote
            elif char in "\"'":
                quote = char
            elif char == "[":
                depth += 1
            elif char == "]":
                depth -= 1
            elif char in ",}" and depth <= 0:
                break
            i += 1
    return i


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """The line where each key path of the file first appears."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("["):
            found = _key(stripped, 2 if stripped.startswith("[[") else 1)
            if found is not None:
                table = found[0]
                _note(lines, table, number)
            continue
        found = _key(stripped, 0)
        if found is None or not stripped.startswith("=", found[1]):
            continue
        keys, i = found
        _note(lines, table + keys, number)
        value = stripped[i + 1 :].lstrip()
        if value.startswith("{"):
            _inline(lines, table + keys, value, 0, number)
    return lines


def _line_of(text: str, field: str) -> int | None:
    """The line of ``field`` (a key path such as ``hosts."api.x".retry.attempts``), as best it can be told.

    A host table inherits from ``[default]`` what it does not set, so a key
    missing from the host's table is looked for in ``[default]`` before the
    nearest table that encloses it.
    """
    found = _key(field, 0)
    if found is None:
        return None
    path = found[0]
    lines = _key_lines(text)
    inherited = ("default", *path[2:]) if path[:1] == ("hosts",) and len(path) > 2 else None
    for candidate in (path, inherited):
        if candidate is not None and candidate in lines:
            return lines[candidate]
    for n in range(len(path) - 1, 0, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return None
