"""Plots and the generated parts of RESULTS.md, from the benchmarks' JSON output.

    python -m benchmarks.plots [--overhead benchmarks/overhead.json] [--chaos benchmarks/chaos.json]

Writes into ``benchmarks/``:

- ``outage_load.png``: load on the upstream over time during the outage
  scenario, naive retries against resilient_http (the other clients faint);
- ``latency_percentiles.png``: p50 / p90 / p99 latency per client, one panel
  per chaos scenario;
- ``overhead.png``: microseconds per call in process, per client and per layer;

and refreshes every block of ``RESULTS.md`` that sits between
``<!-- generated:NAME -->`` and ``<!-- end:NAME -->`` (``machine``,
``overhead``, ``chaos``, ``targets``), so that no number there is typed by
hand. Text outside the blocks is left alone. Needs matplotlib (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.ticker import NullFormatter, ScalarFormatter

from . import chaos, overhead
from ._common import HERE, table, verdict

COLORS = {
    chaos.BARE: "#7f7f7f",
    chaos.NAIVE: "#d62728",
    chaos.HTTPX_RETRIES: "#ff7f0e",
    chaos.STAMINA: "#9467bd",
    chaos.HISHEL: "#8c564b",
    chaos.RESILIENT: "#1f77b4",
    chaos.RESILIENT_LIMITER: "#17becf",
    chaos.RESILIENT_BULKHEAD_20: "#17becf",
    chaos.BARE_PER_HOST: "#bcbd22",
}


def outage_load(result: dict[str, Any], path: Path) -> None:
    sc = result["scenarios"]["outage"]
    width = sc["bin"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name, client in sc["clients"].items():
        bins = client["timeline"]
        xs = [i * width for i in range(len(bins))]
        ys = [count / width for count in bins]
        main = name in (chaos.NAIVE, chaos.RESILIENT)
        ax.step(
            xs,
            ys,
            where="post",
            label=name,
            color=COLORS.get(name),
            linewidth=2.0 if main else 1.0,
            alpha=1.0 if main else 0.35,
        )
    offered = next(iter(sc["clients"].values()))["offered_timeline"]
    ax.step(
        [i * width for i in range(len(offered))],
        [count / width for count in offered],
        where="post",
        color="black",
        linestyle=":",
        label="offered calls",
    )
    ax.axvspan(sc["outage_at"], sc["heal_at"], color="#d62728", alpha=0.08, label="outage")
    ax.set_xlabel("seconds")
    ax.set_ylabel("requests reaching the upstream per second")
    ax.set_title("Load on a failing upstream: " + sc["description"], fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _latencies(scenario: str, client: dict[str, Any]) -> dict[str, float]:
    latency: dict[str, float] = client["healthy_beside_hung"] if scenario == "hung" else client["latency"]
    return latency


def latency_percentiles(result: dict[str, Any], path: Path) -> None:
    scenarios = result["scenarios"]
    fig, axes = plt.subplots(1, len(scenarios), figsize=(4.2 * len(scenarios), 4.8), squeeze=False)
    for ax, (name, sc) in zip(axes[0], scenarios.items(), strict=True):
        clients = list(sc["clients"].items())
        for i, (client, data) in enumerate(clients):
            lat = _latencies(name, data)
            values = [max(lat[q] * 1000, 0.01) if lat[q] == lat[q] else 0.01 for q in ("p50", "p90", "p99")]
            for j, value in enumerate(values):
                ax.bar(
                    i + (j - 1) * 0.27,
                    value,
                    width=0.27,
                    color=COLORS.get(client),
                    alpha=(0.45, 0.7, 1.0)[j],
                    label=("p50", "p90", "p99")[j] if i == 0 else None,
                )
        ax.set_yscale("log")
        ax.set_xticks(range(len(clients)))
        ax.set_xticklabels([c for c, _ in clients], rotation=45, ha="right", fontsize=8)
        what = {
            "hung": "healthy host beside a hung one",
            "cached": "calls during the outage",
            "outage": "all calls",
        }.get(name, "all calls")
        ax.set_title(f"{name}: {what}", fontsize=9)
        ax.set_ylabel("latency, ms (log)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(["p50 (light)", "p90", "p99 (dark)"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def overhead_plot(result: dict[str, Any], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = result["in_process"]["rows"]
    names = [r["name"] for r in rows]
    values = [r["us_per_call"] for r in rows]
    left.barh(names, values, color=["#7f7f7f", "#1f77b4", "#1f77b4", "#ff7f0e", "#9467bd", "#2ca02c", "#8c564b"])
    left.set_xscale("log")
    left.xaxis.set_minor_formatter(NullFormatter())
    left.xaxis.set_major_formatter(ScalarFormatter())
    left.invert_yaxis()
    left.set_xlabel("µs per call (median, log)")
    left.set_title("In process (MockTransport): client stack per call", fontsize=9)
    for y, r in enumerate(rows):
        left.text(r["us_per_call"], y, f" {r['ratio']:.2f}x", va="center", fontsize=8)
    layer_rows = result["per_layer"]["rows"]
    right.barh([r["name"] for r in layer_rows], [r["min_over_bare_us"] for r in layer_rows], color="#1f77b4")
    right.invert_yaxis()
    right.axvline(0, color="black", linewidth=0.8)
    target = (overhead.OVERHEAD_TARGET - 1) * result["per_layer"]["bare_min_us"]
    right.axvline(target, color="#d62728", linestyle="--", linewidth=1, label=f"target: +{target:.0f} µs (1.10x)")
    right.set_xlabel("µs per call above bare httpx (fastest of the repetitions)")
    right.set_title("ResilientTransport with one layer alone", fontsize=9)
    right.legend(fontsize=8)
    right.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _machine_block(results: list[dict[str, Any]]) -> str:
    lines = []
    for result in results:
        m = result["machine"]
        packages = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
        load = ", ".join(f"{x:.2f}" for x in m.get("load_average", ()))
        lines.append(
            f"- `{result['command'].strip()}`: {m['cpus']} CPUs ({m['cpu']}), {m['implementation']} {m['python']}, "
            f"{m['platform']}; load average when it ended: {load}; {packages}"
        )
        if "git" in m:
            lines.append(f"  - code: {m['git']}")
    return "\n".join(lines)


def _targets_block(results: list[dict[str, Any]]) -> str:
    rows = []
    for result in results:
        for t in result["targets"]:
            rows.append((t.get("scenario", "overhead"), t["target"], t["value"], t.get("verdict") or verdict(t["met"])))
    return table(("benchmark", "target", "measured", "verdict"), rows)


def refresh_results(path: Path, blocks: dict[str, str]) -> None:
    """Replace each generated block of ``path`` (appending those it lacks)."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    for name, body in blocks.items():
        start, end = f"<!-- generated:{name} -->", f"<!-- end:{name} -->"
        block = f"{start}\n{body.strip()}\n{end}"
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
        found = pattern.search(text)
        if found:
            text = text[: found.start()] + block + text[found.end() :]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--overhead", type=Path, default=HERE / "overhead.json")
    parser.add_argument("--chaos", type=Path, default=HERE / "chaos.json")
    parser.add_argument("--out", type=Path, default=HERE, help="where the PNGs and RESULTS.md go")
    args = parser.parse_args(argv)
    over = json.loads(args.overhead.read_text(encoding="utf-8"))
    cha = json.loads(args.chaos.read_text(encoding="utf-8"))
    args.out.mkdir(parents=True, exist_ok=True)
    if "outage" in cha["scenarios"]:
        outage_load(cha, args.out / "outage_load.png")
    latency_percentiles(cha, args.out / "latency_percentiles.png")
    overhead_plot(over, args.out / "overhead.png")
    refresh_results(
        args.out / "RESULTS.md",
        {
            "machine": _machine_block([over, cha]),
            "overhead": overhead.report(over),
            "chaos": chaos.report(cha),
            "targets": _targets_block([over, cha]),
        },
    )
    print(f"wrote {', '.join(str(p) for p in sorted(args.out.glob('*.png')))} and {args.out / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
