"""What both benchmarks share: the machine they ran on, statistics, tables, JSON."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

PACKAGES = (
    "resilient-http-transport",
    "httpx",
    "httpcore",
    "anyio",
    "prometheus-client",
    "httpx-retries",
    "stamina",
    "tenacity",
    "hishel",
    "httpx-hedged",
    "aiolimiter",
    "purgatory",
)


def machine() -> dict[str, Any]:
    """The machine, interpreter and package versions a result was measured with."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as lines:
            for line in lines:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions: dict[str, str] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "git": _git(),
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "packages": versions,
    }


def _git() -> str:
    """The commit measured, and any uncommitted change to the library on top of it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "resilient_http"], cwd=HERE.parent, capture_output=True, text=True
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    changed = sorted(line[3:] for line in dirty if line.strip())
    return commit + (f" with uncommitted changes to {', '.join(changed)}" if changed else " (library clean)")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, nearest-rank; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: Iterable[float]) -> float:
    data = list(values)
    return statistics.median(data) if data else float("nan")


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table, which also reads well in a terminal."""
    text = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in text)) if text else len(h) for i, h in enumerate(headers)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in text]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 0.01 else f"{value:.2f}"
    return str(value)


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval for the median of ``values``: two of their order statistics.

    The median lies between the k-th smallest and the k-th largest of n
    independent rounds with probability 1 - 2 P(Binomial(n, 1/2) < k); k is
    the largest that keeps that at least ``confidence``. Too few rounds for
    it give the whole range (NaN when empty).
    """
    ordered = sorted(values)
    n = len(ordered)
    if not n:
        return float("nan"), float("nan")
    k, below = 0, 0.0  # below: P(Binomial(n, 1/2) < k + 1)
    while k + 1 <= n // 2:
        below += math.comb(n, k) / 2**n
        if 1 - 2 * below < confidence:
            break
        k += 1
    k = max(k, 1)
    return ordered[k - 1], ordered[n - k]


def interval_verdict(low: float, high: float, at_least: float) -> str:
    """``met`` when the whole interval is at least ``at_least``, ``NOT met`` when all of it is below, else undecided."""
    if low >= at_least:
        return "met"
    if high < at_least:
        return "NOT met"
    return "cannot tell (the interval spans it)"
