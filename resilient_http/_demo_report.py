"""The demo's final table: what each client's calls did, side by side."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

#: How a policy file names the demo's two hosts (both on port 80).
API, SEARCH = "api.demo", "search.demo"
RECOVERED_AFTER = 5  # consecutive fresh successes that say a host is back
SHED = ("circuit_open", "rate_limited", "bulkhead_full")


@dataclass(frozen=True, slots=True)
class Record:
    """One finished call, as its caller saw it."""

    host: str
    started: float
    finished: float
    ok: bool  # a 2xx answer, stale or fresh
    stale: bool
    outcome: str  # the status, "stale", or the exception's name


@dataclass(frozen=True, slots=True)
class Summary:
    """One column of the final table."""

    name: str
    started: int
    records: list[Record]
    attempts: int
    answered: Counter[str]  # by the upstreams: status or "reset"
    breaker_openings: int | None
    shed: int | None
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
        return {
            "calls": str(self.started),
            "success rate (2xx)": self.success(),
            "  fresh, not stale": self.success(fresh=True),
            f"  {API}": self.success(API),
            f"  {SEARCH}": self.success(SEARCH),
            "upstream attempts per call": f"{self.attempts / self.started:.2f}" if self.started else "-",
            "p50 latency": self.latency(0.50),
            "p99 latency": self.latency(0.99),
            "stale answers": str(sum(r.stale for r in self.records)),
            "breaker openings": "-" if self.breaker_openings is None else str(self.breaker_openings),
            "calls shed": "-" if self.shed is None else str(self.shed),
            "time to recover": self.recovery,
        }

    def failures(self) -> str:
        return _counts(Counter(r.outcome for r in self.records if not r.ok))


def _counts(counts: Counter[str]) -> str:
    return ", ".join(f"{kind} x{count}" for kind, count in counts.most_common()) or "none"


def _recovery(records: list[Record], outage_end: float, now: float) -> str:
    """Seconds from the end of the outage to the first of ``RECOVERED_AFTER`` fresh successes in a row, per host."""
    if now < outage_end:
        return "n/a"
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


def summarise(
    name: str,
    started: int,
    records: list[Record],
    attempts: int,
    answered: Counter[str],
    registry: CollectorRegistry | None,
    outage_end: float,
    ended: float,
) -> Summary:
    """One client's column; breaker openings and calls shed come from its transport's ``registry``."""
    openings = shed = None
    if registry is not None:
        openings = _metric_sum(registry, "resilient_http_circuit_opened_total")
        # A shed call is answered stale when the cache can: count both ways out.
        shed = _metric_sum(registry, "resilient_http_requests_total", "outcome", SHED) + _metric_sum(
            registry, "resilient_http_stale_served_total", "reason", SHED
        )
    return Summary(name, started, records, attempts, answered, openings, shed, _recovery(records, outage_end, ended))


def _metric_sum(registry: CollectorRegistry, name: str, label: str | None = None, values: tuple[str, ...] = ()) -> int:
    total = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name and (label is None or sample.labels.get(label) in values):
                total += sample.value
    return int(total)


def final_table(summaries: list[Summary]) -> list[str]:
    rows = [summary.rows() for summary in summaries]
    lines = [f"{'':28}" + "".join(f"{summary.name:>18}" for summary in summaries)]
    for key in rows[0]:
        lines.append(f"{key:28}" + "".join(f"{row[key]:>18}" for row in rows))
    lines.append("")
    lines.append("(2xx includes stale answers; attempts are counted at the upstreams, so a call answered")
    lines.append(" from the stale cache or shed before the network costs none)")
    for summary in summaries:
        lines.append(f"{summary.name} callers saw: {summary.failures()} (failures)")
        lines.append(f"{summary.name} upstreams answered: {_counts(summary.answered)}")
    return lines
