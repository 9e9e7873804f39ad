"""A real Prometheus scraping the demo: for the dashboard test and for the README's picture.

:class:`Prometheus` runs this machine's ``prometheus`` on a free loopback
port, with a temporary configuration and storage, scraping one target
every second. Its scrape configuration sets a ``host`` target label, as
many real ones do (the machine scraped), to show that the library's own
labels survive it. :func:`run_demo` runs ``python -m resilient_http demo``
with its metrics on a given port. Nothing is installed here: tests that need
``prometheus`` are skipped, with the reason, when it is not on ``PATH``.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
DASHBOARDS = Path(__file__).resolve().parent.parent / "dashboards"
#: The target label a typical scrape configuration sets: the name of the machine scraped.
SCRAPED_HOST = "scraped-machine"
SCRAPE_INTERVAL = 1.0
#: What Grafana's variables become in a query: every job, transport and host, and a rate window
#: of four scrape intervals (Grafana's ``$__rate_interval`` at its smallest).
VARIABLES = {
    "$__rate_interval": f"{4 * SCRAPE_INTERVAL:.0f}s",
    "$job": ".*",
    "$transport": ".*",
    "$server_address": ".*",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def grafana_to_promql(expr: str) -> str:
    """``expr`` with Grafana's variables replaced by what a dashboard showing everything would send."""
    for name, value in sorted(VARIABLES.items(), key=lambda item: -len(item[0])):
        expr = expr.replace(name, value)
    return expr


class Prometheus:
    """One ``prometheus`` process, scraping ``127.0.0.1:target_port`` as job ``demo``, with ``rules`` loaded."""

    def __init__(self, target_port: int, rules: Path | None = None) -> None:
        assert PROMETHEUS is not None, "prometheus is not installed"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._dir = tempfile.TemporaryDirectory(prefix="rh-prometheus-")
        root = Path(self._dir.name)
        config = {
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL:.0f}s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)] if rules is not None else [],
            "scrape_configs": [
                {
                    "job_name": "demo",
                    "static_configs": [{"targets": [f"127.0.0.1:{target_port}"], "labels": {"host": SCRAPED_HOST}}],
                }
            ],
        }
        (root / "prometheus.yml").write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
        self._log = (root / "log").open("w")
        self._process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            time.sleep(0.1)
        raise RuntimeError(f"prometheus not ready after {timeout} s: {self.log()}")

    def wait_for_target(self, timeout: float = 30.0) -> None:
        """Until the scrape target is known (Prometheus applies its configuration's targets within ~5 s)."""
        deadline = time.monotonic() + timeout
        while not self.api("targets")["activeTargets"]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus has no target after {timeout} s: {self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(encoding="utf-8")[-2000:]

    def api(self, path: str, **params: Any) -> Any:
        """The ``data`` of a call to Prometheus's HTTP API; raises on an error answer."""
        query = urllib.parse.urlencode({key: str(value) for key, value in params.items()})
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
            answer = json.load(response)
        if answer["status"] != "success":
            raise RuntimeError(f"{path} {params}: {answer}")
        return answer["data"]

    def query(self, expr: str, at: float) -> list[dict[str, Any]]:
        """An instant query at ``at`` (Unix time): its vector."""
        data = self.api("query", query=expr, time=f"{at:.3f}")
        assert data["resultType"] in ("vector", "scalar"), data
        return data["result"] if data["resultType"] == "vector" else [{"metric": {}, "value": data["result"]}]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        """A range query: one ``{"metric": labels, "values": [[t, "v"], ...]}`` per series."""
        data = self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=step)
        result: list[dict[str, Any]] = data["result"]
        return result

    def close(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._log.close()
        self._dir.cleanup()

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DemoRun:
    """A finished run of the demo: its output, and the Unix times it began and ended."""

    def __init__(self, output: str, began: float, ended: float) -> None:
        self.output = output
        self.began = began
        self.ended = ended

    def row(self, name: str) -> list[str]:
        """The cells of the final table's row ``name`` (bare httpx first, then resilient_http)."""
        for line in self.output.splitlines():
            if line.startswith(name + " "):
                return line[len(name) :].split()
        raise AssertionError(f"no row {name!r} in the demo's output:\n{self.output}")


def run_demo(metrics_port: int, duration: float, timeout: float = 120.0) -> DemoRun:
    """Run the demo for ``duration`` seconds with its metrics on ``metrics_port``; its output."""
    began = time.time()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "resilient_http",
            "demo",
            "--duration",
            str(duration),
            "--metrics-port",
            str(metrics_port),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return DemoRun(done.stdout, began, time.time())


@contextlib.contextmanager
def scraped_demo(duration: float, rules: Path | None = None) -> Iterator[tuple[Prometheus, DemoRun]]:
    """Prometheus scraping a whole run of the demo; both, once the run is over (Prometheus still up)."""
    port = free_port()
    with Prometheus(port, rules) as prometheus:
        prometheus.wait_ready()
        prometheus.wait_for_target()  # scraped from the demo's first second on
        yield prometheus, run_demo(port, duration)


def dashboard_queries() -> Iterator[tuple[str, str, str]]:
    """``(panel title, legend, PromQL)`` of every query of the Grafana dashboard, variables replaced."""
    dashboard = json.loads((DASHBOARDS / "grafana-resilient-http.json").read_text(encoding="utf-8"))
    for panel in dashboard["panels"]:
        for each in (panel, *panel.get("panels", [])):
            for target in each.get("targets", []):
                yield each["title"], target.get("legendFormat", ""), grafana_to_promql(target["expr"])


def legend(template: str, labels: Mapping[str, str]) -> str:
    """A Grafana legend template (``{{label}}``) filled with ``labels``."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda found: labels.get(found[1], ""), template).strip()
