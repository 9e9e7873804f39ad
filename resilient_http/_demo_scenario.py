"""The demo's scenario: its phases, its traffic, the resilient client's policies, and the limits that keep it on time.

Both sides of the demo (see :mod:`resilient_http._demo_side`) read the same
scenario and lay it on the same clock, so that both clients see the same
calls and both dependencies the same failures at the same moments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._config import (
    LAYER_TYPES,
    BulkheadPolicy,
    CircuitBreakerPolicy,
    Policy,
    RateLimitPolicy,
    RetryBudget,
    RetryPolicy,
    StaleCachePolicy,
    TimeoutPolicy,
)
from ._demo_report import API, SEARCH
from ._upstream import Mode

RATES = {API: 40.0, SEARCH: 10.0}  # calls a second, per client
QUOTA = 50  # requests a second api serves in the quota phase
SURGE = 2.0  # api traffic is multiplied by this in the quota phase
MAX_IN_FLIGHT = 150  # calls in flight per client, beyond which a due call is not started
DRAIN = 6.0  # seconds the calls in flight when the timeline ends may take to finish


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    share: float  # of the run's duration
    api: Mode
    search: Mode
    what: str
    surge: bool = False


PHASES = (
    Phase("healthy", 0.15, "healthy", "healthy", "both hosts answer at once"),
    Phase("errors", 0.15, "errors", "errors", "half the requests get 503 with Retry-After: 1"),
    Phase("quota", 0.15, "quota", "healthy", f"api traffic doubles; api serves {QUOTA}/s, 429 beyond", surge=True),
    Phase("hang", 0.20, "hang", "healthy", "api stops answering; search is healthy"),
    Phase("outage", 0.15, "outage", "outage", "both hosts: 503 without Retry-After, or a reset"),
    Phase("recovery", 0.20, "healthy", "healthy", "both hosts answer again"),
)


def demo_policies() -> tuple[dict[str, Policy], Policy]:
    """The resilient client's policies, named as a policy file would name them."""
    breaker = CircuitBreakerPolicy(failure_ratio=0.5, window=5.0, break_duration=1.0, max_break_duration=2.0)
    timeout = TimeoutPolicy(attempt=0.5, total=2.5)
    retry = RetryPolicy(attempts=3, backoff=0.05, max_backoff=0.5, max_retry_after=2.0)
    api = Policy(
        timeout=timeout,
        retry=retry,
        circuit_breaker=dataclasses.replace(breaker, minimum_calls=20),
        rate_limit=RateLimitPolicy(rate=QUOTA, burst=5, max_wait=0.2),
        bulkhead=BulkheadPolicy(max_concurrent=25, max_queue=25, queue_timeout=0.2),
        stale_cache=StaleCachePolicy(max_stale=60.0),
    )
    search = Policy(
        timeout=timeout,
        retry=retry,
        circuit_breaker=dataclasses.replace(breaker, minimum_calls=10),
        bulkhead=BulkheadPolicy(max_concurrent=10, max_queue=10, queue_timeout=0.2),
    )
    return {API: api, SEARCH: search}, Policy()


class Timeline:
    """The phases laid on the clock, from ``start`` over ``duration`` seconds."""

    def __init__(self, start: float, duration: float) -> None:
        self.start = start
        self.bounds: list[tuple[float, float, Phase]] = []
        at = start
        for phase in PHASES:
            end = at + phase.share * duration
            self.bounds.append((at, end, phase))
            at = end
        self.end = at

    def at(self, moment: float) -> Phase | None:
        for begin, end, phase in self.bounds:
            if begin <= moment < end:
                return phase
        return None

    def ends(self, name: str) -> float:
        return next(end for _, end, phase in self.bounds if phase.name == name)


def policies_to_wire(policies: Mapping[str, Policy], default: Policy) -> dict[str, Any]:
    """``policies`` and ``default`` as JSON values, for the side that plays resilient_http.

    Not pickle: a ``Policy`` may come from a module loaded twice (the httpx2
    flavour's tests do that), and JSON says exactly what crosses over.
    """
    return {"hosts": {pattern: _wire(policy) for pattern, policy in policies.items()}, "default": _wire(default)}


def policies_from_wire(data: dict[str, Any]) -> tuple[dict[str, Policy], Policy]:
    """What :func:`policies_to_wire` gave, as policies again."""
    return {pattern: _policy(table) for pattern, table in data["hosts"].items()}, _policy(data["default"])


def _wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _wire(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, frozenset | set):
        return {"set": sorted(value)}
    if isinstance(value, tuple):
        return list(value)
    return value


def _policy(tables: dict[str, Any]) -> Policy:
    layers: dict[str, Any] = {}
    for name, table in tables.items():
        if table is not None:
            settings = {key: _setting(value) for key, value in table.items()}
            if name == "retry" and settings.get("budget") is not None:
                settings["budget"] = RetryBudget(**settings["budget"])
            table = LAYER_TYPES[name](**settings)
        layers[name] = table
    return Policy(**layers)


def _setting(value: Any) -> Any:
    return frozenset(value["set"]) if isinstance(value, dict) and list(value) == ["set"] else value
