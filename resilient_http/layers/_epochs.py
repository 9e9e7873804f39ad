"""Where a time bucket of a sliding window ends, so that the hot path can tell "same bucket" with one comparison.

The breaker's window and the retry budget count outcomes in buckets of
``width`` seconds: a time ``t`` falls in bucket ``int(t / width)``. Finding
it costs a division, a conversion and a look-up on every call, and nearly
every call falls in the same bucket as the one before. :func:`bucket_end`
gives the first time of the next bucket, computed with the same division,
so that ``start <= t < end`` holds exactly when ``int(t / width)`` is the
bucket of ``start``: ``int(t / width)`` never decreases as ``t`` grows (a
correctly rounded division by a positive number is monotonic, and so is
truncation), and the bound is moved to the very float where it steps.
Before time zero, where truncation makes one bucket twice as wide, there
is no such shortcut: the end is ``-inf``, and every time takes the long way.
"""

from __future__ import annotations

import math


def bucket_end(epoch: int, width: float) -> float:
    """The least time ``t`` with ``int(t / width) > epoch`` (``-inf`` for a bucket before time zero)."""
    if epoch < 0:
        return -math.inf
    end = (epoch + 1) * width
    while int(end / width) <= epoch:
        end = math.nextafter(end, math.inf)
    while True:
        before = math.nextafter(end, -math.inf)
        if int(before / width) <= epoch:
            return end
        end = before
