"""The Grafana dashboard and the alerting rules speak of metrics the library really exports.

Metric names, label names and closed label values are read from the library
itself (``resilient_http._metrics``), so renaming a metric or a label breaks
these tests until the dashboard and the rules follow.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from resilient_http import BulkheadFullError, CircuitOpenError, RateLimitedError
from resilient_http._metrics import CIRCUIT_STATES, LABELS, PREFIX, SPECS, outcome_of_exception, outcome_of_status

DASHBOARDS = Path(__file__).resolve().parent.parent / "dashboards"

#: Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})


def exported() -> dict[str, frozenset[str]]:
    """Every series name the library exports, with the label names it may carry."""
    names: dict[str, frozenset[str]] = {}
    for _, kind, name, _, label in SPECS:
        labels = frozenset(LABELS if label is None else (*LABELS, label)) | TARGET_LABELS
        full = PREFIX + name
        if kind == "counter":
            names[full + "_total"] = labels
        elif kind == "gauge":
            names[full] = labels
        else:
            names[full + "_bucket"] = labels | {"le"}
            names[full + "_sum"] = labels
            names[full + "_count"] = labels
    return names


def label_values() -> dict[tuple[str, str], frozenset[str]]:
    """The closed sets of label values: ``(metric, label) -> values``."""
    rejections = (
        CircuitOpenError("", host="h"),
        RateLimitedError("", host="h"),
        BulkheadFullError("", host="h"),
        httpx.ReadTimeout(""),
        httpx.ConnectError(""),
        BaseException(),
    )
    statuses = {outcome_of_status(status) for status in range(100, 600)}
    errors = {outcome_of_exception(exc) for exc in rejections}
    return {
        ("resilient_http_requests_total", "outcome"): frozenset(statuses | errors | {"stale"}),
        ("resilient_http_attempts_total", "outcome"): frozenset(statuses | {"timeout", "error", "cancelled"}),
        ("resilient_http_circuit_state", "state"): frozenset(CIRCUIT_STATES),
        ("resilient_http_timeouts_total", "kind"): frozenset({"attempt", "total"}),
    }


SELECTOR = re.compile(r"\b(resilient_http_\w+)\b(\{[^}]*\})?")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def check_expression(expr: str) -> set[str]:
    """Fail on any unknown metric, label or label value in ``expr``; the metrics it uses."""
    known = exported()
    values = label_values()
    used: set[str] = set()
    for found in SELECTOR.finditer(expr):
        name, selector = found.group(1), found.group(2) or ""
        assert name in known, f"{name} is not exported by resilient_http (in {expr!r})"
        used.add(name)
        for label, operator, value in MATCHER.findall(selector):
            assert label in known[name], f"{name} has no label {label!r} (in {expr!r})"
            allowed = values.get((name, label))
            if allowed is None or value.startswith("$"):
                continue
            wanted = value.split("|") if operator in ("=~", "!~") else [value]
            assert set(wanted) <= allowed, f"{name}{{{label}}} never takes {set(wanted) - allowed} (in {expr!r})"
    assert used, f"no resilient_http metric in {expr!r}"
    every_label = frozenset().union(*(known[name] for name in used))
    for grouping in GROUPING.findall(expr):
        for label in (each.strip() for each in grouping.split(",")):
            assert label in every_label, f"grouping by {label!r}, which none of {sorted(used)} has (in {expr!r})"
    return used


def check_breakers_stay_apart(expr: str) -> None:
    """An expression that groups breaker series keeps ``transport``: two transports' breakers never merge."""
    if "resilient_http_circuit_" not in expr:
        return
    for grouping in GROUPING.findall(expr):
        labels = {label.strip() for label in grouping.split(",")}
        assert {"transport", "host"} <= labels, f"grouping by {sorted(labels)} merges transports' breakers: {expr!r}"


def base_names(used: set[str]) -> set[str]:
    """The SPECS names behind exported series names."""
    return {re.sub(r"_(total|bucket|sum|count)$", "", name).removeprefix(PREFIX) for name in used}


# ---------------------------------------------------------------- the dashboard


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((DASHBOARDS / "grafana-resilient-http.json").read_text(encoding="utf-8"))
    return loaded


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def test_dashboard_is_a_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    """Schema version, a Prometheus data source variable, transport and host variables, unique panel ids."""
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    host = variables["host"]
    assert host["type"] == "query" and host["query"]["query"].startswith("label_values(resilient_http_requests_total")
    assert host["query"]["query"].endswith(", host)")
    transport = variables["transport"]
    assert transport["type"] == "query" and transport["query"]["query"].endswith(", transport)")
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids))


def test_every_panel_queries_the_chosen_data_source_and_hosts(dashboard: dict[str, Any]) -> None:
    """Each query goes to ``${datasource}`` and is filtered by the ``$transport`` and ``$host`` variables."""
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            for found in SELECTOR.finditer(target["expr"]):
                assert 'host=~"$host"' in (found.group(2) or ""), f"{panel['title']!r}: {found.group(0)}"
                assert 'transport=~"$transport"' in (found.group(2) or ""), f"{panel['title']!r}: {found.group(0)}"


def test_dashboard_queries_reference_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    """Every expression names real series, real labels and real label values; every metric has a panel."""
    used: set[str] = set()
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            used |= check_expression(target["expr"])
            check_breakers_stay_apart(target["expr"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            used |= check_expression(variable["query"]["query"])
    missing = {name for _, _, name, _, _ in SPECS} - base_names(used)
    assert not missing, f"metrics without a panel: {sorted(missing)}"


def test_dashboard_has_the_panels_operators_need(dashboard: dict[str, Any]) -> None:
    """Amplification, breaker state, stale share and latency quantiles are there, computed as documented."""
    exprs = " ".join(target["expr"] for panel in panels(dashboard) for target in panel.get("targets", []))
    compact = re.sub(r"\s+", "", exprs)
    assert (
        "sum by (host) (rate(resilient_http_attempts_total{" in exprs
        and ")/sumby(host)(rate(resilient_http_requests_total{" in compact
    )
    assert 'resilient_http_circuit_state{job=~"$job", transport=~"$transport", host=~"$host", state="open"}' in exprs
    assert 'outcome="stale"' in exprs
    for histogram in ("request_duration_seconds", "attempt_duration_seconds", "rate_limit_wait_seconds"):
        for quantile in ("0.5", "0.99"):
            assert f"histogram_quantile({quantile}, sum by (le, host) (rate(resilient_http_{histogram}_bucket" in exprs


# ---------------------------------------------------------------- the alerting rules


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((DASHBOARDS / "alerts.yml").read_text(encoding="utf-8"))
    assert set(document) == {"groups"}
    found: list[dict[str, Any]] = []
    for group in document["groups"]:
        assert group["name"] and group["rules"]
        found += group["rules"]
    return found


def test_alert_rules_are_complete(rules: list[dict[str, Any]]) -> None:
    """Each rule has a name, an expression, a duration, a severity and annotations naming the host."""
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        for key in ("summary", "description"):
            assert "{{ $labels.host }}" in rule["annotations"][key], f"{rule['alert']}: {key}"


def test_alert_expressions_reference_only_exported_metrics(rules: list[dict[str, Any]]) -> None:
    """Every expression names real series and labels, and keeps the host label its annotations use."""
    for rule in rules:
        check_expression(rule["expr"])
        check_breakers_stay_apart(rule["expr"])
        for grouping in GROUPING.findall(rule["expr"]):
            assert "host" in (label.strip() for label in grouping.split(",")), f"{rule['alert']} drops the host"


def test_alerts_cover_the_failure_modes() -> None:
    """Breaker, retry budget, stale share, amplification, bulkhead and rate limiter each have an alert."""
    text = (DASHBOARDS / "alerts.yml").read_text(encoding="utf-8")
    expressions = " ".join(rule["expr"] for group in yaml.safe_load(text)["groups"] for rule in group["rules"])
    for series in (
        "resilient_http_circuit_state",
        "resilient_http_retry_budget_exhausted_total",
        'resilient_http_requests_total{outcome="stale"}',
        "resilient_http_attempts_total",
        "resilient_http_bulkhead_rejected_total",
        "resilient_http_rate_limited_total",
    ):
        assert series in expressions, series


def test_the_checks_catch_a_renamed_metric() -> None:
    """The expression check itself fails on a name, a label or a value the library does not export."""
    check_expression('rate(resilient_http_requests_total{host=~"$host", outcome="stale"}[5m])')
    for wrong in (
        "rate(resilient_http_request_total[5m])",  # no _s
        "resilient_http_circuit_state_total",  # a gauge has no _total
        'resilient_http_circuit_state{state="opened"}',
        'rate(resilient_http_retries_total{kind="timeout"}[5m])',
        "sum by (reason) (rate(resilient_http_requests_total[5m]))",
    ):
        with pytest.raises(AssertionError):
            check_expression(wrong)
    check_breakers_stay_apart('max by (transport, host) (resilient_http_circuit_state{state="open"})')
    with pytest.raises(AssertionError):
        check_breakers_stay_apart('max by (host) (resilient_http_circuit_state{state="open"})')
