"""The rate limiter's token bucket: the sends made, the retries booked, and where one more call fits.

GCRA ("virtual scheduling"): the bucket is a theoretical arrival time
``tat``; a call may be sent at ``t`` when ``t >= tat - tolerance``, which
moves ``tat`` to ``max(tat, t) + interval``. Sends that each pass this
check, counted in any order, never put more than ``burst + rate * L`` calls
in a window of ``L`` seconds. The bucket counts the sends actually made, at
the time they are made, so a call that wakes late is checked when it goes.

Retries are booked ahead (a retry sleeps out its backoff and is then sent
without asking again): a booking is a send promised at a virtual time. A
call that arrives before a booking may go first if the booking still gets
its token; :meth:`Bucket.fit` finds the first time at which that holds.
Every time here is virtual: the rate limiter stops virtual time during a
server's cooldown, so that the bucket does not refill meanwhile.
"""

from __future__ import annotations

import bisect
import math

NEVER = -math.inf

#: The bucket after some sends, as :meth:`Bucket.fit` follows it: (tat, latest
#: send, index of the first booking not yet counted).
State = tuple[float, float, int]


class Bucket:
    """One host's bucket, with its bookings and the limits the server set (``floor``, pacing)."""

    __slots__ = ("bookings", "floor", "interval", "last", "pace", "pace_end", "tat", "tolerance")

    def __init__(self, rate: float, burst: int) -> None:
        self.limit(rate, burst)
        self.tat = NEVER  # the bucket is full while this is in the past
        self.last = NEVER  # the latest send, from which pacing is measured
        self.bookings: list[float] = []  # retries' send times, in order
        self.floor = NEVER  # nothing is sent before this (a cooldown's end)
        self.pace = 0.0  # sends at least this far apart ...
        self.pace_end = NEVER  # ... until then

    def limit(self, rate: float, burst: int) -> None:
        """Space the sends to come by ``rate`` and ``burst``; the sends made and the bookings stay where they are."""
        self.interval = 1.0 / rate
        self.tolerance = (burst - 1) * self.interval

    @property
    def now(self) -> State:
        """The bucket as the sends made leave it."""
        return self.tat, self.last, 0

    def fit(self, state: State, earliest: float) -> tuple[float, State]:
        """The first time at or after ``earliest`` at which one more call may go after ``state``, and the state then.

        The call honours the floor and the pacing, and leaves every later
        booking its token; bookings due before its turn are counted first.
        """
        tat, last, i = state
        bookings = self.bookings
        interval, tolerance = self.interval, self.tolerance
        while True:
            turn = max(earliest, tat - tolerance, self.floor)
            if turn < self.pace_end:
                turn = max(turn, min(last + self.pace, self.pace_end))
            if i < len(bookings) and bookings[i] <= turn:  # a retry booked before it goes first
                tat = max(tat, bookings[i]) + interval
                last = max(last, bookings[i])
                i += 1
                continue
            # Sending at ``turn`` must leave each later booking its token: follow
            # the bucket with and without this call until the two agree.
            ahead, behind = max(tat, turn) + interval, tat
            j = i
            while j < len(bookings) and ahead > behind:
                booked = bookings[j]
                if booked < ahead - tolerance:
                    break
                ahead = max(ahead, booked) + interval
                behind = max(behind, booked) + interval
                j += 1
            else:
                return turn, (max(tat, turn) + interval, max(last, turn), i)
            while i <= j:  # it would take booking j's token: go after it
                tat = max(tat, bookings[i]) + interval
                last = max(last, bookings[i])
                i += 1
            earliest = max(earliest, bookings[j])

    def settle(self, now: float) -> int:
        """Count the bookings due by ``now`` as sends and forget them; return how many there were."""
        bookings = self.bookings
        if not bookings or bookings[0] > now:
            return 0
        due = bisect.bisect_right(bookings, now)
        tat, last = self.tat, self.last
        for booked in bookings[:due]:
            tat = max(tat, booked) + self.interval
            last = max(last, booked)
        self.tat, self.last = tat, last
        del bookings[:due]
        return due

    def send(self, now: float) -> None:
        """Count a send made at ``now`` (the bookings due having been settled)."""
        self.tat = max(self.tat, now) + self.interval
        self.last = max(self.last, now)

    def book(self, turn: float) -> None:
        """Promise a retry the send time ``turn`` (as :meth:`fit` gave it)."""
        bisect.insort(self.bookings, turn)
