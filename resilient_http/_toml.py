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

Keys mirror the dataclasses. A host table is laid over ``[default]`` key by
key: what the host does not say, it inherits. ``layer = false`` turns a
layer off, ``layer = true`` turns it on (with ``[default]``'s settings for
it, or the dataclass defaults). Unknown keys and
bad values raise :class:`ConfigurationError` naming the key path and value.
"""

from __future__ import annotations

import dataclasses
import tomllib
from os import PathLike
from pathlib import Path
from typing import Any

from ._config import LAYER_TYPES, Policy, RetryBudget
from ._exceptions import ConfigurationError

_NESTED: dict[tuple[str, str], type] = {("retry", "budget"): RetryBudget}


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


def parse_policies(data: dict[str, Any]) -> tuple[dict[str, Policy], Policy]:
    """``(policies, default)`` from the parsed TOML document ``data``."""
    for key in data:
        if key not in ("default", "hosts"):
            raise ConfigurationError(key, data[key], 'is not a top-level table (use [default] or [hosts."pattern"])')
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
    """``(policies, default)`` from the TOML file at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError("path", str(path), f"cannot be read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError("path", str(path), f"is not valid TOML: {exc}") from None
    return parse_policies(data)
