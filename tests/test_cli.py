"""The command line (``check`` and ``demo``) and the demo's embedded upstream.

``check`` runs in-process through :func:`resilient_http.__main__.main`; the
demo runs as users run it, ``python -m resilient_http demo`` in a
subprocess, kept to a few seconds. The upstream's failure modes are checked
against a real socket, since the demo's story depends on them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx
import pytest

from resilient_http.__main__ import main
from resilient_http._upstream import Upstream

GOOD = """\
[default]
timeout = { attempt = 5, total = 20 }

[hosts."api.demo".retry]
attempts = 4
statuses = [429, 503]

[hosts."*.demo"]
circuit_breaker = false
rate_limit = { rate = 50, burst = 10 }
"""

DEMO_TIMEOUT = 30  # seconds a demo subprocess may take before the test fails


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "policies.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def check(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(["check", write(tmp_path, text)])
    out, err = capsys.readouterr()
    return status, out, err


def sections(out: str) -> dict[str, str]:
    """The printed policies by their title line (``[default]``, ``[hosts."api.demo"]``)."""
    found = {}
    for block in out.split("\n\n")[1:]:
        title, _, body = block.partition("\n")
        found[title.split("  ")[0]] = body
    return found


def run_cli(*args: str, timeout: float = DEMO_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "default", "-m", "resilient_http", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def table_row(out: str, name: str) -> list[str]:
    """The two cells of the final table's row ``name``."""
    line = next(line for line in out.splitlines() if line.startswith(name + "  "))
    return re.split(r"\s{2,}", line[len(name) :].strip())


# check


def test_check_prints_every_pattern_with_inherited_and_own_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check prints [default] and each pattern, with what it inherits, what it sets, and "off"."""
    status, out, err = check(tmp_path, GOOD, capsys)
    assert (status, err) == (0, "")
    assert "a default and 2 host patterns" in out.splitlines()[0]
    found = sections(out)
    assert list(found) == ["[default]", '[hosts."api.demo"]', '[hosts."*.demo"]']
    assert "attempt=5 total=20" in found['[hosts."api.demo"]']  # inherited from [default]
    assert "attempts=4" in found['[hosts."api.demo"]']
    assert "statuses=[429, 503]" in found['[hosts."api.demo"]']
    assert "attempts=3" in found["[default]"]
    assert re.search(r"circuit_breaker +off", found['[hosts."*.demo"]'])
    assert re.search(r"rate_limit +rate=50 burst=10 max_wait=none", found['[hosts."*.demo"]'])
    assert re.search(r"rate_limit +off", found["[default]"])


def test_check_unknown_key_names_its_path_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown key exits 2 naming the key path, the value and the line it is on."""
    status, out, err = check(tmp_path, GOOD.replace("attempts = 4", "atempts = 4"), capsys)
    assert (status, out) == (2, "")
    assert 'line 5: hosts."api.demo".retry.atempts: is not a RetryPolicy setting (got 4)' in err


def test_check_bad_value_inside_an_inline_table_names_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad value inside an inline table is found on its line."""
    status, _, err = check(tmp_path, GOOD.replace("burst = 10", "burst = 0"), capsys)
    assert status == 2
    assert 'line 10: hosts."*.demo".rate_limit.burst: must be at least 1 (got 0)' in err


def test_check_inherited_bad_value_points_at_the_default_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A host's error caused by a value it inherits points at the line in [default]."""
    text = '[default]\ntimeout = { attempt = 10 }\n\n[hosts."api.demo"]\ntimeout.total = 5\n'
    status, _, err = check(tmp_path, text, capsys)
    assert status == 2
    assert 'line 2: hosts."api.demo".timeout.attempt: must not exceed TimeoutPolicy.total (5) (got 10)' in err


def test_check_bad_host_pattern_names_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A host pattern that is not one is reported as the file spells it, with its line."""
    status, _, err = check(tmp_path, '[default]\n\n[hosts."api demo"]\nretry = true\n', capsys)
    assert status == 2
    assert 'line 3: hosts."api demo": is not a host pattern' in err


def test_check_syntax_error_gives_line_and_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A TOML syntax error exits 2 with the line and column tomllib found it at."""
    status, out, err = check(tmp_path, "[default]\ntimeout = { attempt = 5 }\nretry attempts = 3\n", capsys)
    assert (status, out) == (2, "")
    assert "line 3, column 7: invalid TOML: Expected '=' after a key" in err


def test_check_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file that cannot be read exits 2 saying so."""
    status = main(["check", str(tmp_path / "absent.toml")])
    out, err = capsys.readouterr()
    assert (status, out) == (2, "")
    assert "absent.toml: cannot be read: No such file or directory" in err


def test_check_error_from_the_command_line_has_no_traceback(tmp_path: Path) -> None:
    """python -m resilient_http check on a bad file prints one error line and exits 2."""
    result = run_cli("check", write(tmp_path, "[default]\nretry = 3\n"), timeout=20)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and "line 2: default.retry: must be a table" in result.stderr
    assert "Traceback" not in result.stderr


# demo


def test_demo_runs_end_to_end_and_prints_both_columns() -> None:
    """A short demo exits 0 with the comparison table of both clients and no shutdown noise."""
    started = time.monotonic()
    result = run_cli("demo", "--duration", "2")
    assert time.monotonic() - started < 15
    assert result.returncode == 0, result.stderr
    for noise in ("Traceback", "Task was destroyed", "CancelledError", "ResourceWarning", "never retrieved"):
        assert noise not in result.stderr
    assert any(line.split() == ["bare", "httpx", "resilient_http"] for line in result.stdout.splitlines())
    bare_calls, resilient_calls = table_row(result.stdout, "calls")
    assert bare_calls == resilient_calls and int(bare_calls) > 50  # the same traffic went to both
    assert all(cell.endswith("%") for cell in table_row(result.stdout, "success rate (2xx)"))
    assert table_row(result.stdout, "  not started (demo's cap)")[1] == "0"  # resilient_http's backlog is bounded
    bare_amplification, _ = table_row(result.stdout, "upstream attempts per call")
    assert bare_amplification == "1.00"  # bare httpx never retries: the upstreams saw each call once
    assert table_row(result.stdout, "breaker openings")[0] == "-"
    for row in ("p99 latency", "stale answers", "calls shed", "time to recover"):
        assert len(table_row(result.stdout, row)) == 2
    assert re.search(r"^ +1s \w+ +\|", result.stdout, re.MULTILINE)  # the live line of the first second
    assert re.search(r"^timing: each client in its own process", result.stdout, re.MULTILINE)
    saw = next(line for line in result.stdout.splitlines() if line.startswith("resilient_http callers saw:"))
    refused = sum(int(n) for n in re.findall(r"(?:CircuitOpen|RateLimited|BulkheadFull)Error x(\d+)", saw))
    shed, stale = int(table_row(result.stdout, "calls shed")[1]), int(table_row(result.stdout, "stale answers")[1])
    assert refused <= shed <= refused + stale  # shed: refusals raised, and refusals answered stale


def test_demo_serves_metrics_while_it_runs() -> None:
    """--metrics-port serves the transport's metrics on 127.0.0.1 during the run."""
    process = subprocess.Popen(
        [sys.executable, "-m", "resilient_http", "demo", "--duration", "3", "--metrics-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = None
        while url is None:
            line = process.stdout.readline()
            assert line, "the demo ended without announcing its metrics"
            found = re.match(r"metrics: (http://127\.0\.0\.1:\d+/metrics)$", line.strip())
            url = found[1] if found else None
        deadline = time.monotonic() + 10
        body = ""
        while "resilient_http_requests_total{" not in body and time.monotonic() < deadline:
            time.sleep(0.2)
            with urllib.request.urlopen(url, timeout=5) as response:
                body = response.read().decode()
        sample = r'^resilient_http_requests_total\{host="127\.0\.0\.1:\d+",outcome="2xx",transport="default"\} \d'
        assert re.search(sample, body, re.M)
        _, err = process.communicate(timeout=DEMO_TIMEOUT)
        assert process.returncode == 0, err
    finally:
        process.kill()
        process.communicate()


def side_processes(pid: int) -> list[int]:
    """The demo's side processes: the children of ``pid`` (Linux only; empty elsewhere)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in children.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


STOPPED_WITHIN = 3.0  # the demo stops within a second; the rest is room for a busy test machine


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")
@pytest.mark.parametrize(
    "moment",
    [
        r"resilient_http: api\.demo at",  # the sides are ready, the timeline has not begun
        r"^ +1s ",  # the first second
        r"^ +6s hang ",  # bare httpx's backlog on the hung host is at its longest
    ],
)
def test_demo_interrupted_prints_the_table_so_far_and_exits_130(moment: str) -> None:
    """Ctrl-C (SIGINT) at any moment ends the demo at once: the table so far, exit 130, no process left behind."""
    process = subprocess.Popen(
        [sys.executable, "-W", "default", "-m", "resilient_http", "demo", "--duration", "10"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        seen = ""
        while not re.search(moment, seen, re.MULTILINE):
            line = process.stdout.readline()
            assert line, f"the demo ended before {moment!r}"
            seen += line
        sides = side_processes(process.pid)
        assert len(sides) in (0, 2)
        os.kill(process.pid, signal.SIGINT)
        interrupted = time.monotonic()
        out, err = process.communicate(timeout=DEMO_TIMEOUT)
        assert time.monotonic() - interrupted < STOPPED_WITHIN
        assert process.returncode == 130
        if "interrupted before the run began" not in out:  # the timeline starts a moment after the sides are ready
            assert "interrupted after" in out
            bare_calls, resilient_calls = map(int, table_row(out, "calls"))
            assert abs(bare_calls - resilient_calls) <= 5  # each side stops on its own loop, within a moment
        for noise in ("Traceback", "Task was destroyed", "ResourceWarning", "never retrieved"):
            assert noise not in err
        assert not [pid for pid in sides if alive(pid)]
    finally:
        process.kill()
        process.communicate()


def test_a_side_ends_when_the_demo_goes_away() -> None:
    """A side process whose input closes (the demo died) closes its upstreams and exits on its own."""
    side = subprocess.Popen(
        [sys.executable, "-W", "default", "-m", "resilient_http._demo_side"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert side.stdin is not None and side.stdout is not None
        settings = {"duration": 60, "seed": 0, "policies": None, "metrics_port": None}
        side.stdin.write(json.dumps(settings) + "\n" + json.dumps({"start": time.monotonic()}) + "\n")
        side.stdin.flush()
        assert "ready" in json.loads(side.stdout.readline())
        assert json.loads(side.stdout.readline())["second"] == 1
        rest, err = side.communicate(timeout=DEMO_TIMEOUT)  # closes its input first
        assert side.returncode == 0, err
        assert '"end"' in rest.splitlines()[-1]
        assert "Traceback" not in err and "ResourceWarning" not in err
    finally:
        if side.returncode is None:
            side.kill()
            side.communicate()


def test_demo_says_when_its_metrics_port_is_taken() -> None:
    """--metrics-port on a port already in use exits 2 with the reason, and no demo runs."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("demo", "--duration", "1", "--metrics-port", str(port))
    assert result.returncode == 2
    assert f"error: cannot serve metrics on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr and "success rate" not in result.stdout


def test_demo_uses_the_policy_file_for_the_named_hosts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--policy gives the file's policy for "api.demo" to the port that plays api."""
    path = write(tmp_path, '[hosts."api.demo"]\nrate_limit = { rate = 1, burst = 1, max_wait = 0 }\n')
    assert main(["demo", "--duration", "1", "--policy", path]) == 0
    out, _ = capsys.readouterr()
    assert re.search(r"rate_limit +rate=1 burst=1 max_wait=0", out)
    saw = next(line for line in out.splitlines() if line.startswith("resilient_http callers saw:"))
    refused = re.search(r"RateLimitedError x(\d+)", saw)
    assert refused is not None and int(refused[1]) >= 20  # about 40 api calls in a second, one let through


def test_demo_rejects_a_bad_policy_file_before_starting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad --policy file exits 2 with the error, and no demo runs."""
    status = main(["demo", "--policy", write(tmp_path, "[hosts.x]\nretry = { atempts = 2 }\n")])
    out, err = capsys.readouterr()
    assert (status, out) == (2, "")
    assert 'line 2: hosts."x".retry.atempts: is not a RetryPolicy setting' in err


# the upstream


async def test_upstream_quota_serves_its_quota_then_429_with_ratelimit_headers() -> None:
    """In quota mode the upstream serves N requests a second, then 429 with Retry-After and RateLimit fields."""
    async with Upstream(quota=3) as upstream, httpx.AsyncClient(base_url=upstream.url) as client:
        upstream.set_mode("quota")
        await asyncio.sleep(1.0 - time.monotonic() % 1)  # start a quota window, so the burst stays inside it
        responses = [await client.get("/catalog/1") for _ in range(5)]
    assert [r.status_code for r in responses] == [200, 200, 200, 429, 429]
    assert [r.headers["ratelimit"] for r in responses[:3]] == ['"quota";r=2;t=1', '"quota";r=1;t=1', '"quota";r=0;t=1']
    assert responses[3].headers["retry-after"] == "1"
    assert responses[3].headers["ratelimit-policy"] == '"quota";q=3;w=1'
    assert responses[0].headers["cache-control"] == "max-age=1"
    assert upstream.received() == 5 and upstream.by_path["/catalog/1"] == 5
    assert upstream.answered == {"200": 3, "429": 2}


async def test_upstream_hang_holds_requests_until_the_mode_changes() -> None:
    """A hung request is counted on arrival and answered by the next mode when the hang ends."""
    async with Upstream() as upstream, httpx.AsyncClient(base_url=upstream.url) as client:
        upstream.set_mode("hang")
        call = asyncio.create_task(client.get("/search?q=x"))
        await asyncio.sleep(0.3)
        assert not call.done()
        assert upstream.received() == 1 and upstream.by_path["/search"] == 1
        upstream.reset_share = 0.0
        upstream.set_mode("outage")
        assert (await call).status_code == 503
        assert "retry-after" not in (await client.get("/search")).headers


async def test_upstream_close_releases_hung_requests_and_leaves_no_task() -> None:
    """Leaving the upstream's block with a request still hung ends its handler and closes its socket."""
    upstream = Upstream()
    async with upstream, httpx.AsyncClient(base_url=upstream.url) as client:
        upstream.set_mode("hang")
        call = asyncio.create_task(client.get("/catalog/2"))
        await asyncio.sleep(0.2)
        await upstream.close()
        with pytest.raises(httpx.RemoteProtocolError):
            await call
    assert upstream._tasks == set() and upstream._writers == set()
    others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    assert others == []
