"""The benchmarks' smoke modes, so that CI keeps them from rotting; nothing here asserts on speed."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import _cachegrind, _common, adaptive, chaos, instructions, overhead
from benchmarks._cachegrind import ROOT


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both benchmarks run once in smoke mode through their command lines, writing JSON."""
    out = tmp_path_factory.mktemp("bench")
    paths = {"overhead": out / "overhead.json", "chaos": out / "chaos.json"}
    assert overhead.main(["--smoke", "--profile", "--json", str(paths["overhead"])]) == 0
    assert chaos.main(["--smoke", "--json", str(paths["chaos"])]) == 0
    return paths


def test_overhead_reports_every_subject(results: dict[str, Path]) -> None:
    """The in-process table has every subject, each with a time and a ratio to bare httpx."""
    data = json.loads(results["overhead"].read_text())
    rows = {row["name"]: row for row in data["in_process"]["rows"]}
    assert set(rows) == set(overhead.SUBJECTS)
    for row in rows.values():
        assert _number(row["us_per_call"]) and row["us_per_call"] > 0
        assert _number(row["ratio"]) and row["ratio"] > 0
    assert rows[overhead.BARE]["ratio"] == 1.0


def test_overhead_reports_every_layer_throughput_and_profile(results: dict[str, Path]) -> None:
    """Per-layer costs, socket throughput for bare and resilient, and a profile with functions in it."""
    data = json.loads(results["overhead"].read_text())
    layers = [row["name"] for row in data["per_layer"]["rows"]]
    assert all(name in layers for name in overhead.LAYER_ALONE)
    throughput = {row["name"]: row for row in data["throughput"]["rows"]}
    assert set(throughput) == {overhead.BARE, overhead.DEFAULT, overhead.ALL_SIX}
    assert all(row["calls_per_second"] > 0 for row in throughput.values())
    for key in ("profile", "profile_socket"):
        assert data[key]["rows"] and all(_number(row["extra_own_us"]) for row in data[key]["rows"])
    assert {t["target"] for t in data["targets"]} and all(isinstance(t["met"], bool) for t in data["targets"])
    assert data["machine"]["cpus"] >= 1


def test_chaos_reports_every_scenario_and_client(results: dict[str, Path]) -> None:
    """Every scenario ran with each of its clients, and each reported its numbers."""
    data = json.loads(results["chaos"].read_text())
    assert set(data["scenarios"]) == set(chaos.SCENARIOS)
    for name, (_, clients) in chaos.SCENARIOS.items():
        reported = data["scenarios"][name]["clients"]
        assert list(reported) == list(clients), name
        for client, numbers in reported.items():
            latency = numbers["healthy_beside_hung"] if name == "hung" else numbers["latency"]
            assert set(latency) == {"p50", "p90", "p99", "max"}, (name, client)
            assert numbers["outcomes"] if name != "hung" else numbers["healthy_outcomes"], (name, client)


def test_chaos_measures_what_its_targets_need(results: dict[str, Path]) -> None:
    """The numbers behind every target are there, and every target has a verdict."""
    data = json.loads(results["chaos"].read_text())
    sc = data["scenarios"]
    naive = sc["outage"]["clients"][chaos.NAIVE]
    assert naive["attempts_per_call_outage"] > 1  # it retries into the outage
    assert len(naive["timeline"]) == len(naive["offered_timeline"]) > 0
    assert "recovery_bound" in sc["outage"]["clients"][chaos.RESILIENT]["breaker"]
    assert 0 <= sc["errors"]["clients"][chaos.RESILIENT]["success_share"] <= 1
    limiter = sc["quota"]["clients"][chaos.RESILIENT_LIMITER]
    assert isinstance(limiter["early"], int) and (math.isnan(limiter["share_429"]) or 0 <= limiter["share_429"] <= 1)
    assert _number(sc["hung"]["clients"][chaos.RESILIENT]["p99_ratio"])
    assert _number(sc["cached"]["clients"][chaos.RESILIENT]["answered_stale"])
    scenarios = {t["scenario"] for t in data["targets"]}
    assert scenarios == {"outage", "errors", "quota", "hung"}


def test_plots_and_results_are_written(results: dict[str, Path], tmp_path: Path) -> None:
    """plots.py draws every figure and fills every generated block of RESULTS.md."""
    pytest.importorskip("matplotlib")
    from benchmarks import plots

    (tmp_path / "RESULTS.md").write_text(
        "# Results\n\n<!-- generated:overhead -->\nold\n<!-- end:overhead -->\n\nkept\n"
    )
    argv = ["--overhead", str(results["overhead"]), "--chaos", str(results["chaos"]), "--out", str(tmp_path)]
    assert plots.main(argv) == 0
    assert {p.name for p in tmp_path.glob("*.png")} == {"outage_load.png", "latency_percentiles.png", "overhead.png"}
    text = (tmp_path / "RESULTS.md").read_text()
    assert "old" not in text and "kept" in text
    for block in ("machine", "overhead", "chaos", "targets"):
        assert text.count(f"<!-- generated:{block} -->") == 1


def test_adaptive_reports_every_client_phase_and_target(tmp_path: Path) -> None:
    """The adaptive benchmark runs every client through the three phases, samples the limit, and judges it."""
    path = tmp_path / "adaptive.json"
    assert adaptive.main(["--smoke", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert list(data["clients"]) == list(adaptive.CLIENTS)
    for name, client in data["clients"].items():
        assert list(client["phases"]) == list(adaptive.PHASES), name
        assert all(_number(phase["goodput"]) for phase in client["phases"].values())
        assert client["samples"] and client["goodput_timeline"]
        assert ("limit" in client) == (name in (adaptive.AIMD, adaptive.GRADIENT))
    assert len(data["targets"]) == 3 and all(isinstance(t["met"], bool) for t in data["targets"])
    if importlib.util.find_spec("matplotlib") is not None:
        adaptive.plot(data, str(tmp_path / "adaptive.png"))
        assert (tmp_path / "adaptive.png").stat().st_size > 0


def test_coalesce_benchmark_counts_requests_at_the_server(tmp_path: Path) -> None:
    """Smoke mode: one upstream request for the herd, one per credential, and a cost per call for each pattern."""
    from benchmarks import coalesce

    path = tmp_path / "coalesce.json"
    assert coalesce.main(["--smoke", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    same, per_credential, off = data["herds"]
    assert (same["upstream_requests_total"], same["answered_200"]) == (1, same["calls"])
    assert per_credential["upstream_requests_total"] == per_credential["credentials"]
    assert off["upstream_requests_total"] == off["calls"]
    assert all(_number(row["us_per_call"]) and row["us_per_call"] > 0 for row in data["per_call"])
    assert all(isinstance(t["met"], bool) for t in data["targets"])


def test_hedge_benchmark_reports_tails_and_load_for_every_subject(tmp_path: Path) -> None:
    """Smoke mode: every subject answers every call, with its percentiles and the extra load counted at the server."""
    from benchmarks import hedge

    path = tmp_path / "hedge.json"
    assert hedge.main(["--smoke", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert list(data["subjects"]) == list(hedge.SUBJECTS)
    for name, subject in data["subjects"].items():
        assert set(subject["ms"]) == {"p50", "p90", "p99", "p99.9", "max"}, name
        assert all(_number(v) and v > 0 for v in subject["ms"].values()), name
        assert subject["server_requests"] >= subject["calls"] - subject["failed"], name
        assert subject["cdf"] and _number(subject["extra_load"]), name
    assert data["subjects"][hedge.BARE]["extra_load"] == 0
    assert len(data["targets"]) == 2 and all(isinstance(t["met"], bool) for t in data["targets"])
    if importlib.util.find_spec("matplotlib") is not None:
        hedge.plot(data, str(tmp_path / "hedge.png"))
        assert (tmp_path / "hedge.png").stat().st_size > 0


@pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed (Debian: apt-get install redis-server)"
)
def test_fleet_benchmark_reports_every_scenario(tmp_path: Path) -> None:
    """Smoke mode: two worker processes on the benchmark's own redis-server, every scenario, and a verdict each."""
    from benchmarks import fleet

    path = tmp_path / "fleet.json"
    assert fleet.main(["--smoke", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    shared, alone = data["quota"]
    assert shared["shared"] and not alone["shared"] and shared["arrivals"] > 0 and alone["arrivals"] > 0
    assert _number(data["hold"]["arrivals_during_hold"]) and _number(data["hold"]["sends_begun_once_published"])
    assert [(r["failure"], r["shared"]) for r in data["outage"]] == [
        ("fast", True),
        ("fast", False),
        ("slow", True),
        ("slow", False),
    ]
    assert _number(data["redis_down"]["latency_max"]) and _number(data["redis_down"]["errors"])
    assert _number(data["redis_down"]["diagnosis"]["call_store_wait_max_ms"])
    assert _number(shared["diagnosis"]["loop_lag_max_ms"])
    assert [row["store"] for row in data["cost"]] == ["no store (in memory)", "Redis store"]
    assert len(data["targets"]) == 11 and all(isinstance(t["met"], bool) for t in data["targets"])
    if importlib.util.find_spec("matplotlib") is not None:
        fleet.plot(data, str(tmp_path / "fleet.png"))
        assert (tmp_path / "fleet.png").stat().st_size > 0


@pytest.mark.skipif(_cachegrind.missing() is not None, reason=f"no instruction counts: {_cachegrind.missing()}")
def test_instructions_counts_profiles_and_sweeps(tmp_path: Path) -> None:
    """Bare httpx and Policy() counted under cachegrind, with the profile, both sweeps, the socket and its count."""
    path = tmp_path / "instructions.json"
    modes = ["--smoke", "--profile", "--flat", "--socket", "--socket-count", "--guarantees"]
    assert instructions.main([*modes, "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    rows = {row["name"]: row for row in data["instructions"]["rows"]}
    assert list(rows) == [overhead.BARE, instructions.DEFAULT]
    assert all(_number(row["instructions"]) and row["instructions"] > 0 for row in rows.values())
    assert rows[overhead.BARE]["ratio"] == 1.0 and isinstance(rows[instructions.DEFAULT]["met"], bool)
    assert set(data["wall_clock"]["rows"]) == set(rows)
    profiled = data["profile"]["subjects"][instructions.DEFAULT]
    assert profiled["bytecodes_by_function"] and profiled["instructions_by_c_function"]
    assert any(name.startswith("resilient_http/layers/") for name, _ in profiled["bytecodes_by_function"])
    sweeps = {(row["kind"], row["subject"]) for row in data["flat"]["rows"]}
    assert sweeps == {(kind, subject) for kind in ("in-flight", "hosts") for subject in ("bare httpx", "all six")}
    levels = [level["workers"] for level in data["socket"]["levels"]]
    assert levels == list(instructions.SMOKE.socket_workers)
    assert all(row["calls_per_second"] > 0 for level in data["socket"]["levels"] for row in level["rows"])
    counted = {row["name"]: row["instructions"] for row in data["socket_count"]["rows"]}
    assert list(counted) == [overhead.BARE, instructions.DEFAULT]
    # Over a socket a call costs more than in memory: the network's own work in the client is counted.
    assert counted[overhead.BARE] > rows[overhead.BARE]["instructions"]
    for level in data["socket"]["levels"]:
        for row in level["rows"]:
            low, high = row["ratio_interval"]
            assert low <= row["ratio"] <= high
    (guaranteed,) = data["guarantees"]["rows"]
    assert (
        guaranteed["name"] == instructions.DEFAULT and guaranteed["target"] == instructions.TARGETS[guaranteed["name"]]
    )
    assert _number(guaranteed["without_all"]) and guaranteed["without_all"] > 0


def test_the_guarantees_stubs_take_each_guarantee_away() -> None:
    """In a process of its own, as a counted worker applies them: what the stubs replace no longer works."""
    script = """
import asyncio, httpx
from benchmarks._guarantees import STUBS, apply
from resilient_http._deadline import Operations
from resilient_http._metrics import HostMetrics
from resilient_http._watchdog import Watchdog
from resilient_http.layers import timeout
apply(STUBS)
request = httpx.Request("GET", "http://example.com/", extensions={"timeout": {"connect": 1.0}})
assert timeout.derive(request, timeout.operations({"connect": 1.0})) is request
assert HostMetrics.answered(object(), 200, 0.1) is None
async def main():
    watchdog = Watchdog()
    first, second = watchdog.start(0.001), watchdog.start(0.001)
    assert first is second and len(watchdog) == 0  # one shared timer, never kept, never armed
asyncio.run(main())
try:
    apply(["nonsense"])
except ValueError as exc:
    assert "nonsense" in str(exc)
else:
    raise AssertionError("an unknown stub was accepted")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_a_simulated_count_reads_every_event_and_weighs_the_misses() -> None:
    """A cachegrind summary with cache and branch simulation: every event by name, and the rough cycles."""
    text = (
        "desc: I1 cache: 32768 B, 64 B, 8-way associative\n"
        "cmd: python -m benchmarks.instructions --worker\n"
        "events: Ir I1mr ILmr Dr D1mr DLmr Dw D1mw DLmw Bc Bcm Bi Bim\n"
        "fl=x.c\nfn=f\n1 1000 10 1 300 20 2 100 5 0 50 4 10 3\n"
        "summary: 1000 10 1 300 20 2 100 5 0 50 4 10 3\n"
    )
    found = _cachegrind.parse(text, functions=True)
    assert found.total == 1000 and found.functions == {"x.c:f": 1000}
    assert found.events["Ir"] == 1000 and found.events["D1mw"] == 5 and found.events["Bim"] == 3
    weights = _cachegrind.CYCLES
    expected = 1000 + weights["L1"] * (10 + 20 + 5) + weights["LL"] * (1 + 2 + 0) + weights["branch"] * (4 + 3)
    assert _cachegrind.cycles(found.events) == expected
    plain = _cachegrind.parse("events: Ir\nsummary: 1234\n")
    assert plain.events == {"Ir": 1234} and _cachegrind.cycles(plain.events) == 1234


def test_the_median_s_interval_is_the_right_order_statistics_and_decides_the_verdict() -> None:
    """Two order statistics of n rounds, chosen from the binomial; the verdict only when the interval is one side."""
    assert all(math.isnan(v) for v in _common.median_interval([]))
    # The textbook choices at 95 %: n = 10 -> 2nd and 9th, n = 20 -> 6th and 15th, n = 30 -> 10th and 21st.
    for n, (low, high) in {10: (2, 9), 20: (6, 15), 30: (10, 21)}.items():
        shuffled = [float(v) for v in range(n, 0, -1)]
        assert _common.median_interval(shuffled) == (low, high)
    assert _common.median_interval([3.0, 1.0]) == (1.0, 3.0)  # too few rounds: the whole range
    assert _common.interval_verdict(0.98, 1.10, 0.97) == "met"
    assert _common.interval_verdict(0.90, 0.96, 0.97) == "NOT met"
    assert _common.interval_verdict(0.95, 1.01, 0.97).startswith("cannot tell")


def test_simulate_without_the_socket_count_is_refused() -> None:
    with pytest.raises(SystemExit) as refused:
        instructions.main(["--simulate", "--no-table"])
    assert refused.value.code == 2
