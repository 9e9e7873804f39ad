"""The checks every policy field goes through: numbers within documented bounds, whatever their type.

Every number has bounds because a value accepted here
must never make a call crash or a layer silently do nothing later: a rate of
``1e-300`` is an interval of ``1e300`` seconds, a window of ``1e-320``
divides by almost nothing, ``10**400`` does not fit in a float. Seconds lie
between :data:`MIN_SECONDS` (a millisecond) and :data:`MAX_SECONDS` (a
year); rates between one call a year and :data:`MAX_RATE` a second; counts
of calls up to :data:`MAX_CALLS`. Any real number is accepted (``int``,
``float``, ``Decimal``, ``Fraction``, numpy scalars) except ``bool``, NaN and
infinities; one that is not a plain ``int`` or ``float`` is stored as a
``float`` (an ``int`` for counts), so the layers only ever do plain arithmetic.

Each ``check_*`` helper validates one field of a frozen policy in place
(from its ``__post_init__``) and raises :class:`ConfigurationError` naming
the field, the value and the bound it broke. A new policy field should use
them rather than a rule of its own.
"""

from __future__ import annotations

import math
import numbers
import operator
import re
from collections.abc import Collection
from decimal import Decimal
from typing import Any

from ._errors import ConfigurationError

#: The shortest duration any policy field accepts (0 aside, where 0 means "never").
MIN_SECONDS = 0.001
#: The longest: a year.
MAX_SECONDS = 365 * 24 * 3600.0
#: The highest rate (calls a second) any policy field accepts; the lowest is one a year.
MAX_RATE = 1_000_000.0
#: The most calls any count of calls accepts (burst, queue, concurrency, trials, entries).
MAX_CALLS = 1_000_000
#: The most tries a call may make: past about a thousand, the backoff ``backoff * 2**n`` no longer fits a float.
MAX_ATTEMPTS = 100
#: The most bytes a byte count accepts: 1 TiB.
MAX_BYTES = 1 << 40
#: The longest retry budget window (a count is kept for each of its seconds).
MAX_BUDGET_WINDOW = 60.0


def _name(policy: object, name: str) -> str:
    return f"{type(policy).__name__}.{name}"


def _bound(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:.3g}"


def _is_real(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real | Decimal)


def _is_whole(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def _real(policy: object, name: str, value: Any) -> float:
    """``value`` as a float (``±inf`` when too big for one); refuses non-numbers and NaN."""
    if not _is_real(value):
        raise ConfigurationError(_name(policy, name), value, "must be a number")
    try:
        number = float(value)
    except OverflowError:  # an int or Decimal beyond a float's range
        number = math.inf if value > 0 else -math.inf
    except (ValueError, TypeError):  # a signalling NaN, an odd numeric type
        number = math.nan
    if math.isnan(number):
        raise ConfigurationError(_name(policy, name), value, "must be a number, not NaN")
    if number == 0 and value != 0:  # too small for a float: never silently zero
        number = math.ulp(0.0) if value > 0 else -math.ulp(0.0)
    return number


def _ranged(
    policy: object, name: str, low: float, high: float, unit: str, *, zero: bool = False, optional: bool = False
) -> None:
    value = getattr(policy, name)
    if value is None and optional:
        return
    number = _real(policy, name, value)
    if number < low and not (zero and number == 0):
        least = f"{'0 or ' if zero else ''}at least {_bound(low)}{unit}"
        raise ConfigurationError(_name(policy, name), value, f"must be {least}")
    if number > high:
        raise ConfigurationError(_name(policy, name), value, f"must be at most {_bound(high)}{unit}")
    if type(value) is not int and type(value) is not float:
        object.__setattr__(policy, name, number)


def check_seconds(
    policy: object,
    name: str,
    *,
    zero: bool = False,
    optional: bool = False,
    low: float = MIN_SECONDS,
    high: float = MAX_SECONDS,
) -> None:
    """Check that field ``name`` of ``policy`` is a duration within ``[low, high]`` and store it as a float.

    ``zero`` also allows 0 (for fields where 0 means "never wait");
    ``optional`` allows ``None``.
    """
    _ranged(policy, name, low, high, " seconds", zero=zero, optional=optional)


def check_rate(policy: object, name: str, *, zero: bool = False, high: float = MAX_RATE) -> None:
    """Check that field ``name`` is a rate (per second) from one a year to ``high``; store it as a float."""
    _ranged(policy, name, 1 / MAX_SECONDS, high, " a second", zero=zero)


def check_ratio(policy: object, name: str, *, zero: bool = True) -> None:
    """Check that field ``name`` is a ratio in ``[0, 1]`` (``(0, 1]`` without ``zero``); store it as a float."""
    value = getattr(policy, name)
    number = _real(policy, name, value)
    if not 0 <= number <= 1 or (number == 0 and not zero):
        raise ConfigurationError(_name(policy, name), value, f"must be {'from' if zero else 'above'} 0 and at most 1")
    if type(value) is not int and type(value) is not float:
        object.__setattr__(policy, name, number)


def check_count(policy: object, name: str, low: int, high: int, *, optional: bool = False) -> None:
    """Check that field ``name`` is a whole number within ``[low, high]``; store it as an ``int``.

    Integral types other than ``int`` (numpy's, say) are accepted; floats,
    even whole ones, and ``bool`` are not.
    """
    value = getattr(policy, name)
    if value is None and optional:
        return
    if not _is_whole(value):
        raise ConfigurationError(_name(policy, name), value, "must be a whole number")
    number = operator.index(value)
    if number < low:
        raise ConfigurationError(_name(policy, name), value, f"must be at least {low}")
    if number > high:
        raise ConfigurationError(_name(policy, name), value, f"must be at most {high}")
    if type(value) is not int:
        object.__setattr__(policy, name, number)


def check_statuses(policy: object, name: str) -> None:
    """Check that field ``name`` is a collection of HTTP status codes; store it as a frozenset of ints."""
    value = getattr(policy, name)
    if isinstance(value, str | bytes) or not isinstance(value, Collection):
        raise ConfigurationError(_name(policy, name), value, "must be a collection of HTTP status codes")
    codes = set()
    for status in value:
        code = operator.index(status) if _is_whole(status) else -1
        if not 100 <= code <= 599:
            raise ConfigurationError(_name(policy, name), value, f"{status!r} is not an HTTP status code")
        codes.add(code)
    object.__setattr__(policy, name, frozenset(codes))


def check_number(policy: object, name: str, low: float, high: float) -> None:
    """Check that field ``name`` is a plain number (a factor, say) within ``[low, high]``; store it as a float."""
    _ranged(policy, name, low, high, "")


def check_choice(policy: object, name: str, choices: Collection[str]) -> None:
    """Check that field ``name`` is one of the strings ``choices``."""
    value = getattr(policy, name)
    if not isinstance(value, str) or value not in choices:
        raise ConfigurationError(_name(policy, name), value, f"must be one of {', '.join(map(repr, choices))}")


_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Z]+")  # a token (RFC 9110 §9.1) without lower-case letters


def check_methods(policy: object, name: str) -> None:
    """Check that field ``name`` is a collection of request methods; store it as a frozenset of str.

    Methods are case-sensitive (RFC 9110 §9.1) and httpx sends them
    upper-case, so ``"post"`` is refused rather than silently never matching.
    """
    value = getattr(policy, name)
    if isinstance(value, str | bytes) or not isinstance(value, Collection):
        raise ConfigurationError(_name(policy, name), value, "must be a collection of request methods")
    for method in value:
        if not isinstance(method, str) or not _METHOD.fullmatch(method):
            raise ConfigurationError(_name(policy, name), value, f"{method!r} is not an upper-case request method")
    object.__setattr__(policy, name, frozenset(value))


def not_above(policy: object, name: str, other: str) -> None:
    """A cross-field rule: field ``name`` must not exceed field ``other``."""
    value, limit = getattr(policy, name), getattr(policy, other)
    if value is not None and limit is not None and value > limit:
        raise ConfigurationError(_name(policy, name), value, f"must not exceed {_name(policy, other)} ({limit})")


def not_below(policy: object, name: str, other: str) -> None:
    """A cross-field rule: field ``name`` must not be below field ``other``."""
    value, limit = getattr(policy, name), getattr(policy, other)
    if value is not None and limit is not None and value < limit:
        raise ConfigurationError(_name(policy, name), value, f"must not be below {_name(policy, other)} ({limit})")
