"""Draw the dashboard's main panels from a real Prometheus's answers during a run of the demo.

    python dashboards/draw_panels.py [--duration 40] [--out dashboards/panels.png]

Starts this machine's ``prometheus`` (scraping every second), runs
``python -m resilient_http demo --metrics-port ...`` under it, then asks
Prometheus, over the run, the very queries of ``grafana-resilient-http.json``
(Grafana's variables set to "all", ``$__rate_interval`` to 4 s, and the
5-minute windows of the share panels shortened to 4 s too, as the run is
shorter than one) and draws them with matplotlib, the demo's phases shaded;
series that stay at 0 are left out of the picture. The phases are placed
from the first scrape that saw a call, so to within a second (the scrape
interval). The demo's two upstreams listen on 127.0.0.1 on random ports:
the one with a rate limit is ``api.demo``, the other ``search.demo``. Needs matplotlib (the ``bench``
extra) and ``prometheus`` (Debian: ``apt-get install prometheus``).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests"), str(HERE.parent)]

from prometheus_server import DemoRun, Prometheus, dashboard_queries, legend, scraped_demo  # noqa: E402

from resilient_http._demo_scenario import PHASES  # noqa: E402

#: The panels drawn, in order: the dashboard's titles.
PANELS = (
    "Calls by outcome",
    "Calls shed by reason",
    "Breaker state per host",
    "Amplification (attempts per call)",
    "Stale answers share",
    "Call latency (to response headers)",
    "Bulkhead in flight, queued and limit",
    "Rate limit: calls made and allowed",
)
UNITS = {
    "Calls by outcome": "calls/s",
    "Calls shed by reason": "calls/s",
    "Breaker state per host": "0 closed, 1 half-open, 2 open",
    "Amplification (attempts per call)": "attempts/call",
    "Stale answers share": "share",
    "Call latency (to response headers)": "seconds",
    "Bulkhead in flight, queued and limit": "calls",
    "Rate limit: calls made and allowed": "calls/s",
}


def _names(prometheus: Prometheus, run: DemoRun) -> dict[str, str]:
    """``server_port`` -> the demo's name for that upstream (the rate-limited one is api.demo)."""
    ports = {
        each["metric"]["server_port"]
        for each in prometheus.query_range("resilient_http_requests_total", run.began, run.ended)
    }
    limited = {
        each["metric"]["server_port"]
        for each in prometheus.query_range("resilient_http_rate_limit_per_second", run.began, run.ended)
    }
    return {port: "api.demo" if port in limited else "search.demo" for port in ports}


def _start(prometheus: Prometheus, run: DemoRun) -> float:
    """When the demo's timeline began: the first second with calls."""
    [calls] = prometheus.query_range("sum(resilient_http_requests_total)", run.began, run.ended, step=0.25)
    return min(float(t) for t, value in calls["values"] if float(value) > 0)


def draw(prometheus: Prometheus, run: DemoRun, duration: float, out: Path) -> None:
    names = _names(prometheus, run)
    start = _start(prometheus, run)
    queries: dict[str, list[tuple[str, str]]] = {}
    for title, template, expr in dashboard_queries():
        queries.setdefault(title, []).append((template, expr))
    figure, axes = plt.subplots(4, 2, figsize=(13, 13), sharex=True)
    for axis, title in zip(axes.flat, PANELS, strict=True):
        for template, expr in queries[title]:
            for series in prometheus.query_range(expr.replace("[5m]", "[4s]"), start - 1, start + duration + 3):
                labels: dict[str, Any] = dict(series["metric"])
                if "server_port" in labels:
                    labels["server_address"] = names.get(labels["server_port"], labels["server_address"])
                    labels["server_port"] = "80"
                label = legend(template, labels).replace(":80", "").replace("default ", "") or title
                points = [(float(t) - start, float(v)) for t, v in series["values"] if not math.isnan(float(v))]
                if any(value for _, value in points):
                    axis.plot(*zip(*points, strict=True), label=label, linewidth=1.2)
        at = 0.0
        for number, phase in enumerate(PHASES):
            end = at + phase.share * duration
            if number % 2:
                axis.axvspan(at, end, color="#000000", alpha=0.05, linewidth=0)
            if axis in axes[0]:
                axis.text(
                    (at + end) / 2, 1.02, phase.name, transform=axis.get_xaxis_transform(), ha="center", fontsize=8
                )
            at = end
        axis.set_title(title, fontsize=10, pad=14 if axis in axes[0] else 6)
        axis.set_ylabel(UNITS[title], fontsize=8)
        axis.tick_params(labelsize=8)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="upper left", ncol=2)
    for axis in axes[-1]:
        axis.set_xlabel("seconds into the demo", fontsize=8)
    figure.suptitle(
        f"resilient_http dashboard, drawn from a real Prometheus scraping `python -m resilient_http demo "
        f"--duration {duration:g}` every second",
        fontsize=11,
    )
    figure.tight_layout()
    figure.savefig(out, dpi=90)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of demo (40)")
    parser.add_argument("--out", type=Path, default=HERE / "panels.png")
    args = parser.parse_args()
    with scraped_demo(args.duration) as (prometheus, run):
        draw(prometheus, run, args.duration, args.out)


if __name__ == "__main__":
    main()
