"""The demo's final table: what each client's calls did, side by side, and why they differ.

Every number comes from the calls themselves (one :class:`Record` each, made
by the side that made the call) or from the upstreams that received them, so
that the table says what the callers and the servers saw, not what a
process's metrics happened to hold.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

#: How a policy file names the demo's two hosts (both on port 80).
API, SEARCH = "api.demo", "search.demo"
RECOVERED_AFTER = 5  # consecutive fresh successes that say a host is back

#: The outcome labels of a call refused locally: see :func:`shed_by`.
SHED = ("circuit_open", "rate_limited", "bulkhead_full")


def shed_by(outcome: str, stale_reason: str | None = None) -> str | None:
    """Which layer *shed* a call: ``"circuit_open"``, ``"rate_limited"``, ``"bulkhead_full"``, or ``None``.

    A call is shed when resilient_http refused it locally, before or instead
    of the network: the circuit breaker (``CircuitOpenError``), the rate
    limiter (``RateLimitedError``, a server's cooldown included) or the
    bulkhead (``BulkheadFullError``). That is one definition, whatever
    became of the call next: a shed call the stale cache then answered
    counts as shed *and* as stale. A call that reached the network and
    failed there, or timed out, was not shed, even when answered stale.

    ``outcome`` is the call's outcome label (``outcome_of_exception`` of the
    exception it raised, or the status class of its answer) and
    ``stale_reason`` is ``CallInfo.stale_reason`` for a stale answer. The
    transport counts each shed call the same way, once, in
    ``resilient_http_shed_total{reason}``, which the dashboard and the alerts
    read (``sum(rate(resilient_http_shed_total[1m]))``); a test checks the
    two agree call by call.
    """
    if outcome in SHED:
        return outcome
    if stale_reason in SHED:
        return stale_reason
    return None


class Record(NamedTuple):
    """One finished call, as its caller saw it; times in seconds from the start of the timeline."""

    host: str
    started: float
    finished: float
    ok: bool  # a 2xx answer, stale or fresh
    stale: bool
    outcome: str  # the status, "stale", or the exception's name
    shed: str | None = None  # the layer that refused it (see shed_by)
    stale_reason: str | None = None  # what failed in the place of a stale answer


@dataclass(frozen=True, slots=True)
class Summary:
    """One column of the final table."""

    name: str
    due: int  # calls the schedule asked of this client
    started: int
    records: Sequence[Record]
    attempts: int
    answered: Counter[str]  # by the upstreams: status or "reset"
    breaker_openings: int | None  # None: a client without these layers
    recovery: str

    def success(self, host: str | None = None, *, fresh: bool = False) -> str:
        """The share of finished calls answered 2xx (fresh ones only, if ``fresh``)."""
        records = [r for r in self.records if host is None or r.host == host]
        good = sum(r.ok and not (fresh and r.stale) for r in records)
        return f"{100 * good / len(records):.1f} %" if records else "-"

    def latency(self, quantile: float) -> str:
        if not self.records:
            return "-"
        latencies = sorted(r.finished - r.started for r in self.records)
        ms = 1000 * latencies[max(0, math.ceil(quantile * len(latencies)) - 1)]
        return f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"

    def rows(self) -> dict[str, str]:
        has_layers = self.breaker_openings is not None
        return {
            "calls": str(self.due),
            "  not started (demo's cap)": str(self.due - self.started),
            "  unfinished at the end": str(self.started - len(self.records)),
            "success rate (2xx)": self.success(),
            "  fresh, not stale": self.success(fresh=True),
            f"  {API}": self.success(API),
            f"  {SEARCH}": self.success(SEARCH),
            "upstream attempts per call": f"{self.attempts / self.started:.2f}" if self.started else "-",
            "p50 latency": self.latency(0.50),
            "p99 latency": self.latency(0.99),
            "stale answers": str(sum(r.stale for r in self.records)),
            "breaker openings": str(self.breaker_openings) if has_layers else "-",
            "calls shed": str(sum(r.shed is not None for r in self.records)) if has_layers else "-",
            "time to recover": self.recovery,
        }

    def failures(self) -> str:
        return _counts(Counter(r.outcome for r in self.records if not r.ok))


def _counts(counts: Counter[str]) -> str:
    return ", ".join(f"{kind} x{count}" for kind, count in counts.most_common()) or "none"


def recovery(records: Iterable[Record], outage_end: float, now: float) -> str:
    """Seconds from the end of the outage to the first of ``RECOVERED_AFTER`` fresh successes in a row, per host."""
    if now < outage_end:
        return "n/a"
    records = list(records)
    worst = 0.0
    for host in (API, SEARCH):
        after = sorted((r for r in records if r.host == host and r.started >= outage_end), key=lambda r: r.started)
        run = 0
        for i, record in enumerate(after):
            run = run + 1 if record.ok and not record.stale else 0
            if run == RECOVERED_AFTER:
                worst = max(worst, after[i - RECOVERED_AFTER + 1].finished - outage_end)
                break
        else:
            return "not yet"
    return f"{worst:.2f} s"


def final_table(summaries: list[Summary]) -> list[str]:
    rows = [summary.rows() for summary in summaries]
    lines = [f"{'':28}" + "".join(f"{summary.name:>18}" for summary in summaries)]
    for key in rows[0]:
        lines.append(f"{key:28}" + "".join(f"{row[key]:>18}" for row in rows))
    lines.append("")
    lines.append("(rates and latencies are over the calls that finished; 2xx includes stale answers; attempts")
    lines.append(" are counted at the upstreams, so a call answered from the stale cache or shed before the")
    lines.append(" network costs none; a shed call refused by the breaker, the rate limiter or the bulkhead")
    lines.append(" counts as shed even when the stale cache then answered it)")
    for summary in summaries:
        lines.append(f"{summary.name} callers saw: {summary.failures()} (failures)")
        lines.append(f"{summary.name} upstreams answered: {_counts(summary.answered)}")
    return lines


#: Why a stale answer was given, briefly, by ``CallInfo.stale_reason``.
_REASONS = {
    "rate_limited": "rate limiter",
    "circuit_open": "breaker open",
    "bulkhead_full": "bulkhead full",
    "server_error": "5xx after retries",
    "timeout": "timed out",
    "error": "connection failed",
}

#: What lies behind the reason that served the most stale answers, and how to change it.
_EXPLAIN = {
    "rate_limited": [
        "a 429, or a 503 with Retry-After, makes the rate limiter hold the whole host back for as long as",
        "it asks, and a call that cannot wait that long is answered stale. To wait for a fresh answer",
        "instead (slower calls), give rate_limit a max_wait longer than the server's Retry-After",
        '(README: "Fewer fresh answers than bare httpx").',
    ],
    "circuit_open": [
        "the circuit breaker opened on failures and answered stale until a probe succeeded; a shorter",
        'break_duration probes sooner (README: "Fewer fresh answers than bare httpx").',
    ],
}


def why_fewer_fresh(
    bare: Sequence[Record], resilient: Sequence[Record], phases: Sequence[tuple[str, float, float]]
) -> list[str]:
    """Lines that explain the phases in which resilient_http gave a smaller share of fresh answers than bare httpx.

    ``phases`` are ``(name, begin, end)`` on the records' time line; calls
    belong to the phase they started in. A phase is explained when the
    share of fresh answers is lower by :data:`NOTABLE` or more, by the
    reasons of the resilient client's stale answers in it; the reason behind
    most of them all is explained in words, with how to change it.
    """
    lines: list[str] = []
    top: Counter[str] = Counter()
    for name, begin, end in phases:
        ours = [r for r in resilient if begin <= r.started < end]
        theirs = [r for r in bare if begin <= r.started < end]
        reasons = Counter(r.stale_reason or "other" for r in ours if r.stale)
        if not ours or not theirs or not reasons or _fresh(ours) > _fresh(theirs) - NOTABLE:
            continue
        top.update(reasons)
        counts = ", ".join(f"{count} ({_REASONS.get(why, why)})" for why, count in reasons.most_common())
        lines.append(
            f"  {name:<9} {100 * _fresh(ours):3.0f} % fresh against {100 * _fresh(theirs):3.0f} %; stale: {counts}"
        )
    if not lines:
        return []
    head = "why resilient_http gave fewer fresh answers than bare httpx (it answered stale instead):"
    return [head, *lines, *(f"  {line}" for line in _EXPLAIN.get(top.most_common(1)[0][0], []))]


NOTABLE = 0.05  # a smaller difference in the share of fresh answers is a few calls either way


def _fresh(records: Sequence[Record]) -> float:
    return sum(r.ok and not r.stale for r in records) / len(records)
