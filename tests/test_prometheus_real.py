"""The dashboard and the alerting rules against a real Prometheus that scraped a run of the demo.

One run of ``python -m resilient_http demo`` (all its phases: errors, quota,
hang, outage, recovery) is scraped every second by this machine's
``prometheus``, with the alerting rules loaded and a scrape configuration
that sets a ``host`` target label. Then every query of the dashboard and
every alert expression is asked of Prometheus's HTTP API over the run.
Skipped when ``prometheus`` or ``promtool`` is not installed (Debian:
``apt-get install prometheus``).
"""

from __future__ import annotations

import math
import re
import subprocess
from collections.abc import Iterator

import pytest
import yaml
from prometheus_server import (
    DASHBOARDS,
    PROMETHEUS,
    PROMTOOL,
    SCRAPED_HOST,
    DemoRun,
    Prometheus,
    dashboard_queries,
    scraped_demo,
)

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="prometheus and promtool are not on PATH (Debian: apt-get install prometheus)",
)

ALERTS = DASHBOARDS / "alerts.yml"
DURATION = 20  # seconds of demo: every phase lasts 3 s or more, the last (recovery) 4 s
#: Metrics the demo deliberately never exports, and why: their queries must return nothing.
NO_EVENT = {
    "resilient_http_coalesced_total": "the demo's policies do not coalesce, and a layer that is off exports no series",
    "resilient_http_dry_run_blocked_total": "no layer of the demo's policies is in dry run",
    "resilient_http_fallbacks_total": "the demo's transport has no fallback function",
    "resilient_http_hedges_total": "the demo's policies do not hedge, and a layer that is off exports no series",
}


@pytest.fixture(scope="module")
def scraped() -> Iterator[tuple[Prometheus, DemoRun]]:
    with scraped_demo(DURATION, rules=ALERTS) as found:
        yield found


def _numbers(series: list[dict[str, object]]) -> list[float]:
    """Every value of a range query's answer that is a number (not NaN)."""
    found = [float(value) for each in series for _, value in each["values"]]  # type: ignore[attr-defined]
    return [value for value in found if not math.isnan(value)]


def test_promtool_accepts_the_alerting_rules() -> None:
    """`promtool check rules` finds every rule of alerts.yml valid."""
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_dashboard_query_returns_data_during_a_demo_run(scraped: tuple[Prometheus, DemoRun]) -> None:
    """Each panel's query returns numbers over the run, but those of a layer the demo leaves off."""
    prometheus, run = scraped
    empty, silent = [], []
    for title, _, expr in dashboard_queries():
        series = prometheus.query_range(expr, run.began, run.ended)
        deliberate = [name for name in NO_EVENT if name in expr]
        if deliberate:
            assert series == [], f"{title!r}: {deliberate} should have no series in the demo: {series}"
        elif not series:
            empty.append((title, expr))
        elif not _numbers(series):
            silent.append((title, expr))
    assert empty == [], f"queries without data: {empty}"
    assert silent == [], f"queries with only NaN: {silent}"


def _measures(expr: str) -> list[str]:
    """The parts of an alert expression joined by ``and``, without their thresholds: what must exist."""
    parts, depth, start = [], 0, 0
    for found in re.finditer(r"[()]|\band\b", expr):
        if found[0] == "(":
            depth += 1
        elif found[0] == ")":
            depth -= 1
        elif depth == 0:
            parts.append(expr[start : found.start()])
            start = found.end()
    parts.append(expr[start:])
    return [re.sub(r"\s*(==|!=|>=|<=|>|<)\s*[0-9.]+\s*$", "", part.strip()) for part in parts]


def test_every_alert_expression_measures_something_during_a_demo_run(scraped: tuple[Prometheus, DemoRun]) -> None:
    """Without its threshold, each alert's expression returns numbers over the run."""
    prometheus, run = scraped
    loaded = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
    written = [
        rule for group in yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"] for rule in group["rules"]
    ]
    assert [rule["name"] for rule in loaded] == [rule["alert"] for rule in written]
    for rule in loaded:
        assert rule["health"] == "ok", rule  # Prometheus evaluated it every second without an error
    for rule in written:
        for measure in _measures(rule["expr"]):
            series = prometheus.query_range(measure, run.began, run.ended)
            assert _numbers(series), f"{rule['alert']}: {measure!r} returned {series}"


def test_the_measures_of_an_alert_drop_only_its_thresholds() -> None:
    """The threshold and the traffic floor of an `and` are cut apart, the rest kept whole."""
    expr = "(\n  sum(rate(a[10m]))\n  /\n  sum(rate(b[10m]))\n) > 1.5\nand\nsum(rate(b[10m])) > 1\n"
    assert _measures(expr) == ["(\n  sum(rate(a[10m]))\n  /\n  sum(rate(b[10m]))\n)", "sum(rate(b[10m]))"]
    assert _measures("max by (x) (m) == 0\n") == ["max by (x) (m)"]


def test_the_demo_and_the_dashboard_count_the_same_shed_calls(scraped: tuple[Prometheus, DemoRun]) -> None:
    """The demo's "calls shed" is the dashboard's "Shed / s" summed over the run, as Prometheus scraped it."""
    prometheus, run = scraped
    [panel] = [expr for title, _, expr in dashboard_queries() if title == "Shed / s"]
    # The panel's rate, turned into the counters' last values: the calls shed over the whole run.
    total = re.sub(r"\brate\((.*)\[\w+\]\)", r"last_over_time(\1[10m])", panel)
    assert total != panel and "rate(" not in total, panel
    bare, resilient = run.row("calls shed")
    assert bare == "-"
    [found] = prometheus.query(total, run.ended)
    assert int(resilient) > 0, run.output  # the phases do shed calls: the comparison is not of two zeros
    assert float(found["value"][1]) == int(resilient), f"Prometheus {found}, demo {resilient}:\n{run.output}"


def test_the_host_called_survives_a_scrape_config_that_sets_host(scraped: tuple[Prometheus, DemoRun]) -> None:
    """A `host` target label stays the machine's; the dependency is in `server_address` and `server_port`."""
    prometheus, run = scraped
    series = prometheus.query_range(
        "sum by (host, server_address, server_port) (resilient_http_requests_total)", run.began, run.ended
    )
    labels = [each["metric"] for each in series]
    assert {label["host"] for label in labels} == {SCRAPED_HOST}
    assert {label["server_address"] for label in labels} == {"127.0.0.1"}
    assert len({label["server_port"] for label in labels}) == 2  # the demo's two upstreams
    assert prometheus.query_range('count({exported_host!=""})', run.began, run.ended) == []
