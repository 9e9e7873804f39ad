"""The public API: exactly the names in __all__, and the testing helpers users build on."""

from __future__ import annotations

import types

import httpx
import pytest

import resilient_http
from resilient_http.testing import FakeClock


def test_all_is_sorted_and_exactly_the_public_names() -> None:
    """__all__ lists every public name of the package, sorted, and nothing else (submodules aside)."""
    public = sorted(
        name
        for name in dir(resilient_http)
        if not name.startswith("_") and not isinstance(getattr(resilient_http, name), types.ModuleType)
    )
    assert resilient_http.__all__ == sorted(resilient_http.__all__)
    assert resilient_http.__all__ == public


def test_every_exported_name_is_defined_by_the_package() -> None:
    """Each exported name is resilient_http's own, not a re-exported third-party object."""
    for name in resilient_http.__all__:
        value = getattr(resilient_http, name)
        assert value.__module__.startswith("resilient_http."), name
        assert value.__name__ == name


def test_star_import_gives_exactly_all() -> None:
    """`from resilient_http import *` brings in __all__ and only __all__."""
    namespace: dict[str, object] = {}
    exec("from resilient_http import *", namespace)
    assert sorted(name for name in namespace if name != "__builtins__") == resilient_http.__all__


def test_the_client_is_an_httpx_client() -> None:
    """ResilientClient is an httpx.AsyncClient (httpx2's in that flavour), so code typed on AsyncClient takes it."""
    assert issubclass(resilient_http.ResilientClient, httpx.AsyncClient)
    assert issubclass(resilient_http.ResilientTransport, httpx.AsyncBaseTransport)


def test_the_version_is_a_string() -> None:
    """__version__ is there for tools and bug reports."""
    assert isinstance(resilient_http.__version__, str)
    assert resilient_http.__version__.count(".") >= 1


def test_the_fake_clock_starts_where_it_is_told() -> None:
    """FakeClock's monotonic and wall times start at the given values."""
    clock = FakeClock(start=5.0, wall=1_000_000.0)
    assert (clock.now(), clock.wall(), clock.sleeps) == (5.0, 1_000_000.0, [])


def test_the_fake_clock_moves_both_times_together() -> None:
    """advance() moves monotonic and wall time by the same amount."""
    clock = FakeClock()
    now, wall = clock.now(), clock.wall()
    clock.advance(2.5)
    assert (clock.now() - now, clock.wall() - wall) == (2.5, 2.5)


def test_the_fake_clock_never_goes_back() -> None:
    """advance() refuses a negative step."""
    clock = FakeClock()
    with pytest.raises(ValueError, match="back"):
        clock.advance(-1)


async def test_sleeping_on_the_fake_clock_is_instant_and_recorded() -> None:
    """sleep() moves time forward by the requested seconds and records them, without waiting."""
    clock = FakeClock(start=0.0)
    await clock.sleep(3.0)
    await clock.sleep(0.5)
    await clock.sleep(-1.0)  # recorded as asked, but time never goes back
    assert clock.now() == 3.5
    assert clock.sleeps == [3.0, 0.5, -1.0]
