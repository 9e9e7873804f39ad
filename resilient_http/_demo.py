"""The demo: one stream of traffic, two clients, a dependency that fails in every common way.

``python -m resilient_http demo`` compares a bare ``httpx.AsyncClient(timeout=5)``
with an ``httpx.AsyncClient`` over :class:`~resilient_http.ResilientTransport`.
Each client runs in a process of its own (:mod:`resilient_http._demo_side`)
with its own embedded "api" and "search" upstreams (see
:mod:`resilient_http._upstream`), so that neither client's work, nor its
retries, can distort what the other one or its dependency goes through.
Both receive the same calls at the same moments, and both dependencies are
switched through the same phases at the same moments:

    healthy    both hosts answer
    errors     half the requests get 503 with Retry-After: 1
    quota      api traffic doubles, and api serves at most 50 requests a second (429 beyond)
    hang       api stops answering; search is fine
    outage     both hosts: 503 without Retry-After, or a connection reset
    recovery   both hosts answer again

The traffic is open-loop, like users: calls start on a fixed schedule
(40 a second to api, 10 to search) whether or not earlier ones have
finished, each in its own task, up to a cap of calls in flight per client
that keeps every process on time. This process keeps the clock: a line a
second shows how each client is doing, and the run ends with a table that
compares them: success, the load put on the dependency (measured at the
server), latency, stale answers, breaker openings, calls shed, and how long
each took to recover once the outage ended; then, when resilient_http gave
fewer fresh answers than bare httpx in a phase, why. Ctrl-C ends the run
at once, with the table of the calls made so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

from ._config import Policy
from ._demo_report import Record, Summary, final_table, recovery, why_fewer_fresh
from ._demo_scenario import DRAIN, MAX_IN_FLIGHT, Timeline, demo_policies, policies_to_wire

LEAD = 0.2  # seconds between telling the sides when the timeline starts and its start
GRACE = 0.3  # seconds a second's line waits for a side's report before calling it late
STARTED_WITHIN = 30.0  # seconds a side may take to start its upstreams and its client
ENDED_WITHIN = 0.4  # seconds a side has to report once told to stop, and again to exit
SIDE = "resilient_http._demo_side"  # run with the package's own directory first on the path
_ROOT = str(Path(__file__).resolve().parents[1])


class DemoError(Exception):
    """The demo cannot run, or a side of it failed; the message says why."""


class SideProcess:
    """One side of the demo in its own process, as this process sees it: what it has reported so far.

    It owns the process: :meth:`close` ends it, at once if it has not
    ended on its own within :data:`ENDED_WITHIN` seconds of its input closing.
    """

    def __init__(self, name: str, progress: asyncio.Event) -> None:
        self.name = name
        self.ready: dict[str, Any] | None = None  # its upstreams' URLs, and its metrics URL
        self.error: str | None = None
        self.records: list[Record] = []
        self.finish_times: list[float] = []
        self.received: dict[int, int] = {}  # upstream arrivals in each second of the timeline
        self.second = 0  # the last second reported
        self.counts: dict[str, Any] = {"due": 0, "started": 0, "attempts": 0, "answered": {}, "late": 0.0}
        self.ended = False
        self.gone = False
        self._progress = progress  # set whenever any side says something
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self, settings: dict[str, Any]) -> None:
        path = os.environ.get("PYTHONPATH")
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            *(f"-W{option}" for option in sys.warnoptions),
            "-m",
            SIDE,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": _ROOT + (os.pathsep + path if path else "")},
            limit=1 << 26,
            start_new_session=True,  # a terminal's Ctrl-C reaches this process alone, which tells the sides
        )
        self._reader = asyncio.create_task(self._read())
        self.tell(json.dumps(settings))

    def tell(self, line: str) -> None:
        process = self._process
        if process is not None and process.stdin is not None and not process.stdin.is_closing():
            process.stdin.write(line.encode() + b"\n")

    async def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        try:
            while line := await self._process.stdout.readline():
                self._take(json.loads(line))
        finally:
            self.gone = True
            self._progress.set()

    def _take(self, message: dict[str, Any]) -> None:
        if "ready" in message:
            self.ready = message["ready"]
        elif "error" in message:
            self.error = message["error"]
        else:
            report = message.get("end", message)
            for row in report.pop("records"):
                record = Record(*row)
                self.records.append(record)
                self.finish_times.append(record.finished)
            if "second" in report:
                self.second = report.pop("second")
                self.received[self.second] = report.pop("received")
            self.counts.update(report)
            self.ended = "end" in message
        self._progress.set()

    async def close(self) -> None:
        """Close its input, which tells it to stop, and see that the process has ended."""
        process = self._process
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        killed = False
        try:
            await asyncio.wait_for(process.wait(), ENDED_WITHIN)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):  # it may have ended since the wait gave up
                process.kill()
                killed = True
            await process.wait()
        if self._reader is not None:
            await self._reader
        if not killed and not self.ended and self.error is None and process.returncode:
            self.error = f"the {self.name} side failed (exit status {process.returncode})"

    def summary(self, outage_end: float, ended: float) -> Summary:
        counts = self.counts
        return Summary(
            self.name,
            counts["due"],
            counts["started"],
            self.records,
            counts["attempts"],
            Counter(counts["answered"]),
            counts.get("openings"),
            recovery(self.records, outage_end, ended),
        )


async def _until(progress: asyncio.Event, done: Callable[[], bool], until: float, stop: asyncio.Event) -> None:
    """Wait until ``done()`` holds, ``until`` comes (on ``time.monotonic()``), or ``stop`` is set."""
    while not done() and not stop.is_set() and (left := until - time.monotonic()) > 0:
        progress.clear()
        waits = [asyncio.ensure_future(progress.wait()), asyncio.ensure_future(stop.wait())]
        await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()


def _live_line(second: int, phase: str, sides: list[SideProcess]) -> str:
    """Per client, over the second that just ended: calls finished, 2xx share, stale answers, upstream requests."""
    parts = [f"{second:4d}s {phase:<10}"]
    for side in sides:
        if side.second < second:
            parts.append(f"{'(late)':^23}")
            continue
        done = side.records[bisect_left(side.finish_times, second - 1.0) : bisect_left(side.finish_times, second)]
        ok = sum(record.ok for record in done)
        stale = sum(record.stale for record in done)
        share = f"{100 * ok / len(done):3.0f}%" if done else "   -"
        parts.append(f"{len(done):5d} {share} {stale:5d} {side.received.get(second, 0):6d}")
    return " | ".join(parts)


async def _lines(
    timeline: Timeline, sides: list[SideProcess], progress: asyncio.Event, stop: asyncio.Event, out: TextIO
) -> None:
    """A line a second for every whole second of the run, and a banner when a phase begins."""
    _print(out, f"{'':16}" + "".join(f" | {side.name:^23}" for side in sides))
    _print(out, f"{'time  phase':16}" + " | calls  ok% stale  att/s" * len(sides))
    announced = 0

    def announce(before: float) -> None:
        """Banners of the phases that began before ``before`` (on the timeline), not yet announced."""
        nonlocal announced
        for begin, _, phase in timeline.bounds[announced:]:
            if begin - timeline.start >= before:
                break
            _print(out, f"-- {begin - timeline.start:4.1f}s {phase.name}: {phase.what}")
            announced += 1

    announce(1e-3)
    for second in range(1, math.floor(timeline.end - timeline.start + 1e-6) + 1):

        def reported(second: int = second) -> bool:
            return all(side.second >= second or side.gone for side in sides)

        await _until(progress, reported, timeline.start + second + GRACE, stop)
        if stop.is_set():
            return
        announce(second - 1e-3)  # a phase that begins on the second is announced after its line
        phase = timeline.at(timeline.start + second - 0.5)
        _print(out, _live_line(second, phase.name if phase else "", sides))


def _print(out: TextIO, line: str = "") -> None:
    print(line, file=out, flush=True)


async def run_demo(
    duration: float,
    policies: tuple[Mapping[str, Policy], Policy] | None = None,
    *,
    metrics_port: int | None = None,
    out: TextIO,
) -> bool:
    """Run the demo for ``duration`` seconds and print its table; ``True`` when it was interrupted.

    ``policies`` are the resilient client's, with its hosts named ``api.demo``
    and ``search.demo`` (port 80); :func:`demo_policies` when omitted. With
    ``metrics_port`` (0: any free port), its transport's metrics are served
    on 127.0.0.1 while it runs. SIGINT ends the run within a second, with the
    table of the calls made so far. :class:`DemoError` when the demo cannot
    run, or one of its sides failed.
    """
    named, default = demo_policies() if policies is None else policies
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    progress = asyncio.Event()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread, or Windows
        loop.add_signal_handler(signal.SIGINT, stop.set)
    sides = [SideProcess("bare httpx", progress), SideProcess("resilient_http", progress)]
    timeline = None
    try:
        chosen = policies_to_wire(named, default)
        await sides[0].start({"duration": duration, "seed": 0, "policies": None, "metrics_port": None})
        await sides[1].start({"duration": duration, "seed": 1, "policies": chosen, "metrics_port": metrics_port})
        started = lambda: all(s.ready or s.error or s.gone for s in sides)  # noqa: E731
        await _until(progress, started, time.monotonic() + STARTED_WITHIN, stop)
        for side in sides:
            if not (side.ready or side.error or side.gone or stop.is_set()):
                side.error = f"the {side.name} side did not start within {STARTED_WITHIN:.0f} s"
        if not stop.is_set() and all(side.ready for side in sides):
            for side in sides:
                assert side.ready is not None
                hosts = ", ".join(f"{host} at {url}" for host, url in side.ready["upstreams"].items())
                _print(out, f"{side.name:>14}: {hosts}")
                if "metrics" in side.ready:
                    _print(out, f"metrics: {side.ready['metrics']}")
            timeline = Timeline(time.monotonic() + LEAD, duration)
            for side in sides:
                side.tell(json.dumps({"start": timeline.start}))
            await _lines(timeline, sides, progress, stop, out)
            await _until(progress, lambda: all(s.ended or s.gone for s in sides), timeline.end + DRAIN + 1.0, stop)
        ended = time.monotonic()
        if stop.is_set() and timeline is not None:
            for side in sides:
                side.tell("stop")
            waited = asyncio.Event()  # a second Ctrl-C does not cut this short: the wait is bounded
            await _until(
                progress, lambda: all(s.ended or s.gone for s in sides), time.monotonic() + ENDED_WITHIN, waited
            )
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGINT)
        await asyncio.gather(*(side.close() for side in sides))
    failed = [side.error for side in sides if side.error]
    if failed:
        raise DemoError("; ".join(failed))
    if timeline is None or ended <= timeline.start:
        _print(out, "\ninterrupted before the run began")
        return True
    _print_end(out, timeline, sides, ended, stop.is_set())
    return stop.is_set()


def _print_end(out: TextIO, timeline: Timeline, sides: list[SideProcess], ended: float, interrupted: bool) -> None:
    """The final table, what it does not cover, and why resilient_http gave fewer fresh answers, if it did."""
    since = ended - timeline.start
    if interrupted:
        _print(out, f"\ninterrupted after {since:.1f}s: the table covers the calls made so far")
    _print(out)
    outage_end = timeline.ends("outage") - timeline.start
    for line in final_table([side.summary(outage_end, since) for side in sides]):
        _print(out, line)
    late = ", ".join(f"{side.counts['late'] * 1000:.0f} ms late ({side.name})" for side in sides)
    _print(out, f"timing: each client in its own process, at most {MAX_IN_FLIGHT} calls in flight (a call due beyond")
    _print(out, f" that is not started); calls started at most {late}")
    unreported = [side.name for side in sides if not side.ended]
    if unreported:
        _print(out, f"not reported: the last moments of {' and '.join(unreported)} (it did not answer in time)")
    phases = [(phase.name, begin - timeline.start, end - timeline.start) for begin, end, phase in timeline.bounds]
    bare, resilient = sides
    for line in why_fewer_fresh(bare.records, resilient.records, phases):
        _print(out, line)
