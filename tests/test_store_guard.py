"""The store's guard on the fake clock: skip after repeated failures, one probe after the cooldown, log once."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry

from resilient_http.store._guard import StoreGuard
from resilient_http.store._metrics import StoreMetrics
from resilient_http.testing import FakeClock

FALLBACKS = "resilient_http_store_fallbacks_total"


def make(clock: FakeClock, registry: CollectorRegistry, failures: int = 3, cooldown: float = 5.0) -> StoreGuard:
    return StoreGuard(name="test", failures=failures, cooldown=cooldown, clock=clock, metrics=StoreMetrics(registry))


def test_failures_in_a_row_skip_the_store_for_the_cooldown(clock: FakeClock, registry: CollectorRegistry) -> None:
    """Two failures keep the store in use; the third skips it until the cooldown is over."""
    guard = make(clock, registry)
    for _ in range(2):
        assert guard.enter("admit")
        guard.failed("admit", TimeoutError())
    assert guard.available
    assert guard.enter("admit")
    guard.failed("admit", ConnectionError("refused"))
    assert not guard.available
    assert not guard.enter("admit")
    clock.advance(4.9)
    assert not guard.enter("hold")
    assert registry.get_sample_value(FALLBACKS, {"operation": "admit", "reason": "timeout"}) == 2
    assert registry.get_sample_value(FALLBACKS, {"operation": "admit", "reason": "error"}) == 1
    assert registry.get_sample_value(FALLBACKS, {"operation": "admit", "reason": "skipped"}) == 1
    assert registry.get_sample_value(FALLBACKS, {"operation": "hold", "reason": "skipped"}) == 1
    assert registry.get_sample_value("resilient_http_store_up") == 0


def test_a_success_resets_the_count_of_failures(clock: FakeClock, registry: CollectorRegistry) -> None:
    """Failures must be in a row: a success between them starts the count again."""
    guard = make(clock, registry, failures=2)
    guard.failed("admit", TimeoutError())
    guard.succeeded()
    guard.failed("admit", TimeoutError())
    assert guard.available


def test_after_the_cooldown_one_probe_goes_and_the_rest_wait(clock: FakeClock, registry: CollectorRegistry) -> None:
    """One operation probes; others are skipped while it runs; its success resumes sharing."""
    guard = make(clock, registry, failures=1)
    guard.failed("admit", TimeoutError())
    clock.advance(5.0)
    assert guard.enter("admit")  # the probe
    assert not guard.enter("admit")
    guard.succeeded()
    assert guard.available and guard.enter("admit")
    assert registry.get_sample_value("resilient_http_store_up") == 1


def test_a_failed_probe_skips_for_another_cooldown(clock: FakeClock, registry: CollectorRegistry) -> None:
    """A probe that fails skips the store at once, whatever the count of failures."""
    guard = make(clock, registry, failures=3)
    for _ in range(3):
        guard.failed("admit", TimeoutError())
    clock.advance(5.0)
    assert guard.enter("admit")
    guard.failed("admit", TimeoutError())
    assert not guard.enter("admit")
    clock.advance(5.0)
    assert guard.enter("admit")


def test_a_cancelled_probe_hands_the_probe_to_the_next_operation(clock: FakeClock, registry: CollectorRegistry) -> None:
    """A probe cancelled by its caller leaves no verdict, and does not leave the store skipped for ever."""
    guard = make(clock, registry, failures=1)
    guard.failed("admit", TimeoutError())
    clock.advance(5.0)
    assert guard.enter("admit")
    guard.abandoned()
    assert guard.enter("admit")


def test_an_outage_is_logged_once_and_its_end_once(
    clock: FakeClock, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """One WARNING when the store is first skipped, none for later failures, one INFO when it answers again."""
    caplog.set_level(logging.INFO, logger="resilient_http.store")
    guard = make(clock, registry, failures=2)
    for _ in range(2):
        guard.failed("admit", ConnectionError("Connection refused"))
    for _ in range(3):
        clock.advance(5.0)
        assert guard.enter("admit")
        guard.failed("admit", ConnectionError("Connection refused"))
    clock.advance(5.0)
    assert guard.enter("admit")
    guard.succeeded()
    records = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in records] == ["WARNING", "INFO"]
    assert "Connection refused" in records[0][1]


def test_bad_guard_settings_are_configuration_errors(clock: FakeClock, registry: CollectorRegistry) -> None:
    """failures and cooldown are checked when the store is made."""
    from resilient_http import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"store\.failures"):
        make(clock, registry, failures=0)
    with pytest.raises(ConfigurationError, match=r"store\.cooldown"):
        make(clock, registry, cooldown=float("inf"))
