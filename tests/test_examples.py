"""The examples run to completion and still show what they say they show.

Each script runs in its own process, all of them at once (the module takes
as long as the slowest, about two seconds); the Starlette service is also
driven in-process through ``httpx.ASGITransport``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from resilient_http import Policy, ResilientTransport

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
import starlette_service  # noqa: E402

#: name -> (command line after the interpreter, extra environment)
RUNS: dict[str, tuple[list[str], dict[str, str]]] = {
    "quickstart": ([str(EXAMPLES / "quickstart.py")], {}),
    "stale_fallback": ([str(EXAMPLES / "stale_fallback.py")], {}),
    "trio_program": ([str(EXAMPLES / "trio_program.py")], {}),
    "idempotent_posts": ([str(EXAMPLES / "idempotent_posts.py")], {}),
    "llm_client": ([str(EXAMPLES / "llm_client.py")], {}),
    "starlette_smoke": ([str(EXAMPLES / "starlette_service.py"), "--smoke"], {}),
    "starlette_multiprocess": ([str(EXAMPLES / "starlette_service.py"), "--smoke"], {"PROMETHEUS_MULTIPROC_DIR": ""}),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, subprocess.Popen[str]]]:
    """Every example started at once, each in a process of its own."""
    base = {key: value for key, value in os.environ.items() if not key.lower().startswith("prometheus_multiproc")}
    started: dict[str, subprocess.Popen[str]] = {}
    for name, (argv, extra) in RUNS.items():
        env = {**base, **extra}
        if "PROMETHEUS_MULTIPROC_DIR" in extra:
            env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path_factory.mktemp(name))
        started[name] = subprocess.Popen(
            [sys.executable, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    yield started
    for process in started.values():
        if process.poll() is None:
            process.kill()
        process.communicate()


def output(runs: dict[str, subprocess.Popen[str]], name: str) -> str:
    """What example ``name`` printed, once it has exited 0 within its time."""
    try:
        stdout, stderr = runs[name].communicate(timeout=60)
    except subprocess.TimeoutExpired:
        runs[name].kill()
        pytest.fail(f"{name} did not finish within 60 s")
    assert runs[name].returncode == 0, f"{name} exited {runs[name].returncode}:\n{stderr}"
    assert not stderr, stderr
    return stdout


def line(text: str, start: str) -> str:
    """The one line of ``text`` that starts with ``start``."""
    found = [each for each in text.splitlines() if each.startswith(start)]
    assert len(found) == 1, f"expected one line starting {start!r} in:\n{text}"
    return found[0]


def test_quickstart_retries_opens_the_breaker_and_serves_stale(runs: dict[str, subprocess.Popen[str]]) -> None:
    """The quickstart's retry, breaker and stale answer all show in its output."""
    text = output(runs, "quickstart")
    assert "/flaky   -> 200 after 2 attempts" in text
    assert "CircuitOpenError" in text
    assert "stale=True" in text


def test_stale_fallback_serves_the_last_good_answer_with_its_age(runs: dict[str, subprocess.Popen[str]]) -> None:
    """Fresh answers while healthy; the last one, aged, during the outage and once the server is gone."""
    text = output(runs, "stale_fallback")
    healthy = [each for each in text.splitlines() if each.startswith("healthy")]
    assert [("price=9.99" in each, "price=10.49" in each, "stale=False" in each) for each in healthy] == [
        (True, False, True),
        (False, True, True),
    ]
    for phase in ("outage", "gone"):
        served = line(text, f"{phase:<8} GET /catalog/items/42 ")
        assert "-> 200 price=10.49 stale=True" in served
        assert re.search(r"age=\d+\.\ds Age: [1-9]\d* attempts=2$", served), served
    assert "-> 503 price=None stale=False attempts=2" in line(text, "outage   GET /catalog/items/7 ")
    assert line(text, "gone     GET /catalog/items/7 ").endswith("-> ConnectError after 2 attempts")
    assert 'resilient_http_requests_total{outcome="stale"} 2' in text
    assert 'resilient_http_stale_served_total{reason="server_error"} 1' in text
    assert 'resilient_http_stale_served_total{reason="error"} 1' in text


def test_trio_program_retries_after_a_503_and_an_attempt_timeout(runs: dict[str, subprocess.Popen[str]]) -> None:
    """Under trio: Retry-After is waited out, a hung attempt is cut and retried."""
    text = output(runs, "trio_program")
    assert line(text, "event loop:") == "event loop: trio"
    flaky = line(text, "GET /flaky")
    assert "-> 200 after 2 attempts" in flaky
    waited = re.search(r"waits: retry_after (\d+\.\d+)s", flaky)
    assert waited is not None and float(waited.group(1)) >= 1.0, flaky
    slow = line(text, "GET /slow")
    assert "-> 200 after 2 attempts" in slow
    seconds = re.search(r"in (\d+\.\d+)s", slow)
    assert seconds is not None and 0.3 <= float(seconds.group(1)) < 2.0, slow
    assert 'resilient_http_retries_total{reason="timeout"} 1' in text
    assert 'resilient_http_timeouts_total{kind="attempt"} 1' in text


def test_idempotent_posts_make_one_charge_each(runs: dict[str, subprocess.Popen[str]]) -> None:
    """Keyed POSTs are retried with one key and charge once; keyless ones are not retried."""
    text = output(runs, "idempotent_posts")
    a, b, c, d = (line(text, f"charge {name} ") for name in "ABCD")
    assert re.search(r"key [0-9a-f]{8} .*-> 200 ch_1 \(replayed\) +attempts=2 retry_stop=None charges made=1$", a), a
    assert re.search(r"key [0-9a-f]{8} .*-> 200 ch_2 +attempts=2 retry_stop=None charges made=1$", b), b
    assert re.search(r"no key .*-> 503 +attempts=1 retry_stop=not_idempotent charges made=0$", c), c
    assert re.search(r"no key .*-> ReadError +attempts=1 retry_stop=not_idempotent charges made=1$", d), d
    assert line(text, "charges on the server:").endswith("ch_1 charge A, ch_2 charge B, ch_3 charge D")


def test_llm_client_retries_for_the_sdk_streams_whole_and_shares_the_cooldown(
    runs: dict[str, subprocess.Popen[str]],
) -> None:
    """The OpenAI SDK gets answers after a 429 and a 503, a whole event stream, and one call's 429 holds all back."""
    text = output(runs, "llm_client")
    refused = line(text, "429 then 200")
    assert "-> 'Hello!' attempts=2" in refused
    waited = re.search(r"waits: retry_after (\d+\.\d)s", refused)
    assert waited is not None and float(waited.group(1)) >= 1.0, refused
    assert "-> 'Hello again!' attempts=2" in line(text, "503 then 200")
    assert line(text, "event stream").endswith("-> 12 events 'Once upon a time, a stream flowed to its end.'")
    shared = line(text, "shared cooldown")
    later = re.search(r"4 answers; .* the next 4 requests came (\d+\.\d+)s or more later$", shared)
    assert later is not None and float(later.group(1)) >= 1.0, shared


@pytest.mark.parametrize("run", ["starlette_smoke", "starlette_multiprocess"])
def test_starlette_service_runs_under_uvicorn(runs: dict[str, subprocess.Popen[str]], run: str) -> None:
    """Through real sockets, alone or in multiprocess mode, the service answers and /metrics counts."""
    text = output(runs, run)
    answers = [each for each in text.splitlines() if each.startswith("GET /price/")]
    assert [each.split(" -> ")[1][:3] for each in answers] == ["200"] * 5 + ["503"]
    assert "'stale': True" in answers[4]
    source = "every worker's" if run == "starlette_multiprocess" else "this process's"
    assert f"metrics ({source}" in text
    stale = r'resilient_http_requests_total\{host="127\.0\.0\.1:\d+",outcome="stale",transport="default"\} 1\.0'
    assert re.search(stale, text), text


def test_policies_toml_resolves_as_its_comments_say() -> None:
    """Each host gets the layers its table promises, laid over [default] and nothing else."""
    never_called = httpx.MockTransport(lambda request: httpx.Response(500))
    transport = ResilientTransport.from_file(EXAMPLES / "policies.toml", inner=never_called)

    def policy(host: str) -> Policy:
        return transport.policy_for(host)

    payments = policy("api.payments.example")
    assert payments.retry is not None and payments.retry.attempts == 4 and 500 not in payments.retry.statuses
    assert payments.retry.budget is not None and payments.retry.budget.ratio == 0.1
    assert payments.stale_cache is None and payments.rate_limit is None
    search = policy("search.internal.example")
    assert search.rate_limit is not None and search.rate_limit.rate == 200
    assert search.bulkhead is not None and search.bulkhead.max_concurrent == 16
    assert search.circuit_breaker is not None  # its own table does not inherit the wildcard's
    other = policy("billing.internal.example")
    assert other.circuit_breaker is None and other.rate_limit is not None and other.rate_limit.rate == 100
    catalog = policy("catalog.example")
    assert catalog.stale_cache is not None and catalog.stale_cache.max_stale == 600
    unknown = policy("api.elsewhere.example")
    assert unknown.timeout is not None and unknown.timeout.attempt == 5 and unknown.stale_cache is None


@pytest.mark.skipif(importlib.util.find_spec("resilient_http.__main__") is None, reason="no command line yet")
def test_policies_toml_passes_check() -> None:
    """``python -m resilient_http check`` accepts the example policy file."""
    done = subprocess.run(
        [sys.executable, "-m", "resilient_http", "check", str(EXAMPLES / "policies.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "valid" in done.stdout


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``(name, labels) -> value`` of a Prometheus exposition."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_starlette_service_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retried 503s are invisible to callers, a stale price stands in during an outage, /metrics says so."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    upstream = starlette_service.create_upstream()
    app = starlette_service.create_app(
        "http://pricing.internal", inner=httpx.ASGITransport(app=upstream), registry=CollectorRegistry()
    )
    service = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=service, base_url="http://s") as client:
        healthy = [await client.get(f"/price/{sku}") for sku in ("42", "7", "42", "7", "99")]
        upstream.state.down = True
        stale = await client.get("/price/42")
        missing = await client.get("/price/5")  # never answered: nothing to fall back on
        scraped = await client.get("/metrics", follow_redirects=True)

    assert [response.status_code for response in healthy] == [200] * 5
    assert sum(response.json()["attempts"] for response in healthy) == 7  # every third upstream request failed
    assert stale.status_code == 200 and stale.json()["stale"] is True and stale.json()["attempts"] == 3
    assert "age" in stale.headers
    assert missing.status_code == 503
    host = {("transport", "default"), ("host", "pricing.internal:80")}
    found = samples(scraped.text)

    def value(name: str, **labels: str) -> float | None:
        return found.get((name, frozenset(host | set(labels.items()))))

    assert value("resilient_http_requests_total", outcome="2xx") == 5
    assert value("resilient_http_requests_total", outcome="stale") == 1
    assert value("resilient_http_requests_total", outcome="5xx") == 1
    assert value("resilient_http_retries_total", reason="status_503") == 2 + 2 + 2
    assert value("resilient_http_stale_served_total", reason="server_error") == 1
    assert value("resilient_http_request_duration_seconds_count") == 7
