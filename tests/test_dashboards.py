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
from resilient_http._metrics import CIRCUIT_STATES, LABELS, PREFIX, SHED, SPECS, outcome_of_exception, outcome_of_status

DASHBOARDS = Path(__file__).resolve().parent.parent / "dashboards"

#: Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})
#: The labels that name the host called: grouping by one of them needs the other.
SERVER = ("server_address", "server_port")


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
        ("resilient_http_timeouts_total", "kind"): frozenset({"attempt", "total", "idle"}),
        ("resilient_http_shed_total", "reason"): frozenset(SHED),
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
        assert {"transport", *SERVER} <= labels, f"grouping by {sorted(labels)} merges transports' breakers: {expr!r}"


def check_hosts_stay_apart(expr: str) -> None:
    """Grouping by the host called keeps both its address and its port: two ports are two dependencies."""
    for grouping in GROUPING.findall(expr):
        labels = {label.strip() for label in grouping.split(",")}
        if labels & set(SERVER):
            assert set(SERVER) <= labels, f"grouping by {sorted(labels)} merges the ports of a host: {expr!r}"
    assert not re.search(r"\bhost\b(?!\w)", re.sub(r"\$labels\.\w+", "", expr)), f"a host label in {expr!r}"


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
    server = variables["server_address"]
    assert server["type"] == "query"
    assert server["query"]["query"].startswith("label_values(resilient_http_requests_total")
    assert server["query"]["query"].endswith(", server_address)")
    assert "host" not in variables
    transport = variables["transport"]
    assert transport["type"] == "query" and transport["query"]["query"].endswith(", transport)")
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids))


def test_every_panel_queries_the_chosen_data_source_and_hosts(dashboard: dict[str, Any]) -> None:
    """Each query goes to ``${datasource}`` and is filtered by the ``$transport`` and ``$server_address`` variables."""
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            for found in SELECTOR.finditer(target["expr"]):
                assert 'server_address=~"$server_address"' in (found.group(2) or ""), (
                    f"{panel['title']!r}: {found.group(0)}"
                )
                assert 'transport=~"$transport"' in (found.group(2) or ""), f"{panel['title']!r}: {found.group(0)}"


def test_dashboard_queries_reference_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    """Every expression names real series, real labels and real label values; every metric has a panel."""
    used: set[str] = set()
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            used |= check_expression(target["expr"])
            check_breakers_stay_apart(target["expr"])
            check_hosts_stay_apart(target["expr"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            used |= check_expression(variable["query"]["query"])
    missing = {name for _, _, name, _, _ in SPECS} - base_names(used)
    assert not missing, f"metrics without a panel: {sorted(missing)}"


def test_dashboard_has_the_panels_operators_need(dashboard: dict[str, Any]) -> None:
    """Amplification, breaker state, stale share and latency quantiles are there, computed as documented."""
    exprs = " ".join(target["expr"] for panel in panels(dashboard) for target in panel.get("targets", []))
    compact = re.sub(r"\s+", "", exprs)
    by_server = "by (server_address, server_port)"
    assert (
        f"sum {by_server} (rate(resilient_http_attempts_total{{" in exprs
        and ")/sumby(server_address,server_port)(rate(resilient_http_requests_total{" in compact
    )
    assert (
        'resilient_http_circuit_state{job=~"$job", transport=~"$transport", server_address=~"$server_address", '
        'state="open"}' in exprs
    )
    assert 'outcome="stale"' in exprs
    for histogram in ("request_duration_seconds", "attempt_duration_seconds", "rate_limit_wait_seconds"):
        for quantile in ("0.5", "0.99"):
            grouped = f"sum by (le, server_address, server_port) (rate(resilient_http_{histogram}_bucket"
            assert f"histogram_quantile({quantile}, {grouped}" in exprs


def test_the_dashboard_counts_shed_calls_by_the_one_definition(dashboard: dict[str, Any]) -> None:
    """ "Shed / s" is every local refusal, stale or not: `shed_total`, not a share of the outcomes."""
    [shed] = [panel for panel in panels(dashboard) if panel["title"] == "Shed / s"]
    [target] = shed["targets"]
    assert target["expr"].startswith("sum(rate(resilient_http_shed_total{")
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            if "shed" in panel["title"].lower():
                assert "resilient_http_shed_total" in target["expr"], panel["title"]


def test_the_dashboard_draws_the_configured_limits(dashboard: dict[str, Any]) -> None:
    """In flight beside the bulkhead's limit, calls made beside the rate limit: "at its limit" can be seen."""
    for panel in panels(dashboard):
        exprs = " ".join(target["expr"] for target in panel.get("targets", []))
        if "resilient_http_bulkhead_limit" in exprs:
            assert "resilient_http_bulkhead_in_flight" in exprs
        if "resilient_http_rate_limit_per_second" in exprs:
            assert "resilient_http_requests_total" in exprs and "resilient_http_rate_limit_burst" in exprs


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
            where = "{{ $labels.server_address }}:{{ $labels.server_port }}"
            assert where in rule["annotations"][key], f"{rule['alert']}: {key}"


def test_alert_expressions_reference_only_exported_metrics(rules: list[dict[str, Any]]) -> None:
    """Every expression names real series and labels, and keeps the host label its annotations use."""
    for rule in rules:
        check_expression(rule["expr"])
        check_breakers_stay_apart(rule["expr"])
        check_hosts_stay_apart(rule["expr"])
        for grouping in re.findall(r"\bby\s*\(([^)]*)\)", rule["expr"]):
            labels = {label.strip() for label in grouping.split(",")}
            assert set(SERVER) <= labels, f"{rule['alert']} drops the host"


def test_alerts_cover_the_failure_modes() -> None:
    """Breaker, retry budget, stale share, amplification and shed calls (by refusing layer) each have an alert."""
    text = (DASHBOARDS / "alerts.yml").read_text(encoding="utf-8")
    expressions = " ".join(rule["expr"] for group in yaml.safe_load(text)["groups"] for rule in group["rules"])
    for series in (
        "resilient_http_circuit_state",
        "resilient_http_retry_budget_exhausted_total",
        'resilient_http_requests_total{outcome="stale"}',
        "resilient_http_attempts_total",
        "resilient_http_shed_total",
    ):
        assert series in expressions, series


def test_the_checks_catch_a_renamed_metric() -> None:
    """The expression check itself fails on a name, a label or a value the library does not export."""
    check_expression('rate(resilient_http_requests_total{server_address=~"$server_address", outcome="stale"}[5m])')
    for wrong in (
        "rate(resilient_http_request_total[5m])",  # no _s
        "resilient_http_circuit_state_total",  # a gauge has no _total
        'resilient_http_circuit_state{state="opened"}',
        'rate(resilient_http_retries_total{kind="timeout"}[5m])',
        "sum by (reason) (rate(resilient_http_requests_total[5m]))",
        'rate(resilient_http_requests_total{host=~"$host"}[5m])',  # the label is server_address now
    ):
        with pytest.raises(AssertionError):
            check_expression(wrong)
    check_breakers_stay_apart(
        'max by (transport, server_address, server_port) (resilient_http_circuit_state{state="open"})'
    )
    with pytest.raises(AssertionError):
        check_breakers_stay_apart('max by (server_address, server_port) (resilient_http_circuit_state{state="open"})')
    with pytest.raises(AssertionError):
        check_hosts_stay_apart("sum by (server_address) (rate(resilient_http_requests_total[5m]))")
